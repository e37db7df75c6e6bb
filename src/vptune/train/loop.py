"""The training loop: ``fit`` a PromptModel on a DataBundle, ``evaluate`` it on a dataset.

One epoch reads: shuffle with a generator seeded by (seed, epoch); for each micro-batch, a
forward pass under optional bf16 autocast, the summed cross-entropy divided by the number of
images in its optimiser step (so ``grad_accum`` micro-batches add up to exactly the big batch's
mean-loss gradient), backward; every ``grad_accum`` micro-batches clip the summed gradient's norm
(with ``clip_grad``), set the scheduled lr and step. At the end of the epoch: evaluate on val if due, then (main process only) write the
tuned weights, the checkpoint and the curve. Because the data order depends only on
(seed, epoch) and the checkpoint holds every RNG state, ``resume=True`` reproduces an
uninterrupted run exactly.

Under torchrun (a process group joined, see ``distributed``) ``epoch_sampler`` gives each
process its DistributedSampler share, ``forward_model`` is the DDP wrapper, losses and
evaluation counts are summed over processes, and only the main process writes files.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from ..atomic import atomic_write
from ..model import CONFIG_FILE, PromptModel, check_compatible, read_run_config
from ..tracking import Tracker
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, with_defaults
from .distributed import all_sum, eval_shard, finite_everywhere, train_sampler, world_size, wrap
from .optim import build_optimizer, lr_factor, set_lr

CURVE_FILE = "curve.csv"
CURVE_FIELDS = ("epoch", "step", "train_loss", "lr", "val_top1", "val_loss", "images_per_s")
# Settings a resumed run must share with its checkpoint, or it would not continue the same run.
RESUME_MUST_MATCH = (
    "epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs", "scale_lr", "precision", "seed",
    "grad_accum", "eval_every", "clip_grad",
)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator behind an epoch's data order and worker seeds: a function of (seed, epoch) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_sampler(dataset: Dataset, cfg: TrainConfig, epoch: int) -> Sampler:
    """The order in which epoch ``epoch`` visits ``dataset``; under torchrun, this process's share."""
    if world_size() > 1:
        return train_sampler(dataset, cfg.seed, epoch)
    return RandomSampler(dataset, generator=epoch_generator(cfg.seed, epoch))


def make_loader(dataset: Dataset, cfg: TrainConfig, epoch: int, sampler: Sampler | None = None) -> DataLoader:
    """A loader for epoch ``epoch``: shuffled by ``sampler`` for training, in order (None) for evaluation."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        generator=epoch_generator(cfg.seed, epoch),  # seeds the workers' augmentation
        pin_memory=cfg.torch_device().type == "cuda",
    )


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, cfg: TrainConfig | int = 256) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``dataset``.

    ``cfg`` is a TrainConfig (its batch size, device, precision and workers are used) or just
    a batch size (fp32, on the model's device).
    """
    if isinstance(cfg, int):
        cfg = TrainConfig(batch_size=cfg, device=str(next(model.parameters()).device))
    device = cfg.torch_device()
    if is_batch_dict_data(dataset):
        return evaluate_task(model, dataset, cfg, device)
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for images, labels in make_loader(eval_shard(dataset), cfg, epoch=0):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(cfg, device):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += labels.numel()
    model.train(was_training)
    correct, loss_sum, count = all_sum([correct, loss_sum, count], device)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return {"top1": 100.0 * correct / count, "loss": loss_sum / count, "count": count}


