"""The papers' protocol (vptune.sweep): the official selection rule, the summary, and real sweeps
of train_run on a mini task under a local Ray, including a killed sweep that resumes."""

import dataclasses
import functools
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vptune.backbones import BUNDLED_BACKBONE
from vptune.cli import app
from vptune.sweep import Outcome, Run, SweepConfig, choose, markdown, run_sweep, summarize, task_group, task_name
from vptune.sweep.tune import check_settings
from vptune.train import TrainConfig, train_run


def run(lr: float, wd: float = 0.0, task: str = "dtd", **kw) -> Run:
    return Run(task, f"vtab1k:/data/{task}", lr, wd, None, 42, **kw)


def done(val: float | None = None, test: float | None = None) -> Outcome:
    return Outcome("done", {"val_top1": val, "test_top1": test, "tuned_params": 10, "tuned_percent": 0.5})


# --- the protocol, without Ray ---------------------------------------------------------------


def test_choose_takes_the_best_val_and_breaks_ties_by_the_smaller_lr():
    candidates = [
        (run(5.0), done(60.0)),
        (run(0.1), done(50.0)),
        (run(1.0), done(60.0)),  # ties with lr 5: the smaller lr wins, wherever it sits in the grid
        (run(2.5), Outcome("failed", error="boom")),
        (run(0.5), Outcome("stopped", {"epoch": 3, "val_top1": 99.0})),  # cut short by ASHA: never the winner
    ]
    assert choose(candidates)[0] == run(1.0)
    assert choose(candidates[::-1])[0] == run(1.0)
    same_lr = [(run(1.0, 0.01), done(70.0)), (run(1.0, 0.0), done(70.0))]
    assert choose(same_lr)[0] == run(1.0, 0.01)  # then the first in grid order
    assert choose([(run(1.0), Outcome("failed", error="boom"))]) is None


def test_task_names_and_groups():
    assert task_name("vtab1k:/data/vtab-1k/clevr_count/") == "clevr_count"
    assert task_name("mini:digits") == "digits"
    assert [task_group(f"vtab1k:/d/{t}") for t in ("dtd", "eurosat", "dsprites_ori", "my_task")] == [
        "natural", "specialized", "structured", None,
    ]
    assert task_group("mini:digits") == "natural" and task_group("mini:count") == "structured"


def test_summary_reports_the_winner_the_seeds_and_the_group_means(tmp_path):
    config = SweepConfig("b", "vpt-deep", ["vtab1k:/d/dtd", "vtab1k:/d/svhn", "vtab1k:/d/eurosat"], tmp_path,
                         train=TrainConfig(batch_size=64), lr_grid=(1.0, 0.5), wd_grid=(0.0,), seeds=(42, 44, 82))
    searched = {r: done(val) for r, val in zip(config.search_runs(), (80.0, 85.0, 40.0, 40.0, 70.0, 60.0))}
    tests = {"dtd": (70.0, 72.0, 74.0), "svhn": (50.0, 50.0, 50.0), "eurosat": (90.0, 91.0, 95.0)}
    finals = {}
    for task in tests:
        winner = choose([(r, o) for r, o in searched.items() if r.task == task])[0]
        finals.update({r: done(test=t) for r, t in zip(config.final_runs(winner), tests[task])})
    finals[[r for r in finals if r.task == "eurosat"][2]] = Outcome("failed", error="Traceback...\nValueError: bad")
    summary = summarize(config, searched, finals)

    dtd, svhn, eurosat = (summary["tasks"][t] for t in ("dtd", "svhn", "eurosat"))
    assert (dtd["chosen"]["base_lr"], dtd["chosen"]["lr"], dtd["chosen"]["val_top1"]) == (0.5, 0.125, 85.0)
    assert svhn["chosen"]["base_lr"] == 0.5  # a tie at 40: the smaller lr
    assert dtd["test_top1_mean"] == 72.0 and dtd["test_top1_std"] == statistics.stdev((70.0, 72.0, 74.0))
    assert eurosat["seeds_done"] == 2 and eurosat["test_top1_mean"] == 90.5  # the failed seed is left out
    assert summary["groups"]["natural"] == {"tasks": ["dtd", "svhn"], "test_top1_mean": 61.0}
    assert summary["groups"]["specialized"]["test_top1_mean"] == 90.5
    assert summary["failed"] == [{"run": "eurosat-lr1_wd0-seed82", "error": "Traceback...\nValueError: bad"}]
    text = markdown(summary)
    assert "| dtd | natural | 0.5 | 0.125 | 0 | default | 85.00 | 72.00 ± 2.00 | 3 | 10 | 0.500 |" in text
    assert "| natural | 2 | 61.00 |" in text and "eurosat-lr1_wd0-seed82: ValueError: bad" in text


