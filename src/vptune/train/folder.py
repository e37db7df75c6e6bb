"""A run folder's safety: what a command may write over, and one writer at a time.

``claim_run_folder`` looks at ``--out`` before anything is written. A missing or empty folder
is new. A folder holding files that no vptune run wrote (a user's own ``checkpoint.pt`` or
``metrics.json``) is refused, and so are a finished and a killed run unless the user asks to
resume them, or to overwrite them: nothing the user did not ask to lose is lost. A resumed
run must have been made with the same method, data and settings.

``run_folder_lock`` holds an advisory lock (``flock`` on ``.vptune-lock``, which records the
holder's pid) while a process writes the folder: a second process is refused with the
holder's pid, and a lock left by a killed process is free again, since the kernel releases a
``flock`` with the process that held it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..model import CONFIG_FILE, WEIGHTS_FILE, read_run_config
from ..tracking import MLFLOW_DB, MLFLOW_RUN_ID_FILE, TENSORBOARD_DIR
from .checkpoint import CHECKPOINT_FILE
from .config import with_defaults
from .loop import CURVE_FILE, RESUME_MUST_MATCH

LOCK_FILE = ".vptune-lock"
METRICS_FILE = "metrics.json"
INIT_FILE = "init.safetensors"  # the tuned tensors before training: E2VPT's rewinding restores them
PRUNE_FILE = "prune.json"
PRUNE_PROGRESS_FILE = "prune-progress.json"
# Every file train and prune write into a run folder, and the trackers' local logs: what
# --overwrite removes (nothing else).
RUN_FILES = (
    CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, CURVE_FILE, CHECKPOINT_FILE, INIT_FILE, PRUNE_FILE, PRUNE_PROGRESS_FILE,
    MLFLOW_DB, MLFLOW_RUN_ID_FILE,
)
RUN_FOLDERS = (TENSORBOARD_DIR,)


class RunFolderError(ValueError):
    """``--out`` cannot be used as asked: the message says what it holds and which flag would use it."""


def folder_state(folder: Path) -> str:
    """What ``folder`` holds: ``new`` (missing or empty), ``finished``, ``unfinished`` (a checkpoint),
    ``saved`` (a vptune config and weights, no checkpoint or metrics), ``pruning`` (a vptune prune's
    progress) or ``foreign`` (files that no vptune run wrote)."""
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder: choose another --out")
    names = _own_entries(folder)
    if not names:
        return "new"
    try:
        read_run_config(folder)
        has_config = True
    except (OSError, ValueError):
        has_config = False
    if (folder / PRUNE_PROGRESS_FILE).is_file() or (folder / PRUNE_FILE).is_file():
        return "pruning"
    if has_config and (folder / CHECKPOINT_FILE).is_file():
        return "unfinished"
    if has_config and (folder / METRICS_FILE).is_file():
        return "finished"
    return "saved" if has_config else "foreign"


def _own_entries(folder: Path) -> list[str]:
    """The folder's entries, less the lock and the temporary files of an interrupted atomic write."""
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE and not p.name.endswith(".tmp"))


