"""SyncBatchNorm: batch statistics over every process of a torch.distributed group.

Each rank holds a shard of the global batch. Training normalizes every shard
with the statistics of the whole batch, exactly as one `nn.BatchNorm*d` on the
concatenated batch would, for any split (uneven shards, ranks with no samples).

Forward, per layer and step, one collective:

    local  (mean, m2, count)       backend.collect_stats      (C,) each
    pack   (3, C)  ──all_gather──▶ (world, 3, C)
    merge  Chan's formula          backend.merge_stats        (C,) each: global mean, m2, M
    normalize                      backend.elementwise        with mean, 1/sqrt(m2/M + eps)

Backward, one collective:

    local  (Σdy, Σdy·(x-mean))     backend.backward_reduce    with the global mean
    pack   (2, C)  ──all_reduce(SUM)──▶ global sums
    dx                             backend.backward_elementwise with the global M

dweight = Σdy·(x-mean)·invstd and dbias = Σdy stay *local* (this rank's share,
computed with the global mean and invstd): DistributedDataParallel sums them
over ranks like every other parameter gradient, which gives the gradient of
the global batch.

Unlike `torch.nn.SyncBatchNorm`, nothing here is CUDA specific: CPU tensors
work with the gloo backend, GPU tensors with NCCL or gloo. Outside training,
with a group of one process, or without an initialized process group, the
layer is an ordinary (non-synced) batch norm from `functional.batch_norm`.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional
from .backends import check_backend_name, get_backend

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


# ---------------------------------------------------------------------------
# The two collectives
# ---------------------------------------------------------------------------

def _all_gather_stacked(local: Tensor, group, world_size: int) -> Tensor:
    """(world, *local.shape): every rank's `local`, in group-rank order; one collective."""
    local = local.contiguous()
    # The concatenated form (world * rows, ...) is the one every backend takes.
    gathered = local.new_empty((world_size * local.size(0),) + tuple(local.shape[1:]))
    gather_single = getattr(dist, "all_gather_single", None)  # torch >= 2.13
    if dist.get_backend(group) == "gloo" and (local.device.type != "cpu" or gather_single is None):
        # gloo's list form takes CUDA tensors too; its single-tensor form is recent and CPU-tested.
        dist.all_gather(list(gathered.chunk(world_size)), local, group)
    elif gather_single is not None:
        gather_single(gathered, local, group)
    else:
        dist.all_gather_into_tensor(gathered, local, group)
    return gathered.view((world_size,) + tuple(local.shape))


def _all_reduce_sum(packed: Tensor, group) -> Tensor:
    dist.all_reduce(packed, dist.ReduceOp.SUM, group)
    return packed


# ---------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------

class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm whose statistics span the process group.

    forward(input, weight, bias, running_mean, running_var, momentum, eps,
            group, world_size, backend) -> output
    The running statistics (when given) are updated in place from the global
    statistics, identically on every rank.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group, world_size, backend):
        # Local statistics, packed so that one all_gather moves all three.
        mean, m2, count = backend.collect_stats(input)
        gathered = _all_gather_stacked(torch.stack([mean, m2, count]), group, world_size)
        # Chan's merge over ranks, (world, C) -> (C,); empty ranks have count 0 and drop out.
        mean, m2, count = backend.merge_stats(*gathered.transpose(0, 1).contiguous().unbind(0))
        var = m2 / count.clamp_min(1)          # biased; 0 when the whole group is empty
        invstd = torch.rsqrt(var + eps)

        if running_mean is not None:
            # A group with no samples at all leaves the running statistics as they are
            # (as nn.BatchNorm does for an empty batch): the factor drops to 0 there.
            momentum = momentum * (count > 0).to(count.dtype)
            functional.update_running_stats(running_mean, running_var, mean, var, count, momentum)

        output = backend.elementwise(input, weight, bias, mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd, count)
        ctx.group = group
        ctx.backend = backend
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, invstd, count = ctx.saved_tensors
        backend = ctx.backend
        sum_dy, sum_dy_xmu = backend.backward_reduce(grad_output, input, mean, invstd)

        # This rank's share of dweight/dbias; DDP sums the shares over ranks.
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else sum_dy.dtype)

        grad_input = None
        if ctx.needs_input_grad[0]:
            # dx needs the sums of the whole batch: one all_reduce of both.
            sums = _all_reduce_sum(torch.stack([sum_dy, sum_dy_xmu]), ctx.group)
            grad_input = backend.backward_elementwise(
                grad_output, input, mean, invstd, weight, sums[0], sums[1], count)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------

