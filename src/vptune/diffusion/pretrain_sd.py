"""Pretrain the bundled text-to-image model ``vptune_sd_fmnist`` (``vptune pretrain --arch sd``): a
pixel-space ``UNet2DConditionModel`` on 32x32 grey captioned canvases, cross-attending to the frozen
bundled CLIP's per-token text states, trained with the DDPM noise-prediction loss.

Canvases are drawn fresh every step from the pretraining pool (``vptune.data.scenes``: Fashion-MNIST's
train split 0-54,999, never the benchmark pools), each with its canonical caption or a random truthful
paraphrase (``vptune.data.texts.caption``); a share of captions is dropped to the empty prompt so that
classifier-free guidance works. The step loop and its checkpoints are the ones the bundled CLIP and ViLT use
(``backbones.pretrain.train_steps``): rerunning the same command resumes. An exponential moving
average of the UNet is what is shipped. At the end the sample grid, the loss
curve and a measured check of the samples (``check_samples``) go into ``SD_MODEL_CARD.md``, and the
figures into ``docs/sd-fmnist-figures.json`` (``backbones.figures``); ``remeasure_sd`` measures
them again on the shipped weights (``vptune pretrain --arch sd --evaluate-only``).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..backbones.figures import evaluate_command, figures_path, training_record, weights_figures, write_figures
from ..data.cache import cache_root
from ..report import machine, now
from .backbone import BUNDLED_SCHEDULER, BUNDLED_SD, BUNDLED_UNET, DiffusionBackbone, denoising_loss

CARD = "SD_MODEL_CARD.md"
SAMPLES_PNG, LOSS_PNG = "sd-fmnist-samples.png", "sd-fmnist-loss.png"
GRID_CAPTIONS = (
    "a large bag at the center",
    "a large trouser at the center upright",
    "a small sneaker at the top-left",
    "a medium dress at the bottom",
    "2 items: a small bag at the left and a small ankle boot at the right",
    "4 items: a tiny t-shirt at the top-left, a tiny sandal at the top-right, a tiny bag at the bottom-left "
    "and a tiny trouser at the bottom-right",
    "a photo of sks bag",
)


def canvas_batch(rng: np.random.Generator, size: int, side: int = 32, *, canonical_share: float = 0.3,
                 caption_dropout: float = 0.1, pool: str = "pretrain") -> tuple[Tensor, list[str]]:
    """``size`` canvases (size, 1, side, side) in [0, 1] from ``pool`` with their captions: canonical
    with probability ``canonical_share``, else a paraphrase; the empty prompt with ``caption_dropout``."""
    from ..data.scenes import render, sample_scene
    from ..data.texts import caption

    scenes = [sample_scene(rng) for _ in range(size)]
    canvases, _ = render(scenes, pool, rng, size=side)
    captions = []
    for scene in scenes:
        text = caption(scene) if rng.random() < canonical_share else caption(scene, rng)
        captions.append("" if rng.random() < caption_dropout else text)
    return torch.from_numpy(canvases).float().div(255)[:, None], captions


def pretrain_unet(
    backbone: DiffusionBackbone, *, checkpoint_path: Path, steps: int = 1000, batch_size: int = 32, lr: float = 1e-3,
    weight_decay: float = 0.05, warmup_steps: int = 50, canonical_share: float = 0.3, caption_dropout: float = 0.1,
    ema_decay: float = 0.995, seed: int = 0, threads: int = 1, checkpoint_every: int = 50, log_every: int = 20,
) -> tuple[nn.Module, dict]:
    """Train ``backbone.unet`` in place (its text encoder stays frozen); returns the EMA UNet (frozen)
    and the run's record (recipe, first step of this run, wall time, loss history)."""
    from ..backbones.pretrain import train_steps

    torch.set_num_threads(threads)
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                  canonical_share=canonical_share, caption_dropout=caption_dropout, ema_decay=ema_decay, seed=seed,
                  unet=backbone.describe()["unet"])
    unet = backbone.unet.requires_grad_(True)
    backbone.text_encoder.requires_grad_(False).eval()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    groups = [{"params": [p for p in unet.parameters() if p.ndim > 1], "weight_decay": weight_decay, "peak": lr},
              {"params": [p for p in unet.parameters() if p.ndim <= 1], "weight_decay": 0.0, "peak": lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))

    def step_loss(step: int) -> tuple[Tensor, dict[str, float]]:
        rng = np.random.default_rng([seed, step])  # the batch and the noise of a step are the same on resume
        images, captions = canvas_batch(rng, batch_size, backbone.image_size, canonical_share=canonical_share,
                                        caption_dropout=caption_dropout)
        with torch.no_grad():
            states = backbone.encode_prompt(captions)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return denoising_loss(backbone, backbone.to_latents(images), states, unet=unet, generator=generator), {}

    @torch.no_grad()
    def update_ema() -> None:
        for average, current in zip(ema.parameters(), unet.parameters()):
            average.lerp_(current, 1 - ema_decay)

    print(f"pretraining {BUNDLED_SD}: {recipe}, {threads} threads", flush=True)
    history: list[list[float]] = []
    start, elapsed = train_steps(
        unet, optimizer, step_loss, steps=steps, warmup_steps=warmup_steps, recipe=recipe, checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every, log_every=log_every, batch_size=batch_size, after_step=update_ema,
        extra={"ema": ema}, history=history)
    unet.requires_grad_(False).eval()
    return ema, {"recipe": recipe, "start": start, "elapsed": elapsed, "history": history}


