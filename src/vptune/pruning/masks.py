"""E2VPT's pruning of visual prompts, as tensors: importance scores, masks and the compact export.

A token mask rho (p,) and segment masks (p, R) act on a deep prompt model through
``set_masks`` (see ``vptune.methods.vpt``). Scores are S = mean over the data of |dL/d mask|
at mask = 1 (the paper) or of the signed gradient (``score="signed"``, the official code),
computed per sample in one pass with the backbone frozen and no parameter update: the mask
gets a batch dimension, so one backward gives every sample's gradient.

``compact`` turns a masked model into a plain PromptModel in which pruned tokens are absent
(num_prompts reduced) and pruned segments are not stored (``kept_segments`` in the config):
in "log" mode it computes exactly what the masked model computes. In "zero" mode (the
official behaviour) a pruned token stays in the sequence as a zero vector, stored as a token
whose segments are all absent.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..methods import E2VPTConfig, VPTConfig
from ..methods.vpt import MASK_MODES, SEGMENT_LAYOUTS, VPT
from ..model import PromptModel

SCORES = ("abs", "signed")


@dataclasses.dataclass(frozen=True)
class Masks:
    """What survives pruning: kept tokens (p,) and kept segments (p, R), both bool."""

    token: Tensor
    segment: Tensor
    layout: str = "contiguous"
    mode: str = "log"

    @property
    def segments(self) -> int:
        return self.segment.shape[1]

    @classmethod
    def keep_all(cls, num_prompts: int, segments: int, layout: str = "contiguous", mode: str = "log") -> "Masks":
        return cls(torch.ones(num_prompts, dtype=torch.bool), torch.ones(num_prompts, segments, dtype=torch.bool), layout, mode)

    def describe(self) -> dict:
        return {
            "tokens_kept": torch.nonzero(self.token).flatten().tolist(),
            "segments_kept_per_token": self.segment.sum(1).tolist(),
            "segments": self.segments,
            "segment_layout": self.layout,
            "mask_mode": self.mode,
        }


def check_prunable(config: object, where: str = "this run") -> None:
    """Refuse, with the reason, a method whose prompts E2VPT pruning does not apply to."""
    deep_prompts = isinstance(config, E2VPTConfig) or (
        isinstance(config, VPTConfig) and config.deep and config.location == "prepend"
    )
    if not deep_prompts:
        name = config.method_name() if hasattr(config, "method_name") else type(config).__name__
        raise ValueError(
            f"{where} is a {name} run, which cannot be pruned: pruning removes deep visual prompt tokens, "
            "so it needs an e2vpt or vpt-deep run (with prepended prompts)"
        )


def is_pruned(config: VPTConfig | E2VPTConfig) -> bool:
    """Whether a config is a compact pruned run (it records segments)."""
    return config.kept_segments is not None or config.segments > 0


def visual_prompts(model: PromptModel) -> VPT:
    """The deep visual prompts of an E2VPT or VPT-deep model."""
    check_prunable(model.config)
    return model.method.visual if isinstance(model.config, E2VPTConfig) else model.method


def set_masks(model: PromptModel, masks: Masks | None) -> None:
    """Put ``masks`` on the model's visual prompts (None removes them)."""
    visual_prompts(model)
    if masks is None:
        model.method.set_masks(None, None)
        return
    device = next(model.parameters()).device
    model.method.set_masks(
        masks.token.float().to(device), masks.segment.float().to(device), mode=masks.mode, layout=masks.layout
    )


