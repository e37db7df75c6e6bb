"""VTAB-1k from TensorFlow Datasets a user already prepared: ``vptune data vtab1k --source tfds:DATA_DIR``.

The official VTAB and VPT code reads the 19 tasks straight from TFDS; users who ran it have the
prepared datasets in a ``data_dir``. This reads them there (TFDS's own reader, imported only
here) and writes the list-file layout ``vtab1k:`` reads, with the same examples the official
code uses: its dataset names and major versions, its ``train800`` / ``val200`` slices (the first
800 of the task's train split, the first 200 of its val split, both cut where the official
per-dataset classes cut them) and its test split, and its labels (CLEVR's object counts and
distances, KITTI's closest-vehicle distance, dSprites' binned position and orientation,
smallNORB's azimuth and elevation). docs/benchmarks.md lists every task's slices.

Datasets prepared as ``array_record`` (or parquet) are read through ``tfds.data_source``, which
needs ``tensorflow_datasets`` and ``array_record`` but not TensorFlow; datasets prepared as
``tfrecord`` (the format the official code wrote) are read through ``as_dataset``, which needs
TensorFlow. Images are written as the bytes TFDS stored (PNG or JPEG, not re-encoded), except
dSprites and smallNORB, whose grey images the official code turns into three channels (and
dSprites' 0/1 pixels into 0/255): those are decoded, converted the same way and saved as PNG.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .images import DataError

Slice = tuple[str, int, int]  # (TFDS split, first index, end index): examples [first, end) of that split
Sizes = dict[str, int]  # TFDS split name -> number of examples


@dataclass(frozen=True)
class TfdsTask:
    """How the official code builds one VTAB-1k task from a TFDS dataset."""

    dataset: str  # TFDS name, with its config where it has one ("eurosat/rgb")
    version: str  # the versions the official code asks for: "3.*.*" (any 3.x.y) or an exact one
    slices: Callable[[Sizes], dict[str, list[Slice]]]  # split sizes -> train800, val200, test
    label: Callable[[dict[str, Any], Any], int] | None = None  # (example, dataset info) -> label; None: "label"
    image: Callable[[np.ndarray], np.ndarray] | None = None  # decoded image -> what is saved; None: stored bytes
    attribute: str = "label"  # the feature the label comes from (checked to exist)


def _cut(percent: int, test: str = "test") -> Callable[[Sizes], dict[str, list[Slice]]]:
    """train800 = train[:800]; val200 = the 200 after the first ``percent``% of train; test = ``test``."""

    def slices(sizes: Sizes) -> dict[str, list[Slice]]:
        n = percent * sizes["train"] // 100
        return {"train800": [("train", 0, 800)], "val200": [("train", n, n + 200)], "test": [(test, 0, sizes[test])]}

    return slices


def _official_val(sizes: Sizes) -> dict[str, list[Slice]]:
    """train800 = train[:800]; val200 = validation[:200]; test = test."""
    return {"train800": [("train", 0, 800)], "val200": [("validation", 0, 200)], "test": [("test", 0, sizes["test"])]}


def _three_way(train_percent: int, val_percent: int) -> Callable[[Sizes], dict[str, list[Slice]]]:
    """One split cut into train, val and test: val200 from where val starts, test what follows val."""

    def slices(sizes: Sizes) -> dict[str, list[Slice]]:
        total = sizes["train"]
        n, v = train_percent * total // 100, val_percent * total // 100
        return {"train800": [("train", 0, 800)], "val200": [("train", n, n + 200)], "test": [("train", n + v, total)]}

    return slices


def _smallnorb(sizes: Sizes) -> dict[str, list[Slice]]:
    """train800 = train[:800]; val200 = test[:200]; test = test[50%:] (TFDS rounds percent boundaries to the closest)."""
    half = int(round(50 * sizes["test"] / 100.0))
    return {"train800": [("train", 0, 800)], "val200": [("test", 0, 200)], "test": [("test", half, sizes["test"])]}


def _bin(value: float, thresholds: Iterable[float]) -> int:
    """The official ``reduce_max(where(thresholds - value < 0))``: the last threshold below ``value``."""
    below = [i for i, t in enumerate(thresholds) if t - value < 0]
    if not below:
        raise DataError(f"value {value} is below every threshold of the official binning")
    return max(below)


def _clevr_count(example: dict[str, Any], info: Any) -> int:
    return int(len(np.asarray(example["objects"]["size"]))) - 3


def _clevr_distance(example: dict[str, Any], info: Any) -> int:
    depth = np.asarray(example["objects"]["pixel_coords"], dtype=np.float32).reshape(-1, 3)[:, 2]
    return _bin(float(depth.min()), (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0))


def _kitti_closest_vehicle(example: dict[str, Any], info: Any) -> int:
    objects = example["objects"]
    kinds = np.asarray(objects["type"]).reshape(-1)
    depth = np.asarray(objects["location"], dtype=np.float32).reshape(-1, 3)[:, 2]
    vehicles = np.concatenate([depth[kinds < 3], np.array([1000.0], dtype=np.float32)])  # Car, Van, Truck
    return _bin(float(vehicles.min()), (-100.0, 8.0, 20.0, 999.0))


def _binned(attribute: str, classes: int) -> Callable[[dict[str, Any], Any], int]:
    """dSprites: an attribute's values grouped into ``classes`` bins (official: floordiv by original/classes)."""

    def label(example: dict[str, Any], info: Any) -> int:
        factor = np.float32(info.features[attribute].num_classes / classes)
        return int(np.floor(np.float32(example[attribute]) / factor))

    return label


