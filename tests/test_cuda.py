"""The CUDA kernels (csrc/cuda/) on a GPU.

Every op against float64 math on the same values, for each dtype and layout
and for the shapes that pick each kernel path (contiguous and channels-last,
16-byte vectors and single elements, one and many channel tiles, one and many
grid splits); the decomposed ops against the fused ones, bit for bit; the CUDA
ops against the CPU ops; the modules against nn.BatchNorm*d (cuDNN) in
training and eval; gradcheck/gradgradcheck; opcheck; torch.compile; the
accuracy bar and determinism of docs/architecture.md; a tensor of more than
2^31 elements; streams and devices; the fused ops and layers (act(BN(x) +
residual)) against float64 math, the plain ops, the CPU ops and nn; and
compute-sanitizer over tests/cuda_memcheck_script.py.

Skipped as a whole without a CUDA GPU or without the CUDA kernels in the build.
"""
import copy
import itertools
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.cuda


def _why_skipped():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        from torch_bn_manual import ops  # noqa: F401
    except ImportError as error:
        return f"torch_bn_manual._C is not built ({error})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("torch_bn_manual::batch_norm_train_forward", "CUDA"):
        return "torch_bn_manual._C was built without the CUDA kernels"
    return None


_REASON = _why_skipped()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

import torch_bn_manual as bnm  # noqa: E402
from torch_bn_manual import _layout, ops  # noqa: E402

from op_reference import (  # noqa: E402  (float64 references, shared with the other op tests)
    EPS, HALF, case_id, layout_cases, output_format, param_dtype, ref_backward, ref_normalize,
    ref_stats, ref_train_forward, rel_err, stats_dtype)

OPS = torch.ops.torch_bn_manual
DEV = torch.device("cuda")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# max |ours - float64 math| / max |float64 math|, per input dtype
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gen(request):
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Inputs and float64 references
# ---------------------------------------------------------------------------

def randn(shape, gen, dtype=torch.float32, offset=0.0, scale=1.0):
    """Normal values drawn in float64 on the CPU (reproducible), cast, moved to the GPU."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype).to(DEV)


def layout(x, name):
    if name == "contiguous":
        return x.contiguous()
    if name == "channels_last":
        if x.dim() < 4:  # channels innermost: outputs keep these strides where nn's do (_layout.py)
            return x.movedim(1, -1).contiguous().movedim(-1, 1)
        return x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])
    if name == "noncontiguous":
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if name == "misaligned":  # dense, but 2 bytes past a 16-byte boundary: no vector loads
        flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
        view = flat[1:1 + x.numel()].view(x.shape)
        view.copy_(x)
        return view
    raise ValueError(name)


def params(channels, gen, dtype):
    w = randn(channels, gen, param_dtype(dtype), offset=1.0, scale=0.1)
    b = randn(channels, gen, param_dtype(dtype))
    return w, b


def formats_of(t):
    """Which memory formats t satisfies (compared between ours and nn)."""
    result = []
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        try:
            result.append(t.is_contiguous(memory_format=fmt))
        except RuntimeError:  # a format for another rank
            result.append(None)
    return tuple(result)


# Shapes for every kernel path: (N, C) rows; (N, C, L) and 5-D input; L a
# multiple of the vector width or odd (7x7 = 49: one element at a time);
# channels-last with C a multiple of the vector width or not (3, 5, 1000),
# with one column tile or many (1000, 600); C == 1; spatial size 1; a long
# channel split over many blocks (few channels, large M).
SHAPES = [(4, 3, 5, 7), (2, 2, 70, 64), (3, 40, 6, 5), (5, 16, 7, 7), (50, 7), (33, 600), (4, 6, 9),
          (3, 1, 4, 4), (6, 20, 1, 1), (2, 3, 3, 4, 5), (2, 16, 2, 4, 4), (8, 1000), (4, 3, 128, 96)]


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
    assert y.device == x.device and y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=output_format(x))
    assert mean.dtype == invstd.dtype == stats_dtype(dtype) and mean.shape == (shape[1],)
    assert rel_err(y, y_ref) <= TOL[dtype]
    # half types keep float32 statistics, merged in float32 on the GPU
    assert rel_err(mean, mean_ref) <= (1e-6 if dtype in HALF else 1e-14)
    assert rel_err(invstd, invstd_ref) <= (1e-5 if dtype in HALF else 1e-12)


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_eval_forward_and_elementwise(case, gen):
    shape, dtype, name = case
    x = layout(randn(shape, gen, dtype), name)
    w, b = params(shape[1], gen, dtype)
    rm = randn(shape[1], gen, param_dtype(dtype), scale=0.5)
    rv = randn(shape[1], gen, param_dtype(dtype)).abs() + 0.5
    y = OPS.batch_norm_eval_forward(x, w, b, rm, rv, EPS)
    invstd = torch.rsqrt(rv.double() + EPS)
    assert y.dtype == dtype and y.is_contiguous(memory_format=output_format(x))
    assert rel_err(y, ref_normalize(x, w, b, rm, invstd)) <= TOL[dtype]
    y2 = OPS.batch_norm_elementwise(x, None, b, rm.to(stats_dtype(dtype)), invstd.to(stats_dtype(dtype)))
    assert rel_err(y2, ref_normalize(x, None, b, rm, invstd)) <= TOL[dtype]


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
    assert dw.dtype == db.dtype == w.dtype and dw.device == db.device == x.device
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
    if mask[0]:
        ref = ref_backward(dy, x, None, mean, invstd, train)[0]
        assert rel_err(no_weight[0], ref) <= TOL[torch.float32]


@pytest.mark.parametrize("case", CASES[1::3], ids=case_id)
def test_decomposed_match_fused(case, gen):
    """collect_stats/elementwise/backward_reduce/backward_elementwise == the fused ops, bit for bit."""
    shape, dtype, name = case
    x = layout(randn(shape, gen, dtype, offset=5.0), name)
    dy = layout(randn(shape, gen, dtype), name)
    w, b = params(shape[1], gen, dtype)
    y, save_mean, save_invstd = OPS.batch_norm_train_forward(x, w, b, EPS)

    mean, m2, count = OPS.batch_norm_collect_stats(x)
    assert torch.equal(mean, save_mean)
    assert torch.equal(count, torch.full_like(mean, x.numel() // shape[1]))
    assert rel_err(m2, ref_stats(x)[1]) <= (1e-5 if dtype in HALF else 1e-12)
    invstd = torch.rsqrt(m2 / count + EPS).to(save_invstd.dtype)  # count is float64 for every input
    assert torch.allclose(invstd, save_invstd, rtol=1e-6 if dtype in HALF else 1e-14)
    assert torch.equal(OPS.batch_norm_elementwise(x, w, b, save_mean, save_invstd), y)

    dx, dw, db = OPS.batch_norm_backward(dy, x, w, save_mean, save_invstd, True, EPS, [True, True, True])
    sum_dy, sum_dy_xmu = OPS.batch_norm_backward_reduce(dy, x, save_mean, save_invstd)
    assert sum_dy.dtype == sum_dy_xmu.dtype == stats_dtype(dtype)
    assert torch.equal(sum_dy.to(w.dtype), db)
    assert torch.equal((sum_dy_xmu * save_invstd).to(w.dtype), dw)
    assert torch.equal(OPS.batch_norm_backward_elementwise(dy, x, save_mean, save_invstd, w, sum_dy, sum_dy_xmu,
                                                           count), dx)
    # count as a single value (also on the CPU), broadcast to every channel
    assert torch.equal(OPS.batch_norm_backward_elementwise(dy, x, save_mean, save_invstd, w, sum_dy, sum_dy_xmu,
                                                           count[:1]), dx)
    assert torch.equal(OPS.batch_norm_backward_elementwise(dy, x, save_mean, save_invstd, w, sum_dy, sum_dy_xmu,
                                                           count[0].cpu()), dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_vector_and_element_paths_agree(dtype, name, gen):
    """The same values 16-byte aligned (vector loads) and misaligned (one element at a time)."""
    x = layout(randn((6, 16, 8, 8), gen, dtype, offset=1.0), name)
    dy = layout(randn((6, 16, 8, 8), gen, dtype), name)
    w, b = params(16, gen, dtype)
    # a misaligned copy in the same memory format
    flat = torch.empty(x.numel() + 8, dtype=dtype, device=DEV)
    xm = flat[1:1 + x.numel()].as_strided(x.shape, x.stride())
    xm.copy_(x)
    assert xm.data_ptr() % 16 != 0 and xm.is_contiguous(memory_format=output_format(x))
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    ym, mean_m, invstd_m = OPS.batch_norm_train_forward(xm, w, b, EPS)
    assert rel_err(ym, y) <= TOL[dtype] and rel_err(mean_m, mean) <= 1e-6 and rel_err(invstd_m, invstd) <= 1e-6
    dx = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, False, False])[0]
    dxm = OPS.batch_norm_backward(dy, xm, w, mean, invstd, True, EPS, [True, False, False])[0]
    assert rel_err(dxm, dx) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_stats(dtype, gen):
    channels = 6
    parts = [randn((n, channels, 3), gen, offset=100.0 * g) for g, n in enumerate([5, 0, 9, 2])]
    stats = [OPS.batch_norm_collect_stats(p) for p in parts]
    mean, m2, count = (torch.stack([s[i] for s in stats]).to(dtype) for i in range(3))
    merged = OPS.batch_norm_merge_stats(mean, m2, count)
    whole_mean, whole_m2, whole_count = ref_stats(torch.cat(parts))
    assert all(t.shape == (channels,) and t.device == mean.device for t in merged)
    assert merged[0].dtype == merged[1].dtype == dtype and merged[2].dtype == torch.float64  # the count: exact
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(merged[0].double(), whole_mean, rtol=rtol, atol=0)
    assert torch.allclose(merged[1].double(), whole_m2, rtol=10 * rtol, atol=0)
    assert torch.equal(merged[2].double(), torch.full((channels,), float(whole_count), dtype=torch.float64, device=DEV))
    one = OPS.batch_norm_merge_stats(mean[:1], m2[:1], count[:1])
    assert all(torch.equal(a, b[0].to(a.dtype)) for a, b in zip(one, (mean, m2, count)))
    # the CPU kernel folds the same groups in the same order
    cpu = OPS.batch_norm_merge_stats(mean.cpu(), m2.cpu(), count.cpu())
    assert all(torch.allclose(a.cpu(), c, rtol=1e-14, atol=0) for a, c in zip(merged, cpu))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0), (0, 5), (4, 0, 3)])
def test_empty_batch(shape, gen):
    x = torch.empty(shape, device=DEV)
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


def test_errors():
    x = torch.randn(4, 3, 2, device=DEV)
    with pytest.raises(RuntimeError, match="spatial dims"):
        OPS.batch_norm_train_forward(torch.randn(5, device=DEV), None, None, EPS)
    with pytest.raises(RuntimeError, match="weight must have 3 elements"):
        OPS.batch_norm_train_forward(x, torch.ones(4, device=DEV), None, EPS)
    with pytest.raises(RuntimeError, match="input's shape"):
        OPS.batch_norm_backward_reduce(torch.randn(4, 3, 3, device=DEV), x, torch.zeros(3, device=DEV),
                                       torch.ones(3, device=DEV))
    with pytest.raises(RuntimeError, match="device"):
        OPS.batch_norm_backward_reduce(x.cpu(), x, torch.zeros(3, device=DEV), torch.ones(3, device=DEV))
    with pytest.raises(RuntimeError):
        OPS.batch_norm_train_forward(x.int(), None, None, EPS)


def test_parameters_on_another_device_raise_like_nn(gen):
    """A CPU weight or bias with a CUDA input is an error, as in nn (which
    raises too), raised by the op checks before any kernel runs; until then
    the backward wrote dweight to the CPU weight's host pointer from the GPU."""
    x = randn((4, 3, 5, 5), gen)
    dy = randn((4, 3, 5, 5), gen)
    w, b = params(3, gen, torch.float32)
    with pytest.raises(RuntimeError):
        nn.functional.batch_norm(x, None, None, w.cpu(), b, training=True)
    mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)[1:]
    sums = OPS.batch_norm_backward_reduce(dy, x, mean, invstd)
    calls = {
        "train_forward": lambda w, b: OPS.batch_norm_train_forward(x, w, b, EPS),
        "eval_forward": lambda w, b: OPS.batch_norm_eval_forward(x, w, b, mean, invstd, EPS),
        "elementwise": lambda w, b: OPS.batch_norm_elementwise(x, w, b, mean, invstd),
        "backward": lambda w, b: OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, True, True]),
        "backward_elementwise": lambda w, b: OPS.batch_norm_backward_elementwise(dy, x, mean, invstd, w, *sums,
                                                                                 torch.tensor(100.0)),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device, but got weight is on "
                                               "cpu, different from other tensors on cuda"):
            call(w.cpu(), b)
        if name in ("train_forward", "eval_forward", "elementwise"):
            with pytest.raises(RuntimeError, match="but got bias is on cpu"):
                call(w, b.cpu())
    torch.cuda.synchronize()  # the context is still sound


