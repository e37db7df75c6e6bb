"""The timm ``Eva`` family: EVA-02, DINOv3 and timm's RoPE ViTs (``vit_*_rope_*``).

Blocks are timm's pre-norm ``EvaBlock`` with ``EvaAttention`` or ``AttentionRope``: rotary
position embeddings on the patch tokens, none on the prefix tokens (class, registers). Prompt
tokens get no rotary position either, like the prefix tokens: in the tokens path they sit
right after the prefix and the rotation starts after them; on the key-value path their keys
are computed without rotation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock

from ..attention import block_forward
from .family import architecture, register_family
from .vit import TimmFamily


@register_family
class EvaFamily(TimmFamily):
    name = "eva"
    model_class = "timm Eva (EVA-02, DINOv3, RoPE ViTs)"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def check(self) -> None:
        for i, block in enumerate(self.blocks):
            attn = getattr(block, "attn", None)
            if type(block).forward is not EvaBlock.forward or type(attn).forward not in (EvaAttention.forward, AttentionRope.forward):
                raise TypeError(
                    f"block {i} of {architecture(self.model)} is a {type(block).__name__} with {type(attn).__name__}: "
                    "vptune walks Eva models built of pre-norm EvaBlock with EvaAttention or AttentionRope "
                    "(EvaBlockPostNorm is not supported)"
                )
            if getattr(attn, "num_kv_groups", 1) != 1:
                raise TypeError(
                    f"block {i} of {architecture(self.model)} uses grouped-query attention "
                    f"({attn.num_heads} query heads, {attn.num_kv_heads} key/value heads), which vptune does not support"
                )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rope": type(self.model.rope).__name__ if self.model.rope is not None else None}

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tokens and the rotary embedding of the patch positions (per block in 'mixed' mode)."""
        model = self.model
        x, rope = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(x), rope

    def _rope(self, rope: Tensor | None, index: int) -> Tensor | None:
        return rope[index] if rope is not None and getattr(self.model, "rope_mixed", False) else rope

    def block_forward(self, index, x, aux, extra_k, extra_v, bias, hook, queries, prompts) -> Tensor:
        return block_forward(
            self.blocks[index], x, extra_k, extra_v, bias, hook, queries,
            rope=self._rope(aux, index), rope_from=self.num_prefix_tokens + prompts,
        )

