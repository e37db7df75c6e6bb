"""Datasets over image files (decoded with PIL) and over in-memory uint8 arrays, and the
up-front check that finds unreadable images before training starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SKIP_HINT = "fix or remove it, or pass --skip-bad-images to skip such files"


class DataError(ValueError):
    """A dataset that cannot be used as given: the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    origin: str  # where the sample was declared, e.g. "test.txt:12", for error messages


def _read(path: Path, full: bool) -> Image.Image | None:
    """The RGB image (``full``), or only a cheap check of its header and structure."""
    with Image.open(path) as image:
        if full:
            return image.convert("RGB")
        image.verify()
        return None


def check_images(samples: list[Sample], skip_bad_images: bool) -> tuple[list[Sample], list[str]]:
    """Open every image once. Bad ones raise a DataError naming the file, or with
    ``skip_bad_images`` are fully decoded, dropped and returned as "path (origin): reason"."""
    kept, skipped = [], []
    for sample in samples:
        try:
            _read(sample.path, full=skip_bad_images)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            reason = f"{sample.path} ({sample.origin}): {type(error).__name__}: {error}"
            if not skip_bad_images:
                raise DataError(f"cannot read image {reason}; {SKIP_HINT}") from error
            skipped.append(reason)
            continue
        kept.append(sample)
    return kept, skipped


class ImageFiles(Dataset):
    """(transformed image, label) for each sample, decoded to RGB with PIL."""

    def __init__(self, samples: list[Sample], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = _read(sample.path, full=True)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read image {sample.path} ({sample.origin}): {error}; {SKIP_HINT}") from error
        return self.transform(image), sample.label


class ArrayImages(Dataset):
    """(transformed image, label) over uint8 images (N, H, W, 3) held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])
