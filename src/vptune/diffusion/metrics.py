"""How well a subject-driven generation run does, by DreamBooth's metrics (Ruiz et al., 2023):

- **subject fidelity**: the mean cosine similarity of image embeddings between every generated
  image and every subject image, with a self-supervised image encoder (DINO in the paper:
  ``DINO``) and with CLIP's image tower (``CLIP-I``);
- **prompt fidelity**: the mean cosine similarity between each generated image's CLIP image
  embedding and its prompt's CLIP text embedding (``CLIP-T``), the prompt said of the class
  ("a photo of a bag", the identifier left out: no CLIP knows the identifier).

Encoders: ``dino`` is any image backbone ``vptune.backbones.load_backbone`` loads (a timm name
such as ``vit_small_patch16_224.dino`` with ``pretrained``, or the bundled ``vptune_vit_fmnist``,
the offline default: its pooled class token), ``clip`` an ``open_clip:NAME/TAG`` or the bundled
``vptune_clip_fmnist`` (offline default). Images are resized to the encoder's input size, grey
images repeated to its channels, and normalised by its mean and std.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_DINO = "vptune_vit_fmnist"
DEFAULT_CLIP = "vptune_clip_fmnist"
# The fixed evaluation prompts; {} is the subject ("sks bag"). Sentences in the bundled captions' words.
EVAL_TEMPLATES = ("a photo of a {}", "a {} at the top-left", "a large {} at the center", "a {} upside down")


def prepare(images: Tensor, encoder: nn.Module) -> Tensor:
    """``images`` (N, C, H, W) in [0, 1] as ``encoder`` reads them: its size, channels, mean and std."""
    from ..data.transforms import backbone_data_config

    config = backbone_data_config(encoder)
    channels, height, width = config["input_size"]
    x = images.float()
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ValueError(f"images have {x.shape[1]} channels; the encoder reads {channels}")
        x = x.expand(-1, channels, -1, -1)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(config["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(config["std"], dtype=x.dtype).view(1, -1, 1, 1)
    device = next(encoder.parameters()).device
    return ((x - mean) / std).to(device)


@torch.no_grad()
def dino_embeddings(images: Tensor, encoder: nn.Module) -> Tensor:
    """Normalised pooled features (N, D) of a frozen image backbone (its class token)."""
    from ..backbones.family import family_of

    return F.normalize(family_of(encoder).frozen_features(prepare(images, encoder)).float(), dim=-1)


@torch.no_grad()
def clip_image_embeddings(images: Tensor, clip: nn.Module) -> Tensor:
    """Normalised CLIP image embeddings (N, D)."""
    return F.normalize(clip.encode_image(prepare(images, clip)).float(), dim=-1)


@torch.no_grad()
def clip_text_embeddings(texts: list[str], clip: nn.Module) -> Tensor:
    """Normalised CLIP text embeddings (N, D), by the model's own tokenizer."""
    from ..backbones.family import family_of

    family = family_of(clip)
    return F.normalize(family.encode_text(family.tokenize(list(texts))).float(), dim=-1)


def subject_fidelity(generated: Tensor, subject: Tensor) -> float:
    """Mean cosine similarity of every generated embedding with every subject embedding (both normalised)."""
    return float((generated @ subject.T).mean())


def prompt_fidelity(images: Tensor, texts: Tensor) -> float:
    """Mean cosine similarity of each image embedding with its own text embedding (row by row)."""
    return float((images * texts).sum(-1).mean())


