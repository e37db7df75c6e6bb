"""Nothing a user did not ask to lose is lost: ``train`` and ``prune`` refuse an ``--out`` holding
the user's own files or a finished or killed run unless ``--overwrite`` (or ``--resume``), a
resumed run must match its settings, and a second process on the same folder is refused
while the first writes it (a lock left by a killed process is taken over)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vptune
from conftest import two_class_workspace
from vptune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return two_class_workspace(tmp_path_factory.mktemp("folder"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=400)


def train_args(workspace, out, *extra, method="vpt-deep"):
    return (
        "train", "--method", method, "--data", f"imagefolder:{workspace / 'images'}", "--out", out,
        "--weights", workspace / "backbone.safetensors", "--epochs", 1, "--batch-size", 4, "--lr", 0.05,
        "--warmup-epochs", 0, "--device", "cpu", *(("--num-prompts", 2) if method == "vpt-deep" else ()), *extra,
    )


@pytest.fixture(scope="module")
def finished(workspace):
    out = workspace / "finished"
    result = invoke(*train_args(workspace, out))
    assert result.exit_code == 0, result.output
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def users_folder(path: Path) -> Path:
    """A folder of the user's own files with the names a run writes, and one more."""
    path.mkdir()
    for name in ("checkpoint.pt", "model.safetensors", "metrics.json", "notes.txt"):
        (path / name).write_bytes(f"the user's own {name}".encode())
    return path


