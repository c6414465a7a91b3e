"""torch.compile(fullgraph=True) runs a conv net built from our modules, without graph breaks.

fullgraph=True turns any graph break into an error. "aot_eager" traces
through dynamo and AOTAutograd (fake kernels, registered autograd, the
running-stat update) without inductor's code generation; one case also runs
the default inductor compiler end to end.
"""
import copy

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm
from helpers import randn


def _net(backend, momentum):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), bnm.BatchNorm2d(6, momentum=momentum, backend=backend), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), bnm.BatchNorm2d(6, momentum=momentum, backend=backend), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 4), bnm.BatchNorm1d(4, momentum=momentum, backend=backend))


def _train_steps(model, inputs):
    outputs = []
    for x in inputs:
        out = model(x)
        out.square().mean().backward()
        outputs.append(out.detach())
    grads = [p.grad.clone() for p in model.parameters()]
    return outputs, grads


def _check(backend, momentum, training, compiler, generator, rtol=1e-6, atol=1e-6):
    torch._dynamo.reset()
    eager = _net(backend, momentum).train(training)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=compiler)
    inputs = [randn((4, 3, 5, 5), generator) for _ in range(3)]
    if training:
        (out_e, grads_e), (out_c, grads_c) = _train_steps(eager, inputs), _train_steps(compiled, inputs)
        for a, b in zip(grads_e, grads_c):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    else:
        with torch.no_grad():
            out_e, out_c = [eager(x) for x in inputs], [compiled(x) for x in inputs]
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_module.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_train_without_graph_breaks(backend, momentum, generator):
    _check(backend, momentum, True, "aot_eager", generator)


def test_compile_eval_without_graph_breaks(backend, generator):
    _check(backend, 0.1, False, "aot_eager", generator)


@pytest.mark.slow
def test_compile_with_inductor(generator):
    _check("auto", None, True, "inductor", generator, rtol=1e-4, atol=1e-5)
