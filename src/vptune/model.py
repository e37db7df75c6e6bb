"""PromptModel: a frozen backbone, one method and a classification head.

Only the method's tensors and the head are trained and saved (``config.json`` plus
``model.safetensors``), so a task costs kilobytes and many models can share one backbone
instance. The backbone is frozen and kept in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .atomic import atomic_write
from .backbones.family import Family, family_of
from .heads import HeadConfig, build_head
from .methods import MethodConfig, config_from_dict
from .tasks import ClassificationTask, Task

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vptune-run/1"
# More classes than any classification benchmark (ImageNet-21k: 21,843); a head this wide on
# ViT-B already holds 768M parameters, so a larger count is a typo or a damaged run, refused.
MAX_CLASSES = 1_000_000
# Backbone properties a saved run must match; the others (image size, say) may differ.
_MUST_MATCH = ("family", "architecture", "embed_dim", "depth", "num_heads", "head_dim", "sites", "num_prefix_tokens", "global_pool", "window_sizes")


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
    """A frozen backbone, one method and a head. ``head`` (a ``vptune.heads.HeadConfig``) picks a
    classification head: vptune's random Linear (default), CLIP's zero-shot classifier from the
    text tower, or CoOp; ``init_head=False`` leaves a text head's weights to be loaded. ``task``
    (``vptune.tasks``: VQA, NLVR, retrieval) puts that task's head on the pooled features instead.
    ``backbone_train_mode`` keeps the backbone's own dropout active while training (default: the
    family's recipe, off for the image families, on for ViLT); ``also_tune`` trains the run's own
    copies of the family's ``also_tuned`` backbone modules (ViLT's pooler and token types) with
    every method that does not tune them already."""

    def __init__(
        self, backbone: nn.Module, config: MethodConfig, num_classes: int | None = None, head: HeadConfig | None = None,
        *, init_head: bool = True, task: Task | None = None, backbone_train_mode: bool | None = None, also_tune: bool = True,
    ) -> None:
        super().__init__()
        family = family_of(backbone)
        if task is None:
            task = ClassificationTask(check_num_classes(num_classes), config.head_hidden_layers())
        backbone.requires_grad_(False)
        backbone.eval()
        self.config = config
        self.task = task
        self.backbone_fingerprint = family.fingerprint()
        self.backbone_parameters = family.num_parameters()  # before a method adds its own (LoRA)
        self.method = config.build(family)
        self.backbone = self.method.prepare_backbone(backbone)
        self.family: Family = family if self.backbone is backbone else family_of(self.backbone)
        self.backbone_train_mode = family.backbone_train_mode if backbone_train_mode is None else bool(backbone_train_mode)
        self.also_tuned = nn.ModuleDict(self._own_copies(task) if also_tune else {})
        self.head_config = head or HeadConfig()
        implied = getattr(config, "text_prompts", None)  # a text-side method (CoOp) implies its head
        if implied is not None:
            self.head_config = dataclasses.replace(self.head_config, **implied())
        if isinstance(task, ClassificationTask):
            self.head = build_head(self.head_config, self.family, num_classes, config.head_hidden_layers(), initialise=init_head)
            self.num_classes = num_classes
        else:
            self.head = family.task_head(task, family.num_features)
            self.num_classes = _outputs(self.head)
        self.metadata: dict[str, Any] = {}
        self.grad_checkpointing = False

    def _own_copies(self, task: Task) -> dict[str, nn.Module]:
        """Trained copies of the family's ``also_tuned`` modules, which its walk then reads;
        a module the method already tunes (full fine-tuning) is left to it."""
        copies = {}
        for path in self.family.also_tuned:
            module = self.backbone.get_submodule(path)
            if all(p.requires_grad for p in module.parameters()):
                continue
            copies[path] = copy.deepcopy(module).requires_grad_(True)
        copies = self.family.adapt_copies(copies, task)
        self.family.overrides.update(copies)
        return {path.replace(".", "__"): module for path, module in copies.items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward instead of storing them: far less
        training memory for about one more forward's time; gradients are unchanged."""
        self.grad_checkpointing = enable

    def train(self, mode: bool = True) -> "PromptModel":
        super().train(mode)
        if not self.backbone_train_mode:
            self.backbone.eval()  # the VPT recipe: backbone dropout and drop-path stay off
        return self

    def forward_features(self, images: Tensor) -> Tensor:
        """The backbone's tokens after the last block, prompts removed."""
        x, aux = self.family.embed(images)
        return self.family.run_blocks(x, aux, self.method, checkpoint=self.grad_checkpointing)

    def forward(self, inputs: Tensor | Mapping[str, Any]) -> Tensor:
        """Head outputs for images (B, C, H, W), or for a batch dict of a vision-language task:
        ``image`` with the text (``input_ids``, ``attention_mask``): one pass; ``image`` (B, K,
        C, H, W): each text against K images, scores (B, K) (retrieval); ``image0`` and
        ``image1``: each image encoded with the text (token type 1, then 2, as ViLT does), the
        head on both pooled features (NLVR)."""
        if isinstance(inputs, Tensor):
            # With token pooling only the class token leaves the last block: the rest is not computed.
            return self.head(self.encode(inputs))
        if not self.family.reads_text:
            raise ValueError(f"a {self.task.name} batch needs a vision-language backbone; this one ({self.family.name}) "
                             "reads images only: pass --backbone hf:dandelin/vilt-b32-mlm or another ViLT")
        pairs = [key for key in ("image0", "image1") if key in inputs]
        if pairs:
            pooled = [self.encode({**inputs, "image": inputs[key], "image_token_type_idx": i + 1}) for i, key in enumerate(pairs)]
            return self.head(*pooled)
        image = inputs.get("image")
        if image is None:
            raise ValueError(f"the batch has no image: expected 'image' (or 'image0' and 'image1'); it has {sorted(inputs)}")
        if image.dim() == 5:  # B texts, each against K images
            B, K = image.shape[:2]
            flat = {**inputs, "image": image.flatten(0, 1)}
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in inputs:
                    flat[key] = inputs[key].repeat_interleave(K, 0)
            return self.head(self.encode(flat)).reshape(B, K)
        return self.head(self.encode(inputs))

    def encode(self, inputs: Tensor | Mapping[str, Any]) -> Tensor:
        """Pooled features (B, d) of images or of one image-text batch, with the method's hooks."""
        return self.family.features(inputs, self.method, checkpoint=self.grad_checkpointing)

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
        } | self._recipe()

    def _recipe(self) -> dict[str, Any]:
        """What an image-classification run of vptune 0.1 did not record (its config stays as it was)."""
        extra: dict[str, Any] = {}
        if not isinstance(self.task, ClassificationTask):
            extra["task"] = self.task.to_dict()
        if self.also_tuned:
            extra["also_tuned"] = [name.replace("__", ".") for name in self.also_tuned]
        if self.backbone_train_mode:
            extra["backbone_train_mode"] = True
        return extra

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write only what was tuned: ``model.safetensors`` and ``config.json``, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.contiguous().cpu() for name, t in self.tuned_state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
        config = json.dumps(self.run_config(), indent=2)
        atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(config))

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
                    HeadConfig.from_dict(run.get("head")), init_head=False, task=task_from_dict(run.get("task")),
                    backbone_train_mode=run.get("backbone_train_mode", False), also_tune=bool(run.get("also_tuned")))
        model.metadata = run.get("metadata", {})
        names = model.metadata.get("class_names") if isinstance(model.task, ClassificationTask) else None
        if names is not None and (not isinstance(names, list) or len(names) != model.num_classes
                                  or not all(isinstance(name, str) for name in names)):
            count = len(names) if isinstance(names, list) else type(names).__name__
            raise ValueError(
                f"{directory / CONFIG_FILE}: metadata.class_names holds {count} names for {model.num_classes} classes; "
                "expected one name (a string) per class: the run folder is damaged"
            )
        model.load_tuned_state_dict(read_weights(directory), source=str(directory / WEIGHTS_FILE))
        return model.to(next(backbone.parameters()).device)


