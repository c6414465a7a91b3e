"""The accuracy bar: float32 input far from zero, against float64 math on the same float32 values.

At 1e4 + N(0,1) and 1e6 + N(0,1), y and dx must be within 1e-5 (absolute) of
the exact result. nn.BatchNorm2d on CPU measures about 7.7e-4 and 4.6e-2 here;
the seed's E[x²] - E[x]² is off by more than 1 already at 1e3.
"""
import pytest
import torch

import torch_bn_manual as bnm
from torch_bn_manual import reference
from helpers import in_layout, randn

BAR = 1e-5


def _exact(x, weight, bias, dy, eps):
    """float64 NumPy reference on exactly the float32 values the kernels see."""
    y, cache = reference.batch_norm_forward(x.double().numpy(), weight.double().numpy(), bias.double().numpy(), eps)
    dx, _, _ = reference.batch_norm_backward(dy.double().numpy(), cache)
    return torch.from_numpy(y), torch.from_numpy(dx)


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_offset_float32(backend, offset, layout, generator):
    shape = (8, 6, 12, 10)
    x = in_layout(randn(shape, generator, torch.float32, 1.0, offset), layout).requires_grad_(True)
    weight = randn(6, generator, torch.float32, 0.1, 1.0)
    bias = randn(6, generator, torch.float32)
    dy = in_layout(randn(shape, generator, torch.float32), layout)
    y = bnm.batch_norm(x, None, None, weight, bias, True, eps=1e-5, backend=backend)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_exact, dx_exact = _exact(x.detach(), weight, bias, dy, 1e-5)
    y_err = (y.double() - y_exact).abs().max().item()
    dx_err = (dx.double() - dx_exact).abs().max().item()
    assert y_err <= BAR and dx_err <= BAR, f"y error {y_err:.3g}, dx error {dx_err:.3g}"


def test_nn_misses_the_bar_where_we_meet_it(generator):
    """Pins why the bar exists: nn's float32 CPU path is far off at 1e6."""
    x = randn((8, 6, 12, 10), generator, torch.float32, 1.0, 1e6)
    y_nn = torch.nn.functional.batch_norm(x, None, None, training=True)
    y_exact, _ = _exact(x, torch.ones(6), torch.zeros(6), torch.ones_like(x), 1e-5)
    assert (y_nn.double() - y_exact).abs().max().item() > 100 * BAR


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_fused_large_offset_float32(backend, offset, layout, activation, generator):
    """The fused layer meets the same bar: y, dx and the residual's gradient within 1e-5 of float64
    math. The reference takes act' from our output, so a value that rounds to the other side of
    the kink (a different but equally valid activation pattern) does not count as error."""
    shape = (8, 6, 12, 10)
    x = in_layout(randn(shape, generator, torch.float32, 1.0, offset), layout).requires_grad_(True)
    z = in_layout(randn(shape, generator, torch.float32), layout).requires_grad_(True)
    weight = randn(6, generator, torch.float32, 0.1, 1.0)
    bias = randn(6, generator, torch.float32)
    dy = in_layout(randn(shape, generator, torch.float32), layout)
    y = bnm.batch_norm_act(x, None, None, weight, bias, True, eps=1e-5, residual=z, activation=activation,
                           negative_slope=0.1, backend=backend)
    dx, dz = torch.autograd.grad(y, (x, z), dy)
    y_exact, cache = reference.batch_norm_act_forward(x.detach().double().numpy(), weight.double().numpy(),
                                                      bias.double().numpy(), 1e-5, z.detach().double().numpy(),
                                                      activation, 0.1)
    cache["y"] = y.detach().double().numpy()
    dx_exact, _, _, dz_exact = reference.batch_norm_act_backward(dy.double().numpy(), cache)
    errors = {name: (a.double() - torch.from_numpy(e)).abs().max().item()
              for name, a, e in (("y", y, y_exact), ("dx", dx, dx_exact), ("dz", dz, dz_exact))}
    assert max(errors.values()) <= BAR, errors
