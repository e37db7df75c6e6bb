"""Parameters, FLOPs, speed and training memory of every method on one backbone, side by side.

``vptune bench`` builds a random-weight timm backbone (no download) and, for the frozen
backbone alone and each method, measures:

- tuned parameters, as a count and as a percentage of the backbone;
- GFLOPs per image at inference and the extra over the frozen backbone (torch's FLOP
  counter, with the CPU fused attention op counted: ``vptune.flops``), counted after one
  warm-up forward so cached prompt keys/values are not charged to every image;
- inference and training images/s (a training step is forward, cross-entropy, backward,
  SGD step), timed in interleaved rounds (A B C A B C ...) after a warm-up, medians kept,
  because these machines are shared and noisy;
- the peak tensor memory of one training step above the model's resting footprint
  (parameters, optimizer state, input batch), each method in a fresh process so that no
  other model, cache or allocator state is counted. On CUDA this is
  ``torch.cuda.max_memory_allocated``; on CPU, which keeps no such statistic, it is the
  peak of the running sum of the allocation and free events recorded by torch's profiler
  (``profile_memory=True``): exact tensor bytes, unaffected by the allocator's caching or
  by the process's resident size.

Ratios: ``infer_ratio`` = method inference time / frozen backbone inference time;
``train_ratio`` = method training-step time / frozen backbone inference time;
``mem_ratio`` = peak training memory / that of full fine-tuning without gradient
checkpointing (the cost users compare against; measured even when ``full`` is not listed).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones.family import family_of
from .flops import count_flops
from .methods import METHOD_NAMES, MethodConfig, config_for
from .model import PromptModel
from .train.config import resolve_device

KEYS = (
    "method", "path", "tuned_params", "tuned_percent", "gflops", "extra_gflops", "infer_img_s",
    "train_img_s", "peak_mem_mb", "infer_ratio", "train_ratio", "mem_ratio",
)
BACKBONE = "backbone"  # the row of the frozen backbone alone
DEFAULT_METHODS = (
    "backbone", "vpt-deep:kv", "vpt-deep:tokens", "vpt-shallow", "e2vpt", "apt", "linear", "full", "lora",
)
PATH_METHODS = ("vpt-deep", "e2vpt")  # methods whose prompts may take the kv or the tokens path
PROMPT_COUNT_METHODS = ("vpt-deep", "vpt-shallow", "apt")  # --num-prompts applies to these
NUM_CLASSES = 100  # the head the benchmarked models carry (a VTAB/CIFAR-100-sized task)
MEMORY_REFERENCE = "full"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row: a method name (or ``backbone``) and, for methods that have one, its path."""

    name: str
    path: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}:{self.path}" if self.path else self.name

    def config(self, num_prompts: int) -> MethodConfig | None:
        if self.name == BACKBONE:
            return None
        options: dict[str, Any] = {}
        if self.name in PROMPT_COUNT_METHODS:
            options["num_prompts"] = num_prompts
        if self.path:
            options["path"] = self.path
        return config_for(self.name, **options)


