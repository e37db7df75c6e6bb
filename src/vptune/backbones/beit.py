"""The timm ``Beit`` family (BEiT, BEiT v2).

Blocks are timm's pre-norm BEiT ``Block``: fused qkv with separate q and v biases, a relative
position bias per block (or one shared by all blocks), optional layer-scale gammas. Prompt
tokens get no position: the relative position bias is padded with zeros for their rows and
columns (and for any extra key), as for the prompts of every other family.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn
from timm.models.beit import Attention as BeitAttention, Beit, Block as BeitBlock

from ..attention import block_forward
from .family import architecture, register_family
from .vit import TimmFamily


def pad_position_bias(bias: Tensor, at: int, count: int) -> Tensor:
    """``bias`` (..., N, N) with ``count`` zero rows and columns inserted at ``at``: positions
    for tokens that have none (prompts)."""
    if count == 0:
        return bias
    bias = torch.cat([bias[..., :at, :], bias.new_zeros(*bias.shape[:-2], count, bias.shape[-1]), bias[..., at:, :]], dim=-2)
    return torch.cat([bias[..., :at], bias.new_zeros(*bias.shape[:-1], count), bias[..., at:]], dim=-1)


@register_family
class BeitFamily(TimmFamily):
    name = "beit"
    model_class = "timm Beit"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, Beit)

    def check(self) -> None:
        for i, block in enumerate(self.blocks):
            if type(block).forward is not BeitBlock.forward or type(block.attn).forward is not BeitAttention.forward:
                raise TypeError(
                    f"block {i} of {architecture(self.model)} is a {type(block).__name__} with {type(block.attn).__name__}: "
                    "vptune walks Beit models built of timm's BEiT Block and Attention"
                )

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the class token

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tokens ``[CLS, patches]`` and the shared relative position bias, if the model has one."""
        model = self.model
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        x = model.pos_drop(x)
        return x, model.rel_pos_bias() if model.rel_pos_bias is not None else None

    def position_bias(self, index: int, shared: Tensor | None, prompts: int) -> Tensor | None:
        """Block ``index``'s relative position bias (1, H, N+p, N+p), zero for the prompts."""
        attn = self.blocks[index].attn
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        if shared is not None:
            bias = shared if bias is None else bias + shared
        return None if bias is None else pad_position_bias(bias.view(1, *bias.shape[-3:]), 1, prompts)

    def block_forward(self, index, x, aux, extra_k, extra_v, bias, hook, queries, prompts) -> Tensor:
        position_bias = self.position_bias(index, aux, prompts)
        return block_forward(self.blocks[index], x, extra_k, extra_v, bias, hook, queries, position_bias=position_bias)

    def pooled_outputs(self) -> int | None:
        return 1 if self.model.global_pool == "token" else None
