"""ussf: a toolkit that reproduces and extends US-SFNet (arXiv 2308.16738) for ultrasound classification.

The library does the work; the numbered notebooks in ``notebooks/`` narrate it.
"""

__version__ = "0.1.0"
