"""The "python" backend: batch norm in plain torch ops, backward written by hand.

Every function here follows the formulas of docs/derivation.md on the (M, C)
view of an (N, C, *) input: reductions run over every dimension except the
channel one, and per-channel vectors are broadcast back with a (1, C, 1, ...)
view. Nothing relies on autograd through the forward: `backward` spells out
db, dw and dx. The backward is itself written in differentiable torch ops, so
autograd can differentiate it once more (double backward, `gradgradcheck`).

The public functions form the backend interface of docs/architecture.md;
`ops.py` provides the same functions over the compiled kernels.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _func, _layout

__all__ = [
    "stats_dtype",
    "suggest_memory_format",
    "train_forward",
    "eval_forward",
    "collect_stats",
    "merge_stats",
    "elementwise",
    "backward_reduce",
    "backward_elementwise",
    "running_stats",
    "blend_running_stats",
    "differentiable_backward",
]


# ---------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------

def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel statistics for an input dtype.

    float32 input keeps float64 statistics: at an offset of 1e6 a float32 mean
    is off by up to half an ulp (0.03), which would show in every output.
    """
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def suggest_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format an output of x's shape should have (as ATen picks it)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _reduce_dims(x: Tensor) -> list:
    """Every dimension but the channel one: the M of the (M, C) view."""
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a (C,) vector so that it broadcasts against x's (N, C, *) shape."""
    return v.view((1, -1) + (1,) * (x.dim() - 2))


def _count(x: Tensor) -> int:
    """M: how many values each channel has."""
    return x.numel() // x.size(1) if x.dim() > 1 and x.size(1) > 0 else 0


# ---------------------------------------------------------------------------
# The math, one function per formula
# ---------------------------------------------------------------------------

def _batch_stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """mean_j and invstd_j = 1/sqrt(var_j + eps), var by the stable two-pass form."""
    x_wide = x.to(stats_dtype(x.dtype))
    mean = x_wide.mean(_reduce_dims(x))
    xmu = x_wide - _per_channel(mean, x)
    var = (xmu * xmu).mean(_reduce_dims(x))
    return mean, torch.rsqrt(var + eps)


def _normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
    """y = (x - mean) * invstd * w + b, computed in the statistics dtype."""
    x_wide = x.to(mean.dtype)
    scale = invstd if weight is None else invstd * weight.to(mean.dtype)
    y = (x_wide - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(mean.dtype), x)
    return y.to(x.dtype)


def _grad_input(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                sum_dy: Tensor, sum_dy_xmu: Tensor, count, train: bool) -> Tensor:
    """dx = w * invstd * (dy - Σdy/M - (x - mean) * invstd² * Σ dy·(x - mean) / M)   (training)
       dx = w * invstd * dy                                                            (eval)
    """
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    dy_wide = dy.to(invstd.dtype)
    if not train:
        return (dy_wide * _per_channel(scale, x)).to(x.dtype)
    xmu = x.to(invstd.dtype) - _per_channel(mean, x)
    mean_dy = sum_dy / count
    mean_dy_xmu = sum_dy_xmu / count
    dx = dy_wide - _per_channel(mean_dy, x) - xmu * _per_channel(invstd * invstd * mean_dy_xmu, x)
    return (dx * _per_channel(scale, x)).to(x.dtype)


def _backward_sums(dy: Tensor, x: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    """Σ dy and Σ dy·(x - mean) per channel: db and dw/invstd."""
    dy_wide = dy.to(mean.dtype)
    xmu = x.to(mean.dtype) - _per_channel(mean, x)
    dims = _reduce_dims(x)
    return dy_wide.sum(dims), (dy_wide * xmu).sum(dims)


def differentiable_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                            save_mean: Tensor, save_invstd: Tensor, train: bool, eps: float):
    """(dx, dw, db) in differentiable torch ops, for double backward.

    In training the statistics are functions of the input; they are rebuilt
    from `input` here so that a second differentiation sees that dependence.
    In eval they are constants and the saved ones are used.
    """
    if train:
        save_mean, save_invstd = _batch_stats(input, eps)
    sum_dy, sum_dy_xmu = _backward_sums(grad_output, input, save_mean)
    grad_input = _grad_input(grad_output, input, weight, save_mean, save_invstd,
                             sum_dy, sum_dy_xmu, _count(input), train)
    if weight is None:
        return grad_input, None, None
    return (grad_input, (sum_dy_xmu * save_invstd).to(weight.dtype), sum_dy.to(weight.dtype))