class SyncBatchNorm(_BatchNorm):
    r"""Batch norm whose training statistics span all ranks of a process group.

    The API of `torch.nn.SyncBatchNorm` (constructor, parameters, buffers,
    state_dict, `process_group`, `convert_sync_batchnorm`) that also runs on
    CPU tensors (gloo), is exact for uneven shards and empty ranks, and
    computes with this package's backends.

    Args: as `torch.nn.SyncBatchNorm`, plus
        backend: "auto" (compiled ops where built, else python), "python" or "cpp".

    The class derives from `_BatchNorm`, the base that `nn.SyncBatchNorm` and
    `nn.BatchNorm*d` share, not from `nn.SyncBatchNorm` itself:
    DistributedDataParallel refuses every `nn.SyncBatchNorm` instance in a CPU
    module ("SyncBatchNorm layers only work with GPU modules"), which would
    make CPU training under DDP impossible.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, backend: str = "auto", *, bias: bool = True) -> None:
        check_backend_name(backend)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group
        self.backend = backend

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"

    # The input checks of nn.SyncBatchNorm, with its messages.
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """As `nn.SyncBatchNorm.convert_sync_batchnorm`, converting to this class."""
        return convert_sync_batchnorm(module, process_group)

    def _momentum_after_counting(self, tracking: bool):
        """Count this batch when tracking; the averaging factor: momentum, or 1/num_batches_tracked.

        The cumulative factor stays a tensor (no .item(), no host sync).
        """
        factor = 0.0 if self.momentum is None else self.momentum
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked.to(torch.float64)
        return factor

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)

        # Exactly as torch.nn decides: batch statistics in training, and in eval
        # when there are no running statistics; buffers updated only when tracked.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        tracking = self.training and self.track_running_stats
        keep_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_buffers else None
        running_var = self.running_var if keep_buffers else None

        # Statistics are synced only in training (not in eval, even without running stats).
        group, world_size = None, 1
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            world_size = dist.get_world_size(group)  # -1 when this rank is not in the group
        if world_size <= 1:
            # A group of one, eval, or no process group: an ordinary batch norm.
            functional.check_batch_norm_inputs(input, running_mean, running_var, self.weight, self.bias,
                                               bn_training, self.eps)
            factor = self._momentum_after_counting(tracking)
            return functional.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                         bn_training, factor, self.eps, backend=self.backend)

        # Checks first, so that an error leaves every buffer untouched. One value
        # per channel is fine on one rank (the group has more), so the check sees
        # a stand-in with two: the same tensor expanded along the batch.
        local = input
        if input.numel() == input.size(1):
            local = input.expand((2,) + tuple(input.shape[1:]))
        functional.check_batch_norm_inputs(local, running_mean, running_var, self.weight, self.bias,
                                           True, self.eps)
        factor = self._momentum_after_counting(tracking)
        backend = get_backend(self.backend, input.device)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                            factor, self.eps, group, world_size, backend)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch norm layer in `module` by `SyncBatchNorm`.

    Converts `nn.BatchNorm1d/2d/3d`, this package's BatchNorm*d and
    `nn.SyncBatchNorm` (any `_BatchNorm`), keeping the very parameter and
    buffer objects, `requires_grad`, the training flag and, for this
    package's layers, the backend. Returns the converted module (a new object
    when `module` itself is a batch norm layer), like
    `nn.SyncBatchNorm.convert_sync_batchnorm`.
    """
    output = module
    if isinstance(module, _BatchNorm):
        output = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group,
            backend=getattr(module, "backend", "auto"), bias=module.bias is not None)
        if module.affine:
            with torch.no_grad():
                output.weight = module.weight
                output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    for name, child in module.named_children():
        output.add_module(name, convert_sync_batchnorm(child, process_group))
    del module
    return output
