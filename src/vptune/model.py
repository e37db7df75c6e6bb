"""PromptModel: a frozen backbone, one method and a classification head.

Only the method's tensors and the head are trained and saved (``config.json`` plus
``model.safetensors``), so a task costs kilobytes and many models can share one backbone
instance. The backbone is frozen and kept in eval mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .backbones.family import Family, family_of
from .heads import HeadConfig, build_head
from .methods import MethodConfig, config_from_dict

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vptune-run/1"
# Backbone properties a saved run must match; the others (image size, say) may differ.
_MUST_MATCH = ("family", "architecture", "embed_dim", "depth", "num_heads", "head_dim", "sites", "num_prefix_tokens", "global_pool")


def make_head(in_dim: int, num_classes: int, hidden_layers: int = 0) -> nn.Module:
    """A Linear head (official bias init -log(0.99/0.01)), or an MLP with ReLU hidden layers."""
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(in_dim, in_dim), nn.ReLU()]
    last = nn.Linear(in_dim, num_classes)
    nn.init.trunc_normal_(last.weight, std=0.01)
    nn.init.constant_(last.bias, -math.log(0.99 / 0.01))
    return nn.Sequential(*layers, last) if layers else last


class PromptModel(nn.Module):
    """``head`` (a ``vptune.heads.HeadConfig``) picks the head: vptune's random Linear (default),
    CLIP's zero-shot classifier from the text tower, or CoOp; ``init_head=False`` leaves a text
    head's weights to be loaded."""

    def __init__(
        self, backbone: nn.Module, config: MethodConfig, num_classes: int, head: HeadConfig | None = None,
        *, init_head: bool = True,
    ) -> None:
        super().__init__()
        family = family_of(backbone)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        backbone.requires_grad_(False)
        backbone.eval()
        self.config = config
        self.num_classes = num_classes
        self.backbone_fingerprint = family.fingerprint()
        self.backbone_parameters = family.num_parameters()  # before a method adds its own (LoRA)
        self.method = config.build(family)
        self.backbone = self.method.prepare_backbone(backbone)
        self.family: Family = family if self.backbone is backbone else family_of(self.backbone)
        self.head_config = head or HeadConfig()
        implied = getattr(config, "text_prompts", None)  # a text-side method (CoOp) implies its head
        if implied is not None:
            self.head_config = dataclasses.replace(self.head_config, **implied())
        self.head = build_head(self.head_config, self.family, num_classes, config.head_hidden_layers(), initialise=init_head)
        self.metadata: dict[str, Any] = {}
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward instead of storing them: far less
        training memory for about one more forward's time; gradients are unchanged."""
        self.grad_checkpointing = enable

    def train(self, mode: bool = True) -> "PromptModel":
        super().train(mode)
        self.backbone.eval()  # the VPT recipe: backbone dropout and drop-path stay off
        return self

    def forward_features(self, images: Tensor) -> Tensor:
        """The backbone's tokens after the last block, prompts removed."""
        x, aux = self.family.embed(images)
        return self.family.run_blocks(x, aux, self.method, checkpoint=self.grad_checkpointing)

    def forward(self, images: Tensor) -> Tensor:
        # With token pooling only the class token leaves the last block: the rest is not computed.
        return self.head(self.family.features(images, self.method, checkpoint=self.grad_checkpointing))

    # --- what is tuned -------------------------------------------------------------------
    def tuned_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def num_tuned_parameters(self) -> int:
        return sum(p.numel() for p in self.tuned_parameters().values())

    def num_backbone_parameters(self) -> int:
        return self.backbone_parameters

    def tuned_state_dict(self) -> dict[str, Tensor]:
        """Trained tensors plus the method's buffers (such as pruning masks): all a run stores."""
        state = {name: p.detach() for name, p in self.tuned_parameters().items()}
        state.update({f"method.{name}": b.detach() for name, b in self.method.named_buffers()})
        return state

    def load_tuned_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        expected = self.tuned_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source} does not fit a {self.config.method_name()} model: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, this model expects {tuple(expected[name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in state.items():
                expected[name].copy_(tensor)
        self.method.kv_cache.clear()

    # --- save and load -------------------------------------------------------------------
    def run_config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method_config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "head": self.head_config.to_dict(),
            "backbone": self.family.describe(),
            "backbone_weights": self.backbone_fingerprint,
            "metadata": self.metadata,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write only what was tuned: ``model.safetensors`` and ``config.json``, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.contiguous().cpu() for name, t in self.tuned_state_dict().items()}
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, directory / WEIGHTS_FILE)
        tmp = directory / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(self.run_config(), indent=2))
        os.replace(tmp, directory / CONFIG_FILE)

    @classmethod
    def from_pretrained(
        cls, backbone: nn.Module, directory: str | os.PathLike, *, allow_other_weights: bool = False
    ) -> "PromptModel":
        """Rebuild a saved run on ``backbone``, refusing (with the reason) one that does not fit it:
        another architecture, or other weights of the same architecture (its tuned tensors were fitted
        to the weights it was made on; ``allow_other_weights=True`` loads it anyway, with a warning)."""
        directory = Path(directory)
        run = read_run_config(directory)
        family = family_of(backbone)
        check_compatible(run, family, directory)
        saved, here = run.get("backbone_weights"), family.fingerprint()
        if saved not in (None, here):
            message = (
                f"run folder {directory} was made on other backbone weights (fingerprint {saved}, these are {here}): "
                "same architecture, other values, so its tuned tensors do not fit them"
            )
            if not allow_other_weights:
                raise ValueError(f"{message}; pass the weights it was made with (--weights FILE)")
            warnings.warn(message, stacklevel=2)
        model = cls(backbone, config_from_dict(run["method_config"]), run["num_classes"],
                    HeadConfig.from_dict(run.get("head")), init_head=False)
        model.metadata = run.get("metadata", {})
        model.load_tuned_state_dict(read_weights(directory), source=str(directory / WEIGHTS_FILE))
        return model.to(next(backbone.parameters()).device)


