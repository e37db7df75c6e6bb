"""E2VPT pruning: exact token masks, segment masks, scores against finite differences, the
compact export (fewer parameters and FLOPs, same logits), round trips and refusals."""

import dataclasses
import json

import pytest
import torch
from conftest import tiny_vit, two_class_workspace
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from vptune import PromptModel, config_for
from vptune.cli import app
from vptune.flops import count_flops
from vptune.methods.vpt import segment_of_dim
from vptune.pruning import (
    Masks,
    PruneOptions,
    check_prunable,
    compact,
    importance_scores,
    prune_run,
    segment_masks,
    set_masks,
    token_masks,
    visual_prompts,
)
from vptune.pruning.masks import prune_count
from vptune.train import load_run
from vptune.train.run import evaluate_run

P, R, CLASSES = 6, 4, 5
KEPT = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)


def make_model(method="e2vpt", arch="cls-token", seed=0, **options) -> PromptModel:
    options = {"num_prompts": P, "dropout": 0.0, **options}
    torch.manual_seed(seed)
    model = PromptModel(tiny_vit(arch), config_for(method, **options), CLASSES).eval()
    torch.nn.init.normal_(model.head.weight, std=3.0)  # visible logits: the official head init is tiny
    return model


def some_masks(mode="log", layout="contiguous") -> Masks:
    segment = KEPT[:, None].repeat(1, R)
    segment[0, 1] = segment[3, 0] = segment[3, 3] = False
    return Masks(KEPT.clone(), segment, layout, mode)


def prompt_table(model):
    visual = visual_prompts(model)
    return torch.stack([visual.prompt_table(s) for s in range(visual.table_shape[0])])


def deleted(model: PromptModel, keep: torch.Tensor) -> PromptModel:
    """The same model built from scratch with only the ``keep`` prompt tokens (no masks involved)."""
    config = dataclasses.replace(model.config, num_prompts=int(keep.sum()))
    small = PromptModel(model.backbone, config, model.num_classes).eval()
    state = dict(model.tuned_state_dict())
    key = next(k for k in state if k.endswith("prompt_embeddings"))
    state[key] = state[key][:, keep]
    small.load_tuned_state_dict(state)
    return small


def logits(model, images, masks=None):
    set_masks(model, masks)
    try:
        with torch.no_grad():
            return model(images)
    finally:
        set_masks(model, None)


