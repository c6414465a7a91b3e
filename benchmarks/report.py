"""Results: one Row per case, shown as a markdown table, a summary, the results file and a plot."""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from cases import MODES, Case, min_bytes

# The targets the summary is read against: nn / ours, for the compiled backend.
# (mode, dtype or None for every dtype) -> (lowest median, lowest single case or None)
TARGETS = {("fwd+bwd", "float32"): (1.5, 1.0), ("eval", None): (1.0, 1.0)}  # eval: every case ≥ 1.0
NOISY = 0.1  # a timing whose interquartile range exceeds this fraction of its median is marked ~


@dataclass
class Row:
    case: Case
    seconds: dict  # column name -> median seconds of one call; None when it failed
    baselines: tuple  # the columns that are torch.nn
    copy_gbps: float  # same-size dst.copy_(src), this run
    notes: dict = field(default_factory=dict)  # column name -> remark (cuDNN declined, error)
    spread: dict = field(default_factory=dict)  # column name -> interquartile range / median
    flag: str = ""  # why the machine was too busy for this case (machine.why_flagged); "" when quiet

    def nn_seconds(self):
        """The faster torch.nn time (cuDNN or native on CUDA; the only one on CPU)."""
        times = [self.seconds[b] for b in self.baselines if self.seconds.get(b)]
        return min(times) if times else None

    def time_of(self, column):
        return self.nn_seconds() if column == "nn" else self.seconds.get(column)

    def gbps(self, column):
        t = self.time_of(column)
        return min_bytes(self.case) / t / 1e9 if t else None

    def ratio(self, column):
        """nn time / column time: > 1 means `column` is faster than torch.nn."""
        nn_t, t = self.nn_seconds(), self.seconds.get(column)
        return nn_t / t if nn_t and t else None


def row_to_dict(row: Row) -> dict:
    return dataclasses.asdict(row)


def row_from_dict(d: dict) -> Row:
    case = Case(tuple(d["case"]["shape"]), d["case"]["layout"], d["case"]["dtype"], d["case"]["mode"])
    return Row(case, d["seconds"], tuple(d["baselines"]), d["copy_gbps"], d["notes"], d["spread"], d.get("flag", ""))


