"""MultiTaskModel: many tuned tasks on one frozen backbone, a mixed-task batch in one pass.

A prompt method changes the backbone only through what it adds to attention (prompt keys
and values, key-value prompts, a key mask), a term on the attention output (APT) or an
offset on the tokens (VPT "add"). All of these can differ per sample, so one backbone pass
can serve a batch in which every image belongs to another task:

- prompts whose outputs are discarded after a block (VPT-deep, E2VPT; VPT-shallow in its
  last block) act as per-sample extra keys/values. They do not depend on the image, so each
  task's keys/values for every block are computed once and cached (the "bank"); a batch
  gathers them per sample, padded to the longest and masked with a ``-inf`` key bias;
- prompts whose outputs flow on to the next block (VPT-shallow, deep prompts in a subset of
  blocks) ride in a per-sample token segment after the prefix tokens, padded and masked
  the same way, and are carried from block to block per task;
- the batch is sorted by task and split into at most three row groups (tasks with prompt
  tokens in some block, tasks with extra keys/values only, the rest), each one
  ``block_forward`` per block, so no image pays for another group's tokens or keys;
- APT's attention-output term and VPT's token offsets are applied to each task's rows;
- each task keeps its own head and label set.

Why not ``run_blocks``: it carries one prompt slot per batch and decides once per block
whether the slot goes through the block or only gives keys/values, with one key bias per
forward. A mixed batch needs those decisions per sample, so this module walks the blocks
with the same parts (the family's ``block_forward`` and ``prompt_keys_values``, the methods'
own hooks);
the tests hold every task's rows to its own ``PromptModel`` output.

Methods that tune backbone weights (full, partial, BitFit, LoRA) change what every layer
computes for their images and are refused with the reason.

Some tasks get their own pass instead (``_own_pass``): the task's own ``PromptModel`` on the
shared backbone, once per task and batch, over that task's rows only; the other tasks of the
batch still share the mixed pass. Vision-language runs (VQA, NLVR, retrieval on a ViLT or a
METER, ``answer_vl``) go this way, since each run has its own copies of ViLT's pooler and token
types; so do the Swin tasks below.

Families: every token-sequence family (ViT, Eva: EVA-02, DINOv3, RoPE ViTs; BEiT; open_clip's
own towers, and its timm towers through their trunk's family) walks as above, every task in the
mixed pass. Swin walks its stages with the same banks, each sample's extra keys/values appended
in every window of its image (``SwinFamily.grid_walk``): VPT-deep and E2VPT with prompts in
every block (the paper's pool), APT, linear and MLP heads share that pass. A Swin task whose
prompt tokens go through a block (VPT-shallow, deep prompts in a subset of blocks, the official
``pool=True``) gets its own pass: those tokens live in every window, are carried per window or
averaged over the windows, are dropped or tiled through patch merging and join the final pool
or not, all under the task's own ``swin=`` options and prompt count, so mixing them would
re-write the Swin walk per sample; its own pass costs the same arithmetic for its rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..backbones.family import SequenceFamily, family_of
from ..model import WEIGHTS_FILE, PromptModel, read_run_config

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

_NOT_MIXABLE = {
    "full": "full fine-tuning changes every backbone weight, so its images need a backbone of their own",
    "partial": "partial fine-tuning changes the last blocks' weights, so its images need those blocks of their own",
    "bias": (
        "BitFit changes every bias of the backbone (patch embedding, LayerNorms, attention, MLP); a shared pass "
        "would need a per-sample bias in every layer, which the mixed pass does not re-compose"
    ),
    "lora": (
        "LoRA changes the weights of the attention projections; a shared pass would need per-sample low-rank "
        "updates inside every projection, which the mixed pass does not re-compose"
    ),
}


OWN_PASS = 3  # Task.group of a classification task answered by its own PromptModel within the batch


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ValueError(
            f"invalid task name {name!r}: expected 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


def check_head_size(run: Mapping, run_dir: Path) -> None:
    """Refuse a run whose ``num_classes`` disagrees with its saved head before building anything,
    so a damaged or hostile ``config.json`` (an absurd class count) costs no memory."""
    from safetensors import SafetensorError, safe_open

    classes = run.get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ValueError(f"{run_dir / 'config.json'}: num_classes must be a positive integer, got {classes!r}")
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run folder has a config but no weights")
    try:
        with safe_open(str(path), "pt") as weights:
            heads = {key: weights.get_slice(key).get_shape() for key in weights.keys() if key.startswith("head.") and key.endswith(".bias")}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): the run folder is damaged") from None
    if heads:
        last = max(heads, key=lambda key: [int(part) for part in key.split(".") if part.isdigit()])
        if heads[last] != [classes]:
            raise ValueError(
                f"{run_dir / 'config.json'} says num_classes {classes}, but its head {last} in {WEIGHTS_FILE} has "
                f"shape {heads[last]}: the run folder is damaged or was edited; write it again with save_pretrained"
            )


@dataclasses.dataclass(eq=False)
class Task:
    """A loaded run and how its prompts travel through the blocks.

    Compared and hashed by identity: a task replaced under the same name is another ``Task``,
    and a request that holds the old one is still computed with it."""

    name: str
    run_dir: Path | None  # None: added in memory with add_model
    model: PromptModel  # its method and head; its backbone is the shared one
    plan: tuple[str | None, ...]  # per block: None (no prompts), "kv" (keys/values only) or "tokens" (carried on)
    num_prompts: int  # prompt tokens per prompted block (0: none)
    key_bias: Tensor | None  # (p,) the method's log-mask on its prompt tokens
    labels: list[str]
    group: int  # 0: prompt tokens go through some block; 1: extra keys/values only; 2: neither; OWN_PASS: its own pass
    banks: dict = dataclasses.field(default_factory=dict, repr=False)  # cached keys/values per device/dtype
    kind: str = "classification"  # or a vision-language task: vqa, nlvr, retrieval
    tokenizer: object = dataclasses.field(default=None, repr=False)  # a vision-language task's text tokenizer

    @property
    def method_name(self) -> str:
        return self.model.config.method_name()

    @property
    def reads_text(self) -> bool:
        return self.kind != "classification"

    @property
    def images(self) -> tuple[int, int]:
        """How many images one request holds: (fewest, most; 0: no limit but the server's)."""
        return {"vqa": (1, 1), "nlvr": (2, 2), "retrieval": (1, 0)}.get(self.kind, (1, 0))

    def encode_text(self, text: str) -> tuple[Tensor, Tensor, list[str]]:
        """``input_ids`` and ``attention_mask`` (1, T) of ``text`` as the run was trained (the
        run's tokenizer, padded to the model's text length); a longer text is truncated, as in
        the data, and the warning is returned with them."""
        import warnings

        from ..data.vl import encode_texts

        family = self.model.family
        length = min(getattr(self.tokenizer, "model_max_length", None) or family.text_length(), family.text_length())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = encode_texts(self.tokenizer, [text], length, ["the text"])
        return ids, mask, [str(w.message) for w in caught]


@dataclasses.dataclass
class _Bank:
    """A task's cached extra keys/values, per block (H_i, M, Dh_i) (Swin's heads change between
    stages), left-aligned; ``bias`` (depth, M) is 0 or the task's key mask where real and -inf
    where padded."""

    keys: list[Tensor]
    values: list[Tensor]
    bias: Tensor
    count: list[int]  # real entries per block
    masked: bool  # the task's own key mask is not all zero


def _prompt_plan(layers: frozenset[int], depth: int) -> tuple[str | None, ...]:
    """Per block: where a task's prompt slot goes. Outputs discarded after the block (the next
    block brings fresh prompts, or it is the last) need only keys/values (exact); otherwise the
    prompt tokens go through the block and their outputs are carried on."""
    plan: list[str | None] = []
    live = False
    for i in range(depth):
        live = live or i in layers
        if not live:
            plan.append(None)
            continue
        discarded = i + 1 == depth or i + 1 in layers
        plan.append("kv" if discarded else "tokens")
        live = not discarded
    return tuple(plan)


class MultiTaskModel(nn.Module):
    """Tuned runs (``PromptModel.save_pretrained`` folders) of many tasks on one frozen backbone.

    ``forward(images, tasks)`` runs a batch in which sample j belongs to ``tasks[j]`` through
    one backbone pass (a Swin task whose prompt tokens go through blocks: its own pass over its
    rows, beside it) and returns one logits vector per sample, over that task's classes.
    Tasks can be added and removed while serving; the model is for inference only.
    """

    def __init__(self, backbone: nn.Module, runs: Mapping[str, str | os.PathLike] | None = None) -> None:
        super().__init__()
        family = family_of(backbone)
        walker = getattr(family, "trunk_family", family)  # open_clip's timm tower: its trunk's family walks the blocks
        # A vision-language backbone serves only vision-language tasks, each answered by its own
        # PromptModel (answer_vl), so it needs no mixed walk (METER's two streams have none).
        if not family.reads_text and not isinstance(walker, SequenceFamily) and not hasattr(walker, "grid_walk"):
            raise TypeError(
                f"mixed-task serving walks token-sequence families (ViT, Eva, BEiT, open_clip) and Swin, and serves "
                f"vision-language families (ViLT, METER); {walker.name} is none of them"
            )
        self.family = family  # embedding and pooling (open_clip's tower adds its projection)
        self.walker = walker  # the blocks
        self.windows = not isinstance(walker, SequenceFamily) and not family.reads_text  # Swin: extra keys in every window of a grid
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.tasks = nn.ModuleDict()  # "task_NAME": a task may be called "half" or "train", which ModuleDict has
        self._info: dict[str, Task] = {}
        self._lock = threading.RLock()
        for name, run_dir in (runs or {}).items():
            self.add_task(name, run_dir)

    # --- tasks -------------------------------------------------------------------------------
    def add_task(self, name: str, run_dir: str | os.PathLike, replace: bool = False) -> Task:
        """Load the run in ``run_dir`` as task ``name``; refuse, with the reason, one that cannot
        share this backbone's pass (other backbone, or a method that tunes backbone weights).
        ``replace=True`` swaps a loaded task of that name for the new run in one step."""
        return self.put(self.load_task(name, run_dir), replace)

    def load_task(self, name: str, run_dir: str | os.PathLike) -> Task:
        """Read and check a run folder into a ``Task`` without serving it. No lock is held while
        the folder is read, so the tasks being served are never held up by a slow load."""
        check_task_name(name)
        run_dir = Path(run_dir)
        run = read_run_config(run_dir)
        method = run["method_config"]["method"]
        if method in _NOT_MIXABLE:
            raise ValueError(
                f"run {run_dir} ({method}) cannot join a mixed-task batch: {_NOT_MIXABLE[method]}. "
                "Serve it on its own with PromptModel.from_pretrained"
            )
        check_head_size(run, run_dir)
        return self._task_of(name, PromptModel.from_pretrained(self.backbone, run_dir), run_dir)

    def add_model(self, name: str, model: PromptModel, run_dir: str | os.PathLike | None = None, replace: bool = False) -> Task:
        """Serve an in-memory ``PromptModel`` built on this backbone as task ``name``."""
        check_task_name(name)
        return self.put(self._task_of(name, model, None if run_dir is None else Path(run_dir)), replace)

    def replace_task(self, name: str, run_dir: str | os.PathLike) -> Task:
        """Swap task ``name`` for the run in ``run_dir`` atomically: a batch sees the old or the new
        run, never a mix, and requests that already hold the old ``Task`` finish on it."""
        return self.add_task(name, run_dir, replace=True)

    def _task_of(self, name: str, model: PromptModel, run_dir: Path | None) -> Task:
        if model.backbone is not self.backbone:
            method = model.config.method_name()
            why = _NOT_MIXABLE.get(method, "its backbone is not this model's backbone object")
            raise ValueError(
                f"task {name!r} ({method}) cannot share this backbone's pass: {why}. "
                "Build it on the same backbone, or serve it on its own"
            )
        return self._describe(name, run_dir, model.eval())

    def put(self, task: Task, replace: bool = False) -> Task:
        """Serve a ``Task`` from ``load_task``; with ``replace``, in place of the one of its name."""
        with self._lock:
            if task.name in self._info and not replace:
                old = self._info[task.name]
                raise ValueError(f"task {task.name!r} is already loaded (from {old.run_dir}); remove it first")
            self.tasks[f"task_{task.name}"] = task.model
            self._info[task.name] = task
        return task

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._info:
                raise KeyError(f"no task {name!r}; loaded tasks: {', '.join(sorted(self._info)) or 'none'}")
            del self.tasks[f"task_{name}"]
            del self._info[name]

    def task(self, name: str) -> Task:
        with self._lock:
            if name not in self._info:
                raise KeyError(f"no task {name!r}; loaded tasks: {', '.join(sorted(self._info)) or 'none'}")
            return self._info[name]

    @property
    def task_names(self) -> list[str]:
        with self._lock:
            return sorted(self._info)

    def _describe(self, name: str, run_dir: Path | None, model: PromptModel) -> Task:
        method, depth = model.method, len(self.family.sites)
        layers = frozenset(method.prompt_layers)
        num_prompts, key_bias = 0, None
        with torch.no_grad():
            if layers:
                num_prompts = method.prompts(min(layers), 1).shape[1]
                bias = method.prompt_key_bias(1)
                if bias is not None:
                    if bias.shape[0] != 1:
                        raise ValueError(f"task {name!r}: its prompt mask is per sample (B, p); a served task needs one mask (p,)")
                    key_bias = bias[0].detach()
        names = model.metadata.get("class_names")
        labels = [str(n) for n in names] if isinstance(names, list) and len(names) == model.num_classes else None
        plan = _prompt_plan(layers, depth)
        # Swin prompt tokens through blocks (or into the final pool): the task's own pass (module docstring).
        own = self.windows and ("tokens" in plan or (plan[-1] == "kv" and self.walker.options(method)["pool"]))
        extra_keys = "kv" in plan or any(method.kv_prompts(i) is not None for i in range(depth))
        kind, tokenizer = model.task.name, None
        if kind != "classification":  # answered by the run's own PromptModel on the shared backbone
            from ..train.run import tokenizer_for

            tokenizer = tokenizer_for("", None, False, model.metadata.get("tokenizer", "word"))
            labels = {"vqa": list(getattr(model.task, "answers", [])), "nlvr": ["false", "true"]}.get(kind, ["match"])
        elif self.family.reads_text:
            raise ValueError(f"task {name!r} classifies images, but this backbone ({self.family.name}) reads images with text")
        return Task(
            name=name, run_dir=run_dir, model=model, plan=plan, num_prompts=num_prompts, key_bias=key_bias,
            labels=labels or [str(i) for i in range(model.num_classes)],
            group=OWN_PASS if own else 0 if "tokens" in plan else 1 if extra_keys else 2,
            kind=kind, tokenizer=tokenizer,
        )

    # --- the cached keys/values ----------------------------------------------------------------
    def _bank(self, task: Task, like: Tensor) -> _Bank:
        """The task's input-independent extra keys/values per block: fresh prompts whose outputs
        are discarded, then E2VPT's key-value prompts; cached per device, dtype and autocast."""
        kind = like.device.type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cpu", "cuda") else ()
        key = (like.device, like.dtype, autocast)
        bank = task.banks.get(key)
        if bank is not None:
            return bank
        method, sites = task.model.method, self.walker.sites
        parts: list[tuple[Tensor, Tensor, Tensor] | None] = []
        for i in range(len(sites)):
            ks, vs, bs = [], [], []
            if task.plan[i] == "kv" and i in method.prompt_layers:
                k, v = self.walker.prompt_keys_values(i, method.prompts(i, 1))  # 1, H, p, Dh
                ks.append(k[0]), vs.append(v[0])
                bs.append(k.new_zeros(task.num_prompts) if task.key_bias is None else task.key_bias.to(k))
            kv = method.kv_prompts(i)
            if kv is not None:
                ks.append(kv[0][0]), vs.append(kv[1][0])
                bs.append(kv[0].new_zeros(kv[0].shape[2]))
            parts.append((torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(bs)) if ks else None)
        count = [0 if part is None else part[2].numel() for part in parts]
        width = max(count)
        keys = [like.new_zeros(site.num_heads, width, site.head_dim) for site in sites]
        values, bias = [torch.zeros_like(k) for k in keys], like.new_full((len(sites), width), float("-inf"))
        for i, part in enumerate(parts):
            if part is not None:
                keys[i][:, : count[i]], values[i][:, : count[i]], bias[i, : count[i]] = part
        masked = task.key_bias is not None and bool((task.key_bias != 0).any())
        bank = task.banks[key] = _Bank(keys, values, bias.float(), count, masked)
        return bank

    # --- the mixed pass ----------------------------------------------------------------------
    def forward(self, images: Tensor, tasks: Sequence[str | Task] | str | Task) -> list[Tensor]:
        """Logits (C_t,) for each image, over the classes of its task ``tasks[j]``: a task name,
        or a ``Task`` taken earlier (a server holds it from the request's arrival, so a task
        replaced or removed meanwhile still answers the requests that came for it)."""
        if isinstance(tasks, (str, Task)):
            tasks = [tasks] * images.shape[0]
        if len(tasks) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(tasks)} task names: give one task per image")
        with self._lock, torch.no_grad():
            tasks = [task if isinstance(task, Task) else self.task(task) for task in tasks]
            if any(task.reads_text for task in tasks):
                raise ValueError("vision-language tasks read text with their images: answer them with answer_vl")
            info = list(dict.fromkeys(tasks))
            info.sort(key=lambda task: task.group)
            position = {task: j for j, task in enumerate(info)}
            order = sorted(range(len(tasks)), key=lambda j: position[tasks[j]])  # each task's rows contiguous
            sizes = Counter(position[name] for name in tasks)
            ends = list(itertools.accumulate(sizes[j] for j in range(len(info))))
            spans = [slice(end - sizes[j], end) for j, end in enumerate(ends)]
            if order != sorted(order):
                images = images[torch.tensor(order, device=images.device)]
            mixed = sum(task.group < OWN_PASS for task in info)  # own-pass tasks sort last: the mixed rows come first
            logits = []
            if mixed:
                x, aux = self.family.embed(images[: spans[mixed - 1].stop])
                features = self.family.pooled_features(self._walk(x, aux, info[:mixed], spans[:mixed]))  # Swin: the grid's pool
                logits = [task.model.head(features[span]) for task, span in zip(info[:mixed], spans)]
            logits += [self._own_pass(task, images[span]) for task, span in zip(info[mixed:], spans[mixed:])]
            out: list[Tensor | None] = [None] * len(tasks)
            for span, rows in zip(spans, logits):
                for j, row in zip(order[span], rows):
                    out[j] = row
            return out  # type: ignore[return-value]

    def answer_vl(self, task: Task | str, inputs: Mapping[str, Tensor]) -> Tensor:
        """A vision-language task's head outputs for a batch dict (``image`` or ``image0`` and
        ``image1``, ``input_ids``, ``attention_mask``): its own pass (its pooler and token types
        are its own, so rows of different vision-language tasks are not mixed in one pass)."""
        with self._lock:
            task = task if isinstance(task, Task) else self.task(task)
            if not task.reads_text:
                raise ValueError(f"task {task.name!r} classifies images: call the model with images")
            return self._own_pass(task, inputs)

    def _own_pass(self, task: Task, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The task's own ``PromptModel`` on the shared frozen backbone, over its rows only: for
        the tasks whose prompts the mixed pass does not re-compose (module docstring)."""
        with self._lock, torch.no_grad():
            return task.model(inputs)

    def _walk(self, x: Tensor, aux, info: list[Task], spans: list[slice]) -> Tensor:
        """The blocks over the task-sorted batch, in up to three row groups: tasks whose prompt
        tokens go through blocks, tasks with extra keys/values only, and the rest. Each group is
        one ``block_forward`` per block, so no row pays for another group's tokens or keys."""
        banks = [self._bank(task, x) for task in info]
        groups = []  # (rows, task indices, their stacked banks): contiguous, in sorted order
        for group in (0, 1, 2):
            members = [j for j, task in enumerate(info) if task.group == group]
            if members:
                rows = slice(spans[members[0]].start, spans[members[-1]].stop)
                groups.append((rows, members, _stack([banks[j] for j in members], [spans[j] for j in members])))
        if self.windows:
            return self.walker.grid_walk(x, lambda i, grid: self._window_block(i, grid, info, spans, banks, groups))
        slot: Tensor | None = None  # prompt tokens (rows of group 0, P, d) carried out of the last block
        depth, pooled = len(self.walker.sites), self.walker.pooled_outputs()
        for i in range(depth):
            x = _offsets(i, x, info, spans)
            outputs = []
            for rows, members, stack in groups:
                local = [slice(spans[j].start - rows.start, spans[j].stop - rows.start) for j in members]
                out, carried = self._block(
                    i, aux, x[rows], [info[j] for j in members], local, [banks[j] for j in members],
                    stack, slot if info[members[0]].group == 0 else None, pooled if i + 1 == depth else None,
                )
                if info[members[0]].group == 0:
                    slot = carried
                outputs.append(out)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return x

    def _block(
        self, i: int, aux, x: Tensor, info: list[Task], spans: list[slice], banks: list[_Bank],
        stack: tuple | None, slot: Tensor | None, queries: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Block ``i`` over rows ``x`` (n, N, d) of the tasks ``info`` (rows ``spans``): per-sample
        prompt tokens, per-sample extra keys/values, one key mask where rows differ. ``queries``:
        only the first tokens' outputs are computed (the last block under token pooling, where
        no prompt token goes through the block)."""
        n, N, d = x.shape
        prefix = self.walker.num_prefix_tokens
        needs_mask = False
        # Prompt tokens that go through this block: fresh ones, or those carried from the last.
        tokens = token_bias = None
        through = [(task, span) for task, span in zip(info, spans) if task.plan[i] == "tokens"]
        if through:
            width = max(task.num_prompts for task, _ in through)
            tokens, token_bias = x.new_zeros(n, width, d), x.new_full((n, width), float("-inf"))
            for task, span in through:
                method, p = task.model.method, task.num_prompts
                tokens[span, :p] = method.prompts(i, 1).to(x.dtype) if i in method.prompt_layers else slot[span, :p]
                token_bias[span, :p] = 0.0 if task.key_bias is None else task.key_bias
                needs_mask |= p < width or task.key_bias is not None
            needs_mask |= len(through) < len(info)
        # Extra keys/values: the cached bank, then carried prompts this block discards.
        ks, vs, biases = [], [], []
        parts = _bank_rows(i, n, banks, stack)
        if parts is not None:
            ks.append(parts[0]), vs.append(parts[1]), biases.append(parts[2])
            needs_mask |= parts[3]
        late = [(task, span) for task, span in zip(info, spans) if task.plan[i] == "kv" and i not in task.model.method.prompt_layers]
        if late:
            site, width = self.walker.sites[i], max(task.num_prompts for task, _ in late)
            late_k = x.new_zeros(n, site.num_heads, width, site.head_dim)
            late_v, late_bias = torch.zeros_like(late_k), x.new_full((n, width), float("-inf"))
            for task, span in late:
                p = task.num_prompts
                k, v = self.walker.prompt_keys_values(i, slot[span, :p])  # m, H, p, Dh: these depend on the image
                late_k[span, :, :p], late_v[span, :, :p] = k.to(x.dtype), v.to(x.dtype)
                late_bias[span, :p] = 0.0 if task.key_bias is None else task.key_bias
                needs_mask |= p < width or task.key_bias is not None
            ks.append(late_k), vs.append(late_v), biases.append(late_bias)
            needs_mask |= len(late) < len(info)
        k = v = None
        if len(ks) > 1:
            k = torch.cat([part.expand(n, -1, -1, -1) for part in ks], 2)  # n, H, M, Dh
            v = torch.cat([part.expand(n, -1, -1, -1) for part in vs], 2)
        elif ks:
            k, v = ks[0], vs[0]
        seq = x if tokens is None else torch.cat([x[:, :prefix], tokens, x[:, prefix:]], dim=1)  # n, N+P, d
        bias = None
        if needs_mask:
            rows = 1 if tokens is None and all(part.shape[0] == 1 for part in biases) else n
            parts = [x.new_zeros(rows, prefix), *([] if tokens is None else [token_bias]), x.new_zeros(rows, N - prefix)]
            parts += [part.to(x.dtype).expand(rows, -1) for part in biases]
            bias = torch.cat(parts, dim=1)[:, None, None, :]  # n|1, 1, 1, N+P+M
        hook = _attention_hook(i, info, spans)
        seq = self.walker.block_forward(i, seq, aux, k, v, bias, hook, queries, 0 if tokens is None else tokens.shape[1])
        if tokens is None:
            return seq, None
        p = tokens.shape[1]
        return torch.cat([seq[:, :prefix], seq[:, prefix + p :]], dim=1), seq[:, prefix : prefix + p]

    def _window_block(self, i: int, x: Tensor, info: list[Task], spans: list[slice], banks: list[_Bank], groups) -> Tensor:
        """Swin block ``i`` over the task-sorted grid ``x`` (B, H, W, C), a row group at a time:
        each sample's extra keys/values (from its task's bank) in every window of its image."""
        outputs = []
        for rows, members, stack in groups:
            grid = x[rows]
            n = grid.shape[0]
            k = v = bias = None
            parts = _bank_rows(i, n, [banks[j] for j in members], stack)
            if parts is not None:
                windows = self.walker.num_windows(i, grid)
                k, v = (_per_window(part, windows) for part in parts[:2])  # n*nW|1, H, M, Dh
                bias = parts[2].to(grid.dtype) if parts[3] else None  # n|1, M: the Swin walk puts it in every window
            local = [slice(spans[j].start - rows.start, spans[j].stop - rows.start) for j in members]
            hook = _attention_hook(i, [info[j] for j in members], local)
            outputs.append(self.walker.block_forward(i, grid, None, k, v, bias, 0, hook, False)[0])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _per_window(t: Tensor, windows: int) -> Tensor:
    """Per-sample rows (n|1, ...) for the window batch (n*nW|1, ...); windows are image by image."""
    return t if t.shape[0] == 1 else t.repeat_interleave(windows, dim=0)


def _bank_rows(i: int, n: int, banks: list[_Bank], stack) -> tuple[Tensor, Tensor, Tensor, bool] | None:
    """Block ``i``'s cached extra keys and values (n|1, H, M, Dh) for a row group of ``n`` samples,
    their bias (n|1, M), and whether that bias must be applied (some entries padded or masked);
    None when no task of the group has extra keys in this block."""
    used = max(bank.count[i] for bank in banks)
    if not used:
        return None
    keys, values, bias, repeats = stack
    parts = (keys[i][:, :, :used], values[i][:, :, :used], bias[:, i, :used])  # T, H, M, Dh (twice); T, M
    if repeats is not None:  # one row per sample
        parts = tuple(part.repeat_interleave(repeats, dim=0, output_size=n) for part in parts)
    return (*parts, any(bank.masked or bank.count[i] < used for bank in banks))


def _offsets(i: int, x: Tensor, info: list[Task], spans: list[slice]) -> Tensor:
    """VPT "add" prompts: each task's token offset on its own rows."""
    offsets = [task.model.method.token_offset(i) for task in info]
    if all(offset is None for offset in offsets):
        return x
    return torch.cat([x[span] if offset is None else x[span] + offset for offset, span in zip(offsets, spans)])


