"""The two errata in the seed texts, and the numbers docs/derivation.md quotes.

(a) The seed's off-diagonal Jacobian entry uses xhat_i² where xhat_k·xhat_i
    belongs; the literal formula gives a wrong dx.
(b) var = E[x²] − E[x]² cancels catastrophically in float32.

The doc's demonstrations are recomputed here from the same seeds; the numbers
below are copied from docs/derivation.md (4 decimals there, so atol 1e-4).
"""

import numpy as np
import pytest
import torch

from torch_bn_manual import reference as R

EPS = 1e-5
DOC_ATOL = 1e-4


def rel_err(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


# ---------------------------------------------------------------- (a) Jacobian

@pytest.mark.parametrize("shape", [(2, 2, 2, 1), (6, 3), (3, 2, 5), (2, 3, 2, 2), (2, 2, 2, 2, 2)])
def test_seed_jacobian_is_wrong(shape):
    rng = np.random.default_rng(400 + sum(shape))
    x = rng.normal(size=shape) * 2 + 1
    dy = rng.normal(size=shape)
    w, b = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    _, cache = R.batch_norm_forward(x, w, b, EPS)
    dx, dw, db = R.batch_norm_backward(dy, cache)
    dxj, _, _ = R.jacobian_backward(dy, cache)
    dxs, dws, dbs = R.seed_jacobian_backward(dy, cache)

    assert rel_err(dxj, dx) <= 1e-10           # the corrected Jacobian is right
    assert rel_err(dxs, dx) > 0.05             # the seed's literal one is not
    assert np.array_equal(dws, dw) and np.array_equal(dbs, db)  # dw, db unaffected

    # The error is exactly "xhat_i² in place of xhat_k·xhat_i", k != i:
    #   dxs − dx = w·s/M · Σ_{k≠i} dy_k · (xhat_k·xhat_i − xhat_i²)
    M, s, xh = cache.M, cache.invstd, cache.xhat
    dy2d = R.to_mc(dy)
    diff = w * s / M * xh * ((dy2d * xh).sum(0) - dy2d * xh   # Σ_{k≠i} dy_k xhat_k
                              - xh * (dy2d.sum(0) - dy2d))    # xhat_i Σ_{k≠i} dy_k
    assert rel_err(R.to_mc(dxs) - R.to_mc(dx), diff) <= 1e-10


def test_seed_jacobian_entries_literally():
    rng = np.random.default_rng(401)
    _, cache = R.batch_norm_forward(rng.normal(size=(5, 2)), None, None, EPS)
    F, Fs = R.xhat_jacobian(cache), R.seed_xhat_jacobian(cache)
    M, s, xh = cache.M, cache.invstd, cache.xhat
    sigma = np.sqrt(cache.var + EPS)
    idx = np.arange(M)
    # same diagonal: (1 − 1/M)·s − xhat_i²·s/M
    assert np.allclose(F[idx, :, idx], (1 - 1 / M) * s - xh ** 2 * s / M, rtol=1e-13, atol=0)
    assert np.allclose(F[idx, :, idx], Fs[idx, :, idx], rtol=1e-14, atol=0)
    for i in range(M):
        for k in range(M):
            if k == i:
                continue
            # seed: dxhat_k/dx_i = dxhat_i/dx_i − 1/σ
            assert np.allclose(Fs[i, :, k], F[i, :, i] - 1 / sigma, rtol=1e-13, atol=1e-15)
            # correct: −s/M − xhat_k·xhat_i·s/M
            assert np.allclose(F[i, :, k], -s / M - xh[k] * xh[i] * s / M, rtol=1e-13, atol=1e-15)
    # the seed's rows sum to −s·xhat_i² instead of 0
    assert np.allclose(Fs.sum(axis=2), -s * xh ** 2, rtol=1e-12, atol=1e-14)
    assert np.abs(F.sum(axis=2)).max() < 1e-14


def test_sum_loss_gives_zero_gradient_but_not_with_seed_formula():
    # L = Σ y  =>  dy = 1 and the exact dx is 0; the seed gives −w·s·xhat².
    rng = np.random.default_rng(402)
    shape = (3, 2, 3)
    x = rng.normal(size=shape) * 3 - 2
    w, b = rng.normal(size=2), rng.normal(size=2)
    _, cache = R.batch_norm_forward(x, w, b, EPS)
    ones = np.ones(shape)
    dx, _, _ = R.batch_norm_backward(ones, cache)
    dxs, _, _ = R.seed_jacobian_backward(ones, cache)
    assert np.abs(dx).max() < 1e-13
    assert rel_err(R.to_mc(dxs), -w * cache.invstd * cache.xhat ** 2) <= 1e-12
    assert np.abs(dxs).max() > 0.1
    # and torch agrees with the closed form, not with the seed
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.batch_norm(xt, None, None, torch.from_numpy(w), torch.from_numpy(b),
                                   training=True, eps=EPS).sum().backward()
    assert np.abs(xt.grad.numpy()).max() < 1e-13


# ---------------------------------------------------------------- doc, section 4.4 and 8(a)

def worked_example():
    # exactly the code shown in docs/derivation.md, section 4.4
    rng = np.random.default_rng(2024)
    x = np.round(rng.normal(size=(2, 2, 2, 1)) * 2, 1)   # N=2, C=2, H=2, W=1
    dy = np.round(rng.normal(size=(2, 2, 2, 1)), 1)
    w = np.round(rng.normal(size=2), 1)
    b = np.round(rng.normal(size=2), 1)
    return x, dy, w, b


def test_doc_worked_example_numbers():
    x, dy, w, b = worked_example()
    assert np.array_equal(w, [-1.4, -0.4]) and np.array_equal(b, [-1.3, -0.8])
    assert np.array_equal(R.to_mc(x), [[2.1, 2.3], [3.3, -1.9], [-2.8, 1.7], [0.1, 1.0]])
    assert np.array_equal(R.to_mc(dy), [[1.8, 0.6], [0.8, -0.7], [-1.1, 0.0], [1.5, 0.8]])

    y, cache = R.batch_norm_forward(x, w, b, eps=1e-5)
    dx, dw, db = R.batch_norm_backward(dy, cache)
    close = lambda a, b: np.allclose(a, b, rtol=0, atol=DOC_ATOL)  # noqa: E731
    assert close(cache.mean, [0.6750, 0.7750])
    assert close(cache.var, [5.3319, 2.5969])
    assert close(cache.invstd, [0.4331, 0.6205])
    assert close(cache.xhat, [[0.6171, 0.9463], [1.1368, -1.6600],
                              [-1.5049, 0.5740], [-0.2490, 0.1396]])
    assert close(R.to_mc(y), [[-2.1640, -1.1785], [-2.8915, -0.1360],
                              [0.8069, -1.0296], [-0.9514, -0.8558]])
    assert close(db, [3.0000, 0.7000]) and close(dw, [3.3022, 1.8415])
    doc_dx = [[-0.3277, 0.0026], [0.5387, 0.0275], [0.3684, 0.1090], [-0.5794, -0.1392]]
    assert close(R.to_mc(dx), doc_dx)
    assert close(R.xhat_jacobian(cache)[:, 0, :],
                 [[0.2836, -0.1842, -0.0077, -0.0916],
                  [-0.1842, 0.1849, 0.0770, -0.0776],
                  [-0.0077, 0.0770, 0.0796, -0.1488],
                  [-0.0916, -0.0776, -0.1488, 0.3181]])

    # torch agrees (the doc says so)
    xt = torch.tensor(x, requires_grad=True)
    m = torch.nn.BatchNorm2d(2, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        m.bias.copy_(torch.from_numpy(b))
    m(xt).backward(torch.from_numpy(dy))
    assert rel_err(dx, xt.grad.numpy()) <= 1e-14

    # erratum (a), section 8
    assert close(R.seed_xhat_jacobian(cache)[:, 0, :],
                 [[0.2836, -0.1495, -0.1495, -0.1495],
                  [-0.2482, 0.1849, -0.2482, -0.2482],
                  [-0.3535, -0.3535, 0.0796, -0.3535],
                  [-0.1150, -0.1150, -0.1150, 0.3181]])
    dxs, _, _ = R.seed_jacobian_backward(dy, cache)
    assert close(R.to_mc(dxs), [[-0.4634, -0.0666], [0.5573, 0.3369],
                                [2.1515, 0.0578], [-0.4265, -0.1543]])
    assert abs(rel_err(dxs, dx) - 3.08) < 0.005
    dxs1, _, _ = R.seed_jacobian_backward(np.ones_like(dy), cache)
    assert close(R.to_mc(dxs1), [[0.2309, 0.2223], [0.7835, 0.6840],
                                 [1.3731, 0.0818], [0.0376, 0.0048]])


# ---------------------------------------------------------------- (b) cancellation

# docs/derivation.md, section 8(b): offset -> (exact, seed float32, two-pass float32)
DOC_VARIANCE_TABLE = {
    1e2: (0.954046, 0.958984, 0.954046),
    1e3: (0.954044, -0.125000, 0.954045),
    1e4: (0.954048, -232.0, 0.954086),
}


@pytest.mark.parametrize("offset", sorted(DOC_VARIANCE_TABLE))
def test_doc_variance_table(offset):
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal((1000, 1))).astype(np.float32)
    exact = R.two_pass_variance(x, np.float64)
    seed32 = R.seed_variance(x, np.float32)
    two32 = R.two_pass_variance(x, np.float32)
    assert seed32.dtype == np.float32 and two32.dtype == np.float32
    doc_exact, doc_seed, doc_two = DOC_VARIANCE_TABLE[offset]
    assert abs(exact[0] - doc_exact) < 1e-6
    assert abs(float(seed32[0]) - doc_seed) < 1e-6 * max(1.0, abs(doc_seed))
    assert abs(float(two32[0]) - doc_two) < 1e-6


def test_float32_cancellation_at_offset_1e3():
    # fresh data (not the doc's seed): the failure is generic, not a fluke
    rng = np.random.default_rng(500)
    x = (1e3 + rng.standard_normal((1000, 4))).astype(np.float32)
    exact = R.two_pass_variance(x, np.float64)
    err_seed = np.abs(R.seed_variance(x, np.float32) - exact)
    err_two = np.abs(R.two_pass_variance(x, np.float32) - exact)
    assert err_seed.max() > 0.1          # "errors near 1" on a variance near 1
    assert err_two.max() < 1e-5
    # with no offset both formulas are fine: it really is the offset
    z = rng.standard_normal((1000, 4)).astype(np.float32)
    assert np.abs(R.seed_variance(z, np.float32) - R.two_pass_variance(z, np.float64)).max() < 1e-5


def test_reference_forward_survives_offset_where_seed_formula_fails_in_float64():
    # docs/derivation.md, end of 8(b): 1e8 + N(0, 1), three channels of M = 1000
    rng = np.random.default_rng(0)
    x = 1e8 + rng.standard_normal((1000, 3))
    exact = R.two_pass_variance(x - 1e8, np.float64)   # x − 1e8 is exact here
    _, cache = R.batch_norm_forward(x, None, None, EPS)
    assert np.abs(cache.var - exact).max() / exact.max() < 1e-12
    seed64 = R.seed_variance(x, np.float64)
    assert np.array_equal(seed64, [-22.0, -10.0, 26.0])   # the doc's numbers
    assert np.abs(seed64 - exact).max() > 5
