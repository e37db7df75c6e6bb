"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022), REFERENCE.md section 1.

Learnable prompt tokens P_i (p x d) enter the token sequence after the prefix tokens
(CLS, registers) and get no position embedding. Shallow: one set before block 1 that flows
through every block. Deep: before every block i the prompt slot is overwritten by P_i, so
P_i acts only through the keys and values it gives block i; on ``path="kv"`` that is all we
compute (see ``vptune.attention``). ``location="add"`` instead adds one prompt per sequence
position to the tokens (the paper's ablation); ``layers`` restricts prompts to some blocks,
whose prompt outputs then flow on through the blocks that have none (the official code).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from .base import Method, MethodConfig, register


@register("vpt-shallow", deep=False)
@register("vpt-deep", deep=True)
@dataclasses.dataclass
class VPTConfig(MethodConfig):
    num_prompts: int = 50
    deep: bool = True
    dropout: float = 0.0
    prompt_dim: int | None = None  # prompts of this width pass through a trained Linear(prompt_dim, d)
    location: str = "prepend"  # "prepend" | "add"
    layers: tuple[int, ...] | None = None  # blocks that get prompts (deep); None: all
    shared: bool = False  # one prompt set for every prompted block
    path: str = "kv"  # "kv" | "tokens"

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.location not in ("prepend", "add"):
            raise ValueError(f"location must be 'prepend' or 'add', got {self.location!r}")
        if self.path not in ("kv", "tokens"):
            raise ValueError(f"path must be 'kv' or 'tokens', got {self.path!r}")
        if self.prompt_dim is not None and self.prompt_dim < 1:
            raise ValueError(f"prompt_dim must be >= 1 or None, got {self.prompt_dim}")
        if self.layers is not None:
            if not self.deep:
                raise ValueError("layers selects blocks for deep prompts; vpt-shallow prompts only block 0")
            self.layers = tuple(sorted(set(int(i) for i in self.layers)))

    def method_name(self) -> str:
        return "vpt-deep" if self.deep else "vpt-shallow"

    def build(self, backbone: nn.Module) -> "VPT":
        return VPT(self, backbone)


def prompt_init_bound(backbone: nn.Module, width: int) -> float:
    """VPT's Xavier-uniform bound, treating a prompt like a patch-embedding filter."""
    ph, pw = backbone.patch_embed.patch_size
    return math.sqrt(6.0 / (backbone.patch_embed.proj.in_channels * ph * pw + width))


class VPT(Method):
    def __init__(self, config: VPTConfig, backbone: nn.Module) -> None:
        super().__init__()
        depth, dim = len(backbone.blocks), backbone.embed_dim
        layers = config.layers if config.layers is not None else (range(depth) if config.deep else (0,))
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(f"layers {tuple(layers)} out of range for a backbone with {depth} blocks")
        self.config = config
        self.path = config.path
        self.layers = tuple(layers)
        self.set_of_layer = {layer: 0 if config.shared else j for j, layer in enumerate(self.layers)}
        num_sets = 1 if config.shared else len(self.layers)
        if config.location == "add":
            num_tokens = backbone.patch_embed.num_patches + backbone.num_prefix_tokens  # one per position
        else:
            num_tokens = config.num_prompts
            self.prompt_layers = frozenset(self.layers)
        width = config.prompt_dim or dim
        bound = prompt_init_bound(backbone, width)
        self.prompt_embeddings = nn.Parameter(torch.empty(num_sets, num_tokens, width).uniform_(-bound, bound))
        self.projection = None
        if config.prompt_dim is not None:
            self.projection = nn.Linear(width, dim)
            nn.init.kaiming_normal_(self.projection.weight, a=0, mode="fan_out")
        self.dropout = nn.Dropout(config.dropout)

    def prompt_set(self, index: int, batch: int) -> Tensor:
        """Block ``index``'s prompts, projected; dropout per sample in training: (B|1, p, d)."""
        prompts = self.prompt_embeddings[self.set_of_layer[index]][None]  # 1, p, k
        if self.projection is not None:
            prompts = self.projection(prompts)
        if self.training and self.dropout.p > 0:
            prompts = self.dropout(prompts.expand(batch, -1, -1))
        return prompts

    def prompts(self, index: int, batch: int) -> Tensor | None:
        return self.prompt_set(index, batch)

    def token_offset(self, index: int) -> Tensor | None:
        if self.config.location != "add" or index not in self.set_of_layer:
            return None
        return self.prompt_set(index, 1)
