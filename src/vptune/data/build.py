"""``build_data``: from a data spec string and the backbone's data config to train/val/test
datasets, with the preprocessing each benchmark prescribes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from . import mini, sources
from .images import ArrayImages, DataError, ImageFiles, Sample, check_images, check_max_pixels
from .transforms import fgvc_transforms, resize_transform

SPEC_FORMS = "imagefolder:PATH, vtab1k:ROOT/TASK, fgvc:ROOT/NAME or mini:TASK"


@dataclass
class DataBundle:
    """Datasets yielding (normalised float image (C, H, W), int label); val/test None when absent."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    num_classes: int
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)  # "path (origin): reason" for each bad image skipped
    spec: str = ""
    notes: list[str] = field(default_factory=list)  # facts about the source worth telling the user


def build_data(
    spec: str, data_config: dict, *, final: bool = False, skip_bad_images: bool = False, max_pixels: int | None = None,
    allow_sparse_labels: bool = False,
) -> DataBundle:
    """Datasets for ``spec`` (``imagefolder:PATH``, ``vtab1k:ROOT/TASK``, ``fgvc:ROOT/NAME``,
    ``mini:TASK``) sized from ``data_config`` (timm's ``resolve_data_config(model=backbone)``).

    ``final`` trains on train+val (VTAB's train800val200) and keeps val for reporting. Bad
    images (unreadable, or above ``max_pixels``, default 16 megapixels) raise a DataError
    naming the file, or with ``skip_bad_images`` are left out and listed in ``skipped``. List
    and JSON labels that leave most of 0..max unused are refused as a typo unless
    ``allow_sparse_labels``."""
    check_max_pixels(max_pixels)
    kind, argument = _parse(spec)
    if kind == "mini":
        return _mini(argument, spec, data_config, final)
    source = _source(kind, argument, allow_sparse_labels)
    for note in source.notes:
        warnings.warn(note, stacklevel=2)

    train_transform, eval_transform = (fgvc_transforms(data_config) if source.augment
                                       else (resize_transform(data_config),) * 2)
    skipped: list[str] = []

    def dataset(samples: list[Sample] | None, transform) -> ImageFiles | None:
        if samples is None:
            return None
        kept, bad = check_images(samples, skip_bad_images, max_pixels)
        skipped.extend(bad)
        return ImageFiles(kept, transform, max_pixels)

    train_samples = source.trainval if final and source.trainval is not None else source.train
    train = dataset(train_samples, train_transform)
    if len(train) == 0:
        raise DataError(f"{spec}: no readable training images ({len(skipped)} skipped)")
    return DataBundle(train, dataset(source.val, eval_transform), dataset(source.test, eval_transform),
                      source.num_classes, source.class_names, skipped, spec, source.notes)


def check_data(spec: str, *, allow_sparse_labels: bool = False) -> None:
    """Read ``spec``'s layout (folders, split files, labels) without opening an image: a quick
    check, for a command whose training happens elsewhere (a sweep's trials), that the data is there."""
    kind, argument = _parse(spec)
    if kind == "mini":
        mini.task(argument)
    else:
        _source(kind, argument, allow_sparse_labels)


def _parse(spec: str) -> tuple[str, str]:
    kind, _, argument = spec.partition(":")
    if not argument:
        raise DataError(f"data spec {spec!r} is not understood; expected {SPEC_FORMS} "
                        f"(mini tasks: {', '.join(mini.MINI_TASKS)})")
    if kind in ("minivl", "vqav2", "nlvr2", "f30k"):
        raise DataError(f"{spec} is vision-language data (images with text): read it with "
                        "vptune.data.build_vl_data(spec, data_config, tokenizer)")
    if kind not in ("mini", "imagefolder", "vtab1k", "fgvc"):
        raise DataError(f"unknown data source {kind!r} in {spec!r}; expected {SPEC_FORMS}")
    return kind, argument


def _source(kind: str, argument: str, allow_sparse_labels: bool) -> sources.Source:
    path = Path(argument).expanduser()
    if kind == "imagefolder":
        return sources.imagefolder(path)
    return (sources.vtab1k if kind == "vtab1k" else sources.fgvc)(path, allow_sparse_labels)


def _mini(name: str, spec: str, data_config: dict, final: bool) -> DataBundle:
    info = mini.task(name)
    arrays = mini.load(name)
    transform = resize_transform(data_config)
    split = len(arrays.trainval_x) - mini.VAL
    train_end = len(arrays.trainval_x) if final else split
    return DataBundle(
        train=ArrayImages(arrays.trainval_x[:train_end], arrays.trainval_y[:train_end], transform),
        val=ArrayImages(arrays.trainval_x[split:], arrays.trainval_y[split:], transform),
        test=ArrayImages(arrays.test_x, arrays.test_y, transform),
        num_classes=info.num_classes, class_names=list(info.class_names), spec=spec,
    )
