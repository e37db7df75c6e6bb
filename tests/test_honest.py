"""honest_: the test-weight helper every family's exactness tests rely on."""

import pytest
import torch
from torch import nn

from conftest import tiny_vit
from honest import honest_, is_norm


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_norm(m) and getattr(m, "weight", None) is not None]


@pytest.mark.parametrize("name", ["cls-token", "gap-qknorm-ls", "registers-dynamic"])
def test_timm_vit_gets_honest_weights(name):
    model = honest_(tiny_vit(name))
    for pname, p in model.named_parameters():
        if "bias" in pname.rsplit(".", 1)[-1]:
            assert (p != 0).all(), pname
    norms = _norms(model)
    assert len(norms) >= 7
    weights = [m.weight.detach() for m in norms]
    for i, w in enumerate(weights):
        assert (w != 1).all() and (w - 1).abs().max() <= 0.25 + 1e-6
        assert (norms[i].bias != 0).all()
        for other in weights[i + 1 :]:
            assert not torch.equal(w, other)  # norm1 is not norm2, q_norm is not k_norm
    block = model.blocks[0]
    assert not torch.allclose(block.norm1.weight, block.norm2.weight)
    for token in ("cls_token", "reg_token", "pos_embed"):
        t = getattr(model, token, None)
        if t is not None:
            assert t.abs().max() > 1e-2 and t.flatten().unique().numel() == t.numel()
    if name == "gap-qknorm-ls":  # layer scale: still about init_values (0.1), but no longer constant
        gamma = block.ls1.gamma
        assert gamma.unique().numel() == gamma.numel() and (gamma - 0.1).abs().max() <= 0.02 + 1e-6


def test_deterministic_per_seed_and_keeps_random_weights():
    a, b, c = tiny_vit(), tiny_vit(), tiny_vit()
    qkv = a.blocks[0].attn.qkv.weight.clone()
    honest_(a, seed=3), honest_(b, seed=3), honest_(c, seed=4)
    assert torch.equal(a.blocks[0].attn.qkv.weight, qkv)  # already random: left alone
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.blocks[0].norm1.weight, c.blocks[0].norm1.weight)


def test_family_agnostic_modules():
    """No ViT attribute names: torch's own layers, GroupNorm, RMSNorm, a zero embedding, a scalar."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8, 4),
    )
    extra = nn.Module()
    extra.table = nn.Parameter(torch.zeros(5, 3))  # a relative position bias table
    extra.scale = nn.Parameter(torch.tensor(2.0))
    extra.norm = nn.RMSNorm(6)
    extra.layer = nn.TransformerEncoderLayer(6, 2, 12, batch_first=True)
    model.add_module("extra", extra)
    nn.init.zeros_(model[0].bias)
    honest_(model)
    assert (model[0].bias != 0).all() and (model[1].bias != 0).all() and (model[1].weight != 1).all()
    assert (extra.table != 0).all() and extra.table.abs().max() < 0.2
    assert extra.scale != 2.0 and abs(extra.scale.item() - 2.0) <= 0.4
    assert (extra.norm.weight != 1).all()
    layer = extra.layer
    assert (layer.self_attn.in_proj_bias != 0).all() and (layer.linear1.bias != 0).all()
    assert not torch.equal(layer.norm1.weight, layer.norm2.weight)
