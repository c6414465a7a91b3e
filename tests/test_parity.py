"""The parity matrix: our modules against torch.nn on every option, dtype, layout and odd shape.

Each test item fixes (backend, module kind, dtype, layout) and loops over every
shape and every (affine, track_running_stats, momentum) combination, in train
(two steps, so momentum=None's cumulative average shows) and then eval. It
compares outputs, input and parameter gradients, running stats,
num_batches_tracked and the output's memory format.
"""
import copy
import itertools

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm
from helpers import TOLERANCE, formats_of, in_layout, randn, rel_err

KINDS = {
    # kind: (ours, torch.nn's, shapes: usual, C=1, N=1 with spatial > 1, spatial 1 with N > 1, odd sizes)
    "1d": (bnm.BatchNorm1d, nn.BatchNorm1d, [(8, 3), (4, 3, 7), (5, 1), (1, 4, 6), (6, 5, 1), (3, 5, 7)]),
    "2d": (bnm.BatchNorm2d, nn.BatchNorm2d, [(4, 3, 5, 6), (4, 1, 3, 3), (1, 4, 3, 5), (6, 5, 1, 1), (3, 5, 7, 11)]),
    "3d": (bnm.BatchNorm3d, nn.BatchNorm3d, [(2, 3, 4, 3, 2), (3, 1, 2, 3, 2), (1, 2, 3, 4, 5), (5, 3, 1, 1, 1), (3, 5, 7, 3, 2)]),
}
# momentum only matters when running stats are tracked.
OPTIONS = [(affine, track, momentum) for affine, track, momentum
           in itertools.product([True, False], [True, False], [0.1, 0.0, 1.0, None])
           if track or momentum == 0.1]
# Below float64, both implementations are compared with float64 math on the same values.
VS_FLOAT64 = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def _pair(kind, channels, affine, track, momentum, param_dtype, backend, generator):
    ours_cls, nn_cls, _ = KINDS[kind]
    ours = ours_cls(channels, momentum=momentum, affine=affine, track_running_stats=track,
                    dtype=param_dtype, backend=backend)
    ref = nn_cls(channels, momentum=momentum, affine=affine, track_running_stats=track, dtype=param_dtype)
    with torch.no_grad():  # non-trivial state, shared by both
        if affine:
            ours.weight.copy_(randn(channels, generator, param_dtype, 0.5, 1.0))
            ours.bias.copy_(randn(channels, generator, param_dtype))
        if track:
            ours.running_mean.copy_(randn(channels, generator, param_dtype))
            ours.running_var.copy_(randn(channels, generator, param_dtype).abs() + 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _step(module, x, dy):
    x = x.detach().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + ([module.weight.grad, module.bias.grad] if module.affine else [])
    for p in module.parameters():
        p.grad = None
    return y.detach(), grads


def _compare(what, ours, ref, dtype, exact=None):
    """ours against nn; below float64, both against float64 math on the same values.

    Two correct implementations can differ by more than a rounding when a
    result is mostly cancellation (dx or dweight at small M); there we require
    ours to be within tolerance of the float64 result, or no further from it
    than nn is.
    """
    if exact is None:
        err = rel_err(ours, ref)
        assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:g}"
        return
    err, err_nn = rel_err(ours, exact), rel_err(ref, exact)
    assert err <= max(TOLERANCE[dtype], 1.5 * err_nn), f"{what}: error {err:.3g} vs float64, nn's {err_nn:.3g}"


def _check_state(ours, ref, dtype, context):
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), f"{context}: {name} presence"
        if a is not None:
            _compare(f"{context}: {name}", a, b, dtype)
    if ref.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked), context


# Small tensors: one thread avoids OpenMP start-up and barrier costs that dominate here.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_nn(backend, kind, dtype, layout, generator):
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for shape in KINDS[kind][2]:
        channels = shape[1]
        for affine, track, momentum in OPTIONS:
            context = f"shape={shape} affine={affine} track={track} momentum={momentum}"
            ours, ref = _pair(kind, channels, affine, track, momentum, param_dtype, backend, generator)
            for mode in ("train", "train", "eval"):
                ours.train(mode == "train")
                ref.train(mode == "train")
                # Each step starts from nn's state, so a rounding difference in an
                # earlier update cannot masquerade as an error of this step.
                state_before = copy.deepcopy(ref.state_dict())
                ours.load_state_dict(state_before)
                x = in_layout(randn(shape, generator, dtype, 2.0, 0.5), layout)
                dy = in_layout(randn(shape, generator, dtype), layout)
                y_ours, g_ours = _step(ours, x, dy)
                y_ref, g_ref = _step(ref, x, dy)
                y_64 = g_64 = [None] * 3
                if dtype in VS_FLOAT64:  # the float64 truth on the same values and state
                    exact = copy.deepcopy(ref).double()
                    exact.load_state_dict(state_before)
                    y_64, g_64 = _step(exact, x.double(), dy.double())
                    g_64 = g_64 + [None] * (3 - len(g_64))
                where = f"{context} {mode}"
                assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape, where
                assert formats_of(y_ours) == formats_of(y_ref), f"{where}: output memory format"
                _compare(f"{where}: output", y_ours, y_ref, dtype, y_64 if dtype in VS_FLOAT64 else None)
                for name, a, b, c in zip(("dx", "dweight", "dbias"), g_ours, g_ref, g_64):
                    assert a.dtype == b.dtype, f"{where}: {name} dtype"
                    _compare(f"{where}: {name}", a, b, dtype, c)
                _check_state(ours, ref, param_dtype if dtype in (torch.float32, torch.float64) else dtype, where)


def test_functional_matches_nn(backend, generator):
    """bnm.batch_norm against F.batch_norm, weight without bias and bias without weight included."""
    x = randn((4, 3, 5, 5), generator, torch.float64)
    w, b = randn(3, generator, torch.float64), randn(3, generator, torch.float64)
    for weight, bias in ((w, b), (w, None), (None, b), (None, None)):
        for training in (True, False):
            rm1, rv1 = randn(3, generator, torch.float64), randn(3, generator, torch.float64).abs() + 0.1
            rm2, rv2 = rm1.clone(), rv1.clone()
            ours = bnm.batch_norm(x, rm1, rv1, weight, bias, training, 0.3, 1e-3, backend=backend)
            ref = torch.nn.functional.batch_norm(x, rm2, rv2, weight, bias, training, 0.3, 1e-3)
            assert rel_err(ours, ref) < 1e-10
            assert rel_err(rm1, rm2) < 1e-12 and rel_err(rv1, rv2) < 1e-12