@pytest.mark.parametrize("wdtype", [torch.float64, torch.float32])
def test_parameter_grads_on_input_device_in_weight_dtype(wdtype, gen):
    """dweight/dbias are allocated on the input's device in the weight's dtype."""
    x, dy = randn((6, 4, 3, 3), gen, torch.float16), randn((6, 4, 3, 3), gen, torch.float16)
    w = randn(4, gen, wdtype, offset=1.0, scale=0.1)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, None, EPS)
    dx, dw, db = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, True, True])
    assert dw.device == db.device == x.device and dw.dtype == db.dtype == wdtype
    ref_mean, ref_m2, count = ref_stats(x.cpu())
    ref_invstd = (ref_m2 / count + EPS).rsqrt()
    _, ref_dw, ref_db = ref_backward(dy.cpu(), x.cpu(), w.cpu(), ref_mean, ref_invstd, True)
    assert rel_err(dw.cpu(), ref_dw) <= 2e-3 and rel_err(db.cpu(), ref_db) <= 2e-3


@pytest.mark.parametrize("shape", [(2**24 + 3, 2), (1, 2, 2**24 + 3)], ids=["rows", "ncl"])
def test_half_counts_above_2_24_are_exact(shape, gen):
    """collect_stats counts 2^24 + 3 values per channel exactly (float64):
    float32, the statistics dtype of half input, would round it to 2^24 + 4."""
    rows = 2**24 + 3
    x = randn(shape, gen, torch.float16, offset=3.0)
    mean, m2, count = OPS.batch_norm_collect_stats(x)
    assert count.dtype == torch.float64 and count.tolist() == [float(rows)] * 2
    ref_mean, ref_m2, _ = ref_stats(x.cpu())
    assert rel_err(mean.cpu(), ref_mean) <= 1e-6 and rel_err(m2.cpu(), ref_m2) <= 1e-5
    merged = OPS.batch_norm_merge_stats(torch.stack([mean, mean]), torch.stack([m2, m2]), torch.stack([count, count]))
    assert merged[2].tolist() == [2.0 * rows] * 2


