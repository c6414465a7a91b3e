"""torch.jit.script: a model with our layers scripts, and the scripted model equals eager.

Train and eval, outputs, input and parameter gradients, running statistics
and num_batches_tracked, for every backend and the layer options that change
the forward's path; the scripted model also survives torch.jit.save/load.
"""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm

from helpers import randn, rel_err

OPTIONS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"bias": False},
]


def _net(backend, options):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), bnm.BatchNorm2d(6, backend=backend, **options), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5), bnm.BatchNorm1d(5, backend=backend, **options))


def _step(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 2, out.numel()).view_as(out)).square().sum().backward()
    return out.detach(), x.grad


def _compare(eager, scripted, generator, layout=torch.contiguous_format):
    for training in (True, True, False, True):
        eager.train(training)
        scripted.train(training)
        x = randn((6, 3, 6, 6), generator, scale=1.5, offset=0.3).contiguous(memory_format=layout)
        (out_e, dx_e), (out_s, dx_s) = _step(eager, x), _step(scripted, x)
        assert rel_err(out_s, out_e) < 1e-5 and rel_err(dx_s, dx_e) < 1e-5, training
        assert out_s.is_contiguous(memory_format=layout) == out_e.is_contiguous(memory_format=layout)
    eager_state, scripted_state = eager.state_dict(), scripted.state_dict()
    assert eager_state.keys() == scripted_state.keys()
    for key, value in eager_state.items():
        assert rel_err(scripted_state[key], value) < 1e-5 if value.is_floating_point() \
            else torch.equal(scripted_state[key], value), key
    # A gradient that is zero in exact arithmetic (a conv bias before training-mode BN) is
    # rounding noise: errors are measured against the largest gradient of the model.
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, p), q in zip(eager.named_parameters(), scripted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_scripted_model_equals_eager(backend, options, generator):
    eager = _net(backend, options)
    scripted = torch.jit.script(copy.deepcopy(eager))
    _compare(eager, scripted, generator)


@pytest.mark.parametrize("chosen", ["python", "cpp", "auto"])
def test_scripted_channels_last(chosen, generator):
    if chosen not in bnm.available_backends() + ["auto"]:
        pytest.skip("the compiled extension is not built")
    eager = _net(chosen, {})
    scripted = torch.jit.script(copy.deepcopy(eager))
    _compare(eager, scripted, generator, layout=torch.channels_last)


def test_scripted_model_survives_save_and_load(backend, generator):
    eager = _net(backend, {"momentum": None})
    _compare(eager, _scripted_saved_and_loaded(eager), generator)


def _scripted_saved_and_loaded(eager):
    """torch.jit.script of a copy of eager, through torch.jit.save and torch.jit.load."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.save's own notice
        torch.jit.save(torch.jit.script(copy.deepcopy(eager)), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_scripting_leaves_the_eager_model_as_it_was(backend):
    model = _net(backend, {})
    torch.jit.script(model)
    assert type(model[1]) is bnm.BatchNorm2d and type(model[5]) is bnm.BatchNorm1d


def test_scripted_double_backward(backend, generator):
    """create_graph=True through the scripted layer: second derivatives equal eager's."""
    eager = bnm.BatchNorm2d(3, backend=backend).double()
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = randn((4, 3, 3, 3), generator, dtype=torch.float64)
    results = []
    for model in (eager, scripted):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model(xi).pow(3).sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), xi)
        results.append(ggx)
    assert rel_err(results[1], results[0]) < 1e-9


def test_scripted_training_error_before_state_changes(backend):
    scripted = torch.jit.script(bnm.BatchNorm1d(3, backend=backend))
    with pytest.raises(Exception, match="Expected more than 1 value per channel when training"):
        scripted(torch.randn(1, 3))
    assert scripted.num_batches_tracked.item() == 0


# ---------------------------------------------------------------------------
# The fused layers (BatchNormAct*d): the same scripted forward, with a residual and an activation
# ---------------------------------------------------------------------------

FUSED_OPTIONS = [option for option in OPTIONS if "bias" not in option]  # the fused layers have no bias= switch


