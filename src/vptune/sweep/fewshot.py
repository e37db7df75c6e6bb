"""The few-shot protocol (CoOp's) on Ray Tune: every method x shots x seed of every task, each a
``train_run --shots K`` into its own folder (``zeroshot`` once per task), then a table of mean
test top-1 (and its spread over seeds) and an accuracy-vs-shots plot.

It shares the sweep's machinery (``RaySession``: a local Ray inside the output folder or a
cluster) and its resume rule: a run whose ``metrics.json`` exists is done and never submitted
again; one killed midway continues from its checkpoint. Methods are names (``linear``, ``coop``,
``vpt-deep``, ...), ``zeroshot``, ``linear-random`` (a linear probe from a random head instead
of the text head), or ``M+coop`` (image-side method M with CoOp's text prompts); ``M@LR`` sets
that method's learning rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from ..train import TrainConfig
from ..train.checkpoint import CHECKPOINT_FILE
from .protocol import absolute_spec, task_name, write_json

METRICS_FILE = "metrics.json"
FEWSHOT_JSON, FEWSHOT_MD, FEWSHOT_PNG = "fewshot.json", "fewshot.md", "fewshot.png"
ZEROSHOT = "zeroshot"


@dataclasses.dataclass(frozen=True)
class ShotRun:
    task: str
    data: str
    method: str  # as given, with its +coop / -random suffix, without @lr
    shots: int  # 0 for zeroshot
    seed: int

    def folder(self, out: Path) -> Path:
        if self.method == ZEROSHOT:
            return out / self.task / ZEROSHOT
        return out / self.task / self.method / f"shots{self.shots}" / f"seed{self.seed}"

    def name(self) -> str:
        return f"{self.task}-{self.method}" + ("" if self.method == ZEROSHOT else f"-{self.shots}shot-seed{self.seed}")


@dataclasses.dataclass
class FewShotConfig:
    backbone: str
    data: list[str]
    methods: list[str]
    out: Path
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    weights: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_trial: float = 1.0

    def __post_init__(self) -> None:
        self.out = Path(self.out).absolute()
        self.data = [absolute_spec(spec) for spec in self.data]
        self.shots, self.seeds = tuple(map(int, self.shots)), tuple(map(int, self.seeds))
        if not self.data or not self.methods or not self.shots or not self.seeds:
            raise ValueError("fewshot needs at least one data spec, method, shot count and seed")
        if min(self.shots) < 1:
            raise ValueError(f"shot counts must be >= 1, got {self.shots}")
        for method in self.methods:
            self.parse(method)  # a bad method fails now, not in every trial

    @staticmethod
    def parse(method: str) -> tuple[str, str, dict[str, Any], float | None]:
        """``M[+coop|-random][@LR]`` -> (label, method name, train_run keywords, lr)."""
        from ..methods import config_for

        label, _, lr = method.partition("@")
        name, kwargs = label, {}
        if label.endswith("+coop"):
            name, kwargs = label[: -len("+coop")], {"text_prompts": {"kind": "coop"}}
        elif label.endswith("-random"):
            name, kwargs = label[: -len("-random")], {"head": "random"}
        if name != ZEROSHOT:
            config_for(name)
        try:
            rate = float(lr) if lr else None
        except ValueError:
            raise ValueError(f"bad learning rate in method {method!r}: expected M@LR with a number") from None
        return label, name, kwargs, rate

    def runs(self) -> list[ShotRun]:
        runs = []
        for spec in self.data:
            for method in self.methods:
                label = self.parse(method)[0]
                if label == ZEROSHOT:
                    runs.append(ShotRun(task_name(spec), spec, ZEROSHOT, 0, 0))
                    continue
                runs += [ShotRun(task_name(spec), spec, label, k, s) for k in self.shots for s in self.seeds]
        return runs

    def method_of(self, label: str) -> str:
        return next(m for m in self.methods if self.parse(m)[0] == label)


def run_trial(trial_config: dict[str, Any], *, config: FewShotConfig) -> None:
    """One Ray Tune trial: one few-shot training (or the zero-shot classifier) into its folder."""
    import torch
    from ray import tune

    from ..train.run import train_run, zeroshot_run

    run = ShotRun(**trial_config["run"])
    torch.set_num_threads(max(1, int(config.cpus_per_trial)))
    folder = run.folder(config.out)
    if run.method == ZEROSHOT:
        # a folder without metrics.json is this trial's own unfinished write: written again
        metrics = zeroshot_run(config.backbone, folder, data=run.data, weights=config.weights, device=config.train.device,
                               overwrite=True)
    else:
        _, name, kwargs, lr = config.parse(config.method_of(run.method))
        cfg = dataclasses.replace(config.train, seed=run.seed, **({} if lr is None else {"lr": lr}))
        metrics = train_run(config.backbone, name, {}, run.data, folder, cfg, weights=config.weights, shots=run.shots,
                            resume=(folder / CHECKPOINT_FILE).is_file(), progress=False, **kwargs)
    tune.report({"test_top1": metrics.get("test_top1"), "metrics": metrics})


def run_fewshot(config: FewShotConfig, console: Console | None = None) -> dict[str, Any]:
    """Every run not finished yet on Ray Tune, then the summary (``fewshot.json``, ``fewshot.md``,
    ``fewshot.png``); a killed grid resumes when run again."""
    from ray import tune

    from .tune import RaySession

    console = console or Console()
    config.out.mkdir(parents=True, exist_ok=True)
    runs = config.runs()
    pending = [run for run in runs if not (run.folder(config.out) / METRICS_FILE).is_file()]
    console.print(f"[bold]fewshot[/]: {len(runs)} runs, {len(runs) - len(pending)} already done in {config.out}, {len(pending)} to run")
    if pending:
        with RaySession(config, console) as session:  # RaySession reads address, num_cpus and out
            session.start()
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(run_trial, config=config), {"cpu": config.cpus_per_trial}),
                param_space={"run": tune.grid_search([dataclasses.asdict(run) for run in pending])},
                tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=lambda t: ShotRun(**t.config["run"]).name(),
                                            trial_dirname_creator=lambda t: ShotRun(**t.config["run"]).name()),
                run_config=tune.RunConfig(name=f"fewshot-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(config.out / "ray"),
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=1),
            )
            for result in tuner.fit():
                if result.error is not None:
                    console.print(f"[bold red]failed[/]: {ShotRun(**result.config['run']).name()}: {str(result.error).splitlines()[0]}")
    summary = summarize(config, runs)
    write_json(config.out / FEWSHOT_JSON, summary)
    (config.out / FEWSHOT_MD).write_text(markdown(summary))
    plot(summary, config.out / FEWSHOT_PNG)
    return summary


def summarize(config: FewShotConfig, runs: list[ShotRun]) -> dict[str, Any]:
    """Per task, method and shot count: test top-1 of every seed, their mean and standard deviation,
    and the tuned parameters; missing runs are listed."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    missing = []
    for run in runs:
        path = run.folder(config.out) / METRICS_FILE
        if not path.is_file():
            missing.append(run.name())
            continue
        metrics = json.loads(path.read_text())
        cell = table.setdefault(run.task, {}).setdefault(run.method, {}).setdefault(str(run.shots), {"test_top1": []})
        cell["test_top1"].append(metrics.get("test_top1"))
        cell["tuned_params"] = metrics.get("tuned_params", 0)
    for methods in table.values():
        for cells in methods.values():
            for cell in cells.values():
                scores = [s for s in cell["test_top1"] if s is not None]
                cell["mean"] = statistics.fmean(scores) if scores else None
                cell["std"] = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return {"backbone": config.backbone, "shots": list(config.shots), "seeds": list(config.seeds),
            "methods": [config.parse(m)[0] for m in config.methods], "train": config.train.to_dict(),
            "results": table, "missing": missing}


