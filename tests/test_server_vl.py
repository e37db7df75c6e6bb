"""Vision-language tasks in the HTTP server (a real uvicorn on 127.0.0.1, a tiny random ViLT):
VQA (one image and a question), NLVR (two images and a statement) and retrieval (a caption
scored against each image) answer as the runs' own models do; every bad input gets a JSON error
and the server goes on; a question longer than the model's text is truncated with a warning."""

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from honest import honest_
from vptune import PromptModel, config_for
from vptune.backbones.loading import load_backbone
from vptune.data.minivl import ANSWER_LIST
from vptune.data.tokenizer import WordTokenizer
from vptune.data.transforms import backbone_data_config, resize_transform
from vptune.serve.server import BackgroundServer, ServeConfig, create_app, load_tasks
from vptune.tasks import NLVRTask, RetrievalTask, VQATask

transformers = pytest.importorskip("transformers")
TIMEOUT = httpx.Timeout(30.0)
TEXT = 12  # the tiny ViLT's text length: a long question is truncated


def png(seed: int = 0, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vilt_folder(tmp_path_factory):
    config = transformers.ViltConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        max_image_length=-1, vocab_size=120, max_position_embeddings=TEXT, modality_type_vocab_size=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vilt") / "vilt"
    honest_(transformers.ViltModel(config)).save_pretrained(folder)
    return folder


def backbone(folder):
    return load_backbone("hf:tiny", weights=folder)


@pytest.fixture(scope="module")
def tasks_dir(vilt_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("vl-tasks")
    net = backbone(vilt_folder)
    runs = {"vqa": ("apt", dict(num_prompts=3), VQATask(list(ANSWER_LIST))), "nlvr": ("vpt-deep", dict(num_prompts=2), NLVRTask()),
            "retrieval": ("linear", {}, RetrievalTask()), "lora": ("lora", {}, VQATask(["yes", "no"]))}
    for seed, (name, (method, options, task)) in enumerate(runs.items()):
        torch.manual_seed(seed)
        model = PromptModel(net, config_for(method, **options), task=task)
        with torch.no_grad():
            for param in model.tuned_parameters().values():
                param.add_(torch.randn_like(param) * 0.2)
        model.metadata.update(tokenizer="word", data=f"minivl:{name}", backbone={"spec": "hf:tiny", "weights": str(vilt_folder)})
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def served(tasks_dir, vilt_folder):
    model, skipped = load_tasks(backbone(vilt_folder), tasks_dir)
    with BackgroundServer(create_app(model, ServeConfig(max_batch=8, max_wait_ms=50))) as server:
        yield server, model, skipped


def own_outputs(folder, run, inputs):
    own = PromptModel.from_pretrained(backbone(folder), run).eval()
    with torch.no_grad():
        return own(inputs).float()


def pixels(net, seed):
    transform = resize_transform(backbone_data_config(net))
    return transform(Image.open(io.BytesIO(png(seed))).convert("RGB"))


def text_inputs(text):
    encoded = WordTokenizer.from_file()([text], max_length=TEXT, truncation=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def test_vl_tasks_are_listed_with_what_a_request_holds(served):
    server, model, skipped = served
    assert model.task_names == ["nlvr", "retrieval", "vqa"]
    assert any(line.startswith("lora: ") and "cannot join" in line for line in skipped)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert tasks["vqa"]["task"] == "vqa" and tasks["vqa"]["images"] == 1 and tasks["vqa"]["labels"] == list(ANSWER_LIST)
    assert tasks["nlvr"]["images"] == 2 and tasks["nlvr"]["labels"] == ["false", "true"]
    assert tasks["retrieval"]["images"] == "1+" and all(t["reads_text"] for t in tasks.values())


def test_answers_match_the_runs_own_models(served, tasks_dir, vilt_folder):
    server, _, _ = served
    net, question = backbone(vilt_folder), "how many bags are there?"
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        vqa = client.post("/v1/tasks/vqa/predict", params={"k": 3}, data={"text": question},
                          files=[("file", ("a.png", png(1), "image/png"))])
        nlvr = client.post("/v1/tasks/nlvr/predict", data={"text": "the left image contains a bag"},
                           files=[("file", ("l.png", png(2), "image/png")), ("file", ("r.png", png(3), "image/png"))])
        retrieval = client.post("/v1/tasks/retrieval/predict", data={"text": "1 item: a bag at the center"},
                                files=[("file", (f"{j}.png", png(j), "image/png")) for j in (4, 5, 6)])
    for response in (vqa, nlvr, retrieval):
        assert response.status_code == 200, response.text
        assert response.json()["warnings"] == []
    scores = own_outputs(vilt_folder, tasks_dir / "vqa", {"image": pixels(net, 1)[None], **text_inputs(question)})[0].sigmoid()
    top = scores.topk(3)
    body = vqa.json()
    assert [p["label"] for p in body["predictions"]] == [ANSWER_LIST[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], top.values.numpy(), atol=1e-5)
    probs = own_outputs(vilt_folder, tasks_dir / "nlvr", {"image0": pixels(net, 2)[None], "image1": pixels(net, 3)[None],
                                                          **text_inputs("the left image contains a bag")})[0].softmax(-1)
    answer = {p["label"]: p["probability"] for p in nlvr.json()["predictions"]}
    np.testing.assert_allclose([answer["false"], answer["true"]], probs.numpy(), atol=1e-5)
    images = torch.stack([pixels(net, j) for j in (4, 5, 6)])[None]
    match = own_outputs(vilt_folder, tasks_dir / "retrieval", {"image": images, **text_inputs("1 item: a bag at the center")})[0]
    ranked = retrieval.json()["predictions"]
    assert [p["file"] for p in ranked] == [f"{4 + j}.png" for j in match.argsort(descending=True).tolist()]
    np.testing.assert_allclose(sorted(p["score"] for p in ranked), sorted(match.tolist()), atol=1e-5)


def test_a_long_question_is_truncated_with_a_warning(served, tasks_dir, vilt_folder):
    server, _, _ = served
    question = "is there a bag at the top-left that is upside down and small?"
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        response = client.post("/v1/tasks/vqa/predict", data={"text": question}, files=[("file", ("a.png", png(1), "image/png"))])
    assert response.status_code == 200, response.text
    (warning,) = response.json()["warnings"]
    assert "longer than 12 tokens and were truncated" in warning
    net = backbone(vilt_folder)
    scores = own_outputs(vilt_folder, tasks_dir / "vqa", {"image": pixels(net, 1)[None], **text_inputs(question)})[0].sigmoid()
    assert response.json()["predictions"][0]["label"] == ANSWER_LIST[scores.argmax().item()]


def test_bad_vl_requests_get_json_errors_and_the_server_goes_on(served):
    server, _, _ = served
    one, two = [("file", ("a.png", png(1), "image/png"))], [("file", ("a.png", png(1), "image/png")), ("file", ("b.png", png(2), "image/png"))]
    cases = [
        ("vqa", {}, one, 400, "reads the question with its image: send it as the form field 'text'"),
        ("vqa", {"text": "   "}, one, 400, "form field 'text'"),
        ("vqa", {"text": "is there a bag?"}, two, 400, "reads exactly 1 image with the text, got 2"),
        ("nlvr", {"text": "the left image contains a bag"}, one, 400, "reads exactly 2 images with the text, got 1"),
        ("nlvr", {"text": "x"}, [two[0], ("file", ("bad.png", b"not an image", "image/png"))], 400,
         "file 'bad.png': not a readable image"),
        ("vqa", {"text": "x" * 2001}, one, 422, ""),
        ("lora", {"text": "is there a bag?"}, one, 404, "no task 'lora'"),
    ]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        for task, data, files, status, message in cases:
            response = client.post(f"/v1/tasks/{task}/predict", data=data, files=files)
            assert response.status_code == status, (task, data, response.text)
            assert message in str(response.json()["detail"])
        ok = client.post("/v1/tasks/vqa/predict", data={"text": "is there a bag?"}, files=one)
        assert ok.status_code == 200 and client.get("/health").json()["status"] == "ok"


def test_image_tasks_refuse_text_and_mixed_passes_refuse_vl_tasks(served, tmp_path):
    from conftest import tiny_vit
    from test_serve import make_run

    _, model, _ = served
    with pytest.raises(ValueError, match="answer them with answer_vl"):
        model(torch.zeros(1, 3, 32, 32), ["vqa"])
    make_run(tiny_vit(), "vpt-deep", dict(num_prompts=2), 3, tmp_path / "deep", 0)
    images, _ = load_tasks(tiny_vit(), tmp_path)
    with BackgroundServer(create_app(images, ServeConfig())) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        response = client.post("/v1/tasks/deep/predict", data={"text": "a question"}, files=[("file", ("a.png", png(1), "image/png"))])
        assert response.status_code == 400 and "reads no text" in response.json()["detail"]
