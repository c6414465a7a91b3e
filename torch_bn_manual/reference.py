"""NumPy float64 reference for batch normalization, forward and backward.

This module follows ``docs/derivation.md`` line by line and is the ground truth
the other backends are tested against.  It favours clarity over speed.

The one trick of the whole derivation: an input of shape ``(N, C, *spatial)``
is viewed as a matrix of shape ``(M, C)`` with ``M = N * prod(spatial)``, by
moving the channel axis last and flattening the rest.  Every row is a
"sample", every column a channel, and channels never interact::

    (N, C, H, W) --moveaxis(1, -1)--> (N, H, W, C) --reshape--> (M, C)

Training mode (batch statistics), per channel ``j``::

    mean_j   = Σ_i x_ij / M
    var_j    = Σ_i (x_ij − mean_j)² / M            biased, two-pass
    invstd_j = 1 / sqrt(var_j + eps)
    xhat_ij  = (x_ij − mean_j) · invstd_j
    y_ij     = w_j · xhat_ij + b_j

    db_j  = Σ_i dy_ij
    dw_j  = Σ_i dy_ij · xhat_ij
    dx_ij = w_j · invstd_j / M · (M·dy_ij − db_j − xhat_ij · dw_j)

Eval mode uses the running statistics, which are constants for autograd, so
``dx = w · invstd · dy``.

Conventions
-----------
* Inputs may be NumPy arrays, anything ``np.asarray`` accepts, or CPU/GPU
  torch tensors (they are detached and copied to host); everything is
  converted to float64.
* ``weight``/``bias`` may be ``None`` (``affine=False``): they then mean 1
  and 0.  The backward functions return ``dweight`` as ``None`` exactly when
  ``weight`` was ``None`` and ``dbias`` as ``None`` exactly when ``bias`` was
  ``None`` -- the same rule as ``torch.nn.functional.batch_norm`` (no
  parameter, no gradient).  ``dx`` always has the input's shape.
* ``M = 0`` (an empty batch) is accepted: statistics are mean 0, var 0 (so
  ``invstd = 1/sqrt(eps)``), outputs are empty and parameter gradients are 0,
  matching the convention of ``docs/architecture.md``.

The module also keeps two deliberately *wrong* formulas from the seed texts,
``seed_jacobian_backward`` and ``seed_variance``, so that the errata described
in ``docs/derivation.md`` can be demonstrated and tested.  Never use them for
anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = [
    "BatchNormCache",
    "to_mc",
    "from_mc",
    "batch_norm_forward",
    "batch_norm_backward",
    "xhat_jacobian",
    "jacobian_backward",
    "seed_xhat_jacobian",
    "seed_jacobian_backward",
    "batch_norm_eval_forward",
    "batch_norm_eval_backward",
    "update_running_stats",
    "two_pass_variance",
    "seed_variance",
    "JACOBIAN_MAX_ELEMENTS",
    "ACTIVATIONS",
    "activation_slope",
    "activation_forward",
    "activation_backward",
    "batch_norm_act_forward",
    "batch_norm_act_backward",
]

#: ``jacobian_backward`` refuses to build a tensor with more elements than this
#: (2**26 float64 values = 512 MiB); it is a teaching tool, not a kernel.
JACOBIAN_MAX_ELEMENTS = 2 ** 26


# --------------------------------------------------------------------------
# The (M, C) view
# --------------------------------------------------------------------------

def _as_f64(a) -> np.ndarray:
    """A float64 NumPy copy-or-view of ``a`` (torch tensors are detached)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor, no torch import
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _check_input(x: np.ndarray) -> None:
    if not 2 <= x.ndim <= 5:
        raise ValueError(
            f"expected input of shape (N, C) or (N, C, *spatial) with up to 3 "
            f"spatial dims (2-D to 5-D), got {x.ndim}-D shape {x.shape}")


def _check_param(p, C: int, name: str) -> Optional[np.ndarray]:
    if p is None:
        return None
    p = _as_f64(p)
    if p.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {p.shape}")
    return p


def to_mc(x) -> np.ndarray:
    """View ``(N, C, *spatial)`` as ``(M, C)``: move C last, flatten the rest.

    Row ``i`` of the result is one (sample, position) pair; ``M = N·prod(spatial)``.
    """
    x = np.asarray(x)
    _check_input(x)
    C = x.shape[1]
    return np.moveaxis(x, 1, -1).reshape(-1, C)