def test_bad_sweeps_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="lr grid is empty.*weight decay -1 is negative"):
        SweepConfig("b", "linear", ["mini:digits"], tmp_path, lr_grid=(), wd_grid=(-1.0,))
    with pytest.raises(ValueError, match="both task 'digits'"):
        SweepConfig("b", "linear", ["mini:digits", "vtab1k:/x/digits"], tmp_path)
    with pytest.raises(ValueError, match="num_prompts.*from the num-prompts grid"):
        SweepConfig("b", "linear", ["mini:digits"], tmp_path, num_prompts_grid=(5,))
    with pytest.raises(ValueError, match="scheduler 'hyperband'"):
        SweepConfig("b", "linear", ["mini:digits"], tmp_path, scheduler="hyperband")
    result = CliRunner().invoke(
        app,
        ["sweep", "--method", "vpt-deep", "--data", "mini:digits", "--out", str(tmp_path), "--lr-grid", "1,fast"],
    )
    assert result.exit_code == 1 and "--lr-grid expects comma-separated float values" in result.output


def test_a_sweep_folder_is_not_resumed_with_other_settings(tmp_path, weights):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "backbone.safetensors"
    state = load_file(weights)
    save_file(state, str(copy))
    config = SweepConfig(BUNDLED_BACKBONE, "linear", ["mini:digits"], tmp_path, weights=str(copy),
                         train=TrainConfig(epochs=3))
    check_settings(config)
    check_settings(dataclasses.replace(config, lr_grid=(1.0,), seeds=(1,)))  # grid and seeds may change
    with pytest.raises(ValueError, match="other settings .*epochs"):
        check_settings(dataclasses.replace(config, train=TrainConfig(epochs=5)))
    save_file({k: v * 1.01 for k, v in state.items()}, str(copy))  # the same file name, other values
    with pytest.raises(ValueError, match="other settings .*backbone_weights"):
        check_settings(config)



def test_a_sweep_folder_from_before_clip_grad_resumes_unclipped(tmp_path, weights):
    """sweep-settings.json written before clip_grad existed lacks the key: the sweep was made
    without clipping, so it resumes as such, and a clip_grad is other settings."""
    config = SweepConfig(BUNDLED_BACKBONE, "linear", ["mini:digits"], tmp_path, weights=weights, train=TrainConfig(epochs=3))
    known = check_settings(config)
    path = tmp_path / "sweep-settings.json"
    settings = json.loads(path.read_text())
    del settings["train"]["clip_grad"]
    path.write_text(json.dumps(settings))
    check_settings(config, known)
    with pytest.raises(ValueError, match=r"other settings \(train: \{.*'clip_grad': None.* then, .*'clip_grad': 0.5"):
        check_settings(dataclasses.replace(config, train=TrainConfig(epochs=3, clip_grad=0.5)), known)


def test_sweep_passes_clip_grad_to_every_run(tmp_path, monkeypatch):
    import vptune.sweep

    seen = []

    def stop(config, **kwargs):
        seen.append(config.train_config(run(0.1)))
        raise ValueError("stopped before training")

    monkeypatch.setattr(vptune.sweep, "run_sweep", stop)
    result = CliRunner().invoke(app, ["sweep", "--method", "linear", "--data", "mini:digits", "--out", str(tmp_path),
                                      "--clip-grad", "0.5"])
    assert result.exit_code == 1 and "stopped before training" in result.output
    assert [cfg.clip_grad for cfg in seen] == [0.5]


# --- real sweeps: train_run on a mini task, trials on a local Ray ----------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Random weights for the bundled architecture: the tests do not depend on the shipped ones."""
    from safetensors.torch import save_file

    from vptune.backbones.bundled import build_bundled

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "random.safetensors"
    save_file(build_bundled().state_dict(), str(path))
    return str(path)


