"""Live tasks: the folder of run folders is watched, and tasks follow it while the server runs.

Every ``interval_s`` the watcher looks at each subfolder of the tasks folder (a cheap
``stat`` of its files, nothing is read). A folder whose run is complete (``config.json``
and ``model.safetensors`` present, no ``*.tmp`` file of ``save_pretrained`` left) gets a
signature: the names, sizes and modification times of its files. A change is acted on only
once it has held for ``settle_s``, so a folder being copied or written is never read
half-way:

- a new folder is loaded (read, checked, its weights built) and then served;
- a changed folder is loaded aside and swapped in with ``MultiTaskModel.put``: batches see
  the old or the new run, and requests that came for the old one finish on it;
- a folder that is gone (or holds no run any more) is unloaded;
- a folder that cannot be loaded (damaged, another backbone, an absurd class count, a
  method that cannot share the pass) is skipped with the reason, and tried again only
  when it changes. A folder being written (``*.tmp`` present, or only one of the two files)
  leaves the task as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from torch import nn

from ..model import CONFIG_FILE, WEIGHTS_FILE
from .multitask import TASK_NAME, MultiTaskModel

log = logging.getLogger("vptune.serve")

BUSY = "busy"  # the folder is being written: leave the task as it is
Signature = tuple | str | None  # files' (name, size, mtime); BUSY; None: no run there


def folder_signature(folder: Path) -> Signature:
    """What the folder holds now, from ``stat`` alone: None (no run), BUSY, or a signature."""
    try:
        files = [(entry.name, entry.stat()) for entry in folder.iterdir() if entry.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return None
    names = {name for name, _ in files}
    if any(name.endswith(".tmp") for name in names):
        return BUSY
    has = (CONFIG_FILE in names, WEIGHTS_FILE in names)
    if not any(has):
        return None
    if not all(has):
        return BUSY
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in files))


class TaskWatcher:
    """Keeps ``model``'s tasks in step with the run folders under ``root``."""

    def __init__(self, model: MultiTaskModel, root: str | Path, interval_s: float = 1.0, settle_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.root = model, Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--tasks {self.root} is not a folder: expected a folder of run folders, one per task")
        self.interval_s, self.settle_s, self.clock = interval_s, settle_s, clock
        self.loaded: dict[str, Signature] = {}  # task -> signature of the folder it was loaded from
        self.skipped: dict[str, str] = {}  # folder -> why it is not served
        self._failed: dict[str, Signature] = {}  # folder -> signature that failed to load
        self._pending: dict[str, tuple[Signature, float]] = {}  # folder -> (signature seen, since when)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _scan(self) -> dict[str, Signature]:
        found: dict[str, Signature] = {}
        resolved = self.root.resolve()
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir():
                continue
            if resolved not in folder.resolve().parents:
                if (folder / CONFIG_FILE).is_file():
                    self.skipped[folder.name] = f"links outside {self.root}"
                continue
            if not TASK_NAME.match(folder.name):
                if (folder / CONFIG_FILE).is_file():
                    self.skipped[folder.name] = "not a valid task name (letters, digits, '_' or '-', at most 64)"
                continue
            found[folder.name] = folder_signature(folder)
        return found

    def poll(self, settle: bool = True) -> list[str]:
        """One look at the folder; returns what changed, one line per task. ``settle=False``
        acts on every complete folder at once (the first load, before serving)."""
        now, events = self.clock(), []
        found = self._scan()
        for name in sorted(set(found) | set(self.loaded) | set(self._pending)):
            signature = found.get(name)
            if signature == self.loaded.get(name):  # unchanged (or no run, and none loaded)
                self._pending.pop(name, None)
                continue
            if signature == BUSY and not settle and name not in self.loaded:
                self.skipped[name] = f"incomplete: {CONFIG_FILE} and {WEIGHTS_FILE} are not both there, or a .tmp file is being written"
            if signature == BUSY or (name in self._failed and self._failed[name] == signature):
                self._pending.pop(name, None)
                continue
            seen = self._pending.get(name)
            if settle and (seen is None or seen[0] != signature):
                self._pending[name] = (signature, now)
                continue
            if settle and now - seen[1] < self.settle_s:
                continue
            self._pending.pop(name, None)
            events.append(self._apply(name, signature))
        return [event for event in events if event]

    def _apply(self, name: str, signature: Signature) -> str:
        folder = self.root / name
        if signature is None:
            self._failed.pop(name, None)
            self.skipped.pop(name, None)
            if name in self.loaded:
                del self.loaded[name]
                self.model.remove_task(name)
                return f"removed {name}"
            return ""
        try:
            task = self.model.load_task(name, folder)
        except Exception as error:  # noqa: BLE001  one bad folder must not stop the others
            self._failed[name] = signature
            self.skipped[name] = str(error)
            return f"skipped {name}: {error}"
        if folder_signature(folder) != signature:  # written to while it was read: look again later
            return ""
        replaced = name in self.loaded
        self.model.put(task, replace=True)
        self.loaded[name] = signature
        self._failed.pop(name, None)
        self.skipped.pop(name, None)
        return f"{'replaced' if replaced else 'loaded'} {name}"

    # --- the background thread -------------------------------------------------------------
    def start(self) -> None:
        """Poll in a daemon thread until ``stop``."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vptune-task-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                for event in self.poll():
                    log.warning("tasks: %s", event) if event.startswith("skipped") else log.info("tasks: %s", event)
            except Exception:  # noqa: BLE001  the watcher must outlive a bad moment of the file system
                log.exception("watching %s failed; retrying", self.root)


def open_tasks(
    backbone: nn.Module, tasks_dir: str | Path, interval_s: float = 1.0, settle_s: float = 1.0, allow_empty: bool = False,
) -> TaskWatcher:
    """Load every run folder directly under ``tasks_dir`` as a task named after its folder, and
    return the watcher that keeps them in step (``watcher.model``; ``watcher.skipped`` says why
    a folder is not served). Refuses a folder with no servable run at all, unless ``allow_empty``
    (a watched folder that runs will be written into)."""
    watcher = TaskWatcher(MultiTaskModel(backbone), tasks_dir, interval_s, settle_s)
    watcher.poll(settle=False)
    if not watcher.model.task_names and not allow_empty:
        reasons = "; ".join(f"{name}: {why}" for name, why in watcher.skipped.items())
        raise ValueError(f"no task to serve in {tasks_dir}: {reasons or 'it holds no run folders (config.json + model.safetensors)'}")
    return watcher
