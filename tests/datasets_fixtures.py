"""Small local sources in the layouts ``vptune data`` reads, made on the spot (never the network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200)]


def image(path: Path, label: int, index: int, size: int = 8) -> None:
    """A small PNG whose colour says its label (learnable), with a little per-image noise."""
    rng = np.random.default_rng(index)
    base = np.array(COLOURS[label % len(COLOURS)], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def vtab_source(root: Path, tasks=("dtd", "eurosat"), classes: int = 3, test: int = 30) -> Path:
    """A VTAB-1k list-file release in miniature: ROOT/vtab-1k/TASK/{train800,val200,train800val200,test}.txt
    and the images they list (800 + 200 + ``test``), labels 0..classes-1."""
    for t, task in enumerate(tasks):
        folder = root / "vtab-1k" / task
        lines = {}
        for split, count in (("train800", 800), ("val200", 200), ("test", test)):
            rows = []
            for i in range(count):
                label = i % classes
                rel = f"images/{split}/{i:06d}.png"
                image(folder / rel, label, 100000 * t + hash(split) % 1000 * 1000 + i)
                rows.append(f"{rel} {label}")
            lines[split] = rows
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, rows in lines.items():
            (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root / "vtab-1k"


def cub_source(folder: Path, classes: int = 4, per_class: int = 10) -> Path:
    """CUB-200-2011's layout: images.txt, train_test_split.txt, image_class_labels.txt, images/CLASS/*.jpg
    (class ids 1-based; every other image of a class is a test image)."""
    rows, splits, labels = [], [], []
    n = 0
    for c in range(1, classes + 1):
        for i in range(per_class):
            n += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i:04d}.jpg"
            image(folder / "images" / rel, c - 1, n)
            rows.append(f"{n} {rel}")
            splits.append(f"{n} {1 if i % 2 == 0 else 0}")
            labels.append(f"{n} {c}")
    for name, lines in (("images.txt", rows), ("train_test_split.txt", splits), ("image_class_labels.txt", labels)):
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def flowers_source(folder: Path, classes: int = 3, per_split: int = 2) -> Path:
    """Oxford Flowers' layout: jpg/image_NNNNN.jpg, imagelabels.mat (1-based labels), setid.mat (trnid, valid, tstid)."""
    from scipy.io import savemat

    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    n = 0
    for c in range(classes):
        for key in ids:
            for _ in range(per_split):
                n += 1
                image(folder / "jpg" / f"image_{n:05d}.jpg", c, n)
                labels.append(c + 1)
                ids[key].append(n)
    savemat(folder / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(folder / "setid.mat", {k: np.array([v]) for k, v in ids.items()})
    return folder


def dogs_source(folder: Path, classes: int = 3, per_class: int = 4) -> Path:
    """Stanford Dogs' layout: Images/BREED/*.jpg and lists/{train,test}_list.mat (file_list cells, 1-based labels)."""
    from scipy.io import savemat

    for split, offset in (("train", 0), ("test", 1)):
        files, labels = [], []
        for c in range(classes):
            for i in range(offset, per_class, 2):
                rel = f"n0000{c}-breed{c}/n0000{c}_{i}.jpg"
                image(folder / "Images" / rel, c, 1000 * c + i)
                files.append(rel)
                labels.append(c + 1)
        cells = np.empty((len(files), 1), dtype=object)
        for k, f in enumerate(files):
            cells[k, 0] = np.array([f])
        (folder / "lists").mkdir(parents=True, exist_ok=True)
        savemat(folder / "lists" / f"{split}_list.mat", {"file_list": cells, "labels": np.array(labels)[:, None]})
    return folder


def imagefolder_source(folder: Path, classes: int = 3, per_class: int = 4) -> Path:
    """train/CLASS/*.png and test/CLASS/*.png."""
    for split in ("train", "test"):
        for c in range(classes):
            for i in range(per_class):
                image(folder / split / f"class{c}" / f"{i}.png", c, 7 * c + i + (0 if split == "train" else 500))
    return folder


def vpt_json_source(folder: Path, classes: int = 3, per_split: int = 3) -> Path:
    """VPT's split files: train.json, val.json, test.json mapping images/ paths to labels."""
    for split in ("train", "val", "test"):
        mapping = {}
        for c in range(classes):
            for i in range(per_split):
                rel = f"{c}/{split}_{i}.jpg"
                image(folder / "images" / rel, c, 31 * c + i + len(split) * 100)
                mapping[rel] = c
        (folder / f"{split}.json").write_text(json.dumps(mapping))
    return folder
