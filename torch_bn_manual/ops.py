"""The "cpp" backend: torch.library glue over the compiled ops.

The ops are declared once in csrc/ops.cpp (namespace ``torch_bn_manual``) and
implemented per device in csrc/cpu/ and csrc/cuda/. This module adds what
the C++ side leaves to Python:

- a fake (meta) implementation of every op, for torch.compile and
  torch.library.opcheck: output shapes, dtypes and memory formats only;
- autograd formulas for batch_norm_train_forward and batch_norm_eval_forward.
  The first backward runs the compiled batch_norm_backward; when the graph of
  the backward itself is wanted (create_graph=True, e.g. gradgradcheck) it
  runs _python.differentiable_backward, which autograd can differentiate again.
  The other ops have no derivative: their outputs never require grad;

and the backend interface of docs/architecture.md, with the signatures of
_python.py, as thin wrappers over ``torch.ops.torch_bn_manual``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as error:
    raise ImportError(
        f"torch_bn_manual._C, the compiled extension, could not be loaded ({error}); "
        "build it with `pip install --no-build-isolation -e .` in the project root") from error

from . import _python

__all__ = [
    "train_forward",
    "eval_forward",
    "collect_stats",
    "merge_stats",
    "elementwise",
    "backward_reduce",
    "backward_elementwise",
    "running_stats",
]

_ops = torch.ops.torch_bn_manual
_LIB = "torch_bn_manual::"


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 statistics for float64/float32 input, float32 for half input."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _output_format(input: Tensor) -> torch.memory_format:
    """The memory format of outputs shaped like input: ATen's suggest_memory_format."""
    return torch._prims_common.suggest_memory_format(input)


def _like_input(input: Tensor) -> Tensor:
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_output_format(input))


def _per_channel(input: Tensor, dtype: torch.dtype) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=dtype)


def _check_input(input: Tensor) -> None:
    torch._check(2 <= input.dim() <= 5, lambda: f"expected input of shape (N, C, *) with 0 to 3 spatial dims, "
                                                f"got {input.dim()} dims")


# ---------------------------------------------------------------------------
# Fake implementations: metadata exactly as the kernels produce it
# ---------------------------------------------------------------------------

@torch.library.register_fake(_LIB + "batch_norm_train_forward")
def _train_forward_fake(input, weight, bias, eps):
    _check_input(input)
    sdt = _stats_dtype(input.dtype)
    return _like_input(input), _per_channel(input, sdt), _per_channel(input, sdt)


@torch.library.register_fake(_LIB + "batch_norm_eval_forward")
def _eval_forward_fake(input, weight, bias, running_mean, running_var, eps):
    _check_input(input)
    return _like_input(input)


@torch.library.register_fake(_LIB + "batch_norm_backward")
def _backward_fake(grad_output, input, weight, save_mean, save_invstd, train, eps, output_mask):
    _check_input(input)
    grad_input = _like_input(input) if output_mask[0] else input.new_empty((0,))
    wdtype = input.dtype if weight is None else weight.dtype
    channels = input.shape[1]
    grad_weight = input.new_empty((channels if weight is not None and output_mask[1] else 0,), dtype=wdtype)
    grad_bias = input.new_empty((channels if weight is not None and output_mask[2] else 0,), dtype=wdtype)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake(_LIB + "batch_norm_collect_stats")
def _collect_stats_fake(input):
    _check_input(input)
    sdt = _stats_dtype(input.dtype)
    return _per_channel(input, sdt), _per_channel(input, sdt), _per_channel(input, sdt)


@torch.library.register_fake(_LIB + "batch_norm_merge_stats")
def _merge_stats_fake(mean, m2, count):
    torch._check(mean.dim() == 2, lambda: f"mean must be (G, C), got {tuple(mean.shape)}")
    channels = mean.shape[1]
    return tuple(mean.new_empty((channels,)) for _ in range(3))


@torch.library.register_fake(_LIB + "batch_norm_elementwise")
def _elementwise_fake(input, weight, bias, mean, invstd):
    _check_input(input)
    return _like_input(input)


@torch.library.register_fake(_LIB + "batch_norm_backward_reduce")
def _backward_reduce_fake(grad_output, input, mean, invstd):
    _check_input(input)
    sdt = _stats_dtype(input.dtype)
    return _per_channel(input, sdt), _per_channel(input, sdt)


