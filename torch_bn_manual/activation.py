"""Batch norm, residual add and activation in one layer: act(BN(x) + residual).

    bnm.batch_norm_act(x, rm, rv, w, b, training, residual=z)   # F.relu(F.batch_norm(...) + z)
    bnm.BatchNormAct2d(64)(x, residual=z)                        # nn.BatchNorm2d, + z, nn.ReLU

The modules subclass the matching nn.BatchNorm*d (state_dict, repr and
isinstance are nn's) and take the plain modules' checks, errors and
running-statistics behaviour from modules.py and functional.py; only the
kernels differ. Fused, the add and the activation cost no pass over memory of
their own, and the layer keeps no more for its backward than nn's BatchNorm +
ReLU pair (the input and the output): docs/derivation.md, section 10.
"""
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from . import _python, _python_act, functional, scripting
from .backends import compiled_available, get_backend
from .export import aten_eval_batch_norm, capturing_standalone_graph
from .modules import _BackendBatchNorm
from .reference import ACTIVATIONS, activation_slope

__all__ = ["batch_norm_act", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "ACTIVATIONS"]


def _check_residual(residual: Optional[Tensor], input: Tensor) -> None:
    """The residual is added value for value: the input's shape, dtype and device (scripting.check_residual)."""
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor or None, but got {type(residual).__name__}")
    if torch.jit.is_tracing():
        # Sizes are traced values under torch.jit.trace; this check is not part of
        # the traced computation (the graph holds only the add), so its reading them is harmless.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scripting.check_residual(residual, input)
        return
    scripting.check_residual(residual, input)


_warned_no_fused_kernels = set()


def _act_backend(plain, device: torch.device):
    """The fused functions of a plain backend: ops.py's where it has fused kernels for the device.

    The compiled fused ops have CPU and CUDA kernels (ops.ACT_DEVICES lists
    the devices this build registered them for). On any other device the
    fused layer runs the python backend's fused Function, and says so once.
    """
    if plain is _python:
        return _python_act
    if device.type not in plain.ACT_DEVICES:
        if device.type not in _warned_no_fused_kernels:
            _warned_no_fused_kernels.add(device.type)
            warnings.warn(f"torch_bn_manual: the compiled backend has no fused batch norm + activation kernels for "
                          f"device '{device.type}'; BatchNormAct*/batch_norm_act run the python backend there",
                          RuntimeWarning, stacklevel=3)
        return _python_act
    return plain


def _fused_kernel_devices() -> frozenset:
    """The device types the compiled fused ops have kernels for; empty when the extension is not built."""
    if not compiled_available():
        return frozenset()
    from . import ops
    return ops.ACT_DEVICES


def _batch_norm_act_checked(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                            momentum: Union[float, Tensor], eps: float, residual: Optional[Tensor],
                            slope: Optional[float], backend: str) -> Tensor:
    """batch_norm_act after every check has passed (functional._batch_norm_checked, fused)."""
    if input.numel() == 0:
        output = functional._empty_batch(input, weight, bias)
        return _python_act.activate(output if residual is None else output + residual, slope)
    if weight is None and bias is not None:
        weight = torch.ones_like(bias)  # the kernels take a bias only with a weight
    plain = get_backend(backend, input.device)
    fused = _act_backend(plain, input.device)
    if not training:
        return fused.act_eval_forward(input, weight, bias, residual, running_mean, running_var, slope, eps)
    output, mean, invstd = fused.act_train_forward(input, weight, bias, residual, slope, eps)
    if running_mean is not None:  # and running_var: the checks allow both or neither
        count = input.numel() // input.size(1)
        new_mean, new_var = plain.running_stats(mean, invstd, running_mean, running_var, momentum, eps, count)
        functional._copy_into_buffers(running_mean, running_var, new_mean, new_var)
    return output


def batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: Union[float, Tensor] = 0.1, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
                   activation: str = "relu", negative_slope: float = 0.01, backend: str = "auto") -> Tensor:
    """act(batch_norm(input, ...) + residual), fused.

    The batch norm arguments and their checks are those of bnm.batch_norm
    (and F.batch_norm). `residual` is None or a tensor of the input's shape,
    dtype and device. `activation` is "identity", "relu" or "leaky_relu"
    (with `negative_slope` >= 0, as the backward reads the activation's
    derivative from the output's sign). In eval mode under torch.export,
    torch.jit.trace or ONNX export, this is ATen's batch norm, add and
    relu/leaky_relu (export.py); under torch.fx.symbolic_trace, one
    call_function node.
    """
    if isinstance(input, Proxy) or isinstance(residual, Proxy):
        return functional.record_call(batch_norm_act, (input, running_mean, running_var, weight, bias, training,
                                                       momentum, eps),
                                      dict(residual=residual, activation=activation, negative_slope=negative_slope,
                                           backend=backend))
    slope = activation_slope(activation, negative_slope)
    if not training and capturing_standalone_graph():
        _check_residual(residual, input)
        return aten_eval_batch_norm(input, running_mean, running_var, weight, bias, eps, residual, slope)
    functional.check_batch_norm_inputs(input, running_mean, running_var, weight, bias, training, eps)
    _check_residual(residual, input)
    return _batch_norm_act_checked(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   residual, slope, backend)


