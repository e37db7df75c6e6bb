"""Comparisons (vptune.compare) and their reports (vptune.report) on the bundled architecture
with random weights and a tiny image folder: rows, resuming, the lr choice, markdown, PNGs."""

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import two_class_workspace
from vptune import compare as comparison
from vptune.cli import app, rows_json_path
from vptune.compare import BENCHMARK_METHODS, DEMO_METHODS, RECIPES, benchmark, compare, group_means, recipes_for
from vptune.methods import config_for
from vptune.report import (
    ACCURACY_PLOT, BEGIN, CURVES_PLOT, END, results_mini_block, rich_table, unstable_final, write_demo_report, write_results_mini,
)
from vptune.train import NonFiniteLossError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Random bundled-backbone weights and an image folder with train/val/test splits of two classes."""
    return two_class_workspace(tmp_path_factory.mktemp("compare"), size=16)


def tiny(methods, **settings):
    return recipes_for(methods, **{"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0, "precision": "fp32", **settings})


@pytest.fixture(scope="module")
def demo_rows(workspace):
    task = f"imagefolder:{workspace / 'images'}"
    return compare([task], tiny(["linear", "vpt-deep"]), workspace / "demo", weights=workspace / "backbone.safetensors")


def test_every_method_has_a_recipe_that_builds():
    assert set(DEMO_METHODS) <= set(BENCHMARK_METHODS) == set(RECIPES)
    for recipe in RECIPES.values():
        assert config_for(recipe.method, **recipe.options).method_name() == recipe.method


def test_compare_gives_one_row_per_run_with_the_runs_metrics(demo_rows, workspace):
    assert [(r["task"], r["method"], r["group"]) for r in demo_rows] == [("images", "linear", "other"), ("images", "vpt-deep", "other")]
    for r in demo_rows:
        metrics = json.loads((workspace / "demo" / "runs" / "images" / r["method"] / "metrics.json").read_text())
        assert r["test_top1"] == metrics["test_top1"] and r["val_top1"] == metrics["val_top1"]
        assert r["tuned_percent"] == pytest.approx(100 * r["tuned_params"] / metrics["backbone_params"])
    linear, deep = demo_rows
    assert deep["tuned_params"] - linear["tuned_params"] == 10 * 192 * 6  # p * d * L prompt parameters
    assert linear["extra_gflops"] == 0 < deep["extra_gflops"]


def test_a_finished_comparison_is_read_back_not_retrained(demo_rows, workspace):
    files = sorted((workspace / "demo" / "runs").rglob("*.*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    task, recipes = f"imagefolder:{workspace / 'images'}", tiny(["linear", "vpt-deep"])
    again = compare([task], recipes, workspace / "demo", weights=workspace / "backbone.safetensors")
    assert again == demo_rows
    assert sorted((workspace / "demo" / "runs").rglob("*.*")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    with pytest.raises(ValueError, match="was made on other backbone weights"):  # the shipped weights, not the runs'
        compare([task], recipes, workspace / "demo")
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_other_settings_in_a_finished_run_folder_are_refused(demo_rows, workspace):
    with pytest.raises(ValueError, match="other settings.*epochs"):
        compare([f"imagefolder:{workspace / 'images'}"], tiny(["linear"], epochs=2), workspace / "demo")



def test_a_comparison_from_before_clip_grad_is_read_back_and_refused_with_clipping(demo_rows, workspace, tmp_path):
    """Run folders written before clip_grad existed record no such key: they were made without
    clipping, so the same recipes read them back (not retrained) and a clip_grad is other settings."""
    old = Path(shutil.copytree(workspace / "demo", tmp_path / "demo"))
    for path in [*old.rglob("metrics.json"), *old.rglob("config.json")]:
        data = json.loads(path.read_text())
        settings = data["train_config"] if path.name == "metrics.json" else data["metadata"]["train_config"]
        del settings["clip_grad"]
        path.write_text(json.dumps(data, indent=2))
    files = sorted(old.rglob("*.*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    task, weights = f"imagefolder:{workspace / 'images'}", workspace / "backbone.safetensors"
    again = compare([task], tiny(["linear", "vpt-deep"]), old, weights=weights)
    drop_run = lambda rows: [{k: v for k, v in r.items() if k != "run"} for r in rows]  # noqa: E731
    assert drop_run(again) == drop_run(demo_rows)
    assert sorted(old.rglob("*.*")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    with pytest.raises(ValueError, match=r"other settings \(clip_grad differ\)"):
        compare([task], tiny(["linear"], clip_grad=1.0), old, weights=weights)
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_the_demo_report_has_every_row_and_both_plots(demo_rows, workspace):
    out = workspace / "demo"
    report = write_demo_report(demo_rows, tiny(["linear", "vpt-deep"]), out, command="vptune demo", backbone="b", wall_time_s=3)
    text = report.read_text()
    for r in demo_rows:
        assert f"| images | {r['method']} | {r['val_top1']:.1f} | {r['test_top1']:.1f} |" in text
    for name in (ACCURACY_PLOT, CURVES_PLOT):
        assert f"]({name})" in text and (out / name).read_bytes().startswith(PNG_MAGIC)
    assert "adamw lr" in text and "num_prompts=10" in text
    assert rich_table(demo_rows, "t").row_count == 2


def test_benchmark_retrains_the_lr_with_the_best_val_on_train_and_val(workspace):
    rows = benchmark([f"imagefolder:{workspace / 'images'}"], tiny(["linear"]), workspace / "bench",
                     lr_factors=(0.1, 1.0), weights=workspace / "backbone.safetensors")
    (r,) = rows
    assert set(r["searched"]) == {RECIPES["linear"].train.lr * f for f in (0.1, 1.0)}
    assert r["val_top1"] == max(r["searched"].values()) and r["searched"][r["lr"]] == r["val_top1"]
    final = json.loads((workspace / "bench" / "runs" / "images" / "linear" / f"final-lr{r['lr']:g}" / "metrics.json").read_text())
    assert final["final"] and r["test_top1"] == final["test_top1"]  # an image folder has no train+val list: train
    chosen = json.loads((workspace / "bench" / "runs" / "images" / "linear" / f"search-lr{r['lr']:g}" / "metrics.json").read_text())
    assert r["train_loss"] == final["train_loss"] and r["search_train_loss"] == chosen["train_loss"]


def test_a_final_run_that_went_unstable_is_marked_and_explained(demo_rows):
    """The final retrain's train loss is held to the search run's at the same lr (the LoRA row of
    the mini benchmark whose retrain at lr 0.009 ended at 2.17 against 0.056 and tested 20.5%)."""
    steady = {**demo_rows[0], "train_loss": 0.07, "search_train_loss": 0.056}
    unstable = {**demo_rows[1], "train_loss": 2.17, "search_train_loss": 0.056}
    assert not unstable_final(steady) and unstable_final(unstable)
    assert not unstable_final({**steady, "train_loss": 0.2, "search_train_loss": 0.01})  # 20x, but both small: not marked
    block = results_mini_block([steady, unstable], tiny(["linear", "vpt-deep"]), command="c", lr_factors=(1, 3),
                               backbone="vptune_vit_fmnist", wall_time_s=1, complete=True)
    assert block.count(" †") == 2 and "2.17 against 0.056" in block  # in the summary and the runs table, then the footnote
    assert f"{unstable['task']} {unstable['method']}" in block.split("† The final run")[1]
    clean = results_mini_block([steady], tiny(["linear"]), command="c", lr_factors=(1, 3), backbone="vptune_vit_fmnist",
                               wall_time_s=1, complete=True)
    assert "†" not in clean


def test_each_backbone_has_its_own_rows_file(workspace, tmp_path):
    """`benchmark mini --backbone vptune_swin_fmnist` writes its rows beside the results file under its
    own name: it once wrote results-mini.json, over the bundled ViT's rows."""
    results = tmp_path / "results-mini.md"
    vit_rows = results.with_suffix(".json")
    vit_rows.write_text("[]\n")  # the ViT's rows, already there
    args = ["benchmark", "mini", "--backbone", "vptune_swin_fmnist", "--tasks", f"imagefolder:{workspace / 'images'}",
            "--methods", "linear", "--lrs", "1", "--epochs", 1, "--out", tmp_path / "bench", "--results", results, "--threads", 1]
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert vit_rows.read_text() == "[]\n"
    swin_rows = rows_json_path(results, "vptune_swin_fmnist", "vptune_vit_fmnist")
    assert swin_rows.name == "results-mini-vptune_swin_fmnist.json"
    assert [(r["task"], r["method"]) for r in json.loads(swin_rows.read_text())] == [("images", "linear")]


