"""Classification heads a PromptModel can put on its pooled features (docs/methods.md, "Heads").

- ``random``: vptune's own Linear (or MLP) head, randomly initialised: any backbone.
- ``text``: CLIP's zero-shot classifier as a head: one weight row per class, the normalised
  mean text embedding of the class name in prompt templates (open_clip's
  ``build_zero_shot_classifier``), applied to normalised image features and scaled by CLIP's
  logit scale. Untrained, the model *is* the zero-shot classifier; trained, the rows are tuned
  tensors like any head (a linear probe initialised from text).
- ``coop``: CoOp (Zhou et al., 2022): learned context vectors (unified, or one set per class)
  stand where the template's words were, before each class name's word embeddings; the frozen
  text tower turns them into the class weights at every step.

Text heads need a backbone with a text tower (a family with ``encode_embedded``: open_clip CLIPs
and the bundled CLIP). They never know which family that is: they call its text methods. A
head's settings travel in the run config (``HeadConfig``); its tensors in the run's safetensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_KINDS = ("random", "text", "coop")
TEMPLATE_SETS = ("openai", "simple")  # open_clip's 80 ImageNet templates, or its 7 short ones


@dataclasses.dataclass
class HeadConfig:
    """What head a PromptModel has. ``class_names`` (text, coop) are the texts put in the
    templates; ``templates`` a template set name or format strings with ``{}`` (default: the
    backbone's own, else open_clip's ``openai`` set); CoOp: ``n_ctx`` context vectors,
    ``class_specific`` sets, initialised from the word embeddings of ``ctx_init`` if given."""

    kind: str = "random"
    class_names: tuple[str, ...] | None = None
    templates: tuple[str, ...] | str | None = None
    n_ctx: int = 16
    class_specific: bool = False
    ctx_init: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head {self.kind!r}; expected one of: {', '.join(HEAD_KINDS)}")
        if self.class_names is not None:
            self.class_names = tuple(self.class_names)
        if isinstance(self.templates, list):
            self.templates = tuple(self.templates)
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "HeadConfig":
        return cls(**(data or {}))


def resolve_templates(templates: tuple[str, ...] | str | None, family) -> list[str]:
    """Format strings with ``{}``: a named open_clip set, the given strings, or the backbone's own
    default (the bundled CLIP's is ``{}``: its class texts are whole captions)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if templates is None:
        templates = getattr(family.model, "zero_shot_templates", None) or "openai"
    if isinstance(templates, str):
        named = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
        if templates in named:
            return [t("{}") for t in named[templates]]
        templates = (templates,)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} has no {{}} for the class name; use {' or '.join(TEMPLATE_SETS)} or strings with {{}}")
    return list(templates)


def _text_family(family, kind: str):
    if not hasattr(family, "encode_embedded"):
        raise ValueError(
            f"--head {kind} needs a backbone with a text tower (open_clip:NAME/TAG or the bundled vptune_clip_fmnist); "
            f"{family.describe()['architecture']} ({family.name} family) has none: pass --head random"
        )
    return family


def _names(config: HeadConfig, num_classes: int) -> list[str]:
    names = list(config.class_names or [])
    if len(names) != num_classes:
        raise ValueError(f"--head {config.kind} needs {num_classes} class names, got {len(names)}")
    return names


class TextHead(nn.Module):
    """``scale * normalise(features) @ weight.T``: CLIP's zero-shot classifier when ``weight``
    holds normalised text embeddings (C, D)."""

    def __init__(self, weight: Tensor, logit_scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.logit_scale = logit_scale

    def forward(self, features: Tensor) -> Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ self.weight.T.to(features.dtype)


class CoOpHead(nn.Module):
    """CoOp: ``[SOS] ctx_1 .. ctx_M name-words . [EOS]`` through the frozen text tower gives each
    class's weight; logits as CLIP's, ``scale * cos(image, class)``. The context vectors are the
    only tensors (``ctx``: (M, w), or (C, M, w) class-specific); the prompt's other word
    embeddings are fixed buffers. At inference without grad the class weights are cached while
    ``ctx`` keeps its values."""

    def __init__(self, family, class_names: list[str], n_ctx: int, class_specific: bool, ctx_init: str | None,
                 logit_scale: float) -> None:
        super().__init__()
        self.family = family  # not a module: the text tower stays the backbone's, frozen and unsaved
        self.logit_scale = logit_scale
        placeholder = " ".join(["X"] * n_ctx)
        tokens = family.tokenize([f"{placeholder} {name}." for name in class_names])  # C, L
        start = _context_start(family, n_ctx)
        with torch.no_grad():
            embedded = family.embed_tokens(tokens).float()  # C, L, w
        width = embedded.shape[-1]
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :start], persistent=False)
        self.register_buffer("suffix", embedded[:, start + n_ctx :], persistent=False)
        shape = (len(class_names), n_ctx, width) if class_specific else (n_ctx, width)
        if ctx_init:
            init_tokens = family.tokenize([ctx_init])
            words = int((init_tokens[0] != 0).sum()) - 2  # without the start and end tokens
            if words != n_ctx:
                raise ValueError(f"ctx_init {ctx_init!r} is {words} tokens; it must be n_ctx={n_ctx}")
            with torch.no_grad():
                ctx = family.embed_tokens(init_tokens)[0, start : start + n_ctx].float()
            ctx = ctx.expand(shape).clone()
        else:
            ctx = torch.empty(shape).normal_(std=0.02)  # CoOp's initialisation
        self.ctx = nn.Parameter(ctx)
        self._cache: tuple[Tensor, Tensor] | None = None

    def class_features(self) -> Tensor:
        """Normalised text features (C, D) of the current context vectors."""
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(self.prefix.shape[0], -1, -1)
        x = torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)  # C, L, w
        return F.normalize(self.family.encode_embedded(x, self.tokens), dim=-1)

    def forward(self, features: Tensor) -> Tensor:
        if not self.training and not torch.is_grad_enabled():
            if self._cache is None or not torch.equal(self._cache[0], self.ctx):
                self._cache = (self.ctx.detach().clone(), self.class_features())
            weights = self._cache[1]
        else:
            weights = self.class_features()
        return self.logit_scale * F.normalize(features, dim=-1) @ weights.T.to(features.dtype)


