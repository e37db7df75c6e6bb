"""Fashion-MNIST from its original IDX files: the bundled backbone's pretraining data (train
split) and the source of the mini-benchmark's structured objects (test split only).

Looks in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``), then in
the cache (``$VPTUNE_CACHE/fashion-mnist``). ``python -m vptune.data.fashion_mnist --download``
fetches the files into the cache with torchvision's downloader where apt is unavailable.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from .cache import cache_root

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
_PREFIX = {"train": "train", "test": "t10k"}


def cache_dir() -> Path:
    return cache_root() / "fashion-mnist"


def _search_dirs() -> list[Path]:
    # torchvision's downloader writes under <root>/FashionMNIST/raw
    return [SYSTEM_DIR, cache_dir(), cache_dir() / "FashionMNIST" / "raw"]


def _find(name: str) -> Path:
    for folder in _search_dirs():
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(d) for d in _search_dirs())
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found (looked in {looked}). Install it with "
        "`apt-get install dataset-fashion-mnist`, or `python -m vptune.data.fashion_mnist --download`."
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} values for shape {shape}; delete it and reinstall")
    return array.reshape(shape).copy()  # writable, so torch.from_numpy is safe


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split`` "train" (60000) or "test" (10000): uint8 images (N, 28, 28) and int64 labels (N,)."""
    if split not in _PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    prefix = _PREFIX[split]
    images = _read_idx(_find(f"{prefix}-images-idx3-ubyte"), 0x0803)
    labels = _read_idx(_find(f"{prefix}-labels-idx1-ubyte"), 0x0801).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def download() -> Path:
    """Fetch the IDX files into the cache with torchvision's downloader (needs internet)."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(root=str(cache_dir()), train=train, download=True)
    return cache_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--download", action="store_true", help="download into the cache if not found")
    args = parser.parse_args()
    try:
        load_fashion_mnist("test")
        print(f"Fashion-MNIST found: {_find('t10k-images-idx3-ubyte').parent}")
    except FileNotFoundError:
        if not args.download:
            raise
        print(f"Fashion-MNIST downloaded to {download()}")


if __name__ == "__main__":
    main()
