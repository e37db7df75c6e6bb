"""Text-to-image diffusion models (diffusers UNets) as frozen backbones, and generation with them.

``backbone.py``: ``DiffusionBackbone`` and its loaders (Stable Diffusion 1.x/2.x pipelines, the
bundled ``vptune_sd_fmnist``, a tiny random one for tests); ``sample.py``: the denoising loop and
PNG grids; ``pretrain_sd.py``: ``vptune pretrain --arch sd``. Importing this package is cheap:
diffusers is imported inside the functions that need it.
"""

from .backbone import (
    BUNDLED_SD,
    DiffusionBackbone,
    denoising_loss,
    is_diffusion_spec,
    load_diffusion_backbone,
    tiny_random_backbone,
)

__all__ = [
    "BUNDLED_SD",
    "DiffusionBackbone",
    "denoising_loss",
    "is_diffusion_spec",
    "load_diffusion_backbone",
    "tiny_random_backbone",
]
