"""Same inputs, same thread count: bit-identical outputs, gradients and running stats."""
import pytest
import torch

import torch_bn_manual as bnm
from helpers import in_layout, randn


def _run(backend, x, dy, weight, bias):
    running_mean, running_var = torch.zeros(x.size(1)), torch.ones(x.size(1))
    x = x.clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    y = bnm.batch_norm(x, running_mean, running_var, w, b, True, backend=backend)
    y.backward(dy)
    return [y, x.grad, w.grad, b.grad, running_mean, running_var]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bit_identical_across_runs(backend, dtype, layout, generator):
    shape = (16, 24, 20, 18)  # large enough to be split across threads
    x = in_layout(randn(shape, generator, dtype, 3.0, 5.0), layout)
    dy = in_layout(randn(shape, generator, dtype), layout)
    weight, bias = randn(24, generator), randn(24, generator)
    first = _run(backend, x, dy, weight, bias)
    for _ in range(3):
        again = _run(backend, x, dy, weight, bias)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
