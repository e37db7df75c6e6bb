"""Runs as a user sees them: train one from names (``train_run``, behind ``vptune train`` and
the sweep), load one back (``load_run``), evaluate it (``evaluate_run``) and classify images
with it (``predict_files``).

A run folder holds the tuned weights and config (``PromptModel.save_pretrained``; the
metadata records class names, data, backbone and training settings), ``metrics.json``,
``curve.csv``, ``init.safetensors`` (a prompt method's tuned tensors before training) and, while training,
``checkpoint.pt`` (removed once the run is complete).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from ..atomic import atomic_write
from ..backbones import BUNDLED_BACKBONE, load_backbone
from ..backbones.family import family_of
from ..backbones.loading import cached_pretrained_weights
from ..data.shots import few_shot
from ..data.transforms import backbone_data_config, eval_transform
from ..flops import extra_flops
from ..heads import head_for_run, resolve_templates
from ..methods import MethodConfig, config_for
from ..model import PromptModel, read_run_config
from ..tracking import check_tracker, open_tracker
from .checkpoint import CHECKPOINT_FILE
from .config import TrainConfig
from .folder import INIT_FILE, METRICS_FILE, check_resume_settings, claim_run_folder, run_folder_lock
from .loop import check_backbone_weights, evaluate, fit, is_main_process


def train_run(
    backbone: str,
    method: str,
    method_options: dict[str, Any],
    data: str,
    out: Path,
    cfg: TrainConfig,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    final: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    head: str | None = None,
    templates: str | None = None,
    text_prompts: dict[str, Any] | None = None,
    shots: int | None = None,
    max_image_pixels: int | None = None,
    allow_sparse_labels: bool = False,
    backbone_train_mode: bool | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Build backbone, data and PromptModel, fit, evaluate on val and test, write the run folder.

    Vision-language data (``minivl:TASK``, ``vqav2:ROOT``, ``nlvr2:ROOT``, ``f30k:ROOT``) needs a
    ViLT backbone; its text is read by ``tokenizer`` (``word``: vptune's word tokenizer, or a
    transformers tokenizer's name or folder; default ``tokenizer_for``), the task (VQA, NLVR,
    retrieval) comes from the data, and the task's metrics are written (``test_vqa_score``,
    ``test_top1``, ``test_ir_r1``, ``test_tr_r1``, ...). ``backbone_train_mode`` keeps the
    backbone's dropout on while training (default: the family's recipe).

    ``head`` (random, text, coop; default text on a CLIP backbone) and ``templates`` pick the head
    (``vptune.heads``); ``text_prompts`` (CoOp's options) adds CoOp to any image-side method;
    ``shots`` trains on K images per class drawn with the seed (``vptune.data.shots``).

    Returns the metrics written to ``out/metrics.json``: top-1 accuracies in percent
    (``val_top1`` is on data that ``final`` trains on), tuned parameters as a count and as a
    percentage of the backbone, ``extra_gflops`` per image over the frozen backbone,
    ``wall_time_s`` of training and validation (summed over resumed sessions) and training
    ``images_per_s``. With ``resume``, a killed run continues from its checkpoint, and a
    finished one returns its metrics unchanged; either must have been made with the same
    method, data and settings. Without ``resume``, an ``out`` that holds anything (a run, or
    files of the user's) is refused unless ``overwrite``. The folder is locked while this runs.
    ``max_image_pixels`` and ``allow_sparse_labels`` go to ``build_data``.
    """
    out = Path(out)
    config = config_for(method, **method_options)
    check_tracker(cfg.tracker, cfg.tracking_uri)  # a missing extra is named before anything is loaded
    main = is_main_process()
    with run_folder_lock(out) if main else contextlib.nullcontext():
        # every process decides the same from the folder; only the main one removes files for --overwrite
        state = claim_run_folder(out, resume=resume, overwrite=overwrite, remove=main)
        if resume and state in ("finished", "unfinished"):
            check_resume_settings(out, config.to_dict(), data, final, backbone, cfg.to_dict())
        return _train(
            backbone, config, data, out, cfg, weights=weights, pretrained=pretrained, final=final, resume=resume,
            finished=resume and state == "finished", progress=progress, on_epoch_end=on_epoch_end, head=head,
            templates=templates, text_prompts=text_prompts, shots=shots, max_image_pixels=max_image_pixels,
            allow_sparse_labels=allow_sparse_labels, backbone_train_mode=backbone_train_mode, tokenizer=tokenizer,
        )


