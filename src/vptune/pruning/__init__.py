"""E2VPT pruning of visual prompts: scores, masks and the compact export (``masks``), and the
whole procedure on a trained run with search and rewinding (``run``, behind ``vptune prune``)."""

from .masks import (
    Masks,
    check_prunable,
    compact,
    compact_config,
    importance_scores,
    is_pruned,
    segment_masks,
    set_masks,
    token_masks,
    visual_prompts,
)
from .run import PRUNE_FILE, PruneOptions, prune_run

__all__ = [
    "Masks", "PRUNE_FILE", "PruneOptions", "check_prunable", "compact", "compact_config", "importance_scores",
    "is_pruned", "prune_run", "segment_masks", "set_masks", "token_masks", "visual_prompts",
]
