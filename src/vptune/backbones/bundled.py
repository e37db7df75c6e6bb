"""The bundled backbone: a small timm ViT pretrained on Fashion-MNIST, shipped with the package
so that vptune works on first contact with no download (see ``weights/MODEL_CARD.md``).

Images are 32x32 RGB; Fashion-MNIST's 28x28 grayscale images are zero-padded to 32x32 and
replicated to three channels, so any RGB dataset fits the same input. The shipped weights hold
the backbone without its Fashion-MNIST classifier (vptune always trains a new head).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

BUNDLED_BACKBONE = "vptune_vit_fmnist"

# Pixel mean and std of the Fashion-MNIST train set zero-padded to 32x32 (0..1 scale).
MEAN = (0.2190, 0.2190, 0.2190)
STD = (0.3318, 0.3318, 0.3318)

ARCHITECTURE = dict(
    img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3,
    class_token=True, global_pool="token",
)


def bundled_weights_path() -> Path:
    """Where the package keeps the shipped weights (which may not have been created yet)."""
    return Path(str(resources.files("vptune") / "weights" / f"{BUNDLED_BACKBONE}.safetensors"))


def build_bundled(num_classes: int = 0) -> VisionTransformer:
    """The bundled architecture with random weights; ``num_classes=0`` has no classifier head."""
    model = VisionTransformer(num_classes=num_classes, **ARCHITECTURE)
    model.pretrained_cfg = {
        "architecture": BUNDLED_BACKBONE,
        "input_size": (3, 32, 32),
        "mean": MEAN,
        "std": STD,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    }
    return model
