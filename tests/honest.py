"""Honest test weights: make a randomly initialised model look like a trained one where it matters.

Libraries initialise biases to 0, every normalisation layer to weight 1 and bias 0, and class
tokens, position tables and layer scales to constants. With such weights ``norm1`` computes what
``norm2`` computes and a forgotten bias changes nothing, so a test cannot tell a right
computation from a wrong one. ``honest_`` fixes that for any family (timm ViT, Swin, Eva, BEiT,
transformers, open_clip, diffusers): it keys on parameter names and module classes, never on a
family's attribute names.

- every bias (a parameter whose name contains ``bias``, or ``beta``) gets random non-zero values;
- every normalisation layer (a class whose name contains ``Norm``) gets its weight at 1 plus an
  offset that differs per element and per layer, and a random bias;
- any other parameter that is constant (all elements equal) or near zero (class and register
  tokens drawn with std 1e-6) gets small random values: a zero one N(0, 0.02²), a non-zero one
  its value times 1 ± 20%, so a layer-scale gamma keeps its size.

Scales stay small (bias std 0.05, norm weights in [0.75, 1.25]) so that softmax does not
saturate and tolerances that hold for the library's initialisation keep holding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BIAS_STD = 0.05
NORM_WEIGHT_SPREAD = 0.25  # weight in [1 - spread, 1 + spread]
ZERO_STD = 0.02
CONSTANT_SPREAD = 0.2
TINY = 1e-4  # a tensor whose every element is smaller than this is treated as "zero"


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer of any library: LayerNorm, GroupNorm, RMSNorm, BatchNorm, timm's
    LayerNorm2d, open_clip's LayerNormFp32, transformers' T5LayerNorm, ... (by class name)."""
    return "Norm" in type(module).__name__ or isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return "bias" in leaf or leaf == "beta"


def _is_trivial(p: Tensor) -> bool:
    """All elements equal (zeros, ones, a layer-scale constant) or all tiny (std 1e-6 tokens)."""
    if p.numel() == 0:
        return False
    flat = p.detach().flatten()
    return bool((flat == flat[0]).all()) or bool(flat.abs().max() < TINY)


def honest_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``module`` non-trivial biases, norms and constants in place (see the module docstring);
    returns it. Deterministic for a given ``seed`` and parameter order."""
    g = torch.Generator().manual_seed(seed)

    def draw(p: Tensor) -> Tensor:
        return torch.rand(p.shape, generator=g, dtype=torch.float64)

    def normal(p: Tensor) -> Tensor:
        return torch.randn(p.shape, generator=g, dtype=torch.float64)

    done: set[int] = set()
    with torch.no_grad():
        for mod in module.modules():
            if not is_norm(mod):
                continue
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in done:
                    continue
                done.add(id(p))
                if _is_bias(name):
                    p.copy_(BIAS_STD * normal(p))
                else:  # weight / gamma / scale
                    p.copy_(1 + NORM_WEIGHT_SPREAD * (2 * draw(p) - 1))
        for name, p in module.named_parameters():
            if id(p) in done:
                continue
            done.add(id(p))
            if _is_bias(name):
                p.copy_(BIAS_STD * normal(p))
            elif _is_trivial(p):
                flat = p.detach().flatten()
                if flat.abs().max() < TINY:
                    p.copy_(ZERO_STD * normal(p))
                else:
                    p.copy_(p.double() * (1 + CONSTANT_SPREAD * (2 * draw(p) - 1)))
    return module
