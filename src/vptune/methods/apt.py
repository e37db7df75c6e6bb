"""APT: Approximated Prompt Tuning (Wu et al., arXiv 2306.15706); docs/methods.md,
"APT: approximated prompt tuning".

Softmax attention over [X; P] splits into the input-only attention and a prompt term
weighted by the attention mass the prompts take. APT keeps the frozen attention untouched
and replaces the prompt term by a cheap one, so prompts never enter global attention.
Per block i, with ``u`` the attention's input (LN1 of the block input) and ``a`` its
output after the output projection (the official code's formulation):

    P_hat = P + (P W1) W2          # low-rank update, identity at init (W2 = 0)
    A     = ReLU(u P_hat^T)        # n x p; no 1/sqrt(d), no heads, no softmax
    A     = dropout(A)             # while training; p: the site's attention dropout (official), or ``dropout``
    E     = A P
    w     = max_j A[:, j]          # detached, after the dropout
    out   = (a + w * E) * exp(s)
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Method, MethodConfig, register


@register("apt")
@dataclasses.dataclass
class APTConfig(MethodConfig):
    num_prompts: int = 50
    rank: int = 4
    # The scale s is trained (the official ViLT code) or stays 0 (the official METER code, which
    # leaves it out of the trained tensors; docs/methods.md).
    train_scale: bool = True
    # Dropout on A while training. None: the attention-dropout probability of the site it sits in,
    # as the official module (which gets its block's attn_drop); 0 turns it off (docs/methods.md).
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.rank < 1:
            raise ValueError(f"num_prompts and rank must be >= 1, got {self.num_prompts} and {self.rank}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) or None (the attention's own), got {self.dropout}")

    def method_name(self) -> str:
        return "apt"

    def build(self, family) -> "APT":
        return APT(self, family)


class APT(Method):
    def __init__(self, config: APTConfig, family) -> None:
        super().__init__()
        widths, p, r = [site.width for site in family.sites], config.num_prompts, config.rank
        self.config = config
        self.dropouts = [site.attention_dropout if config.dropout is None else config.dropout for site in family.sites]
        # Per site of width d (stacked into one (L, ...) tensor each when all sites have one width).
        self.add_site_parameters("prompt_embeddings", [(p, d) for d in widths], lambda s: torch.randn(s) * 0.02)  # P
        self.add_site_parameters("down", [(d, r) for d in widths], torch.randn)  # W1
        self.add_site_parameters("up", [(r, d) for d in widths], torch.zeros)  # W2
        self.add_site_parameters("log_scale", [() for _ in widths], torch.zeros)  # s
        if not config.train_scale:
            for stacked, _ in self.site_rows["log_scale"]:
                getattr(self, stacked).requires_grad_(False)  # stays exp(0) = 1, not stored in a run

    def attention_output(self, index: int):
        return partial(self.approximate, index)

    def approximate(self, index: int, u: Tensor, a: Tensor) -> Tensor:
        prompts = self.site_parameter("prompt_embeddings", index)  # p, d
        adapted = prompts + (prompts @ self.site_parameter("down", index)) @ self.site_parameter("up", index)  # P_hat
        scores = F.relu(u @ adapted.transpose(0, 1))  # A: B, N, p
        if self.dropouts[index]:
            scores = F.dropout(scores, self.dropouts[index], self.training)
        extra = scores @ prompts  # E: B, N, d
        weight = scores.amax(dim=-1, keepdim=True).detach()  # w: B, N, 1
        return (a + weight * extra) * self.site_parameter("log_scale", index).exp()
