"""Experiment tracking: what a training logs to TensorBoard or MLflow, next to curve.csv.

``train_run`` opens one tracker per run (``TrainConfig.tracker``), the loop logs through it
and ``train_run`` adds the test figures and closes it; a sweep's trials and the benchmarks
train through ``train_run``, so every run of theirs logs the same way. Both libraries are the
``track`` extra and are imported only when asked for.

What is logged, on the optimiser-step axis (curve.csv's ``step``):
- every step: ``step/train_loss`` (mean loss of the step's images), ``step/lr``,
  ``step/images_per_s`` (the step's images over its wall time, data loading included);
- every epoch, at its last step: ``epoch/<field>`` for each field of curve.csv's row
  (``epoch``, ``train_loss``, ``lr``, ``images_per_s``, and ``val_top1``, ``val_loss`` when
  validated), with the same values;
- at the end: ``test/top1`` and ``test/loss`` when there is a test split;
- once: the run's settings (method and its options, data, backbone, training settings) as
  MLflow params, or as a JSON text summary in TensorBoard.

TensorBoard writes event files into ``RUN/tensorboard/``. MLflow logs to ``tracking_uri``,
by default an SQLite store in the run folder (``RUN/mlflow.db``: MLflow 3 refuses its older
plain-file store unless told otherwise), experiment ``vptune``, one MLflow run per run
folder; a resumed run continues the same MLflow run (its id is kept in ``RUN/mlflow-run-id``)
without repeating the steps the killed run had logged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

from .extras import require

TRACKERS = ("none", "tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_RUN_ID_FILE = "mlflow-run-id"
EXPERIMENT = "vptune"


class Tracker(Protocol):
    """Where a run's figures go besides curve.csv."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def check_tracker(tracker: str, tracking_uri: str | None = None, *, installed: bool = True) -> None:
    """Refuse an unknown tracker, a URI without MLflow and (``installed``) a tracker whose library
    is missing, naming the pip command."""
    if tracker not in TRACKERS:
        raise ValueError(f"tracker must be one of {', '.join(TRACKERS)}; got {tracker!r}")
    if tracking_uri is not None and tracker != "mlflow":
        raise ValueError(f"a tracking URI is for --tracker mlflow; the tracker here is {tracker!r}")
    if installed and tracker != "none":
        require("track", tracker, purpose=f"--tracker {tracker}")


def default_mlflow_uri(folder: str | Path) -> str:
    """MLflow's local store for a run or sweep folder: an SQLite file inside it."""
    return f"sqlite:///{(Path(folder) / MLFLOW_DB).absolute()}"


def shared_store(tracker: str, tracking_uri: str | None, folder: str | Path) -> str | None:
    """For several runs that log together (a sweep, a benchmark): check the tracker is installed
    and, for MLflow, create its store (by default an SQLite file in ``folder``) and experiment
    once, before parallel runs write to it. Returns the tracking URI the runs should use."""
    check_tracker(tracker, tracking_uri)
    if tracker != "mlflow":
        return tracking_uri
    from mlflow.tracking import MlflowClient

    Path(folder).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_mlflow_uri(folder)
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        create_experiment(client)
    return uri


def open_tracker(
    tracker: str, out: str | Path, *, params: Mapping[str, Any], tracking_uri: str | None = None, resume: bool = False
) -> Tracker | None:
    """The tracker for the run in folder ``out`` (None for ``"none"``), with ``params`` recorded."""
    check_tracker(tracker, tracking_uri)
    out = Path(out)
    if tracker == "tensorboard":
        return TensorBoardTracker(out / TENSORBOARD_DIR, params)
    if tracker == "mlflow":
        return MLflowTracker(out, params, tracking_uri or default_mlflow_uri(out), resume=resume)
    return None


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as ``a.b = value`` strings (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class TensorBoardTracker:
    """Event files through torch's SummaryWriter. The writer opens at the first logged step and
    purges events at or after it, so a resumed run does not show a killed run's last steps twice."""

    def __init__(self, log_dir: Path, params: Mapping[str, Any]) -> None:
        self.log_dir, self.params = Path(log_dir), dict(params)
        self.writer = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=step)
            self.writer.add_text("settings", "```\n" + json.dumps(self.params, indent=2, default=str) + "\n```", step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowTracker:
    """One MLflow run per run folder, logged through an MlflowClient (no global MLflow state, so
    trials in one process or on one store do not interfere). Like the TensorBoard writer, the
    MLflow run starts at the first logged step: nothing is written before training has begun."""

    def __init__(self, out: Path, params: Mapping[str, Any], tracking_uri: str, *, resume: bool = False) -> None:
        self.out, self.params, self.tracking_uri, self.resume = Path(out), dict(params), tracking_uri, resume
        self.client: Any = None
        self.run_id: str | None = None
        self.logged: dict[str, int] = {}  # resumed: the last step of each metric the killed run logged

    def start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        id_file = self.out / MLFLOW_RUN_ID_FILE
        if self.resume and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self.logged[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else create_experiment(self.client)
        run = self.client.create_run(experiment_id, run_name=self.out.name, tags={"vptune.run_folder": str(self.out.absolute())})
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id + "\n")
        flat = [Param(key, value[:6000]) for key, value in flat_params(self.params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=flat[start:start + 100])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self.start()
        now = int(time.time() * 1000)
        # A resumed run repeats the steps the killed run made after its last checkpoint (with the
        # same values: resuming is exact); MLflow keeps every point, so those are not sent again.
        fresh = [Metric(key, float(value), now, step) for key, value in metrics.items() if step > self.logged.get(key, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def close(self, failed: bool = False) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def create_experiment(client: Any) -> str:
    """Create the ``vptune`` experiment, or take the one a concurrent trial just created."""
    try:
        return client.create_experiment(EXPERIMENT)
    except Exception:  # noqa: BLE001  (MLflow raises its own exception types per store)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            raise
        return experiment.experiment_id