def _backward(ctx, grad_output: Tensor, train: bool):
    """Shared backward of the training and eval Functions."""
    input, weight, mean, invstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: build the graph of the backward itself.
        return differentiable_backward(grad_output, input, weight, mean, invstd, train, ctx.eps)
    input = input.contiguous(memory_format=suggest_memory_format(input))
    grad_output = grad_output.contiguous(memory_format=suggest_memory_format(input))
    sum_dy, sum_dy_xmu = _backward_sums(grad_output, input, mean)
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _grad_input(grad_output, input, weight, mean, invstd,
                                 sum_dy, sum_dy_xmu, _count(input), train)
    grad_weight = grad_bias = None
    if weight is not None:
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        grad_bias = sum_dy.to(weight.dtype)
    return grad_input, grad_weight, grad_bias


def _eval_statistics(input: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(mean, invstd) in the statistics dtype, as new tensors (never the buffers themselves)."""
    sdtype = stats_dtype(input.dtype)
    mean = running_mean.detach().to(sdtype, copy=True)
    invstd = torch.rsqrt(running_var.detach().to(sdtype) + eps)
    return mean, invstd


class _TrainForwardCore(torch.autograd.Function):
    """Training mode: normalize with the batch's own statistics (forward and backward).

    _TrainForward adds the tangents and the vmap rule; this class without
    them is what torch.compile traces (Dynamo does not trace a custom jvp).
    """

    @staticmethod
    def forward(input, weight, bias, eps):
        x = input.contiguous(memory_format=suggest_memory_format(input))
        mean, invstd = _batch_stats(x, eps)
        output = _normalize(x, weight, bias, mean, invstd)
        return _layout.with_strides(output, _layout.output_strides(input, weight, bias)), mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, _bias, eps = inputs
        _output, mean, invstd = outputs
        # The original input (not a copy) is saved so that double backward
        # stays connected to it.
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        # Inputs without a tangent get None in jvp (not zeros), and no zero
        # gradients are made for save_mean/save_invstd.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        if grad_output is None:  # only save_mean/save_invstd were used
            return None, None, None, None
        grad_input, grad_weight, grad_bias = _backward(ctx, grad_output, train=True)
        return grad_input, grad_weight, (grad_bias if ctx.needs_input_grad[2] else None), None


class _TrainForward(_TrainForwardCore):
    """_TrainForwardCore for forward-mode AD and every torch.func transform too."""

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _eps_t):
        input, weight, mean, invstd = ctx.saved_tensors
        return _func.tangent(input, weight, mean, invstd, input_t, weight_t, bias_t, train=True), None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, eps):
        return _func.vmap_train_forward(_TrainForward.apply, info, in_dims, input, weight, bias, eps,
                                        **_func.PLAIN_TRAIN)


class _EvalForwardCore(torch.autograd.Function):
    """Eval mode: running statistics are constants, so dx = w * invstd * dy.

    The backward uses the statistics this forward used: copies are saved, so
    a later in-place update of the buffers (a training step) changes neither
    the result nor raises (torch.nn would use the updated buffers).
    """

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps):
        x = input.contiguous(memory_format=suggest_memory_format(input))
        mean, invstd = _eval_statistics(input, running_mean, running_var, eps)
        output = _normalize(x, weight, bias, mean, invstd)
        return _layout.with_strides(output, _layout.output_strides(input, weight, bias, running_mean, running_var,
                                                                   training=False))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _bias, running_mean, running_var, eps = inputs
        mean, invstd = _eval_statistics(input, running_mean, running_var, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight, mean, invstd)
        ctx.eps = eps
        # In jvp, None for inputs without a tangent: a running statistic
        # then carries one only when the caller gave it one.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:  # an undefined (zero) gradient: grads are not materialized
            return None, None, None, None, None, None
        grad_input, grad_weight, grad_bias = _backward(ctx, grad_output, train=False)
        return grad_input, grad_weight, (grad_bias if ctx.needs_input_grad[2] else None), None, None, None


class _EvalForward(_EvalForwardCore):
    """_EvalForwardCore for forward-mode AD and every torch.func transform too."""

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, _eps_t):
        input, weight, mean, invstd = ctx.saved_tensors
        if input_t is not None or weight_t is not None or bias_t is not None:
            _func.check_no_running_stat_tangents(running_mean_t, running_var_t)
        return _func.tangent(input, weight, mean, invstd, input_t, weight_t, bias_t, train=False)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps):
        return _func.vmap_eval_forward(_EvalForward.apply, info, in_dims, input, weight, bias, running_mean,
                                       running_var, eps, **_func.PLAIN_EVAL)


# ---------------------------------------------------------------------------
# The backend interface (docs/architecture.md)
# ---------------------------------------------------------------------------

def train_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """(output, save_mean, save_invstd) with batch statistics; differentiable."""
    if torch.compiler.is_compiling():
        return _TrainForwardCore.apply(input, weight, bias, eps)
    return _TrainForward.apply(input, weight, bias, eps)


def eval_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """output with the given (running) statistics; differentiable in input, weight, bias."""
    if torch.compiler.is_compiling():
        return _EvalForwardCore.apply(input, weight, bias, running_mean, running_var, eps)
    return _EvalForward.apply(input, weight, bias, running_mean, running_var, eps)


def collect_stats(input: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel (mean, m2, count) with m2 = Σ (x - mean)²; empty input gives zeros."""
    x = input.to(stats_dtype(input.dtype))
    channels = input.size(1)
    count = _count(input)
    # The count in float64 for every input: float32 (the statistics dtype of
    # half inputs) would round counts above 2^24.
    counts = torch.full((channels,), float(count), dtype=torch.float64, device=input.device)
    if count == 0:
        zeros = x.new_zeros(channels)
        return zeros, zeros.clone(), counts
    mean = x.mean(_reduce_dims(input))
    xmu = x - _per_channel(mean, input)
    m2 = (xmu * xmu).sum(_reduce_dims(input))
    return mean, m2, counts


def _welford_merge(a, b):
    """Chan's merge of two (mean, m2, count) summaries; mirrors csrc/welford.h.

    An empty side leaves the other as it is (delta² · 0 would be NaN where
    delta² overflows the float32 statistics of half inputs). The shares are
    in the statistics' dtype, the counts keep theirs (float64: exact).
    """
    mean_a, m2_a, n_a = a
    mean_b, m2_b, n_b = b
    n = n_a + n_b
    b_share = (n_b / n.clamp_min(1)).to(mean_a.dtype)
    delta = mean_b - mean_a
    mean = mean_a + delta * b_share
    m2 = m2_a + m2_b + delta * delta * n_a.to(mean_a.dtype) * b_share
    a_empty, b_empty = n_a == 0, n_b == 0
    mean = torch.where(b_empty, mean_a, torch.where(a_empty, mean_b, mean))
    m2 = torch.where(b_empty, m2_a, torch.where(a_empty, m2_b, m2))
    return mean, m2, n


def merge_stats(mean: Tensor, m2: Tensor, count: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Fold G groups of statistics, (G, C) each, into one (C,) summary, in group order."""
    state = (mean[0], m2[0], count[0])
    for g in range(1, mean.size(0)):
        state = _welford_merge(state, (mean[g], m2[g], count[g]))
    return state


def elementwise(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, invstd: Tensor) -> Tensor:
    """output = (x - mean) * invstd * w + b, in the input's memory format."""
    x = input.contiguous(memory_format=suggest_memory_format(input))
    return _normalize(x, weight, bias, mean, invstd)


def backward_reduce(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """(Σ dy, Σ dy·(x - mean)) per channel."""
    return _backward_sums(grad_output, input, mean)


def backward_elementwise(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                         weight: Optional[Tensor], sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    """dx from the (possibly all-reduced) sums; count is the global M as a tensor."""
    x = input.contiguous(memory_format=suggest_memory_format(input))
    dy = grad_output.contiguous(memory_format=suggest_memory_format(input))
    return _grad_input(dy, x, weight, mean, invstd, sum_dy, sum_dy_xmu, count.to(invstd.dtype), True)


def blend_running_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                        count, momentum) -> Tuple[Tensor, Tensor]:
    """(new running_mean, new running_var): f·batch + (1 - f)·running, the variance unbiased (var·M/(M-1)).

    batch_var is the biased variance of M = count values; count and momentum
    f may be numbers or tensors (no .item(), so torch.compile traces a tensor
    momentum). Computed in float64 with the operations in the order of
    csrc/running_stats.h, so both backends store the same values.
    """
    f = momentum.to(torch.float64) if isinstance(momentum, Tensor) else momentum
    unbiased = batch_var.to(torch.float64) * (count / (count - 1))
    new_mean = f * batch_mean.to(torch.float64) + (1 - f) * running_mean.to(torch.float64)
    new_var = f * unbiased + (1 - f) * running_var.to(torch.float64)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def running_stats(save_mean: Tensor, save_invstd: Tensor, running_mean: Tensor, running_var: Tensor,
                  momentum, eps: float, count: int) -> Tuple[Tensor, Tensor]:
    """The running statistics after a training batch, from train_forward's save_mean/save_invstd.

    The biased batch variance is rebuilt as 1/invstd² - eps (clamped at 0).
    Returns new tensors; the caller copies them into the buffers.
    """
    _func.check_running_stats_batched(save_mean, running_mean, running_var)
    with torch.no_grad():
        invstd = save_invstd.to(torch.float64)
        batch_var = (1.0 / (invstd * invstd) - eps).clamp_min(0)
        return blend_running_stats(running_mean, running_var, save_mean, batch_var, count, momentum)
