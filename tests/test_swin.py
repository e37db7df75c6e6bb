"""The Swin family (vptune.backbones.swin) on tiny random timm SwinTransformers with honest
weights: the prompt-free walk equals timm's forward, the exact key-value path equals the
tokens path (logits and every tuned gradient) with shifted and padded windows, every method
trains and round-trips, parameter counts follow the per-stage widths, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from honest import honest_
from timm.models.swin_transformer import SwinTransformer

import vptune
from vptune.backbones.family import family_of
from vptune.methods.base import Method

# Two stages of widths D0, D1 = 2 * D0, two blocks each (the second shifted), heads of size 8.
D0, D1, HEADS, C = 16, 32, (2, 4), 5
SHAPES = {
    # 8x8 grid in 2x2 windows (16 windows, shifted by 1), then 4x4 in 2x2 windows (4, shifted)
    "shifted": dict(img_size=32, window_size=2),
    # 10x10 grid in 4x4 windows: timm pads it to 12x12 (9 windows, shifted by 2); then 5x5 padded to 8x8
    "padded": dict(img_size=40, window_size=4),
}


def tiny_swin(shape: str = "shifted", seed: int = 0, **overrides) -> SwinTransformer:
    torch.manual_seed(seed)
    kwargs = dict(patch_size=4, embed_dim=D0, depths=(2, 2), num_heads=HEADS, num_classes=3, **SHAPES[shape])
    kwargs.update(overrides)
    return honest_(SwinTransformer(**kwargs).eval(), seed)


def images_of(shape: str = "shifted", batch: int = 3) -> torch.Tensor:
    size = SHAPES[shape]["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_the_tiny_shapes_shift_and_pad():
    """What the cases below rely on: shifted blocks in both stages, and timm padding the windows."""
    for shape in SHAPES:
        family = family_of(tiny_swin(shape))
        assert [b.shift_size != (0, 0) for b in family.blocks] == [False, True, False, True]
        assert [s.width for s in family.sites] == [D0, D0, D1, D1] and {s.kind for s in family.sites} == {"window"}
    padded = family_of(tiny_swin("padded"))
    assert padded.num_windows(0, torch.zeros(1, 10, 10, 1)) == 9 and padded.num_windows(2, torch.zeros(1, 5, 5, 1)) == 4


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_walk_without_method_is_timms_forward(shape):
    model = tiny_swin(shape)
    images = images_of(shape)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(images), pre_logits=True)
        ours = family_of(model).features(images, Method())
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)


# --- the exact key-value path ---------------------------------------------------------------

KV_CASES = {
    "vpt-deep": vptune.VPTConfig(num_prompts=3),
    "vpt-deep dropout": vptune.VPTConfig(num_prompts=3, dropout=0.3),  # per-sample prompts
    "vpt-deep layers": vptune.VPTConfig(num_prompts=3, layers=(0, 3)),  # per-window outputs flow, then dropped
    "vpt-deep official": vptune.VPTConfig(num_prompts=3, swin="official"),  # last block's prompts pooled
    "vpt-deep each+pool": vptune.VPTConfig(num_prompts=3, swin={"pool": True}),
    "vpt-shallow": vptune.VPTConfig(num_prompts=3, deep=False),  # per-window prompts' keys at stage 0's last block
    "vpt-shallow tile": vptune.VPTConfig(num_prompts=3, deep=False, swin={"merge": "tile", "windows": "mean"}),
    "e2vpt": vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2, dropout=0.0),
    "e2vpt shared_kv": vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2, shared_kv=True, dropout=0.0),
}


def with_path(config, path: str):
    return type(config)(**{**config.__dict__, "path": path})


def logits_and_grads(config, shape: str, masks=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = vptune.prompt_model(tiny_swin(shape), config, C).train()
    if masks is not None:
        model.method.set_masks(*masks)
    torch.manual_seed(1)  # the same prompt dropout masks on both paths
    logits = model(images_of(shape))
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    return logits, {n: p.grad for n, p in model.tuned_parameters().items()}


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert rel < 1e-5, f"{what}: relative difference {rel:.2e}"


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(KV_CASES))
def test_kv_path_equals_tokens_path(case, shape):
    config = KV_CASES[case]
    fast, fast_grads = logits_and_grads(with_path(config, "kv"), shape)
    slow, slow_grads = logits_and_grads(with_path(config, "tokens"), shape)
    assert_close(fast, slow, "logits")
    assert fast_grads.keys() == slow_grads.keys()
    for name in slow_grads:
        assert slow_grads[name].abs().sum() > 0, name
        assert_close(fast_grads[name], slow_grads[name], name)


def test_kv_path_equals_tokens_path_with_per_sample_token_masks():
    """Per-sample log token masks (pruning's scores) reach every window of their own image."""
    mask = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, 1.0], [1.0, 0.0, 0.7]])
    for shape in SHAPES:
        config = vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2, dropout=0.0)
        fast, fast_grads = logits_and_grads(with_path(config, "kv"), shape, masks=(mask,))
        slow, slow_grads = logits_and_grads(with_path(config, "tokens"), shape, masks=(mask,))
        assert_close(fast, slow, "logits")
        for name in slow_grads:
            assert_close(fast_grads[name], slow_grads[name], name)


