"""What vptune knows of a model family, and the walk every token-sequence family shares.

A ``Family`` wraps one model of one kind (a timm ViT, Eva, BEiT, Swin, ...) and does three
things (docs/methods.md, "Families"):

- it describes the model's **attention sites**, an ordered list of ``AttentionSite`` (width,
  heads, head size, kind), from which methods build their tensors: a method never reads a
  model attribute and never learns which family it runs on;
- it **walks** the model, calling the method's hooks at every site (fresh prompts, extra
  keys/values, the attention-output hook, token offsets) and re-composing the library's own
  submodules through ``vptune.attention``;
- it says what it pools and what a saved run must match to be loaded on it.

``SequenceFamily.run_blocks`` is the walk of every family whose blocks see one token
sequence (ViT, Eva, BEiT): prompt tokens are kept *beside* the sequence, never in it, so
pooling can never see them. Before block i in ``method.prompt_layers`` fresh prompts overwrite
the slot; a block whose prompt outputs are discarded (the next block overwrites them, or it is
the last) takes them as keys/values only on the "kv" path; otherwise they go through the block
with the other tokens, after the prefix tokens, and their outputs are carried on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute

from ..methods.base import Method


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention layer a method can act on: the width of the tokens entering it (its
    queries, and its output after the projection), its heads and head size, and its kind
    ("self"; "window": self-attention in local windows; "cross": keys and values computed from
    another sequence, of width ``context_width``: the other stream, or a text encoder's states)."""

    width: int
    num_heads: int
    head_dim: int
    kind: str = "self"
    context_width: int | None = None  # cross-attention only: width of the tokens keys/values come from
    attention_dropout: float = 0.0  # the attention's own dropout probability (a method may follow it: APT on ViLT)

    @property
    def kv_width(self) -> int:
        """Width of the tokens this site's keys and values are computed from, and so of the
        prompt tokens a method adds to them (deep prompts); the query width for self-attention."""
        return self.context_width or self.width


FAMILIES: list[type["Family"]] = []


def register_family(cls: type["Family"]) -> type["Family"]:
    FAMILIES.append(cls)
    return cls


def family_of(model: nn.Module) -> "Family":
    """The family that walks ``model``; a model of no known family is refused with the list."""
    if isinstance(model, Family):
        return model
    from . import beit, eva, meter, openclip, swin, unet, vilt, vit  # noqa: F401  (each registers its family)

    for cls in FAMILIES:
        if cls.accepts(model):
            return cls(model)
    supported = ", ".join(f"{cls.name} ({cls.model_class})" for cls in FAMILIES)
    raise TypeError(f"{type(model).__name__} is not supported: vptune walks these model families: {supported}")


def architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


