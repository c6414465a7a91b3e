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


class _FusedNet(nn.Module):
    """The fused layers with and without a residual, and bnm.batch_norm_act / bnm.batch_norm called directly."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = bnm.BatchNormAct2d(6, backend=backend)
        self.bn2 = bnm.BatchNormAct2d(6, momentum=None, activation="leaky_relu", negative_slope=0.1, backend=backend)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5 * 5, 4),
                                  bnm.BatchNormAct1d(4, activation="identity", backend=backend))
        self.register_buffer("mean", torch.zeros(6))
        self.register_buffer("var", torch.ones(6))

    def forward(self, x):
        y = self.bn1(self.conv(x))
        y = self.bn2(self.conv(x), y)
        # Fixed modes (an FX graph keeps the values of self.training as traced, as for F.batch_norm).
        z = bnm.batch_norm_act(y, self.mean, self.var, self.bn1.weight, None, True, 0.2,
                               residual=y.flip(0), activation="leaky_relu", negative_slope=0.3, backend=self.backend)
        return self.head(z), bnm.batch_norm(z, self.mean, self.var, None, self.bn2.bias, False,
                                            backend=self.backend)


def _call_functions(graph_module):
    return [node.target for node in graph_module.graph.nodes if node.op == "call_function"]


def test_symbolic_trace_records_fused_layers_and_functions(backend, generator):
    model = _FusedNet(backend)
    graph_module = fx.symbolic_trace(copy.deepcopy(model))
    assert _batch_norm_targets(graph_module) == ["bn1", "bn2", "head.2"]
    bn2 = next(node for node in graph_module.graph.nodes if node.op == "call_module" and node.target == "bn2")
    assert len(bn2.args) == 2  # (input, residual)
    assert _call_functions(graph_module).count(bnm.batch_norm_act) == 1
    assert _call_functions(graph_module).count(bnm.batch_norm) == 1
    _same_results(model, graph_module, generator)


def test_users_own_tracers_record_fused_layers(backend, generator):
    for tracer_class in (_TraceEverythingTracer, _NamedLeavesTracer):
        model = _FusedNet(backend)
        traced_root = copy.deepcopy(model)
        graph_module = fx.GraphModule(traced_root, tracer_class().trace(traced_root))
        assert _batch_norm_targets(graph_module) == ["bn1", "bn2", "head.2"], tracer_class
        _same_results(model, graph_module, generator)


def _layer_types(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_fuse_activations_of_a_fused_model_changes_nothing(backend, generator):
    """fuse_activations on its own result, or on a model built with the fused layers: no pattern left to fuse."""
    block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    once = bnm.fuse_activations(block, backend)
    assert len([line for line in once.fusion_report if "not fused" not in line]) == 2
    # A fused layer followed by an activation is left as it is too, and said so.
    followed = nn.Sequential(nn.Conv2d(3, 6, 1), bnm.BatchNormAct2d(6, activation="identity", backend=backend),
                             nn.ReLU())
    for model in (once, _FusedNet(backend), followed):
        again = bnm.fuse_activations(copy.deepcopy(model), backend)
        assert not any(" fused with " in line for line in again.fusion_report), again.fusion_report
        if model is followed:
            assert again.fusion_report == ["1: not fused, BatchNormAct2d has no fused form"]
        original_graph = fx.symbolic_trace(copy.deepcopy(model)).graph
        assert [(n.op, str(n.target)) for n in again.graph.nodes] == \
            [(n.op, str(n.target)) for n in original_graph.nodes]
        assert _layer_types(again) == _layer_types(model)
        _same_results(model, again, generator)