def _train(
    backbone: str, config: MethodConfig, data: str, out: Path, cfg: TrainConfig, *, weights: str | Path | None,
    pretrained: bool, final: bool, resume: bool, finished: bool, progress: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None, head: str | None, templates: str | None,
    text_prompts: dict[str, Any] | None, shots: int | None, max_image_pixels: int | None, allow_sparse_labels: bool,
    backbone_train_mode: bool | None = None, tokenizer: str | None = None,
) -> dict[str, Any]:
    from ..data import build_data

    torch.manual_seed(cfg.seed)  # a timm backbone without weights is random: make it the same on --resume
    net = load_backbone(backbone, weights=weights, pretrained=pretrained)
    if finished:
        check_backbone_weights(read_run_config(out), family_of(net).fingerprint(), out)
        return json.loads((out / METRICS_FILE).read_text())
    data_config = backbone_data_config(net)
    shot_notes: list[str] = []
    if is_vl_spec(data):
        words = tokenizer_for(backbone, weights, pretrained, tokenizer)
        bundle = build_vl(data, data_config, net, words, final)
        head_config = None
        torch.manual_seed(cfg.seed)
        model = PromptModel(net, config, task=bundle.make_task(), backbone_train_mode=backbone_train_mode)
        model.metadata.update(tokenizer=words_spec(backbone, weights, pretrained, tokenizer))
        init_retrieval_head(model) or init_pretrained_head(model)
        bundle.class_names, bundle.skipped = getattr(model.task, "answers", []), []
    else:
        bundle = build_data(data, data_config, final=final, skip_bad_images=cfg.skip_bad_images, max_pixels=max_image_pixels,
                            allow_sparse_labels=allow_sparse_labels)
        if shots is not None:
            bundle.train, shot_notes = few_shot(bundle.train, shots, cfg.seed, bundle.num_classes)
        head_config = head_for_run(head, config, family_of(net), data, list(bundle.class_names),
                                   templates=templates, text_prompts=text_prompts)
        torch.manual_seed(cfg.seed)
        model = PromptModel(net, config, bundle.num_classes, head_config, backbone_train_mode=backbone_train_mode)
    model.metadata.update(
        class_names=list(bundle.class_names),
        data=data,
        final=final,
        shots=shots,
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        backbone={
            "spec": backbone, "weights": None if weights is None else str(Path(weights).resolve()), "pretrained": pretrained,
        },
    )
    # Prompt methods keep their initial values for rewinding after pruning; for the methods that
    # tune backbone tensors this would be a second copy of the backbone, so they keep none.
    initial = None
    if model.method.prompt_layers:
        initial = {name: t.detach().cpu().clone() for name, t in model.tuned_state_dict().items()}
    tracker = None
    if is_main_process():
        settings = {
            "method": config.method_name(), "method_config": config.to_dict(), "data": data, "final": final,
            "backbone": model.metadata["backbone"], "train": {k: v for k, v in cfg.to_dict().items() if k != "tracking_uri"},
        }
        tracker = open_tracker(cfg.tracker, out, params=settings, tracking_uri=cfg.tracking_uri, resume=resume)
    failed = True
    try:
        result = fit(model, bundle, cfg, out, resume=resume, progress=progress, on_epoch_end=on_epoch_end, tracker=tracker)
        test = evaluate(model, bundle.test, cfg) if bundle.test is not None and len(bundle.test) else None
        if tracker is not None and test is not None:
            tracker.log({f"test/{k}": v for k, v in test.items() if k != "count"}, result["steps"])
        failed = False
    finally:
        if tracker is not None:
            tracker.close(failed=failed)
    tuned, frozen = model.num_tuned_parameters(), model.num_backbone_parameters()
    metrics = {
        "method": config.method_name(),
        "method_config": config.to_dict(),
        "backbone": backbone,
        "data": data,
        "final": final,
        "val_top1": result["val_top1"],
        "val_loss": result["val_loss"],
        "test_top1": None if test is None else test.get("top1"),
        "test_loss": None if test is None else test.get("loss"),
        "train_loss": result["train_loss"],
        "tuned_params": tuned,
        "backbone_params": frozen,
        "tuned_percent": 100.0 * tuned / frozen,
        "extra_gflops": extra_flops(model) / 1e9,
        "epochs": result["epochs"],
        "steps": result["steps"],
        "wall_time_s": result["wall_time_s"],
        "images_per_s": result["images_per_s"],
        "train_images": len(bundle.train),
        "shots": shots,
        "shot_notes": shot_notes,
        "head": head_config.kind if head_config is not None else model.task.name,
        "device": str(cfg.torch_device()),  # where it trained: a sweep on a cluster can check its trials got their GPU
        "skipped_images": len(bundle.skipped),
        "train_config": cfg.to_dict(),
    }
    if model.task.name != "classification":  # the task's own metrics: test_vqa_score, test_ir_r1, ...
        metrics["task"] = model.task.name
        metrics.update({k: v for k, v in result["val"].items() if k not in metrics})
        metrics.update({f"test_{k}": v for k, v in (test or {}).items() if k != "count" and f"test_{k}" not in metrics})
    if is_main_process():
        if initial is not None:
            atomic_write(out / INIT_FILE, lambda tmp: save_file(initial, str(tmp)))
        write_json(out / METRICS_FILE, metrics)
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # complete: the run folder keeps only what serving needs
    return metrics


