"""Analysis of the data itself: exploration and image spectra (notebooks 01-02)."""
