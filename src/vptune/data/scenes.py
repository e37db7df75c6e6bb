"""Captioned Fashion-MNIST canvases: the one generator of scenes and their pictures that the
vision-language mini benchmark (``minivl.py``), the pretraining of the bundled vision-language
models and the bundled text-to-image model share.

A ``Scene`` is a structured description: 1 to 4 ``Item``s, each a Fashion-MNIST kind, a named
place, a size class and a rotation. ``render`` draws scenes with real Fashion-MNIST images of
the right kind taken from one *pool*; ``texts.py`` turns descriptions into captions,
questions and statements, so that the picture alone decides what the text says.

Pools keep what the bundled models are pretrained on apart from what the benchmark tests:
``pretrain`` and ``pretrain-val`` are Fashion-MNIST's train split (which the bundled ViT was
also pretrained on); ``train``, ``val`` and ``test`` are disjoint slices of its test split,
which no bundled model is pretrained on. The test pool is the mini benchmark's test half
(``mini.py``), so no benchmark's training items appear in either's test canvases.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .mini import SCALES, crop_item, paste

SIZE = 32  # canvas side the size ranges below are given for; ``render`` scales them to other sides
NUM_KINDS = 10  # Fashion-MNIST's classes, in its label order
PLACES = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
SIZES = tuple(SCALES)  # tiny, small, medium, large: the mini benchmark's scale classes
ROTATIONS = (0, 90, 180, 270)  # degrees counter-clockwise
LAYOUTS = ("single", "pair", "grid2", "grid3")
MAX_ITEMS = 4

# Fashion-MNIST split and [start, stop) of each pool.
POOLS: dict[str, tuple[str, int, int]] = {
    "pretrain": ("train", 0, 55000),
    "pretrain-val": ("train", 55000, 60000),
    "train": ("test", 0, 4000),
    "val": ("test", 4000, 5000),
    "test": ("test", 5000, 10000),
}
PRETRAIN_POOLS = ("pretrain", "pretrain-val")  # what bundled VL / text-to-image models may be pretrained on
BENCHMARK_POOLS = ("train", "val", "test")  # held out from all pretraining

_CORNERS = (0, 2, 6, 8)
_THIRDS = (1 / 6, 1 / 2, 5 / 6)  # centre of row / column 0, 1, 2 on a 3x3 grid
_QUARTERS = (1 / 4, 1 / 2, 3 / 4)  # the same on halves (2x2 grid, left/right, top/bottom)
_MAX_SIDE = {"pair": 14, "grid2": 14, "grid3": 12}  # px at 32: items stay inside their cell


@dataclass(frozen=True)
class Item:
    kind: int  # Fashion-MNIST label 0..9
    place: str  # one of PLACES
    size: str  # one of SIZES
    rotation: int  # one of ROTATIONS


@dataclass(frozen=True)
class Scene:
    layout: str  # one of LAYOUTS: how places map to positions
    items: tuple[Item, ...]  # in reading order of their places

    def count(self, kind: int | None = None) -> int:
        return sum(1 for item in self.items if kind is None or item.kind == kind)

    def at(self, place: str) -> Item | None:
        return next((item for item in self.items if item.place == place), None)

    def replace_item(self, index: int, **changes) -> "Scene":
        items = list(self.items)
        items[index] = Item(**{**vars(items[index]), **changes})
        return Scene(self.layout, tuple(items))


def pool_indices(pool: str) -> tuple[str, np.ndarray]:
    """The Fashion-MNIST split and the image indices in it that ``pool`` draws from."""
    if pool not in POOLS:
        raise ValueError(f"unknown canvas pool {pool!r}; expected one of {', '.join(POOLS)}")
    split, start, stop = POOLS[pool]
    return split, np.arange(start, stop)


@lru_cache(maxsize=2)
def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    from .fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(split)


def pool_by_kind(pool: str) -> list[np.ndarray]:
    """For each kind, the indices (into the Fashion-MNIST split) of the pool's images of that kind."""
    split, indices = pool_indices(pool)
    labels = _fashion_mnist(split)[1][indices]
    return [indices[labels == kind] for kind in range(NUM_KINDS)]


def _places(layout: str, size: str) -> tuple[int, ...]:
    if layout == "single":
        return {"large": (4,), "medium": (1, 3, 4, 5, 7)}.get(size, tuple(range(9)))
    return _CORNERS if layout == "grid2" else tuple(range(9))


def sample_scene(rng: np.random.Generator, num_items: int | None = None) -> Scene:
    """A random scene: 1-4 items (uniform) unless ``num_items`` is given; kinds, sizes and
    rotations uniform; one item on a 3x3 grid (or centred when large), two items left/right,
    top/bottom or on a 2x2 or 3x3 grid, three or four on a 2x2 or 3x3 grid."""
    n = int(rng.integers(1, MAX_ITEMS + 1)) if num_items is None else num_items
    if not 1 <= n <= MAX_ITEMS:
        raise ValueError(f"a scene has 1 to {MAX_ITEMS} items, not {n}")
    if n == 1:
        layout, size = "single", SIZES[int(rng.integers(len(SIZES)))]
        options = _places(layout, size)
        places, sizes = [options[int(rng.integers(len(options)))]], [size]
    else:
        layout = ("pair", "grid2", "grid3")[int(rng.integers(3))] if n == 2 else ("grid2", "grid3")[int(rng.integers(2))]
        if layout == "pair":
            places = [(3, 5), (1, 7)][int(rng.integers(2))]
        else:
            places = sorted(rng.choice(_places(layout, "small"), size=n, replace=False).tolist())
        sizes = [SIZES[int(rng.integers(2))] for _ in range(n)]  # tiny or small
    items = tuple(Item(int(rng.integers(NUM_KINDS)), PLACES[place], size, ROTATIONS[int(rng.integers(4))])
                  for place, size in zip(places, sizes))
    return Scene(layout, items)


