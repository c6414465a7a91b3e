"""The NumPy reference against torch.nn batch norm (autograd), in float64.

Every test draws fresh random inputs from its own seeded generator; tolerances
are relative to the size of the expected value: rel = max|a − b| / max|b|.
"""

import numpy as np
import pytest
import torch

from torch_bn_manual import reference as R

TOL = 1e-10
EPS = 1e-5

NN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
      4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def rel_err(a, b):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a - b).max() / np.abs(b).max()


def make_module(C, affine, rng, eps=EPS, ndim=4, **kw):
    m = NN[ndim](C, eps=eps, affine=affine, dtype=torch.float64, **kw)
    if affine:  # non-trivial parameters, so that w and b really take part
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(rng.normal(size=C)))
            m.bias.copy_(torch.from_numpy(rng.normal(size=C)))
    return m


def params(m):
    if m.weight is None:
        return None, None
    return m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()


def random_input(shape, rng):
    # per-channel offsets and scales, so that channels differ
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    return (rng.normal(size=bshape) * 3 + rng.uniform(0.2, 2.0, size=bshape)
            * rng.normal(size=shape))


def check_train(shape, affine, seed, eps=EPS):
    rng = np.random.default_rng(seed)
    x = random_input(shape, rng)
    dy = rng.normal(size=shape)
    m = make_module(shape[1], affine, rng, eps=eps, ndim=len(shape))
    m.train()
    w, b = params(m)

    xt = torch.tensor(x, requires_grad=True)
    yt = m(xt)
    yt.backward(torch.from_numpy(dy))

    y, cache = R.batch_norm_forward(x, w, b, eps)
    dx, dw, db = R.batch_norm_backward(dy, cache)

    assert y.shape == x.shape and dx.shape == x.shape
    assert rel_err(y, yt) <= TOL
    assert rel_err(dx, xt.grad) <= TOL
    if affine:
        assert rel_err(dw, m.weight.grad) <= TOL
        assert rel_err(db, m.bias.grad) <= TOL
    else:
        assert dw is None and db is None
    return cache


# The seed's worked example: N=2, C=2, H=2, W=1.
@pytest.mark.parametrize("affine", [True, False])
def test_seed_example_matches_batchnorm2d(affine):
    cache = check_train((2, 2, 2, 1), affine, seed=11)
    assert cache.M == 4 and cache.C == 2


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("affine", [True, False])
def test_random_shapes_match_nn(ndim, affine):
    rng = np.random.default_rng(100 + 10 * ndim + affine)
    for trial in range(3):
        N = int(rng.integers(2, 6))
        C = int(rng.integers(1, 5))
        spatial = tuple(int(s) for s in rng.integers(1, 5, size=ndim - 2))
        check_train((N, C) + spatial, affine, seed=int(rng.integers(1 << 30)))


def test_other_eps_and_large_offset_match_nn():
    # eps far from the default, and inputs with a mean much larger than their spread
    check_train((3, 4, 5), True, seed=5, eps=0.3)
    rng = np.random.default_rng(6)
    x = 1e6 + rng.normal(size=(4, 3, 3, 3))
    y, cache = R.batch_norm_forward(x, None, None, EPS)
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True, eps=EPS)
    assert rel_err(y, yt) <= 1e-8


def test_forward_statistics_are_two_pass_and_biased():
    rng = np.random.default_rng(7)
    x = random_input((3, 2, 4, 4), rng)
    _, cache = R.batch_norm_forward(x, None, None, EPS)
    x2d = np.moveaxis(x, 1, -1).reshape(-1, 2)
    assert np.allclose(cache.x, x2d, rtol=0, atol=0)
    assert np.allclose(cache.mean, x2d.mean(0), rtol=1e-14, atol=0)
    assert np.allclose(cache.var, x2d.var(0), rtol=1e-13, atol=0)  # ddof=0
    assert np.allclose(cache.invstd, 1 / np.sqrt(x2d.var(0) + EPS), rtol=1e-13)
    # xhat has zero mean and (almost) unit variance per channel
    assert np.abs(cache.xhat.mean(0)).max() < 1e-14
    assert np.abs((cache.xhat ** 2).mean(0) - cache.var / (cache.var + EPS)).max() < 1e-13


