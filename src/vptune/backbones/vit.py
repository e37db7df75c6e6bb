"""The timm ``VisionTransformer`` family (ViT, DeiT, DeiT-3, DINOv2, SigLIP, timm's CLIP towers).

We depend only on timm's public surface (``patch_embed``, ``_pos_embed``, ``norm_pre``,
``blocks``, ``norm``, ``forward_head``, ``num_prefix_tokens``) and re-compose its own
submodules through ``vptune.attention``; the model's weights and modules are never changed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..attention import block_forward, block_prompt_keys_values, heads
from .family import AttentionSite, SequenceFamily, architecture, register_family


class TimmFamily(SequenceFamily):
    """What timm's token-sequence models (ViT, Eva, BEiT) share: one width, the patch grid plus
    the prefix tokens as positions, timm's pre-norm blocks, its final norm and ``forward_head``."""

    @property
    def sites(self) -> list[AttentionSite]:
        return [AttentionSite(self.model.embed_dim, *heads(block.attn)) for block in self.blocks]

    def num_positions(self) -> int:
        return self.model.patch_embed.num_patches + self.num_prefix_tokens

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "patch_size": list(self.model.patch_embed.patch_size),
            "num_prefix_tokens": self.num_prefix_tokens,
            "global_pool": self.model.global_pool,
        }

    def prompt_keys_values(self, index: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        return block_prompt_keys_values(self.blocks[index], prompts)

    def pooled_outputs(self) -> int | None:
        """1 (the class token) for token pooling, else None (all tokens)."""
        model = self.model
        token_pool = model.global_pool == "token" and getattr(model, "attn_pool", None) is None
        return 1 if token_pool and getattr(model, "cls_token", None) is not None else None

    def pooled_features(self, x: Tensor) -> Tensor:
        """Final norm and the model's own pooling (token, avg, map) of the prompt-free sequence."""
        return self.model.forward_head(self.model.norm(x), pre_logits=True)


@register_family
class ViTFamily(TimmFamily):
    name = "vit"
    model_class = "timm VisionTransformer"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self) -> None:
        for i, block in enumerate(self.blocks):
            attn = getattr(block, "attn", None)
            # The walk re-composes timm's Block.forward and Attention.forward from their submodules, so a
            # block or attention that computes anything else (even with the same submodules) is refused.
            if getattr(type(block), "forward", None) is not Block.forward or getattr(type(attn), "forward", None) is not Attention.forward:
                raise TypeError(
                    f"block {i} of {architecture(self.model)} is a {type(block).__name__} with "
                    f"{type(attn).__name__ + ' attention' if attn is not None else 'no .attn'}, which vptune does not support; "
                    "supported: timm's pre-norm Block with its fused-qkv Attention (or subclasses that keep their forward)"
                )

    def embed(self, images: Tensor) -> tuple[Tensor, None]:
        model = self.model
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x), None

    def block_forward(self, index, x, aux, extra_k, extra_v, bias, hook, queries, prompts) -> Tensor:
        return block_forward(self.blocks[index], x, extra_k, extra_v, bias, hook, queries)

