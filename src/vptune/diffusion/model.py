"""A text-to-image backbone as one ``nn.Module`` that ``PromptModel`` can hold, and a tuned run's
parts for the denoising loop.

``TextToImage`` holds a ``DiffusionBackbone``'s UNet, text encoder and VAE as submodules (shared
with every other run on the same backbone, never changed) and the choice of attention sites a run
acts on (``vptune.backbones.unet``). A copy of it (``copy.deepcopy``: what full fine-tuning and
LoRA train) copies the UNet only: the frozen text encoder and VAE stay shared, as DreamBooth and
DreamBooth-LoRA tune the UNet alone.

``tuned_parts(model)`` gives the UNet and prompt encoder that ``vptune.diffusion.sample.generate``
runs a tuned model with: the run's UNet (its private copy, or the shared one) behind the method's
attention processors, and the text encoder with the method's word embeddings.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

from torch import Tensor, nn

from ..methods.base import Method


class TextToImage(nn.Module):
    """``backbone``'s UNet, text encoder and VAE, for one run acting on the ``sites`` attention
    ("self", "cross" or "both"; ``vptune.backbones.unet``)."""

    def __init__(self, backbone: Any, sites: str = "both") -> None:
        super().__init__()
        self.unet = backbone.unet
        self.text_encoder = backbone.text_encoder
        self.vae = backbone.vae
        self.pipeline = backbone  # the DiffusionBackbone: scheduler, latents, tokenizer (not a module)
        self.sites = sites

    @property
    def architecture(self) -> str:
        return self.pipeline.name

    @property
    def noise_scheduler(self) -> Any:
        return self.pipeline.noise_scheduler

    @property
    def text_length(self) -> int:
        return int(self.text_encoder.max_length)

    def __deepcopy__(self, memo: dict) -> "TextToImage":
        """A copy with its own UNet; the text encoder, VAE and scheduler stay shared."""
        new = TextToImage.__new__(TextToImage)
        nn.Module.__init__(new)
        new.unet = copy.deepcopy(self.unet, memo)
        new.text_encoder, new.vae = self.text_encoder, self.vae
        new.pipeline, new.sites = self.pipeline, self.sites
        new.train(self.training)
        return new

    def to_latents(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] to the UNet's latents (the backbone's own mapping)."""
        return self.pipeline.to_latents(images.to(self.unet.device))

    @contextlib.contextmanager
    def word_embeddings(self, method: Method) -> Iterator[None]:
        """The text encoder's word embeddings pass through ``method.token_embeddings`` while inside."""
        def rewrite(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            return method.token_embeddings(args[0], output)

        handle = self.text_encoder.token_embedding.register_forward_hook(rewrite)
        try:
            yield
        finally:
            handle.remove()

    def encode_prompt(self, prompts: list[str], method: Method | None = None) -> Tensor:
        """Text states (B, L, D) of ``prompts`` through the frozen text encoder, with ``method``'s
        word embeddings."""
        ids = self.pipeline.tokenize(list(prompts)).to(self.unet.device)
        if method is None:
            return self.text_encoder(ids)
        with self.word_embeddings(method):
            return self.text_encoder(ids)

    def token_ids(self, word: str) -> list[int]:
        """The ids ``word`` alone is tokenized to, without the tokenizer's special tokens."""
        special = set(self.pipeline.tokenize([""])[0].tolist())
        return [i for i in self.pipeline.tokenize([word])[0].tolist() if i not in special]

    def token_id(self, word: str) -> int:
        """The one token id of ``word``; a word the tokenizer splits or does not know is refused."""
        ids = self.token_ids(word)
        unknown = self.token_ids("qzxqzxqzx")
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens for this text encoder's tokenizer; textual inversion learns "
                             "one word: choose an identifier that is a single token (e.g. sks)")
        if len(unknown) == 1 and ids == unknown and word != "qzxqzxqzx":
            raise ValueError(f"{word!r} is not in this text encoder's vocabulary (it reads as the unknown token): "
                             "choose a word it knows")
        return ids[0]

    def word_embedding(self, word: str) -> Tensor:
        """The frozen embedding (w,) of ``word`` (one token)."""
        return self.text_encoder.token_embedding.weight[self.token_id(word)].detach()


class MethodUNet(nn.Module):
    """A UNet as the denoising loop calls it (``unet(latents, t, encoder_hidden_states=...).sample``)
    that runs with a method at its sites (``UNetFamily.predict_noise``)."""

    def __init__(self, family: Any, method: Method) -> None:
        super().__init__()
        self.family, self.method = family, method
        self.config = family.unet.config

    def forward(self, sample: Tensor, timestep: Tensor | int, encoder_hidden_states: Tensor, **kwargs: Any) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        kwargs.pop("return_dict", None)
        return UNet2DConditionOutput(self.family.predict_noise(self.method, sample, timestep, encoder_hidden_states, **kwargs))


def tuned_parts(model: nn.Module) -> dict[str, Any]:
    """``unet`` and ``encode_prompt`` for ``vptune.diffusion.sample.generate`` from a generation
    ``PromptModel``: its method at the UNet's sites, its word embeddings in the text encoder."""
    model.eval()
    family, method = model.family, model.method
    return {"unet": MethodUNet(family, method), "encode_prompt": lambda prompts: family.encode_prompt(prompts, method)}
