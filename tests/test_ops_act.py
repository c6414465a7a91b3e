"""The compiled fused ops (batch_norm_act_*: csrc/cpu with the activation hooks) on the CPU.

Against the float64 reference (reference.batch_norm_act_*) on the same input
values, on shapes that take every kernel path; the python backend's fused
Function; opcheck; gradcheck/gradgradcheck through the ops; the dz written
by the first pass that reads dy.
"""
import itertools

import numpy as np
import pytest
import torch

try:
    from torch_bn_manual import ops
except ImportError as error:  # the extension is not built
    pytest.skip(f"torch_bn_manual._C is not built ({error})", allow_module_level=True)

from torch_bn_manual import _python_act, reference as R  # noqa: E402
from op_reference import EPS, layout_cases, case_id, param_dtype  # noqa: E402
from test_ops import SHAPES, DTYPES, TOL, layout, randn  # noqa: E402

OPS = torch.ops.torch_bn_manual
CASES = layout_cases(SHAPES, DTYPES)
# (activation name, slope passed to the ops, residual?)
ACTS = [("relu", 0.0, True), ("leaky_relu", 0.1, False), ("identity", None, True), ("relu", 0.0, False)]


@pytest.fixture
def gen(request):
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


def _inputs(shape, dtype, name, gen, residual):
    x = layout(randn(shape, gen, dtype, offset=0.5, scale=2.0), name)
    z = layout(randn(shape, gen, dtype), name) if residual else None
    dy = layout(randn(shape, gen, dtype), name)
    w = randn(shape[1], gen, param_dtype(dtype), offset=1.0, scale=0.3)
    b = randn(shape[1], gen, param_dtype(dtype))
    return x, z, dy, w, b


def _reference(x, z, dy, w, b, act, slope, running=None):
    name = act if act != "leaky_relu" else "leaky_relu"
    kwargs = {} if running is None else {"running_mean": running[0].double().numpy(),
                                         "running_var": running[1].double().numpy()}
    y, cache = R.batch_norm_act_forward(x.double().numpy(), w.double().numpy(), b.double().numpy(), EPS,
                                        None if z is None else z.double().numpy(), name,
                                        0.0 if slope is None else slope, **kwargs)
    dx, dw, db, dz = R.batch_norm_act_backward(dy.double().numpy(), cache)
    return [torch.from_numpy(np.ascontiguousarray(a)) if a is not None else None for a in (y, dx, dw, db, dz)]


def _err(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_ops_match_float64(case, train, gen):
    shape, dtype, name = case
    for act, slope, residual in ACTS:
        x, z, dy, w, b = _inputs(shape, dtype, name, gen, residual)
        running = (randn(shape[1], gen, param_dtype(dtype)), randn(shape[1], gen, param_dtype(dtype)).abs() + 0.5)
        if train:
            y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, slope, EPS)
            expected = _reference(x, z, dy, w, b, act, slope)
        else:
            y = OPS.batch_norm_act_eval_forward(x, w, b, z, running[0], running[1], slope, EPS)
            mean = running[0].to(ops._stats_dtype(dtype))
            invstd = (running[1].to(mean.dtype) + EPS).rsqrt()
            expected = _reference(x, z, dy, w, b, act, slope, running)
        assert y.dtype == dtype and y.shape == x.shape
        plain = (OPS.batch_norm_train_forward(x, w, b, EPS)[0] if train
                 else OPS.batch_norm_eval_forward(x, w, b, running[0], running[1], EPS))
        assert y.stride() == plain.stride(), "output strides: the plain op's (torch.nn's rule)"
        got = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, train, slope, EPS, [True, True, True, residual])
        what = f"{act} residual={residual}"
        tol = TOL[dtype] * (4 if dtype in (torch.bfloat16, torch.float16) else 1)
        assert _err(y, expected[0].reshape(shape)) <= tol, f"{what}: output"
        for label, a, e in zip(("dx", "dw", "db"), got[:3], expected[1:4]):
            assert _err(a, e.reshape(a.shape)) <= tol * 10, f"{what}: {label}"
        if residual:
            assert got[3].stride() == y.stride()
            assert _err(got[3], expected[4].reshape(shape)) <= tol, f"{what}: dz"


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=4)))
def test_backward_output_mask(mask, gen):
    """Every combination of outputs, dz on its own included, equals the full computation."""
    x, z, dy, w, b = _inputs((4, 6, 5, 5), torch.float32, "channels_last", gen, True)
    y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, 0.2, EPS)
    full = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, 0.2, EPS, [True] * 4)
    part = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, 0.2, EPS, list(mask))
    for asked, a, f in zip(mask, part, full):
        if asked:
            assert torch.equal(a, f)
        else:
            assert a.numel() == 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", layout_cases(SHAPES, [torch.float32]), ids=case_id)
