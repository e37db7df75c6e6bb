"""The bundled models' figures files (``backbones/figures.py``): a short pretraining writes every
figure its model card prints into its figures JSON, re-measuring the weights gives the run's own
evaluation figures back and keeps the run's record, and each committed model card states the
figures of the JSON committed in docs/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vptune.backbones.figures import ARCHES, evaluate_command, figures_path, remeasure, write_figures

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "vptune" / "weights"
CARDS = {"vit": "MODEL_CARD.md", "swin": "MODEL_CARD_swin.md", "clip": "CLIP_MODEL_CARD.md", "vilt": "VILT_MODEL_CARD.md",
         "meter": "METER_MODEL_CARD.md", "sd": "SD_MODEL_CARD.md"}


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def undated(card: str) -> list[str]:
    """A card's lines but its date (a run and a re-render may fall in different minutes)."""
    return [re.sub(r"Written \d{4}-\d\d-\d\d \d\d:\d\d UTC", "Written -", line) for line in card.splitlines()]


def read(docs: Path, arch: str) -> dict:
    return json.loads(figures_path(docs, arch).read_text())


def test_write_figures_keeps_the_runs_record_when_re_measured(tmp_path):
    write_figures(tmp_path, "clip", "m", {"zero_shot": {"count": 50.0}}, "run", {"wall_time_min": 3.0, "history": [[10, 0.5]]})
    write_figures(tmp_path, "clip", "m", {"zero_shot": {"count": 51.0}}, "again")
    record = read(tmp_path, "clip")
    assert record["evaluation"] == {"zero_shot": {"count": 51.0}} and record["evaluated"]["command"] == "again"
    assert record["training"] == {"wall_time_min": 3.0, "history": [[10, 0.5]]}
    assert figures_path(tmp_path, "clip").name == "clip-fmnist-figures.json"
    with pytest.raises(ValueError, match="unknown --arch 'resnet'"):
        remeasure("resnet", tmp_path, tmp_path)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_a_short_vit_or_swin_pretraining_writes_what_its_card_prints(arch, tmp_path, monkeypatch, keep_threads):
    from vptune.backbones import pretrain
    from vptune.backbones.bundled import ARCHES as NAMES

    rng = np.random.default_rng(0)
    tiny = lambda split: (rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), np.arange(64) % 10)  # noqa: E731
    monkeypatch.setattr(pretrain, "load_fashion_mnist", tiny)
    out, docs = tmp_path / "out", tmp_path / "docs"
    results = pretrain.pretrain(out, epochs=1, batch_size=32, warmup_steps=1, threads=1, work_dir=tmp_path / "work",
                                arch=arch, docs=docs)
    record = read(docs, arch)
    training = record["training"]
    assert record["model"] == NAMES[arch] and training["steps"] == 2 and training["recipe"]["epochs"] == 1
    assert len(training["history"]) == 1 and training["history"][0][0] == 1  # [epoch, loss, train accuracy]
    assert training["test_accuracy"] == results["test_accuracy"]
    # the card rendered from the JSON alone is the card the run wrote: the JSON holds every figure it prints
    again = pretrain.model_card(training["recipe"], {**record["evaluation"], **training}, training["command"],
                                name=NAMES[arch], docs=docs, out=out)
    card = (out / pretrain.BUNDLED[NAMES[arch]].card).read_text()
    assert undated(again) == undated(card)
    assert evaluate_command(arch, out, docs) in card and str(figures_path(docs, arch)) in card
    # re-measuring the weights gives the same evaluation figures and keeps the run's record
    assert remeasure(arch, out, docs) == record["evaluation"]
    remeasured = read(docs, arch)
    assert remeasured["training"] == training and remeasured["evaluated"]["command"] == evaluate_command(arch, out, docs)


