"""``vptune benchmark vtab1k|fgvc``: the papers' protocol over every task and method of a suite,
as one resumable Ray Tune job, and the table the papers print, with their numbers beside ours.

Every (method, task) is one sweep (``SweepConfig``) in its own folder under ``OUT/runs``: the
grid searched on val, the winner retrained on train+val with the seeds, test reported. All
sweeps' search runs go to Ray Tune together (one device per trial), then all final runs; a
killed benchmark resumes from the run folders. The summary (``benchmark.json``,
``benchmark.md``, ``accuracy-vs-params.png``) has per-task results, group means, the tuned
parameters, V-PETL Bench's PPT score and the published numbers (``published.json``). Recipes:
``default`` (the official grid and schedule, vptune's method defaults) or ``official`` (the
official repositories' per-method, per-dataset settings, ``recipes.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from ..data.suites import FGVC_DATASETS, VTAB_TASKS
from ..train import TrainConfig
from .protocol import (
    OFFICIAL_BASE_LRS, OFFICIAL_SEEDS, OFFICIAL_WEIGHT_DECAYS, SWEEP_JSON, SWEEP_MD, SweepConfig, choose, markdown,
    summarize, write_json,
)
from .tune import RaySession, Trainer, check_settings, run_jobs

SUITES = ("vtab1k", "fgvc")
GROUPS = ("natural", "specialized", "structured")
QUICK = {"epochs": 10, "lr_grid": (10.0, 1.0, 0.1), "wd_grid": (0.001, 0.0), "seeds": (42,)}  # and 10 prompts
# Not ASHA: on two mini tasks it trained 51% of the full grid's epochs, not the 30% asked, and one of its two
# picks tested 2.1 points below the grid's; for VPT-deep no ASHA setting kept both picks for less than 64% of the
# epochs (docs/performance.md, "The protocol's cost" and "Beyond the linear probe"); --scheduler asha is an option.
DEFAULT_SCHEDULER = "none"
BENCHMARK_JSON, BENCHMARK_MD, PLOT = "benchmark.json", "benchmark.md", "accuracy-vs-params.png"


def package_json(name: str) -> dict[str, Any]:
    return json.loads(resources.files("vptune.sweep").joinpath(name).read_text())


def published_rows() -> list[dict[str, Any]]:
    """The published numbers; a VTAB group mean (the mean of the three group means) is filled in where a
    paper gives the three groups but not their mean."""
    rows = package_json("published.json")["rows"]
    for row in rows:
        if "group_mean" not in row and all(g in row for g in GROUPS):
            row["group_mean"] = round(statistics.fmean(row[g] for g in GROUPS), 2)
    return rows


def ppt(accuracy: float, params: int | float) -> float:
    """V-PETL Bench's trade-off score: accuracy * exp(-log10(params / 1e7 + 1))."""
    return accuracy * math.exp(-math.log10(params / 1e7 + 1))


@dataclasses.dataclass
class BenchmarkConfig:
    """A suite's tasks under ``root`` x ``methods``, the protocol for each, into ``out``.
    ``None`` settings come from the recipe (and ``quick``)."""

    suite: str
    root: Path
    methods: list[str]
    out: Path
    tasks: list[str] | None = None
    recipe: str = "default"  # "default" | "official"
    quick: bool = False
    backbone: str = "vit_base_patch16_224.orig_in21k"  # the papers' ViT-B/16 (ImageNet-21k, ViT-B_16.npz)
    weights: str | None = None
    pretrained: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    lr_grid: tuple[float, ...] | None = None
    wd_grid: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None
    precision: str = "fp32"
    num_workers: int = 0
    device: str = "auto"
    scheduler: str = DEFAULT_SCHEDULER
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 where CUDA is present, else 0

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root).expanduser().absolute(), Path(self.out).expanduser().absolute()
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; expected {' or '.join(SUITES)}")
        if self.recipe not in ("default", "official"):
            raise ValueError(f"--recipe must be default or official, got {self.recipe!r}")
        if not self.methods:
            raise ValueError("no methods given: pass --methods, e.g. vpt-deep,e2vpt")
        if self.recipe == "official":
            known = package_json("recipes.json")["methods"]
            missing = [m for m in self.methods if m not in known]
            if missing:
                raise ValueError(f"the official repositories publish no recipe for {', '.join(missing)}; "
                                 f"--recipe official covers {', '.join(known)} (use --recipe default for the others)")
        if self.gpus_per_trial is None:
            import torch

            self.gpus_per_trial = 1.0 if torch.cuda.is_available() else 0.0


