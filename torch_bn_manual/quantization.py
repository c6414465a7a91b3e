"""torch.ao.quantization fusion for our batch norm layers: fuse_modules and fuse_modules_qat.

fuse_modules looks up a fuser method by the exact tuple of module types
(fuser_method_mappings.get_fuser_method), in a table keyed by torch.nn
classes, e.g. (nn.Conv2d, nn.BatchNorm2d, nn.ReLU). Every entry that holds an
nn batch norm gets twins here with ours in its place. A twin hands the
fuser method the nn counterpart of our layer (revert_batchnorm's swap: the
same parameters and buffers), because the fused modules are built from
torch.nn classes and check for them: eval fusion folds the running
statistics into the conv/linear weights, QAT fusion (nni.ConvBn2d, ...)
keeps a torch.nn batch norm inside the fused module. Either way the result is
exactly what fusing the same model with nn's layers gives.

The table is the one the default call path reads (fuse_modules without a
fuser_func); registering once at import makes the plain calls work. A
user's additional_fuser_method_mapping still takes precedence, as for nn.
"""
import itertools
from typing import Callable

from torch import nn
from torch.ao.quantization import fuser_method_mappings

from .conversion import to_torch_nn, torch_nn_counterparts

__all__ = ["register_fuser_methods"]


def _with_torch_nn_layers(fuser_method: Callable) -> Callable:
    """fuser_method(is_qat, *modules), our batch norm layers passed as their nn counterparts."""
    def fuse(is_qat: bool, *modules: nn.Module):
        return fuser_method(is_qat, *(to_torch_nn(m) for m in modules))
    fuse.__name__ = getattr(fuser_method, "__name__", "fuse")
    return fuse


def register_fuser_methods() -> None:
    """Add (…, ours, …) twins of every (…, nn.BatchNorm*d, …) fuser-method entry; idempotent."""
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    ours_for = torch_nn_counterparts()
    for types, fuser_method in list(table.items()):
        choices = [(t, ours_for[t]) if t in ours_for else (t,) for t in types]
        for variant in itertools.product(*choices):
            if variant != types and variant not in table:
                table[variant] = _with_torch_nn_layers(fuser_method)
