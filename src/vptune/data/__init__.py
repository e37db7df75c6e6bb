"""Datasets for training and evaluation: image folders, VTAB-1k and FGVC splits, and the
embedded mini-benchmark, preprocessed for the backbone at hand."""

from .build import DataBundle, build_data
from .images import DataError
from .mini import MINI_TASKS, MiniTask

__all__ = ["DataBundle", "DataError", "MINI_TASKS", "MiniTask", "build_data"]
