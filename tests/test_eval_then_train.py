"""Eval, then train, then one backward through both outputs (plain and fused layers).

The eval output's gradient must be the one of the function that eval
forward computed: with the running statistics as they were then, not as the
training step left them (torch.nn uses the updated buffers; the compiled
backend used to raise "modified by an inplace operation").
"""
import pytest
import torch
from torch import nn

import torch_bn_manual as bnm

from helpers import rel_err
from test_activation_parity import NNBlock

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
CLASSES = {"1d": (bnm.BatchNorm1d, nn.BatchNorm1d, (6, 4, 5)), "2d": (bnm.BatchNorm2d, nn.BatchNorm2d, (3, 4, 3, 2))}
FUSED = {"1d": (bnm.BatchNormAct1d, nn.BatchNorm1d, (6, 4, 5)),
         "2d": (bnm.BatchNormAct2d, nn.BatchNorm2d, (3, 4, 3, 2))}


def _grads(module, x, dy, training):
    """Gradients of (module(x) * dy).sum() for a copy of module, in the given mode."""
    module.train(training)
    xr = x.detach().requires_grad_()
    (module(xr) * dy).sum().backward()
    return xr.grad, module.weight.grad, module.bias.grad


def _randomize(module):
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
        module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_eval_output_gradient_uses_its_own_statistics(kind, dtype, backend):
    ours_cls, nn_cls, shape = CLASSES[kind]
    channels = shape[1]
    ours = ours_cls(channels, backend=backend, dtype=dtype)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x1, x2 = torch.randn(shape, dtype=dtype) + 0.5, torch.randn(shape, dtype=dtype) * 2
    dy1, dy2 = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)

    # The expected gradients: each output's own backward, run right after its forward, by nn.
    ref_eval, ref_train = nn_cls(channels, dtype=dtype), nn_cls(channels, dtype=dtype)
    ref_eval.load_state_dict(before)
    ref_train.load_state_dict(before)
    gx1, gw1, gb1 = _grads(ref_eval, x1, dy1, training=False)
    gx2, gw2, gb2 = _grads(ref_train, x2, dy2, training=True)

    xr1, xr2 = x1.detach().requires_grad_(), x2.detach().requires_grad_()
    ours.eval()
    y1 = ours(xr1)
    ours.train()
    y2 = ours(xr2)  # updates the running statistics in place
    ((y1 * dy1).sum() + (y2 * dy2).sum()).backward()

    tol = TOL[dtype]
    assert rel_err(xr1.grad, gx1) <= tol
    assert rel_err(xr2.grad, gx2) <= tol
    assert rel_err(ours.weight.grad, gw1 + gw2) <= tol
    assert rel_err(ours.bias.grad, gb1 + gb2) <= tol
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert rel_err(ours.state_dict()[key], ref_train.state_dict()[key]) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2), ("identity", 0.01)])
@pytest.mark.parametrize("kind", list(FUSED))
def test_fused_eval_output_gradient_uses_its_own_statistics(kind, activation, slope, dtype, backend):
    """The fused layers, with a residual: each output's gradients as nn's BN + add + activation right after it."""
    ours_cls, nn_cls, shape = FUSED[kind]
    channels = shape[1]
    ours = ours_cls(channels, backend=backend, dtype=dtype, activation=activation, negative_slope=slope)
    _randomize(ours)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x1, x2 = torch.randn(shape, dtype=dtype) + 0.5, torch.randn(shape, dtype=dtype) * 2
    z1, z2 = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    dy1, dy2 = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)

    expected = []
    for x, z, dy, training in ((x1, z1, dy1, False), (x2, z2, dy2, True)):
        ref = NNBlock(nn_cls(channels, dtype=dtype), activation, slope)
        ref.bn.load_state_dict(before)
        ref.train(training)
        xr, zr = x.detach().requires_grad_(), z.detach().requires_grad_()
        (ref(xr, zr) * dy).sum().backward()
        expected.append((xr.grad, zr.grad, ref.bn.weight.grad, ref.bn.bias.grad, ref.bn))

    xr1, xr2 = x1.detach().requires_grad_(), x2.detach().requires_grad_()
    zr1, zr2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    ours.eval()
    y1 = ours(xr1, zr1)
    ours.train()
    y2 = ours(xr2, zr2)  # updates the running statistics in place
    ((y1 * dy1).sum() + (y2 * dy2).sum()).backward()

    tol = TOL[dtype]
    (gx1, gz1, gw1, gb1, _), (gx2, gz2, gw2, gb2, ref_train) = expected
    for got, want in ((xr1.grad, gx1), (zr1.grad, gz1), (xr2.grad, gx2), (zr2.grad, gz2),
                      (ours.weight.grad, gw1 + gw2), (ours.bias.grad, gb1 + gb2)):
        assert rel_err(got, want) <= tol
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert rel_err(ours.state_dict()[key], ref_train.state_dict()[key]) <= tol


def test_nn_uses_the_updated_statistics():
    """What the documentation says of torch.nn: its eval gradient follows the buffers' later values."""
    layer = nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        layer.running_var.fill_(4.0)
    x1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    layer.eval()
    y1 = layer(x1)
    layer.train()
    layer(torch.randn(5, 3, dtype=torch.float64) * 10)
    y1.sum().backward()
    used = (layer.weight / (layer.running_var + layer.eps).sqrt()).detach()
    assert rel_err(x1.grad[0], used) <= 1e-12  # the updated running_var, not 4.0
    assert rel_err(x1.grad[0], torch.full((3,), 0.5, dtype=torch.float64)) > 1e-3


def test_eval_without_gradient_records_nothing(backend):
    layer = bnm.BatchNorm2d(3, backend=backend).eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    assert layer(x).grad_fn is None


def test_fused_eval_without_gradient_records_nothing(backend):
    layer = bnm.BatchNormAct2d(3, backend=backend).eval()
    x, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert layer(x, z).grad_fn is None
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    assert layer(x, z).grad_fn is None
    assert layer(x, z.requires_grad_()).grad_fn is not None  # the residual alone needs one
