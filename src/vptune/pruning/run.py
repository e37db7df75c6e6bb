"""Pruning a trained run, as ``vptune prune`` does it (docs/methods.md, "E2VPT: key-value
prompts and pruning").

1. Load the run and its data, measure it ("before").
2. Score the prompt tokens in one pass; prune the lowest at the given token rate, or search it.
3. Score the segments of the surviving tokens; prune the lowest at the given segment rate, or search it.
4. Export the compact model (pruned tokens absent, pruned segments not stored) and measure
   it without retraining ("pruned"); it must compute what the masked model computes.
5. Rewind: retrain the compact model from the run's original initial values
   (``init.safetensors``, lottery-ticket style, the paper) or from a fresh initialisation
   (the official code), measure it ("rewound") and save it as a run folder with ``prune.json``.

Search: ``grid`` retrains every (token rate x segment rate) pair for the full epochs, as the
official code does (72 trainings for 10 tokens and 16 segments), and keeps the best on val.
``cascade`` checks each token rate, then each segment rate, by a short fine-tuning of the
pruned trained prompts (``search_epochs``), keeps the highest rate whose val top-1 stays within
``tolerance`` points of the unpruned prompts' after the same short fine-tuning (stopping at the
first that does not), and rewinds only the winner: at most 18 short trainings and one full one.

Resuming: every finished search candidate is recorded in ``prune-progress.json`` and the
rewinding writes a checkpoint each epoch, both in the output folder; rerunning the same command
after a kill reads the candidates back and continues the rewinding where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..data.transforms import backbone_data_config
from ..atomic import atomic_write
from ..flops import count_flops, extra_flops
from ..methods import config_from_dict
from ..methods.vpt import MASK_MODES, SEGMENT_LAYOUTS
from ..model import WEIGHTS_FILE, PromptModel, read_run_config
from ..train import TrainConfig, evaluate, fit, load_run
from ..train.checkpoint import CHECKPOINT_FILE
from ..train.config import with_defaults, without_tracking
from ..train.folder import INIT_FILE, METRICS_FILE, PRUNE_FILE, PRUNE_PROGRESS_FILE, claim_run_folder, run_folder_lock
from ..train.run import write_json
from .masks import (
    SCORES,
    Masks,
    check_prunable,
    check_rate,
    compact,
    compact_config,
    importance_scores,
    is_pruned,
    prune_count,
    segment_masks,
    set_masks,
    token_masks,
    visual_prompts,
)

TOKEN_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the official grid's token percentages
REWINDS = ("original", "fresh")
SEARCHES = ("cascade", "grid")


@dataclasses.dataclass
class PruneOptions:
    token_rate: float | None = None  # fraction of tokens pruned; None: searched
    segment_rate: float | None = None  # fraction of each surviving token's segments pruned; None: searched
    segments: int = 16
    score: str = "abs"  # "abs" (the paper) | "signed" (the official code)
    rewind: str = "original"  # "original" (the paper) | "fresh" (the official code)
    search: str = "cascade"  # "cascade" | "grid"
    mask_mode: str = "log"  # "log": pruned tokens removed | "zero": kept as zero vectors (official)
    segment_layout: str = "contiguous"  # "contiguous" (the paper) | "interleaved" (official)
    epochs: int | None = None  # rewinding (and grid) epochs; None: the run's own
    search_epochs: int = 1  # cascade: epochs of the short fine-tuning per candidate
    tolerance: float = 1.0  # cascade: val top-1 points a candidate may lose against the unpruned run
    batch_size: int | None = None  # None: the run's own
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("token_rate", "segment_rate"):
            if getattr(self, name) is not None:
                check_rate(getattr(self, name), name.replace("_", "-"))
        choices = {
            "score": SCORES, "rewind": REWINDS, "search": SEARCHES, "mask_mode": MASK_MODES,
            "segment_layout": SEGMENT_LAYOUTS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {self.segments}")
        if self.epochs is not None and self.epochs < 1 or self.search_epochs < 1:
            raise ValueError(f"epochs and search-epochs must be >= 1, got {self.epochs} and {self.search_epochs}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 (top-1 points), got {self.tolerance}")


def token_candidates(num_prompts: int) -> list[float]:
    """The official token rates, one per distinct number of pruned tokens (none prunes all)."""
    by_count: dict[int, float] = {}
    for rate in TOKEN_RATES:
        by_count.setdefault(prune_count(num_prompts, rate), rate)
    return [rate for count, rate in sorted(by_count.items()) if count > 0]


def segment_candidates(segments: int) -> list[float]:
    """Pruning 1 to R/2 segments per token (the official grid: 1/16 ... 8/16)."""
    return [k / segments for k in range(1, segments // 2 + 1)]


@torch.no_grad()
def gflops_per_image(model: PromptModel) -> float:
    """Inference GFLOPs for one image, with the prompt key/value cache warm as when serving."""
    device = next(model.parameters()).device
    image = torch.zeros(1, *model.family.input_size(), device=device)
    was_training = model.training
    model.eval()
    model(image)
    flops = count_flops(lambda: model(image))
    model.train(was_training)
    return flops / 1e9


def measure(model: PromptModel, bundle: Any, cfg: TrainConfig) -> dict[str, Any]:
    """What the report compares: tuned parameters, FLOPs and accuracy on val and test."""
    val = evaluate(model, bundle.val, cfg) if bundle.val is not None and len(bundle.val) else None
    test = evaluate(model, bundle.test, cfg) if bundle.test is not None and len(bundle.test) else None
    return {
        "num_prompts": visual_prompts(model).table_shape[1],
        "tuned_parameters": model.num_tuned_parameters(),
        "gflops": gflops_per_image(model),
        "extra_gflops": extra_flops(model) / 1e9,
        "val_top1": None if val is None else val["top1"],
        "test_top1": None if test is None else test["top1"],
    }


def initial_state(run: Path, model: PromptModel, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """The run's tuned tensors before training, and where they came from."""
    path = run / INIT_FILE
    if path.is_file():
        return load_file(str(path)), str(path)
    torch.manual_seed(seed)  # train_run seeds exactly so before building the model
    fresh = PromptModel(model.backbone, model.config, model.num_classes)
    return fresh.tuned_state_dict(), f"seed {seed} (recomputed: {run} has no {INIT_FILE})"


