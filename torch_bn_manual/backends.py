"""Which implementation runs: the backend registry.

"python" is always there (torch ops, `_python.py`). "cpp" is the compiled
extension (`ops.py` over torch_bn_manual._C): C++ kernels for CPU tensors and,
in a CUDA build, CUDA kernels for GPU tensors. "auto" picks the compiled one
wherever it has a kernel for the tensor's device, python otherwise.
"""
import importlib.util
import warnings
from types import ModuleType
from typing import List

import torch

from . import _python

BACKENDS = ("auto", "python", "cpp")
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make test`) in the project root"
_warned_fallback = False


def _load_compiled():
    """(ops module, None), or (None, one sentence saying what is missing and how to get it)."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        # Not built: importing it anyway would only report a circular import.
        return None, f"the compiled extension torch_bn_manual._C is not built; {_BUILD_HINT}"
    try:
        from . import ops
    except ImportError as error:  # built, but does not load here (e.g. built against another torch)
        cause = error.__cause__ or error
        return None, (f"the compiled extension torch_bn_manual._C does not load ({cause}); "
                      f"rebuild it: {_BUILD_HINT[len('build it with '):]}")
    return ops, None


_compiled, _COMPILED_ERROR = _load_compiled()


def compiled_available() -> bool:
    """True when torch_bn_manual._C loaded and registered its ops."""
    return _compiled is not None


def _devices_with_kernels() -> frozenset:
    """The device types the compiled ops have kernels for (CUDA only in a CUDA build).

    Asked once at import: the answer cannot change, and torch.compile must not
    trace a dispatcher query on every call.
    """
    if _compiled is None:
        return frozenset()
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(
                         "torch_bn_manual::batch_norm_train_forward", key))


_COMPILED_DEVICES = _devices_with_kernels()


def compiled_devices() -> frozenset:
    """The device types ("cpu", "cuda") the compiled ops have kernels for; empty when not built."""
    return _COMPILED_DEVICES


def _compiled_has_device(device: torch.device) -> bool:
    return device.type in _COMPILED_DEVICES


def available_backends() -> List[str]:
    """The backends that can run here, e.g. ["python", "cpp"]."""
    return ["python", "cpp"] if compiled_available() else ["python"]


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, but got {backend!r}")


def get_backend(backend: str, device: torch.device) -> ModuleType:
    """The module implementing the backend interface (docs/architecture.md) for `device`."""
    global _warned_fallback
    check_backend_name(backend)
    if backend == "python":
        return _python
    if backend == "cpp":
        if _compiled is None:
            raise RuntimeError(f"torch_bn_manual: backend='cpp' is not available: {_COMPILED_ERROR}")
        if not _compiled_has_device(device):
            raise RuntimeError(f"torch_bn_manual: the compiled backend has no kernels for device "
                               f"'{device.type}' in this build")
        return _compiled
    if _compiled_has_device(device):
        return _compiled
    if _compiled is None and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"torch_bn_manual: backend='auto' uses the python backend (slower): {_COMPILED_ERROR}",
                      RuntimeWarning, stacklevel=3)
    return _python
