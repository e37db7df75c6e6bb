"""Heads from CLIP's text tower on tiny random CLIPs with honest weights: the untrained text head
is open_clip's zero-shot classifier, CoOp's class features equal open_clip's own text encoder
on literal token sequences, only the intended tensors train, runs round-trip, bad input is
refused clearly, few-shot sampling, and ``vptune zeroshot`` writes a servable run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from test_openclip import NUM_CLASSES, images_of, tiny_clip

import vptune
from vptune.heads import CoOpHead, HeadConfig, TextHead, class_names_for

open_clip = pytest.importorskip("open_clip")

NAMES = ("cat", "dog", "bird", "shoe", "bag")
TEMPLATES = ("a photo of a {}.", "art of the {}.", "itap of a {}.")


def test_text_head_is_open_clip_zero_shot_classifier():
    clip = tiny_clip()
    model = vptune.prompt_model(clip, vptune.LinearConfig(), NUM_CLASSES, HeadConfig("text", NAMES, TEMPLATES)).eval()
    assert isinstance(model.head, TextHead)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=12)
    images = images_of()
    with torch.no_grad():
        by_hand = torch.stack([
            F.normalize(F.normalize(clip.encode_text(tokenizer([t.format(c) for t in TEMPLATES])), dim=-1).mean(0), dim=0)
            for c in NAMES
        ])  # C, D
        theirs = open_clip.build_zero_shot_classifier(clip, tokenizer, NAMES, TEMPLATES)  # D, C
        torch.testing.assert_close(by_hand, theirs.T, atol=1e-6, rtol=1e-6)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ theirs
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    assert model.num_tuned_parameters() == NUM_CLASSES * 16  # the class rows, no bias


def test_text_head_round_trip_and_training(tmp_path):
    clip = tiny_clip()
    model = vptune.prompt_model(clip, vptune.VPTConfig(num_prompts=2), NUM_CLASSES, HeadConfig("text", NAMES, TEMPLATES))
    with torch.no_grad():
        model.head.weight.add_(0.1 * torch.randn_like(model.head.weight))  # as after training
    model.eval().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head"]["kind"] == "text" and config["head"]["class_names"] == list(NAMES)
    back = vptune.PromptModel.from_pretrained(clip, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(images_of()), model(images_of()), atol=0, rtol=0)


def literal_text_features(clip, ctx: torch.Tensor, name: str) -> torch.Tensor:
    """CoOp's prompt "[SOS] ctx_1..ctx_M name . [EOS]" through open_clip's own encode_text: the
    context vectors are written into the embedding rows of M token ids that the name does not use."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=12)
    name_tokens = tokenizer([f"{name}."])[0]
    length = int((name_tokens != 0).sum())  # SOS name . EOS
    spare = torch.arange(1000, 1000 + ctx.shape[0])
    tokens = torch.zeros(1, 12, dtype=torch.long)
    tokens[0, 0] = name_tokens[0]
    tokens[0, 1 : 1 + len(spare)] = spare
    tokens[0, 1 + len(spare) : len(spare) + length] = name_tokens[1:length]
    clip = copy.deepcopy(clip)
    with torch.no_grad():
        clip.token_embedding.weight[spare] = ctx
        return F.normalize(clip.encode_text(tokens), dim=-1)[0]


@pytest.mark.parametrize("class_specific", [False, True], ids=["unified", "class-specific"])
def test_coop_class_features_equal_open_clip_encode_text(class_specific):
    clip = tiny_clip()
    model = vptune.prompt_model(clip, vptune.config_for("coop", n_ctx=3, class_specific=class_specific), NUM_CLASSES,
                                HeadConfig(class_names=NAMES))
    head = model.head
    assert isinstance(head, CoOpHead) and head.ctx.shape == ((NUM_CLASSES, 3, 32) if class_specific else (3, 32))
    with torch.no_grad():
        head.ctx.normal_(std=0.5)
        ours = head.class_features()
        for c, name in enumerate(NAMES):
            ctx = head.ctx[c] if class_specific else head.ctx
            torch.testing.assert_close(ours[c], literal_text_features(clip, ctx, name), atol=1e-5, rtol=1e-5)


def test_coop_ctx_init_equals_hand_written_prompt():
    """Context initialised from "a photo of a" gives exactly the text features of "a photo of a NAME."."""
    clip = tiny_clip()
    model = vptune.prompt_model(clip, vptune.config_for("coop", n_ctx=4, ctx_init="a photo of a"), NUM_CLASSES,
                                HeadConfig(class_names=NAMES))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=12)
    with torch.no_grad():
        expected = F.normalize(clip.encode_text(tokenizer([f"a photo of a {n}." for n in NAMES])), dim=-1)
        torch.testing.assert_close(model.head.class_features(), expected, atol=1e-5, rtol=1e-5)


