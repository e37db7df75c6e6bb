"""Pretrain a bundled backbone on the Fashion-MNIST train set (``vptune pretrain [--arch vit|swin]``),
and the step loop (``train_steps``) of the bundled models pretrained on drawn batches (CLIP, ViLT).

A plain supervised loop: AdamW, linear warm-up then cosine (per step), bf16 autocast, light
augmentation (random crop with padding, horizontal flip), label smoothing. Writes the backbone
without its classifier as safetensors, a model card with the measured test accuracy and the
figures file (``figures.py``: ``docs/vit-fmnist-figures.json``, ``docs/swin-fmnist-figures.json``).
A checkpoint is written at the end of every epoch; rerunning the same command resumes there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data.cache import cache_root
from ..data.fashion_mnist import load_fashion_mnist
from ..report import machine, now
from .bundled import ARCHES, BUNDLED, MEAN, STD, build_bundled
from .figures import evaluate_command, figures_path, weights_figures, write_figures

_PAD = 2  # 28x28 -> 32x32
_SHIFT = 2  # random crop: up to 2 px either way


def to_input(images: Tensor) -> Tensor:
    """uint8 (B, 32, 32) to the normalised float (B, 3, 32, 32) the backbone expects."""
    x = (images.float() / 255 - MEAN[0]) / STD[0]
    return x[:, None].expand(-1, 3, -1, -1)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 (B, 28, 28) to randomly shifted and flipped uint8 (B, 32, 32)."""
    size = images.shape[-1] + 2 * _PAD
    padded = F.pad(images, (_PAD + _SHIFT,) * 4)
    offsets = torch.randint(0, 2 * _SHIFT + 1, (len(images), 2), generator=generator).tolist()
    crops = torch.stack([p[i:i + size, j:j + size] for p, (i, j) in zip(padded, offsets)])
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip[:, None, None], crops.flip(-1), crops)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, the class token, position embedding and Swin's relative position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name in ("cls_token", "pos_embed") or name.endswith("relative_position_bias_table")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_input(F.pad(images[start:start + batch_size], (_PAD,) * 4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            correct += (model(x).argmax(-1) == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_at: Callable[[int], tuple[Tensor, dict[str, float]]],
    *,
    steps: int,
    warmup_steps: int,
    recipe: dict,
    checkpoint_path: Path,
    checkpoint_every: int = 20,
    log_every: int = 10,
    batch_size: int = 1,
    after_step: Callable[[], None] | None = None,
    extra: dict[str, nn.Module] | None = None,
    history: list[list[float]] | None = None,
) -> tuple[int, float]:
    """The step loop of the bundled models pretrained on batches drawn per step (CLIP, ViLT, the
    text-to-image model).

    ``loss_at(step)`` draws the step's batch (the same on resume) and returns the loss and
    figures to log (averaged over ``log_every`` steps). Each parameter group's lr follows
    ``lr_at`` to its own ``peak``. ``after_step`` runs after each optimiser step (an EMA
    update). A checkpoint (model, optimizer, step, time, ``recipe``, the ``extra`` modules'
    states, ``history``) is written every ``checkpoint_every`` steps; one with the same recipe
    is resumed, one with another is ignored. ``history``, when given, collects [step, mean loss]
    per log window across sessions (a loss curve). Returns (the step it started from, training
    seconds over all sessions)."""
    start, elapsed, extra = 0, 0.0, extra or {}
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state["recipe"] == recipe:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            for key, module in extra.items():
                module.load_state_dict(state[key])
            if history is not None:
                history[:] = state.get("history", [])
            start, elapsed = state["step"], state["elapsed"]
            print(f"resuming after step {start} from {checkpoint_path}", flush=True)
        else:
            print(f"ignoring {checkpoint_path}: it was written with another recipe", flush=True)
    model.train()
    window, sums, seen = time.perf_counter(), {}, 0
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup_steps, group["peak"])
        loss, figures = loss_at(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; the last good checkpoint is {checkpoint_path}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        seen += 1
        for key, value in {"loss": loss.item(), **figures}.items():
            sums[key] = sums.get(key, 0.0) + value
        if (step + 1) % log_every == 0:
            t = time.perf_counter()
            shown = " ".join(f"{key} {value / seen:.4f}" for key, value in sums.items())
            print(f"step {step + 1}/{steps} {shown} {seen * batch_size / (t - window):.1f} pairs/s", flush=True)
            if history is not None:
                history.append([step + 1, sums["loss"] / seen])
            elapsed += t - window
            window, sums, seen = t, {}, 0
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                          "elapsed": elapsed + time.perf_counter() - window, "recipe": recipe,
                          "history": history or [], **{key: module.state_dict() for key, module in extra.items()}},
                         checkpoint_path)
    return start, elapsed + time.perf_counter() - window