class _BackendBatchNormAct(_BackendBatchNorm):
    """What the fused classes add to the plain ones: an activation and a residual input.

    Beyond eager mode the fused layers take the plain ones' routes
    (modules.py): a call_module leaf under torch.fx, ATen ops (batch norm,
    add, relu/leaky_relu) for eval mode under torch.export, torch.jit.trace
    and ONNX export, and the shared scripted forward under torch.jit.script.
    """

    # The activation's slope as the scripted forward sees it (a constant, set
    # by __prepare_scriptable__; None: identity).
    __constants__ = _BackendBatchNorm.__constants__ + ["_script_slope"]
    _script_slope: Optional[float] = None

    def _init_activation(self, activation: str, negative_slope: float) -> None:
        activation_slope(activation, negative_slope)  # raises for a bad choice
        self.activation = activation
        self.negative_slope = negative_slope

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        return f"{text}, negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else text

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, residual, self._script_slope, True)
        return self._eager_forward(input, residual)

    # The plain layers' eager forward (modules.py) with the activation and the residual:

    @torch.jit.unused
    def _slope(self) -> Optional[float]:
        return activation_slope(self.activation, self.negative_slope)

    @torch.jit.unused
    def _check_residual_of(self, input: Tensor, residual: Optional[Tensor]) -> None:
        _check_residual(residual, input)

    @torch.jit.unused
    def _forward_checked(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                         momentum: Union[float, Tensor], residual: Optional[Tensor], slope: Optional[float]) -> Tensor:
        return _batch_norm_act_checked(input, running_mean, running_var, weight, bias, training, momentum, self.eps,
                                       residual, slope, self.backend)

    @torch.jit.unused
    def __prepare_scriptable__(self):
        """The plain layers' choice of scripted path, with the fused ops' devices, and the slope as a constant."""
        super().__prepare_scriptable__()
        devices = _fused_kernel_devices()
        self._script_ops_on_cpu = self._script_ops_on_cpu and "cpu" in devices
        self._script_ops_on_cuda = self._script_ops_on_cuda and "cuda" in devices
        self._script_uses_ops = self._script_ops_on_cpu or self._script_ops_on_cuda
        self._script_slope = activation_slope(self.activation, self.negative_slope)
        return self


class BatchNormAct1d(_BackendBatchNormAct, nn.BatchNorm1d):
    """nn.BatchNorm1d, + residual, then the activation, for (N, C) or (N, C, L) input."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, backend: str = "auto",
                 *, activation: str = "relu", negative_slope: float = 0.01):
        nn.BatchNorm1d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype)
        self._init_backend(backend)
        self._init_activation(activation, negative_slope)


class BatchNormAct2d(_BackendBatchNormAct, nn.BatchNorm2d):
    """nn.BatchNorm2d, + residual, then the activation, for (N, C, H, W) input."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, backend: str = "auto",
                 *, activation: str = "relu", negative_slope: float = 0.01):
        nn.BatchNorm2d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype)
        self._init_backend(backend)
        self._init_activation(activation, negative_slope)


class BatchNormAct3d(_BackendBatchNormAct, nn.BatchNorm3d):
    """nn.BatchNorm3d, + residual, then the activation, for (N, C, D, H, W) input."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, backend: str = "auto",
                 *, activation: str = "relu", negative_slope: float = 0.01):
        nn.BatchNorm3d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype)
        self._init_backend(backend)
        self._init_activation(activation, negative_slope)


_FUSED_CLASSES = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d}


def fused_from(batchnorm: nn.Module, activation: str, negative_slope: float = 0.01,
               backend: Optional[str] = None) -> _BackendBatchNormAct:
    """A fused layer holding `batchnorm`'s parameters, buffers and mode (the same tensors, not copies).

    `batchnorm` is an nn.BatchNorm1d/2d/3d or one of this package's; its
    backend is kept unless `backend` is given.
    """
    cls = next(fused for base, fused in _FUSED_CLASSES.items() if isinstance(batchnorm, base))
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    for key, value in batchnorm.__dict__.items():
        fused.__dict__[key] = value.copy() if isinstance(value, dict) else value
    fused._init_backend(backend or getattr(batchnorm, "backend", "auto"))
    fused._init_activation(activation, negative_slope)
    return fused