def test_view_round_trip_all_ranks():
    rng = np.random.default_rng(8)
    for shape in [(3, 4), (3, 4, 5), (2, 4, 3, 5), (2, 4, 2, 3, 2)]:
        x = rng.normal(size=shape)
        x2d = R.to_mc(x)
        assert x2d.shape == (int(np.prod(shape)) // shape[1], shape[1])
        assert np.array_equal(R.from_mc(x2d, shape), x)
        # column j holds exactly channel j
        assert np.array_equal(np.sort(x2d[:, 1]), np.sort(x[:, 1].ravel()))


def test_accepts_torch_tensors_and_only_weight_or_bias():
    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.normal(size=(4, 3, 2)))
    w = rng.normal(size=3)
    b = rng.normal(size=3)
    for wi, bi in [(w, None), (None, b)]:
        xt = x.clone().requires_grad_(True)
        wt = None if wi is None else torch.tensor(wi, requires_grad=True)
        bt = None if bi is None else torch.tensor(bi, requires_grad=True)
        yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
        dy = rng.normal(size=(4, 3, 2))
        yt.backward(torch.from_numpy(dy))
        y, cache = R.batch_norm_forward(x, wi, bi, EPS)
        dx, dw, db = R.batch_norm_backward(torch.from_numpy(dy), cache)
        assert rel_err(y, yt) <= TOL and rel_err(dx, xt.grad) <= TOL
        assert (dw is None) == (wi is None) and (db is None) == (bi is None)
        if wi is not None:
            assert rel_err(dw, wt.grad) <= TOL
        if bi is not None:
            assert rel_err(db, bt.grad) <= TOL


def test_input_checks():
    rng = np.random.default_rng(10)
    with pytest.raises(ValueError):
        R.batch_norm_forward(rng.normal(size=5), None, None, EPS)
    with pytest.raises(ValueError):
        R.batch_norm_forward(rng.normal(size=(2, 2, 2, 2, 2, 2)), None, None, EPS)
    with pytest.raises(ValueError):
        R.batch_norm_forward(rng.normal(size=(4, 3)), rng.normal(size=2), None, EPS)
    _, cache = R.batch_norm_forward(rng.normal(size=(4, 3)), None, None, EPS)
    with pytest.raises(ValueError):
        R.batch_norm_backward(rng.normal(size=(4, 2)), cache)
    with pytest.raises(ValueError):
        R.batch_norm_eval_backward(rng.normal(size=(4, 3)), cache)


def test_empty_batch_convention():
    y, cache = R.batch_norm_forward(np.zeros((0, 3, 2)), np.ones(3), np.zeros(3), EPS)
    assert y.shape == (0, 3, 2)
    assert np.array_equal(cache.mean, np.zeros(3)) and np.array_equal(cache.var, np.zeros(3))
    dx, dw, db = R.batch_norm_backward(np.zeros((0, 3, 2)), cache)
    assert dx.shape == (0, 3, 2) and np.array_equal(dw, np.zeros(3)) and np.array_equal(db, np.zeros(3))


# ---------------------------------------------------------------- Jacobian

@pytest.mark.parametrize("shape", [(2, 2, 2, 1), (5, 3), (3, 2, 4), (2, 3, 2, 3), (1, 2, 2, 2, 3)])
def test_jacobian_backward_equals_closed_form(shape):
    rng = np.random.default_rng(sum(shape) * 31 + len(shape))
    x = random_input(shape, rng)
    dy = rng.normal(size=shape)
    w, b = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    _, cache = R.batch_norm_forward(x, w, b, EPS)
    dx, dw, db = R.batch_norm_backward(dy, cache)
    dxj, dwj, dbj = R.jacobian_backward(dy, cache)
    assert rel_err(dxj, dx) <= TOL
    assert np.array_equal(dwj, dw) and np.array_equal(dbj, db)


def test_xhat_jacobian_matches_autograd_and_its_invariants():
    rng = np.random.default_rng(12)
    M, C = 6, 3
    x = random_input((M, C), rng)
    _, cache = R.batch_norm_forward(x, None, None, EPS)
    F = R.xhat_jacobian(cache)
    assert F.shape == (M, C, M)

    def xhat(t):
        mu = t.mean(0)
        return (t - mu) / torch.sqrt(((t - mu) ** 2).mean(0) + EPS)

    J = torch.autograd.functional.jacobian(xhat, torch.from_numpy(x)).numpy()  # (M, C, M, C)
    # F[i, j, k] = d xhat[k, j] / d x[i, j]  =  J[k, j, i, j]
    expected = np.einsum("kjij->ijk", J)
    assert rel_err(F, expected) <= TOL
    # channels never interact
    off = J.copy()
    for j in range(C):
        off[:, j, :, j] = 0
    assert np.abs(off).max() == 0
    # symmetric, zero row sums
    assert np.abs(F - F.transpose(2, 1, 0)).max() <= 1e-15 * np.abs(F).max() * M
    assert np.abs(F.sum(axis=2)).max() <= 1e-14 * np.abs(F).max() * M


