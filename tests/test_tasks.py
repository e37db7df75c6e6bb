"""vptune.tasks: each task's head, loss and metrics against literal computations, and the metric
key names the run folders and benchmarks rely on."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from honest import honest_
from vptune.tasks import TASKS, ClassificationTask, NLVRTask, RetrievalTask, VQATask, retrieval_recalls, vqa_score


def test_classification_loss_and_metrics_literally():
    task = ClassificationTask(3)
    head = task.head(4)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    assert torch.allclose(head.bias, torch.full((3,), -math.log(0.99 / 0.01)))  # today's head
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.0, 4.0]])
    labels = torch.tensor([0, 1, 2, 2])
    expected = -sum(torch.log_softmax(logits[i], 0)[labels[i]] for i in range(4)) / 4
    assert torch.allclose(task.loss(logits, {"label": labels}), expected)
    metrics = task.metrics(logits, {"label": labels}, split="val")
    assert metrics["val_top1"] == 75.0 and math.isclose(metrics["val_loss"], expected.item(), rel_tol=1e-6)
    assert task.to_dict() == {"name": "classification", "num_classes": 3, "hidden_layers": 0}
    assert len(ClassificationTask(3, hidden_layers=1).head(4)) == 3


def test_vqa_head_is_vilts_classifier():
    task = VQATask(["yes", "no", "2", "red", "dog"])
    head = task.head(8)
    assert [type(m) for m in head] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (8, 16, 5)
    assert head[0].bias.abs().max() == 0 and 0.01 < head[0].weight.std() < 0.03  # ViLT's init
    honest_(head)
    x = torch.randn(3, 8)
    hidden = F.gelu(F.layer_norm(x @ head[0].weight.T + head[0].bias, (16,), head[1].weight, head[1].bias))
    assert torch.allclose(head(x), hidden @ head[3].weight.T + head[3].bias, atol=1e-5)


def test_vqa_loss_and_score_literally():
    task = VQATask(["a", "b", "c"])
    logits = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 0.2, 0.1]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.9]])
    sig = torch.sigmoid(logits)
    bce = -(targets * torch.log(sig) + (1 - targets) * torch.log(1 - sig))
    assert torch.allclose(task.loss(logits, {"vqa_targets": targets}), bce.mean() * 3)  # ViLT scales by #answers
    assert vqa_score(logits, targets).tolist() == pytest.approx([1.0, 0.6])  # argmax: answer a, then b
    metrics = task.metrics(logits, {"vqa_targets": targets})
    assert metrics["test_vqa_score"] == pytest.approx(80.0)
    assert set(task.metrics(logits, {"vqa_targets": targets}, "val")) == {"val_vqa_score", "val_loss"}
    with pytest.raises(ValueError, match="non-empty answer vocabulary"):
        VQATask([])


def test_nlvr_head_concatenates_the_two_pooled_features():
    task = NLVRTask()
    head = honest_(task.head(6), seed=1)
    classifier = head.classifier
    assert [type(m) for m in classifier] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    assert (classifier[0].in_features, classifier[0].out_features, classifier[3].out_features) == (12, 12, 2)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    joined = torch.cat([a, b], 1)
    hidden = F.gelu(F.layer_norm(joined @ classifier[0].weight.T + classifier[0].bias, (12,),
                                 classifier[1].weight, classifier[1].bias))
    expected = hidden @ classifier[3].weight.T + classifier[3].bias
    assert torch.allclose(head(a, b), expected, atol=1e-5)
    assert not torch.allclose(head(b, a), expected, atol=1e-3)  # order matters: left, then right
    logits, labels = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1, 1])
    metrics = task.metrics(logits, {"label": labels})
    assert metrics["test_top1"] == pytest.approx(200 / 3)
    assert torch.allclose(task.loss(logits, {"label": labels}), F.cross_entropy(logits, labels))


def test_retrieval_recalls_literally():
    # 4 texts, 3 images; texts 0, 1 describe image 0, text 2 image 1, text 3 image 2
    scores = torch.tensor([[0.9, 0.1, 0.5],
                           [0.2, 0.8, 0.1],
                           [0.3, 0.7, 0.0],
                           [0.6, 0.4, 0.45]])
    text_image = torch.tensor([0, 0, 1, 2])
    recalls = retrieval_recalls(scores, text_image, ks=(1, 2, 5))
    # image retrieval: ranks of the true image per text: 1, 2, 1, 2
    assert recalls["ir_r1"] == pytest.approx(50.0) and recalls["ir_r2"] == pytest.approx(100.0)
    # text retrieval, per image the best texts: image 0: 0, 3 (hit at 1); image 1: 1, 2 (hit at 2);
    # image 2: 0, 3 (hit at 2)
    assert recalls["tr_r1"] == pytest.approx(100 / 3) and recalls["tr_r2"] == pytest.approx(100.0)
    assert recalls["ir_r5"] == recalls["tr_r5"] == 100.0  # k past the number of candidates
    with pytest.raises(ValueError, match="text_image has shape"):
        retrieval_recalls(scores, text_image[:3])


def test_retrieval_task_keys_loss_and_itm_head():
    task = RetrievalTask()
    scores = torch.eye(12) + 0.01 * torch.arange(12.0)  # text i matches image i; ties broken by index
    metrics = task.metrics(scores, {"text_image": torch.arange(12)}, split="test")
    assert set(metrics) == {f"test_{d}_r{k}" for d in ("ir", "tr") for k in (1, 5, 10)} | {"test_r1_mean"}
    assert metrics["test_ir_r1"] == metrics["test_tr_r1"] == 100.0
    shuffled = task.metrics(scores[:, torch.tensor([1, 0, *range(2, 12)])], {"text_image": torch.arange(12)}, "val")
    assert shuffled["val_ir_r1"] == pytest.approx(1000 / 12) and shuffled["val_tr_r1"] == pytest.approx(1000 / 12)
    pair_scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])  # column 0: the caption's own image
    expected = -(torch.log_softmax(pair_scores[0], 0)[0] + torch.log_softmax(pair_scores[1], 0)[0]) / 2
    assert torch.allclose(task.loss(pair_scores, {}), expected)
    head = task.head(5)
    assert head.out_features == 1 and head.in_features == 5
    itm = honest_(nn.Linear(5, 2), seed=2)
    ranked = RetrievalTask.head_from_itm(itm)
    x = torch.randn(3, 5)
    assert torch.allclose(ranked(x), itm(x)[:, 1:])


def test_registry_and_fields():
    assert set(TASKS) == {"classification", "vqa", "nlvr", "retrieval", "generation"}
    assert VQATask(["a"]).fields == ("image", "input_ids", "attention_mask", "vqa_targets")
    assert NLVRTask.fields == ("image0", "image1", "input_ids", "attention_mask", "label")
    assert {cls.main_metric for cls in TASKS.values()} == {"top1", "vqa_score", "r1_mean", "loss"}


def test_score_matrix_scores_every_caption_against_every_image():
    import numpy as np

    from vptune.data.vl import ImageTable, RetrievalData

    pixels = np.stack([np.full((4, 4), 10 * i, dtype=np.uint8) for i in range(7)])
    ids = torch.arange(5 * 3).reshape(5, 3)
    data = RetrievalData(ImageTable(pixels), np.array([0, 1, 2, 3, 4]), ids, torch.ones_like(ids),
                         lambda image: torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1))
    calls = []

    def score_pairs(batch):  # a pair's score: its image's grey value times its text's first id, plus the mask sum
        calls.append(len(batch["image"]))
        return batch["image"][:, 0, 0, 0] * batch["input_ids"][:, 0] + batch["attention_mask"].sum(1)

    scores = RetrievalTask.score_matrix(score_pairs, data, batch_size=6, image_block=3)
    expected = torch.tensor([[10.0 * i * ids[t, 0] + 3 for i in range(7)] for t in range(5)])
    assert torch.equal(scores, expected) and max(calls) <= 6 and sum(calls) == 35