def test_a_single_lr_factor_trains_only_the_final_run(workspace):
    (r,) = benchmark([f"imagefolder:{workspace / 'images'}"], tiny(["linear"]), workspace / "single",
                     lr_factors=(2.0,), weights=workspace / "backbone.safetensors")
    assert r["lr"] == 2 * RECIPES["linear"].train.lr and r["val_top1"] is None and r["searched"] == {}
    assert [p.name for p in (workspace / "single" / "runs" / "images" / "linear").iterdir()] == [f"final-lr{r['lr']:g}"]


def test_a_diverged_run_is_a_row_and_is_not_retried(workspace, monkeypatch):
    def diverge(*args, **kwargs):
        raise NonFiniteLossError("training loss became nan")

    monkeypatch.setattr(comparison, "train_run", diverge)
    task = f"imagefolder:{workspace / 'images'}"
    (r,) = compare([task], tiny(["apt"]), workspace / "diverged")
    assert r["error"] == "training loss became nan" and r["test_top1"] is None
    monkeypatch.setattr(comparison, "train_run", lambda *a, **k: pytest.fail("a diverged run was retried"))
    assert compare([task], tiny(["apt"]), workspace / "diverged") == [r]
    console = Console(record=True, width=200)
    console.print(rich_table([r], "t"))
    assert "diverged" in console.export_text()


