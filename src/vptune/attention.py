"""The one mechanism every prompt method rests on: a frozen attention layer that attends over
extra keys and values, with an optional additive bias on the keys, and whose output a method
may rewrite (APT).

Everything here re-composes a timm attention module's own frozen submodules (``qkv`` or
``q_proj``/``k_proj``/``v_proj``, the separate ``q_bias``/``v_bias`` of BEiT and EVA, ``q_norm``,
``k_norm``, ``norm``, ``gate``, ``proj``), or those of a ``torch.nn.MultiheadAttention``
(``in_proj_weight``/``in_proj_bias``, ``out_proj``: open_clip's towers); nothing of timm or
open_clip is copied or patched. The same function serves every family (ViT, Eva, BEiT, Swin
windows, open_clip); a family only says where positions apply (rotary embedding, relative
position bias) and which tokens are prompts.

- ``attend`` is timm's attention forward with keys/values appended after the projections:
  VPT-deep prompt keys (the exact key-value path), E2VPT key-value prompts, or both.
- ``prompt_keys_values`` computes what prompt tokens contribute to an attention layer,
  ``K = k_norm(x W_k + b_k)``, ``V = x W_v + b_v`` for the layer's input ``x`` (LN1 of the
  prompts), skipping their query rows, output projection and MLP: those outputs are
  discarded in VPT-deep anyway (docs/methods.md, "The exact key-value path").
- Prompts get no position: no rotary embedding, zero relative-position bias.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionOutputHook = Callable[[Tensor, Tensor], Tensor]


def _separate_bias(attn: nn.Module) -> Tensor | None:
    """BEiT's and EVA's q and v biases beside a bias-free fused ``qkv`` (k has none)."""
    if getattr(attn, "q_bias", None) is None:
        return None
    k_bias = attn.k_bias if getattr(attn, "k_bias", None) is not None else torch.zeros_like(attn.q_bias)
    return torch.cat([attn.q_bias, k_bias, attn.v_bias])


def _in_proj(attn: nn.Module, x: Tensor) -> Tensor:
    """A ``nn.MultiheadAttention``'s packed input projection, plus peft's LoRA update when peft
    adapted the layer (its ``lora.MultiheadAttention`` only acts inside its own forward, which
    merges the update into the weight; here the same update is added as ``B(A(x)) * scaling``)."""
    out = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    lora_a = getattr(attn, "lora_A", None)
    if lora_a is not None and not attn.disable_adapters and not attn.merged:
        for name in attn.active_adapters:
            if name in lora_a:
                out = out + attn.lora_B[name](lora_a[name](attn.lora_dropout[name](x))) * attn.scaling[name]
    return out


def project_qkv(attn: nn.Module, x: Tensor) -> Tensor:
    """``[x W_q + b_q, x W_k + b_k, x W_v + b_v]`` (B, N, 3D) through the attention's own
    projection modules (so that LoRA, injected into them, acts)."""
    if getattr(attn, "in_proj_weight", None) is not None:
        return _in_proj(attn, x)
    if getattr(attn, "qkv", None) is not None:
        qkv = attn.qkv(x)
        bias = _separate_bias(attn)
        return qkv if bias is None else qkv + bias
    return torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)


def project_kv(attn: nn.Module, x: Tensor) -> Tensor:
    """``[x W_k + b_k, x W_v + b_v]`` (B, N, 2D) only, for tokens whose queries nobody reads."""
    weight = getattr(attn, "in_proj_weight", None)
    if weight is not None:
        D = weight.shape[0] // 3
        if getattr(attn, "lora_A", None) is not None:  # adapted by peft
            return _in_proj(attn, x)[..., D:]
        bias = attn.in_proj_bias
        return F.linear(x, weight[D:], None if bias is None else bias[D:])
    qkv = getattr(attn, "qkv", None)
    if type(qkv) is not nn.Linear:  # separate projections, or an adapted (LoRA) module
        if qkv is None:
            return torch.cat([attn.k_proj(x), attn.v_proj(x)], dim=-1)
        return project_qkv(attn, x)[..., qkv.out_features // 3 :]
    D = qkv.out_features // 3
    bias = _separate_bias(attn)
    bias = qkv.bias if bias is None else bias
    return F.linear(x, qkv.weight[D:], None if bias is None else bias[D:])


def project_q(attn: nn.Module, x: Tensor) -> Tensor:
    """``x W_q + b_q`` (B, N, D) only: the queries of a cross-attention, whose keys and values
    come from another sequence."""
    if getattr(attn, "in_proj_weight", None) is not None or getattr(attn, "qkv", None) is not None:
        qkv = project_qkv(attn, x)
        return qkv[..., : qkv.shape[-1] // 3]
    return attn.q_proj(x)


def _norm(attn: nn.Module, name: str, x: Tensor) -> Tensor:
    """The attention's optional norm ``name`` (q_norm, k_norm, the output's scale norm)."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def heads(attn: nn.Module) -> tuple[int, int]:
    """(heads, head size) of a timm attention module."""
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:  # BEiT keeps only the fused projection's width
        head_dim = attn.qkv.out_features // 3 // attn.num_heads
    return attn.num_heads, head_dim


