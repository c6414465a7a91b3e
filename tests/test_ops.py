"""The compiled ops (csrc/ops.cpp, csrc/cpu/*, torch_bn_manual/ops.py) on the CPU.

Every op is checked against float64 math on the same input values, the
decomposed ops against the fused ones (bit for bit), the autograd formulas
with gradcheck/gradgradcheck, the torch.library registrations with opcheck,
and the accuracy and determinism promises of docs/architecture.md.
"""
import itertools

import pytest
import torch

try:
    from torch_bn_manual import ops
except ImportError as error:  # the extension is not built
    pytest.skip(f"torch_bn_manual._C is not built ({error})", allow_module_level=True)

from op_reference import (  # noqa: E402  (float64 references, shared with the other op tests)
    EPS, HALF, case_id, layout_cases, bcast, output_format, param_dtype, ref_backward,
    ref_normalize, ref_stats, ref_train_forward, rel_err, stats_dtype)

OPS = torch.ops.torch_bn_manual
# max |ours - float64 math| / max |float64 math|, per input dtype
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def gen(request):
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Inputs and float64 references
# ---------------------------------------------------------------------------

def randn(shape, gen, dtype=torch.float32, offset=0.0, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def layout(x, name):
    if name == "contiguous":
        return x.contiguous()
    if name == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()]
        return x.contiguous(memory_format=fmt)
    if name == "noncontiguous":
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(name)


def params(channels, gen, dtype):
    w = randn(channels, gen, param_dtype(dtype), offset=1.0, scale=0.1)
    b = randn(channels, gen, param_dtype(dtype))
    return w, b


# Shapes that exercise every path: NCL by channel and by block (few channels),
# NCL runs longer than one block, NLC with one and several channel tiles,
# (N, C) and (N, C, L) input, C == 1, spatial size 1.
SHAPES = [(4, 3, 5, 7), (2, 2, 70, 64), (3, 40, 6, 5), (50, 7), (33, 600), (4, 6, 9), (3, 1, 4, 4), (6, 20, 1, 1),
          (2, 3, 3, 4, 5)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


CASES = layout_cases(SHAPES, DTYPES)


# ---------------------------------------------------------------------------
# Each op against float64 math
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_train_forward(case, gen):
    shape, dtype, name = case
    x = layout(randn(shape, gen, dtype, offset=3.0, scale=2.0), name)
    w, b = params(shape[1], gen, dtype)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = ref_train_forward(x, w, b)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=output_format(x))
    assert mean.dtype == invstd.dtype == stats_dtype(dtype) and mean.shape == (shape[1],)
    assert rel_err(y, y_ref) <= TOL[dtype]
    assert rel_err(mean, mean_ref) <= (1e-7 if dtype in HALF else 1e-14)
    assert rel_err(invstd, invstd_ref) <= (1e-6 if dtype in HALF else 1e-12)


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_eval_forward_and_elementwise(case, gen):
    shape, dtype, name = case
    x = layout(randn(shape, gen, dtype), name)
    w, b = params(shape[1], gen, dtype)
    rm = randn(shape[1], gen, param_dtype(dtype), scale=0.5)
    rv = randn(shape[1], gen, param_dtype(dtype)).abs() + 0.5
    y = OPS.batch_norm_eval_forward(x, w, b, rm, rv, EPS)
    invstd = torch.rsqrt(rv.double() + EPS)
    y_ref = ref_normalize(x, w, b, rm, invstd)
    assert y.dtype == dtype and y.is_contiguous(memory_format=output_format(x))
    assert rel_err(y, y_ref) <= TOL[dtype]
    y2 = OPS.batch_norm_elementwise(x, None, b, rm.to(stats_dtype(dtype)), invstd.to(stats_dtype(dtype)))
    assert rel_err(y2, ref_normalize(x, None, b, rm, invstd)) <= TOL[dtype]


@pytest.mark.parametrize("shape,name", [((3, 40, 5, 7), "contiguous"), ((3, 40, 5, 7), "channels_last"),
                                        ((37, 40), "contiguous")])