def parse_methods(text: str | Sequence[str]) -> list[Entry]:
    """``"backbone,vpt-deep:kv,vpt-deep:tokens,apt"`` to entries; ``backbone`` is always measured
    (every ratio is relative to it) and put first."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    entries: list[Entry] = [Entry(BACKBONE)]
    for item in items:
        name, _, path = item.partition(":")
        if name != BACKBONE and name not in METHOD_NAMES:
            raise ValueError(f"unknown method {name!r} in --methods; expected backbone or one of: {', '.join(METHOD_NAMES)}")
        if path and name not in PATH_METHODS:
            raise ValueError(f"{item!r}: only {', '.join(PATH_METHODS)} take a path (NAME:kv or NAME:tokens)")
        if path not in ("", "kv", "tokens"):
            raise ValueError(f"{item!r}: path must be kv or tokens, got {path!r}")
        entry = Entry(name, path or ("kv" if name in PATH_METHODS else ""))
        if entry not in entries:
            entries.append(entry)
    return entries


@dataclasses.dataclass
class BenchSettings:
    backbone: str = "vit_small_patch16_224"
    methods: list[Entry] = dataclasses.field(default_factory=lambda: parse_methods(DEFAULT_METHODS))
    num_prompts: int = 50
    batch_size: int = 8  # for FLOPs and timings
    memory_batch_size: int = 32  # for peak training memory
    precision: str = "fp32"  # "fp32" | "bf16" (autocast)
    grad_checkpointing: bool = False
    rounds: int = 5
    warmup: int = 1
    clock: str = "wall"  # "wall" | "cpu": this process's CPU time (CPU only), steadier on a shared machine
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # CPU threads (torch.set_num_threads); None: torch's default
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # for timm.create_model

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be wall or cpu, got {self.clock!r}")
        for name in ("num_prompts", "batch_size", "memory_batch_size", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        device = resolve_device(self.device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        self.device = str(device)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


# --- models and steps -----------------------------------------------------------------------


def create_backbone(settings: BenchSettings) -> nn.Module:
    """A random-weight timm backbone without its classifier, frozen, in eval mode."""
    import timm

    try:
        backbone = timm.create_model(settings.backbone, pretrained=False, num_classes=0, **settings.model_kwargs)
    except RuntimeError as err:
        raise ValueError(f"cannot create backbone {settings.backbone!r}: {err}") from None
    return backbone.requires_grad_(False).eval().to(settings.device)


class FrozenBackbone(nn.Module):
    """The backbone alone, to pooled features, walked exactly as a PromptModel walks it (so with
    token pooling its last block also computes only the class token): every ratio's reference."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return family_of(self.backbone).frozen_features(images)


def build_model(entry: Entry, backbone: nn.Module, settings: BenchSettings) -> nn.Module:
    """The model a row measures: the frozen backbone alone, or a PromptModel around it."""
    config = entry.config(settings.num_prompts)
    if config is None:
        return FrozenBackbone(backbone)
    model = PromptModel(backbone, config, NUM_CLASSES).to(settings.device)
    model.set_grad_checkpointing(settings.grad_checkpointing)
    return model


def random_batch(backbone: nn.Module, batch: int, device: str) -> tuple[Tensor, Tensor]:
    """Images at the backbone's input size, and labels."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, *family_of(backbone).input_size(), generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def autocast(settings: BenchSettings):
    if settings.precision == "bf16":
        return torch.autocast(settings.device_type, dtype=torch.bfloat16)
    return nullcontext()


def inference_step(model: nn.Module, images: Tensor, settings: BenchSettings) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.no_grad(), autocast(settings):
            model(images)

    return step


def training_step(model: PromptModel, images: Tensor, labels: Tensor, settings: BenchSettings) -> Callable[[], None]:
    """One full optimizer step (SGD with momentum, as VPT trains) on the tuned parameters."""
    optimizer = torch.optim.SGD(model.tuned_parameters().values(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        with autocast(settings):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], device: str, clock: str = "wall") -> float:
    """Seconds ``step()`` takes: CUDA events on a GPU, so queued work is counted; on CPU the wall
    clock, or with ``clock="cpu"`` the CPU time of this process (all its threads), which other
    processes competing for the cores do not inflate."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    now = time.process_time if clock == "cpu" else time.perf_counter
    begin = now()
    step()
    return now() - begin


# --- peak training memory, in a fresh process -----------------------------------------------


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the running sum of tensor allocations minus frees while ``step()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def peak_training_memory(settings: BenchSettings, entry: Entry) -> float:
    """MiB a training step of ``entry`` needs above its resting footprint (run it in a fresh process)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    backbone = create_backbone(settings)
    model = build_model(entry, backbone, settings)
    images, labels = random_batch(backbone, settings.memory_batch_size, settings.device)
    step = training_step(model, images, labels, settings)
    step()  # creates the optimizer state: part of the resting footprint, not of the step
    if settings.device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - resting
    else:
        peak = _cpu_peak_bytes(step)
    return peak / 2**20


def _memory_probe(request: str) -> None:
    """Entry point of the fresh process: print the peak for the JSON ``request``."""
    data = json.loads(request)
    entry = Entry(*data.pop("entry"))
    settings = BenchSettings(**data, methods=[entry])
    print(json.dumps(peak_training_memory(settings, entry)))


def measure_memory(settings: BenchSettings, entries: Sequence[Entry]) -> dict[Entry, float]:
    """Peak training memory per entry, each in its own fresh Python process."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "methods"}
    results = {}
    for entry in entries:
        request = json.dumps({**fields, "entry": [entry.name, entry.path]})
        code = f"from vptune.bench import _memory_probe; _memory_probe({request!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe for {entry.label} failed:\n{done.stderr[-4000:]}")
        results[entry] = float(done.stdout.strip().splitlines()[-1])
    return results


