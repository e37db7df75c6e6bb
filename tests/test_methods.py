"""Every method: closed-form tuned-parameter counts, which tensors get gradients and change in
an optimizer step (the shared backbone never does), models sharing one backbone, configs by
name and their JSON round trip, and the models vptune refuses."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

import vptune

# tiny_vit: width, depth, heads, 4 x 4 patches of 8 x 8 x 3; C classes for the new head.
D, L, H, PATCHES, C = 48, 3, 3, 16, 5
HEAD = D * C + C


def images_of(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- 3. closed-form counts ---------------------------------------------------------------------

BLOCK = 12 * D * D + 13 * D  # LN1 2D, qkv 3D^2+3D, proj D^2+D, LN2 2D, fc1 4D^2+4D, fc2 4D^2+D
BLOCK_BIASES = 11 * D  # LN1 D, qkv 3D, proj D, LN2 D, fc1 4D, fc2 D
# the plain ViT ("cls-token"): patch embedding, class token, position embedding (17 positions), blocks, final norm
PLAIN_VIT = (3 * 8 * 8 * D + D) + D + (PATCHES + 1) * D + L * BLOCK + 2 * D
PLAIN_VIT_BIASES = D + L * BLOCK_BIASES + D

CLOSED_FORM = {
    "vpt-shallow": (vptune.VPTConfig(num_prompts=4, deep=False), 4 * D + HEAD),
    "vpt-deep": (vptune.VPTConfig(num_prompts=4), L * 4 * D + HEAD),
    "vpt-deep layers": (vptune.VPTConfig(num_prompts=4, layers=(0, 2)), 2 * 4 * D + HEAD),
    "vpt-deep shared": (vptune.VPTConfig(num_prompts=4, shared=True), 4 * D + HEAD),
    "vpt-deep prompt_dim": (vptune.VPTConfig(num_prompts=4, prompt_dim=16), L * 4 * 16 + (16 * D + D) + HEAD),
    "vpt-shallow add": (vptune.VPTConfig(deep=False, location="add"), (PATCHES + 1) * D + HEAD),  # one per position
    "e2vpt": (vptune.E2VPTConfig(num_prompts=4, num_kv_prompts=2), L * 4 * D + 2 * L * 2 * D + HEAD),
    "e2vpt shared_kv": (vptune.E2VPTConfig(num_prompts=4, num_kv_prompts=2, shared_kv=True), L * 4 * D + L * 2 * D + HEAD),
    "apt": (vptune.APTConfig(num_prompts=6, rank=2), L * (6 * D + 2 * D * 2 + 1) + HEAD),
    "linear": (vptune.LinearConfig(), D * C + C),
    "mlp": (vptune.MLPConfig(hidden_layers=2), 2 * (D * D + D) + D * C + C),
    "full": (vptune.FullConfig(), PLAIN_VIT + HEAD),
    "bias": (vptune.BiasConfig(), PLAIN_VIT_BIASES + HEAD),
    "partial": (vptune.PartialConfig(num_blocks=1), BLOCK + 2 * D + HEAD),
    "partial 2": (vptune.PartialConfig(num_blocks=2), 2 * BLOCK + 2 * D + HEAD),
    "lora": (vptune.LoRAConfig(rank=4), L * 4 * (D + 3 * D) + L * 4 * (D + D) + HEAD),
    "lora qkv": (vptune.LoRAConfig(rank=4, targets=("qkv",)), L * 4 * (D + 3 * D) + HEAD),
}


@pytest.mark.parametrize("case", sorted(CLOSED_FORM))
def test_num_tuned_parameters_closed_form(case):
    config, expected = CLOSED_FORM[case]
    model = vptune.prompt_model(tiny_vit("cls-token"), config, C)
    assert model.num_tuned_parameters() == expected


# CoOp tunes text context through a CLIP text tower, which a timm ViT does not have: its count, its
# tuned tensors and its round trip are held in tests/test_clip_heads.py.
IMAGE_METHODS = set(vptune.METHOD_NAMES) - {"coop", "textual-inversion"}  # text-side: test_clip_heads, test_diffusion


def test_closed_forms_cover_every_method():
    assert {config.method_name() for config, _ in CLOSED_FORM.values()} == IMAGE_METHODS


@pytest.mark.parametrize("config", [vptune.FullConfig(), vptune.LoRAConfig(), vptune.VPTConfig()])
def test_backbone_count_is_the_plain_vit(config):
    """The backbone's size excludes what a method adds to it (LoRA's adapters) and its classifier."""
    model = vptune.prompt_model(tiny_vit("cls-token"), config, C)
    assert model.num_backbone_parameters() == PLAIN_VIT


@pytest.mark.parametrize("name", ["clip-style", "map-pool", "registers-dynamic"])
def test_backbone_tuning_counts_on_other_architectures(name):
    """full / bias / partial by the backbone's own parameter names (attention pool, fc_norm, registers)."""
    backbone = tiny_vit(name)
    params = {n: p.numel() for n, p in backbone.named_parameters() if not n.startswith("head.")}
    counts = [
        (vptune.FullConfig(), sum(params.values())),
        (vptune.BiasConfig(), sum(v for n, v in params.items() if n.endswith(".bias"))),
        (vptune.PartialConfig(num_blocks=1), sum(v for n, v in params.items() if n.startswith((f"blocks.{L - 1}.", "norm.", "fc_norm.")))),
    ]
    for config, expected in counts:
        assert vptune.prompt_model(backbone, config, C).num_tuned_parameters() == expected + HEAD, config