def test_bfloat16_outputs_round_like_torch(shape, name, gen):
    """Every elementwise pass rounds float32 to bfloat16 to nearest even, denormals and ties included.

    With the mean equal to the input, y is the bias exactly, so the output is
    the rounding of chosen float32 values: denormals (the one-instruction
    conversion of csrc/cpu/vec.h would flush them), ties, overflow to
    infinity, NaN (not -0: 0 + -0 is +0 before any rounding). Channels last
    puts them next to ordinary values in one vector.
    """
    C = shape[1]
    special = torch.tensor([1e-39, -3e-40, 1.4e-45, 1.1754944e-38, -1.1754942e-38, 1.00390625, 1.01171875,
                            -1.00390625, 3.4028235e38, -3.39e38, float("inf"), float("-inf"), float("nan"), 0.0],
                           dtype=torch.float32)
    bias = randn(C, gen) * 10
    slots = torch.randperm(C, generator=gen)[:len(special)]
    bias[slots] = special
    level = randn(C, gen, torch.bfloat16)  # x == mean exactly: x - mean is 0 in every lane
    x = torch.empty(shape, dtype=torch.bfloat16)
    x = layout(x.copy_(bcast(level, x)), name)
    y = OPS.batch_norm_elementwise(x, torch.rand(C, generator=gen) + 0.5, bias, level.float(),
                                   torch.rand(C, generator=gen) + 0.5)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=output_format(x))
    expected = bcast(bias.to(torch.bfloat16).view(torch.int16), x).expand(shape)  # torch's rounding
    nan = bcast(bias.isnan(), x).expand(shape)
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y.view(torch.int16)[~nan], expected[~nan])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_backward(case, train, gen):
    shape, dtype, name = case
    x = layout(randn(shape, gen, dtype, offset=-2.0), name)
    dy = randn(shape, gen, dtype)  # contiguous, whatever x's layout
    w, _ = params(shape[1], gen, dtype)
    _, mean, invstd = OPS.batch_norm_train_forward(x, w, None, EPS)
    dx_ref, dw_ref, db_ref = ref_backward(dy, x, w, mean, invstd, train)
    dx, dw, db = OPS.batch_norm_backward(dy, x, w, mean, invstd, train, EPS, [True, True, True])
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=output_format(x))
    assert dw.dtype == db.dtype == w.dtype
    assert rel_err(dx, dx_ref) <= TOL[dtype]
    assert rel_err(dw, dw_ref) <= max(TOL[dtype], 1e-6)
    assert rel_err(db, db_ref) <= max(TOL[dtype], 1e-6)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_output_mask(mask, train, gen):
    x = randn((4, 5, 3, 3), gen)
    dy = randn((4, 5, 3, 3), gen)
    w, _ = params(5, gen, torch.float32)
    _, mean, invstd = OPS.batch_norm_train_forward(x, w, None, EPS)
    full = OPS.batch_norm_backward(dy, x, w, mean, invstd, train, EPS, [True, True, True])
    out = OPS.batch_norm_backward(dy, x, w, mean, invstd, train, EPS, list(mask))
    for wanted, got, ref in zip(mask, out, full):
        if wanted:
            assert torch.equal(got, ref)
        else:
            assert got.shape == (0,)
    no_weight = OPS.batch_norm_backward(dy, x, None, mean, invstd, train, EPS, list(mask))
    assert no_weight[1].shape == (0,) and no_weight[2].shape == (0,)


