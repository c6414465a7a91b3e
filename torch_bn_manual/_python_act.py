"""The "python" backend of the fused layer: act(BN(x) + residual), backward by hand.

The batch norm arithmetic is _python.py's (same statistics, same formulas);
this file adds the two elementwise steps around it (docs/derivation.md,
section 10):

    forward   o  = act(y + z)             y = BN(x) kept in the statistics dtype,
                                          rounded once, at the end
    backward  dt = do · act'(o)           act' read from the output o
              dz = dt, then BN backward of dt

act(t) = t for t > 0, slope·t otherwise; `slope` is None for identity, 0 for
relu. What the Function saves: the input and the output (the two full-size
tensors nn's BatchNorm + ReLU pair keeps), the per-channel statistics, and
the weight; the residual is not saved.

The interface mirrors _python.train_forward/eval_forward with two more
arguments, residual and slope; ops.py provides the same two functions over
the compiled kernels.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._python import (_backward_sums, _batch_stats, _count, _grad_input, _per_channel, differentiable_backward,
                      stats_dtype, suggest_memory_format)

__all__ = ["act_train_forward", "act_eval_forward", "activate", "activation_grad"]


def activate(t: Tensor, slope: Optional[float]) -> Tensor:
    """act(t): t where t > 0, slope·t elsewhere (NaN stays NaN); t itself for identity."""
    if slope is None:
        return t
    return torch.where(t > 0, t, t * slope)


def activation_grad(grad_output: Tensor, output: Optional[Tensor], slope: Optional[float]) -> Tensor:
    """dt = do · act'(t), with act'(t) read from the output: 1 where output > 0, slope elsewhere."""
    if slope is None:
        return grad_output
    return torch.where(output.detach() > 0, grad_output, grad_output * slope)


def _normalize_add_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                       residual: Optional[Tensor], slope: Optional[float]) -> Tensor:
    """act((x - mean)·invstd·w + b + z) in the statistics dtype, rounded to x's dtype once."""
    scale = invstd if weight is None else invstd * weight.to(mean.dtype)
    t = (x.to(mean.dtype) - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        t = t + _per_channel(bias.to(mean.dtype), x)
    if residual is not None:
        t = t + residual.to(mean.dtype)
    return activate(t, slope).to(x.dtype)


def _backward(ctx, grad_output: Tensor, train: bool):
    """(grad_input, grad_weight, grad_bias, grad_residual) of either Function."""
    input, weight, mean, invstd, output = ctx.saved_tensors
    needs_input, needs_weight, needs_bias, needs_residual = ctx.needs_input_grad[:4]
    wide = grad_output.to(mean.dtype)
    if torch.is_grad_enabled():
        # create_graph=True: the mask is a constant (away from the kink), the
        # batch norm backward is differentiated through its torch-op form.
        dt = activation_grad(wide, output, ctx.slope)
        grad_input, grad_weight, grad_bias = differentiable_backward(dt, input, weight, mean, invstd, train, ctx.eps)
    else:
        x = input.contiguous(memory_format=suggest_memory_format(input))
        dt = activation_grad(wide.contiguous(memory_format=suggest_memory_format(input)), output, ctx.slope)
        sum_dy, sum_dy_xmu = _backward_sums(dt, x, mean)
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            grad_input = _grad_input(dt, x, weight, mean, invstd, sum_dy, sum_dy_xmu, _count(x), train)
        if weight is not None:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
    grad_residual = dt.to(input.dtype) if needs_residual else None
    return (grad_input if needs_input else None, grad_weight if needs_weight else None,
            grad_bias if needs_bias else None, grad_residual)


def _save(ctx, input, weight, mean, invstd, output, slope, eps):
    # The output only when the activation needs it (identity: dt = do).
    ctx.save_for_backward(input, weight, mean, invstd, output if slope is not None else None)
    ctx.slope, ctx.eps = slope, eps


class _TrainForwardAct(torch.autograd.Function):
    """Training mode: batch statistics, then normalize, add and activate in one pass."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, slope, eps):
        x = input.contiguous(memory_format=suggest_memory_format(input))
        mean, invstd = _batch_stats(x, eps)
        output = _normalize_add_act(x, weight, bias, mean, invstd, residual, slope)
        _save(ctx, input, weight, mean, invstd, output, slope, eps)
        ctx.mark_non_differentiable(mean, invstd)
        return output, mean, invstd

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        return _backward(ctx, grad_output, train=True) + (None, None)


class _EvalForwardAct(torch.autograd.Function):
    """Eval mode: the running statistics are constants."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, slope, eps):
        x = input.contiguous(memory_format=suggest_memory_format(input))
        sdtype = stats_dtype(input.dtype)
        mean = running_mean.to(sdtype)
        invstd = torch.rsqrt(running_var.to(sdtype) + eps)
        output = _normalize_add_act(x, weight, bias, mean, invstd, residual, slope)
        _save(ctx, input, weight, mean, invstd, output, slope, eps)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output, train=False) + (None, None, None, None)


def act_train_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                      slope: Optional[float], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(act(BN(input) + residual), save_mean, save_invstd) with batch statistics; differentiable."""
    return _TrainForwardAct.apply(input, weight, bias, residual, slope, eps)


def act_eval_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                     running_mean: Tensor, running_var: Tensor, slope: Optional[float], eps: float) -> Tensor:
    """act(BN(input) + residual) with the given (running) statistics; differentiable."""
    return _EvalForwardAct.apply(input, weight, bias, residual, running_mean, running_var, slope, eps)
