"""``load_backbone``: the bundled backbones, any timm model of a supported family (ViT, Eva,
BEiT, Swin) by name, and local weight files.

Only the classifier head of a weights file may differ from the model (vptune trains its own
head); any other missing, unexpected or mis-shaped tensor is an error naming file and keys.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
import sys

from torch import nn

from .bundled import BUNDLED, BUNDLED_BACKBONE, build_bundled, bundled_weights_path
from .family import family_of

_NESTED_KEYS = ("state_dict", "model", "model_ema", "module")
_SHOWN = 8


def load_backbone(
    spec: str = BUNDLED_BACKBONE, *, weights: str | Path | None = None, pretrained: bool = False
) -> nn.Module:
    """A frozen-ready backbone in eval mode.

    ``spec`` is a bundled backbone's name (``vptune_vit_fmnist``, ``vptune_swin_fmnist``: its
    shipped weights, no download), a timm model
    name (random weights, or timm's hub weights with ``pretrained=True``), or
    ``open_clip:NAME[/TAG]`` (a whole CLIP model: open_clip's weights for TAG), the bundled CLIP
    ``vptune_clip_fmnist``, the bundled ViLT ``vptune_vilt_fmnist``, ``hf:NAME`` (a transformers ViLT), the bundled
    METER ``vptune_meter_fmnist``, or ``meter[:SIZE]`` (METER-B's
    shape at SIZE px, default 288: random weights, or an official checkpoint with ``weights``). ``weights`` loads a local
    .safetensors, .pth/.pt or big_vision .npz file instead (for ``hf:``, a ``save_pretrained``
    folder or a .safetensors file).
    """
    if spec == "vptune_clip_fmnist":
        from .clip_bundled import load_bundled_clip

        return load_bundled_clip(weights)
    if spec == "vptune_meter_fmnist":
        from .meter_bundled import load_bundled_meter

        return load_bundled_meter(weights)
    if spec == "meter" or spec.startswith("meter:"):
        from .meter import load_meter

        return load_meter(spec, weights)
    if spec == "vptune_vilt_fmnist":
        from .vilt_bundled import load_bundled_vilt

        model = load_bundled_vilt(weights)
        family_of(model)
        return model
    if spec.startswith("hf:"):
        from .vilt import load_vilt

        model = load_vilt(spec, weights, pretrained)
        family_of(model)
        return model
    if spec.startswith("open_clip:"):
        from .openclip import create_open_clip

        model = create_open_clip(spec, weights)
        family_of(model)
        return model.eval()
    if spec in BUNDLED:
        model = build_bundled(name=spec)
        if weights is None:
            weights = bundled_weights_path(spec)
            if not weights.is_file():
                arch = BUNDLED[spec].arch
                raise FileNotFoundError(
                    f"the bundled backbone's weights are missing ({weights}). Create them with "
                    f"`vptune pretrain --arch {arch}` (or `python -m vptune.backbones.pretrain --arch {arch} "
                    "--out src/vptune/weights`), or pass another backbone"
                )
    else:
        model = _create_timm(spec, pretrained=pretrained and weights is None)
    family_of(model)  # refuses a model of no supported family
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}: neither the bundled {BUNDLED_BACKBONE!r} (or {', '.join(repr(b) for b in BUNDLED if b != BUNDLED_BACKBONE)}) nor a timm model name.{hint}"
        )
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as error:  # hub download: network, auth, missing files
        if not pretrained:
            raise
        raise ConnectionError(
            f"could not fetch timm's pretrained weights for {name!r} ({type(error).__name__}: {error}). "
            "This needs internet access to the Hugging Face hub; offline, download the weights elsewhere "
            "and pass them with --weights FILE"
        ) from error


def cached_pretrained_weights(name: str) -> Path | None:
    """The local file of timm's pretrained weights for model ``name`` if an earlier download left
    it in the Hugging Face hub cache or torch's hub cache; never downloads anything."""
    import os
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
    return None


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model``; the classifier head may differ or be absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise ValueError(f"{path}: big_vision .npz weights load into timm VisionTransformer models only, not {type(model).__name__}")
        try:
            model.load_pretrained(str(path))
        except Exception as error:  # noqa: BLE001  numpy and zipfile raise many types for a damaged file
            raise ValueError(
                f"{path} does not fit {type(model).__name__} as big_vision npz weights, or is damaged "
                f"({type(error).__name__}: {error})"
            ) from None
        return
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"unsupported weights file {path}: expected .safetensors, .pth/.pt or .npz")
    try:
        if suffix == ".safetensors":
            state = load_file(str(path))
        else:  # weights_only: a pickle that would run code or build objects is refused, never executed
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"weights file {path} cannot be read: it holds pickled objects other than tensors, which vptune never "
            "loads (they could run code); use a .safetensors file, or a .pth of plain tensors"
        ) from None
    except Exception as error:  # noqa: BLE001  truncated or damaged: torch and safetensors raise many types
        raise ValueError(
            f"weights file {path} cannot be read ({type(error).__name__}: {_first_sentence(error)}): it is truncated "
            "or damaged; download it again"
        ) from None
    load_state(model, _unwrap(state, path) if suffix != ".safetensors" else state, source=str(path))


def _first_sentence(error: Exception) -> str:
    """torch's load errors run to a paragraph of advice; their first sentence says what was wrong."""
    return str(error).strip().split(". ")[0]


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """A training checkpoint often nests the model's state dict under a key such as "model"."""
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds no state dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state`` except for the classifier head; name the offending keys otherwise."""
    # timm's own key conversions and position-embedding resampling, from the model's family module.
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        state = convert(state, model) if convert is not None else state
    except Exception:  # noqa: BLE001  a file it cannot convert is reported by the key check below
        pass
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))

    def is_head(key: str) -> bool:
        return key.startswith(heads)

    missing = sorted(k for k in own if k not in state and not is_head(k))
    unexpected = sorted(k for k in state if k not in own and not is_head(k))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and not is_head(k) and state[k].shape != own[k].shape
    )
    problems = [
        f"{label}: {', '.join(keys[:_SHOWN])}{' ...' if len(keys) > _SHOWN else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", misshaped))
        if keys
    ]
    if problems:
        architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        raise ValueError(
            f"{source} does not match backbone {architecture}: " + "; ".join(problems)
            + ". Pass the backbone name these weights were trained for."
        )
    head_fits = {k: v for k, v in state.items() if not is_head(k) or (k in own and own[k].shape == v.shape)}
    model.load_state_dict(head_fits, strict=False)
