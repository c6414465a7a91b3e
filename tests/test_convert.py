"""convert_batchnorm / revert_batchnorm: exact swaps both ways, one warning for what is left,
and one clear message when the compiled extension is missing."""
import copy
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm

from helpers import randn


def _nn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.BatchNorm1d(5, affine=False)),
                          nn.Unflatten(1, (5, 1, 1, 1)), nn.BatchNorm3d(5, track_running_stats=False))
    model(torch.randn(4, 3, 5, 5))  # statistics and num_batches_tracked away from their initial values
    return model


def _hook(module, args, output):
    return output


def _tensors(model):
    return {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def test_round_trip_is_exact(backend, generator):
    model = _nn_model()
    model[1].register_forward_hook(_hook)
    model[3][2].eval()
    before_state = copy.deepcopy(model.state_dict())
    before_tensors = _tensors(model)

    ours = bnm.convert_batchnorm(model, backend=backend)
    assert [type(m) for m in (ours[1], ours[3][2], ours[5])] == [bnm.BatchNorm2d, bnm.BatchNorm1d, bnm.BatchNorm3d]
    back = bnm.revert_batchnorm(ours)
    assert [type(m) for m in (back[1], back[3][2], back[5])] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d]
    assert not hasattr(back[1], "backend")
    # The same tensor objects, the same state, hooks and modes.
    assert all(t is before_tensors[name] for name, t in _tensors(back).items())
    assert back.state_dict().keys() == before_state.keys()
    assert all(torch.equal(v, before_state[k]) for k, v in back.state_dict().items())
    assert list(back[1]._forward_hooks.values()) == [_hook]
    assert back[3][2].training is False and back[1].training is True
    assert repr(back) == repr(_nn_model_with_modes())

    # And again, starting from ours: the reverted model computes what ours did.
    ours_again = bnm.convert_batchnorm(back, backend=backend)
    assert all(t is before_tensors[name] for name, t in _tensors(ours_again).items())
    x = randn((4, 3, 5, 5), generator)
    reference = bnm.revert_batchnorm(copy.deepcopy(ours_again))
    torch.testing.assert_close(ours_again(x), reference(x), rtol=1e-5, atol=1e-6)


def _nn_model_with_modes():
    model = _nn_model()
    model[3][2].eval()
    return model


def test_revert_a_single_layer_returns_the_nn_layer(backend):
    bn = bnm.BatchNorm2d(3, momentum=0.3, backend=backend)
    reverted = bnm.revert_batchnorm(bn)
    assert type(reverted) is nn.BatchNorm2d and reverted.weight is bn.weight
    assert reverted.running_var is bn.running_var and reverted.momentum == 0.3


class _MyBatchNorm(nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) * 2


class _MyOwnBatchNorm(bnm.BatchNorm2d):
    pass


