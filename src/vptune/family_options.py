"""Options of a family's walk that a run records with its method config (``swin=...`` on VPT and
E2VPT): choices between a paper's behaviour (the default) and its official code's, where the
two differ in how the backbone treats prompt tokens. Only the family named by the key reads
them; a method stores them and never interprets them (README, "Where the official code differs from the paper").

Plain Python: the CLI validates a config before torch or timm are imported.
"""

from __future__ import annotations

from typing import Any

# Swin (README, "Where the official code differs from the paper"): paper default first, then the official code's choice.
SWIN_DEFAULTS: dict[str, Any] = {"merge": "drop", "pool": False, "windows": "each"}
SWIN_OFFICIAL: dict[str, Any] = {"merge": "tile", "pool": True, "windows": "mean"}
_SWIN_CHOICES: dict[str, tuple] = {"merge": ("drop", "tile"), "pool": (False, True), "windows": ("each", "mean")}


def swin_options(value: str | dict[str, Any] | None) -> dict[str, Any]:
    """The full Swin options from ``None``/"paper" (the paper), "official" (the official code) or
    a dict of some of: merge ("drop" | "tile": prompts through patch merging tiled 4x along the
    channels), pool (False | True: prompts in the final average pool), windows ("each": every
    window keeps its own prompt outputs | "mean": prompt outputs averaged over the windows)."""
    if value is None or value == "paper":
        return dict(SWIN_DEFAULTS)
    if value == "official":
        return dict(SWIN_OFFICIAL)
    if not isinstance(value, dict):
        raise ValueError(
            f"swin must be 'paper', 'official' or a dict such as {{\"merge\": \"tile\"}}, got {value!r}"
        )
    unknown = sorted(set(value) - set(SWIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown swin option(s) {unknown}: the options are {sorted(SWIN_DEFAULTS)}")
    options = {**SWIN_DEFAULTS, **value}
    for key, allowed in _SWIN_CHOICES.items():
        if options[key] not in allowed or type(options[key]) is not type(allowed[0]):
            raise ValueError(f"swin option {key} must be one of {list(allowed)}, got {options[key]!r}")
    return options
