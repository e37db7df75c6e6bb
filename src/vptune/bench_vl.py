"""The cost of the prompt methods on ViLT (``vptune bench --backbone vilt``): ViLT-B/32's shape
(d = 768, 12 blocks, 12 heads) at 384x384 (144 patches) with a 40-token question, random
weights. Additional GFLOPs per image-text pair over the frozen model (the convention of
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


def vilt_b32(image_size: int = 384, text_length: int = 40) -> torch.nn.Module:
    """A randomly initialised ViltModel of ViLT-B/32's shape."""
    from transformers import ViltConfig, ViltModel

    config = ViltConfig(image_size=image_size, patch_size=32, max_position_embeddings=text_length, max_image_length=-1)
    return ViltModel(config).eval()


def vilt_cost(num_prompts: int = 200, batch_size: int = 2, rounds: int = 3, image_size: int = 384,
              text_length: int = 40, net: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """One row per method: tuned parameters (without the task head), additional GFLOPs per pair,
    median inference seconds per batch, and APT's extra GFLOPs as a percentage of the row's.
    ``net``: another ViltModel instead of ViLT-B/32's shape."""
    from .flops import extra_flops
    from .methods import config_for
    from .model import PromptModel
    from .tasks import VQATask

    torch.manual_seed(0)
    net = vilt_b32(image_size, text_length) if net is None else net
    rows = []
    for name, options in ROWS:
        method = name.split(":")[0]
        if method != "lora":
            options = {**options, "num_prompts": num_prompts}
        model = PromptModel(net, config_for(method, **options), task=VQATask(["yes", "no"]), also_tune=False).eval()
        times = _timed(model, batch_size, rounds)
        head = sum(p.numel() for p in model.head.parameters())
        rows.append({"method": name, "num_prompts": None if method == "lora" else num_prompts,
                     "tuned_params": model.num_tuned_parameters() - head, "extra_gflops": extra_flops(model) / 1e9,
                     "infer_s": statistics.median(times), "batch_size": batch_size})
    frozen = PromptModel(net, config_for("linear"), task=VQATask(["yes", "no"]), also_tune=False).eval()
    times = _timed(frozen, batch_size, rounds)
    from .flops import count_flops

    base = count_flops(lambda: frozen.family.frozen_features(frozen.family.example_inputs(batch=1))) / 1e9
    rows.insert(0, {"method": "backbone", "num_prompts": None, "tuned_params": 0, "extra_gflops": 0.0,
                    "infer_s": statistics.median(times), "batch_size": batch_size, "gflops": base})
    apt = next(r["extra_gflops"] for r in rows if r["method"] == "apt")
    for row in rows:
        row["apt_percent_of_this"] = 100.0 * apt / row["extra_gflops"] if row["extra_gflops"] else None
    return rows


@torch.no_grad()
def _timed(model: PromptModel, batch_size: int, rounds: int) -> list[float]:
    """Seconds of ``rounds`` forward passes over the family's example inputs, after one warm-up
    (which also fills the prompt key/value cache)."""
    inputs = model.family.example_inputs(batch=batch_size)
    model(inputs)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - start)
    return times
