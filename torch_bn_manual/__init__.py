"""torch_bn_manual: batch normalization with forward and backward written by hand.

    import torch_bn_manual as bnm
    bn = bnm.BatchNorm2d(64)                      # drop-in for nn.BatchNorm2d
    y = bnm.batch_norm(x, rm, rv, w, b, True)     # drop-in for F.batch_norm
    model = bnm.convert_batchnorm(model)          # swap every nn.BatchNorm*d
    model = bnm.revert_batchnorm(model)           # and back, same tensors
    bnm.available_backends()                      # ["python", "cpp"] when built

See docs/derivation.md for the math and docs/architecture.md for the layers.
"""
from . import reference
from .activation import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, batch_norm_act
from .backends import available_backends
from .distributed import SyncBatchNorm, convert_sync_batchnorm
from .functional import batch_norm
from .conversion import convert_batchnorm, revert_batchnorm
from .fx import fuse_activations
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .quantization import register_fuser_methods as _register_fuser_methods

# torch.ao.quantization.fuse_modules(_qat) fuses our layers as it fuses nn's.
_register_fuser_methods()

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert_batchnorm",
    "revert_batchnorm",
    "convert_sync_batchnorm",
    "available_backends",
    "reference",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "batch_norm_act",
    "fuse_activations",
]
__version__ = "0.1.0"