# --- 2. gradients, optimizer step, frozen shared backbone -----------------------------------

EXPECTED_TUNED = {  # method config -> which named parameters of the PromptModel are trained (besides head.*)
    "vpt-deep": (vptune.VPTConfig(num_prompts=3, prompt_dim=8), r"method\.(prompt_embeddings|projection\.(weight|bias))"),
    "vpt-shallow": (vptune.VPTConfig(num_prompts=3, deep=False), r"method\.prompt_embeddings"),
    "e2vpt": (vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2), r"method\.(visual\.prompt_embeddings|key_prompts|value_prompts)"),
    "apt": (vptune.APTConfig(num_prompts=4, rank=2), r"method\.(prompt_embeddings|down|up|log_scale)"),
    "linear": (vptune.LinearConfig(), r"$^"),
    "mlp": (vptune.MLPConfig(hidden_layers=1), r"$^"),
    "full": (vptune.FullConfig(), r"backbone\.(?!head\.).*"),
    "bias": (vptune.BiasConfig(), r"backbone\.(?!head\.).*\.bias"),
    "partial": (vptune.PartialConfig(num_blocks=1), rf"backbone\.(blocks\.{L - 1}\.|norm\.|fc_norm\.).*"),
    "lora": (vptune.LoRAConfig(rank=2), r"backbone\.blocks\.\d+\.attn\.(qkv|proj)\.lora_[AB]\..*"),
}


def test_expected_tuned_covers_every_method():
    assert set(EXPECTED_TUNED) == IMAGE_METHODS


@pytest.mark.parametrize("method", sorted(EXPECTED_TUNED))
@pytest.mark.parametrize("name", ["cls-token", "map-pool", "clip-style"])
def test_step_changes_only_the_method_and_head(method, name):
    config, pattern = EXPECTED_TUNED[method]
    backbone = tiny_vit(name)
    shared_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = vptune.prompt_model(backbone, config, C).train()
    expected = {n for n, _ in model.named_parameters() if n.startswith("head.") or re.fullmatch(pattern, n)}
    assert set(model.tuned_parameters()) == expected
    assert any(not n.startswith("head.") for n in expected) == (method not in ("linear", "mlp"))
    assert not backbone.training and not any(m.training for m in model.backbone.modules())
    # Methods that tune backbone tensors work on a private copy; prompt methods share it.
    backbone_tuning = method in ("full", "bias", "partial", "lora")
    assert (model.backbone is backbone) != backbone_tuning

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.tuned_parameters().values(), lr=1e-2, weight_decay=0.1)
    F.cross_entropy(model(images_of()), torch.tensor([0, 1, 2])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected), f"{n}: grad {'missing' if n in expected else 'present'}"
    assert sum(p.grad.abs().sum() for p in model.tuned_parameters().values()) > 0
    optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in expected), f"{n}: {'unchanged' if n in expected else 'changed'}"
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, shared_before[k]), f"shared backbone tensor {k} changed"
    assert all(not p.requires_grad for p in backbone.parameters())


