"""diffusers' ``UNet2DConditionModel``: the denoiser of Stable Diffusion and of the bundled
``vptune_sd_fmnist``, walked through diffusers' attention-processor interface (the library's
documented extension point; docs/families.md, "UNet").

The family's **sites** are the UNet's ``Attention`` modules, in diffusers' module order: the
self-attention of every transformer block (``attn1``, kind "self") and its cross-attention over
the text encoder's states (``attn2``, kind "cross", ``context_width`` = the UNet's
``cross_attention_dim``). Which of them a run acts on is a family option, ``sites``: ``"self"``,
``"cross"`` or ``"both"``; a method builds its tensors from the chosen sites only and never learns
which kind they are.

The **walk** is diffusers' own ``unet(...)`` forward. For the time of one call (``hooks``), every
chosen ``Attention`` gets a ``SiteProcessor``: diffusers' scaled-dot-product attention
re-composed from the module's own submodules (``spatial_norm``, ``group_norm``, ``to_q``,
``norm_cross``, ``to_k``, ``to_v``, ``norm_q``, ``norm_k``, ``to_out``), with the method's hooks at
that site; afterwards the UNet's own processors are put back, so a frozen UNet shared by many
runs never keeps one run's processors:

- ``prompts(i)``: deep prompts (p, kv_width) in the space of the tokens keys and values come
  from (the text states at a cross-attention site), appended to them as keys and values only
  (``to_k(norm_cross(P))``, ``to_v(norm_cross(P))``): on ``path="kv"`` computed apart from the
  text (and cached at inference, where they do not depend on the input), on ``path="tokens"``
  by projecting the concatenation, the literal formulation. Both equal appending the prompts to
  the text states the UNet attends to (tests/test_diffusion.py).
- ``kv_prompts(i)``: keys and values (1, H, m, Dh) appended after the projections (E2VPT).
- ``attention_output(i)``: a function ``(u, a) -> a'`` of the attention input ``u`` (the query
  tokens, after the block's norm) and its output after ``to_out[0]`` (APT), before the output
  dropout, the residual and the rescale.

Prompt tokens at a site enter nowhere else: there is no token sequence running through a UNet's
blocks, so nothing flows from one site to the next (VPT-shallow's prompts act at its one site).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.base import Method
from .family import AttentionSite, Family, cached_prompt_keys_values, register_family

SITE_CHOICES = ("self", "cross", "both")


def _unet_loaded() -> bool:
    import sys

    return "diffusers" in sys.modules


def attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every diffusers ``Attention`` of ``unet`` with its module path, in module order."""
    from diffusers.models.attention_processor import Attention

    return [(name, module) for name, module in unet.named_modules() if isinstance(module, Attention)]


def site_of(attn: nn.Module) -> AttentionSite:
    """The ``AttentionSite`` of a diffusers ``Attention``: query width, heads, head size and kind."""
    head_dim = attn.inner_dim // attn.heads
    if attn.is_cross_attention:
        return AttentionSite(attn.query_dim, attn.heads, head_dim, "cross", attn.cross_attention_dim)
    return AttentionSite(attn.query_dim, attn.heads, head_dim, "self")


