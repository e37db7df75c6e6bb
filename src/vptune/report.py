"""Reports of a comparison (``vptune.compare``): the terminal table, markdown tables, PNG
plots, the demo's ``report.md`` and the benchmark's section of ``docs/results-mini.md``.

Every function takes the rows that ``compare``/``benchmark`` return; nothing here trains.
"""

from __future__ import annotations

import csv
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.table import Table

from .compare import Recipe, group_means
from .data import MINI_TASKS

ACCURACY_PLOT = "accuracy-vs-params.png"
CURVES_PLOT = "curves.png"
REPORT_FILE = "report.md"
BEGIN = "<!-- BEGIN vptune benchmark mini: generated, edit outside this block -->"
END = "<!-- END vptune benchmark mini -->"


def markers(backbone: str | None = None) -> tuple[str, str]:
    """The BEGIN/END markers of the benchmark's block for ``backbone``: the bundled ViT's block
    keeps the plain markers; another backbone (the bundled Swin) gets its own block beside it."""
    from .backbones import BUNDLED_BACKBONE

    if backbone is None or backbone == BUNDLED_BACKBONE:
        return BEGIN, END
    return (f"<!-- BEGIN vptune benchmark mini --backbone {backbone}: generated, edit outside this block -->",
            f"<!-- END vptune benchmark mini --backbone {backbone} -->")


def machine() -> str:
    """The CPU, its logical core count and torch's threads, for the record of a measurement."""
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {threads} thread{'s' * (threads != 1)}"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else str(value)


def _cells(r: dict[str, Any]) -> dict[str, str]:
    return {
        "task": r["task"], "method": r["method"], "val top-1 %": _pct(r["val_top1"]),
        "test top-1 %": "diverged" if r["error"] else _pct(r["test_top1"]),
        "tuned params": _count(r["tuned_params"]),
        "% of backbone": "-" if r["tuned_percent"] is None else f"{r['tuned_percent']:.3g}",
        "extra GFLOPs": "-" if r["extra_gflops"] is None else f"{r['extra_gflops']:.4f}",
        "train s": "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}",
    }