def test_bfloat16_statistics_beyond_1_8e19(gen):
    """Values whose float32 differences square past the float32 range: an
    empty partial state merged in (count 0) must leave the other unchanged,
    not give delta^2 * 0 = inf * 0 = NaN (csrc/welford.h)."""
    x = randn((64, 3, 4, 4), gen, torch.bfloat16, offset=3e19, scale=1e17)
    mean, m2, count = OPS.batch_norm_collect_stats(x)
    ref_mean, ref_m2, _ = ref_stats(x.cpu())
    assert torch.isfinite(mean).all() and torch.isfinite(m2).all()
    assert rel_err(mean.cpu(), ref_mean) <= 1e-6 and rel_err(m2.cpu(), ref_m2) <= 1e-3
    empty = OPS.batch_norm_collect_stats(x[:0])
    merged = OPS.batch_norm_merge_stats(*(torch.stack([e, s, e]) for e, s in zip(empty, (mean, m2, count))))
    assert torch.equal(merged[0], mean) and torch.equal(merged[1], m2) and torch.equal(merged[2], count)


# ---------------------------------------------------------------------------
# CUDA against the CPU kernels of the same ops
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES[::5], ids=case_id)
def test_matches_cpu_ops(case, gen):
    shape, dtype, name = case
    x = layout(randn(shape, gen, dtype, offset=1.0), name)
    dy = randn(shape, gen, dtype)
    w, b = params(shape[1], gen, dtype)
    tol = max(TOL[dtype], 1e-9)
    gpu = OPS.batch_norm_train_forward(x, w, b, EPS)
    cpu = OPS.batch_norm_train_forward(x.cpu(), w.cpu(), b.cpu(), EPS)
    for g, c in zip(gpu, cpu):
        assert g.dtype == c.dtype and g.shape == c.shape
        assert rel_err(g.cpu(), c) <= tol
    # Each device's output strides are nn's on that device (they differ where size-1 dims make
    # them ambiguous, and for dense layouts nn's CUDA kernels keep).
    assert gpu[0].stride() == _layout.output_strides(x, w, b) and cpu[0].stride() == _layout.output_strides(x.cpu())
    grads_gpu = OPS.batch_norm_backward(dy, x, w, cpu[1].to(DEV), cpu[2].to(DEV), True, EPS, [True, True, True])
    grads_cpu = OPS.batch_norm_backward(dy.cpu(), x.cpu(), w.cpu(), cpu[1], cpu[2], True, EPS, [True, True, True])
    for g, c in zip(grads_gpu, grads_cpu):
        assert g.dtype == c.dtype and g.shape == c.shape
        assert rel_err(g.cpu(), c) <= 4 * tol
    for g, c in zip(OPS.batch_norm_collect_stats(x), OPS.batch_norm_collect_stats(x.cpu())):
        assert g.dtype == c.dtype and rel_err(g.cpu(), c) <= 1e-6


# ---------------------------------------------------------------------------
# The modules against nn.BatchNorm*d on CUDA (cuDNN where it applies)
# ---------------------------------------------------------------------------

MODULE_CASES = [(kind, dtype, name) for kind in ["1d", "2d", "3d"] for dtype in DTYPES
                for name in ["contiguous", "channels_last", "noncontiguous"]]
KINDS = {"1d": (bnm.BatchNorm1d, nn.BatchNorm1d, [(16, 12), (8, 5, 33)]),
         "2d": (bnm.BatchNorm2d, nn.BatchNorm2d, [(8, 3, 7, 9), (4, 64, 14, 14), (2, 1000, 3, 3)]),
         "3d": (bnm.BatchNorm3d, nn.BatchNorm3d, [(2, 8, 4, 6, 5)])}
