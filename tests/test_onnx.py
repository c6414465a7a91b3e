"""ONNX export of eval models, both exporters: standard nodes only, onnxruntime equals eager.

The plain layers give BatchNormalization nodes (or fold into the Conv); the
fused ones BatchNormalization (or the folded Conv), then Add, Relu / LeakyRelu.

onnx, onnxruntime and (for dynamo=True) onnxscript are test-only dependencies:
the tests skip when they are missing (`make test` installs them).
"""
import warnings

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm

from helpers import randn, rel_err

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

STANDARD_DOMAINS = ("", "ai.onnx")


def _model(backend, generator):
    """BN on the input itself (nothing to fold into), then Conv -> BN -> ReLU (foldable), then BN3d."""
    model = nn.Sequential(
        bnm.BatchNorm2d(3, backend=backend), nn.Conv2d(3, 4, 3), bnm.BatchNorm2d(4, momentum=None, backend=backend),
        nn.ReLU(), nn.Unflatten(1, (2, 2)), bnm.BatchNorm3d(2, affine=False, backend=backend))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(p.shape, generator, scale=0.5, offset=0.2))
    for _ in range(3):  # running statistics away from their initial values
        model(randn((6, 3, 7, 7), generator, scale=2.0, offset=1.0))
    return model.eval()


class _FusedNet(nn.Module):
    """Fused on the input itself (+ the input, leaky_relu), Conv -> fused relu (foldable), fused 3d identity."""

    def __init__(self, backend):
        super().__init__()
        self.bn0 = bnm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.1, backend=backend)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = bnm.BatchNormAct2d(4, momentum=None, backend=backend)
        self.bn2 = bnm.BatchNormAct3d(2, affine=False, activation="identity", backend=backend)

    def forward(self, x):
        h = self.bn1(self.conv(self.bn0(x, residual=x)))
        h = h.unflatten(1, (2, 2))
        return self.bn2(h, residual=h.flip(0))


def _fused_model(backend, generator):
    model = _FusedNet(backend)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(p.shape, generator, scale=0.5, offset=0.2))
    for _ in range(3):
        model(randn((6, 3, 7, 7), generator, scale=2.0, offset=1.0))
    return model.eval()


# Each model's builder and the node types its graph must hold besides Conv.
MODELS = {"plain": (_model, ["BatchNormalization"]),
          "fused": (_fused_model, ["BatchNormalization", "Add", "LeakyRelu", "Relu"])}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_gives_batch_normalization_nodes(backend, dynamo, name, generator, tmp_path):
    if dynamo:
        pytest.importorskip("onnxscript")
    make, expected_ops = MODELS[name]
    model = make(backend, generator)
    x = randn((5, 3, 7, 7), generator, scale=2.0, offset=1.0)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation and progress notes
        torch.onnx.export(model, (x,), path, dynamo=dynamo, input_names=["x"])

    graph = onnx.load(path).graph
    onnx.checker.check_model(onnx.load(path))
    assert {node.domain for node in graph.node} <= set(STANDARD_DOMAINS), [(n.domain, n.op_type) for n in graph.node]
    op_types = [node.op_type for node in graph.node]
    # The input BN has no conv to fold into: it must be a BatchNormalization node.
    # The others are BatchNormalization too, or folded into the conv by the exporter;
    # the fused layers' add and activations stay nodes of their own.
    assert all(op in op_types for op in expected_ops), op_types
    assert "Conv" in op_types, op_types

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"x": x.numpy()})
    assert rel_err(torch.from_numpy(output), model(x).detach()) < 1e-5
