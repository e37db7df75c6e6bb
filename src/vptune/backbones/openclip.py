"""The open_clip family: CLIP models whose image tower is open_clip's ``VisionTransformer``.

The family wraps the whole CLIP model (image and text towers, logit scale) and walks its image
tower: ``conv1``, class and position embeddings and ``ln_pre`` (the tower's own ``_embeds``),
then its ``ResidualAttentionBlock``\\ s (``ln_1``, ``nn.MultiheadAttention``, ``ls_1``, ``ln_2``,
``mlp``, ``ls_2``) re-composed through ``vptune.attention``, then ``ln_post``, the tower's own
pooling and ``proj``. Pooled features are CLIP's image embeddings (before normalisation), so
a head initialised from the text tower (``vptune.heads``) is the zero-shot classifier.

Everything outside ``visual.`` (the text tower, the logit scale) is, for the methods, what a
classifier head is for a timm model: never tuned, not counted as backbone parameters. The text
tower is re-composed here too (``encode_embedded``: token embeddings in, CLIP text embeddings
out), so that CoOp can feed learned context vectors where word embeddings were.

A CLIP whose image tower is a timm model (open_clip's ``TimmModel``) is walked by the timm family
of its ``trunk`` (``TimmTowerFamily``), with open_clip's own ``head`` (its projection) after it.

Names come from ``open_clip.list_models()``; the name is recorded in the run (``architecture``
``open_clip:NAME``), so a run trained on one CLIP is refused on another.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import block_forward, block_prompt_keys_values
from .family import AttentionSite, Family, SequenceFamily, architecture, family_of, register_family

PREFIX = "open_clip:"


def _open_clip_loaded() -> bool:
    """A model can only be an open_clip model once open_clip is imported; not importing it
    otherwise keeps ``family_of`` cheap for timm models."""
    return "open_clip" in sys.modules


class TextTowerMixin:
    """The text side of a CLIP model (``CLIP`` or ``CustomTextCLIP``), re-composed from open_clip's
    own modules: ``token_embedding``, ``positional_embedding``, ``transformer`` (with its causal
    ``attn_mask``), ``ln_final``, argmax/EOT pooling and ``text_projection``."""

    model: nn.Module

    @property
    def text(self) -> nn.Module:
        """The module holding the text tower's parts (the CLIP itself, or its ``.text``)."""
        text = getattr(self.model, "text", None)
        owner = text if text is not None else self.model
        if getattr(owner, "token_embedding", None) is None:
            raise TypeError(f"{architecture(self.model)} has no open_clip text tower (token_embedding, transformer)")
        return owner

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids (B, context length) by the model's tokenizer: the one ``load_backbone`` attached
        (``model.tokenizer``), else open_clip's CLIP BPE tokenizer at the tower's context length."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = self.model.tokenizer = SimpleTokenizer(context_length=self.text.positional_embedding.shape[0])
        return tokenizer(list(texts))

    def logit_scale(self) -> float:
        """CLIP's learned temperature, ``exp(logit_scale)`` (100 for OpenAI's models)."""
        return float(self.model.logit_scale.detach().exp())

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Word embeddings (B, L, w) of ``tokens``: what CoOp's context vectors stand in for."""
        return self.text.token_embedding(tokens.to(self.text.token_embedding.weight.device))

    def encode_embedded(self, x: Tensor, tokens: Tensor) -> Tensor:
        """CLIP text embeddings (B, D) of word embeddings ``x`` (B, L, w) laid out like ``tokens``
        (whose argmax, the end-of-text token, is where the sequence is pooled)."""
        from open_clip.transformer import text_global_pool

        text = self.text
        if getattr(text, "cls_emb", None) is not None:
            raise TypeError("CLIP text towers with a class embedding (CoCa) are not supported for text heads")
        tokens = tokens.to(x.device)
        x = x + text.positional_embedding[: x.shape[1]].to(x.dtype)
        mask = text.attn_mask
        x = text.transformer(x, attn_mask=None if mask is None else mask[: x.shape[1], : x.shape[1]])
        x = text.ln_final(x)
        pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
        x = text_global_pool(x, tokens, pool, eos_token_id=getattr(text, "text_eos_id", getattr(text, "eos_id", None)))
        projection = text.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.encode_embedded(self.embed_tokens(tokens), tokens)

    def zero_shot_weights(self, class_names: list[str], templates: list[str]) -> Tensor:
        """open_clip's zero-shot classifier (C, D): per class, the mean of the normalised text
        embeddings of ``templates`` filled with its name, normalised again."""
        from open_clip import build_zero_shot_classifier

        device = next(self.model.parameters()).device
        weights = build_zero_shot_classifier(self.model, self.tokenize, class_names, templates, device=device)
        return weights.T.contiguous()


