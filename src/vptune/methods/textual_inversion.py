"""Textual inversion (Gal et al., ICLR 2023, "An Image is Worth One Word: Personalizing
Text-to-Image Generation using Textual Inversion"); docs/methods.md, "Methods for subject-driven
generation".

A new concept is one new word. Its embedding ``v*`` (one vector of the text encoder's word-embedding
width) stands wherever the identifier ``S*`` (``token``, "sks") occurs in a prompt; the text encoder
and the generator stay frozen, and ``v*`` is found by the generator's own denoising loss on the
subject's images, the prompts reaching the UNet only through the frozen text encoder:

    v* = argmin_v  E_{x, eps, t} || eps - eps_theta(z_t, t, c_theta(y with S* -> v)) ||^2

``v*`` starts from the embedding of a coarse descriptor of the subject (``init_word``, e.g. "bag";
by default the identifier's own embedding). The family answers two questions: which token id
``token`` is in its tokenizer, and a word's embedding; the method answers ``token_embeddings``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .base import Method, MethodConfig, register


@register("textual-inversion")
@dataclasses.dataclass
class TextualInversionConfig(MethodConfig):
    token: str = "sks"  # the identifier S* whose embedding is learned
    init_word: str | None = None  # a coarse descriptor whose embedding starts v*; None: the identifier's own

    def __post_init__(self) -> None:
        if not self.token or any(c.isspace() for c in self.token):
            raise ValueError(f"token must be one word (the identifier in the prompt, e.g. sks), got {self.token!r}")

    def method_name(self) -> str:
        return "textual-inversion"

    def build(self, family) -> "TextualInversion":
        if not hasattr(family, "token_id"):
            raise ValueError("textual-inversion learns a word of a text-to-image model's text encoder: use a diffusion "
                             "backbone (vptune_sd_fmnist or hf:stable-diffusion-...)")
        return TextualInversion(self, family)


class TextualInversion(Method):
    """``v*`` (1, w), the learned embedding of ``token``, in place of its word embedding."""

    def __init__(self, config: TextualInversionConfig, family) -> None:
        super().__init__()
        self.config = config
        self.token_id = family.token_id(config.token)
        start = family.word_embedding(config.init_word or config.token)
        self.embedding = nn.Parameter(start.detach().clone().reshape(1, -1))  # v*

    def token_embeddings(self, token_ids: Tensor, embeddings: Tensor) -> Tensor:
        is_identifier = (token_ids == self.token_id).unsqueeze(-1)  # B, L, 1
        return torch.where(is_identifier, self.embedding.to(embeddings.dtype), embeddings)
