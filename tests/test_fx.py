"""torch.fx.symbolic_trace: our layers are recorded as call_module nodes, as nn's batch norm is."""
import copy

import torch
import torch.fx as fx
from torch import nn

import torch_bn_manual as bnm

from helpers import randn, rel_err


class _Net(nn.Module):
    """Several of ours, with a residual add and a functional op around them."""

    def __init__(self, backend):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = bnm.BatchNorm2d(6, backend=backend)
        self.bn2 = bnm.BatchNorm2d(6, momentum=None, affine=False, backend=backend)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5 * 5, 4), bnm.BatchNorm1d(4, backend=backend))
        self.bn3d = bnm.BatchNorm3d(2, track_running_stats=False, backend=backend)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv(x)))
        y = self.bn2(y) + y
        out = self.head(y)
        return out, self.bn3d(y.unflatten(1, (2, 3)))


def _batch_norm_targets(graph_module):
    return sorted(str(node.target) for node in graph_module.graph.nodes
                  if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target),
                                                             nn.modules.batchnorm._BatchNorm))


def _same_results(model, graph_module, generator):
    """Train two steps (forward, backward) then eval, on fresh inputs: outputs, grads and buffers equal."""
    for training in (True, True, False):
        model.train(training)
        graph_module.train(training)
        x = randn((4, 3, 5, 5), generator, scale=2.0, offset=0.5)
        expected, actual = model(x), graph_module(x)
        for a, e in zip(actual, expected):
            assert torch.equal(a, e)
        sum(o.square().sum() for o in expected).backward()
        sum(o.square().sum() for o in actual).backward()
    for (name, p), q in zip(model.named_parameters(), graph_module.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-12, name
    for (name, b), c in zip(model.named_buffers(), graph_module.buffers()):
        assert torch.equal(b, c), name


def test_symbolic_trace_records_our_layers_as_leaves(backend, generator):
    model = _Net(backend)
    graph_module = fx.symbolic_trace(copy.deepcopy(model))
    assert _batch_norm_targets(graph_module) == ["bn1", "bn2", "bn3d", "head.2"]
    assert all(isinstance(graph_module.get_submodule(t), nn.modules.batchnorm._BatchNorm)
               for t in _batch_norm_targets(graph_module))
    _same_results(model, graph_module, generator)


def test_graph_is_the_one_nn_gets(backend):
    """The same nodes as tracing the model with torch.nn's layers."""
    model = _Net(backend)
    nn_graph = fx.symbolic_trace(bnm.revert_batchnorm(copy.deepcopy(model))).graph
    ours_graph = fx.symbolic_trace(model).graph
    assert [(n.op, str(n.target)) for n in ours_graph.nodes] == [(n.op, str(n.target)) for n in nn_graph.nodes]


class _TraceEverythingTracer(fx.Tracer):
    """A user's Tracer that traces into every module but Conv2d/Linear (ours must still be recorded whole)."""

    def is_leaf_module(self, m, qualified_name):
        return isinstance(m, (nn.Conv2d, nn.Linear))


class _NamedLeavesTracer(fx.Tracer):
    """A user's Tracer extending the default rule by name."""

    def is_leaf_module(self, m, qualified_name):
        return super().is_leaf_module(m, qualified_name) or qualified_name.startswith("bn")


def test_users_own_tracers(backend, generator):
    for tracer_class in (_TraceEverythingTracer, _NamedLeavesTracer):
        model = _Net(backend)
        traced_root = copy.deepcopy(model)
        graph = tracer_class().trace(traced_root)
        graph_module = fx.GraphModule(traced_root, graph)
        assert _batch_norm_targets(graph_module) == ["bn1", "bn2", "bn3d", "head.2"], tracer_class
        _same_results(model, graph_module, generator)
