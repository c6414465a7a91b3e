"""The strides torch.nn gives a batch norm output, for every input layout and device.

The same rules are compiled into the kernels (csrc/cpu/tensors.cpp,
csrc/cuda/tensor_args.cuh); this copy serves the python backend and the fake
kernels of ops.py.

CPU (ATen native/Normalization.cpp, batch_norm_cpu): when the input is dense
in one of contiguous / channels_last / channels_last_3d and every
per-channel tensor is contiguous, the first of contiguous, channels_last_3d,
channels_last the input satisfies; otherwise the input's
suggest_memory_format(). The two differ for ambiguous strides: a (1, 2, 3, 1)
input with strides (6, 1, 2, 1) is dense in channels_last (size-1 dims do not
count) while suggest_memory_format() says contiguous; nn returns channels_last.

CUDA: cuDNN, where nn uses it (float64, float32 or float16 with float32
parameters; 3 to 5 dims; weight and bias given; cuDNN enabled), allocates in
the suggested memory format; ATen's own kernels use empty_like, which keeps
a dense input's strides exactly (a 2-D or 3-D input with the channels
innermost stays so) and takes the suggested format otherwise.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._prims_common import (is_non_overlapping_and_dense_or_false, make_channels_last_strides_for,
                                  make_contiguous_strides_for, suggest_memory_format)

__all__ = ["output_strides", "grad_input_strides", "with_strides"]

_FORMAT_OF_RANK = {4: torch.channels_last, 5: torch.channels_last_3d}


def _strides_of(shape, memory_format: torch.memory_format) -> Tuple[int, ...]:
    if memory_format == torch.contiguous_format:
        return tuple(make_contiguous_strides_for(shape))
    return tuple(make_channels_last_strides_for(shape))


def _dense_format(t: Tensor) -> Optional[torch.memory_format]:
    """The first of contiguous, channels_last_3d, channels_last t is dense in, or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    fmt = _FORMAT_OF_RANK.get(t.dim())
    if fmt is not None and t.is_contiguous(memory_format=fmt):
        return fmt
    return None


def _contiguous(*tensors: Optional[Tensor]) -> bool:
    return all(t is None or t.is_contiguous() for t in tensors)


def _nn_uses_cudnn(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], training: bool) -> bool:
    """native/Normalization.cpp's backend choice (cuDNN's minimum eps is 0 since cuDNN 7.x)."""
    if weight is None or bias is None or input.dim() < 3:
        return False
    if torch.bfloat16 in (input.dtype, weight.dtype):
        return False
    if input.dtype == torch.float16 and weight.dtype != torch.float32:
        return False
    if input.shape[0] > (880801 if training else 65535) or input.numel() >= 2**31 - 1:
        return False
    cudnn = torch.backends.cudnn
    return bool(cudnn.enabled and cudnn.is_available() and cudnn.version() >= 5110)


def output_strides(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                   training: bool = True) -> Tuple[int, ...]:
    """The strides of nn's batch norm output for this call."""
    if input.device.type == "cuda":
        return cuda_output_strides(input, weight, bias, training)
    fmt = _dense_format(input)
    if fmt is None or not _contiguous(weight, bias, running_mean, running_var):
        fmt = suggest_memory_format(input)
    return _strides_of(input.shape, fmt)


def cuda_output_strides(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        training: bool) -> Tuple[int, ...]:
    """The CUDA rule (any device's tensor may be asked, for tests): cuDNN's format or empty_like's strides."""
    if not _nn_uses_cudnn(input, weight, bias, training) and is_non_overlapping_and_dense_or_false(input):
        return tuple(input.stride())
    return _strides_of(input.shape, suggest_memory_format(input))


def grad_input_strides(grad_output: Tensor, input: Tensor) -> Tuple[int, ...]:
    """The strides of the input's gradient as the compiled kernels give it (on CPU: nn's)."""
    fmt = suggest_memory_format(input)
    if input.device.type != "cuda":
        in_fmt, dy_fmt = _dense_format(input), _dense_format(grad_output)
        if in_fmt is not None and dy_fmt is not None and fmt == suggest_memory_format(grad_output):
            fmt = in_fmt
    return _strides_of(input.shape, fmt)


def with_strides(t: Tensor, strides: Tuple[int, ...]) -> Tensor:
    """t itself when it has these strides, else a copy that has them."""
    if tuple(t.stride()) == tuple(strides):
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)
