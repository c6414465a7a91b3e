"""Where a CPU training step's time goes: torch.nn against the compiled backend.

    .venv/bin/python benchmarks/breakdown.py [--out benchmarks/results/cpu-breakdown.md]

bench.py times whole steps. This splits them, to explain the ratios there:

1. fixed cost per step: forward + backward of a tiny (4, 16, 4, 4) input,
   where the arithmetic is negligible and what remains is Python, the
   dispatcher, autograd and allocation;
2. per case (the float32 shapes of bench.py, both layouts): the module's
   forward, the backward alone (autograd.grad through a kept graph), and the
   kernels alone, called directly: for nn `torch.batch_norm` (forward, no
   autograd) and for ours the train-forward and backward ops.

glibc is told to keep freed memory for this run (as in bench.py's second pass),
so that page faults on fresh output memory, which come and go with the heap's
history, do not blur the split. Columns take turns within each round
(timing.take_turns); the median of the round medians is shown.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))

import bench  # noqa: E402
import report  # noqa: E402
from timing import take_turns  # noqa: E402
import torch_bn_manual as bnm  # noqa: E402

SHAPES = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7), (4096, 1024)]
TINY = (4, 16, 4, 4)
OPS = torch.ops.torch_bn_manual


def step_parts(shape, layout, threads, rounds, seconds) -> dict:
    kind = "BatchNorm1d" if len(shape) == 2 else "BatchNorm2d"
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    C = shape[1]
    nn_m, our_m = getattr(torch.nn, kind)(C), getattr(bnm, kind)(C, backend="cpp")
    nn_y, our_y = nn_m(x), our_m(x)
    w, b = our_m.weight.detach(), our_m.bias.detach()
    rm, rv = torch.zeros(C), torch.ones(C)
    xd = x.detach()
    _, mean, invstd = OPS.batch_norm_train_forward(xd, w, b, 1e-5)

    def whole(m):
        def f():
            x.grad = m.weight.grad = m.bias.grad = None
            m(x).backward(dy)
        return f

    fns = {
        "nn step": whole(nn_m), "ours step": whole(our_m),
        "nn fwd": lambda: nn_m(x), "ours fwd": lambda: our_m(x),
        "nn bwd": lambda: torch.autograd.grad(nn_y, (x, nn_m.weight, nn_m.bias), dy, retain_graph=True),
        "ours bwd": lambda: torch.autograd.grad(our_y, (x, our_m.weight, our_m.bias), dy, retain_graph=True),
        "nn fwd kernel": lambda: torch.batch_norm(xd, w, b, rm, rv, True, 0.1, 1e-5, False),
        "ours fwd kernel": lambda: OPS.batch_norm_train_forward(xd, w, b, 1e-5),
        "ours bwd kernel": lambda: OPS.batch_norm_backward(dy, xd, w, mean, invstd, True, 1e-5, [True, True, True]),
    }
    timed, errors = take_turns(fns, "cpu", seconds, threads, rounds)
    if errors:
        raise RuntimeError(f"timing failed: {errors}")
    return {name: t for name, (t, _) in timed.items()}


def ms(t):
    return f"{t * 1e3:.3g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu-breakdown.md"), help="'-' for none")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="per column and case, over all rounds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--shapes", help="comma-separated, e.g. 32x512x7x7,4096x1024")
    args = p.parse_args(argv)
    shapes = [bench.C.parse_shape(s) for s in args.shapes.split(",")] if args.shapes else SHAPES
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [report.header("cpu", args.threads, ["cpp"], "torch.utils.benchmark blocked_autorange",
                           args.seconds, args.rounds).rstrip("\n"), bench.keep_freed_memory(), ""]
    lines[0] = lines[0].replace("# Batch norm speed: torch_bn_manual against torch.nn (cpu)",
                                "# Where a CPU training step's time goes (float32)")
    tiny = step_parts(TINY, "contiguous", args.threads, args.rounds, args.seconds)
    lines += ["## Fixed cost per training step (input 4x16x4x4: no arithmetic to speak of)", "",
              "| | nn ms | ours ms | ours − nn ms |", "|---|---|---|---|"]
    for part in ("step", "fwd", "bwd"):
        lines.append(f"| {part} | {ms(tiny['nn ' + part])} | {ms(tiny['ours ' + part])} | "
                     f"{ms(tiny['ours ' + part] - tiny['nn ' + part])} |")
    lines += ["", "## Per case: whole step, its parts, and the kernels alone (ms)", "",
              "step = forward + backward; fwd = module forward; bwd = autograd.grad through a kept graph; "
              "kernel = the forward or backward op called directly (nn: torch.batch_norm without autograd).", "",
              "| shape | layout | nn step | ours step | nn/ours | nn fwd | ours fwd | nn fwd kernel | ours fwd kernel "
              "| nn bwd | ours bwd | ours bwd kernel |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        for layout in (["contiguous", "channels_last"] if len(shape) == 4 else ["contiguous"]):
            t = step_parts(shape, layout, args.threads, args.rounds, args.seconds)
            row = (f"| {'x'.join(map(str, shape))} | {layout} | {ms(t['nn step'])} | {ms(t['ours step'])} | "
                   f"{t['nn step'] / t['ours step']:.2f} | {ms(t['nn fwd'])} | {ms(t['ours fwd'])} | "
                   f"{ms(t['nn fwd kernel'])} | {ms(t['ours fwd kernel'])} | {ms(t['nn bwd'])} | "
                   f"{ms(t['ours bwd'])} | {ms(t['ours bwd kernel'])} |")
            lines.append(row)
            print(row, flush=True)
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
