"""Fused batch norm + (add +) ReLU against the same block in torch.nn, eager and torch.compile'd.

    .venv/bin/python benchmarks/bench_fused.py                  writes benchmarks/results/fused-cpu.md
    .venv/bin/python benchmarks/bench_fused.py --quick --out -  a smoke run

Block cases: BN+ReLU and BN+add+ReLU, train (forward + backward) and eval,
float32 and bfloat16 (float32 parameters), contiguous and channels_last, on
the shapes of issue 19. Columns, each a fresh module of the same state:
  nn        nn.BatchNorm2d, then `out += z`, then nn.ReLU(inplace=True): torchvision's spelling
  compile   torch.compile of that nn block (static shapes, torch._dynamo.reset() per case)
  unfused   this package's BatchNorm2d (cpp) in place of nn's, the same add and ReLU
  fused     BatchNormAct2d (cpp): one layer, forward(x, residual=z)
In train the input and the residual require grad (as in a network). The
columns take turns within each case (timing.take_turns), so a slow spell of
this shared machine hits them alike; ratios are nn time / column time.

The model line: a ResNet-18 (torchvision's layout, tests/resnets.py) training
step (forward, cross-entropy, backward, SGD) at batch 32, 3x112x112: nn
eager against fuse_activations(convert_batchnorm(model)) and
convert_batchnorm(model) alone, the three models holding the same state.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import os
import shlex
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # resnets.py: the ResNets with torchvision's layout

import torch_bn_manual as bnm  # noqa: E402
from resnets import resnet18  # noqa: E402
from timing import take_turns  # noqa: E402

SHAPES = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)]
QUICK_SHAPES = [(32, 256, 14, 14)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")
BLOCKS = ("bn+relu", "bn+add+relu")
MODES = ("train", "eval")
COLUMNS = ("nn", "compile", "unfused", "fused")
# issue 19's targets: (mode, dtype) -> the columns' lowest ratios nn/fused asked for: (median, every case)
TARGETS = {("train", "float32"): (1.5, 1.0), ("eval", None): (1.3, 1.0)}


class NNBlock(nn.Module):
    """What the fused layer replaces, spelled as torchvision's blocks spell it."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, residual=None):
        out = self.bn(x)
        if residual is not None:
            out += residual
        return self.relu(out)


