"""A sweep's trainings as Ray Tune trials: on a local Ray started for the sweep, or on a cluster.

Each run is one trial that calls ``train_run`` into the run's own folder under the sweep
folder. Resuming rests on those folders, not on Ray's experiment state: a run whose
``metrics.json`` exists (written by ``train_run`` as its last act) is finished and never
submitted again, and a run killed midway continues from its own ``checkpoint.pt``. This
survives what ``Tuner.restore`` does not: a driver killed between two snapshots of the
experiment state, a grid or seed list extended between invocations, another cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from rich.console import Console

from ..backbones import load_backbone
from ..backbones.family import family_of
from ..train import TrainConfig
from ..train.checkpoint import CHECKPOINT_FILE
from ..train.config import with_defaults, without_tracking
from .protocol import METRICS_FILE, STOPPED_FILE, Outcome, Run, SweepConfig, first_line, read_outcome, write_json

Trainer = Callable[..., dict[str, Any]]  # the signature of vptune.train.train_run

SETTINGS_FILE = "sweep-settings.json"
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its error texts
# Ray's unix sockets live at TEMP/session_<date>_<pid>/sockets/plasma_store: about 64 characters
# below the temp dir, and a socket path may not exceed 107.
MAX_RAY_TEMP_DIR = 40
# Only small configs travel through the object store; Ray's default (30% of RAM in /dev/shm)
# would take memory from the trainings for nothing.
OBJECT_STORE_BYTES = 256 * 1024**2


class RaySession:
    """Ray for the sweep, started only when a run is left to do: the caller's if already initialised,
    the cluster at ``config.address``, or a local Ray with its temp folder inside the sweep folder,
    shut down when the sweep ends."""

    def __init__(self, config: SweepConfig, console: Console, folder: Path | None = None) -> None:
        self.config, self.console = config, console
        self.folder = config.out if folder is None else Path(folder)  # Ray's temp folder goes inside it
        self.started = False
        self.temp: Path | None = None

    def __enter__(self) -> "RaySession":
        return self

    def start(self) -> None:
        import ray

        if self.started or ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from a sweep
        config = self.config
        if config.address:
            ray.init(address=config.address, log_to_driver=True)
        else:
            self.temp = self.folder / "ray-tmp"
            if len(str(self.temp)) > MAX_RAY_TEMP_DIR:
                self.temp = Path(tempfile.mkdtemp(prefix="vptune-ray-"))
                self.console.print(
                    f"Ray's temp folder: {self.temp} (the sweep folder's path is too long for Ray's unix sockets, "
                    f"limit {MAX_RAY_TEMP_DIR} characters); it is removed at the end"
                )
            ray.init(
                num_cpus=config.num_cpus, include_dashboard=False, _temp_dir=str(self.temp),
                _node_ip_address="127.0.0.1",  # a local Ray talks over loopback only
                object_store_memory=OBJECT_STORE_BYTES, log_to_driver=True,
            )
        self.started = True

    def __exit__(self, *exc: Any) -> None:
        import ray

        if not self.started:
            return
        ray.shutdown()
        if self.temp is not None and not self.temp.is_relative_to(self.folder):
            shutil.rmtree(self.temp, ignore_errors=True)


def check_settings(config: SweepConfig, backbone_weights: str | None = None) -> str:
    """Refuse to resume a sweep folder made with other settings: its finished runs would be reused.
    The grid, the seeds and the tasks may change (they only add or skip runs). The backbone's
    weights count by value (their fingerprint), not by file name: a file rewritten in place is other settings.
    Returns the fingerprint; pass it back (``backbone_weights``) to check many sweeps on one backbone
    without loading it again."""
    if backbone_weights is None:
        backbone = load_backbone(config.backbone, weights=config.weights, pretrained=config.pretrained)
        backbone_weights = family_of(backbone).fingerprint()
    settings = {
        "backbone": config.backbone,
        "weights": config.weights,
        "backbone_weights": backbone_weights,
        "pretrained": config.pretrained,
        "method": config.method,
        "method_options": config.method_options,
        "train": {k: v for k, v in without_tracking(config.train.to_dict()).items() if k not in ("lr", "weight_decay", "seed", "scale_lr")},
    }
    path = config.out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if isinstance(before.get("train"), dict):  # a sweep from before a setting existed had its default
            before["train"] = with_defaults(before["train"], settings["train"])
        diffs = [
            f"{key}: {before.get(key)!r} then, {value!r} now"
            for key, value in json.loads(json.dumps(settings, default=str)).items() if before.get(key) != value
        ]
        if diffs:
            raise ValueError(
                f"{config.out} holds a sweep made with other settings ({'; '.join(diffs)}): "
                "pass another --out, or the same settings to resume it"
            )
    else:
        write_json(path, settings)
    return backbone_weights


def run_all(session: RaySession, runs: list[Run], phase: str, trainer: Trainer) -> dict[Run, Outcome]:
    """Run (as Ray Tune trials) every run of the session's sweep not finished yet; every run's outcome."""
    return dict(zip(runs, run_jobs(session, [(session.config, run) for run in runs], phase, trainer)))


Job = tuple[SweepConfig, Run]  # a run of one sweep; a benchmark runs the jobs of many sweeps in one Ray Tune job


def run_jobs(session: RaySession, jobs: list[Job], phase: str, trainer: Trainer) -> list[Outcome]:
    """Run every job not finished yet as one Ray Tune experiment; return every job's outcome, in order.

    The sweeps may differ in method, task and training settings; they share the session's
    resources per trial and its scheduler. Under ASHA, each sweep's grid on each task is its
    own bracket: val top-1 of one task or method is never compared with another's."""
    from ray import tune

    config, console = session.config, session.console
    configs: list[SweepConfig] = []
    for sweep, _ in jobs:
        if not any(sweep is c for c in configs):
            configs.append(sweep)
    index = {id(sweep): k for k, sweep in enumerate(configs)}
    outcomes: dict[int, Outcome] = {
        k: outcome for k, (sweep, run) in enumerate(jobs) if (outcome := read_outcome(run, sweep.out)) is not None
    }
    pending = [k for k in range(len(jobs)) if k not in outcomes]
    console.print(f"[bold]{phase}[/]: {len(jobs)} runs, {len(outcomes)} already done, {len(pending)} to run")
    if not pending:
        return [outcomes[k] for k in range(len(jobs))]
    session.start()
    scheduler = None
    if config.scheduler == "asha" and phase == "search":
        scheduler = GroupedASHA(max_t={k: c.train.epochs for k, c in enumerate(configs)},
                                grace_period=config.asha_grace_period, reduction_factor=config.asha_reduction_factor)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, configs=configs, trainer=trainer),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    ended = EndedTrials()
    points = [{"run": jobs[k][1].to_dict(), "sweep": index[id(jobs[k][0])], "label": jobs[k][0].label} for k in pending]
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search(points)},
        tune_config=tune.TuneConfig(
            scheduler=scheduler, reuse_actors=True, trial_name_creator=trial_name, trial_dirname_creator=trial_name
        ),
        run_config=tune.RunConfig(
            name=f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(session.folder / "ray"),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
            callbacks=[ended],
            progress_reporter=tune.CLIReporter(
                parameter_columns={"job/label": "method", **{f"job/run/{key}": key for key in
                                   ("task", "base_lr", "weight_decay", "num_prompts", "seed")}},
                metric_columns=["epoch", "val_top1", "test_top1"],
                max_report_frequency=30,
            ),
        ),
    )
    # Ray's newer output engine ignores the reporter and prints every trial's config and result.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    where = {(point["sweep"], Run(**point["run"])): k for k, point in zip(pending, points)}
    for result in tuner.fit():
        if not result.config:
            continue
        key = (result.config["job"]["sweep"], Run(**result.config["job"]["run"]))
        if result.error is None and key not in ended.jobs:
            continue  # interrupted (Ctrl-C): Ray Tune returns normally, with the trial unfinished
        k = where[key]
        sweep, run = jobs[k]
        outcomes[k] = outcome_of(sweep, run, result.error, result.metrics or {})
        if outcomes[k].status == "failed":
            console.print(f"[bold red]failed[/]: {trial_label(sweep.label, run)}: {first_line(outcomes[k].error)}",
                          highlight=False)
    unfinished = [trial_label(jobs[k][0].label, jobs[k][1]) for k in pending if k not in outcomes]
    if unfinished:
        raise SweepInterrupted(
            f"the sweep was interrupted with {len(unfinished)} runs unfinished ({', '.join(unfinished[:4])}"
            f"{', ...' if len(unfinished) > 4 else ''}); run the same command again to resume it"
        )
    return [outcomes[k] for k in range(len(jobs))]


