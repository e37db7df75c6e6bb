"""The baselines the papers compare against (docs/methods.md, "Baselines").

- linear: the head alone on frozen pooled features (linear probe).
- mlp: an MLP head with ``hidden_layers`` hidden layers of the backbone's width.
- full: every backbone tensor, plus the head.
- bias: every bias of the backbone (BitFit), plus the head.
- partial: the last ``num_blocks`` blocks and the final norm, plus the head.
- lora: LoRA on the attention projections through peft, plus the head.

Methods that tune backbone tensors train a private copy of the backbone, so a backbone
shared with other models is never changed.
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from .base import Method, MethodConfig, register


class BackboneTuning(Method):
    """Trains the backbone tensors that ``is_tuned(name)`` selects, on a private copy; the
    model's own classifier (``family.head_prefixes``) and what the family keeps frozen
    (``family.frozen_prefixes``) never."""

    def __init__(self, family) -> None:
        super().__init__()
        self.head_prefixes = tuple(family.head_prefixes) + tuple(family.frozen_prefixes)

    def is_tuned(self, name: str) -> bool:
        raise NotImplementedError

    def prepare_backbone(self, backbone: nn.Module) -> nn.Module:
        private = copy.deepcopy(backbone)
        for name, param in private.named_parameters():
            param.requires_grad_(not name.startswith(self.head_prefixes) and self.is_tuned(name))
        return private


@register("linear")
@dataclasses.dataclass
class LinearConfig(MethodConfig):
    def method_name(self) -> str:
        return "linear"

    def build(self, family) -> Method:
        return Method()


@register("mlp")
@dataclasses.dataclass
class MLPConfig(MethodConfig):
    hidden_layers: int = 2

    def __post_init__(self) -> None:
        if self.hidden_layers < 1:
            raise ValueError(f"hidden_layers must be >= 1, got {self.hidden_layers}")

    def method_name(self) -> str:
        return "mlp"

    def head_hidden_layers(self) -> int:
        return self.hidden_layers

    def build(self, family) -> Method:
        return Method()


@register("full")
@dataclasses.dataclass
class FullConfig(MethodConfig):
    def method_name(self) -> str:
        return "full"

    def build(self, family) -> Method:
        return FullFineTuning(family)


class FullFineTuning(BackboneTuning):
    def is_tuned(self, name: str) -> bool:
        return True


@register("bias")
@dataclasses.dataclass
class BiasConfig(MethodConfig):
    def method_name(self) -> str:
        return "bias"

    def build(self, family) -> Method:
        return BiasTuning(family)


class BiasTuning(BackboneTuning):
    def is_tuned(self, name: str) -> bool:
        return name.endswith(".bias")


@register("partial")
@dataclasses.dataclass
class PartialConfig(MethodConfig):
    num_blocks: int = 1

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")

    def method_name(self) -> str:
        return "partial"

    def build(self, family) -> Method:
        blocks = family.block_prefixes()
        if self.num_blocks > len(blocks):
            raise ValueError(f"partial: num_blocks={self.num_blocks} but the backbone has {len(blocks)} blocks")
        return PartialTuning(family, tuned=tuple(blocks[len(blocks) - self.num_blocks :]) + family.final_prefixes)


class PartialTuning(BackboneTuning):
    """The last blocks and what follows them (the final norm), by parameter-name prefix."""

    def __init__(self, family, tuned: tuple[str, ...]) -> None:
        super().__init__(family)
        self.tuned = tuned

    def is_tuned(self, name: str) -> bool:
        return name.startswith(self.tuned)


@register("lora")
@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj")  # attention submodules to adapt

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        self.targets = tuple(self.targets)
        if not self.targets or not set(self.targets) <= {"qkv", "proj"}:
            raise ValueError(f"targets must be a non-empty subset of ('qkv', 'proj'), got {self.targets}")

    def method_name(self) -> str:
        return "lora"

    def build(self, family) -> Method:
        return LoRA(self, family.lora_pattern(self.targets))


class LoRA(Method):
    """LoRA from peft, injected into a private copy of the backbone's attention projections."""

    def __init__(self, config: LoRAConfig, pattern: str) -> None:
        super().__init__()
        self.config = config
        self.pattern = pattern  # the family's regex of the adapted projections

    def prepare_backbone(self, backbone: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        private = copy.deepcopy(backbone)
        peft_config = LoraConfig(
            r=self.config.rank,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=self.pattern,
        )
        private = inject_adapter_in_model(peft_config, private)
        for name, param in private.named_parameters():
            param.requires_grad_("lora_" in name)
        return private
