"""vptune: prompt tuning of frozen timm vision transformers (VPT, E2VPT, APT) and the
baselines they are judged against, with one shared mechanism underneath.

The public names below are imported on first use (PEP 562), so that ``import vptune.cli``
and ``vptune --help`` do not pay for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import vptune_tvshim

vptune_tvshim.install()  # before anything imports torchvision (see vptune_tvshim); imports nothing heavy

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "METHOD_NAMES", "APTConfig", "BiasConfig", "E2VPTConfig", "FullConfig", "LinearConfig", "LoRAConfig",
            "MethodConfig", "MLPConfig", "PartialConfig", "VPTConfig", "config_for", "config_from_dict",
        ),
        ".methods",
    ),
    "PromptModel": ".model",
    "prompt_model": ".model",
    "HeadConfig": ".heads",
    "MultiTaskModel": ".serve",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .methods import (
        METHOD_NAMES, APTConfig, BiasConfig, E2VPTConfig, FullConfig, LinearConfig, LoRAConfig, MethodConfig,
        MLPConfig, PartialConfig, VPTConfig, config_for, config_from_dict,
    )
    from .heads import HeadConfig
    from .model import PromptModel, prompt_model
    from .serve import MultiTaskModel


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vptune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