def zeroshot_run(
    backbone: str, out: Path, *, data: str | None = None, classes: list[str] | None = None,
    templates: str | None = None, weights: str | Path | None = None, pretrained: bool = False,
    batch_size: int = 256, device: str = "auto", overwrite: bool = False,
) -> dict[str, Any]:
    """Write CLIP's zero-shot classifier as a run folder (no training): a ``text`` head over the
    frozen image tower, for the classes of ``data`` (then ``metrics.json`` has its val and test
    top-1, like a trained run's) or for ``classes`` alone. ``vptune serve`` serves it like any run.
    An ``out`` that already holds anything is refused unless ``overwrite``."""
    out = Path(out)
    with run_folder_lock(out):
        claim_run_folder(out, resume=False, overwrite=overwrite)
        return _zeroshot(backbone, out, data=data, classes=classes, templates=templates, weights=weights,
                         pretrained=pretrained, batch_size=batch_size, device=device)


def _zeroshot(
    backbone: str, out: Path, *, data: str | None, classes: list[str] | None, templates: str | None,
    weights: str | Path | None, pretrained: bool, batch_size: int, device: str,
) -> dict[str, Any]:
    from ..data import build_data
    from ..heads import HeadConfig, class_names_for
    from ..methods import LinearConfig

    if (data is None) == (classes is None):
        raise ValueError("vptune zeroshot needs either --data SPEC (names from the data, test top-1 measured) "
                         "or --classes 'a,b,c' (names alone)")
    net = load_backbone(backbone, weights=weights, pretrained=pretrained)
    data_config = backbone_data_config(net)
    bundle = None
    if data is not None:
        bundle = build_data(data, data_config)
        names, texts = list(bundle.class_names), class_names_for(data, list(bundle.class_names))
    else:
        names = texts = [name.strip() for name in classes if name.strip()]
        if not names:
            raise ValueError("--classes is empty: give class names separated by commas")
    model = PromptModel(net, LinearConfig(), len(names), HeadConfig("text", tuple(texts), templates))
    model.metadata.update(
        class_names=names, data=data, final=False, zero_shot=True,
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        backbone={"spec": backbone, "weights": None if weights is None else str(Path(weights).resolve()), "pretrained": pretrained},
    )
    model.save_pretrained(out)
    metrics: dict[str, Any] = {
        "method": "zeroshot", "backbone": backbone, "data": data, "class_names": names, "class_texts": texts,
        "templates": resolve_templates(model.head_config.templates, model.family), "trained_params": 0, "head_params": model.num_tuned_parameters(),
        "backbone_params": model.num_backbone_parameters(), "val_top1": None, "test_top1": None,
    }
    if bundle is not None:
        cfg = TrainConfig(batch_size=batch_size, device=device)
        model.to(cfg.torch_device())
        for split in ("val", "test"):
            dataset = getattr(bundle, split)
            if dataset is not None and len(dataset):
                metrics[f"{split}_top1"] = evaluate(model, dataset, cfg)["top1"]
    write_json(out / METRICS_FILE, metrics)
    return metrics