def test_jacobian_refuses_huge_inputs():
    rng = np.random.default_rng(13)
    _, cache = R.batch_norm_forward(rng.normal(size=(9000, 1)), None, None, EPS)
    with pytest.raises(ValueError):
        R.jacobian_backward(rng.normal(size=(9000, 1)), cache)


# ---------------------------------------------------------------- eval mode

@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_matches_nn(ndim, affine):
    rng = np.random.default_rng(200 + 10 * ndim + affine)
    shape = (3, 4) + (2, 3, 2)[: ndim - 2]
    C = shape[1]
    x = random_input(shape, rng)
    dy = rng.normal(size=shape)
    m = make_module(C, affine, rng, ndim=ndim)
    rm, rv = rng.normal(size=C), rng.uniform(0.1, 3.0, size=C)
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(rm))
        m.running_var.copy_(torch.from_numpy(rv))
    m.eval()
    w, b = params(m)

    xt = torch.tensor(x, requires_grad=True)
    yt = m(xt)
    yt.backward(torch.from_numpy(dy))
    assert np.array_equal(m.running_mean.numpy(), rm)  # untouched in eval

    y, cache = R.batch_norm_eval_forward(x, w, b, rm, rv, EPS)
    dx, dw, db = R.batch_norm_eval_backward(dy, cache)
    assert not cache.training
    assert rel_err(y, yt) <= TOL
    assert rel_err(dx, xt.grad) <= TOL
    bshape = (1, C) + (1,) * (ndim - 2)
    w_or_1 = np.ones(C) if w is None else w
    assert rel_err(dx, (w_or_1 / np.sqrt(rv + EPS)).reshape(bshape) * dy) <= TOL
    if affine:
        assert rel_err(dw, m.weight.grad) <= TOL
        assert rel_err(db, m.bias.grad) <= TOL
    else:
        assert dw is None and db is None
    with pytest.raises(ValueError):
        R.batch_norm_backward(dy, cache)


# ---------------------------------------------------------------- running stats

@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_match_nn(momentum):
    rng = np.random.default_rng(300 if momentum is None else 301)
    C = 3
    m = make_module(C, True, rng, momentum=momentum)
    m.train()
    rm, rv = np.zeros(C), np.ones(C)
    means, uvars = [], []
    for n in range(1, 5):
        shape = (int(rng.integers(2, 5)), C, int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        x = random_input(shape, rng)
        with torch.no_grad():
            m(torch.from_numpy(x))
        _, cache = R.batch_norm_forward(x, None, None, EPS)
        rm, rv = R.update_running_stats(rm, rv, cache.mean, cache.var, cache.M, momentum,
                                        num_batches_tracked=n)
        means.append(cache.mean)
        uvars.append(cache.var * cache.M / (cache.M - 1))
        assert int(m.num_batches_tracked) == n
        assert rel_err(rm, m.running_mean) <= TOL
        assert rel_err(rv, m.running_var) <= TOL
    if momentum is None:  # a cumulative average of the batch statistics
        assert rel_err(rm, np.mean(means, axis=0)) <= TOL
        assert rel_err(rv, np.mean(uvars, axis=0)) <= TOL


def test_running_stats_checks_and_no_mutation():
    rng = np.random.default_rng(14)
    rm, rv = rng.normal(size=2), rng.uniform(0.5, 2, size=2)
    rm0, rv0 = rm.copy(), rv.copy()
    R.update_running_stats(rm, rv, rng.normal(size=2), rng.uniform(size=2), 5, 0.1)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)
    with pytest.raises(ValueError):
        R.update_running_stats(rm, rv, rm, rv, 1, 0.1)
    with pytest.raises(ValueError):
        R.update_running_stats(rm, rv, rm, rv, 5, None)


def test_dx_has_no_component_along_shift_and_stretch():
    # docs/derivation.md, 4.3: Σ dx = 0 and Σ dx·xhat = w·s·dw·(1 − ρ), ρ = v/(v + eps)
    rng = np.random.default_rng(15)
    shape = (4, 3, 5)
    x = random_input(shape, rng)
    dy = rng.normal(size=shape)
    w = rng.normal(size=3)
    eps = 0.5  # large, so that 1 − ρ is far from 0
    _, cache = R.batch_norm_forward(x, w, None, eps)
    dx, dw, _ = R.batch_norm_backward(dy, cache)
    dx2d = R.to_mc(dx)
    rho = cache.var / (cache.var + eps)
    assert np.abs(dx2d.sum(0)).max() <= 1e-13 * np.abs(dx2d).max() * cache.M
    expected = w * cache.invstd * dw * (1 - rho)
    assert rel_err((dx2d * cache.xhat).sum(0), expected) <= 1e-12
