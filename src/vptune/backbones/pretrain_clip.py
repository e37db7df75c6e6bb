"""Pretrain the bundled CLIP (``vptune pretrain --arch clip``): image and text towers trained
contrastively (CLIP's symmetric InfoNCE with its learned temperature) on captioned Fashion-MNIST
canvases drawn fresh every step from the pretraining pool (``vptune.data.scenes``: Fashion-MNIST's
train split, never the benchmark pools), each with a random truthful caption
(``vptune.data.texts.caption``: kinds, counts, places, sizes, rotations, paraphrased).

The image tower starts from the bundled ViT (``clip_bundled.init_from_vit``); its first blocks
stay locked (as in LiT, and so that a CPU spends its time on the new text tower) and its last
``unlocked_blocks`` blocks, final norm and projection are tuned at a lower learning rate than
the new text tower. A checkpoint is written every ``checkpoint_every``
steps (``pretrain.train_steps``, the loop it shares with the bundled ViLT); rerunning the same command resumes there. At the end the weights, a model card with
zero-shot accuracies on the mini-benchmark's canvas tasks and the figures file
(``docs/clip-fmnist-figures.json``, ``figures.py``) are written; ``remeasure_clip`` measures the
zero-shot accuracies again on the shipped weights (``vptune pretrain --arch clip --evaluate-only``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from ..data.cache import cache_root
from ..report import machine, now
from .bundled import MEAN, STD
from .clip_bundled import BUNDLED_CLIP, build_bundled_clip, clip_config, init_from_vit
from .figures import evaluate_command, figures_path, training_record, weights_figures, write_figures
from .pretrain import train_steps

ZERO_SHOT_TASKS = ("location", "orientation", "count", "scale")


def to_input(canvases: np.ndarray) -> Tensor:
    """uint8 grey (B, 32, 32) or RGB (B, 32, 32, 3) to the normalised (B, 3, 32, 32) input."""
    x = torch.from_numpy(np.ascontiguousarray(canvases)).float() / 255
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return (x - MEAN[0]) / STD[0]


def batch_of(rng: np.random.Generator, size: int, pool: str = "pretrain") -> tuple[Tensor, list[str]]:
    from ..data.scenes import render, sample_scene
    from ..data.texts import caption

    scenes = [sample_scene(rng) for _ in range(size)]
    canvases, _ = render(scenes, pool, rng)
    return to_input(canvases), [caption(scene, rng) for scene in scenes]


def clip_loss(model, images: Tensor, tokens: Tensor) -> Tensor:
    image = F.normalize(model.encode_image(images).float(), dim=-1)
    text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def zero_shot(model) -> dict[str, float]:
    """Top-1 (%) of the zero-shot classifier (class texts in the captions' words) on each canvas
    task's test split, and on the ten kinds of single-item canvases of the pretrain-val pool."""
    from ..data import mini
    from ..data.scenes import render, sample_scene
    from ..data.texts import class_texts

    model.eval()
    results = {}
    tokenizer = model.tokenizer

    def accuracy(images: Tensor, labels: Tensor, texts: list[str]) -> float:
        text = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        correct = 0
        for start in range(0, len(images), 500):
            image = F.normalize(model.encode_image(images[start:start + 500]), dim=-1)
            correct += ((image @ text.T).argmax(-1) == labels[start:start + 500]).sum().item()
        return 100.0 * correct / len(images)

    for task in ZERO_SHOT_TASKS:
        arrays = mini.load(task)
        results[task] = accuracy(to_input(arrays.test_x), torch.from_numpy(arrays.test_y), class_texts(task))
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng, num_items=1) for _ in range(1000)]
    canvases, _ = render(scenes, "pretrain-val", rng)
    kinds = torch.tensor([scene.items[0].kind for scene in scenes])
    results["kinds"] = accuracy(to_input(canvases), kinds, class_texts("fashion-mnist"))
    return results


def evaluate_clip(model, weights_path: Path) -> dict:
    """The model card's evaluation figures of ``model``, whose weights are the file ``weights_path``."""
    return {"zero_shot": zero_shot(model), **weights_figures(weights_path)}


