"""BatchNorm1d/2d/3d: drop-in replacements for the torch.nn classes.

Each subclasses its torch.nn namesake, so parameters, buffers, state_dict,
repr and isinstance checks are the familiar ones; only forward() changes, to
run this package's batch_norm with the chosen backend. Unlike torch.nn, a bad
input raises before num_batches_tracked is incremented.

Beyond eager mode, forward() serves three tracers (docs/export.md):
- torch.fx.symbolic_trace records the module as one call_module node, as it
  records nn's batch norm (a leaf), whatever the Tracer's is_leaf_module says;
- torch.jit.script compiles _scripted_forward (scripting.py) in place of the
  eager path;
- torch.export, torch.jit.trace and ONNX export capture eval mode as ATen's
  batch norm (export.py; bnm.batch_norm does the same).
"""
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from . import functional, scripting
from .backends import check_backend_name, compiled_available, compiled_devices
from .conversion import convert_batchnorm, register_replacements  # noqa: F401 (importable from here, as before)
from .export import aten_eval_batch_norm, capturing_standalone_graph

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_batchnorm"]


def _record_as_leaf(module: nn.Module, *args) -> Optional[Proxy]:
    """Record `module(*args)` as a call_module node of the FX graph being traced (an argument is a Proxy).

    torch.fx's default Tracer keeps torch.nn's modules as leaves because of
    the module they are defined in; ours live in this package, so a Tracer
    traces into forward(), where the input checks would need a real tensor.
    Recording the call here gives the graph nn's batch norm gets, for any
    Tracer. None when the module is the root being traced (it has no path to
    call; nn's batch norm cannot be traced as the root either). The fused
    layers record (input, residual) when a residual is given.
    """
    tracer = next(arg.tracer for arg in args if isinstance(arg, Proxy))
    path = tracer.path_of_module(module)
    if not path:
        return None
    while args and args[-1] is None:  # module(x), not module(x, None): the call as it was written
        args = args[:-1]
    return tracer.create_proxy("call_module", path, args, {})


