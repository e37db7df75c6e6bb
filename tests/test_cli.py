"""The train, eval and predict commands end to end through typer's CliRunner, on the bundled
architecture with random weights and a tiny image folder."""

import csv
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import two_class_workspace
from vptune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Random bundled-backbone weights and an image folder with train/val/test splits of two classes."""
    return two_class_workspace(tmp_path_factory.mktemp("cli"), train=6)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def train_args(workspace, out, *extra):
    return (
        "train", "--method", "vpt-deep", "--num-prompts", 2, "--data", f"imagefolder:{workspace / 'images'}",
        "--out", out, "--weights", workspace / "backbone.safetensors", "--epochs", 2, "--batch-size", 4,
        "--lr", 0.05, "--warmup-epochs", 1, "--device", "cpu", *extra,
    )


@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace / "run"
    result = invoke(*train_args(workspace, out))
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_weights_metrics_and_curve(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("val_top1", "test_top1", "tuned_params", "tuned_percent", "extra_gflops", "wall_time_s",
                "images_per_s", "method", "backbone", "data", "epochs", "skipped_images"):
        assert key in metrics, key
    assert metrics["method"] == "vpt-deep" and metrics["epochs"] == 2 and metrics["skipped_images"] == 0
    assert metrics["tuned_params"] == 6 * 2 * 192 + 192 * 2 + 2  # prompts in 6 blocks + head
    assert metrics["tuned_percent"] == pytest.approx(100 * metrics["tuned_params"] / metrics["backbone_params"])
    assert metrics["extra_gflops"] > 0
    rows = list(csv.DictReader((trained / "curve.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [3, 6]
    config = json.loads((trained / "config.json").read_text())
    assert config["metadata"]["class_names"] == ["blue", "red"]
    assert config["metadata"]["backbone"]["spec"] == "vptune_vit_fmnist"
    assert not (trained / "checkpoint.pt").exists()  # a complete run keeps only what serving needs



def test_clip_grad_reaches_the_runs_settings_and_its_steps(trained, workspace, tmp_path):
    """--clip-grad is recorded where every setting is (config.json, metrics.json) and changes the
    steps: the same run without it (``trained``) records None and ends elsewhere."""
    from safetensors.torch import load_file

    out = tmp_path / "clipped"
    result = invoke(*train_args(workspace, out, "--clip-grad", "0.001"))
    assert result.exit_code == 0, result.output
    for folder, clip in ((out, 0.001), (trained, None)):
        assert json.loads((folder / "metrics.json").read_text())["train_config"]["clip_grad"] == clip
        assert json.loads((folder / "config.json").read_text())["metadata"]["train_config"]["clip_grad"] == clip
    clipped, plain = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert clipped.keys() == plain.keys() and all(not torch.equal(clipped[k], plain[k]) for k in plain)


def test_eval_reproduces_the_runs_own_val_accuracy(trained, workspace):
    result = invoke("eval", "--run", trained, "--data", f"imagefolder:{workspace / 'images'}", "--split", "val")
    assert result.exit_code == 0, result.output
    val_top1 = json.loads((trained / "metrics.json").read_text())["val_top1"]
    assert f"top-1 {val_top1:.2f}%" in result.output


def test_eval_without_data_scores_the_data_the_run_was_trained_on(trained, workspace):
    result = invoke("eval", "--run", trained, "--split", "val")
    assert result.exit_code == 0, result.output
    assert f"data: imagefolder:{workspace / 'images'} (the run's own" in " ".join(result.output.split())
    val_top1 = json.loads((trained / "metrics.json").read_text())["val_top1"]
    assert f"top-1 {val_top1:.2f}%" in result.output


def test_predict_lists_labels_and_names_a_corrupt_file(trained, workspace, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good = workspace / "images" / "test" / "red" / "0.png"
    result = runner.invoke(app, ["predict", "--run", str(trained), "--top-k", "2", str(good), str(bad)], terminal_width=300)
    assert result.exit_code == 1
    assert "0.png" in result.output and "red (" in result.output and "blue (" in result.output
    assert "cannot read" in result.output and "broken.png" in result.output
    assert "Traceback" not in result.output


def test_resume_of_a_finished_run_returns_its_metrics(trained, workspace):
    before = (trained / "metrics.json").read_text()
    result = invoke(*train_args(workspace, trained, "--resume"))
    assert result.exit_code == 0, result.output
    assert (trained / "metrics.json").read_text() == before


def test_a_run_folder_of_another_method_is_refused(trained, workspace):
    args = list(train_args(workspace, trained))
    args[args.index("--method") + 1] = "e2vpt"
    result = runner.invoke(app, [str(a) for a in args], terminal_width=300)
    assert result.exit_code == 1
    assert "holds a run of" in result.output and "Traceback" not in result.output


def test_eval_refuses_a_backbone_of_another_architecture(trained, workspace):
    result = invoke("eval", "--run", trained, "--data", f"imagefolder:{workspace / 'images'}", "--backbone", "vit_tiny_patch16_224")
    assert result.exit_code == 1
    assert "mismatch in" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "linear", "--num-prompts", "5"), "method 'linear' has no option --num-prompts"),
        (("--method", "vpt-deep", "--option", "deep_prompts=1"), "has no option --deep-prompts"),
        (("--method", "vpt-deep", "--path", "sideways"), "path must be 'kv' or 'tokens'"),
        (("--method", "prompt-magic"), "unknown method 'prompt-magic'"),
        (("--method", "linear", "--optimizer", "lion"), "optimizer must be 'sgd' or 'adamw'"),
        (("--method", "linear", "--clip-grad", "0"), "clip_grad must be a positive number"),
        (("--method", "linear", "--clip-grad", "-1"), "clip_grad must be a positive number"),
    ],
)
def test_bad_options_are_one_clear_line(args, message, tmp_path):
    result = runner.invoke(app, ["train", *args, "--data", "imagefolder:/nowhere", "--out", str(tmp_path)], terminal_width=300)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_missing_data_folder_is_one_clear_line(workspace, tmp_path):
    args = list(train_args(workspace, tmp_path / "run"))
    args[args.index("--data") + 1] = f"imagefolder:{tmp_path / 'missing'}"
    result = runner.invoke(app, [str(a) for a in args], terminal_width=300)
    assert result.exit_code == 1 and "no such folder" in result.output and "Traceback" not in result.output


def test_a_diverging_run_stops_with_a_non_zero_exit(workspace, tmp_path):
    args = train_args(workspace, tmp_path / "run", "--lr", "1e38", "--epochs", "1")
    result = runner.invoke(app, [str(a) for a in args], terminal_width=300)
    assert result.exit_code == 1
    assert "loss became" in result.output and "Traceback" not in result.output


@pytest.mark.filterwarnings("ignore:.*no train/val/test subfolders")
def test_eval_refuses_data_with_other_classes(trained, workspace, tmp_path):
    for name in ("cat", "dog", "emu"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    result = runner.invoke(app, ["eval", "--run", str(trained), "--data", f"imagefolder:{tmp_path}", "--split", "train"],
                           terminal_width=300)
    assert result.exit_code == 1
    assert "has 3 classes" in result.output and "trained on 2 classes" in result.output


def test_method_options_map_onto_the_config_fields():
    from vptune.cli import method_options
    from vptune.methods import config_for

    options = method_options("vpt-deep", {"num_prompts": 4, "rank": None}, ["layers=[0,2]", "location=prepend"])
    assert options == {"num_prompts": 4, "layers": [0, 2], "location": "prepend"}
    assert config_for("vpt-deep", **options).layers == (0, 2)
    with pytest.raises(ValueError, match="method 'apt' has no option --path; its options are: --num-prompts, --rank"):
        method_options("apt", {"path": "kv"}, [])
    with pytest.raises(ValueError, match="--option expects KEY=VALUE"):
        method_options("vpt-deep", {}, ["layers"])


def test_a_killed_run_resumes_to_the_uninterrupted_result(trained, workspace, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import vptune.train.loop as loop

    real_save = loop.save_epoch

    def save_then_kill(model, optimizer, data, cfg, out_dir, state):
        real_save(model, optimizer, data, cfg, out_dir, state)
        raise KeyboardInterrupt  # Ctrl-C right after the first epoch's checkpoint

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_epoch", save_then_kill)
        result = runner.invoke(app, [str(a) for a in train_args(workspace, out)], terminal_width=300)
    assert result.exit_code == 130 and "--resume to continue" in result.output
    assert (out / "checkpoint.pt").is_file() and not (out / "metrics.json").exists()

    result = invoke(*train_args(workspace, out, "--resume"))
    assert result.exit_code == 0, result.output
    straight, resumed = load_file(str(trained / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight) and straight.keys() == resumed.keys()
    timing = {"wall_time_s", "images_per_s"}
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (trained, out))
    assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in expected.items() if k not in timing}


def test_a_run_folder_made_on_other_backbone_weights_is_refused(trained, workspace, tmp_path):
    """Same architecture, other values: resuming (or reading back) the run would mix two backbones."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(str(workspace / "backbone.safetensors")).items()}, str(other))
    recorded = json.loads((trained / "config.json").read_text())["backbone_weights"]
    args = list(train_args(workspace, trained, "--resume"))  # without --resume a finished run is refused anyway
    args[args.index("--weights") + 1] = other
    result = runner.invoke(app, [str(a) for a in args], terminal_width=300)
    assert result.exit_code == 1, result.output
    assert "was made on other backbone weights" in result.output and recorded in result.output
    # Reading the run back is refused the same way: eval and predict (serve: test_server).
    image = next((workspace / "images" / "test").rglob("*.png"))
    for args in (("eval", "--run", trained, "--data", f"imagefolder:{workspace / 'images'}"), ("predict", "--run", trained, image)):
        result = runner.invoke(app, [str(a) for a in (*args, "--weights", other)], terminal_width=300)
        assert result.exit_code == 1, result.output
        assert "was made on other backbone weights" in result.output and recorded in result.output
