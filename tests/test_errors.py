"""Bad input: the exception type and message torch.nn gives, and no state changed.

torch.nn increments num_batches_tracked before it looks at the input; ours
checks first, so on an error nothing at all changes (running stats and the
counter). An empty batch is not an error: it behaves as in torch.nn.
"""
import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import torch_bn_manual as bnm
from helpers import randn


def _raise_info(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - we compare whatever nn raises
        return type(error), str(error)
    return None


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_error(ours_call, nn_call):
    expected = _raise_info(nn_call)
    assert expected is not None, "nn accepts this input; the test case is wrong"
    actual = _raise_info(ours_call)
    assert actual == expected


def _module_pair(ours_cls, nn_cls, channels, backend, **options):
    ours = ours_cls(channels, backend=backend, **options)
    ref = nn_cls(channels, **options)
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


MODULE_CASES = {
    "2d given 3d input": (bnm.BatchNorm2d, nn.BatchNorm2d, 3, (2, 3, 4)),
    "2d given 5d input": (bnm.BatchNorm2d, nn.BatchNorm2d, 3, (2, 3, 4, 4, 4)),
    "1d given 4d input": (bnm.BatchNorm1d, nn.BatchNorm1d, 3, (2, 3, 4, 4)),
    "3d given 4d input": (bnm.BatchNorm3d, nn.BatchNorm3d, 3, (2, 3, 4, 4)),
    "channel mismatch": (bnm.BatchNorm2d, nn.BatchNorm2d, 3, (2, 4, 3, 3)),
    "one value per channel (2d)": (bnm.BatchNorm2d, nn.BatchNorm2d, 3, (1, 3, 1, 1)),
    "one value per channel (1d)": (bnm.BatchNorm1d, nn.BatchNorm1d, 3, (1, 3)),
}


# A single value per channel is an error in training only.
MODULE_ERRORS = [(case, training) for case in MODULE_CASES for training in (True, False)
                 if training or "one value" not in case]


@pytest.mark.parametrize("case,training", MODULE_ERRORS)
def test_module_errors_match_nn_and_change_nothing(backend, case, training, generator):
    ours_cls, nn_cls, channels, shape = MODULE_CASES[case]
    ours, ref = _module_pair(ours_cls, nn_cls, channels, backend)
    ours.train(training)
    ref.train(training)
    x = randn(shape, generator)
    before = _state(ours)
    _assert_same_error(lambda: ours(x), lambda: ref(x))
    for key, value in _state(ours).items():
        assert torch.equal(value, before[key]), f"{key} changed although the input was rejected"


def test_wrong_weight_size_in_module(backend, generator):
    ours, ref = _module_pair(bnm.BatchNorm2d, nn.BatchNorm2d, 3, backend)
    ours.weight = nn.Parameter(torch.ones(4))
    ref.weight = nn.Parameter(torch.ones(4))
    x = randn((2, 3, 4, 4), generator)
    before = _state(ours)
    _assert_same_error(lambda: ours(x), lambda: ref(x))
    assert all(torch.equal(v, before[k]) for k, v in _state(ours).items())


def _functional_cases(generator):
    x = randn((2, 3, 4, 4), generator)
    ones, zeros = torch.ones(3), torch.zeros(3)
    return {
        "weight of wrong size": (x, zeros, ones, torch.ones(4), None, True),
        "bias of wrong size": (x, zeros, ones, None, torch.ones(2), True),
        "running_mean of wrong size": (x, torch.zeros(4), ones, None, None, True),
        "running_var of wrong size": (x, zeros, torch.ones(4), None, None, False),
        "running_mean missing in eval": (x, None, None, None, None, False),
        "only running_mean given": (x, zeros, None, None, None, True),
        "float input, float64 running stats": (x, zeros.double(), ones.double(), None, None, True),
        "float input, float64 weight": (x, zeros, ones, ones.double(), None, True),
        "float64 input, float params": (x.double(), zeros, ones, ones, None, True),
        "half input, half stats, float weight": (x.half(), zeros.half(), ones.half(), ones, None, True),
        "bfloat16 input, float64 weight": (x.bfloat16(), None, None, ones.double(), None, True),
        "weight on another device": (x, zeros, ones, torch.ones(3, device="meta"), None, True),
        "running_var on another device": (x, zeros, torch.ones(3, device="meta"), None, None, False),
        "integer input": (x.to(torch.int32), zeros, ones, None, None, True),
        "one value per channel": (x[:1, :, :1, :1], zeros, ones, None, None, True),
    }


@pytest.mark.parametrize("case", list(_functional_cases(torch.Generator().manual_seed(0))))
def test_functional_errors_match_nn(backend, case, generator):
    x, rm, rv, w, b, training = _functional_cases(generator)[case]
    rm_ours, rv_ours = copy.deepcopy(rm), copy.deepcopy(rv)
    rm_nn, rv_nn = copy.deepcopy(rm), copy.deepcopy(rv)  # nn may write to its copies
    _assert_same_error(lambda: bnm.batch_norm(x, rm_ours, rv_ours, w, b, training, backend=backend),
                       lambda: F.batch_norm(x, rm_nn, rv_nn, w, b, training))
    # Compared with the state before the call, not with nn's: for a weight on
    # another device nn has already updated its running stats when it raises.
    for ours, before in ((rm_ours, rm), (rv_ours, rv)):
        if ours is not None and ours.device.type != "meta":
            assert torch.equal(ours, before), "running stats changed although the input was rejected"


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_errors_match_nn(backend, eps, generator):
    x = randn((2, 3, 4), generator)
    for training in (True, False):
        if not training and eps == 0.0:
            continue
        rm, rv = torch.zeros(3), torch.ones(3)
        _assert_same_error(lambda: bnm.batch_norm(x, rm, rv, None, None, training, eps=eps, backend=backend),
                           lambda: F.batch_norm(x, rm, rv, None, None, training, eps=eps))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        bnm.BatchNorm2d(3, backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        bnm.batch_norm(torch.randn(2, 3), None, None, training=True, backend="fast")


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_like_nn(backend, shape, training, generator):
    ours, ref = _module_pair(bnm.BatchNorm2d, nn.BatchNorm2d, 3, backend)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    ours.train(training)
    ref.train(training)
    results = []
    for module in (ours, ref):
        x = randn(shape, generator).requires_grad_(True)
        y = module(x)
        y.sum().backward()
        results.append((y.shape, y.dtype, x.grad.shape, module.weight.grad.clone(), module.bias.grad.clone()))
    assert results[0][:3] == results[1][:3]
    assert torch.equal(results[0][3], results[1][3]) and torch.equal(results[0][4], results[1][4])
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref.state_dict()[key]), key
