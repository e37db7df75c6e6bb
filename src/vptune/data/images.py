"""Datasets over image files (decoded with PIL) and over in-memory uint8 arrays, and the
up-front check that finds unreadable images before training starts.

Every image file vptune reads goes through ``open_image``, which refuses an image above a
pixel limit from its header, before decoding it: a small PNG can declare 100 megapixels and
decode to gigabytes. The default limit (``DEFAULT_MAX_PIXELS``, 16 megapixels) is far below
Pillow's own (89 megapixels warned, 179 refused) and is raised with ``--max-image-pixels``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SKIP_HINT = "fix or remove it, or pass --skip-bad-images to skip such files"
DEFAULT_MAX_PIXELS = 16_000_000  # 4000 x 4000; a benchmark image is far smaller (VTAB, FGVC: under 1 MP)


class DataError(ValueError):
    """A dataset that cannot be used as given: the message names the file (and line) and the fix."""


class ImageTooLarge(DataError):
    """An image above the pixel limit, refused before it is decoded."""


def check_max_pixels(max_pixels: int | None) -> int:
    """The pixel limit to apply: ``max_pixels`` (at least 1), or the default when None."""
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if max_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {max_pixels}")
    return max_pixels


def open_image(file, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Open an image (a path or a binary file object) lazily, refusing it from its header when
    it has more than ``max_pixels`` pixels (default ``DEFAULT_MAX_PIXELS``); ``name`` names it
    in the message. The caller decodes it (``convert``) and closes it."""
    limit = check_max_pixels(max_pixels)
    name = name or str(file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(file)
    except Image.DecompressionBombError as error:  # above twice Pillow's limit: refused on open
        raise ImageTooLarge(f"{name}: {error}; vptune refuses images above {limit:,} pixels") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise ImageTooLarge(
            f"{name} is {width}x{height} = {width * height / 1e6:.3g} megapixels, above the limit of "
            f"{limit / 1e6:.3g} megapixels: downscale it, or raise the limit with --max-image-pixels"
        )
    return image


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    origin: str  # where the sample was declared, e.g. "test.txt:12", for error messages


def _read(path: Path, full: bool, max_pixels: int | None) -> Image.Image | None:
    """The RGB image (``full``), or only a cheap check of its header and structure."""
    with open_image(path, max_pixels) as image:
        if full:
            return image.convert("RGB")
        image.verify()
        return None


def check_images(
    samples: list[Sample], skip_bad_images: bool, max_pixels: int | None = None
) -> tuple[list[Sample], list[str]]:
    """Open every image once. Bad ones (unreadable, or above ``max_pixels``) raise a DataError
    naming the file, or with ``skip_bad_images`` are fully decoded, dropped and returned as
    "path (origin): reason"."""
    kept, skipped = [], []
    for sample in samples:
        try:
            _read(sample.path, full=skip_bad_images, max_pixels=max_pixels)
        except ImageTooLarge as error:
            if not skip_bad_images:
                raise DataError(f"{error} ({sample.origin}); or pass --skip-bad-images to skip such files") from None
            skipped.append(f"{sample.path} ({sample.origin}): {error}")
            continue
        except (OSError, ValueError) as error:
            reason = f"{sample.path} ({sample.origin}): {type(error).__name__}: {error}"
            if not skip_bad_images:
                raise DataError(f"cannot read image {reason}; {SKIP_HINT}") from error
            skipped.append(reason)
            continue
        kept.append(sample)
    return kept, skipped


class ImageFiles(Dataset):
    """(transformed image, label) for each sample, decoded to RGB with PIL."""

    def __init__(self, samples: list[Sample], transform: Callable, max_pixels: int | None = None) -> None:
        self.samples, self.transform, self.max_pixels = samples, transform, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = _read(sample.path, full=True, max_pixels=self.max_pixels)
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
