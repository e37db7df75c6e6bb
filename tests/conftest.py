"""Shared fixtures: tiny random-weight timm ViTs that differ in the ways vptune must handle,
with honest weights (``honest.honest_``: non-zero biases, distinct norms, non-constant tokens)."""

import os
import sys

import pytest
import torch
import vptune  # noqa: F401  (installs the torchvision shim before timm)
import timm
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from honest import honest_

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (10-50x slower on a loaded machine)

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



class GatedAttention(Attention):
    """timm's Attention with its sigmoid output gate and a head width other than d / heads."""

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(dim, gated=True, attn_head_dim=8, **kwargs)


# Rarer variants that the core's own tests cover too (kept out of the ``arch`` fixture).
MORE_ARCHITECTURES = {
    # no qkv bias, norms inside attention and MLP, gated attention, head_dim != d / heads
    "gated-scalenorm": dict(qkv_bias=False, scale_attn_norm=True, scale_mlp_norm=True, attn_layer=GatedAttention),
    # built by timm.create_model from a registered name, with small overrides
    "timm-vit_small": dict(timm_name="vit_small_patch16_224"),
}


def tiny_vit(name: str = "cls-token", seed: int = 0, **overrides) -> VisionTransformer:
    """A tiny timm ViT of the named variant with honest weights (``honest_``), in eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)
    kwargs.update(ARCHITECTURES[name] if name in ARCHITECTURES else MORE_ARCHITECTURES[name])
    kwargs.update(overrides)
    timm_name = kwargs.pop("timm_name", None)
    if timm_name is not None:
        return honest_(timm.create_model(timm_name, pretrained=False, **kwargs).eval(), seed)
    return honest_(VisionTransformer(**kwargs).eval(), seed)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def two_class_workspace(root, train: int = 4, size: int = 20):
    """Random bundled-backbone weights (``root/backbone.safetensors``) and an image folder
    (``root/images``) with train/val/test splits of two colour classes, for end-to-end runs."""
    from PIL import Image
    from safetensors.torch import save_file

    from vptune.backbones.bundled import build_bundled

    torch.manual_seed(0)
    save_file(honest_(build_bundled()).state_dict(), str(root / "backbone.safetensors"))
    for split, count in (("train", train), ("val", 2), ("test", 2)):
        for name, colour in {"red": (200, 30, 30), "blue": (30, 30, 200)}.items():
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (size, size), tuple(min(255, c + 8 * i) for c in colour)).save(folder / f"{i}.png")
    return root


def assert_same_logits_and_grads(a, b, tol: float = 1e-5) -> None:
    """Two execution paths (``(logits, {name: grad})`` each, e.g. the kv and the tokens path) give the
    same logits and, for every tuned tensor, a non-zero gradient equal within ``tol`` relative."""
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    torch.testing.assert_close(logits_a, logits_b, atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_b.items():
        assert grad.abs().max() > 0, f"{name} got no gradient"
        assert (grads_a[name] - grad).abs().max() <= tol * grad.abs().max(), name


def huge_png(path, width: int, height: int):
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: a few KB on disk whatever its size
    (a decompression bomb, for the pixel-limit tests)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes(height * (1 + (width + 7) // 8)), 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


# --- leaving the test process ------------------------------------------------------------------
# A full run of the suite crashed with a segmentation fault *after* pytest had printed its summary
# (seen once from a clean clone: "3 failed, 654 passed ... make: *** Segmentation fault"), in the
# interpreter's finalisation, where daemon threads left by native libraries (Ray's and gRPC's
# clients, server and watcher threads) can still run while modules are torn down. No test result
# depends on that teardown, so the process leaves with pytest's own exit status once pytest is
# done, skipping it; the status of every test is unchanged.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _EXIT_STATUS and os.environ.get("VPTUNE_TEST_FINALIZE") != "1":  # =1 keeps the normal teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
