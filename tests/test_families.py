"""The timm families beyond the plain ViT (Eva: EVA-02, DINOv3, RoPE ViTs; BEiT): the walk is
timm's own forward, the key-value path is exact, every method runs, and prompts get no position.

Tiny random configs of the real timm model names, with honest weights (``honest_``)."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F

import vptune
from conftest import assert_same_logits_and_grads
from honest import honest_
from vptune.backbones.family import family_of
from vptune.model import PromptModel

C = 5
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=0)
FAMILIES = {
    # EVA-02: SwiGLU MLP, sub-LN in the MLP, rotary embedding, separate q/v biases beside a fused qkv
    "eva02": ("eva02_small_patch14_224", dict(img_size=28, patch_size=7)),
    # DINOv3: 4 register tokens, its own rotary embedding, layer scale
    "dinov3": ("vit_small_patch16_dinov3", {}),
    # timm's RoPE ViT (AttentionRope, mixed-mode rotary embedding per block)
    "rope-mixed": ("vit_small_patch16_rope_mixed_224", {}),
    # BEiT: relative position bias in every block, layer-scale gammas, q/v biases
    "beit": ("beit_base_patch16_224", {}),
    # BEiT with one relative position bias shared by all blocks, token pooling
    "beit-shared": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token", use_abs_pos_emb=True)),
}


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    timm_name, overrides = FAMILIES[name]
    torch.manual_seed(seed)
    return honest_(timm.create_model(timm_name, pretrained=False, **{**TINY, **overrides}).eval(), seed)


def images_for(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *family_of(model).input_size(), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(FAMILIES))
def family_name(request) -> str:
    return request.param


def test_the_walk_without_a_method_is_timms_forward(family_name):
    backbone = tiny(family_name)
    images = images_for(backbone)
    with torch.no_grad():
        torch.testing.assert_close(family_of(backbone).frozen_features(images), backbone(images), atol=1e-5, rtol=1e-5)


def logits_and_grads(model: PromptModel, images: torch.Tensor):
    logits = model(images)
    logits.square().sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.tuned_parameters().items()}


@pytest.mark.parametrize("method", ["vpt-deep", "e2vpt", "e2vpt-shared"])
def test_kv_path_equals_tokens_path(family_name, method):
    backbone, images = tiny(family_name), None
    images = images_for(backbone)
    results = []
    for path in ("kv", "tokens"):
        torch.manual_seed(3)
        if method == "vpt-deep":
            config = vptune.config_for("vpt-deep", num_prompts=4, path=path)
        else:
            config = vptune.config_for("e2vpt", num_prompts=4, num_kv_prompts=3, dropout=0.0, path=path, shared_kv=method == "e2vpt-shared")
        model = vptune.prompt_model(backbone, config, C).eval()
        honest_(model.head, seed=4)
        results.append(logits_and_grads(model, images))
    assert_same_logits_and_grads(*results)


@contextlib.contextmanager
def prompts_as_prefix(backbone, p: int):
    """timm's own blocks with ``p`` more tokens treated as prefix: no rotary position (Eva), zero
    relative-position bias (BEiT). The literal reference for prompts that have no position."""
    saved = []
    for block in backbone.blocks:
        attn = block.attn
        if hasattr(attn, "num_prefix_tokens"):
            saved.append((attn, "num_prefix_tokens", attn.num_prefix_tokens))
            attn.num_prefix_tokens += p
        if getattr(attn, "relative_position_bias_table", None) is not None:
            own = attn._get_rel_pos_bias

            def padded(own=own):
                bias = own()
                bias = torch.cat([bias[..., :1, :], bias.new_zeros(*bias.shape[:-2], p, bias.shape[-1]), bias[..., 1:, :]], -2)
                return torch.cat([bias[..., :1], bias.new_zeros(*bias.shape[:-1], p), bias[..., 1:]], -1)

            saved.append((attn, "_get_rel_pos_bias", None))
            attn._get_rel_pos_bias = padded
    try:
        yield
    finally:
        for module, name, value in saved:
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)


@pytest.mark.parametrize("family_name", ["eva02", "dinov3", "rope-mixed", "beit"])  # beit-shared: its bias is an argument
def test_vpt_shallow_equals_prompts_inserted_into_timms_own_blocks(family_name):
    """VPT-shallow on the tokens path against timm's forward with the prompts inserted after the
    prefix tokens (and given no position)."""
    backbone = tiny(family_name)
    images = images_for(backbone)
    model = vptune.prompt_model(backbone, vptune.config_for("vpt-shallow", num_prompts=3), C).eval()
    prompts = model.method.prompt_embeddings[0][None]
    family = model.family
    with torch.no_grad():
        x, aux = family.embed(images)
        prefix = family.num_prefix_tokens
        seq = torch.cat([x[:, :prefix], prompts.expand(x.shape[0], -1, -1), x[:, prefix:]], 1)
        with prompts_as_prefix(backbone, 3):
            for i, block in enumerate(backbone.blocks):
                if family.name == "eva":
                    seq = block(seq, rope=aux[i] if getattr(backbone, "rope_mixed", False) else aux)
                else:
                    seq = block(seq)
        expected = backbone.forward_head(backbone.norm(torch.cat([seq[:, :prefix], seq[:, prefix + 3 :]], 1)), pre_logits=True)
        torch.testing.assert_close(family.features(images, model.method), expected, atol=1e-5, rtol=1e-5)


METHODS = ["linear", "mlp", "full", "bias", "partial", "lora", "vpt-shallow", "vpt-deep", "e2vpt", "apt"]
# Every method on the three main variants; the two others (their own rotary mode, a shared bias) run
# the methods whose code paths they change.
GRID = [(f, m) for f in ("eva02", "dinov3", "beit") for m in METHODS] + [
    (f, m) for f in ("rope-mixed", "beit-shared") for m in ("lora", "apt", "vpt-deep")
]


@pytest.mark.parametrize("family_name,method", GRID)
def test_every_method_trains_and_round_trips(family_name, method, tmp_path):
    backbone = tiny(family_name)
    images, labels = images_for(backbone, 4), torch.tensor([0, 1, 2, 3])
    model = vptune.prompt_model(backbone, vptune.config_for(method), C)
    frozen = {name: p.clone() for name, p in backbone.named_parameters()}
    tuned = model.tuned_parameters()
    optimizer = torch.optim.SGD(tuned.values(), lr=0.1)
    before = {name: p.detach().clone() for name, p in tuned.items()}
    F.cross_entropy(model(images), labels).backward()
    assert all(p.grad is not None for p in tuned.values())
    assert all(p.grad is None for name, p in model.named_parameters() if name not in tuned)
    optimizer.step()
    assert any(not torch.equal(before[name], p) for name, p in tuned.items())
    assert all(torch.equal(frozen[name], p) for name, p in backbone.named_parameters()), "the shared backbone changed"
    model.eval()
    model.save_pretrained(tmp_path)
    again = PromptModel.from_pretrained(tiny(family_name), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images), atol=1e-6, rtol=1e-6)


def test_parameter_counts_follow_the_formulas(family_name):
    backbone = tiny(family_name)
    L, d, p = 3, 48, 5
    head = d * C + C
    H = backbone.blocks[0].attn.num_heads
    counts = {
        "vpt-deep": L * p * d + head,
        "vpt-shallow": p * d + head,
        "e2vpt": L * p * d + 2 * L * 2 * d + head,  # 2 key-value prompts of width d (H heads x d/H) per block
        "apt": L * (p * d + 2 * d * 4 + 1) + head,
    }
    options = {"vpt-deep": dict(num_prompts=p), "vpt-shallow": dict(num_prompts=p), "e2vpt": dict(num_prompts=p, num_kv_prompts=2), "apt": dict(num_prompts=p, rank=4)}
    for method, expected in counts.items():
        assert vptune.prompt_model(backbone, vptune.config_for(method, **options[method]), C).num_tuned_parameters() == expected, method
    assert H * (d // H) == d


def test_location_add_and_bad_layers_are_clear_errors():
    backbone = tiny("eva02")
    model = vptune.prompt_model(backbone, vptune.config_for("vpt-deep", location="add"), C)
    assert model.method.prompt_embeddings.shape[1] == family_of(backbone).num_positions()
    with pytest.raises(ValueError, match=r"layers \(7,\) out of range for a backbone with 3 blocks \(0..2, eva family\)"):
        vptune.prompt_model(backbone, vptune.config_for("vpt-deep", layers=[7]), C)


def test_a_run_of_one_family_is_refused_on_another(tmp_path):
    vptune.prompt_model(tiny("beit"), vptune.config_for("vpt-deep"), C).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"beit family.*this backbone is .*\(eva family"):
        PromptModel.from_pretrained(tiny("eva02"), tmp_path)


def test_an_unsupported_model_is_refused_naming_the_supported_families():
    with pytest.raises(TypeError, match=r"ConvNeXt is not supported: vptune walks these model families: ") as error:
        family_of(timm.create_model("convnext_atto", pretrained=False))
    for named in ("vit (timm VisionTransformer)", "eva (timm Eva", "beit (timm Beit)"):
        assert named in str(error.value)


def test_a_local_weights_file_loads_into_an_eva(tmp_path):
    from safetensors.torch import save_file

    from vptune.backbones import load_backbone

    source = tiny("eva02", seed=5)
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    # timm's hub name with a local file instead of a download: same architecture at its default size.
    with pytest.raises(ValueError, match=r"does not match backbone"):
        load_backbone("eva02_small_patch14_224", weights=path)
    loaded = honest_(timm.create_model("eva02_small_patch14_224", pretrained=False, **{**TINY, **FAMILIES["eva02"][1]}), seed=9)
    from vptune.backbones.loading import load_weights

    load_weights(loaded, path)
    images = images_for(source)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), source(images))


@pytest.mark.parametrize("family_name", ["dinov3", "beit"])
def test_mixed_task_batches_on_other_families(family_name, tmp_path):
    """Runs of every prompt method on an Eva (registers, rotary) and a BEiT (relative position
    bias) join one mixed-task pass, each sample getting its own run's logits."""
    from test_serve import RUNS, make_run

    from vptune import MultiTaskModel

    backbone = tiny(family_name)
    folders = {
        name: make_run(backbone, method, options, classes, tmp_path / name, seed)
        for seed, (name, (method, options, classes)) in enumerate(RUNS.items())
    }
    model = MultiTaskModel(backbone, folders)
    names = list(folders)
    tasks = [names[j % len(names)] for j in range(len(names) + 3)]
    x = images_for(backbone, len(tasks))
    out = model(x, tasks)
    for name in names:
        rows = [j for j, t in enumerate(tasks) if t == name]
        with torch.no_grad():
            expected = PromptModel.from_pretrained(backbone, folders[name]).eval()(x[rows])
        torch.testing.assert_close(torch.stack([out[j] for j in rows]), expected, atol=1e-5, rtol=0, msg=f"task {name}")