# ---- what the samples show ------------------------------------------------------------------

def _single(kind: int, place: str, size: str) -> "object":
    from ..data.scenes import Item, Scene

    return Scene("single", (Item(kind, place, size, 0),))


@torch.no_grad()
def check_samples(backbone: DiffusionBackbone, *, steps: int = 50, guidance: float = 3.0, seed: int = 0,
                  sampler: str = "ddpm", per_class: int = 4) -> dict[str, dict[str, float]]:
    """Whether generated canvases show what their captions say, measured against the same scenes
    drawn for real (Fashion-MNIST's pretrain-val pool) and chance:

    - place: "a small KIND at the PLACE upright" for the 9 places; the bundled CLIP's zero-shot
      location classifier (``class_texts("location")``);
    - count: canonical captions of random 1-4 item scenes; the bundled CLIP's zero-shot count;
    - kind: "a large KIND at the center upright" for the 10 kinds; a logistic regression on the pixels
      of 2,000 real such canvases (the bundled CLIP tells kinds apart poorly: 18% zero-shot).

    Accuracies in %, and how many distinct classes were predicted for the generated canvases;
    ``per_class`` generated canvases per class. "bright area": the % of pixels above 64 in the
    small-item (place) and large-item (kind) canvases, generated and real: whether size comes through."""
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression

    from ..backbones.clip_bundled import load_bundled_clip
    from ..backbones.pretrain_clip import to_input
    from ..data.scenes import PLACES, render, sample_scene
    from ..data.texts import KINDS, caption, class_texts
    from .sample import generate

    clip = load_bundled_clip()
    rng = np.random.default_rng(seed)
    side = backbone.image_size

    def made(prompts: list[str]) -> np.ndarray:
        images = generate(backbone, prompts, steps=steps, guidance=guidance, seed=seed, sampler=sampler, batch_size=32)
        return (images[:, 0] * 255).round().to(torch.uint8).numpy()

    def zero_shot(canvases: np.ndarray, task: str) -> np.ndarray:
        text = F.normalize(clip.encode_text(clip.tokenizer(class_texts(task))), dim=-1)
        image = F.normalize(clip.encode_image(to_input(canvases)), dim=-1)
        return (image @ text.T).argmax(-1).numpy()

    def bright(canvases: np.ndarray) -> float:
        return 100 * float((canvases > 64).mean())  # % of pixels: how much of the canvas the items cover

    def score(predicted: np.ndarray, truth: np.ndarray, reference: np.ndarray, chance: float) -> dict[str, float]:
        return {"generated": 100 * float((predicted == truth).mean()), "real": 100 * float((reference == truth).mean()),
                "chance": chance, "distinct": float(len(np.unique(predicted)))}

    results: dict[str, dict[str, float]] = {}
    # place (and the bright area of small items)
    labels = np.repeat(np.arange(len(PLACES)), per_class)
    kinds = rng.integers(len(KINDS), size=len(labels))
    scenes = [_single(int(k), PLACES[p], "small") for k, p in zip(kinds, labels)]
    prompts = [f"a small {KINDS[k]} at the {PLACES[p]} upright" for k, p in zip(kinds, labels)]
    real, _ = render(scenes, "pretrain-val", rng, size=side)
    small = made(prompts)
    results["place"] = score(zero_shot(small, "location"), labels, zero_shot(real, "location"), 100 / len(PLACES))
    area = {"small item, generated": bright(small), "small item, real": bright(real)}
    # count
    labels = np.repeat(np.arange(4), per_class * 2)
    scenes = [sample_scene(rng, num_items=int(n) + 1) for n in labels]
    real, _ = render(scenes, "pretrain-val", rng, size=side)
    results["count"] = score(zero_shot(made([caption(s) for s in scenes]), "count"), labels, zero_shot(real, "count"), 25.0)
    # kind
    train_kinds = np.arange(2000) % len(KINDS)
    train, _ = render([_single(int(k), "center", "large") for k in train_kinds], "pretrain-val", rng, size=side)
    probe = LogisticRegression(max_iter=300, C=0.01).fit(train.reshape(len(train), -1) / 255, train_kinds)
    labels = np.repeat(np.arange(len(KINDS)), per_class)
    real, _ = render([_single(int(k), "center", "large") for k in labels], "pretrain-val", rng, size=side)
    generated = made([f"a large {KINDS[k]} at the center upright" for k in labels])
    results["kind"] = score(probe.predict(generated.reshape(len(labels), -1) / 255), labels,
                            probe.predict(real.reshape(len(labels), -1) / 255), 100 / len(KINDS))
    area.update({"large item, generated": bright(generated), "large item, real": bright(real)})
    results["bright area"] = area
    return results


