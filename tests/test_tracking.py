"""Experiment tracking (vptune.tracking): what TensorBoard and MLflow receive is read back with
their own readers and matched against curve.csv and metrics.json; sweeps and benchmarks log
every run the same way; a missing library names the extra to install."""

import csv
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import two_class_workspace
from vptune.cli import app
from vptune.train import TrainConfig

runner = CliRunner()
EPOCH_FIELDS = ("epoch", "train_loss", "lr", "images_per_s", "val_top1", "val_loss")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return two_class_workspace(tmp_path_factory.mktemp("tracking"), train=4, size=16)


def train(workspace, out, *extra, exit_code=0):
    """vptune train: 3 epochs of 2 steps (8 images, batch 4), val every epoch."""
    args = [
        "train", "--method", "vpt-deep", "--num-prompts", 2, "--data", f"imagefolder:{workspace / 'images'}",
        "--out", out, "--weights", workspace / "backbone.safetensors", "--epochs", 3, "--batch-size", 4,
        "--lr", 0.05, "--warmup-epochs", 1, "--eval-every", 1, "--device", "cpu", *extra,
    ]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == exit_code, result.output
    return out


def curve(run: Path) -> list[dict[str, float]]:
    with open(run / "curve.csv") as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def check_against_curve(series: dict[str, dict[int, float]], run: Path, rel: float) -> None:
    """``series``: metric name -> {step: value}. The epoch series are curve.csv's rows, the step
    series cover every optimiser step and average to the epoch loss, test is metrics.json's."""
    rows, metrics = curve(run), json.loads((run / "metrics.json").read_text())
    steps = [int(row["step"]) for row in rows]
    assert steps == [2, 4, 6]
    for field in EPOCH_FIELDS:
        expected = {int(row["step"]): row[field] for row in rows}
        got = series[f"epoch/{field}"]
        assert got.keys() == expected.keys(), field
        assert all(math.isclose(got[s], expected[s], rel_tol=rel) for s in expected), (field, got, expected)
    for name in ("step/train_loss", "step/lr", "step/images_per_s"):
        assert sorted(series[name]) == list(range(1, 7)), name
    for epoch, end in enumerate(steps):  # two steps of 4 images each: their mean is the epoch's loss
        pair = [series["step/train_loss"][end - 1], series["step/train_loss"][end]]
        assert math.isclose(sum(pair) / 2, rows[epoch]["train_loss"], rel_tol=1e-5)
        assert math.isclose(series["step/lr"][end], rows[epoch]["lr"], rel_tol=rel)
    assert series["step/lr"][1] < series["step/lr"][2]  # warm-up: the lr climbs over the first epoch
    assert series["test/top1"] == {6: pytest.approx(metrics["test_top1"], rel=rel)}
    assert series["test/loss"] == {6: pytest.approx(metrics["test_loss"], rel=rel)}


def tensorboard_series(run: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    series = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return series, events.Tags()["tensors"]


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("vptune")
    return client, client.search_runs([experiment.experiment_id])


def mlflow_series(client, run_id: str) -> dict[str, dict[int, float]]:
    keys = client.get_run(run_id).data.metrics.keys()
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}


def test_tensorboard_event_files_hold_the_curve_every_step_and_the_test(workspace):
    run = train(workspace, workspace / "tb", "--tracker", "tensorboard")
    series, tensors = tensorboard_series(run)
    check_against_curve(series, run, rel=1e-6)  # event files store float32
    assert set(series) == {f"epoch/{f}" for f in EPOCH_FIELDS} | {
        "step/train_loss", "step/lr", "step/images_per_s", "test/top1", "test/loss"}
    assert any(tag.startswith("settings") for tag in tensors)  # the run's settings, as text


