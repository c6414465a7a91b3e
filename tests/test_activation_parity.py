"""The fused layers against torch.nn: BatchNorm*d, then + residual, then F.relu / F.leaky_relu.

The parity matrix of test_parity.py: each test item fixes (backend, kind,
dtype, layout) and loops over every shape and constructor option; each
(shape, option) pair takes one of the activation/residual variants in turn,
so that every variant meets every shape and option over the loop. Compared:
output, dx, dweight, dbias, dresidual, running stats, num_batches_tracked and
the output's memory format, in train (twice) and eval.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_bn_manual as bnm
from helpers import formats_of, in_layout, randn, rel_err
from test_parity import DTYPES, LAYOUTS, OPTIONS, TOLERANCE, VS_FLOAT64, _check_state, _compare

FUSED = {
    "1d": (bnm.BatchNormAct1d, nn.BatchNorm1d, [(8, 3), (4, 3, 7), (5, 1), (1, 4, 6), (6, 5, 1), (3, 5, 7)]),
    "2d": (bnm.BatchNormAct2d, nn.BatchNorm2d, [(4, 3, 5, 6), (4, 1, 3, 3), (1, 4, 3, 5), (6, 5, 1, 1), (3, 5, 7, 11)]),
    "3d": (bnm.BatchNormAct3d, nn.BatchNorm3d, [(2, 3, 4, 3, 2), (3, 1, 2, 3, 2), (1, 2, 3, 4, 5), (5, 3, 1, 1, 1), (3, 5, 7, 3, 2)]),
}
# (activation, negative_slope, with a residual?)
VARIANTS = [("relu", 0.01, False), ("relu", 0.01, True), ("leaky_relu", 0.1, True), ("identity", 0.01, True),
            ("leaky_relu", 0.3, False)]


def nn_activation(t, activation, negative_slope):
    if activation == "relu":
        return F.relu(t)
    if activation == "leaky_relu":
        return F.leaky_relu(t, negative_slope)
    return t


class NNBlock(nn.Module):
    """What the fused layer replaces: nn's batch norm, the add, the activation."""

    def __init__(self, bn, activation, negative_slope):
        super().__init__()
        self.bn, self.activation, self.negative_slope = bn, activation, negative_slope

    def forward(self, x, residual=None):
        t = self.bn(x)
        return nn_activation(t if residual is None else t + residual, self.activation, self.negative_slope)


def _step(module, x, z, dy):
    x = x.detach().requires_grad_(True)
    z = None if z is None else z.detach().requires_grad_(True)
    y = module(x, z)
    y.backward(dy)
    bn = module.bn if isinstance(module, NNBlock) else module
    grads = [x.grad] + ([bn.weight.grad, bn.bias.grad] if bn.affine else []) + ([z.grad] if z is not None else [])
    for p in module.parameters():
        p.grad = None
    return y.detach(), grads


# Small tensors: one thread avoids OpenMP start-up and barrier costs that dominate here.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(FUSED))
def test_fused_matches_nn(backend, kind, dtype, layout, generator):
    ours_cls, nn_cls, shapes = FUSED[kind]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    turn = 0
    for shape in shapes:
        channels = shape[1]
        for affine, track, momentum in OPTIONS:
            activation, slope, with_residual = VARIANTS[turn % len(VARIANTS)]
            turn += 1
            context = (f"shape={shape} affine={affine} track={track} momentum={momentum} {activation}({slope}) "
                       f"residual={with_residual}")
            ours = ours_cls(channels, momentum=momentum, affine=affine, track_running_stats=track,
                            dtype=param_dtype, backend=backend, activation=activation, negative_slope=slope)
            with torch.no_grad():
                if affine:
                    ours.weight.copy_(randn(channels, generator, param_dtype, 0.5, 1.0))
                    ours.bias.copy_(randn(channels, generator, param_dtype))
                if track:
                    ours.running_mean.copy_(randn(channels, generator, param_dtype))
                    ours.running_var.copy_(randn(channels, generator, param_dtype).abs() + 0.5)
            ref = NNBlock(nn_cls(channels, momentum=momentum, affine=affine, track_running_stats=track,
                                 dtype=param_dtype), activation, slope)
            ref.bn.load_state_dict(ours.state_dict())
            for mode in ("train", "train", "eval"):
                ours.train(mode == "train")
                ref.train(mode == "train")
                state_before = copy.deepcopy(ref.bn.state_dict())
                ours.load_state_dict(state_before)
                x = in_layout(randn(shape, generator, dtype, 2.0, 0.5), layout)
                z = in_layout(randn(shape, generator, dtype), layout) if with_residual else None
                dy = in_layout(randn(shape, generator, dtype), layout)
                y_ours, g_ours = _step(ours, x, z, dy)
                y_ref, g_ref = _step(ref, x, z, dy)
                y_64 = g_64 = [None] * len(g_ref)
                if dtype in VS_FLOAT64:
                    exact = copy.deepcopy(ref).double()
                    exact.bn.load_state_dict(state_before)
                    y_64, g_64 = _step(exact, x.double(), None if z is None else z.double(), dy.double())
                where = f"{context} {mode}"
                assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape, where
                assert formats_of(y_ours) == formats_of(y_ref), f"{where}: output memory format"
                _compare(f"{where}: output", y_ours, y_ref, dtype, y_64 if dtype in VS_FLOAT64 else None)
                names = ("dx",) + (("dweight", "dbias") if affine else ()) + (("dresidual",) if z is not None else ())
                assert len(g_ours) == len(g_ref) == len(names)
                for name, a, b, c in zip(names, g_ours, g_ref, g_64):
                    assert a.dtype == b.dtype, f"{where}: {name} dtype"
                    _compare(f"{where}: {name}", a, b, dtype, c)
                _check_state(ours, ref.bn, param_dtype if dtype in (torch.float32, torch.float64) else dtype, where)


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu"])
def test_functional_matches_nn(backend, activation, generator):
    """bnm.batch_norm_act against F.batch_norm + z + activation, every weight/bias/residual combination."""
    x = randn((4, 3, 5, 5), generator, torch.float64)
    z = randn((4, 3, 5, 5), generator, torch.float64)
    w, b = randn(3, generator, torch.float64), randn(3, generator, torch.float64)
    for weight, bias in ((w, b), (w, None), (None, b), (None, None)):
        for residual in (None, z):
            for training in (True, False):
                rm1, rv1 = randn(3, generator, torch.float64), randn(3, generator, torch.float64).abs() + 0.1
                rm2, rv2 = rm1.clone(), rv1.clone()
                ours = bnm.batch_norm_act(x, rm1, rv1, weight, bias, training, 0.3, 1e-3, residual=residual,
                                          activation=activation, negative_slope=0.2, backend=backend)
                t = F.batch_norm(x, rm2, rv2, weight, bias, training, 0.3, 1e-3)
                ref = nn_activation(t if residual is None else t + residual, activation, 0.2)
                assert rel_err(ours, ref) < 1e-10
                assert rel_err(rm1, rm2) < 1e-12 and rel_err(rv1, rv2) < 1e-12


