"""MultiTaskModel: a batch mixing tasks gives each sample its own PromptModel's logits."""

import pytest
import torch
from conftest import tiny_vit

from vptune import MultiTaskModel, PromptModel, config_for
from vptune.serve.multitask import OWN_PASS

# Task name -> (method, options, classes): different methods, prompt counts and prompt paths.
RUNS = {
    "deep3": ("vpt-deep", dict(num_prompts=3), 4),
    "deep5-tokens": ("vpt-deep", dict(num_prompts=5, path="tokens"), 3),
    "shallow4": ("vpt-shallow", dict(num_prompts=4), 5),
    "subset": ("vpt-deep", dict(num_prompts=2, layers=(0, 1)), 2),  # kv, carried tokens, then late kv
    "late": ("vpt-deep", dict(num_prompts=3, layers=(1,), prompt_dim=8), 3),
    "add": ("vpt-deep", dict(location="add"), 4),
    "e2vpt": ("e2vpt", dict(num_prompts=2, num_kv_prompts=3), 6),
    "e2vpt-shared": ("e2vpt", dict(num_prompts=6, num_kv_prompts=1, shared_kv=True), 2),
    "apt": ("apt", dict(num_prompts=5, rank=2), 3),
    "linear": ("linear", dict(), 7),
    "mlp": ("mlp", dict(hidden_layers=1), 2),
}


def make_run(backbone, method, options, classes, folder, seed):
    """A saved run with random (non-initial) tuned tensors, so every task differs."""
    torch.manual_seed(seed)
    model = PromptModel(backbone, config_for(method, **options), classes)
    with torch.no_grad():
        for param in model.tuned_parameters().values():
            param.add_(torch.randn_like(param) * 0.2)
    model.metadata["class_names"] = [f"{method}-{i}" for i in range(classes)]
    model.save_pretrained(folder)
    return folder


def make_pruned_run(backbone, folder):
    """A compact pruned E2VPT run: two of five tokens absent, two segments not stored."""
    from vptune.pruning import Masks, compact

    torch.manual_seed(99)
    model = PromptModel(backbone, config_for("e2vpt", num_prompts=5, num_kv_prompts=2), 3)
    with torch.no_grad():
        for param in model.tuned_parameters().values():
            param.add_(torch.randn_like(param) * 0.2)
    token = torch.tensor([True, False, True, True, False])
    segment = token[:, None].expand(-1, 4).clone()
    segment[0, 1] = segment[3, 3] = False
    small = compact(model, Masks(token, segment))
    assert small.config.num_prompts == 3 and small.config.kept_segments is not None
    small.metadata["class_names"] = ["a", "b", "c"]
    small.save_pretrained(folder)
    return folder


@pytest.fixture
def runs(tmp_path, arch):
    backbone = tiny_vit(arch)
    folders = {
        name: make_run(backbone, method, options, classes, tmp_path / name, seed)
        for seed, (name, (method, options, classes)) in enumerate(RUNS.items())
    }
    folders["pruned"] = make_pruned_run(backbone, tmp_path / "pruned")
    return backbone, folders


def images(n, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference(backbone, folder, x):
    with torch.no_grad():
        return PromptModel.from_pretrained(backbone, folder).eval()(x)


def test_mixed_batch_matches_each_tasks_own_model(runs):
    backbone, folders = runs
    model = MultiTaskModel(backbone, folders)
    names = list(folders)
    tasks = [names[j % len(names)] for j in range(2 * len(names) + 3)]  # every task, some three times
    x = images(len(tasks))
    out = model(x, tasks)
    for name in names:
        rows = [j for j, t in enumerate(tasks) if t == name]
        expected = reference(backbone, folders[name], x[rows])
        got = torch.stack([out[j] for j in rows])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"task {name}")


@pytest.mark.parametrize("arch", ["cls-token"])
def test_single_task_batches_and_cache(runs):
    backbone, folders = runs
    model = MultiTaskModel(backbone, folders)
    x = images(3)
    for name, folder in folders.items():
        first = torch.stack(model(x, name))
        torch.testing.assert_close(first, reference(backbone, folder, x), atol=1e-5, rtol=0, msg=f"task {name}")
        torch.testing.assert_close(torch.stack(model(x, name)), first, atol=0, rtol=0)  # from the cached bank


