"""What is measured: the cases, and the minimum memory traffic of each.

A case is one (shape, layout, dtype, mode). The traffic model counts only the
bytes a batch norm cannot avoid moving through memory; per-channel vectors
(weight, bias, statistics) are negligible and left out:

    fwd      train forward            read x, write y                    2 tensors
    fwd+bwd  train forward + backward forward, then read x, dy, write dx 5 tensors
    eval     eval forward             read x, write y                    2 tensors

Achieved bandwidth is this traffic divided by the measured time; it is set
against a same-size copy (`dst.copy_(src)`: read + write = 2 tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("fwd", "fwd+bwd", "eval")
TENSORS_MOVED = {"fwd": 2, "fwd+bwd": 5, "eval": 2}

LAYOUTS = ("contiguous", "channels_last")

CPU_SHAPES = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7), (4096, 1024)]
CPU_QUICK_SHAPES = [(32, 256, 14, 14), (1024, 1024)]
CPU_DTYPES = ("float32", "bfloat16")

# The BatchNorm2d shapes of ResNet-50 at batch 256.
CUDA_SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
CUDA_QUICK_SHAPES = [(256, 256, 56, 56), (256, 2048, 7, 7)]
CUDA_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Case:
    shape: tuple
    layout: str  # "contiguous" or "channels_last"
    dtype: str  # torch dtype name: "float32", "bfloat16", "float16"
    mode: str  # one of MODES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def label(self) -> str:
        layout = "cl" if self.layout == "channels_last" else "nchw"
        return f"{'x'.join(map(str, self.shape))} {layout} {self.dtype} {self.mode}"


def itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def min_bytes(case: Case) -> int:
    """Bytes the case must move at the least (see the module docstring)."""
    return TENSORS_MOVED[case.mode] * case.numel * itemsize(case.dtype)


def copy_bytes(case: Case) -> int:
    """Bytes moved by `dst.copy_(src)` of one tensor of the case's size."""
    return 2 * case.numel * itemsize(case.dtype)


def parse_shape(text: str) -> tuple:
    """'32x64x56x56' -> (32, 64, 56, 56)."""
    shape = tuple(int(s) for s in text.lower().split("x"))
    if len(shape) not in (2, 4):
        raise ValueError(f"shape {text!r}: expected N x C (BatchNorm1d) or N x C x H x W (BatchNorm2d)")
    return shape


def make_cases(shapes, layouts, dtypes, modes) -> list:
    """Every combination; channels_last exists only for 4-D shapes."""
    cases = []
    for shape in shapes:
        for layout in layouts:
            if layout == "channels_last" and len(shape) != 4:
                continue
            for dtype in dtypes:
                for mode in modes:
                    cases.append(Case(tuple(shape), layout, dtype, mode))
    return cases
