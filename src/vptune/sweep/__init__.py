"""The papers' protocol in one call, on Ray Tune (docs/methods.md, "Recipes and the
reproduction protocol").

``run_sweep`` searches the learning-rate x weight-decay (x prompt length) grid of every task,
scoring val at the last epoch; retrains each task's winner on train+val with every seed and
scores test; and writes ``sweep.json`` and ``sweep.md`` into the sweep folder. Every training
is a Ray Tune trial with its own run folder, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console

from ..extras import require
from ..tracking import shared_store

require("sweep", purpose="vptune.sweep (Ray Tune)")  # before .tune imports ray

from .protocol import (
    OFFICIAL_BASE_LRS,
    OFFICIAL_SEEDS,
    OFFICIAL_WEIGHT_DECAYS,
    SWEEP_JSON,
    SWEEP_MD,
    Outcome,
    Run,
    SweepConfig,
    choose,
    markdown,
    summarize,
    task_group,
    task_name,
    write_json,
)
from .tune import RaySession, SweepInterrupted, Trainer, check_settings, run_all


def run_sweep(config: SweepConfig, trainer: Trainer | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the protocol and return the summary written to ``sweep.json``.

    ``trainer`` trains one run (default ``vptune.train.train_run``; it must be importable by
    Ray's workers). Every task's data is checked (its layout, not its images) before Ray
    starts. A failed run is recorded with its error and the sweep goes on without it;
    an interrupted sweep raises ``SweepInterrupted`` and resumes when run again.
    """
    if trainer is None:
        from ..train import train_run as trainer
    from ..data.build import check_data

    console = console or Console()
    for spec in config.data:  # before Ray starts: a missing folder fails here, not in every trial
        check_data(spec)
    config.out.mkdir(parents=True, exist_ok=True)
    if config.train.tracker != "none":  # every trial logs into one store, made before they start
        uri = shared_store(config.train.tracker, config.train.tracking_uri, config.out)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, tracking_uri=uri))
    check_settings(config)
    with RaySession(config, console) as session:
        searched = run_all(session, config.search_runs(), "search", trainer)
        finals: list[Run] = []
        for spec in config.data:
            winner = choose([(run, outcome) for run, outcome in searched.items() if run.task == task_name(spec)])
            if winner is None:
                console.print(f"[bold red]{task_name(spec)}[/]: no search run finished; no final runs")
            else:
                finals += config.final_runs(winner[0])
        final = run_all(session, finals, "final", trainer)
    summary = summarize(config, searched, final)
    write_json(config.out / SWEEP_JSON, summary)
    (config.out / SWEEP_MD).write_text(markdown(summary))
    return summary


__all__ = [
    "OFFICIAL_BASE_LRS", "OFFICIAL_SEEDS", "OFFICIAL_WEIGHT_DECAYS", "SWEEP_JSON", "SWEEP_MD", "Outcome", "Run",
    "SweepConfig", "SweepInterrupted", "Trainer", "choose", "markdown", "run_sweep", "summarize", "task_group", "task_name",
]
