"""vptune.backbones loading: the bundled architecture and its shipped weights, timm names,
and local weight files (round trips, a differing head, mismatches named clearly)."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from vptune.backbones import BUNDLED_BACKBONE, load_backbone
from vptune.backbones import loading
from vptune.backbones.bundled import MEAN, STD, build_bundled, bundled_weights_path


def test_bundled_architecture_and_data_config():
    model = build_bundled()
    assert model.pretrained_cfg["architecture"] == BUNDLED_BACKBONE
    config = resolve_data_config(model=model)
    assert config["input_size"] == (3, 32, 32) and config["mean"] == MEAN and config["std"] == STD
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (192, 6, 3)
    assert model.patch_embed.patch_size == (4, 4) and model.num_prefix_tokens == 1 and model.global_pool == "token"
    d, depth, tokens = 192, 6, (32 // 4) ** 2 + 1
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    embed = 3 * 4 * 4 * d + d + d + tokens * d  # patch conv + bias, class token, position embedding
    assert sum(p.numel() for p in model.parameters()) == embed + depth * per_block + 2 * d
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, d)  # no classifier head


@pytest.mark.skipif(not bundled_weights_path().is_file(), reason="bundled weights not created yet (vptune pretrain)")
def test_bundled_weights_load():
    model = load_backbone()
    shipped = load_file(str(bundled_weights_path()))
    assert not model.training and set(shipped) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    assert bundled_weights_path().stat().st_size <= 20e6


@pytest.mark.skipif(not bundled_weights_path("vptune_swin_fmnist").is_file(), reason="bundled Swin not created yet (vptune pretrain --arch swin)")
def test_bundled_swin_weights_load():
    model = load_backbone("vptune_swin_fmnist")
    path = bundled_weights_path("vptune_swin_fmnist")
    shipped = load_file(str(path))
    assert type(model).__name__ == "SwinTransformer" and not model.training
    assert set(shipped) == {k for k in model.state_dict() if not k.startswith("head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    assert path.stat().st_size <= 20e6


def test_missing_bundled_weights_says_how_to_create_them(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "bundled_weights_path", lambda name=BUNDLED_BACKBONE: tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=r"absent.safetensors\).*vptune pretrain"):
        load_backbone(BUNDLED_BACKBONE)
    with pytest.raises(FileNotFoundError, match=r"absent.safetensors\).*vptune pretrain --arch swin"):
        load_backbone("vptune_swin_fmnist")


def test_timm_name_and_unknown_name():
    model = load_backbone("test_vit")
    assert model.pretrained_cfg["architecture"] == "test_vit" and not model.training
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_nonexistent_xl'.*bundled 'vptune_vit_fmnist'"):
        load_backbone("vit_nonexistent_xl")


def trained(num_classes=1000, seed=1):
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def assert_same_backbone(a, b):
    for key, value in a.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, b.state_dict()[key]), key


def test_safetensors_round_trip(tmp_path):
    source = trained()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_backbone("test_vit", weights=tmp_path / "w.safetensors")
    assert_same_backbone(source, loaded)
    assert torch.equal(loaded.head.weight, source.head.weight)


def test_pth_round_trip_nested_with_other_head(tmp_path):
    source = trained(num_classes=5)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = load_backbone("test_vit", weights=str(tmp_path / "ckpt.pth"))
    assert_same_backbone(source, loaded)
    assert loaded.head.out_features == 1000  # a 5-class head in the file does not fit and is left out


def test_bundled_architecture_takes_a_weights_file(tmp_path):
    source = build_bundled(num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "pretrained.safetensors"))
    assert_same_backbone(source, load_backbone(BUNDLED_BACKBONE, weights=tmp_path / "pretrained.safetensors"))


def test_mismatched_file_names_file_and_keys(tmp_path):
    state = trained().state_dict()
    state.pop("blocks.0.norm1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["blocks.1.mlp.fc1.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as error:
        load_backbone("test_vit", weights=tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "bad.safetensors does not match backbone test_vit" in message
    assert "missing: blocks.0.norm1.weight" in message and "unexpected: extra.weight" in message
    assert "mis-shaped (file vs model): blocks.1.mlp.fc1.bias (3,)" in message


def test_other_architecture_file_is_refused(tmp_path):
    save_file(build_bundled().state_dict(), str(tmp_path / "bundled.safetensors"))
    with pytest.raises(ValueError, match=r"bundled.safetensors does not match backbone test_vit"):
        load_backbone("test_vit", weights=tmp_path / "bundled.safetensors")


def test_bad_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.pth does not exist"):
        load_backbone("test_vit", weights=tmp_path / "nothing.pth")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported weights file .*w.ckpt"):
        load_backbone("test_vit", weights=tmp_path / "w.ckpt")
    np.savez(tmp_path / "w.npz", unrelated=np.zeros(3))
    with pytest.raises(ValueError, match=r"w.npz does not fit VisionTransformer as big_vision npz"):
        load_backbone("test_vit", weights=tmp_path / "w.npz")


def big_vision_npz(model, path) -> None:
    """``model``'s weights under big_vision's names and layouts (a SigLIP-style ViT: no class token,
    blocks stacked on a leading depth axis under ``params/Transformer/encoderblock``)."""
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    t = lambda x: x.detach().numpy()  # noqa: E731
    blocks = model.blocks
    stack = lambda f: np.stack([t(f(b)) for b in blocks])  # noqa: E731
    mha = "params/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    arrays = {
        "params/embedding/kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),  # H, W, in, out
        "params/embedding/bias": t(model.patch_embed.proj.bias),
        "params/pos_embedding": t(model.pos_embed),
        "params/Transformer/encoder_norm/scale": t(model.norm.weight),
        "params/Transformer/encoder_norm/bias": t(model.norm.bias),
        "params/head/kernel": t(model.head.weight.T),
        "params/head/bias": t(model.head.bias),
        "params/Transformer/encoderblock/LayerNorm_0/scale": stack(lambda b: b.norm1.weight),
        "params/Transformer/encoderblock/LayerNorm_0/bias": stack(lambda b: b.norm1.bias),
        "params/Transformer/encoderblock/LayerNorm_1/scale": stack(lambda b: b.norm2.weight),
        "params/Transformer/encoderblock/LayerNorm_1/bias": stack(lambda b: b.norm2.bias),
        mha + "out/kernel": stack(lambda b: b.attn.proj.weight.reshape(d, heads, -1).permute(1, 2, 0)),  # H, Dh, d
        mha + "out/bias": stack(lambda b: b.attn.proj.bias),
    }
    for j, name in enumerate(("query", "key", "value")):
        arrays[mha + f"{name}/kernel"] = stack(lambda b: b.attn.qkv.weight[j * d : (j + 1) * d].T.reshape(d, heads, -1))
        arrays[mha + f"{name}/bias"] = stack(lambda b: b.attn.qkv.bias[j * d : (j + 1) * d].reshape(heads, -1))
    for r, fc in enumerate(("fc1", "fc2")):
        arrays[f"params/Transformer/encoderblock/MlpBlock_0/Dense_{r}/kernel"] = stack(lambda b: getattr(b.mlp, fc).weight.T)
        arrays[f"params/Transformer/encoderblock/MlpBlock_0/Dense_{r}/bias"] = stack(lambda b: getattr(b.mlp, fc).bias)
    np.savez(path, **arrays)


def test_big_vision_npz_weights_load(tmp_path):
    """--weights FILE.npz: a big_vision checkpoint (its key names and kernel layouts) loads every
    tensor into the timm model, and the model computes what the source computes."""
    from timm.models.vision_transformer import VisionTransformer

    from honest import honest_

    def siglip_like(seed: int) -> VisionTransformer:
        torch.manual_seed(seed)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                                  class_token=False, global_pool="avg", fc_norm=False)
        return honest_(model, seed).eval()

    source, target = siglip_like(0), siglip_like(1)
    big_vision_npz(source, tmp_path / "siglip.npz")
    loading.load_weights(target, tmp_path / "siglip.npz")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_pretrain_writes_loadable_weights_and_card(tmp_path, monkeypatch):
    from vptune.backbones import pretrain

    rng = np.random.default_rng(0)
    tiny = lambda split: (rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), np.arange(64) % 10)  # noqa: E731
    monkeypatch.setattr(pretrain, "load_fashion_mnist", tiny)
    threads = torch.get_num_threads()
    try:
        results = pretrain.pretrain(tmp_path / "out", epochs=1, batch_size=32, warmup_steps=1, threads=1,
                                    work_dir=tmp_path / "work")
    finally:
        torch.set_num_threads(threads)
    weights = tmp_path / "out" / f"{BUNDLED_BACKBONE}.safetensors"
    assert not any(key.startswith("head.") for key in load_file(str(weights)))
    load_backbone(BUNDLED_BACKBONE, weights=weights)
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert f"{results['test_accuracy'] * 100:.2f}%" in card
    assert "python -m vptune.backbones.pretrain --out" in card and "--epochs 1 --batch-size 32" in card
    assert (tmp_path / "work" / f"{BUNDLED_BACKBONE}-checkpoint.pt").is_file()


def test_pretrain_arch_swin_writes_the_bundled_swin_and_its_own_card(tmp_path, monkeypatch):
    from vptune.backbones import pretrain

    rng = np.random.default_rng(0)
    tiny = lambda split: (rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), np.arange(64) % 10)  # noqa: E731
    monkeypatch.setattr(pretrain, "load_fashion_mnist", tiny)
    threads = torch.get_num_threads()
    try:
        results = pretrain.pretrain(tmp_path / "out", epochs=1, batch_size=32, warmup_steps=1, threads=1,
                                    work_dir=tmp_path / "work", arch="swin")
    finally:
        torch.set_num_threads(threads)
    weights = tmp_path / "out" / "vptune_swin_fmnist.safetensors"
    model = load_backbone("vptune_swin_fmnist", weights=weights)
    assert type(model).__name__ == "SwinTransformer" and model.pretrained_cfg["architecture"] == "vptune_swin_fmnist"
    card = (tmp_path / "out" / "MODEL_CARD_swin.md").read_text()
    assert not (tmp_path / "out" / "MODEL_CARD.md").exists()  # the ViT's card is left alone
    assert f"{results['test_accuracy'] * 100:.2f}%" in card and "SwinTransformer(" in card
    assert "python -m vptune.backbones.pretrain --arch swin --out" in card
    assert (tmp_path / "work" / "vptune_swin_fmnist-checkpoint.pt").is_file()
    with pytest.raises(ValueError, match=r"unknown --arch 'resnet'"):
        pretrain.pretrain(tmp_path / "out", arch="resnet")


@pytest.mark.parametrize(
    "name, family",
    [
        # The VPT paper's Swin-B is swin_base_patch4_window7_224.ms_in22k: the same code path (a tagged hub
        # name, its 21841-class head, timm's Swin checkpoint filter) at the tiny width, a 177 MB file not 436 MB.
        ("swin_tiny_patch4_window7_224.ms_in22k", "swin"),
        ("vit_small_patch16_dinov3.lvd1689m", "eva"),
        ("eva02_small_patch14_224.mim_in22k", "eva"),
    ],
)
def test_hub_names_load_a_local_weights_file_offline(name, family, tmp_path, monkeypatch):
    """Offline, ``--backbone HUBNAME.TAG --weights FILE`` builds the named architecture and loads
    the file's tensors, with no download (timm's hub calls fail here if tried)."""
    from honest import honest_

    from vptune.backbones.family import family_of

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    torch.manual_seed(0)
    source = honest_(timm.create_model(name, pretrained=False), 0).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_backbone(name, weights=path, pretrained=True)  # --pretrained beside --weights: the file wins
    assert family_of(loaded).name == family
    state = loaded.state_dict()
    assert state.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():  # the 21841-class head of the 22k names included
        assert torch.equal(state[key], value), key
    image = torch.randn(1, *family_of(loaded).input_size(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(image), source.forward_features(image))
