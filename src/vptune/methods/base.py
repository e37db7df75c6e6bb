"""What every method shares: a config dataclass that round-trips through JSON, a registry
from method name to config, and ``Method``, the small set of hooks through which a method
acts on a frozen ViT. The walk over the blocks that calls these hooks is one function,
in ``vptune.backbones``, one per model family; a method only says what it adds, and builds its
tensors from the family's attention sites (``family.sites``: width, heads, head size per
site), never from a model's attributes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..attention import AttentionOutputHook

CONFIGS: dict[str, Callable[..., "MethodConfig"]] = {}


def register(*names: str, **fixed: Any):
    """Register a config class under method ``names``; ``fixed`` are field values the name implies
    (``vpt-deep`` is ``VPTConfig(deep=True)``)."""

    def wrap(cls):
        for name in names:
            CONFIGS[name] = lambda _cls=cls, _fixed=fixed, **kw: _cls(**{**_fixed, **kw})
        return cls

    return wrap


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's config. Subclasses are dataclasses of plain JSON values."""

    def method_name(self) -> str:
        raise NotImplementedError

    def build(self, family) -> "Method":
        """The method's module for ``family`` (a ``vptune.backbones.Family``)."""
        raise NotImplementedError

    def head_hidden_layers(self) -> int:
        """Hidden layers of the classification head (0: a single Linear)."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"method": self.method_name(), **fields}


def config_for(name: str, **overrides: Any) -> MethodConfig:
    """The config of method ``name`` (``vpt-deep``, ``e2vpt``, ``apt``, ``lora``, ...) with ``overrides``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(sorted(CONFIGS))}")
    try:
        return CONFIGS[name](**overrides)
    except TypeError as err:
        raise ValueError(f"bad option for method {name!r}: {err}") from None


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Inverse of ``MethodConfig.to_dict``."""
    data = dict(data)
    if "method" not in data:
        raise ValueError("method config has no 'method' key")
    name = data.pop("method")
    return config_for(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class Method(nn.Module):
    """A method's trainable state and its hooks into the block walk. The defaults add nothing,
    so a method overrides only what its paper changes.

    path: "kv" lets the walk feed prompt tokens whose outputs are discarded to attention as
    keys/values only (exact, see ``vptune.attention``); "tokens" runs them through the block.
    prompt_layers: blocks before which fresh prompt tokens overwrite the prompt slot.
    """

    path: str = "tokens"
    prompt_layers: frozenset[int] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.kv_cache: dict[Any, Any] = {}
        self.site_rows: dict[str, list[tuple[str, int]]] = {}
        # Options of a family's walk the run chose (``{"swin": {...}}``, vptune.family_options):
        # stored, never read, by the method; the family named by the key reads them.
        self.family_options: dict[str, dict[str, Any]] = {}

    def add_site_parameters(self, name: str, shapes: list[tuple[int, ...]], init: Callable[[tuple[int, ...]], Tensor]) -> None:
        """One trained tensor per entry of ``shapes`` (one per site, or per prompt set), stored as
        one stacked Parameter per distinct shape: ``name`` (n, *shape) when all agree (a ViT),
        else ``name_0``, ``name_1``, ... (Swin's stages). ``init(stacked_shape)`` draws the values."""
        groups = list(dict.fromkeys(shapes))
        rows: list[tuple[str, int]] = []
        for g, shape in enumerate(groups):
            stacked = name if len(groups) == 1 else f"{name}_{g}"
            members = [i for i, s in enumerate(shapes) if s == shape]
            self.register_parameter(stacked, nn.Parameter(init((len(members), *shape))))
        counts: dict[tuple[int, ...], int] = {}
        for shape in shapes:
            stacked = name if len(groups) == 1 else f"{name}_{groups.index(shape)}"
            rows.append((stacked, counts.get(shape, 0)))
            counts[shape] = counts.get(shape, 0) + 1
        self.site_rows[name] = rows

    def site_parameter(self, name: str, index: int) -> Tensor:
        """Entry ``index`` of the tensors ``add_site_parameters(name, ...)`` made."""
        stacked, row = self.site_rows[name][index]
        return getattr(self, stacked)[row]

    def prepare_backbone(self, backbone: nn.Module) -> nn.Module:
        """The backbone this method runs on. Prompt methods share the caller's frozen backbone;
        methods that tune backbone tensors return a private copy so the shared one is untouched."""
        return backbone

    def prompts(self, index: int, batch: int) -> Tensor | None:
        """Fresh prompt tokens (B|1, p, d) entering block ``index`` (index in ``prompt_layers``)."""
        return None

    def prompt_key_bias(self, batch: int) -> Tensor | None:
        """Additive logits (B|1, p) on the prompt tokens' keys: the log of a token mask."""
        return None

    def kv_prompts(self, index: int) -> tuple[Tensor, Tensor] | None:
        """Extra keys and values (1, H, m, Dh) appended after block ``index``'s projections."""
        return None

    def attention_output(self, index: int) -> AttentionOutputHook | None:
        """A function ``(u, a) -> a'`` rewriting block ``index``'s attention output."""
        return None

    def token_embeddings(self, token_ids: Tensor, embeddings: Tensor) -> Tensor | None:
        """The word embeddings (B, L, w) of ``token_ids`` a text encoder reads, rewritten by the
        method (textual inversion's learned word); None leaves them as they are."""
        return None

    def token_offset(self, index: int) -> Tensor | None:
        """A tensor (1, N, d) added to every token before block ``index`` (VPT's "add" location)."""
        return None

    def train(self, mode: bool = True) -> "Method":
        # Training never reads the cache, so entering it frees the cache; ``eval()`` keeps it
        # (each entry checks its own validity), so that a server or a bench calling ``eval()``
        # before every batch still computes the prompt keys and values once.
        if mode:
            self.kv_cache.clear()
        return super().train(mode)


def uniform(bound: float) -> Callable[[tuple[int, ...]], Tensor]:
    return lambda shape: torch.empty(shape).uniform_(-bound, bound)


def kaiming_uniform(fan_in: int) -> Callable[[tuple[int, ...]], Tensor]:
    """Kaiming-uniform values (bound sqrt(6 / fan_in)), the official E2VPT init."""
    return uniform(math.sqrt(6.0 / fan_in))