def test_coop_trains_only_its_context_and_combines_with_image_methods(tmp_path):
    clip = tiny_clip()
    coop = vptune.prompt_model(clip, vptune.config_for("coop", n_ctx=3), NUM_CLASSES, HeadConfig(class_names=NAMES))
    assert set(coop.tuned_parameters()) == {"head.ctx"} and coop.num_tuned_parameters() == 3 * 32
    both = vptune.prompt_model(clip, vptune.VPTConfig(num_prompts=2), NUM_CLASSES,
                               HeadConfig("coop", NAMES, n_ctx=3))  # --text-prompts coop
    assert set(both.tuned_parameters()) == {"method.prompt_embeddings", "head.ctx"}
    both.train()
    F.cross_entropy(both(images_of()), torch.arange(3)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in both.tuned_parameters().values())
    assert all(p.grad is None for p in clip.parameters())  # the text tower stays frozen
    both.eval().save_pretrained(tmp_path)
    back = vptune.PromptModel.from_pretrained(clip, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(images_of()), both(images_of()), atol=0, rtol=0)
        first = both(images_of())  # cached class weights: the same, and refreshed when ctx changes
        torch.testing.assert_close(both(images_of()), first, atol=0, rtol=0)
        both.head.ctx.add_(torch.randn(both.head.ctx.shape, generator=torch.Generator().manual_seed(3)))
        assert (both(images_of()) - first).abs().max() > 1e-4


def test_bad_input_is_refused_clearly(tmp_path):
    vit = tiny_vit()
    with pytest.raises(ValueError, match="needs a backbone with a text tower.*pass --head random"):
        vptune.prompt_model(vit, vptune.LinearConfig(), 3, HeadConfig("text", ("a", "b", "c")))
    with pytest.raises(ValueError, match="coop learns the prompt of a text tower"):
        vptune.prompt_model(vit, vptune.config_for("coop"), 3)
    with pytest.raises(ValueError, match="needs 5 class names, got 2"):
        vptune.prompt_model(tiny_clip(), vptune.LinearConfig(), 5, HeadConfig("text", ("a", "b")))
    with pytest.raises(ValueError, match="mlp method needs --head random"):
        vptune.prompt_model(tiny_clip(), vptune.MLPConfig(hidden_layers=1), 5, HeadConfig("text", NAMES))
    with pytest.raises(ValueError, match=r"numeric labels: they are read from .*task/classnames.txt"):
        class_names_for(f"vtab1k:{tmp_path}/task", ["0", "1"])
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "classnames.txt").write_text("red car\nblue car\n")
    assert class_names_for(f"vtab1k:{tmp_path}/task", ["0", "1"]) == ["red car", "blue car"]
    assert class_names_for("mini:count", ["1", "2", "3", "4"]) == ["1 item", "2 items", "3 items", "4 items"]
    from vptune.backbones.family import family_of
    from vptune.heads import head_for_run

    family = family_of(tiny_clip())
    assert head_for_run(None, vptune.LinearConfig(), family, "mini:count", ["1", "2", "3", "4"]).kind == "text"
    assert head_for_run(None, vptune.MLPConfig(), family, "mini:count", ["1", "2", "3", "4"]).kind == "random"
    assert head_for_run(None, vptune.LinearConfig(), family_of(vit), "mini:count", ["1", "2", "3", "4"]).kind == "random"
    with pytest.raises(ValueError, match="method coop trains a text head; drop --head random"):
        head_for_run("random", vptune.config_for("coop"), family, "mini:count", ["1", "2", "3", "4"])


def test_few_shot_sampling():
    import numpy as np

    from vptune.data.images import ArrayImages
    from vptune.data.shots import few_shot

    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    data = ArrayImages(np.zeros((len(labels), 4, 4, 3), dtype=np.uint8), labels, lambda x: x)
    with pytest.warns(UserWarning, match="class 1 has 3 training images, fewer than --shots 4: using all of them"):
        subset, notes = few_shot(data, 4, seed=1, num_classes=3)
    picked = labels[subset.indices]
    assert np.bincount(picked).tolist() == [4, 3, 4]
    assert notes == ["class 1 has 3 training images, fewer than --shots 4: using all of them"]
    assert few_shot(data, 3, seed=1, num_classes=3)[0].indices == few_shot(data, 3, seed=1, num_classes=3)[0].indices
    assert few_shot(data, 3, seed=1, num_classes=3)[0].indices != few_shot(data, 3, seed=2, num_classes=3)[0].indices


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """Honest random weights of the bundled CLIP's architecture (the shipped ones may not exist yet)."""
    from safetensors.torch import save_file

    from honest import honest_
    from vptune.backbones.clip_bundled import build_bundled_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in honest_(build_bundled_clip()).state_dict().items()}, str(path))
    return path