@pytest.mark.parametrize("arch", ["cls-token", "gap-qknorm-ls", "registers-dynamic"])
@pytest.mark.parametrize("path", ["kv", "tokens"])
@pytest.mark.parametrize("method", ["e2vpt", "vpt-deep"])
def test_log_mask_zero_equals_deleted_token_and_compact_export(method, path, arch, images):
    model = make_model(method, arch, path=path)
    token_only = Masks(KEPT, KEPT[:, None].repeat(1, R))
    masked = logits(model, images, token_only)
    assert (masked - logits(model, images)).abs().max() > 1e-3  # the mask does something
    assert torch.allclose(masked, logits(deleted(model, KEPT), images), atol=1e-5)
    small = compact(model, token_only)
    assert small.config.num_prompts == int(KEPT.sum()) and small.config.kept_segments is None
    assert torch.allclose(masked, logits(small, images), atol=1e-5)
    # segments too: the compact model stores only the kept ones and computes the same
    masks = some_masks()
    assert torch.allclose(logits(model, images, masks), logits(compact(model, masks), images), atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_segment_mask_zeroes_its_dimensions(layout, images):
    model = make_model()
    masks = some_masks(layout=layout)
    expected = make_model()
    dims = segment_of_dim(48, R, layout)
    with torch.no_grad():
        expected.method.visual.prompt_embeddings.mul_(masks.segment[:, dims].float())  # p, d
    token_only = dataclasses.replace(masks, segment=torch.ones(P, R, dtype=torch.bool))
    assert torch.allclose(logits(model, images, masks), logits(expected, images, token_only), atol=1e-5)


def test_segment_layouts():
    assert segment_of_dim(8, 4, "contiguous").tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert segment_of_dim(8, 4, "interleaved").tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert segment_of_dim(10, 4, "contiguous").bincount().tolist() == [3, 2, 3, 2]
    with pytest.raises(ValueError, match="cannot split a prompt of width 8 into 9 segments"):
        segment_of_dim(8, 9, "contiguous")


@pytest.mark.parametrize("path", ["kv", "tokens"])
def test_zero_mode_keeps_the_pruned_token_as_a_zero_vector(path, images):
    """The official behaviour: the zeroed token still emits LN1's bias as key and value."""
    model = make_model(path=path)
    masks = Masks(KEPT, torch.ones(P, R, dtype=torch.bool), mode="zero")
    zero = logits(model, images, masks)
    assert (zero - logits(deleted(model, KEPT), images)).abs().max() > 1e-4
    zeroed = make_model(path=path)
    with torch.no_grad():
        zeroed.method.visual.prompt_embeddings[:, ~KEPT] = 0.0
    assert torch.allclose(zero, logits(zeroed, images), atol=1e-5)
    small = compact(model, masks)
    assert small.config.num_prompts == P  # nothing removed from the sequence ...
    assert torch.allclose(zero, logits(small, images), atol=1e-5)
    assert small.num_tuned_parameters() < model.num_tuned_parameters()  # ... but zeros are not stored


def test_compact_model_has_fewer_parameters_and_flops(images):
    model = make_model()  # e2vpt, 3 blocks of width 48
    masks = some_masks()
    small = compact(model, masks)
    kept_values = 3 * 48 * int(masks.segment.sum()) // R  # 3 blocks, 12 dims per segment
    assert small.num_tuned_parameters() == model.num_tuned_parameters() - 3 * P * 48 + kept_values
    image = images[:1]

    def flops(m, masks=None):
        set_masks(m, masks)
        with torch.no_grad():
            m(image)  # fills the prompt key/value cache, as at serving time
            count = count_flops(lambda: m(image))
        set_masks(m, None)
        return count

    assert flops(small) < flops(model, masks) == flops(model)  # the masked model still computes every token
    zero = compact(model, dataclasses.replace(masks, mode="zero"))
    assert flops(zero) == flops(model)  # the official way saves no compute


def test_compact_run_round_trips_and_its_file_shrinks(tmp_path, images):
    model = make_model()
    small = compact(model, some_masks(layout="interleaved"))
    small.metadata["note"] = "pruned"
    model.save_pretrained(tmp_path / "full")
    small.save_pretrained(tmp_path / "small")
    loaded = PromptModel.from_pretrained(tiny_vit(), tmp_path / "small")
    assert loaded.config == small.config and loaded.config.segment_layout == "interleaved"
    assert loaded.metadata["note"] == "pruned"
    assert torch.allclose(logits(loaded, images), logits(small, images), atol=1e-6)
    saved = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("full", "small")]
    removed = 3 * 48 * 4 * (P - int(some_masks().segment.sum()) / R)  # bytes of the values not stored
    assert saved[0] - saved[1] >= removed - 512  # up to the safetensors header


def finite_difference(model, dataset, index, segments=None, mode="log", eps=1e-4):
    """Per-sample central differences of the loss in one mask entry, at mask 1."""
    grads = []
    for image, label in dataset:
        values = []
        for sign in (1, -1):
            token = torch.ones(P, dtype=torch.float64)
            segment = None if segments is None else torch.ones(P, segments, dtype=torch.float64)
            (token if segments is None else segment).view(-1)[index] += sign * eps
            model.method.set_masks(token, segment, mode=mode)
            with torch.no_grad():
                values.append(torch.nn.functional.cross_entropy(model(image[None]), label[None]).item())
        grads.append((values[0] - values[1]) / (2 * eps))
    model.method.set_masks(None, None)
    return torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["log", "zero"])
