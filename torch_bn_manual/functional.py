"""batch_norm(): the functional entry point, a drop-in for torch.nn.functional.batch_norm.

It does three things and leaves the arithmetic to a backend:
1. checks the arguments, raising the exception type and message that
   torch.nn.functional.batch_norm raises, before any state changes;
2. picks the backend (backends.get_backend);
3. updates the running statistics in training, with tensor ops only, so that
   torch.compile traces it (momentum may be a 0-d tensor: 1/num_batches_tracked).
"""
import contextlib
from typing import Optional, Union

import torch
from torch import Tensor
from torch.fx import Proxy

from . import _func, _python
from .backends import get_backend
from .export import aten_eval_batch_norm, capturing_standalone_graph
# nn's answer for an empty batch: an empty output still connected to weight and bias.
from .scripting import empty_batch as _empty_batch
from .scripting import verify_batch_size as _verify_batch_size

__all__ = ["batch_norm", "check_batch_norm_inputs", "record_call", "update_running_stats"]

_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_REDUCED_FLOATING = (torch.float16, torch.bfloat16)
# ATen's names for dtypes, as they appear in its "not implemented for" errors.
_ATEN_DTYPE_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
    torch.int64: "Long", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.complex32: "ComplexHalf",
}


def _check_mixed_dtypes(input: Tensor, parameters) -> None:
    """As ATen on CPU: parameters share the input's dtype, or are float32 for a half input."""
    defined = [p for p in parameters if p is not None]
    if not defined or defined[0].dtype == input.dtype:
        return
    for p in defined:
        if p.dtype != torch.float32:
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    if input.dtype not in _REDUCED_FLOATING:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")


def check_batch_norm_inputs(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                            eps: float = 1e-5) -> None:
    """Raise what torch.nn.functional.batch_norm raises for these arguments, in the same order."""
    if training:
        _verify_batch_size(input)
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.numel() == 0:
        return  # nn returns an empty result before looking at the parameters
    num_features = input.size(1) if input.dim() > 1 else 0
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
        if tensor is not None:
            if tensor.numel() != num_features:
                raise RuntimeError(f"{name} should contain {num_features} elements not {tensor.numel()}")
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.numel() != num_features:
            raise RuntimeError(f"{name} should contain {num_features} elements not {tensor.numel()}")
    if input.dtype not in _FLOATING:
        name = _ATEN_DTYPE_NAMES.get(input.dtype, str(input.dtype))
        raise NotImplementedError(f'"batch_norm" not implemented for \'{name}\'')
    parameters = (weight, bias, running_mean, running_var)
    for tensor in parameters:
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(f"Tensor on device {tensor.device} is not on the expected device {input.device}!")
    _check_mixed_dtypes(input, parameters)


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         batch_mean: Tensor, batch_var: Tensor, count: Union[int, Tensor],
                         momentum: Union[float, Tensor]) -> None:
    """running = (1 - f) * running + f * batch, with the unbiased variance var * M / (M - 1).

    batch_var is the biased variance of M = count values. Written in tensor ops
    (no .item()), so a tensor momentum traces under torch.compile.
    """
    if running_mean is None or running_var is None:
        return
    new_mean, new_var = _python.blend_running_stats(running_mean, running_var, batch_mean, batch_var, count,
                                                    momentum)
    _copy_into_buffers(running_mean, running_var, new_mean, new_var)


def _copy_into_buffers(running_mean: Tensor, running_var: Tensor, new_mean: Tensor, new_var: Tensor) -> None:
    """running_* <- new_*, never recorded by autograd.

    Entering torch.no_grad() costs about as much as both copies; it is only
    needed when one of the four requires grad (the python backend's new
    statistics do, when the input does).
    """
    if _func.store_running_stats(running_mean, running_var, new_mean, new_var):  # under torch.func transforms
        return
    any_grad = (new_mean.requires_grad or new_var.requires_grad
                or running_mean.requires_grad or running_var.requires_grad)
    with torch.no_grad() if any_grad else contextlib.nullcontext():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def record_call(function, args: tuple, kwargs: dict) -> Proxy:
    """torch.fx.symbolic_trace: `function(*args, **kwargs)` as one call_function node (an argument is a Proxy).

    The checks need real tensors, so the traced graph calls the function
    itself (bnm.batch_norm, bnm.batch_norm_act) when it runs, as it calls
    F.batch_norm; buffers and parameters among the arguments become get_attr
    nodes, so running statistics are updated in the traced module's buffers.
    """
    tracer = next(a.tracer for a in tuple(args) + tuple(kwargs.values()) if isinstance(a, Proxy))
    return tracer.create_proxy("call_function", function, args, kwargs)


def _batch_norm_checked(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                        momentum: Union[float, Tensor], eps: float, backend: str) -> Tensor:
    """batch_norm after check_batch_norm_inputs has passed."""
    if input.numel() == 0:
        return _empty_batch(input, weight, bias)
    if weight is None and bias is not None:
        # The kernels take a bias only together with a weight; a weight of ones changes nothing.
        weight = torch.ones_like(bias)
    impl = get_backend(backend, input.device)
    if not training:
        return impl.eval_forward(input, weight, bias, running_mean, running_var, eps)
    output, mean, invstd = impl.train_forward(input, weight, bias, eps)
    if running_mean is not None:  # and running_var: the checks allow both or neither
        count = input.numel() // input.size(1)
        new_mean, new_var = impl.running_stats(mean, invstd, running_mean, running_var, momentum, eps, count)
        _copy_into_buffers(running_mean, running_var, new_mean, new_var)
    return output


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: Union[float, Tensor] = 0.1, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """Batch normalization over dim 1 of an (N, C, *) input, like torch.nn.functional.batch_norm.

    In training the batch statistics normalize the input and, when given,
    running_mean/running_var are updated in place with `momentum` (a float or
    a 0-d tensor). In eval the running statistics are used. `backend` is
    "auto", "python" or "cpp" (see torch_bn_manual.available_backends()).
    In eval mode under torch.export, torch.jit.trace or ONNX export, this is
    ATen's batch norm (export.py), with ATen's own argument checks; under
    torch.fx.symbolic_trace, one call_function node (record_call).
    """
    if isinstance(input, Proxy):
        return record_call(batch_norm, (input, running_mean, running_var, weight, bias, training, momentum, eps),
                           dict(backend=backend))
    if not training and capturing_standalone_graph():
        return aten_eval_batch_norm(input, running_mean, running_var, weight, bias, eps)
    check_batch_norm_inputs(input, running_mean, running_var, weight, bias, training, eps)
    return _batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps, backend)