def remeasure_clip(out: Path, docs: Path) -> dict:
    """``vptune pretrain --arch clip --evaluate-only``: the evaluation figures of the weights in
    ``out``, measured again, into ``docs/clip-fmnist-figures.json`` (the run's record kept)."""
    from .clip_bundled import load_bundled_clip

    path = Path(out) / f"{BUNDLED_CLIP}.safetensors"
    evaluation = evaluate_clip(load_bundled_clip(path), path)
    write_figures(docs, "clip", BUNDLED_CLIP, evaluation, evaluate_command("clip", out, docs))
    return evaluation


def pretrain_clip(
    out: Path, steps: int = 300, batch_size: int = 128, lr: float = 2e-3, image_lr: float = 2e-4,
    unlocked_blocks: int = 2, weight_decay: float = 0.05, warmup_steps: int = 30, seed: int = 0, threads: int = 1,
    work_dir: Path | None = None, checkpoint_every: int = 20, log_every: int = 10, docs: Path | None = None,
) -> dict:
    """Train the bundled CLIP; write ``out/vptune_clip_fmnist.safetensors``, ``out/CLIP_MODEL_CARD.md``
    and the figures file ``clip-fmnist-figures.json`` in ``docs`` (default ``out``)."""
    from .loading import load_backbone

    torch.set_num_threads(threads)
    out, work_dir = Path(out), Path(work_dir or cache_root() / "pretrain")
    out.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = work_dir / f"{BUNDLED_CLIP}-checkpoint.pt"
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, image_lr=image_lr, unlocked_blocks=unlocked_blocks,
                  weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed)

    torch.manual_seed(seed)
    model = build_bundled_clip()
    init_from_vit(model, load_backbone())  # the bundled ViT's shipped weights
    depth = len(model.visual.transformer.resblocks)
    unlocked = tuple(f"visual.transformer.resblocks.{i}." for i in range(depth - unlocked_blocks, depth))
    for name, p in model.named_parameters():  # autograd then skips the locked blocks' backward
        p.requires_grad_(not name.startswith("visual.") or name.startswith(unlocked + ("visual.ln_post.", "visual.proj")))
    image_params = [p for n, p in model.named_parameters() if n.startswith("visual.") and p.requires_grad]
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    groups = [
        {"params": [p for p in image_params if p.ndim > 1], "weight_decay": weight_decay, "peak": image_lr},
        {"params": [p for p in image_params if p.ndim <= 1], "weight_decay": 0.0, "peak": image_lr},
        {"params": [p for p in text_params if p.ndim > 1], "weight_decay": weight_decay, "peak": lr},
        {"params": [p for p in text_params if p.ndim <= 1], "weight_decay": 0.0, "peak": lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def loss_at(step: int) -> tuple[Tensor, dict[str, float]]:
        rng = np.random.default_rng([seed, step])  # the batch of a step is the same on resume
        images, texts = batch_of(rng, batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = clip_loss(model, images, model.tokenizer(texts))
        return loss, {"scale": model.logit_scale.exp().item()}

    print(f"pretraining {BUNDLED_CLIP}: {recipe}, {threads} threads", flush=True)
    history: list[list[float]] = []
    start, elapsed = train_steps(model, optimizer, loss_at, steps=steps, warmup_steps=warmup_steps, recipe=recipe,
                                 checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                                 log_every=log_every, batch_size=batch_size, history=history)

    weights_path = out / f"{BUNDLED_CLIP}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_path),
              metadata={"architecture": BUNDLED_CLIP})
    evaluation = evaluate_clip(model, weights_path)
    print("zero-shot top-1: " + ", ".join(f"{k} {v:.1f}%" for k, v in evaluation["zero_shot"].items()), flush=True)
    docs = Path(docs or out)
    command = (f"vptune pretrain --arch clip --out {out} --docs {docs} --steps {steps} --batch-size {batch_size} --lr {lr} "
               f"--image-lr {image_lr} --unlocked-blocks {unlocked_blocks} --weight-decay {weight_decay} --warmup-steps {warmup_steps} --seed {seed} "
               f"--threads {threads}")
    training = training_record(command, recipe, start, elapsed, history)
    write_figures(docs, "clip", BUNDLED_CLIP, evaluation, evaluate_command("clip", out, docs), training)
    figures = {**evaluation, **{k: training[k] for k in ("wall_time_min", "pairs_per_s")}}
    (out / "CLIP_MODEL_CARD.md").write_text(model_card(recipe, figures, command, evaluate_command("clip", out, docs),
                                                       figures_path(docs, "clip")))
    print(f"wrote {weights_path} ({figures['weights_mb']:.1f} MB), {out / 'CLIP_MODEL_CARD.md'} and "
          f"{figures_path(docs, 'clip')}", flush=True)
    return figures


def model_card(recipe: dict, figures: dict, command: str, remeasure: str, figures_file: Path) -> str:
    config = clip_config(0, 0, 0)
    zs = "\n".join(f"| {task} | {acc:.1f} |" for task, acc in figures["zero_shot"].items())
    return f"""# {BUNDLED_CLIP}: the bundled CLIP

A small open_clip `CLIP` (image tower: open_clip `VisionTransformer`, 32 px, patch 4, width
{config['vision_cfg']['width']}, {config['vision_cfg']['layers']} blocks; text tower: width
{config['text_cfg']['width']}, {config['text_cfg']['layers']} blocks, {config['text_cfg']['context_length']} tokens of the canvases'
word tokenizer, pooled at its end-of-text token; joint embedding {config['embed_dim']}), shipped so that text heads,
zero-shot classification and CoOp run with no download. {figures['parameters']:,} parameters.

## Data
Captioned canvases of Fashion-MNIST items (1 to 4 items with kind, place, size class and rotation),
drawn fresh every step from the *pretraining pool* (Fashion-MNIST's train split) with a random
truthful caption: items sometimes reordered, attributes sometimes omitted, counts in
digits or words or not at all. The mini-benchmark's canvases and the vision-language benchmark use
Fashion-MNIST's test split only, never these.

## Recipe
The image tower starts from the bundled ViT (`vptune_vit_fmnist`, re-laid out exactly into open_clip's
tower); its first blocks stay locked (LiT-style), its last {recipe['unlocked_blocks']} blocks, final norm and projection
are tuned; the text tower and projections are new. CLIP's symmetric contrastive loss with a learned
temperature (capped at 100); AdamW (betas 0.9/0.98, eps 1e-6), lr {recipe['lr']} for the text side and
{recipe['image_lr']} for the image tower, weight decay {recipe['weight_decay']} (none on 1-d tensors), {recipe['warmup_steps']}
warm-up steps then cosine; {recipe['steps']} steps of batch {recipe['batch_size']}; bf16 autocast; seed {recipe['seed']}.

## Zero-shot top-1 (%)
Class texts in the captions' own words (`vptune.data.texts.class_texts`), template `{{}}`; the mini
tasks' test splits, and "kinds": the ten kinds on 1,000 single-item canvases of the pretrain-val pool.

| task | top-1 |
|---|---:|
{zs}

- Wall time: {figures['wall_time_min']:.1f} min ({figures['pairs_per_s']:.0f} pairs/s), as recorded by the training run.
- Machine: {machine()}.
- Weights: `{BUNDLED_CLIP}.safetensors`, {figures['weights_mb']:.1f} MB, float32. Written {now()}.

## Limitations
{figures['wall_time_min']:.0f} minutes of training on one CPU thread, on synthetic grey canvases with a
114-word vocabulary: it knows only these canvases' words, and its zero-shot accuracy on the ten kinds
alone is weak (the captions name up to four items, each kind in a crowd of others). It stands in for CLIP to compare methods on a CPU, not for CLIP itself.

## Reproduce
```
{command}
```
Rerunning the command resumes from the last checkpoint in `$VPTUNE_CACHE/pretrain`. The run writes
its figures (the zero-shot accuracies above; recipe, steps, wall time and loss history) to
`{figures_file}`. `{remeasure}` measures the zero-shot
accuracies again on the shipped weights, with the same code, and rewrites that file's `evaluation`
part; the training figures (wall time, pairs/s) stay as the run recorded them.
"""

