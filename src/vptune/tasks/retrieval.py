"""Image-text retrieval as ViLT fine-tunes it: a score per (image, text) pair from the pooled
feature of the pair (the image-text-matching head's "match" row), trained by cross-entropy
over a caption's own image and K other images; evaluated by recall@1/5/10 from the score
matrix of every caption against every image, for image retrieval (a caption finds its image)
and text retrieval (an image finds one of its captions)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Task, vilt_init_

RECALL_AT = (1, 5, 10)


def retrieval_recalls(scores: Tensor, text_image: Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Recall@k (%) from ``scores`` (num_texts, num_images) and ``text_image`` (num_texts,), the
    image each text describes: ``ir_r{k}``, the share of texts whose image is among their k
    best-scored images; ``tr_r{k}``, the share of images with one of their texts among their k
    best-scored texts (images without a text are left out)."""
    num_texts, num_images = scores.shape
    if text_image.shape != (num_texts,):
        raise ValueError(f"text_image has shape {tuple(text_image.shape)}; expected ({num_texts},)")
    text_image = text_image.to(scores.device)
    described = torch.zeros(num_images, dtype=torch.bool, device=scores.device)
    described[text_image] = True
    results = {}
    for k in ks:
        best_images = scores.topk(min(k, num_images), dim=1).indices  # T, k
        results[f"ir_r{k}"] = 100.0 * (best_images == text_image[:, None]).any(1).float().mean().item()
        best_texts = scores.topk(min(k, num_texts), dim=0).indices  # k, I
        hits = (text_image[best_texts] == torch.arange(num_images, device=scores.device)).any(0)
        results[f"tr_r{k}"] = 100.0 * hits[described].float().mean().item()
    return results


class RetrievalTask(Task):
    name = "retrieval"
    fields = ("image", "input_ids", "attention_mask")  # image: (B, 1 + K, C, H, W), the caption's own first
    main_metric = "r1_mean"

    def head(self, in_dim: int) -> nn.Module:
        """A pair's score: Linear(d, 1)."""
        return vilt_init_(nn.Linear(in_dim, 1))

    @staticmethod
    def head_from_itm(itm: nn.Linear) -> nn.Linear:
        """The score head started from a pretrained image-text-matching head (Linear(d, 2),
        class 1 = match), as ViLT does: its match row."""
        head = nn.Linear(itm.in_features, 1)
        with torch.no_grad():
            head.weight.copy_(itm.weight[1:])
            head.bias.copy_(itm.bias[1:])
        return head

    @staticmethod
    @torch.no_grad()
    def score_matrix(score_pairs: Callable[[dict[str, Tensor]], Tensor], data: Any, batch_size: int = 256,
                     image_block: int = 16) -> Tensor:
        """The (num_texts, num_images) scores of every caption against every image of ``data``
        (a ``RetrievalData``), as ViLT evaluates retrieval: ``score_pairs`` gets batches of
        about ``batch_size`` pairs (``image`` (B, C, H, W), ``input_ids``, ``attention_mask``)
        and returns their scores (B,). Images are loaded ``image_block`` at a time."""
        images = data.images_dataset()
        num_texts = len(data.input_ids)
        text_block = max(1, batch_size // image_block)
        columns = []
        for start in range(0, len(images), image_block):
            pixels = torch.stack([images[j]["image"] for j in range(start, min(start + image_block, len(images)))])
            rows = []
            for first in range(0, num_texts, text_block):
                ids, mask = data.input_ids[first:first + text_block], data.attention_mask[first:first + text_block]
                batch = {"image": pixels.repeat(len(ids), 1, 1, 1),  # text-major: (t0, i0), (t0, i1), ..., (t1, i0)
                         "input_ids": ids.repeat_interleave(len(pixels), 0),
                         "attention_mask": mask.repeat_interleave(len(pixels), 0)}
                rows.append(score_pairs(batch).float().reshape(len(ids), len(pixels)))
            columns.append(torch.cat(rows))
        return torch.cat(columns, dim=1)

    def evaluate(self, predict: Callable[[dict], Tensor], dataset: Any, loader: Callable[[Any], Any]) -> dict[str, float]:
        """Recalls from the score matrix of every caption against every image of ``dataset`` (a
        ``RetrievalData``), as ViLT evaluates retrieval."""
        scores = self.score_matrix(predict, dataset)
        return {**self.metrics(scores, {"text_image": dataset.text_image}, split="split"), "count": len(dataset)}

    def loss(self, outputs: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """``outputs``: scores (B, 1 + K) of each caption against its image (column 0) and K others."""
        scores = outputs.float().reshape(outputs.shape[0], -1)
        return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))

    def metrics(self, outputs: Tensor, batch: Mapping[str, Any], split: str = "test") -> dict[str, float]:
        """``outputs``: the score matrix (num_texts, num_images); ``batch["text_image"]``: each text's image."""
        recalls = retrieval_recalls(outputs.float(), batch["text_image"])
        recalls["r1_mean"] = (recalls["ir_r1"] + recalls["tr_r1"]) / 2
        return {f"{split}_{name}": value for name, value in recalls.items()}
