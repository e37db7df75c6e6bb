"""The HTTP server through a real uvicorn on 127.0.0.1: endpoints, every bad input, batching."""

import asyncio
import io

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


def test_health_tasks_and_docs(served):
    server, _, _ = served
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["tasks"] == 3
        tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
        assert sorted(tasks) == ["apt", "deep", "e2vpt"]
        assert tasks["apt"]["method"] == "apt" and tasks["apt"]["labels"] == ["apt-0", "apt-1", "apt-2"]
        assert "/v1/tasks/{task}/predict" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200


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