def _rotated(t: Tensor, rope: Tensor | None, start: int, half: bool) -> list[Tensor]:
    """Rotary position embedding on tokens ``start:`` of ``t`` (B, H, N, Dh), as the pieces to
    concatenate along the tokens; the first ``start`` tokens (prefix and prompt tokens) have no
    position. Pieces, so that keys with extra keys appended are copied once, not twice."""
    if rope is None:
        return [t]
    from timm.layers import apply_rot_embed_cat

    return [t[:, :, :start], apply_rot_embed_cat(t[:, :, start:], rope, half=half).type_as(t)]


def _rotate(t: Tensor, rope: Tensor | None, start: int, half: bool) -> Tensor:
    """``_rotated`` as one tensor (B, H, N, Dh)."""
    pieces = _rotated(t, rope, start, half)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


# The CPU fused attention kernel (fp32, torch 2.13) handles the last ``keys % 16`` keys of a row
# with scalar code: 49 keys per Swin window take 4.8 ms, 59 take 8.6 ms and 64 take 5.5 ms
# (256 windows, 3 heads, 1 thread). With ``align_keys`` (Swin's windows, where a window's few keys
# make that tail a large share), when extra keys are appended, and so the keys copied anyway, zero
# keys masked with -inf are appended too, up to a multiple of 16, where that is faster (a remainder
# above 2). The masked keys change no output and get no gradient; they are computed, so FLOP
# counts include them. Long sequences (ViT: 197 + 50 keys) gain less (about 7% of the attention
# kernel) and are left unpadded, so that their FLOPs stay the model's own.
KEY_BLOCK = 16


def key_count(tokens: int, extra: int, device: torch.device | str, align: bool = True) -> int:
    """Keys ``attend`` attends over for ``tokens`` tokens and ``extra`` extra keys: with ``align``,
    extra keys and the CPU, padded up to a multiple of ``KEY_BLOCK`` when the remainder is above 2."""
    keys = tokens + extra
    if not align or extra == 0 or torch.device(device).type != "cpu" or keys % KEY_BLOCK <= 2:
        return keys
    return keys + (-keys) % KEY_BLOCK


def pad_keys(mask: Tensor, keys: int, masked: int) -> Tensor:
    """``mask`` (..., K') widened to ``keys`` columns: zeros (extra keys have no position or
    bias), the last ``masked`` of them ``-inf`` (padding keys, removed exactly)."""
    width = keys - mask.shape[-1]
    if width == 0:
        return mask
    tail = mask.new_zeros(width)
    if masked:
        tail[width - masked :] = float("-inf")
    return torch.cat([mask, tail.expand(*mask.shape[:-1], width)], dim=-1)


