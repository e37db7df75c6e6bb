"""Datasets for training and evaluation: folders, VTAB-1k and FGVC splits, and the embedded mini-benchmark."""
