"""E2VPT: Effective and Efficient Visual Prompt Tuning (Han et al., ICCV 2023);
docs/methods.md, "E2VPT: key-value prompts and pruning".

Deep visual prompts (VPT-deep, on the key-value path by default) plus, in every block,
key-value prompts appended after the K/V projections directly in per-head space, shape
(h, L_kv, d_h): no LayerNorm, no projection, and no query rows, so the output length is
unchanged. Block i attends over keys [X W_k; K_vis,i; K_kv,i] and values [X W_v; V_vis,i; V_kv,i].
The paper uses separate key and value prompts; ``shared_kv=True`` is the official code's one
tensor used as both. Pruning of the visual prompts lives in ``vptune.pruning``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from .base import Method, MethodConfig, kaiming_uniform, register
from .vpt import VPT, VPTConfig


@register("e2vpt")
@dataclasses.dataclass
class E2VPTConfig(MethodConfig):
    num_prompts: int = 10
    num_kv_prompts: int = 5
    shared_kv: bool = False
    dropout: float = 0.1
    path: str = "kv"
    segments: int = 0  # pruned runs: see VPTConfig
    segment_layout: str = "contiguous"
    kept_segments: tuple[int, ...] | None = None
    swin: str | dict | None = None  # see VPTConfig

    def __post_init__(self) -> None:
        if self.num_kv_prompts < 1:
            raise ValueError(f"num_kv_prompts must be >= 1, got {self.num_kv_prompts}")
        if self.kept_segments is not None:
            self.kept_segments = tuple(int(i) for i in self.kept_segments)
        self.visual_config()  # validates the rest

    def visual_config(self) -> VPTConfig:
        return VPTConfig(
            num_prompts=self.num_prompts, deep=True, dropout=self.dropout, path=self.path,
            segments=self.segments, segment_layout=self.segment_layout, kept_segments=self.kept_segments,
            swin=self.swin,
        )

    def method_name(self) -> str:
        return "e2vpt"

    def build(self, family) -> "E2VPT":
        return E2VPT(self, family)


class E2VPT(Method):
    def __init__(self, config: E2VPTConfig, family) -> None:
        super().__init__()
        self.config = config
        self.visual = VPT(config.visual_config(), family)
        self.path = config.path
        self.prompt_layers = self.visual.prompt_layers
        self.family_options = self.visual.family_options
        # Per site (heads, L_kv, head size): one (L, H, L_kv, Dh) tensor when all sites agree.
        shapes = [(site.num_heads, config.num_kv_prompts, site.head_dim) for site in family.sites]
        for name in ("key_prompts",) if config.shared_kv else ("key_prompts", "value_prompts"):
            self.add_site_parameters(name, shapes, lambda shape: kaiming_uniform(shape[2] * shape[3])(shape))

    def prompts(self, index: int, batch: int) -> Tensor | None:
        return self.visual.prompts(index, batch)

    def prompt_key_bias(self, batch: int) -> Tensor | None:
        return self.visual.prompt_key_bias(batch)

    def set_masks(self, token: Tensor | None = None, segment: Tensor | None = None, **options) -> None:
        """Pruning masks on the visual prompts (see ``VPT.set_masks``)."""
        self.visual.set_masks(token, segment, **options)
        self.kv_cache.clear()

    def kv_prompts(self, index: int) -> tuple[Tensor, Tensor]:
        keys = self.site_parameter("key_prompts", index)
        values = keys if self.config.shared_kv else self.site_parameter("value_prompts", index)
        return keys[None], values[None]  # 1, H, L_kv, Dh each
