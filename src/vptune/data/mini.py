"""The embedded mini-benchmark: small VTAB-style tasks generated deterministically from real
images that ship with vptune's dependencies or the system, so that a first run needs no download.

Every task has 1000 train+val images (800 train, 200 val) and at least 500 test images,
32x32 RGB uint8. The natural tasks come from other sources than the bundled backbone's
pretraining data (scikit-learn's handwritten digits and sample photos); the structured tasks
compose Fashion-MNIST *test-set* objects on a 32x32 canvas and ask about where, how many,
how big and which way up they are, which classifying clothes never taught. Train+val objects
and test objects come from disjoint halves of that test set; photo crops of train, val and test
come from disjoint tiles spread over each photo.

Generated arrays are cached as npz under ``$VPTUNE_CACHE/mini`` (default ``~/.cache/vptune/mini``),
written atomically and regenerated when missing or unreadable.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .cache import cache_root, save_npz_atomic
from .images import DataError

VERSION = 2  # bump when generation changes, so stale caches are not reused
SIZE = 32
TRAINVAL, VAL = 1000, 200
TEST = 1000  # per task, except digits (the 797 digits left after train+val)
SEED = 20240


@dataclass(frozen=True)
class MiniTask:
    name: str
    group: str  # natural | specialized | structured
    class_names: tuple[str, ...]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class MiniArrays:
    """One task's images (N, 32, 32, 3) uint8 and labels (N,) int64; the first 800 of
    train+val are the train split, the last 200 the val split."""

    trainval_x: np.ndarray
    trainval_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


_GRID = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
_ZOOMS = (32, 64, 128)  # photo crop sides resized to 32 px
_PHOTOS = ("china", "flower")
SCALES = {"tiny": (6, 9), "small": (11, 14), "medium": (17, 20), "large": (24, 28)}  # object side in px

MINI_TASKS: dict[str, MiniTask] = {task.name: task for task in (
    MiniTask("digits", "natural", tuple(str(d) for d in range(10)),
             "scikit-learn's 8x8 handwritten digits upscaled to 32x32: which digit (10 classes)"),
    MiniTask("photo-zoom", "natural", tuple(f"{p} x{z // 32}" for p in _PHOTOS for z in _ZOOMS),
             "crops of scikit-learn's two sample photos: which photo and at which zoom (6 classes)"),
    MiniTask("location", "structured", _GRID,
             "one small clothing item: which cell of a 3x3 grid it sits in (9 classes)"),
    MiniTask("orientation", "structured", ("0°", "90°", "180°", "270°"),
             "one clothing item rotated counter-clockwise by a multiple of 90 degrees: by how much (4 classes)"),
    MiniTask("count", "structured", ("1", "2", "3", "4"),
             "1 to 4 small clothing items at distinct places: how many (4 classes)"),
    MiniTask("scale", "structured", tuple(SCALES),
             "one clothing item at a random place: its size class, a proxy for distance (4 classes)"),
)}


def _gray_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1)


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def crop_item(image: np.ndarray, side: int) -> np.ndarray:
    """A Fashion-MNIST item cropped to its bounding box, resized so its longer side is ``side``
    (shared with the captioned canvases of ``scenes.py``)."""
    rows, cols = np.nonzero(image > 20)
    crop = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))


def paste(canvas: np.ndarray, item: np.ndarray, center_row: float, center_col: float) -> None:
    """Draw ``item`` (brightest pixel wins) centred near the given point, kept inside the canvas."""
    h, w = item.shape
    top = int(np.clip(round(center_row - h / 2), 0, canvas.shape[0] - h))
    left = int(np.clip(round(center_col - w / 2), 0, canvas.shape[1] - w))
    region = canvas[top:top + h, left:left + w]
    np.maximum(region, item, out=region)


def _cell_center(cell: int, rng: np.random.Generator) -> tuple[float, float]:
    step = SIZE / 3
    row, col = divmod(cell, 3)
    return (row + 0.5) * step + rng.uniform(-1, 1), (col + 0.5) * step + rng.uniform(-1, 1)


def _compose(objects: np.ndarray, n: int, rng: np.random.Generator, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases for a structured task, from items drawn out of ``objects`` (M, 28, 28)."""
    labels = _balanced_labels(n, MINI_TASKS[task].num_classes, rng)
    canvases = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    for canvas, label in zip(canvases, labels):
        pick = lambda: objects[rng.integers(len(objects))]  # noqa: E731
        if task == "location":
            paste(canvas, crop_item(pick(), 10), *_cell_center(int(label), rng))
        elif task == "orientation":
            item = np.rot90(crop_item(pick(), int(rng.integers(20, 27))), k=int(label))
            paste(canvas, np.ascontiguousarray(item), SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-2, 2))
        elif task == "count":
            for cell in rng.choice(9, size=int(label) + 1, replace=False):
                paste(canvas, crop_item(pick(), int(rng.integers(9, 12))), *_cell_center(int(cell), rng))
        elif task == "scale":
            low, high = list(SCALES.values())[label]
            item = crop_item(pick(), int(rng.integers(low, high + 1)))
            h, w = item.shape
            paste(canvas, item, rng.uniform(h / 2, SIZE - h / 2), rng.uniform(w / 2, SIZE - w / 2))
    return _gray_to_rgb(canvases), labels


