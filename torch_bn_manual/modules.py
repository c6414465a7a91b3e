"""BatchNorm1d/2d/3d: drop-in replacements for the torch.nn classes.

Each subclasses its torch.nn namesake, so parameters, buffers, state_dict,
repr and isinstance checks are the familiar ones; only forward() changes, to
run this package's batch_norm with the chosen backend. Unlike torch.nn, a bad
input raises before num_batches_tracked is incremented.
"""
import torch
from torch import Tensor, nn

from . import functional
from .backends import check_backend_name

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_batchnorm"]


class _BackendBatchNorm:
    """What our three classes add to their torch.nn base: a backend and its forward."""

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
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats = self._batch_norm_arguments()
        weight, bias = self.weight, self.bias
        functional.check_batch_norm_inputs(input, running_mean, running_var, weight, bias, use_batch_stats, self.eps)
        factor = self._momentum_after_counting()
        return functional._batch_norm_checked(input, running_mean, running_var, weight, bias, use_batch_stats, factor,
                                              self.eps, self.backend)


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


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _swap(module: nn.Module, backend: str) -> nn.Module:
    """One of ours carrying module's parameters, buffers and mode (the same tensors, not copies)."""
    cls = _REPLACEMENTS[type(module)]
    replacement = cls.__new__(cls)
    nn.Module.__init__(replacement)
    # Every attribute of the nn module (options, parameters, buffers, hooks) carries over as it is.
    for key, value in module.__dict__.items():
        replacement.__dict__[key] = value.copy() if isinstance(value, dict) else value
    replacement._init_backend(backend)
    return replacement


def convert_batchnorm(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d in `module` with ours, keeping its state.

    Parameters and buffers are shared with the originals, so optimizers built
    before the conversion keep working. Modules that are already ours get the
    requested backend. Returns the converted module (a new object when
    `module` itself is a batch norm layer, as nn.SyncBatchNorm.convert_sync_batchnorm does).
    """
    check_backend_name(backend)
    if isinstance(module, _BackendBatchNorm):
        module.backend = backend
        return module
    if type(module) in _REPLACEMENTS:
        return _swap(module, backend)
    for name, child in module.named_children():
        converted = convert_batchnorm(child, backend)
        if converted is not child:
            setattr(module, name, converted)
    return module