# ---------------------------------------------------------------------------
# Decomposed ops == fused ops, bit for bit
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES[1::4], ids=case_id)
def test_decomposed_match_fused(case, gen):
    shape, dtype, name = case
    x = layout(randn(shape, gen, dtype, offset=5.0), name)
    dy = layout(randn(shape, gen, dtype), name)
    w, b = params(shape[1], gen, dtype)
    y, save_mean, save_invstd = OPS.batch_norm_train_forward(x, w, b, EPS)

    mean, m2, count = OPS.batch_norm_collect_stats(x)
    assert torch.equal(mean, save_mean)
    assert torch.equal(count, torch.full_like(mean, x.numel() // shape[1]))
    mean_ref, m2_ref, _ = ref_stats(x)
    assert rel_err(m2, m2_ref) <= (1e-6 if dtype in HALF else 1e-12)
    invstd = torch.rsqrt(m2 / count + EPS).to(save_invstd.dtype)  # count is float64 for every input
    assert torch.allclose(invstd, save_invstd, rtol=1e-6 if dtype in HALF else 1e-14)
    assert torch.equal(OPS.batch_norm_elementwise(x, w, b, save_mean, save_invstd), y)

    dx, dw, db = OPS.batch_norm_backward(dy, x, w, save_mean, save_invstd, True, EPS, [True, True, True])
    sum_dy, sum_dy_xmu = OPS.batch_norm_backward_reduce(dy, x, save_mean, save_invstd)
    assert sum_dy.dtype == sum_dy_xmu.dtype == stats_dtype(dtype)
    assert torch.equal(sum_dy.to(w.dtype), db)
    assert torch.equal((sum_dy_xmu * save_invstd).to(w.dtype), dw)
    dx2 = OPS.batch_norm_backward_elementwise(dy, x, save_mean, save_invstd, w, sum_dy, sum_dy_xmu, count)
    assert torch.equal(dx2, dx)
    # count as a single value, broadcast to every channel
    dx3 = OPS.batch_norm_backward_elementwise(dy, x, save_mean, save_invstd, w, sum_dy, sum_dy_xmu, count[:1])
    assert torch.equal(dx3, dx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_stats(dtype, gen):
    # Four groups of different sizes, one of them empty, merged == computed at once.
    channels = 6
    parts = [randn((n, channels, 3), gen, offset=100.0 * g) for g, n in enumerate([5, 0, 9, 2])]
    stats = [OPS.batch_norm_collect_stats(p) for p in parts]
    mean, m2, count = (torch.stack([s[i] for s in stats]).to(dtype) for i in range(3))
    assert count[1].eq(0).all() and mean[1].eq(0).all() and m2[1].eq(0).all()
    merged = OPS.batch_norm_merge_stats(mean, m2, count)
    whole_mean, whole_m2, whole_count = ref_stats(torch.cat(parts))
    assert all(t.shape == (channels,) for t in merged)
    assert merged[0].dtype == merged[1].dtype == dtype and merged[2].dtype == torch.float64  # the count: exact
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(merged[0].double(), whole_mean, rtol=rtol, atol=0)
    assert torch.allclose(merged[1].double(), whole_m2, rtol=10 * rtol, atol=0)
    assert torch.equal(merged[2].double(), torch.full((channels,), float(whole_count), dtype=torch.float64))
    # A single group, and groups that are all empty.
    one = OPS.batch_norm_merge_stats(mean[:1], m2[:1], count[:1])
    assert all(torch.equal(a, b[0]) for a, b in zip(one, (mean, m2, count)))
    empty = OPS.batch_norm_merge_stats(mean[1:2].repeat(3, 1), m2[1:2].repeat(3, 1), count[1:2].repeat(3, 1))
    assert all(t.eq(0).all() for t in empty)


@pytest.mark.parametrize("stats_dtype,running_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float32),
                                                       (torch.float64, torch.float64)])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, "tensor"])
