"""fuse_activations on ResNets with torchvision's layout: every spelling fused, same outputs and training."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_bn_manual as bnm
from resnets import SPELLINGS, bottleneck_resnet, resnet18

# stem + per block: BasicBlock bn1→relu, bn2→add→relu; Bottleneck bn1, bn2 →relu, bn3→add→relu
MODELS = {"resnet18": (resnet18, 1 + 8 * 2), "bottleneck": (bottleneck_resnet, 1 + 8 * 3)}


# Small tensors: one thread avoids OpenMP start-up and barrier costs that dominate here.
pytestmark = pytest.mark.usefixtures("one_thread")


def _fused(report):
    return [line for line in report if "not fused" not in line]


def _sgd_steps(model, inputs, targets, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outputs = []
    for x, t in zip(inputs, targets):
        optimizer.zero_grad()
        out = model(x)
        F.cross_entropy(out, t).backward()
        optimizer.step()
        outputs.append(out.detach())
    return outputs


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(MODELS))
def test_resnet_fused_trains_like_unfused(backend, name, memory_format):
    """Fused against the unfused model with our batch norm (tight) and nn's (training amplifies roundings)."""
    make, expected = MODELS[name]
    torch.manual_seed(0)
    reference = make(width=4, spellings=SPELLINGS).double().to(memory_format=memory_format)
    unfused = bnm.convert_batchnorm(copy.deepcopy(reference), backend)
    fused = bnm.fuse_activations(bnm.convert_batchnorm(copy.deepcopy(reference), backend), backend)
    assert len(_fused(fused.fusion_report)) == expected and len(fused.fusion_report) == expected
    assert sum(isinstance(m, bnm.BatchNormAct2d) for m in fused.modules()) == expected
    assert list(fused.state_dict()) == list(reference.state_dict())
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 3, 24, 24, generator=gen, dtype=torch.float64).to(memory_format=memory_format)
              for _ in range(3)]
    targets = [torch.randint(0, 10, (4,), generator=gen) for _ in range(3)]
    runs = [_sgd_steps(model, inputs, targets) for model in (fused, unfused, reference)]
    for (a, b, c) in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8)
    for (key, a), (_, b), (_, c) in zip(fused.state_dict().items(), unfused.state_dict().items(),
                                        reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=key)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8, msg=key)
    for model in (fused, unfused):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(inputs[0]), unfused(inputs[0]), rtol=1e-10, atol=1e-12)


def test_parameters_and_buffers_are_shared():
    torch.manual_seed(0)
    model = resnet18(width=8)
    fused = bnm.fuse_activations(model)
    ours, theirs = dict(fused.named_parameters()), dict(model.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)
    buffers = dict(model.named_buffers())
    assert all(b is buffers[k] for k, b in fused.named_buffers())
    assert isinstance(fused.get_submodule("layer1.0.bn2"), nn.BatchNorm2d)  # nn's class, still
    assert fused.training and isinstance(model.layer1[0].bn2, nn.BatchNorm2d)
    assert type(model.layer1[0].bn2) is nn.BatchNorm2d  # the original model is left alone


class _Unfusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.BatchNorm2d(4)
        self.twice = nn.BatchNorm2d(4)
        self.leaky = nn.BatchNorm2d(4)
        self.plain = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.shared(x)
        b = F.relu(a) + a                                # the batch norm output has two users
        c = F.relu(self.twice(x)) + F.relu(self.twice(b))  # one module called twice
        d = F.leaky_relu(self.leaky(c), -0.5)            # a negative slope
        return torch.relu(self.plain(d))                 # fusable


def test_unfusable_patterns_stay_and_are_reported(caplog):
    model = _Unfusable()
    with caplog.at_level(logging.INFO, logger="torch_bn_manual"):
        fused = bnm.fuse_activations(model)
    report = "\n".join(fused.fusion_report)
    assert "shared: not fused, its output has 2 users" in report
    assert "twice: not fused, the module is called 2 times" in report
    assert "leaky: not fused, negative_slope -0.5 < 0" in report
    assert "plain: fused with relu" in report
    assert "not fused" in caplog.text
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(fused(x), model(x))


def test_untraceable_model_is_returned_unchanged():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return F.relu(self.bn(x)) if x.sum() > 0 else x
    model = Dynamic()
    result = bnm.fuse_activations(model)
    assert result is model and "could not be traced" in result.fusion_report[0]


def test_leaky_relu_module_and_float32_channels_last(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LeakyReLU(0.2, inplace=True),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).to(memory_format=torch.channels_last)
    fused = bnm.fuse_activations(copy.deepcopy(model), backend)
    assert fused.fusion_report == ["1: fused with leaky_relu", "4: fused with relu"]
    assert fused.get_submodule("1").negative_slope == 0.2
    x = torch.randn(4, 3, 12, 12).to(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