def _structured(task: str) -> Callable[[], MiniArrays]:
    def generate() -> MiniArrays:
        from .fashion_mnist import load_fashion_mnist

        objects, _ = load_fashion_mnist("test")  # never the pretraining (train) set
        half = len(objects) // 2
        rng = np.random.default_rng([SEED, list(MINI_TASKS).index(task)])
        trainval = _compose(objects[:half], TRAINVAL, rng, task)
        test = _compose(objects[half:], TEST, rng, task)
        return MiniArrays(*trainval, *test)
    return generate


def _digits() -> MiniArrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images * (255 / 16)).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(g).resize((SIZE, SIZE), Image.BILINEAR)) for g in gray])
    order = np.random.default_rng([SEED, 0]).permutation(len(images))
    images, labels = _gray_to_rgb(images[order]), digits.target[order].astype(np.int64)
    return MiniArrays(images[:TRAINVAL], labels[:TRAINVAL], images[TRAINVAL:], labels[TRAINVAL:])


# Each photo is cut into a 3x4 grid of tiles (142x160 px, wide enough for the largest crop);
# a crop lies inside one tile, so train, val and test crops never overlap, while the train and
# test tiles each cover every row and every column of the grid (val: two tiles of its own).
_TILE_SPLITS = (
    ("train", "test", "val", "train"),
    ("test", "train", "train", "test"),
    ("train", "val", "test", "train"),
)


def _tiles(photo: np.ndarray, split: str) -> list[np.ndarray]:
    rows, cols = len(_TILE_SPLITS), len(_TILE_SPLITS[0])
    h, w = photo.shape[0] // rows, photo.shape[1] // cols
    return [photo[r * h:(r + 1) * h, c * w:(c + 1) * w]
            for r in range(rows) for c in range(cols) if _TILE_SPLITS[r][c] == split]


def _photo_crops(photos: list[np.ndarray], split: str, n: int, rng: np.random.Generator):
    labels = _balanced_labels(n, len(_PHOTOS) * len(_ZOOMS), rng)
    tiles = [_tiles(photo, split) for photo in photos]
    crops = []
    for label in labels:
        photo_index, zoom_index = divmod(int(label), len(_ZOOMS))
        side = _ZOOMS[zoom_index]
        tile = tiles[photo_index][int(rng.integers(len(tiles[photo_index])))]
        top = int(rng.integers(0, tile.shape[0] - side + 1))
        left = int(rng.integers(0, tile.shape[1] - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(tile[top:top + side, left:left + side]))
        crops.append(np.asarray(crop.resize((SIZE, SIZE), Image.BILINEAR)))
    return np.stack(crops), labels


def _photo_zoom() -> MiniArrays:
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(f"{name}.jpg") for name in _PHOTOS]  # 427x640 RGB each
    rng = np.random.default_rng([SEED, 1])
    train_x, train_y = _photo_crops(photos, "train", TRAINVAL - VAL, rng)
    val_x, val_y = _photo_crops(photos, "val", VAL, rng)
    test = _photo_crops(photos, "test", TEST, rng)
    return MiniArrays(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), *test)


_GENERATORS: dict[str, Callable[[], MiniArrays]] = {
    "digits": _digits, "photo-zoom": _photo_zoom,
    **{name: _structured(name) for name, task in MINI_TASKS.items() if task.group == "structured"},
}


def task(name: str) -> MiniTask:
    if name not in MINI_TASKS:
        raise DataError(f"unknown mini task {name!r}; the mini-benchmark has: {', '.join(MINI_TASKS)}")
    return MINI_TASKS[name]


def generate(name: str) -> MiniArrays:
    """Generate a task's arrays from scratch (deterministic: the same bytes every time)."""
    task(name)
    return _GENERATORS[name]()


def cache_path(name: str) -> Path:
    return cache_root() / "mini" / f"{name}-v{VERSION}.npz"


def load(name: str) -> MiniArrays:
    """A task's arrays from the cache, generated (and cached) when missing or corrupt."""
    path = cache_path(name)
    if path.is_file():
        try:
            with np.load(path) as stored:
                arrays = MiniArrays(*(stored[key] for key in MiniArrays.__dataclass_fields__))
            _validate(name, arrays)
            return arrays
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass  # unreadable or stale: regenerate below
    arrays = generate(name)
    _validate(name, arrays)
    save_npz_atomic(path, **vars(arrays))
    return arrays


def _validate(name: str, arrays: MiniArrays) -> None:
    n = MINI_TASKS[name].num_classes
    for x, y in ((arrays.trainval_x, arrays.trainval_y), (arrays.test_x, arrays.test_y)):
        if x.dtype != np.uint8 or x.shape[1:] != (SIZE, SIZE, 3) or len(x) != len(y):
            raise ValueError(f"mini task {name}: bad array shapes {x.shape} {y.shape}")
        if y.min() < 0 or y.max() >= n:
            raise ValueError(f"mini task {name}: labels outside 0..{n - 1}")
    if len(arrays.trainval_x) != TRAINVAL or len(arrays.test_x) < 500:
        raise ValueError(f"mini task {name}: {len(arrays.trainval_x)} train+val, {len(arrays.test_x)} test images")


def main() -> None:
    """Generate (or load) every task and print the benchmark's table."""
    print(f"{'task':<12} {'group':<11} {'classes':>7} {'train':>5} {'val':>4} {'test':>5}  description")
    for name, info in MINI_TASKS.items():
        arrays = load(name)
        print(f"{name:<12} {info.group:<11} {info.num_classes:>7} {TRAINVAL - VAL:>5} {VAL:>4} "
              f"{len(arrays.test_x):>5}  {info.description}")
    print(f"cache: {cache_root() / 'mini'}")


if __name__ == "__main__":
    main()