# ours and nn.BatchNorm*d (two correct implementations) against each other
MODULE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("kind,dtype,name", MODULE_CASES, ids=[f"{k}-{str(d)[6:]}-{n}" for k, d, n in MODULE_CASES])
def test_modules_match_nn(kind, dtype, name, affine, gen):
    ours_cls, nn_cls, shapes = KINDS[kind]
    for shape in shapes:
        channels = shape[1]
        pdt = param_dtype(dtype)
        ours = ours_cls(channels, affine=affine, backend="cpp", device=DEV, dtype=pdt)
        ref = nn_cls(channels, affine=affine, device=DEV, dtype=pdt)
        with torch.no_grad():
            if affine:
                ours.weight.copy_(randn(channels, gen, pdt, 1.0, 0.2))
                ours.bias.copy_(randn(channels, gen, pdt))
            ours.running_var.copy_(randn(channels, gen, pdt).abs() + 0.5)
        ref.load_state_dict(ours.state_dict())
        tol = MODULE_TOL[dtype]
        for training in (True, True, False):  # two steps: the running stats move twice
            ours.train(training)
            ref.train(training)
            x = layout(randn(shape, gen, dtype, offset=0.5, scale=2.0), name)
            dy = randn(shape, gen, dtype)
            outs = []
            for module in (ours, ref):
                xg = x.detach().requires_grad_()
                y = module(xg)
                y.backward(dy)
                grads = [xg.grad] + ([module.weight.grad, module.bias.grad] if affine else [])
                outs.append((y.detach(), grads))
                module.zero_grad(set_to_none=True)
            (y_o, g_o), (y_r, g_r) = outs
            assert y_o.dtype == y_r.dtype and formats_of(y_o) == formats_of(y_r)
            assert y_o.stride() == y_r.stride()  # nn's strides exactly (cuDNN's format or empty_like's)
            assert rel_err(y_o, y_r) <= tol
            for a, r in zip(g_o, g_r):
                assert a.dtype == r.dtype and rel_err(a, r) <= 4 * tol
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            a, r = ours.state_dict()[key], ref.state_dict()[key]
            assert a.dtype == r.dtype and rel_err(a, r) <= max(tol, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_resnet50_shapes_match_nn(dtype, name, gen):
    """The four stage shapes of ResNet-50 at batch 16, one train step each."""
    for channels, size in [(64, 56), (128, 28), (256, 14), (2048, 7)]:
        shape = (16, channels, size, size)
        ours = bnm.BatchNorm2d(channels, backend="cpp", device=DEV)
        ref = nn.BatchNorm2d(channels, device=DEV)
        x = layout(randn(shape, gen, dtype), name).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        dy = layout(randn(shape, gen, dtype), name)
        y, yr = ours(x), ref(xr)
        y.backward(dy)
        yr.backward(dy)
        assert rel_err(y, yr) <= MODULE_TOL[dtype]
        assert rel_err(x.grad, xr.grad) <= 4 * MODULE_TOL[dtype]
        assert rel_err(ours.weight.grad, ref.weight.grad) <= 4 * MODULE_TOL[dtype]
        assert rel_err(ours.running_var, ref.running_var) <= 1e-5


# ---------------------------------------------------------------------------
# Autograd, opcheck, torch.compile
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


def test_gradcheck_module(gen):
    module = bnm.BatchNorm2d(3, backend="cpp", device=DEV, dtype=torch.float64)
    x = randn((4, 3, 2, 3), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(module, (x,))
    assert torch.autograd.gradgradcheck(module, (x,))


def opcheck_samples():
    gen = torch.Generator().manual_seed(4321)
    samples = []
    for shape, dtype, name, grad, affine in [
        ((3, 4, 5, 6), torch.float32, "contiguous", False, True),
        ((3, 8, 5, 6), torch.float64, "channels_last", True, True),
        ((5, 3, 7), torch.bfloat16, "contiguous", False, True),
        ((2, 8, 2, 3, 4), torch.float16, "channels_last", False, False),
        ((9, 5), torch.float32, "contiguous", True, False),
        ((2, 3, 4, 5), torch.float32, "noncontiguous", True, True),
    ]:
        x = layout(randn(shape, gen, dtype), name)
        dy = randn(shape, gen, dtype)
        w, b = params(shape[1], gen, dtype) if affine else (None, None)
        _, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
        rm, rv = mean.to(param_dtype(dtype)), (invstd ** -2).to(param_dtype(dtype))
        sum_dy, sum_dy_xmu = OPS.batch_norm_backward_reduce(dy, x, mean, invstd)
        count = torch.tensor(float(x.numel() // shape[1]), dtype=stats_dtype(dtype), device=DEV)
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
        count = torch.tensor([[5.0], [0.0], [7.0]][:groups], dtype=dtype, device=DEV).expand(groups, 4).contiguous()
        samples.append(("merge_stats", f"{groups}x4-{str(dtype)[6:]}", (mean, m2, count)))
    for saved_dtype, running_dtype in [(torch.float64, torch.float32), (torch.float32, torch.float32)]:
        mean = randn(5, gen, saved_dtype)
        invstd = randn(5, gen, saved_dtype).abs() + 0.5
        running = (randn(5, gen, running_dtype), randn(5, gen, running_dtype).abs())
        samples.append(("running_stats", f"{str(saved_dtype)[6:]}-{str(running_dtype)[6:]}",
                        (mean, invstd, *running, torch.tensor(0.25, dtype=torch.float64, device=DEV), EPS, 9)))
    return samples


OPCHECK_SAMPLES = opcheck_samples()


@pytest.mark.parametrize("op,tag,args", OPCHECK_SAMPLES, ids=[f"{s[0]}-{s[1]}" for s in OPCHECK_SAMPLES])
def test_opcheck(op, tag, args):
    torch.library.opcheck(getattr(OPS, "batch_norm_" + op), args)


@pytest.mark.parametrize("momentum_device", ["cpu", "cuda"])
@pytest.mark.parametrize("saved_dtype,running_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float32),
                                                       (torch.float64, torch.float64)])
def test_running_stats_matches_cpu(saved_dtype, running_dtype, momentum_device, gen):
    """The CUDA registration (ATen ops) computes what the CPU loop does: same formula, same order, in double."""
    mean = randn(7, gen, saved_dtype, offset=3.0)
    invstd = randn(7, gen, saved_dtype).abs() + 0.5
    running_mean, running_var = randn(7, gen, running_dtype), randn(7, gen, running_dtype).abs() + 0.1
    f = torch.rand((), dtype=torch.float64, device=momentum_device)
    got = OPS.batch_norm_running_stats(mean, invstd, running_mean, running_var, f, EPS, 13)
    want = OPS.batch_norm_running_stats(mean.cpu(), invstd.cpu(), running_mean.cpu(), running_var.cpu(), f.cpu(),
                                        EPS, 13)
    for g, w in zip(got, want):
        assert g.device.type == "cuda" and g.dtype == running_dtype
        assert torch.allclose(g.cpu().double(), w.double(), rtol=2 * torch.finfo(running_dtype).eps, atol=0)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), bnm.BatchNorm2d(16, backend="cpp"), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), bnm.BatchNorm2d(16, momentum=None, backend="cpp"), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10), bnm.BatchNorm1d(10, backend="cpp")).to(DEV)


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_compile_conv_net(compiler, fmt, gen):
    if compiler == "inductor" and not _has_triton():
        pytest.skip("inductor on CUDA needs triton")
    torch._dynamo.reset()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would differ by algorithm choice
    try:
        _compare_compiled(compiler, fmt, gen)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _compare_compiled(compiler, fmt, gen):
    eager = _conv_net().to(memory_format=fmt)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=compiler)
    inputs = [randn((8, 3, 8, 8), gen).contiguous(memory_format=fmt) for _ in range(3)]
    for module in (eager, compiled):
        module.train()
    for x in inputs:
        out_e, out_c = eager(x), compiled(x)
        out_e.square().mean().backward()
        out_c.square().mean().backward()
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_module.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_module.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs[0]), eager(inputs[0]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# docs/architecture.md: accuracy bar, determinism
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 16, 32, 32), (64, 3, 56, 56), (512, 40, 1, 1)])
def test_accuracy_large_offset(shape, offset, name, gen):
    """float32 input offset + N(0, 1): |y - y64|, |dx - dx64| <= 1e-5 in absolute terms."""
    x = layout(randn(shape, gen, torch.float32, offset=offset), name)
    w, b = params(shape[1], gen, torch.float32)
    dy = layout(randn(shape, gen, torch.float32), name)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = ref_train_forward(x, w, b)
    assert (y.double() - y_ref).abs().max().item() <= 1e-5
    assert (mean - mean_ref).abs().max().item() <= 1e-9 * offset
    dx, _, _ = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, False, False])
    dx_ref, _, _ = ref_backward(dy, x, w, mean_ref, invstd_ref, True)
    assert (dx.double() - dx_ref).abs().max().item() <= 1e-5
    xg = x.clone().requires_grad_()
    ops.train_forward(xg, w, b, EPS)[0].backward(dy)
    assert (xg.grad.double() - dx_ref).abs().max().item() <= 1e-5
    # the module: nn.BatchNorm2d's own float32 statistics are far off here; ours are not
    module = bnm.BatchNorm2d(shape[1], backend="cpp", device=DEV)
    xm = x.clone().requires_grad_()
    module(xm).backward(dy)
    dx_plain, _, _ = ref_backward(dy, x, None, mean_ref, invstd_ref, True)
    assert (xm.grad.double() - dx_plain).abs().max().item() <= 1e-5


def _run_all(x, dy, w, b):
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    grads = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, True, True])
    return (y, mean, invstd) + tuple(grads) + tuple(OPS.batch_norm_collect_stats(x)) \
        + tuple(OPS.batch_norm_backward_reduce(dy, x, mean, invstd))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,name", [((32, 64, 28, 28), "contiguous"), ((32, 64, 28, 28), "channels_last"),
                                        ((4, 3, 300, 300), "contiguous"), ((200000, 8), "contiguous"),
                                        ((16, 2048, 7, 7), "contiguous"), ((16, 2048, 7, 7), "channels_last")])
def test_deterministic(shape, name, dtype, gen):
    """Bit-identical results run after run: a fixed reduction tree, no atomics."""
    x = layout(randn(shape, gen, dtype, offset=1.0), name)
    dy = layout(randn(shape, gen, dtype), name)
    w, b = params(shape[1], gen, dtype)
    first = _run_all(x, dy, w, b)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, _run_all(x, dy, w, b)))


# ---------------------------------------------------------------------------
# Sizes: odd channel counts, large M, more than 2^31 elements
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,name", [((256, 3, 224, 224), "contiguous"), ((256, 3, 224, 224), "channels_last"),
                                        ((1, 1, 4096, 4096), "contiguous"), ((2, 1000, 5, 5), "channels_last"),
                                        ((3, 1000, 7, 7), "contiguous"), ((2, 1001, 3, 3), "channels_last"),
                                        ((1 << 22, 3), "contiguous"), ((2, 5, 3), "contiguous")])
