"""The subject-driven generation mini results (docs/results-diffusion-mini.md) on the bundled
text-to-image model ``vptune_sd_fmnist``.

One held-out subject (``vptune.diffusion.subjects``: a Fashion-MNIST *test* bag the model never
saw, 4 canvases) bound to "sks" with the instance prompt "a photo of sks bag". Every method is
trained the same way (``vptune train --data subject:DIR``: AdamW, batch 4, no warm-up, no weight
decay, its own lr, no prior preservation), then scored by ``vptune eval --run`` (4 images for each
of 4 fixed prompts, 25 DDIM steps, guidance 3, seed 0; subject fidelity with the bundled ViT as the
DINO-style encoder and with the bundled CLIP, prompt fidelity with the bundled CLIP). The frozen
model (nothing tuned) is the reference row. Writes the JSON of every figure, one PNG grid per
method and an overview grid.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python scripts/diffusion_mini.py --out /tmp/diffusion-mini \
        --json docs/results-diffusion-mini.json --grids docs/diffusion-mini

Each run lives in its own folder under --out: rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import torch

PROMPT = "a photo of sks bag"
METRICS = ("subject_dino", "subject_clip", "prompt_clip")
# name, method, options, sites, lr
ROWS = [
    ("frozen", None, {}, "cross", None),
    ("apt-cross", "apt", {"num_prompts": 16}, "cross", 1e-2),
    ("apt-self", "apt", {"num_prompts": 16}, "self", 1e-2),
    ("apt-both", "apt", {"num_prompts": 16}, "both", 1e-2),
    ("vpt-deep-cross", "vpt-deep", {"num_prompts": 16}, "cross", 1e-2),
    ("lora", "lora", {"rank": 4, "alpha": 4.0}, "both", 3e-3),
    ("textual-inversion", "textual-inversion", {"init_word": "bag"}, "both", 5e-3),
    ("full-dreambooth", "full", {}, "both", 3e-4),
]


def command(row: tuple, run: Path, subject: Path, epochs: int, repeats: int) -> str:
    name, method, options, sites, lr = row
    flags = " ".join(f"-o {k}={v}" for k, v in options.items())
    return (f'vptune train --backbone vptune_sd_fmnist --method {method} {flags} --sites {sites} --data subject:{subject} '
            f'--prompt "{PROMPT}" --out {run} --epochs {epochs} --repeats {repeats} --batch-size 4 --optimizer adamw '
            f"--lr {lr} --warmup-epochs 0 --weight-decay 0").replace("  ", " ")


def markdown_table(results: dict) -> str:
    """The results table of docs/results-diffusion-mini.md, from the JSON's rows: each metric's
    mean over the evaluation seeds, ± their standard deviation where there are several."""
    lines = ["| method | sites | tuned params | % of UNet | subject DINO | subject CLIP-I | prompt CLIP-T | train time (s) "
             "| extra GFLOPs / step |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(row: dict, key: str) -> str:
        mean, std = row.get(f"{key}_mean", row[key]), row.get(f"{key}_std")
        return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")

    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['sites'] if row['method'] in ('apt', 'vpt-deep') else '-'} | {row['tuned_params']:,} | "
                     f"{row['tuned_percent']:.3g} | {cell(row, 'subject_dino')} | {cell(row, 'subject_clip')} | "
                     f"{cell(row, 'prompt_clip')} | {row['train_time_s']:.0f} | {row['extra_gflops_per_step']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder: subject images and run folders")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--grids", type=Path, required=True, help="folder for the PNG grids")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--rows", default=",".join(r[0] for r in ROWS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-seeds", default="0", help="generation seeds of the evaluation (the grids: the first)")
    parser.add_argument("--weights", default=None, help="another UNet .safetensors for vptune_sd_fmnist (a check of the script)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vptune.diffusion.backbone import load_diffusion_backbone
    from vptune.diffusion.metrics import EVAL_TEMPLATES, evaluate_generation, load_encoders
    from vptune.diffusion.model import TextToImage
    from vptune.diffusion.sample import save_grid
    from vptune.diffusion.subjects import write_subject_folder
    from vptune.diffusion.train import load_generation_run, subject_images, train_generation_run
    from vptune.methods import LinearConfig
    from vptune.model import PromptModel
    from vptune.tasks import GenerationTask
    from vptune.train import TrainConfig

    subject_dir = args.out / "subject"
    if not subject_dir.is_dir():
        write_subject_folder(subject_dir, kind=8, count=4, seed=0)
    subject_info = json.loads((subject_dir / "subject.json").read_text())
    dino, clip = load_encoders()
    wanted = args.rows.split(",")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.setdefault("rows", {})
    from vptune.diffusion.backbone import bundled_sd_weights_path

    weights = Path(args.weights) if args.weights else bundled_sd_weights_path()
    results.update(
        unet_weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        subject=subject_info, prompt=PROMPT, eval_templates=list(EVAL_TEMPLATES), epochs=args.epochs, repeats=args.repeats,
        machine=platform.machine(), torch=torch.__version__, threads=args.threads,
        eval_seeds=args.eval_seeds,
        command="PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python scripts/diffusion_mini.py --out /tmp/diffusion-mini "
                f"--json {args.json} --grids {args.grids} --eval-seeds {args.eval_seeds}",
    )
    args.grids.mkdir(parents=True, exist_ok=True)
    overview = {}
    for row in ROWS:
        name, method, options, sites, lr = row
        if name not in wanted:
            continue
        run = args.out / name
        started = time.perf_counter()
        if method is None:  # the frozen model: nothing tuned
            pipeline = load_diffusion_backbone("vptune_sd_fmnist", weights=args.weights)
            model = PromptModel(TextToImage(pipeline, sites), LinearConfig(), task=GenerationTask(PROMPT))
            metrics = {"method": "frozen", "tuned_params": 0, "tuned_percent": 0.0, "extra_gflops": 0.0, "wall_time_s": 0.0,
                       "train_loss": None}
            line = None
        else:
            cfg = TrainConfig(epochs=args.epochs, batch_size=4, lr=lr, optimizer="adamw", warmup_epochs=0, weight_decay=0.0)
            finished = (run / "config.json").is_file()
            metrics = train_generation_run("vptune_sd_fmnist", method, options, f"subject:{subject_dir}", run, cfg,
                                           prompt=PROMPT, sites=sites, repeats=args.repeats, resume=finished, progress=False,
                                           weights=args.weights)
            model = load_generation_run(run)
            line = command(row, run, subject_dir, args.epochs, args.repeats)
        pipeline = model.backbone.pipeline
        subject, _, _ = subject_images(subject_dir, pipeline.image_size, pipeline.image_channels)
        torch.manual_seed(0)
        grid = args.grids / f"{name}.png"
        seeds = [int(x) for x in args.eval_seeds.split(",")]
        scores = evaluate_generation(model, subject, num_images=4, steps=25, seed=seeds[0], dino=dino, clip=clip, grid=str(grid),
                                     return_images=True)
        overview[name] = scores.pop("images").reshape(4, 4, *subject.shape[1:])[:, :2].flatten(0, 1)  # 2 per prompt
        per_seed = {seeds[0]: {k: scores[k] for k in METRICS}}
        for seed in seeds[1:]:
            again = evaluate_generation(model, subject, num_images=4, steps=25, seed=seed, dino=dino, clip=clip)
            per_seed[seed] = {k: again[k] for k in METRICS}
        results["rows"][name] = {
            "method": metrics["method"], "options": options, "sites": sites, "lr": lr, "train_loss": metrics.get("train_loss"),
            "tuned_params": metrics["tuned_params"], "tuned_percent": metrics["tuned_percent"],
            "extra_gflops_per_step": metrics["extra_gflops"], "train_time_s": metrics["wall_time_s"],
            "subject_dino": scores["subject_dino"], "subject_clip": scores["subject_clip"], "prompt_clip": scores["prompt_clip"],
            "per_prompt": scores["per_prompt"], "grid": str(grid), "train_command": line, "per_seed": per_seed,
            **{f"{k}_mean": float(torch.tensor([v[k] for v in per_seed.values()]).mean()) for k in METRICS},
            **{f"{k}_std": float(torch.tensor([v[k] for v in per_seed.values()]).std()) if len(per_seed) > 1 else None
               for k in METRICS},
            "eval_command": None if line is None else f"vptune eval --run {run} --num-images 4 --steps 25 --seed 0 --grid {grid}",
            "row_time_s": time.perf_counter() - started,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"{name}: " + "  ".join(f"{k} {v:.4g}" for k, v in results["rows"][name].items() if isinstance(v, float)), flush=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(markdown_table(results))
    if overview:
        names = list(overview)
        subject, _, _ = subject_images(subject_dir, 32, 1)
        images = torch.cat([torch.cat([subject, subject[:4]])] + [overview[n] for n in names])
        save_grid(images, args.grids / "overview.png", columns=8, scale=3, labels=["subject: its 4 training images, twice"] + names)


if __name__ == "__main__":
    main()
