"""Writing a file so that a kill or a full disk never leaves it half-written.

Every file vptune writes into a run folder (tuned weights, config, checkpoint, curve, metrics)
goes through ``atomic_write``: it is written beside its destination and moved into place with
``os.replace``. A failed write (a full disk, a quota, a vanished mount) removes the temporary
file, keeps the previous file intact and is one ``OSError`` naming the file, whichever library
did the writing (torch and safetensors raise their own error types for it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        kept = "the previous one is kept" if path.exists() else "nothing was written"
        error = OSError(
            f"could not write {path} ({type(err).__name__}: {err}); {kept}. Is the disk full? Free space and run "
            "the command again (a training with --resume continues from its last checkpoint)"
        )
        error.errno = getattr(err, "errno", None)
        raise error from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