def test_prompt_keys_are_computed_once_per_block_and_cached():
    model = vptune.prompt_model(tiny_swin("padded"), vptune.VPTConfig(num_prompts=3), C).eval()
    calls = []
    family = model.family
    original = family.prompt_keys_values
    family.prompt_keys_values = lambda i, p: calls.append((i, tuple(p.shape))) or original(i, p)
    images = images_of("padded")
    with torch.no_grad():
        first = model(images)
        assert calls == [(i, (1, 3, w)) for i, w in enumerate([D0, D0, D1, D1])]  # once per block, not per window
        second = model(images)
    assert len(calls) == 4 and torch.equal(first, second)  # the second forward reads the cache
    model.method.prompt_embeddings_0.data.add_(torch.randn(model.method.prompt_embeddings_0.shape) * 0.1)  # not a constant: LN1 removes those
    with torch.no_grad():
        third = model(images)
    assert len(calls) == 6 and not torch.equal(third, first)  # stage 0's edited prompts are recomputed


def test_paper_and_official_options_change_the_result():
    images = images_of()
    features = {}
    for swin in ("paper", "official", {"merge": "tile"}, {"merge": "tile", "pool": True}, {"pool": True}):
        torch.manual_seed(0)
        model = vptune.prompt_model(tiny_swin(), vptune.VPTConfig(num_prompts=3, deep=False, path="tokens", swin=swin), C).eval()
        with torch.no_grad():
            features[str(swin)] = model.family.features(images, model.method)
    paper = features.pop("paper")
    # Shallow prompts dropped at the first patch merging (the paper) never reach the pool.
    assert torch.equal(features.pop(str({"pool": True})), paper)
    values = [paper, *features.values()]
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            assert (a - b).abs().max() > 1e-4


def test_prompt_outputs_stay_in_their_window_or_are_averaged():
    torch.manual_seed(0)
    model = vptune.prompt_model(tiny_swin(), vptune.VPTConfig(num_prompts=3, deep=False, path="tokens"), C).eval()
    family, prompts = model.family, model.method.prompts(0, 3)[:, None]  # 1, 1, p, D0
    x, _ = family.embed(images_of())
    with torch.no_grad():
        _, each = family.block_forward(0, x, prompts, None, None, None, 0, None, False)
        _, mean = family.block_forward(0, x, prompts, None, None, None, 0, None, True)
    assert each.shape == (3, 16, 3, D0) and mean.shape == (3, 1, 3, D0)  # 16 windows of the 8x8 grid
    assert each.std(1).min() > 0  # every window its own prompt outputs


def test_apt_hook_sees_each_windows_ln1_tokens():
    """APT through the walk equals timm's own forward with APT put on every WindowAttention's output
    (input: the window's LN1 tokens, padding included)."""
    for shape in SHAPES:
        backbone = tiny_swin(shape)
        model = vptune.prompt_model(backbone, vptune.APTConfig(num_prompts=4, rank=2), C).eval()
        with torch.no_grad():
            for name, p in model.method.named_parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        images = images_of(shape)
        handles = [
            block.attn.register_forward_hook(lambda mod, args, out, i=i: model.method.approximate(i, args[0], out))
            for i, block in enumerate(model.family.blocks)
        ]
        try:
            with torch.no_grad():
                reference = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            ours = model.family.features(images, model.method)
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)


# --- every method -----------------------------------------------------------------------------

HEAD = D1 * C + C  # the new head on the last stage's width


