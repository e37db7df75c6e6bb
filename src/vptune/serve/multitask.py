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
- APT's attention-output term and VPT's token offsets are applied to each task's rows;
- each task keeps its own head and label set.

Why not ``run_blocks``: it carries one prompt slot per batch and decides once per block
whether the slot goes through the block or only gives keys/values, with one key bias per
forward. A mixed batch needs those decisions per sample, so this module walks the blocks
with the same parts (``block_forward``, ``prompt_keys_values``, the methods' own hooks);
the tests hold every task's rows to its own ``PromptModel`` output.

Methods that tune backbone weights (full, partial, BitFit, LoRA) change what every layer
computes for their images and are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..attention import block_forward, prompt_keys_values
from ..backbones.vit import check_backbone, embed, pooled_features
from ..model import PromptModel, read_run_config

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


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ValueError(
            f"invalid task name {name!r}: expected 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


@dataclasses.dataclass
class Task:
    """A loaded run and how its prompts travel through the blocks."""

    name: str
    run_dir: Path
    model: PromptModel  # its method and head; its backbone is the shared one
    plan: tuple[str | None, ...]  # per block: None (no prompts), "kv" (keys/values only) or "tokens" (carried on)
    num_prompts: int  # prompt tokens per prompted block (0: none)
    key_bias: Tensor | None  # (p,) the method's log-mask on its prompt tokens
    labels: list[str]

    @property
    def method_name(self) -> str:
        return self.model.config.method_name()


@dataclasses.dataclass
class _Bank:
    """A task's cached extra keys/values for every block, (depth, H, M, Dh), left-aligned;
    ``bias`` (depth, M) is 0 or the task's key mask where real and -inf where padded."""

    keys: Tensor
    values: Tensor
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
    one backbone pass and returns one logits vector per sample, over that task's classes.
    Tasks can be added and removed while serving; the model is for inference only.
    """

    def __init__(self, backbone: nn.Module, runs: Mapping[str, str | os.PathLike] | None = None) -> None:
        super().__init__()
        check_backbone(backbone)
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.tasks = nn.ModuleDict()
        self._info: dict[str, Task] = {}
        self._banks: dict[tuple, _Bank] = {}
        self._lock = threading.RLock()
        for name, run_dir in (runs or {}).items():
            self.add_task(name, run_dir)

    # --- tasks -------------------------------------------------------------------------------
    def add_task(self, name: str, run_dir: str | os.PathLike) -> Task:
        """Load the run in ``run_dir`` as task ``name``; refuse, with the reason, one that cannot
        share this backbone's pass (other backbone, or a method that tunes backbone weights)."""
        check_task_name(name)
        run_dir = Path(run_dir)
        run = read_run_config(run_dir)
        method = run["method_config"]["method"]
        if method in _NOT_MIXABLE:
            raise ValueError(
                f"run {run_dir} ({method}) cannot join a mixed-task batch: {_NOT_MIXABLE[method]}. "
                "Serve it on its own with PromptModel.from_pretrained"
            )
        return self.add_model(name, PromptModel.from_pretrained(self.backbone, run_dir), run_dir)

    def add_model(self, name: str, model: PromptModel, run_dir: str | os.PathLike | None = None) -> Task:
        """Serve an in-memory ``PromptModel`` built on this backbone as task ``name``."""
        check_task_name(name)
        if model.backbone is not self.backbone:
            method = model.config.method_name()
            why = _NOT_MIXABLE.get(method, "its backbone is not this model's backbone object")
            raise ValueError(
                f"task {name!r} ({method}) cannot share this backbone's pass: {why}. "
                "Build it on the same backbone, or serve it on its own"
            )
        task = self._describe(name, Path(run_dir) if run_dir is not None else Path("<memory>"), model.eval())
        with self._lock:
            if name in self._info:
                raise ValueError(f"task {name!r} is already loaded (from {self._info[name].run_dir}); remove it first")
            self.tasks[name] = model
            self._info[name] = task
        return task

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._info:
                raise KeyError(f"no task {name!r}; loaded tasks: {', '.join(sorted(self._info)) or 'none'}")
            del self.tasks[name]
            del self._info[name]
            self._banks = {key: bank for key, bank in self._banks.items() if key[0] != name}

    def task(self, name: str) -> Task:
        with self._lock:
            if name not in self._info:
                raise KeyError(f"no task {name!r}; loaded tasks: {', '.join(sorted(self._info)) or 'none'}")
            return self._info[name]

    @property
    def task_names(self) -> list[str]:
        with self._lock:
            return sorted(self._info)

    def _describe(self, name: str, run_dir: Path, model: PromptModel) -> Task:
        method, depth = model.method, len(self.backbone.blocks)
        layers = frozenset(method.prompt_layers)
        num_prompts, key_bias = 0, None
        with torch.no_grad():
            if layers:
                num_prompts = method.prompts(min(layers), 1).shape[1]
                bias = method.prompt_key_bias(1)
                if bias is not None:
                    if bias.shape[0] != 1:
                        raise ValueError(f"run {run_dir}: its prompt mask is per sample; a served task needs one mask")
                    key_bias = bias[0].detach()
        names = model.metadata.get("class_names")
        labels = [str(n) for n in names] if isinstance(names, list) and len(names) == model.num_classes else None
        return Task(
            name=name, run_dir=run_dir, model=model, plan=_prompt_plan(layers, depth), num_prompts=num_prompts,
            key_bias=key_bias, labels=labels or [str(i) for i in range(model.num_classes)],
        )

    # --- the cached keys/values ----------------------------------------------------------------
    def _bank(self, task: Task, like: Tensor) -> _Bank:
        """The task's input-independent extra keys/values per block: fresh prompts whose outputs
        are discarded, then E2VPT's key-value prompts; cached per device, dtype and autocast."""
        kind = like.device.type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cpu", "cuda") else ()
        key = (task.name, like.device, like.dtype, autocast)
        bank = self._banks.get(key)
        if bank is not None:
            return bank
        method, blocks = task.model.method, self.backbone.blocks
        attn = blocks[0].attn
        parts: list[tuple[Tensor, Tensor, Tensor] | None] = []
        for i, block in enumerate(blocks):
            ks, vs, bs = [], [], []
            if task.plan[i] == "kv" and i in method.prompt_layers:
                k, v = prompt_keys_values(block, method.prompts(i, 1))  # 1, H, p, Dh
                ks.append(k[0]), vs.append(v[0])
                bs.append(task.key_bias if task.key_bias is not None else k.new_zeros(task.num_prompts))
            kv = method.kv_prompts(i)
            if kv is not None:
                ks.append(kv[0][0]), vs.append(kv[1][0])
                bs.append(kv[0].new_zeros(kv[0].shape[2]))
            parts.append((torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(bs)) if ks else None)
        count = [0 if part is None else part[2].numel() for part in parts]
        width = max(count)
        keys = like.new_zeros(len(blocks), attn.num_heads, width, attn.head_dim)
        values, bias = torch.zeros_like(keys), like.new_full((len(blocks), width), float("-inf"))
        for i, part in enumerate(parts):
            if part is not None:
                keys[i, :, : count[i]], values[i, :, : count[i]], bias[i, : count[i]] = part
        masked = bool((bias.isfinite() & (bias != 0)).any()) or any(c not in (0, width) for c in count)
        bank = self._banks[key] = _Bank(keys, values, bias.float(), count, masked)
        return bank

    # --- the mixed pass ----------------------------------------------------------------------
    def forward(self, images: Tensor, tasks: Sequence[str] | str) -> list[Tensor]:
        """Logits (C_t,) for each image, over the classes of its task ``tasks[j]``."""
        if isinstance(tasks, str):
            tasks = [tasks] * images.shape[0]
        if len(tasks) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(tasks)} task names: give one task per image")
        with self._lock, torch.no_grad():
            order = list(dict.fromkeys(tasks))
            info = [self.task(name) for name in order]
            local = {name: j for j, name in enumerate(order)}
            sample_task = torch.tensor([local[t] for t in tasks], device=images.device)
            rows = [torch.nonzero(sample_task == j).flatten() for j in range(len(order))]
            x = self._walk(embed(self.backbone, images), info, rows, sample_task)
            features = pooled_features(self.backbone, x)
            out: list[Tensor | None] = [None] * len(tasks)
            for task, idx in zip(info, rows):
                logits = task.model.head(features if len(info) == 1 else features[idx])
                for j, row in zip(idx.tolist(), logits):
                    out[j] = row
            return out  # type: ignore[return-value]

    def _walk(self, x: Tensor, info: list[Task], rows: list[Tensor], sample_task: Tensor) -> Tensor:
        blocks, prefix = self.backbone.blocks, self.backbone.num_prefix_tokens
        single = len(info) == 1
        banks = [self._bank(task, x) for task in info]
        width = max(bank.keys.shape[2] for bank in banks)
        bank_k = bank_v = bank_bias = None
        if width:
            pad = [(b.keys, b.values, b.bias) if b.keys.shape[2] == width else _pad_bank(b, width) for b in banks]
            if single:
                bank_k, bank_v, bank_bias = pad[0][0][None], pad[0][1][None], pad[0][2][None]  # 1, D, ...
            else:
                bank_k = torch.stack([p[0] for p in pad])[sample_task]  # B, D, H, M, Dh
                bank_v = torch.stack([p[1] for p in pad])[sample_task]
                bank_bias = torch.stack([p[2] for p in pad])[sample_task]  # B, D, M
        B = x.shape[0]
        slot: Tensor | None = None  # per-sample prompt tokens carried out of the last block (B, P, d)
        for i, block in enumerate(blocks):
            methods = [task.model.method for task in info]
            x = self._offsets(i, x, methods, rows, single)
            # Prompt tokens that go through this block (their outputs are carried on).
            carried = [(t, task) for t, task in enumerate(info) if task.plan[i] == "tokens"]
            tokens, token_bias = None, None
            if carried:
                width_t = max(task.num_prompts for _, task in carried)
                tokens = x.new_zeros(B, width_t, x.shape[2])
                token_bias = x.new_full((B, width_t), float("-inf"))
                for t, task in carried:
                    p = task.num_prompts
                    fresh = task.model.method.prompts(i, 1) if i in task.model.method.prompt_layers else None
                    source = fresh.expand(len(rows[t]), -1, -1) if fresh is not None else slot[rows[t], :p]
                    tokens[rows[t], :p] = source.to(tokens.dtype)
                    token_bias[rows[t], :p] = 0.0 if task.key_bias is None else task.key_bias
            # Carried prompts whose outputs this block discards: keys/values only (input dependent).
            late = [(t, task) for t, task in enumerate(info) if task.plan[i] == "kv" and i not in task.model.method.prompt_layers]
            late_k = late_v = late_bias = None
            if late:
                attn = block.attn
                width_l = max(task.num_prompts for _, task in late)
                late_k = x.new_zeros(B, attn.num_heads, width_l, attn.head_dim)
                late_v = torch.zeros_like(late_k)
                late_bias = x.new_full((B, width_l), float("-inf"))
                for t, task in late:
                    p = task.num_prompts
                    k, v = prompt_keys_values(block, slot[rows[t], :p])
                    late_k[rows[t], :, :p], late_v[rows[t], :, :p] = k.to(late_k.dtype), v.to(late_v.dtype)
                    late_bias[rows[t], :p] = 0.0 if task.key_bias is None else task.key_bias
            # Extra keys/values: the cached bank, then the late ones.
            extra_k, extra_v, extra_bias = [], [], []
            used = max(bank.count[i] for bank in banks) if width else 0
            if used:
                extra_k.append(bank_k[:, i, :, :used]), extra_v.append(bank_v[:, i, :, :used])
                extra_bias.append(bank_bias[:, i, :used])
            needs_mask = tokens is not None and not single
            needs_mask |= bool(used) and any(bank.masked or bank.count[i] < used for bank in banks)
            needs_mask |= tokens is not None and any(task.key_bias is not None for _, task in carried)
            if late_k is not None:
                extra_k.append(late_k), extra_v.append(late_v), extra_bias.append(late_bias)
                needs_mask |= not single or any(task.key_bias is not None for _, task in late)
            k = v = None
            if len(extra_k) > 1:
                k = torch.cat([part.expand(B, -1, -1, -1) for part in extra_k], 2)  # B, H, M, Dh
                v = torch.cat([part.expand(B, -1, -1, -1) for part in extra_v], 2)
            elif extra_k:
                k, v = extra_k[0], extra_v[0]
            seq = x if tokens is None else torch.cat([x[:, :prefix], tokens, x[:, prefix:]], dim=1)  # B, N+P, d
            bias = None
            if needs_mask:
                n = k.shape[0] if tokens is None and k is not None else B
                parts = [x.new_zeros(n, prefix)]
                if tokens is not None:
                    parts.append(token_bias)
                parts.append(x.new_zeros(n, x.shape[1] - prefix))
                parts += [b.to(x.dtype).expand(n, -1) for b in extra_bias]
                bias = torch.cat(parts, dim=1)[:, None, None, :]  # B|1, 1, 1, N+P+M
            hook = self._attention_hook(i, methods, rows, single)
            seq = block_forward(block, seq, k, v, bias, hook)
            if tokens is None:
                x, slot = seq, None
            else:
                p = tokens.shape[1]
                x = torch.cat([seq[:, :prefix], seq[:, prefix + p :]], dim=1)
                slot = seq[:, prefix : prefix + p]
        return x

    @staticmethod
    def _offsets(i: int, x: Tensor, methods: list, rows: list[Tensor], single: bool) -> Tensor:
        """VPT "add" prompts: each task's offset on its own rows."""
        for method, idx in zip(methods, rows):
            offset = method.token_offset(i)
            if offset is not None:
                x = x + offset if single else x.index_add(0, idx, offset.to(x.dtype).expand(len(idx), -1, -1))
        return x

    @staticmethod
    def _attention_hook(i: int, methods: list, rows: list[Tensor], single: bool):
        """The tasks' attention-output terms (APT), each applied to its own rows."""
        hooks = [(method.attention_output(i), idx) for method, idx in zip(methods, rows)]
        hooks = [(hook, idx) for hook, idx in hooks if hook is not None]
        if not hooks:
            return None
        if single:
            return hooks[0][0]

        def mixed(u: Tensor, a: Tensor) -> Tensor:
            for hook, idx in hooks:
                a = a.index_copy(0, idx, hook(u[idx], a[idx]))
            return a

        return mixed


def _pad_bank(bank: _Bank, width: int) -> tuple[Tensor, Tensor, Tensor]:
    extra = width - bank.keys.shape[2]
    pad = bank.keys.new_zeros(*bank.keys.shape[:2], extra, bank.keys.shape[3])
    return (
        torch.cat([bank.keys, pad], 2),
        torch.cat([bank.values, pad], 2),
        torch.cat([bank.bias, bank.bias.new_full((bank.bias.shape[0], extra), float("-inf"))], 1),
    )
