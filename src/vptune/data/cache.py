"""Where vptune keeps generated and downloaded data, and how it writes there safely."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def cache_root() -> Path:
    """``$VPTUNE_CACHE`` if set, else ``~/.cache/vptune``."""
    return Path(os.environ.get("VPTUNE_CACHE") or Path.home() / ".cache" / "vptune")


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an npz so that a reader never sees a half-written file (write, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
