"""The cost of the prompt methods on the vision-language models (``vptune bench --backbone vilt``,
``--backbone meter``): ViLT-B/32's shape (d = 768, 12 blocks, 12 heads) at 384x384 (144
patches) with a 40-token question, or METER-B's (CLIP ViT-B/16 at 288, RoBERTa-base, 6 + 6
fusion layers) with a 40-token text; random weights. Additional GFLOPs per image-text pair over the frozen model (the convention of
``vptune.flops.extra_flops``: no task head) and the inference time of a batch, for APT, the
deep prompt on the tokens path and on vptune's exact key-value path, and LoRA; docs/methods.md,
"Vision-language models"."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

ROWS = (("apt", {}), ("vpt-deep:tokens", {"path": "tokens"}), ("vpt-deep:kv", {"path": "kv"}), ("lora", {"rank": 8}))
PAPER_RATIO = 17.7  # APT's additional FLOPs as a percentage of deep prompting's (ViLT: 0.91 vs 5.14 GFLOPs)
METER_PAPER = {"apt": 2.31, "vpt-deep": 13.05}  # the paper's additional GFLOPs on METER


def vilt_b32(image_size: int = 384, text_length: int = 40) -> torch.nn.Module:
    """A randomly initialised ViltModel of ViLT-B/32's shape."""
    from transformers import ViltConfig, ViltModel

    config = ViltConfig(image_size=image_size, patch_size=32, max_position_embeddings=text_length, max_image_length=-1)
    return ViltModel(config).eval()


def vilt_cost(num_prompts: int = 200, batch_size: int = 2, rounds: int = 3, image_size: int = 384,
              text_length: int = 40, net: torch.nn.Module | None = None, clock: str = "wall") -> list[dict[str, Any]]:
    """One row per method: tuned parameters (without the task head), additional GFLOPs per pair,
    median inference seconds per batch, and APT's extra GFLOPs as a percentage of the row's.
    ``net``: another ViltModel instead of ViLT-B/32's shape."""
    torch.manual_seed(0)
    net = vilt_b32(image_size, text_length) if net is None else net
    return vl_cost(net, ROWS, num_prompts, batch_size, rounds, clock)


def meter_cost(num_prompts: int = 200, batch_size: int = 1, rounds: int = 2, image_size: int = 288,
               text_length: int = 40, net: torch.nn.Module | None = None, clock: str = "wall") -> list[dict[str, Any]]:
    """``vilt_cost`` on METER-B's shape (``meter.meter_b``), with the deep prompt at all 24 sites
    (the paper's parameter count) and at the 12 cross-attention sites only (the official code's)."""
    from .backbones.meter import MeterFamily, meter_b

    torch.manual_seed(0)
    net = meter_b(image_size, text_length) if net is None else net
    cross = tuple(MeterFamily(net).cross_sites())
    rows = (("apt", {"train_scale": False}),) + ROWS[1:3] + (
        ("vpt-deep:tokens:cross", {"path": "tokens", "layers": cross}), ("vpt-deep:kv:cross", {"path": "kv", "layers": cross})) + ROWS[3:]
    return vl_cost(net, rows, num_prompts, batch_size, rounds, clock)


def vl_cost(net: torch.nn.Module, rows_spec, num_prompts: int, batch_size: int, rounds: int,
            clock: str = "wall") -> list[dict[str, Any]]:
    """The rows of ``vilt_cost`` for the vision-language model ``net``: ``rows_spec`` is
    (label, options) per row, the method being the label up to its first colon. ``clock``:
    "wall", or "cpu" (the process's CPU time: steadier on a shared machine with one thread)."""
    from .flops import extra_flops
    from .methods import config_for
    from .model import PromptModel
    from .tasks import VQATask

    rows = []
    for name, options in rows_spec:
        method = name.split(":")[0]
        if method != "lora":
            options = {**options, "num_prompts": num_prompts}
        model = PromptModel(net, config_for(method, **options), task=VQATask(["yes", "no"]), also_tune=False).eval()
        times = _timed(model, batch_size, rounds, clock)
        head = sum(p.numel() for p in model.head.parameters())
        rows.append({"method": name, "num_prompts": None if method == "lora" else num_prompts,
                     "tuned_params": model.num_tuned_parameters() - head, "extra_gflops": extra_flops(model) / 1e9,
                     "infer_s": statistics.median(times), "batch_size": batch_size, "clock": clock})
    frozen = PromptModel(net, config_for("linear"), task=VQATask(["yes", "no"]), also_tune=False).eval()
    times = _timed(frozen, batch_size, rounds, clock)
    from .flops import count_flops

    base = count_flops(lambda: frozen.family.frozen_features(frozen.family.example_inputs(batch=1))) / 1e9
    rows.insert(0, {"method": "backbone", "num_prompts": None, "tuned_params": 0, "extra_gflops": 0.0,
                    "infer_s": statistics.median(times), "batch_size": batch_size, "gflops": base, "clock": clock})
    apt = next(r["extra_gflops"] for r in rows if r["method"] == "apt")
    for row in rows:
        row["apt_percent_of_this"] = 100.0 * apt / row["extra_gflops"] if row["extra_gflops"] else None
    return rows


@torch.no_grad()
def _timed(model: PromptModel, batch_size: int, rounds: int, clock: str = "wall") -> list[float]:
    """Seconds of ``rounds`` forward passes over the family's example inputs, after one warm-up
    (which also fills the prompt key/value cache)."""
    inputs = model.family.example_inputs(batch=batch_size)
    model(inputs)
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    for _ in range(rounds):
        start = now()
        model(inputs)
        times.append(now() - start)
    return times
