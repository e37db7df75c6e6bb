"""Bad input a careless user or an attacker gives the command line: each is one red line and a
non-zero exit, never a traceback, and one bad image among several does not cost the others
their predictions. Also what must never happen by itself: a download, Ray started for data
that is not there, terminal escape sequences from a class name reaching the terminal."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import huge_png as png
from conftest import two_class_workspace
from vptune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return two_class_workspace(tmp_path_factory.mktemp("bad"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=400)


def train_args(workspace, out, *extra):
    return (
        "train", "--method", "linear", "--data", f"imagefolder:{workspace / 'images'}", "--out", out,
        "--weights", workspace / "backbone.safetensors", "--epochs", 1, "--batch-size", 4, "--lr", 0.05,
        "--warmup-epochs", 0, "--device", "cpu", *extra,
    )


@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace / "run"
    result = invoke(*train_args(workspace, out))
    assert result.exit_code == 0, result.output
    return out


def one_red_line(result, *needles):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def copy_run(trained, tmp_path, **config_changes):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = json.loads((run / "config.json").read_text())
    for key, value in config_changes.items():
        if key == "class_names":
            config["metadata"]["class_names"] = value
        else:
            config[key] = value
    (run / "config.json").write_text(json.dumps(config))
    return run


# --- predict ------------------------------------------------------------------------------


def test_predict_reports_a_decompression_bomb_and_an_oversized_image_and_still_classifies_the_good_ones(
    trained, workspace, tmp_path
):
    """One 400-megapixel PNG (beyond Pillow's own bomb limit) used to stop predict with a traceback,
    printing nothing for the good files; a 100-megapixel one was decoded with only a warning."""
    good = workspace / "images" / "test" / "red" / "0.png"
    bomb = png(tmp_path / "bomb.png", 20_000, 20_000)
    big = png(tmp_path / "big.png", 10_000, 10_000)
    assert bomb.stat().st_size < 100_000 and big.stat().st_size < 100_000
    result = invoke("predict", "--run", trained, "--top-k", 2, good, bomb, big, good)
    one_red_line(result, "2 of 4 images could not be read")
    assert result.output.count("0.png: ") == 2 and "red (" in result.output
    assert "bomb.png" in result.output and "big.png" in result.output
    assert "10000x10000 = 100 megapixels, above the limit of 16 megapixels" in result.output


def test_predict_takes_a_larger_pixel_limit_when_asked(trained, tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(image)
    result = invoke("predict", "--run", trained, "--max-image-pixels", 50_000, image)
    one_red_line(result, "300x200", "above the limit")
    assert invoke("predict", "--run", trained, "--max-image-pixels", 60_000, image).exit_code == 0


@pytest.mark.parametrize("top_k", [-1, 0])
def test_predict_top_k_below_one_is_refused(trained, workspace, top_k):
    """-1 was a traceback from torch.topk; 0 printed nothing and exited 0."""
    good = workspace / "images" / "test" / "red" / "0.png"
    one_red_line(invoke("predict", "--run", trained, "--top-k", top_k, good), "--top-k must be >= 1")


def test_a_config_with_fewer_class_names_than_classes_is_refused(trained, workspace, tmp_path):
    run = copy_run(trained, tmp_path, class_names=["blue"])
    good = workspace / "images" / "test" / "red" / "0.png"
    one_red_line(invoke("predict", "--run", run, "--top-k", 2, good), "holds 1 names for 2 classes")


@pytest.mark.parametrize("num_classes", [10**12, 2_000_000])
def test_an_absurd_num_classes_is_refused_with_the_reason(trained, workspace, tmp_path, num_classes):
    run = copy_run(trained, tmp_path, num_classes=num_classes)
    good = workspace / "images" / "test" / "red" / "0.png"
    one_red_line(invoke("predict", "--run", run, good), f"num_classes is {num_classes:,}", "more than 1,000,000 classes")


def test_class_names_with_terminal_escapes_are_printed_harmless(trained, workspace, tmp_path):
    evil = "\x1b]0;owned\x07\x1b[2J\x1b[31mred"
    run = copy_run(trained, tmp_path, class_names=["blue", evil])
    good = workspace / "images" / "test" / "red" / "0.png"
    result = invoke("predict", "--run", run, "--top-k", 2, good)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred" in result.output


# --- one red line -------------------------------------------------------------------------


def test_device_cuda_without_cuda_is_one_red_line(workspace, trained, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_red_line(invoke(*train_args(workspace, tmp_path / "run", "--device", "cuda")), "--device cuda", "--device cpu")
    assert not (tmp_path / "run").exists()
    result = invoke("eval", "--run", trained, "--data", f"imagefolder:{workspace / 'images'}", "--device", "cuda:1")
    one_red_line(result, "--device cuda:1", "--device cpu")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['VPTUNE_PAYLOAD_MARK'])}",))


def bad_weights(kind: str, workspace: Path, tmp_path: Path) -> Path:
    good = (workspace / "backbone.safetensors").read_bytes()
    if kind == "truncated-safetensors":
        path = tmp_path / "w.safetensors"
        path.write_bytes(good[: len(good) // 2])
    elif kind == "truncated-pth":
        path = tmp_path / "w.pth"
        torch.save({"model": {"x": torch.ones(3)}}, path)
        path.write_bytes(path.read_bytes()[:-40])
    else:  # a pickle that would run a command when unpickled
        path = tmp_path / "w.pth"
        path.write_bytes(pickle.dumps({"model": Payload()}))
    return path


@pytest.mark.parametrize("kind", ["truncated-safetensors", "truncated-pth", "malicious-pth"])
def test_a_damaged_or_malicious_weights_file_is_one_red_line(workspace, tmp_path, monkeypatch, kind):
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("VPTUNE_PAYLOAD_MARK", str(mark))
    weights = bad_weights(kind, workspace, tmp_path)
    args = list(train_args(workspace, tmp_path / "run"))
    args[args.index("--weights") + 1] = weights
    one_red_line(invoke(*args), f"weights file {weights} cannot be read")
    assert not mark.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to make a write fail with ENOSPC")
@pytest.mark.parametrize("name", ["model.safetensors", "checkpoint.pt", "curve.csv", "metrics.json"])
def test_a_full_disk_is_one_red_line(workspace, tmp_path, monkeypatch, name):
    """The temporary file of one write is a link to /dev/full, where every write fails with ENOSPC
    (torch.save raises a RuntimeError for it). safetensors writes through a temporary file of
    its own, so for it the error it raises on a full disk (seen on a full tmpfs) is raised in its place."""
    out = tmp_path / "run"
    out.mkdir()
    if name == "model.safetensors":
        from safetensors import SafetensorError

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr("vptune.model.save_file", full)
    else:
        (out / f"{name}.tmp").symlink_to("/dev/full")
    result = invoke(*train_args(workspace, out))
    one_red_line(result, f"could not write {out / name}", "Is the disk full?")
    assert not (out / f"{name}.tmp").exists() and Path("/dev/full").exists()


# --- never by itself: a download, Ray for missing data --------------------------------------


def pretrained_run(tmp_path: Path) -> tuple[Path, dict]:
    """A run folder whose config says it was trained on timm's pretrained vit_tiny weights."""
    import timm

    from vptune import PromptModel, config_for

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    model = PromptModel(net, config_for("linear"), 2)
    model.metadata.update(class_names=["cat", "dog"], data="imagefolder:/somewhere",
                          backbone={"spec": "vit_tiny_patch16_224", "weights": None, "pretrained": True})
    run = tmp_path / "pretrained-run"
    model.save_pretrained(run)
    return run, net.state_dict()


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """Empty hub caches, and a record of every timm model built with pretrained=True (a download)."""
    import huggingface_hub
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    downloads = []
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            downloads.append(name)
            raise ConnectionError("no network in the tests")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    return tmp_path / "hf-cache", downloads


def test_a_pretrained_run_folder_never_downloads_by_itself(no_hub, workspace, tmp_path):
    cache, downloads = no_hub
    run, state = pretrained_run(tmp_path)
    image = workspace / "images" / "test" / "red" / "0.png"
    result = invoke("predict", "--run", run, image)
    one_red_line(result, "never downloads them by itself", "--weights")
    assert downloads == []

    # the weights an earlier download left in the hub cache are used, offline
    from safetensors.torch import save_file

    snapshot = cache / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    result = invoke("predict", "--run", run, image)
    assert result.exit_code == 0, result.output
    assert "0.png: " in result.output and downloads == []


def test_a_sweep_checks_its_data_before_ray_starts(workspace, tmp_path, monkeypatch):
    from vptune.sweep.tune import RaySession

    started = []

    def start(self):
        started.append(True)
        raise RuntimeError("Ray started")

    monkeypatch.setattr(RaySession, "start", start)
    result = invoke("sweep", "--method", "linear", "--data", f"imagefolder:{tmp_path / 'missing'}", "--out",
                    tmp_path / "sweep", "--weights", workspace / "backbone.safetensors", "--epochs", 1,
                    "--lr-grid", "1", "--wd-grid", "0", "--seeds", "1")
    one_red_line(result, "missing: no such folder")
    assert started == []


def test_a_sweep_with_failed_runs_exits_non_zero(tmp_path, monkeypatch):
    import vptune.sweep

    summary = {"tasks": {}, "groups": {}, "failed": [{"run": "task/lr1-wd0", "error": "boom"}]}
    monkeypatch.setattr(vptune.sweep, "run_sweep", lambda config, console=None: summary)
    result = invoke("sweep", "--method", "linear", "--data", "mini:digits", "--out", tmp_path / "sweep")
    one_red_line(result, "1 runs failed")
