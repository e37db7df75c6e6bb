"""E2VPT pruning of visual prompts: scores, masks, compact export (``masks``)."""

from .masks import Masks, check_prunable, is_pruned, compact, importance_scores, segment_masks, set_masks, token_masks, visual_prompts