class Family:
    """How to walk one model; subclasses fill in the family's specifics."""

    name: ClassVar[str]
    model_class: ClassVar[str]  # the library class, for messages
    add_location: ClassVar[bool] = True  # VPT's "add" prompts (one per sequence position) possible
    # Backbone submodules (paths) that a run trains its own copy of with every method (the
    # official recipe of a family: ViLT's pooler and token types); none for the image families.
    also_tuned: ClassVar[tuple[str, ...]] = ()
    # Whether the backbone's own dropout is active while a run trains (ViLT's official recipe);
    # the image families keep it off (VPT's recipe).
    backbone_train_mode: ClassVar[bool] = False
    reads_text: ClassVar[bool] = False  # its inputs are image-text batch dicts (ViLT)
    # Backbone parameters that no method trains, not even full fine-tuning (METER's frozen
    # image and text encoders in its official prompt-tuning recipe); none for the others.
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.overrides: dict[str, nn.Module] = {}  # also_tuned path -> the run's own copy
        self.check()

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self) -> None:
        """Refuse, with the reason, a model of this family whose blocks the walk does not know."""

    def adapt_copies(self, copies: dict[str, nn.Module], task: Any) -> dict[str, nn.Module]:
        """The run's copies of ``also_tuned`` modules, fitted to ``task`` (ViLT: a third token type for NLVR)."""
        return copies

    def task_head(self, task: Any, in_dim: int) -> nn.Module:
        """A new head of ``task`` on this family's pooled features: the task's own (ViLT's shapes)
        unless the family's model fine-tunes another shape (METER: hidden width ``in_dim``)."""
        return task.head(in_dim)

    def pretrained_head(self, task: Any, head: nn.Module) -> str | None:
        """Load into ``head`` the task head the backbone's weights file brought (an official
        fine-tuned checkpoint's), when it has one for ``task``; returns what was loaded (recorded
        as the run's ``head_init``), or None to keep the fresh head."""
        return None

    # --- description ----------------------------------------------------------------------
    @property
    def sites(self) -> list[AttentionSite]:
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def prompt_fan_in(self) -> int:
        """Fan-in of the patch embedding (channels x patch area), for VPT's Xavier bound."""
        proj = self.model.patch_embed.proj
        return proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]

    def num_positions(self) -> int:
        """Tokens entering block 0, for VPT's "add" prompts (one per position)."""
        raise ValueError(f"location='add' is not possible on {self.name}: its token grid changes between blocks; use location='prepend'")

    def input_size(self) -> tuple[int, int, int]:
        proj = self.model.patch_embed
        return (proj.proj.in_channels, *proj.img_size)

    def example_inputs(self, device: torch.device | str = "cpu", batch: int = 1) -> Any:
        """Inputs of the model's own size (zeros), for counting FLOPs: images (B, C, H, W)."""
        return torch.zeros(batch, *self.input_size(), device=device)

    def data_config(self) -> dict[str, Any]:
        """Preprocessing settings that differ from timm's defaults for this model (ViLT's mean/std)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What a saved run must match to be loaded on this model (``MUST_MATCH``)."""
        sites = self.sites
        return {
            "family": self.name,
            "architecture": architecture(self.model),
            "embed_dim": sites[0].width,
            "depth": len(sites),
            "num_heads": sites[0].num_heads,
            "head_dim": sites[0].head_dim,
            "sites": [[s.width, s.num_heads, s.head_dim] + ([s.kind, s.context_width] if s.context_width else []) for s in sites],
        }

    def fingerprint(self) -> str:
        """A short hash of the patch embedding, to notice a run trained on other weights."""
        weight = self.model.patch_embed.proj.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]

    def num_parameters(self) -> int:
        """Parameters of the model without its own classifier (vptune never uses it)."""
        head_ids = {id(p) for name, p in self.model.named_parameters() if name.startswith(self.head_prefixes)}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in head_ids)

    head_prefixes: ClassVar[tuple[str, ...]] = ("head.",)
    final_prefixes: ClassVar[tuple[str, ...]] = ("norm.", "fc_norm.")  # tuned with the last blocks (partial)

    def block_prefixes(self) -> list[str]:
        """The parameter-name prefix of each block, in order (partial fine-tuning)."""
        raise NotImplementedError

    def lora_pattern(self, targets: tuple[str, ...]) -> str:
        """A regex of the attention projections LoRA adapts (``targets`` among qkv, proj)."""
        return rf"blocks\.\d+\.attn\.({'|'.join(targets)})"

    # --- the walk ---------------------------------------------------------------------------
    def embed(self, images: Tensor) -> tuple[Tensor, Any]:
        """Images to the tokens entering block 0, and what the blocks need beside them (rotary
        embeddings, the token grid)."""
        raise NotImplementedError

    def run_blocks(
        self, x: Tensor, aux: Any, method: Method, checkpoint: bool = False, outputs: int | None = None
    ) -> Tensor:
        raise NotImplementedError

    def pooled_outputs(self) -> int | None:
        """How many leading tokens of the last block pooling reads (None: all)."""
        return None

    def pooled_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def features(self, images: Tensor, method: Method, checkpoint: bool = False) -> Tensor:
        """Pooled features (B, num_features) of ``images`` with ``method``'s prompts and hooks."""
        x, aux = self.embed(images)
        x = self.run_blocks(x, aux, method, checkpoint=checkpoint, outputs=self.pooled_outputs())
        return self.pooled_features(x)

    def frozen_features(self, images: Tensor) -> Tensor:
        """The frozen model's pooled features with no method: the reference that a method's extra
        cost is measured against."""
        return self.features(images, Method())


def key_bias(prompt_bias: Tensor | None, before: int, after: int) -> Tensor | None:
    """Attention mask (B|1, 1, 1, before+p+after): ``prompt_bias`` on the prompt keys, 0 elsewhere."""
    if prompt_bias is None:
        return None
    zeros = prompt_bias.new_zeros
    n = prompt_bias.shape[0]
    return torch.cat([zeros(n, before), prompt_bias, zeros(n, after)], dim=1)[:, None, None, :]