def load_encoders(dino: str | None = None, clip: str | None = None, *, pretrained: bool = False,
                  device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """The two frozen encoders (offline defaults: the bundled ViT and the bundled CLIP)."""
    from ..backbones import load_backbone

    encoders = []
    for spec in (dino or DEFAULT_DINO, clip or DEFAULT_CLIP):
        model = load_backbone(spec, pretrained=pretrained and spec not in (DEFAULT_DINO, DEFAULT_CLIP))
        encoders.append(model.requires_grad_(False).eval().to(device))
    if not hasattr(encoders[1], "encode_image"):
        raise ValueError(f"--clip {clip!r} is not a CLIP model (no image and text towers): pass open_clip:NAME/TAG or {DEFAULT_CLIP}")
    return encoders[0], encoders[1]


def fidelity(generated: Tensor, texts: list[str], subject: Tensor, dino: nn.Module, clip: nn.Module) -> dict[str, float]:
    """The three metrics of ``generated`` images (N, C, H, W) made from prompts said by ``texts``
    (N, one per image), against the ``subject`` images."""
    clip_images = clip_image_embeddings(generated, clip)
    return {
        "subject_dino": subject_fidelity(dino_embeddings(generated, dino), dino_embeddings(subject, dino)),
        "subject_clip": subject_fidelity(clip_images, clip_image_embeddings(subject, clip)),
        "prompt_clip": prompt_fidelity(clip_images, clip_text_embeddings(texts, clip)),
    }


def evaluate_generation(model: Any, subject: Tensor, *, templates: tuple[str, ...] = EVAL_TEMPLATES, num_images: int = 4,
                        steps: int = 25, guidance: float = 3.0, seed: int = 0, dino: nn.Module, clip: nn.Module,
                        grid: str | None = None, return_images: bool = False) -> dict[str, Any]:
    """Generate ``num_images`` per prompt of ``templates`` (filled with the run's subject, "sks
    bag") with a loaded generation run, and score them against the ``subject`` images: the three
    metrics over all prompts and per prompt. ``grid``: also write the images as a PNG grid;
    ``return_images``: the images (N, C, H, W), prompt-major, under ``images``."""
    from ..tasks.generation import class_prompt_of, subject_phrase
    from .model import tuned_parts
    from .sample import generate, save_grid

    task = model.task
    phrase = subject_phrase(task.instance_prompt, task.identifier)
    prompts = [template.format(phrase) for template in templates]
    said = [class_prompt_of(prompt, task.identifier) for prompt in prompts]
    images = generate(model.backbone.pipeline, prompts, num_images=num_images, steps=steps, guidance=guidance,
                      seed=seed, **tuned_parts(model))
    texts = [text for text in said for _ in range(num_images)]
    result: dict[str, Any] = {"prompts": prompts, "said": said, "num_images": num_images, "steps": steps,
                              "guidance": guidance, "seed": seed, **fidelity(images, texts, subject, dino, clip)}
    result["per_prompt"] = {
        prompt: fidelity(images[i * num_images:(i + 1) * num_images], texts[i * num_images:(i + 1) * num_images], subject, dino, clip)
        for i, prompt in enumerate(prompts)
    }
    if grid is not None:
        save_grid(images, grid, columns=num_images, scale=2, labels=prompts)
    if return_images:
        result["images"] = images
    return result


def evaluate_generation_run(run: str, *, data: str | None = None, backbone: str | None = None, weights: str | None = None,
                            dino: str | None = None, clip: str | None = None, pretrained: bool = False, num_images: int = 4,
                            steps: int = 25, seed: int = 0, grid: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """``vptune eval --run RUN`` on a generation run: the metrics over ``EVAL_TEMPLATES`` against
    the run's subject images (``data``: another ``subject:DIR`` to compare with)."""
    from .train import SUBJECT_PREFIX, is_subject_spec, load_generation_run, subject_images

    model = load_generation_run(run, backbone, weights=weights, device=device)
    data = data or model.metadata.get("data")
    if not isinstance(data, str) or not is_subject_spec(data):
        raise ValueError(f"--data must be subject:DIR (the subject's images) for a generation run, got {data!r}")
    pipeline = model.backbone.pipeline
    subject, _, _ = subject_images(data[len(SUBJECT_PREFIX):], pipeline.image_size, pipeline.image_channels)
    dino_model, clip_model = load_encoders(dino, clip, pretrained=pretrained, device=device)
    result = evaluate_generation(model, subject, num_images=num_images, steps=steps, seed=seed, dino=dino_model,
                                 clip=clip_model, grid=grid)
    return {"run": str(run), "data": data, "dino": dino or DEFAULT_DINO, "clip": clip or DEFAULT_CLIP, **result}
