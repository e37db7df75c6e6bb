"""The optimiser over a model's tuned parameters and the learning-rate schedule.

Weight decay follows the VPT recipe: it applies to every tuned matrix or tensor, prompts
included (they are (p, d) or (depth, p, d) tensors), but not to biases, norm scales and other
1-d parameters, nor to the position embedding and special tokens timm marks as
``no_weight_decay`` (full fine-tuning). The schedule is a pure function of the optimiser
step, so a checkpoint's step count restores it exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of the model's trainable parameters: with and without weight decay."""
    backbone = getattr(model, "backbone", None)
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (the VPT recipe) or AdamW, over the tuned parameters only."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters: nothing to train")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.effective_lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.effective_lr)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up from
    1/warmup_steps to 1, then a half cosine from 1 down towards 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay_steps)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
