"""The figures file of a bundled model, ``<docs>/<arch>-fmnist-figures.json``: what its model card
prints, in the JSON it came from, committed in ``docs/`` beside the other figures.

Two parts: ``evaluation``, measured on the weights (what ``vptune pretrain --arch ARCH
--evaluate-only`` measures again from the shipped file, with the evaluation code the pretraining
runs), and ``training``, the run's own record (command, recipe, steps, wall time, throughput, loss
history), which only a training run writes. Re-measuring keeps the ``training`` part a run wrote
before; where no run left one (the run folder is gone), it is ``null`` or holds what the weights
file itself records, and the model card keeps the run's figures as the run recorded them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ARCHES = ("vit", "swin", "clip", "vilt", "meter", "sd")


def figures_path(docs: Path, arch: str) -> Path:
    """Where ``arch``'s figures go: ``docs/vit-fmnist-figures.json`` for the bundled ViT, and so on."""
    return Path(docs) / f"{arch}-fmnist-figures.json"


def evaluate_command(arch: str, out: Path, docs: Path) -> str:
    """The command that re-measures ``arch``'s evaluation figures from the weights in ``out``."""
    return f"vptune pretrain --arch {arch} --evaluate-only --out {out} --docs {docs}"


def weights_figures(path: Path, heads: tuple[str, ...] = ()) -> dict:
    """A weights file's parameter count (leaving out the tensors under the pretraining ``heads``
    prefixes) and size: the model cards' "parameters" and "MB", measured on the file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        parameters = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys() if not key.startswith(heads))
    return {"parameters": parameters, "weights_mb": Path(path).stat().st_size / 1e6}


def write_figures(docs: Path, arch: str, model: str, evaluation: dict, command: str, training: dict | None = None) -> Path:
    """Write ``arch``'s figures file: ``evaluation`` (measured now by ``command``) and ``training``
    (the run's record; ``None`` keeps the one the file already holds)."""
    from ..atomic import atomic_write
    from ..report import machine, now

    path = figures_path(docs, arch)
    if training is None and path.is_file():
        training = json.loads(path.read_text()).get("training")
    record = {"model": model, "evaluation": evaluation,
              "evaluated": {"command": command, "machine": machine(), "written": now()}, "training": training}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    return path


def training_record(command: str, recipe: dict, start: int, elapsed: float, history: list, unit: str = "pairs") -> dict:
    """The ``training`` part of a ``pretrain.train_steps`` run's figures file: its command and recipe,
    the step it resumed at, its training time and throughput (``elapsed`` is summed over every
    session of a resumed run, so the rate counts all ``recipe["steps"]``), and its loss history."""
    from ..report import machine, now

    return {"command": command, "recipe": recipe, "steps": recipe["steps"], "resumed_at": start, "wall_time_min": elapsed / 60,
            f"{unit}_per_s": recipe["steps"] * recipe["batch_size"] / max(elapsed, 1e-9), "machine": machine(),
            "written": now(), "history": history}


def remeasure(arch: str, out: Path, docs: Path, threads: int = 1) -> dict:
    """Measure the evaluation figures of the weights ``arch`` has in ``out`` (no training) and write
    its figures file in ``docs``; returns the evaluation figures."""
    import torch

    if arch not in ARCHES:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHES)}")
    torch.set_num_threads(threads)
    out, docs = Path(out), Path(docs)
    if arch in ("vit", "swin"):
        from .pretrain import remeasure_bundled

        return remeasure_bundled(out, docs, arch)
    if arch == "clip":
        from .pretrain_clip import remeasure_clip

        return remeasure_clip(out, docs)
    if arch == "vilt":
        from .pretrain_vilt import remeasure_vilt

        return remeasure_vilt(out, docs)
    if arch == "meter":
        from .pretrain_meter import remeasure_meter

        return remeasure_meter(out, docs)
    from ..diffusion.pretrain_sd import remeasure_sd

    return remeasure_sd(out, docs)
