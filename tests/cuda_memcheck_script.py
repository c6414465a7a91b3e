"""Runs every CUDA kernel of torch_bn_manual once or more, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tests/cuda_memcheck_script.py

(tests/test_cuda.py runs it under memcheck, racecheck and initcheck, with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation
and an access past its end is reported.)

Small shapes, chosen to reach every path: contiguous and channels-last,
16-byte vectors and single elements (odd extents, a misaligned start), tails
that are not a multiple of a chunk, one and several channel tiles, one and
several grid splits, every dtype, every op, train and eval, empty input; the
fused ops with and without a residual and an activation, their hook tensors
(residual, output) misaligned while the input is aligned.
Prints "cuda_memcheck_script: ok" at the end.
"""
import sys

import torch

import torch_bn_manual  # noqa: F401  (loads the ops)
from torch_bn_manual import ops  # noqa: F401

OPS = torch.ops.torch_bn_manual
DEV = torch.device("cuda")
EPS = 1e-5


def param_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def stats_dtype(dtype):
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def arrange(x, name):
    if name == "channels_last":
        return x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])
    if name == "misaligned":  # one element past a 16-byte boundary, still dense
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = flat[1:].view(x.shape)
        view.copy_(x)
        return view
    return x.contiguous()


def run(shape, dtype, name, gen):
    x = arrange(torch.randn(shape, generator=gen, device=DEV).to(dtype), name)
    dy = arrange(torch.randn(shape, generator=gen, device=DEV).to(dtype), name)
    channels = shape[1]
    w = torch.rand(channels, generator=gen, device=DEV).to(param_dtype(dtype)) + 0.5
    b = torch.randn(channels, generator=gen, device=DEV).to(param_dtype(dtype))
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    OPS.batch_norm_train_forward(x, None, None, EPS)
    rm, rv = mean.to(param_dtype(dtype)), (invstd ** -2).to(param_dtype(dtype))
    OPS.batch_norm_eval_forward(x, w, b, rm, rv, EPS)
    OPS.batch_norm_elementwise(x, w, None, mean, invstd)
    for train in (True, False):
        OPS.batch_norm_backward(dy, x, w, mean, invstd, train, EPS, [True, True, True])
        OPS.batch_norm_backward(dy, x, None, mean, invstd, train, EPS, [True, False, False])
    OPS.batch_norm_backward(dy.contiguous(), x, w, mean, invstd, True, EPS, [False, True, True])
    # dweight/dbias in a weight dtype other than the usual one (float64): written where allocated
    OPS.batch_norm_backward(dy, x, w.double(), mean, invstd, True, EPS, [True, True, True])
    m, m2, count = OPS.batch_norm_collect_stats(x)
    sum_dy, sum_dy_xmu = OPS.batch_norm_backward_reduce(dy, x, mean, invstd)
    OPS.batch_norm_backward_elementwise(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    OPS.batch_norm_backward_elementwise(dy, x, mean, invstd, None, sum_dy, sum_dy_xmu, count[:1])
    OPS.batch_norm_merge_stats(torch.stack([m, m]), torch.stack([m2, m2]), torch.stack([count, count]))
    run_fused(x, dy, w, b, arrange(torch.randn(shape, generator=gen, device=DEV).to(dtype), name), rm, rv)
    return y


def run_fused(x, dy, w, b, z, rm, rv):
    """The fused ops (csrc/cuda/activation.cuh): residual + activation epilogue, act' prologue, dz written by
    the dx pass (train and eval) or not asked for."""
    y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, 0.0, EPS)
    OPS.batch_norm_act_train_forward(x, None, None, None, 0.1, EPS)
    OPS.batch_norm_act_eval_forward(x, w, b, z, rm, rv, None, EPS)
    OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, 0.0, EPS, [True, True, True, True])
    OPS.batch_norm_act_backward(dy, y, x, None, mean, invstd, False, 0.1, EPS, [True, False, False, True])
    OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, 0.1, EPS, [False, True, False, False])


def misaligned(t):
    """t's values and strides, one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].as_strided(t.shape, t.stride())
    view.copy_(t)
    return view


def run_fused_misaligned_hooks(dtype, name, gen):
    """An aligned input with a misaligned residual (forward) or output (backward): one element at a time."""
    shape = (4, 8, 6, 4)
    x = arrange(torch.randn(shape, generator=gen, device=DEV).to(dtype), name)
    dy = arrange(torch.randn(shape, generator=gen, device=DEV).to(dtype), name)
    z = misaligned(arrange(torch.randn(shape, generator=gen, device=DEV).to(dtype), name))
    w = torch.rand(shape[1], generator=gen, device=DEV).to(param_dtype(dtype)) + 0.5
    y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, None, z, 0.1, EPS)
    OPS.batch_norm_act_backward(dy, misaligned(y), x, w, mean, invstd, True, 0.1, EPS, [True, True, True, True])


def main():
    if not torch.cuda.is_available():
        print("cuda_memcheck_script: no CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device=DEV).manual_seed(0)
    shapes = [
        ((3, 5, 7, 9), ["contiguous", "channels_last"]),     # odd extents: single elements
        ((4, 8, 6, 4), ["contiguous", "channels_last", "misaligned"]),  # vectors; misaligned
        ((2, 24, 5, 3), ["channels_last"]),                   # channels-last, 3 vectors per row of halves
        ((37, 40, 1, 1), ["contiguous"]),                     # spatial 1: rows
        ((300, 6), ["contiguous"]),                           # (N, C), several splits
        ((2, 300, 3, 3), ["channels_last"]),                  # several column tiles
        ((2, 2, 1000, 33), ["contiguous"]),                   # long channels: several splits each
        ((3, 4, 3, 5, 2), ["contiguous", "channels_last"]),   # 5-D
        ((6, 3, 11), ["contiguous"]),                         # 3-D
        ((1, 1, 2, 1), ["contiguous"]),                       # M = 2, C = 1
    ]
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for shape, names in shapes:
            for name in names:
                run(shape, dtype, name, gen)
        for name in ("contiguous", "channels_last"):
            run_fused_misaligned_hooks(dtype, name, gen)
    for shape in ((0, 3, 4, 4), (4, 0, 3)):  # empty input: no kernel of ours runs
        x = torch.empty(shape, device=DEV)
        OPS.batch_norm_train_forward(x, None, None, EPS)
        OPS.batch_norm_act_train_forward(x, None, None, x, 0.0, EPS)
        OPS.batch_norm_collect_stats(x)
    torch.cuda.synchronize()
    print("cuda_memcheck_script: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
