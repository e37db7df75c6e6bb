"""How to walk a timm ``VisionTransformer`` with a method's prompts.

We depend only on timm's public surface (``patch_embed``, ``_pos_embed``, ``norm_pre``,
``blocks``, ``norm``, ``forward_head``, ``num_prefix_tokens``) and re-compose its own
submodules; the backbone's weights and modules are never changed.

The walk keeps prompt tokens *beside* the patch sequence, never in it, so pooling can never
see them. Before block i in ``method.prompt_layers`` fresh prompts overwrite the slot; a
block whose prompt outputs are discarded (the next block overwrites them, or it is the last)
takes them as keys/values only on the "kv" path; otherwise they go through the block with
the other tokens and their outputs are carried on (VPT-shallow, or prompts in a subset of
layers).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..attention import block_forward, prompt_keys_values
from ..methods.base import Method


def check_backbone(backbone: nn.Module) -> None:
    """Refuse, with the reason, a model whose structure the walk does not know."""
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(
            f"{type(backbone).__name__} is not supported: vptune wraps timm VisionTransformer-family "
            "models (timm.models.vision_transformer.VisionTransformer and its subclasses)"
        )
    for i, block in enumerate(backbone.blocks):
        attn = getattr(block, "attn", None)
        # The walk re-composes timm's Block.forward and Attention.forward from their submodules, so a
        # block or attention that computes anything else (even with the same submodules) is refused.
        if getattr(type(block), "forward", None) is not Block.forward or getattr(type(attn), "forward", None) is not Attention.forward:
            raise TypeError(
                f"block {i} of {architecture(backbone)} is a {type(block).__name__} with "
                f"{type(attn).__name__ + ' attention' if attn is not None else 'no .attn'}, which vptune does not support; "
                "supported: timm's pre-norm Block with its fused-qkv Attention (or subclasses that keep their forward)"
            )


def architecture(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(backbone).__name__


def describe(backbone: VisionTransformer) -> dict:
    """What a saved run must match to be loaded on this backbone."""
    attn = backbone.blocks[0].attn
    return {
        "architecture": architecture(backbone),
        "embed_dim": backbone.embed_dim,
        "depth": len(backbone.blocks),
        "num_heads": attn.num_heads,
        "head_dim": attn.head_dim,
        "patch_size": list(backbone.patch_embed.patch_size),
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "global_pool": backbone.global_pool,
    }


def weights_fingerprint(backbone: nn.Module) -> str:
    """A short hash of the patch embedding, to notice a run trained on other weights."""
    weight = backbone.patch_embed.proj.weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


def num_backbone_parameters(backbone: VisionTransformer) -> int:
    """Parameters of the backbone without its own classifier (vptune never uses it)."""
    head_ids = {id(p) for p in backbone.head.parameters()}
    return sum(p.numel() for p in backbone.parameters() if id(p) not in head_ids)


def num_patch_tokens(backbone: VisionTransformer) -> int:
    return backbone.patch_embed.num_patches


def embed(backbone: VisionTransformer, images: Tensor) -> Tensor:
    """Images (B, C, H, W) to the token sequence (B, N, d) entering block 0."""
    x = backbone.patch_embed(images)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    return backbone.norm_pre(x)


def pooled_outputs(backbone: VisionTransformer) -> int | None:
    """How many leading tokens of the last block pooling reads: 1 (the class token) for token
    pooling, else None (all of them)."""
    token_pool = backbone.global_pool == "token" and getattr(backbone, "attn_pool", None) is None
    return 1 if token_pool and getattr(backbone, "cls_token", None) is not None else None


def frozen_features(backbone: VisionTransformer, images: Tensor) -> Tensor:
    """The frozen backbone's pooled features, computed as a PromptModel computes them but with no
    method: the reference that a method's extra cost is measured against."""
    x = run_blocks(backbone, embed(backbone, images), Method(), outputs=pooled_outputs(backbone))
    return pooled_features(backbone, x)


def pooled_features(backbone: VisionTransformer, x: Tensor) -> Tensor:
    """Final norm and the backbone's own pooling (token, avg, map) of the prompt-free sequence."""
    return backbone.forward_head(backbone.norm(x), pre_logits=True)