def _context_start(family, n_ctx: int) -> int:
    """Where the placeholder words start: after the start-of-text token (both tokenizers have one)."""
    tokens = family.tokenize([" ".join(["X"] * n_ctx)])[0]
    used = int((tokens != 0).sum())
    if used != n_ctx + 2:
        raise ValueError(f"the tokenizer does not give one token per context word ({used} tokens for {n_ctx} words + 2)")
    return 1


def build_head(config: HeadConfig, family, num_classes: int, hidden_layers: int = 0, *, initialise: bool = True) -> nn.Module:
    """The head ``config`` describes on ``family``'s pooled features. ``initialise=False`` skips
    computing the text weights (a saved run's tensors replace them)."""
    from .model import make_head

    if config.kind == "random":
        return make_head(family.num_features, num_classes, hidden_layers)
    if hidden_layers:
        raise ValueError(f"--head {config.kind} is a single text-initialised layer; the mlp method needs --head random")
    family = _text_family(family, config.kind)
    names = _names(config, num_classes)
    scale = family.logit_scale()
    if config.kind == "text":
        if not initialise:
            return TextHead(torch.zeros(num_classes, family.num_features), scale)
        return TextHead(family.zero_shot_weights(names, resolve_templates(config.templates, family)), scale)
    return CoOpHead(family, names, config.n_ctx, config.class_specific, config.ctx_init, scale)


CLASSNAMES_FILE = "classnames.txt"


def class_names_for(data_spec: str, class_names: list[str]) -> list[str]:
    """The texts a text head puts in its templates for the classes of ``data_spec``: a
    ``classnames.txt`` in the data folder (one per line, in label order), else the mini
    benchmark's class texts (in the bundled CLIP's caption words) or task names, else the
    ImageFolder folder names. Numeric labels with no file are refused, saying where names are read."""
    kind, _, argument = data_spec.partition(":")
    if kind == "mini":
        from .data.texts import class_texts

        try:
            return class_texts(argument)
        except ValueError:
            return list(class_names)
    from pathlib import Path

    folder = Path(argument).expanduser()
    file = folder / CLASSNAMES_FILE
    if file.is_file():
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if len(names) != len(class_names):
            raise ValueError(f"{file} has {len(names)} names; the data has {len(class_names)} classes (one name per line, in label order)")
        return names
    if kind == "imagefolder" or not all(name.isdigit() for name in class_names):
        return list(class_names)
    raise ValueError(
        f"a text head needs class names and {data_spec} has numeric labels: they are read from {file} "
        "(one per line, in label order), from ImageFolder folder names, or from the mini tasks' names; "
        "write that file or pass --head random"
    )


def head_for_run(head: str | None, config, family, data_spec: str, class_names: list[str], *,
                 templates: str | None = None, text_prompts: dict[str, Any] | None = None) -> HeadConfig:
    """The head of a training run: ``head`` if given, else ``text`` on a backbone with a text tower
    (but for the mlp method) and ``random`` otherwise; ``coop`` when the method is CoOp or ``text_prompts`` (CoOp's options)
    asks for it, with the class names of ``data_spec`` (``class_names_for``)."""
    implied = getattr(config, "text_prompts", None)
    if implied is not None:
        if head == "random":
            raise ValueError(f"method {config.method_name()} trains a text head; drop --head random")
        text_prompts = implied()
    if text_prompts is not None:
        if head not in (None, "coop"):
            raise ValueError(f"--text-prompts coop replaces the head with CoOp's; drop --head {head}")
        kind, options = "coop", {k: v for k, v in text_prompts.items() if k != "kind"}
    else:
        text_default = hasattr(family, "encode_embedded") and not config.head_hidden_layers()  # mlp: its own head
        kind, options = head or ("text" if text_default else "random"), {}
    if kind == "random":
        return HeadConfig()
    _text_family(family, kind)
    return HeadConfig(kind=kind, class_names=tuple(class_names_for(data_spec, class_names)), templates=templates, **options)