def test_train_refuses_a_folder_of_the_users_own_files_unless_overwrite(workspace, tmp_path):
    out = users_folder(tmp_path / "mine")
    before = snapshot(out)
    result = invoke(*train_args(workspace, out))
    assert result.exit_code == 1, result.output
    assert "already holds files that no vptune run wrote" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output and snapshot(out) == before  # nothing lost

    (out / "tensorboard").mkdir()  # a tracker's log of the run being replaced goes with it
    (out / "tensorboard" / "events.out.tfevents.1").write_text("old")
    result = invoke(*train_args(workspace, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["method"] == "vpt-deep" and not (out / "tensorboard").exists()
    assert (out / "notes.txt").read_bytes() == before["notes.txt"]  # --overwrite replaces only what a run writes
    assert not (out / ".vptune-lock").exists()


def test_rerunning_train_on_a_finished_run_is_refused_unless_overwrite(finished, workspace):
    before = snapshot(finished)
    result = invoke(*train_args(workspace, finished))
    assert result.exit_code == 1, result.output
    assert "holds a run of vpt-deep" in result.output and "finished" in result.output and "--resume" in result.output
    assert snapshot(finished) == before
    result = invoke(*train_args(workspace, finished, "--resume", "--overwrite"))
    assert result.exit_code == 1 and "pass one of them" in result.output and snapshot(finished) == before


def test_a_killed_run_is_not_restarted_from_scratch_without_resume_or_overwrite(workspace, tmp_path, monkeypatch):
    import vptune.train.loop as loop

    def kill(*args):
        raise KeyboardInterrupt

    out = tmp_path / "killed"
    real_save = loop.save_epoch
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_epoch", lambda *args: (real_save(*args), kill()))
        assert invoke(*train_args(workspace, out)).exit_code == 130
    before = snapshot(out)
    result = invoke(*train_args(workspace, out))
    assert result.exit_code == 1 and "unfinished" in result.output and "--resume" in result.output, result.output
    assert snapshot(out) == before


@pytest.mark.parametrize("change, differs", [
    (("--method", "linear"), "method"),
    (("--lr", "0.5"), "lr"),
    (("--data", None), "data"),
])
def test_resuming_a_finished_run_with_other_settings_is_refused(finished, workspace, tmp_path, change, differs):
    """It used to print the old metrics under the new title."""
    args = list(train_args(workspace, finished, "--resume"))
    flag, value = change
    if flag == "--data":  # the same images under another path: another data set as far as the run can tell
        shutil.copytree(workspace / "images", tmp_path / "images")
        value = f"imagefolder:{tmp_path / 'images'}"
    if flag == "--method":
        args = list(train_args(workspace, finished, "--resume", method=value))
    else:
        args[args.index(flag) + 1] = value
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "cannot resume" in result.output and f"{differs} " in result.output and "Traceback" not in result.output



def without_clip_grad(folder: Path) -> Path:
    """``folder``'s run as vptune wrote it before clip_grad existed: its recorded settings lack the key."""
    for name, where in (("config.json", ("metadata", "train_config")), ("metrics.json", ("train_config",))):
        data = json.loads((folder / name).read_text())
        settings = data
        for key in where:
            settings = settings[key]
        del settings["clip_grad"]
        (folder / name).write_text(json.dumps(data, indent=2))
    return folder


def test_a_run_from_before_clip_grad_is_read_back_unclipped_and_refused_with_clipping(finished, workspace, tmp_path):
    old = without_clip_grad(Path(shutil.copytree(finished, tmp_path / "old")))
    before = snapshot(old)
    result = invoke(*train_args(workspace, old, "--resume"))
    assert result.exit_code == 0, result.output
    assert snapshot(old) == before  # read back, not retrained
    result = invoke(*train_args(workspace, old, "--resume", "--clip-grad", "1.0"))
    assert result.exit_code == 1 and "cannot resume" in result.output and "clip_grad None vs 1.0" in result.output
    assert snapshot(old) == before


def test_prune_refuses_a_folder_of_the_users_own_files_unless_overwrite(finished, workspace, tmp_path):
    out = users_folder(tmp_path / "mine")
    before = snapshot(out)
    args = ("prune", "--run", finished, "--data", f"imagefolder:{workspace / 'images'}", "--out", out,
            "--token-rate", 0.5, "--segment-rate", 0, "--epochs", 1, "--device", "cpu", "--no-progress")
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "already holds files that no vptune run wrote" in result.output and snapshot(out) == before

    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "prune.json").is_file() and (out / "notes.txt").read_bytes() == before["notes.txt"]

    result = invoke(*train_args(workspace, out))  # a pruning's folder is not a training's
    assert result.exit_code == 1 and "holds a pruning" in result.output, result.output


HOLDER = r"""
import sys, time
import vptune.train.loop as loop

real_save = loop.save_epoch

def save_then_wait(*args):
    real_save(*args)
    print("first epoch saved", flush=True)
    time.sleep(300)

loop.save_epoch = save_then_wait
from vptune.cli import app
app(sys.argv[1:])
"""


def test_a_second_training_on_a_folder_being_written_is_refused_and_a_dead_holders_lock_is_taken_over(
    workspace, tmp_path
):
    """Two trainings on one --out used to replace each other's files silently."""
    out = tmp_path / "run"
    args = [str(a) for a in train_args(workspace, out, "--epochs", "2")]
    env = {**os.environ, "PYTHONPATH": str(Path(vptune.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        seen = []
        for line in holder.stdout:  # wait until the first process is in the middle of its training
            seen.append(line)
            if "first epoch saved" in line:
                break
        assert (out / "checkpoint.pt").is_file(), "".join(seen)
        before = snapshot(out)
        result = invoke(*train_args(workspace, out, "--epochs", "2", "--resume"))
        assert result.exit_code == 1, result.output
        assert "being written by another vptune process" in result.output
        assert f"pid {holder.pid}" in result.output and "Traceback" not in result.output
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".vptune-lock").is_file()  # killed: its lock file stays behind, but no process holds it
    result = invoke(*train_args(workspace, out, "--epochs", "2", "--resume"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2 and not (out / ".vptune-lock").exists()


def test_a_run_from_before_a_method_option_existed_reads_back_with_its_default(finished, workspace, tmp_path):
    """A method option added later (VPT's ``swin``, APT's ``train_scale`` and ``dropout``) is absent from
    older records; its default keeps what the method did before, so the old run reads back (the mini
    benchmark's APT runs of a week earlier were refused as 'made with other settings')."""
    old = Path(shutil.copytree(finished, tmp_path / "old-method"))
    config = json.loads((old / "config.json").read_text())
    del config["method_config"]["swin"], config["method_config"]["segment_layout"]
    (old / "config.json").write_text(json.dumps(config, indent=2))
    before = snapshot(old)
    result = invoke(*train_args(workspace, old, "--resume"))
    assert result.exit_code == 0, result.output
    assert snapshot(old) == before  # read back, not retrained
