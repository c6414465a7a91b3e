"""The "python" backend of the fused layer: act(BN(x) + residual), backward by hand.

The batch norm arithmetic is _python.py's (same statistics, same formulas);
this file adds the two elementwise steps around it (docs/derivation.md,
section 10):

    forward   o  = act(y + z)             y = BN(x) kept in the statistics dtype,
                                          rounded once, at the end
    backward  dt = do · act'(o)           act' read from the output o
              dz = dt, then BN backward of dt
    tangent   ȯ = act'(o) · (ẏ + ż)       ẏ: the batch norm's tangent (_func.tangent)

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

from . import _func
from ._python import (_backward_sums, _batch_stats, _count, _eval_statistics, _grad_input, _per_channel,
                      differentiable_backward, suggest_memory_format)
# act(t), defined once for eager and TorchScript.
from .scripting import activate

__all__ = ["act_train_forward", "act_eval_forward", "activate", "activation_grad", "activation_tangent"]


def activation_grad(grad_output: Tensor, output: Optional[Tensor], slope: Optional[float]) -> Tensor:
    """dt = do · act'(t), with act'(t) read from the output: 1 where output > 0, slope elsewhere.
    Relu (slope 0) as threshold_backward: 0 where output <= 0 (do·0 would give -0, and NaN for inf)."""
    if slope is None:
        return grad_output
    if slope == 0.0:
        return torch.where(output.detach() <= 0, torch.zeros((), dtype=grad_output.dtype), grad_output)
    return torch.where(output.detach() > 0, grad_output, grad_output * slope)


def activation_tangent(bn_tangent: Tensor, residual_t: Optional[Tensor], output: Optional[Tensor],
                       slope: Optional[float]) -> Tensor:
    """ȯ = act'(t)·(ẏ + ż) from the batch norm's tangent ẏ: the chain rule of o = act(y + z), act' from o."""
    t_dot = bn_tangent if residual_t is None else bn_tangent + residual_t
    return activation_grad(t_dot, output, slope)


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
    # The output only when the activation needs it (identity: dt = do); the
    # same tensors serve the backward and the tangents (jvp).
    saved = (input, weight, mean, invstd, output if slope is not None else None)
    ctx.save_for_backward(*saved)
    ctx.save_for_forward(*saved)
    ctx.slope, ctx.eps = slope, eps
    # Inputs without a tangent get None in jvp (not zeros), and no zero
    # gradients are made for outputs that were not used.
    ctx.set_materialize_grads(False)


class _TrainForwardActCore(torch.autograd.Function):
    """Training mode: batch statistics, then normalize, add and activate in one pass.

    _TrainForwardAct adds the tangents and the vmap rule; this class without
    them is what torch.compile traces (as _python._TrainForwardCore).
    """

    @staticmethod
    def forward(input, weight, bias, residual, slope, eps):
        x = input.contiguous(memory_format=suggest_memory_format(input))
        mean, invstd = _batch_stats(x, eps)
        return _normalize_add_act(x, weight, bias, mean, invstd, residual, slope), mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, _bias, _residual, slope, eps = inputs
        output, mean, invstd = outputs
        _save(ctx, input, weight, mean, invstd, output, slope, eps)
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        if grad_output is None:  # only save_mean/save_invstd were used
            return (None,) * 6
        return _backward(ctx, grad_output, train=True) + (None, None)


class _TrainForwardAct(_TrainForwardActCore):
    """_TrainForwardActCore for forward-mode AD and every torch.func transform too."""

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, residual_t, _slope_t, _eps_t):
        input, weight, mean, invstd, output = ctx.saved_tensors
        bn_t = _func.tangent(input, weight, mean, invstd, input_t, weight_t, bias_t, train=True)
        return activation_tangent(bn_t, residual_t, output, ctx.slope), None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, residual, slope, eps):
        return _func.vmap_train_forward(_TrainForwardAct.apply, info, in_dims, input, weight, bias, residual, slope,
                                        eps, **_func.FUSED_TRAIN)


class _EvalForwardActCore(torch.autograd.Function):
    """Eval mode: the running statistics are constants.

    The statistics are saved as new tensors (_python._eval_statistics), so a
    training step that updates the buffers before this output's backward
    changes neither its gradient nor raises (as _python._EvalForwardCore).
    """

    @staticmethod
    def forward(input, weight, bias, residual, running_mean, running_var, slope, eps):
        x = input.contiguous(memory_format=suggest_memory_format(input))
        mean, invstd = _eval_statistics(input, running_mean, running_var, eps)
        return _normalize_add_act(x, weight, bias, mean, invstd, residual, slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _bias, _residual, running_mean, running_var, slope, eps = inputs
        mean, invstd = _eval_statistics(input, running_mean, running_var, eps)
        _save(ctx, input, weight, mean, invstd, output, slope, eps)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:  # an undefined (zero) gradient: grads are not materialized
            return (None,) * 8
        return _backward(ctx, grad_output, train=False) + (None,) * 4


class _EvalForwardAct(_EvalForwardActCore):
    """_EvalForwardActCore for forward-mode AD and every torch.func transform too."""

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, residual_t, running_mean_t, running_var_t, _slope_t, _eps_t):
        input, weight, mean, invstd, output = ctx.saved_tensors
        if input_t is not None or weight_t is not None or bias_t is not None:  # as nn's batch norm, then its add
            _func.check_no_running_stat_tangents(running_mean_t, running_var_t)
        bn_t = _func.tangent(input, weight, mean, invstd, input_t, weight_t, bias_t, train=False)
        return activation_tangent(bn_t, residual_t, output, ctx.slope)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, residual, running_mean, running_var, slope, eps):
        return _func.vmap_eval_forward(_EvalForwardAct.apply, info, in_dims, input, weight, bias, residual,
                                       running_mean, running_var, slope, eps, **_func.FUSED_EVAL)


def act_train_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                      slope: Optional[float], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(act(BN(input) + residual), save_mean, save_invstd) with batch statistics; differentiable."""
    if torch.compiler.is_compiling():
        return _TrainForwardActCore.apply(input, weight, bias, residual, slope, eps)
    return _TrainForwardAct.apply(input, weight, bias, residual, slope, eps)


def act_eval_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                     running_mean: Tensor, running_var: Tensor, slope: Optional[float], eps: float) -> Tensor:
    """act(BN(input) + residual) with the given (running) statistics; differentiable."""
    if torch.compiler.is_compiling():
        return _EvalForwardActCore.apply(input, weight, bias, residual, running_mean, running_var, slope, eps)
    return _EvalForwardAct.apply(input, weight, bias, residual, running_mean, running_var, slope, eps)
