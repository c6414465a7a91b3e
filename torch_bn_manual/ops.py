"""The "cpp" backend: torch.library glue over the compiled ops.

The ops are declared once in csrc/ops.cpp (namespace ``torch_bn_manual``) and
implemented per device in csrc/cpu/ and csrc/cuda/. This module adds what
the C++ side leaves to Python:

- a fake (meta) implementation of every op, for torch.compile and
  torch.library.opcheck: output shapes, dtypes and memory formats only;
- the derivative of batch_norm_backward, which double backward needs. The
  two forward ops have their autograd kernels in C++ (csrc/autograd.cpp, no
  Python on the training path): their first backward runs batch_norm_backward
  below autograd; when the graph of the backward itself is wanted
  (create_graph=True, e.g. gradgradcheck) they call it through autograd, and
  its derivative here differentiates _python.differentiable_backward, the
  same formula in torch ops. The other ops have no derivative: their outputs
  never require grad;
- the torch.func / forward-mode AD path: under a transform or a dual level
  the forward ops run inside Python Functions (setup_context, jvp, vmap) that
  call the same compiled ops, since functorch cannot see through the C++
  autograd kernels (docs/architecture.md, "Which path runs");

and the backend interface of docs/architecture.md, with the signatures of
_python.py, as thin wrappers over ``torch.ops.torch_bn_manual``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._cpu_check import check_cpu

check_cpu()  # before the library loads: a build for newer CPUs would die of SIGILL
try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as error:
    raise ImportError(
        f"torch_bn_manual._C, the compiled extension, could not be loaded ({error}); "
        "build it with `pip install --no-build-isolation -e .` in the project root") from error

from . import _func, _layout, _python

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


def _strided_like(input: Tensor, strides) -> Tensor:
    return torch.empty_strided(input.shape, strides, dtype=input.dtype, device=input.device)


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
    output = _strided_like(input, _layout.output_strides(input, weight, bias))
    return output, _per_channel(input, sdt), _per_channel(input, sdt)


@torch.library.register_fake(_LIB + "batch_norm_eval_forward")
def _eval_forward_fake(input, weight, bias, running_mean, running_var, eps):
    _check_input(input)
    return _strided_like(input, _layout.output_strides(input, weight, bias, running_mean, running_var,
                                                       training=False))


@torch.library.register_fake(_LIB + "batch_norm_backward")
def _backward_fake(grad_output, input, weight, save_mean, save_invstd, train, eps, output_mask):
    _check_input(input)
    grad_input = (_strided_like(input, _layout.grad_input_strides(grad_output, input)) if output_mask[0]
                  else input.new_empty((0,)))
    wdtype = input.dtype if weight is None else weight.dtype
    channels = input.shape[1]
    grad_weight = input.new_empty((channels if weight is not None and output_mask[1] else 0,), dtype=wdtype)
    grad_bias = input.new_empty((channels if weight is not None and output_mask[2] else 0,), dtype=wdtype)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake(_LIB + "batch_norm_collect_stats")
def _collect_stats_fake(input):
    _check_input(input)
    sdt = _stats_dtype(input.dtype)
    return _per_channel(input, sdt), _per_channel(input, sdt), _per_channel(input, torch.float64)  # count: exact


@torch.library.register_fake(_LIB + "batch_norm_merge_stats")
def _merge_stats_fake(mean, m2, count):
    torch._check(mean.dim() == 2, lambda: f"mean must be (G, C), got {tuple(mean.shape)}")
    channels = mean.shape[1]
    return mean.new_empty((channels,)), mean.new_empty((channels,)), mean.new_empty((channels,), dtype=torch.float64)


@torch.library.register_fake(_LIB + "batch_norm_elementwise")
def _elementwise_fake(input, weight, bias, mean, invstd):
    _check_input(input)
    if input.device.type == "cuda":  # as nn's batch_norm_elemt: empty_like
        return _strided_like(input, _layout.output_strides(input))
    return _strided_like(input, _layout.output_strides(input, weight, bias))


@torch.library.register_fake(_LIB + "batch_norm_backward_reduce")
def _backward_reduce_fake(grad_output, input, mean, invstd):
    _check_input(input)
    sdt = _stats_dtype(input.dtype)
    return _per_channel(input, sdt), _per_channel(input, sdt)


@torch.library.register_fake(_LIB + "batch_norm_backward_elementwise")
def _backward_elementwise_fake(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    _check_input(input)
    return _strided_like(input, _layout.grad_input_strides(grad_output, input))


@torch.library.register_fake(_LIB + "batch_norm_running_stats")
def _running_stats_fake(save_mean, save_invstd, running_mean, running_var, momentum, eps, count):
    return torch.empty_like(running_mean), torch.empty_like(running_var)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------

def _backward_setup_context(ctx, inputs, output):
    grad_output, input, weight, save_mean, save_invstd, train, eps, output_mask = inputs
    ctx.save_for_backward(grad_output, input, weight, save_mean, save_invstd)
    ctx.train, ctx.eps, ctx.output_mask = train, eps, output_mask


def _vector_jacobian(function, primals, grad_grads, asked, needs, create_graph):
    """Σ gg·∂output/∂primal over the asked outputs of function(*primals), for each primal that needs it.

    The double backward of both backward ops. The derivatives are partial:
    grad_output usually depends on the input itself (y³ → dy = 3y²), and that
    path is the outer engine's to follow, so torch.func.vjp differentiates at
    a level of its own instead of torch.autograd.grad walking (and freeing) the
    primals' histories. With create_graph=True the results stay differentiable
    in the primals. Outputs that are absent or met by an empty gg contribute
    nothing; None where a primal is not needed or absent.
    """
    wanted = [i for i, (p, need) in enumerate(zip(primals, needs)) if need and p is not None]
    kept = [k for k, (gg, a) in enumerate(zip(grad_grads, asked)) if a and gg is not None and gg.numel() > 0]
    if not wanted or not kept:
        return (None,) * len(primals)

    def asked_outputs(*free):
        args = list(primals)
        for i, value in zip(wanted, free):
            args[i] = value
        outputs = function(*args)
        return tuple(outputs[k] if outputs[k] is not None else torch.zeros_like(grad_grads[k]) for k in kept)

    with torch.enable_grad() if create_graph else torch.no_grad():
        _, vjp = torch.func.vjp(asked_outputs, *(primals[i] for i in wanted))
        grads = vjp(tuple(grad_grads[k] for k in kept))
    result = [None] * len(primals)
    for i, g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


def _double_backward(ctx, gg_input, gg_weight, gg_bias):
    """The derivative of batch_norm_backward with respect to grad_output, input and weight.

    The vector-Jacobian product of _python.differentiable_backward, the same
    formula in torch ops. In training it rebuilds the statistics from `input`,
    so their dependence on the input is part of the derivative; save_mean and
    save_invstd are constants for it (as outputs of the forward they carry no
    gradient). With create_graph=True the result is differentiable once more.
    """
    grad_output, input, weight, mean, invstd = ctx.saved_tensors

    def backward(grad_output, input, weight):
        return _python.differentiable_backward(grad_output, input, weight, mean, invstd, ctx.train, ctx.eps)

    grads = _vector_jacobian(backward, (grad_output, input, weight), (gg_input, gg_weight, gg_bias),
                             ctx.output_mask, ctx.needs_input_grad[:3], torch.is_grad_enabled())
    return grads + (None,) * 5


# The two forward ops have their autograd kernels in C++ (csrc/autograd.cpp):
# the first backward calls batch_norm_backward below autograd; with
# create_graph=True it calls it through autograd, which is this derivative.
torch.library.register_autograd(_LIB + "batch_norm_backward", _double_backward,
                                setup_context=_backward_setup_context)


# vmap rules: a vmapped batch of B problems runs as one with B·C channels
# (_func.py). Used by the torch.func path below: its backward under
# vmap(grad(...)) and its forward-mode tangents under jacfwd.
torch.library.register_vmap(_LIB + "batch_norm_backward", _func.channel_fold_rule(
    _ops.batch_norm_backward, full=(0, 1), per_channel=(2, 3, 4), full_outputs=(0,), channel_outputs=(1, 2)))
torch.library.register_vmap(_LIB + "batch_norm_elementwise", _func.channel_fold_rule(
    _ops.batch_norm_elementwise, full=(0,), per_channel=(1, 2, 3, 4), full_outputs=(0,), channel_outputs=()))


# ---------------------------------------------------------------------------
# torch.func and forward-mode AD (docs/architecture.md, "Which path runs")
# ---------------------------------------------------------------------------
# functorch cannot see through the C++ autograd kernels of the forward ops, so
# calls made under a torch.func transform or a forward-AD dual level take
# these Python Functions instead; their forward, backward and tangents call
# the same compiled ops. Plain eager calls never come here.

def _output_tangent(input, weight, mean, invstd, eps, input_t, weight_t, bias_t, train):
    """ẏ from the compiled ops: batch_norm_backward with ẋ in place of dy gives the
    w·invstd·(...) part, batch_norm_elementwise the ẇ·x̂ + ḃ part."""
    result = None
    if input_t is not None:
        mask = [True, False, False]
        result = _ops.batch_norm_backward(input_t, input, weight, mean, invstd, train, eps, mask)[0]
    if weight_t is not None or bias_t is not None:
        if weight_t is None:
            weight_t = torch.zeros_like(bias_t)
        if bias_t is None:
            bias_t = torch.zeros_like(weight_t)
        affine_t = _ops.batch_norm_elementwise(input, weight_t, bias_t, mean, invstd)
        result = affine_t if result is None else result + affine_t
    return torch.zeros_like(input) if result is None else result


def _grads(ctx, grad_output, train):
    """(grad_input, grad_weight, grad_bias) of the saved forward.

    The compiled batch_norm_backward, unless the graph of the backward is
    being built (create_graph=True, which torch.func's grad transforms always
    ask for): then the same formula in differentiable torch ops, the one the
    double backward of batch_norm_backward differentiates, which every
    transform can go through again.
    """
    input, weight, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], weight is not None and needs[1], weight is not None and needs[2]]
    if torch.is_grad_enabled():
        grads = _python.differentiable_backward(grad_output, input, weight, mean, invstd, train, ctx.eps)
        return tuple(g if need else None for g, need in zip(grads, mask))
    grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(grad_output, input, weight, mean, invstd, train,
                                                                  ctx.eps, mask)
    return (grad_input if mask[0] else None, grad_weight if mask[1] else None, grad_bias if mask[2] else None)


class _TrainForwardFunc(torch.autograd.Function):
    """batch_norm_train_forward for torch.func transforms and forward-mode AD."""

    @staticmethod
    def forward(input, weight, bias, eps):
        return _ops.batch_norm_train_forward(input, weight, bias, eps)

    # What it saves, and why, is the python backend's (the same tensors).
    setup_context = staticmethod(_python._TrainForwardCore.setup_context)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        if grad_output is None:
            return None, None, None, None
        return _grads(ctx, grad_output, train=True) + (None,)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _eps_t):
        input, weight, mean, invstd = ctx.saved_tensors
        return _output_tangent(input, weight, mean, invstd, ctx.eps, input_t, weight_t, bias_t, True), None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, eps):
        return _func.vmap_train_forward(_TrainForwardFunc.apply, info, in_dims, input, weight, bias, eps,
                                        **_func.PLAIN_TRAIN)


class _EvalForwardFunc(torch.autograd.Function):
    """batch_norm_eval_forward for torch.func transforms and forward-mode AD."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps):
        return _ops.batch_norm_eval_forward(input, weight, bias, running_mean, running_var, eps)

    # The statistics of this call as new tensors, as the python backend saves
    # them: a later update of the buffers leaves this output's gradient alone.
    setup_context = staticmethod(_python._EvalForwardCore.setup_context)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:  # an undefined (zero) gradient: grads are not materialized
            return (None,) * 6
        return _grads(ctx, grad_output, train=False) + (None, None, None)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, _eps_t):
        input, weight, mean, invstd = ctx.saved_tensors
        if input_t is not None or weight_t is not None or bias_t is not None:
            _func.check_no_running_stat_tangents(running_mean_t, running_var_t)
        return _output_tangent(input, weight, mean, invstd, ctx.eps, input_t, weight_t, bias_t, False)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps):
        return _func.vmap_eval_forward(_EvalForwardFunc.apply, info, in_dims, input, weight, bias, running_mean,
                                       running_var, eps, **_func.PLAIN_EVAL)


