"""TrainConfig: every knob of a training run, as one JSON-serialisable dataclass.

It is saved with each run (in ``model.metadata`` and in the checkpoint), so a run folder says
exactly how it was made and ``--resume`` can refuse to continue under different settings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import torch

from ..tracking import check_tracker

# Where a run's figures are logged: they do not change what it computes, so they are left out
# when a run or sweep folder's settings are compared with a new invocation's.
TRACKING_FIELDS = ("tracker", "tracking_uri")


def without_tracking(settings: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig's ``to_dict()`` (or a recorded one) without the tracking fields."""
    return {key: value for key, value in settings.items() if key not in TRACKING_FIELDS}


def with_defaults(saved: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``saved`` (training settings a run, checkpoint or sweep folder recorded) with each of ``keys``
    it lacks set to that setting's default. A setting is added with a default that keeps what vptune
    did before it existed (``clip_grad`` None: no clipping), so a record written before it was made
    with the default, and must compare equal to a new invocation that leaves it out."""
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    return {**{key: defaults[key] for key in keys if key in defaults and key not in saved}, **saved}


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a GPU this machine's torch
    cannot use is refused with the reason, instead of failing deep inside torch."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA GPU here"
            raise ValueError(f"--device {spec}: {why} (torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: torch sees {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
    return device


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # images per micro-batch; an optimiser step sees batch_size * grad_accum
    lr: float = 0.1
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, the VPT recipe) | "adamw"
    warmup_epochs: float = 1.0
    scale_lr: bool = False  # the papers' convention: lr = base_lr * batch / 256
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, on CPU and GPU)
    seed: int = 0
    grad_accum: int = 1
    clip_grad: float | None = None  # the largest L2 norm of the tuned parameters' gradients per step; None: no clipping
    eval_every: int = 0  # evaluate on val every k epochs; 0: only at the end
    num_workers: int = 0
    skip_bad_images: bool = False
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    tracker: str = "none"  # "none" | "tensorboard" | "mlflow": where train_run logs besides curve.csv (vptune.tracking)
    tracking_uri: str | None = None  # MLflow's store; default: an SQLite file in the run folder

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_epochs": 0 <= self.warmup_epochs <= self.epochs,
            "grad_accum": self.grad_accum >= 1,
            "eval_every": self.eval_every >= 0,
            "num_workers": self.num_workers >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"bad training setting {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}: epochs, batch_size and "
                "grad_accum must be >= 1, lr > 0, weight_decay, eval_every and num_workers >= 0, "
                "and warmup_epochs between 0 and epochs"
            )
        clip = self.clip_grad
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf):
            raise ValueError(
                f"clip_grad must be a positive number (the largest L2 norm of the tuned parameters' gradients in a "
                f"step) or None for no clipping, got {self.clip_grad!r}: pass e.g. --clip-grad 1.0, or leave it out"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        check_tracker(self.tracker, self.tracking_uri, installed=False)  # installed: checked when a run opens it
        if self.device != "auto":
            try:
                torch.device(self.device)  # the syntax only: a sweep's driver may lack the GPUs its trials use
            except RuntimeError:
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None

    @property
    def effective_lr(self) -> float:
        """The peak learning rate: ``lr``, or ``lr * batch / 256`` with ``scale_lr`` (batch per step)."""
        return self.lr * self.batch_size * self.grad_accum / 256 if self.scale_lr else self.lr

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; expected some of {sorted(known)}")
        return cls(**data)
