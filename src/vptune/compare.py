"""Method x task comparisons: the runs behind ``vptune demo``, ``vptune benchmark mini`` and
``vptune benchmark minivl`` (``VL_RECIPES``: the vision-language tasks on a ViLT).

A comparison trains each method's fixed recipe on each task (a data spec; by default tasks of
the embedded mini-benchmark) with ``train_run`` and returns one row per run. Runs live in
``OUT/runs/TASK/METHOD[/STAGE]``: a finished run (its ``metrics.json``) is read back rather
than retrained and a killed one resumes from its checkpoint, so a long comparison can be
stopped and started again with the same command.

``compare`` trains once per (task, method) on train800 and scores val200 and test.
``benchmark`` applies the papers' selection rule in small: for each learning rate of a short
grid (the recipe's lr times each factor) train on train800 and score val200, then retrain the
lr with the best val top-1 (a vision-language task: its own main metric, ``val_score``) on the
train+val images and report its test figures. With a
single factor there is nothing to choose: only the final run is trained (and no val is reported).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .backbones import BUNDLED_BACKBONE
from .data import MINI_TASKS
from .train import NonFiniteLossError, TrainConfig, train_run
from .train.config import with_defaults, without_tracking
from .train.checkpoint import CHECKPOINT_FILE
from .train.run import METRICS_FILE, write_json

FAILED_FILE = "failed.json"  # a run that diverged: kept as a result, not retried on resume


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a method is trained in a comparison: its options and its fixed training settings."""

    method: str
    options: dict[str, Any]
    train: TrainConfig

    def with_settings(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))

    def summary(self) -> str:
        t = self.train
        options = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"
        return (f"{options}; {t.optimizer} lr {t.lr:g}, wd {t.weight_decay:g}, {t.epochs} epochs "
                f"({t.warmup_epochs:g} warm-up, cosine), batch {t.batch_size}, {t.precision}")


def _recipe(method: str, lr: float, epochs: int = 7, weight_decay: float = 1e-4, **options: Any) -> Recipe:
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=lr, weight_decay=weight_decay, optimizer="adamw",
                      warmup_epochs=1.0, precision="bf16", eval_every=1, seed=0)
    return Recipe(method, options, cfg)


# Fixed per-method recipes for the bundled backbone (d=192, 6 blocks, 65 tokens): AdamW, since a
# handful of epochs is all 2 CPU cores allow and AdamW converges there without SGD's long lr
# search; prompt counts scaled down from ViT-B's 50 to the small model's 64 patches.
RECIPES: dict[str, Recipe] = {r.method: r for r in (
    _recipe("linear", lr=3e-2),
    _recipe("mlp", lr=3e-3),
    _recipe("full", lr=3e-4, weight_decay=0.05),
    _recipe("bias", lr=3e-3),
    _recipe("partial", lr=1e-3, weight_decay=0.05),
    _recipe("lora", lr=3e-3),
    _recipe("vpt-shallow", lr=1e-2, num_prompts=10),
    _recipe("vpt-deep", lr=1e-2, num_prompts=10),
    _recipe("e2vpt", lr=1e-2),
    _recipe("apt", lr=3e-3, num_prompts=10),  # at 1e-2 its training loss rises and it ends at chance
)}

# Fixed recipes for the vision-language mini benchmark on a ViLT (``vptune benchmark minivl``): the
# official APT recipe is AdamW at 5e-4 for 10 epochs on ViLT-B/32 with 200 prompts per layer; a CPU
# affords an epoch or two of the small bundled ViLT (113 tokens, d=192), so the lrs are higher and
# the prompt counts scaled down (docs/results-minivl.md). Every method also tunes ViLT's pooler
# and token types (the official trainable set; vptune.backbones.vilt).
VL_RECIPES: dict[str, Recipe] = {r.method: r for r in (
    _recipe("linear", lr=1e-3),
    _recipe("full", lr=1e-4, weight_decay=0.01),
    _recipe("lora", lr=1e-3),
    _recipe("vpt-shallow", lr=3e-3, num_prompts=10),
    _recipe("vpt-deep", lr=3e-3, num_prompts=50),
    _recipe("e2vpt", lr=3e-3),
    _recipe("apt", lr=1e-3, num_prompts=50),
)}
VL_METHODS = tuple(VL_RECIPES)
VL_TASKS = ("vqa", "nlvr", "retrieval")

