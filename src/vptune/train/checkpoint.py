"""Training checkpoints: everything needed to continue a killed run bit for bit.

A checkpoint holds the tuned tensors, the optimiser state, the epoch and step (which fix the
learning-rate schedule and the data order), the training curve so far and every random
number generator's state (torch CPU and CUDA, numpy, python). It is written with
``torch.save`` through ``atomic_write``, so a kill or a full disk
mid-write leaves the previous checkpoint intact, and it is read with
``torch.load(weights_only=True)``, which cannot run code from the file.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    random.setstate(state["python"])


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``directory/checkpoint.pt``."""
    path = directory / CHECKPOINT_FILE
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(directory: Path) -> dict[str, Any]:
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: nothing to resume in {directory}; start the run without --resume"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"{path} is not a readable vptune checkpoint ({type(err).__name__}: {err})") from None
