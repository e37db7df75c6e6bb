"""The ``vptune`` command line: thin typer commands over the library (parse, call, print).

Every command reports a bad input as one red line and a non-zero exit, not a traceback.
Commands are grouped in blocks, one per concern; each block only parses options and calls
the library function that does the work.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vptune.extras import MissingExtra, require

app = typer.Typer(
    name="vptune",
    help="Prompt tuning of frozen timm vision transformers (VPT, E2VPT, APT) and their baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

BUNDLED = "vptune_vit_fmnist"  # the bundled backbone's name (vptune.backbones.BUNDLED_BACKBONE)


def printable(text: str) -> str:
    """``text`` with its control characters (terminal escape sequences in a class or file name)
    shown as ``\\x1b`` escapes, so that data never reaches the terminal as commands."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def safe(text: str) -> str:
    """``text`` from data or the user, ready for a rich console: control characters and markup escaped."""
    return escape(printable(text))


def user_errors(command: Callable) -> Callable:
    """Turn the library's input errors into one red line and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError, TypeError, MissingExtra) as err:
            err_console.print(f"[bold red]error:[/] {safe(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


MAX_PIXELS_HELP = "Refuse images above this many pixels, before decoding them (default 16,000,000)."
CLIP_GRAD_HELP = ("Clip the tuned parameters' gradient to this total L2 norm each optimiser step, e.g. 1.0 "
                  "(default: no clipping); steadies high-lr LoRA or full fine-tuning.")


# --- train, eval, predict -----------------------------------------------------------------


def method_options(method: str, named: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The method config fields set on the command line; an option the method lacks is an error."""
    from vptune.methods import config_for

    options = {key: value for key, value in named.items() if value is not None}
    for item in extra:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE (e.g. --option layers=[0,1]), got {item!r}")
        try:
            options[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = raw
    fields = config_for(method).to_dict()
    unknown = sorted(set(options) - set(fields))
    if unknown:
        have = ", ".join("--" + f.replace("_", "-") for f in fields if f != "method") or "none"
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise ValueError(f"method {method!r} has no option {flags}; its options are: {have}")
    config_for(method, **options)  # validates values now, before any data is loaded
    return options


@app.command()
@user_errors
def train(
    method: str = typer.Option(..., help="Method name: vpt-deep, vpt-shallow, e2vpt, apt, linear, mlp, full, bias, partial, lora."),
    data: str = typer.Option(..., help="Data SPEC: imagefolder:PATH, vtab1k:ROOT/TASK, fgvc:ROOT/NAME or mini:TASK."),
    out: Path = typer.Option(..., help="Run folder: tuned weights, config, metrics.json, curve.csv, checkpoint."),
    backbone: str = typer.Option(BUNDLED, help="timm model name or the bundled backbone's name."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone weights (.safetensors, .pth, .npz)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Use timm's hub weights (needs internet)."),
    num_prompts: Optional[int] = typer.Option(None, help="Prompt tokens (vpt, e2vpt, apt)."),
    num_kv_prompts: Optional[int] = typer.Option(None, help="Key/value prompts per block (e2vpt)."),
    rank: Optional[int] = typer.Option(None, help="Low rank (apt, lora)."),
    dropout: Optional[float] = typer.Option(None, help="Prompt or LoRA dropout."),
    path: Optional[str] = typer.Option(None, help="Prompt path: kv (fast, exact) or tokens."),
    option: list[str] = typer.Option([], "--option", "-o", help="Any other method field as KEY=VALUE (JSON value)."),
    head: Optional[str] = typer.Option(None, help="random, text (CLIP's zero-shot classifier; default on CLIP backbones) or coop."),
    templates: Optional[str] = typer.Option(None, help="Text head prompts: openai, simple, or one template with {} (default: the backbone's)."),
    text_prompts: Optional[str] = typer.Option(None, help="coop: add CoOp's learned text prompts to any image-side method."),
    n_ctx: Optional[int] = typer.Option(None, help="CoOp context vectors (16)."),
    class_specific: Optional[bool] = typer.Option(None, "--class-specific/--unified", help="CoOp: one context per class, or one shared."),
    ctx_init: Optional[str] = typer.Option(None, help="CoOp: words whose embeddings start the context (as many as --n-ctx)."),
    shots: Optional[int] = typer.Option(None, help="Train on K images per class, drawn with --seed (fewer: all, with a warning)."),
    backbone_train_mode: Optional[bool] = typer.Option(
        None, "--backbone-train-mode/--backbone-eval-mode",
        help="Keep the frozen backbone's own dropout on while training (default: the family's recipe: on for ViLT, off otherwise)."),
    tokenizer: Optional[str] = typer.Option(None, help="Vision-language text: word (vptune's), or a transformers tokenizer name/folder "
                                            "(default: the checkpoint's own, else word)."),
    epochs: int = typer.Option(10, help="Training epochs."),
    batch_size: int = typer.Option(64, help="Images per step (per micro-batch with --grad-accum)."),
    lr: float = typer.Option(0.1, help="Learning rate (base lr with --scale-lr)."),
    weight_decay: float = typer.Option(1e-4, help="Weight decay (not on biases, norms and other 1-d tensors)."),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9, the VPT recipe) or adamw."),
    warmup_epochs: float = typer.Option(1.0, help="Linear warm-up epochs before the cosine decay."),
    scale_lr: bool = typer.Option(False, "--scale-lr", help="Use lr * batch / 256 (the papers' convention)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast on CPU and GPU)."),
    seed: int = typer.Option(0, help="Seed for initialisation, shuffling and dropout."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimiser step."),
    clip_grad: Optional[float] = typer.Option(None, help=CLIP_GRAD_HELP),
    eval_every: int = typer.Option(0, help="Evaluate on val every k epochs (0: only at the end)."),
    num_workers: int = typer.Option(0, help="DataLoader worker processes."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip unreadable images (counted in metrics)."),
    final: bool = typer.Option(False, "--final", help="Train on train+val (train800val200) and report test."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Train over whatever --out holds (a run, or other files)."),
    max_image_pixels: Optional[int] = typer.Option(None, help=MAX_PIXELS_HELP),
    allow_sparse_labels: bool = typer.Option(
        False, "--allow-sparse-labels", help="Accept list labels that leave most of 0..max unused (else a typo)."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    tracker: str = typer.Option("none", help="Also log to: none, tensorboard (event files in RUN/tensorboard) or mlflow."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: an SQLite store, OUT/mlflow.db)."),
    prompt: Optional[str] = typer.Option(None, help="--data subject:DIR: the instance prompt naming the subject, e.g. 'a photo of sks bag'."),
    identifier: str = typer.Option("sks", help="--data subject:DIR: the rare word the subject is bound to (textual inversion learns it)."),
    class_prompt: Optional[str] = typer.Option(None, help="--data subject:DIR: prompt of the class-prior images (default: --prompt without the identifier)."),
    class_images: int = typer.Option(0, help="--data subject:DIR: class-prior images the frozen model makes (0: no prior preservation)."),
    prior_weight: float = typer.Option(1.0, help="--data subject:DIR: weight of the class-prior images' loss."),
    repeats: int = typer.Option(25, help="--data subject:DIR: visits of each image per epoch."),
    sites: Optional[str] = typer.Option(None, help="Text-to-image backbones: the UNet attention a method acts on: self, cross or both "
                                        "(default: self for apt, cross for prompts, both otherwise)."),
) -> None:
    """Tune a method on a dataset and write the run folder (a subject-driven generation run with --data subject:DIR)."""
    from vptune.train import TrainConfig, train_run
    from vptune.train.distributed import process_group_from_env

    coop = {k: v for k, v in dict(n_ctx=n_ctx, class_specific=class_specific, ctx_init=ctx_init).items() if v is not None}
    named = dict(num_prompts=num_prompts, num_kv_prompts=num_kv_prompts, rank=rank, dropout=dropout, path=path)
    options = method_options(method, {**named, **(coop if method == "coop" else {})}, option)
    if text_prompts not in (None, "coop"):
        raise ValueError(f"--text-prompts must be coop, got {text_prompts!r}")
    if coop and method != "coop" and text_prompts is None:
        raise ValueError("--n-ctx, --class-specific and --ctx-init are CoOp's: use --method coop or --text-prompts coop")
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
        warmup_epochs=warmup_epochs, scale_lr=scale_lr, precision=precision, seed=seed, grad_accum=grad_accum,
        clip_grad=clip_grad,
        eval_every=eval_every, num_workers=num_workers, skip_bad_images=skip_bad_images, device=device,
        tracker=tracker, tracking_uri=tracking_uri,
    )
    if data.startswith("subject:"):
        train_subject(backbone, method, options, data, out, cfg, prompt=prompt, identifier=identifier, class_prompt=class_prompt,
                      class_images=class_images, prior_weight=prior_weight, repeats=repeats, sites=sites, weights=weights,
                      pretrained=pretrained, resume=resume, overwrite=overwrite)
        return
    given = [flag for flag, value in (("--prompt", prompt), ("--class-prompt", class_prompt), ("--sites", sites),
                                      ("--class-images", class_images or None)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} belong to subject-driven generation (--data subject:DIR on a text-to-image "
                         f"backbone); {data} is not a subject folder")
    try:
        with process_group_from_env(cfg.torch_device()) as main:  # DistributedDataParallel under torchrun
            metrics = train_run(
                backbone, method, options, data, out, cfg, weights=weights, pretrained=pretrained, final=final, resume=resume,
                head=head, templates=templates, text_prompts=None if text_prompts is None else {"kind": "coop", **coop},
                shots=shots, overwrite=overwrite, max_image_pixels=max_image_pixels,
                allow_sparse_labels=allow_sparse_labels, backbone_train_mode=backbone_train_mode, tokenizer=tokenizer,
            )
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] the last checkpoint in {safe(str(out))} is kept; "
                          "run the same command with --resume to continue", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if not main:
        return
    table = Table(title=f"{safe(method)} on {safe(data)}", show_header=False)
    keys = ["val_top1", "test_top1", "tuned_params", "tuned_percent", "extra_gflops", "wall_time_s", "images_per_s"]
    task_keys = [k for k in ("val_vqa_score", "test_vqa_score", "test_ir_r1", "test_tr_r1") if k in metrics]
    for key in task_keys + keys + (["skipped_images"] if metrics.get("skipped_images") else []):
        value = metrics.get(key)
        table.add_row(key, "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"run folder: {safe(str(out))}")


def train_subject(backbone: str, method: str, options: dict[str, Any], data: str, out: Path, cfg: Any, *,
                  prompt: Optional[str], **settings: Any) -> None:
    """``vptune train --data subject:DIR``: a subject-driven generation run on a text-to-image backbone."""
    from vptune.diffusion.backbone import BUNDLED_SD
    from vptune.diffusion.train import train_generation_run

    if prompt is None:
        raise ValueError("--data subject:DIR needs --prompt, the instance prompt naming the subject (e.g. 'a photo of sks bag')")
    if backbone == BUNDLED:  # the default image backbone: the bundled text-to-image model instead
        backbone = BUNDLED_SD
    try:
        metrics = train_generation_run(backbone, method, options, data, out, cfg, prompt=prompt, **settings)
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] the last checkpoint in {safe(str(out))} is kept; "
                          "run the same command with --resume to continue", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    table = Table(title=f"{safe(method)} on {safe(data)} ({safe(prompt)})", show_header=False)
    for key in ("train_loss", "tuned_params", "tuned_percent", "extra_gflops", "wall_time_s", "images_per_s", "sites"):
        value = metrics.get(key)
        table.add_row(key, "-" if value is None else f"{value:.4g}" if isinstance(value, float) else safe(str(value)))
    console.print(table)
    for note in metrics.get("subject_notes", []):
        console.print(f"note: {safe(note)}")
    console.print(f"run folder: {safe(str(out))}")


@app.command("eval")
@user_errors
def eval_(
    run: Path = typer.Option(..., help="Run folder written by vptune train."),
    data: Optional[str] = typer.Option(None, help="Data SPEC with the run's classes (default: the data the run was trained on)."),
    split: str = typer.Option("test", help="test, val or train."),
    backbone: Optional[str] = typer.Option(None, help="Backbone SPEC (default: the one the run recorded)."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone weights (default: the ones the run recorded)."),
    batch_size: int = typer.Option(256, help="Images per batch."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip unreadable images (and count them)."),
    max_image_pixels: Optional[int] = typer.Option(None, help=MAX_PIXELS_HELP),
    allow_sparse_labels: bool = typer.Option(
        False, "--allow-sparse-labels", help="Accept list labels that leave most of 0..max unused (else a typo)."
    ),
    dino: Optional[str] = typer.Option(None, help="Generation runs: the DINO-style image encoder (a timm name; default vptune_vit_fmnist)."),
    clip: Optional[str] = typer.Option(None, help="Generation runs: the CLIP (open_clip:NAME/TAG; default vptune_clip_fmnist)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Generation runs: download the encoders' weights (needs internet)."),
    num_images: int = typer.Option(4, help="Generation runs: images per evaluation prompt."),
    steps: int = typer.Option(25, help="Generation runs: denoising steps."),
    seed: int = typer.Option(0, help="Generation runs: image k of a prompt starts from the noise of seed + k."),
    grid: Optional[Path] = typer.Option(None, help="Generation runs: also write the generated images as a PNG grid."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Generation runs: also write the metrics as JSON."),
) -> None:
    """Top-1 accuracy of a run folder on one split of a dataset; subject and prompt fidelity of a generation run."""
    from vptune.train import evaluate_run, load_run

    if generation_run(run):
        evaluate_generation_cli(run, data, backbone, weights, dino, clip, pretrained, num_images, steps, seed, grid, json_out, device)
        return
    if data is None:
        from vptune.model import read_run_config

        data = read_run_config(run).get("metadata", {}).get("data")
        if data is None:
            raise ValueError(f"--data is needed: {run} does not record the data it was trained on")
        console.print(f"data: {safe(data)} (the run's own; --data to score another)")

    model = load_run(run, backbone, weights=weights)
    result = evaluate_run(model, data, split, batch_size=batch_size, device=device, skip_bad_images=skip_bad_images,
                          max_pixels=max_image_pixels, allow_sparse_labels=allow_sparse_labels)
    skipped = f", {result['skipped_images']} unreadable skipped" if result["skipped_images"] else ""
    if "top1" not in result:  # a vision-language task's own metrics
        shown = "  ".join(f"{k} [bold]{v:.2f}[/]" for k, v in result.items() if k not in ("split", "count", "skipped_images"))
        console.print(f"{safe(str(run))} on {safe(data)} ({split}): {shown}  ({result['count']} examples)")
        return
    console.print(
        f"{safe(str(run))} on {safe(data)} ({split}): top-1 [bold]{result['top1']:.2f}%[/]"
        f"  loss {result['loss']:.4f}  ({result['count']} images{skipped})"
    )


@app.command()
@user_errors
def predict(
    run: Path = typer.Option(..., help="Run folder written by vptune train."),
    images: Optional[list[Path]] = typer.Argument(None, help="Image files to classify."),
    top_k: int = typer.Option(3, help="Labels to show per image."),
    backbone: Optional[str] = typer.Option(None, help="Backbone SPEC (default: the one the run recorded)."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone weights (default: the ones the run recorded)."),
    max_image_pixels: Optional[int] = typer.Option(None, help=MAX_PIXELS_HELP),
    image: list[Path] = typer.Option([], "--image", help="Vision-language runs: the image (twice for NLVR; several for retrieval)."),
    text: Optional[str] = typer.Option(None, help="Vision-language runs: the question (VQA), statement (NLVR) or caption (retrieval)."),
) -> None:
    """Top-k labels with probabilities for each image; unreadable files are reported, not fatal.
    A vision-language run answers ``--text`` about ``--image``."""
    from vptune.train import load_run, predict_files, predict_vl

    model = load_run(run, backbone, weights=weights)
    if model.family.reads_text or text is not None:
        if text is None or not image or images:
            raise ValueError(f"{run} is a {model.task.name} run: pass --image FILE and --text TEXT"
                             if model.family.reads_text else f"{run} classifies images: pass image files, without --text")
        answer = predict_vl(model, list(image), text, top_k=top_k)
        shown = ", ".join(f"[bold]{safe(name)}[/] ({p:.3g})" for name, p in answer["top"])
        console.print(f"{safe(text)}: {shown}", highlight=False, soft_wrap=True)
        return
    if not images:
        raise ValueError("pass the image files to classify")
    results = predict_files(model, images, top_k=top_k, max_pixels=max_image_pixels)
    for result in results:
        if "error" in result:
            err_console.print(f"[red]{safe(result['error'])}[/]", highlight=False, soft_wrap=True)
        else:
            labels = ", ".join(f"[bold]{safe(name)}[/] ({p:.1%})" for name, p in result["top"])
            console.print(f"{safe(result['file'])}: {labels}", highlight=False, soft_wrap=True)
    failed = sum("error" in r for r in results)
    if failed:
        err_console.print(f"[bold red]error:[/] {failed} of {len(results)} images could not be read")
        raise typer.Exit(1)


@app.command()
@user_errors
def zeroshot(
    out: Path = typer.Option(..., help="Run folder for the zero-shot classifier (servable by vptune serve)."),
    backbone: str = typer.Option("vptune_clip_fmnist", help="A CLIP: open_clip:NAME/TAG or the bundled vptune_clip_fmnist."),
    data: Optional[str] = typer.Option(None, help="Data SPEC: class names from it, val/test top-1 measured."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class names (instead of --data)."),
    templates: Optional[str] = typer.Option(None, help="openai, simple, or one template with {} (default: the backbone's)."),
    weights: Optional[Path] = typer.Option(None, help="Local CLIP weights (.safetensors, .pt)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Unused for open_clip specs (the TAG picks the weights)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write over whatever --out holds (a run, or other files)."),
) -> None:
    """Write CLIP's zero-shot classifier (text embeddings of the class names) as a run folder."""
    from vptune.train.run import zeroshot_run

    metrics = zeroshot_run(backbone, out, data=data, classes=None if classes is None else classes.split(","),
                           templates=templates, weights=weights, pretrained=pretrained, device=device, overwrite=overwrite)
    score = "" if metrics["test_top1"] is None else f": test top-1 [bold]{metrics['test_top1']:.2f}%[/]"
    console.print(f"zero-shot classifier for {len(metrics['class_names'])} classes{score}")
    console.print(f"run folder: {out}")


# --- bench --------------------------------------------------------------------------------


@app.command()
@user_errors
def bench(
    backbone: str = typer.Option("vit_small_patch16_224", help="timm model name (random weights, no download)."),
    methods: str = typer.Option(
        "backbone,vpt-deep:kv,vpt-deep:tokens,vpt-shallow,e2vpt,apt,linear,full,lora",
        help="Comma-separated rows: backbone, a method name, or vpt-deep/e2vpt with :kv or :tokens.",
    ),
    num_prompts: Optional[int] = typer.Option(None, help="Prompts per block for vpt-deep, vpt-shallow and apt (E2VPT: 10 + 5 kv); default 50, 200 for vilt."),
    batch_size: int = typer.Option(8, help="Images per step for FLOPs and timings."),
    memory_batch_size: int = typer.Option(32, help="Images per training step for peak memory."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute blocks in backward."),
    rounds: int = typer.Option(5, help="Interleaved timing rounds after warm-up (medians are reported)."),
    clock: str = typer.Option("wall", help="wall, or cpu: process CPU time (steadier on a shared CPU; use --threads 1)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the rows as a JSON list."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write the rows as CSV."),
) -> None:
    """Tuned parameters, GFLOPs, speed and training memory of every method, side by side.
    ``--backbone vilt``: APT, the deep prompt (tokens and kv paths) and LoRA on ViLT-B/32's shape
    at 384x384 with a 40-token question (random weights); ``--backbone meter``: the same on
    METER-B's shape at 288x288 (and the deep prompt at the cross-attention sites only)."""
    from vptune.bench import BenchSettings, parse_methods, run_bench, table, write_csv, write_json

    if backbone in ("vilt", "meter"):
        from vptune.bench_vl import meter_cost, vilt_cost

        if threads:
            import torch

            torch.set_num_threads(threads)
        cost, shape = (vilt_cost, "ViLT-B/32 shape, 384x384") if backbone == "vilt" else (meter_cost, "METER-B shape (CLIP-B/16, RoBERTa-base, 6+6 fusion layers), 288x288")
        rows = cost(num_prompts or 200, batch_size=batch_size, rounds=rounds, clock=clock)
        grid = Table(title=f"{shape}, 40-token text, batch {batch_size}, {rows[0]['gflops']:.2f} GFLOPs per pair frozen")
        for column in ("method", "prompts", "tuned (no head)", "extra GFLOPs", "infer s/batch", "APT's extra as % of this"):
            grid.add_column(column)
        for row in rows:
            ratio = row["apt_percent_of_this"]
            grid.add_row(row["method"], str(row["num_prompts"] or "-"), f"{row['tuned_params']:,}", f"{row['extra_gflops']:.3f}",
                         f"{row['infer_s']:.3f}", "-" if ratio is None else f"{ratio:.1f}%")
        Console(width=max(console.width, 160)).print(grid)
        if json_path:
            write_json(rows, json_path)
        return
    settings = BenchSettings(
        backbone=backbone, methods=parse_methods(methods), num_prompts=num_prompts or 50, batch_size=batch_size,
        memory_batch_size=memory_batch_size, precision=precision, grad_checkpointing=grad_checkpointing,
        rounds=rounds, clock=clock, device=device, threads=threads,
    )
    rows = run_bench(settings, progress=lambda message: err_console.print(message, style="dim"))
    title = (
        f"{backbone}, {settings.device}, {precision}, batch {batch_size} (memory: {memory_batch_size})"
        + (", gradient checkpointing" if grad_checkpointing else "")
    )
    Console(width=max(console.width, 160)).print(table(rows, title))
    if json_path:
        write_json(rows, json_path)
    if csv_path:
        write_csv(rows, csv_path)


# --- sweep: the papers' protocol on Ray Tune ----------------------------------------------


def parse_grid(text: str, kind: type, flag: str) -> tuple:
    """A comma-separated grid such as ``50,25,10``."""
    try:
        return tuple(kind(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated {kind.__name__} values such as 1,0.5,0.1; got {text!r}") from None


@app.command()
@user_errors
def sweep(
    method: str = typer.Option(..., help="Method name: vpt-deep, vpt-shallow, e2vpt, apt, linear, ..."),
    data: list[str] = typer.Option(..., help="Data SPEC of a task; repeat for several (mini:TASK, vtab1k:ROOT/TASK, ...)."),
    out: Path = typer.Option(..., help="Sweep folder: run folders, Ray's files, sweep.json and sweep.md. Rerun to resume."),
    backbone: str = typer.Option(BUNDLED, help="timm model name or the bundled backbone's name."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone weights (.safetensors, .pth, .npz)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Use timm's hub weights (needs internet)."),
    lr_grid: str = typer.Option("50,25,10,5,2.5,1,0.5,0.25,0.1,0.05", help="Base learning rates (lr = base x batch / 256)."),
    wd_grid: str = typer.Option("0.01,0.001,0.0001,0", help="Weight decays."),
    num_prompts_grid: Optional[str] = typer.Option(None, help="Prompt lengths to search too, e.g. 1,5,10,50,100,200."),
    seeds: str = typer.Option("42,44,82,100,800", help="Seeds of the final runs on train+val (the first also seeds the search)."),
    epochs: int = typer.Option(100, help="Epochs of every run (the official recipe: 100)."),
    batch_size: int = typer.Option(128, help="Images per step (the official recipe: 128; 64 for long prompts)."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Warm-up epochs before the cosine decay (default: a tenth, as 10 of 100)."),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9, the VPT recipe) or adamw."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast on CPU and GPU)."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimiser step."),
    clip_grad: Optional[float] = typer.Option(None, help=CLIP_GRAD_HELP),
    num_workers: int = typer.Option(0, help="DataLoader worker processes per trial."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (within each trial)."),
    num_kv_prompts: Optional[int] = typer.Option(None, help="Key/value prompts per block (e2vpt)."),
    rank: Optional[int] = typer.Option(None, help="Low rank (apt, lora)."),
    dropout: Optional[float] = typer.Option(None, help="Prompt or LoRA dropout."),
    path: Optional[str] = typer.Option(None, help="Prompt path: kv (fast, exact) or tokens."),
    option: list[str] = typer.Option([], "--option", "-o", help="Any other method field as KEY=VALUE (JSON value)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to run on (auto or ray://HOST:PORT); default: a local Ray."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray (default: all)."),
    cpus_per_trial: float = typer.Option(1.0, help="CPUs each trial reserves (and its torch threads)."),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs each trial reserves (fractions share a GPU)."),
    scheduler: str = typer.Option("none", help="none, or asha: stop weak grid points early on per-epoch val top-1."),
    tracker: str = typer.Option("none", help="Every run also logs to: none, tensorboard (RUN/tensorboard) or mlflow."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: one SQLite store for the sweep, OUT/mlflow.db)."),
) -> None:
    """Search lr x wd on val, retrain the winner on train+val with each seed, report test (docs/methods.md, the reproduction protocol)."""
    require("sweep", purpose="vptune sweep")
    from vptune.sweep import SweepConfig, SweepInterrupted, run_sweep
    from vptune.train import TrainConfig

    options = method_options(method, dict(num_kv_prompts=num_kv_prompts, rank=rank, dropout=dropout, path=path), option)
    config = SweepConfig(
        backbone=backbone, method=method, data=list(data), out=out, method_options=options,
        train=TrainConfig(
            epochs=epochs, batch_size=batch_size, warmup_epochs=epochs / 10 if warmup_epochs is None else warmup_epochs,
            optimizer=optimizer, precision=precision,
            grad_accum=grad_accum, clip_grad=clip_grad, num_workers=num_workers, device=device, scale_lr=True,
            tracker=tracker, tracking_uri=tracking_uri,
        ),
        lr_grid=parse_grid(lr_grid, float, "--lr-grid"), wd_grid=parse_grid(wd_grid, float, "--wd-grid"),
        num_prompts_grid=parse_grid(num_prompts_grid, int, "--num-prompts-grid") if num_prompts_grid else (None,),
        seeds=parse_grid(seeds, int, "--seeds"), weights=None if weights is None else str(weights.absolute()),
        pretrained=pretrained, address=address, num_cpus=num_cpus, cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial, scheduler=scheduler,
    )
    try:
        summary = run_sweep(config, console=console)
    except (KeyboardInterrupt, SweepInterrupted) as err:
        message = str(err) or "the sweep was interrupted; run the same command again to resume it"
        err_console.print(f"[bold red]interrupted:[/] {safe(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    table = Table(title=f"{method} on {backbone}: chosen on val, test top-1 over {len(config.seeds)} seeds")
    for column in ("task", "group", "base lr", "wd", "prompts", "val top-1", "test top-1", "tuned %"):
        table.add_column(column)
    for name, entry in summary["tasks"].items():
        chosen = entry["chosen"] or {}
        test = "-" if entry["test_top1_mean"] is None else f"{entry['test_top1_mean']:.2f} ± {entry['test_top1_std']:.2f}"
        table.add_row(
            name, entry["group"] or "-", f"{chosen.get('base_lr', '-')}", f"{chosen.get('weight_decay', '-')}",
            str(chosen.get("num_prompts") or "default"), f"{chosen['val_top1']:.2f}" if chosen else "-", test,
            "-" if entry.get("tuned_percent") is None else f"{entry['tuned_percent']:.3f}",
        )
    console.print(table)
    for group, entry in summary["groups"].items():
        console.print(f"{group}: mean test top-1 {entry['test_top1_mean']:.2f} over {len(entry['tasks'])} tasks")
    console.print(f"summary: {out / 'sweep.md'}, {out / 'sweep.json'}")
    if summary["failed"]:
        err_console.print(f"[bold red]error:[/] {len(summary['failed'])} runs failed (errors in sweep.json); "
                          "rerun to retry them", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
@user_errors
def fewshot(
    data: str = typer.Option(..., help="Comma-separated data SPECs (e.g. mini:count,mini:location)."),
    methods: str = typer.Option("zeroshot,linear,linear-random,coop,vpt-deep", help="Comma-separated: names, zeroshot, "
                                "M-random (random head), M+coop (CoOp on the text side too), M@LR (its learning rate)."),
    out: Path = typer.Option(..., help="Folder of the grid's runs, fewshot.md/.json/.png; rerun to resume."),
    backbone: str = typer.Option("vptune_clip_fmnist", help="A CLIP: open_clip:NAME/TAG or the bundled vptune_clip_fmnist."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone weights."),
    shots: str = typer.Option("1,2,4,8,16", help="Shots per class."),
    seeds: str = typer.Option("1,2,3", help="Seeds (which images are drawn, and the initialisation)."),
    epochs: int = typer.Option(20, help="Training epochs of each run."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3, help="Learning rate of methods without their own @LR."),
    optimizer: str = typer.Option("adamw", help="sgd or adamw."),
    weight_decay: float = typer.Option(1e-4),
    precision: str = typer.Option("fp32", help="fp32 or bf16."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray (default: all)."),
    cpus_per_trial: float = typer.Option(1.0),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local Ray)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """The few-shot protocol: every method x shots x seed on Ray Tune, a table and an accuracy-vs-shots plot."""
    from vptune.sweep.fewshot import FEWSHOT_MD, FEWSHOT_PNG, FewShotConfig, run_fewshot
    from vptune.train import TrainConfig

    config = FewShotConfig(
        backbone=backbone, data=comma_list(data), methods=comma_list(methods), out=out,
        shots=parse_grid(shots, int, "--shots"), seeds=parse_grid(seeds, int, "--seeds"),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                          precision=precision, warmup_epochs=0.0, device=device),
        weights=None if weights is None else str(weights.resolve()), address=address, num_cpus=num_cpus,
        cpus_per_trial=cpus_per_trial,
    )
    summary = run_fewshot(config, console)
    console.print(f"summary: {out / FEWSHOT_MD}, {out / FEWSHOT_PNG}" + (f" ({len(summary['missing'])} runs missing)" if summary["missing"] else ""))


# --- pretrain: the bundled backbone ---------------------------------------------------------


@app.command()
@user_errors
def pretrain(
    out: Optional[Path] = typer.Option(None, help="Folder for the weights and model card (default: the package's)."),
    arch: str = typer.Option("vit", help="vit: the bundled ViT on Fashion-MNIST; swin: the bundled Swin on Fashion-MNIST; clip: the bundled CLIP on captioned canvases; vilt: the bundled ViLT on captioned canvases (ITM + MLM); meter: the bundled METER's fusion layers on the bundled CLIP (ITM + MLM); sd: the bundled text-to-image model on captioned canvases."),
    epochs: int = typer.Option(2, help="Passes over the 60,000 Fashion-MNIST training images (vit, swin)."),
    steps: Optional[int] = typer.Option(None, help="Steps (clip: contrastive, 300; vilt: ITM + MLM, 400; sd: denoising, 1000)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch (128; vilt 64 pairs; sd 32 canvases)."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate (vit 1e-3; clip: text side 2e-3; vilt: new tensors 1e-3; sd 1e-3)."),
    image_lr: Optional[float] = typer.Option(None, help="Peak learning rate of the unlocked image blocks (clip, 2e-4) or of the tensors started from the ViT (vilt, 3e-4)."),
    unlocked_blocks: int = typer.Option(2, help="Last image blocks tuned; the others stay locked (clip)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (0.05; vilt 0.01)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Warm-up steps (vit 200, clip 30, vilt 50, sd 50)."),
    label_smoothing: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    threads: int = typer.Option(2, help="CPU threads."),
    work_dir: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: the cache); a rerun resumes there."),
    docs: Optional[Path] = typer.Option(None, help="Folder for the figures JSON (<arch>-fmnist-figures.json) and, sd, the sample grid and loss curve PNGs (default: --out)."),
    evaluate_only: bool = typer.Option(False, "--evaluate-only", help="Train nothing: measure the evaluation figures of the weights in --out again, into the figures JSON in --docs (the run's record in it kept)."),
) -> None:
    """Pretrain a bundled model (vptune_vit_fmnist; vptune_swin_fmnist with --arch swin; vptune_clip_fmnist with --arch clip;
    vptune_vilt_fmnist with --arch vilt; vptune_meter_fmnist with --arch meter; vptune_sd_fmnist with --arch sd) and write its weights, model card and figures JSON."""
    from vptune.backbones.bundled import bundled_weights_path

    if evaluate_only:
        from vptune.backbones.figures import figures_path, remeasure

        if arch == "sd":
            require("diffusion", "diffusers", purpose="vptune pretrain --arch sd")
        folder = out or bundled_weights_path().parent
        evaluation = remeasure(arch, folder, docs or folder, threads=threads)
        console.print_json(data=evaluation)
        console.print(f"wrote {figures_path(docs or folder, arch)}")
        return
    if arch == "sd":
        require("diffusion", "diffusers", purpose="vptune pretrain --arch sd")
        from vptune.diffusion.pretrain_sd import pretrain_sd

        figures = pretrain_sd(
            out or bundled_weights_path().parent, docs=docs, steps=steps or 1000, batch_size=batch_size or 32, lr=lr or 1e-3,
            weight_decay=0.05 if weight_decay is None else weight_decay, warmup_steps=50 if warmup_steps is None else warmup_steps,
            seed=seed, threads=threads, work_dir=work_dir,
        )
        console.print("samples vs captions (generated / real / chance %): " + ", ".join(
            f"{k} {c['generated']:.1f}/{c['real']:.1f}/{c['chance']:.1f}" for k, c in figures["checks"].items() if "chance" in c))
        return
    if arch == "meter":
        from vptune.backbones.pretrain_meter import pretrain_meter

        figures = pretrain_meter(
            out or bundled_weights_path().parent, steps=steps or 300, batch_size=48 if batch_size is None else batch_size,
            lr=lr or 1e-3, weight_decay=0.01 if weight_decay is None else weight_decay,
            warmup_steps=30 if warmup_steps is None else warmup_steps, seed=seed, threads=threads, work_dir=work_dir,
            docs=docs,
        )
        console.print("pretrain-val: " + ", ".join(f"{k} {v:.1f}" for k, v in figures["pretrain_val"].items()))
        return
    if arch == "vilt":
        from vptune.backbones.pretrain_vilt import pretrain_vilt

        figures = pretrain_vilt(
            out or bundled_weights_path().parent, steps=steps or 400, batch_size=64 if batch_size is None else batch_size,
            lr=lr or 1e-3, vit_lr=image_lr or 3e-4, weight_decay=0.01 if weight_decay is None else weight_decay,
            warmup_steps=50 if warmup_steps is None else warmup_steps, seed=seed, threads=threads, work_dir=work_dir,
            docs=docs,
        )
        console.print("pretrain-val: " + ", ".join(f"{k} {v:.1f}" for k, v in figures["pretrain_val"].items()))
        return
    batch_size = 128 if batch_size is None else batch_size
    weight_decay = 0.05 if weight_decay is None else weight_decay
    if arch == "clip":
        from vptune.backbones.pretrain_clip import pretrain_clip

        figures = pretrain_clip(
            out or bundled_weights_path().parent, steps=steps or 300, batch_size=batch_size, lr=lr or 2e-3, image_lr=image_lr or 2e-4,
            unlocked_blocks=unlocked_blocks, weight_decay=weight_decay, warmup_steps=30 if warmup_steps is None else warmup_steps,
            seed=seed, threads=threads, work_dir=work_dir, docs=docs,
        )
        console.print("zero-shot top-1: " + ", ".join(f"{k} {v:.1f}%" for k, v in figures["zero_shot"].items()))
        return
    if arch not in ("vit", "swin"):
        raise ValueError(f"--arch must be vit, swin, clip, vilt or sd, got {arch!r}")
    from vptune.backbones.pretrain import pretrain as run_pretrain

    results = run_pretrain(
        out or bundled_weights_path().parent, epochs=epochs, batch_size=batch_size, lr=lr or 1e-3, weight_decay=weight_decay,
        warmup_steps=200 if warmup_steps is None else warmup_steps, label_smoothing=label_smoothing, seed=seed,
        threads=threads, work_dir=work_dir, arch=arch, docs=docs,
    )
    console.print(f"Fashion-MNIST test top-1 {results['test_accuracy'] * 100:.2f}% in {results['wall_time_min']:.1f} min")


def generation_run(run: Path) -> bool:
    """Whether ``run`` holds a subject-driven generation run (its config names the generation task)."""
    try:
        return (json.loads((run / "config.json").read_text()).get("task") or {}).get("name") == "generation"
    except (OSError, ValueError, AttributeError):
        return False  # the classification path reports what is wrong with the folder


def evaluate_generation_cli(run: Path, data: Optional[str], backbone: Optional[str], weights: Optional[Path], dino: Optional[str],
                            clip: Optional[str], pretrained: bool, num_images: int, steps: int, seed: int, grid: Optional[Path],
                            json_out: Optional[Path], device: str) -> None:
    from vptune.diffusion.metrics import evaluate_generation_run
    from vptune.train.config import resolve_device

    result = evaluate_generation_run(str(run), data=data, backbone=backbone, weights=None if weights is None else str(weights),
                                     dino=dino, clip=clip, pretrained=pretrained, num_images=num_images, steps=steps, seed=seed,
                                     grid=None if grid is None else str(grid), device=str(resolve_device(device)))
    table = Table(title=f"{safe(str(run))}: {num_images} images per prompt, {steps} steps, seed {seed}")
    for column in ("prompt", "subject DINO", "subject CLIP", "prompt CLIP"):
        table.add_column(column)
    rows = [(prompt, m) for prompt, m in result["per_prompt"].items()] + [("all", result)]
    for prompt, m in rows:
        table.add_row(safe(prompt), f"{m['subject_dino']:.4f}", f"{m['subject_clip']:.4f}", f"{m['prompt_clip']:.4f}")
    console.print(table)
    console.print(f"encoders: {safe(result['dino'])} (DINO-style), {safe(result['clip'])} (CLIP)")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {safe(str(json_out))}")
    if grid is not None:
        console.print(f"wrote {safe(str(grid))}")


# --- generate: text-to-image with a diffusion backbone ---------------------------------------


@app.command()
@user_errors
def generate(
    prompt: list[str] = typer.Option(..., help="Text prompt; repeat for several (one grid row each)."),
    run: Optional[Path] = typer.Option(None, help="A generation run folder (vptune train --data subject:DIR): generate with its tuned method."),
    backbone: Optional[str] = typer.Option(None, help="vptune_sd_fmnist (bundled; the default) or hf:NAME (a Stable Diffusion 1.x/2.x pipeline); with --run: the run's own."),
    weights: Optional[Path] = typer.Option(None, help="Bundled: another UNet .safetensors; hf: a local pipeline folder."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Download the hf: pipeline (needs internet)."),
    num_images: int = typer.Option(8, help="Images per prompt."),
    seed: int = typer.Option(0, help="Image k of a prompt starts from the noise of seed + k."),
    steps: int = typer.Option(25, help="Denoising steps."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance scale (1: no guidance)."),
    sampler: str = typer.Option("ddim", help="ddim, dpm (DPM-Solver++) or ddpm."),
    batch_size: int = typer.Option(16, help="Images denoised together."),
    scale: int = typer.Option(0, help="Enlarge each image this many times in the grid (0: to about 128 px)."),
    out: Path = typer.Option(Path("grid.png"), help="The PNG grid to write."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """Generate images from text prompts with a frozen text-to-image model and write them as a PNG grid."""
    from vptune.diffusion.backbone import load_diffusion_backbone
    from vptune.diffusion.sample import generate as run_generate
    from vptune.diffusion.sample import save_grid
    from vptune.train.config import resolve_device

    tuned: dict[str, Any] = {}
    if run is not None:  # the run's method on its backbone; a run made on another pipeline is refused
        from vptune.diffusion.model import tuned_parts
        from vptune.diffusion.train import load_generation_run

        run_model = load_generation_run(run, backbone, weights=weights, pretrained=pretrained or None,
                                        device=str(resolve_device(device)))
        model, tuned = run_model.backbone.pipeline, tuned_parts(run_model)
        backbone = model.name
    else:
        backbone = backbone or "vptune_sd_fmnist"
        model = load_diffusion_backbone(backbone, pretrained=pretrained, weights=weights).to(resolve_device(device))
    images = run_generate(model, prompt, num_images=num_images, steps=steps, guidance=guidance, seed=seed,
                          sampler=sampler, batch_size=batch_size, progress=True, **tuned)
    labels = prompt if len(prompt) > 1 else None
    path = save_grid(images, out, columns=num_images, scale=scale or max(1, 128 // model.image_size), labels=labels)
    console.print(f"wrote {safe(str(path))}: {len(images)} images of {model.image_size}x{model.image_size} "
                  f"({backbone}{', run ' + safe(str(run)) if run else ''}, {steps} {sampler} steps, guidance {guidance}, seed {seed})")


# --- serve: many tasks from one frozen backbone over HTTP -----------------------------------


@app.command()
@user_errors
def serve(
    tasks: Path = typer.Option(..., help="Folder of run folders: each subfolder holding a run is a task named after it."),
    backbone: str = typer.Option(BUNDLED, help="Backbone SPEC the runs were trained on: timm model name or the bundled one."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone weights (.safetensors, .pth, .npz)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Use timm's hub weights (needs internet)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on (1-65535)."),
    api_key_file: Optional[Path] = typer.Option(
        None, help="File of API keys, one per line, optionally followed by the tasks it may use; requests then need "
        "'Authorization: Bearer KEY' (/health stays open)."
    ),
    allowed_hosts: Optional[str] = typer.Option(
        None, help="Comma-separated Host header names the server answers to ('*': any; '.example.com': its subdomains). "
        "Default: localhost, 127.0.0.1, ::1 and --host."
    ),
    watch: bool = typer.Option(True, help="Follow --tasks while serving: new run folders are loaded, replaced ones swapped, removed ones unloaded."),
    watch_interval_s: float = typer.Option(1.0, help="How often --tasks is looked at; a change is acted on once it held this long."),
    max_batch: int = typer.Option(32, help="Most images in one backbone pass, across tasks."),
    max_wait_ms: float = typer.Option(5.0, help="Longest wait for a batch to fill after its first request."),
    max_pending: int = typer.Option(512, help="Images in flight before new requests get 503."),
    max_body_mb: float = typer.Option(8.0, help="Largest request body in MiB (413 above)."),
    max_images: int = typer.Option(32, help="Most images in one request."),
    max_image_pixels: int = typer.Option(12_000_000, help="Largest image (width x height) decoded; bigger ones get 413."),
    header_timeout_s: float = typer.Option(5.0, help="Seconds a client has to send a request's line and headers."),
    body_timeout_s: float = typer.Option(10.0, help="Seconds a client has to send a request's body (408 after)."),
    docs: bool = typer.Option(False, "--docs", help="Serve FastAPI's /docs page (it loads its scripts from a public CDN)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    ray: bool = typer.Option(False, "--ray", help="Run the same app on Ray Serve, in --replicas replicas (each holds the backbone and every task)."),
    replicas: int = typer.Option(2, help="Ray Serve replicas (with --ray)."),
    replica_cpus: float = typer.Option(1.0, help="CPUs each Ray Serve replica reserves (with --ray)."),
    ray_address: Optional[str] = typer.Option(None, help="An existing Ray cluster to join (with --ray); default: a local one."),
) -> None:
    """Serve every task in --tasks over HTTP; concurrent requests share one backbone pass."""
    require("serve", purpose="vptune serve")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port: give a number from 1 to 65535")
    if not max_body_mb > 0:
        raise ValueError(f"--max-body-mb {max_body_mb:g} must be above 0 (the largest request body in MiB, e.g. 8)")
    if ray and replicas < 1:
        raise ValueError(f"--replicas {replicas} must be 1 or more")
    from vptune.serve.security import default_allowed_hosts, read_api_keys
    from vptune.serve.server import ServeConfig

    options = dict(
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_pending=max_pending, max_body_bytes=int(max_body_mb * 2**20),
        max_images=max_images, max_image_pixels=max_image_pixels, header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s, docs=docs,
        allowed_hosts=tuple(h.strip() for h in allowed_hosts.split(",") if h.strip()) if allowed_hosts else default_allowed_hosts(host),
    )
    flags = {"max_body_bytes": "max_body_mb"}
    try:
        config = ServeConfig(**options)
    except ValueError as error:  # name the flag, not the field
        name = str(error).split()[2]
        raise ValueError(f"--{flags.get(name, name).replace('_', '-')}: {error}") from None
    keys = read_api_keys(api_key_file) if api_key_file else None
    if not tasks.is_dir():
        raise FileNotFoundError(f"--tasks {tasks} is not a folder: expected a folder of run folders, one per task")
    if ray:
        require("serve", "ray", purpose="vptune serve --ray")
        from vptune.serve.ray_serve import ReplicaSpec, serve_on_ray

        spec = ReplicaSpec(str(tasks.resolve()), backbone, None if weights is None else str(weights.resolve()), pretrained, device, config, keys, watch, watch_interval_s)
        console.print(f"starting Ray Serve: {replicas} replicas on http://{host}:{port}")
        serve_on_ray(spec, replicas, host, port, replica_cpus=replica_cpus, address=ray_address, on_ready=lambda: console.print("ready"))
        return

    from vptune.backbones import load_backbone
    from vptune.serve.live import open_tasks
    from vptune.serve.server import create_app
    from vptune.serve.server import serve as run_server
    from vptune.train.config import resolve_device

    torch_device = resolve_device(device)  # a GPU this torch cannot use is one red line, before anything loads
    net = load_backbone(backbone, weights=weights, pretrained=pretrained).to(torch_device)
    watcher = open_tasks(net, tasks, interval_s=watch_interval_s, settle_s=watch_interval_s, allow_empty=watch)
    for name, why in sorted(watcher.skipped.items()):
        err_console.print(f"[yellow]skipped[/] {escape(name)}: {escape(why)}", highlight=False, soft_wrap=True)
    model = watcher.model
    if not model.task_names:
        err_console.print(f"[yellow]no task yet[/]: runs saved into {escape(str(tasks))} will be served as they appear", highlight=False)
    listing = Table(title=f"tasks served from {escape(str(tasks))}")
    for column in ("task", "method", "classes"):
        listing.add_column(column)
    for name in model.task_names:
        task = model.task(name)
        listing.add_row(escape(name), task.method_name, str(len(task.labels)))
    console.print(listing)
    access = f"{len(keys.entries)} API keys" if keys else "no API key needed"
    console.print(f"serving on http://{escape(host)}:{port} ({access}; Host: {', '.join(config.allowed_hosts)})")
    run_server(create_app(model, config, watcher=watcher if watch else None, api_keys=keys), host, port)


@app.command("bench-serve")
@user_errors
def bench_serve(
    backbone: str = typer.Option(BUNDLED, help="The bundled architecture or a timm model name (random weights, no download)."),
    batch_size: int = typer.Option(32, help="Images per batch for the throughput comparison."),
    rounds: int = typer.Option(5, help="Interleaved timing rounds after warm-up (medians are reported)."),
    requests: int = typer.Option(500, help="Requests in the load test (127.0.0.1 only)."),
    clients: int = typer.Option(32, help="Concurrent clients in the load test."),
    max_batch: int = typer.Option(32, help="The server's largest batch."),
    max_wait_ms: float = typer.Option(5.0, help="The server's batching wait."),
    deadline_s: float = typer.Option(300.0, help="The load test stops after this many seconds at the latest."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's)."),
    ray: bool = typer.Option(False, "--ray", help="Also load-test the same app on Ray Serve (a local Ray on 127.0.0.1)."),
    replicas: int = typer.Option(2, help="Ray Serve replicas for --ray (one CPU and one torch thread each)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON."),
) -> None:
    """Mixed-task batches vs single-task batches vs one model per task, and an HTTP load test (--ray: also on Ray Serve)."""
    require("serve", purpose="vptune bench-serve")
    import torch

    from vptune.serve.bench import bench_serve as run_bench_serve
    from vptune.serve.bench import report_tables

    if threads:
        torch.set_num_threads(threads)
    result = run_bench_serve(
        backbone, batch_size=batch_size, rounds=rounds, requests=requests, clients=clients, max_batch=max_batch,
        max_wait_ms=max_wait_ms, device=device, deadline_s=deadline_s, ray=ray, replicas=replicas,
    )
    for table in report_tables(result):
        console.print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_path}")


# --- prune: E2VPT prompt pruning and rewinding -----------------------------------------------


@app.command()
@user_errors
def prune(
    run: Path = typer.Option(..., help="A trained e2vpt or vpt-deep run folder."),
    data: str = typer.Option(..., help="The data SPEC the run was trained on (scores, search and rewinding use it)."),
    out: Path = typer.Option(..., help="Folder for the pruned, rewound compact run and prune.json."),
    token_rate: Optional[float] = typer.Option(None, help="Fraction of prompt tokens to prune, in [0, 1); default: searched."),
    segment_rate: Optional[float] = typer.Option(None, help="Fraction of each kept token's segments to prune, in [0, 1); default: searched."),
    segments: int = typer.Option(16, help="Segments per prompt token (R)."),
    score: str = typer.Option("abs", help="abs: mean |dL/d mask| (the paper); signed: mean dL/d mask (the official code)."),
    rewind: str = typer.Option("original", help="original: retrain from the run's initial values (the paper); fresh: from a new initialisation (the official code)."),
    search: str = typer.Option("cascade", help="cascade: token rate then segment rate, short retraining per candidate; grid: every pair, full retraining (official)."),
    mask_mode: str = typer.Option("log", help="log: a pruned token is removed exactly; zero: kept as a zero vector (the official code)."),
    segment_layout: str = typer.Option("contiguous", help="contiguous (the paper) or interleaved: dimension j in segment j mod R (the official code)."),
    epochs: Optional[int] = typer.Option(None, help="Rewinding (and grid) epochs; default: the run's own."),
    search_epochs: int = typer.Option(1, help="Cascade: epochs of the short retraining per candidate."),
    tolerance: float = typer.Option(1.0, help="Cascade: val top-1 points a candidate may lose against the unpruned run."),
    batch_size: Optional[int] = typer.Option(None, help="Default: the run's own."),
    backbone: Optional[str] = typer.Option(None, help="Default: the backbone the run recorded."),
    weights: Optional[Path] = typer.Option(None, help="Local backbone weights, if not the recorded ones."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, help="Show the rewinding's progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write over whatever --out holds (a run, or other files)."),
) -> None:
    """Prune the visual prompts of an E2VPT (or VPT-deep) run, rewind, and export a compact run."""
    from vptune.pruning import PRUNE_FILE, PruneOptions, prune_run

    options = PruneOptions(
        token_rate=token_rate, segment_rate=segment_rate, segments=segments, score=score, rewind=rewind, search=search,
        mask_mode=mask_mode, segment_layout=segment_layout, epochs=epochs, search_epochs=search_epochs,
        tolerance=tolerance, batch_size=batch_size, device=device,
    )
    report = prune_run(run, data, out, options, backbone=backbone, weights=weights, progress=progress, log=console.print,
                       overwrite=overwrite)
    table = Table(title=f"{report['method']}: token rate {report['token_rate']:.3g}, segment rate "
                  f"{report['segment_rate']:.3g}, rewound from {rewind} values; GFLOPs per image")
    for column in ("stage", "prompts", "tuned", "GFLOPs", "extra", "val top-1", "test top-1"):
        table.add_column(column, justify="left" if column == "stage" else "right")

    def top1(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}%"

    for stage in ("before", "pruned", "rewound"):
        row = report[stage]
        table.add_row(stage, str(row["num_prompts"]), f"{row['tuned_parameters']:,}", f"{row['gflops']:.4f}",
                      f"{row['extra_gflops']:.4f}", top1(row["val_top1"]), top1(row["test_top1"]))
    console.print(table)
    console.print(f"training epochs spent: {report['training_epochs']} (search: {report['search']['epochs']}); "
                  f"masked vs compact logits max |diff| {report['masked_vs_compact_max_abs_diff']:.2e}")
    console.print(f"wrote {out} and {out / PRUNE_FILE}")


# --- demo and benchmark: every method on the embedded mini-benchmark -----------------------


def comma_list(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def invocation() -> str:
    import sys

    return " ".join(["vptune", *sys.argv[1:]])


def tracking_settings(tracker: str, tracking_uri: Optional[str], out: Path) -> dict[str, Any]:
    """The recipes' tracker settings: every run of a comparison logs into one store under ``out``."""
    from vptune.tracking import shared_store

    if tracker == "none" and tracking_uri is None:
        return {}
    return {"tracker": tracker, "tracking_uri": shared_store(tracker, tracking_uri, out)}


def run_line(row: dict[str, Any], done: int, total: int) -> str:
    if row["error"]:
        return f"[{done}/{total}] {row['task']} {row['method']}: [red]diverged[/] ({safe(row['error'][:80])})"
    val = "" if row["val_top1"] is None else f" (val {row['val_top1']:.2f}%)"
    return f"[{done}/{total}] {row['task']} {row['method']}: test top-1 {row['test_top1']:.2f}%{val}, {row['wall_time_s']:.0f} s"


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Folder for the runs, report.md and the PNG plots; rerun to resume."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated mini tasks or data specs (default: digits,count)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: linear,full,vpt-shallow,vpt-deep,e2vpt,apt,lora)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs for every method instead of each recipe's own."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights instead of the bundled backbone's shipped ones."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's; use 1 on a machine busy with other jobs)."),
    tracker: str = typer.Option("none", help="Every run also logs to: none, tensorboard (RUN/tensorboard) or mlflow."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: one SQLite store, OUT/mlflow.db)."),
) -> None:
    """Train linear, full, VPT-shallow/deep, E2VPT, APT and LoRA on two mini tasks; write a report with plots."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    from vptune.backbones import BUNDLED_BACKBONE
    from vptune.compare import DEMO_METHODS, DEMO_TASKS, compare, recipes_for
    from vptune.report import rich_table, write_demo_report

    task_list = comma_list(tasks) or list(DEMO_TASKS)
    settings = {**({} if epochs is None else {"epochs": epochs}), **tracking_settings(tracker, tracking_uri, out)}
    recipes = recipes_for(comma_list(methods) or DEMO_METHODS, **settings)
    total, done, started = len(task_list) * len(recipes), [], time.perf_counter()
    with console.status(f"training 1/{total} ...") as status:
        def on_run(row: dict[str, Any]) -> None:
            done.append(row)
            console.print(run_line(row, len(done), total), highlight=False)
            status.update(f"training {len(done) + 1}/{total} ...")

        rows = compare(task_list, recipes, out, weights=weights, on_run=on_run)
    wall = time.perf_counter() - started
    Console(width=max(console.width, 120)).print(rich_table(rows, f"{BUNDLED_BACKBONE}: {wall / 60:.1f} min"))
    report = write_demo_report(rows, recipes, out, command=invocation(), backbone=BUNDLED_BACKBONE, wall_time_s=wall)
    console.print(f"report: {report} (plots next to it)")


benchmark_app = typer.Typer(help="Benchmarks: every method on every task of a suite.", no_args_is_help=True)
app.add_typer(benchmark_app, name="benchmark")


@benchmark_app.command("mini")
@user_errors
def benchmark_mini(
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: all ten)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated mini tasks (default: all six)."),
    lrs: str = typer.Option("0.3,1,3", help="Learning-rate factors: each method's recipe lr times each is tried on val."),
    epochs: Optional[int] = typer.Option(None, help="Epochs for every run instead of each recipe's own."),
    out: Optional[Path] = typer.Option(None, help="Folder for the runs (default: benchmark-mini, or benchmark-mini-BACKBONE); rerun the same command to resume."),
    results: Path = typer.Option(Path("docs/results-mini.md"), help="Markdown file whose benchmark section is (re)written."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights instead of the bundled backbone's shipped ones."),
    backbone: str = typer.Option(BUNDLED, help="Backbone SPEC (vptune_swin_fmnist: the bundled Swin); its section of the results file is its own."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's; use 1 on a machine busy with other jobs)."),
    tracker: str = typer.Option("none", help="Every run also logs to: none, tensorboard (RUN/tensorboard) or mlflow."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: one SQLite store, OUT/mlflow.db)."),
) -> None:
    """Every mini task x every method: lr chosen on val200, retrained on train+val, test top-1 (resumable)."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    from vptune.backbones import BUNDLED_BACKBONE
    from vptune.compare import BENCHMARK_METHODS, benchmark, recipes_for
    from vptune.data import MINI_TASKS
    from vptune.report import results_mini_block, rich_table, write_results_mini, write_rows_json

    task_list = comma_list(tasks) or list(MINI_TASKS)
    out = out or Path("benchmark-mini" if backbone == BUNDLED_BACKBONE else f"benchmark-mini-{backbone}")
    factors = parse_grid(lrs, float, "--lrs")
    settings = {"eval_every": 0, **({} if epochs is None else {"epochs": epochs})}  # val only at the end
    settings.update(tracking_settings(tracker, tracking_uri, out))
    recipes = recipes_for(comma_list(methods) or BENCHMARK_METHODS, **settings)
    total, done, started = len(task_list) * len(recipes), [], time.perf_counter()

    def write(rows: list[dict[str, Any]]) -> None:
        block = results_mini_block(rows, recipes, command=invocation(), lr_factors=factors, backbone=backbone,
                                   wall_time_s=time.perf_counter() - started, complete=len(rows) == total)
        write_results_mini(results, block)
        write_rows_json(rows, rows_path)  # what the block's figures were read from

    rows_path = rows_json_path(results, backbone, BUNDLED_BACKBONE)  # the bundled Swin's rows must not overwrite the ViT's

    def on_run(row: dict[str, Any]) -> None:
        done.append(row)
        console.print(run_line(row, len(done), total) + f" (lr {row['lr']:g})", highlight=False)
        write(done)

    rows = benchmark(task_list, recipes, out, lr_factors=factors, weights=weights, on_run=on_run, backbone=backbone)
    Console(width=max(console.width, 120)).print(rich_table(rows, f"mini-benchmark, {backbone}"))
    console.print(f"results: {results} and {rows_path}")


def rows_json_path(results: Path, backbone: str, bundled: str) -> Path:
    """The JSON of a backbone's benchmark rows: ``RESULTS.json`` for the bundled backbone, else
    ``RESULTS-BACKBONE.json`` (its name made file-safe), so no backbone's rows overwrite another's."""
    import re

    if backbone == bundled:
        return results.with_suffix(".json")
    return results.with_name(f"{results.stem}-{re.sub(r'[^A-Za-z0-9_.-]', '_', backbone)}.json")


@benchmark_app.command("minivl")
@user_errors
def benchmark_minivl(
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: linear,full,lora,vpt-shallow,vpt-deep,e2vpt,apt)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated minivl tasks (default: vqa,nlvr,retrieval)."),
    lrs: str = typer.Option("0.3,1,3", help="Learning-rate factors: each method's recipe lr times each is tried on val."),
    epochs: Optional[int] = typer.Option(None, help="Epochs for every run instead of each recipe's own (7)."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per step for every run instead of the recipes' 32."),
    train: Optional[int] = typer.Option(None, help="Train on the first N training examples of each task (default: all 2000)."),
    val: Optional[int] = typer.Option(None, help="Score the first N val examples (default: all 500)."),
    test: Optional[int] = typer.Option(None, help="Score the first N test examples (default: all 1000)."),
    retrieval_val: Optional[int] = typer.Option(None, help="Retrieval: N val captions x N images (scoring is N^2 pairs; default: --val)."),
    retrieval_test: Optional[int] = typer.Option(None, help="Retrieval: N test captions x N images (default: --test)."),
    negatives: Optional[int] = typer.Option(None, help="Retrieval training: other images per caption (default 15)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the runs (default: benchmark-minivl-BACKBONE); rerun the same command to resume."),
    results: Path = typer.Option(Path("docs/results-minivl.md"), help="Markdown file whose section for --backbone is (re)written (rows beside it as .json)."),
    backbone: str = typer.Option("vptune_vilt_fmnist", help="A vision-language backbone SPEC (default: the bundled ViLT); its section of the results file is its own."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights instead of the backbone's own."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's; use 1 on a machine busy with other jobs)."),
    tracker: str = typer.Option("none", help="Every run also logs to: none, tensorboard (RUN/tensorboard) or mlflow."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: one SQLite store, OUT/mlflow.db)."),
) -> None:
    """Every minivl task (VQA, NLVR, retrieval) x every method: lr chosen on val, retrained on train+val, test figures (resumable)."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    from vptune.compare import VL_METHODS, VL_RECIPES, VL_TASKS, benchmark, recipes_for
    from vptune.report import results_minivl_block, write_results_minivl, write_rows_json

    def spec(task: str) -> str:
        if task not in VL_TASKS:
            raise ValueError(f"unknown minivl task {task!r}; expected some of: {', '.join(VL_TASKS)}")
        sizes = {"train": train, "val": retrieval_val or val if task == "retrieval" else val,
                 "test": retrieval_test or test if task == "retrieval" else test,
                 "negatives": negatives if task == "retrieval" else None}
        query = "&".join(f"{key}={value}" for key, value in sizes.items() if value is not None)
        return f"minivl:{task}" + (f"?{query}" if query else "")

    specs = [spec(task) for task in comma_list(tasks) or VL_TASKS]
    out = out or Path(f"benchmark-minivl-{backbone}")
    factors = parse_grid(lrs, float, "--lrs")
    settings = {"eval_every": 0, **({} if epochs is None else {"epochs": epochs})}  # val only at the end
    settings.update({} if batch_size is None else {"batch_size": batch_size})
    settings.update(tracking_settings(tracker, tracking_uri, out))
    recipes = recipes_for(comma_list(methods) or VL_METHODS, VL_RECIPES, **settings)
    total, done, started = len(specs) * len(recipes), [], time.perf_counter()

    def write(rows: list[dict[str, Any]]) -> None:
        block = results_minivl_block(rows, recipes, command=invocation(), lr_factors=factors, backbone=backbone, specs=specs,
                                     wall_time_s=time.perf_counter() - started, complete=len(rows) == total)
        write_results_minivl(results, block, bundled="vptune_vilt_fmnist")
        write_rows_json(rows, rows_path)  # what the block's figures were read from

    # each backbone's rows in their own file (another backbone's run must not overwrite the bundled ViLT's)
    rows_path = rows_json_path(results, backbone, "vptune_vilt_fmnist")

    def on_run(row: dict[str, Any]) -> None:
        done.append(row)
        figures = ", ".join(f"{k} {row[k]:.2f}" for k in ("test_vqa_score", "test_ir_r1", "test_tr_r1") if row.get(k) is not None)
        shown = "[red]diverged[/]" if row["error"] else figures or f"test_top1 {row['test_top1']:.2f}"
        console.print(f"[{len(done)}/{total}] {row['task']} {row['method']}: {shown} (lr {row['lr']:g})", highlight=False)
        write(done)

    benchmark(specs, recipes, out, lr_factors=factors, weights=weights, on_run=on_run, backbone=backbone)
    console.print(f"results: {results} and {rows_path}")


# --- data: build the VTAB-1k and FGVC folders ------------------------------------------------

data_app = typer.Typer(help="Build benchmark datasets in the layouts vptune reads.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def rich_progress():
    """A rich progress display and a ``Progress`` callback for the builders: one bar per task."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=err_console, transient=False)

    def bar(description: str, total: int) -> Callable[[], None]:
        task = display.add_task(description, total=total)
        return lambda: display.advance(task)

    return display, bar


def print_data_report(report: Any, title: str) -> None:
    table = Table(title=title)
    for column in ("task", "status", "train", "val", "test"):
        table.add_column(column)
    for name, status in report.status.items():
        counts = report.counts.get(name, {})
        train = counts.get("train800", counts.get("train"))
        val = counts.get("val200", counts.get("val"))
        colour = {"built": "green", "verified": "green", "missing": "yellow", "failed": "red"}[status]
        table.add_row(name, f"[{colour}]{status}[/]", *("-" if v is None else str(v) for v in (train, val, counts.get("test"))))
    console.print(table)
    for name, problems in report.problems.items():
        for problem in problems:
            err_console.print(f"[bold red]{escape(name)}:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    console.print(f"manifest: {report.root / 'vptune-data.json'}")
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("vtab1k")
@user_errors
def data_vtab1k(
    out: Path = typer.Option(..., help="VTAB-1k root: one folder per task (vtab1k:ROOT/TASK). Rerun to verify or resume."),
    source: Optional[str] = typer.Option(None, help="A VTAB-1k list-file tree you downloaded: folder, .zip or .tar(.gz); or tfds:DATA_DIR, the TensorFlow Datasets you prepared for the official VTAB code (needs vptune[tfds]). Default: the Hugging Face hub copy."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task folders (default: all 19)."),
    hub_repo: str = typer.Option("XiN0919/VTAB-1k", help="Hub dataset holding vtab-1k.zip (without --source)."),
) -> None:
    """Build the 19 VTAB-1k tasks (train800, val200, train800val200, test lists and images), verified."""
    from vptune.data.prepare import build_vtab1k

    display, bar = rich_progress()
    with display:
        report = build_vtab1k(out, source, tasks=comma_list(tasks), hub_repo=hub_repo, progress=bar)
    print_data_report(report, f"VTAB-1k in {out}")


@data_app.command("fgvc")
@user_errors
def data_fgvc(
    out: Path = typer.Option(..., help="FGVC root: one folder per dataset (fgvc:ROOT/NAME). Rerun to verify or resume."),
    source: list[str] = typer.Option([], help="A folder holding the datasets (folders or archives named after them), or NAME=PATH; repeatable. Default: the hub copies."),
    datasets: Optional[str] = typer.Option(None, help="Comma-separated datasets: cub, nabirds, flowers, dogs, cars (default: all)."),
) -> None:
    """Build the five FGVC datasets (train/val/test JSON split files and images), verified."""
    from vptune.data.prepare import build_fgvc

    named = {k: Path(v) for k, _, v in (s.partition("=") for s in source if "=" in s)}
    folders = [Path(s) for s in source if "=" not in s]
    if len(folders) > 1:
        raise ValueError("give one --source folder (and any number of NAME=PATH)")
    display, bar = rich_progress()
    with display:
        report = build_fgvc(out, folders[0] if folders else None, datasets=comma_list(datasets), sources=named or None,
                            progress=bar)
    print_data_report(report, f"FGVC in {out}")


def benchmark_suite(suite: str, root: Path, methods: str, out: Path, tasks: Optional[str], recipe: str, quick: bool,
                    backbone: str, weights: Optional[Path], pretrained: bool, epochs: Optional[int],
                    batch_size: Optional[int], lr_grid: Optional[str], wd_grid: Optional[str], seeds: Optional[str],
                    precision: str, num_workers: int, scheduler: Optional[str], address: Optional[str],
                    num_cpus: Optional[int], cpus_per_trial: float, gpus_per_trial: Optional[float]) -> None:
    """The shared body of ``benchmark vtab1k`` and ``benchmark fgvc``."""
    require("sweep", purpose=f"vptune benchmark {suite}")
    from vptune.sweep import SweepInterrupted
    from vptune.sweep.suite import BENCHMARK_MD, DEFAULT_SCHEDULER, PLOT, BenchmarkConfig, run_benchmark

    config = BenchmarkConfig(
        suite=suite, root=root, methods=comma_list(methods) or [], out=out, tasks=comma_list(tasks), recipe=recipe,
        quick=quick, backbone=backbone, weights=None if weights is None else str(weights.absolute()),
        pretrained=pretrained, epochs=epochs, batch_size=batch_size,
        lr_grid=parse_grid(lr_grid, float, "--lr-grid") if lr_grid else None,
        wd_grid=parse_grid(wd_grid, float, "--wd-grid") if wd_grid else None,
        seeds=parse_grid(seeds, int, "--seeds") if seeds else None, precision=precision, num_workers=num_workers,
        scheduler=scheduler or DEFAULT_SCHEDULER, address=address, num_cpus=num_cpus, cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
    )
    try:
        result = run_benchmark(config, console=console)
    except (KeyboardInterrupt, SweepInterrupted) as err:
        message = str(err) or "the benchmark was interrupted; run the same command again to resume it"
        err_console.print(f"[bold red]interrupted:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    table = Table(title=f"{suite}: test top-1 % (chosen on val, mean over seeds)")
    table.add_column("method")
    for task in result["tasks"]:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for name, m in result["methods"].items():
        cells = ["-" if m["tasks"][t]["test_top1"] is None else f"{m['tasks'][t]['test_top1']:.2f}" for t in result["tasks"]]
        table.add_row(name, *cells, "-" if m["mean"] is None else f"{m['mean']:.2f}")
    Console(width=max(console.width, 160)).print(table)
    console.print(f"table with the published numbers: {out / BENCHMARK_MD}; plot: {out / PLOT}")


def _benchmark_command(suite: str, help_text: str) -> None:
    @benchmark_app.command(suite, help=help_text)
    @user_errors
    def command(
        root: Path = typer.Option(..., help=f"The {suite} root built by `vptune data {suite}` (one folder per task)."),
        methods: str = typer.Option(..., help="Comma-separated methods, e.g. vpt-deep,e2vpt,linear."),
        out: Path = typer.Option(Path(f"benchmark-{suite}"), help="Folder for every run, benchmark.md/json and the plot; rerun to resume."),
        tasks: Optional[str] = typer.Option(None, help="Comma-separated task folders (default: every one under --root)."),
        recipe: str = typer.Option("default", help="default (the protocol's grid and schedule) or official (the official repositories' per-dataset settings)."),
        quick: bool = typer.Option(False, "--quick", help="A first look: 10 epochs, a 3 x 2 grid, one seed."),
        backbone: str = typer.Option("vit_base_patch16_224.orig_in21k", help="timm model name (default: the papers' ViT-B/16 on ImageNet-21k) or the bundled backbone's name."),
        weights: Optional[Path] = typer.Option(None, help="Local backbone weights (.safetensors, .pth, .npz)."),
        pretrained: bool = typer.Option(False, "--pretrained", help="Use timm's hub weights (needs internet)."),
        epochs: Optional[int] = typer.Option(None, help="Epochs of every run (default: the recipe's)."),
        batch_size: Optional[int] = typer.Option(None, help="Images per step (default: the recipe's)."),
        lr_grid: Optional[str] = typer.Option(None, help="Base learning rates (default: the recipe's)."),
        wd_grid: Optional[str] = typer.Option(None, help="Weight decays (default: the recipe's)."),
        seeds: Optional[str] = typer.Option(None, help="Seeds of the final runs (default: the recipe's)."),
        precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast)."),
        num_workers: int = typer.Option(0, help="DataLoader worker processes per trial."),
        scheduler: Optional[str] = typer.Option(None, help="none (every grid point to the end) or asha."),
        address: Optional[str] = typer.Option(None, help="Ray cluster to run on (auto or ray://HOST:PORT); default: a local Ray."),
        num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray (default: all)."),
        cpus_per_trial: float = typer.Option(1.0, help="CPUs each trial reserves (and its torch threads)."),
        gpus_per_trial: Optional[float] = typer.Option(None, help="GPUs each trial reserves (default: 1 where CUDA is present)."),
    ) -> None:
        benchmark_suite(suite, root, methods, out, tasks, recipe, quick, backbone, weights, pretrained, epochs,
                        batch_size, lr_grid, wd_grid, seeds, precision, num_workers, scheduler, address, num_cpus,
                        cpus_per_trial, gpus_per_trial)


_benchmark_command("vtab1k", "The papers' protocol on every VTAB-1k task x method as one Ray Tune job; the table with the published numbers.")
_benchmark_command("fgvc", "The papers' protocol on every FGVC dataset x method as one Ray Tune job; the table with the published numbers.")
