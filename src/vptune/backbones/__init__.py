"""How vptune walks each supported backbone family (timm ViT)."""