@torch.no_grad()
def conditioning_loss(backbone: DiffusionBackbone, *, count: int = 256, seed: int = 0) -> dict[str, float]:
    """Whether the UNet reads the text: its denoising loss on ``count`` canvases of the pretrain-val
    pool at the same noise and timesteps, given their own canonical captions, other canvases'
    captions (a shuffle) and the empty prompt. A model that ignores the text scores the same on all three."""
    from ..data.scenes import render, sample_scene
    from ..data.texts import caption

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    canvases, _ = render(scenes, "pretrain-val", rng, size=backbone.image_size)
    latents = backbone.to_latents(torch.from_numpy(canvases).float().div(255)[:, None])
    captions = [caption(scene) for scene in scenes]
    shuffled = [captions[i] for i in np.roll(np.arange(count), 1)]
    losses = {}
    for name, texts in (("own caption", captions), ("another canvas's caption", shuffled), ("empty prompt", [""] * count)):
        total = 0.0
        for start in range(0, count, 64):
            states = backbone.encode_prompt(texts[start:start + 64])
            generator = torch.Generator().manual_seed(seed + start)
            total += denoising_loss(backbone, latents[start:start + 64], states, generator=generator).item() * len(states)
        losses[name] = total / count
    return losses


# ---- the whole run: weights, figures, card ---------------------------------------------------

def pretrain_sd(out: Path, *, docs: Path | None = None, steps: int = 1000, batch_size: int = 32, lr: float = 1e-3,
                weight_decay: float = 0.05, warmup_steps: int = 50, canonical_share: float = 0.3,
                caption_dropout: float = 0.1, ema_decay: float = 0.995, seed: int = 0, threads: int = 1,
                work_dir: Path | None = None, sample_steps: int = 50, sampler: str = "ddpm", guidance: float = 3.0) -> dict:
    """Train the bundled text-to-image model; write ``out/vptune_sd_fmnist.safetensors`` (the EMA
    UNet) and ``out/SD_MODEL_CARD.md``, and the sample grid and loss curve PNGs in ``docs`` (default:
    ``out``). The figures are measured on the shipped weights, loaded back from the file."""
    from safetensors.torch import save_file

    from .backbone import build_bundled_sd, load_bundled_sd

    cpu_start = time.process_time()
    out, docs = Path(out), Path(docs or out)
    work_dir = Path(work_dir or cache_root() / "pretrain")
    for folder in (out, docs, work_dir):
        folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    backbone = build_bundled_sd()
    ema, record = pretrain_unet(
        backbone, checkpoint_path=work_dir / f"{BUNDLED_SD}-checkpoint.pt", steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, canonical_share=canonical_share,
        caption_dropout=caption_dropout, ema_decay=ema_decay, seed=seed, threads=threads)

    weights_path = out / f"{BUNDLED_SD}.safetensors"
    state = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(weights_path), metadata={"architecture": BUNDLED_SD, "unet": json.dumps(BUNDLED_UNET),
                                                  "scheduler": json.dumps(BUNDLED_SCHEDULER)})
    evaluation = evaluate_sd(load_bundled_sd(weights_path), weights_path, docs, sample_steps=sample_steps,
                             sampler=sampler, guidance=guidance, seed=seed)
    plot_loss(record["history"], docs / LOSS_PNG)

    command = (f"vptune pretrain --arch sd --out {out} --docs {docs} --steps {steps} --batch-size {batch_size} --lr {lr} "
               f"--weight-decay {weight_decay} --warmup-steps {warmup_steps} --seed {seed} --threads {threads}")
    training = {**training_record(command, record["recipe"], record["start"], record["elapsed"], record["history"], unit="canvases"),
                "cpu_min_this_process": (time.process_time() - cpu_start) / 60,
                "final_loss": record["history"][-1][1] if record["history"] else None}
    write_figures(docs, "sd", BUNDLED_SD, evaluation, evaluate_command("sd", out, docs), training)
    figures = {**evaluation, **{k: v for k, v in training.items() if k not in ("command", "recipe", "history")}}
    (out / CARD).write_text(model_card(record["recipe"], figures, command, sample_steps, sampler, guidance,
                                       evaluate_command("sd", out, docs), figures_path(docs, "sd")))
    print(f"wrote {weights_path} ({figures['weights_mb']:.1f} MB), {out / CARD}, {docs / SAMPLES_PNG}, {docs / LOSS_PNG}, "
          f"{figures_path(docs, 'sd')}", flush=True)
    return figures