def test_odd_channels_and_large_m(shape, name, gen):
    x = layout(randn(shape, gen, torch.float32, offset=2.0), name)
    dy = layout(randn(shape, gen, torch.float32), name)
    w, b = params(shape[1], gen, torch.float32)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = ref_train_forward(x, w, b)
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    assert rel_err(mean, mean_ref) <= 1e-13 and rel_err(invstd, invstd_ref) <= 1e-11
    dx, dw, db = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, True, True])
    dx_ref, dw_ref, db_ref = ref_backward(dy, x, w, mean, invstd, True)
    assert rel_err(dx, dx_ref) <= TOL[torch.float32]
    assert rel_err(dw, dw_ref) <= 1e-6 and rel_err(db, db_ref) <= 1e-6


@pytest.mark.parametrize("dtype,name,spatial", [(torch.float16, "contiguous", (8191, 8209)),
                                                (torch.bfloat16, "channels_last", (8192, 8200))])
def test_more_than_2_31_elements(dtype, name, spatial, gen):
    """Train forward and backward of a tensor with more than 2^31 elements.

    The batch repeats one random sample, so the statistics and the gradient of
    the big tensor are those of the sample: every slice of the outputs, the
    last one (beyond element 2^31) included, must equal the sample's float64
    result.  The odd spatial size forces single-element access, whose flat
    index then goes past 2^31 (64-bit index path).
    """
    channels = 4
    shape = (8, channels) + spatial
    numel = 1
    for s in shape:
        numel *= s
    assert numel > 2**31
    # x, dy, y, dx, plus the float64 references of one sample (numel / 8 values each)
    need = 4 * numel * 2 + 12 * (numel // 8) * 8 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    sample = randn((1, channels) + spatial, gen, dtype, offset=0.5)
    grad_sample = randn((1, channels) + spatial, gen, dtype)
    x = layout(sample.expand(shape), name)
    dy = layout(grad_sample.expand(shape), name)
    w, b = params(channels, gen, dtype)
    y, mean, invstd = OPS.batch_norm_train_forward(x, w, b, EPS)
    dx, dw, db = OPS.batch_norm_backward(dy, x, w, mean, invstd, True, EPS, [True, True, True])
    torch.cuda.synchronize()
    assert y.is_contiguous(memory_format=output_format(x)) and dx.is_contiguous(memory_format=output_format(x))
    y_ref, mean_ref, invstd_ref = ref_train_forward(sample, w, b)
    dx_ref, dw_ref, db_ref = ref_backward(grad_sample, sample, w, mean_ref, invstd_ref, True)
    assert rel_err(mean, mean_ref) <= 1e-5 and rel_err(invstd, invstd_ref) <= 1e-5
    for n in (0, shape[0] // 2, shape[0] - 1):
        assert rel_err(y[n:n + 1], y_ref) <= TOL[dtype]
        assert rel_err(dx[n:n + 1], dx_ref) <= 4 * TOL[dtype]
    assert rel_err(dw, dw_ref * shape[0]) <= 1e-4 and rel_err(db, db_ref * shape[0]) <= 1e-4
    del x, dy, y, dx
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Streams and devices
# ---------------------------------------------------------------------------

def test_current_stream(gen):
    """The kernels run on the caller's current stream."""
    x = randn((64, 32, 16, 16), gen, offset=1.0)
    dy = randn((64, 32, 16, 16), gen)
    w, b = params(32, gen, torch.float32)
    expected = _run_all(x, dy, w, b)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # The inputs are written on the side stream only after a long sleep:
        # kernels launched on any other stream would read them too early.
        torch.cuda._sleep(50_000_000)
        xs, dys = x * 1, dy * 1
        got = _run_all(xs, dys, w, b)
    stream.synchronize()
    assert all(torch.equal(a, e) for a, e in zip(got, expected))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(gen):
    """Tensors on cuda:1 while cuda:0 is current: the device guard picks cuda:1."""
    x = randn((8, 16, 9, 9), gen, offset=1.0)
    dy = randn((8, 16, 9, 9), gen)
    w, b = params(16, gen, torch.float32)
    on0 = _run_all(x, dy, w, b)
    with torch.cuda.device(0):
        on1 = _run_all(x.to("cuda:1"), dy.to("cuda:1"), w.to("cuda:1"), b.to("cuda:1"))
    for a, c in zip(on0, on1):
        assert c.device == torch.device("cuda:1")
        assert rel_err(c.to(DEV), a) <= 1e-6


# ---------------------------------------------------------------------------
# The fused layers: act(BN(x) + residual) (csrc/cuda/activation.cuh)
# ---------------------------------------------------------------------------
#
# The gradients' float64 references take the activation's mask from our
# output (o > 0), which is the ops' contract (act' is read from the output):
# a value within a rounding of the kink then cannot flip a comparison. The
# forward output itself is compared with float64 math.

# (activation, slope given to the ops, with a residual?)
ACTS = [("relu", 0.0, True), ("leaky_relu", 0.1, False), ("identity", None, True), ("relu", 0.0, False)]
# Both layouts of every shape, dense and misaligned (single elements) and strided copies of one vector shape.
ACT_CASES = ([c for c in CASES if c[2] != "noncontiguous"]
             + [((4, 8, 6, 4), dtype, name) for dtype in DTYPES for name in ("misaligned", "noncontiguous")])


def act_inputs(shape, gen, dtype, name, residual):
    x = layout(randn(shape, gen, dtype, offset=0.5, scale=2.0), name)
    z = layout(randn(shape, gen, dtype), name) if residual else None
    dy = layout(randn(shape, gen, dtype), name)
    w, b = params(shape[1], gen, dtype)
    return x, z, dy, w, b


def ref_act_forward(x, z, w, b, slope, mean, invstd):
    """float64 act((x - mean)·invstd·w + b + z)."""
    t = ref_normalize(x, w, b, mean, invstd)
    if z is not None:
        t = t + z.double()
    return t if slope is None else torch.where(t > 0, t, t * slope)


def ref_act_backward(dy, output, x, w, mean, invstd, slope, train):
    """float64 (dx, dw, db, dz): dt = dy·act'(o) with the mask of `output`, then batch norm's backward of dt."""
    dt = dy.double() if slope is None else torch.where(output > 0, dy.double(), dy.double() * slope)
    return ref_backward(dt, x, w, mean, invstd, train) + (dt,)


@pytest.mark.parametrize("case", ACT_CASES, ids=case_id)
def test_fused_ops_match_float64(case, gen):
    """The three fused ops against float64 math, train and eval, every activation with and without a residual."""
    shape, dtype, name = case
    sdt = stats_dtype(dtype)
    # as the plain ops' tests, a little wider: dt is rounded once more (to the compute type) than dy
    grad_tol = {"dx": 4 * TOL[dtype], "dweight": max(4 * TOL[dtype], 1e-6), "dbias": max(4 * TOL[dtype], 1e-6)}
    for train in (True, False):
        for act, slope, residual in ACTS:
            what = f"{'train' if train else 'eval'} {act} residual={residual}"
            x, z, dy, w, b = act_inputs(shape, gen, dtype, name, residual)
            if train:
                y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, slope, EPS)
                plain = OPS.batch_norm_train_forward(x, w, b, EPS)[0]
                _, ref_mean, ref_invstd = ref_train_forward(x, w, b)
                assert mean.dtype == invstd.dtype == sdt and rel_err(mean, ref_mean) <= 1e-6, what
            else:
                rm = randn(shape[1], gen, param_dtype(dtype), scale=0.5)
                rv = randn(shape[1], gen, param_dtype(dtype)).abs() + 0.5
                y = OPS.batch_norm_act_eval_forward(x, w, b, z, rm, rv, slope, EPS)
                plain = OPS.batch_norm_eval_forward(x, w, b, rm, rv, EPS)
                mean, invstd = rm.to(sdt), (rv.to(sdt) + EPS).rsqrt()
                ref_mean, ref_invstd = rm.double(), (rv.double() + EPS).rsqrt()
            assert y.dtype == dtype and y.device == x.device, what
            assert y.stride() == plain.stride(), f"{what}: output strides (the plain op's: nn's)"
            assert rel_err(y, ref_act_forward(x, z, w, b, slope, ref_mean, ref_invstd)) <= TOL[dtype], f"{what}: output"
            grads = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, train, slope, EPS, [True] * 4)
            expected = ref_act_backward(dy, y, x, w, mean, invstd, slope, train)
            assert grads[3].stride() == grads[0].stride(), f"{what}: dresidual strides (grad_input's)"
            assert grads[1].dtype == grads[2].dtype == w.dtype and grads[3].dtype == dtype, what
            for label, got, ref in zip(("dx", "dweight", "dbias"), grads, expected):
                assert rel_err(got, ref) <= grad_tol[label], f"{what}: {label}"
            assert rel_err(grads[3], expected[3]) <= TOL[dtype], f"{what}: dresidual"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_fused_without_residual_and_activation_is_plain(dtype, name, gen):
    """Identity without a residual runs the plain kernels: the plain ops' bits."""
    x, _, dy, w, b = act_inputs((4, 8, 6, 4), gen, dtype, name, False)
    rm, rv = randn(8, gen, param_dtype(dtype)), randn(8, gen, param_dtype(dtype)).abs() + 0.5
    fused = OPS.batch_norm_act_train_forward(x, w, b, None, None, EPS)
    plain = OPS.batch_norm_train_forward(x, w, b, EPS)
    assert all(torch.equal(f, p) for f, p in zip(fused, plain))
    assert torch.equal(OPS.batch_norm_act_eval_forward(x, w, b, None, rm, rv, None, EPS),
                       OPS.batch_norm_eval_forward(x, w, b, rm, rv, EPS))
    _, mean, invstd = plain
    for train in (True, False):
        got = OPS.batch_norm_act_backward(dy, plain[0], x, w, mean, invstd, train, None, EPS, [True] * 4)
        want = OPS.batch_norm_backward(dy, x, w, mean, invstd, train, EPS, [True] * 3)
        assert all(torch.equal(g, p) for g, p in zip(got[:3], want))
        assert torch.equal(got[3], dy) and got[3].stride() == want[0].stride()  # dt = dy


