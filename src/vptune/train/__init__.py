"""The training engine: a readable loop (``loop.fit``), its optimiser and schedule, resumable
checkpoints, run folders that are never written over unasked and are locked while written
(``folder``), and whole runs driven by names (``run.train_run``)."""

from .config import TrainConfig
from .loop import NonFiniteLossError, evaluate, fit
from .optim import build_optimizer, lr_factor, param_groups
from .run import evaluate_run, load_run, predict_files, predict_vl, train_run

__all__ = [
    "NonFiniteLossError", "TrainConfig", "build_optimizer", "evaluate", "evaluate_run", "fit", "load_run",
    "lr_factor", "param_groups", "predict_files", "predict_vl", "train_run",
]
