"""The training engine: schedule, parameter groups, gradient accumulation, resume, NaN
handling, run-folder checks and the files a run writes."""

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from safetensors.torch import load_file
from torch.utils.data import Dataset

from vptune import config_for, prompt_model
from vptune.train import NonFiniteLossError, TrainConfig, build_optimizer, fit, lr_factor, param_groups
from vptune.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint


class Blobs(Dataset):
    """Images whose class sets the mean of one colour channel: learnable in a few steps."""

    def __init__(self, n: int, num_classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.images = torch.randn(n, 3, 32, 32, generator=g) * 0.5
        self.images[torch.arange(n), self.labels % 3] += 1.0 + self.labels[:, None, None] * 0.5
        self.poison = False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i] * (float("nan") if self.poison else 1.0)
        return image, int(self.labels[i])


def bundle(n_train: int = 14, n_val: int = 6, num_classes: int = 3):
    return SimpleNamespace(
        train=Blobs(n_train, num_classes, seed=0), val=Blobs(n_val, num_classes, seed=1),
        test=Blobs(n_val, num_classes, seed=2), num_classes=num_classes,
        class_names=[f"c{i}" for i in range(num_classes)], skipped=[], spec="blobs",
    )


def model_for(method: str = "vpt-deep", seed: int = 0, **options):
    torch.manual_seed(seed)
    return prompt_model(tiny_vit(), config_for(method, **options), num_classes=3)


