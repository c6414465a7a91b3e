"""torch.func and forward-mode AD support shared by both backends.

- `transforms_active()`: the cheap check that routes a compiled-backend call
  to its torch.func-capable path (ops.py) when a torch.func transform runs or
  a forward-AD dual level is open;
- vmap by folding: a vmapped batch of B independent batch norms over (N, C, *)
  inputs is one batch norm over (N, B·C, *) inputs (every channel is
  independent), so each backend runs its own kernels once for the whole
  batch, whatever was vmapped (input, weight, bias, statistics, and the
  fused layers' residual);
- the forward-mode tangents (docs/derivation.md, "Forward mode") in torch ops;
- the running-statistics store under grad/jvp transforms, which updates the
  buffers as torch.nn's kernels do, and the errors nn raises where it refuses
  (batched input with unbatched running statistics in training; running
  statistics that carry a tangent in eval).
"""
from typing import List, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

_functorch = torch._C._functorch
_transforms_active = torch._C._are_functorch_transforms_active

# nn's messages, word for word (ATen's functorch batch rule and batch_norm_jvp).
UNBATCHED_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please see "
    "the functorch website for resources on how to patch your module to work with vmap")
RUNNING_STATS_TANGENT = ("batch_norm is not differentiable wrt running_mean and running_var, they cannot have "
                         "forward grad defined")


def transforms_active() -> bool:
    """True under a torch.func transform (grad, vmap, jvp, ...) or inside forward_ad.dual_level()."""
    return _forward_ad._current_level >= 0 or _transforms_active()


# ---------------------------------------------------------------------------
# vmap: B independent problems folded into the channel dimension
# ---------------------------------------------------------------------------

def _batch_first(t: Tensor, bdim: Optional[int], batch_size: int) -> Tensor:
    """t with its vmapped dimension first (expanded when t is not vmapped)."""
    if bdim is None:
        return t.unsqueeze(0).expand((batch_size,) + tuple(t.shape))
    return t.movedim(bdim, 0)


def fold_input(t: Optional[Tensor], bdim: Optional[int], batch_size: int) -> Optional[Tensor]:
    """(B, N, C, *) -> (N, B·C, *): sample b's channel c becomes channel b·C + c."""
    if t is None:
        return None
    t = _batch_first(t, bdim, batch_size)
    return t.transpose(0, 1).flatten(1, 2)


def fold_channels(t: Optional[Tensor], bdim: Optional[int], batch_size: int) -> Optional[Tensor]:
    """(B, C) -> (B·C,), a per-channel tensor for the folded input."""
    if t is None:
        return None
    return _batch_first(t, bdim, batch_size).reshape(-1)


def unfold_input(t: Tensor, batch_size: int) -> Tensor:
    """(N, B·C, *) -> (N, B, C, *); the vmapped dimension is 1."""
    return t.unflatten(1, (batch_size, -1))


def unfold_channels(t: Tensor, batch_size: int) -> Tensor:
    """(B·C,) -> (B, C); an empty (0,) placeholder stays as it is."""
    return t if t.numel() == 0 else t.unflatten(0, (batch_size, -1))


def fold_arguments(args: Sequence, in_dims: Sequence[Optional[int]], batch_size: int, full: Sequence[int],
                   per_channel: Sequence[int]) -> list:
    """args with the (N, C, *) ones at `full` and the (C,) ones at `per_channel` folded; the rest as they are."""
    args = list(args)
    for i in full:
        args[i] = fold_input(args[i], in_dims[i], batch_size)
    for i in per_channel:
        args[i] = fold_channels(args[i], in_dims[i], batch_size)
    return args


def channel_fold_rule(op, full: Sequence[int], per_channel: Sequence[int],
                      full_outputs: Sequence[int], channel_outputs: Sequence[int]):
    """A vmap rule for an op on (N, C, *) tensors and (C,) per-channel tensors.

    `full`/`per_channel`: argument positions of each kind (others are passed
    through); `full_outputs`/`channel_outputs`: output positions of each kind
    (a single-tensor op has the one output 0). The rule folds the batch into
    the channels, runs `op` once and unfolds its outputs.
    """
    def rule(info, in_dims, *args):
        batch = info.batch_size
        result = op(*fold_arguments(args, in_dims, batch, full, per_channel))
        single = isinstance(result, Tensor)
        outs = [result] if single else list(result)
        dims: List[Optional[int]] = [None] * len(outs)
        for i in full_outputs:
            if outs[i].dim() > 1:  # not an empty (0,) placeholder for an output not asked for
                outs[i], dims[i] = unfold_input(outs[i], batch), 1
        for i in channel_outputs:
            outs[i] = unfold_channels(outs[i], batch)
            dims[i] = 0 if outs[i].numel() else None
        return (outs[0], dims[0]) if single else (tuple(outs), tuple(dims))
    return rule


# The forwards' arguments: the input first, then weight and bias; the fused
# forwards (activation.py) add a residual, another (N, C, *) tensor, and
# their eval forward takes the running statistics after it.
PLAIN_TRAIN = dict(full=(0,), per_channel=(1, 2))
PLAIN_EVAL = dict(full=(0,), per_channel=(1, 2, 3, 4))
FUSED_TRAIN = dict(full=(0, 3), per_channel=(1, 2))
FUSED_EVAL = dict(full=(0, 3), per_channel=(1, 2, 4, 5))