class GroupedASHA(FIFOScheduler):
    """ASHA (Ray's AsyncHyperBandScheduler on per-epoch val top-1) with one bracket per sweep and task:
    a trial is compared only with the grid points of its own task and method."""

    def __init__(self, max_t: dict[int, int], grace_period: int, reduction_factor: float) -> None:
        super().__init__()
        self.max_t, self.grace_period, self.reduction_factor = max_t, grace_period, reduction_factor
        self.groups: dict[tuple[int, str], AsyncHyperBandScheduler] = {}

    def group(self, trial: Any) -> AsyncHyperBandScheduler:
        job = trial.config["job"]
        key = (job["sweep"], job["run"]["task"])
        if key not in self.groups:
            max_t = self.max_t[job["sweep"]]
            self.groups[key] = AsyncHyperBandScheduler(
                time_attr="epoch", metric="val_top1", mode="max", max_t=max_t,
                grace_period=min(self.grace_period, max_t), reduction_factor=self.reduction_factor,
            )
        return self.groups[key]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.group(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self.group(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.group(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.group(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per task and method: {len(self.groups)} brackets"


class SweepInterrupted(RuntimeError):
    """The sweep was stopped (Ctrl-C) before every run ended; its folder resumes it."""


class EndedTrials(Callback):
    """Remembers the trials that ran to their end (finished, or stopped by the scheduler)."""

    def __init__(self) -> None:
        self.jobs: set[tuple[int, Run]] = set()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        job = trial.config["job"]
        self.jobs.add((job["sweep"], Run(**job["run"])))


def trial_label(label: str, run: Run) -> str:
    return f"{label}-{run.name()}" if label else run.name()


def trial_name(trial: Any) -> str:
    job = trial.config["job"]
    return trial_label(job["label"], Run(**job["run"]))


def outcome_of(config: SweepConfig, run: Run, error: Exception | None, reported: dict[str, Any]) -> Outcome:
    """What a trial came to. A trial on another node without a shared file system leaves its
    ``metrics.json`` there; the metrics it reported are then written here."""
    if error is not None:
        return Outcome("failed", error=ANSI_CODES.sub("", str(error)))
    folder = run.folder(config.out)
    if isinstance(reported.get("metrics"), dict):
        if not (folder / METRICS_FILE).is_file():
            write_json(folder / METRICS_FILE, reported["metrics"])
        return Outcome("done", reported["metrics"])
    if config.scheduler == "asha" and "val_top1" in reported:
        stopped = {"epoch": reported["epoch"], "val_top1": reported["val_top1"]}
        write_json(folder / STOPPED_FILE, stopped)
        return Outcome("stopped", stopped)
    return Outcome("failed", error=f"the trial ended without finishing its training (no {METRICS_FILE} in {folder})")


def run_trial(trial_config: dict[str, Any], *, configs: list[SweepConfig], trainer: Trainer) -> None:
    """One Ray Tune trial: train one run into its folder, reporting val top-1 as epochs end."""
    import torch
    from ray import tune

    job = trial_config["job"]
    config, run = configs[job["sweep"]], Run(**job["run"])
    torch.set_num_threads(max(1, int(config.cpus_per_trial)))
    folder = run.folder(config.out)
    cfg: TrainConfig = config.train_config(run)
    if config.scheduler == "asha" and not run.final:
        cfg = dataclasses.replace(cfg, eval_every=1)  # ASHA compares trials by val top-1 at each epoch

    def on_epoch_end(record: dict[str, Any]) -> None:
        # The last epoch is reported with the run's metrics below, once train_run has written them:
        # ASHA stops a trial that reaches max_t, which must not cut it short.
        if record["epoch"] < cfg.epochs and record.get("val_top1") is not None:
            tune.report({"epoch": record["epoch"], "val_top1": record["val_top1"]})

    metrics = trainer(
        config.backbone, config.method, config.run_options(run), run.data, folder, cfg,
        weights=config.weights, pretrained=config.pretrained, final=run.final,
        resume=(folder / CHECKPOINT_FILE).is_file(), progress=False, on_epoch_end=on_epoch_end,
    )
    scores = {key: metrics[key] for key in ("val_top1", "test_top1") if metrics.get(key) is not None}
    tune.report({"epoch": cfg.epochs, **scores, "metrics": metrics})