def keep_freed_memory() -> str:
    """glibc keeps freed memory, so every column reuses its outputs' pages (as bench.py does)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-1, 1 << 30) == 1 and libc.mallopt(-3, 1 << 30) == 1  # M_TRIM/M_MMAP_THRESHOLD
    except OSError:
        ok = False
    return "glibc told to keep freed memory (mallopt, 1 GiB thresholds)" if ok else "glibc malloc at its defaults"


def block_columns(shape, layout, dtype, block, mode, compile_too):
    """{column: callable} for one case; every module starts from the same state."""
    channels = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    z = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt) if block == "bn+add+relu" else None
    dy = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    modules = {"nn": NNBlock(nn.BatchNorm2d(channels)), "unfused": NNBlock(bnm.BatchNorm2d(channels, backend="cpp")),
               "fused": bnm.BatchNormAct2d(channels, backend="cpp")}
    if compile_too:
        torch._dynamo.reset()
        modules["compile"] = torch.compile(NNBlock(nn.BatchNorm2d(channels)), dynamic=False)
    fns = {}
    for name in COLUMNS:
        if name not in modules:
            continue
        module = modules[name]
        module.train(mode == "train")
        if mode == "eval":
            def step(module=module):
                with torch.no_grad():
                    module(x, z)
        else:
            xg = x.detach().requires_grad_(True)
            zg = None if z is None else z.detach().requires_grad_(True)

            def step(module=module, xg=xg, zg=zg):
                # The add is in place in the nn block: it gets a fresh sum to add to, as in a network.
                module(xg, zg).backward(dy)
                xg.grad = None
                if zg is not None:
                    zg.grad = None
                for p in module.parameters():
                    p.grad = None
        fns[name] = step
    return fns


def resnet_columns(batch, size, layout, threads):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    reference = resnet18(num_classes=1000).to(memory_format=fmt)
    models = {"nn": reference,
              "unfused": bnm.convert_batchnorm(copy.deepcopy(reference), "cpp"),
              "fused": bnm.fuse_activations(bnm.convert_batchnorm(copy.deepcopy(reference), "cpp"), "cpp")}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,), generator=gen)
    fns = {}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            optimizer.step()
        fns[name] = step
    return fns, len([line for line in models["fused"].fusion_report if "not fused" not in line])


def fmt_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def fmt_ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def summary(rows):
    lines = []
    for (mode, dtype), (median_target, lowest_target) in TARGETS.items():
        selected = [r for r in rows if r["mode"] == mode and (dtype is None or r["dtype"] == dtype)]
        for column in ("fused", "unfused"):
            ratios = [r["t"]["nn"] / r["t"][column] for r in selected if r["t"].get("nn") and r["t"].get(column)]
            if not ratios:
                continue
            med, low = statistics.median(ratios), min(ratios)
            verdict = ""
            if column == "fused":
                met = med >= median_target and low >= lowest_target
                verdict = (f" (target: median >= {median_target}, none below {lowest_target}: "
                           f"{'met' if met else 'MISSED'})")
            lines.append(f"- {mode} {dtype or 'all dtypes'}: nn/{column} median {med:.2f}x, lowest {low:.2f}x over "
                         f"{len(ratios)} cases{verdict}")
        compiled = [r["t"]["compile"] / r["t"]["fused"] for r in selected
                    if r["t"].get("compile") and r["t"].get("fused")]
        if compiled:
            target = " (target: >= 1.0 on every case: " + ("met)" if min(compiled) >= 1.0 else "MISSED)") \
                if mode == "train" else ""
            lines.append(f"- {mode} {dtype or 'all dtypes'}: compile/fused median {statistics.median(compiled):.2f}x, "
                         f"lowest {min(compiled):.2f}x over {len(compiled)} cases{target}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape, short runs, a small model: a smoke run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seconds", type=float, default=0.8, help="timing per column and case, over all rounds")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--compile", default="float32", help="dtypes that get the torch.compile column ('' for none)")
    p.add_argument("--compile-modes", default="train,eval", help="modes that get the torch.compile column")
    p.add_argument("--model-seconds", type=float, default=12.0)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "fused-cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    seconds = 0.1 if args.quick else args.seconds
    dtypes = [d for d in args.dtypes.split(",") if d]
    compiled_dtypes = [d for d in args.compile.split(",") if d]
    compiled_modes = [m for m in args.compile_modes.split(",") if m]
    load = os.getloadavg()
    rows = []
    for shape in shapes:
        for layout in LAYOUTS:
            for dtype in dtypes:
                for block in BLOCKS:
                    for mode in MODES:
                        fns = block_columns(shape, layout, DTYPES[dtype], block, mode,
                                            dtype in compiled_dtypes and mode in compiled_modes)
                        results, errors = take_turns(fns, "cpu", seconds, args.threads, args.rounds)
                        row = {"shape": shape, "layout": layout, "dtype": dtype, "block": block, "mode": mode,
                               "t": {k: v[0] for k, v in results.items()}, "errors": errors}
                        rows.append(row)
                        t = row["t"]
                        print(f"{'x'.join(map(str, shape))} {layout} {dtype} {block} {mode}: "
                              + " ".join(f"{c} {fmt_ms(t.get(c))}" for c in COLUMNS)
                              + f"  nn/fused {fmt_ratio(t.get('nn'), t.get('fused'))}"
                              + "".join(f"  {k}: {v}" for k, v in errors.items()), flush=True)
    model_lines = []
    if not args.no_model:
        batch, size = (4, 64) if args.quick else (32, 112)
        for layout in LAYOUTS:
            fns, fused_count = resnet_columns(batch, size, layout, args.threads)
            results, errors = take_turns(fns, "cpu", 1.0 if args.quick else args.model_seconds, args.threads,
                                         2 if args.quick else 3)
            t = {k: v[0] for k, v in results.items()}
            line = (f"| ResNet-18 train step, batch {batch}, 3x{size}x{size} | {layout} | {fmt_ms(t.get('nn'))} | "
                    f"{fmt_ms(t.get('unfused'))} | {fmt_ms(t.get('fused'))} | {fmt_ratio(t.get('nn'), t.get('unfused'))} | "
                    f"{fmt_ratio(t.get('nn'), t.get('fused'))} | {fused_count} |")
            print(line, errors or "", flush=True)
            model_lines.append(line)
    write(args, rows, model_lines, allocator, load)


def write(args, rows, model_lines, allocator, load):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    text = ["# Fused batch norm + (add +) ReLU against torch.nn on the CPU (generated by benchmarks/bench_fused.py)", "",
            f"- command: `{' '.join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)] + sys.argv)}`",
            f"- torch {torch.__version__}; {args.threads} intra-op thread(s); load average {load[0]:.1f} "
            f"{load[1]:.1f} {load[2]:.1f} at start; git {commit}; "
            f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- timing: timing.take_turns, {args.rounds} rounds per case, the columns in turn, median of the "
            f"round medians; {allocator}",
            "- columns: nn = nn.BatchNorm2d, `out += z`, nn.ReLU(inplace=True); compile = torch.compile of that "
            "block (static shapes); unfused = our BatchNorm2d (cpp) with the same add and ReLU; fused = "
            "BatchNormAct2d (cpp). train = forward + backward, input and residual requiring grad",
            "- ratios are nn time / column time (> 1: faster than nn)", "", "## Summary", ""]
    text += summary(rows) + [""]
    if model_lines:
        text += ["| model | layout | nn ms | unfused ms | fused ms | nn/unfused | nn/fused | fused layers |",
                 "|---|---|---|---|---|---|---|---|"] + model_lines + [""]
    text += ["## Block cases", "",
             "| shape | layout | dtype | block | mode | nn ms | compile ms | unfused ms | fused ms | nn/unfused | "
             "nn/fused | compile/fused |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["t"]
        text.append(f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['block']} | {r['mode']} | "
                    f"{fmt_ms(t.get('nn'))} | {fmt_ms(t.get('compile'))} | {fmt_ms(t.get('unfused'))} | "
                    f"{fmt_ms(t.get('fused'))} | {fmt_ratio(t.get('nn'), t.get('unfused'))} | "
                    f"{fmt_ratio(t.get('nn'), t.get('fused'))} | {fmt_ratio(t.get('compile'), t.get('fused'))} |")
    if args.out != "-":
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(text) + "\n")
        print(f"wrote {args.out}")
    else:
        print("\n".join(text))


if __name__ == "__main__":
    main()