def block_params(d: int) -> int:
    return 12 * d * d + 13 * d + (2 * 2 - 1) ** 2 * (d // 8)  # + the relative-position table (heads of size 8)


P, M, R = 3, 2, 2
COUNTS = {
    "vpt-deep": (vptune.VPTConfig(num_prompts=P), P * (2 * D0 + 2 * D1) + HEAD),
    "vpt-deep layers": (vptune.VPTConfig(num_prompts=P, layers=(1, 2)), P * (D0 + D1) + HEAD),
    "vpt-shallow": (vptune.VPTConfig(num_prompts=P, deep=False), P * D0 + HEAD),
    "e2vpt": (vptune.E2VPTConfig(num_prompts=P, num_kv_prompts=M), P * (2 * D0 + 2 * D1) + 2 * M * (2 * D0 + 2 * D1) + HEAD),
    "e2vpt shared_kv": (vptune.E2VPTConfig(num_prompts=P, num_kv_prompts=M, shared_kv=True), P * (2 * D0 + 2 * D1) + M * (2 * D0 + 2 * D1) + HEAD),
    "apt": (vptune.APTConfig(num_prompts=P, rank=R), sum(P * d + 2 * d * R + 1 for d in (D0, D0, D1, D1)) + HEAD),
    "linear": (vptune.LinearConfig(), HEAD),
    "mlp": (vptune.MLPConfig(hidden_layers=1), D1 * D1 + D1 + HEAD),
    "partial": (vptune.PartialConfig(num_blocks=1), block_params(D1) + 2 * D1 + HEAD),
    "lora": (vptune.LoRAConfig(rank=R), sum(R * (d + 3 * d) + R * (d + d) for d in (D0, D0, D1, D1)) + HEAD),
}


@pytest.mark.parametrize("case", sorted(COUNTS))
def test_tuned_parameter_counts_follow_the_stage_widths(case):
    config, expected = COUNTS[case]
    assert vptune.prompt_model(tiny_swin(), config, C).num_tuned_parameters() == expected


def test_backbone_tuning_counts():
    backbone = tiny_swin()
    params = {n: p.numel() for n, p in backbone.named_parameters() if not n.startswith("head.")}
    assert vptune.prompt_model(backbone, vptune.FullConfig(), C).num_tuned_parameters() == sum(params.values()) + HEAD
    biases = sum(v for n, v in params.items() if n.endswith(".bias"))
    assert vptune.prompt_model(backbone, vptune.BiasConfig(), C).num_tuned_parameters() == biases + HEAD
    two = vptune.prompt_model(backbone, vptune.PartialConfig(num_blocks=3), C)
    assert sorted({n.split(".blocks.")[0] + ".blocks." + n.split(".blocks.")[1].split(".")[0] for n in two.tuned_parameters() if ".blocks." in n}) == [
        "backbone.layers.0.blocks.1", "backbone.layers.1.blocks.0", "backbone.layers.1.blocks.1"]


def test_vpt_stores_one_prompt_table_per_stage_width():
    method = vptune.prompt_model(tiny_swin(), vptune.VPTConfig(num_prompts=P), C).method
    assert method.prompt_embeddings_0.shape == (2, P, D0) and method.prompt_embeddings_1.shape == (2, P, D1)
    e2vpt = vptune.prompt_model(tiny_swin(), vptune.E2VPTConfig(num_prompts=P, num_kv_prompts=M), C).method
    assert e2vpt.key_prompts_0.shape == (2, 2, M, 8) and e2vpt.value_prompts_1.shape == (2, 4, M, 8)


METHODS = {
    "vpt-shallow": vptune.VPTConfig(num_prompts=2, deep=False, swin="official"),
    "vpt-deep": vptune.VPTConfig(num_prompts=2, dropout=0.1),
    "e2vpt": vptune.E2VPTConfig(num_prompts=2, num_kv_prompts=2),
    "apt": vptune.APTConfig(num_prompts=3, rank=2),
    "linear": vptune.LinearConfig(),
    "mlp": vptune.MLPConfig(hidden_layers=1),
    "full": vptune.FullConfig(),
    "bias": vptune.BiasConfig(),
    "partial": vptune.PartialConfig(num_blocks=1),
    "lora": vptune.LoRAConfig(rank=2),
}


def test_methods_cover_every_method():
    assert set(METHODS) | {"coop", "textual-inversion"} == set(vptune.METHOD_NAMES)  # the text-side ones are refused:
    with pytest.raises(ValueError, match="coop learns the prompt of a text tower: it needs a CLIP backbone"):
        vptune.prompt_model(tiny_swin(), vptune.config_for("coop"), C)
    with pytest.raises(ValueError, match="textual-inversion learns a word of a text-to-image model's text encoder: use a diffusion backbone"):
        vptune.prompt_model(tiny_swin(), vptune.config_for("textual-inversion"), C)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_step_and_round_trips(name, tmp_path):
    backbone = tiny_swin("padded")
    shared_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = vptune.prompt_model(backbone, METHODS[name], C).train()
    before = {n: p.detach().clone() for n, p in model.tuned_parameters().items()}
    optimizer = torch.optim.AdamW(model.tuned_parameters().values(), lr=1e-2)
    images = images_of("padded")
    F.cross_entropy(model(images), torch.tensor([0, 1, 2])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.tuned_parameters().items() if not n.endswith("log_scale"))
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, shared_before[k]), f"shared backbone tensor {k} changed"

    model.eval().save_pretrained(tmp_path / "run")
    again = vptune.PromptModel.from_pretrained(tiny_swin("padded"), tmp_path / "run").eval()
    with torch.no_grad():
        assert torch.allclose(again(images), model(images), atol=1e-6)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: vptune.prompt_model(tiny_swin(), vptune.VPTConfig(deep=False, location="add"), C), ValueError,
         r"location='add' is not possible on Swin.*use location='prepend'"),
        (lambda: vptune.prompt_model(tiny_swin(), vptune.VPTConfig(layers=(4,)), C), ValueError,
         r"layers \(4,\) out of range for a backbone with 4 blocks"),
        (lambda: vptune.prompt_model(tiny_swin(), vptune.VPTConfig(shared=True), C), ValueError, r"shared prompts need one width"),
        (lambda: vptune.prompt_model(tiny_swin(), vptune.VPTConfig(), C)(torch.randn(1, 3, 48, 48)), ValueError,
         r"takes 32x32 images .* got 48x48: resize the images to 32x32"),
        (lambda: vptune.prompt_model(tiny_swin(strict_img_size=False), vptune.VPTConfig(), C)(torch.randn(1, 3, 30, 30)), ValueError,
         r"4x4 patches; got 30x30"),
        (lambda: vptune.VPTConfig(swin="offical"), ValueError, r"swin must be 'paper', 'official' or a dict"),
        (lambda: vptune.VPTConfig(swin={"merge": "mean"}), ValueError, r"swin option merge must be one of \['drop', 'tile'\]"),
        (lambda: vptune.E2VPTConfig(swin={"pol": True}), ValueError, r"unknown swin option\(s\) \['pol'\]"),
    ],
)
def test_bad_input_is_refused_clearly(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_swin_v2_is_refused_with_the_reason():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    v2 = SwinTransformerV2(img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4)
    with pytest.raises(TypeError, match=r"Swin v2 .* cosine similarity .*post-norm.*use a Swin v1"):
        vptune.prompt_model(v2, vptune.VPTConfig(), C)


def test_any_size_with_dynamic_img_size_walks_like_timm():
    model = tiny_swin(strict_img_size=False)
    images = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(images), pre_logits=True)
        ours = family_of(model).features(images, Method())
    assert torch.allclose(ours, reference, atol=1e-5)
    fast = vptune.prompt_model(model, vptune.VPTConfig(num_prompts=2), C).eval()
    slow = vptune.prompt_model(model, vptune.VPTConfig(num_prompts=2, path="tokens"), C).eval()
    slow.load_tuned_state_dict(fast.tuned_state_dict())
    with torch.no_grad():
        assert torch.allclose(fast(images), slow(images), atol=1e-5)