def attend(
    attn: nn.Module,
    x: Tensor,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    key_bias: Tensor | None = None,
    queries: int | None = None,
    *,
    rope: Tensor | None = None,
    rope_from: int = 0,
    position_bias: Tensor | None = None,
    context: Tensor | None = None,
    align_keys: bool = False,
) -> Tensor:
    """Self-attention of ``x`` (B, N, d) (cross-attention with ``context`` (B, M, dc): queries
    from ``x``, keys and values from ``context``; no positions then), plus ``extra_k``/``extra_v`` (B|1, H, M, Dh) as
    additional keys and values. ``key_bias`` (B|1, 1, 1, N+M) is added to the attention logits:
    a log-mask, where ``-inf`` removes a key exactly. ``rope`` rotates tokens ``rope_from:``;
    ``position_bias`` (B|1|nW, H, N, N) is the family's own position bias over ``x`` (zero for
    prompt rows and columns), or already widened to ``key_count(N, M)`` keys by ``pad_keys``
    (``align_keys``: padding keys for the CPU kernel, see ``KEY_BLOCK``). With ``queries`` only the first ``queries`` tokens attend, and only
    their outputs (B, queries, d) are computed."""
    B, N, _ = x.shape
    H, Dh = heads(attn)
    n = N if queries is None else min(queries, N)
    gate = attn.gate(x[:, :n]).sigmoid() if getattr(attn, "gate", None) is not None else None
    # Unbound on the q/k/v axis, backward stacks the three gradients straight into the layout
    # the projection's backward reads (one copy; permuting first would cost a second).
    if context is None:
        qkv = project_qkv(attn, x).reshape(B, N, 3, H, Dh).unbind(2)  # 3 x (B, N, H, Dh)
        q, k, v = (t.transpose(1, 2) for t in qkv)  # 3 x (B, H, N, Dh)
    else:
        if rope is not None or position_bias is not None:
            raise ValueError("cross-attention (context) takes no rotary embedding or position bias")
        q = project_q(attn, x[:, :n]).reshape(B, n, H, Dh).transpose(1, 2)  # B, H, n, Dh
        kv = project_kv(attn, context).reshape(B, context.shape[1], 2, H, Dh).unbind(2)
        k, v = (t.transpose(1, 2) for t in kv)  # 2 x (B, H, M, Dh)
    half = bool(getattr(attn, "rotate_half", False))
    q = _norm(attn, "q_norm", q[:, :, :n])
    keys = _rotated(_norm(attn, "k_norm", k), rope, rope_from, half)
    if rope is not None and n > rope_from:
        q = _rotate(q, rope.narrow(-2, 0, n - rope_from), rope_from, half)
    mask = None if position_bias is None else position_bias[..., :n, :]
    if extra_k is None:
        k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
    else:
        T, M = v.shape[2], extra_k.shape[2]  # keys of x (or of the context), extra keys
        K = key_count(T, M, x.device, align_keys)
        pad = K - T - M
        k, padding = keys[-1], (B, H, pad, Dh)
        k = torch.cat([*keys, extra_k.to(k.dtype).expand(B, -1, -1, -1), k.new_zeros(1, 1, 1, 1).expand(padding)], dim=2)  # B, H, K, Dh
        v = torch.cat([v, extra_v.to(v.dtype).expand(B, -1, -1, -1), v.new_zeros(1, 1, 1, 1).expand(padding)], dim=2)
        if mask is not None:
            mask = pad_keys(mask, K, pad)  # extra keys have no position; padding keys are masked out
        if key_bias is not None:
            key_bias = pad_keys(key_bias, K, 0 if mask is not None else pad)
        elif mask is None and pad:
            mask = pad_keys(q.new_zeros(1, 1, 1, 0), K, pad)
        if torch.is_grad_enabled():
            q = q.contiguous()  # a view would keep the whole fused qkv output alive for backward
    if key_bias is not None:
        mask = key_bias if mask is None else mask + key_bias
    if mask is not None:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=_dropout(attn))
    out = out.transpose(1, 2).reshape(B, n, H * Dh)
    out = _norm(attn, "norm", out)
    if gate is not None:
        out = out * gate
    if getattr(attn, "in_proj_weight", None) is not None:  # nn.MultiheadAttention
        # peft's LoRA wrapper answers ``out_proj`` with the plain Linear; its adapted one is on the base layer.
        base = attn.get_base_layer() if hasattr(attn, "get_base_layer") else attn
        return base.out_proj(out)
    return attn.proj_drop(attn.proj(out))


