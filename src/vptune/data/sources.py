"""Reading the on-disk dataset layouts into labelled file lists, with errors that name the
file and line: ``imagefolder:PATH``, ``vtab1k:ROOT/TASK`` and ``fgvc:ROOT/NAME``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_EXTENSIONS, DataError, Sample

VTAB_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
FGVC_FILES = ("train.json", "val.json", "test.json")


@dataclass
class Source:
    """Labelled files per split; ``trainval`` is what final training uses (None: train only)."""

    train: list[Sample]
    val: list[Sample] | None
    test: list[Sample] | None
    trainval: list[Sample] | None
    num_classes: int
    class_names: list[str]
    augment: bool  # FGVC-style resize-crop-flip training (else resize only, as VTAB)
    notes: list[str] = field(default_factory=list)


def imagefolder(root: Path) -> Source:
    """Class subfolders, either directly under ``root`` or under train/ (and optional val/, test/).

    A symlinked folder is not followed as a class (a link to a parent folder would make every
    image a second time); each one skipped is named in the notes."""
    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: no such folder; expected class subfolders, optionally under train/ val/ test/")
    splits = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    notes = []
    if splits and "train" not in splits:
        raise DataError(f"imagefolder:{root} has {'/'.join(splits)} subfolders but no train/ subfolder")
    if not splits:
        splits = {"train": root}
        notes.append(f"{root} has no train/val/test subfolders: every image is used for training; "
                     "there is no val or test split")
    classes = _subfolders(splits["train"], notes)
    if not classes:
        raise DataError(f"{splits['train']} has no class subfolders; expected one folder of images per class")
    lists: dict[str, list[Sample] | None] = {"val": None, "test": None}
    for split, folder in splits.items():
        samples = []
        for name in _subfolders(folder, notes if split != "train" else None):
            if name not in classes:
                raise DataError(f"{folder / name} is not one of the classes in {splits['train']} ({', '.join(classes)})")
            files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files and split == "train":
                raise DataError(f"class folder {folder / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            samples += [Sample(path, classes.index(name), f"class folder {folder / name}") for path in files]
        lists[split] = samples
    return Source(lists["train"], lists["val"], lists["test"], None, len(classes), classes, augment=False, notes=notes)


def _subfolders(folder: Path, notes: list[str] | None) -> list[str]:
    """The real (not symlinked, not hidden) subfolders; the symlinked ones are named in ``notes``."""
    names, links = [], []
    for path in folder.iterdir():
        if not path.name.startswith(".") and path.is_dir():
            (links if path.is_symlink() else names).append(path.name)
    if links and notes is not None:
        notes.append(
            f"{folder}: skipped symlinked folder(s) {', '.join(sorted(links))}: an image folder's links are not "
            "followed (a link loop would repeat images); replace them with real folders to use them as classes"
        )
    return sorted(names)


def vtab1k(task_dir: Path, allow_sparse_labels: bool = False) -> Source:
    """VTAB-1k list files, one ``relative/path label`` per line; paths relative to the task
    folder or to its parent (the VTAB root)."""
    _require(task_dir, ("train800.txt", "val200.txt", "test.txt"), VTAB_FILES, "vtab1k",
             "one 'relative/path label' line per image")
    read = lambda name: _read_list(task_dir / name, (task_dir, task_dir.parent))  # noqa: E731
    train, val, test = read("train800.txt"), read("val200.txt"), read("test.txt")
    trainval = read("train800val200.txt") if (task_dir / "train800val200.txt").is_file() else train + val
    num_classes = _check_labels(trainval + train + val, [val, test, trainval], allow_sparse_labels)
    return Source(train, val, test, trainval, num_classes, _class_names(train + val, num_classes), augment=False)


def fgvc(folder: Path, allow_sparse_labels: bool = False) -> Source:
    """VPT's FGVC split files (train.json, val.json, test.json) mapping image path to label;
    images under ``folder/images`` or relative to ``folder``."""
    _require(folder, ("train.json", "test.json"), FGVC_FILES, "fgvc", "a JSON object mapping image path to integer label")
    read = lambda name: _read_json(folder / name, (folder / "images", folder))  # noqa: E731
    train, test = read("train.json"), read("test.json")
    val = read("val.json") if (folder / "val.json").is_file() else None
    trainval = train + (val or [])
    num_classes = _check_labels(train, [test] + ([val] if val else []), allow_sparse_labels)
    notes = [] if val else [f"{folder} has no val.json: no validation split"]
    return Source(train, val, test, trainval, num_classes, _class_names(trainval, num_classes), augment=True, notes=notes)


def _require(folder: Path, required: tuple[str, ...], known: tuple[str, ...], kind: str, line_format: str) -> None:
    if not folder.is_dir():
        raise DataError(f"{kind}:{folder}: no such folder")
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{kind}:{folder}: missing split file(s) {', '.join(missing)}; expected {', '.join(known)} "
            f"({line_format}), of which {', '.join(required)} are required"
        )


def _resolve(relative: str, roots: tuple[Path, ...]) -> Path:
    """The first root under which ``relative`` exists (else the first, for the error to name)."""
    candidates = [root / relative for root in roots]
    return next((c for c in candidates if c.exists()), candidates[0])


def _read_list(path: Path, roots: tuple[Path, ...]) -> list[Sample]:
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        where = f"{path}:{number}"
        if len(parts) != 2:
            raise DataError(f"{where}: expected 'relative/path label', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{where}: label {parts[1]!r} is not an integer (expected 'relative/path label')") from None
        samples.append(Sample(_resolve(parts[0], roots), _non_negative(label, where), where))
    if not samples:
        raise DataError(f"{path} lists no images")
    return samples


def _read_json(path: Path, roots: tuple[Path, ...]) -> list[Sample]:
    text = path.read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); expected an object mapping "
                        "image path to integer label") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{path}: expected a non-empty JSON object mapping image path to integer label")
    samples = []
    for relative, label in mapping.items():
        where = f"{path}:{_line_of(text, relative)}"
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataError(f"{where}: label of {relative!r} is {label!r}, expected an integer")
        samples.append(Sample(_resolve(relative, roots), _non_negative(label, where), where))
    return samples


def _line_of(text: str, key: str) -> int:
    for quoted in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
        index = text.find(quoted)
        if index >= 0:
            return text.count("\n", 0, index) + 1
    return 1


def _non_negative(label: int, where: str) -> int:
    if label < 0:
        raise DataError(f"{where}: label {label} is negative; labels must be 0..num_classes-1")
    return label


def _check_labels(training: list[Sample], others: list[list[Sample]], allow_sparse: bool = False) -> int:
    """The class count inferred from the training labels; any other label must fit it.

    Labels must be 0..C-1 with few gaps: when the training split uses fewer than half of the
    labels below its largest, that label is taken for a typo (``99999`` among labels 0..9 would
    build a 100,000-class head) and refused, naming its file and line, unless ``allow_sparse``."""
    top = max(training, key=lambda s: s.label)
    num_classes = top.label + 1
    used = len({s.label for s in training})
    if not allow_sparse and used < num_classes / 2:
        raise DataError(
            f"{top.origin}: label {top.label} makes {num_classes:,} classes, but the training split uses only {used} "
            f"distinct labels: a typo? Labels must be 0..num_classes-1 with few gaps; pass --allow-sparse-labels to "
            f"train a {num_classes:,}-class head anyway"
        )
    for samples in others:
        for s in samples:
            if s.label >= num_classes:
                raise DataError(f"{s.origin}: label {s.label} out of range: the training split has "
                                f"{num_classes} classes (labels 0..{num_classes - 1})")
    return num_classes


def _class_names(samples: list[Sample], num_classes: int) -> list[str]:
    """Folder names when each label's images sit in one folder of their own, else the label numbers."""
    folders: dict[int, set[str]] = {}
    for s in samples:
        folders.setdefault(s.label, set()).add(s.path.parent.name)
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else "" for i in range(num_classes)]
    if all(names) and len(set(names)) == num_classes:
        return names
    return [str(i) for i in range(num_classes)]
