"""The fused layers beyond parity: gradients, errors, state, torch.compile, determinism, memory."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import torch_bn_manual as bnm
from helpers import in_layout, randn


def _away_from_kink(function, inputs, margin=1e-4):
    """The inputs, checked to keep every pre-activation value at least `margin` from 0."""
    with torch.no_grad():
        t = function(*inputs, activation="identity")
    assert t.abs().min() > margin, "resample: a value sits at the kink"
    return inputs


def _fused_function(backend, training, channels, generator, with_residual):
    running_mean = randn(channels, generator, torch.float64)
    running_var = randn(channels, generator, torch.float64).abs() + 0.5

    def fused(x, weight, bias, residual=None, activation="leaky_relu"):
        return bnm.batch_norm_act(x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-3,
                                  residual=residual, activation=activation, negative_slope=0.2, backend=backend)
    return fused


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_and_gradgradcheck(backend, training, layout, activation, generator):
    shape = (3, 2, 3, 2)
    x = in_layout(randn(shape, generator, torch.float64, 1.5, 0.3), layout).requires_grad_(True)
    weight = randn(2, generator, torch.float64, 0.3, 1.0).requires_grad_(True)
    bias = randn(2, generator, torch.float64).requires_grad_(True)
    residual = in_layout(randn(shape, generator, torch.float64), layout).requires_grad_(True)
    fused = _fused_function(backend, training, 2, generator, True)
    inputs = _away_from_kink(fused, (x, weight, bias, residual))

    def function(*args):
        return fused(*args, activation=activation)
    assert gradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert gradgradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_without_residual_or_affine(backend, generator):
    x = randn((4, 3, 2), generator, torch.float64, 1.5, 0.3).requires_grad_(True)
    fused = _fused_function(backend, True, 3, generator, False)
    _away_from_kink(fused, (x, None, None))
    assert gradcheck(lambda x: fused(x, None, None), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert gradgradcheck(lambda x: fused(x, None, None), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradient_at_the_kink_is_nns(backend):
    """t == 0 exactly (x at the mean, bias 0): nn's relu/leaky_relu take the derivative as the slope there."""
    x = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64).t().reshape(3, 1).requires_grad_(True)
    dy = torch.tensor([[0.3], [0.7], [1.1]], dtype=torch.float64)
    for activation, slope in (("relu", 0.0), ("leaky_relu", 0.25)):
        ours_x = x.detach().clone().requires_grad_(True)
        bnm.batch_norm_act(ours_x, None, None, training=True, activation=activation, negative_slope=slope,
                           backend=backend).backward(dy)
        t = F.batch_norm(x, None, None, training=True)
        (F.relu(t) if activation == "relu" else F.leaky_relu(t, slope)).backward(dy)
        torch.testing.assert_close(ours_x.grad, x.grad, rtol=1e-12, atol=1e-12)
        x.grad = None


ERRORS = [
    # (what, call arguments, exception, message)
    ("residual shape", dict(residual=torch.randn(4, 3, 5, 4)), RuntimeError, "residual must have the input's shape"),
    ("residual dtype", dict(residual=torch.randn(4, 3, 5, 5, dtype=torch.float64)), RuntimeError,
     "residual must have the input's dtype"),
    ("residual type", dict(residual=1.0), TypeError, "residual must be a Tensor"),
]


@pytest.mark.parametrize("what, kwargs, error, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_residual_raises_before_any_state_change(backend, what, kwargs, error, message):
    module = bnm.BatchNormAct2d(3, backend=backend)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(error, match=message):
        module(torch.randn(4, 3, 5, 5), **kwargs)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_plain_errors_are_nns(backend):
    """Wrong rank, wrong channel count, one value per channel: nn's exceptions, state untouched."""
    cases = [(torch.randn(4, 3), ValueError), (torch.randn(4, 5, 2, 2), RuntimeError),
             (torch.randn(1, 3, 1, 1), ValueError)]
    for x, error in cases:
        ours, ref = bnm.BatchNormAct2d(3, backend=backend), nn.BatchNorm2d(3)
        with pytest.raises(error) as ours_error:
            ours(x)
        with pytest.raises(error) as ref_error:
            ref(x)
        assert str(ours_error.value) == str(ref_error.value)
        assert ours.num_batches_tracked.item() == 0


def test_bad_activation_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        bnm.BatchNormAct2d(3, activation="gelu")
    with pytest.raises(ValueError, match="negative_slope must be >= 0"):
        bnm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=-0.1)
    with pytest.raises(ValueError, match="activation must be one of"):
        bnm.batch_norm_act(torch.randn(4, 3), None, None, training=True, activation="tanh")
    with pytest.raises(ValueError, match="backend must be one of"):
        bnm.BatchNormAct1d(3, backend="cuda")