class SiteProcessor:
    """The attention processor of one site while a method runs: diffusers' ``AttnProcessor2_0``
    computation over the ``Attention``'s own submodules, with the method's hooks for site ``index``."""

    def __init__(self, index: int, method: Method, cache_ok: bool) -> None:
        self.index, self.method, self.cache_ok = index, method, cache_ok

    def __call__(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any,
    ) -> Tensor:
        method, index = self.method, self.index
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        B = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], B)
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        u = hidden_states  # the query tokens: what APT's term reads
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        H = attn.heads
        query = attn.to_q(u)
        Dh = query.shape[-1] // H

        def heads(t: Tensor) -> Tensor:  # (n, L, H*Dh) -> (n, H, L, Dh)
            return t.view(t.shape[0], -1, H, Dh).transpose(1, 2)

        prompts = method.prompts(index, B) if index in method.prompt_layers else None
        extra_k = extra_v = None
        if prompts is not None and method.path == "tokens":  # the literal formulation: one sequence
            context = torch.cat([context, prompt_context(attn, prompts, encoder_hidden_states).expand(B, -1, -1)], dim=1)
        elif prompts is not None:  # the exact key-value path: the prompts' keys and values alone
            compute = lambda p: prompt_keys_values(attn, p, encoder_hidden_states, H)  # noqa: E731
            if self.cache_ok and prompts.shape[0] == 1:
                extra_k, extra_v = cached_prompt_keys_values(method, ("unet", index, encoder_hidden_states is None), prompts, compute)
            else:
                extra_k, extra_v = compute(prompts)
        key, value = heads(attn.to_k(context)), heads(attn.to_v(context))
        query = heads(query)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        num_prompts = 0 if prompts is None else prompts.shape[1]
        if extra_k is not None:
            key = torch.cat([key, extra_k.to(key.dtype).expand(B, -1, -1, -1)], dim=2)
            value = torch.cat([value, extra_v.to(value.dtype).expand(B, -1, -1, -1)], dim=2)
        kv = method.kv_prompts(index)
        if kv is not None:
            key = torch.cat([key, kv[0].to(key.dtype).expand(B, -1, -1, -1)], dim=2)
            value = torch.cat([value, kv[1].to(value.dtype).expand(B, -1, -1, -1)], dim=2)
        mask = attention_mask
        if mask is not None and key.shape[2] > mask.shape[-1]:
            mask = F.pad(mask, (0, key.shape[2] - mask.shape[-1]))  # prompt keys are never masked out
        bias = method.prompt_key_bias(B) if num_prompts else None
        if bias is not None:  # log-mask (B|1, p) on the prompt keys: the context's last p, or right after it
            start = context.shape[1] - (num_prompts if extra_k is None else 0)
            full = F.pad(bias, (start, key.shape[2] - start - num_prompts))[:, None, None, :]
            mask = full if mask is None else mask + full
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None if mask is None else mask.to(query.dtype), dropout_p=0.0, is_causal=False,
            scale=attn.scale,
        )
        out = out.transpose(1, 2).reshape(B, -1, H * Dh).to(query.dtype)
        out = attn.to_out[0](out)
        hook = method.attention_output(index)
        if hook is not None:
            out = hook(u, out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def prompt_context(attn: nn.Module, prompts: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
    """Prompt tokens (B|1, p, kv_width) as the tokens the site's keys and values come from: at a
    cross-attention site they are text states, so they pass ``norm_cross`` as the text does."""
    if encoder_hidden_states is not None and attn.norm_cross:
        if not isinstance(attn.norm_cross, nn.LayerNorm):  # a GroupNorm would mix the prompts with the text
            raise ValueError("prompts at a cross-attention site need a per-token norm_cross (LayerNorm) or none; "
                             f"this UNet's is {type(attn.norm_cross).__name__}: use apt or lora")
        return attn.norm_encoder_hidden_states(prompts)
    return prompts


def prompt_keys_values(attn: nn.Module, prompts: Tensor, encoder_hidden_states: Tensor | None, H: int) -> tuple[Tensor, Tensor]:
    """What prompt tokens (B|1, p, kv_width) add to a site's attention: ``to_k`` and ``to_v`` of
    them (and ``norm_k``), as (B|1, H, p, Dh) each; nothing else of them is computed."""
    context = prompt_context(attn, prompts, encoder_hidden_states)
    n, p = context.shape[:2]
    key = attn.to_k(context).view(n, p, H, -1).transpose(1, 2)
    value = attn.to_v(context).view(n, p, H, -1).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


def _unet_of(model: nn.Module) -> nn.Module | None:
    from diffusers import UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        return model
    unet = getattr(model, "unet", None)
    return unet if isinstance(unet, UNet2DConditionModel) else None


@register_family
class UNetFamily(Family):
    """A diffusers ``UNet2DConditionModel``, bare or inside a text-to-image model (``.unet`` beside
    a text encoder, a noise scheduler and a VAE: ``vptune.diffusion.model.TextToImage``), acting
    on the attention sites that ``sites`` names (default: the model's ``sites``, else both kinds)."""

    name = "unet"
    model_class = "diffusers UNet2DConditionModel"
    add_location = False
    reads_text = True  # a batch is a dict: images and their prompts
    # Parts of a text-to-image model that no method tunes (full fine-tuning trains the UNet alone,
    # as DreamBooth does); the backbone's parameter count is the UNet's.
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("text_encoder.", "vae.")
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    final_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, sites: str | None = None) -> None:
        self.unet = _unet_of(model)
        self.choice = sites or getattr(model, "sites", None) or "both"
        if self.choice not in SITE_CHOICES:
            raise ValueError(f"sites must be one of {', '.join(SITE_CHOICES)} (the UNet attention a method acts on), got {self.choice!r}")
        kinds = ("self", "cross") if self.choice == "both" else (self.choice,)
        self.site_modules: list[tuple[str, nn.Module]] = [
            (name, attn) for name, attn in attention_modules(self.unet) if site_of(attn).kind in kinds
        ]
        super().__init__(model)

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return _unet_loaded() and _unet_of(model) is not None

    def check(self) -> None:
        if not self.site_modules:
            raise ValueError(f"this UNet has no {self.choice}-attention layer for a method to act on: choose other --sites")
        odd = [name for name, attn in self.site_modules if getattr(attn, "added_kv_proj_dim", None) is not None]
        if odd:
            raise TypeError(f"UNet attention with added key/value projections ({odd[0]}) is not supported: "
                            "vptune walks the attention of Stable Diffusion 1.x/2.x-style UNets")

    # --- description ----------------------------------------------------------------------
    @property
    def sites(self) -> list[AttentionSite]:
        return [site_of(attn) for _, attn in self.site_modules]

    @property
    def num_features(self) -> int:
        return self.unet.config.out_channels

    @property
    def prompt_fan_in(self) -> int:
        """Fan-in of the UNet's input convolution, for VPT's Xavier bound."""
        conv = self.unet.conv_in
        return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

    def input_size(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    def example_inputs(self, device: torch.device | str = "cpu", batch: int = 1) -> Any:
        """Latents, a timestep and text states of the model's own size, for counting FLOPs."""
        text = torch.zeros(batch, getattr(self.model, "text_length", 8), self.unet.config.cross_attention_dim, device=device)
        return torch.zeros(batch, *self.input_size(), device=device), torch.full((batch,), 10, device=device), text

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        description["architecture"] = getattr(self.model, "architecture", None) or type(self.unet).__name__
        description["unet_sites"] = self.choice
        pipeline = getattr(self.model, "pipeline", None)
        if pipeline is not None:
            description["pipeline"] = pipeline.describe()
        return description

    def fingerprint(self) -> str:
        """A short hash of the UNet's input convolution (and the text encoder's word embeddings, in
        a text-to-image model), to notice a run trained on other weights."""
        pipeline = getattr(self.model, "pipeline", None)
        if pipeline is not None:
            return pipeline.fingerprint()
        weight = self.unet.conv_in.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]

    def num_parameters(self) -> int:
        """The UNet's parameters (what the percentages of tuned parameters are of)."""
        return sum(p.numel() for p in self.unet.parameters())

    def block_prefixes(self) -> list[str]:
        raise ValueError("partial fine-tuning is not offered on a UNet: use full (DreamBooth), lora or a prompt method")

    def lora_pattern(self, targets: tuple[str, ...]) -> str:
        """The chosen sites' projections, as diffusers' DreamBooth-LoRA adapts them: ``qkv`` is
        ``to_q``, ``to_k`` and ``to_v``; ``proj`` is ``to_out.0``."""
        projections = {"qkv": ("to_q", "to_k", "to_v"), "proj": (r"to_out\.0",)}
        names = "|".join(re.escape(name) for name, _ in self.site_modules)
        prefix = "" if self.model is self.unet else r"unet\."
        return rf"{prefix}({names})\.({'|'.join(p for t in targets for p in projections[t])})"

    # --- the walk ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, method: Method) -> Iterator[None]:
        """Every chosen site attends through a ``SiteProcessor`` with ``method``'s hooks while
        inside; the UNet's own processors are back afterwards (also after an error)."""
        cache_ok = not method.training and not torch.is_grad_enabled()
        saved = [attn.processor for _, attn in self.site_modules]
        try:
            for index, (_, attn) in enumerate(self.site_modules):
                attn.set_processor(SiteProcessor(index, method, cache_ok))
            yield
        finally:
            for (_, attn), processor in zip(self.site_modules, saved):
                attn.set_processor(processor)

    def predict_noise(self, method: Method, latents: Tensor, timesteps: Tensor, text_states: Tensor, **kwargs: Any) -> Tensor:
        """The UNet's output (noise, or velocity for a v-prediction model) with ``method`` at its sites."""
        with self.hooks(method):
            return self.unet(latents, timesteps, encoder_hidden_states=text_states, return_dict=False, **kwargs)[0]

    def encode_prompt(self, prompts: list[str], method: Method) -> Tensor:
        """The text encoder's states (B, L, context width) for ``prompts``, with the method's
        ``token_embeddings`` hook on the word embeddings (textual inversion)."""
        return self._text_to_image("encoding prompts").encode_prompt(list(prompts), method)

    def _text_to_image(self, what: str) -> nn.Module:
        if not hasattr(self.model, "encode_prompt"):
            raise ValueError(f"{what} needs a text-to-image model (a TextToImage of a DiffusionBackbone), not a bare UNet")
        return self.model

    def token_id(self, word: str) -> int:
        """The one token id of ``word`` in the text encoder's tokenizer (textual inversion's identifier)."""
        return self._text_to_image("a learned word").token_id(word)

    def word_embedding(self, word: str) -> Tensor:
        """The frozen word embedding (w,) of ``word``."""
        return self._text_to_image("a learned word").word_embedding(word)

    def features(self, batch: Any, method: Method, checkpoint: bool = False) -> Tensor:
        """The denoising error ``eps_hat - target`` (B, C, h, w) of a training batch (``image``
        (B, C, H, W) and its ``prompt`` texts), DreamBooth's objective: the images' latents get
        noise at a random timestep each, and the UNet predicts the noise (or the velocity)."""
        model = self._text_to_image("training on images and prompts")
        with torch.no_grad():
            latents = model.to_latents(batch["image"])
        scheduler = model.noise_scheduler
        noise = torch.randn_like(latents)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, steps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        text = self.encode_prompt(batch["prompt"], method)
        return self.predict_noise(method, noisy, steps, text) - target