@pytest.mark.parametrize("dtype,name", [(torch.float32, "channels_last"), (torch.float16, "contiguous"),
                                        (torch.float64, "contiguous")])
def test_fused_backward_output_mask(dtype, name, gen):
    """Every combination of outputs, dresidual on its own included, equals the full computation bit for bit."""
    x, z, dy, w, b = act_inputs((4, 8, 5, 4), gen, dtype, name, True)
    for train in (True, False):
        y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, 0.2, EPS)
        full = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, train, 0.2, EPS, [True] * 4)
        for mask in itertools.product([False, True], repeat=4):
            part = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, train, 0.2, EPS, list(mask))
            for asked, got, want in zip(mask, part, full):
                if asked:
                    assert torch.equal(got, want) and got.stride() == want.stride(), (train, mask)
                else:
                    assert got.shape == (0,), (train, mask)
        no_weight = OPS.batch_norm_act_backward(dy, y, x, None, mean, invstd, train, 0.2, EPS, [True] * 4)
        assert no_weight[1].shape == no_weight[2].shape == (0,) and torch.equal(no_weight[3], full[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_fused_hook_tensors_misaligned_or_in_another_layout(dtype, name, gen):
    """The residual and the output are read in the input's memory order, one element at a time when either
    is misaligned (the input aligned), and copied when in another layout: the values of the aligned call."""
    x, z, dy, w, b = act_inputs((6, 16, 8, 8), gen, dtype, name, True)

    def misaligned(t):
        flat = torch.empty(t.numel() + 8, dtype=dtype, device=DEV)
        view = flat[1:1 + t.numel()].as_strided(t.shape, t.stride())
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    other = z.contiguous() if name == "channels_last" else layout(z, "channels_last")
    y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, 0.1, EPS)
    for residual in (misaligned(z), other):
        assert rel_err(OPS.batch_norm_act_train_forward(x, w, b, residual, 0.1, EPS)[0], y) <= TOL[dtype]
    grads = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, 0.1, EPS, [True] * 4)
    for output in (misaligned(y), y.contiguous() if name == "channels_last" else layout(y, "channels_last")):
        got = OPS.batch_norm_act_backward(dy, output, x, w, mean, invstd, True, 0.1, EPS, [True] * 4)
        for g, want in zip(got, grads):
            assert g.stride() == want.stride() and rel_err(g, want) <= max(TOL[dtype], 1e-6)


@pytest.mark.parametrize("case", ACT_CASES[::9], ids=case_id)
def test_fused_matches_cpu_ops(case, gen):
    shape, dtype, name = case
    x, z, dy, w, b = act_inputs(shape, gen, dtype, name, True)
    tol = max(TOL[dtype], 1e-9)
    gpu = OPS.batch_norm_act_train_forward(x, w, b, z, 0.05, EPS)
    cpu = OPS.batch_norm_act_train_forward(x.cpu(), w.cpu(), b.cpu(), z.cpu(), 0.05, EPS)
    for g, c in zip(gpu, cpu):
        assert g.dtype == c.dtype and g.shape == c.shape and rel_err(g.cpu(), c) <= tol
    # the same forward output and statistics for both backwards
    y, mean, invstd = cpu
    grads_gpu = OPS.batch_norm_act_backward(dy, y.to(DEV), x, w, mean.to(DEV), invstd.to(DEV), True, 0.05, EPS,
                                            [True] * 4)
    grads_cpu = OPS.batch_norm_act_backward(dy.cpu(), y, x.cpu(), w.cpu(), mean, invstd, True, 0.05, EPS, [True] * 4)
    for g, c in zip(grads_gpu, grads_cpu):
        assert g.dtype == c.dtype and g.shape == c.shape and rel_err(g.cpu(), c) <= 4 * tol


def test_fused_layers_run_the_cuda_kernels(monkeypatch, gen):
    """On CUDA the fused layers run the compiled ops (their C++ autograd node), not the python fallback,
    and say nothing about a fallback."""
    from torch_bn_manual import activation
    assert "cuda" in ops.ACT_DEVICES
    monkeypatch.setattr(activation, "_warned_no_fused_kernels", set())
    x = randn((4, 3, 5, 5), gen).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for backend in ("auto", "cpp"):
            module = bnm.BatchNormAct2d(3, backend=backend, device=DEV)
            assert "ActTrainForward" in module(x, randn((4, 3, 5, 5), gen)).grad_fn.name()
            assert "ActEvalForward" in module.eval()(x).grad_fn.name()
    assert not [w for w in caught if "fused" in str(w.message)]


FUSED_KINDS = {"1d": (bnm.BatchNormAct1d, nn.BatchNorm1d, [(16, 12), (8, 5, 33)]),
               "2d": (bnm.BatchNormAct2d, nn.BatchNorm2d, [(8, 3, 7, 9), (4, 16, 4, 4)]),
               "3d": (bnm.BatchNormAct3d, nn.BatchNorm3d, [(2, 8, 4, 6, 5)])}
# (activation, negative_slope, with a residual?), one per (shape, affine) in turn
FUSED_VARIANTS = [("relu", 0.01, True), ("leaky_relu", 0.1, False), ("identity", 0.01, True), ("relu", 0.01, False),
                  ("leaky_relu", 0.2, True)]