def pretrain(
    out: Path,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 200,
    label_smoothing: float = 0.1,
    seed: int = 0,
    threads: int = 2,
    work_dir: Path | None = None,
    log_every: int = 50,
    arch: str = "vit",
    docs: Path | None = None,
) -> dict:
    """Train the bundled architecture ``arch`` ("vit" or "swin"), write ``out/<name>.safetensors``,
    its model card (``out/MODEL_CARD.md`` for the ViT, ``out/MODEL_CARD_swin.md`` for the Swin) and
    its figures file in ``docs`` (default ``out``: ``<arch>-fmnist-figures.json``).

    Returns the card's figures (test accuracy, wall time, images/s)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(sorted(ARCHES))}")
    name = ARCHES[arch]
    torch.set_num_threads(threads)
    out, work_dir = Path(out), Path(work_dir or cache_root() / "pretrain")
    out.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = work_dir / f"{name}-checkpoint.pt"
    recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  warmup_steps=warmup_steps, label_smoothing=label_smoothing, seed=seed)

    train_x, train_y = (torch.from_numpy(a) for a in load_fashion_mnist("train"))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion_mnist("test"))
    steps_per_epoch = len(train_x) // batch_size  # drop the last partial batch
    total_steps = epochs * steps_per_epoch

    torch.manual_seed(seed)
    model = build_bundled(num_classes=10, name=name)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))
    start_epoch, elapsed, history = 0, 0.0, []  # history: [epoch, mean loss, train accuracy] per epoch
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state["recipe"] == recipe:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, elapsed, history = state["epoch"], state["elapsed"], state.get("history", [])
            print(f"resuming after epoch {start_epoch} from {checkpoint_path}", flush=True)
        else:
            print(f"ignoring {checkpoint_path}: it was written with another recipe", flush=True)

    print(f"pretraining {name} on Fashion-MNIST ({len(train_x)} images): {recipe}, "
          f"{steps_per_epoch} steps/epoch, {threads} threads", flush=True)
    for epoch in range(start_epoch, epochs):
        model.train()
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(train_x), generator=generator)
        epoch_start = window_start = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, lr)
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y = to_input(augment(train_x[idx], generator)), train_y[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {i}; "
                                         f"the last good checkpoint is {checkpoint_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            loss_sum += loss.item() * len(y)
            if (i + 1) % log_every == 0:
                tick = time.perf_counter()
                print(f"epoch {epoch + 1}/{epochs} step {i + 1}/{steps_per_epoch} loss {loss_sum / seen:.4f} "
                      f"train-acc {correct / seen:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                      f"{log_every * batch_size / (tick - window_start):.1f} img/s", flush=True)
                window_start = tick
        epoch_time = time.perf_counter() - epoch_start
        elapsed += epoch_time
        print(f"epoch {epoch + 1} done: loss {loss_sum / seen:.4f} train-acc {correct / seen:.4f} "
              f"{seen / epoch_time:.1f} img/s, {epoch_time / 60:.1f} min", flush=True)
        history.append([epoch + 1, loss_sum / seen, correct / seen])
        _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                      "elapsed": elapsed, "recipe": recipe, "history": history}, checkpoint_path)

    eval_start = time.perf_counter()
    test_accuracy = evaluate(model, test_x, test_y)
    elapsed += time.perf_counter() - eval_start
    print(f"Fashion-MNIST test accuracy {test_accuracy:.4f}", flush=True)

    backbone = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    weights_path = out / f"{name}.safetensors"
    save_file(backbone, str(weights_path), metadata={
        "architecture": name, "fashion_mnist_test_accuracy": f"{test_accuracy:.4f}"})
    docs = Path(docs or out)
    arch_flag = "" if arch == "vit" else f"--arch {arch} "  # the ViT's command as before
    command = (f"python -m vptune.backbones.pretrain {arch_flag}--out {out} --docs {docs} --epochs {epochs} "
               f"--batch-size {batch_size} --lr {lr} --weight-decay {weight_decay} --warmup-steps {warmup_steps} "
               f"--label-smoothing {label_smoothing} --seed {seed} --threads {threads}")
    evaluation = weights_figures(weights_path)
    training = {"command": command, "recipe": recipe, "steps": total_steps, "test_accuracy": test_accuracy,
                "wall_time_min": elapsed / 60, "images_per_s": total_steps * batch_size / elapsed,
                "machine": machine(), "written": now(), "history": history}
    write_figures(docs, arch, name, evaluation, evaluate_command(arch, out, docs), training)
    results = {**evaluation, **{k: training[k] for k in ("test_accuracy", "wall_time_min", "images_per_s")}}
    card = out / BUNDLED[name].card
    card.write_text(model_card(recipe, results, command, name=name, docs=docs, out=out))
    print(f"wrote {weights_path} ({results['weights_mb']:.1f} MB), {card} and {figures_path(docs, arch)}", flush=True)
    return results


def remeasure_bundled(out: Path, docs: Path, arch: str = "vit") -> dict:
    """``vptune pretrain --arch vit|swin --evaluate-only``: load the weights in ``out`` and write
    their figures file in ``docs``. The test accuracy needs the Fashion-MNIST classifier, which the
    shipped file drops, so it is not re-measured: where no run's record exists, the figures file
    takes the one the weights file's metadata holds (written by the run beside the weights)."""
    from safetensors import safe_open

    from .loading import load_backbone

    name = ARCHES[arch]
    path = Path(out) / f"{name}.safetensors"
    load_backbone(name, weights=path)  # the file loads into the architecture, strictly
    evaluation = weights_figures(path)
    training = None
    existing = figures_path(docs, arch)
    if not existing.is_file() or json.loads(existing.read_text()).get("training") is None:
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get("fashion_mnist_test_accuracy")
        training = {"test_accuracy": None if recorded is None else float(recorded),
                    "source": "the weights file's metadata, written by the training run; its other figures are "
                              "as the model card records them"}
    write_figures(docs, arch, name, evaluation, evaluate_command(arch, out, docs), training)
    return evaluation


