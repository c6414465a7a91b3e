"""convert_batchnorm / revert_batchnorm: swap torch.nn's batch norm layers for ours and back.

A swap moves every attribute of the layer (options, parameters, buffers,
hooks, training mode) to an instance of the other class: the tensors are the
same objects, so optimizers, state_dicts and anything else holding them keep
working, and a round trip changes nothing but the classes.

Only exact counterparts are swapped. Layers that look like batch norm but
have no exact counterpart are left as they are, and one warning per call
names them and says why: LazyBatchNorm*d before its first forward (no
parameters yet; after it, it *is* an nn.BatchNorm*d and converts), and
subclasses (their own code may compute something else).
"""
import warnings
from typing import Dict, List, Type

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .backends import check_backend_name
from .distributed import SyncBatchNorm

__all__ = ["convert_batchnorm", "revert_batchnorm", "register_replacements", "to_torch_nn",
           "torch_nn_counterparts"]

# nn class -> our class, and back. modules.py registers BatchNorm1d/2d/3d.
_OURS_FOR: Dict[Type[nn.Module], Type[nn.Module]] = {nn.SyncBatchNorm: SyncBatchNorm}
_NN_FOR: Dict[Type[nn.Module], Type[nn.Module]] = {SyncBatchNorm: nn.SyncBatchNorm}
# Attributes our classes add to the nn ones; a revert drops them.
_OUR_ATTRIBUTES = ("backend", "_script_uses_ops", "_script_ops_on_cpu", "_script_ops_on_cuda")


def register_replacements(pairs: Dict[Type[nn.Module], Type[nn.Module]]) -> None:
    """Declare exact counterparts: {torch.nn class: ours}."""
    for nn_class, our_class in pairs.items():
        _OURS_FOR[nn_class] = our_class
        _NN_FOR[our_class] = nn_class


def torch_nn_counterparts() -> Dict[Type[nn.Module], Type[nn.Module]]:
    """{torch.nn class: our exact counterpart}."""
    return dict(_OURS_FOR)


def to_torch_nn(module: nn.Module) -> nn.Module:
    """module itself, or, when it is one of ours, its torch.nn counterpart holding the same tensors."""
    cls = _NN_FOR.get(type(module))
    return module if cls is None else _moved(module, cls, drop=_OUR_ATTRIBUTES)


def _is_ours(module: nn.Module) -> bool:
    """One of our layers: a registered class, a subclass of one, or any batch norm this package defines."""
    return isinstance(module, tuple(_NN_FOR)) or (
        isinstance(module, _BatchNorm) and type(module).__module__.split(".")[0] == __package__)


def _moved(module: nn.Module, cls: Type[nn.Module], drop=()) -> nn.Module:
    """An instance of cls holding module's attributes: the same tensors and hooks, not copies."""
    replacement = cls.__new__(cls)
    nn.Module.__init__(replacement)
    for key, value in module.__dict__.items():
        if key not in drop:
            replacement.__dict__[key] = value.copy() if isinstance(value, dict) else value
    return replacement


def _why_left(module: nn.Module, nn_side: bool) -> str:
    """Why a batch-norm-like layer has no exact counterpart (for the warning)."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "its parameters are not materialized yet; run one forward pass first"
    if not nn_side and not isinstance(module, tuple(_NN_FOR)):
        return "no torch.nn class computes what it computes"
    base = next(cls for cls in type(module).__mro__[1:] if cls in (_OURS_FOR if nn_side else _NN_FOR)
                or cls is _BatchNorm)
    where = "nn." if base.__module__.startswith("torch.nn") else "torch_bn_manual."
    return f"a subclass of {where}{base.__name__}: its own code may compute something else"


def _warn_left(function: str, left: List[str], target: str) -> None:
    if left:
        warnings.warn(f"{function} left {len(left)} layer(s) as they are, having no exact {target} "
                      f"counterpart: {'; '.join(left)}", UserWarning, stacklevel=3)


def _convert(module: nn.Module, backend: str, path: str, left: List[str]) -> nn.Module:
    if _is_ours(module):
        if hasattr(module, "backend"):
            module.backend = backend
        return module
    if type(module) in _OURS_FOR:
        replacement = _moved(module, _OURS_FOR[type(module)])
        replacement.backend = backend
        return replacement
    if isinstance(module, _BatchNorm):
        left.append(f"'{path or '<root>'}' ({type(module).__name__}: {_why_left(module, nn_side=True)})")
        return module
    for name, child in module.named_children():
        converted = _convert(child, backend, f"{path}.{name}" if path else name, left)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_batchnorm(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm in `module` with ours, keeping its state.

    Parameters and buffers are shared with the originals, so optimizers built
    before the conversion keep working. Modules that are already ours get the
    requested backend. Layers without an exact counterpart (an uninitialized
    LazyBatchNorm*d, subclasses of the nn classes) stay as they are, with one
    warning naming them. Returns the converted module (a new object when
    `module` itself is a batch norm layer, as nn.SyncBatchNorm.convert_sync_batchnorm does).
    """
    check_backend_name(backend)
    left: List[str] = []
    converted = _convert(module, backend, "", left)
    _warn_left("convert_batchnorm", left, "torch_bn_manual")
    return converted


def _revert(module: nn.Module, path: str, left: List[str]) -> nn.Module:
    if type(module) in _NN_FOR:
        return to_torch_nn(module)
    if _is_ours(module):
        left.append(f"'{path or '<root>'}' ({type(module).__name__}: {_why_left(module, nn_side=False)})")
        return module
    for name, child in module.named_children():
        reverted = _revert(child, f"{path}.{name}" if path else name, left)
        if reverted is not child:
            setattr(module, name, reverted)
    return module


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of convert_batchnorm: every one of our batch norm layers back to its torch.nn class.

    The nn layers hold the same parameters, buffers and hooks (the same
    tensors) and the same training mode; only `backend` is dropped. Useful
    before handing a model to tools that look for torch.nn's classes by type.
    Subclasses of ours stay, with one warning naming them. Returns the
    reverted module (a new object when `module` itself is one of ours).
    """
    left: List[str] = []
    reverted = _revert(module, "", left)
    _warn_left("revert_batchnorm", left, "torch.nn")
    return reverted