def _outputs(head: nn.Module) -> int | None:
    """The width of a head's last Linear layer (its outputs per input); None for a head without
    one (generation's: the denoising error itself)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def task_from_dict(data: dict[str, Any] | None) -> Task | None:
    """The task a run's config records (None: classification, as every run of vptune 0.1)."""
    if data is None:
        return None
    from .tasks import TASKS

    data = dict(data)
    name = data.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"run config names task {name!r}; vptune knows {', '.join(TASKS)}")
    return TASKS[name](**data)


def check_num_classes(num_classes: Any) -> int:
    """``num_classes`` if it is an integer from 1 to MAX_CLASSES, else a ValueError saying why
    (before a head of that size is allocated)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if num_classes > MAX_CLASSES:
        raise ValueError(
            f"num_classes is {num_classes:,}: more than {MAX_CLASSES:,} classes is refused (the head alone would hold "
            f"{num_classes:,} x width weights); a label or config typo?"
        )
    return num_classes


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


def prompt_model(backbone: nn.Module, config: MethodConfig, num_classes: int | None = None, head: HeadConfig | None = None,
                 **options: Any) -> PromptModel:
    """Wrap a backbone of any supported family (timm ViT, Eva, BEiT, Swin, open_clip, ViLT) with a
    method's config and a new head for ``num_classes`` classes (``head``: random Linear, text or
    CoOp), or a task's head (``task=``, see ``PromptModel``)."""
    return PromptModel(backbone, config, num_classes, head, **options)