def test_runs_do_not_cross_families(tmp_path):
    vptune.prompt_model(tiny_swin(), vptune.VPTConfig(num_prompts=2), C).save_pretrained(tmp_path / "swin")
    with pytest.raises(ValueError, match=r"trained on SwinTransformer \(swin family.*this backbone is .*\(vit family"):
        vptune.PromptModel.from_pretrained(tiny_vit(), tmp_path / "swin")
    vptune.prompt_model(tiny_vit(), vptune.VPTConfig(num_prompts=2), C).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"\(vit family.*this backbone is SwinTransformer \(swin family"):
        vptune.PromptModel.from_pretrained(tiny_swin(), tmp_path / "vit")
    other = tiny_swin(window_size=4)  # same widths, other windows
    with pytest.raises(ValueError, match=r"window_sizes"):
        vptune.PromptModel.from_pretrained(other, tmp_path / "swin")


@pytest.mark.parametrize("mode", ["log", "zero"])
def test_pruned_e2vpt_compacts_to_what_the_masks_compute(mode):
    """E2VPT's pruning on Swin: token and per-width segment masks, then the compact export (pruned
    tokens gone, pruned segments not stored, one stored tensor per stage width)."""
    from vptune.pruning.masks import Masks, compact

    model = vptune.prompt_model(tiny_swin("padded"), vptune.E2VPTConfig(num_prompts=4, num_kv_prompts=2, dropout=0.0), C).eval()
    token = torch.tensor([True, False, True, True])
    segment = torch.tensor([[True, False, True, True], [True] * 4, [False, True, True, True], [True, True, False, False]])
    masks = Masks(token, segment, "interleaved", mode)
    model.method.set_masks(token.float(), segment.float(), mode=mode, layout="interleaved")
    small = compact(model, masks).eval()
    kept_tokens = 3 if mode == "log" else 4
    assert small.config.num_prompts == kept_tokens and small.config.kept_segments is not None
    values = dict(small.method.visual.named_parameters())
    stored = 3 + 3 + 2  # kept segments of tokens 0, 2, 3 (a pruned token stores none in "zero" mode)
    assert values["prompt_values_0"].shape == (2, stored * D0 // 4) and values["prompt_values_1"].shape == (2, stored * D1 // 4)
    images = images_of("padded")
    with torch.no_grad():
        assert torch.allclose(small(images), model(images), atol=1e-5)


# --- the bundled Swin through the command line ----------------------------------------------


@pytest.fixture(scope="module")
def swin_workspace(tmp_path_factory):
    """Random honest weights for the bundled Swin's architecture, a two-class image folder and a
    1-epoch E2VPT run on it through ``vptune train --backbone vptune_swin_fmnist``."""
    from typer.testing import CliRunner
    from safetensors.torch import save_file

    from conftest import two_class_workspace
    from vptune.backbones.bundled import BUNDLED_SWIN, build_bundled
    from vptune.cli import app

    root = two_class_workspace(tmp_path_factory.mktemp("swin"))
    torch.manual_seed(0)
    save_file(honest_(build_bundled(name=BUNDLED_SWIN)).state_dict(), str(root / "swin.safetensors"))
    result = CliRunner().invoke(app, [str(a) for a in (
        "train", "--backbone", BUNDLED_SWIN, "--weights", root / "swin.safetensors", "--method", "e2vpt",
        "--num-prompts", 4, "--data", f"imagefolder:{root / 'images'}", "--out", root / "run", "--epochs", 1,
        "--batch-size", 4, "--lr", 0.05, "--warmup-epochs", 0, "--device", "cpu",
    )])
    assert result.exit_code == 0, result.output
    return root


def test_bundled_swin_trains_evaluates_and_prunes(swin_workspace, tmp_path):
    import json

    from typer.testing import CliRunner

    from vptune.cli import app

    root = swin_workspace
    config = json.loads((root / "run" / "config.json").read_text())
    assert config["backbone"]["family"] == "swin" and config["backbone"]["architecture"] == "vptune_swin_fmnist"
    assert [s[0] for s in config["backbone"]["sites"]] == [48, 48, 96, 96] + [192] * 6
    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, [str(a) for a in (
        "prune", "--run", root / "run", "--data", f"imagefolder:{root / 'images'}", "--out", out, "--device", "cpu",
        "--no-progress", "--token-rate", 0.5, "--segment-rate", 0.5, "--segments", 2, "--epochs", 1,
    )])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prune.json").read_text())
    assert report["masked_vs_compact_max_abs_diff"] < 1e-5
    widths = 2 * 48 + 2 * 96 + 6 * 192  # one prompt set per block at its stage's width
    assert report["before"]["tuned_parameters"] - report["rewound"]["tuned_parameters"] == widths * 4 - widths * 2 // 2
    result = CliRunner().invoke(app, ["eval", "--run", str(out), "--data", f"imagefolder:{root / 'images'}", "--split", "test"])
    assert result.exit_code == 0, result.output