def _attribute(attribute: str) -> Callable[[dict[str, Any], Any], int]:
    return lambda example, info: int(example[attribute])


def _grey_to_rgb(scale: int) -> Callable[[np.ndarray], np.ndarray]:
    def convert(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        return (np.tile(image, (1, 1, 3)).astype(np.int64) * scale).clip(0, 255).astype(np.uint8)

    return convert


VTAB_TFDS: dict[str, TfdsTask] = {
    "cifar": TfdsTask("cifar100", "3.*.*", _cut(90)),
    "caltech101": TfdsTask("caltech101", "3.*.*", _cut(90)),
    "dtd": TfdsTask("dtd", "3.*.*", _official_val),
    "oxford_flowers102": TfdsTask("oxford_flowers102", "2.*.*", _official_val),
    "oxford_iiit_pet": TfdsTask("oxford_iiit_pet", "3.*.*", _cut(80)),
    "svhn": TfdsTask("svhn_cropped", "3.*.*", _cut(90)),
    "sun397": TfdsTask("sun397/tfds", "4.*.*", _official_val),
    "patch_camelyon": TfdsTask("patch_camelyon", "2.*.*", _official_val),
    "eurosat": TfdsTask("eurosat/rgb", "2.*.*", _three_way(60, 20)),
    "resisc45": TfdsTask("resisc45", "3.*.*", _three_way(60, 20)),
    "diabetic_retinopathy": TfdsTask("diabetic_retinopathy_detection/btgraham-300", "3.*.*", _official_val),
    "clevr_count": TfdsTask("clevr", "3.*.*", _cut(90, test="validation"), _clevr_count, attribute="objects"),
    "clevr_dist": TfdsTask("clevr", "3.*.*", _cut(90, test="validation"), _clevr_distance, attribute="objects"),
    "dmlab": TfdsTask("dmlab", "2.0.1", _official_val),
    "kitti": TfdsTask("kitti", "3.2.0", _official_val, _kitti_closest_vehicle, attribute="objects"),
    "dsprites_loc": TfdsTask("dsprites", "2.*.*", _three_way(80, 10), _binned("label_x_position", 16),
                             _grey_to_rgb(255), attribute="label_x_position"),
    "dsprites_ori": TfdsTask("dsprites", "2.*.*", _three_way(80, 10), _binned("label_orientation", 16),
                             _grey_to_rgb(255), attribute="label_orientation"),
    "smallnorb_azi": TfdsTask("smallnorb", "2.*.*", _smallnorb, _attribute("label_azimuth"), _grey_to_rgb(1),
                              attribute="label_azimuth"),
    "smallnorb_ele": TfdsTask("smallnorb", "2.*.*", _smallnorb, _attribute("label_elevation"), _grey_to_rgb(1),
                              attribute="label_elevation"),
}


def import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            'reading TensorFlow Datasets needs tensorflow_datasets, which is not installed here: pip install '
            '"vptune[tfds]" (datasets prepared in the tfrecord format, as the official VTAB code wrote them, also need '
            "tensorflow: pip install tensorflow)"
        ) from None
    return tfds


def find_version(data_dir: Path, task: TfdsTask) -> Path:
    """The prepared folder ``DATA_DIR/NAME[/CONFIG]/VERSION`` of the newest version the official code
    accepts, or a DataError saying what is there."""
    folder = data_dir / task.dataset
    found = sorted(
        (p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"\d+\.\d+\.\d+", p.name)
         and (p / "dataset_info.json").is_file()),
        key=lambda p: tuple(int(x) for x in p.name.split(".")),
    ) if folder.is_dir() else []
    pattern = re.escape(task.version).replace(r"\*", r"\d+")
    matching = [p for p in found if re.fullmatch(pattern, p.name)]
    if not matching:
        there = f"it has {', '.join(p.name for p in found)}" if found else "there is no prepared version there"
        raise DataError(f"{folder}: the official VTAB code reads {task.dataset}:{task.version}; {there} "
                        f"(prepare it with tfds.builder('{task.dataset}:{task.version}', data_dir=...).download_and_prepare())")
    return matching[-1]


