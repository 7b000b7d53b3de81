"""Data in: every source becomes one patch-dataset format (see patches/dataset.py)."""