def _open_clip_tower(model: nn.Module) -> nn.Module | None:
    """``model``'s open_clip image tower, or None."""
    from open_clip.transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return model
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, VisionTransformer) else None


@register_family
class OpenCLIPFamily(TextTowerMixin, SequenceFamily):
    name = "open_clip"
    model_class = "open_clip CLIP with its VisionTransformer image tower"

    def __init__(self, model: nn.Module) -> None:
        self.visual = _open_clip_tower(model)
        self.prefix = "" if self.visual is model else "visual."
        # For the methods, everything but the image tower is like a timm model's classifier head.
        self.head_prefixes = () if self.visual is model else tuple(
            name + ("." if name in dict(model.named_children()) else "")
            for name in [*dict(model.named_children()), *dict(model.named_parameters(recurse=False))]
            if name != "visual"
        )
        super().__init__(model)

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return _open_clip_loaded() and _open_clip_tower(model) is not None

    def check(self) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        for i, block in enumerate(self.blocks):
            attn = block.attn
            base = attn.get_base_layer() if hasattr(attn, "get_base_layer") else attn  # peft's LoRA wrapper
            ok = (
                type(block).forward is ResidualAttentionBlock.forward
                and isinstance(base, nn.MultiheadAttention)
                and base._qkv_same_embed_dim and base.bias_k is None and not base.add_zero_attn and base.batch_first
                and not hasattr(block, "ln_1_kv")
            )
            if not ok:
                raise TypeError(
                    f"block {i} of {architecture(self.model)} is a {type(block).__name__} with {type(base).__name__}: "
                    "vptune walks open_clip towers built of ResidualAttentionBlock with a batch-first, packed-projection "
                    "nn.MultiheadAttention (CustomResidualAttentionBlock, qk-norm or scaled-cosine towers are not supported)"
                )

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the class embedding

    @property
    def sites(self) -> list[AttentionSite]:
        width = self.visual.transformer.width
        return [AttentionSite(width, b.attn.num_heads, b.attn.head_dim) for b in self.blocks]

    @property
    def num_features(self) -> int:
        proj = self.visual.proj
        return self.visual.transformer.width if proj is None else proj.shape[1]

    @property
    def prompt_fan_in(self) -> int:
        conv = self.visual.conv1
        return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

    def num_positions(self) -> int:
        return self.visual.positional_embedding.shape[0]

    def input_size(self) -> tuple[int, int, int]:
        return (self.visual.conv1.in_channels, *self.visual.image_size)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "patch_size": list(self.visual.patch_size),
            "num_prefix_tokens": 1,
            "global_pool": self.visual.pool_type if self.visual.attn_pool is None else "attn_pool",
            "output_dim": self.num_features,
        }

    def fingerprint(self) -> str:
        import hashlib

        weight = self.visual.conv1.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]

    @property
    def final_prefixes(self) -> tuple[str, ...]:  # tuned with the last blocks (partial)
        return tuple(self.prefix + name for name in ("ln_post.", "proj", "attn_pool."))

    def block_prefixes(self) -> list[str]:
        return [f"{self.prefix}transformer.resblocks.{i}." for i in range(len(self.blocks))]

    def lora_pattern(self, targets: tuple[str, ...]) -> str:
        """peft adapts an ``nn.MultiheadAttention`` as a whole (in_proj and out_proj together, its
        ``lora.MultiheadAttention``); ``out_proj`` alone is a Linear it adapts like timm's ``proj``."""
        base = re.escape(self.prefix) + r"transformer\.resblocks\.\d+\.attn"
        if set(targets) == {"proj"}:
            return base + r"\.out_proj"
        if "proj" not in targets:
            raise ValueError(
                "LoRA on open_clip's attention: peft adapts nn.MultiheadAttention's in_proj (qkv) only together with "
                "its out_proj; use targets ('qkv', 'proj') or ('proj',)"
            )
        return base

    # --- the walk ---------------------------------------------------------------------------
    def embed(self, images: Tensor) -> tuple[Tensor, None]:
        """Patch embedding, class and position embeddings, patch dropout and ``ln_pre``."""
        return self.visual._embeds(images), None

    def block_forward(self, index, x, aux, extra_k, extra_v, bias, hook, queries, prompts) -> Tensor:
        return block_forward(self.blocks[index], x, extra_k, extra_v, bias, hook, queries)

    def prompt_keys_values(self, index: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        return block_prompt_keys_values(self.blocks[index], prompts)

    def pooled_outputs(self) -> int | None:
        visual = self.visual
        return 1 if visual.attn_pool is None and visual.pool_type == "tok" else None

    def pooled_features(self, x: Tensor) -> Tensor:
        """``ln_post``, the tower's pooling and ``proj``: CLIP's image embedding (unnormalised)."""
        pooled, _ = self.visual._pool(x)
        return pooled if self.visual.proj is None else pooled @ self.visual.proj


@register_family
class TimmTowerFamily(TextTowerMixin, Family):
    """A CLIP whose image tower is open_clip's ``TimmModel``: the timm family of its ``trunk``
    walks it, open_clip's ``head`` (pooling/projection) follows."""

    name = "open_clip_timm"
    model_class = "open_clip CLIP with a timm image tower (TimmModel)"

    def __init__(self, model: nn.Module) -> None:
        self.trunk_family = family_of(model.visual.trunk)
        super().__init__(model)
        self.head_prefixes = tuple(
            name + ("." if name in dict(model.named_children()) else "")
            for name in [*dict(model.named_children()), *dict(model.named_parameters(recurse=False))]
            if name != "visual"
        ) + ("visual.trunk.head.",)

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        if not _open_clip_loaded():
            return False
        from open_clip.timm_model import TimmModel

        return isinstance(getattr(model, "visual", None), TimmModel)

    @property
    def sites(self) -> list[AttentionSite]:
        return self.trunk_family.sites

    @property
    def num_features(self) -> int:
        return self.model.visual.head.proj.out_features if hasattr(self.model.visual.head, "proj") else self.trunk_family.num_features

    @property
    def prompt_fan_in(self) -> int:
        return self.trunk_family.prompt_fan_in

    @property
    def add_location(self) -> bool:  # type: ignore[override]
        return self.trunk_family.add_location

    def num_positions(self) -> int:
        return self.trunk_family.num_positions()

    def input_size(self) -> tuple[int, int, int]:
        return self.trunk_family.input_size()

    def describe(self) -> dict[str, Any]:
        trunk = self.trunk_family.describe()
        return {**trunk, "family": self.name, "architecture": architecture(self.model), "trunk": trunk["architecture"]}

    def fingerprint(self) -> str:
        return self.trunk_family.fingerprint()

    @property
    def final_prefixes(self) -> tuple[str, ...]:
        return tuple("visual.trunk." + p for p in self.trunk_family.final_prefixes) + ("visual.head.",)

    def block_prefixes(self) -> list[str]:
        return ["visual.trunk." + p for p in self.trunk_family.block_prefixes()]

    def lora_pattern(self, targets: tuple[str, ...]) -> str:
        return r"visual\.trunk\." + self.trunk_family.lora_pattern(targets)

    def embed(self, images: Tensor) -> tuple[Tensor, Any]:
        return self.trunk_family.embed(images)

    def run_blocks(self, x, aux, method, checkpoint=False, outputs=None) -> Tensor:
        return self.trunk_family.run_blocks(x, aux, method, checkpoint=checkpoint, outputs=outputs)

    def pooled_outputs(self) -> int | None:
        return self.trunk_family.pooled_outputs()

    def pooled_features(self, x: Tensor) -> Tensor:
        """The trunk's pooling, then open_clip's head (its projection to CLIP's embedding)."""
        return self.model.visual.head(self.trunk_family.pooled_features(x))


# --- loading -----------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``open_clip:NAME[/TAG]`` -> (NAME, TAG or None)."""
    body = spec[len(PREFIX) :]
    name, _, tag = body.partition("/")
    return name, (tag or None)


def _close(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=6, cutoff=0.4)
    return f" Close names: {', '.join(close)}." if close else ""


def create_open_clip(spec: str, weights: str | Path | None = None) -> nn.Module:
    """The CLIP model of ``spec`` (``open_clip:NAME/TAG``): open_clip's pretrained weights for TAG
    (downloaded by open_clip, needs internet), a local ``weights`` file instead, or random
    weights with no TAG. A name or tag open_clip does not know is refused with close names."""
    from ..extras import require

    require("clip", purpose=f"--backbone {spec}")
    import open_clip

    name, tag = parse_spec(spec)
    models = open_clip.list_models()
    if name not in models:
        raise ValueError(f"unknown open_clip model {name!r} (from --backbone {spec}).{_close(name, models)} "
                         "All names: open_clip.list_models()")
    tags = [t for n, t in open_clip.list_pretrained() if n == name]
    if tag is not None and weights is None and tag not in tags:
        raise ValueError(
            f"open_clip has no pretrained tag {tag!r} for {name}: its tags are {', '.join(tags) or 'none'}"
            f"{_close(tag, [t for _, t in open_clip.list_pretrained()])}"
        )
    if tag is not None and weights is None:
        try:
            model = open_clip.create_model(name, pretrained=tag)
        except Exception as error:  # hub download: network, missing files
            raise ConnectionError(
                f"could not fetch open_clip's {name}/{tag} weights ({type(error).__name__}: {error}). This needs "
                "internet access; offline, download them elsewhere and pass the file with --weights FILE"
            ) from error
    else:
        model = open_clip.create_model(name)
        if weights is not None:
            load_open_clip_weights(model, weights)
    model.tokenizer = open_clip.get_tokenizer(name)
    return describe_model(model, f"{PREFIX}{name}")


def describe_model(model: nn.Module, arch: str) -> nn.Module:
    """Give an open_clip model the ``pretrained_cfg`` timm's data config and vptune read: its
    architecture name, input size, and the normalisation it was trained with."""
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = tuple(getattr(visual, "image_size", None) or cfg.get("size") or (224, 224))
    size = size if len(size) == 2 else (size[0], size[0])
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    model.pretrained_cfg = {
        "architecture": arch,
        "input_size": (3, *size),
        "mean": tuple(cfg.get("mean") or OPENAI_DATASET_MEAN),
        "std": tuple(cfg.get("std") or OPENAI_DATASET_STD),
        "interpolation": cfg.get("interpolation") or "bicubic",
        "crop_pct": 1.0,
    }
    return model.eval()


def load_open_clip_weights(model: nn.Module, path: str | Path) -> None:
    """A local CLIP checkpoint (.safetensors, or .pt/.pth/.bin read with ``weights_only``); every
    tensor must fit, and a mismatch names the keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix.lower() in (".pt", ".pth", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
    else:
        raise ValueError(f"unsupported weights file {path}: expected .safetensors or .pt/.pth")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape)
    problems = [f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", misshaped)) if keys]
    if problems:
        raise ValueError(f"{path} does not match this open_clip model: " + "; ".join(problems)
                         + ". Pass the open_clip name these weights were trained for")
    model.load_state_dict(state)
