"""vptune: prompt tuning of frozen timm vision transformers (VPT, E2VPT, APT) and the
baselines they are judged against, with one shared mechanism underneath."""

import vptune_tvshim

vptune_tvshim.install()  # before anything imports torchvision (see vptune_tvshim)

from .methods import (
    METHOD_NAMES,
    APTConfig,
    BiasConfig,
    E2VPTConfig,
    FullConfig,
    LinearConfig,
    LoRAConfig,
    MethodConfig,
    MLPConfig,
    PartialConfig,
    VPTConfig,
    config_for,
    config_from_dict,
)
from .model import PromptModel, prompt_model
from .serve import MultiTaskModel

__version__ = "0.1.0"

__all__ = [
    "APTConfig", "BiasConfig", "E2VPTConfig", "FullConfig", "LinearConfig", "LoRAConfig", "METHOD_NAMES",
    "MLPConfig", "MethodConfig", "MultiTaskModel", "PartialConfig", "PromptModel", "VPTConfig", "config_for", "config_from_dict",
    "prompt_model",
]