def test_running_stats(stats_dtype, running_dtype, momentum, gen):
    """batch_norm_running_stats against float64 math, and equal to the python backend's formula."""
    channels, count = 7, 13
    mean = randn(channels, gen, stats_dtype, offset=3.0)
    invstd = (randn(channels, gen, torch.float64).abs() + 0.5).to(stats_dtype)
    running_mean = randn(channels, gen, running_dtype)
    running_var = randn(channels, gen, running_dtype).abs() + 0.1
    f = torch.rand((), generator=gen, dtype=torch.float64) if momentum == "tensor" else torch.tensor(momentum,
                                                                                                     dtype=torch.float64)
    before = (running_mean.clone(), running_var.clone())
    new_mean, new_var = OPS.batch_norm_running_stats(mean, invstd, running_mean, running_var, f, EPS, count)
    # functional: the running tensors are not touched
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    assert new_mean.dtype == running_dtype and new_var.dtype == running_dtype
    var = (1 / invstd.double() ** 2 - EPS).clamp_min(0) * count / (count - 1)
    want_mean = f * mean.double() + (1 - f) * running_mean.double()
    want_var = f * var + (1 - f) * running_var.double()
    rtol = 1e-15 if running_dtype == torch.float64 else 1e-7
    assert torch.allclose(new_mean.double(), want_mean, rtol=rtol, atol=0)
    assert torch.allclose(new_var.double(), want_var, rtol=rtol, atol=0)
    # The python backend stores the same values (same formula, same order of operations).
    py = ops._python.running_stats(mean, invstd, running_mean, running_var, f, EPS, count)
    assert torch.equal(py[0], new_mean) and torch.equal(py[1], new_var)
    # A float momentum through the backend interface is the same op.
    if momentum != "tensor":
        via_interface = ops.running_stats(mean, invstd, running_mean, running_var, momentum, EPS, count)
        assert torch.equal(via_interface[0], new_mean) and torch.equal(via_interface[1], new_var)


def test_running_stats_bad_input():
    ones = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        OPS.batch_norm_running_stats(ones, ones, ones.float(), ones.float(), torch.tensor(0.1), EPS, 1)
    with pytest.raises(RuntimeError, match="one value per channel"):
        OPS.batch_norm_running_stats(ones, ones, torch.ones(4), ones.float(), torch.tensor(0.1), EPS, 5)


# ---------------------------------------------------------------------------
# docs/architecture.md: accuracy, determinism, empty batch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_accuracy_large_offset(offset, name, gen):
    """float32 input offset + N(0, 1): |y - y64|, |dx - dx64| <= 1e-5 in absolute terms."""
    shape = (8, 16, 32, 32)
    x = layout(randn(shape, gen, torch.float32, offset=offset), name)
    w, b = params(16, gen, torch.float32)
    dy = layout(randn(shape, gen, torch.float32), name)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = ref_train_forward(x, w, b)
    assert (y.double() - y_ref).abs().max().item() <= 1e-5
    dx, _, _ = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, False, False])
    dx_ref, _, _ = ref_backward(dy, x, w, mean_ref, invstd_ref, True)
    assert (dx.double() - dx_ref).abs().max().item() <= 1e-5
    # through the autograd formula too
    xg = x.clone().requires_grad_()
    ops.train_forward(xg, w, b, EPS)[0].backward(dy)
    assert (xg.grad.double() - dx_ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape,name", [((2, 5, 701, 1201), "contiguous"), ((2, 5, 701, 1201), "channels_last"),
                                        ((4100, 1027), "contiguous")], ids=["nchw", "nhwc", "nc"])
def test_large_outputs(shape, name, gen):
    """Outputs of 16 MiB and more leave through non-temporal stores, from unaligned starts too."""
    x = layout(randn(shape, gen, torch.float32, offset=10.0), name)
    dy = layout(randn(shape, gen, torch.float32), name)
    w, b = params(shape[1], gen, torch.float32)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = ref_train_forward(x, w, b)
    assert (y.double() - y_ref).abs().max().item() <= 1e-5
    dx, dw, db = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, True, True])
    dx_ref, _, _ = ref_backward(dy, x, w, mean_ref, invstd_ref, True)
    assert (dx.double() - dx_ref).abs().max().item() <= 1e-5
    dx_eval, _, _ = OPS.batch_norm_backward(dy, x, w, mean, invstd, False, EPS, [True, False, False])
    assert (dx_eval.double() - dy.double() * bcast(w.double() * invstd, x)).abs().max().item() <= 1e-5