def test_models_sharing_one_backbone_are_independent():
    backbone = tiny_vit("gap-qknorm-ls")
    configs = [vptune.VPTConfig(num_prompts=3), vptune.E2VPTConfig(num_prompts=2), vptune.APTConfig(num_prompts=4), vptune.FullConfig(), vptune.LoRAConfig(rank=2)]
    models = [vptune.prompt_model(backbone, config, C).eval() for config in configs]
    images = images_of()
    with torch.no_grad():
        before = [m(images) for m in models]  # also fills the prompt caches

    trained = models[0].train()
    optimizer = torch.optim.SGD(trained.tuned_parameters().values(), lr=1.0)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(trained(images), torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    trained.eval()
    with torch.no_grad():
        after = [m(images) for m in models]
    assert (after[0] - before[0]).abs().max() > 1e-3
    for b, a in zip(before[1:], after[1:]):
        assert torch.equal(a, b)
    # The trained model on its own copy of the backbone gives the same logits: sharing changes nothing.
    alone = vptune.prompt_model(copy.deepcopy(backbone), configs[0], C).eval()
    alone.load_tuned_state_dict(trained.tuned_state_dict())
    with torch.no_grad():
        assert torch.equal(alone(images), after[0])


# --- configs ----------------------------------------------------------------------------------

ROUND_TRIP = [
    vptune.config_for("vpt-deep", num_prompts=7, dropout=0.1, prompt_dim=16, layers=[2, 0], shared=True, path="tokens"),
    vptune.config_for("vpt-shallow", num_prompts=3, location="add"),
    vptune.config_for("e2vpt", num_prompts=4, num_kv_prompts=3, shared_kv=True, dropout=0.0, path="tokens"),
    vptune.config_for("apt", num_prompts=9, rank=3),
    vptune.config_for("linear"),
    vptune.config_for("mlp", hidden_layers=3),
    vptune.config_for("full"),
    vptune.config_for("bias"),
    vptune.config_for("partial", num_blocks=2),
    vptune.config_for("lora", rank=3, alpha=6.0, dropout=0.1, targets=["qkv"]),
]


def test_round_trip_covers_every_method():
    assert {c.method_name() for c in ROUND_TRIP} == IMAGE_METHODS


@pytest.mark.parametrize("config", ROUND_TRIP, ids=lambda c: c.method_name())
def test_config_json_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == config.method_name()
    again = vptune.config_from_dict(data)
    assert type(again) is type(config) and again == config


def test_config_for_names_and_defaults():
    for name in vptune.METHOD_NAMES:
        assert vptune.config_for(name).method_name() == name
    assert vptune.config_for("vpt-deep").deep and not vptune.config_for("vpt-shallow").deep
    assert vptune.config_for("vpt-deep", num_prompts=50) == vptune.VPTConfig(num_prompts=50, deep=True)
    assert vptune.config_for("vpt-deep").path == "kv" and vptune.config_for("e2vpt").path == "kv"
    assert vptune.config_for("vpt-deep", layers=[3, 1, 1]).layers == (1, 3)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: vptune.config_for("vpt-deeep"), r"unknown method 'vpt-deeep'.*vpt-deep"),
        (lambda: vptune.config_for("vpt-deep", num_promts=5), r"bad option for method 'vpt-deep'.*num_promts"),
        (lambda: vptune.config_for("apt", path="kv"), r"bad option for method 'apt'.*path"),
        (lambda: vptune.config_for("vpt-deep", num_prompts=0), r"num_prompts must be >= 1, got 0"),
        (lambda: vptune.config_for("vpt-deep", path="fast"), r"path must be 'kv' or 'tokens', got 'fast'"),
        (lambda: vptune.config_for("vpt-deep", location="append"), r"location must be"),
        (lambda: vptune.config_for("vpt-deep", dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: vptune.config_for("vpt-shallow", layers=[0, 1]), r"layers"),
        (lambda: vptune.config_for("e2vpt", num_kv_prompts=0), r"num_kv_prompts must be >= 1"),
        (lambda: vptune.config_for("apt", rank=0), r"rank must be >= 1"),
        (lambda: vptune.config_for("lora", targets=["fc1"]), r"targets must be a non-empty subset"),
        (lambda: vptune.config_for("mlp", hidden_layers=0), r"hidden_layers must be >= 1"),
        (lambda: vptune.config_from_dict({"num_prompts": 3}), r"no 'method' key"),
        (lambda: vptune.prompt_model(tiny_vit(), vptune.config_for("partial", num_blocks=4), C), r"num_blocks=4 but the backbone has 3 blocks"),
        (lambda: vptune.prompt_model(tiny_vit(), vptune.config_for("vpt-deep", layers=[3]), C), r"out of range for a backbone with 3 blocks"),
        (lambda: vptune.prompt_model(tiny_vit(), vptune.config_for("linear"), 0), r"num_classes must be an integer >= 1, got 0"),
    ],
)
def test_config_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- refused models, import order --------------------------------------------------------------


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda: timm.create_model("resnet10t", pretrained=False, num_classes=3), "ResNet"),
        (lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, block_fn=ResPostBlock), "ResPostBlock"),
        (lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, block_fn=ParallelScalingBlock), "ParallelScalingBlock"),
        (lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, attn_layer="diff"), "DiffAttention"),
    ],
    ids=["resnet", "res-post-block", "parallel-scaling-block", "diff-attention"],
)
def test_unsupported_model_is_refused_by_name(build, named):
    with pytest.raises(TypeError, match=f"{named}.*not support"):
        vptune.prompt_model(build(), vptune.config_for("vpt-deep"), C)