def _attention_hook(i: int, info: list[Task], spans: list[slice]):
    """The tasks' attention-output terms (APT), each applied to its own rows."""
    hooks = [task.model.method.attention_output(i) for task in info]
    if all(hook is None for hook in hooks):
        return None
    if len(hooks) == 1:
        return hooks[0]

    def mixed(u: Tensor, a: Tensor) -> Tensor:
        f = a.shape[0] // spans[-1].stop  # rows per sample: 1, or Swin's windows per image
        rows = [slice(span.start * f, span.stop * f) for span in spans]
        return torch.cat([a[r] if hook is None else hook(u[r], a[r]) for hook, r in zip(hooks, rows)])

    return mixed


def _stack(banks: list[_Bank], spans: list[slice]) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor | None] | None:
    """A group's banks padded (masked) to one width and stacked: keys and values per block
    (T, H, M, Dh), bias (T, D, M), and how many rows each task has (None for one task, which
    broadcasts)."""
    width = max(bank.keys[0].shape[1] for bank in banks)
    if not width:
        return None
    if len(banks) == 1:
        bank = banks[0]
        return [k[None] for k in bank.keys], [v[None] for v in bank.values], bank.bias[None], None
    padded = [_pad(bank, width) for bank in banks]
    repeats = torch.tensor([span.stop - span.start for span in spans], device=banks[0].bias.device)
    depth = len(banks[0].keys)
    keys = [torch.stack([p[0][i] for p in padded]) for i in range(depth)]
    values = [torch.stack([p[1][i] for p in padded]) for i in range(depth)]
    return keys, values, torch.stack([p[2] for p in padded]), repeats


def _pad(bank: _Bank, width: int) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The bank padded to ``width`` entries per block; the padding is masked with -inf."""
    extra = width - bank.keys[0].shape[1]
    if not extra:
        return bank.keys, bank.values, bank.bias

    def pad(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros(t.shape[0], extra, t.shape[2])], 1)

    return (
        [pad(k) for k in bank.keys],
        [pad(v) for v in bank.values],
        torch.cat([bank.bias, bank.bias.new_full((bank.bias.shape[0], extra), float("-inf"))], 1),
    )
