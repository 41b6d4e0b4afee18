"""Data: find, check, decode and split images (index, folds, audit, phantom). Knows files and pixels, not models."""