def nn_activation(t, activation, negative_slope):
    if activation == "relu":
        return nn.functional.relu(t)
    if activation == "leaky_relu":
        return nn.functional.leaky_relu(t, negative_slope)
    return t


@pytest.mark.parametrize("kind,dtype,name", MODULE_CASES, ids=[f"{k}-{str(d)[6:]}-{n}" for k, d, n in MODULE_CASES])
def test_fused_modules_match_nn(kind, dtype, name, gen):
    """BatchNormAct*d on CUDA against nn.BatchNorm*d, + residual, then the activation, in float64 on the same
    values (output, dx, dweight, dbias, dresidual, running statistics), in train (twice) and eval; the output's
    dtype and memory format as nn's own in the input's dtype; the compiled ops' autograd node."""
    ours_cls, nn_cls, shapes = FUSED_KINDS[kind]
    pdt = param_dtype(dtype)
    tol = MODULE_TOL[dtype]
    turn = 0
    for shape in shapes:
        channels = shape[1]
        for affine in (True, False):
            activation, slope, with_residual = FUSED_VARIANTS[turn % len(FUSED_VARIANTS)]
            turn += 1
            ours = ours_cls(channels, affine=affine, backend="cpp", device=DEV, dtype=pdt, activation=activation,
                            negative_slope=slope)
            exact = nn_cls(channels, affine=affine, device=DEV, dtype=torch.float64)
            with torch.no_grad():
                if affine:
                    ours.weight.copy_(randn(channels, gen, pdt, 1.0, 0.2))
                    ours.bias.copy_(randn(channels, gen, pdt))
                ours.running_var.copy_(randn(channels, gen, pdt).abs() + 0.5)
            exact.load_state_dict(ours.state_dict())
            for training in (True, True, False):
                where = f"shape={shape} affine={affine} {activation}({slope}) residual={with_residual} " \
                        f"{'train' if training else 'eval'}"
                native = nn_cls(channels, affine=affine, device=DEV, dtype=pdt)
                native.load_state_dict(ours.state_dict())
                for module in (ours, exact, native):
                    module.train(training)
                x = layout(randn(shape, gen, dtype, offset=0.5, scale=2.0), name)
                z = layout(randn(shape, gen, dtype), name) if with_residual else None
                dy = randn(shape, gen, dtype)
                xg = x.detach().requires_grad_()
                zg = None if z is None else z.detach().requires_grad_()
                y = ours(xg, zg)
                assert "CppNode" in y.grad_fn.name(), f"{where}: not the compiled ops ({y.grad_fn.name()})"
                y.backward(dy)
                got = [y.detach(), xg.grad] + ([ours.weight.grad, ours.bias.grad] if affine else []) \
                    + ([zg.grad] if z is not None else [])
                with torch.no_grad():
                    t = native(x)
                    y_nn = nn_activation(t if z is None else t + z, activation, slope)
                assert y.dtype == y_nn.dtype and formats_of(y) == formats_of(y_nn), f"{where}: output format"
                x64 = x.double().requires_grad_()
                z64 = None if z is None else z.double().requires_grad_()
                t64 = exact(x64) if z64 is None else exact(x64) + z64
                o64 = nn_activation(t64, activation, slope)
                dt = dy.double() if activation == "identity" else \
                    torch.where(y.detach() > 0, dy.double(), dy.double() * (0.0 if activation == "relu" else slope))
                inputs = [x64] + ([exact.weight, exact.bias] if affine else []) + ([z64] if z64 is not None else [])
                want = [o64.detach()] + list(torch.autograd.grad(t64, inputs, dt))
                names = ["output", "dx"] + (["dweight", "dbias"] if affine else []) \
                    + (["dresidual"] if z is not None else [])
                for label, a, e in zip(names, got, want):
                    assert rel_err(a, e) <= (tol if label in ("output", "dresidual") else 4 * tol), f"{where}: {label}"
                ours.zero_grad(set_to_none=True)
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    a, e = ours.state_dict()[key], exact.state_dict()[key]
                    assert rel_err(a, e) <= max(tol, 1e-6), f"{where}: {key}"


def _fused_t(train, x, w, b, z, rm, rv):
    """The pre-activation values t = BN(x) + z (identity)."""
    with torch.no_grad():
        if train:
            return ops.act_train_forward(x, w, b, z, None, EPS)[0]
        return ops.act_eval_forward(x, w, b, z, rm, rv, None, EPS)


@pytest.mark.parametrize("slope", [0.0, 0.3, None], ids=["relu", "leaky", "identity"])
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_fused_gradcheck(name, slope, gen):
    """gradcheck and gradgradcheck in float64 on CUDA through the fused ops' autograd, train and eval, with
    and without weight, bias and residual; inputs drawn until every t is away from the activation's kink."""
    shape = (2, 3, 2, 2)
    rm, rv = randn(3, gen, torch.float64), randn(3, gen, torch.float64).abs() + 0.5
    for _ in range(20):
        x = layout(randn(shape, gen, torch.float64, offset=0.3, scale=1.5), name).requires_grad_()
        z = layout(randn(shape, gen, torch.float64), name).requires_grad_()
        w = randn(3, gen, torch.float64, offset=1.0, scale=0.3).requires_grad_()
        b = randn(3, gen, torch.float64).requires_grad_()
        configs = [(x, w, b, z), (x, None, None, None)]
        if all(_fused_t(train, *c, rm, rv).abs().min() > 1e-3 for train in (True, False) for c in configs):
            break
    else:
        pytest.fail("no draw with every value away from the kink")
    for train in (True, False):
        for x_, w_, b_, z_ in configs:
            inputs = tuple(t for t in (x_, w_, b_, z_) if t is not None)

            def fn(*args):
                it = iter(args)
                xx, ww, bb, zz = (next(it) if t is not None else None for t in (x_, w_, b_, z_))
                if train:
                    return ops.act_train_forward(xx, ww, bb, zz, slope, EPS)[0]
                return ops.act_eval_forward(xx, ww, bb, zz, rm, rv, slope, EPS)

            assert torch.autograd.gradcheck(fn, inputs), (train, len(inputs))
            assert torch.autograd.gradgradcheck(fn, inputs), (train, len(inputs))


def test_fused_gradient_at_the_kink_is_nns():
    """t == 0 exactly (x at the mean, bias 0): the derivative there is the slope, as nn's relu/leaky_relu take it."""
    x = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64, device=DEV)
    dy = torch.tensor([[0.3], [0.7], [1.1]], dtype=torch.float64, device=DEV)
    for activation, slope in (("relu", 0.0), ("leaky_relu", 0.25)):
        ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        bnm.batch_norm_act(ours, None, None, training=True, activation=activation, negative_slope=slope,
                           backend="cpp").backward(dy)
        nn_activation(nn.functional.batch_norm(ref, None, None, training=True), activation, slope).backward(dy)
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_fused_accuracy_large_offset(offset, name, gen):
    """float32 offset + N(0, 1) with a residual: |o - o64|, |dx - dx64|, |dz - dz64| <= 1e-5, relu and leaky_relu."""
    shape = (8, 16, 32, 32)
    x = layout(randn(shape, gen, torch.float32, offset=offset), name)
    z = layout(randn(shape, gen, torch.float32), name)
    dy = layout(randn(shape, gen, torch.float32), name)
    w, b = params(16, gen, torch.float32)
    _, ref_mean, ref_invstd = ref_train_forward(x, w, b)
    for slope in (0.0, 0.1):
        y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, slope, EPS)
        assert (y.double() - ref_act_forward(x, z, w, b, slope, ref_mean, ref_invstd)).abs().max().item() <= 1e-5
        grads = OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, slope, EPS, [True, False, False, True])
        want = ref_act_backward(dy, y, x, w, ref_mean, ref_invstd, slope, True)
        assert (grads[0].double() - want[0]).abs().max().item() <= 1e-5
        assert (grads[3].double() - want[3]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_fused_deterministic(dtype, name, gen):
    """Bit-identical fused outputs and gradients run after run."""
    x, z, dy, w, b = act_inputs((16, 64, 14, 14), gen, dtype, name, True)

    def run():
        y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, 0.1, EPS)
        return (y, mean, invstd) + tuple(OPS.batch_norm_act_backward(dy, y, x, w, mean, invstd, True, 0.1, EPS,
                                                                     [True] * 4))
    first = run()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 0, 3)])