def is_batch_dict_data(dataset: Dataset) -> bool:
    """Whether ``dataset``'s samples are batch dicts (the vision-language tasks) rather than
    ``(image, label)`` pairs (classification)."""
    inner = dataset
    while hasattr(inner, "datasets") or hasattr(inner, "dataset"):  # ConcatDataset, Subset
        inner = inner.datasets[0] if hasattr(inner, "datasets") else inner.dataset
    return bool(getattr(inner, "yields_dicts", False))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate_task(model: PromptModel, dataset: Dataset, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """The task's own metrics of ``model`` on a dataset of batch dicts, without the split
    prefix (``vqa_score``, ``top1``, ``ir_r1``, ...), and ``count``. The task decides how a split
    is scored (``Task.evaluate``): retrieval scores every caption against every image."""
    was_training = model.training
    model.eval()

    def predict(batch: dict[str, Any]) -> torch.Tensor:
        with autocast(cfg, device):
            return model(to_device(batch, device)).float()

    metrics = model.task.evaluate(predict, dataset, lambda d: make_loader(d, cfg, epoch=0))
    model.train(was_training)
    return {key.removeprefix("split_"): value for key, value in metrics.items()}


def fit(
    model: PromptModel,
    data: Any,
    cfg: TrainConfig,
    out_dir: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train ``model``'s tuned parameters on ``data.train``; evaluate on ``data.val`` at the end
    (and every ``cfg.eval_every`` epochs). With ``out_dir``, write the tuned weights, the curve
    and a checkpoint after every epoch; ``resume`` continues from that checkpoint.
    ``on_epoch_end(record)`` is called with each epoch's curve row (a sweep reports it);
    ``tracker`` gets every step's and every epoch's figures (see ``vptune.tracking``).

    Returns the final val top-1 and loss, the curve and throughput figures.
    """
    if len(data.train) == 0:
        raise ValueError("the training set is empty")
    device = cfg.torch_device()
    torch.manual_seed(cfg.seed)
    model.to(device)
    model.metadata["train_config"] = cfg.to_dict()
    optimizer = build_optimizer(model, cfg)
    forward_model = wrap(model, device)  # DistributedDataParallel under torchrun
    peak_lr = cfg.effective_lr * (world_size() if cfg.scale_lr else 1)  # scale_lr counts every process's images
    micro_batches = math.ceil(len(epoch_sampler(data.train, cfg, 0)) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    has_val = data.val is not None and len(data.val) > 0

    state: dict[str, Any] = {"epoch": 0, "step": 0, "curve": [], "wall_time_s": 0.0, "train_time_s": 0.0, "images": 0}
    if out_dir is not None:
        out_dir = Path(out_dir)
        check_run_folder(model, out_dir)
        if resume:
            state = restore(model, optimizer, data, cfg, out_dir)
        elif is_main_process():
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # a fresh start: a stale checkpoint must not be resumed
    elif resume:
        raise ValueError("resume needs the run folder (out_dir) that holds the checkpoint")

    started = time.perf_counter() - state["wall_time_s"]
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.3g}  {task.fields[ips]:.0f} img/s"),
        TimeRemainingColumn(), disable=not (progress and is_main_process()),
    )
    with bar:
        task = bar.add_task("", total=micro_batches, loss=float("nan"), lr=0.0, ips=0.0)
        for epoch in range(state["epoch"], cfg.epochs):
            bar.reset(task, description=f"epoch {epoch + 1}/{cfg.epochs}", total=micro_batches)
            model.train()
            loader = make_loader(data.train, cfg, epoch, sampler=epoch_sampler(data.train, cfg, epoch))
            num_images = len(loader.sampler)
            step_images = cfg.batch_size * cfg.grad_accum
            loss_sum, seen, lr, tick = 0.0, 0, 0.0, time.perf_counter()
            step_loss, step_seen, step_tick = 0.0, 0, tick  # the current optimiser step's, for the tracker
            for i, item in enumerate(loader):
                # (images, labels) for classification; a batch dict for the vision-language tasks
                batch = to_device(item, device) if isinstance(item, dict) else {
                    "image": item[0].to(device, non_blocking=True), "label": item[1].to(device, non_blocking=True)}
                inputs = batch if isinstance(item, dict) else batch["image"]
                count = len(next(iter(batch.values())))
                window_start = (i // cfg.grad_accum) * step_images  # images in this optimiser step
                in_step = min(window_start + step_images, num_images) - window_start
                with autocast(cfg, device):
                    logits = forward_model(inputs)
                loss = model.task.loss_sum(logits, batch)
                if not finite_everywhere(loss):
                    raise non_finite(loss, epoch, state["step"], out_dir)
                (loss / in_step).backward()
                loss_value = loss.item()
                loss_sum, seen = loss_sum + loss_value, seen + count
                step_loss, step_seen = step_loss + loss_value, step_seen + count
                if (i + 1) % cfg.grad_accum == 0 or i + 1 == micro_batches:
                    grad_norm = clip_gradients(optimizer, cfg.clip_grad)
                    lr = peak_lr * lr_factor(state["step"], warmup_steps, total_steps)
                    set_lr(optimizer, lr)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    if tracker is not None:
                        now = time.perf_counter()
                        figures = {"step/train_loss": step_loss / step_seen, "step/lr": lr,
                                   "step/images_per_s": step_seen / max(now - step_tick, 1e-9)}
                        if grad_norm is not None:
                            figures["step/grad_norm"] = grad_norm  # before clipping: how often the limit bites
                        tracker.log(figures, state["step"])
                        step_loss, step_seen, step_tick = 0.0, 0, now
                elapsed = time.perf_counter() - tick
                bar.update(task, advance=1, loss=loss_sum / seen, lr=lr, ips=seen / max(elapsed, 1e-9))
            elapsed = time.perf_counter() - tick
            loss_sum, seen = all_sum([loss_sum, seen], device)
            state["train_time_s"] += elapsed
            state["images"] += seen
            record: dict[str, Any] = {
                "epoch": epoch + 1, "step": state["step"], "train_loss": loss_sum / seen, "lr": lr,
                "val_top1": None, "val_loss": None, "images_per_s": seen / elapsed,
            }
            if has_val and (epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                val = evaluate(model, data.val, cfg)
                record.update(val_top1=val.get("top1"), val_loss=val.get("loss"))
                record.update({f"val_{key}": value for key, value in val.items() if key not in ("top1", "loss", "count")})
            state["curve"].append(record)
            state["epoch"] = epoch + 1
            state["wall_time_s"] = time.perf_counter() - started
            if out_dir is not None and is_main_process():
                save_epoch(model, optimizer, data, cfg, out_dir, state)
            if progress and is_main_process():
                main = model.task.main_metric
                val_text = f"  val {main} {record[f'val_{main}']:.2f}%" if record.get(f"val_{main}") is not None else ""
                bar.console.print(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  lr {lr:.3g}{val_text}"
                    f"  {record['images_per_s']:.0f} img/s"
                )
            if tracker is not None:
                tracker.log({f"epoch/{key}": value for key, value in record.items() if key != "step" and value is not None},
                            record["step"])
            if on_epoch_end is not None:
                on_epoch_end(record)

    last = state["curve"][-1] if state["curve"] else {}
    return {
        "val_top1": last.get("val_top1"),
        "val_loss": last.get("val_loss"),
        "train_loss": last.get("train_loss"),
        "epochs": state["epoch"],
        "steps": state["step"],
        "wall_time_s": time.perf_counter() - started,
        "images_per_s": state["images"] / state["train_time_s"] if state["train_time_s"] else None,
        "curve": state["curve"],
        "val": {k: v for k, v in last.items() if k.startswith("val_") and v is not None},
    }


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> float | None:
    """Scale the gradients of an optimiser step so that their total L2 norm over the tuned parameters
    (the optimiser's) is at most ``max_norm``, as timm's ``--clip-grad`` and HF Trainer's
    ``max_grad_norm`` do: it keeps a high-lr step from throwing LoRA or full fine-tuning off course.
    Called once per step, on the gradient of all its micro-batches (under torchrun, already averaged
    over processes, so every process clips alike). Returns the norm before clipping; None (nothing
    touched) without ``max_norm``."""
    if max_norm is None:
        return None
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return torch.nn.utils.clip_grad_norm_(params, max_norm).item()


def non_finite(loss: torch.Tensor, epoch: int, step: int, out_dir: Path | None) -> NonFiniteLossError:
    kept = (
        f"the last good checkpoint in {out_dir} (after epoch {epoch}) is kept"
        if out_dir is not None and epoch > 0
        else "no checkpoint was written"
    )
    value = loss.item()
    where = f"became {value}" if not math.isfinite(value) else "became NaN or infinite on another process"
    return NonFiniteLossError(
        f"training loss {where} in epoch {epoch + 1} (after {step} optimiser steps): stopping; "
        f"{kept}. Try a lower --lr, --precision fp32 or check the data"
    )


def check_run_folder(model: PromptModel, out_dir: Path) -> None:
    """Refuse a run folder that already holds a run of another backbone, method or head."""
    if not (out_dir / CONFIG_FILE).is_file():
        return
    run = read_run_config(out_dir)
    check_compatible(run, model.family, out_dir)
    check_backbone_weights(run, model.backbone_fingerprint, out_dir)
    saved, here = run["method_config"], model.config.to_dict()
    if saved != here or run["num_classes"] != model.num_classes:
        raise ValueError(
            f"run folder {out_dir} holds a run of {saved} with {run['num_classes']} classes; this run is {here} "
            f"with {model.num_classes} classes: choose another --out, or the same method options and data"
        )


def check_backbone_weights(run: dict[str, Any], fingerprint: str, out_dir: Path) -> None:
    """Refuse to continue or read back a run made on other weights of the same architecture
    (``backbone_weights``, the fingerprint every run config records)."""
    saved = run.get("backbone_weights")
    if saved is not None and saved != fingerprint:
        raise ValueError(
            f"run folder {out_dir} was made on other backbone weights (fingerprint {saved}, these are "
            f"{fingerprint}): choose another --out, or the weights it was made with"
        )


def restore(model: PromptModel, optimizer: torch.optim.Optimizer, data: Any, cfg: TrainConfig, out_dir: Path) -> dict:
    """Load the checkpoint into ``model`` and ``optimizer``, restore the RNGs, return the loop state."""
    ckpt = load_checkpoint(out_dir)
    saved = with_defaults(ckpt["train_config"], RESUME_MUST_MATCH)  # a checkpoint from before a setting existed
    diffs = [f"{key} {saved.get(key)!r} vs {getattr(cfg, key)!r}" for key in RESUME_MUST_MATCH if saved.get(key) != getattr(cfg, key)]
    if ckpt.get("train_size") != len(data.train):
        diffs.append(f"training images {ckpt.get('train_size')} vs {len(data.train)}")
    if diffs:
        raise ValueError(
            f"cannot resume {out_dir}: its checkpoint was made with other settings ({'; '.join(diffs)}); "
            "resume with the original settings or start a new run folder"
        )
    model.load_tuned_state_dict(ckpt["model"], source=str(out_dir / CHECKPOINT_FILE))
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["loop"]


def save_epoch(model: PromptModel, optimizer: torch.optim.Optimizer, data: Any, cfg: TrainConfig, out_dir: Path, state: dict) -> None:
    """Write the tuned weights, the checkpoint and the curve; refuse to overwrite them with non-finite weights."""
    bad = [name for name, t in model.tuned_state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(
            f"tuned tensors {bad[:3]} became NaN or infinite in epoch {state['epoch']}: stopping; the last good "
            f"checkpoint in {out_dir} is kept. Try a lower --lr or --precision fp32"
        )
    model.save_pretrained(out_dir)
    save_checkpoint(out_dir, {
        "model": {name: t.cpu() for name, t in model.tuned_state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "loop": state,
        "train_config": cfg.to_dict(),
        "train_size": len(data.train),
        "rng": rng_state(),
    })
    write_curve(out_dir / CURVE_FILE, state["curve"])


def write_curve(path: Path, curve: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    # a task's own validation metrics (VQA score, recalls) after the fixed fields
    fields = CURVE_FIELDS + tuple(dict.fromkeys(k for row in curve for k in row if k not in CURVE_FIELDS))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in curve:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