@torch.library.register_fake(_LIB + "batch_norm_backward_elementwise")
def _backward_elementwise_fake(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    _check_input(input)
    return _like_input(input)


@torch.library.register_fake(_LIB + "batch_norm_running_stats")
def _running_stats_fake(save_mean, save_invstd, running_mean, running_var, momentum, eps, count):
    return torch.empty_like(running_mean), torch.empty_like(running_var)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------

def _grad_bias_alone(grad_output: Tensor, bias_dtype: torch.dtype) -> Tensor:
    """Σ dy per channel, for a bias given without a weight (the kernels pair them)."""
    dims = [0] + list(range(2, grad_output.dim()))
    return grad_output.to(_stats_dtype(grad_output.dtype)).sum(dims).to(bias_dtype)


def _backward(ctx, grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
              invstd: Tensor, train: bool):
    """(grad_input, grad_weight, grad_bias) of both forward ops; None where not needed."""
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: the backward must itself be differentiable.
        grad_input, grad_weight, grad_bias = _python.differentiable_backward(
            grad_output, input, weight, mean, invstd, train, ctx.eps)
    else:
        has_weight = weight is not None
        mask = [needs[0], has_weight and needs[1], has_weight and needs[2]]
        grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(
            grad_output, input, weight, mean, invstd, train, ctx.eps, mask)
    if weight is None and needs[2]:
        grad_bias = _grad_bias_alone(grad_output, ctx.bias_dtype)
    return (grad_input if needs[0] else None,
            grad_weight if needs[1] and weight is not None else None,
            grad_bias if needs[2] else None)


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, eps = inputs
    _, save_mean, save_invstd = output
    ctx.save_for_backward(input, weight, save_mean, save_invstd)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(save_mean, save_invstd)
    # No zero tensors for the gradients of save_mean/save_invstd (they have none).
    ctx.set_materialize_grads(False)


def _train_backward(ctx, grad_output, _grad_mean, _grad_invstd):
    if grad_output is None:  # only save_mean/save_invstd were used
        return None, None, None, None
    input, weight, mean, invstd = ctx.saved_tensors
    return _backward(ctx, grad_output, input, weight, mean, invstd, True) + (None,)


def _eval_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps = inputs
    # The running statistics themselves, not copies (a copy per call costs
    # more than the kernel on small layers). save_for_backward checks their
    # version: a backward after they were updated in place raises autograd's
    # "modified by an inplace operation" rather than return the gradient of
    # a different function.
    ctx.save_for_backward(input, weight, running_mean, running_var)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _eval_backward(ctx, grad_output):
    input, weight, running_mean, running_var = ctx.saved_tensors
    # The statistics as constants, in the statistics dtype.
    sdt = _stats_dtype(input.dtype)
    mean = running_mean.detach().to(sdt)
    invstd = torch.rsqrt(running_var.detach().to(sdt) + ctx.eps)
    return _backward(ctx, grad_output, input, weight, mean, invstd, False) + (None, None, None)


torch.library.register_autograd(_LIB + "batch_norm_train_forward", _train_backward,
                                setup_context=_train_setup_context)
torch.library.register_autograd(_LIB + "batch_norm_eval_forward", _eval_backward,
                                setup_context=_eval_setup_context)


# ---------------------------------------------------------------------------
# The backend interface (docs/architecture.md)
# ---------------------------------------------------------------------------

def train_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd) with batch statistics; differentiable."""
    return _ops.batch_norm_train_forward(input, weight, bias, eps)


def eval_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """output with the given (running) statistics; differentiable in input, weight, bias."""
    return _ops.batch_norm_eval_forward(input, weight, bias, running_mean, running_var, eps)


def collect_stats(input: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel (mean, m2, count) with m2 = Σ (x - mean)²; empty input gives zeros."""
    return _ops.batch_norm_collect_stats(input)


def merge_stats(mean: Tensor, m2: Tensor, count: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Fold G groups of statistics, (G, C) each, into one (C,) summary, in group order."""
    return _ops.batch_norm_merge_stats(mean, m2, count)


def elementwise(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, invstd: Tensor) -> Tensor:
    """output = (x - mean) * invstd * w + b, in the input's memory format."""
    return _ops.batch_norm_elementwise(input, weight, bias, mean, invstd)


def backward_reduce(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """(Σ dy, Σ dy·(x - mean)) per channel."""
    return _ops.batch_norm_backward_reduce(grad_output, input, mean, invstd)


def backward_elementwise(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                         weight: Optional[Tensor], sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    """dx from the (possibly all-reduced) sums; count is the global M as a tensor."""
    if not isinstance(count, Tensor):
        count = torch.tensor(count, dtype=sum_dy.dtype, device=sum_dy.device)
    return _ops.batch_norm_backward_elementwise(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count)


def running_stats(save_mean: Tensor, save_invstd: Tensor, running_mean: Tensor, running_var: Tensor,
                  momentum, eps: float, count: int) -> Tuple[Tensor, Tensor]:
    """The running statistics after a training batch (new tensors; the caller copies them into the buffers)."""
    if not isinstance(momentum, Tensor):
        momentum = torch.tensor(momentum, dtype=torch.float64)
    return _ops.batch_norm_running_stats(save_mean, save_invstd, running_mean, running_var, momentum, eps, count)