def mini_sweep(out: Path, weights: str, **kw) -> SweepConfig:
    return SweepConfig(
        "vptune_vit_fmnist", "linear", ["mini:digits"], out, weights=weights,
        train=TrainConfig(epochs=1, batch_size=100, warmup_epochs=0, device="cpu"),
        lr_grid=(0.05, 5.0), wd_grid=(0.0,), seeds=(42,), num_cpus=2, **kw,
    )


def recording_trainer(*args, log: str, kill_after: str | None = None, **kwargs):
    """train_run, logging each call; with ``kill_after``, every run but that one dies (a killed sweep)."""
    out = Path(args[4])
    with open(log, "a") as file:
        file.write(f"{out}\n")
    if kill_after is not None and out.name != kill_after:
        raise RuntimeError(f"simulated kill before {out.name}")
    return train_run(*args, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def ray_can_unpickle_this_module():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_sweep_picks_the_configuration_val_says_on_a_local_ray(weights):
    import ray

    out = Path(tempfile.mkdtemp(prefix="sweep-", dir="/tmp"))  # short: Ray's temp dir goes inside it
    try:
        summary = run_sweep(mini_sweep(out, weights))
        assert not ray.is_initialized()  # the sweep's own Ray is shut down
        assert (out / "ray-tmp").is_dir() and any((out / "ray").iterdir())

        trials = summary["tasks"]["digits"]["trials"]
        vals = {t["base_lr"]: json.loads((Path(t["folder"]) / "metrics.json").read_text())["val_top1"] for t in trials}
        assert [t["status"] for t in trials] == ["done", "done"]
        assert {t["base_lr"]: t["val_top1"] for t in trials} == vals
        best = max(vals.values())
        chosen = summary["tasks"]["digits"]["chosen"]
        assert chosen["base_lr"] == min(lr for lr, val in vals.items() if val == best)
        assert chosen["lr"] == chosen["base_lr"] * 100 / 256

        final = json.loads((out / "final" / "digits" / f"lr{chosen['base_lr']:g}_wd0" / "seed42" / "metrics.json").read_text())
        assert final["final"] and final["train_images"] == 1000  # retrained on train+val
        assert summary["tasks"]["digits"]["test_top1_mean"] == final["test_top1"]
        assert summary["groups"] == {"natural": {"tasks": ["digits"], "test_top1_mean": final["test_top1"]}}
        assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(summary))
        assert "| digits | natural |" in (out / "sweep.md").read_text()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, weights):
    log = tmp_path / "calls.txt"
    config = mini_sweep(tmp_path / "sweep", weights)
    first = tmp_path / "sweep" / "search" / "digits" / "lr0.05_wd0"

    # Everything after the first trial dies: the sweep records the failures and still ends.
    summary = run_sweep(config, trainer=functools.partial(recording_trainer, log=str(log), kill_after=first.name))
    trials = summary["tasks"]["digits"]["trials"]
    assert [t["status"] for t in trials] == ["done", "failed"]
    assert "simulated kill before lr5_wd0" in trials[1]["error"]
    assert summary["failed"] and summary["tasks"]["digits"]["test_top1_mean"] is None
    metrics = first / "metrics.json"
    stamp, content = metrics.stat().st_mtime_ns, metrics.read_text()
    log.write_text("")

    summary = run_sweep(config, trainer=functools.partial(recording_trainer, log=str(log)))
    calls = log.read_text().split()
    assert str(first) not in calls and str(first.with_name("lr5_wd0")) in calls
    assert metrics.stat().st_mtime_ns == stamp and metrics.read_text() == content
    assert [t["status"] for t in summary["tasks"]["digits"]["trials"]] == ["done", "done"]
    assert summary["failed"] == [] and summary["tasks"]["digits"]["seeds_done"] == 1

    log.write_text("")
    assert run_sweep(config, trainer=functools.partial(recording_trainer, log=str(log))) == summary
    assert log.read_text() == ""  # all done: nothing trains, and Ray is not even started