def _position(layout: str, item: Item) -> tuple[float, float]:
    """Centre (row, column) of an item as fractions of the canvas side."""
    row, col = divmod(PLACES.index(item.place), 3)
    grid = _QUARTERS if layout in ("pair", "grid2") or (layout == "single" and item.size == "medium") else _THIRDS
    return grid[row], grid[col]


def render(scenes: list[Scene], pool: str, rng: np.random.Generator, size: int = SIZE,
           sources: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scenes`` as grey canvases (N, size, size) uint8 with images from ``pool``; also
    returns which Fashion-MNIST image each item is, (N, 4) int32 with -1 for no item. Sides and
    the +-1 px jitter are given at 32 px and scaled to ``size``. ``sources`` (same form) fixes
    the images instead of drawing them: one item instance in several canvases, as the subject
    of subject-driven generation."""
    split, indices = pool_indices(pool)
    images, labels = _fashion_mnist(split)
    by_kind = pool_by_kind(pool)
    if sources is not None:
        _check_sources(scenes, sources, pool, indices, labels)
    scale = size / SIZE
    canvases = np.zeros((len(scenes), size, size), dtype=np.uint8)
    drawn = np.full((len(scenes), MAX_ITEMS), -1, dtype=np.int32)
    for n, (canvas, source, scene) in enumerate(zip(canvases, drawn, scenes)):
        for slot, item in enumerate(scene.items):
            low, high = SCALES[item.size]
            high = min(high, _MAX_SIDE.get(scene.layout, high))
            side = max(2, round(int(rng.integers(low, high + 1)) * scale))
            if sources is None:
                candidates = by_kind[item.kind]
                source[slot] = candidates[int(rng.integers(len(candidates)))]
            else:
                source[slot] = sources[n, slot]
            picture = np.rot90(crop_item(images[source[slot]], side), k=item.rotation // 90)
            row, col = _position(scene.layout, item)
            paste(canvas, np.ascontiguousarray(picture),
                  row * size + rng.uniform(-1, 1) * scale, col * size + rng.uniform(-1, 1) * scale)
    return canvases, drawn


def _check_sources(scenes: list[Scene], sources: np.ndarray, pool: str, indices: np.ndarray, labels: np.ndarray) -> None:
    if sources.shape != (len(scenes), MAX_ITEMS):
        raise ValueError(f"sources has shape {sources.shape}; expected ({len(scenes)}, {MAX_ITEMS})")
    for n, (scene, row) in enumerate(zip(scenes, sources)):
        for item, index in zip(scene.items, row):
            if not indices[0] <= index < indices[-1] + 1:
                raise ValueError(f"scene {n}: Fashion-MNIST image {index} is not in pool {pool!r}")
            if labels[index] != item.kind:
                raise ValueError(f"scene {n}: Fashion-MNIST image {index} is a {labels[index]}, not a {item.kind}")


# ---- scenes as arrays (for caches) --------------------------------------------------------

def scenes_to_arrays(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Scenes as int8 arrays: ``layout`` (N,), ``kind``/``place``/``size``/``rotation`` (N, 4)
    holding indices into NUM_KINDS/PLACES/SIZES/ROTATIONS, -1 where there is no item."""
    arrays = {key: np.full((len(scenes), MAX_ITEMS), -1, dtype=np.int8) for key in ("kind", "place", "size", "rotation")}
    arrays["layout"] = np.array([LAYOUTS.index(scene.layout) for scene in scenes], dtype=np.int8)
    for row, scene in enumerate(scenes):
        for slot, item in enumerate(scene.items):
            arrays["kind"][row, slot] = item.kind
            arrays["place"][row, slot] = PLACES.index(item.place)
            arrays["size"][row, slot] = SIZES.index(item.size)
            arrays["rotation"][row, slot] = ROTATIONS.index(item.rotation)
    return arrays


def scenes_from_arrays(arrays: dict[str, np.ndarray]) -> list[Scene]:
    """The inverse of ``scenes_to_arrays``."""
    scenes = []
    for row, layout in enumerate(arrays["layout"]):
        items = tuple(
            Item(int(arrays["kind"][row, slot]), PLACES[arrays["place"][row, slot]], SIZES[arrays["size"][row, slot]],
                 ROTATIONS[arrays["rotation"][row, slot]])
            for slot in range(MAX_ITEMS) if arrays["kind"][row, slot] >= 0)
        scenes.append(Scene(LAYOUTS[layout], items))
    return scenes
