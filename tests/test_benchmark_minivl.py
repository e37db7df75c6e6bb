"""`vptune benchmark minivl` on a tiny random ViLT and small subsets of the minivl tasks: the lr
chosen on each task's own val figure, the winner retrained on train+val, the backbone's block of
the results file and the rows beside it; subsets of the minivl specs; the report's pieces."""

import json

import pytest
import torch
from typer.testing import CliRunner

from honest import honest_
from vptune.cli import app, rows_json_path
from vptune.compare import VL_RECIPES, val_key, val_score
from vptune.data.images import DataError
from vptune.methods import config_for
from vptune.report import (
    PAPER_VILT, minivl_claims, minivl_figures, minivl_markers, results_minivl_block, minivl_test_sizes, write_results_minivl,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vilt_folder(tmp_path_factory):
    """A tiny ViLT saved as transformers does, reading the word tokenizer's 48 tokens and 32 px canvases."""
    config = transformers.ViltConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        max_image_length=-1, vocab_size=120, max_position_embeddings=48, modality_type_vocab_size=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vilt") / "vilt"
    honest_(transformers.ViltModel(config)).save_pretrained(folder)
    return folder


def test_every_vl_recipe_builds_and_selection_reads_each_tasks_own_val_figure():
    for recipe in VL_RECIPES.values():
        assert config_for(recipe.method, **recipe.options).method_name() == recipe.method
    assert val_key({"task": "vqa"}) == "val_vqa_score" and val_key({"task": "retrieval"}) == "val_r1_mean"
    assert val_key({"task": "nlvr"}) == "val_top1" == val_key({})  # classification runs record no task
    assert val_score({"task": "vqa", "val_vqa_score": 40.0, "val_top1": None}) == 40.0


def test_minivl_specs_take_subsets_and_refuse_bad_options():
    from vptune.data import build_vl_data

    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    bundle = build_vl_data("minivl:retrieval?train=12&val=5&test=7&negatives=2", config)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (12, 5, 7)
    assert bundle.train[0]["image"].shape[0] == 3  # its own image and two others
    assert len(bundle.test.images_dataset()) == 7 and bundle.test.text_image.tolist() == list(range(7))
    full = build_vl_data("minivl:vqa", config)
    subset = build_vl_data("minivl:vqa?test=9", config)
    assert len(subset.test) == 9 and len(subset.train) == len(full.train)
    assert torch.equal(subset.test.input_ids, full.test.input_ids[:9])  # the first nine, in order
    with pytest.raises(DataError, match=r"unknown option 'negatives'; minivl:vqa takes train, val, test"):
        build_vl_data("minivl:vqa?negatives=2", config)
    with pytest.raises(DataError, match=r"test='0' must be a whole number from 1 to 1000"):
        build_vl_data("minivl:nlvr?test=0", config)


def test_benchmark_minivl_command_end_to_end(vilt_folder, tmp_path):
    out, results = tmp_path / "bench", tmp_path / "results-minivl.md"
    args = ["benchmark", "minivl", "--backbone", "hf:tiny", "--weights", vilt_folder, "--methods", "linear,apt",
            "--tasks", "vqa,retrieval", "--lrs", "1,3", "--epochs", 1, "--train", 40, "--val", 24, "--test", 30,
            "--retrieval-val", 6, "--retrieval-test", 8, "--negatives", 2, "--out", out, "--results", results, "--threads", 1]
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    for task, spec, key in (("vqa", "minivl:vqa?train=40&val=24&test=30", "test_vqa_score"),
                            ("retrieval", "minivl:retrieval?train=40&val=6&test=8&negatives=2", "test_ir_r1")):
        for method in ("linear", "apt"):
            base = out / "runs" / task / method
            lr = VL_RECIPES[method].train.lr
            searched = {f: json.loads((base / f"search-lr{lr * f:g}" / "metrics.json").read_text()) for f in (1, 3)}
            scores = {f: m[f"val_{'vqa_score' if task == 'vqa' else 'r1_mean'}"] for f, m in searched.items()}
            best = max(scores, key=lambda f: (scores[f], -f))
            final = json.loads((base / f"final-lr{lr * best:g}" / "metrics.json").read_text())
            assert final["final"] and final["data"] == spec and final["task"] == task
            assert {key, "tuned_params", "extra_gflops"} <= set(final)
            if task == "retrieval":
                assert {"test_ir_r1", "test_tr_r1"} <= set(final)
    rows = json.loads(rows_json_path(results, "hf:tiny", "vptune_vilt_fmnist").read_text())  # each backbone its own rows file
    assert [(r["task"], r["method"]) for r in rows] == [("vqa", "linear"), ("vqa", "apt"), ("retrieval", "linear"), ("retrieval", "apt")]
    text = results.read_text()
    begin, end = minivl_markers("hf:tiny")
    assert text.startswith("# Results on the vision-language mini benchmark") and text.count(begin) == text.count(end) == 1
    apt_vqa = next(r for r in rows if r["task"] == "vqa" and r["method"] == "apt")
    line = next(line for line in text.splitlines() if line.startswith("| apt |"))
    assert f"{apt_vqa['test_vqa_score']:.1f}" in line and "| 72.93 |" in line  # ours beside the paper's average
    stamp = (out / "runs" / "vqa" / "apt").stat().st_mtime_ns
    again = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)  # resumes: everything is read back
    assert again.exit_code == 0, again.output
    assert json.loads(rows_json_path(results, "hf:tiny", "vptune_vilt_fmnist").read_text()) == rows
    assert (out / "runs" / "vqa" / "apt").stat().st_mtime_ns == stamp


