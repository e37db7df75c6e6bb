"""Reports of a comparison (``vptune.compare``): the terminal table, markdown tables, PNG
plots, the demo's ``report.md`` and the benchmark's section of ``docs/results-mini.md``.

Every function takes the rows that ``compare``/``benchmark`` return; nothing here trains.
"""

from __future__ import annotations

import csv
import json
import math
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


def unstable_final(r: dict[str, Any]) -> bool:
    """Whether a benchmark row's final run (retrained on train+val at the lr the search chose)
    ended with a train loss over 3x, and 0.3 above, that of the search run it repeats: the retrain
    went unstable at that lr, so its test figure says more about that one run than the method."""
    final, search = r.get("train_loss"), r.get("search_train_loss")
    return final is not None and search is not None and final > 3 * search and final - search > 0.3


def _cells(r: dict[str, Any]) -> dict[str, str]:
    return {
        "task": r["task"], "method": r["method"], "val top-1 %": _pct(r["val_top1"]),
        "test top-1 %": "diverged" if r["error"] else _pct(r["test_top1"]) + " †" * unstable_final(r),
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


def _unstable_note(rows: Sequence[dict[str, Any]]) -> str:
    """The footnote to the † marks: which final runs went unstable, with both train losses."""
    marked = [r for r in rows if unstable_final(r)]
    if not marked:
        return ""
    runs = "; ".join(f"{r['task']} {r['method']} (lr {r['lr']:g}): {r['train_loss']:.3g} against {r['search_train_loss']:.3g}"
                     for r in marked)
    return ("\n† The final run, retrained on train+val at the lr the search chose, ended with a train loss over 3x that "
            f"of the search run at the same lr, so it went unstable at that lr (one seed): {runs}. The figure is what "
            "the protocol gives, kept as measured; the search run's val top-1 says what the method reached before.\n")


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
{_unstable_note(rows)}
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


def write_results_mini(path: Path, block: str, *, title: str = "# Results on the mini-benchmark", first: str = BEGIN,
                       anchor: str = END) -> Path:
    """Put ``block`` into ``path``, replacing a previous one of the same backbone (its markers)
    and keeping every other section; a new block goes after ``anchor`` (the end of the bundled
    backbone's block, whose own block begins with ``first``), else after the title."""
    path = Path(path)
    text = path.read_text() if path.is_file() else f"{title}\n"
    begin = block.split("\n", 1)[0]
    end = next(line for line in block.splitlines()[::-1] if line.startswith("<!-- END"))
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif begin != first and anchor in text:  # another backbone's block goes after the bundled backbone's
        head, rest = text.split(anchor, 1)
        text = f"{head}{anchor}\n\n{block}{rest}"
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{block}\n{body}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# --- the vision-language mini benchmark (vptune benchmark minivl) ------------------------------

MINIVL_FILE_TITLE = "# Results on the vision-language mini benchmark"
# The APT paper's ViLT-B/32 table (Wu et al., "Approximated Prompt Tuning for Vision-Language
# Pre-trained Models", arXiv 2306.15706; the same figures as the official repository's README):
# tuned parameters without the task heads, additional GFLOPs, VQAv2 test-dev VQA score, NLVR2
# test-P accuracy, Flickr30K image and text retrieval R@1, and their average.
PAPER_VILT: tuple[dict[str, Any], ...] = (
    {"method": "full", "label": "full fine-tuning", "params": "115.43M", "gflops": 0.0, "vqa": 71.26, "nlvr": 76.13, "ir": 64.40, "tr": 83.50, "avg": 73.82},
    {"method": "vpt-deep", "label": "deep prompt", "params": "1.84M", "gflops": 5.14, "vqa": 69.30, "nlvr": 73.34, "ir": 58.64, "tr": 79.50, "avg": 70.20},
    {"method": "lora", "label": "LoRA", "params": "0.15M", "gflops": 0.0, "vqa": 68.44, "nlvr": 72.77, "ir": 57.44, "tr": 77.70, "avg": 69.09},
    {"method": "adapter", "label": "adapter", "params": "3.56M", "gflops": 0.86, "vqa": 70.85, "nlvr": 75.51, "ir": 62.68, "tr": 81.40, "avg": 72.61},
    {"method": "apt", "label": "APT", "params": "1.92M", "gflops": 0.91, "vqa": 70.94, "nlvr": 75.92, "ir": 63.26, "tr": 81.60, "avg": 72.93},
    {"method": "linear", "label": "classifier only", "params": "-", "gflops": 0.0, "vqa": None, "nlvr": None, "ir": None, "tr": None, "avg": 66.81},
)
PAPER_METER: tuple[dict[str, Any], ...] = (
    {"method": "full", "label": "full fine-tuning", "params": "323.31M", "gflops": 0.0, "vqa": 77.43, "nlvr": 83.05, "ir": 82.22, "tr": 94.30, "avg": 84.25},
    {"method": "vpt-deep", "label": "deep prompt", "params": "3.68M", "gflops": 13.05, "vqa": 67.57, "nlvr": 65.79, "ir": 70.90, "tr": 87.70, "avg": 72.99},
    {"method": "lora", "label": "LoRA", "params": "0.29M", "gflops": 0.0, "vqa": 74.00, "nlvr": 78.82, "ir": 79.86, "tr": 92.60, "avg": 81.32},
    {"method": "adapter", "label": "adapter", "params": "5.34M", "gflops": 1.64, "vqa": 74.70, "nlvr": 79.93, "ir": 80.38, "tr": 91.90, "avg": 81.73},
    {"method": "apt", "label": "APT", "params": "3.83M", "gflops": 2.31, "vqa": 75.45, "nlvr": 80.97, "ir": 80.88, "tr": 92.90, "avg": 82.55},
    {"method": "linear", "label": "classifier only", "params": "-", "gflops": 0.0, "vqa": None, "nlvr": None, "ir": None, "tr": None, "avg": 77.74},
)
PAPER_METER_SOURCE = ("the APT paper's METER table (Wu et al., arXiv 2306.15706, also in the official repository's README): "
                      "METER-CLIP16-RoBERTa on VQAv2, NLVR2 and Flickr30K; full fine-tuning's +GFLOPs not given (0 here)")
PAPER_SOURCE = ("the APT paper's ViLT table (Wu et al., arXiv 2306.15706, also in the official repository's README): "
                "ViLT-B/32 on VQAv2, NLVR2 and Flickr30K; tuned parameters without the task heads")
_FIGURES = (("vqa", "test_vqa_score", "VQA score"), ("nlvr", "test_top1", "NLVR top-1"), ("retrieval", "test_ir_r1", "IR R@1"),
            ("retrieval", "test_tr_r1", "TR R@1"))


def minivl_markers(backbone: str) -> tuple[str, str]:
    """Each backbone's block of docs/results-minivl.md has its own markers."""
    return (f"<!-- BEGIN vptune benchmark minivl --backbone {backbone}: generated, edit outside this block -->",
            f"<!-- END vptune benchmark minivl --backbone {backbone} -->")


def minivl_figures(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{method: {VQA score, NLVR top-1, IR R@1, TR R@1, their average (None unless all four),
    tuned params and extra GFLOPs of the VQA run}}, from the final runs' rows."""
    by = {(r["task"], r["method"]): r for r in rows}
    table: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        figures = [None if by.get((task, method)) is None else by[task, method].get(key) for task, key, _ in _FIGURES]
        vqa = by.get(("vqa", method)) or next(r for r in rows if r["method"] == method)
        table[method] = {"figures": figures, "avg": None if None in figures else sum(figures) / 4,
                         "tuned_params": vqa.get("tuned_params"), "extra_gflops": vqa.get("extra_gflops")}
    return table


def paper_for(backbone: str) -> tuple[tuple[dict[str, Any], ...], str, str]:
    """The paper's table to set beside a backbone's minivl figures: METER's for a METER (its name
    says so), else ViLT's; with its source and the model's name."""
    if "meter" in backbone.lower():
        return PAPER_METER, PAPER_METER_SOURCE, "METER"
    return PAPER_VILT, PAPER_SOURCE, "ViLT-B/32"


def minivl_table(rows: Sequence[dict[str, Any]], paper_rows: Sequence[dict[str, Any]] = PAPER_VILT) -> str:
    """Ours beside the paper's: methods down; our four figures, average, tuned parameters and
    extra GFLOPs, then the paper's average, parameters and extra GFLOPs for the same method."""
    paper = {p["method"]: p for p in paper_rows}
    lines = []
    for method, f in minivl_figures(rows).items():
        p = paper.get(method)
        lines.append([method, *(_pct(v) for v in f["figures"]), _pct(f["avg"]), _count(f["tuned_params"]),
                      "-" if f["extra_gflops"] is None else f"{f['extra_gflops']:.4f}",
                      "-" if p is None else f"{p['avg']:.2f}", "-" if p is None else p["params"],
                      "-" if p is None else f"{p['gflops']:.2f}"])
    header = ["method", *(label for _, _, label in _FIGURES), "avg", "tuned params", "extra GFLOPs",
              "paper avg", "paper params", "paper +GFLOPs"]
    return markdown_table(header, lines)


def paper_vilt_table(paper_rows: Sequence[dict[str, Any]] = PAPER_VILT) -> str:
    lines = [[p["label"], p["params"], f"{p['gflops']:.2f}", *("-" if p[k] is None else f"{p[k]:.2f}" for k in ("vqa", "nlvr", "ir", "tr", "avg"))]
             for p in paper_rows]  # the paper's own precision
    return markdown_table(["method", "params", "+GFLOPs", "VQA", "NLVR2", "IR R@1", "TR R@1", "avg"], lines)


def minivl_test_sizes(specs: Sequence[str]) -> dict[str, int]:
    """Test examples per minivl task from the benchmark's data specs (``?test=N``; else the full split)."""
    from urllib.parse import parse_qs

    from .data.minivl import SPLITS

    sizes = {}
    for spec in specs:
        name, _, query = spec.partition(":")[2].partition("?")
        sizes[name] = int(parse_qs(query).get("test", [SPLITS["test"]])[0])
    return sizes


def average_noise(figures: Sequence[float], sizes: Sequence[int]) -> float:
    """Standard error (points) of the mean of four test percentages, each a binomial proportion
    over its own number of test examples (a VQA score is treated as one)."""
    variance = sum((f / 100) * (1 - f / 100) / n for f, n in zip(figures, sizes)) * 100**2
    return math.sqrt(variance) / len(figures)


def minivl_claims(rows: Sequence[dict[str, Any]], paper_rows: Sequence[dict[str, Any]] = PAPER_VILT,
                  sizes: dict[str, int] | None = None) -> str:
    """The paper's claims about APT on ViLT (or METER: ``paper_rows``), each with the paper's figures
    and ours. An accuracy claim holds (or fails) only when our difference exceeds twice its standard
    error (``sizes``: test examples per task; default the full splits); else it is "within noise"."""
    ours = minivl_figures(rows)
    paper = {p["method"]: p for p in paper_rows}
    sizes = {**{task: 1000 for task, _, _ in _FIGURES}, **(sizes or {})}

    def avg(method: str) -> float | None:
        return ours.get(method, {}).get("avg")

    def noise(method: str) -> float:
        return average_noise(ours[method]["figures"], [sizes[task] for task, _, _ in _FIGURES])

    def gflops(method: str) -> float | None:
        return ours.get(method, {}).get("extra_gflops")

    def verdict(value: bool | None) -> str:
        return "not measured" if value is None else "holds" if value else "does not hold"

    def compared(a: str, b: str, margin: float = 0.0) -> str:
        """Whether avg(a) > avg(b) - margin, beyond twice the standard error of the difference."""
        x, y = avg(a), avg(b)
        if None in (x, y):
            return "not measured"
        gap, band = x - (y - margin), 2 * math.hypot(noise(a), noise(b))
        return f"within noise (±{band:.1f})" if abs(gap) <= band else verdict(gap > 0)

    claims = []
    a, d = avg("apt"), avg("vpt-deep")
    claims.append(["APT is more accurate than deep prompts", f"{paper['apt']['avg']:.2f} vs {paper['vpt-deep']['avg']:.2f}",
                   "-" if None in (a, d) else f"{a:.2f} vs {d:.2f}", compared("apt", "vpt-deep")])
    ga, gd = gflops("apt"), gflops("vpt-deep")
    share = None if None in (ga, gd) or not gd else 100 * ga / gd
    pa, pd = paper["apt"]["gflops"], paper["vpt-deep"]["gflops"]
    claims.append([f"APT adds {100 * pa / pd:.1f}% of deep prompts' extra GFLOPs", f"{pa:.2f} vs {pd:.2f} ({100 * pa / pd:.1f}%)",
                   "-" if share is None else f"{ga:.4f} vs {gd:.4f} ({share:.1f}%)", verdict(None if share is None else share < 100)])
    f = avg("full")
    claims.append(["APT comes within a point of full fine-tuning", f"{paper['apt']['avg']:.2f} vs {paper['full']['avg']:.2f}",
                   "-" if None in (a, f) else f"{a:.2f} vs {f:.2f}", compared("apt", "full", margin=1.0)])
    lo = avg("lora")
    claims.append(["APT is more accurate than LoRA", f"{paper['apt']['avg']:.2f} vs {paper['lora']['avg']:.2f}",
                   "-" if None in (a, lo) else f"{a:.2f} vs {lo:.2f}", compared("apt", "lora")])
    c = avg("linear")
    claims.append(["APT is more accurate than the classifier alone", f"{paper['apt']['avg']:.2f} vs {paper['linear']['avg']:.2f}",
                   "-" if None in (a, c) else f"{a:.2f} vs {c:.2f}", compared("apt", "linear")])
    return markdown_table(["the paper's claim", "paper (avg)", "here (avg)", "here"], claims)


def minivl_runs_table(rows: Sequence[dict[str, Any]]) -> str:
    """Every final run: the val figure it was chosen on, its test figures, size, cost and time."""
    lines = []
    for r in rows:
        val = r.get("val_vqa_score", r.get("val_r1_mean", r.get("val_top1")))
        test = ("diverged" if r["error"] else ", ".join(f"{label} {_pct(r.get(key))}" for task, key, label in _FIGURES
                                                          if task == r["task"]))
        lines.append([r["task"], r["method"], f"{r['lr']:g}", _pct(val), test, _count(r["tuned_params"]),
                      "-" if r["extra_gflops"] is None else f"{r['extra_gflops']:.4f}",
                      "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}",
                      f"{r.get('search_time_s', 0.0):.0f}"])
    return markdown_table(["task", "method", "lr", "val", "test", "tuned params", "extra GFLOPs", "train s", "search s"],
                          lines, left=2)


def results_minivl_block(
    rows: Sequence[dict[str, Any]], recipes: Sequence[Recipe], *, command: str, lr_factors: Sequence[float],
    backbone: str, specs: Sequence[str], wall_time_s: float, complete: bool,
) -> str:
    """A backbone's section of docs/results-minivl.md, between its own BEGIN/END markers."""
    status = "" if complete else "\n**Partial**: the benchmark was stopped before every run finished; `-` marks what is missing.\n"
    factors = ", ".join(f"{f:g}" for f in lr_factors)
    protocol = (
        f"for each task and method, the recipe's learning rate times each of ({factors}) is trained on the train "
        "split and scored on val (VQA score; NLVR top-1; retrieval: the mean of image and text R@1); the best lr is "
        "retrained on train+val and scored on test." if len(lr_factors) > 1 else
        f"no learning-rate search (a single lr factor, {factors}): each method's recipe is trained once on train+val "
        "and scored on test."
    )
    compute = sum((r["wall_time_s"] or 0.0) + r.get("search_time_s", 0.0) for r in rows)
    begin, end = minivl_markers(backbone)
    paper, source, model = paper_for(backbone)
    data = ", ".join(f"`{s}`" for s in specs)
    return f"""{begin}
## `{backbone}`: every method on the three minivl tasks

- Command: `{command}`
- Backbone: `{backbone}`; data: {data}
- Machine: {machine()}
- Date: {now()}; wall time of this invocation {wall_time_s / 3600:.2f} h (runs finished earlier are read back);
  training time of all its runs, search and final: {compute / 3600:.2f} h
- Protocol: {protocol} One seed (0).
{status}
Test figures (%): VQA score (`test_vqa_score`), NLVR top-1 (`test_top1`), image and text
retrieval R@1 (`test_ir_r1`, `test_tr_r1`), their average as the paper averages its four; tuned
parameters of the VQA run (head, pooler and token types included) and additional inference
GFLOPs per image-text pair over the frozen backbone with the task head (of the model as run,
LoRA unmerged). Beside them, the paper's average, parameters and extra GFLOPs for the same
method on {model} ({source}):

{minivl_table(rows, paper)}

### The paper's claims, here
{minivl_claims(rows, paper, minivl_test_sizes(specs))}

An accuracy claim holds or fails here only when the difference of the two averages exceeds twice
its standard error (each figure a binomial proportion over its task's test examples); smaller
differences are "within noise", whatever their sign.

### The paper's {model.split("-")[0]} table ({source})
{paper_vilt_table(paper)}

### Every final run (val: the chosen search run's figure; train s: the final run's training time)
{minivl_runs_table(rows)}

### Recipes (before the lr factor)
{recipes_table(recipes)}
{end}"""


def write_results_minivl(path: Path, block: str, bundled: str) -> Path:
    """Put a backbone's block into docs/results-minivl.md (another backbone's goes after the bundled ViLT's)."""
    begin, end = minivl_markers(bundled)
    return write_results_mini(path, block, title=MINIVL_FILE_TITLE, first=begin, anchor=end)