def test_scores_match_finite_differences(mode):
    model = make_model(method="vpt-deep").double()
    generator = torch.Generator().manual_seed(3)
    dataset = TensorDataset(torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64), torch.tensor([0, 3, 1]))
    before = {k: v.clone() for k, v in model.tuned_state_dict().items()}
    absolute = importance_scores(model, dataset, mode=mode, batch_size=2)
    signed = importance_scores(model, dataset, mode=mode, score="signed", batch_size=2)
    for k in (0, 3, 5):
        fd = finite_difference(model, dataset, k, mode=mode)
        assert absolute[k].item() == pytest.approx(fd.abs().mean().item(), rel=1e-5, abs=1e-9)
        assert signed[k].item() == pytest.approx(fd.mean().item(), rel=1e-5, abs=1e-9)
    segments = importance_scores(model, dataset, segments=R, mode=mode, batch_size=2)
    for index in (5, 22):
        fd = finite_difference(model, dataset, index, segments=R, mode=mode)
        assert segments.view(-1)[index].item() == pytest.approx(fd.abs().mean().item(), rel=1e-5, abs=1e-9)
    # one scoring pass changes no tuned tensor and leaves no gradient behind
    assert all(torch.equal(before[k], v) for k, v in model.tuned_state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_segment_scores_ignore_pruned_tokens():
    model = make_model()
    dataset = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    scores = importance_scores(model, dataset, segments=R, keep_tokens=KEPT)
    assert torch.all(scores[~KEPT] == 0) and torch.all(scores[KEPT] > 0)


def test_masks_from_scores_prune_the_lowest_and_never_everything():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.8])
    masks = token_masks(scores, 0.5, R)
    assert masks.token.tolist() == [True, False, True, False, False, True]
    assert token_masks(scores, 0.99, R).token.sum() == 1  # floor(5.94) = 5 pruned, one kept
    assert prune_count(16, 0.5) == 8 and prune_count(10, 0.25) == 2 and prune_count(3, 0.0) == 0
    segment_scores = torch.arange(P * R, dtype=torch.float).flip(0).view(P, R)
    pruned = segment_masks(masks, segment_scores, 0.5)
    assert pruned.segment[masks.token].tolist() == [[True, True, False, False]] * 3
    assert not pruned.segment[~masks.token].any()


def test_masks_invalidate_the_prompt_cache(images):
    model = make_model()
    plain = logits(model, images)  # eval + no_grad: prompt keys/values cached
    model.method.set_masks(KEPT.float(), None)
    with torch.no_grad():
        masked = model(images)
    model.method.set_masks(None, None)
    assert (plain - masked).abs().max() > 1e-3


def test_masked_model_trains_with_prompt_dropout(images):
    model = make_model(dropout=0.1).train()
    set_masks(model, some_masks())
    model(images).sum().backward()
    set_masks(model, None)
    grad = model.method.visual.prompt_embeddings.grad
    assert torch.all(grad[:, ~KEPT] == 0) and grad[:, KEPT].abs().sum() > 0


@pytest.mark.parametrize(
    "method, options, reason",
    [
        ("linear", {}, "linear run, which cannot be pruned"),
        ("apt", {}, "apt run, which cannot be pruned"),
        ("vpt-shallow", {}, "vpt-shallow run, which cannot be pruned"),
        ("vpt-deep", {"location": "add"}, "vpt-deep run, which cannot be pruned"),
    ],
)
def test_refuses_runs_that_cannot_be_pruned(method, options, reason):
    with pytest.raises(ValueError, match=reason):
        check_prunable(config_for(method, **options))


def test_refuses_bad_rates_and_masks():
    for rate in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            prune_count(10, rate)
    model = make_model()
    with pytest.raises(ValueError, match="prune every prompt token"):
        compact(model, Masks(torch.zeros(P, dtype=torch.bool), torch.ones(P, R, dtype=torch.bool)))
    with pytest.raises(ValueError, match="do not fit a model with 6 prompt tokens"):
        compact(model, Masks.keep_all(4, R))
    with pytest.raises(ValueError, match="kept_segments must be sorted distinct indices"):
        config_for("e2vpt", num_prompts=2, segments=4, kept_segments=(3, 1))
    with pytest.raises(ValueError, match="score must be one of"):
        importance_scores(model, TensorDataset(torch.randn(1, 3, 32, 32), torch.tensor([0])), score="mean")


# --- vptune prune end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prune_workspace(tmp_path_factory):
    """Random bundled-backbone weights, a two-class image folder and a 1-epoch e2vpt run on it."""
    root = two_class_workspace(tmp_path_factory.mktemp("prune"))
    result = CliRunner().invoke(app, [str(a) for a in (
        "train", "--method", "e2vpt", "--num-prompts", 4, "--data", f"imagefolder:{root / 'images'}", "--out",
        root / "run", "--weights", root / "backbone.safetensors", "--epochs", 1, "--batch-size", 4, "--lr", 0.05,
        "--warmup-epochs", 0, "--device", "cpu",
    )])
    assert result.exit_code == 0, result.output
    return root


def invoke_prune(workspace, out, *extra):
    args = ("prune", "--run", workspace / "run", "--data", f"imagefolder:{workspace / 'images'}", "--out", out,
            "--device", "cpu", "--no-progress", *extra)
    return CliRunner().invoke(app, [str(a) for a in args])


