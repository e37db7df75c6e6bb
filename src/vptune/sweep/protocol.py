"""The reproduction protocol of VPT and E2VPT (docs/methods.md, "Recipes and the reproduction
protocol"), without Ray.

A sweep is a set of runs: for every task and grid point one search run (train on train,
score val at the last epoch), then for every task the winner retrained on train+val with
each seed (the final runs, scored on test). This module names those runs and their folders,
picks the winners by the official rule and writes the summary (``sweep.json``, ``sweep.md``);
``vptune.sweep.tune`` executes the runs as Ray Tune trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..methods import config_for
from ..train import TrainConfig

# The official grid: lr = base_lr * batch / 256 (TrainConfig.scale_lr).
OFFICIAL_BASE_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
OFFICIAL_WEIGHT_DECAYS = (0.01, 0.001, 0.0001, 0.0)
OFFICIAL_SEEDS = (42, 44, 82, 100, 800)

METRICS_FILE = "metrics.json"  # written by train_run when a run finishes: the mark of a done run
STOPPED_FILE = "stopped.json"  # written by the sweep for a run the ASHA scheduler stopped early
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
FORMAT = "vptune-sweep/1"

# VTAB-1k's three groups, by the task folder names of the usual layout (and a few aliases).
VTAB_GROUPS = {
    "natural": ("cifar", "cifar100", "caltech101", "dtd", "oxford_flowers102", "flowers102", "oxford_iiit_pet",
                "pets", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "clevr_distance", "dmlab", "kitti", "kitti_dist", "dsprites_loc",
                   "dsprites_ori", "smallnorb_azi", "smallnorb_ele", "smallnorb_azim", "smallnorb_elev"),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training of the sweep: a grid point of a task, searched (``final=False``) or final."""

    task: str
    data: str
    base_lr: float
    weight_decay: float
    num_prompts: int | None  # None: the method's own setting
    seed: int
    final: bool = False

    def point(self) -> str:
        name = f"lr{self.base_lr:g}_wd{self.weight_decay:g}"
        return name if self.num_prompts is None else f"{name}_p{self.num_prompts}"

    def folder(self, out: Path) -> Path:
        if self.final:
            return out / "final" / self.task / self.point() / f"seed{self.seed}"
        return out / "search" / self.task / self.point()

    def name(self) -> str:
        return f"{self.task}-{self.point()}" + (f"-seed{self.seed}" if self.final else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Outcome:
    """What became of a run: ``done`` (metrics of a finished run), ``stopped`` (by ASHA; metrics at the
    last epoch it reported) or ``failed`` (with the error)."""

    status: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass
class SweepConfig:
    """Everything a sweep needs. ``train`` holds the shared training settings; each run sets its own
    learning rate (``base_lr`` with ``scale_lr``), weight decay and seed on a copy of it."""

    backbone: str
    method: str
    data: list[str]
    out: Path
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lr_grid: tuple[float, ...] = OFFICIAL_BASE_LRS
    wd_grid: tuple[float, ...] = OFFICIAL_WEIGHT_DECAYS
    num_prompts_grid: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = OFFICIAL_SEEDS
    weights: str | None = None
    pretrained: bool = False
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:port": join a cluster
    num_cpus: int | None = None  # CPUs of the local Ray (None: all)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    scheduler: str = "none"  # "none" | "asha"
    asha_grace_period: int = 1  # epochs every grid point trains before ASHA may stop it
    asha_reduction_factor: float = 4.0  # ASHA keeps the best 1/factor at each rung
    label: str = ""  # names this sweep's trials when many sweeps share one Ray Tune job (the method)

    def __post_init__(self) -> None:
        self.out = Path(self.out).absolute()
        self.data = [absolute_spec(spec) for spec in self.data]
        self.lr_grid, self.wd_grid = tuple(map(float, self.lr_grid)), tuple(map(float, self.wd_grid))
        self.num_prompts_grid, self.seeds = tuple(self.num_prompts_grid), tuple(map(int, self.seeds))
        problems = [
            f"{name} is empty" for name, grid in
            (("data", self.data), ("lr grid", self.lr_grid), ("wd grid", self.wd_grid),
             ("num-prompts grid", self.num_prompts_grid), ("seeds", self.seeds)) if not grid
        ]
        problems += [f"base lr {lr:g} is not > 0" for lr in self.lr_grid if not lr > 0]
        problems += [f"weight decay {wd:g} is negative" for wd in self.wd_grid if wd < 0]
        if self.scheduler not in ("none", "asha"):
            problems.append(f"scheduler {self.scheduler!r} is not 'none' or 'asha'")
        if self.asha_grace_period < 1 or self.asha_reduction_factor <= 1:
            problems.append("ASHA grace period must be >= 1 epoch and its reduction factor > 1")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            problems.append("cpus per trial must be > 0 and gpus per trial >= 0")
        names = [task_name(spec) for spec in self.data]
        problems += [f"two data specs are both task {n!r}" for n in sorted(set(names)) if names.count(n) > 1]
        if problems:
            raise ValueError(f"bad sweep: {'; '.join(problems)}")
        if self.num_prompts_grid != (None,) and "num_prompts" in self.method_options:
            raise ValueError("num_prompts is both a method option and a grid: give only --num-prompts-grid")
        for p in self.num_prompts_grid:  # a bad method option fails here, not in every trial
            try:
                config_for(self.method, **self.run_options(Run("", "", 1.0, 0.0, p, 0)))
            except ValueError as err:
                raise ValueError(f"{err}{'' if p is None else ' (from the num-prompts grid)'}") from None

    def search_runs(self) -> list[Run]:
        """Every (task, prompt length, base lr, weight decay), in grid order; searched with the first seed."""
        return [
            Run(task_name(spec), spec, lr, wd, p, self.seeds[0])
            for spec in self.data for p in self.num_prompts_grid for lr in self.lr_grid for wd in self.wd_grid
        ]

    def final_runs(self, winner: Run) -> list[Run]:
        return [dataclasses.replace(winner, seed=seed, final=True) for seed in self.seeds]

    def train_config(self, run: Run) -> TrainConfig:
        return dataclasses.replace(self.train, lr=run.base_lr, scale_lr=True, weight_decay=run.weight_decay, seed=run.seed)

    def run_options(self, run: Run) -> dict[str, Any]:
        return self.method_options if run.num_prompts is None else {**self.method_options, "num_prompts": run.num_prompts}


def absolute_spec(spec: str) -> str:
    """The data spec with a relative path made absolute: Ray trials do not run in the caller's folder."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind == "mini" or not rest or os.path.isabs(rest):
        return spec
    return f"{kind}:{os.path.abspath(rest)}"


def task_name(spec: str) -> str:
    """The task a data spec names: ``mini:NAME`` and ``vtab1k:ROOT/NAME`` give NAME."""
    rest = spec.partition(":")[2] or spec
    name = Path(rest.rstrip("/")).name or rest
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def task_group(spec: str) -> str | None:
    """The group a task is reported in: VTAB-1k's natural/specialized/structured, the mini tasks' groups."""
    kind = spec.partition(":")[0]
    name = task_name(spec)
    if kind == "mini":
        from ..data import MINI_TASKS

        task = MINI_TASKS.get(name)
        return getattr(task, "group", None) if task is not None else None
    key = name.lower().replace("-", "_")
    return next((group for group, names in VTAB_GROUPS.items() if key in names), None)


def choose(candidates: list[tuple[Run, Outcome]]) -> tuple[Run, Outcome] | None:
    """The winning grid point: the best val top-1 at the last epoch; on a tie the smaller learning
    rate (the official ``find_best_lrwd``: "get the smallest lr to break tie for stability"), then
    the first in grid order. Failed runs and runs stopped early by ASHA do not compete."""
    scored = [
        (index, run, outcome) for index, (run, outcome) in enumerate(candidates)
        if outcome.status == "done" and isinstance(outcome.metrics.get("val_top1"), (int, float))
    ]
    if not scored:
        return None
    _, run, outcome = min(scored, key=lambda item: (-item[2].metrics["val_top1"], item[1].base_lr, item[0]))
    return run, outcome


def summarize(config: SweepConfig, searched: dict[Run, Outcome], finals: dict[Run, Outcome]) -> dict[str, Any]:
    """The content of ``sweep.json``: every run, the chosen point per task, test top-1 over seeds, group means."""
    tasks: dict[str, Any] = {}
    for spec in config.data:
        name = task_name(spec)
        search = [(run, outcome) for run, outcome in searched.items() if run.task == name]
        winner = choose(search)
        entry: dict[str, Any] = {
            "data": spec,
            "group": task_group(spec),
            "trials": [run_record(config, run, outcome) for run, outcome in search],
            "chosen": None,
            "final": [],
            "test_top1_mean": None,
            "test_top1_std": None,
        }
        if winner is not None:
            run, outcome = winner
            entry["chosen"] = {
                **point_record(config, run), "val_top1": outcome.metrics["val_top1"], "folder": str(run.folder(config.out))
            }
            final = [(r, o) for r, o in finals.items() if r.task == name]
            entry["final"] = [run_record(config, r, o) for r, o in final]
            tests = [o.metrics["test_top1"] for _, o in final if o.status == "done" and "test_top1" in o.metrics]
            if tests:
                entry["test_top1_mean"] = statistics.fmean(tests)
                entry["test_top1_std"] = statistics.stdev(tests) if len(tests) > 1 else 0.0
                done = next(o for _, o in final if o.status == "done" and "test_top1" in o.metrics)
                entry.update({key: done.metrics.get(key) for key in ("tuned_params", "tuned_percent", "extra_gflops")})
            entry["seeds_done"] = len(tests)
        tasks[name] = entry
    groups: dict[str, Any] = {}
    for name, entry in tasks.items():
        if entry["group"] is not None and entry["test_top1_mean"] is not None:
            groups.setdefault(entry["group"], {"tasks": [], "test_top1_mean": None})["tasks"].append(name)
    for group in groups.values():
        group["test_top1_mean"] = statistics.fmean(tasks[t]["test_top1_mean"] for t in group["tasks"])
    means = [entry["test_top1_mean"] for entry in tasks.values() if entry["test_top1_mean"] is not None]
    failed = [
        {"run": r.name(), "error": o.error}
        for r, o in [*searched.items(), *finals.items()] if o.status == "failed"
    ]
    return {
        "format": FORMAT,
        "backbone": config.backbone,
        "method": config.method,
        "method_options": config.method_options,
        "train": config.train.to_dict(),
        "grid": {
            "base_lr": list(config.lr_grid),
            "weight_decay": list(config.wd_grid),
            "num_prompts": list(config.num_prompts_grid),
        },
        "seeds": list(config.seeds),
        "scheduler": config.scheduler,
        "tasks": tasks,
        "groups": groups,
        "test_top1_mean": statistics.fmean(means) if means else None,
        "failed": failed,
    }


def point_record(config: SweepConfig, run: Run) -> dict[str, Any]:
    return {
        "base_lr": run.base_lr,
        "lr": config.train_config(run).effective_lr,
        "weight_decay": run.weight_decay,
        "num_prompts": run.num_prompts,
    }


def run_record(config: SweepConfig, run: Run, outcome: Outcome) -> dict[str, Any]:
    record = {**point_record(config, run), "seed": run.seed, "status": outcome.status}
    for key in ("val_top1", "test_top1", "epoch", "wall_time_s"):
        if key in outcome.metrics:
            record[key] = outcome.metrics[key]
    if outcome.error is not None:
        record["error"] = outcome.error
    record["folder"] = str(run.folder(config.out))
    return record


def markdown(summary: dict[str, Any]) -> str:
    """``sweep.md``: the chosen configuration and test top-1 per task, and the group means."""
    train = summary["train"]
    grid = summary["grid"]
    lines = [
        f"# Sweep: {summary['method']} on {summary['backbone']}",
        "",
        f"Grid: base lr {fmt_list(grid['base_lr'])} (lr = base lr x batch / 256, batch "
        f"{train['batch_size'] * train['grad_accum']}), weight decay {fmt_list(grid['weight_decay'])}"
        + ("" if grid["num_prompts"] == [None] else f", prompts {fmt_list(grid['num_prompts'])}")
        + f"; {train['epochs']} epochs, {train['optimizer']}, {train['precision']}; "
        f"selection on val at the last epoch (ties: smaller lr); final runs on train+val with seeds "
        f"{fmt_list(summary['seeds'])}, scored on test.",
        "",
        "| task | group | base lr | lr | wd | prompts | val top-1 | test top-1 (mean ± std) | seeds | tuned params | tuned % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["tasks"].items():
        chosen = entry["chosen"]
        if chosen is None:
            lines.append(f"| {name} | {entry['group'] or '-'} | - | - | - | - | - | no run finished | 0 | - | - |")
            continue
        test = "-" if entry["test_top1_mean"] is None else f"{entry['test_top1_mean']:.2f} ± {entry['test_top1_std']:.2f}"
        params = entry.get("tuned_params")
        percent = entry.get("tuned_percent")
        lines.append(
            f"| {name} | {entry['group'] or '-'} | {chosen['base_lr']:g} | {chosen['lr']:.4g} | {chosen['weight_decay']:g} "
            f"| {chosen['num_prompts'] if chosen['num_prompts'] is not None else 'default'} | {chosen['val_top1']:.2f} "
            f"| {test} | {entry.get('seeds_done', 0)} | {params if params is not None else '-'} "
            f"| {'-' if percent is None else f'{percent:.3f}'} |"
        )
    if summary["groups"]:
        lines += ["", "| group | tasks | mean test top-1 |", "|---|---|---|"]
        for group, entry in summary["groups"].items():
            lines.append(f"| {group} | {len(entry['tasks'])} | {entry['test_top1_mean']:.2f} |")
    if summary["test_top1_mean"] is not None:
        lines += ["", f"Mean test top-1 over tasks: {summary['test_top1_mean']:.2f}"]
    if summary["failed"]:
        lines += ["", "Failed runs:", ""] + [f"- {f['run']}: {first_line(f['error'])}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def fmt_list(values: list[Any]) -> str:
    return "{" + ", ".join("default" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "}"


def first_line(error: str | None) -> str:
    """The informative line of an error text (Ray prefixes tracebacks with its own lines)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def read_outcome(run: Run, out: Path) -> Outcome | None:
    """The outcome of a run that already ended (finished, or stopped by ASHA), from its folder."""
    folder = run.folder(out)
    for name, status in ((METRICS_FILE, "done"), (STOPPED_FILE, "stopped")):
        path = folder / name
        if path.is_file():
            try:
                return Outcome(status, json.loads(path.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None  # damaged (a kill mid-write): run it again
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so a kill mid-write never leaves a half file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))