def test_import_timm_before_vptune():
    code = (
        "import timm, torch\n"
        "import vptune\n"
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=1)\n"
        "out = vptune.prompt_model(m, vptune.config_for('vpt-deep', num_prompts=2), 3)(torch.randn(1, 3, 32, 32))\n"
        "print(tuple(out.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3)"


# --- initialisation (docs/methods.md) ---------------------------------------------------------


def test_initialisation_follows_the_reference():
    backbone = tiny_vit("cls-token")
    vpt = vptune.prompt_model(backbone, vptune.VPTConfig(num_prompts=50), C)
    bound = (6 / (3 * 8 * 8 + D)) ** 0.5  # Xavier-uniform like a patch-embedding filter
    prompts = vpt.method.prompt_embeddings
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.95 * bound

    e2vpt = vptune.prompt_model(backbone, vptune.E2VPTConfig(num_prompts=4, num_kv_prompts=5), C)
    kv_bound = (6 / ((D // H) * 5)) ** 0.5  # Kaiming-uniform, fan_in = d_h * L_kv
    for tensor in (e2vpt.method.key_prompts, e2vpt.method.value_prompts):
        assert tensor.abs().max() <= kv_bound and tensor.abs().max() > 0.9 * kv_bound
    assert not torch.equal(e2vpt.method.key_prompts, e2vpt.method.value_prompts)

    apt = vptune.prompt_model(backbone, vptune.APTConfig(num_prompts=200, rank=4), C).method
    assert abs(apt.prompt_embeddings.std().item() - 0.02) < 0.002
    assert abs(apt.down.std().item() - 1.0) < 0.1
    assert not apt.up.any() and not apt.log_scale.any()  # P_hat = P and exp(s) = 1 at init

    head = vpt.head
    assert torch.allclose(head.bias, torch.full((C,), -torch.log(torch.tensor(0.99 / 0.01)).item()))
    assert head.weight.std().item() < 0.02
