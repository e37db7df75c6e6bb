"""The HTTP server through a real uvicorn on 127.0.0.1: endpoints, every bad input, batching."""

import asyncio
import contextlib
import io
import itertools
import sys

import httpx
import numpy as np
import pytest
import torch
from conftest import tiny_vit
from PIL import Image
from test_serve import make_run

from vptune import PromptModel
from vptune.data.transforms import backbone_data_config, eval_transform
from vptune.serve.server import BackgroundServer, ServeConfig, create_app, load_tasks

TASKS = {"deep": ("vpt-deep", dict(num_prompts=3), 4), "apt": ("apt", dict(num_prompts=5), 3), "e2vpt": ("e2vpt", {}, 5)}
TIMEOUT = httpx.Timeout(30.0)


def png(seed: int = 0, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    backbone = tiny_vit()
    for seed, (name, (method, options, classes)) in enumerate(TASKS.items()):
        make_run(backbone, method, options, classes, root / name, seed)
    make_run(backbone, "bias", {}, 2, root / "bitfit", 9)  # cannot be mixed: skipped with the reason
    make_run(backbone, "linear", {}, 2, root / "bad.name", 9)  # not a valid task name: skipped
    (root / "notes").mkdir()  # not a run folder: ignored
    return root


@pytest.fixture(scope="module")
def served(tasks_dir):
    model, skipped = load_tasks(tiny_vit(), tasks_dir)
    config = ServeConfig(max_batch=8, max_wait_ms=300, max_body_bytes=64 * 1024)
    with BackgroundServer(create_app(model, config)) as server:
        yield server, model, skipped


def test_load_tasks_skips_what_it_cannot_serve(served, tmp_path):
    _, model, skipped = served
    assert model.task_names == ["apt", "deep", "e2vpt"]
    assert any(line.startswith("bitfit: ") and "cannot join a mixed-task batch" in line for line in skipped)
    assert any(line.startswith("bad.name: not a valid task name") for line in skipped)
    with pytest.raises(ValueError, match="no task to serve"):
        load_tasks(tiny_vit(), tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_tasks(tiny_vit(), tmp_path / "missing")


def test_a_task_made_on_other_backbone_weights_is_refused(tmp_path):
    """Serving reads runs back like eval and predict: a run made on other weights of the same
    architecture is skipped with the reason, not served with tensors that do not fit."""
    make_run(tiny_vit(), "vpt-deep", dict(num_prompts=2), 3, tmp_path / "ours", 0)
    make_run(tiny_vit(seed=1), "vpt-deep", dict(num_prompts=2), 3, tmp_path / "theirs", 1)
    model, skipped = load_tasks(tiny_vit(), tmp_path)
    assert model.task_names == ["ours"]
    assert len(skipped) == 1 and skipped[0].startswith("theirs: ") and "made on other backbone weights" in skipped[0]


def test_health_tasks_and_docs(served):
    server, _, _ = served
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["tasks"] == 3
        tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
        assert sorted(tasks) == ["apt", "deep", "e2vpt"]
        assert tasks["apt"]["method"] == "apt" and tasks["apt"]["labels"] == ["apt-0", "apt-1", "apt-2"]
        assert "/v1/tasks/{task}/predict" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 404  # off by default: its page loads scripts from a public CDN


def test_predict_matches_the_tasks_own_model(served, tasks_dir):
    server, model, _ = served
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        response = client.post("/v1/tasks/e2vpt/predict", params={"k": 3}, files={"file": ("x.png", png(1), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "e2vpt" and len(body["predictions"]) == 3
    own = PromptModel.from_pretrained(tiny_vit(), tasks_dir / "e2vpt").eval()
    image = eval_transform(own.metadata.get("data", ""), backbone_data_config(own.backbone))(Image.open(io.BytesIO(png(1))).convert("RGB"))
    with torch.no_grad():
        probs = own(image[None])[0].softmax(-1)
    top = probs.topk(3)
    assert [p["index"] for p in body["predictions"]] == top.indices.tolist()
    assert [p["label"] for p in body["predictions"]] == [f"e2vpt-{i}" for i in top.indices.tolist()]
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], top.values.numpy(), atol=1e-5)


def test_bad_inputs_get_json_errors_and_the_server_goes_on(served):
    server, _, _ = served
    corrupt = png(2)[:60]  # a PNG header and then nothing
    cases = [
        ("/v1/tasks/deep/predict", {"file": ("x.txt", b"this is not an image", "text/plain")}, 400, "not a readable image"),
        ("/v1/tasks/deep/predict", {"file": ("x.png", corrupt, "image/png")}, 400, "not a readable image"),
        ("/v1/tasks/deep/predict", {"file": ("x.png", b"", "image/png")}, 400, "empty"),
        ("/v1/tasks/nope/predict", {"file": ("x.png", png(), "image/png")}, 404, "no task 'nope'"),
        ("/v1/tasks/bitfit/predict", {"file": ("x.png", png(), "image/png")}, 404, "no task"),
        ("/v1/tasks/..%2F..%2Fetc/predict", {"file": ("x.png", png(), "image/png")}, 404, ""),
        ("/v1/tasks/deep/predict", {"file": ("x.png", png(size=400), "image/png")}, 413, "over the limit of 65536 bytes"),
        ("/v1/tasks/deep/predict", {"other": ("x.png", png(), "image/png")}, 422, ""),
    ]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        for url, files, status, message in cases:
            response = client.post(url, files=files)
            assert response.status_code == status, (url, response.text)
            assert message in response.json()["detail"] if message else "detail" in response.json()
        body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + png(size=400) + b"\r\n--b--\r\n"
        chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))  # streamed: no Content-Length
        response = client.post("/v1/tasks/deep/predict", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and "over the limit" in response.json()["detail"]
        assert client.post("/v1/tasks/deep/predict", params={"k": 0}, files={"file": ("x.png", png(), "image/png")}).status_code == 422
        assert client.post("/v1/tasks/deep/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


async def _post_many(url: str, names: list[str], delay_s: float = 0.0) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
        async def one(j: int, name: str) -> httpx.Response:
            await asyncio.sleep(delay_s * j)
            return await client.post(f"/v1/tasks/{name}/predict", files={"file": ("x.png", png(j), "image/png")})

        return await asyncio.gather(*(one(j, name) for j, name in enumerate(names)))


def test_concurrent_requests_across_tasks_are_batched(served):
    server, _, _ = served
    before = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
    names = ["deep", "apt", "e2vpt"] * 6
    responses = asyncio.run(_post_many(server.url, names))
    assert [r.status_code for r in responses] == [200] * len(names)
    assert [r.json()["task"] for r in responses] == names
    after = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
    assert after["requests"] - before["requests"] == len(names)
    assert after["batches"] - before["batches"] < len(names)  # some requests shared a batch
    assert after["largest_batch"] > 1


def test_swin_shallow_and_deep_runs_are_served_side_by_side(tmp_path):
    """On a Swin, a VPT-shallow run (its prompt tokens go through blocks: its own pass) and a
    VPT-deep run (the mixed pass) are both served, their concurrent requests share batches,
    and every answer is the run's own model's."""
    from test_swin import tiny_swin

    runs = {"shallow": ("vpt-shallow", dict(num_prompts=4), 5), "deep": ("vpt-deep", dict(num_prompts=3), 4)}
    for seed, (name, run) in enumerate(runs.items()):
        make_run(tiny_swin(), *run, tmp_path / name, seed)
    model, skipped = load_tasks(tiny_swin(), tmp_path)
    assert model.task_names == ["deep", "shallow"] and skipped == []
    names = ["shallow", "deep"] * 4
    with BackgroundServer(create_app(model, ServeConfig(max_batch=8, max_wait_ms=300))) as server:
        responses = asyncio.run(_post_many(server.url, names))
        health = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
    assert [r.status_code for r in responses] == [200] * len(names)
    assert health["batches"] < len(names) and health["largest_batch"] > 1
    own = {name: PromptModel.from_pretrained(tiny_swin(), tmp_path / name).eval() for name in runs}
    for j, (name, response) in enumerate(zip(names, responses)):
        transform = eval_transform(own[name].metadata.get("data", ""), backbone_data_config(own[name].backbone))
        with torch.no_grad():
            probs = own[name](transform(Image.open(io.BytesIO(png(j))).convert("RGB"))[None])[0].softmax(-1)
        predictions = response.json()["predictions"]
        top = probs.topk(len(predictions))
        assert response.json()["task"] == name and [p["index"] for p in predictions] == top.indices.tolist()
        np.testing.assert_allclose([p["probability"] for p in predictions], top.values.numpy(), atol=1e-5)


def test_overload_gets_503_with_retry_after_and_slow_requests_504(tasks_dir):
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    busy = ServeConfig(max_batch=64, max_wait_ms=1500, max_pending=2)
    with BackgroundServer(create_app(model, busy)) as server:
        # Two requests wait 1.5 s for their batch to fill; the one that comes last finds no room.
        responses = asyncio.run(_post_many(server.url, ["deep", "apt", "deep"], delay_s=0.25))
        assert sorted(r.status_code for r in responses) == [200, 200, 503]
        (refused,) = [r for r in responses if r.status_code == 503]
        assert refused.headers["retry-after"] == "1" and "server busy" in refused.json()["detail"]
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
    slow = ServeConfig(max_wait_ms=2000, request_timeout_s=0.2)
    with BackgroundServer(create_app(model, slow)) as server:
        (response,) = asyncio.run(_post_many(server.url, ["deep"]))
        assert response.status_code == 504 and "not served within 0.2 s" in response.json()["detail"]


def test_bench_serve_command(tmp_path):
    """A small bench-serve end to end: every figure is reported and the load test has no error."""
    import json

    from typer.testing import CliRunner

    from vptune.cli import app

    out = tmp_path / "bench.json"
    args = ["bench-serve", "--batch-size", "8", "--rounds", "1", "--requests", "24", "--clients", "4", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert len(report["tasks"]) == 8
    assert set(report["throughput"]) >= {"mixed_img_s", "single_img_s", "own_models_img_s", "mixed_vs_single", "mixed_vs_own_models"}
    load = report["load_test"]
    assert (load["requests"], load["ok"], load["errors"]) == (24, 24, 0)
    assert load["p50_ms"] <= load["p99_ms"]
    assert "HTTP load test on 127.0.0.1" in result.output


# --- several images per request ---------------------------------------------------------------


def test_several_images_one_result_each_and_bad_ones_reported_alone(served):
    server, _, _ = served
    files = [("file", ("a.png", png(3), "image/png")), ("file", ("b.png", png(4)[:60], "image/png")),
             ("file", ("c.txt", b"not an image", "text/plain")), ("file", ("d.png", png(5), "image/png"))]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        response = client.post("/v1/tasks/deep/predict", params={"k": 2}, files=files)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["file"] for r in results] == ["a.png", "b.png", "c.txt", "d.png"]
        assert [r.get("status") for r in results] == [None, 400, 400, None]
        assert "corrupt or truncated" in results[1]["error"] and "does not recognise" in results[2]["error"]
        for j, seed in ((0, 3), (3, 5)):  # each good image gets what it gets alone
            alone = client.post("/v1/tasks/deep/predict", params={"k": 2}, files={"file": ("x.png", png(seed), "image/png")}).json()
            assert [p["index"] for p in results[j]["predictions"]] == [p["index"] for p in alone["predictions"]]
            np.testing.assert_allclose(
                [p["probability"] for p in results[j]["predictions"]], [p["probability"] for p in alone["predictions"]], atol=1e-5
            )
            assert alone["results"] == [{"file": "x.png", "predictions": alone["predictions"]}]


def test_too_many_images_in_one_request_is_413(tasks_dir):
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    with BackgroundServer(create_app(model, ServeConfig(max_images=2))) as server:
        files = [("file", (f"{j}.png", png(j), "image/png")) for j in range(3)]
        response = httpx.post(f"{server.url}/v1/tasks/deep/predict", files=files, timeout=TIMEOUT)
        assert response.status_code == 413 and "3 images in one request, over the limit of 2" in response.json()["detail"]


# --- metrics ----------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_metrics_count_requests_batches_and_tasks(tasks_dir):
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    with BackgroundServer(create_app(model, ServeConfig(max_batch=8, max_wait_ms=200))) as server:
        asyncio.run(_post_many(server.url, ["deep", "apt", "deep", "e2vpt", "deep"]))
        httpx.post(f"{server.url}/v1/tasks/nope/predict", files={"file": ("x.png", png(), "image/png")}, timeout=TIMEOUT)
        httpx.post(f"{server.url}/v1/tasks/apt/predict", files={"file": ("x.png", b"junk", "image/png")}, timeout=TIMEOUT)
        health = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
        response = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("vptune_requests_total", endpoint="predict", task="deep", status="200") == 3
    assert value("vptune_requests_total", endpoint="predict", task="apt", status="200") == 1
    assert value("vptune_requests_total", endpoint="predict", task="apt", status="400") == 1
    assert value("vptune_requests_total", endpoint="predict", task="", status="404") == 1  # unknown names are not labels
    assert value("vptune_images_total", task="apt", outcome="400") == 1
    assert value("vptune_request_latency_seconds_count", endpoint="predict") == 7
    assert value("vptune_batch_size_count") == health["batches"] and value("vptune_batch_size_sum") == health["requests"] == 5
    assert value("vptune_batch_size_bucket", le="1.0") < health["batches"] or health["largest_batch"] == 1
    assert value("vptune_tasks_loaded") == 3
    assert value("vptune_queue_depth") == 0 and value("vptune_batch_queue") == 0
    assert ("vptune_decoding", (("lane", "large"),)) in samples


# --- access control ---------------------------------------------------------------------------

KEY_ALL, KEY_DEEP = "all-tasks-key-0123456789", "deep-and-apt-key-abcdefgh"


def test_api_keys_401_403_200_and_health_open(tasks_dir, tmp_path, caplog):
    from vptune.serve.security import read_api_keys

    key_file = tmp_path / "keys"
    key_file.write_text(f"# who may use what\n{KEY_ALL}\n\n{KEY_DEEP} deep, apt\n")
    keys = read_api_keys(key_file)
    assert KEY_ALL not in repr(keys) and len(keys.entries) == 2
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    image = {"file": ("x.png", png(), "image/png")}
    with BackgroundServer(create_app(model, ServeConfig(), api_keys=keys)) as server, \
            httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        assert client.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {KEY_ALL}"},
                        {"Authorization": f"Bearer {KEY_ALL}x"}, {"Authorization": "Bearer"}):
            for method, url in (("POST", "/v1/tasks/deep/predict"), ("GET", "/v1/tasks"), ("GET", "/metrics")):
                response = client.request(method, url, headers=headers, files=image if method == "POST" else None)
                assert response.status_code == 401, (headers, url)
                assert response.headers["www-authenticate"] == "Bearer" and "Authorization: Bearer KEY" in response.json()["detail"]
        everything, scoped = {"Authorization": f"Bearer {KEY_ALL}"}, {"Authorization": f"bearer {KEY_DEEP}"}
        assert client.post("/v1/tasks/e2vpt/predict", headers=everything, files=image).status_code == 200
        assert client.post("/v1/tasks/deep/predict", headers=scoped, files=image).status_code == 200
        refused = client.post("/v1/tasks/e2vpt/predict", headers=scoped, files=image)
        assert refused.status_code == 403 and "may not use this task" in refused.json()["detail"]
        assert client.post("/v1/tasks/nope/predict", headers=scoped, files=image).status_code == 403  # existence not told
        assert [t["name"] for t in client.get("/v1/tasks", headers=scoped).json()["tasks"]] == ["apt", "deep"]
        assert [t["name"] for t in client.get("/v1/tasks", headers=everything).json()["tasks"]] == ["apt", "deep", "e2vpt"]
        assert client.get("/metrics", headers=scoped).status_code == 200
    assert KEY_ALL not in caplog.text and KEY_DEEP not in caplog.text


def test_every_stored_key_is_compared_in_constant_time(monkeypatch):
    from vptune.serve import security

    keys = security.ApiKeys(tuple((security._digest(k), None) for k in ("a" * 16, "b" * 16, "c" * 16)))
    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert keys.scope_of(b"a" * 16) == (True, None)  # the first matches, the other two are still compared
    assert keys.scope_of(b"z") == (False, None) and keys.scope_of(None) == (False, None)
    assert len(calls) == 9


@pytest.mark.parametrize("text, message", [
    ("short\n", "at least 16 printable characters"),
    ("a-long-enough-key-123 bad.task\n", "'bad.task' is not a task name"),
    ("a-long-enough-key-123\n# again\na-long-enough-key-123 deep\n", "line 3: the same key as line 1"),
    ("# nothing\n\n", "holds no key"),
])
def test_api_key_file_errors_name_the_line_never_the_key(tmp_path, text, message):
    from vptune.serve.security import read_api_keys

    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_api_keys(path)
    assert "a-long-enough-key-123" not in str(error.value) and "short" not in str(error.value).split(":")[-1]


# --- exposure: Host header, docs, image sizes, slow clients -------------------------------------


def test_host_header_must_be_allowed(tasks_dir):
    from vptune.serve.security import default_allowed_hosts, host_name

    assert [host_name(h) for h in ("[::1]:8000", "Example.COM:80", "localhost", "::1")] == ["::1", "example.com", "localhost", "::1"]
    assert default_allowed_hosts("10.0.0.5") == ("localhost", "127.0.0.1", "::1", "10.0.0.5")
    assert default_allowed_hosts("0.0.0.0") == ("localhost", "127.0.0.1", "::1")
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    with BackgroundServer(create_app(model, ServeConfig(allowed_hosts=(*default_allowed_hosts(), ".example.org")))) as server, \
            httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        for host in ("evil.com", "127.0.0.1.evil.com", "example.org", "localhost.", ""):
            response = client.get("/v1/tasks", headers={"Host": host})
            assert response.status_code == 400 and "--allowed-hosts" in response.json()["detail"], host
        for host in ("localhost", "127.0.0.1:9", "[::1]:8000", "api.example.org"):
            assert client.get("/v1/tasks", headers={"Host": host}).status_code == 200, host
    with BackgroundServer(create_app(model, ServeConfig(allowed_hosts=("*",)))) as server:
        assert httpx.get(f"{server.url}/health", headers={"Host": "anything.test"}, timeout=TIMEOUT).status_code == 200


def test_docs_page_only_when_asked(tasks_dir):
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    with BackgroundServer(create_app(model, ServeConfig(docs=True))) as server:
        assert httpx.get(f"{server.url}/docs", timeout=TIMEOUT).status_code == 200


def big_png(width: int, height: int) -> bytes:
    """A flat image: many pixels, a small file (a decompression-heavy upload)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_huge_images_are_refused_from_their_header_and_large_ones_decoded_one_at_a_time(tasks_dir):
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    huge = big_png(6000, 6000)  # 36 megapixels in about 100 KB
    assert len(huge) < 200_000
    with BackgroundServer(create_app(model, ServeConfig())) as server:  # the default limit is far below 36 MP
        response = httpx.post(f"{server.url}/v1/tasks/deep/predict", files={"file": ("x.png", huge, "image/png")}, timeout=TIMEOUT)
        assert response.status_code == 413 and "6000x6000 pixels, over the limit of 12000000" in response.json()["detail"]
        assert server.server.config.app.state.decoder.most_busy == {"small": 0, "large": 0}  # never decoded
    config = ServeConfig(max_image_pixels=5_000_000, large_image_pixels=1_000_000, large_decodes=1, decode_threads=2)
    app = create_app(model, config)
    large = big_png(2000, 2000)

    async def mixed(url):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            def post(data):
                return client.post("/v1/tasks/deep/predict", files={"file": ("x.png", data, "image/png")})
            return await asyncio.gather(*[post(large) for _ in range(3)], *[post(png(j)) for j in range(4)])

    with BackgroundServer(app) as server:
        responses = asyncio.run(mixed(server.url))
    assert [r.status_code for r in responses] == [200] * 7
    assert app.state.decoder.most_busy["large"] == 1  # three large uploads, never two decoded at once
    assert app.state.decoder.most_busy["small"] >= 1


def _raw(server, chunks, pause_s: float, limit: int = 40) -> tuple[bytes, int]:
    """Send ``chunks`` one by one with a pause; returns what the server answered and how many
    chunks it took before it closed the connection (at most ``limit``)."""
    import socket

    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sent = 0
        for chunk in itertools.islice(chunks, limit):
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            sock.settimeout(pause_s)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return b"", sent
            if not data:
                return b"", sent
            answer = data
            sock.settimeout(5)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while more := sock.recv(65536):
                    answer += more
            return answer, sent
        return b"", sent


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_slow_headers_and_slow_bodies_are_cut(tasks_dir, parser, monkeypatch):
    if parser == "h11":
        monkeypatch.setitem(sys.modules, "httptools", None)  # as where httptools is not installed
    else:
        pytest.importorskip("httptools")
    model, _ = load_tasks(tiny_vit(), tasks_dir)
    with BackgroundServer(create_app(model, ServeConfig(header_timeout_s=0.6, body_timeout_s=0.6))) as server:
        # A request head one byte at a time, 0.2 s apart: closed after about 0.6 s, not after 40 bytes.
        answer, sent = _raw(server, itertools.chain([b"GET /health HTTP/1.1\r\n"], itertools.repeat(b"X")), 0.2)
        assert answer == b"" and sent < 15
        # A body that trickles: 408 and the connection closed.
        head = (b"POST /v1/tasks/deep/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n')
        answer, sent = _raw(server, itertools.chain([head], itertools.repeat(b"0123456789")), 0.2)
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.6 s" in answer and sent < 15
        assert b"connection: close" in answer.lower()
        # A normal client on a kept-alive connection is not affected.
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
            for _ in range(3):
                assert client.post("/v1/tasks/deep/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200


def test_a_bad_task_folder_is_skipped_with_the_reason(tasks_dir, tmp_path):
    import json
    import shutil

    root = tmp_path / "tasks"
    shutil.copytree(tasks_dir / "deep", root / "deep")
    shutil.copytree(tasks_dir / "apt", root / "absurd")
    config = json.loads((root / "absurd" / "config.json").read_text())
    config["num_classes"] = 10**12  # a head this size would take terabytes
    (root / "absurd" / "config.json").write_text(json.dumps(config))
    shutil.copytree(tasks_dir / "apt", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    model, skipped = load_tasks(tiny_vit(), root)
    assert model.task_names == ["deep"]
    assert any(line.startswith("absurd: ") and "says num_classes 1000000000000, but its head" in line for line in skipped)
    assert any(line.startswith("truncated: ") and "not a readable safetensors file" in line for line in skipped)


@pytest.mark.parametrize("args, message", [
    pytest.param(["--device", "cuda"], "--device cuda: this torch is a CPU-only build", marks=pytest.mark.skipif(
        torch.cuda.is_available() or torch.version.cuda is not None, reason="needs a CPU-only torch")),
    (["--port", "70000"], "--port 70000 is not a port: give a number from 1 to 65535"),
    (["--port", "0"], "--port 0 is not a port"),
    (["--max-body-mb", "-1"], "--max-body-mb -1 must be above 0"),
    (["--max-batch", "0"], "--max-batch: serve setting max_batch must be above 0"),
    (["--api-key-file", "MISSING"], "--api-key-file MISSING not found"),
])
def test_serve_refuses_bad_settings_in_one_line(tasks_dir, args, message):
    from typer.testing import CliRunner

    from vptune.cli import app

    result = CliRunner().invoke(app, ["serve", "--tasks", str(tasks_dir), *args])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in " ".join(result.output.split()), result.output
