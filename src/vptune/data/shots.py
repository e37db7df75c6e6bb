"""The few-shot protocol (CoOp's): K training images per class, drawn with the run's seed.

A class with fewer than K training images keeps all of them, and the run says so (a warning and
``notes``): refusing would make a 16-shot grid fail on one small class, and CoOp's own sampler
also takes what a class has."""

from __future__ import annotations

import warnings

import numpy as np
from torch.utils.data import Dataset, Subset


def labels_of(dataset: Dataset) -> np.ndarray:
    """The label of every item of a vptune dataset (ArrayImages, ImageFiles), without reading images."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [sample.label for sample in dataset.samples]
    return np.asarray(labels)


def few_shot(dataset: Dataset, shots: int, seed: int, num_classes: int) -> tuple[Subset, list[str]]:
    """``shots`` items per class of ``dataset`` drawn with ``seed`` (the same seed, the same images),
    and a note per class that had fewer."""
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    labels = labels_of(dataset)
    rng = np.random.default_rng(seed)
    chosen, notes = [], []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            notes.append(f"class {label} has {len(members)} training images, fewer than --shots {shots}: using all of them")
        chosen.extend(rng.permutation(members)[:shots].tolist())
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Subset(dataset, sorted(chosen)), notes