# --- the benchmark ----------------------------------------------------------------------------


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else round(num / den, 3)


def run_bench(settings: BenchSettings, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every row of the benchmark, as dicts with exactly the keys ``KEYS``."""
    say = progress or (lambda message: None)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    backbone = create_backbone(settings)
    images, labels = random_batch(backbone, settings.batch_size, settings.device)
    entries = settings.methods
    models = {entry: build_model(entry, backbone, settings) for entry in entries}
    backbone_params = sum(p.numel() for p in backbone.parameters())

    flops: dict[Entry, float] = {}
    for entry, model in models.items():
        model.eval()
        with torch.no_grad():
            model(images)  # fills the prompt key/value cache, as in serving
            flops[entry] = count_flops(lambda: model(images)) / settings.batch_size / 1e9
    say("counted FLOPs")

    steps: dict[Entry, dict[str, Callable[[], None]]] = {}
    for entry, model in models.items():
        steps[entry] = {"infer": inference_step(model, images, settings)}
        if isinstance(model, PromptModel):
            steps[entry]["train"] = training_step(model, images, labels, settings)
    times: dict[Entry, dict[str, list[float]]] = {entry: {kind: [] for kind in s} for entry, s in steps.items()}
    for round_ in range(settings.warmup + settings.rounds):
        for entry, kinds in steps.items():  # interleaved: every method once per round
            for kind, step in kinds.items():
                seconds = timed(step, settings.device, settings.clock)
                if round_ >= settings.warmup:
                    times[entry][kind].append(seconds)
        if round_ >= settings.warmup:
            say(f"timing round {round_ - settings.warmup + 1}/{settings.rounds}")
    median = {entry: {kind: statistics.median(t) for kind, t in kinds.items()} for entry, kinds in times.items()}

    trainable = [entry for entry in entries if entry.name != BACKBONE]
    reference = Entry(MEMORY_REFERENCE)
    reference_settings = dataclasses.replace(settings, grad_checkpointing=False)
    memory = measure_memory(settings, trainable)
    if reference not in memory or settings.grad_checkpointing:
        memory_reference = measure_memory(reference_settings, [reference])[reference]
    else:
        memory_reference = memory[reference]
    say("measured peak training memory")

    base = entries[0]
    rows = []
    for entry, model in models.items():
        tuned = model.num_tuned_parameters() if isinstance(model, PromptModel) else 0
        infer, train = median[entry]["infer"], median[entry].get("train")
        peak = memory.get(entry)
        rows.append({
            "method": BACKBONE if entry.name == BACKBONE else model.config.method_name(),
            "path": entry.path,
            "tuned_params": tuned,
            "tuned_percent": round(100.0 * tuned / backbone_params, 4),
            "gflops": round(flops[entry], 6),
            "extra_gflops": round(flops[entry] - flops[base], 6),
            "infer_img_s": round(settings.batch_size / infer, 2),
            "train_img_s": None if train is None else round(settings.batch_size / train, 2),
            "peak_mem_mb": None if peak is None else round(peak, 1),
            "infer_ratio": _ratio(infer, median[base]["infer"]),
            "train_ratio": _ratio(train, median[base]["infer"]),
            "mem_ratio": _ratio(peak, memory_reference),
        })
    return rows


# --- output -----------------------------------------------------------------------------------


def write_json(rows: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(rows, indent=2) + "\n")


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=KEYS)
        writer.writeheader()
        writer.writerows(rows)


def table(rows: list[dict[str, Any]], title: str = ""):
    """The rows as a rich Table."""
    from rich.table import Table

    result = Table(title=title)
    for key in KEYS:
        result.add_column(key, justify="left" if key in ("method", "path") else "right")
    for row in rows:
        result.add_row(*["-" if row[key] is None else str(row[key]) for key in KEYS])
    return result
