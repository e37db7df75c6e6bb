"""``vptune data``: build VTAB-1k and FGVC folders in the layouts ``vtab1k:`` and ``fgvc:`` read.

Sources: a folder or an archive (zip, tar, tar.gz) the user downloaded, in the dataset's
original layout (``--source``), or a copy on the Hugging Face hub (``suites.py`` names them).
What is built is checked against the benchmark's definition (split sizes, class counts) and
recorded in ``ROOT/vptune-data.json``: per task, the sha256 of every split file, the counts and
where it came from. A rerun verifies what the manifest records and builds only what is
missing: images already copied are kept (every file is written to a temporary name, then
renamed), so a killed build resumes. Bad input raises a ``DataError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from .images import IMAGE_EXTENSIONS, DataError
from .suites import FGVC_DATASETS, VTAB_HUB_FILE, VTAB_HUB_REPO, VTAB_LISTS, VTAB_TASKS, VTAB_TEST, FgvcDataset

MANIFEST = "vptune-data.json"
FORMAT = "vptune-data/1"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
FGVC_FILES = ("train.json", "val.json", "test.json")
VAL_SHARE = 0.1  # FGVC val cut from train when the source has none (VPT's sizes are about 10%)

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance one


# --- reading a source: a folder or an archive, with one interface --------------------------


class Tree:
    """Files under a root, addressed by POSIX relative paths: a folder, a zip or a tar."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._names: dict[str, Any] | None = None
        if path.is_file():
            try:
                if zipfile.is_zipfile(path):
                    self._zip = zipfile.ZipFile(path)
                    self._names = {n.rstrip("/"): info for n, info in
                                   ((i.filename, i) for i in self._zip.infolist()) if not n.endswith("/")}
                else:
                    self._tar = tarfile.open(path)
                    self._names = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
                raise DataError(f"{path}: not a readable zip or tar archive ({err}); download it again") from None
        elif not path.is_dir():
            raise DataError(f"--source {path}: no such folder or archive")

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in (self._zip, self._tar):
            if handle is not None:
                handle.close()

    def files(self) -> Iterator[str]:
        if self._names is not None:
            yield from self._names
        else:
            for dirpath, _, filenames in os.walk(self.path):
                for name in filenames:
                    yield Path(dirpath, name).relative_to(self.path).as_posix()

    def exists(self, rel: str) -> bool:
        return rel in self._names if self._names is not None else (self.path / rel).is_file()

    def size(self, rel: str) -> int:
        if self._zip is not None:
            return self._names[rel].file_size
        if self._tar is not None:
            return self._names[rel].size
        return (self.path / rel).stat().st_size

    def read_bytes(self, rel: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(self._names[rel])
            if self._tar is not None:
                handle = self._tar.extractfile(self._names[rel])
                return handle.read()
            return (self.path / rel).read_bytes()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, KeyError) as err:
            raise DataError(f"{self.where(rel)}: cannot be read ({err}); the archive may be damaged: download it again") from None

    def copy(self, rel: str, dest: Path) -> None:
        """Copy one file to ``dest`` atomically; a file already there with the same size is kept."""
        if dest.is_file() and dest.stat().st_size == self.size(rel):
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        if self._names is None:
            shutil.copyfile(self.path / rel, tmp)
        else:
            tmp.write_bytes(self.read_bytes(rel))
        os.replace(tmp, dest)

    def where(self, rel: str) -> str:
        return f"{self.path}:{rel}" if self._names is not None else str(self.path / rel)


def atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_relative(rel: str, where: str) -> str:
    """A relative POSIX path that stays inside its folder, or a DataError naming where it came from."""
    path = PurePosixPath(rel.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DataError(f"{where}: path {rel!r} must be relative and stay inside the task folder")
    return path.as_posix()


# --- the manifest ------------------------------------------------------------------------


def read_manifest(root: Path, suite: str) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        return {"format": FORMAT, "suite": suite, "tasks": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: damaged ({err.msg}); remove it to rebuild and re-verify every task") from None
    if manifest.get("suite") != suite:
        raise DataError(f"{root} holds a {manifest.get('suite')} build ({path}); pass another --out for {suite}")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def listed_images(folder: Path, entry: dict[str, Any]) -> set[str]:
    """Every image a built task's split files name (list lines, or JSON keys), relative to its image root."""
    images: set[str] = set()
    for name in entry["sha256"]:
        text = (folder / name).read_text()
        if name.endswith(".json"):
            images.update(json.loads(text))
        else:
            images.update(line.rsplit(maxsplit=1)[0] for line in text.splitlines() if line.strip())
    return images


def verify_entry(folder: Path, entry: dict[str, Any]) -> list[str]:
    """Problems of a built task against its manifest entry: a split file changed (sha256), an image
    missing, an image no split lists. Empty when the task is as it was built."""
    problems = []
    for name, digest in entry["sha256"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256(path) != digest:
            problems.append(f"{path} changed since it was built (sha256 {digest[:12]}... recorded)")
    if problems:
        return problems
    image_root = folder / entry.get("image_root", "")
    listed = listed_images(folder, entry)
    missing = sorted(rel for rel in listed if not (image_root / rel).is_file())
    if missing:
        problems.append(f"{len(missing)} listed image(s) missing, first {image_root / missing[0]}")
    extra = sorted(
        p.relative_to(image_root).as_posix() for p in image_root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p.relative_to(image_root).as_posix() not in listed
    )
    if extra:
        problems.append(f"{len(extra)} image(s) that no split lists, first {image_root / extra[0]}")
    return problems


@dataclass
class Report:
    """What a build did: per task, ``built``, ``verified`` (already there, checked), ``missing``
    (not in the source) or ``failed`` with the reason; notes worth telling the user."""

    root: Path
    status: dict[str, str] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(state == "failed" for state in self.status.values())


# --- VTAB-1k -------------------------------------------------------------------------------


def find_vtab_tasks(tree: Tree) -> dict[str, str]:
    """{task name: its folder inside the source} for every folder with a train800.txt."""
    found: dict[str, str] = {}
    for rel in tree.files():
        path = PurePosixPath(rel)
        if path.name == "train800.txt" and len(path.parts) >= 2:
            prefix = path.parent.as_posix()
            found.setdefault(path.parent.name, prefix)
    return found


def read_vtab_lists(tree: Tree, prefix: str, name: str) -> dict[str, list[tuple[str, int]]]:
    """The four lists of a task, each line checked: format, path, label range, split sizes."""
    info = VTAB_TASKS.get(name)
    lists: dict[str, list[tuple[str, int]]] = {}
    for list_name in (*VTAB_LISTS, VTAB_TEST):
        rel = f"{prefix}/{list_name}"
        if not tree.exists(rel):
            raise DataError(f"{tree.where(rel)} is missing: a VTAB-1k task folder has {', '.join([*VTAB_LISTS, VTAB_TEST])}")
        entries = []
        text = tree.read_bytes(rel).decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{tree.where(rel)}:{number}"
            parts = line.strip().rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{where}: expected 'relative/path label', got {line.strip()!r}")
            label = int(parts[1])
            if label < 0 or (info is not None and label >= info.num_classes):
                raise DataError(f"{where}: label {label} is outside 0..{info.num_classes - 1 if info else 'n'} "
                                f"({name} has {info.num_classes if info else '?'} classes)")
            image = safe_relative(parts[0], where)
            if image.startswith(f"{name}/") and not tree.exists(f"{prefix}/{image}"):
                image = image[len(name) + 1:]  # a path relative to the VTAB root: make it relative to the task
            entries.append((image, label))
        expected = VTAB_LISTS.get(list_name)
        if expected is not None and len(entries) != expected:
            raise DataError(f"{tree.where(rel)} lists {len(entries)} images; VTAB-1k's {list_name} has {expected}")
        lists[list_name] = entries
    train, val, both = (lists[n] for n in VTAB_LISTS)
    if sorted(train + val) != sorted(both):
        raise DataError(f"{tree.where(prefix + '/train800val200.txt')} is not train800.txt and val200.txt together")
    return lists


def build_vtab_task(tree: Tree, prefix: str, name: str, out: Path, progress: Progress) -> dict[str, Any]:
    """Copy one task's images and lists from the source into ``out/name``; its manifest entry."""
    lists = read_vtab_lists(tree, prefix, name)
    folder = out / name
    images = sorted({image for entries in lists.values() for image, _ in entries})
    missing = [image for image in images if not tree.exists(f"{prefix}/{image}")]
    if missing:
        origin = next(f"{list_name} line {i + 1}" for list_name, entries in lists.items()
                      for i, (image, _) in enumerate(entries) if image == missing[0])
        raise DataError(f"{tree.where(prefix + '/' + missing[0])} is listed ({origin}) but not in the source"
                        f"{f' ({len(missing)} listed images are missing)' if len(missing) > 1 else ''}")
    advance = progress(f"{name}: images", len(images))
    for image in images:
        tree.copy(f"{prefix}/{image}", folder / image)
        advance()
    digests = {}
    for list_name, entries in lists.items():  # the lists last: a task with lists is a task with its images
        atomic_write(folder / list_name, "".join(f"{image} {label}\n" for image, label in entries))
        digests[list_name] = sha256(folder / list_name)
    counts = {list_name.removesuffix(".txt"): len(entries) for list_name, entries in lists.items()}
    listed = {f"{prefix}/{image}" for image in images}
    extra = sorted(f for f in tree.files() if f.startswith(prefix + "/") and f not in listed
                   and PurePosixPath(f).suffix.lower() in IMAGE_EXTENSIONS)
    entry = {"source": tree.where(prefix), "sha256": digests, "counts": counts, "image_root": ""}
    if extra:  # not copied: the built folder holds exactly what the lists name
        entry["source_extra_images"] = {"count": len(extra), "first": tree.where(extra[0])}
    return entry


def build_vtab1k(
    out: Path, source: Path | str | None = None, *, tasks: Iterable[str] | None = None, hub_repo: str = VTAB_HUB_REPO,
    progress: Progress | None = None,
) -> Report:
    """Build (or verify, on a rerun) the VTAB-1k tasks under ``out`` from ``source`` (a list-file tree
    as a folder or archive, or ``tfds:DATA_DIR``: prepared TensorFlow Datasets), or, without a source,
    from the hub copy (``hub_repo``)."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda description, total: lambda: None)
    manifest = read_manifest(out, "vtab1k")
    wanted = list(tasks) if tasks else list(VTAB_TASKS)
    report = Report(out)
    todo = [name for name in wanted if not _verified(out, name, manifest, report)]
    tfds_dir = Path(str(source)[len("tfds:"):]).expanduser() if str(source or "").startswith("tfds:") else None
    if todo and tfds_dir is not None:
        build_vtab1k_from_tfds(tfds_dir, todo, out, manifest, report, progress)
    elif todo:
        archive = Path(source).expanduser() if source is not None else hub_download(hub_repo, VTAB_HUB_FILE)
        with Tree(archive) as tree:
            found = find_vtab_tasks(tree)
            if source is None and not found:
                raise DataError(f"the hub copy {hub_repo}/{VTAB_HUB_FILE} has no task folder with train800.txt: "
                                "its layout changed; download VTAB-1k by hand and pass --source")
            for name in todo:
                if name not in found:
                    report.status[name] = "missing"
                    continue
                try:
                    entry = build_vtab_task(tree, found[name], name, out, progress)
                except DataError as err:
                    report.status[name], report.problems[name] = "failed", [str(err)]
                    continue
                manifest["tasks"][name] = entry
                write_manifest(out, manifest)
                report.status[name] = "built"
                report.counts[name] = entry["counts"]
                if "source_extra_images" in entry:
                    extra = entry["source_extra_images"]
                    report.notes.append(f"{name}: {extra['count']} image(s) in the source that no list names were "
                                        f"not copied, first {extra['first']}")
    for name in wanted:
        info = VTAB_TASKS.get(name)
        counts = report.counts.get(name)
        if info is not None and counts is not None and counts["test"] != info.test:
            report.notes.append(f"{name}: test.txt lists {counts['test']} images; the VTAB-1k release has {info.test}")
    missing = [n for n, s in report.status.items() if s == "missing"]
    if missing and tfds_dir is not None:
        from .tfds_source import VTAB_TFDS

        report.notes.append(f"not in {tfds_dir}: {', '.join(missing)} (the TFDS datasets they are built from: "
                            f"{', '.join(sorted({VTAB_TFDS[n].dataset for n in missing if n in VTAB_TFDS}))})")
    elif missing:
        report.notes.append(f"not in the source: {', '.join(missing)} (a VTAB-1k task folder holds train800.txt, "
                            f"val200.txt, train800val200.txt, test.txt and the images they list)")
    return report


def build_vtab1k_from_tfds(data_dir: Path, todo: list[str], out: Path, manifest: dict[str, Any], report: Report,
                           progress: Progress) -> None:
    """Build ``todo`` from the TFDS datasets prepared under ``data_dir`` (``--source tfds:DATA_DIR``),
    with the official code's slices and labels (``tfds_source``)."""
    from .tfds_source import VTAB_TFDS, TfdsReader, find_version, import_tfds

    if not data_dir.is_dir():
        raise DataError(f"--source tfds:{data_dir}: no such folder; expected the data_dir the TFDS datasets were "
                        "prepared in (one folder per dataset: cifar100/, dtd/, ...)")
    readers: dict[Path, Any] = {}
    for name in todo:
        task = VTAB_TFDS.get(name)
        if task is None or not (data_dir / task.dataset).is_dir():
            report.status[name] = "missing"
            continue
        try:
            import_tfds()
            folder = find_version(data_dir, task)
            if folder not in readers:
                readers[folder] = TfdsReader(folder)
            entry = build_vtab_task_from_tfds(readers[folder], name, out, progress)
        except DataError as err:
            report.status[name], report.problems[name] = "failed", [str(err)]
            continue
        manifest["tasks"][name] = entry
        write_manifest(out, manifest)
        report.status[name], report.counts[name] = "built", entry["counts"]


def build_vtab_task_from_tfds(reader: Any, name: str, out: Path, progress: Progress) -> dict[str, Any]:
    """Write one task's images (as TFDS stored them; converted where the official code converts) and its
    four lists from a prepared TFDS dataset; its manifest entry. Images already written are kept."""
    from .tfds_source import VTAB_TFDS, image_bytes, task_slices

    task, info, where = VTAB_TFDS[name], VTAB_TASKS[name], str(reader.folder)
    if task.attribute not in reader.info.features:
        raise DataError(f"{where}: has features {', '.join(sorted(reader.info.features))}; the official {name} task "
                        f"reads {task.attribute!r}")
    slices = task_slices(task, reader.sizes(), where)
    folder = out / name
    advance = progress(f"{name}: images", sum(end - first for pieces in slices.values() for _, first, end in pieces))
    lists: dict[str, list[tuple[str, int]]] = {}
    for list_name, pieces in slices.items():
        entries = []
        for piece in pieces:
            split, first, end = piece
            for offset, example in enumerate(reader.examples(piece, raw_image=task.image is None)):
                index = first + offset
                label = int(example["label"]) if task.label is None else task.label(example, reader.info)
                if not 0 <= label < info.num_classes:
                    raise DataError(f"{where}: {split}[{index}] has label {label}; {name} has {info.num_classes} "
                                    f"classes (0..{info.num_classes - 1})")
                data, extension = image_bytes(example, task)
                rel = f"{split}/{index:06d}.{extension}"
                dest = folder / rel
                if not (dest.is_file() and dest.stat().st_size == len(data)):
                    atomic_write(dest, data)
                entries.append((rel, label))
                advance()
            if len(entries) < end - first:
                raise DataError(f"{where}: {split}[{first}:{end}] gave {len(entries)} examples, expected {end - first}")
        lists[f"{list_name}.txt"] = entries
    lists["train800val200.txt"] = lists["train800.txt"] + lists["val200.txt"]
    digests = {}
    for list_name in (*VTAB_LISTS, VTAB_TEST):  # the lists last: a task with lists is a task with its images
        atomic_write(folder / list_name, "".join(f"{image} {label}\n" for image, label in lists[list_name]))
        digests[list_name] = sha256(folder / list_name)
    return {
        "source": f"tfds:{reader.folder} ({reader.file_format})", "sha256": digests, "image_root": "",
        "counts": {list_name.removesuffix(".txt"): len(lists[list_name]) for list_name in (*VTAB_LISTS, VTAB_TEST)},
        "tfds": {"dataset": task.dataset, "version": reader.folder.name,
                 "slices": {k: "+".join(f"{s}[{a}:{b}]" for s, a, b in v) for k, v in slices.items()}},
    }


def _verified(out: Path, name: str, manifest: dict[str, Any], report: Report) -> bool:
    entry = manifest["tasks"].get(name)
    if entry is None:
        return False
    problems = verify_entry(out / name, entry)
    if problems:
        report.status[name], report.problems[name] = "failed", problems + [
            f"remove {out / name} (and its entry in {out / MANIFEST}) to build it again"
        ]
    else:
        report.status[name] = "verified"
        report.counts[name] = entry["counts"]
    return True


# --- FGVC ----------------------------------------------------------------------------------


def normalized(name: str) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    return "".join(c for c in name.lower() if c.isalnum())


def dataset_for(name: str) -> FgvcDataset | None:
    key = normalized(name)
    return next((d for d in FGVC_DATASETS.values() if key in d.aliases or any(key.startswith(a) for a in d.aliases)), None)


Splits = dict[str, list[tuple[str, int]]]  # split -> [(path relative to the tree, 0-based label)]


def read_fgvc_source(tree: Tree, base: str, where: str) -> tuple[Splits, str, str]:
    """Labelled files per split from one dataset's original layout under ``base`` in ``tree``;
    returns the splits, the layout's name and the folder its images sit in (the part of their
    paths the built folder drops). Paths are relative to the tree."""
    join = lambda rel: f"{base}/{rel}" if base else rel  # noqa: E731

    def text(rel: str) -> list[str]:
        return tree.read_bytes(join(rel)).decode("utf-8", errors="replace").splitlines()

    if tree.exists(join("train.json")) and tree.exists(join("test.json")):  # VPT's split files
        splits: Splits = {}
        image_dir = "images/" if any(f.startswith(join("images/")) for f in tree.files()) else ""
        for name in FGVC_FILES:
            if not tree.exists(join(name)):
                continue
            try:
                mapping = json.loads(tree.read_bytes(join(name)))
            except json.JSONDecodeError as err:
                raise DataError(f"{tree.where(join(name))}:{err.lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
                raise DataError(f"{tree.where(join(name))}: expected a JSON object mapping image path to integer label")
            splits[name.removesuffix(".json")] = [
                (join(image_dir + safe_relative(k, tree.where(join(name)))), v) for k, v in mapping.items()
            ]
        return splits, "VPT split files (train.json, val.json, test.json)", join(image_dir)
    if all(tree.exists(join(n)) for n in ("images.txt", "train_test_split.txt", "image_class_labels.txt")):
        # CUB-200-2011 and NABirds: "<id> <path>", "<id> <is_train>", "<id> <class id>"
        images = dict(line.split(maxsplit=1) for line in text("images.txt") if line.strip())
        train = {i: flag.strip() == "1" for i, flag in (line.split() for line in text("train_test_split.txt") if line.strip())}
        labels = {i: c for i, c in (line.split() for line in text("image_class_labels.txt") if line.strip())}
        classes = sorted(set(labels.values()), key=lambda c: (len(c), c))
        index = {c: k for k, c in enumerate(classes)}
        splits = {"train": [], "test": []}
        for image_id, rel in images.items():
            if image_id not in train or image_id not in labels:
                raise DataError(f"{tree.where(join('images.txt'))}: image id {image_id} has no entry in "
                                "train_test_split.txt or image_class_labels.txt")
            path = join("images/" + safe_relative(rel.strip(), tree.where(join("images.txt"))))
            splits["train" if train[image_id] else "test"].append((path, index[labels[image_id]]))
        return splits, "images.txt, train_test_split.txt, image_class_labels.txt", join("images/")
    if tree.exists(join("imagelabels.mat")) and tree.exists(join("setid.mat")):  # Oxford Flowers 102
        mats = {n: load_mat(tree, join(n)) for n in ("imagelabels.mat", "setid.mat")}
        labels = [int(x) - 1 for x in mats["imagelabels.mat"]["labels"].ravel()]
        folder = "jpg/" if any(f.startswith(join("jpg/")) for f in tree.files()) else ""
        splits = {}
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
            ids = [int(x) for x in mats["setid.mat"][key].ravel()]
            splits[split] = [(join(f"{folder}image_{i:05d}.jpg"), labels[i - 1]) for i in ids]
        return splits, "imagelabels.mat and setid.mat", join(folder)
    lists = "lists/" if tree.exists(join("lists/train_list.mat")) else ""
    if tree.exists(join(lists + "train_list.mat")) and tree.exists(join(lists + "test_list.mat")):  # Stanford Dogs
        splits = {}
        for split in ("train", "test"):
            mat = load_mat(tree, join(f"{lists}{split}_list.mat"))
            files = [str(entry[0][0] if hasattr(entry[0], "__len__") and not isinstance(entry[0], str) else entry[0])
                     for entry in mat["file_list"]]
            labels = [int(x) - 1 for x in mat["labels"].ravel()]
            splits[split] = [(join("Images/" + safe_relative(f, tree.where(join(lists + f"{split}_list.mat")))), label)
                             for f, label in zip(files, labels)]
        return splits, "train_list.mat and test_list.mat", join("Images/")
    inside = [PurePosixPath(f[len(join("")):]).parts for f in tree.files() if f.startswith(join(""))]
    if {"train", "test"} <= {parts[0] for parts in inside if len(parts) >= 3}:
        # ImageFolder: train/<class>/*, test/<class>/*, optional val/
        classes = sorted({parts[1] for parts in inside if len(parts) >= 3 and parts[0] == "train"})
        index = {c: k for k, c in enumerate(classes)}
        splits = {}
        for split in ("train", "val", "test"):
            rows = []
            for parts in sorted(inside):
                if len(parts) >= 3 and parts[0] == split and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS:
                    rel = join("/".join(parts))
                    if parts[1] not in index:
                        raise DataError(f"{tree.where(rel)}: class folder {parts[1]!r} is not among the train classes")
                    rows.append((rel, index[parts[1]]))
            if rows:
                splits[split] = rows
        return splits, "class folders under train/ and test/", join("")
    raise DataError(
        f"{where}: no FGVC layout recognised. Expected VPT's train.json/val.json/test.json, CUB/NABirds' images.txt "
        "+ train_test_split.txt + image_class_labels.txt, Flowers' imagelabels.mat + setid.mat, Stanford Dogs' "
        "train_list.mat + test_list.mat, or train/ and test/ class folders"
    )


def load_mat(tree: Tree, rel: str) -> dict[str, Any]:
    try:
        import io

        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{tree.where(rel)}: reading .mat files needs scipy (pip install scipy)") from None
    try:
        return loadmat(io.BytesIO(tree.read_bytes(rel)))
    except (ValueError, TypeError, OSError) as err:
        raise DataError(f"{tree.where(rel)}: not a readable MATLAB file ({err})") from None


def carve_val(train: list[tuple[str, int]], share: float, seed: str) -> tuple[list, list]:
    """A seeded per-class cut of ``share`` of train into val: the same on every machine."""
    by_class: dict[int, list] = {}
    for row in sorted(train):
        by_class.setdefault(row[1], []).append(row)
    rng = random.Random(seed)
    keep, val = [], []
    for label in sorted(by_class):
        rows = by_class[label]
        rng.shuffle(rows)
        n = max(1, round(len(rows) * share)) if len(rows) > 1 else 0  # every class in val, none emptied
        val += rows[:n]
        keep += rows[n:]
    return sorted(keep), sorted(val)


def build_fgvc_dataset(tree: Tree, base: str, info: FgvcDataset, out: Path, progress: Progress,
                       notes: list[str]) -> dict[str, Any]:
    splits, layout, image_root = read_fgvc_source(tree, base, tree.where(base) if base else str(tree.path))
    if "val" not in splits:
        splits["train"], splits["val"] = carve_val(splits["train"], VAL_SHARE, info.name)
        notes.append(f"{info.name}: the source has no val split: val.json is a seeded {VAL_SHARE:.0%} per-class cut "
                     "of the official train set (VPT's own split files give the same sizes but other images)")
    for split, rows in splits.items():
        bad = [label for _, label in rows if not 0 <= label < info.num_classes]
        if bad:
            raise DataError(f"{tree.where(base)}: {split} has label {bad[0]} outside 0..{info.num_classes - 1} "
                            f"({info.title} has {info.num_classes} classes)")
    files = sorted({rel for rows in splits.values() for rel, _ in rows})
    missing = [rel for rel in files if not tree.exists(rel)]
    if missing:
        raise DataError(f"{tree.where(missing[0])} is listed by the source's {layout} but not there"
                        f"{f' ({len(missing)} listed images are missing)' if len(missing) > 1 else ''}")
    folder = out / info.name
    relative = {rel: rel[len(image_root):] for rel in files}
    advance = progress(f"{info.name}: images", len(files))
    for rel in files:
        tree.copy(rel, folder / "images" / relative[rel])
        advance()
    digests = {}
    for split in ("train", "val", "test"):
        mapping = {relative[rel]: label for rel, label in splits[split]}
        atomic_write(folder / f"{split}.json", json.dumps(mapping, indent=0, sort_keys=True))
        digests[f"{split}.json"] = sha256(folder / f"{split}.json")
    counts = {split: len(splits[split]) for split in ("train", "val", "test")}
    return {"source": f"{tree.where(base) if base else tree.path} ({layout})", "sha256": digests, "counts": counts,
            "image_root": "images"}


def find_fgvc_sources(source: Path) -> dict[str, tuple[Path, str]]:
    """{dataset: (tree path, base inside it)} for the datasets recognisable in ``source``: the folder
    itself, its subfolders and archives (named like the dataset), or a folder inside an archive."""
    found: dict[str, tuple[Path, str]] = {}
    candidates = [source] + (sorted(source.iterdir()) if source.is_dir() else [])
    for path in candidates:
        info = dataset_for(path.name)
        if info is None or info.name in found:
            continue
        if path.is_dir():
            found[info.name] = (path, "")
        elif path.name.endswith(ARCHIVE_SUFFIXES):
            with Tree(path) as tree:
                tops = {PurePosixPath(f).parts[0] for f in tree.files() if len(PurePosixPath(f).parts) > 1}
            base = next(iter(tops)) if len(tops) == 1 else ""
            found[info.name] = (path, base)
    return found


def build_fgvc(
    out: Path, source: Path | None = None, *, datasets: Iterable[str] | None = None,
    sources: dict[str, Path] | None = None, progress: Progress | None = None,
) -> Report:
    """Build (or verify, on a rerun) the FGVC datasets under ``out``: from ``sources`` ({name: folder
    or archive}), from what ``source`` holds (folders or archives named after the datasets), or,
    without either, from their hub copies."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda description, total: lambda: None)
    manifest = read_manifest(out, "fgvc")
    wanted = list(datasets) if datasets else list(FGVC_DATASETS)
    unknown = [n for n in [*wanted, *(sources or {})] if n not in FGVC_DATASETS]
    if unknown:
        raise DataError(f"unknown FGVC dataset(s) {', '.join(unknown)}; expected some of {', '.join(FGVC_DATASETS)}")
    report = Report(out)
    todo = [name for name in wanted if not _verified(out, name, manifest, report)]
    located = {name: (Path(p).expanduser(), "") for name, p in (sources or {}).items()}
    if source is not None:
        located = {**find_fgvc_sources(Path(source).expanduser()), **located}
    for name in todo:
        info = FGVC_DATASETS[name]
        try:
            if name in located:
                path, base = located[name]
                with Tree(path) as tree:
                    entry = build_fgvc_dataset(tree, base, info, out, progress, report.notes)
            elif source is None and not sources:
                entry = build_fgvc_from_hub(info, out, progress, report.notes)
            else:
                report.status[name] = "missing"
                continue
        except DataError as err:
            report.status[name], report.problems[name] = "failed", [str(err)]
            continue
        manifest["tasks"][name] = entry
        write_manifest(out, manifest)
        report.status[name], report.counts[name] = "built", entry["counts"]
    for name in wanted:
        info, counts = FGVC_DATASETS[name], report.counts.get(name)
        if counts is not None and (counts["train"] + counts["val"], counts["test"]) != (info.train + info.val, info.test):
            report.notes.append(f"{name}: {counts['train'] + counts['val']} train+val and {counts['test']} test images; "
                                f"VPT's {info.title} has {info.train + info.val} and {info.test}")
    missing = [n for n, s in report.status.items() if s == "missing"]
    if missing:
        report.notes.append(f"not in the source: {', '.join(missing)} (pass a folder or archive named after each, "
                            "or NAME=PATH)")
    return report


# --- the Hugging Face hub (network; never used by the tests) --------------------------------


def hub_download(repo: str, filename: str) -> Path:
    """One file of a hub dataset repository, through huggingface_hub's cache (resumable)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError("downloading from the Hugging Face hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset"))
    except Exception as err:  # noqa: BLE001 - the hub client raises many kinds; all mean "not fetched"
        raise ConnectionError(f"could not download {filename} from the hub dataset {repo} ({type(err).__name__}: "
                              f"{err}); download it by hand and pass --source") from None


def build_fgvc_from_hub(info: FgvcDataset, out: Path, progress: Progress, notes: list[str]) -> dict[str, Any]:
    """Write a hub copy's images (``datasets``' Image column) and labels (its ClassLabel column) as files."""
    if info.hub is None:
        raise DataError(f"{info.title} has no copy on the Hugging Face hub that vptune knows of; download it from its "
                        "homepage and pass --source")
    try:
        from datasets import ClassLabel, Image, load_dataset
    except ImportError:
        raise DataError("building FGVC from the hub needs the datasets package (pip install datasets)") from None
    try:
        data = load_dataset(info.hub)
    except Exception as err:  # noqa: BLE001
        raise ConnectionError(f"could not load the hub dataset {info.hub} ({type(err).__name__}: {err}); "
                              "download it by hand and pass --source") from None
    splits: Splits = {}
    folder = out / info.name
    for split, names in (("train", ("train",)), ("val", ("validation", "val")), ("test", ("test",))):
        name = next((n for n in names if n in data), None)
        if name is None:
            continue
        part = data[name]
        image = next((c for c, f in part.features.items() if isinstance(f, Image)), None)
        label = next((c for c, f in part.features.items() if isinstance(f, ClassLabel)), None) or (
            "label" if "label" in part.features else None)
        if image is None or label is None:
            raise DataError(f"hub dataset {info.hub} split {name} has columns {list(part.features)}: expected an image "
                            "column and a class-label column; its layout changed: pass --source")
        advance = progress(f"{info.name}: {split} images", len(part))
        rows = []
        for index, row in enumerate(part):
            rel = f"{split}/{index:06d}.jpg"
            path = folder / "images" / rel
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".part")
                row[image].convert("RGB").save(tmp, format="JPEG", quality=95)
                os.replace(tmp, path)
            rows.append((rel, int(row[label])))
            advance()
        splits[split] = rows
    if "train" not in splits or "test" not in splits:
        raise DataError(f"hub dataset {info.hub} has splits {list(data)}: expected train and test; its layout changed")
    if "val" not in splits:
        splits["train"], splits["val"] = carve_val(splits["train"], VAL_SHARE, info.name)
        notes.append(f"{info.name}: val.json is a seeded {VAL_SHARE:.0%} per-class cut of the hub copy's train split")
    digests = {}
    for split in ("train", "val", "test"):
        atomic_write(folder / f"{split}.json", json.dumps(dict(splits[split]), indent=0, sort_keys=True))
        digests[f"{split}.json"] = sha256(folder / f"{split}.json")
    return {"source": f"hub:{info.hub}", "sha256": digests, "counts": {s: len(splits[s]) for s in splits},
            "image_root": "images"}