def cfg(**overrides) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, lr=0.05, weight_decay=1e-3, warmup_epochs=1, seed=3, device="cpu")
    return TrainConfig(**{**base, **overrides})


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    warmup, total = 4, 12
    factors = [lr_factor(s, warmup, total) for s in range(total)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert lr_factor(0, 0, 10) == 1.0  # no warm-up: cosine from the peak


def test_weight_decay_skips_biases_norms_and_1d_but_not_prompts():
    model = model_for("vpt-deep")
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.1))
    named = model.tuned_parameters()
    assert id(named["method.prompt_embeddings"]) in decay  # the VPT recipe decays prompts too
    assert {n for n, p in named.items() if id(p) in decay} == {n for n, p in named.items() if p.ndim >= 2}
    assert id(named["head.bias"]) in no_decay

    full = model_for("full")
    shapes = {n: p.ndim for n, p in full.named_parameters()}
    names = {id(p): n for n, p in full.named_parameters()}
    no_decay_names = {names[id(p)] for p in param_groups(full, 0.1)[1]["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight"} <= no_decay_names
    assert {n for n in no_decay_names if shapes[n] > 1} == {"backbone.pos_embed", "backbone.cls_token"}


def test_only_tuned_parameters_reach_the_optimiser():
    model = model_for("vpt-deep")
    optimised = {id(p) for g in build_optimizer(model, cfg()).param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.tuned_parameters().values()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gradient_accumulation_equals_the_big_batch(optimizer):
    data = bundle(n_train=14)  # steps of 8 then 6 images: the last window is partial
    big, small = model_for("vpt-deep", num_prompts=2), model_for("vpt-deep", num_prompts=2)
    fit(big, data, cfg(batch_size=8, grad_accum=1, optimizer=optimizer), progress=False)
    fit(small, data, cfg(batch_size=4, grad_accum=2, optimizer=optimizer), progress=False)
    for name, tensor in big.tuned_state_dict().items():
        torch.testing.assert_close(small.tuned_state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


class Kill(Exception):
    pass


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    data = bundle()
    settings = cfg(epochs=3, eval_every=1)
    straight = model_for("e2vpt", num_prompts=2, num_kv_prompts=2, dropout=0.2)  # dropout draws from the RNG
    expected = fit(straight, data, settings, tmp_path / "straight", progress=False)

    def kill_after_epoch_2(record):
        if record["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):
        fit(model_for("e2vpt", num_prompts=2, num_kv_prompts=2, dropout=0.2), data, settings, tmp_path / "killed",
            progress=False, on_epoch_end=kill_after_epoch_2)
    assert load_checkpoint(tmp_path / "killed")["loop"]["epoch"] == 2
    torch.manual_seed(123)  # a different process state: the checkpoint must restore everything
    resumed_model = model_for("e2vpt", seed=7, num_prompts=2, num_kv_prompts=2, dropout=0.2)
    resumed = fit(resumed_model, data, settings, tmp_path / "killed", resume=True, progress=False)

    for name, tensor in straight.tuned_state_dict().items():
        assert torch.equal(resumed_model.tuned_state_dict()[name], tensor), name
    drop_speed = lambda curve: [{k: v for k, v in row.items() if k != "images_per_s"} for row in curve]  # noqa: E731
    assert drop_speed(resumed["curve"]) == drop_speed(expected["curve"])
    assert resumed["val_top1"] == expected["val_top1"] and resumed["steps"] == expected["steps"]


class NoisyBlobs(Blobs):
    """Blobs with an augmentation drawn from torch's RNG, which is the worker's own with num_workers > 0."""

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        return image + 0.3 * torch.randn(image.shape), label


def test_resume_with_loader_workers_matches_an_uninterrupted_run(tmp_path):
    """Worker processes draw augmentations from seeds the loader derives from (seed, epoch), so a
    resumed run sees the augmentations the uninterrupted one saw."""
    data = bundle(n_train=12)
    data.train = NoisyBlobs(12, seed=0)
    settings = cfg(epochs=2, num_workers=2)
    straight = model_for("vpt-deep", num_prompts=2)
    fit(straight, data, settings, tmp_path / "straight", progress=False)

    def kill_after_epoch_1(record):
        if record["epoch"] == 1:
            raise Kill

    with pytest.raises(Kill):
        fit(model_for("vpt-deep", num_prompts=2), data, settings, tmp_path / "killed", progress=False,
            on_epoch_end=kill_after_epoch_1)
    torch.manual_seed(123)
    resumed = model_for("vpt-deep", seed=7, num_prompts=2)
    fit(resumed, data, settings, tmp_path / "killed", resume=True, progress=False)
    other = model_for("vpt-deep", num_prompts=2)
    fit(other, data, cfg(epochs=2, num_workers=2, seed=4), progress=False)  # the noise matters
    for name, tensor in straight.tuned_state_dict().items():
        assert torch.equal(resumed.tuned_state_dict()[name], tensor), name
    assert any(not torch.equal(other.tuned_state_dict()[k], v) for k, v in straight.tuned_state_dict().items())


def test_resume_refuses_other_settings(tmp_path):
    data = bundle()
    with pytest.raises(Kill):
        fit(model_for(), data, cfg(), tmp_path, progress=False, on_epoch_end=lambda r: (_ for _ in ()).throw(Kill))
    with pytest.raises(ValueError, match="lr 0.05 vs 0.1"):
        fit(model_for(), data, cfg(lr=0.1), tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(model_for(), data, cfg(), tmp_path / "empty", resume=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = bundle()
    model = model_for("vpt-deep", num_prompts=2)

    def poison(record):
        data.train.poison = True
        poison.good = {k: v.clone() for k, v in model.tuned_state_dict().items()}

    with pytest.raises(NonFiniteLossError, match=r"loss became nan in epoch 2.*last good checkpoint .* \(after epoch 1\) is kept"):
        fit(model, data, cfg(epochs=3), tmp_path, progress=False, on_epoch_end=poison)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["loop"]["epoch"] == 1
    saved = load_file(str(tmp_path / "model.safetensors"))
    for name, tensor in poison.good.items():
        assert torch.equal(checkpoint["model"][name], tensor) and torch.equal(saved[name], tensor)


def test_a_run_folder_of_another_method_or_backbone_is_refused(tmp_path):
    data = bundle()
    fit(model_for("vpt-deep", num_prompts=2), data, cfg(epochs=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds a run of .*vpt-deep.*this run is .*e2vpt"):
        fit(model_for("e2vpt"), data, cfg(epochs=1), tmp_path, progress=False)
    other = prompt_model(tiny_vit(depth=2), config_for("vpt-deep", num_prompts=2), 3)
    with pytest.raises(ValueError, match="mismatch in depth 3 vs 2"):
        fit(other, data, cfg(epochs=1), tmp_path, progress=False)


def test_fit_writes_weights_curve_and_checkpoint(tmp_path):
    data = bundle()
    result = fit(model_for("vpt-shallow", num_prompts=2), data, cfg(epochs=2, eval_every=0), tmp_path, progress=False)
    rows = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["4", "8"]
    assert rows[0]["val_top1"] == "" and float(rows[1]["val_top1"]) == pytest.approx(result["val_top1"])
    assert set(rows[0]) == {"epoch", "step", "train_loss", "lr", "val_top1", "val_loss", "images_per_s"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["metadata"]["train_config"]["epochs"] == 2
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not list(tmp_path.glob("*.tmp"))


def test_bf16_autocast_trains_like_fp32():
    """bf16 autocast takes the fp32 run's steps up to bf16 rounding: not the same numbers (autocast
    really ran), but close relative to how far training moved each tensor."""
    runs = {}
    for precision in ("fp32", "bf16"):
        model = model_for("vpt-deep", num_prompts=2)
        before = {k: v.clone() for k, v in model.tuned_state_dict().items()}
        result = fit(model, bundle(), cfg(epochs=1, precision=precision), progress=False)
        runs[precision] = result, model.tuned_state_dict()
    (fp32, fp32_state), (bf16, bf16_state) = runs["fp32"], runs["bf16"]
    assert all(v.dtype == torch.float32 for v in bf16_state.values())  # master weights stay fp32
    assert abs(bf16["train_loss"] - fp32["train_loss"]) <= 0.02 * fp32["train_loss"]
    assert any(not torch.equal(bf16_state[k], fp32_state[k]) for k in fp32_state), "bf16 gave the fp32 numbers"
    for name, tensor in fp32_state.items():
        moved = (tensor - before[name]).norm()
        assert moved > 0, name
        assert (bf16_state[name] - tensor).norm() <= 0.1 * moved, name


@pytest.mark.parametrize("scale_lr", [False, True])
def test_scale_lr_sets_the_lr_the_optimiser_steps_with(scale_lr):
    """--scale-lr: peak lr = lr * batch * grad_accum / 256, read from the optimiser at each step."""
    used = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used.append({g["lr"] for g in optimizer.param_groups})
    )
    try:
        settings = cfg(epochs=1, batch_size=4, grad_accum=2, lr=2.0, warmup_epochs=0, scale_lr=scale_lr)
        fit(model_for("linear"), bundle(n_train=16), settings, progress=False)
    finally:
        handle.remove()
    peak = 2.0 * 8 / 256 if scale_lr else 2.0
    assert len(used) == 2 and all(len(lrs) == 1 for lrs in used)  # every group steps with the same lr
    assert used[0].pop() == pytest.approx(peak)  # step 0 of a cosine without warm-up: the peak
    assert used[1].pop() == pytest.approx(peak * lr_factor(1, 0, 2))


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("linear", {}, lambda n, d, depth: 0),
        ("mlp", {"hidden_layers": 2}, lambda n, d, depth: 2 * (2 * d * d)),
        # each block attends from N tokens to p more keys: QK^T and AV, 2 FLOPs per multiply-add;
        # with token pooling the last block computes only the class token's row
        ("vpt-deep", {"num_prompts": 5}, lambda n, d, depth: (depth - 1) * 2 * (2 * n * 5 * d) + 2 * (2 * 1 * 5 * d)),
        # LoRA as run (unmerged), against the backbone without adapters: x A then (x A) B, rank 8, on
        # qkv (d -> 3d) for every token of every block, on proj (d -> d) for the class token only in the last
        ("lora", {}, lambda n, d, depth: depth * 2 * n * 8 * 4 * d + (depth - 1) * 2 * n * 8 * 2 * d + 2 * 1 * 8 * 2 * d),
    ],
)
def test_extra_flops_against_formulas(method, options, expected):
    from vptune.flops import extra_flops

    model = model_for(method, **options)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    tokens = model.backbone.patch_embed.num_patches + model.backbone.num_prefix_tokens
    assert extra_flops(model) == expected(tokens, model.backbone.embed_dim, len(model.backbone.blocks))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == tuned  # counting changed no flag


# --- gradient clipping (clip_grad) -------------------------------------------------------------


def hand_step(method: str, data, clip: float | None, **options) -> tuple[dict[str, torch.Tensor], float]:
    """The first step fit takes with SGD at lr 1 without weight decay on all of ``data.train`` as
    one batch (momentum's first step is the gradient itself): minus the mean-loss gradient, scaled by
    hand to total L2 norm ``clip`` (clip_grad_norm_'s rule, coefficient clip / (norm + 1e-6) when
    under 1); and the gradient's norm before clipping."""
    model = model_for(method, **options)
    model.train()
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    labels = torch.tensor([data.train[i][1] for i in range(len(data.train))])
    F.cross_entropy(model(images), labels).backward()
    grads = {name: p.grad.clone() for name, p in model.tuned_parameters().items()}
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    scale = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
    return {name: -scale * g for name, g in grads.items()}, norm


def one_step(method: str, data, tracker=None, **settings) -> dict[str, torch.Tensor]:
    """How far one epoch of fit (one optimiser step at lr 1, SGD, no decay) moves each tuned tensor."""
    model = model_for(method, **METHOD_OPTIONS[method])
    before = {name: p.detach().clone() for name, p in model.tuned_parameters().items()}
    fit(model, data, cfg(epochs=1, lr=1.0, weight_decay=0.0, warmup_epochs=0, **settings), progress=False, tracker=tracker)
    return {name: p.detach() - before[name] for name, p in model.tuned_parameters().items()}


METHOD_OPTIONS = {"vpt-deep": {"num_prompts": 2}, "lora": {"rank": 2}}


def counting_clip(monkeypatch, fail: bool = False) -> list[float]:
    """Record the total norm of every clip_grad_norm_ call (or fail on any call)."""
    real, norms = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, *args, **kwargs):
        assert not fail, "clip_grad_norm_ was called without clip_grad"
        norms.append(float(total := real(params, max_norm, *args, **kwargs)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return norms


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("clip", [None, 0.01])
def test_clip_grad_steps_with_the_gradient_clipped_to_the_max_norm(method, clip, monkeypatch):
    """With clip_grad the step is the gradient scaled to norm clip_grad (over every tuned tensor,
    head included); without it, the raw gradient, and nothing calls clip_grad_norm_."""
    data = bundle(n_train=8)
    expected, norm = hand_step(method, data, clip, **METHOD_OPTIONS[method])
    norms = counting_clip(monkeypatch, fail=clip is None)
    logged = []
    tracker = SimpleNamespace(log=lambda figures, step: logged.append(figures))
    moved = one_step(method, data, tracker, batch_size=8, clip_grad=clip)
    assert moved.keys() == expected.keys()
    for name, delta in moved.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-3, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    step_norm = math.sqrt(sum(float(d.double().square().sum()) for d in moved.values()))
    if clip is None:
        assert step_norm == pytest.approx(norm, rel=1e-3) and norms == []
        assert not any("step/grad_norm" in figures for figures in logged)
    else:
        assert norm > 10 * clip  # the limit bites
        assert step_norm == pytest.approx(clip, rel=1e-3) and norms == [pytest.approx(norm, rel=1e-3)]
        assert [f["step/grad_norm"] for f in logged if "step/grad_norm" in f] == [pytest.approx(norm, rel=1e-3)]


def test_accumulation_clips_the_summed_gradient_once_per_step(monkeypatch):
    """Four micro-batches of 2 make one step: its gradient is clipped once, after the last
    backward, exactly as the batch of 8 is (clipping each micro-batch's share would not be)."""
    data = bundle(n_train=8)
    expected, norm = hand_step("vpt-deep", data, 0.01, **METHOD_OPTIONS["vpt-deep"])
    norms = counting_clip(monkeypatch)
    moved = one_step("vpt-deep", data, batch_size=2, grad_accum=4, clip_grad=0.01)
    for name, delta in moved.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-3, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert norms == [pytest.approx(norm, rel=1e-3)]


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_clip_grad_that_is_not_a_positive_number_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=r"clip_grad must be a positive number .* got .*--clip-grad 1.0, or leave it out"):
        cfg(clip_grad=bad)
    assert cfg(clip_grad=2).clip_grad == 2 and cfg().clip_grad is None


def test_a_checkpoint_from_before_clip_grad_resumes_as_the_unclipped_run_it_was(tmp_path):
    """Checkpoints and run configs written before clip_grad existed lack the key: they were made
    without clipping, so they resume under clip_grad None (to the uninterrupted result) and are
    refused under a clip_grad."""
    data = bundle()
    straight = model_for("vpt-deep", num_prompts=2)
    fit(straight, data, cfg(), tmp_path / "straight", progress=False)
    with pytest.raises(Kill):
        fit(model_for("vpt-deep", num_prompts=2), data, cfg(), tmp_path / "old", progress=False,
            on_epoch_end=lambda record: (_ for _ in ()).throw(Kill))
    ckpt = load_checkpoint(tmp_path / "old")
    del ckpt["train_config"]["clip_grad"]  # what vptune wrote before clip_grad
    save_checkpoint(tmp_path / "old", ckpt)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["metadata"]["train_config"]["clip_grad"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="cannot resume .*clip_grad None vs 1.0"):
        fit(model_for("vpt-deep", num_prompts=2), data, cfg(clip_grad=1.0), tmp_path / "old", resume=True, progress=False)
    resumed = model_for("vpt-deep", seed=7, num_prompts=2)
    fit(resumed, data, cfg(), tmp_path / "old", resume=True, progress=False)
    for name, tensor in straight.tuned_state_dict().items():
        assert torch.equal(resumed.tuned_state_dict()[name], tensor), name