def test_group_means_count_only_methods_that_finished_every_task_of_the_group():
    def r(task, group, method, top1):
        return {"task": task, "group": group, "method": method, "test_top1": top1}

    rows = [r("a", "natural", "x", 50.0), r("b", "natural", "x", 70.0), r("a", "natural", "y", 40.0),
            r("b", "natural", "y", None), r("c", "structured", "x", 30.0)]
    assert group_means(rows) == {"natural": {"x": 60.0}, "structured": {"x": 30.0}}


def test_results_mini_replaces_its_block_and_keeps_other_sections(demo_rows, tmp_path):
    path = tmp_path / "results-mini.md"
    path.write_text("# Results\n\nintro\n\n## Pruning\npruning table\n")
    for wall in (60, 120):
        block = results_mini_block(demo_rows, tiny(["linear", "vpt-deep"]), command="vptune benchmark mini", lr_factors=(1,),
                                   backbone="vptune_vit_fmnist", wall_time_s=wall, complete=False)
        write_results_mini(path, block)
    text = path.read_text()
    assert text.count(BEGIN) == text.count(END) == 1 and "0.03 h" in text and "0.02 h" not in text
    assert text.startswith("# Results\n") and "intro" in text and "## Pruning\npruning table" in text
    assert "**Partial**" in text and "| linear |" in text
    # Another backbone (the bundled Swin) gets its own block after the ViT's; rewriting it keeps the ViT's.
    for wall in (60, 180):
        block = results_mini_block(demo_rows, tiny(["linear"]), command="vptune benchmark mini --backbone vptune_swin_fmnist",
                                   lr_factors=(1,), backbone="vptune_swin_fmnist", wall_time_s=wall, complete=True)
        write_results_mini(path, block)
    again = path.read_text()
    assert again.count(BEGIN) == again.count(END) == 1 and again.count("--backbone vptune_swin_fmnist: generated") == 1
    assert again.index(END) < again.index("## `vptune_swin_fmnist`: every method") < again.index("## Pruning")
    assert "0.05 h" in again and "0.03 h" in again and "0.02 h" not in again


