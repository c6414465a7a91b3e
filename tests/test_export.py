"""torch.export and torch.jit.trace of eval models: standard ATen ops, loadable without this package.

For the plain layers and for the fused ones (BatchNormAct*d, bnm.batch_norm_act),
whose eval mode becomes ATen's batch norm, add and relu / leaky_relu.
"""
import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm
from torch_bn_manual import activation, functional, modules

from helpers import randn, rel_err


def _model(backend, generator):
    """Conv -> BN2d -> ReLU -> Linear -> BN1d (no bias) -> BN1d on (N, C, L), trained a few steps."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), bnm.BatchNorm2d(6, backend=backend), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 8), bnm.BatchNorm1d(8, momentum=None, backend=backend), nn.Unflatten(1, (2, 4)),
        bnm.BatchNorm1d(2, affine=False, backend=backend))
    return _trained_for_eval(model, generator)


def _trained_for_eval(model, generator):
    """model with fresh random parameters and running statistics away from their initial values, in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(p.shape, generator, scale=0.5))
    for _ in range(3):
        model(randn((8, 3, 6, 6), generator, offset=1.0))
    return model.eval()


class _FusedNet(nn.Module):
    """Conv -> BNAct2d (relu); Conv -> BNAct2d (leaky_relu, + residual); Linear -> BNAct1d (identity, no affine)."""

    def __init__(self, backend):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = bnm.BatchNormAct2d(6, backend=backend)
        self.bn2 = bnm.BatchNormAct2d(6, momentum=None, activation="leaky_relu", negative_slope=0.1, backend=backend)
        self.fc = nn.Linear(6 * 4 * 4, 8)
        self.bn3 = bnm.BatchNormAct1d(8, affine=False, activation="identity", backend=backend)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = self.bn2(self.conv2(h), residual=h)
        return self.bn3(self.fc(h.flatten(1)))


def _fused_model(backend, generator):
    return _trained_for_eval(_FusedNet(backend), generator)


MODELS = {"plain": _model, "fused": _fused_model}
# What each model's eval graph holds: (torch.export target prefix, jit.trace kind) -> count.
GRAPH_COUNTS = {
    "plain": {("aten.batch_norm", "aten::batch_norm"): 3},
    "fused": {("aten.batch_norm", "aten::batch_norm"): 3, ("aten.relu", "aten::relu"): 1,
              ("aten.leaky_relu", "aten::leaky_relu"): 1, ("aten.add", "aten::add"): 1},
}


def _call_targets(graph_module):
    return [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]


# The artifacts are loaded in a process where importing torch_bn_manual is impossible.
_LOADER = textwrap.dedent("""
    import json, sys
    class NoPackage:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch_bn_manual":
                raise ModuleNotFoundError(f"blocked: {name}")
    sys.meta_path.insert(0, NoPackage())
    import torch
    x = torch.load(sys.argv[1] + "/x.pt")
    results = {}
    results["export"] = torch.export.load(sys.argv[1] + "/model.pt2").module()(x)
    results["trace"] = torch.jit.load(sys.argv[1] + "/model.ts")(x)
    assert not any(name.startswith("torch_bn_manual") for name in sys.modules)
    torch.save(results, sys.argv[1] + "/out.pt")
""")


@pytest.mark.slow  # a fresh python process importing torch
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_artifacts_load_and_run_without_the_package(backend, name, generator, tmp_path):
    model = MODELS[name](backend, generator)
    x = randn((5, 3, 6, 6), generator, offset=0.5)
    expected = model(x).detach()

    exported = torch.export.export(model, (x,))
    targets = _call_targets(exported.graph_module)
    assert not any("torch_bn_manual" in t for t in targets), targets
    for (prefix, _), count in GRAPH_COUNTS[name].items():
        assert sum(t.startswith(prefix + ".") for t in targets) == count, (prefix, targets)
    torch.export.save(exported, str(tmp_path / "model.pt2"))

    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing input-dependent is frozen
        traced = torch.jit.trace(model, (x,))
    assert "torch_bn_manual::" not in str(traced.inlined_graph)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    for (_, kind), count in GRAPH_COUNTS[name].items():
        assert kinds.count(kind) == count, (kind, kinds)
    torch.jit.save(traced, str(tmp_path / "model.ts"))
    torch.save(x, tmp_path / "x.pt")

    run = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name, output in torch.load(tmp_path / "out.pt").items():
        assert rel_err(output, expected) < 1e-5, name


