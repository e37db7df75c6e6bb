"""``scripts/asha_cost.py --replay``: the full grid trained once with val top-1 after every epoch,
then ASHA replayed over those curves (``vptune.sweep.replay``) for every grace period, reduction
factor, number of trials at once and submission order asked for. Each setting's pick is compared
with the full grid's on val (the search run) and on test: the test top-1 of the picked grid
point's search run (trained on train, every point has one), and for the grid's pick and the
picks of the cheapest settings (``--finals``), the protocol's final run (retrained on train+val
with the seeds, scored on test).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from vptune.sweep import SweepConfig, choose
from vptune.sweep.protocol import Outcome
from vptune.sweep.replay import replay_asha
from vptune.sweep.tune import RaySession, check_settings, run_all
from vptune.train import TrainConfig

GOAL = 0.30  # the goal: the grid's pick for at most 30% of its epochs


def trainer():
    from vptune.train import train_run

    return train_run


def val_curve(config: SweepConfig, run) -> list[float]:
    """Val top-1 after each epoch, from the run's curve.csv (every epoch evaluated)."""
    with open(run.folder(config.out) / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    values = [row["val_top1"] for row in rows]
    if any(v == "" for v in values):
        raise SystemExit(f"{run.folder(config.out)}: curve.csv lacks val top-1 at some epoch; the grid was not "
                         "trained with val after every epoch (another --out?)")
    return [float(v) for v in values]


def replay_main(args) -> None:
    console = Console()
    floats = lambda text: tuple(float(x) for x in text.split(","))  # noqa: E731
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    started = time.time()
    results = []
    for method in methods:
        grid = SweepConfig(
            "vptune_vit_fmnist", method, [f"mini:{t}" for t in tasks], args.out / "grid" / method,
            train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=1,
                              precision=args.precision, device="cpu", scale_lr=True, eval_every=1),
            lr_grid=floats(args.lr_grid), wd_grid=floats(args.wd_grid), seeds=ints(args.seeds),
            num_cpus=args.num_cpus, scheduler="none",
        )
        grid.out.mkdir(parents=True, exist_ok=True)
        check_settings(grid)
        with RaySession(grid, console) as session:
            searched = run_all(session, grid.search_runs(), "search", trainer())
        if args.stage == "grid":
            continue
        for task in tasks:
            runs = [r for r in grid.search_runs() if r.task == task]
            curves = [val_curve(grid, r) if searched[r].status == "done" else failed_curve(grid, r) for r in runs]
            grid_winner, grid_outcome = choose([(r, searched[r]) for r in runs])
            settings = []
            for order, workers, grace, factor in itertools.product(
                args.orders.split(","), ints(args.workers), ints(args.grace), floats(args.reduction)
            ):
                submitted = runs if order == "grid" else list(reversed(runs))
                spent = replay_asha([curves[runs.index(r)] for r in submitted], args.epochs, grace, factor, workers)
                spent_of = dict(zip(submitted, spent))
                finished = [(r, searched[r] if spent_of[r] == args.epochs else Outcome("stopped")) for r in submitted]
                pick, pick_outcome = choose(finished)
                total = sum(spent)
                grid_total = sum(len(c) for c in curves)
                settings.append({
                    "order": order, "workers": workers, "grace_period": grace, "reduction_factor": factor,
                    "epochs": total, "grid_epochs": grid_total, "epoch_share": total / grid_total,
                    "stopped": sum(s < args.epochs for s in spent),
                    "pick": pick.point(), "pick_val_top1": pick_outcome.metrics["val_top1"],
                    "pick_search_test_top1": pick_outcome.metrics.get("test_top1"),
                    "same_pick": pick == grid_winner,
                    "epochs_per_trial": {r.point(): spent_of[r] for r in runs},
                })
            # The protocol's final runs for the grid's pick and for up to --finals other picks, those of the
            # cheapest settings first; every pick also has its search run's test top-1.
            cheap = sorted(settings, key=lambda s: s["epoch_share"])
            others = [p for p in dict.fromkeys(s["pick"] for s in cheap) if p != grid_winner.point()][:args.finals]
            picks = [grid_winner] + [next(r for r in runs if r.point() == p) for p in others]
            finals = {}
            with RaySession(grid, console) as session:
                for winner in picks:
                    outcomes = run_all(session, grid.final_runs(winner), "final", trainer())
                    finals[winner.point()] = [o.metrics["test_top1"] for o in outcomes.values() if o.status == "done"]
            for s in settings:
                s["pick_final_test_top1"] = finals.get(s["pick"])
            results.append({
                "task": task, "method": method,
                "grid": {"pick": grid_winner.point(), "val_top1": grid_outcome.metrics["val_top1"],
                         "search_test_top1": grid_outcome.metrics.get("test_top1"),
                         "final_test_top1": finals[grid_winner.point()], "epochs": sum(len(c) for c in curves)},
                "val_curves": {r.point(): c for r, c in zip(runs, curves)},
                "search_test_top1": {r.point(): searched[r].metrics.get("test_top1") for r in runs},
                "status": {r.point(): searched[r].status for r in runs},
                "settings": settings,
            })
            best = [s for s in settings if s["epoch_share"] <= GOAL and s["same_pick"]]
            console.print(f"{task} {method}: grid pick {grid_winner.point()} (val {grid_outcome.metrics['val_top1']}); "
                          f"{len(best)} of {len(settings)} settings pick it for <= {GOAL:.0%} of the epochs")
    if args.stage == "grid":
        console.print(f"grid done in {time.time() - started:.0f} s")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {
        "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "commit": commit,
        "machine": f"{platform.machine()}, shared 2-core build machine",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_time_s_this_invocation": time.time() - started,
        "train": dataclasses.asdict(grid.train),
        "lr_grid": floats(args.lr_grid), "wd_grid": floats(args.wd_grid), "seeds": args.seeds,
        "replay": "Ray Tune's AsyncHyperBandScheduler (time_attr epoch, metric val_top1, one bracket) fed the full "
                  "grid's per-epoch val top-1; equal epoch times, trials started in submission order",
        "results": results,
        "summary": summary(results),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {args.json}")


def summary(results: list[dict]) -> list[dict]:
    """Per setting, over every task and method: the share of the grids' epochs and how many picks
    are the grid's; cheapest first."""
    keys = ("order", "workers", "grace_period", "reduction_factor")
    rows: dict[tuple, dict] = {}
    for result in results:
        for s in result["settings"]:
            row = rows.setdefault(tuple(s[k] for k in keys), {**{k: s[k] for k in keys}, "epochs": 0, "grid_epochs": 0,
                                                              "same_picks": 0, "picks": 0})
            row["epochs"] += s["epochs"]
            row["grid_epochs"] += s["grid_epochs"]
            row["same_picks"] += s["same_pick"]
            row["picks"] += 1
    for row in rows.values():
        row["epoch_share"] = row["epochs"] / row["grid_epochs"]
    return sorted(rows.values(), key=lambda row: (row["epoch_share"], -row["same_picks"]))


def failed_curve(config: SweepConfig, run) -> list[float]:
    """The epochs a failed (diverged) run completed before it failed, with their val top-1."""
    path = run.folder(config.out) / "curve.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [float(row["val_top1"]) for row in csv.DictReader(f) if row["val_top1"] != ""]