# ---------------------------------------------------------------- header

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(device, threads, backends, timer, min_run_time, rounds=1) -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"# Batch norm speed: torch_bn_manual against torch.nn ({device})", ""]
    load = ", load average %.2f %.2f %.2f at start" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    lines.append(f"- CPU: {cpu_model()}, {os.cpu_count()} cores ({usable} usable)"
                 + (f", {threads} intra-op threads (torch.set_num_threads)" if device == "cpu" else "") + load)
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}; CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    lines.append(f"- torch {torch.__version__}; torch_bn_manual backends: {', '.join(backends) or 'none (package not importable)'}")
    lines.append(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; git {git_revision()}")
    lines.append(f"- command: `{shlex.join(getattr(sys, 'orig_argv', [sys.executable] + sys.argv))}`")
    lines.append(f"- timing: {timer}, median of one call; the columns take turns in {rounds} round(s) of "
                 f"{min_run_time / rounds:.2g} s each per case, and the median round counts")
    lines.append("- modules hold float32 parameters for every input dtype; train modes update the running stats;"
                 " fwd+bwd is `m(x).backward(dy)` with grads set to None each call")
    lines.append("- GB/s counts the least traffic: fwd and eval read x and write y; fwd+bwd adds reading x and dy and"
                 " writing dx. %copy sets it against `dst.copy_(src)` of one tensor of the same size, measured in this run")
    lines.append("- nn/X > 1 means X is faster than torch.nn" + (" (on CUDA: the faster of cuDNN and native)" if device == "cuda" else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- table

def primary(ours):
    """The backend whose bandwidth is shown: the compiled one where built."""
    return "cpp" if "cpp" in ours else (ours[0] if ours else None)


def columns(names, baselines) -> list:
    ours = [n for n in names if n not in baselines]
    nn = "nn" if len(baselines) == 1 else "best nn"
    cols = ["shape", "layout", "dtype", "mode"] + [f"{n} ms" for n in names] + [f"nn/{o}" for o in ours] + ["copy GB/s"]
    for who in filter(None, [primary(ours), nn]):
        cols += [f"{who} GB/s", f"{who} %copy"]
    return cols


def _num(v):
    return "—" if v is None else f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def _ratio(v):
    return "—" if v is None else f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"


def format_row(row: Row, names) -> str:
    ours = [n for n in names if n not in row.baselines]
    c = row.case
    cells = ["x".join(map(str, c.shape)) + (" !" if row.flag else ""), c.layout, c.dtype, c.mode]
    for n in names:
        t = row.seconds.get(n)
        mark = "†" if row.notes.get(n, "").startswith("cuDNN declined") else ""
        mark += "~" if row.spread.get(n, 0) > NOISY else ""
        cells.append("err" if row.notes.get(n, "").startswith("error") else _num(t and t * 1e3) + mark)
    cells += [_ratio(row.ratio(o)) for o in ours]
    cells.append(_num(row.copy_gbps))
    for who in filter(None, [primary(ours), "nn"]):
        g = row.gbps(who)
        cells += [_num(g), "—" if g is None else f"{100 * g / row.copy_gbps:.0f}%"]
    return "| " + " | ".join(cells) + " |"


def table_head(names, baselines) -> str:
    cols = columns(names, baselines)
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def footnotes(rows) -> str:
    lines = []
    if any(v > NOISY for r in rows for v in r.spread.values()):
        lines.append(f"~ noisy: the interquartile range within a round, or the spread between the rounds, "
                     f"exceeds {NOISY:.0%} of the median.")
    if any(n.startswith("cuDNN declined") for r in rows for n in r.notes.values()):
        lines.append("† cuDNN was on but torch.nn ran its native kernels for this case.")
    if any(r.flag for r in rows):
        lines.append("! the machine was busy during this case, and during its rerun: "
                     + "; ".join(f"{r.case.label()}: {r.flag}" for r in rows if r.flag))
    for r in rows:
        for name, note in r.notes.items():
            if note.startswith("error"):
                lines.append(f"- {r.case.label()} [{name}]: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------- summary

def summary(rows, names, baselines) -> str:
    ours = [n for n in names if n not in baselines]
    lines = ["## Summary: nn / backend over shapes × layouts (> 1: backend faster)", "",
             "| mode | dtype | backend | median | min | cases | target (cpp) | met |",
             "|---|---|---|---|---|---|---|---|"]
    dtypes = list(dict.fromkeys(r.case.dtype for r in rows))  # in the order measured
    keys = sorted({(r.case.mode, r.case.dtype) for r in rows}, key=lambda k: (MODES.index(k[0]), dtypes.index(k[1])))
    for mode, dtype in keys:
        for o in ours:
            ratios = [r.ratio(o) for r in rows if (r.case.mode, r.case.dtype) == (mode, dtype)]
            ratios = [x for x in ratios if x is not None]
            med, low = (statistics.median(ratios), min(ratios)) if ratios else (None, None)
            target = (TARGETS.get((mode, dtype)) or TARGETS.get((mode, None))) if o == "cpp" else None
            text, met = "", ""
            if target:
                text = f"median ≥ {target[0]}" + (f", none < {target[1]}" if target[1] is not None else "")
                met = "—" if med is None else "yes" if med >= target[0] and (target[1] is None or low >= target[1]) else "no"
            lines.append(f"| {mode} | {dtype} | {o} | {_ratio(med)} | {_ratio(low)} | {len(ratios)} | {text} | {met} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the results file

def busy_banner(reasons) -> str:
    shown = reasons[:8] + ([f"... and {len(reasons) - 8} more"] if len(reasons) > 8 else [])
    return ("> **BUSY MACHINE: these numbers are not valid and must not be quoted.** Other work disturbed the run\n"
            "> (benchmarks/machine.py). Rerun `make bench` on a quiet machine. What was seen:\n"
            + "\n".join(f"> - {r}" for r in shown) + "\n")


def document(head: str, passes, names, baselines, titles) -> str:
    """The results file: header, a BUSY banner when a pass was disturbed, then per allocator pass its
    machine state, table, footnotes and summary. Generated only: the analysis is in docs/performance.md."""
    busy = [reason for p in passes for reason in p["busy"]]
    title, rest = head.split("\n", 1)
    parts = [title, "", busy_banner(busy)] if busy else [title]
    parts.append(rest.rstrip("\n"))
    parts.append("- generated by benchmarks/bench.py and rewritten on every run; the analysis of these numbers is "
                 "in docs/performance.md")
    for k, p in enumerate(passes, 1):
        rows = p["rows"]
        heading = titles.get(p["allocator"], p["allocator"])
        parts += ["", f"## {k}. {heading}" if len(passes) > 1 else f"## {heading}", "", p["allocator_line"],
                  f"- machine at the start: {p['start']}; at the end: {p['end']}", "",
                  table_head(names, baselines), "\n".join(format_row(r, names) for r in rows)]
        notes = footnotes(rows)
        if notes:
            parts += ["", notes]
        parts += ["", "#" + summary(rows, names, baselines).rstrip("\n")]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plot

def plot_passes(passes, names, baselines, path, titles, busy=False) -> None:
    """nn / compiled backend per case, one bar per allocator pass; BUSY in the title when disturbed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install matplotlib); {path} not written.")
        return
    ours = [n for n in names if n not in baselines]
    who = primary(ours)
    if who is None:
        print(f"no plot: no torch_bn_manual backend was measured; {path} not written.")
        return
    rows0 = passes[0]["rows"]
    labels = [r.case.label() for r in rows0]
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(rows0) * len(passes) + 2))
    height = 0.8 / len(passes)
    for k, p in enumerate(passes):
        ys = [i + k * height for i in range(len(rows0))]
        ax.barh(ys, [r.ratio(who) or 0 for r in p["rows"]], height=height,
                label=titles.get(p["allocator"], p["allocator"]))
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows0))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"time of torch.nn / time of {who}  (> 1: {who} faster)")
    ax.set_title(("BUSY MACHINE, NOT VALID: " if busy else "") + f"batch norm, torch.nn / torch_bn_manual {who}",
                 color="red" if busy else "black")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")
