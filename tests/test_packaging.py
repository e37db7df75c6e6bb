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
