"""The same app on Ray Serve: 2 replicas on a local Ray bound to 127.0.0.1 (one Ray start for the file)."""

import asyncio
import io
import shutil
import socket
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_serve import make_run
from test_server import png

from vptune.backbones import BUNDLED_BACKBONE, load_backbone
from vptune.backbones.family import family_of
from vptune.data.transforms import backbone_data_config, eval_transform

pytest.importorskip("ray.serve")

KEY = "ray-replicas-key-0123456789"


def test_two_replicas_serve_the_same_app(tmp_path):
    from vptune.serve.bench import _load
    from vptune.serve.ray_serve import ReplicaSpec, ray_serve
    from vptune.serve.security import ApiKeys, _digest
    from vptune.serve.server import ServeConfig

    backbone = load_backbone(BUNDLED_BACKBONE)
    root = tmp_path / "tasks"
    make_run(backbone, "vpt-deep", dict(num_prompts=2), 3, root / "deep", 0)
    make_run(backbone, "e2vpt", {}, 4, root / "e2vpt", 1)
    keys = ApiKeys(((_digest(KEY), frozenset({"deep"})),))
    spec = ReplicaSpec(str(root), BUNDLED_BACKBONE, config=ServeConfig(max_wait_ms=20), api_keys=keys, watch=False, threads=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_temp = Path(tempfile.mkdtemp(prefix="vr-"))  # short: Ray's unix sockets live in it
    try:
        with ray_serve(spec, 2, "127.0.0.1", port, num_cpus=2, temp_dir=ray_temp) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            replicas = set()
            for _ in range(40):  # /health is open, and each replica answers for itself
                replicas.add(client.get("/health").json()["replica"])
                if len(replicas) == 2:
                    break
            assert len(replicas) == 2
            image = {"file": ("x.png", png(7), "image/png")}
            assert client.post("/v1/tasks/deep/predict", files=image).status_code == 401
            auth = {"Authorization": f"Bearer {KEY}"}
            assert client.post("/v1/tasks/e2vpt/predict", files=image, headers=auth).status_code == 403
            body = client.post("/v1/tasks/deep/predict", params={"k": 3}, files=image, headers=auth).json()
            load = asyncio.run(_load(url, ["deep"], 24, 4, (32, 32), 60.0, 120.0, replicas=2, headers=auth))  # bench-serve's
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    # What the replica answered is the task's own model on this backbone.
    from vptune import PromptModel

    own = PromptModel.from_pretrained(backbone, root / "deep").eval()
    x = eval_transform(own.metadata.get("data"), backbone_data_config(backbone))(Image.open(io.BytesIO(png(7))).convert("L" if family_of(backbone).input_size()[0] == 1 else "RGB"))
    with torch.no_grad():
        top = own(x[None])[0].softmax(-1).topk(3)
    assert [p["index"] for p in body["predictions"]] == top.indices.tolist()
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], top.values.numpy(), atol=1e-5)
    assert (load["requests"], load["ok"], load["errors"]) == (24, 24, 0) and load["replicas_seen"] == 2

