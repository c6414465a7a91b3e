"""The demo runs end to end in --quick mode: says what it compares, explains its tables, shows
training parity with nn.BatchNorm2d, times a ResNet-sized layer, ends with a verdict and a picture."""
import contextlib
import io
import re

import pytest
import torch
from torch import nn

import torch_bn_manual as bnm
from torch_bn_manual import demo

NUMBER = r"([0-9.]+e[-+]\d+|0)"


def table_after(output, title):
    return output.split(title, 1)[1].split("\n\n", 1)[0]


def rows_of_ours(table, pattern):
    """{label: numbers} for the rows of our backends that match `label pattern`."""
    found = re.findall(rf"^\s+(ours-\w+)\s+{pattern}$", table, re.M)
    return {row[0]: [float(v) for v in row[1:]] for row in found}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run shared by the tests below (capsys is per test, so stdout is captured here)."""
    png = tmp_path_factory.mktemp("demo") / "demo.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        failures = demo.main(["--quick", "--png", str(png)])
    return failures, out.getvalue(), png


def test_demo_quick(quick_run):
    failures, output, _ = quick_run
    assert failures == 0, output
    assert output.startswith("What is compared:"), output[:200]
    for heading in ("1. Training", "2. Speed", "3. Parity", "4. Hard input", "== Verdict", "every error within tolerance"):
        assert heading in output
    for header in ("loss nn", "acc nn", "grads~f64 median", "whole run", "step ms", "BN layer us", "dweight"):
        assert header in output

    lockstep = rows_of_ours(table_after(output, "max w/o:"), r"\s+".join([NUMBER] * 5) + rf"\s+\d+\s+{NUMBER}")
    free = rows_of_ours(table_after(output, "Free-running:"), rf"{NUMBER}\s+{NUMBER}\s+\d+")
    for backend in bnm.available_backends():
        label = f"ours-{backend}"
        assert f"loss {label}" in output
        assert len(re.findall(rf"^\s+{backend}\s+cpu\s+(float64|float32|bfloat16|float16)\s", output, re.M)) == 4
        loss, grads_vs_nn_median, _, grads_vs_float64_median, _, clean_max = lockstep[label]
        assert loss < 1e-5 and grads_vs_nn_median < 1e-4 and grads_vs_float64_median < 1e-4, lockstep
        # Away from ReLU sign flips, a step's gradients are at float32 rounding.
        assert clean_max < 1e-4, lockstep
        assert free[label][1] < 1e-3, free


def test_every_table_is_explained_before_it(quick_run):
    """The line right above each table's header is prose, not another table."""
    _, output, _ = quick_run
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"\s*-+(\s+-+)+", lines[i + 1]):  # line is a table header
            above = lines[i - 1].strip()
            assert above and not above.startswith("-") and not above.startswith("=="), (line, above)


def test_resnet_layer_timed_in_both_layouts(quick_run):
    _, output, _ = quick_run
    table = table_after(output, "One BatchNorm2d at 32x64x56x56")
    for layout in ("contiguous", "channels_last"):
        for mode in ("train fwd+bwd", "eval"):
            row = re.search(rf"^\s+{layout}\s+{re.escape(mode)}\s+([0-9.]+)\s", table, re.M)
            assert row and float(row.group(1)) > 0, (layout, mode, table)
    assert re.search(r"Speed: on the ResNet-style layer, nn time / ours = [0-9.]+x to [0-9.]+x", output) or \
        "cpp" not in bnm.available_backends()


def test_verdict_names_what_to_read_next(quick_run):
    _, output, _ = quick_run
    verdict = output.split("== Verdict", 1)[1]
    for topic in ("Parity:", "Accuracy:", "Speed:", "Read next:", "docs/performance.md"):
        assert topic in verdict


def test_picture_is_written(quick_run):
    pytest.importorskip("matplotlib")
    _, output, png = quick_run
    assert f"picture written to {png}" in output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_picture_skipped_cleanly_without_matplotlib(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    from torch_bn_manual import _demo_plot

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert _demo_plot.draw({}, str(tmp_path / "x.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


class _FusedStandIn(nn.BatchNorm2d):
    """Shape of the fused layer's API (issue: BatchNormAct2d), for the demo's optional rows."""

    def __init__(self, num_features, backend="auto", activation="relu", **kwargs):
        super().__init__(num_features, **kwargs)

    def forward(self, input, residual=None):
        y = super().forward(input)
        return torch.relu(y if residual is None else y + residual)


def test_fused_layers_shown_when_the_package_has_them(monkeypatch, capsys):
    if "cpp" not in bnm.available_backends():
        pytest.skip("the ResNet-style rows need the compiled backend")
    monkeypatch.setattr(bnm, "BatchNormAct2d", _FusedStandIn, raising=False)
    backends = bnm.available_backends()
    args = demo.parse_args(["--quick", "--png", ""])
    args.layer_repeats = 1
    ratios = demo.speed_section(backends, args, [], {"nn": 1.0}, {"nn": 1.0})
    output = capsys.readouterr().out
    assert "BatchNormAct2d" in output and "fused ms" in output
    assert sum("BN+ReLU" in k and "fused" in k for k in ratios) == 4, ratios


def test_fused_net_trained_next_to_the_others_when_the_package_can_fuse(monkeypatch):
    """With a fuse_activations, the demo adds an 'ours-fused' net; lockstep leaves it out when its ReLUs are
    folded into the batch norms (it compares ReLU inputs layer by layer)."""

    def fold_relus(model, backend="auto"):
        for name, child in model.named_children():
            if isinstance(child, nn.ReLU):
                setattr(model, name, nn.Identity())
            else:
                fold_relus(child, backend)
        return model

    monkeypatch.setattr(bnm, "fuse_activations", fold_relus, raising=False)
    models = demo.build_models(bnm.available_backends(), seed=0)
    assert "ours-fused" in models and demo.count_relus(models["ours-fused"]) == 0
    assert demo.count_relus(models["nn"]) == 3
    lockstep = demo.Lockstep(models)
    assert "ours-fused" not in lockstep.models and set(lockstep.models) == {f"ours-{b}" for b in bnm.available_backends()}
