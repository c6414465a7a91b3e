"""fuse_activations: rewrite BatchNorm → ReLU and BatchNorm → add → ReLU into the fused layers.

    model = bnm.fuse_activations(bnm.convert_batchnorm(model))

The model is traced with torch.fx (batch norm layers and torch.nn's modules
are leaves), and in the graph
    bn(x) → act                      becomes  BatchNormAct(x)
    bn(x) → add(·, r) → act          becomes  BatchNormAct(x, residual=r)
where bn is an nn.BatchNorm1d/2d/3d or one of this package's, act is
nn.ReLU / nn.LeakyReLU (inplace or not), F.relu, torch.relu, .relu(),
F.leaky_relu, and the add is `+`, `+=`, torch.add or .add() (no alpha). Those
are the spellings of torchvision's ResNet blocks (`out += identity`,
`self.relu = nn.ReLU(inplace=True)`) and their usual variants.

The fused layer takes the batch norm's place in the module tree (same
qualified name), holding its parameters and buffers (the same tensors), so
the state_dict keys are unchanged and an optimizer built on the original
model keeps working. A pattern is fused only when nothing else reads the
intermediate values (the batch norm output, the sum) and the batch norm
module is called once; what looks like a pattern but is left as it was is
listed, with the reason, in the returned module's `fusion_report` and in a
log line (logger "torch_bn_manual"). The residual must have the batch norm
output's shape (as in residual blocks): the fused layer adds without
broadcasting and raises otherwise.
"""
import logging
import operator
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activation import _BackendBatchNormAct, fused_from
from .backends import check_backend_name
from .modules import _BackendBatchNorm

__all__ = ["fuse_activations"]

_log = logging.getLogger("torch_bn_manual")

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _LeafTracer(fx.Tracer):
    """torch.nn's modules and every batch norm layer (ours included) stay calls, not traced code."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BackendBatchNorm)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _activation_of(node: fx.Node, modules: dict) -> Optional[Tuple[str, float]]:
    """("relu", 0.0) or ("leaky_relu", slope) when `node` applies one to its first argument, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if type(module) is nn.ReLU:
            return "relu", 0.0
        if type(module) is nn.LeakyReLU:
            return "leaky_relu", float(module.negative_slope)
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS and len(node.args) == 1:
            return "relu", 0.0
        if node.target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu", 0.0
    return None


def _other_operand(node: fx.Node, operand: fx.Node) -> Optional[fx.Node]:
    """The other term when `node` is `operand + other` (any spelling, no alpha), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in ("add", "add_")))
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if a is operand and isinstance(b, fx.Node) and b is not operand:
        return b
    if b is operand and isinstance(a, fx.Node) and a is not operand:
        return a
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse_one(graph: fx.Graph, gm: fx.GraphModule, bn_node: fx.Node, modules: dict, calls: dict,
              backend: str, report: List[str]) -> bool:
    """Fuse the pattern starting at bn_node, if there is one; report a pattern left as it is."""
    name = bn_node.target
    user = _only_user(bn_node)
    if user is None:
        if any(_activation_of(u, modules) or _other_operand(u, bn_node) is not None for u in bn_node.users):
            report.append(f"{name}: not fused, its output has {len(bn_node.users)} users")
        return False
    residual, act_node = None, user
    activation = _activation_of(user, modules)
    if activation is None:
        residual = _other_operand(user, bn_node)
        if residual is None:
            return False  # not a pattern: nothing to report
        act_node = _only_user(user)
        activation = None if act_node is None else _activation_of(act_node, modules)
        if activation is None:
            if act_node is None and any(_activation_of(u, modules) for u in user.users):
                report.append(f"{name}: not fused, the sum has {len(user.users)} users")
            return False
    if user.args[0] is not bn_node and act_node is user:
        return False
    bn = modules[name]
    reason = None
    if type(bn) not in _BATCHNORMS and not (isinstance(bn, _BackendBatchNorm)
                                           and not isinstance(bn, _BackendBatchNormAct)
                                           and isinstance(bn, _BATCHNORMS)):
        reason = f"{type(bn).__name__} has no fused form"
    elif calls[name] != 1:
        reason = f"the module is called {calls[name]} times"
    elif activation[0] == "leaky_relu" and activation[1] < 0:
        reason = f"negative_slope {activation[1]} < 0"
    elif act_node.args[0] is not (user if residual is not None else bn_node):
        reason = "the activation's input is not the batch norm output"
    if reason is not None:
        report.append(f"{name}: not fused, {reason}")
        return False
    fused = fused_from(bn, activation[0], activation[1], backend)
    gm.add_submodule(name, fused)  # same qualified name: state_dict keys unchanged
    with graph.inserting_before(act_node):
        args = (bn_node.args[0],) if residual is None else (bn_node.args[0], residual)
        new = graph.call_module(name, args)
    act_node.replace_all_uses_with(new)
    graph.erase_node(act_node)
    if residual is not None:
        graph.erase_node(user)
    graph.erase_node(bn_node)
    report.append(f"{name}: fused with {'add + ' if residual is not None else ''}{activation[0]}")
    return True


def fuse_activations(model: nn.Module, backend: str = "auto") -> nn.Module:
    """`model` as an fx.GraphModule whose batch norm → (add →) activation patterns run as one fused layer.

    The parameters and buffers are the original ones (shared, not copied).
    `backend` is the fused layers' backend. The returned module has a
    `fusion_report` list: one line per fused pattern and per pattern left
    unfused, with the reason. A model that torch.fx cannot trace is returned
    unchanged, with the tracer's error in its report and a warning.
    """
    check_backend_name(backend)
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # dynamic control flow and the like: leave the model as it is
        message = f"fuse_activations: the model could not be traced with torch.fx ({error}); nothing was fused"
        _log.warning(message)
        model.fusion_report = [message]
        return model
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.training = model.training
    modules = dict(gm.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    report: List[str] = []
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm) \
                and node.graph is graph and node in graph.nodes:
            _fuse_one(graph, gm, node, modules, calls, backend, report)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.fusion_report = report
    left = [line for line in report if "not fused" in line]
    fused = len(report) - len(left)
    _log.info("fuse_activations: %d pattern(s) fused%s", fused, "; " + "; ".join(left) if left else "")
    return gm