DEMO_TASKS = ("digits", "count")  # one natural task (not clothes), one structured (spatial reasoning)
DEMO_METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "e2vpt", "apt", "lora")
BENCHMARK_METHODS = ("linear", "mlp", "full", "bias", "partial", "lora", "vpt-shallow", "vpt-deep", "e2vpt", "apt")
BENCHMARK_LR_FACTORS = (0.3, 1.0, 3.0)


def recipes_for(methods: Iterable[str], table: dict[str, Recipe] | None = None, **settings: Any) -> list[Recipe]:
    """The fixed recipes of ``methods`` (from ``table``, default ``RECIPES``), with training
    ``settings`` (e.g. epochs) overridden."""
    table = RECIPES if table is None else table
    chosen = []
    for method in methods:
        if method not in table:
            raise ValueError(f"no comparison recipe for method {method!r}; expected some of: {', '.join(table)}")
        chosen.append(table[method].with_settings(**settings) if settings else table[method])
    return chosen


def task_spec(task: str) -> str:
    """A task name of the mini-benchmark (``count``) or any data spec (``vtab1k:ROOT/TASK``) as a data spec."""
    if ":" in task:
        return task
    if task not in MINI_TASKS:
        raise ValueError(f"unknown mini task {task!r}; the mini-benchmark has: {', '.join(MINI_TASKS)} "
                         "(or give a data spec such as vtab1k:ROOT/TASK)")
    return f"mini:{task}"


def task_name(spec: str) -> str:
    return spec.partition(":")[2].partition("?")[0].rstrip("/").split("/")[-1]


def task_group(spec: str) -> str:
    kind, _, name = spec.partition(":")
    return MINI_TASKS[name].group if kind == "mini" and name in MINI_TASKS else "other"


def run_once(
    folder: Path, recipe: Recipe, data: str, *, backbone: str, weights: str | Path | None, final: bool, progress: bool
) -> dict[str, Any]:
    """Metrics of one run: read back if finished, resumed if killed, trained otherwise.
    A diverged run returns ``{"error": message}`` and is remembered as such."""
    if (folder / FAILED_FILE).is_file():
        return json.loads((folder / FAILED_FILE).read_text())
    if (folder / METRICS_FILE).is_file():
        saved = json.loads((folder / METRICS_FILE).read_text()).get("train_config")
        wanted = without_tracking(recipe.train.to_dict())  # a run is the same whichever tracker logs it
        if saved is not None:
            saved = without_tracking(with_defaults(saved, wanted))  # a run from before a setting existed had its default
        if saved is None or saved != wanted:
            changed = sorted(k for k, v in wanted.items() if saved is None or saved.get(k) != v)
            raise ValueError(f"{folder} holds a finished run made with other settings ({', '.join(changed)} differ): "
                             "use another --out, or the settings it was made with")
    resume = (folder / CHECKPOINT_FILE).is_file() or (folder / METRICS_FILE).is_file()
    try:
        return train_run(backbone, recipe.method, recipe.options, data, folder, recipe.train,
                         weights=weights, final=final, resume=resume, progress=progress)
    except NonFiniteLossError as err:
        failed = {"error": str(err), "method": recipe.method, "data": data}
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / FAILED_FILE, failed)
        return failed


VL_KEYS = ("val_vqa_score", "test_vqa_score", "val_r1_mean", "test_ir_r1", "test_tr_r1")  # a vision-language task's own


def val_key(metrics: dict[str, Any]) -> str:
    """The val figure a run is chosen on: ``val_top1``, or a vision-language task's main metric
    (``val_vqa_score``; ``val_r1_mean``, the mean of image and text R@1)."""
    from .tasks import TASKS

    task = metrics.get("task")
    return f"val_{TASKS[task].main_metric}" if task in TASKS else "val_top1"


def val_score(metrics: dict[str, Any]) -> float | None:
    return metrics.get(val_key(metrics))