def evaluate_sd(shipped: DiffusionBackbone, weights_path: Path, docs: Path, *, sample_steps: int = 50, sampler: str = "ddpm",
                guidance: float = 3.0, seed: int = 0) -> dict:
    """The model card's evaluation figures of ``shipped`` (loaded from ``weights_path``): the sample
    grid (written to ``docs``), ``check_samples``, ``conditioning_loss``, parameters and file size."""
    from .sample import generate, save_grid

    sample_start = time.perf_counter()
    images = generate(shipped, list(GRID_CAPTIONS), num_images=8, steps=sample_steps, guidance=guidance, seed=seed,
                      sampler=sampler)
    save_grid(images, docs / SAMPLES_PNG, columns=8, scale=3, labels=list(GRID_CAPTIONS))
    sample_s = (time.perf_counter() - sample_start) / len(images)
    return {**weights_figures(weights_path), "sample_s_per_image": sample_s,
            "checks": check_samples(shipped, steps=sample_steps, guidance=guidance, seed=seed, sampler=sampler),
            "conditioning_loss": conditioning_loss(shipped, seed=seed)}


def remeasure_sd(out: Path, docs: Path, *, sample_steps: int = 50, sampler: str = "ddpm", guidance: float = 3.0,
                 seed: int = 0) -> dict:
    """``vptune pretrain --arch sd --evaluate-only``: ``evaluate_sd`` on the weights in ``out``, the
    sample grid redrawn and the figures into ``docs/sd-fmnist-figures.json`` (the run's record kept)."""
    from .backbone import load_bundled_sd

    path = Path(out) / f"{BUNDLED_SD}.safetensors"
    Path(docs).mkdir(parents=True, exist_ok=True)
    evaluation = evaluate_sd(load_bundled_sd(path), path, Path(docs), sample_steps=sample_steps, sampler=sampler,
                             guidance=guidance, seed=seed)
    write_figures(docs, "sd", BUNDLED_SD, evaluation, evaluate_command("sd", out, docs))
    return evaluation


