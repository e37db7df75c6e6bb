"""How vptune installs and starts: the command line's help imports no heavy library, and the
core runs without the optional extras (Ray, FastAPI, ...)."""

import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Libraries that ``vptune --help`` must not import: each costs from 0.1 s to seconds.
HEAVY = ("torch", "torchvision", "timm", "numpy", "PIL", "safetensors", "peft", "ray", "fastapi", "uvicorn",
         "transformers", "open_clip", "diffusers", "mlflow", "tensorboard", "sklearn", "matplotlib")

HELP_EVERY_COMMAND = """
import json, sys
import typer
from vptune.cli import app

def paths(command, prefix=()):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():  # a group's subcommands
        yield from paths(sub, prefix + (name,))

root = typer.main.get_command(app)
seen = []
for path in paths(root):
    try:
        app([*path, "--help"], prog_name="vptune")
    except SystemExit as stop:
        assert stop.code == 0, (path, stop.code)
    seen.append(" ".join(path))
print(json.dumps({"commands": seen, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_help_of_every_command_imports_no_heavy_library():
    result = run_python(HELP_EVERY_COMMAND)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    commands = report["commands"]
    assert {"", "train", "eval", "predict", "sweep", "serve", "prune", "benchmark", "benchmark mini"} <= set(commands)
    assert "Usage: vptune train" in result.stdout
    loaded = {name.split(".")[0] for name in report["modules"]}
    assert not loaded & set(HEAVY), f"--help imported {sorted(loaded & set(HEAVY))}"


def test_public_api_loads_on_first_use():
    result = run_python(
        "import sys, vptune; assert 'torch' not in sys.modules; "
        "cfg = vptune.VPTConfig(num_prompts=3); assert 'torch' in sys.modules; "
        "assert vptune.config_for('vpt-deep', num_prompts=3) == cfg; "
        "assert set(vptune.__all__) <= set(dir(vptune)); "
        "from vptune import PromptModel, MultiTaskModel, prompt_model; print('ok')"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    missing = run_python("import vptune; vptune.no_such_name")
    assert "module 'vptune' has no attribute 'no_such_name'" in missing.stderr


# --- the core alone -------------------------------------------------------------------------


def core_distributions() -> list:
    """The installed distributions that pip would install for ``pip install vptune`` (no extras):
    the closure of pyproject.toml's dependencies over each distribution's own requirements."""
    import importlib.metadata as metadata
    import tomllib

    from packaging.requirements import Requirement

    declared = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    found: dict[str, metadata.Distribution] = {}
    pending = [(Requirement(text), "") for text in declared]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        key = requirement.name.lower().replace("_", "-")
        dist = metadata.distribution(requirement.name)  # PackageNotFoundError: a requirement not installed
        assert dist.version in requirement.specifier or dist.version.split("+")[0] in requirement.specifier, (
            f"installed {requirement.name} {dist.version} does not satisfy {requirement}"
        )
        for wanted in {""} | set(requirement.extras):
            if (key, wanted) in found:
                continue
            found[(key, wanted)] = dist
            pending += [(Requirement(text), wanted) for text in dist.requires or []]
    return list({id(dist): dist for dist in found.values()}.values())


def core_only_environment(root: Path) -> Path:
    """A fresh virtual environment (no system site-packages) holding exactly the core
    distributions, linked from this environment (the same pinned versions, in seconds instead
    of a 2-minute pip install), with vptune's sources on its path; returns its python."""
    import venv

    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip())
    for dist in core_distributions():
        assert dist.files, f"{dist.metadata['Name']} lists no files"
        tops = {Path(str(file)).parts[0] for file in dist.files if not str(file).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    (site / "vptune-src.pth").write_text(f"{SRC}\n")
    return python


def test_core_alone_trains_and_names_the_extras(tmp_path):
    """pip install vptune without extras: a prompt model and vptune train work, Ray and FastAPI are
    neither installed nor imported, and vptune sweep / serve name the pip command."""
    python = core_only_environment(tmp_path / "venv")
    names = {dist.metadata["Name"].lower() for dist in core_distributions()}
    assert {"torch", "timm", "peft", "typer"} <= names and not names & {"ray", "fastapi", "uvicorn", "mlflow"}
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [python, SRC.parent / "tests" / "core_only_check.py", work], capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0 and "core-only check passed" in result.stdout, result.stdout + result.stderr


def test_the_extras_named_by_commands_are_the_ones_pyproject_declares():
    """vptune.extras.EXTRAS (what a command checks and names) against pyproject.toml (what pip installs)."""
    import tomllib

    from packaging.requirements import Requirement

    from vptune.extras import EXTRAS

    declared = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) | {"all", "dev"} == set(declared)
    assert Requirement(declared["all"][0]).extras == set(EXTRAS)
    for extra, modules in EXTRAS.items():
        names = {Requirement(text).name.lower() for text in declared[extra]}
        assert {Requirement(req).name.lower() for req in modules.values()} <= names, extra


def test_a_missing_extra_is_named_with_its_pip_command(monkeypatch):
    import pytest

    import vptune.extras
    from vptune.extras import MissingExtra, require

    monkeypatch.setattr(vptune.extras, "installed", lambda module: module not in ("ray", "multipart"))
    with pytest.raises(MissingExtra, match=r'^vptune sweep needs ray\[tune\], which is not installed here: pip install "vptune\[sweep\]"$'):
        require("sweep", purpose="vptune sweep")
    with pytest.raises(MissingExtra, match=r'needs python-multipart, .*pip install "vptune\[serve\]"'):
        require("serve", purpose="vptune serve")
    require("serve", "fastapi", purpose="only fastapi")  # the modules asked for are there
    with pytest.raises(ValueError, match="unknown extra 'plots'; the extras are: sweep, serve"):
        require("plots", purpose="x")
