"""Text-to-image diffusion models as frozen backbones: a diffusers ``UNet2DConditionModel``, the
text encoder whose per-token states it cross-attends to, the training noise scheduler and, for
latent models, the VAE, held together in one ``DiffusionBackbone``.

``load_diffusion_backbone`` reads Stable Diffusion 1.x / 2.x pipelines (``hf:NAME --pretrained``
through diffusers' download, or a local pipeline folder) and the bundled pixel-space model
``vptune_sd_fmnist`` (conditioned on the bundled CLIP's text tower, ``weights/SD_MODEL_CARD.md``).
``tiny_random_backbone`` builds a tiny one for tests. Everything is frozen: methods (in the UNet's
attention processors, ``vptune.diffusion``'s method code) and textual inversion (a forward hook on
``text_encoder.token_embedding``) add their own tensors and never change these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

BUNDLED_SD = "vptune_sd_fmnist"
HF_PREFIX = "hf:"
FAMILY = "diffusers-unet"

# The bundled model: a pixel-space UNet on 32x32 grey canvases, cross-attending to the bundled
# CLIP's text states (width 128, 48 tokens). Down blocks at 32, 16 and 8 px; attention at 16 and 8.
BUNDLED_UNET = dict(
    sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=16, norm_num_groups=8,
)
BUNDLED_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True, clip_sample_range=1.0)


class WordCLIPTextStates(nn.Module):
    """The per-token states (B, L, w) of an open_clip CLIP's text tower after its final norm (what
    Stable Diffusion takes from its CLIP text encoder), with the tower's own tokenizer. Holds the
    tower's modules only, not the image tower."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self._tokenizer = clip.tokenizer

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    @property
    def max_length(self) -> int:
        return self.positional_embedding.shape[0]

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self._tokenizer(list(prompts))

    def forward(self, ids: Tensor) -> Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]  # B, L, w
        mask = self.attn_mask[: ids.shape[1], : ids.shape[1]]
        return self.ln_final(self.transformer(x, attn_mask=mask))