def init_retrieval_head(model: PromptModel) -> bool:
    """A retrieval run's score head started from the backbone's pretrained image-text-matching
    head when its weights file has one (the bundled ViLT's), as ViLT fine-tunes retrieval
    (``RetrievalTask.head_from_itm``: the match row). Returns whether it was."""
    from ..tasks import RetrievalTask

    itm = getattr(model.backbone, "itm_head_state", None)
    if model.task.name != "retrieval" or itm is None or itm["weight"].shape != (2, model.family.num_features):
        return False
    source = torch.nn.Linear(itm["weight"].shape[1], 2)
    with torch.no_grad():
        source.weight.copy_(itm["weight"])
        source.bias.copy_(itm["bias"])
        model.head.load_state_dict(RetrievalTask.head_from_itm(source).state_dict())
    model.metadata["head_init"] = "itm"
    return True


def init_pretrained_head(model: PromptModel) -> bool:
    """A vision-language run's head loaded from the task head its backbone's weights file brought
    (an official fine-tuned METER checkpoint's), as the family maps it (``Family.pretrained_head``).
    Returns whether it was."""
    with torch.no_grad():
        source = model.family.pretrained_head(model.task, model.head)
    if source is None:
        return False
    model.metadata["head_init"] = source
    return True


def is_vl_spec(data: str) -> bool:
    return data.partition(":")[0] in ("minivl", "vqav2", "nlvr2", "f30k")


def tokenizer_for(backbone: str, weights: str | Path | None, pretrained: bool, choice: str | None = None) -> Any:
    """The tokenizer of a vision-language run: ``choice`` ("word": vptune's word tokenizer, or a
    transformers tokenizer's name or folder); by default the checkpoint's own (a ``hf:NAME``
    downloaded with ``pretrained``, or a weights folder that holds tokenizer files), else the
    word tokenizer (the mini benchmark's vocabulary)."""
    spec = words_spec(backbone, weights, pretrained, choice)
    if spec == "word":
        from ..data.tokenizer import WordTokenizer

        return WordTokenizer.from_file()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except OSError as error:
        raise ConnectionError(f"cannot load tokenizer {spec!r} ({error}): offline, pass --tokenizer FOLDER or --tokenizer word") from None