def row(spec: str, recipe: Recipe, metrics: dict[str, Any], folder: Path, **extra: Any) -> dict[str, Any]:
    """One table row: what was run and what it scored (None where the run diverged)."""
    keys = ("val_top1", "test_top1", "train_loss", "tuned_params", "tuned_percent", "extra_gflops", "wall_time_s", "images_per_s")
    task_keys = {key: metrics.get(key) for key in VL_KEYS if key in metrics}
    return {"task": task_name(spec), "group": task_group(spec), "method": recipe.method, "lr": recipe.train.lr,
            **{key: metrics.get(key) for key in keys}, **task_keys, "error": metrics.get("error"), "run": str(folder), **extra}


def compare(
    tasks: Sequence[str],
    recipes: Sequence[Recipe],
    out: Path,
    *,
    backbone: str = BUNDLED_BACKBONE,
    weights: str | Path | None = None,
    progress: bool = False,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every recipe on every task's train800 once; one row per run (val and test top-1)."""
    rows = []
    for spec in map(task_spec, tasks):
        for recipe in recipes:
            folder = Path(out) / "runs" / task_name(spec) / recipe.method
            metrics = run_once(folder, recipe, spec, backbone=backbone, weights=weights, final=False, progress=progress)
            rows.append(row(spec, recipe, metrics, folder))
            if on_run is not None:
                on_run(rows[-1])
    return rows


def benchmark(
    tasks: Sequence[str],
    recipes: Sequence[Recipe],
    out: Path,
    *,
    lr_factors: Sequence[float] = BENCHMARK_LR_FACTORS,
    backbone: str = BUNDLED_BACKBONE,
    weights: str | Path | None = None,
    progress: bool = False,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """For each task and recipe: search the lr on val, retrain the winner on train+val, report test.

    Returns one row per (task, method) from its final run, with ``val_top1`` of the chosen
    search run, ``searched`` {lr: val top-1}, ``search_time_s`` (the search runs' training
    time) and ``search_train_loss`` (the chosen search run's last train loss, which the final
    run's is held to: see ``report.unstable_final``). ``on_run(row)`` follows every finished (task, method), so a caller can rewrite its
    results after each one."""
    rows = []
    for spec in map(task_spec, tasks):
        for recipe in recipes:
            base = Path(out) / "runs" / task_name(spec) / recipe.method
            lrs = [recipe.train.lr * factor for factor in lr_factors]
            searched: dict[float, float | None] = {}
            search_loss: dict[float, float | None] = {}
            search_time = 0.0
            for lr in lrs if len(lrs) > 1 else ():  # a single lr: nothing to choose, only the final run
                metrics = run_once(base / f"search-lr{lr:g}", recipe.with_settings(lr=lr), spec,
                                   backbone=backbone, weights=weights, final=False, progress=progress)
                searched[lr] = val_score(metrics)
                search_loss[lr] = metrics.get("train_loss")
                search_time += metrics.get("wall_time_s") or 0.0
            scored = {lr: val for lr, val in searched.items() if val is not None} if len(lrs) > 1 else {lrs[0]: None}
            extra = {"searched": searched, "search_time_s": search_time}
            if not scored:
                rows.append(row(spec, recipe, {"error": "every learning rate diverged"}, base, **extra))
            else:
                best_lr = max(scored, key=lambda lr: (scored[lr] or 0.0, -lr))  # ties: the smaller lr
                chosen = recipe.with_settings(lr=best_lr)
                folder = base / f"final-lr{best_lr:g}"
                metrics = run_once(folder, chosen, spec, backbone=backbone, weights=weights, final=True, progress=progress)
                extra["search_train_loss"] = search_loss.get(best_lr)
                rows.append(row(spec, chosen, {**metrics, val_key(metrics): scored[best_lr]}, folder, **extra))
            if on_run is not None:
                on_run(rows[-1])
    return rows


def group_means(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{group: {method: mean test top-1 over the group's tasks}}, for methods that finished every task of the group."""
    groups: dict[str, dict[str, list[float | None]]] = {}
    for r in rows:
        groups.setdefault(r["group"], {}).setdefault(r["method"], []).append(r["test_top1"])
    tasks_in = {g: len({r["task"] for r in rows if r["group"] == g}) for g in groups}
    return {
        group: {m: statistics.fmean(v) for m, v in methods.items() if None not in v and len(v) == tasks_in[group]}
        for group, methods in groups.items()
    }