def plot_loss(history: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    if history:
        steps, losses = zip(*history)
        axis.plot(steps, losses)
    axis.set_xlabel("step")
    axis.set_yscale("log")
    axis.set_ylabel("noise-prediction MSE")
    axis.set_title(f"{BUNDLED_SD} pretraining (means over 20 steps)", fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def model_card(recipe: dict, figures: dict, command: str, sample_steps: int, sampler: str, guidance: float,
               remeasure: str, figures_file: Path) -> str:
    checks = dict(figures["checks"])
    area = checks.pop("bright area")
    rows = "\n".join(f"| {name} | {c['generated']:.1f} | {c['real']:.1f} | {c['chance']:.1f} | {c['distinct']:.0f} |"
                     for name, c in checks.items())
    losses = "\n".join(f"| {name} | {value:.4f} |" for name, value in figures["conditioning_loss"].items())
    unet = BUNDLED_UNET
    return f"""# {BUNDLED_SD}: the bundled text-to-image model

A small pixel-space diffusers `UNet2DConditionModel` that draws 32x32 grey canvases of Fashion-MNIST
items from a caption, cross-attending to the per-token states of the bundled CLIP's text tower
(`vptune_clip_fmnist`, frozen: its 48 word tokens after the final norm, width 128). Shipped so that
subject-driven generation (DreamBooth, APT and prompts in the UNet's attention) runs with no
download; it stands in for Stable Diffusion on a CPU, not for Stable Diffusion itself.

## Architecture
`UNet2DConditionModel`: channels {unet['block_out_channels']}, {unet['layers_per_block']} ResNet layer per block,
`{', '.join(unet['down_block_types'])}` (cross-attention at 16 and 8 px and in the middle block, heads of
{unet['attention_head_dim']}), one input and output channel, {figures['parameters']:,} parameters. DDPM noise schedule:
1,000 steps, `squaredcos_cap_v2` betas, epsilon prediction, samples clipped to [-1, 1]. No VAE: the
"latents" are the canvases scaled to [-1, 1]. The text encoder is the bundled CLIP's, loaded from
its own weights; `sks` is a word of its tokenizer, so "a photo of sks bag" is read as written.

## Data
Captioned canvases (`vptune.data.scenes`: 1 to 4 items with kind, place, size class and rotation)
drawn fresh every step from the *pretraining pool*, Fashion-MNIST's train split 0-54,999, each with
its canonical caption ({recipe['canonical_share']:.0%}) or a random truthful paraphrase; {recipe['caption_dropout']:.0%} of captions are
replaced by the empty prompt (classifier-free guidance). The model never saw Fashion-MNIST's test
split, so the held-out subjects of the mini benchmark (`vptune.diffusion.subjects`: test-split items)
are new to it.

## Recipe
DDPM noise-prediction loss (MSE) at uniform timesteps; AdamW (betas 0.9/0.999), lr {recipe['lr']}, weight decay
{recipe['weight_decay']} (none on 1-d tensors), {recipe['warmup_steps']} warm-up steps then cosine; {recipe['steps']} steps of batch
{recipe['batch_size']} ({recipe['steps'] * recipe['batch_size']:,} canvases); float32; seed {recipe['seed']}. The shipped weights are an
exponential moving average of the UNet (decay {recipe['ema_decay']}), float32 ({figures['weights_mb']:.1f} MB).

## Results
![samples](../../../docs/{SAMPLES_PNG})

`docs/{SAMPLES_PNG}`: 8 samples per caption ({sample_steps} {sampler.upper()} steps, guidance {guidance}, seeds 0-7), as
`vptune generate --sampler {sampler} --steps {sample_steps}` makes them. Loss curve: `docs/{LOSS_PNG}` (last logged mean: {figures['final_loss'] or float('nan'):.4f}).

Do the samples show what the captions say? Accuracy (%) of the same classifier on generated canvases
and on the same scenes drawn for real (pretrain-val pool), against chance (`check_samples`):

| what | generated | real | chance | classes predicted (generated) |
|---|---:|---:|---:|---:|
{rows}

place: "a small KIND at the PLACE upright", 9 places x 4, the bundled CLIP's zero-shot location
classifier; count: canonical captions of random 1-4 item scenes, 8 per count, the bundled CLIP's
zero-shot count; kind: "a large KIND at the center upright", 10 kinds x 4, a logistic regression on
the pixels of 2,000 real large centred canvases (the bundled CLIP's zero-shot kinds are too weak).

The share of the canvas the items cover (% of pixels above 64 of 255), same canvases:
small items {area['small item, generated']:.1f} generated, {area['small item, real']:.1f} real; large items
{area['large item, generated']:.1f} generated, {area['large item, real']:.1f} real.

Does the UNet read the text at all? Its denoising loss (MSE) on 256 pretrain-val canvases at the same
noise and timesteps, given (`conditioning_loss`):

| text given | loss |
|---|---:|
{losses}

- Wall time: {figures['wall_time_min']:.1f} min of training ({figures['canvases_per_s']:.1f} canvases/s), sampling
  {figures['sample_s_per_image']:.2f} s per image at {sample_steps} steps with guidance; CPU time of the last process
  {figures['cpu_min_this_process']:.1f} min (training, samples and checks; resumed at step {figures['resumed_at']}); the training
  figures as recorded by the training run.
- Machine: {machine()}, shared with other jobs.
- Written {now()}.

## Limitations
About {figures['wall_time_min']:.0f} minutes of training on one CPU thread: its canvases are blurry blobs where the
items should be; the tables above say which of the captions' words come through. It knows only the
canvases' 114 words. It is there to compare methods for subject-driven generation on a CPU, not to
make good pictures.

## Reproduce
```
{command}
```
Rerunning the command resumes from the last checkpoint in `$VPTUNE_CACHE/pretrain`. Then
`vptune generate --prompt "a large bag at the center" --num-images 8 --sampler {sampler} --steps {sample_steps} --out grid.png`.
The run writes its figures (the tables above, the sample timing; recipe, steps, wall time and loss
history) to `{figures_file}`. `{remeasure}` measures the sample
grid, both tables and the sample timing again on the shipped weights, with the same code, and
rewrites that file's `evaluation` part; the training figures stay as the run recorded them.
"""
