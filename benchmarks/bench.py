"""Batch norm speed: torch_bn_manual's backends against torch.nn.BatchNorm1d/2d.

    make bench        .venv/bin/python benchmarks/bench.py                 (CPU)
    make bench-cuda   .venv/bin/python benchmarks/bench.py --device cuda   (ResNet-50 shapes)

Every case is timed for each column on a freshly built module: torch.nn
(on CUDA twice, with cuDNN on and off) and each torch_bn_manual backend that
is available, constructed with that backend by name. Before timing, one call
is profiled to check that the column runs what it claims to run.

Options: --quick (few shapes, short runs: a smoke run), --shapes 32x64x56x56,4096x1024,
--layouts, --dtypes, --modes fwd,fwd+bwd,eval, --min-run-time S, --rounds R, --threads N,
--out PATH ('-' for no file), --plot FILE.png (needs matplotlib), --system-allocator.

glibc malloc is told to keep freed memory (see --system-allocator): every column then
reuses the pages of its previous outputs, instead of some columns faulting in fresh
pages on every call and others not, depending on what ran before them.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))  # the repo, when the package is not installed

import cases as C  # noqa: E402
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

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="few shapes and short runs (smoke run); writes no file unless --out")
    p.add_argument("--shapes", help="comma-separated NxC or NxCxHxW, e.g. 32x64x56x56,4096x1024")
    p.add_argument("--layouts", default=",".join(C.LAYOUTS), help="contiguous,channels_last (4-D shapes only)")
    p.add_argument("--dtypes", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--modes", default=",".join(C.MODES), help="comma-separated: fwd,fwd+bwd,eval")
    p.add_argument("--system-allocator", action="store_true",
                   help="leave glibc malloc at its defaults. By default it is told to keep freed memory (mallopt: "
                        "no trimming, no mmap for large blocks), because otherwise whether a column's outputs fault "
                        "in fresh pages (3,100 faults, about 5 ms, per 12.8 MB output here) depends on what the "
                        "columns before it freed, not on the column itself")
    p.add_argument("--min-run-time", type=float, help="seconds per column and case (default 0.6; --quick 0.05)")
    p.add_argument("--rounds", type=int, help="the columns take turns this many times per case, each for "
                                              "min-run-time / rounds; the median round counts (default 8; --quick 1)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: the usable cores)")
    p.add_argument("--out", help="results file; '-' for none (default benchmarks/results/cpu.md or cuda-<gpu>.md)")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of nn/backend per case (needs matplotlib)")
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
    if args.out is None and not args.quick:
        slug = "cpu" if not cuda else "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in torch.cuda.get_device_name().lower()).strip("-")
        args.out = os.path.join(HERE, "results", slug + ".md")
    if args.out == "-":
        args.out = None
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
            "outputs reuse pages instead of faulting in fresh ones")


def main(argv=None):
    args = parse_args(argv)
    allocator_line = ("- allocator: glibc malloc at its defaults (--system-allocator): outputs may fault in fresh "
                      "pages, depending on the heap's history" if args.system_allocator else keep_freed_memory())
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impls = impls_for(args.device)
    names = [i.name for i in impls]
    baselines = tuple(i.name for i in impls if i.backend is None)
    timer = cuda_timer_name() if args.device == "cuda" else "torch.utils.benchmark blocked_autorange"
    head = report.header(args.device, args.threads, BACKENDS, timer, args.min_run_time, args.rounds)
    if allocator_line:
        head = head.rstrip("\n") + "\n" + allocator_line + "\n"
    print(head)
    print(report.table_head(names, baselines), flush=True)
    rows, lines = [], []
    for case in C.make_cases(args.shapes, args.layouts, args.dtypes, args.modes):
        rows.append(run_case(case, impls, args.device, args.min_run_time, args.threads, args.rounds))
        lines.append(report.format_row(rows[-1], names))
        print(lines[-1], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    notes, summary = report.footnotes(rows), report.summary(rows, names, baselines)
    print(("\n" + notes + "\n" if notes else "") + "\n" + summary)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(head + "\n" + report.table_head(names, baselines) + "\n" + "\n".join(lines) + "\n"
                    + ("\n" + notes + "\n" if notes else "") + "\n" + summary)
        print(f"results written to {args.out}")
    if args.plot:
        report.plot(rows, names, baselines, args.plot)
    return rows


if __name__ == "__main__":
    main()