def tfds_layout(data_dir: Path, names: Iterable[str]) -> dict[str, Path]:
    """{task: its prepared TFDS folder} for the tasks whose dataset ``data_dir`` holds (any version)."""
    return {name: data_dir / VTAB_TFDS[name].dataset for name in names
            if name in VTAB_TFDS and (data_dir / VTAB_TFDS[name].dataset).is_dir()}


class TfdsReader:
    """One prepared TFDS dataset, read by slices: random access (array_record, parquet: no TensorFlow)
    or, for tfrecord, through ``as_dataset`` (TensorFlow)."""

    def __init__(self, folder: Path) -> None:
        self.tfds = import_tfds()
        self.folder = folder
        try:
            self.builder = self.tfds.builder_from_directory(str(folder))
        except Exception as err:  # noqa: BLE001 - TFDS raises many kinds for a damaged dataset_info.json
            raise DataError(f"{folder}: not a readable prepared TFDS dataset ({type(err).__name__}: {err})") from None
        self.info = self.builder.info
        formats = {str(getattr(f, "value", f)) for f in self.info.available_file_formats()} or {
            str(getattr(self.info.file_format, "value", self.info.file_format))}
        self.random_access = bool(formats & {"array_record", "parquet"})
        self.file_format = "array_record" if "array_record" in formats else sorted(formats)[0]

    def sizes(self) -> Sizes:
        return {name: int(split.num_examples) for name, split in self.info.splits.items()}

    def examples(self, piece: Slice, raw_image: bool) -> Iterator[dict[str, Any]]:
        """The examples of ``split[first:end]`` in order, the image as stored bytes when ``raw_image``."""
        split, first, end = piece
        spec = f"{split}[{first}:{end}]"
        decoders = {"image": self.tfds.decode.SkipDecoding()} if raw_image else None
        try:
            if self.random_access:
                yield from self.builder.as_data_source(split=spec, decoders=decoders)
                return
            try:
                import tensorflow  # noqa: F401
            except ImportError:
                raise DataError(
                    f"{self.folder} was prepared in the {self.file_format} format, which TFDS reads only through "
                    "TensorFlow: pip install tensorflow (or prepare it again with file_format='array_record')"
                ) from None
            dataset = self.builder.as_dataset(split=spec, shuffle_files=False, decoders=decoders)
            yield from self.tfds.as_numpy(dataset)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - TFDS and array_record raise many kinds for damaged files
            raise DataError(f"{self.folder}: reading {spec} failed ({type(err).__name__}: {err}); the prepared files "
                            "may be damaged: prepare the dataset again") from None


def image_bytes(example: dict[str, Any], task: TfdsTask) -> tuple[bytes, str]:
    """The file content and extension of an example's image."""
    image = example["image"]
    if task.image is None and isinstance(image, (bytes, np.bytes_)):
        data = bytes(image)
        if data.startswith(b"\x89PNG"):
            return data, "png"
        if data.startswith(b"\xff\xd8"):
            return data, "jpg"
        from io import BytesIO

        from PIL import Image

        image = np.asarray(Image.open(BytesIO(data)))
    elif isinstance(image, (bytes, np.bytes_)):
        from io import BytesIO

        from PIL import Image

        image = np.asarray(Image.open(BytesIO(bytes(image))))
    array = np.asarray(image)
    if task.image is not None:
        array = task.image(array)
    return encode_png(array), "png"


def encode_png(array: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def task_slices(task: TfdsTask, sizes: Sizes, where: str) -> dict[str, list[Slice]]:
    """The task's train800, val200 and test slices, checked against the split sizes."""
    needed = {s for pieces in task.slices({**{k: 0 for k in ("train", "validation", "test")}, **sizes}).values()
              for s, _, _ in pieces}
    missing = sorted(needed - set(sizes))
    if missing:
        raise DataError(f"{where}: has splits {', '.join(sorted(sizes))}; the official VTAB task reads "
                        f"{', '.join(sorted(needed))} ({', '.join(missing)} missing)")
    slices = task.slices(sizes)
    for name, pieces in slices.items():
        for split, first, end in pieces:
            if end > sizes[split] or first >= end:
                raise DataError(f"{where}: {name} is {split}[{first}:{end}], but {split} has {sizes[split]} examples")
    return slices


def is_tfds_source(source: object) -> bool:
    return isinstance(source, str) and source.startswith("tfds:")
