"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022); docs/methods.md, "VPT: visual
prompt tuning".

Learnable prompt tokens P_i (p x d) enter the token sequence after the prefix tokens
(CLS, registers) and get no position embedding. Shallow: one set before block 1 that flows
through every block. Deep: before every block i the prompt slot is overwritten by P_i, so
P_i acts only through the keys and values it gives block i; on ``path="kv"`` that is all we
compute (see ``vptune.attention``). ``location="add"`` instead adds one prompt per sequence
position to the tokens (the paper's ablation); ``layers`` restricts prompts to some blocks,
whose prompt outputs then flow on through the blocks that have none (the official code).

Pruning (E2VPT, ``vptune.pruning``) acts on deep prompts through masks: a token mask rho (p,)
and segment masks (p, R) over the prompt width, optionally per sample (B, p) / (B, p, R) for
per-sample importance scores. In "log" mode rho enters as log(rho) on the token's attention
key, so rho = 0 removes the token exactly; "zero" mode multiplies the token by rho (the
official code: a zeroed token still emits its LayerNorm bias as key and value). A pruned run
stores only the kept segments (``kept_segments``); the absent ones are rebuilt as zeros.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..family_options import swin_options
from .base import Method, MethodConfig, register, uniform


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
    segments: int = 0  # pruned runs: the prompt width is split into this many segments
    segment_layout: str = "contiguous"  # "contiguous" | "interleaved" (dimension j in segment j mod R)
    kept_segments: tuple[int, ...] | None = None  # stored segments, token * segments + r; None: all
    swin: str | dict | None = None  # on Swin: None/"paper", "official" or a dict (vptune.family_options)

    def __post_init__(self) -> None:
        swin_options(self.swin)  # validates
        check_segments(self.num_prompts, self.segments, self.segment_layout, self.kept_segments)
        if self.kept_segments is not None:
            self.kept_segments = tuple(int(i) for i in self.kept_segments)
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

    def build(self, family) -> "VPT":
        return VPT(self, family)


def check_segments(num_prompts: int, segments: int, layout: str, kept: tuple[int, ...] | None) -> None:
    if segments < 0:
        raise ValueError(f"segments must be >= 0, got {segments}")
    if layout not in SEGMENT_LAYOUTS:
        raise ValueError(f"segment_layout must be one of {SEGMENT_LAYOUTS}, got {layout!r}")
    if kept is None:
        return
    if segments < 1:
        raise ValueError("kept_segments needs segments >= 1 (how many segments each prompt token has)")
    kept = list(kept)
    if kept != sorted(set(kept)) or any(not 0 <= i < num_prompts * segments for i in kept):
        raise ValueError(
            f"kept_segments must be sorted distinct indices token * {segments} + segment "
            f"in [0, {num_prompts * segments}), got {tuple(kept)[:8]}..."
        )


SEGMENT_LAYOUTS = ("contiguous", "interleaved")
MASK_MODES = ("log", "zero")


def segment_of_dim(width: int, segments: int, layout: str) -> Tensor:
    """The segment (width,) of each prompt dimension: contiguous blocks, or j mod R (official)."""
    if not 1 <= segments <= width:
        raise ValueError(f"cannot split a prompt of width {width} into {segments} segments: expected 1 <= segments <= {width}")
    dims = torch.arange(width)
    return dims * segments // width if layout == "contiguous" else dims % segments


def prompt_init_bound(fan_in: int, width: int) -> float:
    """VPT's Xavier-uniform bound, treating a prompt like a patch-embedding filter of ``fan_in``
    inputs (channels x patch area)."""
    return math.sqrt(6.0 / (fan_in + width))


class VPT(Method):
    def __init__(self, config: VPTConfig, family) -> None:
        super().__init__()
        sites = family.sites
        depth = len(sites)
        layers = config.layers if config.layers is not None else (range(depth) if config.deep else (0,))
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(
                f"layers {tuple(layers)} out of range for a backbone with {depth} blocks (0..{depth - 1}, {family.name} family)"
            )
        self.config = config
        self.path = config.path
        self.family_options = {"swin": swin_options(config.swin)}
        self.layers = tuple(layers)
        self.set_of_layer = {layer: 0 if config.shared else j for j, layer in enumerate(self.layers)}
        set_layers = [self.layers] if config.shared else [(layer,) for layer in self.layers]
        widths = [{config.prompt_dim or sites[i].kv_width for i in group} for group in set_layers]
        if any(len(w) > 1 for w in widths):
            raise ValueError(
                "shared prompts need one width at every prompted block; this backbone's blocks have widths "
                f"{sorted({sites[i].kv_width for i in self.layers})}: use shared=False or layers of one width"
            )
        self.set_widths = [w.pop() for w in widths]
        if config.location == "add":
            num_tokens = family.num_positions()  # one per position
        else:
            num_tokens = config.num_prompts
            self.prompt_layers = frozenset(self.layers)
        one_width = len(set(self.set_widths)) == 1
        width = self.set_widths[0] if one_width else None
        self.table_shape = (len(set_layers), num_tokens, width)
        # Flat positions (token * width + dim) of the stored values when only some segments are kept,
        # per prompt width (one per Swin stage): ``prompt_values`` (sets, kept) when every set has
        # one width, else ``prompt_values_0``, ``_1``, ... per width.
        self.kept_positions: Tensor | None = None
        self.kept_positions_of: dict[int, Tensor] | None = None
        if config.kept_segments is not None:
            if config.location != "prepend":
                raise ValueError("kept_segments applies to prepended prompts only")
            kept = torch.tensor(config.kept_segments, dtype=torch.long)
            pairs = list(zip((kept // config.segments).tolist(), (kept % config.segments).tolist()))

            def positions(w: int) -> Tensor:
                segment = segment_of_dim(w, config.segments, config.segment_layout)
                if not pairs:
                    return torch.zeros(0, dtype=torch.long)
                return torch.cat([t * w + torch.nonzero(segment == r).flatten() for t, r in pairs])

            self.kept_positions_of = {w: positions(w) for w in dict.fromkeys(self.set_widths)}
            if one_width:
                self.kept_positions = self.kept_positions_of[width]
            width_of_length = {len(v): w for w, v in self.kept_positions_of.items()}
            self.add_site_parameters(
                "prompt_values", [(len(self.kept_positions_of[w]),) for w in self.set_widths],
                lambda shape: uniform(prompt_init_bound(family.prompt_fan_in, width_of_length.get(shape[-1], 1)))(shape),
            )
        else:
            # One stacked table per prompt width: ``prompt_embeddings`` (sets, p, d) when every block
            # has the same width, else ``prompt_embeddings_0``, ``_1``, ... per width (Swin's stages).
            self.add_site_parameters(
                "prompt_embeddings", [(num_tokens, w) for w in self.set_widths],
                lambda shape: uniform(prompt_init_bound(family.prompt_fan_in, shape[-1]))(shape),
            )
        self.token_mask: Tensor | None = None
        self.segment_mask: Tensor | None = None
        self.mask_mode = "log"
        self.mask_layout = "contiguous"  # how a segment mask's R segments split each prompt's width
        self.projection = None
        if config.prompt_dim is not None:
            dims = {sites[i].kv_width for i in self.layers}
            if len(dims) > 1:
                raise ValueError(f"prompt_dim projects to one width; this backbone's prompted blocks have widths {sorted(dims)}")
            self.projection = nn.Linear(config.prompt_dim, dims.pop())
            nn.init.kaiming_normal_(self.projection.weight, a=0, mode="fan_out")
        self.dropout = nn.Dropout(config.dropout)

    def prompt_table(self, set_index: int) -> Tensor:
        """Prompt set ``set_index`` (p, k), with absent segments rebuilt as zeros."""
        if self.kept_positions_of is None:
            return self.site_parameter("prompt_embeddings", set_index)
        values = self.site_parameter("prompt_values", set_index)
        width = self.set_widths[set_index]
        positions = self.kept_positions_of[width].to(values.device)
        p = self.table_shape[1]
        return values.new_zeros(p * width).index_copy(0, positions, values).view(p, width)

    def stored_tables(self, tables: list[Tensor]) -> dict[str, Tensor]:
        """The tensors this module stores (``prompt_embeddings*`` or, with kept segments, only the
        kept values ``prompt_values*``) that hold the full prompt sets ``tables`` (each (p, width))."""
        name = "prompt_embeddings" if self.kept_positions_of is None else "prompt_values"
        rows: dict[str, list[tuple[int, Tensor]]] = {}
        for s, table in enumerate(tables):
            stacked, row = self.site_rows[name][s]
            if self.kept_positions_of is not None:
                table = table.flatten()[self.kept_positions_of[self.set_widths[s]].to(table.device)]
            rows.setdefault(stacked, []).append((row, table))
        return {k: torch.stack([t for _, t in sorted(v, key=lambda r: r[0])]) for k, v in rows.items()}

    def set_masks(
        self,
        token: Tensor | None = None,
        segment: Tensor | None = None,
        *,
        mode: str = "log",
        layout: str = "contiguous",
    ) -> None:
        """Mask the prompt tokens: ``token`` (p,) or per sample (B, p); ``segment`` (p, R) or
        (B, p, R) multiplies the prompt dimensions of segment r. None removes a mask."""
        if mode not in MASK_MODES:
            raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
        if not self.prompt_layers:
            raise ValueError("masks apply to prepended deep prompts (vpt-deep, e2vpt)")
        p = self.table_shape[1]
        if token is not None and token.shape[-1] != p:
            raise ValueError(f"token mask has shape {tuple(token.shape)}, expected (p,) or (B, p) with p={p}")
        if segment is not None and (segment.dim() < 2 or segment.shape[-2] != p):
            raise ValueError(f"segment mask has shape {tuple(segment.shape)}, expected (p, R) or (B, p, R) with p={p}")
        self.token_mask, self.segment_mask, self.mask_mode = token, segment, mode
        self.mask_layout = layout
        self.kv_cache.clear()

    def prompt_key_bias(self, batch: int) -> Tensor | None:
        if self.token_mask is None or self.mask_mode != "log":
            return None
        bias = torch.log(self.token_mask)  # 0 -> -inf: the token is gone from every attention
        return bias if bias.dim() == 2 else bias[None]  # B|1, p

    def prompt_set(self, index: int, batch: int) -> Tensor:
        """Block ``index``'s prompts, masked and projected; dropout per sample in training: (B|1, p, d)."""
        prompts = self.prompt_table(self.set_of_layer[index])[None]  # 1, p, k
        if self.segment_mask is not None:
            dims = segment_of_dim(prompts.shape[-1], self.segment_mask.shape[-1], self.mask_layout)
            prompts = prompts * self.segment_mask[..., dims.to(self.segment_mask.device)]  # B|1, p, k
        if self.token_mask is not None and self.mask_mode == "zero":
            prompts = prompts * self.token_mask[..., None]
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
