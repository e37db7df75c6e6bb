"""NLVR2 as ViLT fine-tunes it: each image is encoded with the statement, the two pooled
features are concatenated, and a binary classifier says whether the statement is true."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Task, vilt_init_


class NLVRHead(nn.Module):
    """ViLT's NLVR2 classifier on two pooled features: Linear(2d, h), LayerNorm, GELU, Linear(h, 2),
    h = 2d (METER's: h = d, ``hidden``)."""

    def __init__(self, in_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        h = 2 * in_dim if hidden is None else hidden
        self.classifier = vilt_init_(nn.Sequential(nn.Linear(2 * in_dim, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, 2)))

    def forward(self, pooled0: Tensor, pooled1: Tensor) -> Tensor:
        return self.classifier(torch.cat([pooled0, pooled1], dim=-1))  # B, 2


class NLVRTask(Task):
    name = "nlvr"
    fields = ("image0", "image1", "input_ids", "attention_mask", "label")
    main_metric = "top1"

    def head(self, in_dim: int, hidden: int | None = None) -> NLVRHead:
        return NLVRHead(in_dim, hidden)

    def loss(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return F.cross_entropy(outputs.float(), batch["label"])

    def metrics(self, outputs: Tensor, batch: Mapping[str, Any], split: str = "test") -> dict[str, float]:
        labels = batch["label"]
        return {f"{split}_top1": 100.0 * (outputs.argmax(-1) == labels).float().mean().item(),
                f"{split}_loss": F.cross_entropy(outputs.float(), labels).item()}
