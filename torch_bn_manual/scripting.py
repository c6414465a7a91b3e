"""Batch norm in TorchScript: what a scripted model runs in place of functional.py.

torch.jit.script cannot compile the eager path (the backend registry returns
Python modules, and the python backend is an autograd.Function), so the
modules' scripted forward calls the functions below instead. They compute
what the eager backends compute, in the same order of operations, for the
plain layers and for the fused ones (act(BN(x) + residual): a residual and
an activation slope, None for identity, 0 for relu):

- compiled ops ("cpp", and "auto" where the extension has kernels for the
  device): the same torch.ops.torch_bn_manual.* calls as ops.py, whose C++
  autograd kernels give the gradients, and the same running-stats op;
- torch ops ("python"): the formulas of _python.py (float64 statistics for
  float32 input, the two-pass variance, the running statistics rebuilt from
  invstd and blended in float64). TorchScript has no autograd.Function, so
  autograd differentiates these ops instead of running the hand-written
  backward: the same gradient, computed by autograd.

Every function here must stay TorchScript-compilable; the ones that call the
compiled ops are only compiled when the extension is loaded (the module
decides that with a constant, see modules.py).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["activate", "check_residual", "empty_batch", "ops_forward", "python_forward", "verify_batch_size"]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 statistics for float64/float32 input, float32 for half input (as _python.stats_dtype)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return torch.float64
    return torch.float32


def _dense(x: Tensor) -> Tensor:
    """x in the memory format ATen suggests for it (_python.suggest_memory_format): a no-op when dense."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _reduce_dims(x: Tensor) -> List[int]:
    dims = [0]
    for d in range(2, x.dim()):
        dims.append(d)
    return dims


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    shape = [1, -1]
    for _ in range(2, x.dim()):
        shape.append(1)
    return v.view(shape)


def verify_batch_size(input: Tensor) -> None:
    """Training needs more than one value per channel to compute a variance (eager and scripted)."""
    size = input.size()
    values_per_channel = size[0]
    for extent in size[2:]:
        values_per_channel *= extent
    if values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def empty_batch(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """nn's answer for an empty batch: an empty output still connected to weight and bias (eager and scripted)."""
    output = input.clone()
    if weight is not None:
        output = output * weight[0]
    if bias is not None:
        output = output + bias[0]
    return output


def _shape_text(shape: List[int]) -> str:
    """A shape as Python prints a tuple of it: (4, 3) or (5,)."""
    text = ", ".join([str(int(extent)) for extent in shape])  # int(): traced sizes are tensors
    if len(shape) == 1:
        text += ","
    return "(" + text + ")"


def _dtype_text(dtype: torch.dtype) -> str:
    """str(dtype) as eager Python prints it (in TorchScript a dtype prints as its number)."""
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
    names = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
             "complex64", "complex128"]
    for i in range(len(dtypes)):
        if dtype == dtypes[i]:
            return "torch." + names[i]
    return str(dtype)


def check_residual(residual: Tensor, input: Tensor) -> None:
    """The fused layers' residual is added value for value: the input's shape, dtype and device (eager and scripted)."""
    if residual.shape != input.shape:
        raise RuntimeError(f"residual must have the input's shape {_shape_text(input.shape)}, "
                           f"but got {_shape_text(residual.shape)}")
    if residual.dtype != input.dtype:
        raise RuntimeError(f"residual must have the input's dtype {_dtype_text(input.dtype)}, "
                           f"but got {_dtype_text(residual.dtype)}")
    if residual.device != input.device:
        raise RuntimeError(f"Tensor on device {residual.device} is not on the expected device {input.device}!")


def activate(t: Tensor, slope: Optional[float]) -> Tensor:
    """act(t): t where t > 0, slope·t elsewhere (NaN stays NaN); t itself for identity (eager and scripted).
    Relu (slope 0) is torch.relu: slope·t would give -0 where t < 0, and NaN for -inf."""
    if slope is None:
        return t
    if slope == 0.0:
        return torch.relu(t)
    return torch.where(t > 0, t, t * slope)


def _normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
               residual: Optional[Tensor], slope: Optional[float]) -> Tensor:
    """act((x - mean) * invstd * w + b + residual) in the statistics dtype, rounded once
    (_python._normalize; the fused layers: _python_act._normalize_add_act)."""
    x_wide = x.to(mean.dtype)
    scale = invstd
    if weight is not None:
        scale = invstd * weight.to(mean.dtype)
    y = (x_wide - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(mean.dtype), x)
    if residual is not None:
        y = y + residual.to(mean.dtype)
    return activate(y, slope).to(x.dtype)


def _blend(running_mean: Tensor, running_var: Tensor, save_mean: Tensor, save_invstd: Tensor,
           momentum: Tensor, eps: float, count: int) -> Tuple[Tensor, Tensor]:
    """_python.running_stats: the biased variance rebuilt from invstd, blended in float64."""
    invstd = save_invstd.to(torch.float64)
    batch_var = (1.0 / (invstd * invstd) - eps).clamp_min(0)
    f = momentum.to(torch.float64)
    unbiased = batch_var * (count / (count - 1))
    new_mean = f * save_mean.to(torch.float64) + (1 - f) * running_mean.to(torch.float64)
    new_var = f * unbiased + (1 - f) * running_var.to(torch.float64)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def _store(running_mean: Tensor, running_var: Tensor, new_mean: Tensor, new_var: Tensor) -> None:
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def python_forward(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: Tensor,
                   eps: float, residual: Optional[Tensor], slope: Optional[float]) -> Tensor:
    """The python backend's batch norm (fused: with the residual and activation) in differentiable torch ops."""
    x = _dense(input)
    sdtype = _stats_dtype(input.dtype)
    if not training:
        assert running_mean is not None and running_var is not None
        return _normalize(x, weight, bias, running_mean.to(sdtype), torch.rsqrt(running_var.to(sdtype) + eps),
                          residual, slope)
    x_wide = x.to(sdtype)
    dims = _reduce_dims(x)
    mean = x_wide.mean(dims)
    xmu = x_wide - _per_channel(mean, x)
    invstd = torch.rsqrt((xmu * xmu).mean(dims) + eps)
    output = _normalize(x, weight, bias, mean, invstd, residual, slope)
    if running_mean is not None and running_var is not None:
        count = input.numel() // input.size(1)
        new_mean, new_var = _blend(running_mean, running_var, mean.detach(), invstd.detach(), momentum, eps, count)
        _store(running_mean, running_var, new_mean, new_var)
    return output


def ops_forward(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: Tensor,
                eps: float, residual: Optional[Tensor], slope: Optional[float], fused: bool) -> Tensor:
    """The compiled ops, called as ops.py calls them: the plain ones, or the fused ones (fused=True)."""
    if not training:
        assert running_mean is not None and running_var is not None
        if fused:
            return torch.ops.torch_bn_manual.batch_norm_act_eval_forward(input, weight, bias, residual, running_mean,
                                                                         running_var, slope, eps)
        return torch.ops.torch_bn_manual.batch_norm_eval_forward(input, weight, bias, running_mean, running_var, eps)
    if fused:
        output, mean, invstd = torch.ops.torch_bn_manual.batch_norm_act_train_forward(input, weight, bias, residual,
                                                                                     slope, eps)
    else:
        output, mean, invstd = torch.ops.torch_bn_manual.batch_norm_train_forward(input, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        count = input.numel() // input.size(1)
        new_mean, new_var = torch.ops.torch_bn_manual.batch_norm_running_stats(
            mean, invstd, running_mean, running_var, momentum, eps, count)
        _store(running_mean, running_var, new_mean, new_var)
    return output
