"""Subject-driven generation, DreamBooth's objective (Ruiz et al., CVPR 2023): a few images of one
subject, each with the instance prompt that names it by a rare identifier ("a photo of sks bag"),
and optionally class images made by the frozen model from the class prompt ("a photo of bag")
for prior preservation. The model's output on a batch is the denoising error ``eps_hat - eps``
(the family draws the noise and the timestep, ``UNetFamily.features``); the loss is its mean
square per image, weighted 1 for a subject image and ``prior_weight`` for a class image:

    L = mean_i w_i || eps_hat(z_t_i, t_i, c(y_i)) - eps_i ||^2

which is DreamBooth's ``instance loss + prior_weight * prior loss`` when a step holds as many
class images as subject images. There is no head: the output is the error itself.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .base import Task


def words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def check_instance_prompt(prompt: str, identifier: str) -> None:
    """Refuse an instance prompt that does not name the subject by ``identifier`` as a word."""
    if not prompt.strip():
        raise ValueError("--prompt is empty: give the instance prompt, e.g. 'a photo of sks bag'")
    if identifier.lower() not in words(prompt):
        raise ValueError(f"the instance prompt {prompt!r} does not contain the identifier {identifier!r}: the subject is "
                         f"bound to that word, e.g. 'a photo of {identifier} bag' (or pass --identifier)")


def class_prompt_of(prompt: str, identifier: str) -> str:
    """The instance prompt without its identifier ("a photo of sks bag" -> "a photo of bag")."""
    kept = [w for w in prompt.split() if w.lower().strip(".,;:!?") != identifier.lower()]
    return " ".join(kept)


def subject_phrase(prompt: str, identifier: str) -> str:
    """The identifier with the class word after it ("sks bag"), what evaluation prompts place."""
    tokens = prompt.split()
    for i, token in enumerate(tokens):
        if token.lower().strip(".,;:!?") == identifier.lower():
            return " ".join(t.strip(".,;:!?") for t in tokens[i:i + 2])
    return identifier


class GenerationTask(Task):
    name = "generation"
    fields = ("image", "prompt", "weight")
    main_metric = "loss"

    def __init__(self, instance_prompt: str, identifier: str = "sks", class_prompt: str | None = None,
                 prior_weight: float = 1.0, class_images: int = 0) -> None:
        check_instance_prompt(instance_prompt, identifier)
        if prior_weight < 0:
            raise ValueError(f"--prior-weight must be >= 0, got {prior_weight}")
        if class_images < 0:
            raise ValueError(f"--class-images must be >= 0 (0: no prior preservation), got {class_images}")
        self.instance_prompt, self.identifier = instance_prompt, identifier
        self.class_prompt = class_prompt if class_prompt is not None else class_prompt_of(instance_prompt, identifier)
        if identifier.lower() in words(self.class_prompt):
            raise ValueError(f"the class prompt {self.class_prompt!r} names the identifier {identifier!r}: it should "
                             "describe any member of the class")
        self.prior_weight, self.class_images = float(prior_weight), int(class_images)

    def head(self, in_dim: int) -> nn.Module:
        return nn.Identity()

    def per_image(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Each image's weighted mean squared denoising error (B,)."""
        weight = batch["weight"].to(outputs.device, torch.float32)
        return outputs.float().pow(2).flatten(1).mean(1) * weight

    def loss(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return self.per_image(outputs, batch).mean()

    def loss_sum(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return self.per_image(outputs, batch).sum()

    def metrics(self, outputs: Tensor, batch: Mapping[str, Any], split: str = "test") -> dict[str, float]:
        return {f"{split}_loss": self.loss(outputs, batch).item()}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "instance_prompt": self.instance_prompt, "identifier": self.identifier,
                "class_prompt": self.class_prompt, "prior_weight": self.prior_weight, "class_images": self.class_images}