# ---------------------------------------------------------------------------
# The backend interface (docs/architecture.md)
# ---------------------------------------------------------------------------

def train_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd) with batch statistics; differentiable."""
    if _func.transforms_active():
        return _TrainForwardFunc.apply(input, weight, bias, eps)
    return _ops.batch_norm_train_forward(input, weight, bias, eps)


def eval_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """output with the given (running) statistics; differentiable in input, weight, bias."""
    if _func.transforms_active():
        return _EvalForwardFunc.apply(input, weight, bias, running_mean, running_var, eps)
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
    if _func.transforms_active():  # the same formula in torch ops, which every transform takes
        return _python.running_stats(save_mean, save_invstd, running_mean, running_var, momentum, eps, count)
    if not isinstance(momentum, Tensor):
        momentum = torch.scalar_tensor(momentum, dtype=torch.float64)  # half the cost of torch.tensor
    return _ops.batch_norm_running_stats(save_mean, save_invstd, running_mean, running_var, momentum, eps, count)


# ---------------------------------------------------------------------------
# The fused layers: act(BN(x) + residual) (csrc/ops.cpp, csrc/autograd_act.cpp)
# ---------------------------------------------------------------------------
# Separate from the plain ops above; activation.py calls these through
# act_train_forward/act_eval_forward where ACT_DEVICES has the device.

from . import _python_act  # noqa: E402

ACT_DEVICES = frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                        if torch._C._dispatch_has_kernel_for_dispatch_key(
                            _LIB + "batch_norm_act_train_forward", key))


@torch.library.register_fake(_LIB + "batch_norm_act_train_forward")
def _act_train_forward_fake(input, weight, bias, residual, negative_slope, eps):
    _check_input(input)
    sdt = _stats_dtype(input.dtype)
    output = _strided_like(input, _layout.output_strides(input, weight, bias))
    return output, _per_channel(input, sdt), _per_channel(input, sdt)


@torch.library.register_fake(_LIB + "batch_norm_act_eval_forward")
def _act_eval_forward_fake(input, weight, bias, residual, running_mean, running_var, negative_slope, eps):
    _check_input(input)
    return _strided_like(input, _layout.output_strides(input, weight, bias, running_mean, running_var,
                                                       training=False))


@torch.library.register_fake(_LIB + "batch_norm_act_backward")
def _act_backward_fake(grad_output, output, input, weight, save_mean, save_invstd, train, negative_slope, eps,
                       output_mask):
    grad_input, grad_weight, grad_bias = _backward_fake(grad_output, input, weight, save_mean, save_invstd, train,
                                                        eps, output_mask[:3])
    grad_residual = (_strided_like(input, _layout.grad_input_strides(grad_output, input)) if output_mask[3]
                     else input.new_empty((0,)))
    return grad_input, grad_weight, grad_bias, grad_residual


def _act_backward_setup_context(ctx, inputs, output):
    grad_output, out, input, weight, save_mean, save_invstd, train, negative_slope, eps, output_mask = inputs
    ctx.save_for_backward(grad_output, out, input, weight, save_mean, save_invstd)
    ctx.train, ctx.slope, ctx.eps, ctx.output_mask = train, negative_slope, eps, output_mask


def _act_double_backward(ctx, gg_input, gg_weight, gg_bias, gg_residual):
    """The derivative of batch_norm_act_backward in grad_output, input and weight.

    The vector-Jacobian product of the python backend's formula: dt =
    do·act'(o) with the mask constant (away from the kink), then
    _python.differentiable_backward of dt; dresidual = dt. The output o
    carries no derivative here.
    """
    grad_output, out, input, weight, mean, invstd = ctx.saved_tensors

    def backward(grad_output, input, weight):
        dt = _python_act.activation_grad(grad_output.to(mean.dtype), out, ctx.slope)
        return _python.differentiable_backward(dt, input, weight, mean, invstd, ctx.train, ctx.eps) + (dt,)

    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    d_grad_output, d_input, d_weight = _vector_jacobian(
        backward, (grad_output, input, weight), (gg_input, gg_weight, gg_bias, gg_residual), ctx.output_mask,
        needs, torch.is_grad_enabled())
    return (d_grad_output, None, d_input, d_weight) + (None,) * 6


torch.library.register_autograd(_LIB + "batch_norm_act_backward", _act_double_backward,
                                setup_context=_act_backward_setup_context)

# As batch_norm_backward's: for a first-order backward computed under vmap
# (the torch.func path's backward when no graph of it is built, e.g. jacrev under no_grad).
torch.library.register_vmap(_LIB + "batch_norm_act_backward", _func.channel_fold_rule(
    _ops.batch_norm_act_backward, full=(0, 1, 2), per_channel=(3, 4, 5), full_outputs=(0, 3),
    channel_outputs=(1, 2)))


# torch.func and forward-mode AD for the fused ops: as _TrainForwardFunc and
# _EvalForwardFunc above, with the python backend's setup_context (the same
# saved tensors), the compiled backward below autograd, and tangents from the
# plain ops (_output_tangent) through the activation (_python_act).

def _act_grads(ctx, grad_output, train):
    """(grad_input, grad_weight, grad_bias, grad_residual) of the saved fused forward.

    The compiled batch_norm_act_backward, unless the graph of the backward is
    being built (create_graph=True, as torch.func's grad transforms ask):
    then the python backend's backward, in differentiable torch ops.
    """
    if torch.is_grad_enabled():
        return _python_act._backward(ctx, grad_output, train)
    input, weight, mean, invstd, output = ctx.saved_tensors
    needs = ctx.needs_input_grad
    slope = ctx.slope
    mask = [needs[0], weight is not None and needs[1], weight is not None and needs[2],
            slope is not None and needs[3]]
    # Identity saves no output and the op does not read it then: the input stands in.
    grad_input, grad_weight, grad_bias, grad_residual = _ops.batch_norm_act_backward(
        grad_output, input if output is None else output, input, weight, mean, invstd, train, slope, ctx.eps, mask)
    if slope is None:
        grad_residual = grad_output  # dz = dy
    return tuple(g if need else None for g, need in zip((grad_input, grad_weight, grad_bias, grad_residual),
                                                          (mask[0], mask[1], mask[2], needs[3])))


def _act_output_tangent(ctx, input_t, weight_t, bias_t, residual_t, train):
    input, weight, mean, invstd, output = ctx.saved_tensors
    bn_t = _output_tangent(input, weight, mean, invstd, ctx.eps, input_t, weight_t, bias_t, train)
    return _python_act.activation_tangent(bn_t, residual_t, output, ctx.slope)


class _ActTrainForwardFunc(torch.autograd.Function):
    """batch_norm_act_train_forward for torch.func transforms and forward-mode AD."""

    @staticmethod
    def forward(input, weight, bias, residual, slope, eps):
        return _ops.batch_norm_act_train_forward(input, weight, bias, residual, slope, eps)

    setup_context = staticmethod(_python_act._TrainForwardActCore.setup_context)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        if grad_output is None:
            return (None,) * 6
        return _act_grads(ctx, grad_output, train=True) + (None, None)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, residual_t, _slope_t, _eps_t):
        return _act_output_tangent(ctx, input_t, weight_t, bias_t, residual_t, True), None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, residual, slope, eps):
        return _func.vmap_train_forward(_ActTrainForwardFunc.apply, info, in_dims, input, weight, bias, residual,
                                        slope, eps, **_func.FUSED_TRAIN)


class _ActEvalForwardFunc(torch.autograd.Function):
    """batch_norm_act_eval_forward for torch.func transforms and forward-mode AD."""

    @staticmethod
    def forward(input, weight, bias, residual, running_mean, running_var, slope, eps):
        return _ops.batch_norm_act_eval_forward(input, weight, bias, residual, running_mean, running_var, slope, eps)

    # The statistics of this call as new tensors, as the python backend saves them.
    setup_context = staticmethod(_python_act._EvalForwardActCore.setup_context)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:
            return (None,) * 8
        return _act_grads(ctx, grad_output, train=False) + (None,) * 4

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, residual_t, running_mean_t, running_var_t, _slope_t, _eps_t):
        if input_t is not None or weight_t is not None or bias_t is not None:
            _func.check_no_running_stat_tangents(running_mean_t, running_var_t)
        return _act_output_tangent(ctx, input_t, weight_t, bias_t, residual_t, False)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, residual, running_mean, running_var, slope, eps):
        return _func.vmap_eval_forward(_ActEvalForwardFunc.apply, info, in_dims, input, weight, bias, residual,
                                       running_mean, running_var, slope, eps, **_func.FUSED_EVAL)


def act_train_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                      slope: Optional[float], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(act(BN(input) + residual), save_mean, save_invstd) with batch statistics; differentiable."""
    if _func.transforms_active():
        return _ActTrainForwardFunc.apply(input, weight, bias, residual, slope, eps)
    return _ops.batch_norm_act_train_forward(input, weight, bias, residual, slope, eps)


def act_eval_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                     running_mean: Tensor, running_var: Tensor, slope: Optional[float], eps: float) -> Tensor:
    """act(BN(input) + residual) with the given (running) statistics; differentiable."""
    if _func.transforms_active():
        return _ActEvalForwardFunc.apply(input, weight, bias, residual, running_mean, running_var, slope, eps)
    return _ops.batch_norm_act_eval_forward(input, weight, bias, residual, running_mean, running_var, slope, eps)
