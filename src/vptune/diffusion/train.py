"""Subject-driven generation runs: ``vptune train --data subject:DIR --prompt "a photo of sks bag"``
on a text-to-image backbone, and reading such a run back for generation and evaluation.

The run trains with the same loop as every task (``vptune.train.loop.fit``: checkpoint after every
epoch, exact ``--resume``, a NaN loss stops with the last good checkpoint kept) on a
``GenerationTask`` (DreamBooth's objective) and writes the same run folder: ``config.json`` (the
method, the backbone's description, the task with its prompts), ``model.safetensors`` (the tuned
tensors only), ``metrics.json`` and ``curve.csv``.

Subject folders: every image file in ``DIR`` (not its subfolders) is read; a folder without a
readable image, or with a file that has an image's extension but cannot be read, is refused.
Images are centre-cropped to a square and resized to the model's image size; those whose size
differed (mixed sizes, or another size than the model's) are listed in the run's ``subject_notes``.
One epoch visits every subject image ``repeats`` times (and every class image once per
``repeats`` too), so a checkpoint is not written after every few steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

SUBJECT_PREFIX = "subject:"
# The attention a method acts on when the run does not say: APT in the self-attention, where it
# gave the best subject fidelity of the three choices on the mini results (docs/results-diffusion-mini.md);
# prompts in the cross-attention, as extra text states.
DEFAULT_SITES = {"apt": "self", "vpt-deep": "cross", "vpt-shallow": "cross", "e2vpt": "cross"}
DEFAULT_REPEATS = 25


def is_subject_spec(data: str) -> bool:
    return data.startswith(SUBJECT_PREFIX)


def default_sites(method: str) -> str:
    """The sites a method acts on by default: APT in the self-attention (chosen by the mini
    results), prompts in the cross-attention, everything else (LoRA, full, textual inversion) on
    every attention."""
    return DEFAULT_SITES.get(method, "both")


def subject_images(folder: str | Path, size: int, channels: int) -> tuple[Tensor, list[str], list[str]]:
    """The subject's images (N, channels, size, size) in [0, 1], their file names, and notes on
    what was resized. Refuses a missing folder, one without a readable image, and an image file
    that cannot be read (nothing is silently skipped)."""
    from PIL import Image

    from ..data.images import IMAGE_EXTENSIONS, open_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"subject folder {folder} does not exist: pass --data subject:DIR with 3-5 images of the subject")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"subject folder {folder} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                         "put 3-5 images of the subject in it")
    images, sizes, notes = [], {}, []
    for file in files:
        try:
            with open_image(file) as image:
                image.load()
                picture = image.convert("L" if channels == 1 else "RGB")
        except Exception as err:  # noqa: BLE001  Pillow raises many types for a bad file
            raise ValueError(f"cannot read {file} as an image ({type(err).__name__}: {err}): remove it or replace it; "
                             "a subject folder must hold only readable images") from None
        sizes[file.name] = picture.size
        side = min(picture.size)
        left, top = (picture.width - side) // 2, (picture.height - side) // 2
        picture = picture.crop((left, top, left + side, top + side))
        if picture.size != (size, size):
            picture = picture.resize((size, size), Image.BICUBIC)
        pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).float().div(255)
        images.append(pixels.reshape(size, size, channels).permute(2, 0, 1))
    other = {name: s for name, s in sizes.items() if s != (size, size)}
    if len(set(sizes.values())) > 1:
        notes.append(f"the subject images have mixed sizes ({', '.join(sorted({f'{w}x{h}' for w, h in sizes.values()}))}): "
                     f"each was centre-cropped to a square and resized to {size}x{size}")
    elif other:
        w, h = next(iter(other.values()))
        notes.append(f"the subject images are {w}x{h}: centre-cropped to a square and resized to the model's {size}x{size}")
    return torch.stack(images), [f.name for f in files], notes


class SubjectData(Dataset):
    """Subject images with the instance prompt (weight 1), then class images with the class prompt
    (weight ``prior_weight``), each ``repeats`` times: batch dicts ``image``, ``prompt``, ``weight``."""

    yields_dicts = True

    def __init__(self, images: Tensor, prompt: str, class_images: Tensor | None = None, class_prompt: str = "",
                 prior_weight: float = 1.0, repeats: int = 1) -> None:
        self.items = [(image, prompt, 1.0) for image in images]
        if class_images is not None:
            self.items += [(image, class_prompt, prior_weight) for image in class_images]
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, prompt, weight = self.items[index % len(self.items)]
        return {"image": image, "prompt": prompt, "weight": torch.tensor(weight)}


class SubjectBundle:
    """What ``fit`` reads: the training set, and no validation set (nothing to select on)."""

    def __init__(self, train: Dataset) -> None:
        self.train, self.val, self.test = train, None, None


def class_prior_images(backbone: Any, prompt: str, count: int, seed: int, steps: int = 25) -> Tensor:
    """``count`` images of ``prompt`` made by the frozen model (DreamBooth's class-prior images);
    seeded, so a resumed run makes the same ones."""
    from .sample import generate

    return generate(backbone, [prompt], num_images=count, steps=steps, seed=seed + 104729)


def train_generation_run(
    backbone: str, method: str, method_options: dict[str, Any], data: str, out: Path, cfg: Any, *,
    prompt: str, identifier: str = "sks", class_prompt: str | None = None, prior_weight: float = 1.0,
    class_images: int = 0, repeats: int = DEFAULT_REPEATS, sites: str | None = None, weights: str | Path | None = None,
    pretrained: bool = False, resume: bool = False, overwrite: bool = False, progress: bool = True,
    on_epoch_end: Any = None,
) -> dict[str, Any]:
    """Tune ``method`` on the subject images of ``data`` (``subject:DIR``) with the instance
    ``prompt`` (which must contain ``identifier``), optionally with ``class_images`` class-prior
    images of ``class_prompt`` (default: the prompt without the identifier) weighted
    ``prior_weight``; write the run folder ``out`` and return its metrics (``metrics.json``):
    the training loss, tuned parameters, training time and ``extra_gflops`` per denoising step.
    ``on_epoch_end(record)`` gets each epoch's curve row."""
    from ..methods import config_for
    from ..tasks import GenerationTask
    from ..train.folder import METRICS_FILE, check_resume_settings, claim_run_folder, run_folder_lock

    if not is_subject_spec(data):
        raise ValueError(f"a text-to-image backbone trains on --data subject:DIR (a folder of the subject's images), got {data!r}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    out = Path(out)
    config = config_for(method, **method_options)
    task = GenerationTask(prompt, identifier, class_prompt, prior_weight, class_images)
    sites = sites or default_sites(config.method_name())
    with run_folder_lock(out):
        state = claim_run_folder(out, resume=resume, overwrite=overwrite)
        if resume and state in ("finished", "unfinished"):
            check_resume_settings(out, config.to_dict(), data, False, backbone, cfg.to_dict())
            check_same_task(out, task, sites)
        if resume and state == "finished":
            return json.loads((out / METRICS_FILE).read_text())
        return _train(backbone, config, task, data, out, cfg, sites=sites, repeats=repeats, weights=weights,
                      pretrained=pretrained, resume=resume, progress=progress, on_epoch_end=on_epoch_end)


def check_same_task(out: Path, task: Any, sites: str) -> None:
    """Refuse to resume a generation run with other prompts, prior settings or sites."""
    from ..model import read_run_config

    run = read_run_config(out)
    then = {**(run.get("task") or {}), "sites": run["backbone"].get("unet_sites")}
    now = {**task.to_dict(), "sites": sites}
    diffs = [f"{key} {then.get(key)!r} vs {now[key]!r}" for key in now if then.get(key) != now[key]]
    if diffs:
        raise ValueError(f"cannot resume {out}: it was made with other settings (then vs now: {'; '.join(diffs)}); resume "
                         "with the original --prompt, class-prior settings and --sites, or choose another --out")


def _train(backbone: str, config: Any, task: Any, data: str, out: Path, cfg: Any, *, sites: str, repeats: int,
           weights: str | Path | None, pretrained: bool, resume: bool, progress: bool, on_epoch_end: Any) -> dict[str, Any]:
    from ..model import PromptModel
    from ..train.folder import METRICS_FILE
    from ..train.checkpoint import CHECKPOINT_FILE
    from ..train.loop import fit
    from ..train.run import write_json
    from .backbone import load_diffusion_backbone
    from .model import TextToImage

    pipeline = load_diffusion_backbone(backbone, pretrained=pretrained, weights=weights)
    pipeline.to(cfg.torch_device())
    images, names, notes = subject_images(data[len(SUBJECT_PREFIX):], pipeline.image_size, pipeline.image_channels)
    made = None
    if task.class_images:
        made = class_prior_images(pipeline, task.class_prompt, task.class_images, cfg.seed)
    train = SubjectData(images, task.instance_prompt, made, task.class_prompt, task.prior_weight, repeats)
    torch.manual_seed(cfg.seed)
    model = PromptModel(TextToImage(pipeline, sites), config, task=task)
    model.metadata.update(
        data=data, final=False, subject_images=names, subject_notes=notes, repeats=repeats,
        backbone={"spec": backbone, "weights": None if weights is None else str(Path(weights).resolve()), "pretrained": pretrained},
    )
    result = fit(model, SubjectBundle(train), cfg, out, resume=resume, progress=progress, on_epoch_end=on_epoch_end)
    tuned, frozen = model.num_tuned_parameters(), model.num_backbone_parameters()
    metrics = {
        "method": config.method_name(), "method_config": config.to_dict(), "backbone": backbone, "data": data,
        "task": task.name, **{k: v for k, v in task.to_dict().items() if k != "name"}, "sites": sites,
        "train_loss": result["train_loss"], "tuned_params": tuned, "backbone_params": frozen,
        "tuned_percent": 100.0 * tuned / frozen, "extra_gflops": extra_gflops_per_step(model),
        "epochs": result["epochs"], "steps": result["steps"], "wall_time_s": result["wall_time_s"],
        "images_per_s": result["images_per_s"], "train_images": len(train), "subject_images": names,
        "subject_notes": notes, "device": str(cfg.torch_device()), "train_config": cfg.to_dict(),
    }
    write_json(out / METRICS_FILE, metrics)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return metrics


@torch.no_grad()
def extra_gflops_per_step(model: Any) -> float:
    """GFLOPs one denoising step (one UNet pass on one image, no guidance) adds over the frozen
    UNet: the method's attention work, LoRA's unmerged products; 0 for textual inversion, whose
    word only changes the text states (encoded once per prompt). Key-value prompts are counted
    as generation runs them, from the cache."""
    from ..flops import count_flops

    was_training = model.training
    model.eval()
    family = model.family
    latents, steps, text = family.example_inputs(device=next(model.parameters()).device)
    family.predict_noise(model.method, latents, steps, text)  # fills the key-value cache
    tuned = count_flops(lambda: family.predict_noise(model.method, latents, steps, text))
    shared = getattr(model.backbone, "pipeline", None)
    frozen_unet = shared.unet if shared is not None else family.unet
    reference = count_flops(lambda: frozen_unet(latents, steps, encoder_hidden_states=text))
    model.train(was_training)
    return (tuned - reference) / 1e9


def is_generation_run(run: Path) -> bool:
    """Whether the run folder holds a subject-driven generation run."""
    from ..model import read_run_config

    return (read_run_config(Path(run)).get("task") or {}).get("name") == "generation"


def load_generation_run(run: Path, backbone: str | None = None, *, weights: str | Path | None = None,
                        pretrained: bool | None = None, device: str = "cpu") -> Any:
    """A generation run folder on its text-to-image backbone (by default the one it recorded):
    a ``PromptModel`` whose ``tuned_parts`` generate with it. A run made on another pipeline (or
    a classification run) is refused with the backbone to pass."""
    from ..model import PromptModel, read_run_config
    from .backbone import load_diffusion_backbone
    from .model import TextToImage

    run = Path(run)
    config = read_run_config(run)
    if (config.get("task") or {}).get("name") != "generation":
        raise ValueError(f"{run} is not a generation run (its task is {(config.get('task') or {}).get('name', 'classification')}): "
                         "vptune generate --run takes a run trained with --data subject:DIR")
    recorded = config.get("metadata", {}).get("backbone", {})
    spec = backbone or recorded.get("spec")
    if weights is None and backbone is None:
        weights = recorded.get("weights")
    pipeline = load_diffusion_backbone(spec, pretrained=bool(recorded.get("pretrained") if pretrained is None else pretrained),
                                       weights=weights).to(device)
    saved = config["backbone"].get("pipeline")
    if saved is not None:
        pipeline.check_matches(saved, config.get("backbone_weights"))
    return PromptModel.from_pretrained(TextToImage(pipeline, config["backbone"].get("unet_sites", "both")), run)