def markdown(summary: dict[str, Any]) -> str:
    shots = summary["shots"]
    lines = [f"Backbone `{summary['backbone']}`; test top-1 (%), mean ± std over seeds {summary['seeds']} (± only where several finished); "
             "zero-shot trains nothing and has no seeds.", ""]
    for task, methods in summary["results"].items():
        lines += [f"### {task}", "", "| method | tuned params | " + " | ".join(f"{k} shots" for k in shots) + " |",
                  "|---|---:|" + "---:|" * len(shots)]
        for method in summary["methods"]:
            cells = methods.get(method, {})
            if method == ZEROSHOT:
                value = cells.get("0", {}).get("mean")
                row = ["-" if value is None else f"{value:.1f}"] * len(shots)
                params = "0"
            else:
                row = [cell_text(cells.get(str(k))) for k in shots]
                params = next((f"{c['tuned_params']:,}" for c in cells.values()), "-")
            lines.append(f"| {method} | {params} | " + " | ".join(row) + " |")
        lines.append("")
    if summary["missing"]:
        lines.append(f"Missing (not finished): {', '.join(summary['missing'])}")
    return "\n".join(lines) + "\n"


def cell_text(cell: dict[str, Any] | None) -> str:
    """Mean test top-1, with its spread when more than one seed finished."""
    if not cell or cell["mean"] is None:
        return "-"
    return f"{cell['mean']:.1f}" + (f" ± {cell['std']:.1f}" if len(cell["test_top1"]) > 1 else "")


def plot(summary: dict[str, Any], path: Path) -> None:
    """Mean test top-1 against shots (log scale), one panel per task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["results"])
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in summary["methods"]:
            cells = summary["results"][task].get(method, {})
            if method == ZEROSHOT and "0" in cells:
                ax.axhline(cells["0"]["mean"], linestyle="--", color="grey", label=ZEROSHOT)
                continue
            points = [(int(k), c["mean"]) for k, c in cells.items() if c["mean"] is not None]
            if points:
                points.sort()
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(summary["shots"], [str(k) for k in summary["shots"]])
        ax.set_title(task)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test top-1 (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