@pytest.mark.parametrize("arch", ["cls-token"])
def test_add_and_remove_tasks(runs):
    backbone, folders = runs
    model = MultiTaskModel(backbone, {"deep3": folders["deep3"]})
    x = images(4)
    model.add_task("apt", folders["apt"])
    assert model.task_names == ["apt", "deep3"]
    out = model(x, ["apt", "deep3", "apt", "deep3"])
    torch.testing.assert_close(torch.stack(out[::2]), reference(backbone, folders["apt"], x[::2]), atol=1e-5, rtol=0)
    assert model.task("apt").labels == ["apt-0", "apt-1", "apt-2"]
    with pytest.raises(ValueError, match="already loaded"):
        model.add_task("apt", folders["apt"])
    model.remove_task("deep3")
    assert model.task_names == ["apt"]
    with pytest.raises(KeyError, match="no task 'deep3'; loaded tasks: apt"):
        model(x, "deep3")
    model.add_task("deep3", folders["shallow4"])  # a name can be reused for another run
    torch.testing.assert_close(torch.stack(model(x, "deep3")), reference(backbone, folders["shallow4"], x), atol=1e-5, rtol=0)
    with pytest.raises(KeyError):
        model.remove_task("nope")


@pytest.mark.parametrize("arch", ["cls-token"])
def test_masked_prompts_through_key_bias(runs):
    """A pruning mask expressed as the method's prompt key bias is honoured per task."""
    backbone, folders = runs
    masked = PromptModel.from_pretrained(backbone, folders["e2vpt-shared"]).eval()
    x = images(4)
    with torch.no_grad():
        unmasked = masked(x[[0, 2, 3]])
    masked.method.set_masks(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]))
    model = MultiTaskModel(backbone, {"deep3": folders["deep3"]})
    model.add_model("pruned", masked)
    out = model(x, ["pruned", "deep3", "pruned", "pruned"])
    with torch.no_grad():
        expected = masked(x[[0, 2, 3]])
    assert (expected - unmasked).abs().max() > 1e-3, "the mask changed nothing: the comparison below proves nothing"
    torch.testing.assert_close(torch.stack([out[0], out[2], out[3]]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["cls-token"])
@pytest.mark.parametrize("method", ["bias", "lora", "full", "partial"])
def test_refuses_methods_that_tune_the_backbone(runs, tmp_path, method):
    backbone, _ = runs
    folder = make_run(backbone, method, {}, 3, tmp_path / method, seed=0)
    model = MultiTaskModel(backbone)
    with pytest.raises(ValueError, match=rf"\({method}\) cannot join a mixed-task batch: .*Serve it on its own"):
        model.add_task("x", folder)
    with pytest.raises(ValueError, match="cannot share this backbone's pass"):
        model.add_model("x", PromptModel(backbone, config_for(method), 3))


@pytest.mark.parametrize("arch", ["cls-token"])
def test_refuses_other_backbones_bad_names_and_folders(runs, tmp_path):
    backbone, folders = runs
    other = tiny_vit("cls-token", embed_dim=24)
    with pytest.raises(ValueError, match="was trained on .* mismatch in embed_dim 48 vs 24"):
        MultiTaskModel(other, {"deep3": folders["deep3"]})
    model = MultiTaskModel(backbone)
    for name in ["../etc", "a/b", "", ".hidden", "x" * 65, "a.b"]:
        with pytest.raises(ValueError, match="invalid task name"):
            model.add_task(name, folders["deep3"])
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        model.add_task("empty", tmp_path)
    with pytest.raises(ValueError, match="2 images but 1 task names"):
        model(images(2), ["deep3"])


def test_replace_is_atomic_and_a_held_task_keeps_its_run(tmp_path):
    backbone = tiny_vit()
    a = make_run(backbone, "vpt-deep", dict(num_prompts=3), 4, tmp_path / "a", 0)
    b = make_run(backbone, "apt", dict(num_prompts=2), 6, tmp_path / "b", 1)
    model = MultiTaskModel(backbone, {"train": a, "half": a})  # names nn.Module has as attributes
    x = images(4)
    held = model.task("train")  # as a server holds it from a request's arrival
    before = model(x, "train")
    with pytest.raises(ValueError, match="already loaded"):
        model.add_task("train", b)
    model.replace_task("train", b)
    assert model.task("train") is not held and model.task("train").method_name == "apt"
    out = model(x, [held, "train", held, "train"])
    torch.testing.assert_close(torch.stack([out[0], out[2]]), torch.stack([before[0], before[2]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([out[1], out[3]]), reference(backbone, b, x[[1, 3]]), atol=1e-5, rtol=0)
    model.remove_task("train")
    assert model.task_names == ["half"] and model(x[:1], [held])[0].shape == (4,)
    with pytest.raises(KeyError, match="no task 'train'"):
        model(x[:1], "train")


# --- the other families: Eva, open_clip's timm tower, Swin -------------------------------------

# Swin's mixed pass takes tasks whose prompts only give keys/values; the others get their own
# pass in the same batch (test_swin_tasks_whose_prompt_tokens_...).
SWIN_RUNS = ["deep3", "deep5-tokens", "e2vpt", "e2vpt-shared", "apt", "linear", "mlp"]


def family_backbone(family: str) -> torch.nn.Module:
    if family.startswith("swin-"):
        from test_swin import tiny_swin

        return tiny_swin(family.removeprefix("swin-"))
    if family == "open_clip-timm":
        pytest.importorskip("open_clip")
        from test_openclip import timm_tower_clip

        return timm_tower_clip()
    from test_families import tiny

    return tiny(family)


@pytest.mark.parametrize("family", ["eva02", "open_clip-timm", "swin-shifted", "swin-padded"])
def test_mixed_batch_matches_each_tasks_own_model_on_other_families(family, tmp_path):
    """As on the ViT: every task's rows of a mixed batch equal its own PromptModel's logits, on a
    rotary (EVA-02), a projected (open_clip's timm tower) and a windowed backbone (Swin: shifted
    windows, and windows timm pads). DINOv3 and BEiT: tests/test_families.py."""
    from vptune.backbones.family import family_of

    backbone = family_backbone(family)
    names = SWIN_RUNS if family.startswith("swin-") else [name for name in RUNS if family != "open_clip-timm" or name != "add"]
    folders = {name: make_run(backbone, *RUNS[name], tmp_path / name, seed) for seed, name in enumerate(names)}
    folders["pruned"] = make_pruned_run(backbone, tmp_path / "pruned")
    model = MultiTaskModel(backbone, folders)
    names = list(folders)
    tasks = [names[j % len(names)] for j in range(2 * len(names) + 1)]
    x = torch.randn(len(tasks), *family_of(backbone).input_size(), generator=torch.Generator().manual_seed(3))
    out = model(x, tasks)
    for name in names:
        rows = [j for j, t in enumerate(tasks) if t == name]
        expected = reference(backbone, folders[name], x[rows])
        torch.testing.assert_close(torch.stack([out[j] for j in rows]), expected, atol=1e-5, rtol=0, msg=f"task {name}")
    # The prompts matter: the same deep-prompt run with its prompts zeroed answers otherwise.
    blank = PromptModel.from_pretrained(backbone, folders["deep3"]).eval()
    with torch.no_grad():
        for prompts in (p for n, p in blank.tuned_parameters().items() if "prompt" in n):
            prompts.zero_()
        assert (blank(x[:2]) - torch.stack(model(x[:2], "deep3"))).abs().max() > 1e-3


# Swin runs whose prompt tokens go through blocks, or into the official code's final pool.
SWIN_OWN_PASS = {
    "shallow4": RUNS["shallow4"],
    "subset": RUNS["subset"],
    "late": RUNS["late"],
    "deep-pooled": ("vpt-deep", dict(num_prompts=3, swin={"pool": True}), 3),
    "shallow-official": ("vpt-shallow", dict(num_prompts=2, swin="official"), 4),  # tiled, window means, pooled
}


def test_swin_tasks_whose_prompt_tokens_go_through_blocks_get_their_own_pass_in_the_batch(tmp_path):
    """Such Swin runs join the same batches as the mixable ones: each is answered by its own
    PromptModel over its own rows (once per batch), the others still share the mixed pass, and
    every row equals its run's own model."""
    backbone = family_backbone("swin-shifted")
    runs = {**{name: RUNS[name] for name in ("deep3", "e2vpt", "apt", "linear")}, **SWIN_OWN_PASS}
    folders = {name: make_run(backbone, *run, tmp_path / name, seed) for seed, (name, run) in enumerate(runs.items())}
    model = MultiTaskModel(backbone, folders)
    assert {name for name in folders if model.task(name).group == OWN_PASS} == set(SWIN_OWN_PASS)
    calls: dict[str, list[int]] = {}
    for name in folders:  # a run's own model is called only for an own-pass task
        model.task(name).model.register_forward_pre_hook(lambda _, args, name=name: calls.setdefault(name, []).append(len(args[0])))
    names = list(folders)
    tasks = [names[j % len(names)] for j in range(2 * len(names) + 3)]
    x = images(len(tasks))
    out = model(x, tasks)
    assert calls == {name: [tasks.count(name)] for name in SWIN_OWN_PASS}
    for name in names:
        rows = [j for j, t in enumerate(tasks) if t == name]
        expected = reference(backbone, folders[name], x[rows])
        torch.testing.assert_close(torch.stack([out[j] for j in rows]), expected, atol=1e-5, rtol=0, msg=f"task {name}")
    calls.clear()  # a batch of own-pass tasks only: no mixed pass at all
    alone = model(x[:3], ["shallow4", "late", "shallow4"])
    assert calls == {"shallow4": [2], "late": [1]}
    torch.testing.assert_close(torch.stack(alone[::2]), reference(backbone, folders["shallow4"], x[[0, 2]]), atol=1e-5, rtol=0)
