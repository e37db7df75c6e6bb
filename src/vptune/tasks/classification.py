"""Classification: today's head (``model.make_head``), cross-entropy, top-1."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Task


class ClassificationTask(Task):
    name = "classification"
    fields = ("image", "label")
    main_metric = "top1"

    def __init__(self, num_classes: int, hidden_layers: int = 0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.hidden_layers = num_classes, hidden_layers

    def head(self, in_dim: int) -> nn.Module:
        from ..model import make_head

        return make_head(in_dim, self.num_classes, self.hidden_layers)

    def loss(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return F.cross_entropy(outputs.float(), batch["label"])

    def loss_sum(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return F.cross_entropy(outputs.float(), batch["label"], reduction="sum")

    def metrics(self, outputs: Tensor, batch: Mapping[str, Any], split: str = "test") -> dict[str, float]:
        labels = batch["label"]
        return {f"{split}_top1": 100.0 * (outputs.argmax(-1) == labels).float().mean().item(),
                f"{split}_loss": F.cross_entropy(outputs.float(), labels).item()}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "hidden_layers": self.hidden_layers}
