"""VQA as ViLT fine-tunes it: multi-label classification over an answer vocabulary with soft
scores (``vqa_targets``: the VQA accuracy each answer would get), binary cross-entropy scaled
by the number of answers, and the VQA score of the top answer."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Task, vilt_init_


def vqa_score(logits: Tensor, targets: Tensor) -> Tensor:
    """Per question, the soft score (B,) of the highest-scoring answer."""
    return targets.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)


class VQATask(Task):
    name = "vqa"
    fields = ("image", "input_ids", "attention_mask", "vqa_targets")
    main_metric = "vqa_score"

    def __init__(self, answers: list[str]) -> None:
        if not answers:
            raise ValueError("VQA needs a non-empty answer vocabulary")
        self.answers = list(answers)

    def head(self, in_dim: int, hidden: int | None = None) -> nn.Module:
        """ViLT's VQA classifier: Linear(d, h), LayerNorm, GELU, Linear(h, answers), h = 2d
        (METER's: h = d, ``hidden``)."""
        h = 2 * in_dim if hidden is None else hidden
        return vilt_init_(nn.Sequential(nn.Linear(in_dim, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, len(self.answers))))

    def loss(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        targets = batch["vqa_targets"].float()
        # ViLT: the mean over questions and answers, times the number of answers
        return F.binary_cross_entropy_with_logits(outputs.float(), targets) * targets.shape[1]

    def metrics(self, outputs: Tensor, batch: Mapping[str, Any], split: str = "test") -> dict[str, float]:
        with torch.no_grad():
            return {f"{split}_vqa_score": 100.0 * vqa_score(outputs, batch["vqa_targets"]).float().mean().item(),
                    f"{split}_loss": self.loss(outputs, batch).item()}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "answers": self.answers}