def read_run_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a run folder written by save_pretrained")
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the run folder is damaged") from None
    missing = [key for key in ("method_config", "num_classes", "backbone") if key not in (run if isinstance(run, dict) else {})]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a vptune run config")
    try:
        config_from_dict(run["method_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad method_config: {err}") from None
    return run


def read_weights(directory: Path) -> dict[str, Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run folder has a config but no weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): the run folder is damaged") from None


def check_compatible(run: dict[str, Any], family: Family, directory: Path) -> None:
    """Refuse a run made on another backbone. A key a run of an older vptune did not record
    (``family``, ``sites``) is taken from the backbone's when the rest matches."""
    saved, here = dict(run["backbone"]), family.describe()
    saved.setdefault("family", "vit")  # runs of vptune 0.1 were all on timm ViTs
    saved.setdefault("sites", here.get("sites"))
    diffs = [f"{key} {saved.get(key)!r} vs {here.get(key)!r}" for key in _MUST_MATCH if saved.get(key) != here.get(key)]
    if diffs:
        raise ValueError(
            f"run folder {directory} was trained on {saved.get('architecture')} ({saved.get('family')} family, "
            f"d={saved.get('embed_dim')}, {saved.get('depth')} blocks); this backbone is {here['architecture']} "
            f"({here['family']} family, d={here['embed_dim']}, {here['depth']} blocks): mismatch in {'; '.join(diffs[:3])}. "
            f"Pass --backbone {saved.get('architecture')}"
        )


def prompt_model(backbone: nn.Module, config: MethodConfig, num_classes: int, head: HeadConfig | None = None) -> PromptModel:
    """Wrap a backbone of any supported family (timm ViT, Eva, BEiT, Swin, open_clip) with a method's
    config and a new head for ``num_classes`` classes (``head``: random Linear, text or CoOp)."""
    return PromptModel(backbone, config, num_classes, head)