@pytest.mark.parametrize("name", list(MODELS))
def test_export_follows_the_model_and_leaves_eager_alone(backend, name, generator, monkeypatch):
    """In-process: the exported program equals eager on fresh inputs; eager eval never takes the ATen route."""
    model = MODELS[name](backend, generator)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (randn((2, 3, 6, 6), generator),),
                                  dynamic_shapes=({0: batch},)).module()
    x = randn((7, 3, 6, 6), generator, scale=2.0, offset=-1.0)

    def no_aten(*args):
        raise AssertionError("eager eval took the export route")

    monkeypatch.setattr(functional, "aten_eval_batch_norm", no_aten)
    monkeypatch.setattr(modules, "aten_eval_batch_norm", no_aten)
    monkeypatch.setattr(activation, "aten_eval_batch_norm", no_aten)
    expected = model(x)
    assert rel_err(program(x), expected) < 1e-5


def test_training_mode_export_keeps_our_ops(generator):
    """Documented: only eval mode exports to ATen; a training graph needs this package."""
    if "cpp" not in bnm.available_backends():
        pytest.skip("the compiled extension is not built")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnm.BatchNorm2d(4, backend="cpp")).train()
    exported = torch.export.export(copy.deepcopy(model), (randn((4, 3, 5, 5), generator),))
    assert any("torch_bn_manual.batch_norm_train_forward" in t for t in _call_targets(exported.graph_module))
    fused = nn.Sequential(nn.Conv2d(3, 4, 1), bnm.BatchNormAct2d(4, backend="cpp")).train()
    exported = torch.export.export(copy.deepcopy(fused), (randn((4, 3, 5, 5), generator),))
    assert any("torch_bn_manual.batch_norm_act_train_forward" in t for t in _call_targets(exported.graph_module))


class _FunctionalNet(nn.Module):
    """A model that calls bnm.batch_norm itself, as users of F.batch_norm do."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.register_buffer("mean", torch.linspace(-1, 1, 4))
        self.register_buffer("var", torch.linspace(0.5, 2, 4))
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return bnm.batch_norm(x, self.mean, self.var, self.weight, None, False, backend=self.backend)


class _FunctionalActNet(_FunctionalNet):
    """A model that calls bnm.batch_norm_act itself, with a residual."""

    def forward(self, x):
        return bnm.batch_norm_act(x, self.mean, self.var, self.weight, None, False, residual=x.flip(0),
                                  activation="leaky_relu", negative_slope=0.2, backend=self.backend)


@pytest.mark.parametrize("net, expected", [(_FunctionalNet, ["batch_norm"]),
                                           (_FunctionalActNet, ["batch_norm", "add", "leaky_relu"])],
                         ids=["plain", "fused"])
def test_functional_eval_exports_to_aten(backend, net, expected, generator):
    model = net(backend)
    x = randn((3, 4, 5), generator)
    exported = torch.export.export(model, (x,))
    targets = _call_targets(exported.graph_module)
    assert not any("torch_bn_manual" in t for t in targets), targets
    assert all(any(t.startswith(f"aten.{op}.") for t in targets) for op in expected), targets
    assert rel_err(exported.module()(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_strict_export_too(backend, name, generator):
    """torch.export's strict (dynamo) mode sees the same flag."""
    model = MODELS[name](backend, generator)
    x = randn((5, 3, 6, 6), generator)
    exported = torch.export.export(model, (x,), strict=True)
    targets = _call_targets(exported.graph_module)
    assert not any("torch_bn_manual" in t for t in targets), targets
    assert rel_err(exported.module()(x), model(x)) < 1e-5


def test_fused_capture_keeps_the_residual_check(backend, generator):
    """A residual of another shape is refused while capturing too (ATen's add would broadcast it)."""
    layer = bnm.BatchNormAct2d(3, backend=backend).eval()
    x, z = randn((2, 3, 4, 4), generator), randn((1, 3, 4, 4), generator)
    for capture in (lambda: torch.jit.trace(layer, (x, z)), lambda: torch.export.export(layer, (x, z))):
        with pytest.raises(RuntimeError, match=r"residual must have the input's shape \(2, 3, 4, 4\)"):
            capture()
