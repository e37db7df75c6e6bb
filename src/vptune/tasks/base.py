"""The shape every task has (``Task``) and the initialisation of the vision-language heads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn


class Task(ABC):
    """A head, a loss and metrics over the batch fields in ``fields``."""

    name: str
    fields: tuple[str, ...]  # the batch keys the task (and its model inputs) read
    main_metric: str  # the metric to select on, without the split prefix

    @abstractmethod
    def head(self, in_dim: int) -> nn.Module:
        """A new head on pooled features of width ``in_dim``."""

    @abstractmethod
    def loss(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The training loss of the head's ``outputs`` on ``batch``."""

    @abstractmethod
    def metrics(self, outputs: Tensor, batch: Mapping[str, Any], split: str = "test") -> dict[str, float]:
        """Metrics (percentages) of a whole split's outputs, keyed ``{split}_{name}``."""

    def loss_sum(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The loss summed over the batch (the training loop divides by its optimiser step's size)."""
        return self.loss(outputs, batch) * outputs.shape[0]

    def evaluate(self, predict: Callable[[dict], Tensor], dataset: Any, loader: Callable[[Any], Any]) -> dict[str, float]:
        """Metrics of a whole split, keyed ``split_{name}``: ``predict(batch)`` on every batch of
        ``loader(dataset)``, the outputs and the fields the task reads gathered, then ``metrics``."""
        outputs, fields = [], {}
        for batch in loader(dataset):
            outputs.append(predict(batch).cpu())
            for key, value in batch.items():
                if isinstance(value, Tensor) and key not in ("image", "image0", "image1"):
                    fields.setdefault(key, []).append(value)
        if not outputs:
            raise ValueError("cannot evaluate on an empty dataset")
        gathered = {key: torch.cat(values) for key, values in fields.items()}
        return {**self.metrics(torch.cat(outputs), gathered, split="split"), "count": sum(len(o) for o in outputs)}

    def to_dict(self) -> dict[str, Any]:
        """What a run's config records to rebuild the task."""
        return {"name": self.name}


def vilt_init_(module: nn.Module) -> nn.Module:
    """ViLT's initialisation of its heads: Linear weights N(0, 0.02) with zero bias,
    LayerNorm weight 1 and bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module
