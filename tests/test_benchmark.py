"""vptune benchmark vtab1k|fgvc: recipes (default, official, quick), ASHA per task and method, the
summary with the published numbers, and the whole protocol end to end through Ray on VTAB-1k
folders built by ``vptune data`` from a small local source."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from datasets_fixtures import vtab_source
from vptune.cli import app
from vptune.data.suites import VTAB_TASKS
from vptune.sweep.protocol import OFFICIAL_BASE_LRS, OFFICIAL_SEEDS
from vptune.sweep.suite import BenchmarkConfig, assemble, benchmark_markdown, ppt, published_rows, recipe_for
from vptune.sweep.tune import GroupedASHA


def config(tmp_path, **kw) -> BenchmarkConfig:
    return BenchmarkConfig(**{"suite": "vtab1k", "root": tmp_path, "methods": ["vpt-deep"], "out": tmp_path / "o",
                              "gpus_per_trial": 0.0, **kw})


def test_default_quick_and_overridden_recipes(tmp_path):
    settings, options, _ = recipe_for(config(tmp_path), "vpt-deep", "dtd")
    assert (settings["epochs"], settings["warmup_epochs"], settings["batch_size"]) == (100, 10, 128)
    assert settings["lr_grid"] == OFFICIAL_BASE_LRS and settings["seeds"] == OFFICIAL_SEEDS and options == {}
    quick, _, _ = recipe_for(config(tmp_path, quick=True), "vpt-deep", "dtd")
    assert (quick["epochs"], quick["warmup_epochs"], len(quick["lr_grid"]) * len(quick["wd_grid"]), quick["seeds"]) == (
        10, 1, 6, (42,))
    mine, _, _ = recipe_for(config(tmp_path, quick=True, epochs=3, lr_grid=(0.5,)), "vpt-deep", "dtd")
    assert (mine["epochs"], mine["lr_grid"], mine["warmup_epochs"]) == (3, (0.5,), 0.3)


def test_official_recipes_come_from_the_official_repositories_per_task(tmp_path):
    official = config(tmp_path, recipe="official")
    settings, options, sources = recipe_for(official, "e2vpt", "oxford_flowers102")
    assert options == {"shared_kv": True, "dropout": 0.1, "num_prompts": 1, "num_kv_prompts": 1}
    assert settings["batch_size"] == 64 and settings["epochs"] == 100 and settings["num_prompts_grid"] == (None,)
    assert any("command.txt, oxford_flowers102 (MODEL.P_VK.NUM_TOKENS_P 1, NUM_TOKENS 1)" in s for s in sources)
    assert recipe_for(official, "e2vpt", "patch_camelyon")[1]["num_kv_prompts"] == 10
    assert recipe_for(official, "e2vpt", "caltech101")[1]["num_prompts"] == 32
    fgvc = recipe_for(config(tmp_path, recipe="official", suite="fgvc"), "e2vpt", "cub")
    assert fgvc[0]["batch_size"] == 128 and fgvc[1]["num_prompts"] == 5
    recipes = json.loads((Path(__file__).parents[1] / "src/vptune/sweep/recipes.json").read_text())
    assert set(recipes["methods"]["e2vpt"]["tasks"]) == set(VTAB_TASKS)  # every VTAB-1k task, by our folder names
    # VPT published no per-task prompt length: the official recipe searches the paper's set instead
    vpt, vpt_options, _ = recipe_for(official, "vpt-deep", "dtd")
    assert vpt["num_prompts_grid"] == (1, 5, 10, 50, 100, 200) and vpt_options == {"dropout": 0.0}
    assert recipe_for(config(tmp_path, recipe="official", quick=True), "vpt-deep", "dtd")[0]["num_prompts_grid"] == (10,)
    assert recipe_for(official, "full", "dtd")[0]["optimizer"] == "adamw"
    with pytest.raises(ValueError, match="publish no recipe for lora"):
        config(tmp_path, recipe="official", methods=["lora"])


def test_ppt_and_published_group_means():
    assert ppt(80.0, 1e7) == pytest.approx(80.0 * math.exp(-math.log10(2)))
    assert ppt(80.0, 0) == 80.0
    rows = {r["label"]: r for r in published_rows()}
    assert rows["VPT-deep"]["group_mean"] == 71.96  # as published, and the mean of its three groups
    assert rows["VPT-deep"]["group_mean"] == pytest.approx((78.48 + 82.43 + 54.98) / 3, abs=0.01)
    assert rows["Full fine-tuning"]["group_mean"] == round((75.88 + 83.36 + 47.64) / 3, 2)  # filled in
    assert all(r["source"] for r in rows.values())


class FakeTrial(SimpleNamespace):
    pass


def test_asha_compares_a_trial_only_with_its_own_task_and_method():
    scheduler = GroupedASHA(max_t={0: 4, 1: 4}, grace_period=1, reduction_factor=2)
    trial = lambda tid, sweep, task: FakeTrial(trial_id=tid, config={"job": {"sweep": sweep, "run": {"task": task}}})  # noqa: E731
    a1, a2, b1, c1 = trial("a1", 0, "dtd"), trial("a2", 0, "dtd"), trial("b1", 0, "svhn"), trial("c1", 1, "dtd")
    for t in (a1, a2, b1, c1):
        scheduler.on_trial_add(None, t)
    assert scheduler.on_trial_result(None, a1, {"epoch": 1, "val_top1": 90.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, a2, {"epoch": 1, "val_top1": 10.0}) == "STOP"  # worse than a1, same group
    assert scheduler.on_trial_result(None, b1, {"epoch": 1, "val_top1": 10.0}) == "CONTINUE"  # other task
    assert scheduler.on_trial_result(None, c1, {"epoch": 1, "val_top1": 10.0}) == "CONTINUE"  # other method
    assert len(scheduler.groups) == 3


def fake_summary(test, params, val=50.0):
    return {"tasks": {"t": {"chosen": {"val_top1": val, "base_lr": 1.0, "weight_decay": 0.0, "num_prompts": None},
                            "test_top1_mean": test, "test_top1_std": 0.5, "seeds_done": 2, "tuned_params": params,
                            "tuned_percent": 1.0}}}


def test_the_fgvc_table_puts_the_published_numbers_beside_ours(tmp_path):
    from vptune.sweep.suite import sweeps

    cfg = config(tmp_path, suite="fgvc", methods=["vpt-deep", "linear"], quick=True)
    tasks = ["cub", "dogs"]
    configs = sweeps(cfg, tasks)
    result = assemble(cfg, tasks, configs, [fake_summary(80.0, 5e5), fake_summary(70.0, 5e5),
                                            fake_summary(60.0, 1e4), fake_summary(None, None)])
    vpt, linear = result["methods"]["vpt-deep"], result["methods"]["linear"]
    assert vpt["mean"] == 75.0 and vpt["complete"] and vpt["ppt_mean"] == pytest.approx((ppt(80, 5e5) + ppt(70, 5e5)) / 2)
    assert linear["mean"] == 60.0 and not linear["complete"]
    text = benchmark_markdown(result)
    assert "| vpt-deep | vptune (this run) | 75.00 | 0.500M |" in text
    assert "| linear | vptune (this run, incomplete) | 60.00 |" in text
    assert "| VPT-deep | published | 89.11 | 0.640M | - |" in text and "| E2VPT | published | 89.22 |" in text


@pytest.fixture(autouse=True, scope="module")
def ray_can_unpickle_this_module():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_benchmark_vtab1k_quick_end_to_end_through_ray(tmp_path_factory, monkeypatch):
    """From a small local list-file source: vptune data vtab1k, then vptune benchmark vtab1k --quick on two
    tasks and two methods (a random bundled-size backbone, one epoch, one grid point, one seed): eight
    trainings, search then final, in two Ray Tune experiments. Two head methods keep it cheap: the
    prompt methods run through the same sweeps (test_sweep, the CLI's recipes) and only cost more."""
    from safetensors.torch import save_file

    from vptune.backbones.bundled import build_bundled

    # Ray starts its workers at niceness 15: on a machine shared with other jobs they would get almost no CPU.
    monkeypatch.setenv("RAY_worker_niceness", "0")
    work = Path(tmp_path_factory.mktemp("bench", numbered=True))
    runner = CliRunner()
    built = runner.invoke(app, ["data", "vtab1k", "--out", str(work / "vtab"), "--source",
                                str(vtab_source(work / "src", tasks=("dtd", "clevr_count"))), "--tasks", "dtd,clevr_count"])
    assert built.exit_code == 0, built.output
    torch.manual_seed(0)
    save_file(build_bundled().state_dict(), str(work / "random.safetensors"))
    out = Path("/tmp") / f"vb-{work.name[-6:]}"  # short: Ray's unix sockets live under it
    args = ["benchmark", "vtab1k", "--root", str(work / "vtab"), "--methods", "linear,mlp", "--out", str(out),
            "--backbone", "vptune_vit_fmnist", "--weights", str(work / "random.safetensors"), "--quick", "--epochs", "1",
            "--lr-grid", "1", "--wd-grid", "0", "--batch-size", "100", "--num-cpus", "2", "--gpus-per-trial", "0"]
    try:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "benchmark.json").read_text())
        assert summary["tasks"] == ["dtd", "clevr_count"]
        for method in ("linear", "mlp"):
            for task, group in (("dtd", "natural"), ("clevr_count", "structured")):
                entry = summary["methods"][method]["tasks"][task]
                sweep = json.loads((out / "runs" / method / task / "sweep.json").read_text())
                final = sweep["tasks"][task]["final"][0]
                metrics = json.loads((Path(final["folder"]) / "metrics.json").read_text())
                assert metrics["final"] and metrics["train_images"] == 1000 and metrics["method"] == method
                assert entry["test_top1"] == metrics["test_top1"] and entry["group"] == group
                assert entry["ppt"] == pytest.approx(ppt(metrics["test_top1"], metrics["tuned_params"]))
        assert summary["methods"]["mlp"]["tasks"]["dtd"]["tuned_params"] > summary["methods"]["linear"]["tasks"]["dtd"]["tuned_params"]
        table = (out / "benchmark.md").read_text()
        assert "| VPT-deep | published | 78.48 | 82.43 | 54.98 | 71.96 |" in table
        assert "| E2VPT | published | 80.01 | 84.43 | 57.39 | 73.94 |" in table
        assert "| linear | vptune (this run) |" in table and "| mlp | dtd | natural | 1.0 | 0.0 |" in table
        assert (out / "accuracy-vs-params.png").stat().st_size > 0

        again = runner.invoke(app, args)  # resumes: every run is done, nothing trains, Ray is not started
        assert again.exit_code == 0 and "search: 4 runs, 4 already done" in again.output
        assert json.loads((out / "benchmark.json").read_text()) == summary
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def test_the_readme_commands_parse_and_benchmark_names_its_extra(tmp_path, monkeypatch):
    """The README's three commands: their options exist, --recipe official covers the methods they
    name, and without Ray `vptune benchmark` names the pip command instead of failing on an import."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## The papers' benchmarks in three commands", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in section.split("\n\n") if b.startswith("    "))  # the indented code block
    commands = " ".join(block.replace("\\\n", " ").split()).split(" vptune ")
    assert commands[0] == 'pip install -e ".[sweep]"'
    data_args, bench_args = commands[1].split(), commands[2].split()
    assert data_args[:2] == ["data", "vtab1k"] and bench_args[:2] == ["benchmark", "vtab1k"]
    methods = bench_args[bench_args.index("--methods") + 1].split(",")
    assert bench_args[bench_args.index("--recipe") + 1] == "official"
    for method in methods:  # --recipe official covers every method named
        recipe_for(config(tmp_path, recipe="official", methods=methods), method, "dtd")
    runner = CliRunner()
    for args in (data_args, bench_args):
        help_text = runner.invoke(app, [*args[:2], "--help"], terminal_width=400).output
        for option in (a for a in args[2:] if a.startswith("--")):
            assert option in help_text, option
    import vptune.extras

    monkeypatch.setattr(vptune.extras, "installed", lambda module: module != "ray")
    root = tmp_path / "vtab"
    root.mkdir()
    result = runner.invoke(app, ["benchmark", "vtab1k", "--root", str(root), "--methods", "linear"])
    assert result.exit_code != 0
    assert 'vptune benchmark vtab1k needs ray[tune], which is not installed here: pip install "vptune[sweep]"' in \
        " ".join(result.output.split())