def _run_all(x, dy, w, b):
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    grads = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, True, True])
    return (y, mean, invstd) + tuple(grads) + tuple(OPS.batch_norm_collect_stats(x)) \
        + tuple(OPS.batch_norm_backward_reduce(dy, x, mean, invstd))


@pytest.mark.parametrize("shape,name", [((16, 64, 20, 20), "contiguous"), ((16, 64, 20, 20), "channels_last"),
                                        ((4, 3, 70, 70), "contiguous"), ((8, 6, 30, 30), "contiguous"),
                                        ((3000, 100), "contiguous")])
def test_deterministic(shape, name, gen):
    """Bit-identical results run after run, and for any thread count.

    (8, 6, 30, 30) is split by channel with one thread and by block with
    three: the kernels take other paths but do the same arithmetic."""
    x = layout(randn(shape, gen, offset=1.0), name)
    dy = layout(randn(shape, gen), name)
    w, b = params(shape[1], gen, torch.float32)
    first = _run_all(x, dy, w, b)
    assert all(torch.equal(a, b) for a, b in zip(first, _run_all(x, dy, w, b)))
    threads = torch.get_num_threads()
    try:
        for n in {1, 3}:
            torch.set_num_threads(n)
            assert all(torch.equal(a, b) for a, b in zip(first, _run_all(x, dy, w, b)))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0), (0, 5)])
def test_empty_batch(shape, gen):
    x = torch.empty(shape)
    w, b = params(shape[1], gen, torch.float32)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    assert y.shape == shape and mean.eq(0).all() and torch.allclose(invstd, torch.full_like(invstd, EPS ** -0.5))
    mean, m2, count = OPS.batch_norm_collect_stats(x)
    assert mean.eq(0).all() and m2.eq(0).all() and count.eq(0).all()
    dx, dw, db = OPS.batch_norm_backward(x, x, w, mean, invstd, True, EPS, [True, True, True])
    assert dx.shape == shape and dw.eq(0).all() and db.eq(0).all()
    assert OPS.batch_norm_eval_forward(x, w, b, mean.float(), invstd.float(), EPS).shape == shape
    sum_dy, sum_dy_xmu = OPS.batch_norm_backward_reduce(x, x, mean, invstd)
    assert sum_dy.eq(0).all() and sum_dy_xmu.eq(0).all()
    assert OPS.batch_norm_backward_elementwise(x, x, mean, invstd, w, sum_dy, sum_dy_xmu, count).shape == shape


def test_bad_input():
    with pytest.raises(RuntimeError, match="spatial dims"):
        OPS.batch_norm_train_forward(torch.randn(5), None, None, EPS)
    with pytest.raises(RuntimeError, match="weight must have 3 elements"):
        OPS.batch_norm_train_forward(torch.randn(2, 3), torch.ones(4), None, EPS)


def test_non_differentiable_ops_do_not_require_grad(gen):
    x = randn((4, 3, 2), gen).requires_grad_()
    assert not any(t.requires_grad for t in OPS.batch_norm_collect_stats(x))
    assert not OPS.batch_norm_elementwise(x, None, None, torch.zeros(3), torch.ones(3)).requires_grad


# ---------------------------------------------------------------------------
# Autograd: gradcheck, gradgradcheck, torch.compile
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_gradcheck(train, affine, name, gen):
    x = layout(randn((3, 4, 3, 2), gen, torch.float64), name).requires_grad_()
    w, b = (t.requires_grad_() for t in params(4, gen, torch.float64))
    rm, rv = randn(4, gen, torch.float64), randn(4, gen, torch.float64).abs() + 0.5
    inputs = (x, w, b) if affine else (x,)

    def fn(x, w=None, b=None):
        if train:
            return ops.train_forward(x, w, b, EPS)[0]
        return ops.eval_forward(x, w, b, rm, rv, EPS)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_autograd_matches_reference(gen):
    x = randn((6, 5, 4, 4), gen).requires_grad_()
    w, b = (t.requires_grad_() for t in params(5, gen, torch.float32))
    dy = randn((6, 5, 4, 4), gen)
    y, mean, invstd = ops.train_forward(x, w, b, EPS)
    assert not mean.requires_grad and not invstd.requires_grad
    y.backward(dy)
    dx_ref, dw_ref, db_ref = ref_backward(dy, x.detach(), w.detach(), mean, invstd, True)
    assert rel_err(x.grad, dx_ref) <= 1e-6 and rel_err(w.grad, dw_ref) <= 1e-6 and rel_err(b.grad, db_ref) <= 1e-6
    # a bias without a weight
    xb = x.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_()
    ops.train_forward(xb, None, bb, EPS)[0].backward(dy)
    assert torch.allclose(bb.grad.double(), db_ref, rtol=1e-6)