def autocast_state(device: torch.device) -> tuple:
    kind = device.type
    return (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cpu", "cuda") else ()


def cached_prompt_keys_values(method: Method, key: Any, prompts: Tensor, compute) -> tuple[Tensor, Tensor]:
    """``compute(prompts)`` at inference without dropout, cached in the method: valid while the
    prompts entering the layer are the same values (an optimizer step, a load or a ``.data`` edit
    changes them; a version counter misses the last)."""
    key = (key, prompts.device, prompts.dtype, autocast_state(prompts.device))
    hit = method.kv_cache.get(key)
    if hit is None or not torch.equal(hit[0], prompts):
        hit = method.kv_cache[key] = (prompts.clone(), compute(prompts))
    return hit[1]


class SequenceFamily(Family):
    """A family whose blocks all see one token sequence ``[prefix, patches]`` (B, N, d)."""

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def block_prefixes(self) -> list[str]:
        return [f"blocks.{i}." for i in range(len(self.blocks))]

    def block_forward(
        self, index: int, x: Tensor, aux: Any, extra_k: Tensor | None, extra_v: Tensor | None,
        bias: Tensor | None, hook, queries: int | None, prompts: int,
    ) -> Tensor:
        """Block ``index`` over ``x``, whose tokens ``prefix : prefix + prompts`` are prompt tokens
        (no position), plus extra keys/values."""
        raise NotImplementedError

    def prompt_keys_values(self, index: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def run_blocks(
        self, x: Tensor, aux: Any, method: Method, checkpoint: bool = False, outputs: int | None = None
    ) -> Tensor:
        """Every block over ``x`` (B, N, d) with ``method``'s prompts, key-value prompts and
        attention hooks; the prompt-free sequence (B, N, d). ``checkpoint`` recomputes each block
        in backward. ``outputs`` (at most the prefix tokens) keeps only the first ``outputs``
        tokens of the last block, computing no other query, output projection or MLP row there."""
        prefix, depth = self.num_prefix_tokens, len(self.blocks)
        batch = x.shape[0]
        layers = method.prompt_layers
        prompt_bias = method.prompt_key_bias(batch)
        # Prompt keys/values are input-independent, and so cacheable, at inference without dropout.
        cache_ok = not method.training and not torch.is_grad_enabled()
        forward = self.block_forward
        if checkpoint and torch.is_grad_enabled():
            forward = lambda *args: recompute(self.block_forward, *args, use_reentrant=False)  # noqa: E731
        carried: Tensor | None = None  # prompt tokens (B|1, p, d) in the prompt slot
        for i in range(depth):
            offset = method.token_offset(i)
            if offset is not None:
                if offset.shape[1] != x.shape[1]:
                    raise ValueError(
                        f"'add' prompts are tied to the {offset.shape[1]}-token sequence they were made for; "
                        f"these images give {x.shape[1]} tokens: use the image size the model was built with"
                    )
                x = x + offset
            fresh = i in layers
            if fresh:
                carried = method.prompts(i, batch)
            kv = method.kv_prompts(i)
            hook = method.attention_output(i)
            queries = outputs if i + 1 == depth else None
            extra = 0 if kv is None else kv[0].shape[2]
            if carried is None:
                k, v = kv if kv is not None else (None, None)
                x = forward(i, x, aux, k, v, None, hook, queries, 0)
            elif method.path == "kv" and (i + 1 == depth or i + 1 in layers):
                if cache_ok and fresh and carried.shape[0] == 1:
                    k, v = cached_prompt_keys_values(method, i, carried, lambda p, i=i: self.prompt_keys_values(i, p))
                else:
                    k, v = self.prompt_keys_values(i, carried)
                if kv is not None:
                    n = k.shape[0]
                    k = torch.cat([k, kv[0].to(k.dtype).expand(n, -1, -1, -1)], dim=2)  # B|1, H, p+m, Dh
                    v = torch.cat([v, kv[1].to(v.dtype).expand(n, -1, -1, -1)], dim=2)
                x = forward(i, x, aux, k, v, key_bias(prompt_bias, x.shape[1], extra), hook, queries, 0)
                carried = None
            else:
                p = carried.shape[1]
                seq = torch.cat([x[:, :prefix], carried.expand(batch, -1, -1), x[:, prefix:]], dim=1)  # B, N+p, d
                bias = key_bias(prompt_bias, prefix, x.shape[1] - prefix + extra)
                k, v = kv if kv is not None else (None, None)
                seq = forward(i, seq, aux, k, v, bias, hook, queries, p)
                x = torch.cat([seq[:, :prefix], seq[:, prefix + p :]], dim=1)
                carried = seq[:, prefix : prefix + p]
        return x