class HFCLIPTextStates(nn.Module):
    """A transformers ``CLIPTextModel``'s last hidden states (B, 77, w) with its tokenizer, padded
    to the tokenizer's maximum length, as the Stable Diffusion pipelines encode prompts."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_length(self) -> int:
        return int(min(self._tokenizer.model_max_length, self.model.config.max_position_embeddings))

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self._tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")["input_ids"]

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).last_hidden_state


@dataclass
class DiffusionBackbone:
    """A frozen text-to-image diffusion model: what a method tunes around and what generation runs.

    ``unet`` predicts the noise (or velocity, per ``noise_scheduler.config.prediction_type``) of
    latents (B, latent_channels, latent_size, latent_size) given ``encode_prompt``'s states;
    ``vae`` is None for a pixel-space model, whose latents are the images scaled to [-1, 1]."""

    name: str
    unet: nn.Module
    text_encoder: nn.Module  # WordCLIPTextStates or HFCLIPTextStates: tokenize(prompts) -> ids, forward(ids) -> states
    noise_scheduler: Any  # diffusers DDPMScheduler: the training noise schedule; samplers are built from its config
    vae: nn.Module | None = None
    image_size: int = 32
    image_channels: int = 1

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self.text_encoder.tokenize(prompts)

    def encode_prompt(self, prompts: list[str]) -> Tensor:
        """The text states (B, L, D) the UNet cross-attends to; "" is the unconditional prompt."""
        return self.text_encoder(self.tokenize(prompts).to(self.device))

    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, image_channels, H, W) in [0, 1] to the UNet's latents: [-1, 1] pixels, or the
        VAE's posterior sample times its scaling factor."""
        x = images.to(self.device) * 2 - 1
        if self.vae is None:
            return x
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor

    def to_images(self, latents: Tensor) -> Tensor:
        """Latents back to images in [0, 1]."""
        if self.vae is not None:
            latents = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def modules(self) -> dict[str, nn.Module]:
        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    def freeze(self) -> "DiffusionBackbone":
        """Every parameter frozen and every part in eval mode (methods add their own tensors)."""
        for module in self.modules().values():
            module.requires_grad_(False).eval()
        return self

    def to(self, device: str | torch.device) -> "DiffusionBackbone":
        for module in self.modules().values():
            module.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        """What a saved run must match to be loaded on this model: the UNet's shape, its
        cross-attention input, the latent space and the noise schedule's target."""
        config = self.unet.config
        return {
            "family": FAMILY,
            "name": self.name,
            "unet": {
                "sample_size": int(config.sample_size), "in_channels": int(config.in_channels),
                "block_out_channels": list(config.block_out_channels),
                "down_block_types": list(config.down_block_types),
                "layers_per_block": config.layers_per_block if isinstance(config.layers_per_block, int) else list(config.layers_per_block),
                "cross_attention_dim": config.cross_attention_dim,
                "attention_head_dim": config.attention_head_dim if isinstance(config.attention_head_dim, int) else list(config.attention_head_dim),
            },
            "attention_sites": len(self.unet.attn_processors),
            "text_states": [self.text_encoder.max_length, self.text_encoder.width],
            "latent": [self.latent_channels, self.latent_size],
            "vae": self.vae is not None,
            "prediction_type": self.noise_scheduler.config.prediction_type,
        }

    def fingerprint(self) -> str:
        """A short hash of the UNet's input convolution and the text encoder's token embedding, to
        notice a run trained on other weights of the same shape."""
        digest = hashlib.sha256()
        for tensor in (self.unet.conv_in.weight, self.text_encoder.token_embedding.weight):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_matches(self, described: dict[str, Any], fingerprint: str | None = None) -> None:
        """Refuse a run made on another pipeline (``described`` is that backbone's ``describe()``):
        one error that names both and says which backbone to pass."""
        ours = self.describe()
        name = described.get("name", "?")
        if described.get("family") != FAMILY:
            raise ValueError(f"the run was made on a {described.get('family', 'non-diffusion')} backbone ({name}), "
                             f"not a diffusion UNet; this backbone is {self.name}: pass --backbone {name}")
        differ = [key for key in ours if key != "name" and ours[key] != described.get(key)]
        if differ:
            shown = "; ".join(f"{key}: run {described.get(key)} vs this {ours[key]}" for key in differ)
            raise ValueError(f"the run was made on {name}, which differs from this backbone {self.name} ({shown}): "
                             f"pass --backbone {name}")
        if fingerprint is not None and fingerprint != self.fingerprint():
            raise ValueError(f"the run was made on {name} with other weights (fingerprint {fingerprint}, this one "
                             f"{self.fingerprint()}): pass the same --backbone and --weights it was trained with")

    def num_parameters(self) -> int:
        return sum(p.numel() for module in self.modules().values() for p in module.parameters())


def denoising_loss(backbone: DiffusionBackbone, latents: Tensor, states: Tensor, *, unet: nn.Module | None = None,
                   generator: torch.Generator | None = None, weights: Tensor | None = None) -> Tensor:
    """The DDPM training loss: noise ``latents`` at uniformly drawn timesteps, predict the
    scheduler's target (the noise, or the velocity for v-prediction) from ``states``, mean squared
    error (per example times ``weights`` when given, e.g. DreamBooth's prior-preservation weight).
    ``unet`` defaults to the backbone's; pass a tuned one to train a method."""
    scheduler = backbone.noise_scheduler
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator,
                              device="cpu").to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction type {kind!r} is not trained here (epsilon or v_prediction)")
    prediction = (unet or backbone.unet)(noisy, timesteps, encoder_hidden_states=states).sample
    per_example = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_example * weights).mean() if weights is not None else per_example.mean()


# ---- building and loading --------------------------------------------------------------------

