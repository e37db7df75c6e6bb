"""APT: Approximated Prompt Tuning (Wu et al., arXiv 2306.15706), REFERENCE.md section 3.

Softmax attention over [X; P] splits into the input-only attention and a prompt term
weighted by the attention mass the prompts take. APT keeps the frozen attention untouched
and replaces the prompt term by a cheap one, so prompts never enter global attention.
Per block i, with ``u`` the attention's input (LN1 of the block input) and ``a`` its
output after the output projection (the official code's formulation):

    P_hat = P + (P W1) W2          # low-rank update, identity at init (W2 = 0)
    A     = ReLU(u P_hat^T)        # n x p; no 1/sqrt(d), no heads, no softmax
    E     = A P
    w     = max_j A[:, j]          # detached
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

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.rank < 1:
            raise ValueError(f"num_prompts and rank must be >= 1, got {self.num_prompts} and {self.rank}")

    def method_name(self) -> str:
        return "apt"

    def build(self, backbone: nn.Module) -> "APT":
        return APT(self, backbone)


class APT(Method):
    def __init__(self, config: APTConfig, backbone: nn.Module) -> None:
        super().__init__()
        depth, dim, p, r = len(backbone.blocks), backbone.embed_dim, config.num_prompts, config.rank
        self.config = config
        self.prompt_embeddings = nn.Parameter(torch.randn(depth, p, dim) * 0.02)  # P
        self.down = nn.Parameter(torch.randn(depth, dim, r))  # W1
        self.up = nn.Parameter(torch.zeros(depth, r, dim))  # W2
        self.log_scale = nn.Parameter(torch.zeros(depth))  # s

    def attention_output(self, index: int):
        return partial(self.approximate, index)

    def approximate(self, index: int, u: Tensor, a: Tensor) -> Tensor:
        prompts = self.prompt_embeddings[index]  # p, d
        adapted = prompts + (prompts @ self.down[index]) @ self.up[index]  # P_hat: p, d
        scores = F.relu(u @ adapted.transpose(0, 1))  # A: B, N, p
        extra = scores @ prompts  # E: B, N, d
        weight = scores.amax(dim=-1, keepdim=True).detach()  # w: B, N, 1
        return (a + weight * extra) * self.log_scale[index].exp()
