"""How vptune walks each supported backbone family (timm ViT), and how it loads them."""

from .bundled import BUNDLED_BACKBONE
from .loading import load_backbone

__all__ = ["BUNDLED_BACKBONE", "load_backbone"]