def bundled_sd_weights_path() -> Path:
    return Path(str(resources.files("vptune") / "weights" / f"{BUNDLED_SD}.safetensors"))


def build_bundled_sd(clip: nn.Module | None = None) -> DiffusionBackbone:
    """The bundled model's architecture with a random UNet, on the bundled CLIP's text tower
    (``clip``, default: the shipped ``vptune_clip_fmnist``). Not frozen (pretraining trains it)."""
    from ..extras import require

    require("diffusion", "diffusers", purpose=f"the bundled text-to-image model {BUNDLED_SD}")
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if clip is None:
        from ..backbones.clip_bundled import load_bundled_clip

        clip = load_bundled_clip()
    text = WordCLIPTextStates(clip)
    unet = UNet2DConditionModel(**BUNDLED_UNET)
    return DiffusionBackbone(BUNDLED_SD, unet, text, DDPMScheduler(**BUNDLED_SCHEDULER), None, 32, 1)


def load_bundled_sd(weights: str | Path | None = None) -> DiffusionBackbone:
    """``vptune_sd_fmnist`` with its shipped UNet weights (or ``weights``), frozen."""
    from safetensors.torch import load_file

    from ..backbones.loading import load_state

    path = Path(weights) if weights is not None else bundled_sd_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"the bundled text-to-image model's weights are missing ({path}). Create them with "
                                "`vptune pretrain --arch sd`, or pass another --backbone")
    backbone = build_bundled_sd()
    load_state(backbone.unet, load_file(str(path)), source=str(path))
    return backbone.freeze()


_SDXL_REFUSAL = ("{what} is an SDXL pipeline: its UNet also needs the pooled states of a second text encoder and "
                 "size conditions (added_cond_kwargs), which vptune's generation and training do not feed; "
                 "use a Stable Diffusion 1.x or 2.x pipeline (e.g. hf:stable-diffusion-v1-5/stable-diffusion-v1-5)")


def load_pipeline_backbone(spec: str, source: str, *, local: bool) -> DiffusionBackbone:
    """A Stable Diffusion 1.x / 2.x pipeline's parts from ``source`` (a hub name, or a local folder in
    diffusers' ``save_pretrained`` layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/), frozen. The safety checker and feature extractor are not loaded."""
    from ..extras import require

    require("diffusion", purpose=f"the diffusion backbone {spec}")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    if local:
        index_path = Path(source) / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{source} is not a diffusers pipeline folder (no model_index.json); save one with "
                                    "pipeline.save_pretrained(FOLDER) and pass --weights FOLDER")
        index = json.loads(index_path.read_text())
        pipeline_class = str(index.get("_class_name", ""))
        if "XL" in pipeline_class or "text_encoder_2" in index:
            raise ValueError(_SDXL_REFUSAL.format(what=source))
        if "unet" not in index or "text_encoder" not in index:
            raise ValueError(f"{source}: a {pipeline_class or 'pipeline'} without a UNet and a text encoder is not a "
                             "Stable Diffusion pipeline vptune can tune")
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ValueError(_SDXL_REFUSAL.format(what=source))
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        text = HFCLIPTextStates(CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
                                AutoTokenizer.from_pretrained(source, subfolder="tokenizer"))
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except OSError as error:
        if local:
            raise FileNotFoundError(f"{source}: incomplete pipeline folder ({error})") from error
        raise ConnectionError(
            f"could not fetch {source!r} from the Hugging Face hub ({error}). Offline, save the pipeline elsewhere with "
            "save_pretrained and pass --weights FOLDER"
        ) from error
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    backbone = DiffusionBackbone(spec, unet, text, scheduler, vae, int(unet.config.sample_size) * factor,
                                 int(vae.config.in_channels))
    return backbone.freeze()