def test_state_dict_and_class_are_nns():
    ours = bnm.BatchNormAct2d(5, activation="leaky_relu", negative_slope=0.2)
    ref = nn.BatchNorm2d(5)
    with torch.no_grad():
        ref.weight.uniform_()
        ref.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for name, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)
    assert "activation='leaky_relu', negative_slope=0.2" in repr(ours)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph(backend, momentum, generator):
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    eager = nn.ModuleDict({"conv": conv, "bn1": bnm.BatchNormAct2d(6, momentum=momentum, backend=backend),
                           "bn2": bnm.BatchNormAct2d(6, momentum=momentum, backend=backend,
                                                     activation="leaky_relu", negative_slope=0.1)})

    def run(m, x):
        h = m["bn1"](m["conv"](x))
        return m["bn2"](m["conv"](h[:, :3]), residual=h)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(lambda x: run(compiled_module, x), fullgraph=True, backend="aot_eager")
    for training in (True, True, False):
        eager.train(training)
        compiled_module.train(training)
        x = randn((4, 3, 5, 5), generator)
        out_e, out_c = run(eager, x), compiled(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
        if training:
            out_e.square().mean().backward()
            out_c.square().mean().backward()
    for a, b in zip(eager.parameters(), compiled_module.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_module.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bit_identical_across_runs(backend, dtype, layout, generator):
    shape = (16, 24, 20, 18)
    x = in_layout(randn(shape, generator, dtype, 3.0, 5.0), layout)
    z = in_layout(randn(shape, generator, dtype), layout)
    dy = in_layout(randn(shape, generator, dtype), layout)

    def run():
        module = bnm.BatchNormAct2d(24, backend=backend, dtype=torch.float32)
        xx, zz = x.clone().requires_grad_(True), z.clone().requires_grad_(True)
        y = module(xx, zz)
        y.backward(dy)
        return [y, xx.grad, zz.grad, module.weight.grad, module.bias.grad, module.running_mean, module.running_var]
    first = run()
    for _ in range(2):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


def _saved_bytes(function):
    """Bytes of the distinct tensors autograd saves while `function` runs (saved_tensors_hooks)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function()
    return sum(seen.values())


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_saves_no_more_than_nn_pair(backend, activation, with_residual, generator):
    """A fused layer keeps at most what nn's BatchNorm2d + (add) + ReLU keep for the backward."""
    x = randn((8, 16, 12, 12), generator).requires_grad_(True)
    z = randn((8, 16, 12, 12), generator).requires_grad_(True) if with_residual else None
    fused = bnm.BatchNormAct2d(16, backend=backend, activation=activation)
    bn = nn.BatchNorm2d(16)
    act = nn.ReLU() if activation == "relu" else nn.LeakyReLU(0.01)
    ours = _saved_bytes(lambda: fused(x, z))
    theirs = _saved_bytes(lambda: act(bn(x) if z is None else bn(x) + z))
    full = x.numel() * x.element_size()
    assert theirs >= 2 * full  # nn keeps the input and the activation's output (or input)
    assert ours <= theirs, f"fused saves {ours} bytes, nn's pair {theirs}"


def test_device_without_fused_kernels_runs_python_and_says_so(monkeypatch, generator):
    """A device without fused kernels in this build (ops.ACT_DEVICES), simulated on the CPU."""
    ops = pytest.importorskip("torch_bn_manual.ops")
    from torch_bn_manual import activation
    monkeypatch.setattr(ops, "ACT_DEVICES", frozenset())
    monkeypatch.setattr(activation, "_warned_no_fused_kernels", set())
    x = randn((4, 3, 5, 5), generator, torch.float64)
    with pytest.warns(RuntimeWarning, match="no fused batch norm \\+ activation kernels for device 'cpu'"):
        y = bnm.BatchNormAct2d(3, backend="cpp", dtype=torch.float64)(x)
    torch.testing.assert_close(y, F.relu(nn.BatchNorm2d(3, dtype=torch.float64)(x)))