def rows_of(figures):
    """Final-run rows with the given {method: (vqa, nlvr, ir, tr, extra GFLOPs)}."""
    rows = []
    for method, (vqa, nlvr, ir, tr, gflops) in figures.items():
        common = {"method": method, "lr": 1e-3, "tuned_params": 1000, "extra_gflops": gflops, "wall_time_s": 1.0,
                  "error": None, "val_top1": None, "test_top1": None}
        rows += [{**common, "task": "vqa", "test_vqa_score": vqa, "val_vqa_score": vqa},
                 {**common, "task": "nlvr", "test_top1": nlvr, "val_top1": nlvr},
                 {**common, "task": "retrieval", "test_ir_r1": ir, "test_tr_r1": tr, "val_r1_mean": (ir + tr) / 2}]
    return rows


def test_the_claims_are_judged_from_the_rows():
    rows = rows_of({"linear": (30, 50, 10, 10, 0.0), "full": (60, 70, 40, 40, 0.0), "vpt-deep": (50, 60, 30, 30, 0.02),
                    "apt": (55, 62, 31, 33, 0.005), "lora": (62, 65, 37, 37, 0.0)})
    figures = minivl_figures(rows)
    assert figures["apt"]["avg"] == pytest.approx((55 + 62 + 31 + 33) / 4)
    claims = {line.split(" | ")[0].lstrip("| "): line for line in minivl_claims(rows).splitlines()[2:]}
    assert claims["APT is more accurate than deep prompts"].endswith("| holds |")
    assert "(25.0%) | holds |" in claims["APT adds 17.7% of deep prompts' extra GFLOPs"]
    assert claims["APT comes within a point of full fine-tuning"].endswith("| does not hold |")
    assert claims["APT is more accurate than LoRA"].endswith("| does not hold |")
    # The same ordering with figures a point apart: no verdict on 60 test examples per task, one on 100,000.
    close = rows_of({"linear": (30, 50, 10, 10, 0.0), "apt": (31, 51, 11, 11, 0.005)})
    small = {line.split(" | ")[0].lstrip("| "): line for line in minivl_claims(close, sizes=dict.fromkeys(("vqa", "nlvr", "retrieval"), 60)).splitlines()[2:]}
    assert "| within noise (±" in small["APT is more accurate than the classifier alone"]
    large = {line.split(" | ")[0].lstrip("| "): line for line in minivl_claims(close, sizes=dict.fromkeys(("vqa", "nlvr", "retrieval"), 100_000)).splitlines()[2:]}
    assert large["APT is more accurate than the classifier alone"].endswith("| holds |")
    assert minivl_test_sizes(["minivl:vqa?train=400&test=500", "minivl:retrieval?val=20&test=60&negatives=1", "minivl:nlvr"]) == {
        "vqa": 500, "retrieval": 60, "nlvr": 1000}
    partial = minivl_claims([r for r in rows if not (r["method"] == "apt" and r["task"] == "nlvr")])
    assert "not measured" in partial  # an average needs all four figures
    assert {p["method"] for p in PAPER_VILT} >= {"full", "vpt-deep", "lora", "apt", "linear"}
    assert next(p for p in PAPER_VILT if p["method"] == "apt")["avg"] == pytest.approx((70.94 + 75.92 + 63.26 + 81.60) / 4, abs=0.01)


def test_each_backbone_keeps_its_own_block(tmp_path):
    path = tmp_path / "results-minivl.md"
    rows = rows_of({"apt": (55, 62, 31, 33, 0.005)})

    def block(backbone, command):
        return results_minivl_block(rows, [VL_RECIPES["apt"]], command=command, lr_factors=(1,), backbone=backbone,
                                    specs=["minivl:vqa"], wall_time_s=1.0, complete=True)

    write_results_minivl(path, block("vptune_meter_fmnist", "first meter"), bundled="vptune_vilt_fmnist")
    write_results_minivl(path, block("vptune_vilt_fmnist", "first vilt"), bundled="vptune_vilt_fmnist")
    path.write_text(path.read_text() + "\nhand-written\n")
    write_results_minivl(path, block("vptune_vilt_fmnist", "second vilt"), bundled="vptune_vilt_fmnist")
    write_results_minivl(path, block("vptune_meter_fmnist", "second meter"), bundled="vptune_vilt_fmnist")
    text = path.read_text()
    assert "first" not in text and text.count("second vilt") == text.count("second meter") == 1
    assert text.endswith("\nhand-written\n")
    for backbone in ("vptune_vilt_fmnist", "vptune_meter_fmnist"):
        begin, end = minivl_markers(backbone)
        assert text.count(begin) == text.count(end) == 1
