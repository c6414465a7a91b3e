"""Accuracy on hard inputs: float32 x = offset + N(0, 1), against float64 math on the same float32 values.

    .venv/bin/python benchmarks/accuracy.py [--out benchmarks/results/accuracy-cpu.md] [--device cuda]

For each offset, the max absolute error of y and dx (training mode, one
(8, 64, 28, 28) batch, weight ~ 1 + N(0, 0.1), bias and dy ~ N(0, 1)) of
torch.nn.BatchNorm2d and of each torch_bn_manual backend; the reference is
torch_bn_manual.reference (NumPy, float64) on exactly the float32 inputs.
The test suite holds the backends to 1e-5 at 1e4 and 1e6 (tests/test_accuracy.py).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))

import torch_bn_manual as bnm  # noqa: E402
from torch_bn_manual import reference  # noqa: E402

OFFSETS = [0.0, 1e2, 1e4, 1e6]
SHAPE = (8, 64, 28, 28)


def errors(offset, layout, device, generator):
    x = (torch.randn(SHAPE, generator=generator, dtype=torch.float64) + offset).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C = SHAPE[1]
    weight = (1 + 0.1 * torch.randn(C, generator=generator, dtype=torch.float64)).float()
    bias = torch.randn(C, generator=generator, dtype=torch.float64).float()
    dy = torch.randn(SHAPE, generator=generator, dtype=torch.float64).float()
    if layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    y64, cache = reference.batch_norm_forward(x.double().numpy(), weight.double().numpy(), bias.double().numpy(), 1e-5)
    dx64, _, _ = reference.batch_norm_backward(dy.double().numpy(), cache)
    y64, dx64 = torch.from_numpy(y64), torch.from_numpy(dx64)
    out = {}
    for name, backend in [("nn.BatchNorm2d", None)] + [(b, b) for b in bnm.available_backends()]:
        if backend is None:
            m = torch.nn.BatchNorm2d(C, device=device)
        else:
            m = bnm.BatchNorm2d(C, device=device, backend=backend)
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
        xi = x.to(device).requires_grad_(True)
        y = m(xi)
        (dx,) = torch.autograd.grad(y, xi, dy.to(device))
        out[name] = ((y.double().cpu() - y64).abs().max().item(), (dx.double().cpu() - dx64).abs().max().item())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="default benchmarks/results/accuracy-<device>.md; '-' for none")
    args = p.parse_args(argv)
    out = args.out or os.path.join(HERE, "results", f"accuracy-{args.device}.md")
    generator = torch.Generator().manual_seed(0)
    lines = [f"# Accuracy on hard inputs ({args.device})", "",
             f"- torch {torch.__version__}; date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- command: `{' '.join([os.path.relpath(sys.executable)] + sys.argv)}`",
             f"- float32 x = offset + N(0, 1), shape {'x'.join(map(str, SHAPE))}, training mode; max |error| against "
             "float64 math (torch_bn_manual.reference) on the same float32 values", "",
             "| offset | layout | implementation | max abs error y | max abs error dx |", "|---|---|---|---|---|"]
    for offset in OFFSETS:
        for layout in ("contiguous", "channels_last"):
            for name, (ey, edx) in errors(offset, layout, args.device, generator).items():
                lines.append(f"| {offset:g} | {layout} | {name} | {ey:.2g} | {edx:.2g} |")
                print(lines[-1], flush=True)
    if out != "-":
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
