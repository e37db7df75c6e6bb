"""The timm ``SwinTransformer`` family (Swin v1, the VPT and E2VPT papers' second backbone).

Stages of blocks attend in local windows of an (H, W) token grid; patch merging halves the grid
and doubles the width between stages, so stage s has width C*2^s and each block is one
attention site of kind "window". The walk re-composes timm's own submodules (``norm1``, the
window attention's ``qkv``/``proj`` and relative-position table through ``vptune.attention``,
``norm2``, ``mlp``, ``PatchMerging``) with timm's ``window_partition``/``window_reverse``, the
cyclic shift and its mask (README, "Where the official code differs from the paper"):

- Prompts (B|1, p, C) are copied into every window of every image and prepended to the
  window's tokens; the relative-position bias and the shifted-window mask get zero rows and
  columns for them, so prompts attend and are attended to freely in every window. Key-value
  prompts (E2VPT) and VPT-deep prompt keys are extra keys of every window.
- Prompt outputs that go on (shallow, a ``layers`` subset): every window keeps its own copy
  (``windows="each"``, default) or they are averaged over the windows (``"mean"``, official
  code). At a patch merging they are dropped (``merge="drop"``, the paper: "ignored during
  patch merging") or tiled 4x along the channels through the merging's norm and reduction
  (``"tile"``, official). The final average pool ignores them (``pool=False``) or includes
  their window average (``True``, official). Options: ``vptune.family_options``.
- The exact key-value path: a block whose prompt outputs nobody reads gets the prompts' keys
  and values only, computed once per block (not per window) and cached at inference.
- APT's hook gets, per window, ``u`` = LN1 of the window's tokens (padding included) and the
  window attention output; APT acts per token, so windows do not change what it computes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
    window_partition,
    window_reverse,
)

from ..attention import attend, heads, key_count, pad_keys, prompt_keys_values
from ..family_options import swin_options
from ..methods.base import Method
from .beit import pad_position_bias
from .family import AttentionSite, Family, architecture, cached_prompt_keys_values, key_bias, register_family


def per_window(t: Tensor | None, windows: int) -> Tensor | None:
    """A per-image tensor (B|1, ...) for the window batch (B*nW|1, ...): window_partition orders
    windows image by image, so image b's windows are rows b*nW .. b*nW+nW-1."""
    if t is None or t.shape[0] == 1 or windows == 1:
        return t
    return t.repeat_interleave(windows, dim=0)