def words_spec(backbone: str, weights: str | Path | None, pretrained: bool, choice: str | None) -> str:
    if choice:
        return choice
    if weights is not None and Path(weights).is_dir() and any((Path(weights) / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        return str(Path(weights).resolve())
    if backbone.startswith("hf:") and pretrained and weights is None:
        return backbone[3:]
    return "word"


def build_vl(data: str, data_config: dict, net: torch.nn.Module, tokenizer: Any, final: bool):
    """A vision-language bundle for ``net``: text padded to at most the model's text length."""
    from ..data import build_vl_data

    family = family_of(net)
    if not family.reads_text:
        raise ValueError(f"{data} is vision-language data (images with text); backbone {family.name} reads images only: "
                         "pass a ViLT (--backbone hf:dandelin/vilt-b32-mlm --pretrained, or --weights FOLDER)")
    own = getattr(tokenizer, "model_max_length", None) or family.text_length()
    return build_vl_data(data, data_config, tokenizer, final=final, max_length=min(own, family.text_length()))


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_run(
    run: str | Path, backbone: str | None = None, *, weights: str | Path | None = None, pretrained: bool | None = None
) -> PromptModel:
    """The PromptModel saved in ``run``, on the backbone it recorded unless another is given.

    A run folder never makes vptune download anything by itself: a run trained on timm's hub
    weights is loaded on the copy an earlier download left in the local cache, or refused with
    a request for ``--weights``; only ``pretrained=True`` lets timm fetch them."""
    run = Path(run)
    recorded = read_run_config(run).get("metadata", {}).get("backbone", {})
    if backbone is None:
        backbone = recorded.get("spec", BUNDLED_BACKBONE)
        if weights is None and recorded.get("weights"):
            weights = recorded["weights"]
            if not Path(weights).exists():
                raise FileNotFoundError(
                    f"{run} was trained on backbone {backbone} with weights {weights}, which no longer exists: "
                    "pass --weights FILE (and --backbone SPEC)"
                )
    if pretrained is None and recorded.get("pretrained") and weights is None:
        weights = cached_pretrained_weights(backbone)
        if weights is None:
            raise FileNotFoundError(
                f"{run} was trained on timm's pretrained {backbone} weights, which are not in this machine's hub "
                "cache, and a run folder never downloads them by itself: pass --weights FILE (those weights)"
            )
    net = load_backbone(backbone, weights=weights, pretrained=bool(pretrained) and weights is None)
    return PromptModel.from_pretrained(net, run)


def evaluate_run(
    model: PromptModel, data: str, split: str = "test", *, batch_size: int = 256, device: str = "auto",
    skip_bad_images: bool = False, max_pixels: int | None = None, allow_sparse_labels: bool = False,
) -> dict[str, Any]:
    """Top-1 and loss of a loaded run on one split of ``data`` (whose classes must be the run's),
    and how many unreadable images were skipped."""
    from ..data import build_data

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if is_vl_spec(data):
        spec = model.metadata.get("tokenizer", "word")
        bundle = build_vl(data, backbone_data_config(model.backbone), model.backbone, tokenizer_for("", None, False, spec), False)
        if bundle.make_task().to_dict() != model.task.to_dict():
            raise ValueError(f"{data} is a {bundle.task} task{' with other answers' if bundle.task == model.task.name else ''}; "
                             f"the run was trained for {model.task.name}: evaluate it on the data it was trained for")
        dataset = getattr(bundle, split)
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{data} has no {split} split")
        cfg = TrainConfig(batch_size=batch_size, device=device)
        model.to(cfg.torch_device())
        return {"split": split, **evaluate(model, dataset, cfg), "skipped_images": 0}
    bundle = build_data(data, backbone_data_config(model.backbone), skip_bad_images=skip_bad_images,
                        max_pixels=max_pixels, allow_sparse_labels=allow_sparse_labels)
    names = model.metadata.get("class_names")
    if bundle.num_classes != model.num_classes or (names is not None and list(bundle.class_names) != list(names)):
        raise ValueError(
            f"{data} has {bundle.num_classes} classes {list(bundle.class_names)[:6]}...; the run was trained on "
            f"{model.num_classes} classes {list(names or [])[:6]}...: evaluate it on the data it was trained for"
        )
    dataset = getattr(bundle, split)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{data} has no {split} split")
    cfg = TrainConfig(batch_size=batch_size, device=device)
    model.to(cfg.torch_device())
    return {"split": split, **evaluate(model, dataset, cfg), "skipped_images": len(bundle.skipped)}


@torch.no_grad()
def predict_files(
    model: PromptModel, files: list[str | Path], top_k: int = 5, *, max_pixels: int | None = None
) -> list[dict[str, Any]]:
    """Top-k labels with probabilities for each image file; a file that cannot be read as an
    image (missing, corrupt, above ``max_pixels``, a decompression bomb) gets an ``error``
    entry instead, so one bad file does not stop the others."""
    from ..data.images import check_max_pixels, open_image

    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (labels shown per image), got {top_k}")
    check_max_pixels(max_pixels)
    transform = eval_transform(model.metadata.get("data"), backbone_data_config(model.backbone))
    names = model.metadata.get("class_names") or [str(i) for i in range(model.num_classes)]
    device = next(model.parameters()).device
    model.eval()
    results = []
    for file in map(Path, files):
        try:
            with open_image(file, max_pixels) as image:
                tensor = transform(image.convert("RGB"))
        except Exception as err:  # noqa: BLE001  Pillow's decoders raise many types for a bad file
            results.append({"file": str(file), "error": f"cannot read {file} as an image ({type(err).__name__}: {err})"})
            continue
        probs = model(tensor[None].to(device)).float().softmax(dim=1)[0]
        values, indices = probs.topk(min(top_k, model.num_classes))
        results.append({"file": str(file), "top": [(names[i], p) for p, i in zip(values.tolist(), indices.tolist())]})
    return results


@torch.no_grad()
def predict_vl(model: PromptModel, images: list[str | Path], text: str, top_k: int = 5) -> dict[str, Any]:
    """A vision-language run's answer for image files and a text: VQA, the top-k answers with
    their scores (sigmoid, as the task trains them) for one image; NLVR, whether the statement
    is true of two images; retrieval, the match score of the text with each image. The text is
    tokenised as in training (longer text is truncated with a warning)."""
    from PIL import Image, UnidentifiedImageError

    from ..data.transforms import resize_transform
    from ..data.vl import encode_texts

    task = model.task.name
    wanted = {"vqa": 1, "nlvr": 2}.get(task)
    if wanted is not None and len(images) != wanted:
        raise ValueError(f"a {task} run reads {wanted} image{'s' if wanted > 1 else ''} with the text; got {len(images)}: "
                         f"pass --image {'twice' if wanted == 2 else 'once'}")
    if not text.strip():
        raise ValueError("--text is empty: give the question or statement")
    transform = resize_transform(backbone_data_config(model.backbone))
    pixels = []
    for file in map(Path, images):
        try:
            with Image.open(file) as image:
                pixels.append(transform(image.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ValueError(f"cannot read {file} as an image ({type(err).__name__}: {err})") from None
    tokenizer = tokenizer_for("", None, False, model.metadata.get("tokenizer", "word"))
    length = min(getattr(tokenizer, "model_max_length", None) or model.family.text_length(), model.family.text_length())
    ids, mask = encode_texts(tokenizer, [text], length, ["--text"])
    device = next(model.parameters()).device
    model.eval()
    ids, mask = ids.to(device), mask.to(device)
    if task == "vqa":
        scores = model({"image": pixels[0][None].to(device), "input_ids": ids, "attention_mask": mask}).float().sigmoid()[0]
        values, indices = scores.topk(min(top_k, len(scores)))
        return {"task": task, "text": text, "top": [(model.task.answers[i], p) for p, i in zip(values.tolist(), indices.tolist())]}
    if task == "nlvr":
        probs = model({"image0": pixels[0][None].to(device), "image1": pixels[1][None].to(device), "input_ids": ids,
                       "attention_mask": mask}).float().softmax(-1)[0]
        return {"task": task, "text": text, "top": [("true", probs[1].item()), ("false", probs[0].item())]}
    stacked = torch.stack(pixels)[None].to(device)  # 1, K, C, H, W
    scores = model({"image": stacked, "input_ids": ids, "attention_mask": mask}).float()[0]
    return {"task": task, "text": text, "top": [(str(f), s) for f, s in zip(images, scores.tolist())]}
