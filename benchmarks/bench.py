"""Batch norm speed: torch_bn_manual's backends against torch.nn.BatchNorm1d/2d.

    make bench        .venv/bin/python benchmarks/bench.py                 (CPU)
    make bench-cuda   .venv/bin/python benchmarks/bench.py --device cuda   (ResNet-50 shapes)

Every case is timed for each column on a freshly built module: torch.nn
(on CUDA twice, with cuDNN on and off) and each torch_bn_manual backend that
is available, constructed with that backend by name. Before timing, one call
is profiled to check that the column runs what it claims to run.

Options: --quick (few shapes, short runs: a smoke run), --shapes 32x64x56x56,4096x1024,
--layouts, --dtypes, --modes fwd,fwd+bwd,eval, --min-run-time S, --rounds R, --threads N,
--allocator both|default|keep-freed, --out PATH ('-' for no file), --plot FILE.png / --no-plot.

Output: the tables go to benchmarks/results/cpu-latest.md and the plot to
cpu-latest.png (on CUDA, <gpu>-latest.md/.png), files this script owns and
rewrites on every run; the analysis of the numbers is written by hand in
docs/performance.md and is never touched here. --quick writes nothing unless
--out is given.

Allocator (CPU). Two passes, each in its own process, since glibc cannot be
put back to its defaults once told otherwise:
- "glibc defaults": what a user's training loop gets. Outputs larger than
  glibc's mmap threshold may fault in fresh pages on every call, or not,
  depending on what the heap freed before; this is the headline figure;
- "keep freed memory": glibc told (mallopt) to keep freed memory, so that
  every column reuses the pages of its previous outputs: the kernels' own
  speed, without page faults.

Busy machine (machine.py): the copy bandwidth and the other processes' CPU
use are measured at the start, after every case and at the end; a case
disturbed by either is rerun once. If a case stays disturbed, or the copy
bandwidth at the end is more than 25% away from the start, the run is BUSY:
the results file is still written, under a BUSY banner that says why, the
plot is titled BUSY, and the script exits with status 3 so that `make bench`
fails. Numbers from a BUSY run are not to be quoted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))  # the repo, when the package is not installed

import cases as C  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
from report import Row  # noqa: E402
from timing import cuda_timer_name, measure, ops_called, take_turns  # noqa: E402

try:
    import torch_bn_manual as bnm

    BACKENDS = list(bnm.available_backends())
except (ImportError, AttributeError):  # the package is not there (yet)
    bnm, BACKENDS = None, []


# ---------------------------------------------------------------- what is timed

@dataclass(frozen=True)
class Impl:
    """One column: torch.nn (backend None) or a torch_bn_manual backend."""

    name: str
    backend: str | None = None
    cudnn: bool | None = None  # CUDA torch.nn only: cuDNN on or off while it runs

    def module(self, shape, device):
        kind = "BatchNorm1d" if len(shape) == 2 else "BatchNorm2d"
        if self.backend is None:
            return getattr(torch.nn, kind)(shape[1], device=device)
        return getattr(bnm, kind)(shape[1], device=device, backend=self.backend)


def impls_for(device, backends=None) -> list:
    backends = BACKENDS if backends is None else backends
    nn = [Impl("nn")] if device == "cpu" else [Impl("cuDNN", cudnn=True), Impl("native", cudnn=False)]
    return nn + [Impl(b, backend=b) for b in backends]


def make_step(module, x, dy, mode):
    """The call that is timed. x requires grad (it is a layer's input in training)."""
    if mode == "eval":
        module.eval()
        xe = x.detach()

        def step():
            with torch.no_grad():
                module(xe)
    elif mode == "fwd":
        module.train()

        def step():
            module(x)
    else:
        module.train()

        def step():
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(dy)
    return step


def check_ran(impl, ops) -> str:
    """Raise unless the profiled call ran the implementation the column names; return a remark."""
    aten_bn = sorted(o for o in ops if o.startswith("aten::") and "batch_norm" in o)
    ours = sorted(o for o in ops if o.startswith("torch_bn_manual::"))
    if impl.backend is None:
        if not aten_bn or ours:
            raise RuntimeError(f"torch.nn column ran {aten_bn + ours}")
        if impl.cudnn is False and "aten::cudnn_batch_norm" in ops:
            raise RuntimeError("cuDNN ran with torch.backends.cudnn.enabled=False")
        if impl.cudnn and "aten::cudnn_batch_norm" not in ops:
            return "cuDNN declined: native kernels ran"
    elif aten_bn:
        raise RuntimeError(f"backend {impl.backend!r} ran torch's batch norm: {aten_bn}")
    elif impl.backend == "python" and ours:
        raise RuntimeError(f"backend 'python' ran compiled ops: {ours}")
    elif impl.backend == "cpp" and not ours:
        raise RuntimeError("backend 'cpp' ran no torch_bn_manual:: op")
    return ""


class cudnn_enabled:
    """Sets torch.backends.cudnn.enabled for a block (None: leave it)."""

    def __init__(self, flag):
        self.flag = flag

    def __enter__(self):
        self.saved = torch.backends.cudnn.enabled
        if self.flag is not None:
            torch.backends.cudnn.enabled = self.flag

    def __exit__(self, *exc):
        torch.backends.cudnn.enabled = self.saved


_copy_gbps = {}


def copy_gbps(case, device, min_run_time, threads) -> float:
    """Bandwidth of dst.copy_(src) for one tensor of the case's size and dtype."""
    key = (case.numel, case.dtype, device)
    if key not in _copy_gbps:
        src = torch.randn(case.numel, device=device).to(getattr(torch, case.dtype))
        dst = torch.empty_like(src)
        t, _ = measure(lambda: dst.copy_(src), device, min_run_time, threads)
        _copy_gbps[key] = C.copy_bytes(case) / t / 1e9
    return _copy_gbps[key]


def run_case(case, impls, device="cpu", min_run_time=0.5, threads=None, rounds=1) -> Row:
    """Time every column on one case; a column that fails gets None and an 'error: ...' note.

    With rounds > 1 the columns take turns: each round times every column for
    min_run_time / rounds (starting with a different column each round), and
    a column's time is the median of its round medians. A machine whose speed
    drifts (other tenants, frequency, the page cache) then slows every column
    alike instead of whichever happened to run during the slow spell.
    """
    threads = threads or torch.get_num_threads()
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    x = torch.randn(case.shape, device=device).to(getattr(torch, case.dtype)).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    x.requires_grad_(True)
    steps, notes, seconds, spread = {}, {}, {}, {}
    for impl in impls:
        try:
            steps[impl.name] = make_step(impl.module(case.shape, device), x, dy, case.mode)
            with cudnn_enabled(impl.cudnn):
                notes[impl.name] = check_ran(impl, ops_called(steps[impl.name]))
        except Exception as e:  # shown in the table as 'err', explained under it
            seconds[impl.name], notes[impl.name] = None, f"error: {type(e).__name__}: {e}"
            steps.pop(impl.name, None)
    cudnn = {impl.name: impl.cudnn for impl in impls}
    timed, errors = take_turns(steps, device, min_run_time, threads, rounds,
                               context=lambda name: cudnn_enabled(cudnn[name]))
    for name, (t, noise) in timed.items():
        seconds[name], spread[name] = t, noise
    for name, e in errors.items():
        seconds[name], notes[name] = None, f"error: {type(e).__name__}: {e}"
    baselines = tuple(i.name for i in impls if i.backend is None)
    return Row(case, seconds, baselines, copy_gbps(case, device, min_run_time, threads), notes, spread)


# ---------------------------------------------------------------- command line

ALLOCATORS = ("both", "default", "keep-freed")
ALLOCATOR_TITLES = {
    "default": "glibc defaults: what a training loop gets",
    "keep-freed": "freed memory kept (mallopt): the kernels' own speed",
}
BUSY_EXIT = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="few shapes and short runs (smoke run); writes no file unless --out")
    p.add_argument("--shapes", help="comma-separated NxC or NxCxHxW, e.g. 32x64x56x56,4096x1024")
    p.add_argument("--layouts", default=",".join(C.LAYOUTS), help="contiguous,channels_last (4-D shapes only)")
    p.add_argument("--dtypes", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--modes", default=",".join(C.MODES), help="comma-separated: fwd,fwd+bwd,eval")
    p.add_argument("--allocator", choices=ALLOCATORS, default=None,
                   help="both (CPU default): one pass with glibc malloc at its defaults, what a training loop gets, "
                        "and one with glibc told to keep freed memory (mallopt: no trimming, no mmap for large "
                        "blocks), the kernels' own speed; each pass in its own process. default / keep-freed: one "
                        "pass (keep-freed is the CUDA default)")
    p.add_argument("--system-allocator", action="store_true", help="same as --allocator default")
    p.add_argument("--min-run-time", type=float, help="seconds per column and case (default 0.6; --quick 0.05)")
    p.add_argument("--rounds", type=int, help="the columns take turns this many times per case, each for "
                                              "min-run-time / rounds; the median round counts (default 8; --quick 1)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: the usable cores)")
    p.add_argument("--out", help="results file; '-' for none (default benchmarks/results/cpu-latest.md, "
                                 "or <gpu>-latest.md)")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of nn/backend per case (default: the results "
                                                      "file with .png; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="draw no plot")
    p.add_argument("--json", help=argparse.SUPPRESS)  # a pass run as a child process writes its rows here
    args = p.parse_args(argv)
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch")
    if args.shapes:
        args.shapes = [C.parse_shape(s) for s in split(args.shapes)]
    else:
        args.shapes = (C.CUDA_QUICK_SHAPES if args.quick else C.CUDA_SHAPES) if cuda else (C.CPU_QUICK_SHAPES if args.quick else C.CPU_SHAPES)
    args.dtypes = split(args.dtypes) if args.dtypes else list(C.CUDA_DTYPES if cuda else C.CPU_DTYPES)
    args.modes, args.layouts = split(args.modes), split(args.layouts)
    for value, allowed, what in [(args.modes, C.MODES, "mode"), (args.layouts, C.LAYOUTS, "layout"),
                                 (args.dtypes, ("float32", "bfloat16", "float16", "float64"), "dtype")]:
        bad = [v for v in value if v not in allowed]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {list(allowed)}")
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 0.6
    if args.rounds is None:
        args.rounds = 1 if args.quick else 8
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.system_allocator:
        args.allocator = "default"
    if args.allocator is None:
        args.allocator = "keep-freed" if cuda else "both"
    if args.out is None and not args.quick:
        slug = "cpu" if not cuda else "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in torch.cuda.get_device_name().lower()).strip("-")
        args.out = os.path.join(HERE, "results", slug + "-latest.md")
    if args.out == "-":
        args.out = None
    if args.no_plot:
        args.plot = None
    elif args.plot is None and args.out:
        args.plot = os.path.splitext(args.out)[0] + ".png"
    return args


def keep_freed_memory() -> str:
    """Tell glibc malloc to keep freed memory: returns a line for the report, or why it could not."""
    import ctypes
    import ctypes.util
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError) as e:
        return f"- allocator: could not set glibc mallopt ({e}); default behaviour"
    if not ok:
        return "- allocator: glibc mallopt refused; default behaviour"
    return ("- allocator: glibc told to keep freed memory (mallopt M_TRIM_THRESHOLD and M_MMAP_THRESHOLD 1 GiB): "
            "outputs reuse pages instead of faulting in fresh ones; the kernels' own speed")


DEFAULT_ALLOCATOR_LINE = ("- allocator: glibc malloc at its defaults, as in a training loop: outputs may fault in "
                          "fresh pages, depending on the heap's history")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_pass(args, allocator: str, title: str = "") -> dict:
    """Times every case in this process with `allocator` set; prints rows as they finish.

    Returns {"allocator", "allocator_line", "rows", "start", "end", "busy"}: the probes as
    described by machine.Probe.describe, busy a list of reasons (empty on a quiet run).
    """
    allocator_line = keep_freed_memory() if allocator == "keep-freed" else DEFAULT_ALLOCATOR_LINE
    impls = impls_for(args.device)
    names = [i.name for i in impls]
    cases = C.make_cases(args.shapes, args.layouts, args.dtypes, args.modes)
    start_probe = machine.Probe.now()
    print(f"{title}{allocator_line[2:]}\nmachine at the start: {start_probe.describe()}", flush=True)
    print(report.table_head(names, tuple(i.name for i in impls if i.backend is None)), flush=True)
    rows, began = [], time.perf_counter()
    for k, case in enumerate(cases, 1):
        elapsed = time.perf_counter() - began
        left = "" if k == 1 else f", about {format_duration(elapsed / (k - 1) * (len(cases) - k + 1))} left"
        print(f"[{k}/{len(cases)}] {case.label()}{left}", flush=True)
        for attempt in range(2):  # a case disturbed by other work is rerun once
            meter = machine.OthersMeter().start()
            row = run_case(case, impls, args.device, args.min_run_time, args.threads, args.rounds)
            others = meter.stop()
            row.flag = machine.why_flagged(start_probe, machine.Probe.now(), others)
            if not row.flag:
                break
            print(f"    disturbed: {row.flag}" + ("; running it again" if attempt == 0 else ""), flush=True)
        rows.append(row)
        print(report.format_row(row, names), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    end_probe = machine.Probe.now()
    busy = [f"{r.case.label()}: {r.flag}" for r in rows if r.flag]
    if machine.copy_moved(start_probe, end_probe):
        busy.insert(0, f"copy bandwidth {start_probe.copy_gbps:.1f} GB/s at the start, {end_probe.copy_gbps:.1f} at the end")
    print(f"machine at the end: {end_probe.describe()}" + (f"; BUSY ({len(busy)} signs)" if busy else ""), flush=True)
    return {"allocator": allocator, "allocator_line": allocator_line, "rows": rows,
            "start": start_probe.describe(), "end": end_probe.describe(), "busy": busy, "names": names}


def run_pass_in_child(argv, allocator: str, title: str) -> dict:
    """run_pass in a fresh process (glibc's settings cannot be undone within one)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pass.json")
        child = [a for a in argv if a not in ("--system-allocator",)]
        cmd = [sys.executable, os.path.abspath(__file__), *child, "--allocator", allocator, "--out", "-",
               "--no-plot", "--json", path]
        env = dict(os.environ, BENCH_PASS_TITLE=title)
        subprocess.run(cmd, check=True, env=env)
        with open(path) as f:
            result = json.load(f)
    result["rows"] = [report.row_from_dict(r) for r in result["rows"]]
    return result


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impls = impls_for(args.device)
    names = [i.name for i in impls]
    baselines = tuple(i.name for i in impls if i.backend is None)
    timer = cuda_timer_name() if args.device == "cuda" else "torch.utils.benchmark blocked_autorange"
    head = report.header(args.device, args.threads, BACKENDS, timer, args.min_run_time, args.rounds)
    if args.json:  # a child pass: time, hand the rows back, write nothing else
        result = run_pass(args, args.allocator, os.environ.get("BENCH_PASS_TITLE", ""))
        result["rows"] = [report.row_to_dict(r) for r in result["rows"]]
        with open(args.json, "w") as f:
            json.dump(result, f)
        return result
    print(head, flush=True)
    if args.allocator == "both":
        argv_child = [a for a in argv]
        passes = [run_pass_in_child(argv_child, a, f"== pass {k} of 2: ") for k, a in
                  enumerate(("default", "keep-freed"), 1)]
    else:
        passes = [run_pass(args, args.allocator)]
    text = report.document(head, passes, names, baselines, ALLOCATOR_TITLES)
    busy = [reason for p in passes for reason in p["busy"]]
    for k, p in enumerate(passes, 1):
        notes = report.footnotes(p["rows"])
        print(f"\n{k}. {ALLOCATOR_TITLES.get(p['allocator'], p['allocator'])}" + ("\n" + notes if notes else "")
              + "\n" + report.summary(p["rows"], names, baselines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"results written to {args.out}")
    if args.plot:
        report.plot_passes(passes, names, baselines, args.plot, ALLOCATOR_TITLES, busy=bool(busy))
    if busy:
        print("\n" + report.busy_banner(busy), file=sys.stderr, flush=True)
        if not args.quick:
            sys.exit(BUSY_EXIT)
    return passes


if __name__ == "__main__":
    main()