def test_demo_without_the_bundled_weights_says_how_to_create_them(tmp_path, monkeypatch):
    monkeypatch.setattr("vptune.backbones.loading.bundled_weights_path", lambda name=None: tmp_path / "missing.safetensors")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--methods", "linear"])
    assert result.exit_code == 1 and "vptune pretrain" in result.output


def test_demo_command_end_to_end(workspace, tmp_path):
    """`vptune demo` with a data spec, two methods and one epoch: every run trained once, its figures
    printed and in report.md, both plots written."""
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--tasks", f"imagefolder:{workspace / 'images'}", "--methods", "linear,vpt-deep",
            "--epochs", 1, "--weights", workspace / "backbone.safetensors", "--threads", 1]
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for method in ("linear", "vpt-deep"):
        metrics = json.loads((out / "runs" / "images" / method / "metrics.json").read_text())
        assert metrics["epochs"] == 1 and metrics["method"] == method
        line = next(line for line in report.splitlines() if line.startswith(f"| images | {method} |"))
        assert f"{metrics['test_top1']:.1f}" in line
        assert f"images {method}: test top-1 {metrics['test_top1']:.2f}%" in result.output
        recorded = next(r for r in json.loads((out / "report.json").read_text()) if r["method"] == method)
        assert recorded["test_top1"] == metrics["test_top1"]
    for plot in (ACCURACY_PLOT, CURVES_PLOT):
        assert (out / plot).read_bytes().startswith(PNG_MAGIC)


def test_benchmark_mini_command_end_to_end(workspace, tmp_path):
    """`vptune benchmark mini`: the lr searched on val, the winner retrained, the results block written
    into the given markdown file (the rest kept); a rerun reads the runs back and trains nothing."""
    out, results = tmp_path / "bench", tmp_path / "results.md"
    results.write_text("# Results\n\nkept\n")
    args = ["benchmark", "mini", "--tasks", f"imagefolder:{workspace / 'images'}", "--methods", "linear", "--lrs", "1,3",
            "--epochs", 1, "--weights", workspace / "backbone.safetensors", "--out", out, "--results", results, "--threads", 1]
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    base = out / "runs" / "images" / "linear"
    lr = RECIPES["linear"].train.lr
    vals = {f: json.loads((base / f"search-lr{lr * f:g}" / "metrics.json").read_text())["val_top1"] for f in (1, 3)}
    best = max(vals, key=lambda f: (vals[f], -f))
    final = json.loads((base / f"final-lr{lr * best:g}" / "metrics.json").read_text())
    assert final["final"] and final["epochs"] == 1
    text = results.read_text()
    assert text.startswith("# Results\n") and text.endswith("\nkept\n") and text.count(BEGIN) == text.count(END) == 1
    assert f"{final['test_top1']:.1f}" in next(line for line in text.splitlines() if line.startswith("| images | linear |"))
    (recorded,) = json.loads(results.with_suffix(".json").read_text())  # the figures' source, beside them
    assert recorded["test_top1"] == final["test_top1"] and recorded["lr"] == pytest.approx(lr * best)
    stamp = (base / f"final-lr{lr * best:g}" / "metrics.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert again.exit_code == 0, again.output
    assert (base / f"final-lr{lr * best:g}" / "metrics.json").stat().st_mtime_ns == stamp
