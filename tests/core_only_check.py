"""Run inside an environment that holds vptune's core dependencies and nothing else
(tests/test_packaging.py builds one; ``make check-core-install`` builds one with pip).

It checks that the optional libraries are absent, builds a prompt model from a timm ViT and
trains it one step, runs ``vptune train`` end to end on a tiny image folder, checks that the
commands needing an extra name the pip command, and that no optional library was imported.
Usage: python tests/core_only_check.py WORKDIR  (prints "core-only check passed").
"""

import importlib.util
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

OPTIONAL = ("ray", "fastapi", "uvicorn", "starlette", "multipart", "httpx", "prometheus_client", "mlflow",
            "tensorboard", "open_clip", "diffusers")


def cli(*args: object) -> tuple[int, str]:
    """Run a vptune command in this process; its exit code and its output."""
    from vptune.cli import app

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            app([str(a) for a in args], prog_name="vptune")
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
    return code, out.getvalue()


def main(work: Path) -> None:
    present = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
    assert not present, f"this environment is not core-only: {present} are installed"

    import vptune  # first: its torchvision shim lets timm import under our CPU torch (see vptune_tvshim)

    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from vptune.backbones.bundled import build_bundled

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    model = vptune.prompt_model(backbone, vptune.VPTConfig(num_prompts=3, deep=True), num_classes=4)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    tuned = model.tuned_parameters()
    assert tuned and all(p.grad is not None for p in tuned.values()), "tuned tensors got no gradient"
    assert all(p.grad is None for p in backbone.parameters() if not any(p is q for q in tuned.values()))

    save_file(build_bundled().state_dict(), str(work / "backbone.safetensors"))
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for name, colour in {"red": (200, 30, 30), "blue": (30, 30, 200)}.items():
            folder = work / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 20), tuple(min(255, c + 8 * i) for c in colour)).save(folder / f"{i}.png")
    run = work / "run"
    code, output = cli(
        "train", "--method", "vpt-deep", "--num-prompts", 2, "--data", f"imagefolder:{work / 'images'}", "--out", run,
        "--weights", work / "backbone.safetensors", "--epochs", 1, "--batch-size", 4, "--device", "cpu",
    )
    assert code == 0, output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_top1"] is not None and (run / "model.safetensors").is_file(), metrics

    for args, extra in (
        (("sweep", "--method", "linear", "--data", f"imagefolder:{work / 'images'}", "--out", work / "sweep"), "sweep"),
        (("serve", "--tasks", work), "serve"),
    ):
        code, output = cli(*args)
        assert code == 1 and f'pip install "vptune[{extra}]"' in output and "Traceback" not in output, output

    imported = sorted({name.split(".")[0] for name in sys.modules} & set(OPTIONAL))
    assert not imported, f"the core imported {imported}"
    print("core-only check passed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
