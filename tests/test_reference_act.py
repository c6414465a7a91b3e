"""The fused reference (batch norm + residual + activation) against torch.nn autograd, in float64."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_bn_manual import reference as R

NN_ACT = {
    "identity": lambda t, s: t,
    "relu": lambda t, s: F.relu(t),
    "leaky_relu": lambda t, s: F.leaky_relu(t, s),
}


def rel_err(a, b):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", list(NN_ACT))
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 4, 5, 6), (2, 3, 4, 3, 2)])
def test_fused_reference_matches_nn(shape, activation, residual, training):
    rng = np.random.default_rng(abs(hash((shape, activation, residual, training))) % 2**32)
    C = shape[1]
    slope = 0.2
    x = torch.from_numpy(rng.normal(size=shape) * 2 + 0.5).requires_grad_(True)
    z = torch.from_numpy(rng.normal(size=shape)).requires_grad_(True) if residual else None
    w = torch.from_numpy(rng.normal(size=C)).requires_grad_(True)
    b = torch.from_numpy(rng.normal(size=C)).requires_grad_(True)
    rm, rv = torch.from_numpy(rng.normal(size=C)), torch.from_numpy(rng.random(C) + 0.5)
    dy = torch.from_numpy(rng.normal(size=shape))
    t = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
    if z is not None:
        t = t + z
    y = NN_ACT[activation](t, slope)
    y.backward(dy)
    stats = {} if training else {"running_mean": rm.numpy(), "running_var": rv.numpy()}
    ours, cache = R.batch_norm_act_forward(x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), 1e-5,
                                           None if z is None else z.detach().numpy(), activation, slope, **stats)
    dx, dw, db, dz = R.batch_norm_act_backward(dy.numpy(), cache)
    assert rel_err(ours, y) < 1e-12
    assert rel_err(dx, x.grad) < 1e-10
    assert rel_err(dw, w.grad) < 1e-10 and rel_err(db, b.grad) < 1e-10
    if z is None:
        assert dz is None
    else:
        assert rel_err(dz, z.grad) < 1e-12


def test_mask_from_output_equals_mask_from_input():
    """For slope >= 0, act'(t) read from y = act(t) is act'(t) read from t, zeros included."""
    rng = np.random.default_rng(3)
    t = np.concatenate([rng.normal(size=1000), [0.0, -0.0, 1e-300, -1e-300]])
    dy = rng.normal(size=t.shape)
    for slope in (0.0, 0.01, 0.5, 1.0, 3.0):
        from_t = np.where(t > 0, dy, slope * dy)
        assert np.array_equal(R.activation_backward(dy, R.activation_forward(t, slope), slope), from_t)


def test_activation_arguments_rejected():
    with pytest.raises(ValueError, match="activation must be one of"):
        R.activation_slope("gelu")
    with pytest.raises(ValueError, match="negative_slope must be >= 0"):
        R.activation_slope("leaky_relu", -0.1)
    assert R.activation_slope("relu", 0.3) == 0.0 and R.activation_slope("identity") is None
