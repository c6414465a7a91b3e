"""gradcheck and gradgradcheck (float64) for every backend, train and eval, affine on and off."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import torch_bn_manual as bnm
from helpers import in_layout, randn

SHAPES = {"2d input": (5, 3), "4d input": (3, 2, 3, 2), "5d input": (2, 2, 2, 3, 2)}


def _inputs(shape, affine, layout, generator):
    channels = shape[1]
    x = in_layout(randn(shape, generator, torch.float64, 1.5, 0.3), layout).requires_grad_(True)
    if not affine:
        return (x,)
    weight = randn(channels, generator, torch.float64, 0.3, 1.0).requires_grad_(True)
    bias = randn(channels, generator, torch.float64).requires_grad_(True)
    return x, weight, bias


def _function(backend, training, channels, generator):
    running_mean = randn(channels, generator, torch.float64)
    running_var = randn(channels, generator, torch.float64).abs() + 0.5

    def batch_norm(x, weight=None, bias=None):
        # Fresh copies: the training update must not feed back into repeated evaluations.
        return bnm.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                              training, 0.1, 1e-3, backend=backend)
    return batch_norm


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_gradcheck_and_gradgradcheck(backend, shape, training, affine, generator):
    inputs = _inputs(shape, affine, "contiguous", generator)
    function = _function(backend, training, shape[1], generator)
    assert gradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert gradgradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_gradcheck_other_layouts(backend, layout, generator):
    inputs = _inputs((3, 2, 3, 2), True, layout, generator)
    function = _function(backend, True, 2, generator)
    assert gradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert gradgradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_can_fail(generator):
    """A wrong backward is caught: the check above is not vacuous."""
    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return bnm.batch_norm(x, None, None, training=True, backend="python")

        @staticmethod
        def backward(ctx, dy):
            return dy  # forgets the terms through mean and variance

    x = randn((4, 3), generator, torch.float64).requires_grad_(True)
    assert not gradcheck(WrongBackward.apply, (x,), raise_exception=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_third_order_with_grad_output_from_the_output(backend, training, generator):
    """d/dx of the gradient of Σ y³: grad_output = 3y² depends on x, so the double backward must
    leave that path to the outer engine (partial derivatives only) and stay differentiable itself."""
    function = _function(backend, training, 3, generator)
    x, weight, bias = _inputs((4, 3, 2, 2), True, "contiguous", generator)

    def gradient(x, weight):
        return torch.autograd.grad(function(x, weight, bias).pow(3).sum(), (x, weight), create_graph=True)
    assert gradcheck(gradient, (x, weight), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(gradient, (x, weight), eps=1e-6, atol=1e-5, rtol=1e-4)