def test_torch_compile_fullgraph(gen):
    x = randn((4, 6, 5, 5), gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (t.requires_grad_() for t in params(6, gen, torch.float32))
    rm, rv = torch.zeros(6), torch.ones(6)

    def f(x, w, b):
        y, mean, invstd = ops.train_forward(x, w, b, EPS)
        z = ops.eval_forward(y, w, b, rm, rv, EPS)
        return (z * z).sum() + mean.sum()

    expected = f(x, w, b)
    grads = torch.autograd.grad(expected, (x, w, b))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, b)
    got_grads = torch.autograd.grad(got, (x, w, b))
    assert torch.allclose(got, expected)
    assert all(torch.allclose(a, e) for a, e in zip(got_grads, grads))


# ---------------------------------------------------------------------------
# torch.library.opcheck: schema, fake tensors, autograd registration, AOT
# ---------------------------------------------------------------------------

def opcheck_samples():
    gen = torch.Generator().manual_seed(1234)
    samples = []
    for shape, dtype, name, grad, affine in [
        ((3, 4, 5, 6), torch.float32, "contiguous", False, True),
        ((3, 4, 5, 6), torch.float64, "channels_last", True, True),
        ((5, 3, 7), torch.bfloat16, "contiguous", False, True),
        ((2, 3, 2, 3, 4), torch.float16, "channels_last", False, False),
        ((9, 5), torch.float32, "contiguous", True, False),
        ((2, 3, 4, 5), torch.float32, "noncontiguous", True, True),
    ]:
        x = layout(randn(shape, gen, dtype), name)
        dy = randn(shape, gen, dtype)
        w, b = params(shape[1], gen, dtype) if affine else (None, None)
        sdt = stats_dtype(dtype)
        _, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
        rm, rv = mean.to(param_dtype(dtype)), (invstd ** -2).to(param_dtype(dtype))
        sum_dy, sum_dy_xmu = OPS.batch_norm_backward_reduce(dy, x, mean, invstd)
        count = torch.tensor(float(x.numel() // shape[1]), dtype=sdt)
        if grad:
            x = x.detach().requires_grad_()
            w = w.requires_grad_() if w is not None else None
            b = b.requires_grad_() if b is not None else None
        tag = f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{name}{'-grad' if grad else ''}"
        samples += [
            ("train_forward", tag, (x, w, b, EPS)),
            ("eval_forward", tag, (x, w, b, rm, rv, EPS)),
            ("backward", tag, (dy, x, w, mean, invstd, True, EPS, [True, True, True])),
            ("backward", tag + "-eval-mask", (dy, x, w, mean, invstd, False, EPS, [True, False, True])),
            ("collect_stats", tag, (x,)),
            ("elementwise", tag, (x, w, b, mean, invstd)),
            ("backward_reduce", tag, (dy, x, mean, invstd)),
            ("backward_elementwise", tag, (dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)),
        ]
    for dtype, groups in [(torch.float64, 3), (torch.float32, 1)]:
        mean = randn((groups, 4), gen, dtype)
        m2 = randn((groups, 4), gen, dtype).abs()
        count = torch.tensor([[5.0], [0.0], [7.0]][:groups], dtype=dtype).expand(groups, 4).contiguous()
        samples.append(("merge_stats", f"{groups}x4-{str(dtype)[6:]}", (mean, m2, count)))
    for saved_dtype, running_dtype in [(torch.float64, torch.float32), (torch.float32, torch.float32)]:
        mean = randn(5, gen, saved_dtype)
        invstd = (randn(5, gen, saved_dtype).abs() + 0.5)
        running = (randn(5, gen, running_dtype), randn(5, gen, running_dtype).abs())
        samples.append(("running_stats", f"{str(saved_dtype)[6:]}-{str(running_dtype)[6:]}",
                        (mean, invstd, *running, torch.tensor(0.25, dtype=torch.float64), EPS, 9)))
    return samples


OPCHECK_SAMPLES = opcheck_samples()


@pytest.mark.parametrize("op,tag,args", OPCHECK_SAMPLES, ids=[f"{s[0]}-{s[1]}" for s in OPCHECK_SAMPLES])
def test_opcheck(op, tag, args):
    torch.library.opcheck(getattr(OPS, "batch_norm_" + op), args)


def test_eval_backward_uses_the_statistics_of_the_forward(gen):
    """Eval saves the statistics it used (copies): a backward after an in-place update of the buffers
    gives the gradient of the function the forward computed (nn would use the updated buffers)."""
    x = randn((4, 3, 5), gen).requires_grad_()
    w, b = (t.requires_grad_() for t in params(3, gen, torch.float32))
    running_mean, running_var = randn(3, gen), randn(3, gen).abs() + 0.5
    y = OPS.batch_norm_eval_forward(x, w, b, running_mean, running_var, EPS)
    (dx,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    want = (w * torch.rsqrt(running_var.double() + EPS)).float().view(1, 3, 1).expand_as(x)
    assert torch.allclose(dx, want, rtol=1e-6, atol=0)
    running_var.add_(1.0)  # what a training step does to the buffers
    running_mean.add_(1.0)
    (dx, dw) = torch.autograd.grad(y.sum(), (x, w))
    assert torch.allclose(dx, want, rtol=1e-6, atol=0)
    xhat = (x.double() - running_mean.double().sub(1.0).view(1, 3, 1)) * torch.rsqrt(
        running_var.double().sub(1.0) + EPS).view(1, 3, 1)
    assert torch.allclose(dw.double(), xhat.sum((0, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_forward_autograd_runs_in_cpp(train, gen):
    """The forward ops' autograd nodes are C++ (csrc/autograd.cpp), not a Python autograd.Function:
    on small layers the Python one cost more than the kernel. The first backward calls the backward
    kernel; with create_graph=True the result is differentiable again (batch_norm_backward's derivative)."""
    x = randn((4, 3, 5, 2), gen, torch.float64).requires_grad_()
    w, b = (t.requires_grad_() for t in params(3, gen, torch.float64))
    if train:
        y = OPS.batch_norm_train_forward(x, w, b, EPS)[0]
    else:
        y = OPS.batch_norm_eval_forward(x, w, b, randn(3, gen, torch.float64),
                                        randn(3, gen, torch.float64).abs() + 0.5, EPS)
    assert "CppNode" in y.grad_fn.name(), y.grad_fn.name()
    dy = randn(x.shape, gen, torch.float64)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    assert dx.requires_grad and dw.requires_grad
    assert "batch_norm_backward" in dx.grad_fn.name(), dx.grad_fn.name()
    # The second derivative exists and matches the python backend's.
    second = torch.autograd.grad((dx * dx).sum() + (dw * dw).sum(), (x, w))
    if train:
        from torch_bn_manual import _python
        y_ref = _python.train_forward(x, w, b, EPS)[0]
        dx_r, dw_r, _ = torch.autograd.grad(y_ref, (x, w, b), dy, create_graph=True)
        expected = torch.autograd.grad((dx_r * dx_r).sum() + (dw_r * dw_r).sum(), (x, w))
        for got, want in zip(second, expected):
            assert rel_err(got, want) < 1e-10