def _key_bias(prompt_bias: Tensor | None, before: int, after: int) -> Tensor | None:
    """Attention mask (B|1, 1, 1, before+p+after): ``prompt_bias`` on the prompt keys, 0 elsewhere."""
    if prompt_bias is None:
        return None
    zeros = prompt_bias.new_zeros
    n = prompt_bias.shape[0]
    return torch.cat([zeros(n, before), prompt_bias, zeros(n, after)], dim=1)[:, None, None, :]


def _autocast_state(device: torch.device) -> tuple:
    kind = device.type
    return (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cpu", "cuda") else ()


def _recomputed_block_forward(*args) -> Tensor:
    """``block_forward`` that stores only its inputs and recomputes the rest during backward."""
    return recompute(block_forward, *args, use_reentrant=False)


def run_blocks(
    backbone: VisionTransformer, x: Tensor, method: Method, checkpoint: bool = False, outputs: int | None = None
) -> Tensor:
    """Every block of ``backbone`` over ``x`` (B, N, d), with ``method``'s prompts, key-value
    prompts and attention hooks. Returns the prompt-free sequence (B, N, d). ``checkpoint``
    recomputes each block in backward (gradient checkpointing) when gradients are recorded.
    ``outputs`` (at most the prefix tokens) keeps only the first ``outputs`` tokens of the last
    block, computing no other query, output projection or MLP row there: (B, outputs, d)."""
    blocks, prefix = backbone.blocks, backbone.num_prefix_tokens
    batch, depth = x.shape[0], len(blocks)
    layers = method.prompt_layers
    prompt_bias = method.prompt_key_bias(batch)
    # Prompt keys/values are input-independent, and so cacheable, at inference without dropout.
    cache_ok = not method.training and not torch.is_grad_enabled()
    forward = _recomputed_block_forward if checkpoint and torch.is_grad_enabled() else block_forward
    carried: Tensor | None = None  # prompt tokens (B|1, p, d) in the prompt slot
    for i, block in enumerate(blocks):
        offset = method.token_offset(i)
        if offset is not None:
            if offset.shape[1] != x.shape[1]:
                raise ValueError(
                    f"'add' prompts are tied to the {offset.shape[1]}-token sequence they were made for; "
                    f"these images give {x.shape[1]} tokens: use the image size the model was built with"
                )
            x = x + offset
        fresh = i in layers
        if fresh:
            carried = method.prompts(i, batch)
        kv = method.kv_prompts(i)
        hook = method.attention_output(i)
        queries = outputs if i + 1 == depth else None
        if carried is None:
            k, v = kv if kv is not None else (None, None)
            x = forward(block, x, k, v, None, hook, queries)
        elif method.path == "kv" and (i + 1 == depth or i + 1 in layers):
            if cache_ok and fresh and carried.shape[0] == 1:
                key = (i, carried.device, carried.dtype, _autocast_state(carried.device))
                hit = method.kv_cache.get(key)
                # Valid while the prompts entering the block are the same values (an optimizer step,
                # a load or a ``.data`` edit changes them; a version counter misses the last).
                if hit is None or not torch.equal(hit[0], carried):
                    hit = method.kv_cache[key] = (carried.clone(), prompt_keys_values(block, carried))
                k, v = hit[1]
            else:
                k, v = prompt_keys_values(block, carried)
            if kv is not None:
                n = k.shape[0]
                k = torch.cat([k, kv[0].to(k.dtype).expand(n, -1, -1, -1)], dim=2)  # B|1, H, p+m, Dh
                v = torch.cat([v, kv[1].to(v.dtype).expand(n, -1, -1, -1)], dim=2)
            extra = 0 if kv is None else kv[0].shape[2]
            bias = _key_bias(prompt_bias, x.shape[1], extra)
            x = forward(block, x, k, v, bias, hook, queries)
            carried = None
        else:
            p = carried.shape[1]
            seq = torch.cat([x[:, :prefix], carried.expand(batch, -1, -1), x[:, prefix:]], dim=1)  # B, N+p, d
            extra = 0 if kv is None else kv[0].shape[2]
            bias = _key_bias(prompt_bias, prefix, x.shape[1] - prefix + extra)
            k, v = kv if kv is not None else (None, None)
            seq = forward(block, seq, k, v, bias, hook, queries)
            x = torch.cat([seq[:, :prefix], seq[:, prefix + p :]], dim=1)
            carried = seq[:, prefix : prefix + p]
    return x
