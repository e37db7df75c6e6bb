"""The shape every task has (``Task``) and the initialisation of the vision-language heads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

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
