"""Plant representative bugs in a copy of the code and check that the test suite catches each.

    python scripts/mutants.py            # every mutant (``make mutants``)
    python scripts/mutants.py -k cache   # the mutants whose name contains "cache"
    python scripts/mutants.py --list

For each mutant: copy ``src/`` to a temporary folder, apply one text substitution (the pattern
must occur exactly as often as stated, so a refactoring that moves the code makes the mutant
fail loudly instead of rotting into a no-op), run the tests that guard that code against the
copy (``PYTHONPATH`` first, checked), and record whether a test failed and which. Prints a
table and exits non-zero if any mutant was missed or could not be planted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/vptune
    pattern: str  # literal text
    replacement: str
    tests: tuple[str, ...]  # pytest arguments (files, node ids, -k expressions)
    count: int = 1  # how many times the pattern must occur


MUTANTS = [
    Mutant(
        "prompt k/v without the qkv bias",
        "attention.py",
        "qkv.weight[D:], None if bias is None else bias[D:])",
        "qkv.weight[D:], None)",
        ("tests/test_attention.py",),
    ),
    Mutant(
        "prompt k/v through norm2 instead of norm1",
        "attention.py",
        'prompt_keys_values(block.attn, _part(block, "norm1", "ln_1")(prompts))',
        'prompt_keys_values(block.attn, _part(block, "norm2", "ln_2")(prompts))',
        ("tests/test_attention.py",),
    ),
    Mutant(
        "prompt keys and values swapped",
        "attention.py",
        "k, v = kv.reshape(B, p, 2, H, Dh)",
        "v, k = kv.reshape(B, p, 2, H, Dh)",
        ("tests/test_attention.py",),
    ),
    Mutant(
        "one prompt dropout mask shared by the batch",
        "methods/vpt.py",
        "self.dropout(prompts.expand(batch, -1, -1))",
        "self.dropout(prompts).expand(batch, -1, -1)",
        ("tests/test_attention.py", "-k", "dropout"),
    ),
    Mutant(
        "kv cache never invalidated",
        "backbones/family.py",
        "if hit is None or not torch.equal(hit[0], prompts):",
        "if hit is None:",
        ("tests/test_attention.py", "-k", "cache"),
    ),
    Mutant(
        "bf16 autocast never enabled",
        "train/loop.py",
        'enabled=cfg.precision == "bf16"',
        "enabled=False",
        ("tests/test_train.py", "-k", "bf16"),
    ),
    Mutant(
        "--scale-lr ignores gradient accumulation",
        "train/config.py",
        "self.lr * self.batch_size * self.grad_accum / 256",
        "self.lr * self.batch_size / 256",
        ("tests/test_train.py", "-k", "scale_lr"),
    ),
    Mutant(
        "--scale-lr without the DDP world-size factor",
        "train/loop.py",
        "cfg.effective_lr * (world_size() if cfg.scale_lr else 1)",
        "cfg.effective_lr",
        ("tests/test_distributed.py", "-k", "two_processes"),
    ),
    Mutant(
        "--clip-grad clips each micro-batch's share before accumulation ends",
        "train/loop.py",
        "(loss / in_step).backward()\n",
        "(loss / in_step).backward()\n                clip_gradients(optimizer, cfg.clip_grad)\n",
        ("tests/test_train.py", "-k", "accumulation_clips"),
    ),
    Mutant(
        "loader workers seeded from the clock",
        "train/loop.py",
        "generator=epoch_generator(cfg.seed, epoch),",
        "generator=torch.Generator().manual_seed(time.time_ns()),",
        ("tests/test_train.py", "-k", "workers"),
    ),
    Mutant(
        "served task ignores its pruning mask",
        "serve/multitask.py",
        "key_bias = bias[0].detach()",
        "key_bias = None",
        ("tests/test_serve.py", "-k", "masked"),
    ),
    Mutant(
        "LoRA FLOPs counted against its own adapted backbone",
        "flops.py",
        "with adapters_disabled(model):\n        frozen = count_flops(lambda: family.frozen_features(image))",
        "with contextlib.nullcontext():\n        frozen = count_flops(lambda: family.frozen_features(image))",
        ("tests/test_train.py", "-k", "extra_flops"),
    ),
    Mutant(
        "bench train_ratio inverted",
        "bench.py",
        '"train_ratio": _ratio(train, median[base]["infer"]),',
        '"train_ratio": _ratio(median[base]["infer"], train),',
        ("tests/test_bench.py", "-k", "exactly_the_keys"),
    ),
    Mutant(
        "big_vision .npz weights silently not loaded",
        "backbones/loading.py",
        "model.load_pretrained(str(path))",
        "None",
        ("tests/test_backbones.py", "-k", "npz"),
    ),
    Mutant(
        "ASHA search runs report val only at the end (never stopped)",
        "sweep/tune.py",
        "cfg = dataclasses.replace(cfg, eval_every=1)",
        "cfg = cfg",
        ("tests/test_sweep.py", "-k", "asha"),
    ),
    Mutant(
        "a run read back on other backbone weights is not refused",
        "model.py",
        "if not allow_other_weights:",
        "if False:",
        ("tests/test_model.py", "tests/test_server.py", "-k", "other_backbone_weights"),
    ),
    Mutant(
        "vptune demo ignores --epochs",
        "cli.py",
        'settings = {**({} if epochs is None else {"epochs": epochs}), **tracking_settings(tracker, tracking_uri, out)}',
        "settings = {**tracking_settings(tracker, tracking_uri, out)}",
        ("tests/test_compare.py", "-k", "demo_command"),
    ),
    Mutant(
        "vptune benchmark mini ignores --lrs",
        "cli.py",
        "rows = benchmark(task_list, recipes, out, lr_factors=factors,",
        "rows = benchmark(task_list, recipes, out, lr_factors=(1.0,),",
        ("tests/test_compare.py", "-k", "benchmark_mini_command"),
    ),
    Mutant(
        "APT weight w not detached",
        "methods/apt.py",
        "scores.amax(dim=-1, keepdim=True).detach()",
        "scores.amax(dim=-1, keepdim=True)",
        ("tests/test_attention.py", "-k", "apt"),
    ),
    Mutant(
        "API keys compared with an early exit",
        "serve/security.py",
        "                valid, tasks = True, scope\n",
        "                valid, tasks = True, scope\n                break\n",
        ("tests/test_server.py", "-k", "constant_time"),
    ),
    Mutant(
        "no deadline for a slow request head",
        "serve/security.py",
        "    return TimedHTTPProtocol",
        "    return Base",
        ("tests/test_server.py", "-k", "slow_headers"),
    ),
    Mutant(
        "any Host header accepted",
        "serve/security.py",
        'if scope["type"] != "http" or self.any:',
        "if True:",
        ("tests/test_server.py", "-k", "host_header"),
    ),
    Mutant(
        "a task folder served before it settled",
        "serve/live.py",
        "if settle and now - seen[1] < self.settle_s:",
        "if False:",
        ("tests/test_server_live.py", "-k", "watcher_loads"),
    ),
    Mutant(
        "a request held for a replaced task answered by the new run",
        "serve/multitask.py",
        "tasks = [task if isinstance(task, Task) else self.task(task) for task in tasks]",
        "tasks = [self.task(task.name if isinstance(task, Task) else task) for task in tasks]",
        ("tests/test_serve.py", "-k", "replace_is_atomic"),
    ),
    Mutant(
        "a config's num_classes not checked against its saved head",
        "serve/multitask.py",
        "        check_head_size(run, run_dir)\n",
        "",
        ("tests/test_server.py", "-k", "bad_task_folder"),
    ),
    Mutant(
        "one bad image fails a request of several",
        "serve/server.py",
        'results.append({"file": name, "predictions": body} if status == 200 else {"file": name, "status": status, "error": body})',
        'results.append({"file": name, "predictions": body})',
        ("tests/test_server.py", "-k", "several_images"),
    ),
    Mutant(
        "SIGTERM ends the server by the signal, not exit 0",
        "serve/server.py",
        "previous = signal.signal(signal.SIGTERM, lambda *_: None)",
        "previous = signal.getsignal(signal.SIGTERM)",
        ("tests/test_server_live.py", "-k", "sigterm"),
    ),
]


def plant(src: Path, mutant: Mutant) -> None:
    path = src / "vptune" / mutant.file
    text = path.read_text()
    found = text.count(mutant.pattern)
    if found != mutant.count:
        raise LookupError(
            f"{mutant.file}: pattern {mutant.pattern!r} found {found} times, expected {mutant.count}: "
            "the code moved; update the mutant in scripts/mutants.py"
        )
    path.write_text(text.replace(mutant.pattern, mutant.replacement))


def run_tests(src: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """(outcome, first failing test or note, seconds) of the tests against the code in ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    check = subprocess.run(
        [sys.executable, "-c", "import vptune; print(vptune.__file__)"], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if not check.stdout.strip().startswith(str(src)):
        raise RuntimeError(f"vptune imported from {check.stdout.strip() or check.stderr.strip()}, not from the mutated copy {src}")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if done.returncode == 0:
        return "missed", "", seconds
    failed = re.search(r"^FAILED (\S+)", done.stdout, re.MULTILINE)
    if done.returncode == 1 and failed:
        return "caught", failed.group(1), seconds
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["?"]
    return "error", f"pytest exit {done.returncode}: {tail[0]}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--plant-only", action="store_true", help="check that every pattern is found; run no tests")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.file}: {m.pattern!r} -> {m.replacement!r}; tests: {' '.join(m.tests)}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="vptune-mutants-") as tmp:
        for i, mutant in enumerate(mutants):
            src = Path(tmp) / f"m{i}" / "src"
            shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            try:
                plant(src, mutant)
            except LookupError as error:
                rows.append((mutant.name, "not planted", str(error), 0.0))
            else:
                rows.append((mutant.name, "planted", "", 0.0) if args.plant_only else (mutant.name, *run_tests(src, mutant.tests, args.timeout)))
            print(f"{rows[-1][1]:>11}  {mutant.name}  ({rows[-1][3]:.0f} s)", file=sys.stderr, flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'planted bug':<{width}} | outcome | caught by |")
    print(f"|{'-' * (width + 2)}|---------|-----------|")
    for name, outcome, by, _ in rows:
        print(f"| {name:<{width}} | {outcome} | {by} |")
    missed = [r for r in rows if r[1] != ("planted" if args.plant_only else "caught")]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} planted bugs {'planted' if args.plant_only else 'caught'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