def rich_table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    """The rows as a terminal table, the best test top-1 of each task in bold."""
    table = Table(title=title)
    for name in _cells(rows[0]) if rows else ():
        table.add_column(name, justify="left" if name in ("task", "method") else "right")
    best = {t: max((r["test_top1"] or -1 for r in rows if r["task"] == t), default=None) for t in {r["task"] for r in rows}}
    for i, r in enumerate(rows):
        cells = _cells(r)
        if r["test_top1"] is not None and r["test_top1"] == best[r["task"]]:
            cells["test top-1 %"] = f"[bold]{cells['test top-1 %']}[/]"
        last_of_task = i + 1 < len(rows) and rows[i + 1]["task"] != r["task"]
        table.add_row(*cells.values(), end_section=last_of_task)
    return table


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table, its first ``left`` columns left-aligned and the rest (numbers) right-aligned."""
    aligns = ["---" if i < left else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (header, aligns, *lines))


def runs_table(rows: Sequence[dict[str, Any]]) -> str:
    """Every run, one line each."""
    header = list(_cells(rows[0])) + ["lr"]
    return markdown_table(header, [[*_cells(r).values(), f"{r['lr']:g}"] for r in rows], left=2)


def recipes_table(recipes: Sequence[Recipe]) -> str:
    return markdown_table(["method", "recipe"], [[r.method, r.summary()] for r in recipes], left=2)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Methods down, tasks across (test top-1), then each group's mean, tuned % and extra GFLOPs."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    means = group_means(rows)
    by = {(r["task"], r["method"]): r for r in rows}
    lines = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m and r["tuned_percent"] is not None]
        cells = [m] + ["-" if (t, m) not in by else _cells(by[t, m])["test top-1 %"] for t in tasks]
        cells += [_pct(means[g].get(m)) for g in means]
        cells.append(f"{sum(r['tuned_percent'] for r in mine) / len(mine):.3g}" if mine else "-")
        cells.append(f"{mine[0]['extra_gflops']:.4f}" if mine else "-")
        lines.append(cells)
    header = ["method", *tasks, *(f"{g} mean" for g in means), "tuned % (mean)", "extra GFLOPs"]
    return markdown_table(header, lines)


def plot_accuracy_vs_params(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Test top-1 against tuned parameters (log axis), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task and r["test_top1"] is not None):
            ax.scatter(r["tuned_params"], r["test_top1"])
            ax.annotate(r["method"], (r["tuned_params"], r["test_top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("tuned parameters (log)")
        ax.set_ylabel("test top-1 %")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_curve(run: str | Path) -> list[dict[str, float | None]]:
    path = Path(run) / "curve.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) if v else None for k, v in line.items()} for line in csv.DictReader(f)]


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training loss and val top-1 per epoch of every run (from each run's curve.csv), one column per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False, sharex="col")
    for col, task in enumerate(tasks):
        for r in (r for r in rows if r["task"] == task):
            curve = read_curve(r["run"])
            epochs = [c["epoch"] for c in curve]
            axes[0, col].plot(epochs, [c["train_loss"] for c in curve], marker=".", label=r["method"])
            val = [(c["epoch"], c["val_top1"]) for c in curve if c["val_top1"] is not None]
            axes[1, col].plot([e for e, _ in val], [v for _, v in val], marker=".", label=r["method"])
        axes[0, col].set_title(task)
        axes[0, col].set_ylabel("training loss")
        axes[1, col].set_ylabel("val top-1 %")
        axes[1, col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _task_lines(rows: Sequence[dict[str, Any]]) -> str:
    tasks = dict.fromkeys(r["task"] for r in rows)
    return "\n".join(f"- `{t}` ({MINI_TASKS[t].group}): {MINI_TASKS[t].description}" if t in MINI_TASKS else f"- `{t}`"
                     for t in tasks)


def write_demo_report(
    rows: Sequence[dict[str, Any]], recipes: Sequence[Recipe], out: Path, *, command: str, backbone: str, wall_time_s: float
) -> Path:
    """``out/report.md`` with the results, the recipes and the two plots (written next to it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_params(rows, out / ACCURACY_PLOT)
    plot_curves(rows, out / CURVES_PLOT)
    write_rows_json(rows, out / "report.json")
    text = f"""# vptune demo: prompt tuning vs baselines on the mini-benchmark

- Command: `{command}`
- Backbone: `{backbone}` (frozen except where the method tunes it)
- Machine: {machine()}
- Date: {now()}; total wall time {wall_time_s / 60:.1f} min
- Every figure below, per run: `report.json` next to this file

Each method is trained once on each task's 800 training images with the fixed recipe below
(no tuning on test), then scored on the 200 val images and the test images. "train s" is the
training time of the run, val evaluation included; "extra GFLOPs" is the inference cost per
image over the frozen backbone with a linear head, of the model as vptune runs it (LoRA unmerged).

## Tasks
{_task_lines(rows)}

## Results
{runs_table(rows)}

![test top-1 against tuned parameters]({ACCURACY_PLOT})

![training curves]({CURVES_PLOT})

## Recipes
{recipes_table(recipes)}
"""
    path = out / REPORT_FILE
    path.write_text(text)
    return path


def results_mini_block(
    rows: Sequence[dict[str, Any]], recipes: Sequence[Recipe], *, command: str, lr_factors: Sequence[float],
    backbone: str, wall_time_s: float, complete: bool,
) -> str:
    """The benchmark's section of docs/results-mini.md, between its BEGIN/END markers."""
    status = "" if complete else "\n**Partial**: the benchmark was stopped before every run finished; `-` marks what is missing.\n"
    factors = ", ".join(f"{f:g}" for f in lr_factors)
    protocol = (
        f"for each task and method, the recipe's learning rate times each of ({factors}) is trained on train800 "
        "and scored on val200; the lr with the best val top-1 is retrained on the 1000 train+val images and "
        "scored on test." if len(lr_factors) > 1 else
        f"no learning-rate search (a single lr factor, {factors}): each method's recipe is trained once on the "
        "1000 train+val images and scored on test."
    )
    compute = sum((r["wall_time_s"] or 0.0) + r.get("search_time_s", 0.0) for r in rows)
    begin, end = markers(backbone)
    title = "Main table: every method on every mini task" if begin == BEGIN else f"`{backbone}`: every method on every mini task"
    return f"""{begin}
## {title}

- Command: `{command}`
- Backbone: `{backbone}`
- Machine: {machine()}
- Date: {now()}; wall time of this invocation {wall_time_s / 3600:.2f} h (runs finished earlier are read back);
  training time of all its runs, search and final: {compute / 3600:.2f} h
- Protocol: {protocol} One seed (0).
{status}
Test top-1 (%) per task, each group's mean, tuned parameters as a share of the backbone
(mean over tasks: the head depends on the number of classes) and additional inference GFLOPs
per image over the frozen backbone with a linear head (of the model as run, LoRA unmerged):

{summary_table(rows)}

### Tasks
{_task_lines(rows)}

### Every final run (val: the chosen search run; train s: the final run's training time)
{runs_table(rows)}

### Recipes (before the lr factor)
{recipes_table(recipes)}
{end}"""


def write_rows_json(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The rows a report's figures were read from, as JSON beside the report: what a committed
    figure points back to (every run's metrics, lr search and folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(rows), indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_results_mini(path: Path, block: str) -> Path:
    """Put ``block`` into ``path``, replacing a previous one of the same backbone (its markers)
    and keeping every other section."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Results on the mini-benchmark\n"
    begin = block.split("\n", 1)[0]
    end = next(line for line in block.splitlines()[::-1] if line.startswith("<!-- END"))
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif begin != BEGIN and END in text:  # another backbone's block goes after the bundled ViT's
        head, rest = text.split(END, 1)
        text = f"{head}{END}\n\n{block}{rest}"
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{block}\n{body}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
