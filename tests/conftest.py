"""Shared fixtures: tiny random-weight timm ViTs that differ in the ways vptune must handle."""

import pytest
import torch
import vptune  # noqa: F401  (installs the torchvision shim before timm)
from timm.models.vision_transformer import VisionTransformer

torch.set_num_threads(2)

ARCHITECTURES = {
    # class token, token pooling: the plain ViT
    "cls-token": dict(),
    # no class token, average pooling, q/k-norm, layer scale
    "gap-qknorm-ls": dict(class_token=False, global_pool="avg", qk_norm=True, init_values=0.1),
    # CLIP-style: norm_pre, fc_norm instead of the final norm
    "clip-style": dict(pre_norm=True, global_pool="avg", fc_norm=True),
    # register tokens, position embedding without the class token, dynamic image size
    "registers-dynamic": dict(reg_tokens=2, no_embed_class=True, dynamic_img_size=True),
    # attention-pool ('map') head
    "map-pool": dict(global_pool="map", class_token=False),
}


def tiny_vit(name: str = "cls-token", seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)
    kwargs.update(ARCHITECTURES[name])
    kwargs.update(overrides)
    return VisionTransformer(**kwargs).eval()


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