def test_re_measuring_a_vit_without_a_run_record_takes_the_accuracy_its_file_records(tmp_path, keep_threads):
    from safetensors.torch import load_file, save_file

    from vptune.backbones.bundled import bundled_weights_path

    if not bundled_weights_path().is_file():
        pytest.skip("the bundled ViT's weights are not built here")
    (tmp_path / "out").mkdir()
    state = load_file(str(bundled_weights_path()))
    save_file(state, str(tmp_path / "out" / "vptune_vit_fmnist.safetensors"),
              metadata={"architecture": "vptune_vit_fmnist", "fashion_mnist_test_accuracy": "0.5432"})
    from typer.testing import CliRunner

    from vptune.cli import app

    args = ["pretrain", "--arch", "vit", "--evaluate-only", "--out", str(tmp_path / "out"), "--docs", str(tmp_path), "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = read(tmp_path, "vit")
    assert record["training"]["test_accuracy"] == 0.5432 and record["evaluation"]["parameters"] == sum(v.numel() for v in state.values())
    result = CliRunner().invoke(app, [*args[:2], "resnet", *args[3:]])
    assert result.exit_code != 0 and "unknown --arch 'resnet'" in result.output


@pytest.mark.parametrize("arch", ["vilt", "meter"])
def test_a_short_vilt_or_meter_pretraining_writes_what_its_card_prints_and_re_measures_the_same(
        arch, tmp_path, monkeypatch, keep_threads):
    monkeypatch.setenv("VPTUNE_CACHE", str(tmp_path / "cache"))
    import importlib

    from vptune.backbones.bundled import bundled_weights_path
    from vptune.backbones.clip_bundled import bundled_clip_weights_path

    if not (bundled_weights_path().is_file() and bundled_clip_weights_path().is_file()):
        pytest.skip("the bundled ViT's and CLIP's weights (the ViLT's and METER's starts) are not built here")
    module = importlib.import_module(f"vptune.backbones.pretrain_{arch}")
    out, docs = tmp_path / "out", tmp_path / "docs"
    getattr(module, f"pretrain_{arch}")(out, steps=2, batch_size=4, corpus_size=16, warmup_steps=1, work_dir=tmp_path / "work",
                                        log_every=1, checkpoint_every=1, val_pairs=8, docs=docs)
    record = read(docs, arch)
    training = record["training"]
    assert training["steps"] == 2 and [step for step, _ in training["history"]] == [1, 2]
    assert record["evaluation"]["pretrain_val"]["itm_pairs"] == 16
    again = module.model_card(training["recipe"], {**record["evaluation"], **training}, training["command"],
                              evaluate_command(arch, out, docs), figures_path(docs, arch))
    assert undated(again) == undated((out / module.CARD).read_text())
    # the shipped file read back (the model and both pretraining heads; ViLT's decoder tied to its word
    # embedding) scores exactly as the run's model did, and a run's initialisation is drawn again exactly
    assert getattr(module, f"remeasure_{arch}")(out, docs, val_pairs=8) == record["evaluation"]
    assert read(docs, arch)["training"] == training


@pytest.mark.parametrize("arch", ["vilt", "meter"])
def test_the_pretrainer_file_reads_back_whole(arch, tmp_path):
    """What re-measuring reads: every tensor of the run's pretrainer (model and both heads) comes back
    from the shipped file; ViLT's MLM decoder stays tied to its word embedding."""
    import importlib

    from safetensors.torch import save_file

    from honest import honest_
    from vptune.backbones.bundled import bundled_weights_path
    from vptune.backbones.clip_bundled import bundled_clip_weights_path
    from vptune.backbones.meter_bundled import ENCODERS
    from vptune.data.tokenizer import WordTokenizer

    if not (bundled_weights_path().is_file() and bundled_clip_weights_path().is_file()):
        pytest.skip("the bundled ViT's and CLIP's weights (the ViLT's and METER's starts) are not built here")
    module = importlib.import_module(f"vptune.backbones.pretrain_{arch}")
    vocab = len(WordTokenizer.from_file())
    model = honest_(module.initial_pretrainer(vocab, seed=3), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # unlike any fresh draw
    save_file(module.pretrainer_state(model), str(tmp_path / "w.safetensors"))
    loaded = module.load_pretrainer(tmp_path / "w.safetensors", vocab)
    towers = tuple(f"meter.{prefix}" for prefix in ENCODERS)  # METER's frozen towers load from the CLIP's own file
    for key, value in model.state_dict().items():
        if not key.startswith(towers):
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    if arch == "vilt":
        assert loaded.mlm.mlm_score.decoder.weight is loaded.vilt.embeddings.text_embeddings.word_embeddings.weight


def test_a_short_clip_pretraining_writes_what_its_card_prints(tmp_path, monkeypatch, keep_threads):
    """The zero-shot evaluation itself (the mini tasks' full test splits) is too slow for a test:
    here it is replaced by a stand-in that reads the model, so the wiring and the keys are checked."""
    monkeypatch.setenv("VPTUNE_CACHE", str(tmp_path / "cache"))
    from vptune.backbones import pretrain_clip
    from vptune.backbones.bundled import bundled_weights_path

    if not bundled_weights_path().is_file():
        pytest.skip("the bundled ViT's weights (the CLIP's initialisation) are not built here")
    monkeypatch.setattr(pretrain_clip, "zero_shot", lambda model: {"count": float(model.logit_scale.item()), "kinds": 10.0})
    out, docs = tmp_path / "out", tmp_path / "docs"
    pretrain_clip.pretrain_clip(out, steps=2, batch_size=4, warmup_steps=1, work_dir=tmp_path / "work", log_every=1,
                                checkpoint_every=1, docs=docs)
    record = read(docs, "clip")
    training = record["training"]
    assert [step for step, _ in training["history"]] == [1, 2] and training["resumed_at"] == 0
    again = pretrain_clip.model_card(training["recipe"], {**record["evaluation"], **training}, training["command"],
                                     evaluate_command("clip", out, docs), figures_path(docs, "clip"))
    assert undated(again) == undated((out / "CLIP_MODEL_CARD.md").read_text())
    assert pretrain_clip.remeasure_clip(out, docs) == record["evaluation"]  # the shipped file read back


def test_a_short_sd_pretraining_writes_what_its_card_prints(tmp_path, monkeypatch, keep_threads):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("VPTUNE_CACHE", str(tmp_path / "cache"))
    from vptune.backbones.clip_bundled import bundled_clip_weights_path
    from vptune.diffusion import pretrain_sd

    if not bundled_clip_weights_path().is_file():
        pytest.skip("the bundled CLIP's weights (the text encoder and the samples' judge) are not built here")
    out, docs = tmp_path / "out", tmp_path / "docs"
    pretrain_sd.pretrain_sd(out, docs=docs, steps=20, batch_size=4, warmup_steps=1, work_dir=tmp_path / "work", sample_steps=2)
    record = read(docs, "sd")
    training = record["training"]
    assert training["steps"] == 20 and [step for step, _ in training["history"]] == [20]  # logged every 20 steps
    assert training["final_loss"] == training["history"][-1][1]
    figures = {**record["evaluation"], **{k: v for k, v in training.items() if k not in ("command", "recipe", "history")}}
    again = pretrain_sd.model_card(training["recipe"], figures, training["command"], 2, "ddpm", 3.0,
                                   evaluate_command("sd", out, docs), figures_path(docs, "sd"))
    assert undated(again) == undated((out / pretrain_sd.CARD).read_text())
    assert (docs / pretrain_sd.SAMPLES_PNG).is_file() and (docs / pretrain_sd.LOSS_PNG).is_file()
    # the shipped EMA UNet read back gives the same checks (all but the timing)
    evaluation = pretrain_sd.remeasure_sd(out, docs, sample_steps=2)
    timing = lambda figures: {k: v for k, v in figures.items() if k != "sample_s_per_image"}  # noqa: E731
    assert timing(evaluation) == timing(record["evaluation"]) and read(docs, "sd")["training"] == training


def committed_lines(arch: str, record: dict) -> list[str]:
    """What the committed model card of ``arch`` must say, from its committed figures JSON."""
    evaluation = record["evaluation"]
    lines = [evaluate_command(arch, Path("src/vptune/weights"), Path("docs")), f"docs/{arch}-fmnist-figures.json"]
    if arch in ("vit", "swin"):
        return lines + [f"{evaluation['parameters']:,} parameters", f"{evaluation['weights_mb']:.1f} MB",
                        f"**{record['training']['test_accuracy'] * 100:.2f}%**"]
    if arch == "clip":
        return lines + [f"| {task} | {value:.1f} |" for task, value in evaluation["zero_shot"].items()] + [
            f"{evaluation['parameters']:,} parameters", f"{evaluation['weights_mb']:.1f} MB"]
    if arch in ("vilt", "meter"):
        from vptune.backbones.pretrain_vilt import itm_mlm_rows

        after = evaluation["pretrain_val"]
        return lines + itm_mlm_rows(evaluation).splitlines() + [
            f"{after['itm_pairs']} ITM pairs, {after['mlm_tokens']} masked words", f"{evaluation['parameters']:,} parameters",
            f"{evaluation['weights_mb']:.1f} MB"]
    checks = dict(evaluation["checks"])
    area = checks.pop("bright area")
    return lines + [f"| {name} | {c['generated']:.1f} | {c['real']:.1f} | {c['chance']:.1f} | {c['distinct']:.0f} |"
                    for name, c in checks.items()] + [
        f"| {name} | {value:.4f} |" for name, value in evaluation["conditioning_loss"].items()] + [
        f"small items {area['small item, generated']:.1f} generated, {area['small item, real']:.1f} real",
        f"{evaluation['parameters']:,} parameters", f"{evaluation['sample_s_per_image']:.2f} s per image"]


@pytest.mark.parametrize("arch", ARCHES)
def test_each_committed_model_card_states_the_figures_of_its_committed_json(arch):
    path = figures_path(ROOT / "docs", arch)
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    record = json.loads(path.read_text())
    assert record["evaluated"]["command"] == evaluate_command(arch, Path("src/vptune/weights"), Path("docs"))
    card = " ".join((WEIGHTS / CARDS[arch]).read_text().split())  # the card's line breaks do not matter
    missing = [line for line in committed_lines(arch, record) if " ".join(line.split()) not in card]
    assert not missing, f"{CARDS[arch]} does not state {missing}"


def test_a_resumed_runs_throughput_counts_every_step_over_every_sessions_time():
    """``train_steps`` returns the training time summed over the sessions of a resumed run, so the
    rate is all steps over it (the CLIP, ViLT and METER records once counted only this session's
    steps, halving the rate of a run resumed half way)."""
    from vptune.backbones.figures import training_record

    record = training_record("c", {"steps": 10, "batch_size": 4}, start=5, elapsed=20.0, history=[[10, 0.5]])
    assert record["pairs_per_s"] == 2.0 and record["resumed_at"] == 5 and record["steps"] == 10
    assert training_record("c", {"steps": 10, "batch_size": 4}, 0, 20.0, [], unit="canvases")["canvases_per_s"] == 2.0