def test_prune_command_writes_a_smaller_run_that_loads_and_reports(prune_workspace, tmp_path):
    out = tmp_path / "pruned"
    # token rate fixed, segment rate searched (cascade, one candidate with R=2; tolerance lets it pass)
    result = invoke_prune(prune_workspace, out, "--token-rate", 0.5, "--segments", 2, "--tolerance", 100, "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert "training epochs spent: 3 (search: 2)" in result.output  # reference, one candidate, rewinding
    report = json.loads((out / "prune.json").read_text())
    assert report["token_rate"] == 0.5 and report["segment_rate"] == 0.5
    assert [(c["stage"], c["rate"]) for c in report["search"]["candidates"]] == [("reference", 0.0), ("segment", 0.5)]
    assert report["rewind_from"].endswith("init.safetensors")
    assert report["masked_vs_compact_max_abs_diff"] < 1e-5
    before, pruned, rewound = report["before"], report["pruned"], report["rewound"]
    assert before["num_prompts"] == 4 and pruned["num_prompts"] == rewound["num_prompts"] == 2
    dims = 6 * 192  # 6 blocks of width 192: 2 of 4 tokens kept, each with 1 of 2 segments
    assert before["tuned_parameters"] - rewound["tuned_parameters"] == dims * 4 - dims * 2 // 2
    assert rewound["gflops"] < before["gflops"] and rewound["extra_gflops"] < before["extra_gflops"]
    assert report["weights_bytes"]["after"] < report["weights_bytes"]["before"]
    for stage in (before, pruned, rewound):
        assert stage["val_top1"] is not None and stage["test_top1"] is not None
    model = load_run(out)
    start = load_file(str(out / "init.safetensors"))  # the original initial values of what survived
    original = load_file(str(prune_workspace / "run" / "init.safetensors"))
    kept = report["masks"]["tokens_kept"]
    assert torch.equal(start["method.key_prompts"], original["method.key_prompts"])
    assert torch.equal(start["head.weight"], original["head.weight"])
    dims = model.method.visual.kept_positions
    expected = original["method.visual.prompt_embeddings"][:, kept].reshape(6, -1)[:, dims]
    assert torch.equal(start["method.visual.prompt_values"], expected)
    assert model.config.kept_segments is not None and model.metadata["pruning"]["tokens_kept"] == report["masks"]["tokens_kept"]
    assert evaluate_run(model, f"imagefolder:{prune_workspace / 'images'}", "val")["top1"] == rewound["val_top1"]


def test_prune_command_refuses_bad_requests_with_one_clear_line(prune_workspace, tmp_path):
    linear = tmp_path / "linear"
    PromptModel(tiny_vit(), config_for("linear"), 2).save_pretrained(linear)
    cases = [
        (("--token-rate", 1.0), "token-rate must be in [0, 1)"),
        (("--segment-rate", -0.5), "segment-rate must be in [0, 1)"),
        (("--score", "mean"), "score must be one of abs, signed"),
        (("--segments", 1000, "--token-rate", 0, "--segment-rate", 0), "--segments 1000 is more than the prompt width 192"),
    ]
    for extra, message in cases:
        result = invoke_prune(prune_workspace, tmp_path / "out", *extra)
        assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    runs = ((linear, "is a linear run, which cannot be pruned"), (tmp_path / "nowhere", "does not exist"))
    for run, message in runs:
        args = ("prune", "--run", run, "--data", "imagefolder:x", "--out", tmp_path / "o")
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output


def test_prune_command_official_variant_grid_fresh_zero(prune_workspace, tmp_path):
    """The official code's choices: grid search, fresh rewinding, pruned tokens kept as zeros."""
    out = tmp_path / "official"
    result = invoke_prune(prune_workspace, out, "--search", "grid", "--rewind", "fresh", "--mask-mode", "zero",
                          "--segment-layout", "interleaved", "--score", "signed", "--token-rate", 0.5, "--segments", 2,
                          "--epochs", 1)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prune.json").read_text())
    assert report["search"]["mode"] == "grid" and len(report["search"]["candidates"]) == 1
    assert report["training_epochs"] == 1  # the grid's winner is the rewound model
    assert report["rewind_from"] == "fresh" and report["masks"]["mask_mode"] == "zero"
    before, rewound = report["before"], report["rewound"]
    assert rewound["num_prompts"] == before["num_prompts"] == 4  # zeros stay in the sequence ...
    assert rewound["gflops"] == pytest.approx(before["gflops"])  # ... and cost as much as before
    assert rewound["tuned_parameters"] < before["tuned_parameters"]  # but are not stored
    assert load_run(out).config.segment_layout == "interleaved"


def test_an_interrupted_prune_resumes_where_it_stopped(prune_workspace, tmp_path, monkeypatch):
    """Killed in the search, then in the rewinding: each rerun reads back the finished candidates,
    continues the rewinding from its last epoch, and ends where an uninterrupted prune ends."""
    from vptune.pruning import run as pruning

    data = f"imagefolder:{prune_workspace / 'images'}"
    options = PruneOptions(segments=2, tolerance=100, epochs=2, device="cpu")  # token and segment rates searched
    real_fit, epochs_trained = pruning.fit, []

    def counting_fit(model, bundle, cfg, out_dir=None, *, stop_after_epoch=None, **kwargs):
        def on_epoch_end(record):
            epochs_trained.append((out_dir is not None, record["epoch"]))
            if stop_after_epoch == record["epoch"]:
                raise KeyboardInterrupt
        return real_fit(model, bundle, cfg, out_dir, on_epoch_end=on_epoch_end, **kwargs)

    def prune(out, kill_at=None):
        """``kill_at``: ("search", n) kills the n-th search candidate, ("rewind", k) the rewinding after epoch k."""
        epochs_trained.clear()
        fits = []

        def fit(model, bundle, cfg, out_dir=None, **kwargs):
            fits.append(out_dir)
            stop = None
            if kill_at == ("search", len(fits)):
                raise KeyboardInterrupt
            if kill_at and kill_at[0] == "rewind" and out_dir is not None:
                stop = kill_at[1]
            return counting_fit(model, bundle, cfg, out_dir, stop_after_epoch=stop, **kwargs)

        monkeypatch.setattr(pruning, "fit", fit)
        return prune_run(prune_workspace / "run", data, out, options, progress=False, log=lambda line: None)

    whole = prune(tmp_path / "whole")
    searched = len(whole["search"]["candidates"])
    assert searched == 1 + len(pruning.token_candidates(4)) + 1  # reference, every token rate, one segment rate
    assert epochs_trained.count((True, 1)) == epochs_trained.count((True, 2)) == 1

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        prune(out, kill_at=("search", 3))
    assert len(json.loads((out / "prune-progress.json").read_text())["candidates"]) == 2
    with pytest.raises(KeyboardInterrupt):
        prune(out, kill_at=("rewind", 1))
    assert [e for e in epochs_trained if not e[0]] == [(False, 1)] * (searched - 2)  # only the unfinished candidates
    assert (out / "checkpoint.pt").is_file()
    resumed = prune(out)
    assert epochs_trained == [(True, 2)]  # no search; the rewinding's second epoch only
    assert not (out / "checkpoint.pt").exists()
    for key in ("token_rate", "segment_rate", "masks", "training_epochs"):
        assert resumed[key] == whole[key], key
    assert resumed["search"]["candidates"] == whole["search"]["candidates"]
    assert resumed["rewound"]["val_top1"] == whole["rewound"]["val_top1"]
    for name, tensor in load_run(tmp_path / "whole").tuned_state_dict().items():
        torch.testing.assert_close(load_run(out).tuned_state_dict()[name], tensor, rtol=0, atol=1e-6)

    other = dataclasses.replace(options, tolerance=0.5)
    with pytest.raises(ValueError, match=r"made with other settings \(options differ\)"):
        prune_run(prune_workspace / "run", data, out, other, progress=False, log=lambda line: None)


def test_an_interrupted_pruning_from_before_clip_grad_resumes_unclipped(tmp_path):
    """prune-progress.json written before clip_grad existed records training settings without it:
    they were unclipped, so the search resumes under clip_grad None and not under a clip_grad."""
    from vptune.pruning.run import previous_candidates
    from vptune.train import TrainConfig
    from vptune.train.folder import PRUNE_PROGRESS_FILE

    train = {k: v for k, v in TrainConfig(epochs=2).to_dict().items() if k not in ("tracker", "tracking_uri", "device")}
    settings = {"run": "/runs/a", "data": "mini:digits", "train_config": train}
    old = {**settings, "train_config": {k: v for k, v in train.items() if k != "clip_grad"}}
    candidates = [{"token_rate": 0.5, "segment_rate": 0.0, "val_top1": 80.0}]
    (tmp_path / PRUNE_PROGRESS_FILE).write_text(json.dumps({"settings": old, "candidates": candidates}))
    assert previous_candidates(tmp_path, settings) == candidates
    clipped = {**settings, "train_config": {**train, "clip_grad": 1.0}}
    with pytest.raises(ValueError, match=r"made with other settings \(train_config differ\)"):
        previous_candidates(tmp_path, clipped)
