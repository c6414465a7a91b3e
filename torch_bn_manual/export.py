"""Graphs that must run without this package: eval mode is captured as ATen's batch norm.

torch.export, torch.jit.trace and both torch.onnx exporters (which go through
one of the two) record a model as a graph to be saved and loaded elsewhere,
often in a process or runtime that has never seen torch_bn_manual. An
eval-mode batch norm is a fixed affine map per channel, the one ATen's
batch_norm computes from the same running statistics, so while such a
capture is running, eval mode calls torch.nn.functional.batch_norm: the graph
then holds `aten.batch_norm` / `aten._native_batch_norm_legit_no_training`,
which every runtime knows (ONNX: a BatchNormalization node, or folded into
the preceding Conv). The fused layers (activation.py) add `aten.add` for
the residual and `aten.relu` / `aten.leaky_relu` (ONNX: Add, Relu,
LeakyRelu). Training mode keeps this package's ops: a training-mode
graph needs torch_bn_manual where it is loaded.

torch.compile is not a capture for deployment (it runs in this process), so
it keeps the compiled ops; torch.compiler.is_exporting() is False there.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["capturing_standalone_graph", "aten_eval_batch_norm"]


def capturing_standalone_graph() -> bool:
    """True while torch.export (ONNX dynamo=True included) or torch.jit.trace (ONNX dynamo=False) records.

    Two flag reads; torch.compile folds both to constants, so a compiled
    graph holds no check either.
    """
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def aten_eval_batch_norm(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], eps: float, residual: Optional[Tensor] = None,
                         slope: Optional[float] = None) -> Tensor:
    """Eval-mode batch norm as ATen's op: the standard node that exporters and runtimes know.

    The fused layers' act(BN(x) + residual) adds the residual and applies
    the activation as ATen's add and relu (slope 0) or leaky_relu (slope > 0);
    slope None is identity.
    """
    output = F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if residual is not None:
        output = output + residual
    if slope is None:
        return output
    return F.relu(output) if slope == 0.0 else F.leaky_relu(output, slope)