def test_asha_stops_the_losing_search_run_and_the_final_runs_run_to_the_end(tmp_path, weights):
    """--scheduler asha: val top-1 reported every epoch, a search run below the rung's cutoff stopped
    after its first epoch (recorded, not competing), the winner and its final run trained fully."""
    base = mini_sweep(tmp_path / "sweep", weights, scheduler="asha")
    # One trial at a time, in grid order: the good lr reaches the rung first, so the cutoff is its val.
    config = dataclasses.replace(
        base, lr_grid=(5.0, 1e-6), num_cpus=1, train=dataclasses.replace(base.train, epochs=2)
    )
    summary = run_sweep(config)
    good, bad = summary["tasks"]["digits"]["trials"]
    assert (good["base_lr"], good["status"]) == (5.0, "done")
    assert (bad["base_lr"], bad["status"]) == (1e-6, "stopped")
    stopped = json.loads((Path(bad["folder"]) / "stopped.json").read_text())
    assert stopped["epoch"] == 1 and stopped["val_top1"] < good["val_top1"]
    assert not (Path(bad["folder"]) / "metrics.json").exists()
    assert summary["tasks"]["digits"]["chosen"]["base_lr"] == 5.0
    curve = (tmp_path / "sweep" / "search" / "digits" / "lr5_wd0" / "curve.csv").read_text().splitlines()
    assert len(curve) == 3 and curve[1].split(",")[4] != ""  # 2 epochs, val top-1 after epoch 1 too
    final = json.loads((tmp_path / "sweep" / "final" / "digits" / "lr5_wd0" / "seed42" / "metrics.json").read_text())
    assert final["epochs"] == 2 and final["final"]


# Per-epoch val top-1 of five grid points (by base lr); lr 0.25 fails (diverges) after epoch 2.
CURVES = {5.0: [50, 60, 70, 80], 1.0: [40, 90, 90, 90], 0.5: [55, 50, 99, 99], 0.25: [60, 65], 0.1: [45, 70, 75, 76]}


def curve_trainer(backbone, method, options, data, folder, cfg, *, on_epoch_end, **kwargs):
    """Reports a preset val curve instead of training (the scheduler sees only these numbers)."""
    curve = CURVES[cfg.lr]
    for epoch, val in enumerate(curve, 1):
        on_epoch_end({"epoch": epoch, "val_top1": float(val)})
    if len(curve) < cfg.epochs:
        raise RuntimeError("diverged")
    return {"val_top1": float(curve[-1]), "epochs": cfg.epochs}


def test_the_asha_replay_makes_the_decisions_ray_tune_makes(tmp_path):
    """scripts/asha_cost.py --replay prices ASHA settings from the full grid's curves with
    vptune.sweep.replay; here the same curves go through a real Ray Tune job under --scheduler asha
    (one trial at a time, so the order is fixed) and both stop the same trials at the same epochs."""
    from rich.console import Console

    from vptune.sweep.replay import replay_asha
    from vptune.sweep.tune import RaySession, run_jobs

    config = SweepConfig("vptune_vit_fmnist", "linear", ["mini:digits"], tmp_path / "s",
                         train=TrainConfig(epochs=4, device="cpu"), lr_grid=tuple(CURVES), wd_grid=(0.0,), seeds=(42,),
                         num_cpus=1, scheduler="asha", asha_grace_period=1, asha_reduction_factor=2.0)
    runs = config.search_runs()
    with RaySession(config, Console(quiet=True)) as session:
        outcomes = run_jobs(session, [(config, r) for r in runs], "search", curve_trainer)
    real = [(o.status, o.metrics.get("epoch") if o.status == "stopped" else None) for o in outcomes]
    # By hand (rungs at epochs 1, 2, 4; cutoff = the median of the values recorded at the rung):
    # lr 5 is first everywhere; lr 1's 40 < 50; lr 0.5 passes epoch 1 (55 >= 45), not epoch 2 (50 < 60);
    # lr 0.25 passes both, then fails; lr 0.1's 45 < median(50, 40, 55, 60) = 52.5.
    assert real == [("done", None), ("stopped", 1), ("stopped", 2), ("failed", None), ("stopped", 1)]
    replayed = replay_asha([CURVES[r.base_lr] for r in runs], max_t=4, grace_period=1, reduction_factor=2.0, workers=1)
    assert replayed == [4, 1, 2, 2, 1]
    # Two at a time: lr 5 and lr 1 reach epoch 1 together; lr 1 (second) is cut by lr 5's 50 as before.
    assert replay_asha([CURVES[r.base_lr] for r in runs], 4, 1, 2.0, workers=2) == [4, 1, 2, 2, 1]
    assert replay_asha([CURVES[r.base_lr] for r in runs], 4, 4, 2.0, workers=1) == [4, 4, 4, 2, 4]  # grace 4: none stopped
