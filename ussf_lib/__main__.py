"""``python -m ussf_lib`` is the same as the ``ussf`` console script (torchrun needs the module form)."""

from ussf_lib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
