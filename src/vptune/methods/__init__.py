"""Every method: its config (registered by name) and its module."""

from .apt import APT, APTConfig
from .base import CONFIGS, Method, MethodConfig, config_for, config_from_dict
from .baselines import BiasConfig, FullConfig, LinearConfig, LoRAConfig, MLPConfig, PartialConfig
from .coop import CoOpConfig
from .e2vpt import E2VPT, E2VPTConfig
from .textual_inversion import TextualInversion, TextualInversionConfig
from .vpt import VPT, VPTConfig

METHOD_NAMES: tuple[str, ...] = tuple(sorted(CONFIGS))

__all__ = [
    "APT", "APTConfig", "BiasConfig", "CONFIGS", "CoOpConfig", "E2VPT", "E2VPTConfig", "FullConfig", "LinearConfig",
    "LoRAConfig", "METHOD_NAMES", "MLPConfig", "Method", "MethodConfig", "PartialConfig", "TextualInversion", "TextualInversionConfig", "VPT", "VPTConfig",
    "config_for", "config_from_dict",
]
