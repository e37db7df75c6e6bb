"""Counting FLOPs with torch's own counter, including the fused attention op it misses on CPU.

``torch.utils.flop_counter.FlopCounterMode`` knows the CUDA fused attention kernels but not
``aten._scaled_dot_product_flash_attention_for_cpu`` (nor its backward), which is what
``F.scaled_dot_product_attention`` runs on CPU: without a formula for it attention FLOPs are
silently missing. We give those two ops torch's own sdpa formulas. Counts follow torch's
convention of 2 FLOPs per multiply-add.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """(query, key, value, dropout_p, is_causal, *, attn_mask, scale), as torch's sdpa formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """(grad_out, query, key, value, out, logsumexp, ...), as torch's sdpa backward formula."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_aten = torch.ops.aten
CPU_ATTENTION_FORMULAS: dict = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU fused attention op, forward and backward."""
    return FlopCounterMode(display=display, custom_mapping=CPU_ATTENTION_FORMULAS)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of everything ``fn()`` runs, backward included if it runs one."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """peft's adapter layers in ``model`` (LoRA) bypassed while inside: each runs its frozen base
    layer only, so ``model`` computes what the backbone it was injected into computes.
    The adapters' ``requires_grad`` flags (which peft clears when disabling) are restored."""
    layers = [m for m in model.modules() if callable(getattr(m, "enable_adapters", None)) and getattr(m, "disable_adapters", None) is False]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def extra_flops(model: torch.nn.Module) -> int:
    """Additional inference FLOPs per image of a PromptModel over its frozen backbone with a
    linear head: prompts, extra keys/values, an MLP head, LoRA's low-rank products.

    The convention, used by every figure vptune reports (metrics.json, the demo, benchmark mini,
    ``vptune bench``): the FLOPs of the model as vptune runs it, LoRA unmerged, minus those of
    the frozen backbone without adapters. (Merged into the weights, LoRA would add none; vptune
    does not merge.) Counted at eval on one image of the backbone's input size, after a warm-up
    call so that the prompt key/value cache is filled, as it is when serving. Methods that only
    change backbone tensors (full, bias, partial) add none.
    """
    family = model.family
    device = next(model.parameters()).device
    inputs = family.example_inputs(device)
    if not isinstance(inputs, torch.Tensor):
        return _extra_pair_flops(model, inputs)
    image = inputs
    was_training = model.training
    model.eval()
    model(image)  # fills the prompt key/value cache
    total = count_flops(lambda: model(image))
    with adapters_disabled(model):
        frozen = count_flops(lambda: family.frozen_features(image))
    model.train(was_training)
    return total - frozen - 2 * family.num_features * model.num_classes


def _extra_pair_flops(model: torch.nn.Module, inputs: dict) -> int:
    """The same for a vision-language model, per image-text pair of the family's example shape
    (ViLT: a full-size image and a question of its full text length): the pooled features with
    the method against the frozen model's, so no task head is counted (NLVR runs two pairs per
    example)."""
    family = model.family
    was_training = model.training
    model.eval()
    model.encode(inputs)  # fills the prompt key/value cache
    total = count_flops(lambda: model.encode(inputs))
    with adapters_disabled(model):
        frozen = count_flops(lambda: family.frozen_features(inputs))
    model.train(was_training)
    return total - frozen