def vmap_train_forward(apply, info, in_dims, *args, full: Sequence[int], per_channel: Sequence[int]):
    """vmap of a training forward(input, ...) -> (output, save_mean, save_invstd).

    `full`, `per_channel`: the argument positions of the (N, C, *) and the
    (C,) tensors (PLAIN_TRAIN, FUSED_TRAIN); the others pass through.
    """
    batch = info.batch_size
    output, mean, invstd = apply(*fold_arguments(args, in_dims, batch, full, per_channel))
    output = unfold_input(output, batch)
    mean, invstd = unfold_channels(mean, batch), unfold_channels(invstd, batch)
    if in_dims[0] is None:  # the statistics are the input's alone: the same for every b
        return (output, mean[0], invstd[0]), (1, None, None)
    return (output, mean, invstd), (1, 0, 0)


def vmap_eval_forward(apply, info, in_dims, *args, full: Sequence[int], per_channel: Sequence[int]):
    """vmap of an eval forward(input, ...) -> output, the statistics among the arguments.

    `full`, `per_channel`: as for vmap_train_forward (PLAIN_EVAL, FUSED_EVAL).
    """
    batch = info.batch_size
    if in_dims[0] is not None and all(in_dims[i] is None for i in per_channel):
        # Only the input (and a residual) vmapped: the samples are more rows of one batch.
        args = list(args)
        for i in full:
            if args[i] is not None:
                args[i] = _batch_first(args[i], in_dims[i], batch).flatten(0, 1)
        return apply(*args).unflatten(0, (batch, -1)), 0
    return unfold_input(apply(*fold_arguments(args, in_dims, batch, full, per_channel)), batch), 1


# ---------------------------------------------------------------------------
# Forward mode: the tangent of the output
# ---------------------------------------------------------------------------

def _reduce_dims(x: Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view((1, -1) + (1,) * (x.dim() - 2))


def tangent(input: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor, input_t: Optional[Tensor],
            weight_t: Optional[Tensor], bias_t: Optional[Tensor], train: bool) -> Tensor:
    """ẏ for batch norm with the given statistics, in torch ops (composable with every transform).

    train: ẏ = w·invstd·(ẋ − mean(ẋ) − x̂·mean(ẋ·x̂)) + ẇ·x̂ + ḃ  (the statistics move with x)
    eval:  ẏ = w·invstd·ẋ + ẇ·x̂ + ḃ                         (the statistics are constants)
    """
    sdt = mean.dtype
    xhat = (input.to(sdt) - _per_channel(mean, input)) * _per_channel(invstd, input)
    result = torch.zeros_like(xhat)
    if input_t is not None:
        scale = invstd if weight is None else invstd * weight.to(sdt)
        xt = input_t.to(sdt)
        if train:
            dims = _reduce_dims(input)
            xt = xt - xt.mean(dims, keepdim=True) - xhat * (xt * xhat).mean(dims, keepdim=True)
        result = result + xt * _per_channel(scale, input)
    if weight_t is not None:
        result = result + xhat * _per_channel(weight_t.to(sdt), input)
    if bias_t is not None:
        result = result + _per_channel(bias_t.to(sdt), input)
    return result.to(input.dtype)


def check_no_running_stat_tangents(running_mean_t: Optional[Tensor], running_var_t: Optional[Tensor]) -> None:
    """Eval mode: nn refuses running statistics that carry a tangent (when the output gets one)."""
    if running_mean_t is not None or running_var_t is not None:
        raise RuntimeError(RUNNING_STATS_TANGENT)


# ---------------------------------------------------------------------------
# Running statistics under transforms
# ---------------------------------------------------------------------------

def _batched_levels(t: Tensor) -> set:
    levels = set()
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            levels.add(_functorch.maybe_get_level(t))
        t = _functorch.get_unwrapped(t)
    return levels


def _unwrapped(t: Tensor) -> Tensor:
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def check_running_stats_batched(save_mean: Tensor, running_mean: Tensor, running_var: Tensor) -> None:
    """Under vmap, statistics of a batched input cannot go into unbatched buffers: nn's error."""
    if not _transforms_active():
        return
    batched = _batched_levels(save_mean)
    if batched and not (batched <= _batched_levels(running_mean) and batched <= _batched_levels(running_var)):
        raise RuntimeError(UNBATCHED_RUNNING_STATS)


def store_running_stats(running_mean: Tensor, running_var: Tensor, new_mean: Tensor, new_var: Tensor) -> bool:
    """running_* <- new_* for buffers captured by a grad/jvp transform; True when done here.

    torch.func refuses an in-place copy into a captured tensor, while nn's
    kernels update the captured buffers in place. The new values carry no
    gradient (the running statistics have none), so they are written as
    plain tensors, below the transforms. Buffers that are themselves
    transformed (vmapped per sample, or differentiated) are left to functorch
    (False).
    """
    if not _transforms_active():
        return False
    if _functorch.is_functorch_wrapped_tensor(running_mean) or _functorch.is_functorch_wrapped_tensor(running_var):
        return False
    new_mean, new_var = _unwrapped(new_mean), _unwrapped(new_var)
    with torch._C._DisableFuncTorch(), torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return True