def test_cli_zeroshot_train_and_serve(clip_weights, tmp_path):
    """vptune zeroshot on a mini task writes a run whose metrics are its measured test top-1;
    --classes writes one from names alone; both serve next to a CoOp + VPT-deep run trained
    with --shots through vptune train, each task equal to its own model."""
    from typer.testing import CliRunner

    from vptune.backbones import load_backbone
    from vptune.cli import app
    from vptune.serve import MultiTaskModel
    from vptune.train import evaluate_run, load_run

    runner = CliRunner()
    common = ["--backbone", "vptune_clip_fmnist", "--weights", str(clip_weights)]
    result = runner.invoke(app, ["zeroshot", *common, "--data", "mini:count", "--out", str(tmp_path / "zs")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert metrics["class_texts"] == ["1 item", "2 items", "3 items", "4 items"] and metrics["templates"] == ["{}"]
    model = load_run(tmp_path / "zs")
    assert evaluate_run(model, "mini:count")["top1"] == pytest.approx(metrics["test_top1"])
    result = runner.invoke(app, ["zeroshot", *common, "--classes", "a bag,a coat", "--out", str(tmp_path / "names")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [
        "train", *common, "--method", "vpt-deep", "--num-prompts", "2", "--text-prompts", "coop", "--n-ctx", "2",
        "--data", "mini:count", "--shots", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
        "--out", str(tmp_path / "both"),
    ])
    assert result.exit_code == 0, result.output
    trained = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert trained["train_images"] == 8 and trained["head"] == "coop"
    result = runner.invoke(app, ["train", *common, "--method", "linear", "--head", "text", "--data",
                                 f"vtab1k:{tmp_path}/none", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 1
    backbone = load_backbone("vptune_clip_fmnist", weights=clip_weights)
    folders = {name: tmp_path / name for name in ("zs", "names", "both")}
    serving = MultiTaskModel(backbone, folders)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, folder in folders.items():
        with torch.no_grad():
            expected = vptune.PromptModel.from_pretrained(backbone, folder).eval()(x)
        torch.testing.assert_close(torch.stack(serving(x, name)), expected, atol=1e-5, rtol=0)


def test_fewshot_grid_on_ray_resumes_and_reports(clip_weights, tmp_path):
    """vptune fewshot: zero-shot once, linear from the text head and CoOp per shots x seed, on a
    local Ray; the table holds every run's test top-1 as written in its folder; a rerun submits nothing."""
    from typer.testing import CliRunner

    from vptune.cli import app

    pytest.importorskip("ray")
    args = ["fewshot", "--backbone", "vptune_clip_fmnist", "--weights", str(clip_weights), "--data", "mini:count",
            "--methods", "zeroshot,linear,coop@0.01", "--shots", "1,2", "--seeds", "1", "--epochs", "1",
            "--batch-size", "4", "--num-cpus", "1", "--device", "cpu", "--out", str(tmp_path / "grid")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "grid" / "fewshot.json").read_text())
    assert summary["missing"] == [] and (tmp_path / "grid" / "fewshot.png").is_file()
    coop = json.loads((tmp_path / "grid" / "count" / "coop" / "shots2" / "seed1" / "metrics.json").read_text())
    assert coop["train_images"] == 8 and coop["train_config"]["lr"] == 0.01 and coop["tuned_params"] == 16 * 128
    assert summary["results"]["count"]["coop"]["2"]["test_top1"] == [coop["test_top1"]]
    table = (tmp_path / "grid" / "fewshot.md").read_text()
    assert "| coop | 2,048 |" in table and "| zeroshot | 0 |" in table
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "5 runs, 5 already done" in again.output


@pytest.mark.skipif(not __import__("vptune.backbones.clip_bundled", fromlist=["x"]).bundled_clip_weights_path().is_file(),
                    reason="the bundled CLIP's weights are not created yet (vptune pretrain --arch clip)")
def test_bundled_clip_reproduces_its_model_card(tmp_path):
    """vptune zeroshot on the shipped vptune_clip_fmnist gives the count figure of its model card."""
    import re

    from typer.testing import CliRunner

    from vptune.backbones.clip_bundled import bundled_clip_weights_path
    from vptune.cli import app

    card = (bundled_clip_weights_path().parent / "CLIP_MODEL_CARD.md").read_text()
    stated = float(re.search(r"\| count \| ([\d.]+) \|", card).group(1))
    result = CliRunner().invoke(app, ["zeroshot", "--data", "mini:count", "--out", str(tmp_path / "zs"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "zs" / "metrics.json").read_text())["test_top1"]
    assert measured == pytest.approx(stated, abs=0.5)