def is_diffusion_spec(spec: str, weights: str | Path | None = None) -> bool:
    """Whether ``spec`` names a text-to-image backbone (the bundled one, a diffusers pipeline folder,
    or a hub name of a Stable Diffusion pipeline), so commands can route it here."""
    if spec == BUNDLED_SD:
        return True
    if not spec.startswith(HF_PREFIX):
        return False
    name = spec[len(HF_PREFIX):]
    for folder in (weights, name):
        if folder is not None and (Path(folder) / "model_index.json").is_file():
            return True
    lowered = name.lower()
    return any(word in lowered for word in ("stable-diffusion", "stable_diffusion", "sd-", "sdxl", "diffusion"))


def load_diffusion_backbone(spec: str = BUNDLED_SD, *, pretrained: bool = False,
                            weights: str | Path | None = None) -> DiffusionBackbone:
    """A frozen text-to-image backbone by name.

    ``vptune_sd_fmnist``: the bundled pixel-space model (``weights``: another UNet safetensors file).
    ``hf:NAME``: a Stable Diffusion 1.x / 2.x pipeline: diffusers' download (or its cache) with
    ``pretrained``, or a local pipeline folder given as ``weights`` or as NAME itself. SDXL is
    refused with the reason."""
    if spec == BUNDLED_SD:
        return load_bundled_sd(weights)
    if spec.startswith(HF_PREFIX):
        name = spec[len(HF_PREFIX):]
        if weights is not None:
            if not Path(weights).is_dir():
                raise FileNotFoundError(f"--weights {weights} is not a folder: for {spec} pass a diffusers pipeline "
                                        "folder (pipeline.save_pretrained(FOLDER))")
            return load_pipeline_backbone(spec, str(weights), local=True)
        if Path(name).is_dir():
            return load_pipeline_backbone(spec, name, local=True)
        if "xl" in name.lower():
            raise ValueError(_SDXL_REFUSAL.format(what=name))
        if not pretrained:
            raise ValueError(f"{spec}: pass --pretrained to download the pipeline (online), or --weights FOLDER with a "
                             "local pipeline folder")
        return load_pipeline_backbone(spec, name, local=False)
    raise ValueError(f"unknown diffusion backbone {spec!r}: use {BUNDLED_SD} (bundled) or "
                     "hf:NAME (a Stable Diffusion 1.x/2.x pipeline, e.g. hf:stable-diffusion-v1-5/stable-diffusion-v1-5)")


def tiny_random_backbone(seed: int = 0, *, vae: bool = False,
                         init: Callable[..., Any] | None = None) -> DiffusionBackbone:
    """A tiny random text-to-image model for tests: an 8x8 one-channel UNet with cross-attention at
    both resolutions, a two-layer transformers CLIP text encoder on the canvases' word tokenizer
    (which holds ``sks``), a DDPM schedule of 100 steps; with ``vae`` a tiny AutoencoderKL and
    16x16 three-channel images. ``init(module, seed=...)`` is applied to each part (tests pass
    ``honest_``). Frozen."""
    from ..extras import require

    require("diffusion", purpose="a tiny diffusion backbone")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..data.tokenizer import WordTokenizer

    torch.manual_seed(seed)
    words = WordTokenizer.from_file()
    tokenizer = words.to_transformers()
    tokenizer.model_max_length = 16
    text_model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, pad_token_id=words.pad_token_id, bos_token_id=words.cls_token_id,
        eos_token_id=words.sep_token_id))
    channels = 4 if vae else 1
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    autoencoder = None
    if vae:
        autoencoder = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                    latent_channels=4, norm_num_groups=4, sample_size=16)
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=not vae)
    backbone = DiffusionBackbone("tiny-random", unet, HFCLIPTextStates(text_model, tokenizer), scheduler, autoencoder,
                                 16 if vae else 8, 3 if vae else 1)
    if init is not None:
        for offset, module in enumerate(backbone.modules().values()):
            init(module, seed=seed * 10 + offset)
    return backbone.freeze()