def importance_scores(
    model: PromptModel,
    dataset: Dataset,
    *,
    segments: int | None = None,
    keep_tokens: Tensor | None = None,
    score: str = "abs",
    mode: str = "log",
    layout: str = "contiguous",
    batch_size: int = 64,
) -> Tensor:
    """Token scores (p,), or with ``segments`` = R segment scores (p, R) of the tokens in
    ``keep_tokens`` (the others masked out): the mean over ``dataset`` of |dL/d mask| at mask 1
    (``score="abs"``, the paper) or of dL/d mask (``"signed"``, the official code).

    The model is in eval mode (no prompt dropout); nothing but the masks gets a gradient."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if layout not in SEGMENT_LAYOUTS:
        raise ValueError(f"segment layout must be one of {SEGMENT_LAYOUTS}, got {layout!r}")
    p = visual_prompts(model).table_shape[1]
    device = next(model.parameters()).device
    fixed = None if keep_tokens is None else keep_tokens.float().to(device)
    was_training = model.training
    model.eval()
    total, count = None, 0
    try:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images, labels = images.to(device), labels.to(device)
            batch = images.shape[0]
            if segments is None:
                mask = torch.ones(batch, p, device=device, requires_grad=True)  # per-sample rho
                model.method.set_masks(mask, None, mode=mode)
            else:
                mask = torch.ones(batch, p, segments, device=device, requires_grad=True)
                model.method.set_masks(fixed, mask, mode=mode, layout=layout)
            with torch.enable_grad():
                loss = F.cross_entropy(model(images).float(), labels, reduction="sum")  # sum: row i is dL_i/dmask
                (grad,) = torch.autograd.grad(loss, mask)
            grad = grad.abs() if score == "abs" else grad
            total = grad.sum(0) if total is None else total + grad.sum(0)
            count += batch
    finally:
        model.method.set_masks(None, None)
        model.train(was_training)
    if count == 0:
        raise ValueError("cannot score prompts on an empty dataset")
    return (total / count).cpu()


def prune_count(total: int, rate: float) -> int:
    """How many of ``total`` to prune at ``rate`` (the official floor), always keeping one."""
    check_rate(rate, "rate")
    return min(int(total * rate), total - 1)


def check_rate(rate: float, name: str) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction pruned; 1 would prune everything), got {rate}")


def lowest_pruned(scores: Tensor, count: int) -> Tensor:
    """Keep-mask (bool, like ``scores``' last dim) without the ``count`` lowest scores per row."""
    order = torch.argsort(scores, dim=-1, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(-1, order[..., :count], False)
    return keep


def token_masks(token_scores: Tensor, rate: float, segments: int, layout: str = "contiguous", mode: str = "log") -> Masks:
    """Prune the lowest-scoring tokens (the same at every layer); all segments kept."""
    keep = lowest_pruned(token_scores, prune_count(len(token_scores), rate))
    return Masks(keep, keep[:, None].expand(-1, segments).clone(), layout, mode)


def segment_masks(masks: Masks, segment_scores: Tensor, rate: float) -> Masks:
    """Prune the lowest-scoring segments of every surviving token (the same number per token, as
    the official code does)."""
    keep = lowest_pruned(segment_scores, prune_count(masks.segments, rate)) & masks.token[:, None]
    return dataclasses.replace(masks, segment=keep)


def compact_config(config: VPTConfig | E2VPTConfig, masks: Masks) -> VPTConfig | E2VPTConfig:
    """The config of the model ``masks`` leaves: fewer tokens ("log" mode), the kept segments."""
    check_prunable(config)
    p = config.num_prompts
    if masks.token.shape != (p,) or masks.segment.shape[0] != p:
        raise ValueError(f"masks for {masks.token.shape[0]} tokens do not fit a model with {p} prompt tokens")
    if not masks.token.any():
        raise ValueError("the masks prune every prompt token; at least one must stay")
    kept = kept_segments(masks)
    if kept.all():
        return dataclasses.replace(config, num_prompts=kept.shape[0], segments=0, segment_layout="contiguous", kept_segments=None)
    flat = tuple(torch.nonzero(kept.flatten()).flatten().tolist())
    return dataclasses.replace(
        config, num_prompts=kept.shape[0], segments=masks.segments, segment_layout=masks.layout, kept_segments=flat
    )


def kept_tokens(masks: Masks) -> Tensor:
    """Indices of the tokens a compact model keeps: the surviving ones, or all in "zero" mode."""
    return torch.nonzero(masks.token).flatten() if masks.mode == "log" else torch.arange(len(masks.token))


def kept_segments(masks: Masks) -> Tensor:
    """Stored segments (p', R) of the kept tokens; in "zero" mode a pruned token stores none."""
    return masks.segment[kept_tokens(masks)] if masks.mode == "log" else masks.segment & masks.token[:, None]


def compact(model: PromptModel, masks: Masks) -> PromptModel:
    """A new PromptModel on the same backbone without what ``masks`` prunes: pruned tokens
    removed ("log" mode) or kept as zero vectors ("zero" mode), pruned segments not stored."""
    config = compact_config(model.config, masks)
    visual = visual_prompts(model)
    device = next(model.parameters()).device
    small = PromptModel(model.backbone, config, model.num_classes).to(device)
    small.metadata = dict(model.metadata)
    small_visual = visual_prompts(small)
    prefix = "method." + ("visual." if isinstance(config, E2VPTConfig) else "")
    with torch.no_grad():
        keep = kept_tokens(masks).to(device)
        tables = [visual.prompt_table(s)[keep] for s in range(visual.table_shape[0])]  # sets x (p', width)
    state = {k: v for k, v in model.tuned_state_dict().items() if not k.startswith(prefix + "prompt_")}
    state.update({prefix + name: t for name, t in small_visual.stored_tables(tables).items()})
    small.load_tuned_state_dict(state, source="the pruned prompts")
    return small.train(model.training)
