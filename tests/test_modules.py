"""Drop-in behaviour: class hierarchy, repr, state_dict both ways, convert_batchnorm."""
import copy

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm
from helpers import randn

PAIRS = [(bnm.BatchNorm1d, nn.BatchNorm1d), (bnm.BatchNorm2d, nn.BatchNorm2d), (bnm.BatchNorm3d, nn.BatchNorm3d)]


@pytest.mark.parametrize("ours_cls,nn_cls", PAIRS)
def test_subclass_repr_and_state_dict_both_ways(ours_cls, nn_cls, generator):
    ours, ref = ours_cls(5, momentum=None), nn_cls(5, momentum=None)
    assert isinstance(ours, nn_cls) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert repr(ours) == repr(ref)  # the default backend adds nothing
    assert "backend='python'" in repr(ours_cls(5, backend="python"))
    with torch.no_grad():
        for tensor in (ref.weight, ref.bias, ref.running_mean):
            tensor.copy_(randn(5, generator))
        ref.running_var.copy_(randn(5, generator).abs())
        ref.num_batches_tracked.fill_(7)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn_cls(5, momentum=None)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value) and torch.equal(back.state_dict()[key], value), key
    assert list(ours.state_dict()) == list(ref.state_dict())


class _Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=None)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


def small_resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         _Block(8), _Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.BatchNorm1d(8), nn.Linear(8, 4))


def test_convert_keeps_outputs_and_trains_identically(backend, generator):
    torch.manual_seed(0)
    reference = small_resnet().double()
    converted = bnm.convert_batchnorm(copy.deepcopy(reference), backend=backend)
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds and all(k in (bnm.BatchNorm1d, bnm.BatchNorm2d) for k in kinds)
    assert all(m.backend == backend for m in converted.modules() if isinstance(m, bnm.BatchNorm2d))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, converted)]
    for step in range(4):
        x = randn((6, 3, 8, 8), generator, torch.float64)
        target = torch.randint(0, 4, (6,), generator=generator)
        losses = []
        for model, optimizer in zip((reference, converted), optimizers):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-12, f"step {step}: {losses}"
    for (name, a), (_, b) in zip(reference.state_dict().items(), converted.state_dict().items()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-12), name
    reference.eval()
    converted.eval()
    x = randn((3, 3, 8, 8), generator, torch.float64)
    assert torch.allclose(reference(x), converted(x), rtol=1e-10, atol=1e-12)


def test_convert_shares_parameters_and_keeps_mode():
    layer = nn.BatchNorm2d(4).eval()
    layer.weight.requires_grad_(False)
    converted = bnm.convert_batchnorm(layer, backend="python")
    assert type(converted) is bnm.BatchNorm2d and converted is not layer
    assert converted.weight is layer.weight and converted.running_mean is layer.running_mean
    assert not converted.training and not converted.weight.requires_grad
    assert bnm.convert_batchnorm(converted, backend="auto") is converted and converted.backend == "auto"
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert bnm.convert_batchnorm(model) is model and type(model[1]) is bnm.BatchNorm1d


def test_available_backends_lists_python_first():
    backends = bnm.available_backends()
    assert backends[0] == "python" and set(backends) <= {"python", "cpp"}