def test_mixed_residual_layout_matches_nn(backend, generator):
    """A contiguous residual added to a channels_last batch norm: values and output format as nn's."""
    x = randn((4, 6, 5, 7), generator, torch.float32).contiguous(memory_format=torch.channels_last)
    z = randn((4, 6, 5, 7), generator, torch.float32)
    ours = bnm.BatchNormAct2d(6, backend=backend)(x, z)
    ref = F.relu(nn.BatchNorm2d(6)(x) + z)
    assert formats_of(ours) == formats_of(ref)
    assert rel_err(ours, ref) < TOLERANCE[torch.float32]


def test_empty_batch_like_nn(backend):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    z = torch.randn(0, 3, 4, 4)
    ours = bnm.BatchNormAct2d(3, backend=backend)
    ref = nn.BatchNorm2d(3)
    y = ours(x, z)
    assert y.shape == F.relu(ref(x) + z).shape
    y.sum().backward()
    assert ours.num_batches_tracked.item() == 1 and ours.weight.grad is not None


def _with_specials(values, every, specials):
    """values with every `every`-th element (in logical order) replaced by the specials in turn."""
    flat = values.flatten().clone()
    index = torch.arange(0, flat.numel(), every)
    flat[index] = specials.repeat(index.numel() // specials.numel() + 1)[: index.numel()]
    return flat.view(values.shape)


def _same_values(a, b, exact):
    """Same NaNs, infinities and signs (of zero too); finite values equal, or within 1e-6 relative."""
    a, b = a.detach(), b.detach()
    if not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            and torch.equal(a[~a.isnan()].signbit(), b[~b.isnan()].signbit())):
        return False
    a, b = a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)
    return torch.equal(a, b) if exact else bool(((a - b).abs() <= 1e-6 * b.abs()).all())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_activation_bits_are_nns_at_special_values(backend, activation, layout, generator):
    """Where t < 0 relu gives +0 (not slope·t = -0), -inf gives 0 (not NaN), NaN stays NaN; the
    residual's gradient is threshold_backward's: 0 where the output is <= 0, even for an infinite dy.
    Compared bit for bit (signs of zero included) with nn's activation of the same t = BN(x) + z
    (the identity layer's output) and nn's gradient of it. The python backend's leaky_relu rounds t·slope
    once from wider t, so its finite values are compared within 1e-6."""
    slope = 0.1 if activation == "leaky_relu" else 0.0
    shape = (4, 3, 5, 6)
    x = in_layout(randn(shape, generator, torch.float32), layout)
    specials = torch.tensor([float("-inf"), float("inf"), float("nan"), -1e30, 1e30, -0.0])
    z = in_layout(_with_specials(randn(shape, generator, torch.float32, 4.0), 7, specials), layout)
    dy = in_layout(_with_specials(randn(shape, generator, torch.float32), 5,
                                  torch.tensor([float("inf"), float("-inf")])), layout)
    identity = bnm.BatchNormAct2d(3, backend=backend, activation="identity")
    t = identity(x, residual=z).detach().requires_grad_()
    expected = nn_activation(t, activation, slope)
    (dt_expected,) = torch.autograd.grad(expected, t, dy)
    layer = bnm.BatchNormAct2d(3, backend=backend, activation=activation, negative_slope=slope)
    zo = z.clone().requires_grad_()
    got = layer(x, residual=zo)
    exact = backend == "cpp" or activation == "relu"
    assert _same_values(got, expected, exact), "output"
    (dz,) = torch.autograd.grad(got, zo, dy)
    assert _same_values(dz, dt_expected, exact), "the residual's gradient"