def from_mc(a: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_mc`: ``(M, C)`` back to ``shape = (N, C, *spatial)``."""
    N, C, spatial = shape[0], shape[1], tuple(shape[2:])
    return np.ascontiguousarray(np.moveaxis(a.reshape((N,) + spatial + (C,)), -1, 1))


# --------------------------------------------------------------------------
# What backward needs
# --------------------------------------------------------------------------

@dataclass
class BatchNormCache:
    """Everything the backward functions need, saved by the forward functions.

    Fields (all NumPy float64; ``M`` rows, ``C`` channels):

    ``x``        (M, C)  the input in the (M, C) view
    ``xhat``     (M, C)  normalized input, ``(x − mean) · invstd``
    ``mean``     (C,)    the mean used to normalize (batch mean in training,
                         running mean in eval)
    ``var``      (C,)    the variance used to normalize (biased batch variance
                         in training, running variance in eval)
    ``invstd``   (C,)    ``1 / sqrt(var + eps)``
    ``weight``   (C,) or None   the scale ``w`` (None: affine=False, acts as 1)
    ``has_bias`` bool    whether a bias was given (decides if dbias is None)
    ``shape``    tuple   the original input shape ``(N, C, *spatial)``
    ``M``, ``C`` int     the (M, C) view's dimensions
    ``eps``      float   the epsilon added to the variance
    ``training`` bool    True from batch_norm_forward, False from
                         batch_norm_eval_forward
    """

    x: np.ndarray
    xhat: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    invstd: np.ndarray
    weight: Optional[np.ndarray]
    has_bias: bool
    shape: Tuple[int, ...]
    M: int
    C: int
    eps: float
    training: bool

    def w(self) -> np.ndarray:
        """The scale as a (C,) array: ``weight``, or ones when it is None."""
        return np.ones(self.C) if self.weight is None else self.weight


def _normalize(x2d, mean, var, weight, bias, eps):
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x2d - mean) * invstd
    y2d = xhat if weight is None else xhat * weight
    if bias is not None:
        y2d = y2d + bias
    return xhat, invstd, y2d


def _param_grads(dy2d: np.ndarray, cache: BatchNormCache):
    """(db, dw) as full arrays, and the (dweight, dbias) pair to return."""
    db = dy2d.sum(axis=0)
    dw = (dy2d * cache.xhat).sum(axis=0)
    return db, dw, (dw if cache.weight is not None else None,
                    db if cache.has_bias else None)


def _dy_mc(dy, cache: BatchNormCache) -> np.ndarray:
    dy = _as_f64(dy)
    if dy.shape != tuple(cache.shape):
        raise ValueError(f"dy has shape {dy.shape}, expected {tuple(cache.shape)}")
    return to_mc(dy)


# --------------------------------------------------------------------------
# Training mode
# --------------------------------------------------------------------------

def batch_norm_forward(x, weight, bias, eps):
    """Training-mode forward with batch statistics.

    Args:
        x: input of shape ``(N, C)`` or ``(N, C, *spatial)``, 2-D to 5-D.
        weight, bias: ``(C,)`` or None (affine=False: 1 and 0).
        eps: added to the variance before the square root.

    Returns:
        ``(y, cache)``: ``y`` float64 with ``x``'s shape, and a
        :class:`BatchNormCache` for :func:`batch_norm_backward`.

    The variance is the biased one (divide by M) computed in two passes --
    first the mean, then the mean of squared deviations -- never as
    ``E[x²] − E[x]²`` (see :func:`seed_variance` for why).
    """
    x = _as_f64(x)
    _check_input(x)
    shape = tuple(x.shape)
    C = shape[1]
    weight = _check_param(weight, C, "weight")
    bias = _check_param(bias, C, "bias")
    x2d = to_mc(x)
    M = x2d.shape[0]

    if M == 0:
        mean = np.zeros(C)
        var = np.zeros(C)
    else:
        mean = x2d.sum(axis=0) / M                 # pass 1
        var = ((x2d - mean) ** 2).sum(axis=0) / M  # pass 2: deviations, then square
    xhat, invstd, y2d = _normalize(x2d, mean, var, weight, bias, eps)

    cache = BatchNormCache(x=x2d, xhat=xhat, mean=mean, var=var, invstd=invstd,
                           weight=weight, has_bias=bias is not None, shape=shape,
                           M=M, C=C, eps=float(eps), training=True)
    return from_mc(y2d, shape), cache


def batch_norm_backward(dy, cache: BatchNormCache):
    """Closed-form training-mode backward.

    ::

        db_j  = Σ_i dy_ij
        dw_j  = Σ_i dy_ij · xhat_ij
        dx_ij = w_j · invstd_j / M · (M·dy_ij − db_j − xhat_ij · dw_j)

    Returns ``(dx, dweight, dbias)``: ``dx`` with the input's shape;
    ``dweight`` is None when the forward got ``weight=None``, ``dbias`` is
    None when it got ``bias=None``.
    """
    if not cache.training:
        raise ValueError("cache comes from batch_norm_eval_forward; "
                         "use batch_norm_eval_backward")
    dy2d = _dy_mc(dy, cache)
    db, dw, (dweight, dbias) = _param_grads(dy2d, cache)
    M = cache.M
    if M == 0:
        dx2d = np.zeros_like(dy2d)
    else:
        dx2d = cache.w() * cache.invstd / M * (M * dy2d - db - cache.xhat * dw)
    return from_mc(dx2d, cache.shape), dweight, dbias


# --------------------------------------------------------------------------
# The explicit Jacobian (teaching / cross-checking)
# --------------------------------------------------------------------------

def _check_jacobian_size(cache: BatchNormCache) -> None:
    n = cache.M * cache.M * cache.C
    if n > JACOBIAN_MAX_ELEMENTS:
        raise ValueError(
            f"the explicit Jacobian would have M·C·M = {n} elements "
            f"(limit {JACOBIAN_MAX_ELEMENTS}); use batch_norm_backward")


def xhat_jacobian(cache: BatchNormCache) -> np.ndarray:
    """The seed's tensor ``F`` of shape (M, C, M), corrected.

    ``F[i, j, k] = ∂ xhat[k, j] / ∂ x[i, j]`` (how normalized sample k of
    channel j moves when input sample i of that channel moves)::

        k == i:  (1 − 1/M) · invstd_j − xhat_ij²          · invstd_j / M
        k != i:     − 1/M  · invstd_j − xhat_kj · xhat_ij · invstd_j / M

    i.e. ``F[i, j, k] = invstd_j · (δ_ik − 1/M − xhat_kj · xhat_ij / M)``.

    Memory is O(M²·C): for cross-checking on small inputs only.
    """
    _check_jacobian_size(cache)
    M, s, xh = cache.M, cache.invstd, cache.xhat
    eye = np.eye(M)[:, None, :]                          # δ_ik as (M, 1, M)
    xi = xh[:, :, None]                                  # xhat_ij  -> (M, C, 1)
    xk = xh.T[None, :, :]                                # xhat_kj  -> (1, C, M)
    return s[None, :, None] * (eye - 1.0 / M - xk * xi / M)


def seed_xhat_jacobian(cache: BatchNormCache) -> np.ndarray:
    """The seed text's ``F``, literally as written -- WRONG off the diagonal.

    The seed sets every off-diagonal entry to ``diagonal − 1/σ`` with
    ``σ = sqrt(var + eps)``::

        F_seed[i, j, k != i] = F[i, j, i] − invstd_j
                             = −invstd_j/M − xhat_ij² · invstd_j / M

    which has ``xhat_ij²`` where ``xhat_kj · xhat_ij`` belongs.  Kept only to
    demonstrate the erratum (docs/derivation.md, "Errata in the seed texts").
    """
    _check_jacobian_size(cache)
    M, C, s, xh = cache.M, cache.C, cache.invstd, cache.xhat
    sigma = np.sqrt(cache.var + cache.eps)
    diag = (1.0 - 1.0 / M) * s - xh ** 2 * s / M         # (M, C): ∂xhat_i/∂x_i
    F = np.broadcast_to((diag - 1.0 / sigma)[:, :, None], (M, C, M)).copy()
    idx = np.arange(M)
    F[idx, :, idx] = diag
    return F


def _jacobian_apply(dy, cache: BatchNormCache, F_builder):
    if not cache.training:
        raise ValueError("the Jacobian form is for training mode (batch statistics)")
    dy2d = _dy_mc(dy, cache)
    _, _, (dweight, dbias) = _param_grads(dy2d, cache)
    F = F_builder(cache)
    # dx[i, j] = w_j · Σ_k dy[k, j] · F[i, j, k]
    dx2d = cache.w() * np.einsum("kj,ijk->ij", dy2d, F)
    return from_mc(dx2d, cache.shape), dweight, dbias


def jacobian_backward(dy, cache: BatchNormCache):
    """Training-mode backward through the explicit Jacobian ``F`` (corrected).

    ``dx[i, j] = w_j · Σ_k dy[k, j] · F[i, j, k]`` with ``F`` from
    :func:`xhat_jacobian`; ``dweight``/``dbias`` as in
    :func:`batch_norm_backward`.  Equal to the closed form up to rounding.

    Warning: builds an (M, C, M) float64 tensor -- O(M²·C) memory and time.
    A teaching and cross-checking tool; refuses inputs with more than
    ``JACOBIAN_MAX_ELEMENTS`` Jacobian entries.
    """
    return _jacobian_apply(dy, cache, xhat_jacobian)


def seed_jacobian_backward(dy, cache: BatchNormCache):
    """Like :func:`jacobian_backward` but with the seed's literal (wrong) ``F``.

    Gives wrong ``dx`` (``dweight``/``dbias`` are unaffected).  It exists only
    so tests and docs can show the erratum; see :func:`seed_xhat_jacobian`.
    """
    return _jacobian_apply(dy, cache, seed_xhat_jacobian)


# --------------------------------------------------------------------------
# Eval mode and running statistics
# --------------------------------------------------------------------------

def batch_norm_eval_forward(x, weight, bias, running_mean, running_var, eps):
    """Eval-mode forward: normalize with the given (running) statistics.

    Returns ``(y, cache)``; ``cache.mean``/``cache.var`` are the running
    statistics and ``cache.training`` is False.
    """
    x = _as_f64(x)
    _check_input(x)
    shape = tuple(x.shape)
    C = shape[1]
    weight = _check_param(weight, C, "weight")
    bias = _check_param(bias, C, "bias")
    mean = _check_param(running_mean, C, "running_mean")
    var = _check_param(running_var, C, "running_var")
    if mean is None or var is None:
        raise ValueError("eval mode needs running_mean and running_var")
    x2d = to_mc(x)
    xhat, invstd, y2d = _normalize(x2d, mean, var, weight, bias, eps)
    cache = BatchNormCache(x=x2d, xhat=xhat, mean=mean, var=var, invstd=invstd,
                           weight=weight, has_bias=bias is not None, shape=shape,
                           M=x2d.shape[0], C=C, eps=float(eps), training=False)
    return from_mc(y2d, shape), cache


def batch_norm_eval_backward(dy, cache: BatchNormCache):
    """Eval-mode backward: the statistics are constants, so ::

        dx_ij = w_j · invstd_j · dy_ij
        dw_j  = Σ_i dy_ij · xhat_ij
        db_j  = Σ_i dy_ij

    Returns ``(dx, dweight, dbias)`` with the same None rule as
    :func:`batch_norm_backward`.
    """
    if cache.training:
        raise ValueError("cache comes from batch_norm_forward; use batch_norm_backward")
    dy2d = _dy_mc(dy, cache)
    _, _, (dweight, dbias) = _param_grads(dy2d, cache)
    dx2d = cache.w() * cache.invstd * dy2d
    return from_mc(dx2d, cache.shape), dweight, dbias


def update_running_stats(running_mean, running_var, mean, var, M, momentum,
                         num_batches_tracked=None):
    """One running-statistics update, as ``nn.BatchNorm*d`` does in training.

    ::

        running_mean ← (1 − f) · running_mean + f · mean
        running_var  ← (1 − f) · running_var  + f · var · M / (M − 1)

    ``var`` is the biased batch variance (``cache.var``); the running variance
    tracks the *unbiased* one.  ``f = momentum``, or, when ``momentum`` is
    None, ``f = 1 / num_batches_tracked`` (a cumulative average; pass the
    counter *after* counting this batch, i.e. 1 on the first call).

    Returns new ``(running_mean, running_var)`` arrays; the inputs are not
    modified.  Raises ValueError when ``M < 2`` (no unbiased variance).
    """
    if M < 2:
        raise ValueError(f"the unbiased variance needs M >= 2 values per channel, got M={M}")
    if momentum is None:
        if not num_batches_tracked:
            raise ValueError("momentum=None needs num_batches_tracked >= 1")
        f = 1.0 / float(num_batches_tracked)
    else:
        f = float(momentum)
    rm, rv = _as_f64(running_mean), _as_f64(running_var)
    mean, var = _as_f64(mean), _as_f64(var)
    new_mean = (1.0 - f) * rm + f * mean
    new_var = (1.0 - f) * rv + f * var * (M / (M - 1.0))
    return new_mean, new_var


# --------------------------------------------------------------------------
# Variance in a given dtype: the stable formula and the seed's one
# --------------------------------------------------------------------------

def _sequential_sum(a2d: np.ndarray, dtype) -> np.ndarray:
    """Column sums accumulated left to right (i = 0, 1, ..., M−1) in ``dtype``,
    as a plain loop or a simple kernel would (no pairwise tricks)."""
    return np.cumsum(a2d.astype(dtype), axis=0, dtype=dtype)[-1]


def two_pass_variance(x, dtype=np.float64) -> np.ndarray:
    """Biased per-channel variance of ``(N, C, *)`` input, evaluated in ``dtype``:
    ``mean = Σx/M``, then ``Σ(x − mean)²/M``, sums accumulated sequentially."""
    x2d = to_mc(np.asarray(x)).astype(dtype)
    M = np.dtype(dtype).type(x2d.shape[0])
    mean = _sequential_sum(x2d, dtype) / M
    d = x2d - mean
    return _sequential_sum(d * d, dtype) / M


def seed_variance(x, dtype=np.float32) -> np.ndarray:
    """The seed's ``var = E[x²] − E[x]²`` per channel, evaluated in ``dtype``.

    Algebraically equal to the two-pass variance, numerically a disaster in
    float32 once the mean is large compared to the spread: both terms are
    ≈ mean², and their difference loses every digit that the rounding of
    ``E[x²]`` already destroyed (offset 1e3 with unit spread gives errors
    near 1, i.e. 100 %).  Kept only to demonstrate the erratum.
    """
    x2d = to_mc(np.asarray(x)).astype(dtype)
    M = np.dtype(dtype).type(x2d.shape[0])
    mean = _sequential_sum(x2d, dtype) / M
    mean_sq = _sequential_sum(x2d * x2d, dtype) / M
    return mean_sq - mean * mean


# --------------------------------------------------------------------------
# Batch norm + residual add + activation (docs/derivation.md, section 10)
# --------------------------------------------------------------------------

#: The activations the fused layers apply after the (residual) add.
ACTIVATIONS = ("identity", "relu", "leaky_relu")


def activation_slope(activation: str, negative_slope: float = 0.01) -> Optional[float]:
    """act(t) = t for t > 0, slope·t otherwise: the slope, or None for "identity".

    relu is slope 0. The slope must be >= 0: only then does the output's sign
    tell the input's, which is what lets the backward use the output alone.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, but got {activation!r}")
    if activation == "identity":
        return None
    if activation == "relu":
        return 0.0
    if not negative_slope >= 0.0:
        raise ValueError(f"negative_slope must be >= 0 (the backward reads the sign of the input from the "
                         f"output), but got {negative_slope}")
    return float(negative_slope)


def activation_forward(t, slope: Optional[float]) -> np.ndarray:
    """act(t): t where t > 0, slope·t elsewhere (t itself for identity)."""
    t = _as_f64(t)
    if slope is None:
        return t
    return np.where(t > 0, t, slope * t)


def activation_backward(dy, y, slope: Optional[float]) -> np.ndarray:
    """dt = dy · act'(t), with act'(t) read from the output y = act(t).

    For slope >= 0, y > 0 exactly when t > 0 (relu: y = max(t, 0); leaky:
    y = slope·t <= 0 for t <= 0), so y alone decides the derivative and t
    need not be kept. At t = 0 the derivative is taken as slope, as torch does.
    """
    dy = _as_f64(dy)
    if slope is None:
        return dy
    return np.where(_as_f64(y) > 0, dy, slope * dy)


def batch_norm_act_forward(x, weight, bias, eps, residual=None, activation="relu", negative_slope=0.01,
                           running_mean=None, running_var=None):
    """y = act(BN(x) + residual): training mode, or eval when running stats are given.

    Returns ``(y, cache)``; the cache holds the batch norm's cache, the
    output y (what the backward reads the activation's derivative from) and
    the slope.
    """
    slope = activation_slope(activation, negative_slope)
    if running_mean is None:
        t, bn_cache = batch_norm_forward(x, weight, bias, eps)
    else:
        t, bn_cache = batch_norm_eval_forward(x, weight, bias, running_mean, running_var, eps)
    if residual is not None:
        residual = _as_f64(residual)
        if residual.shape != t.shape:
            raise ValueError(f"residual has shape {residual.shape}, expected {t.shape}")
        t = t + residual
    y = activation_forward(t, slope)
    return y, {"bn": bn_cache, "y": y, "slope": slope, "has_residual": residual is not None}


def batch_norm_act_backward(dy, cache):
    """(dx, dweight, dbias, dresidual) of batch_norm_act_forward.

    dt = dy · act'(t) from the saved output; dresidual = dt (the add passes
    it on unchanged, None without a residual); then the batch norm backward
    of dt (training or eval, as the forward ran).
    """
    dt = activation_backward(dy, cache["y"], cache["slope"])
    bn_cache = cache["bn"]
    backward = batch_norm_backward if bn_cache.training else batch_norm_eval_backward
    dx, dweight, dbias = backward(dt, bn_cache)
    return dx, dweight, dbias, (dt if cache["has_residual"] else None)