def rewound(model: PromptModel, masks: Masks, how: str, initial: dict[str, torch.Tensor], seed: int) -> PromptModel:
    """The compact model ``masks`` leaves, with its tensors at the run's initial values or fresh."""
    device = next(model.parameters()).device
    if how == "original":
        start = PromptModel(model.backbone, model.config, model.num_classes).to(device)
        start.load_tuned_state_dict(initial, source="the run's initial values")
        small = compact(start, masks)
    else:
        torch.manual_seed(seed)
        small = PromptModel(model.backbone, compact_config(model.config, masks), model.num_classes).to(device)
    small.metadata = dict(model.metadata)
    return small


def snapshot(model: PromptModel) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in model.tuned_state_dict().items()}


def masked_equals_compact(model: PromptModel, small: PromptModel, masks: Masks, bundle: Any) -> float:
    """Largest logit difference between the masked model and its compact export on some val images."""
    dataset = bundle.val if bundle.val is not None and len(bundle.val) else bundle.train
    device = next(model.parameters()).device
    images = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]).to(device)
    model.eval()
    small.eval()
    with torch.no_grad():
        set_masks(model, masks)
        masked = model(images)
        set_masks(model, None)
        return (masked - small(images)).abs().max().item()


def previous_candidates(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The search candidates an interrupted prune with the same ``settings`` finished in ``out``."""
    path = out / PRUNE_PROGRESS_FILE
    if not path.is_file():
        return []
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}): delete it to start the search over") from None
    saved = progress.get("settings", {})
    if isinstance(saved.get("train_config"), dict):  # a pruning from before a setting existed had its default
        saved = {**saved, "train_config": with_defaults(saved["train_config"], settings["train_config"])}
    if saved != settings:
        changed = sorted(k for k in {*saved, *settings} if saved.get(k) != settings.get(k))
        raise ValueError(f"{out} holds a pruning made with other settings ({', '.join(changed)} differ): "
                         "use another --out, or the same settings to resume it")
    return progress["candidates"]


def prune_run(
    run: str | Path,
    data: str,
    out: str | Path,
    options: PruneOptions,
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune the E2VPT or VPT-deep run in ``run`` on ``data`` and write the rewound compact run
    and ``prune.json`` to ``out``. Returns the report written to ``prune.json``.

    ``out`` must be new or an earlier pruning (which resumes); a folder holding anything else
    is refused unless ``overwrite``. It is locked while the pruning runs."""
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist: pass a folder written by vptune train")
    if out.resolve() == run.resolve():
        raise ValueError(f"--out {out} is the run being pruned: choose another folder")
    with run_folder_lock(out):
        claim_run_folder(out, resume=False, overwrite=overwrite, kind="prune")
        return _prune(run, data, out, options, backbone=backbone, weights=weights, progress=progress, log=log)


def _prune(
    run: Path, data: str, out: Path, options: PruneOptions, *, backbone: str | None, weights: str | Path | None,
    progress: bool, log: Callable[[str], None],
) -> dict[str, Any]:
    from ..data import build_data

    saved = read_run_config(run)
    config = config_from_dict(saved["method_config"])
    check_prunable(config, where=f"run folder {run}")
    if is_pruned(config):
        raise ValueError(f"run folder {run} is already pruned (its config records kept segments): prune the original run")
    model = load_run(run, backbone, weights=weights)
    recorded = TrainConfig.from_dict(model.metadata["train_config"]) if "train_config" in model.metadata else TrainConfig()
    epochs = options.epochs or recorded.epochs
    cfg = dataclasses.replace(
        recorded, epochs=epochs, warmup_epochs=min(recorded.warmup_epochs, epochs),
        batch_size=options.batch_size or recorded.batch_size, device=options.device,
    )
    bundle = build_data(data, backbone_data_config(model.backbone), final=bool(model.metadata.get("final")),
                        skip_bad_images=cfg.skip_bad_images)
    names = model.metadata.get("class_names")
    if bundle.num_classes != model.num_classes or (names is not None and list(bundle.class_names) != list(names)):
        raise ValueError(
            f"{data} has {bundle.num_classes} classes; {run} was trained on {model.num_classes} classes "
            f"{list(names or [])[:6]}...: prune it on the data it was trained on"
        )
    has_val = bundle.val is not None and len(bundle.val) > 0
    searching = options.token_rate is None or options.segment_rate is None
    if searching and not has_val:
        raise ValueError(f"{data} has no val split to search the pruning rates on: pass --token-rate and --segment-rate")
    model.to(cfg.torch_device())
    p, segments, width = config.num_prompts, options.segments, min(visual_prompts(model).set_widths)  # Swin: per stage
    if segments > width:
        raise ValueError(f"--segments {segments} is more than the prompt width {width}: pass at most --segments {width}")

    log(f"measuring {run} before pruning")
    before = measure(model, bundle, cfg)
    score = dict(score=options.score, mode=options.mask_mode, layout=options.segment_layout, batch_size=cfg.batch_size)
    token_scores = importance_scores(model, bundle.train, **score)
    layout_only = dict(layout=options.segment_layout, mode=options.mask_mode)
    layout = dict(segments=segments, **layout_only)
    initial, initial_source = initial_state(run, model, recorded.seed) if options.rewind == "original" else ({}, "fresh")
    search: dict[str, Any] = {"mode": options.search if searching else "none", "epochs": 0, "candidates": []}
    segment_scores_of: dict[tuple, torch.Tensor] = {}

    def segment_scores(masks: Masks) -> torch.Tensor:
        key = tuple(masks.token.tolist())
        if key not in segment_scores_of:
            segment_scores_of[key] = importance_scores(model, bundle.train, segments=segments, keep_tokens=masks.token, **score)
        return segment_scores_of[key]

    def pruned_at(token_rate: float, segment_rate: float) -> Masks:
        masks = token_masks(token_scores, token_rate, **layout)
        return segment_masks(masks, segment_scores(masks), segment_rate) if segment_rate > 0 else masks

    settings = {
        "run": str(run.resolve()), "run_weights_sha256": hashlib.sha256((run / WEIGHTS_FILE).read_bytes()).hexdigest(),
        "data": data, "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "device"},
        "train_config": {k: v for k, v in without_tracking(cfg.to_dict()).items() if k != "device"},
    }
    previous = previous_candidates(out, settings)
    if not previous:  # marks out as this pruning's folder from the start: a rerun resumes it, another command is refused
        write_json(out / PRUNE_PROGRESS_FILE, {"settings": settings, "candidates": []})

    def trained_val(key: dict[str, Any], build: Callable[[], PromptModel], epochs: int) -> tuple[float, PromptModel | None]:
        """Val top-1 of a search candidate after ``epochs`` of training, and the trained candidate;
        read back (with no model) if an interrupted prune in ``out`` already trained it."""
        search["epochs"] += epochs
        done = next((entry for entry in previous if {k: entry.get(k) for k in key} == key), None)
        if done is not None:
            search["candidates"].append(done)
            return done["val_top1"], None
        candidate = build()
        short = dataclasses.replace(cfg, epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, epochs))
        val = fit(candidate, bundle, short, progress=False)["val_top1"]
        search["candidates"].append({**key, "val_top1": val})
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PRUNE_PROGRESS_FILE, {"settings": settings, "candidates": search["candidates"]})
        return val, candidate

    token_rates = [options.token_rate] if options.token_rate is not None else token_candidates(p)
    segment_rates = [options.segment_rate] if options.segment_rate is not None else segment_candidates(segments)
    final: PromptModel | None = None
    if searching and options.search == "grid":
        best = None
        for token_rate in token_rates:
            for segment_rate in segment_rates:
                masks = pruned_at(token_rate, segment_rate)
                starts: list[dict[str, torch.Tensor]] = []

                def build() -> PromptModel:
                    candidate = rewound(model, masks, options.rewind, initial, recorded.seed)
                    starts.append(snapshot(candidate))
                    return candidate

                val, candidate = trained_val({"token_rate": token_rate, "segment_rate": segment_rate}, build, cfg.epochs)
                log(f"grid: token rate {token_rate:.3g}, segment rate {segment_rate:.3g}: val top-1 {val:.2f}%")
                if best is None or val > best[0]:
                    best = (val, token_rate, segment_rate, masks, candidate, starts[0] if starts else None)
        # the winner trained in this session is the final model; one read back is rewound again below
        _, token_rate, segment_rate, masks, final, start = best
    else:
        token_rate, segment_rate = options.token_rate or 0.0, options.segment_rate or 0.0

        if searching:
            # The bar: the unpruned prompts after the same short retraining, so that a candidate
            # is judged on what pruning costs and not credited with the extra training.
            reference, _ = trained_val({"stage": "reference", "rate": 0.0},
                                       lambda: compact(model, Masks.keep_all(p, segments, **layout_only)),
                                       options.search_epochs)
            search["candidates"][-1]["passed"] = True
            log(f"cascade: unpruned prompts: val top-1 {reference:.2f}% after {options.search_epochs} epoch(s)")

        def cascade(stage: str, rates: list[float], masks_at: Callable[[float], Masks]) -> float:
            chosen = 0.0
            for rate in rates:
                val, _ = trained_val({"stage": stage, "rate": rate}, lambda: compact(model, masks_at(rate)),
                                     options.search_epochs)
                passed = search["candidates"][-1]["passed"] = val >= reference - options.tolerance
                log(f"cascade: {stage} rate {rate:.3g}: val top-1 {val:.2f}% after {options.search_epochs} epoch(s) "
                    f"({'kept' if passed else 'rejected'})")
                if not passed:
                    break
                chosen = rate
            return chosen

        if options.token_rate is None:
            token_rate = cascade("token", token_rates, lambda rate: token_masks(token_scores, rate, **layout))
        if options.segment_rate is None:
            segment_rate = cascade("segment", segment_rates, lambda rate: pruned_at(token_rate, rate))
        masks = pruned_at(token_rate, segment_rate)
    if searching:
        log(f"search ({options.search}): {len(search['candidates'])} candidates, {search['epochs']} training epochs")
    training_epochs = search["epochs"]

    small = compact(model, masks)
    difference = masked_equals_compact(model, small, masks, bundle)
    pruned = measure(small, bundle, cfg)
    if final is None:
        final = rewound(model, masks, options.rewind, initial, recorded.seed)
        start = snapshot(final)
        resume = (out / CHECKPOINT_FILE).is_file()
        log(f"rewinding ({options.rewind}) the pruned model: {cfg.epochs} epochs" + (" (resumed)" if resume else ""))
        fit(final, bundle, cfg, out, resume=resume, progress=progress)  # checkpointed in out each epoch
        training_epochs += cfg.epochs
    rewound_metrics = measure(final, bundle, cfg)
    out.mkdir(parents=True, exist_ok=True)
    final.metadata.update(pruned_from=str(run.resolve()), pruning=masks.describe())
    final.save_pretrained(out)
    atomic_write(out / INIT_FILE, lambda tmp: save_file(start, str(tmp)))  # a pruned run can be rewound again, like a trained one
    report = {
        "run": str(run),
        "out": str(out),
        "data": data,
        "method": config.method_name(),
        "options": dataclasses.asdict(options),
        "token_rate": token_rate,
        "segment_rate": segment_rate,
        "masks": masks.describe(),
        "token_scores": token_scores.tolist(),
        "segment_scores": segment_scores_of[tuple(masks.token.tolist())].tolist() if segment_rate > 0 else None,
        "rewind_from": initial_source,
        "search": search,
        "training_epochs": training_epochs,
        "masked_vs_compact_max_abs_diff": difference,
        "weights_bytes": {"before": (run / WEIGHTS_FILE).stat().st_size, "after": (out / WEIGHTS_FILE).stat().st_size},
        "before": before,
        "pruned": pruned,
        "rewound": rewound_metrics,
    }
    write_json(out / METRICS_FILE, {
        "method": config.method_name(), "method_config": final.config.to_dict(), "data": data,
        "val_top1": rewound_metrics["val_top1"], "test_top1": rewound_metrics["test_top1"],
        "tuned_params": rewound_metrics["tuned_parameters"], "extra_gflops": rewound_metrics["extra_gflops"],
        "train_config": cfg.to_dict(), "pruned_from": str(run.resolve()),
    })
    write_json(out / PRUNE_FILE, report)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # complete: the folder keeps only what serving needs
    return report