def test_fused_empty_batch(shape, gen):
    x = torch.empty(shape, device=DEV)
    w, b = params(shape[1], gen, torch.float32)
    y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, x, 0.0, EPS)
    assert y.shape == shape and mean.eq(0).all()
    assert OPS.batch_norm_act_eval_forward(x, w, b, x, mean.float(), invstd.float(), 0.0, EPS).shape == shape
    dx, dw, db, dz = OPS.batch_norm_act_backward(x, y, x, w, mean, invstd, True, 0.0, EPS, [True] * 4)
    assert dx.shape == dz.shape == shape and dw.eq(0).all() and db.eq(0).all()


def test_fused_errors(gen):
    """The CPU ops' checks and messages (op_checks.h); the layer's own checks come first, and leave the state."""
    x = randn((4, 3, 5), gen)
    w, b = params(3, gen, torch.float32)
    bad = {"shape": (randn((4, 3, 6), gen), "residual must have the input's shape"),
           "dtype": (randn((4, 3, 5), gen, torch.float64), "residual must have the input's dtype"),
           "device": (randn((4, 3, 5), gen).cpu(), "residual must be on the input's device")}
    for residual, message in bad.values():
        with pytest.raises(RuntimeError, match=message):
            OPS.batch_norm_act_train_forward(x, w, b, residual, 0.0, EPS)
        with pytest.raises(RuntimeError, match=message):
            OPS.batch_norm_act_eval_forward(x, w, b, residual, w, w.abs(), 0.0, EPS)
    y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, None, 0.0, EPS)
    with pytest.raises(RuntimeError, match="output must have the input's shape"):
        OPS.batch_norm_act_backward(x, y[:2], x, w, mean, invstd, True, 0.0, EPS, [True] * 4)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device, but got weight is on cpu"):
        OPS.batch_norm_act_train_forward(x, w.cpu(), b, None, 0.0, EPS)
    module = bnm.BatchNormAct1d(3, backend="cpp", device=DEV)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for residual, message in [(randn((4, 3, 5), gen).cpu(), "is not on the expected device"),
                              (randn((4, 3, 6), gen), "residual must have the input's shape")]:
        with pytest.raises(RuntimeError, match=message):
            module(x, residual)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    torch.cuda.synchronize()  # the context is still sound


def act_opcheck_samples():
    gen = torch.Generator().manual_seed(1234)
    samples = []
    for shape, dtype, name, grad, slope, residual in [
        ((3, 4, 5, 6), torch.float32, "contiguous", False, 0.0, True),
        ((3, 8, 5, 6), torch.float64, "channels_last", True, 0.1, True),
        ((5, 3, 7), torch.bfloat16, "contiguous", False, None, True),
        ((2, 8, 2, 3, 4), torch.float16, "channels_last", False, 0.0, False),
        ((2, 3, 4, 5), torch.float32, "noncontiguous", True, 0.2, True),
    ]:
        x, z, dy, w, b = act_inputs(shape, gen, dtype, name, residual)
        rm = torch.zeros(shape[1], dtype=w.dtype, device=DEV)
        rv = torch.ones(shape[1], dtype=w.dtype, device=DEV)
        y, mean, invstd = OPS.batch_norm_act_train_forward(x, w, b, z, slope, EPS)
        backward_args = (dy, y, x, w, mean, invstd, True, slope, EPS, [True, True, True, residual])
        if grad:  # new tensors: the backward's arguments stay without grad
            x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
            z = None if z is None else z.detach().requires_grad_()
        tag = f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{name}-{slope}{'-grad' if grad else ''}"
        samples += [("act_train_forward", tag, (x, w, b, z, slope, EPS)),
                    ("act_eval_forward", tag, (x, w, b, z, rm, rv, slope, EPS)),
                    ("act_backward", tag, backward_args)]
    return samples


ACT_OPCHECK_SAMPLES = act_opcheck_samples()


@pytest.mark.parametrize("op,tag,args", ACT_OPCHECK_SAMPLES, ids=[f"{s[0]}-{s[1]}" for s in ACT_OPCHECK_SAMPLES])
def test_fused_opcheck(op, tag, args):
    torch.library.opcheck(getattr(OPS, "batch_norm_" + op), args)


# ---------------------------------------------------------------------------
# compute-sanitizer
# ---------------------------------------------------------------------------

# One tool over the script: its shapes are small, but the sanitizers slow
# kernels down many times and add start-up time; a hang must not stall the run.
SANITIZER_TIMEOUT_S = 300


def _sanitizer():
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        candidate = os.path.join(cuda_home, "bin", "compute-sanitizer")
        sanitizer = candidate if os.path.exists(candidate) else None
    return sanitizer


_probe_result = {}


def _sanitizer_refusal(sanitizer):
    """Why the sanitizer cannot run a CUDA program here, or None. Some machines
    refuse the device ("Device not supported", then error 999 at the first
    allocation); a small probe says so in seconds instead of a failure later."""
    if "why" not in _probe_result:
        probe = "import torch; torch.ones(4, device='cuda').sum().item(); print('sanitizer probe ok')"
        try:
            result = subprocess.run([sanitizer, "--tool", "memcheck", sys.executable, "-c", probe],
                                    capture_output=True, text=True, timeout=120)
            output = result.stdout + result.stderr
            ok = result.returncode == 0 and "sanitizer probe ok" in result.stdout
            lines = [ln for ln in output.splitlines() if "not supported" in ln.lower() or "error" in ln.lower()]
            _probe_result["why"] = None if ok else (lines[0].strip() if lines else output.strip()[-300:])
        except subprocess.TimeoutExpired:
            _probe_result["why"] = "the probe (one small allocation) ran past 120 s"
    return _probe_result["why"]


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck"])
def test_compute_sanitizer(tool):
    """No out-of-bounds or misaligned access, shared-memory race, or read of
    uninitialized memory in any kernel (tests/cuda_memcheck_script.py runs them all)."""
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    refusal = _sanitizer_refusal(sanitizer)
    if refusal is not None:
        pytest.skip(f"compute-sanitizer refuses this device: {refusal}")
    env = dict(os.environ)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every tensor its own allocation: overruns show
    env["PYTHONPATH"] = os.pathsep.join(p for p in [REPO, env.get("PYTHONPATH", "")] if p)
    script = os.path.join(REPO, "tests", "cuda_memcheck_script.py")
    cmd = [sanitizer, "--tool", tool, "--print-limit", "50", "--error-exitcode", "86", sys.executable, script]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SANITIZER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        pytest.fail(f"compute-sanitizer --tool {tool} ran past {SANITIZER_TIMEOUT_S} s:\n"
                    f"{(text(e.stdout) + text(e.stderr))[-3000:]}")
    report = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, report
    assert "cuda_memcheck_script: ok" in result.stdout, report