def test_mlflow_logs_to_an_sqlite_store_in_the_run_folder_by_default(workspace):
    run = train(workspace, workspace / "ml", "--tracker", "mlflow")
    client, runs = mlflow_runs(f"sqlite:///{run / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.run_name == "ml" and runs[0].info.status == "FINISHED"
    assert (run / "mlflow-run-id").read_text().strip() == runs[0].info.run_id
    check_against_curve(mlflow_series(client, runs[0].info.run_id), run, rel=1e-12)
    params = runs[0].data.params
    assert params["method"] == "vpt-deep" and params["method_config.num_prompts"] == "2"
    assert params["train.lr"] == "0.05" and params["train.epochs"] == "3" and params["data"].startswith("imagefolder:")
    assert "train.tracking_uri" not in params


def test_mlflow_logs_to_the_tracking_uri_given(workspace, tmp_path):
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    run = train(workspace, workspace / "ml-uri", "--tracker", "mlflow", "--tracking-uri", uri)
    assert not (run / "mlflow.db").exists()
    client, runs = mlflow_runs(uri)
    assert [r.info.run_name for r in runs] == ["ml-uri"]
    check_against_curve(mlflow_series(client, runs[0].info.run_id), run, rel=1e-12)


def test_a_missing_tracker_library_names_the_extra_and_writes_nothing(workspace, monkeypatch):
    import vptune.extras

    monkeypatch.setattr(vptune.extras, "installed", lambda module: module != "mlflow")
    out = workspace / "no-mlflow"
    result = runner.invoke(app, [
        "train", "--method", "linear", "--data", f"imagefolder:{workspace / 'images'}", "--out", str(out),
        "--weights", str(workspace / "backbone.safetensors"), "--tracker", "mlflow",
    ])
    assert result.exit_code == 1 and 'pip install "vptune[track]"' in result.output and "mlflow" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(tracker="wandb"), "tracker must be one of none, tensorboard, mlflow"),
        (dict(tracker="tensorboard", tracking_uri="sqlite:///x.db"), "a tracking URI is for --tracker mlflow"),
    ],
)
def test_bad_tracker_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_every_run_of_a_benchmark_logs_and_tracking_does_not_change_a_finished_run(workspace):
    from vptune.compare import compare, recipes_for

    task = f"imagefolder:{workspace / 'images'}"
    settings = {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0, "precision": "fp32"}
    out = workspace / "bench"
    rows = compare([task], recipes_for(["linear", "vpt-deep"], **settings, tracker="tensorboard"), out,
                   weights=workspace / "backbone.safetensors")
    for row in rows:
        series, _ = tensorboard_series(Path(row["run"]))
        assert series["epoch/val_top1"] == {2: pytest.approx(row["val_top1"], rel=1e-6)}
    # read back (not retrained) without a tracker: where a run logged is not one of its settings
    again = compare([task], recipes_for(["linear", "vpt-deep"], **settings), out, weights=workspace / "backbone.safetensors")
    assert [r["val_top1"] for r in again] == [r["val_top1"] for r in rows]


def test_every_trial_of_a_sweep_logs_into_one_mlflow_store(workspace):
    from vptune.sweep import SweepConfig, run_sweep

    out = Path(tempfile.mkdtemp(prefix="sweep-", dir="/tmp"))  # short: Ray's temp dir goes inside it
    try:
        config = SweepConfig(
            "vptune_vit_fmnist", "linear", [f"imagefolder:{workspace / 'images'}"], out,
            weights=str(workspace / "backbone.safetensors"),
            train=TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, device="cpu", tracker="mlflow"),
            lr_grid=(0.05, 5.0), wd_grid=(0.0,), seeds=(42,), num_cpus=2,
        )
        summary = run_sweep(config)
        folders = [Path(t["folder"]) for t in summary["tasks"]["images"]["trials"]]
        folders += [out / "final" / "images" / f"lr{summary['tasks']['images']['chosen']['base_lr']:g}_wd0" / "seed42"]
        client, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
        by_folder = {r.data.tags["vptune.run_folder"]: r for r in runs}
        assert sorted(by_folder) == sorted(str(f.absolute()) for f in folders)
        for folder in folders:
            series = mlflow_series(client, by_folder[str(folder.absolute())].info.run_id)
            assert series["epoch/train_loss"] == {2: pytest.approx(curve(folder)[0]["train_loss"], rel=1e-12)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_killed_run_resumes_into_the_same_mlflow_run_without_repeated_steps(workspace, monkeypatch):
    import vptune.train.loop as loop

    real_save, saves = loop.save_epoch, []

    def killed_in_epoch_two(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # epoch 2's steps 3 and 4 were logged, its checkpoint never written
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    out = workspace / "ml-resume"
    monkeypatch.setattr(loop, "save_epoch", killed_in_epoch_two)
    train(workspace, out, "--tracker", "mlflow", exit_code=130)  # interrupted: the checkpoint is kept
    client, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    assert runs[0].info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "step/train_loss")] == [1, 2, 3, 4]
    monkeypatch.setattr(loop, "save_epoch", real_save)
    train(workspace, out, "--tracker", "mlflow", "--resume")

    client, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "step/train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 once, not twice
    check_against_curve(mlflow_series(client, runs[0].info.run_id), out, rel=1e-12)
