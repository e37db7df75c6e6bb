"""The bundled backbones: small timm models pretrained on Fashion-MNIST, shipped with the package
so that vptune works on first contact with no download (see ``weights/MODEL_CARD.md`` for the
ViT and ``weights/MODEL_CARD_swin.md`` for the Swin).

Images are 32x32 RGB; Fashion-MNIST's 28x28 grayscale images are zero-padded to 32x32 and
replicated to three channels, so any RGB dataset fits the same input. The shipped weights hold
the backbone without its Fashion-MNIST classifier (vptune always trains a new head).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from torch import nn

BUNDLED_BACKBONE = "vptune_vit_fmnist"
BUNDLED_SWIN = "vptune_swin_fmnist"

# Pixel mean and std of the Fashion-MNIST train set zero-padded to 32x32 (0..1 scale).
MEAN = (0.2190, 0.2190, 0.2190)
STD = (0.3318, 0.3318, 0.3318)

ARCHITECTURE = dict(
    img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3,
    class_token=True, global_pool="token",
)

# Patch 4 on 32x32 gives an 8x8 grid like the bundled ViT's: stage 0 attends in four 4x4 windows
# (shifted by 2 in its second block), stage 1 (4x4 after a patch merging) in one window, stage 2
# (2x2) in one 2x2 window (timm clips windows to the grid and does not shift a single window).
# Widths 48/96/192, heads of size 16 in every stage.
SWIN_ARCHITECTURE = dict(
    img_size=32, patch_size=4, in_chans=3, embed_dim=48, depths=(2, 2, 6), num_heads=(3, 6, 12),
    window_size=4, drop_path_rate=0.0, global_pool="avg",
)


@dataclass(frozen=True)
class Bundled:
    """One bundled backbone: its pretrain ``--arch``, timm class, constructor arguments and model card."""

    arch: str
    model_class: str  # timm class name
    architecture: dict
    card: str

    def build(self, num_classes: int) -> nn.Module:
        if self.model_class == "SwinTransformer":
            from timm.models.swin_transformer import SwinTransformer

            return SwinTransformer(num_classes=num_classes, **self.architecture)
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(num_classes=num_classes, **self.architecture)


BUNDLED: dict[str, Bundled] = {
    BUNDLED_BACKBONE: Bundled("vit", "VisionTransformer", ARCHITECTURE, "MODEL_CARD.md"),
    BUNDLED_SWIN: Bundled("swin", "SwinTransformer", SWIN_ARCHITECTURE, "MODEL_CARD_swin.md"),
}
ARCHES = {spec.arch: name for name, spec in BUNDLED.items()}  # pretrain --arch -> bundled name


def bundled_weights_path(name: str = BUNDLED_BACKBONE) -> Path:
    """Where the package keeps the shipped weights of ``name`` (which may not have been created yet)."""
    return Path(str(resources.files("vptune") / "weights" / f"{name}.safetensors"))


def build_bundled(num_classes: int = 0, name: str = BUNDLED_BACKBONE) -> nn.Module:
    """A bundled architecture with random weights; ``num_classes=0`` has no classifier head."""
    spec = BUNDLED[name]
    model = spec.build(num_classes)
    model.pretrained_cfg = {
        "architecture": name,
        "input_size": (3, 32, 32),
        "mean": MEAN,
        "std": STD,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc" if spec.arch == "swin" else "head",
        "license": "apache-2.0",
    }
    return model