def _dropout(attn: nn.Module) -> float:
    """Attention-probability dropout while training: timm's ``attn_drop``, torch's ``dropout``."""
    if not attn.training:
        return 0.0
    drop = getattr(attn, "attn_drop", None)
    return drop.p if drop is not None else float(attn.dropout)


def prompt_keys_values(attn: nn.Module, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values (B|1, H, p, Dh) that prompt tokens (B|1, p, d), already normalised as
    the layer's input, contribute to ``attn``: its frozen K/V projections and k-norm, no
    position, no query, output projection or MLP."""
    B, p, _ = prompts.shape
    H, Dh = heads(attn)
    kv = project_kv(attn, prompts)  # B, p, 2D
    k, v = kv.reshape(B, p, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, p, Dh)
    return _norm(attn, "k_norm", k), v


def _part(block: nn.Module, timm_name: str, open_clip_name: str) -> nn.Module:
    """A block's submodule under timm's name (``norm1``) or open_clip's (``ln_1``)."""
    module = getattr(block, timm_name, None)
    return module if module is not None else getattr(block, open_clip_name)


def _drop_path(block: nn.Module, which: int, x: Tensor) -> Tensor:
    """timm's stochastic depth on branch ``which``; open_clip's blocks have none."""
    module = getattr(block, f"drop_path{which}", None)
    return x if module is None else module(x)


def layer_scale(block: nn.Module, which: int, x: Tensor) -> Tensor:
    """The block's layer scale on branch ``which`` (1: attention, 2: MLP): timm's ``ls1``/``ls2``
    or open_clip's ``ls_1``/``ls_2`` modules, or ``gamma_1``/``gamma_2`` tensors (BEiT, EVA), or none."""
    module = getattr(block, f"ls{which}", None)
    if module is None:
        module = getattr(block, f"ls_{which}", None)
    if module is not None:
        return module(x)
    gamma = getattr(block, f"gamma_{which}", None)
    return x if gamma is None else gamma * x


def block_forward(
    block: nn.Module,
    x: Tensor,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    key_bias: Tensor | None = None,
    attention_output: AttentionOutputHook | None = None,
    queries: int | None = None,
    **positions,
) -> Tensor:
    """A pre-norm block (timm's, or open_clip's ``ResidualAttentionBlock``) with extra keys/values; ``attention_output(u, a)`` may rewrite the
    attention output ``a`` given the attention input ``u = LN1(x)`` (APT). With ``queries``, only
    the first ``queries`` tokens' outputs are computed (every token still gives keys and values):
    a last block whose other outputs nobody reads. ``positions`` go to ``attend``."""
    u = _part(block, "norm1", "ln_1")(x)
    a = attend(block.attn, u, extra_k, extra_v, key_bias, queries, **positions)
    if queries is not None:
        u, x = u[:, :queries], x[:, :queries]
    if attention_output is not None:
        a = attention_output(u, a)
    x = x + _drop_path(block, 1, layer_scale(block, 1, a))
    return x + _drop_path(block, 2, layer_scale(block, 2, block.mlp(_part(block, "norm2", "ln_2")(x))))


def block_prompt_keys_values(block: nn.Module, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """``prompt_keys_values`` of a pre-norm block: the prompts go through its LN1 first."""
    return prompt_keys_values(block.attn, _part(block, "norm1", "ln_1")(prompts))
