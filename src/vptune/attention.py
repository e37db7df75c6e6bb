"""The one mechanism every prompt method rests on: a frozen timm attention layer that
attends over extra keys and values, with an optional additive bias on the keys.

Everything here re-composes the attention module's own frozen submodules (``qkv``,
``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``); nothing of timm is copied or patched.

- ``attend`` is timm's ``Attention.forward`` with keys/values appended after the
  projections: VPT-deep prompt keys (the fast path), E2VPT key-value prompts, or both.
- ``prompt_keys_values`` computes what a prompt token contributes to a block's attention,
  ``K = k_norm(LN1(P) W_k + b_k)``, ``V = LN1(P) W_v + b_v``, skipping its query row,
  output projection and MLP: those outputs are discarded in VPT-deep anyway.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionOutputHook = Callable[[Tensor, Tensor], Tensor]


def attend(
    attn: nn.Module,
    x: Tensor,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    key_bias: Tensor | None = None,
    queries: int | None = None,
) -> Tensor:
    """Self-attention of ``x`` (B, N, d), plus ``extra_k``/``extra_v`` (B|1, H, M, Dh) as
    additional keys and values. ``key_bias`` (B|1, 1, 1, N+M) is added to the attention
    logits: a log-mask, where ``-inf`` removes a key exactly. With ``queries`` only the first
    ``queries`` tokens attend, and only their outputs (B, queries, d) are computed."""
    B, N, _ = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    n = N if queries is None else min(queries, N)
    gate = attn.gate(x[:, :n]).sigmoid() if getattr(attn, "gate", None) is not None else None
    # Unbound on the q/k/v axis, backward stacks the three gradients straight into the layout
    # the projection's backward reads (one copy; permuting first would cost a second).
    qkv = attn.qkv(x).reshape(B, N, 3, H, Dh).unbind(2)  # 3 x (B, N, H, Dh)
    q, k, v = (t.transpose(1, 2) for t in qkv)  # 3 x (B, H, N, Dh)
    q, k = attn.q_norm(q[:, :, :n]), attn.k_norm(k)  # q: B, H, n, Dh
    if extra_k is not None:
        k = torch.cat([k, extra_k.to(k.dtype).expand(B, -1, -1, -1)], dim=2)  # B, H, N+M, Dh
        v = torch.cat([v, extra_v.to(v.dtype).expand(B, -1, -1, -1)], dim=2)
        if torch.is_grad_enabled():
            q = q.contiguous()  # a view would keep the whole fused qkv output alive for backward
    if key_bias is not None:
        key_bias = key_bias.to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(B, n, H * Dh)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def prompt_keys_values(block: nn.Module, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values (B|1, H, p, Dh) that prompt tokens (B|1, p, d) contribute to ``block``,
    through its frozen LN1, K/V projections and k-norm; no query, output projection or MLP."""
    attn = block.attn
    B, p, _ = prompts.shape
    H, Dh = attn.num_heads, attn.head_dim
    D = H * Dh
    weight, bias = attn.qkv.weight, attn.qkv.bias
    kv = F.linear(block.norm1(prompts), weight[D:], None if bias is None else bias[D:])  # B, p, 2D
    k, v = kv.reshape(B, p, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, p, Dh)
    return attn.k_norm(k), v


def block_forward(
    block: nn.Module,
    x: Tensor,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    key_bias: Tensor | None = None,
    attention_output: AttentionOutputHook | None = None,
    queries: int | None = None,
) -> Tensor:
    """A timm pre-norm ``Block`` with extra keys/values; ``attention_output(u, a)`` may
    rewrite the attention output ``a`` given the attention input ``u = LN1(x)`` (APT).
    With ``queries``, only the first ``queries`` tokens' outputs are computed (every token
    still gives keys and values): a last block whose other outputs nobody reads."""
    u = block.norm1(x)
    a = attend(block.attn, u, extra_k, extra_v, key_bias, queries)
    if queries is not None:
        u, x = u[:, :queries], x[:, :queries]
    if attention_output is not None:
        a = attention_output(u, a)
    x = x + block.drop_path1(block.ls1(a))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
