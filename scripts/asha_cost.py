"""What ASHA saves on the papers' protocol, measured on mini-benchmark tasks.

For every (task, method): search the same lr x wd grid twice on a local Ray, once training
every grid point to the end (the official protocol) and once under ASHA (``--scheduler asha``:
trials compared on val top-1 after each epoch, the weak ones stopped), all tasks in one Ray
Tune job with one ASHA bracket per task, as ``vptune benchmark`` runs it. Then retrain each winner on
train+val with the seeds and score test (an ASHA winner equal to the grid's winner is the same
runs, so they are trained once). Writes the epochs each search spent, the two picks, their val
and test top-1 and the test spread over seeds to a JSON file.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/asha_cost.py --out /tmp/asha-cost \
        --json docs/asha-cost.json

Every run lives in its own folder under --out: rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

from rich.console import Console

from vptune.sweep import SweepConfig, choose
from vptune.sweep.tune import RaySession, check_settings, run_all, run_jobs
from vptune.train import TrainConfig


def epochs_spent(config: SweepConfig, run, outcome) -> int:
    """Epochs a search run trained: all of them when done, the last reported when ASHA stopped it,
    the rows of its curve when it failed (diverged)."""
    if outcome.status == "done":
        return int(outcome.metrics.get("epochs", config.train.epochs))
    if outcome.status == "stopped":
        return int(outcome.metrics["epoch"])
    curve = run.folder(config.out) / "curve.csv"
    return max(0, len(curve.read_text().splitlines()) - 1) if curve.is_file() else 0


def finals(session: RaySession, config: SweepConfig, winner, console: Console) -> list[float]:
    outcomes = run_all(session, config.final_runs(winner), "final", trainer())
    return [o.metrics["test_top1"] for o in outcomes.values() if o.status == "done"]


def trainer():
    from vptune.train import train_run

    return train_run


def point(run) -> dict:
    return {"base_lr": run.base_lr, "weight_decay": run.weight_decay}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="count,digits")
    parser.add_argument("--methods", default="linear")
    parser.add_argument("--lr-grid", default="25,5,1,0.25,0.05")
    parser.add_argument("--wd-grid", default="0.001,0")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=Path("/tmp/asha-cost"))
    parser.add_argument("--json", type=Path, default=Path("docs/asha-cost.json"))
    parser.add_argument("--replay", action="store_true",
                        help="train the full grid once with val top-1 after every epoch, then replay ASHA over those "
                             "curves for every knob setting below (see replay.py); no ASHA training run")
    parser.add_argument("--grace", default="1,2", help="--replay: grace periods (epochs)")
    parser.add_argument("--reduction", default="2,3,4", help="--replay: reduction factors")
    parser.add_argument("--workers", default="1,2,4", help="--replay: trials running at once")
    parser.add_argument("--orders", default="grid,reversed", help="--replay: order the grid is submitted in")
    parser.add_argument("--stage", choices=("grid", "all"), default="all", help="--replay: stop after the grid")
    parser.add_argument("--finals", type=int, default=1,
                        help="--replay: final runs (train+val, the seeds) for at most this many picks besides the "
                             "grid's, those of the cheapest settings")
    args = parser.parse_args()
    if args.replay:
        from asha_replay import replay_main

        replay_main(args)
        return
    console = Console()
    floats = lambda text: tuple(float(x) for x in text.split(","))  # noqa: E731
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    started = time.time()
    results = []
    for method in methods:
        configs = {
            scheduler: SweepConfig(
                "vptune_vit_fmnist", method, [f"mini:{t}" for t in tasks], args.out / scheduler / method,
                train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=1, precision=args.precision,
                                  device="cpu", scale_lr=True),
                lr_grid=floats(args.lr_grid), wd_grid=floats(args.wd_grid),
                seeds=tuple(int(s) for s in args.seeds.split(",")), num_cpus=args.num_cpus, scheduler=scheduler,
            )
            for scheduler in ("none", "asha")
        }
        for config in configs.values():
            config.out.mkdir(parents=True, exist_ok=True)
            check_settings(config)
        grid, asha = configs["none"], configs["asha"]
        with RaySession(grid, console) as session:
            full = run_all(session, grid.search_runs(), "search", trainer())
        with RaySession(asha, console) as session:
            # One Ray Tune job for every task, one ASHA bracket per task (as vptune benchmark runs it).
            jobs = [(asha, run) for run in asha.search_runs()]
            early = dict(zip(asha.search_runs(), run_jobs(session, jobs, "search", trainer())))
        for task in tasks:
            mine = [(r, o) for r, o in full.items() if r.task == task]
            theirs = [(r, o) for r, o in early.items() if r.task == task]
            grid_winner, grid_outcome = choose(mine)
            asha_winner, asha_outcome = choose(theirs)
            with RaySession(grid, console) as session:
                grid_tests = finals(session, grid, grid_winner, console)
            same = point(asha_winner) == point(grid_winner)
            if same:
                asha_tests = grid_tests  # the same configuration and seeds: the same runs
            else:
                with RaySession(asha, console) as session:
                    asha_tests = finals(session, asha, asha_winner, console)
            grid_epochs = sum(epochs_spent(grid, r, o) for r, o in mine)
            asha_epochs = sum(epochs_spent(asha, r, o) for r, o in theirs)
            vals = sorted((o.metrics["val_top1"] for _, o in mine if o.status == "done"), reverse=True)
            results.append({
                "task": task, "method": method,
                "grid": {**point(grid_winner), "val_top1": grid_outcome.metrics["val_top1"], "test_top1": grid_tests,
                         "epochs": grid_epochs},
                "asha": {**point(asha_winner), "val_top1": asha_outcome.metrics["val_top1"], "test_top1": asha_tests,
                         "epochs": asha_epochs,
                         "stopped": sum(o.status == "stopped" for _, o in theirs),
                         "trials": len(theirs),
                         "epochs_per_trial": {r.point(): epochs_spent(asha, r, o) for r, o in theirs}},
                "same_pick": same,
                "epoch_share": asha_epochs / grid_epochs,
                "grid_val_top1": {r.point(): o.metrics.get("val_top1") for r, o in mine},
                "grid_test_top1": {r.point(): o.metrics.get("test_top1") for r, o in mine},
            })
            r = results[-1]
            console.print(f"{task} {method}: ASHA {asha_epochs}/{grid_epochs} epochs ({r['epoch_share']:.0%}), "
                          f"same pick: {same}")
    total_grid = sum(r["grid"]["epochs"] for r in results)
    total_asha = sum(r["asha"]["epochs"] for r in results)
    train = dataclasses.asdict(configs["none"].train)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {
        "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/asha_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "commit": commit,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared 2-core build machine",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_time_s": time.time() - started,
        "train": train,
        "lr_grid": floats(args.lr_grid), "wd_grid": floats(args.wd_grid), "seeds": args.seeds,
        "asha": {"time_attr": "epoch", "metric": "val_top1", "grace_period": configs["asha"].asha_grace_period,
                 "reduction_factor": configs["asha"].asha_reduction_factor, "max_t": args.epochs},
        "results": results,
        "total_grid_epochs": total_grid,
        "total_asha_epochs": total_asha,
        "epoch_share": total_asha / total_grid,
        "same_picks": sum(r["same_pick"] for r in results),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    console.print(f"ASHA: {total_asha}/{total_grid} epochs ({report['epoch_share']:.0%}); "
                  f"same pick on {report['same_picks']}/{len(results)}; wrote {args.json}")


if __name__ == "__main__":
    main()