class _FusedNet(nn.Module):
    """Conv -> fused (activation under test); Conv -> fused relu + residual; Linear -> fused 1d."""

    def __init__(self, backend, options, activation, slope):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = bnm.BatchNormAct2d(6, backend=backend, activation=activation, negative_slope=slope, **options)
        self.bn2 = bnm.BatchNormAct2d(6, backend=backend, **options)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.bn3 = bnm.BatchNormAct1d(5, backend=backend, activation=activation, negative_slope=slope, **options)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = self.bn2(self.conv2(h), h)
        return self.bn3(self.fc(h.flatten(1)))


ACTS = [("relu", 0.01), ("leaky_relu", 0.2), ("identity", 0.01)]


@pytest.mark.parametrize("activation, slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("options", FUSED_OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_scripted_fused_model_equals_eager(backend, options, activation, slope, generator):
    eager = _FusedNet(backend, options, activation, slope)
    scripted = torch.jit.script(copy.deepcopy(eager))
    _compare(eager, scripted, generator)


@pytest.mark.parametrize("chosen", ["python", "cpp", "auto"])
def test_scripted_fused_channels_last_and_save_load(chosen, generator):
    if chosen not in bnm.available_backends() + ["auto"]:
        pytest.skip("the compiled extension is not built")
    eager = _FusedNet(chosen, {"momentum": None}, "leaky_relu", 0.1)
    _compare(eager, torch.jit.script(copy.deepcopy(eager)), generator, layout=torch.channels_last)
    eager = _FusedNet(chosen, {"momentum": None}, "leaky_relu", 0.1)
    _compare(eager, _scripted_saved_and_loaded(eager), generator)


def test_scripted_fused_runs_the_compiled_ops_where_eager_does(generator):
    """cpp: the scripted graph calls the fused ops; python: it does not."""
    for chosen in bnm.available_backends():
        graph = str(torch.jit.script(bnm.BatchNormAct2d(3, backend=chosen)).inlined_graph)
        assert ("torch_bn_manual::batch_norm_act_train_forward" in graph) == (chosen == "cpp"), chosen


def test_scripted_fused_double_backward(backend, generator):
    """create_graph=True through the scripted fused layer: second derivatives (input and residual) equal eager's."""
    eager = bnm.BatchNormAct2d(3, backend=backend, activation="leaky_relu", negative_slope=0.2).double()
    scripted = torch.jit.script(copy.deepcopy(eager))
    x, z, dy = (randn((4, 3, 3, 3), generator, dtype=torch.float64) for _ in range(3))
    results = []
    for model in (eager, scripted):
        xi, zi = x.clone().requires_grad_(), z.clone().requires_grad_()
        gx, gz = torch.autograd.grad((model(xi, zi) * dy).sum(), (xi, zi), create_graph=True)
        results.append(torch.autograd.grad((gx * gx.detach().cos()).sum() + gz.square().sum(), (xi, zi),
                                           allow_unused=True, materialize_grads=True))
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-9


RESIDUAL_ERRORS = [
    ("shape", lambda x: torch.randn(4, 3, 5, 4), "residual must have the input's shape (4, 3, 5, 5), "
                                                  "but got (4, 3, 5, 4)"),
    ("rank", lambda x: torch.randn(5), "residual must have the input's shape (4, 3, 5, 5), but got (5,)"),
    ("dtype", lambda x: x.double(), "residual must have the input's dtype torch.float32, but got torch.float64"),
]


@pytest.mark.parametrize("what, make, message", RESIDUAL_ERRORS, ids=[e[0] for e in RESIDUAL_ERRORS])
def test_scripted_fused_errors_are_eagers_before_state_changes(backend, what, make, message):
    eager = bnm.BatchNormAct2d(3, backend=backend)
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(4, 3, 5, 5)
    for model in (eager, scripted):
        with pytest.raises(Exception) as info:
            model(x, make(x))
        assert message in str(info.value), (model is eager, str(info.value))
        assert model.num_batches_tracked.item() == 0
    with pytest.raises(Exception, match="Expected more than 1 value per channel when training"):
        scripted(torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1))
    assert scripted.num_batches_tracked.item() == 0


def test_scripted_fused_empty_batch_as_eager(backend):
    eager = bnm.BatchNormAct2d(3, backend=backend, activation="leaky_relu")
    scripted = torch.jit.script(copy.deepcopy(eager))
    x, z = torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4)
    assert scripted(x, z).shape == eager(x, z).shape == x.shape
    assert scripted.num_batches_tracked.item() == eager.num_batches_tracked.item() == 1
