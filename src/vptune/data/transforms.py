"""Preprocessing sized from the backbone's own data config (timm's ``resolve_data_config``).

VTAB-1k (and folders, and the mini-benchmark): resize to the input size, normalise, no
augmentation. FGVC: Resize(size * 256/224) + RandomCrop + flip for training, Resize +
CenterCrop for evaluation (the VPT recipe, which uses 256 -> 224 at ViT-B's 224 px).
"""

from __future__ import annotations

from typing import Callable

from timm.data import resolve_data_config
from torch import nn
from torchvision import transforms as T

Transform = Callable  # PIL RGB image -> float tensor (C, H, W)


def _size(data_config: dict) -> tuple[int, int]:
    _, height, width = data_config["input_size"]
    return height, width


def _finish(data_config: dict) -> list:
    return [T.ToTensor(), T.Normalize(mean=data_config["mean"], std=data_config["std"])]


def _interpolation(data_config: dict) -> T.InterpolationMode:
    return T.InterpolationMode(data_config.get("interpolation") or "bicubic")


def resize_transform(data_config: dict) -> Transform:
    """VTAB-style: resize to exactly the backbone's input size."""
    return T.Compose([T.Resize(_size(data_config), interpolation=_interpolation(data_config)), *_finish(data_config)])


def fgvc_transforms(data_config: dict) -> tuple[Transform, Transform]:
    """(train, eval) FGVC transforms: resize the short side to size*256/224, then crop."""
    size = _size(data_config)
    resize = T.Resize(int(min(size) * 256 / 224), interpolation=_interpolation(data_config))
    train = T.Compose([resize, T.RandomCrop(size), T.RandomHorizontalFlip(), *_finish(data_config)])
    evaluate = T.Compose([resize, T.CenterCrop(size), *_finish(data_config)])
    return train, evaluate


def backbone_data_config(backbone: nn.Module) -> dict:
    """timm's data config of ``backbone`` at the input size it was built for (a model built
    without a pretrained config would otherwise report timm's default of 224)."""
    from ..backbones.family import family_of

    config = resolve_data_config(model=backbone)
    family = family_of(backbone)
    config["input_size"] = tuple(family.input_size())
    config.update(family.data_config())
    return config


def eval_transform(data_spec: str | None, data_config: dict) -> Transform:
    """The preprocessing evaluation uses for data ``data_spec`` (a run's recorded data, if any):
    FGVC's resize + centre crop, else a resize."""
    fgvc = isinstance(data_spec, str) and data_spec.startswith("fgvc:")
    return fgvc_transforms(data_config)[1] if fgvc else resize_transform(data_config)
