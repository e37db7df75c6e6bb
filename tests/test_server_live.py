"""Live tasks: the server follows its tasks folder (add, replace, remove) without failing a request;
graceful shutdown of a real `vptune serve` process on SIGTERM."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from conftest import tiny_vit
from test_serve import make_run
from test_server import png

from vptune import MultiTaskModel
from vptune.serve.live import BUSY, TaskWatcher, folder_signature, open_tasks
from vptune.serve.server import BackgroundServer, ServeConfig, create_app

TIMEOUT = httpx.Timeout(30.0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def labels_of(model, name):
    return model.task(name).labels


def test_watcher_loads_replaces_and_removes_only_settled_complete_folders(tmp_path):
    backbone = tiny_vit()
    root = tmp_path / "tasks"
    make_run(backbone, "vpt-deep", dict(num_prompts=2), 3, root / "a", 0)
    model, clock = MultiTaskModel(backbone), Clock()
    watcher = TaskWatcher(model, root, interval_s=0.1, settle_s=1.0, clock=clock)
    assert watcher.poll(settle=False) == ["loaded a"] and model.task_names == ["a"]

    # A folder being written (the .tmp of save_pretrained, or one of the two files) is left alone.
    (root / "b").mkdir()
    (root / "b" / "config.json").write_text((root / "a" / "config.json").read_text())
    assert folder_signature(root / "b") == BUSY
    clock.now = 10.0
    assert watcher.poll() == [] and model.task_names == ["a"]
    # Complete: served only once it has not changed for settle_s.
    make_run(backbone, "apt", dict(num_prompts=3), 4, root / "b", 1)
    assert watcher.poll() == [] and model.task_names == ["a"]
    clock.now = 10.5
    assert watcher.poll() == []
    clock.now = 11.1
    assert watcher.poll() == ["loaded b"] and model.task_names == ["a", "b"]
    assert labels_of(model, "b") == [f"apt-{i}" for i in range(4)]

    # Replaced in place with another run (other method and classes): swapped once settled.
    held = model.task("b")
    make_run(backbone, "e2vpt", {}, 6, root / "b", 2)
    assert watcher.poll() == [] and model.task("b") is held
    clock.now = 12.2
    assert watcher.poll() == ["replaced b"]
    assert model.task("b") is not held and model.task("b").method_name == "e2vpt" and len(labels_of(model, "b")) == 6
    images = torch.randn(2, 3, 32, 32)
    old, new = model(images, [held, "b"])  # a request holding the old task is still answered by it
    assert old.shape == (4,) and new.shape == (6,)

    # Removed: unloaded once it has stayed gone for settle_s (a folder renamed away and back is not).
    shutil.move(root / "a", tmp_path / "a-aside")
    assert watcher.poll() == []
    shutil.move(tmp_path / "a-aside", root / "a")
    clock.now = 13.5
    assert watcher.poll() == [] and "a" in model.task_names
    shutil.rmtree(root / "a")
    assert watcher.poll() == []
    clock.now = 14.6
    assert watcher.poll() == ["removed a"] and model.task_names == ["b"]


def test_watcher_skips_a_bad_folder_until_it_changes(tmp_path):
    backbone = tiny_vit()
    root = tmp_path / "tasks"
    make_run(backbone, "linear", {}, 2, root / "good", 0)
    make_run(backbone, "vpt-deep", dict(num_prompts=2), 3, root / "half", 1)
    weights = root / "half" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a half-written file that stopped changing
    clock = Clock()
    watcher = TaskWatcher(MultiTaskModel(backbone), root, settle_s=1.0, clock=clock)
    loaded, skipped = watcher.poll(settle=False)
    assert loaded == "loaded good"
    assert skipped.startswith("skipped half: ") and "not a readable safetensors file" in skipped
    assert watcher.model.task_names == ["good"] and "half" in watcher.skipped
    clock.now = 5.0
    assert watcher.poll() == []  # not tried again while unchanged
    weights.write_bytes(whole)
    watcher.poll()
    clock.now = 6.5
    assert watcher.poll() == ["loaded half"] and "half" not in watcher.skipped


def test_an_empty_folder_is_refused_unless_watched(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no task to serve"):
        open_tasks(tiny_vit(), tmp_path)
    watcher = open_tasks(tiny_vit(), tmp_path, settle_s=0.0, allow_empty=True)
    assert watcher.model.task_names == []
    make_run(watcher.model.backbone, "linear", {}, 2, tmp_path / "first", 0)
    watcher.poll()  # seen
    assert watcher.poll() == ["loaded first"]


def _write_elsewhere_then_move(backbone, method, options, classes, target, seed, prefix):
    aside = target.parent.parent / f"{target.name}.writing"
    make_run(backbone, method, options, classes, aside, seed)
    config = aside / "config.json"
    config.write_text(config.read_text().replace(f'"{method}-', f'"{prefix}-'))
    os.replace(aside, target)


async def _load(url, names, stop, results):
    """Clients posting to ``names`` in turn until ``stop`` is set (at most 2000 requests)."""
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
        async def client_loop(offset):
            j = offset
            while not stop.is_set() and len(results) < 2000:
                name = names[j % len(names)]
                response = await client.post(f"/v1/tasks/{name}/predict", params={"k": 100}, files={"file": ("x.png", png(j % 5), "image/png")})
                results.append((name, response.status_code, response.json()))
                j += 1

        await asyncio.gather(*(client_loop(i) for i in range(4)))


def _wait_for(condition, url, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = {t["name"]: t for t in httpx.get(f"{url}/v1/tasks", timeout=TIMEOUT).json()["tasks"]}
        if condition(tasks):
            return tasks
        time.sleep(0.1)
    raise AssertionError(f"the task list did not change within {timeout_s} s: {sorted(tasks)}")


def test_add_replace_remove_under_load_fails_no_request(tmp_path):
    backbone = tiny_vit()
    root = tmp_path / "tasks"
    make_run(backbone, "vpt-deep", dict(num_prompts=3), 4, root / "stable", 0)
    _write_elsewhere_then_move(backbone, "apt", dict(num_prompts=2), 3, root / "swapped", 1, "old")
    make_run(backbone, "linear", {}, 2, root / "gone", 2)
    watcher = open_tasks(backbone, root, interval_s=0.1, settle_s=0.3)
    app = create_app(watcher.model, ServeConfig(max_batch=8, max_wait_ms=2), watcher=watcher)
    results, stop = [], threading.Event()
    with BackgroundServer(app) as server:
        clients = threading.Thread(target=lambda: asyncio.run(_load(server.url, ["stable", "swapped"], stop, results)))
        clients.start()
        try:
            _wait_for(lambda tasks: len(results) > 20, server.url)
            # Added: a run written elsewhere and moved in (one rename).
            _write_elsewhere_then_move(backbone, "e2vpt", {}, 5, root / "fresh", 3, "fresh")
            assert _wait_for(lambda tasks: "fresh" in tasks, server.url)["fresh"]["method"] == "e2vpt"
            # Replaced in place: save_pretrained over the served folder, other method and classes.
            make_run(backbone, "vpt-shallow", dict(num_prompts=4), 6, root / "swapped", 4)
            _wait_for(lambda tasks: tasks["swapped"]["num_classes"] == 6, server.url)
            # Removed.
            shutil.rmtree(root / "gone")
            _wait_for(lambda tasks: "gone" not in tasks, server.url)
            count = len(results)
            _wait_for(lambda tasks: len(results) > count + 20, server.url)
        finally:
            stop.set()
            clients.join(timeout=60)
        fresh = httpx.post(f"{server.url}/v1/tasks/fresh/predict", files={"file": ("x.png", png(), "image/png")}, timeout=TIMEOUT)
        gone = httpx.post(f"{server.url}/v1/tasks/gone/predict", files={"file": ("x.png", png(), "image/png")}, timeout=TIMEOUT)
    assert fresh.status_code == 200 and fresh.json()["predictions"][0]["label"].startswith("fresh-")
    assert gone.status_code == 404
    assert [status for _, status, _ in results if status != 200] == []
    versions = []
    for name, _, body in results:
        labels = [p["label"] for p in body["predictions"]]
        if name == "swapped":  # every answer wholly from one run: old (apt, 3 classes) or new (6)
            assert sorted(labels) in ([f"old-{i}" for i in range(3)], [f"vpt-shallow-{i}" for i in range(6)]), labels
            versions.append(len(labels))
    assert versions[0] == 3 and versions[-1] == 6 and versions == sorted(versions)  # old, then new, never back


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_stops_accepting_finishes_requests_in_flight_and_exits_0(tmp_path):
    from vptune.backbones import BUNDLED_BACKBONE, load_backbone

    backbone = load_backbone(BUNDLED_BACKBONE)
    root = tmp_path / "tasks"
    make_run(backbone, "vpt-deep", dict(num_prompts=2), 3, root / "deep", 0)
    make_run(backbone, "linear", {}, 2, root / "linear", 1)
    port = _free_port()
    import vptune

    source = str(Path(vptune.__file__).resolve().parents[1])  # the code under test, wherever it is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from vptune.cli import app; app()", "serve", "--tasks", str(root), "--port", str(port),
               "--max-batch", "64", "--max-wait-ms", "2500", "--no-watch"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        responses = []

        def post(j):
            name = ["deep", "linear"][j % 2]
            responses.append(httpx.post(f"{url}/v1/tasks/{name}/predict", files={"file": ("x.png", png(j), "image/png")}, timeout=60))

        threads = [threading.Thread(target=post, args=(j,)) for j in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health", timeout=5).json()["pending"] < 4:  # all four wait for their batch (2.5 s)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        refused = False
        deadline = time.monotonic() + 10
        while not refused and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    time.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        assert refused  # no longer accepting connections while the four are still in flight
        for thread in threads:
            thread.join(timeout=60)
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    assert [r.status_code for r in responses] == [200] * 4
    assert sorted(r.json()["task"] for r in responses) == ["deep", "deep", "linear", "linear"]
    assert "Traceback" not in (tmp_path / "server.log").read_text()