def test_residual_gradient_written_once(case, train, gen):
    """dz = dy·act'(o) to the bit, whichever pass writes it (the sums, then a plain grad pass of dz;
    or the grad pass), and dx, dw, db the same bits as when dz is not asked for."""
    shape, dtype, name = case
    for slope in (0.0, 0.3):
        x, z, dy, w, b = _inputs(shape, dtype, name, gen, True)
        y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, slope, EPS)
        for mask in ([True, True, True], [True, False, False], [False, True, True], [False, False, False]):
            with_dz = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, train, slope, EPS, mask + [True])
            without = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, train, slope, EPS, mask + [False])
            assert torch.equal(with_dz[3], torch.where(y > 0, dy, dy * slope)), f"slope {slope} mask {mask}"
            for asked, a, e in zip(mask, with_dz[:3], without[:3]):
                assert torch.equal(a, e) if asked else a.numel() == 0 == e.numel()


@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_large_outputs_streamed(name, gen):
    """Passes of 16 MiB and more stream their output: the hooks ride along."""
    x, z, dy, w, b = _inputs((2, 3, 400, 1000), torch.float32, name, gen, True)
    y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, 0.0, EPS)
    expected = _reference(x, z, dy, w, b, "relu", 0.0)
    assert _err(y, expected[0].reshape(y.shape)) <= 1e-5
    got = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, 0.0, EPS, [True, True, True, True])
    assert _err(got[0], expected[1].reshape(y.shape)) <= 1e-4
    assert _err(got[3], expected[4].reshape(y.shape)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_python_backend(dtype, gen):
    for name in ("contiguous", "channels_last"):
        x, z, dy, w, b = _inputs((8, 12, 7, 9), dtype, name, gen, True)
        ours = OPS.batch_norm_act_train_forward(x, w, b, z, 0.05, EPS)
        theirs = _python_act.act_train_forward(x, w, b, z, 0.05, EPS)
        for a, e in zip(ours, theirs):
            assert _err(a, e) <= TOL[dtype]


def test_gradcheck_through_ops(gen):
    x = randn((3, 4, 3, 2), gen, torch.float64, offset=0.3, scale=1.5).requires_grad_()
    z = randn((3, 4, 3, 2), gen, torch.float64).requires_grad_()
    w = randn(4, gen, torch.float64, offset=1.0, scale=0.3).requires_grad_()
    b = randn(4, gen, torch.float64).requires_grad_()
    rm, rv = randn(4, gen, torch.float64), randn(4, gen, torch.float64).abs() + 0.5
    for slope in (0.0, 0.3, None):
        for train in (True, False):
            def fn(x, w, b, z):
                if train:
                    return ops.act_train_forward(x, w, b, z, slope, EPS)[0]
                return ops.act_eval_forward(x, w, b, z, rm, rv, slope, EPS)
            with torch.no_grad():
                t = ops.act_train_forward(x, w, b, z, None, EPS)[0] if train else \
                    ops.act_eval_forward(x, w, b, z, rm, rv, None, EPS)
            assert t.abs().min() > 1e-4
            assert torch.autograd.gradcheck(fn, (x, w, b, z))
            assert torch.autograd.gradgradcheck(fn, (x, w, b, z))


def _opcheck_samples():
    gen = torch.Generator().manual_seed(4321)
    samples = []
    for shape, dtype, name, grad, slope, residual in [
        ((3, 4, 5, 6), torch.float32, "contiguous", False, 0.0, True),
        ((3, 4, 5, 6), torch.float64, "channels_last", True, 0.1, True),
        ((5, 3, 7), torch.bfloat16, "contiguous", False, None, True),
        ((2, 3, 2, 3, 4), torch.float16, "channels_last", False, 0.0, False),
        ((9, 5), torch.float64, "contiguous", True, None, False),
        ((2, 3, 4, 5), torch.float32, "noncontiguous", True, 0.2, True),
    ]:
        x, z, dy, w, b = _inputs(shape, dtype, name, gen, residual)
        rm, rv = torch.zeros(shape[1], dtype=w.dtype), torch.ones(shape[1], dtype=w.dtype)
        if grad:
            x.requires_grad_()
            w.requires_grad_()
            if z is not None:
                z.requires_grad_()
        tag = f"{tuple(shape)}-{dtype}-{name}-{slope}"
        samples.append(("act_train_forward", tag, (x, w, b, z, slope, EPS)))
        samples.append(("act_eval_forward", tag, (x, w, b, z, rm, rv, slope, EPS)))
        with torch.no_grad():
            y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, slope, EPS)
        samples.append(("act_backward", tag, (dy, y, x.detach(), w.detach(), mean, invstd, True, slope, EPS,
                                              [True, True, True, residual])))
    return samples


OPCHECK_SAMPLES = _opcheck_samples()


@pytest.mark.parametrize("op,tag,args", OPCHECK_SAMPLES, ids=[f"{s[0]}-{s[1]}" for s in OPCHECK_SAMPLES])
def test_opcheck(op, tag, args):
    torch.library.opcheck(getattr(OPS, "batch_norm_" + op), args)


def test_bad_residual_rejected_by_the_op(gen):
    x = randn((4, 3, 5), gen)
    with pytest.raises(RuntimeError, match="residual"):
        OPS.batch_norm_act_train_forward(x, None, None, randn((4, 3, 6), gen), 0.0, EPS)
