"""Saving and loading a run: an exact round trip for every method, only tuned tensors on disk,
and a clear error for a backbone that does not fit or a run folder that is missing or damaged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from safetensors.torch import load_file, save_file

import vptune

C = 5

METHODS = [
    vptune.VPTConfig(num_prompts=3),
    vptune.VPTConfig(num_prompts=3, deep=False, prompt_dim=8),
    vptune.VPTConfig(num_prompts=3, layers=(1,), shared=True),
    vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2, shared_kv=True),
    vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2),
    vptune.APTConfig(num_prompts=4, rank=2),
    vptune.LinearConfig(),
    vptune.MLPConfig(hidden_layers=1),
    vptune.FullConfig(),
    vptune.BiasConfig(),
    vptune.PartialConfig(num_blocks=1),
    vptune.LoRAConfig(rank=2, targets=("qkv",)),
]


def images_of() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def trained(backbone, config) -> vptune.PromptModel:
    """A model whose tuned tensors are all away from their init (as after training)."""
    model = vptune.prompt_model(backbone, config, C)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def test_methods_cover_every_method():
    # coop and textual-inversion are text-side only (a CLIP text tower, a text-to-image model's
    # text encoder): tests/test_clip_heads.py and tests/test_diffusion.py cover them
    assert {c.method_name() for c in METHODS} == set(vptune.METHOD_NAMES) - {"coop", "textual-inversion"}


@pytest.mark.parametrize("config", METHODS, ids=lambda c: c.method_name())
@pytest.mark.parametrize("name", ["cls-token", "registers-dynamic"])
def test_round_trip_is_exact(tmp_path, name, config):
    model = trained(tiny_vit(name), config)
    model.metadata = {"labels": ["a", "b", "c", "d", "e"], "data": {"name": "toy"}}
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    # Only what was tuned is stored.
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.tuned_state_dict())

    fresh_backbone = tiny_vit(name)  # same weights, another instance
    loaded = vptune.PromptModel.from_pretrained(fresh_backbone, tmp_path).eval()
    assert type(loaded.config) is type(config) and loaded.config == config
    assert loaded.metadata == model.metadata and loaded.num_classes == C
    images = images_of()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert loaded.num_tuned_parameters() == model.num_tuned_parameters()
    # The loaded model trains the same tensors, and a backbone-tuning method still leaves the given backbone alone.
    assert set(loaded.tuned_parameters()) == set(model.tuned_parameters())
    assert all(not p.requires_grad for p in fresh_backbone.parameters())


def test_round_trip_overwrites_an_earlier_save(tmp_path):
    backbone = tiny_vit()
    first, second = trained(backbone, vptune.VPTConfig(num_prompts=3)), trained(backbone, vptune.APTConfig(num_prompts=2))
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    loaded = vptune.PromptModel.from_pretrained(backbone, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images_of()), second(images_of()))


@pytest.mark.parametrize(
    "other, mismatch",
    [
        (dict(embed_dim=96), r"embed_dim 48 vs 96"),
        (dict(depth=4), r"depth 3 vs 4"),
        (dict(num_heads=4), r"num_heads 3 vs 4"),
        (dict(reg_tokens=2), r"num_prefix_tokens 1 vs 3"),
        (dict(global_pool="avg"), r"global_pool 'token' vs 'avg'"),
    ],
)
def test_loading_into_another_backbone_names_the_mismatch(tmp_path, other, mismatch):
    trained(tiny_vit(), vptune.VPTConfig(num_prompts=3)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=mismatch):
        vptune.PromptModel.from_pretrained(tiny_vit(**other), tmp_path)


def test_loading_into_another_timm_architecture_names_it(tmp_path):
    import timm

    small = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    trained(timm.create_model("vit_small_patch16_224", **small), vptune.E2VPTConfig(num_prompts=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"architecture 'vit_small_patch16_224' vs 'deit_small_patch16_224'"):
        vptune.PromptModel.from_pretrained(timm.create_model("deit_small_patch16_224", **small), tmp_path)


def test_other_backbone_weights_are_refused_unless_allowed(tmp_path):
    model = trained(tiny_vit(seed=0), vptune.VPTConfig(num_prompts=3))
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["backbone_weights"]
    with pytest.raises(ValueError, match=f"made on other backbone weights \\(fingerprint {recorded}, .*--weights FILE"):
        vptune.PromptModel.from_pretrained(tiny_vit(seed=1), tmp_path)
    with pytest.warns(UserWarning, match="made on other backbone weights"):
        loaded = vptune.PromptModel.from_pretrained(tiny_vit(seed=1), tmp_path, allow_other_weights=True)
    assert torch.equal(loaded.tuned_state_dict()["method.prompt_embeddings"], model.tuned_state_dict()["method.prompt_embeddings"])


@pytest.fixture
def saved(tmp_path):
    trained(tiny_vit(), vptune.VPTConfig(num_prompts=3)).save_pretrained(tmp_path)
    return tmp_path


def load(directory):
    return vptune.PromptModel.from_pretrained(tiny_vit(), directory)


def edit_config(directory, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_missing_folder_or_config(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found.*not a run folder"):
        load(tmp_path / "nowhere")
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        load(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found"):
        load(saved)


@pytest.mark.parametrize("text", ['{"method_config": ', "\x00\xff garbage", ""])
def test_malformed_config_json(saved, text):
    (saved / "config.json").write_text(text, errors="surrogateescape")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load(saved)


@pytest.mark.parametrize("content", ["[1, 2]", '{"format": "vptune-run/1"}'])
def test_config_that_is_not_a_run(saved, content):
    (saved / "config.json").write_text(content)
    with pytest.raises(ValueError, match=r"lacks method_config, num_classes, backbone"):
        load(saved)


def test_unknown_method_in_config(saved):
    edit_config(saved, lambda c: c["method_config"].update(method="vpt-deeper"))
    with pytest.raises(ValueError, match=r"bad method_config: unknown method 'vpt-deeper'"):
        load(saved)


def test_bad_option_in_config(saved):
    edit_config(saved, lambda c: c["method_config"].update(num_prompts=-1))
    with pytest.raises(ValueError, match=r"bad method_config: num_prompts must be >= 1"):
        load(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x13" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load(saved)


def test_weights_of_the_wrong_shape(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    tensors["method.prompt_embeddings"] = torch.zeros(3, 4, 48)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"method\.prompt_embeddings has shape \(3, 4, 48\), this model expects \(3, 3, 48\)"):
        load(saved)


def test_config_and_weights_disagree(saved):
    edit_config(saved, lambda c: c.update(num_classes=7))
    with pytest.raises(ValueError, match=r"head\.(weight|bias) has shape \(5(, 48)?,?\), this model expects \(7(, 48)?,?\)"):
        load(saved)
    edit_config(saved, lambda c: c.update(num_classes=5, method_config=vptune.APTConfig().to_dict()))
    with pytest.raises(ValueError, match=r"does not fit a apt model: missing \['method\.down'"):
        load(saved)


def test_loading_a_run_into_a_non_vit(saved):
    import timm

    with pytest.raises(TypeError, match="ResNet is not supported"):
        vptune.PromptModel.from_pretrained(timm.create_model("resnet10t", pretrained=False), saved)


def test_add_prompts_at_another_image_size_are_refused():
    model = vptune.prompt_model(tiny_vit("registers-dynamic"), vptune.VPTConfig(location="add"), 3)
    with pytest.raises(ValueError, match="'add' prompts are tied to the 19-token sequence"):
        model(torch.randn(1, 3, 48, 48))
