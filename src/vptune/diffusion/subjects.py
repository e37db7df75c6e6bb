"""Held-out subjects for subject-driven generation on the bundled model ``vptune_sd_fmnist``.

A subject is one Fashion-MNIST image from the *test* split (the ``test`` canvas pool, test images
5,000-9,999), which the bundled model's pretraining never saw: it drew its canvases from the
``pretrain`` pool, train images 0-54,999. ``subject_images`` draws that one item in several places
and sizes with the scenes' fixed-subject rendering (``scenes.render(..., sources=)``), as the 3-5
photos of one object that DreamBooth starts from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUBJECT_POOL = "test"  # Fashion-MNIST test split 5,000-9,999: never in the bundled models' pretraining


@dataclass(frozen=True)
class Subject:
    images: np.ndarray  # (count, size, size) uint8 grey canvases
    index: int  # the Fashion-MNIST test-split image every canvas shows
    kind: int  # its label (vptune.data.texts.KINDS)
    scenes: tuple  # the scenes drawn (place, size class of the one item)


def subject_index(kind: int, nth: int = 0) -> int:
    """The test-split index of the ``nth`` image of ``kind`` in the subject pool."""
    from ..data.scenes import NUM_KINDS, pool_by_kind

    if not 0 <= kind < NUM_KINDS:
        raise ValueError(f"kind must be 0..{NUM_KINDS - 1} (Fashion-MNIST labels), got {kind}")
    candidates = pool_by_kind(SUBJECT_POOL)[kind]
    if not 0 <= nth < len(candidates):
        raise ValueError(f"the subject pool has {len(candidates)} images of kind {kind}; nth={nth} is out of range")
    return int(candidates[nth])


def subject_images(kind: int = 8, count: int = 4, *, nth: int = 0, seed: int = 0, size: int = 32) -> Subject:
    """``count`` canvases of one held-out item (default: the first bag of the test pool), upright, each
    alone at a random place and size class, drawn reproducibly from ``seed``."""
    from ..data.scenes import MAX_ITEMS, render, sample_scene

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    index = subject_index(kind, nth)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, num_items=1).replace_item(0, kind=kind, rotation=0) for _ in range(count)]
    sources = np.full((count, MAX_ITEMS), -1, dtype=np.int32)
    sources[:, 0] = index
    images, _ = render(scenes, SUBJECT_POOL, rng, size=size, sources=sources)
    return Subject(images, index, kind, tuple(scenes))


def write_subject_folder(folder: str | Path, kind: int = 8, count: int = 4, *, nth: int = 0, seed: int = 0) -> list[Path]:
    """``subject_images`` as grey PNGs in ``folder`` (a ``subject:DIR`` training folder), with a
    ``subject.json`` saying which held-out image they show."""
    from PIL import Image

    from ..data.texts import KINDS, caption

    subject = subject_images(kind, count, nth=nth, seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, image in enumerate(subject.images):
        path = folder / f"subject_{n}.png"
        Image.fromarray(image, mode="L").save(path)
        paths.append(path)
    record = {"fashion_mnist_split": "test", "index": subject.index, "kind": KINDS[kind], "pool": SUBJECT_POOL,
              "seed": seed, "captions": [caption(scene) for scene in subject.scenes]}
    (folder / "subject.json").write_text(json.dumps(record, indent=1))
    return paths