def test_convert_warns_once_naming_what_it_left():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), _MyBatchNorm(4), nn.BatchNorm2d(4),
                          nn.SyncBatchNorm(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnm.convert_batchnorm(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert "'1' (LazyBatchNorm2d: its parameters are not materialized yet" in messages[0]
    assert "'2' (_MyBatchNorm: a subclass of nn.BatchNorm2d" in messages[0]
    assert type(model[1]) is nn.LazyBatchNorm2d and type(model[2]) is _MyBatchNorm
    assert type(model[3]) is bnm.BatchNorm2d and type(model[4]) is bnm.SyncBatchNorm

    # A materialized lazy layer is an nn.BatchNorm2d, and converts without a word.
    model[1](torch.randn(2, 4, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnm.convert_batchnorm(nn.Sequential(model[1]))


def test_sync_batchnorm_converts_exactly_and_back(generator):
    sync = nn.SyncBatchNorm(4, momentum=0.2)
    sync.running_mean.copy_(randn((4,), generator))
    ours = bnm.convert_batchnorm(sync)
    assert type(ours) is bnm.SyncBatchNorm and ours.running_mean is sync.running_mean
    assert ours.process_group is None and ours.momentum == 0.2
    back = bnm.revert_batchnorm(ours)
    assert type(back) is nn.SyncBatchNorm and back.state_dict().keys() == sync.state_dict().keys()
    # Outside a process group both are plain batch norms: the same output in eval.
    x = randn((3, 4, 5, 5), generator)
    torch.testing.assert_close(ours.eval()(x), back.eval()(x), rtol=1e-5, atol=1e-6)


def test_revert_warns_for_subclasses_of_ours():
    model = nn.Sequential(_MyOwnBatchNorm(3), bnm.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"'0' \(_MyOwnBatchNorm: a subclass of torch_bn_manual.BatchNorm2d"):
        bnm.revert_batchnorm(model)
    assert type(model[0]) is _MyOwnBatchNorm and type(model[1]) is nn.BatchNorm2d


_WITHOUT_EXTENSION = textwrap.dedent("""
    import sys, warnings
    # An editable install of the project elsewhere would supply its _C: this process sees only the copy.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    import torch
    import torch_bn_manual as bnm
    assert bnm.available_backends() == ["python"], bnm.available_backends()
    x = torch.randn(4, 3, 2, 2)
    try:
        bnm.BatchNorm2d(3, backend="cpp")(x)
    except RuntimeError as error:
        print("CPP:", error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnm.BatchNorm2d(3)(x)
        bnm.BatchNorm2d(3)(x)
    print("AUTO:", len(caught), caught[0].message)
    # TorchScript compiles the torch-ops path only: scripting works without the extension.
    warnings.simplefilter("ignore")
    scripted = torch.jit.script(bnm.BatchNorm2d(3))
    torch.testing.assert_close(scripted(x), bnm.BatchNorm2d(3)(x))
    print("SCRIPT: ok")
""")


@pytest.mark.slow  # a fresh python process importing torch
def test_message_when_the_extension_is_not_built(tmp_path):
    """A copy of the package without its compiled extension, imported in a fresh process."""
    package = os.path.dirname(bnm.__file__)
    shutil.copytree(package, tmp_path / "torch_bn_manual", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    cpp = next(line for line in run.stdout.splitlines() if line.startswith("CPP:"))
    auto = next(line for line in run.stdout.splitlines() if line.startswith("AUTO:"))
    for line in (cpp, auto):
        assert "torch_bn_manual._C is not built" in line, line
        assert line.count("pip install --no-build-isolation -e .") == 1, line
        assert "circular import" not in line and "partially initialized" not in line, line
    assert "backend='cpp' is not available" in cpp
    assert auto.startswith("AUTO: 1 "), auto  # warned once
    assert "SCRIPT: ok" in run.stdout


def test_other_layers_of_this_package_are_ours(monkeypatch):
    """A batch norm defined anywhere in this package (e.g. a fused BN + activation) is not 'left':
    convert sets its backend silently; revert has no nn class for it and says so."""
    class FusedLike(nn.BatchNorm2d):
        def __init__(self, n):
            super().__init__(n)
            self.backend = "auto"

    monkeypatch.setattr(FusedLike, "__module__", "torch_bn_manual.activation")
    model = nn.Sequential(FusedLike(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnm.convert_batchnorm(model, backend="python")
    assert model[0].backend == "python" and type(model[0]) is FusedLike
    with pytest.warns(UserWarning, match="FusedLike: no torch.nn class computes what it computes"):
        bnm.revert_batchnorm(model)


@pytest.mark.slow  # a fresh python process importing torch
def test_message_when_the_extension_does_not_load(tmp_path):
    """A _C that exists but cannot be loaded (here: not a shared library at all): its loader's reason, once."""
    import importlib.machinery

    package = os.path.dirname(bnm.__file__)
    shutil.copytree(package, tmp_path / "torch_bn_manual", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (tmp_path / "torch_bn_manual" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not an ELF")
    script = textwrap.dedent("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        import torch
        import torch_bn_manual as bnm
        try:
            bnm.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cpp")
        except RuntimeError as error:
            print("CPP:", error)
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "torch_bn_manual._C does not load (" in run.stdout, run.stdout
    assert run.stdout.count("pip install --no-build-isolation -e .") == 1, run.stdout
    assert "circular import" not in run.stdout and "not built" not in run.stdout, run.stdout
