"""The optional parts of vptune and what a command says when one is not installed.

The core (models, methods, training, evaluation, pruning, the demo) needs only torch, timm and
a few small libraries. Sweeps, the server, experiment trackers and the model families built on
other libraries are extras (``pip install "vptune[sweep]"``); a command that needs one checks
for it before starting and names the pip command, instead of failing on an import deep inside.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# extra -> {module imported: the pip requirement that provides it}; mirrors pyproject.toml
EXTRAS: dict[str, dict[str, str]] = {
    "sweep": {"ray": "ray[tune]"},
    "serve": {
        "fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart", "httpx": "httpx",
        "prometheus_client": "prometheus-client",
    },
    "track": {"tensorboard": "tensorboard", "mlflow": "mlflow"},
    "vl": {"transformers": "transformers"},
    "clip": {"open_clip": "open_clip_torch"},
    "diffusion": {"diffusers": "diffusers", "transformers": "transformers"},
    "tfds": {"tensorflow_datasets": "tensorflow-datasets"},
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def installed(module: str) -> bool:
    """Whether a top-level module can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, *modules: str, purpose: str) -> None:
    """Raise MissingExtra naming ``pip install "vptune[extra]"`` if a module of ``extra`` is missing.

    ``modules`` defaults to every module of the extra; ``purpose`` says what needs them
    (e.g. "vptune sweep").
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are: {', '.join(EXTRAS)}")
    wanted = modules or tuple(EXTRAS[extra])
    missing = [name for name in wanted if not installed(name)]
    if missing:
        packages = ", ".join(EXTRAS[extra].get(name, name) for name in missing)
        raise MissingExtra(f'{purpose} needs {packages}, which is not installed here: pip install "vptune[{extra}]"')


def optional_import(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (dotted names allowed), or raise MissingExtra naming the extra."""
    require(extra, module.split(".")[0], purpose=purpose)
    return importlib.import_module(module)
