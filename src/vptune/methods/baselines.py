"""The baselines the papers compare against (REFERENCE.md section 4).

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
    """Trains the backbone tensors that ``is_tuned(name)`` selects, on a private copy."""

    def is_tuned(self, name: str) -> bool:
        raise NotImplementedError

    def prepare_backbone(self, backbone: nn.Module) -> nn.Module:
        private = copy.deepcopy(backbone)
        for name, param in private.named_parameters():
            param.requires_grad_(not name.startswith("head.") and self.is_tuned(name))
        return private


@register("linear")
@dataclasses.dataclass
class LinearConfig(MethodConfig):
    def method_name(self) -> str:
        return "linear"

    def build(self, backbone: nn.Module) -> Method:
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

    def build(self, backbone: nn.Module) -> Method:
        return Method()


@register("full")
@dataclasses.dataclass
class FullConfig(MethodConfig):
    def method_name(self) -> str:
        return "full"

    def build(self, backbone: nn.Module) -> Method:
        return FullFineTuning()


class FullFineTuning(BackboneTuning):
    def is_tuned(self, name: str) -> bool:
        return True


@register("bias")
@dataclasses.dataclass
class BiasConfig(MethodConfig):
    def method_name(self) -> str:
        return "bias"

    def build(self, backbone: nn.Module) -> Method:
        return BiasTuning()


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

    def build(self, backbone: nn.Module) -> Method:
        depth = len(backbone.blocks)
        if self.num_blocks > depth:
            raise ValueError(f"partial: num_blocks={self.num_blocks} but the backbone has {depth} blocks")
        return PartialTuning(first_block=depth - self.num_blocks)


class PartialTuning(BackboneTuning):
    def __init__(self, first_block: int) -> None:
        super().__init__()
        self.first_block = first_block

    def is_tuned(self, name: str) -> bool:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) >= self.first_block
        return name.startswith(("norm.", "fc_norm."))


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

    def build(self, backbone: nn.Module) -> Method:
        return LoRA(self)


class LoRA(Method):
    """LoRA from peft, injected into a private copy of the backbone's attention projections."""

    def __init__(self, config: LoRAConfig) -> None:
        super().__init__()
        self.config = config

    def prepare_backbone(self, backbone: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        private = copy.deepcopy(backbone)
        targets = "|".join(self.config.targets)
        peft_config = LoraConfig(
            r=self.config.rank,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=rf"blocks\.\d+\.attn\.({targets})",
        )
        private = inject_adapter_in_model(peft_config, private)
        for name, param in private.named_parameters():
            param.requires_grad_("lora_" in name)
        return private
