"""torch.ao.quantization.fuse_modules / fuse_modules_qat fuse our layers exactly as they fuse nn's."""
import copy
import re

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat

import torch_bn_manual as bnm

from helpers import randn

# (layers, input shape): every fusable pattern with a batch norm in torch's default table.
PATTERNS = {
    "conv2d_bn_relu": (lambda: [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()], (4, 3, 6, 6)),
    "conv2d_bn": (lambda: [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)], (4, 3, 6, 6)),
    "conv1d_bn_relu": (lambda: [nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()], (4, 3, 9)),
    "conv3d_bn": (lambda: [nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)], (3, 2, 4, 4, 4)),
    "linear_bn1d": (lambda: [nn.Linear(5, 4), nn.BatchNorm1d(4)], (6, 5)),
    "bn2d_relu": (lambda: [nn.BatchNorm2d(3), nn.ReLU()], (4, 3, 5, 5)),
    "convtranspose2d_bn": (lambda: [nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4)], (4, 3, 5, 5)),
}


def _nn_model(pattern, generator):
    make_layers, shape = PATTERNS[pattern]
    model = nn.Sequential(*make_layers())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(p.shape, generator, scale=0.5, offset=0.1))
    for _ in range(2):  # running statistics away from their initial values
        model(randn(shape, generator, scale=2.0, offset=1.0))
    return model, shape


@pytest.mark.parametrize("qat", [False, True], ids=["eval", "qat"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_fuse_modules_like_nn(backend, pattern, qat, generator):
    nn_model, shape = _nn_model(pattern, generator)
    nn_model.train(qat)
    ours = bnm.convert_batchnorm(copy.deepcopy(nn_model), backend=backend)
    assert any(isinstance(m, bnm.BatchNorm2d | bnm.BatchNorm1d | bnm.BatchNorm3d) for m in ours.modules())
    names = [str(i) for i in range(len(nn_model))]
    fuse = fuse_modules_qat if qat else fuse_modules
    try:
        fused_nn = fuse(nn_model, [names])
    except Exception as error:  # e.g. ConvTranspose+BN in QAT: nn refuses, and so must we, alike
        with pytest.raises(type(error), match=re.escape(str(error))):
            fuse(ours, [names])
        return
    fused_ours = fuse(ours, [names])

    assert [type(m) for m in fused_ours.modules()] == [type(m) for m in fused_nn.modules()]
    x = randn(shape, generator, scale=1.5, offset=0.5)
    torch.testing.assert_close(fused_ours(x), fused_nn(x), rtol=0, atol=0)
    # The fused modules keep the running statistics (QAT) or folded them: same state either way.
    nn_state, ours_state = fused_nn.state_dict(), fused_ours.state_dict()
    assert nn_state.keys() == ours_state.keys()
    for key in nn_state:
        assert torch.equal(ours_state[key], nn_state[key]), key


def test_user_mapping_still_takes_precedence(backend):
    calls = []

    def my_fuser(is_qat, conv, bn):
        calls.append(type(bn))
        return nn.Sequential(conv, bn)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnm.BatchNorm2d(4, backend=backend)).eval()
    fuse_modules(model, [["0", "1"]], fuse_custom_config_dict={
        "additional_fuser_method_mapping": {(nn.Conv2d, bnm.BatchNorm2d): my_fuser}})
    assert calls == [bnm.BatchNorm2d]


def test_fx_graph_mode_quantization_after_revert(backend, generator):
    """prepare_fx matches its backend_config's nn patterns: revert_batchnorm first gives nn's result."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    nn_model, shape = _nn_model("conv2d_bn_relu", generator)
    ours = bnm.convert_batchnorm(copy.deepcopy(nn_model), backend=backend)
    x = randn(shape, generator)
    results = []
    for model in (nn_model.eval(), bnm.revert_batchnorm(ours).eval()):
        prepared = prepare_fx(model, get_default_qconfig_mapping(), (x,))
        prepared(x)
        quantized = convert_fx(prepared)
        results.append(([type(m) for m in quantized.children()], quantized(x)))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])