def claim_run_folder(folder: Path, *, resume: bool, overwrite: bool, remove: bool = True, kind: str = "train") -> str:
    """Decide whether a ``kind`` command (``train`` or ``prune``) may write ``folder``; return its state.

    Refuses (RunFolderError) a foreign folder, and a run that ``train`` would otherwise replace,
    unless ``overwrite``; with ``overwrite`` (and ``remove``, on the process that writes) the
    files a run writes are removed first and the folder counts as new."""
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    state = folder_state(folder)
    if overwrite:
        if remove and folder.is_dir():
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
            for name in RUN_FOLDERS:
                if (folder / name).is_dir() and not (folder / name).is_symlink():
                    shutil.rmtree(folder / name)
        return "new"
    if state == "new":
        return state
    listing = _own_entries(folder)
    shown = ", ".join(listing[:5]) + (", ..." if len(listing) > 5 else "")
    if state == "foreign":
        raise RunFolderError(
            f"--out {folder} already holds files that no vptune run wrote ({shown}): choose another --out, "
            "or pass --overwrite to replace them"
        )
    if kind == "prune":
        if state == "pruning":
            return state  # an interrupted or finished pruning with the same settings continues (prune checks them)
        raise RunFolderError(
            f"--out {folder} holds a vptune {state} run, not a pruning: choose another --out, or pass --overwrite "
            "to replace it"
        )
    if state == "pruning":
        raise RunFolderError(f"--out {folder} holds a pruning, not a training run: choose another --out, "
                             "or pass --overwrite to replace it")
    if resume:
        if state == "saved":
            raise RunFolderError(f"cannot resume {folder}: it holds a saved model but no checkpoint; start a new run "
                                 "in another --out, or pass --overwrite to train over it")
        return state
    what = _describe(folder)
    if state == "finished":
        raise RunFolderError(
            f"{folder} holds a run of {what}, finished: pass --resume to read its metrics back, --overwrite to train "
            "it again, or choose another --out"
        )
    if state == "unfinished":
        raise RunFolderError(
            f"{folder} holds a run of {what}, unfinished (a checkpoint): pass --resume to continue it, --overwrite "
            "to start it over, or choose another --out"
        )
    raise RunFolderError(f"{folder} holds a saved model of {what}: choose another --out, or pass --overwrite to replace it")


def _describe(folder: Path) -> str:
    run = read_run_config(folder)
    data = run.get("metadata", {}).get("data")
    return f"{run['method_config'].get('method', '?')}" + (f" on {data}" if data else "")


def method_config_with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded method config with each option it lacks at that option's default: an option is
    added with a default that keeps what the method did before (APT's ``train_scale`` True), so a
    run recorded before it existed compares equal to a new invocation that leaves it out. A record
    the current code cannot read stays as it is (and then differs, with its keys in the error)."""
    from ..methods import config_from_dict

    try:
        return config_from_dict(saved).to_dict()
    except ValueError:
        return saved


def check_resume_settings(
    folder: Path, method_config: dict[str, Any], data: str, final: bool, backbone: str, train_config: dict[str, Any]
) -> None:
    """Refuse to resume (or read back) the run in ``folder`` under other settings than it was made with."""
    run = read_run_config(folder)
    meta = run.get("metadata", {})
    recorded = {
        "method": method_config_with_defaults(run["method_config"]), "data": meta.get("data"), "final": meta.get("final"),
        "backbone": meta.get("backbone", {}).get("spec"),
    }
    recorded = {key: value for key, value in recorded.items() if value is not None}  # an older folder may lack some
    if "train_config" in meta:  # None is a setting's value here (clip_grad: no clipping), so compared too
        saved = with_defaults(meta["train_config"], RESUME_MUST_MATCH)
        recorded.update({key: saved.get(key) for key in RESUME_MUST_MATCH})
    asked = {
        "method": method_config, "data": data, "final": final, "backbone": backbone,
        **{key: train_config.get(key) for key in RESUME_MUST_MATCH},
    }
    diffs = [f"{key} {recorded[key]!r} vs {asked[key]!r}" for key in asked if key in recorded and recorded[key] != asked[key]]
    if diffs:
        raise RunFolderError(
            f"cannot resume {folder}: it was made with other settings (then vs now: {'; '.join(diffs)}); resume with "
            "the original settings, pass --overwrite to train over it, or choose another --out"
        )


class RunFolderLocked(RunFolderError):
    """Another live process is writing the folder."""


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for this process while the block runs.

    A folder this call created is removed again if the block leaves it empty (a refused or
    failed command leaves nothing behind). Without ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms vptune is tested on
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder: choose another --out")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderLocked(
                f"{folder} is being written by another vptune process ({holder}): wait for it to end, or choose "
                "another --out"
            ) from None
        try:  # the previous holder may have removed the file between our open and flock: lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
    os.write(fd, json.dumps(holder).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock
        if created:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                pass


def _holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}: {holder.get('command', '')}".rstrip(": ")
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"