def model_card(recipe: dict, results: dict, command: str, name: str = ARCHES["vit"], docs: Path = Path("docs"),
               out: Path = Path("src/vptune/weights")) -> str:
    spec = BUNDLED[name]
    arch = ", ".join(f"{k}={v}" for k, v in spec.architecture.items())
    swin = spec.arch == "swin"
    title = "the bundled Swin backbone" if swin else "the bundled backbone"
    papers = "ImageNet-21k Swin-B of the VPT paper" if swin else "ImageNet-21k ViTs of the papers"
    no_decay = "biases, norms and relative position bias tables" if swin else "biases, norms, class token and\nposition embedding"
    setting = "Swin-B pretrained on ImageNet-21k" if swin else "ViT-B/16 pretrained on ImageNet-21k"
    layout = ("\nPatch 4 gives an 8x8 grid; stage 0 (width 48) attends in four 4x4 windows, shifted by 2 in its\n"
              "second block; stage 1 (width 96, 4x4 grid) in one window; stage 2 (width 192, 2x2 grid) in one\n"
              "2x2 window (timm clips a window to the grid and does not shift a single window).") if swin else ""
    return f"""# {name}: {title}

A small timm `{spec.model_class}` pretrained from scratch on Fashion-MNIST, shipped with vptune
so that prompt tuning can be tried with no download and no GPU. It is a stand-in for the
{papers}, not a replacement: expect its features to transfer well to
grayscale object images and poorly to anything far from them.

## Architecture
`{spec.model_class}({arch})`: {results['parameters']:,} parameters without the classifier
(the shipped file drops the Fashion-MNIST head; vptune trains its own head per task).{layout}
Input 3x32x32, normalised with mean {MEAN[0]} and std {STD[0]} on every channel
(`timm.data.resolve_data_config(model=backbone)` returns these).

## Data
Fashion-MNIST train set (60,000 images, 10 classes), 28x28 grayscale zero-padded to 32x32 and
replicated to three channels. The test set (10,000) is used only for the accuracy below.
The mini-benchmark's structured tasks use Fashion-MNIST *test* objects only, never these.

## Recipe
Supervised cross-entropy with label smoothing {recipe['label_smoothing']}; AdamW (betas 0.9/0.999),
lr {recipe['lr']}, weight decay {recipe['weight_decay']} (none on {no_decay}), {recipe['warmup_steps']} linear warm-up steps then cosine to zero, stepped per
iteration; batch {recipe['batch_size']}, {recipe['epochs']} epochs; bf16 autocast; augmentation:
random crop 32 from the image padded by 2+2 px (shifts up to 2 px) and horizontal flip; seed {recipe['seed']}.

## Results
- Fashion-MNIST test top-1: **{results['test_accuracy'] * 100:.2f}%**, measured by the training run with its
  Fashion-MNIST classifier (the shipped file drops it, so this figure cannot be re-measured from the
  file; the file's metadata records it).
- Wall time: {results['wall_time_min']:.1f} min ({results['images_per_s']:.0f} training images/s end to end), as recorded by the training run.
- Machine: {machine()}.
- Weights: `{name}.safetensors`, {results['weights_mb']:.1f} MB, float32.
- Written {now()}.

## Limitations
Trained from scratch on one small grayscale dataset for {recipe['epochs']} epochs, to fit a 2-core CPU. For
scale: a linear classifier on raw pixels gets about 84% on Fashion-MNIST (the dataset authors'
benchmark). Its features know nothing of colour, texture or scenes. Numbers obtained with it show how methods
compare on a small backbone, not the papers' setting ({setting}).

## Reproduce
```
{command}
```
(`vptune pretrain` runs the same function.) Rerunning the command resumes from the last epoch
checkpoint in `$VPTUNE_CACHE/pretrain` (default `~/.cache/vptune/pretrain`) if one exists.
The run writes its figures (the recipe, steps, test accuracy, wall time, loss and training
accuracy per epoch) to `{figures_path(docs, spec.arch)}`.
`{evaluate_command(spec.arch, out, docs)}` re-measures from the shipped file what can be
measured without its classifier (parameters, file size) and rewrites that file's `evaluation`
part; the training figures stay as the run recorded them.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description="Pretrain a bundled backbone on Fashion-MNIST.")
    parser.add_argument("--arch", choices=sorted(ARCHES), default="vit", help="vit: vptune_vit_fmnist, swin: vptune_swin_fmnist")
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights and MODEL_CARD.md")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoint folder (default: the cache)")
    parser.add_argument("--docs", type=Path, default=None, help="folder for the figures JSON (default: --out)")
    args = parser.parse_args()
    pretrain(args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
             warmup_steps=args.warmup_steps, label_smoothing=args.label_smoothing, seed=args.seed,
             threads=args.threads, work_dir=args.work_dir, arch=args.arch, docs=args.docs)


if __name__ == "__main__":
    main()