@register_family
class SwinFamily(Family):
    name = "swin"
    model_class = "timm SwinTransformer"
    add_location = False
    final_prefixes = ("norm.",)

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return isinstance(model, (SwinTransformer, SwinTransformerV2))

    def check(self) -> None:
        if not isinstance(self.model, SwinTransformer):
            raise TypeError(
                f"{architecture(self.model)} is a Swin v2 (timm SwinTransformerV2), which vptune does not support yet: its "
                "attention is cosine similarity with a learned per-head scale and a continuous position bias from an MLP, "
                "and its blocks normalise after attention and MLP (post-norm), none of which the scaled-dot-product "
                "re-composition vptune uses for every other family computes; use a Swin v1 (timm SwinTransformer, "
                "e.g. swin_tiny_patch4_window7_224, the papers' Swin)"
            )
        for s, stage in enumerate(self.model.layers):
            merge = stage.downsample
            if type(stage) is not SwinTransformerStage or not isinstance(merge, (PatchMerging, nn.Identity)) or (
                isinstance(merge, PatchMerging) and type(merge).forward is not PatchMerging.forward
            ):
                raise TypeError(
                    f"stage {s} of {architecture(self.model)} is a {type(stage).__name__} with a {type(merge).__name__}: "
                    "vptune walks timm's SwinTransformerStage with its PatchMerging"
                )
            for b, block in enumerate(stage.blocks):
                if type(block).forward is not SwinTransformerBlock.forward or type(block.attn).forward is not WindowAttention.forward:
                    raise TypeError(
                        f"block {b} of stage {s} of {architecture(self.model)} is a {type(block).__name__} with "
                        f"{type(block.attn).__name__}: vptune walks timm's SwinTransformerBlock and WindowAttention"
                    )

    # --- description ------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.model.layers for block in stage.blocks]

    @property
    def stage_of(self) -> list[int]:
        return [s for s, stage in enumerate(self.model.layers) for _ in stage.blocks]

    @property
    def sites(self) -> list[AttentionSite]:
        return [AttentionSite(block.dim, *heads(block.attn), kind="window") for block in self.blocks]

    def num_positions(self) -> int:
        raise ValueError(
            f"location='add' is not possible on Swin ({architecture(self.model)}): its token grid and width change at "
            "every patch merging; use location='prepend'"
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "patch_size": list(self.model.patch_embed.patch_size),
            "depths": [len(stage.blocks) for stage in self.model.layers],
            "window_sizes": [list(stage.blocks[0].attn.window_size) for stage in self.model.layers],
            "global_pool": self.model.global_pool,
        }

    def block_prefixes(self) -> list[str]:
        return [f"layers.{s}.blocks.{b}." for s, stage in enumerate(self.model.layers) for b in range(len(stage.blocks))]

    def lora_pattern(self, targets: tuple[str, ...]) -> str:
        return rf"layers\.\d+\.blocks\.\d+\.attn\.({'|'.join(targets)})"

    # --- the walk ---------------------------------------------------------------------------
    def embed(self, images: Tensor) -> tuple[Tensor, None]:
        """Images to the (B, H, W, C) patch grid, refusing a size the model's windows cannot take."""
        embed = self.model.patch_embed
        size, patch = tuple(images.shape[-2:]), tuple(embed.patch_size)
        if getattr(embed, "strict_img_size", True) and size != tuple(embed.img_size):
            want = "x".join(map(str, embed.img_size))
            raise ValueError(
                f"{architecture(self.model)} takes {want} images (its windows and shift masks are built for that grid); "
                f"got {size[0]}x{size[1]}: resize the images to {want}"
            )
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ValueError(
                f"{architecture(self.model)} cuts images into {patch[0]}x{patch[1]} patches; got {size[0]}x{size[1]}: "
                f"use a size that is a multiple of {patch[0]}"
            )
        return embed(images), None

    def options(self, method: Method) -> dict[str, Any]:
        return method.family_options.get("swin") or swin_options(None)

    def position_bias(self, block: nn.Module, mask: Tensor | None, prompts: int, batch: int, extra: int = 0) -> Tensor:
        """The block's relative-position bias plus its shift mask over ``prompts + window`` queries
        and the keys ``attend`` will use (``prompts + window``, then ``extra`` extra keys and the
        kernel's padding keys: ``attention.key_count``, ``align_keys``), zero for prompts and extra keys: (1, H, L, K)
        unshifted, (B*nW, H, L, K) shifted. Padded per window before the copy for every image."""
        bias = block.attn._get_rel_pos_bias()  # 1, H, N, N
        if mask is not None:  # nW, N, N: -100 between tokens that were not neighbours before the shift
            bias = bias + mask[:, None].to(bias.dtype)  # nW, H, N, N
        tokens = bias.shape[-1] + prompts
        keys = key_count(tokens, extra, bias.device, align=True)
        bias = pad_keys(pad_position_bias(bias, 0, prompts), keys, keys - tokens - extra)
        if mask is not None:
            bias = bias[None].expand(batch, *bias.shape).flatten(0, 1)  # B*nW, H, L, K
        return bias

    def windows(self, block: nn.Module, u: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """timm's shift, padding and partition of the normalised grid ``u`` (B, H, W, C): the
        windows (B*nW, N, C), their shift mask (nW, N, N) or None, and the padded grid size."""
        B, H, W, C = u.shape
        shift = block.shift_size
        if any(shift):
            u = torch.roll(u, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        wh, ww = block.window_size
        u = F.pad(u, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        mask = block.get_attn_mask(u) if getattr(block, "dynamic_mask", False) else block.attn_mask
        return window_partition(u, block.window_size).view(-1, wh * ww, C), mask, tuple(u.shape[1:3])

    def unwindow(self, block: nn.Module, a: Tensor, size: tuple[int, int], padded: tuple[int, int]) -> Tensor:
        """Window outputs (B*nW, N, C) back to the (B, H, W, C) grid, padding cropped, shift undone."""
        wh, ww = block.window_size
        x = window_reverse(a.reshape(-1, wh, ww, a.shape[-1]), block.window_size, *padded)[:, : size[0], : size[1]]
        shift = block.shift_size
        return torch.roll(x, shifts=shift, dims=(1, 2)) if any(shift) else x

    def block_forward(
        self, index: int, x: Tensor, prompts: Tensor | None, extra_k: Tensor | None, extra_v: Tensor | None,
        prompt_bias: Tensor | None, extra: int, hook, window_mean: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Block ``index`` over the grid ``x`` (B, H, W, C). ``prompts`` (B|1, nW|1, p, C) are
        prepended in every window and their outputs returned (B, nW|1, p, C); ``extra_k``/``extra_v``
        (B*nW|1, H, M, Dh) are extra keys of every window, the first ``M - extra`` of them prompt
        keys masked by ``prompt_bias`` (B|1, p)."""
        block = self.blocks[index]
        B, H, W, C = x.shape
        windows, mask, padded = self.windows(block, block.norm1(x))
        nW = windows.shape[0] // B
        p = 0
        if prompts is not None:
            p = prompts.shape[2]
            up = block.norm1(prompts).expand(B, nW, -1, -1).reshape(B * nW, p, C)
            windows = torch.cat([up, windows], dim=1)  # B*nW, p+N, C
            bias = key_bias(per_window(prompt_bias, nW), 0, windows.shape[1] - p + extra)
        elif extra_k is not None:  # prompt keys (the kv path) before ``extra`` key-value prompts
            bias = key_bias(per_window(prompt_bias, nW), windows.shape[1], extra)
        else:
            bias = None
        position_bias = self.position_bias(block, mask, p, B, 0 if extra_k is None else extra_k.shape[2])
        a = attend(block.attn, windows, extra_k, extra_v, bias, position_bias=position_bias, align_keys=True)
        if hook is not None:
            a = hook(windows, a)
        x = x + block.drop_path1(self.unwindow(block, a[:, p:], (H, W), padded))
        x = x + block.drop_path2(block.mlp(block.norm2(x)))
        if prompts is None:
            return x, None
        out = a[:, :p].reshape(B, nW, p, C)
        if window_mean:
            out = out.mean(1, keepdim=True)
        carried = prompts + block.drop_path1(out)
        return x, carried + block.drop_path2(block.mlp(block.norm2(carried)))

    def prompt_keys_values(self, index: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (n, H, p, Dh) that prompts (n, p, C) give block ``index``'s windows:
        LN1 then the frozen K/V projections, once, whatever the number of windows."""
        block = self.blocks[index]
        return prompt_keys_values(block.attn, block.norm1(prompts))

    def merge_prompts(self, merge: nn.Module, prompts: Tensor) -> Tensor:
        """The official code's prompts through a patch merging: averaged over windows, tiled 4x
        along the channels, then the merging's own norm and 4C -> 2C reduction: (B|1, 1, p, 2C)."""
        prompts = prompts.mean(1, keepdim=True)
        return merge.reduction(merge.norm(torch.cat([prompts] * 4, dim=-1)))

    def walk(self, x: Tensor, method: Method, checkpoint: bool = False) -> tuple[Tensor, Tensor | None]:
        """Every stage over the grid ``x`` with ``method``'s prompts and hooks: the prompt-free
        grid (B, H', W', C') and the prompt outputs of the last block (None if none or unread)."""
        options = self.options(method)
        layers, stage_of = method.prompt_layers, self.stage_of
        depth, batch = len(stage_of), x.shape[0]
        prompt_bias = method.prompt_key_bias(batch)
        cache_ok = not method.training and not torch.is_grad_enabled()
        forward = self.block_forward
        if checkpoint and torch.is_grad_enabled():
            forward = lambda *args: recompute(self.block_forward, *args, use_reentrant=False)  # noqa: E731
        window_mean = options["windows"] == "mean"

        def read(i: int) -> bool:
            """Whether anything reads block i's prompt outputs."""
            if i + 1 in layers:
                return False
            if i + 1 == depth:
                return options["pool"]
            return stage_of[i + 1] == stage_of[i] or options["merge"] == "tile"

        carried: Tensor | None = None  # B|1, nW|1, p, C
        i = 0
        for s, stage in enumerate(self.model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                x = stage.downsample(x)
                if carried is not None:
                    carried = self.merge_prompts(stage.downsample, carried) if options["merge"] == "tile" else None
            for _ in stage.blocks:
                if method.token_offset(i) is not None:
                    self.num_positions()  # refuses "add" prompts
                fresh = i in layers
                if fresh:
                    carried = method.prompts(i, batch)[:, None]  # B|1, 1, p, C
                    if not torch.is_grad_enabled():  # a no-grad view of a parameter trips module hooks (FLOP counter)
                        carried = carried.detach()
                kv = method.kv_prompts(i)
                hook = method.attention_output(i)
                extra = 0 if kv is None else kv[0].shape[2]
                if carried is None:
                    k, v = kv if kv is not None else (None, None)
                    x, _ = forward(i, x, None, k, v, None, 0, hook, window_mean)
                elif method.path == "kv" and not read(i):
                    n, w, p, C = carried.shape
                    if cache_ok and fresh and n == 1:
                        k, v = cached_prompt_keys_values(method, i, carried[:, 0], lambda t, i=i: self.prompt_keys_values(i, t))
                    else:
                        k, v = self.prompt_keys_values(i, carried.reshape(n * w, p, C))  # n*w, H, p, Dh
                    if w == 1:
                        nW = self.num_windows(i, x)
                        k, v = per_window(k, nW), per_window(v, nW)
                    if kv is not None:
                        m = k.shape[0]
                        k = torch.cat([k, kv[0].to(k.dtype).expand(m, -1, -1, -1)], dim=2)
                        v = torch.cat([v, kv[1].to(v.dtype).expand(m, -1, -1, -1)], dim=2)
                    x, _ = forward(i, x, None, k, v, prompt_bias, extra, hook, window_mean)
                    carried = None
                else:
                    k, v = kv if kv is not None else (None, None)
                    x, carried = forward(i, x, carried, k, v, prompt_bias, extra, hook, window_mean)
                    if not read(i):
                        carried = None
                i += 1
        return x, carried

    def grid_walk(self, x: Tensor, block: Callable[[int, Tensor], Tensor]) -> Tensor:
        """The stages' skeleton for a caller with its own block step (mixed-task serving):
        each stage's patch merging, then ``x = block(i, x)`` for its blocks, i counting all blocks."""
        i = 0
        for stage in self.model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                x = stage.downsample(x)
            for _ in stage.blocks:
                x = block(i, x)
                i += 1
        return x

    def num_windows(self, index: int, x: Tensor) -> int:
        """Windows per image of block ``index`` on the grid ``x`` (B, H, W, C), padding included."""
        wh, ww = self.blocks[index].window_size
        return -(-x.shape[1] // wh) * -(-x.shape[2] // ww)

    def run_blocks(
        self, x: Tensor, aux: Any, method: Method, checkpoint: bool = False, outputs: int | None = None
    ) -> Tensor:
        """The prompt-free grid (B, H', W', C') after every stage."""
        return self.walk(x, method, checkpoint)[0]

    def pooled_features(self, x: Tensor, prompts: Tensor | None = None) -> Tensor:
        """Final norm and the model's pooling of the grid; with ``prompts`` (official ``pool``),
        the average runs over the tokens and the prompts' window averages."""
        x = self.model.norm(x)
        if prompts is None:
            return self.model.forward_head(x, pre_logits=True)
        if self.model.global_pool != "avg":
            raise ValueError(f"swin pool=True averages prompts into the pool; this model pools with {self.model.global_pool!r}")
        prompts = self.model.norm(prompts.mean(1)).expand(x.shape[0], -1, -1)  # B, p, C
        return torch.cat([x.flatten(1, 2), prompts], dim=1).mean(1)

    def features(self, images: Tensor, method: Method, checkpoint: bool = False) -> Tensor:
        x, _ = self.embed(images)
        x, prompts = self.walk(x, method, checkpoint)
        return self.pooled_features(x, prompts if self.options(method)["pool"] else None)