class _BackendBatchNorm:
    """What our three classes add to their torch.nn base: a backend and its forward."""

    # torch.nn's constants, and which path the scripted forward compiles
    # (set by __prepare_scriptable__): the compiled ops, or torch ops.
    __constants__ = nn.BatchNorm2d.__constants__ + ["_script_uses_ops", "_script_ops_on_cpu",
                                                    "_script_ops_on_cuda"]
    _script_uses_ops = False
    _script_ops_on_cpu = False
    _script_ops_on_cuda = False

    def _init_backend(self, backend: str) -> None:
        check_backend_name(backend)
        self.backend = backend

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"

    def _batch_norm_arguments(self):
        """(running_mean, running_var, use batch statistics?) exactly as torch.nn decides them."""
        # Each buffer is read once: a module attribute lookup costs about as
        # much as a small op's dispatch.
        running_mean, running_var = self.running_mean, self.running_var
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = running_mean is None and running_var is None
        if self.training and not self.track_running_stats:
            return None, None, use_batch_stats
        return running_mean, running_var, use_batch_stats

    def _momentum_after_counting(self):
        """Count this batch and return the averaging factor: momentum, or 1/num_batches_tracked.

        The cumulative factor stays a tensor (no float()), so torch.compile
        traces momentum=None without a graph break.
        """
        factor = 0.0 if self.momentum is None else self.momentum
        counted = self.num_batches_tracked if self.training and self.track_running_stats else None
        if counted is not None:
            counted.add_(1)
            if self.momentum is None:
                factor = 1.0 / counted.to(torch.float64)
        return factor

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, None, None, False)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """The eager forward of the plain and the fused layers; the fused ones (activation.py) add their
        activation and residual through _slope, _check_residual_of and _forward_checked."""
        if isinstance(input, Proxy) or isinstance(residual, Proxy):  # torch.fx.symbolic_trace
            recorded = _record_as_leaf(self, input, residual)
            if recorded is not None:
                return recorded
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats = self._batch_norm_arguments()
        weight, bias = self.weight, self.bias
        slope = self._slope()
        if not use_batch_stats and capturing_standalone_graph():
            # torch.export / jit.trace / ONNX: a graph of ATen ops, loadable without this package.
            self._check_residual_of(input, residual)
            return aten_eval_batch_norm(input, running_mean, running_var, weight, bias, self.eps, residual, slope)
        functional.check_batch_norm_inputs(input, running_mean, running_var, weight, bias, use_batch_stats, self.eps)
        self._check_residual_of(input, residual)
        factor = self._momentum_after_counting()  # only after every check passed
        return self._forward_checked(input, running_mean, running_var, weight, bias, use_batch_stats, factor,
                                     residual, slope)

    @torch.jit.unused
    def _slope(self) -> Optional[float]:
        """The activation's slope (None: identity); plain batch norm has none."""
        return None

    @torch.jit.unused
    def _check_residual_of(self, input: Tensor, residual: Optional[Tensor]) -> None:
        """Plain batch norm takes no residual: nothing to check."""

    @torch.jit.unused
    def _forward_checked(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                         momentum: Union[float, Tensor], residual: Optional[Tensor], slope: Optional[float]) -> Tensor:
        """The forward once every check has passed and the batch is counted."""
        return functional._batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum,
                                              self.eps, self.backend)

    # -- TorchScript -------------------------------------------------------

    @torch.jit.unused
    def __prepare_scriptable__(self):
        """Fix, before torch.jit.script compiles forward, which implementation it compiles.

        The compiled ops exist in TorchScript only when the extension is
        loaded, so whether _scripted_forward calls them is a module constant.
        """
        if self.backend == "cpp" and not compiled_available():
            functional.get_backend("cpp", torch.device("cpu"))  # raises the message that says how to build it
        devices = compiled_devices() if self.backend == "auto" else frozenset()
        self._script_ops_on_cpu = self.backend == "cpp" or "cpu" in devices
        self._script_ops_on_cuda = self.backend == "cpp" or "cuda" in devices
        self._script_uses_ops = self._script_ops_on_cpu or self._script_ops_on_cuda
        return self

    def _scripted_forward(self, input: Tensor, residual: Optional[Tensor], slope: Optional[float],
                          fused: bool) -> Tensor:
        """forward() for torch.jit.script: the eager path's decisions, written in TorchScript.

        The fused layers (activation.py) call it with their residual, their
        activation's slope (None: identity) and fused=True.
        """
        self._check_input_dim(input)
        running_mean = self.running_mean
        running_var = self.running_var
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = None
            running_var = None
        if use_batch_stats:
            scripting.verify_batch_size(input)
        if residual is not None:
            scripting.check_residual(residual, input)
        momentum = torch.scalar_tensor(0.0 if self.momentum is None else self.momentum, dtype=torch.float64)
        counted = self.num_batches_tracked
        if self.training and self.track_running_stats and counted is not None:
            counted.add_(1)
            if self.momentum is None:
                momentum = 1.0 / counted.to(torch.float64)
        weight = self.weight
        bias = self.bias
        if input.numel() == 0:
            output = scripting.empty_batch(input, weight, bias)
            if residual is not None:
                output = output + residual
            return scripting.activate(output, slope)
        if weight is None and bias is not None:
            weight = torch.ones_like(bias)
        if self._script_uses_ops:
            if (self._script_ops_on_cuda if input.is_cuda else self._script_ops_on_cpu):
                return scripting.ops_forward(input, running_mean, running_var, weight, bias, use_batch_stats,
                                             momentum, self.eps, residual, slope, fused)
        return scripting.python_forward(input, running_mean, running_var, weight, bias, use_batch_stats,
                                        momentum, self.eps, residual, slope)


def _nn_options(bias: bool) -> dict:
    # `bias=` is a newer torch.nn option; pass it only when it differs from the default.
    return {} if bias else {"bias": False}


class BatchNorm1d(_BackendBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d for (N, C) or (N, C, L) input, with a selectable backend."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, backend: str = "auto",
                 *, bias: bool = True):
        nn.BatchNorm1d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype, **_nn_options(bias))
        self._init_backend(backend)


class BatchNorm2d(_BackendBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d for (N, C, H, W) input, with a selectable backend."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, backend: str = "auto",
                 *, bias: bool = True):
        nn.BatchNorm2d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype, **_nn_options(bias))
        self._init_backend(backend)


class BatchNorm3d(_BackendBatchNorm, nn.BatchNorm3d):
    """nn.BatchNorm3d for (N, C, D, H, W) input, with a selectable backend."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, backend: str = "auto",
                 *, bias: bool = True):
        nn.BatchNorm3d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype, **_nn_options(bias))
        self._init_backend(backend)


register_replacements({nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d})
