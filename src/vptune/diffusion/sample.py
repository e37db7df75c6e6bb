"""Generation with a ``DiffusionBackbone``: the denoising loop (a diffusers sampler built from the
backbone's training schedule, classifier-free guidance against the empty prompt, one seeded noise
per image) and a PNG grid writer. ``vptune generate`` calls ``generate`` then ``save_grid``.

``generate`` takes the UNet and the prompt encoder to use (``unet=``, ``encode_prompt=``), so a
tuned method runs through the same loop as the frozen model: attention processors installed on
the backbone's UNet, a peft-wrapped UNet, or a textual-inversion prompt encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .backbone import DiffusionBackbone

SAMPLERS = ("ddim", "dpm", "ddpm")


def make_sampler(backbone: DiffusionBackbone, name: str = "ddim"):
    """A diffusers sampler on the backbone's noise schedule: DDIM (deterministic, eta 0), DPM-Solver++
    (multistep, good in 10-25 steps) or ancestral DDPM (seeded noise every step)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return classes[name].from_config(backbone.noise_scheduler.config)


def image_generators(seed: int, count: int) -> list[torch.Generator]:
    """One generator per image, seeded ``seed + k``: image ``k``'s starting noise and, for the
    stochastic samplers, its noise at every step come from it alone, so an image does not change
    with the number of images or the batch size."""
    return [torch.Generator().manual_seed(seed + k) for k in range(count)]


def initial_noise(backbone: DiffusionBackbone, generators: list[torch.Generator]) -> Tensor:
    """Starting noise (len(generators), C, h, w), one draw from each image's generator."""
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def generate(
    backbone: DiffusionBackbone,
    prompts: list[str],
    *,
    num_images: int = 1,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    sampler: str = "ddim",
    batch_size: int = 16,
    unet: nn.Module | None = None,
    encode_prompt: Callable[[list[str]], Tensor] | None = None,
    progress: bool = False,
) -> Tensor:
    """``num_images`` images per prompt, (len(prompts) * num_images, C, H, W) in [0, 1], prompt-major.

    Classifier-free guidance: eps = eps(empty prompt) + ``guidance`` * (eps(prompt) - eps(empty));
    ``guidance`` 1 uses the prompt alone (one UNet pass per step). ``unet`` and ``encode_prompt``
    default to the backbone's own."""
    if not prompts:
        raise ValueError("give at least one prompt")
    if steps < 1 or num_images < 1 or batch_size < 1:
        raise ValueError(f"steps, num_images and batch_size must be at least 1 (got {steps}, {num_images}, {batch_size})")
    unet = unet or backbone.unet
    encode = encode_prompt or backbone.encode_prompt
    device = backbone.device
    expanded = [prompt for prompt in prompts for _ in range(num_images)]
    generators = image_generators(seed, len(expanded))
    noise = initial_noise(backbone, generators)
    empty = encode([""]) if guidance != 1 else None
    chunks = [(start, expanded[start:start + batch_size]) for start in range(0, len(expanded), batch_size)]

    bar = _progress(progress)
    task = bar.add_task("denoising", total=steps * len(chunks)) if bar else None
    images = []
    try:
        for start, chunk in chunks:
            scheduler = make_sampler(backbone, sampler)
            scheduler.set_timesteps(steps, device=device)
            generator = generators[start:start + len(chunk)]  # the stochastic samplers' step noise, per image
            states = encode(chunk)  # B, L, D
            if empty is not None:
                states = torch.cat([empty.expand(len(chunk), -1, -1), states])  # 2B, L, D
            latents = noise[start:start + len(chunk)].to(device) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                model_input = torch.cat([latents] * 2) if empty is not None else latents
                model_input = scheduler.scale_model_input(model_input, t)
                prediction = unet(model_input, t, encoder_hidden_states=states).sample
                if empty is not None:
                    unconditional, conditional = prediction.chunk(2)
                    prediction = unconditional + guidance * (conditional - unconditional)
                latents = scheduler.step(prediction, t, latents, generator=generator).prev_sample
                if bar:
                    bar.advance(task)
            images.append(backbone.to_images(latents).cpu())
    finally:
        if bar:
            bar.stop()
    return torch.cat(images)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    bar.start()
    return bar


def grid_image(images: Tensor, columns: int | None = None, scale: int = 1, labels: list[str] | None = None,
               padding: int = 2):
    """A PIL image of ``images`` (N, C, H, W) in [0, 1] on a grid (``columns`` per row, default
    the square-ish number), each cell enlarged ``scale`` times (nearest neighbour: small canvases
    stay sharp), with one label line above each row when ``labels`` are given."""
    import numpy as np
    from PIL import Image, ImageDraw

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    count, channels, height, width = images.shape
    columns = columns or max(1, int(np.ceil(np.sqrt(count))))
    rows = -(-count // columns)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows")
    cell_h, cell_w = height * scale, width * scale
    label_h = 14 if labels else 0
    grid = Image.new("RGB", (columns * (cell_w + padding) + padding, rows * (cell_h + padding + label_h) + padding), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.expand(-1, 3, -1, -1) if channels == 1 else pixels
    for k in range(count):
        row, col = divmod(k, columns)
        cell = Image.fromarray(pixels[k].permute(1, 2, 0).numpy()).resize((cell_w, cell_h), Image.NEAREST)
        top = padding + row * (cell_h + padding + label_h) + label_h
        grid.paste(cell, (padding + col * (cell_w + padding), top))
    for row, label in enumerate(labels or []):
        draw.text((padding, padding + row * (cell_h + padding + label_h)), label, fill="black")
    return grid


def save_grid(images: Tensor, path: str | Path, **options) -> Path:
    """Write ``grid_image(images, **options)`` as a PNG (parent folders created); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the grid is written as PNG; give a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, **options).save(path)
    return path