def find_tasks(config: BenchmarkConfig) -> list[str]:
    """The suite's task folders under the root (in the suite's order), or ``config.tasks``."""
    root = config.root
    if not root.is_dir():
        raise ValueError(f"--root {root}: no such folder; build it with `vptune data {config.suite} --out {root}`")
    marker = "train800.txt" if config.suite == "vtab1k" else "train.json"
    known = list(VTAB_TASKS if config.suite == "vtab1k" else FGVC_DATASETS)
    present = [p.name for p in sorted(root.iterdir()) if (p / marker).is_file()]
    if config.tasks:
        absent = [t for t in config.tasks if t not in present]
        if absent:
            raise ValueError(f"{root} has no task folder {', '.join(absent)} (with {marker}); it has: "
                             f"{', '.join(present) or 'none'}")
        return list(config.tasks)
    if not present:
        raise ValueError(f"{root} holds no {config.suite} task folder (one with {marker}); build it with "
                         f"`vptune data {config.suite} --out {root}`")
    return sorted(present, key=lambda t: (known.index(t) if t in known else len(known), t))


def recipe_for(config: BenchmarkConfig, method: str, task: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(training and grid settings, method options, sources) of one (method, task)."""
    settings: dict[str, Any] = {
        "optimizer": "sgd", "epochs": 100, "warmup_epochs": 10, "batch_size": 128,
        "lr_grid": OFFICIAL_BASE_LRS, "wd_grid": OFFICIAL_WEIGHT_DECAYS, "seeds": OFFICIAL_SEEDS,
    }
    options: dict[str, Any] = {}
    sources = ["the protocol's grid and schedule (docs/benchmarks.md)"]
    num_prompts_grid: tuple = (None,)
    if config.recipe == "official":
        entry = package_json("recipes.json")["methods"][method]
        layers = [entry["all"], entry.get("suites", {}).get(config.suite, {}), entry.get("tasks", {}).get(task, {})]
        sources = []
        for layer in layers:
            settings.update({k: tuple(v) if isinstance(v, list) else v for k, v in layer.items()
                             if k not in ("options", "source", "options_source")})
            options.update(layer.get("options", {}))
            sources += [layer[k] for k in ("source", "options_source") if k in layer]
        grid = entry.get("num_prompts_grid")
        if grid and "num_prompts" not in options:
            num_prompts_grid = tuple(grid["values"])
            sources.append(grid["source"])
    if config.quick:
        settings.update({k: v for k, v in QUICK.items()})
        settings["warmup_epochs"] = 1
        if num_prompts_grid != (None,):  # no prompt-length search in a first look: 10, or the grid's first
            num_prompts_grid = (10,) if 10 in num_prompts_grid else num_prompts_grid[:1]
    for key in ("epochs", "batch_size", "lr_grid", "wd_grid", "seeds"):
        value = getattr(config, key)
        if value is not None:
            settings[key] = value
    settings["warmup_epochs"] = min(settings["warmup_epochs"], settings["epochs"] / 10 if config.epochs else
                                    settings["warmup_epochs"])
    settings["num_prompts_grid"] = num_prompts_grid
    return settings, options, sources


def sweeps(config: BenchmarkConfig, tasks: list[str]) -> list[SweepConfig]:
    """One sweep per (method, task), in method-major order."""
    kind = config.suite
    result = []
    for method in config.methods:
        for task in tasks:
            settings, options, _ = recipe_for(config, method, task)
            result.append(SweepConfig(
                backbone=config.backbone, method=method, data=[f"{kind}:{config.root / task}"],
                out=config.out / "runs" / method / task, method_options=options,
                train=TrainConfig(
                    epochs=settings["epochs"], batch_size=settings["batch_size"], warmup_epochs=settings["warmup_epochs"],
                    optimizer=settings["optimizer"], precision=config.precision, num_workers=config.num_workers,
                    device=config.device, scale_lr=True,
                ),
                lr_grid=settings["lr_grid"], wd_grid=settings["wd_grid"], num_prompts_grid=settings["num_prompts_grid"],
                seeds=settings["seeds"], weights=config.weights, pretrained=config.pretrained, address=config.address,
                num_cpus=config.num_cpus, cpus_per_trial=config.cpus_per_trial, gpus_per_trial=config.gpus_per_trial,
                scheduler=config.scheduler, label=method,
            ))
    return result


def run_benchmark(config: BenchmarkConfig, trainer: Trainer | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the protocol for every (method, task) and write the summary; returns ``benchmark.json``'s content."""
    if trainer is None:
        from ..train import train_run as trainer
    console = console or Console()
    tasks = find_tasks(config)
    configs = sweeps(config, tasks)
    config.out.mkdir(parents=True, exist_ok=True)
    fingerprint = None
    for sweep in configs:
        sweep.out.mkdir(parents=True, exist_ok=True)
        fingerprint = check_settings(sweep, fingerprint)
    with RaySession(configs[0], console, folder=config.out) as session:
        search_jobs = [(sweep, run) for sweep in configs for run in sweep.search_runs()]
        searched = run_jobs(session, search_jobs, "search", trainer)
        by_sweep: dict[int, dict] = {id(s): {} for s in configs}
        for (sweep, run), outcome in zip(search_jobs, searched):
            by_sweep[id(sweep)][run] = outcome
        final_jobs = []
        for sweep in configs:
            winner = choose(list(by_sweep[id(sweep)].items()))
            if winner is None:
                console.print(f"[bold red]{sweep.label} on {sweep.data[0]}[/]: no search run finished; no final runs")
            else:
                final_jobs += [(sweep, run) for run in sweep.final_runs(winner[0])]
        finals = run_jobs(session, final_jobs, "final", trainer)
    final_by: dict[int, dict] = {id(s): {} for s in configs}
    for (sweep, run), outcome in zip(final_jobs, finals):
        final_by[id(sweep)][run] = outcome
    summaries = []
    for sweep in configs:
        summary = summarize(sweep, by_sweep[id(sweep)], final_by[id(sweep)])
        write_json(sweep.out / SWEEP_JSON, summary)
        (sweep.out / SWEEP_MD).write_text(markdown(summary))
        summaries.append(summary)
    result = assemble(config, tasks, configs, summaries)
    write_json(config.out / BENCHMARK_JSON, result)
    (config.out / BENCHMARK_MD).write_text(benchmark_markdown(result))
    plot(result, config.out / PLOT)
    return result


def task_group(suite: str, task: str) -> str | None:
    return VTAB_TASKS[task].group if suite == "vtab1k" and task in VTAB_TASKS else None


def assemble(config: BenchmarkConfig, tasks: list[str], configs: list[SweepConfig],
             summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """benchmark.json: per method and task the chosen point and test top-1; group and suite means; PPT."""
    methods: dict[str, Any] = {}
    for sweep, summary in zip(configs, summaries):
        task = Path(sweep.data[0].partition(":")[2]).name
        entry = next(iter(summary["tasks"].values()))
        _, _, sources = recipe_for(config, sweep.method, task)
        m = methods.setdefault(sweep.method, {"tasks": {}})
        chosen = entry["chosen"] or {}
        test, params = entry["test_top1_mean"], entry.get("tuned_params")
        m["tasks"][task] = {
            "group": task_group(config.suite, task), "test_top1": test, "test_top1_std": entry["test_top1_std"],
            "val_top1": chosen.get("val_top1"), "base_lr": chosen.get("base_lr"), "weight_decay": chosen.get("weight_decay"),
            "num_prompts": chosen.get("num_prompts"), "method_options": sweep.method_options,
            "epochs": sweep.train.epochs, "batch_size": sweep.train.batch_size, "seeds_done": entry.get("seeds_done", 0),
            "tuned_params": params, "tuned_percent": entry.get("tuned_percent"),
            "ppt": None if test is None or params is None else ppt(test, params), "folder": str(sweep.out),
            "sources": sources,
        }
    for m in methods.values():
        done = {t: e for t, e in m["tasks"].items() if e["test_top1"] is not None}
        complete = len(done) == len(tasks)
        m["mean"] = statistics.fmean(e["test_top1"] for e in done.values()) if done else None
        m["complete"] = complete
        m["tuned_params_mean"] = statistics.fmean(e["tuned_params"] for e in done.values()) if done else None
        m["ppt_mean"] = statistics.fmean(e["ppt"] for e in done.values()) if done else None
        groups = {}
        for group in GROUPS:
            members = [e["test_top1"] for e in done.values() if e["group"] == group]
            if members:
                groups[group] = statistics.fmean(members)
        m["groups"] = groups
        m["group_mean"] = statistics.fmean(groups.values()) if len(groups) == len(GROUPS) else None
    return {
        "format": "vptune-benchmark/1", "suite": config.suite, "root": str(config.root), "tasks": tasks,
        "backbone": config.backbone, "weights": config.weights, "pretrained": config.pretrained,
        "recipe": config.recipe, "quick": config.quick, "scheduler": config.scheduler,
        "cpus_per_trial": config.cpus_per_trial, "gpus_per_trial": config.gpus_per_trial,
        "methods": methods, "published": published_rows(),
    }


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _params(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value / 1e3:.1f}k"


def benchmark_markdown(result: dict[str, Any]) -> str:
    """The table: ours per task and group next to the published numbers, then the tuned parameters."""
    suite, methods, tasks = result["suite"], result["methods"], result["tasks"]
    lines = [
        f"# vptune benchmark {suite}: {', '.join(methods)} on {result['backbone']}",
        "",
        f"Recipe: {result['recipe']}{' (quick: fewer epochs and grid points)' if result['quick'] else ''}; "
        f"scheduler: {result['scheduler']}. Test top-1 (%) of the configuration chosen on val, retrained on "
        "train+val, mean over seeds. PPT = accuracy x exp(-log10(tuned params / 1e7 + 1)) (V-PETL Bench).",
        "",
        "| method | " + " | ".join(tasks) + " | mean |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for name, m in methods.items():
        cells = [_f(m["tasks"][t]["test_top1"]) for t in tasks]
        lines.append(f"| {name} (vptune) | " + " | ".join(cells) + f" | {_f(m['mean'])} |")
    lines += ["", "## Group means beside the published numbers", ""]
    if suite == "vtab1k":
        lines += ["| method | source | Natural | Specialized | Structured | group mean | 19-task mean | tuned params | PPT |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, m in methods.items():
            g = m["groups"]
            lines.append(f"| {name} | vptune (this run{'' if m['complete'] else ', incomplete'}) | "
                         f"{_f(g.get('natural'))} | {_f(g.get('specialized'))} | {_f(g.get('structured'))} | "
                         f"{_f(m['group_mean'])} | {_f(m['mean']) if len(tasks) == 19 else '-'} | "
                         f"{_params(m['tuned_params_mean'])} | {_f(m['ppt_mean'])} |")
        for row in result["published"]:
            if not any(k in row for k in ("natural", "group_mean", "vtab19_mean")):
                continue
            lines.append(f"| {row['label']} | published | {_f(row.get('natural'))} | {_f(row.get('specialized'))} | "
                         f"{_f(row.get('structured'))} | {_f(row.get('group_mean'))} | {_f(row.get('vtab19_mean'))} | "
                         f"{_params(row.get('tuned_params'))} | - |")
    else:
        lines += ["| method | source | FGVC mean | tuned params | PPT |", "|---|---|---|---|---|"]
        for name, m in methods.items():
            lines.append(f"| {name} | vptune (this run{'' if m['complete'] else ', incomplete'}) | {_f(m['mean'])} | "
                         f"{_params(m['tuned_params_mean'])} | {_f(m['ppt_mean'])} |")
        for row in result["published"]:
            if "fgvc" in row:
                lines.append(f"| {row['label']} | published | {_f(row['fgvc'])} | {_params(row.get('tuned_params'))} | - |")
    lines += ["", "## Tuned settings per task", "",
              "| method | task | group | base lr | wd | prompts | options | epochs | batch | val top-1 | test top-1 | seeds | tuned params | PPT |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        for t in tasks:
            e = m["tasks"][t]
            options = ", ".join(f"{k}={v}" for k, v in e["method_options"].items()) or "defaults"
            test = "-" if e["test_top1"] is None else f"{e['test_top1']:.2f} ± {e['test_top1_std']:.2f}"
            lines.append(f"| {name} | {t} | {e['group'] or '-'} | {e['base_lr'] if e['base_lr'] is not None else '-'} | "
                         f"{e['weight_decay'] if e['weight_decay'] is not None else '-'} | "
                         f"{e['num_prompts'] if e['num_prompts'] is not None else '-'} | {options} | {e['epochs']} | "
                         f"{e['batch_size']} | {_f(e['val_top1'])} | {test} | {e['seeds_done']} | "
                         f"{_params(e['tuned_params'])} | {_f(e['ppt'])} |")
    lines += ["", "Published numbers: ViT-B/16 pretrained on ImageNet-21k, as reported by each paper:"]
    lines += [f"- {row['label']}: {row['source']}" for row in result["published"]]
    if result["recipe"] == "official":
        lines += ["", "Recipe sources:"]
        for name, m in methods.items():
            sources = sorted({s for e in m["tasks"].values() for s in e["sources"]})
            lines += [f"- {name}: " + "; ".join(sources)]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Mean test top-1 against mean tuned parameters: our methods, and the published anchors that give both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "group_mean" if result["suite"] == "vtab1k" else "fgvc"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in result["methods"].items():
        accuracy = m["group_mean"] if result["suite"] == "vtab1k" and m["group_mean"] is not None else m["mean"]
        if accuracy is not None and m["tuned_params_mean"]:
            ax.scatter(m["tuned_params_mean"], accuracy, marker="o")
            ax.annotate(f"{name} (vptune)", (m["tuned_params_mean"], accuracy), fontsize=8)
    for row in result["published"]:
        if row.get(key) is not None and row.get("tuned_params"):
            ax.scatter(row["tuned_params"], row[key], marker="x", color="grey")
            ax.annotate(f"{row['label']} (published)", (row["tuned_params"], row[key]), fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("tuned parameters (mean over tasks)")
    ax.set_ylabel("test top-1 % (VTAB: mean of group means)" if key == "group_mean" else "test top-1 % (FGVC mean)")
    ax.set_title(f"{result['suite']}: {result['backbone']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
