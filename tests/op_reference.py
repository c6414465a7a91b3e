"""Float64 references for the compiled ops' tests (tests/test_ops.py on the CPU,
tests/test_cuda.py on a GPU): statistics, normalize and backward computed
directly from the formulas of docs/derivation.md, on any device."""
import itertools

import torch

EPS = 1e-5
HALF = (torch.bfloat16, torch.float16)


def param_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype


def stats_dtype(dtype):
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def dims_of(x):
    return [0] + list(range(2, x.dim()))


def bcast(v, x):
    return v.view((1, -1) + (1,) * (x.dim() - 2))


def ref_stats(x):
    """mean, m2, count in float64 (two-pass)."""
    xd = x.double()
    mean = xd.mean(dims_of(x))
    m2 = ((xd - bcast(mean, x)) ** 2).sum(dims_of(x))
    return mean, m2, x.numel() // x.size(1)


def ref_normalize(x, w, b, mean, invstd):
    y = (x.double() - bcast(mean.double(), x)) * bcast(invstd.double(), x)
    if w is not None:
        y = y * bcast(w.double(), x)
    if b is not None:
        y = y + bcast(b.double(), x)
    return y


def ref_train_forward(x, w, b, eps=EPS):
    mean, m2, count = ref_stats(x)
    invstd = 1 / torch.sqrt(m2 / count + eps)
    return ref_normalize(x, w, b, mean, invstd), mean, invstd


def ref_backward(dy, x, w, mean, invstd, train):
    xd, dyd, mean, invstd = x.double(), dy.double(), mean.double(), invstd.double()
    wd = torch.ones_like(mean) if w is None else w.double()
    count = x.numel() // x.size(1)
    xmu = xd - bcast(mean, x)
    sum_dy = dyd.sum(dims_of(x))
    sum_dy_xmu = (dyd * xmu).sum(dims_of(x))
    if train:
        dx = bcast(wd * invstd, x) * (dyd - bcast(sum_dy / count, x)
                                     - xmu * bcast(invstd * invstd * sum_dy_xmu / count, x))
    else:
        dx = bcast(wd * invstd, x) * dyd
    return dx, sum_dy_xmu * invstd, sum_dy


def rel_err(actual, expected):
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def output_format(x):
    return torch._prims_common.suggest_memory_format(x)


def layout_cases(shapes, dtypes):
    """(shape, dtype, layout name) for every shape and dtype: contiguous, noncontiguous, channels_last (4-D, 5-D)."""
    return [(shape, dtype, name)
            for shape, dtype in itertools.product(shapes, dtypes)
            for name in ["contiguous", "noncontiguous"] + (["channels_last"] if len(shape) >= 4 else [])]


def case_id(case):
    shape, dtype, name = case
    return f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{name}"
