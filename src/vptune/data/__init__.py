"""Datasets for training and evaluation: image folders, VTAB-1k and FGVC splits, and the
embedded mini-benchmark, preprocessed for the backbone at hand; vision-language data (the
captioned-canvas mini benchmark, VQAv2, NLVR2, Flickr30K) with text through a tokenizer."""

from .build import DataBundle, build_data
from .images import DataError
from .mini import MINI_TASKS, MiniTask
from .tokenizer import WordTokenizer
from .vl import VLDataBundle, build_vl_data

__all__ = ["DataBundle", "DataError", "MINI_TASKS", "MiniTask", "VLDataBundle", "WordTokenizer", "build_data",
           "build_vl_data"]
