"""The CPU kernels' run-time instruction choice (csrc/cpu/cpu_features.h).

On a CPU with AVX512-BF16 the bfloat16 stores round with vcvtneps2bf16;
TORCH_BN_MANUAL_CPU=portable forces the baseline path every AVX2 CPU takes.
Both must give the same bits. The choice is made once per process, so each
path runs in its own subprocess on the same saved inputs.
"""
import os
import subprocess
import sys

import pytest
import torch

import torch_bn_manual as bnm
from torch_bn_manual import _cpu_check

pytestmark = pytest.mark.skipif("cpp" not in bnm.available_backends(), reason="compiled extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs every op with bfloat16 output on the saved inputs and saves the outputs.
RUN_OPS = r"""
import sys, torch
import torch_bn_manual._C as C
ops = torch.ops.torch_bn_manual
inputs = torch.load(sys.argv[1])
out = {"capability": C.cpu_capability()}
for name, x in inputs["x"].items():
    w, b, rm, rv, dy = (inputs[k] for k in ("w", "b", "rm", "rv", "dy"))
    y, mean, invstd = ops.batch_norm_train_forward(x, w, b, 1e-5)
    out[name + "/train"] = y
    out[name + "/eval"] = ops.batch_norm_eval_forward(x, w, b, rm, rv, 1e-5)
    out[name + "/elementwise"] = ops.batch_norm_elementwise(x, w, inputs["special_bias"], inputs["level"],
                                                            invstd)
    for train in (True, False):
        dx, _, _ = ops.batch_norm_backward(dy.contiguous(memory_format=torch.channels_last)
                                           if name == "channels_last" else dy,
                                           x, w, mean, invstd, train, 1e-5, [True, True, True])
        out[f"{name}/backward-{train}"] = dx
torch.save(out, sys.argv[2])
"""

SPECIAL = [1e-39, -3e-40, 1.4e-45, 1.1754944e-38, -1.1754942e-38, 1.00390625, 1.01171875, -1.00390625,
           3.4028235e38, -3.39e38, float("inf"), float("-inf"), float("nan"), 0.0]


def run_with_setting(setting, inputs_path, outputs_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TORCH_BN_MANUAL_CPU", None)
    if setting is not None:
        env["TORCH_BN_MANUAL_CPU"] = setting
    subprocess.run([sys.executable, "-c", RUN_OPS, inputs_path, outputs_path], check=True, env=env, cwd=ROOT,
                   timeout=300)
    return torch.load(outputs_path)


def make_inputs(generator):
    """Fresh bfloat16 inputs: a ResNet-like layer in both layouts, plus per-channel special values."""
    N, C, H, W = 4, 40, 13, 11  # odd spatial runs: vector bodies and scalar tails
    x = (torch.randn(N, C, H, W, generator=generator) * 3 + 1).to(torch.bfloat16)
    level = torch.randn(C, generator=generator).to(torch.bfloat16)
    special_bias = torch.randn(C, generator=generator) * 10
    special_bias[torch.randperm(C, generator=generator)[:len(SPECIAL)]] = torch.tensor(SPECIAL)
    constant = level.view(1, C, 1, 1).expand(N, C, H, W).contiguous()  # x == mean: y is the bias exactly
    return {
        "x": {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
              "special": constant, "special_channels_last": constant.contiguous(memory_format=torch.channels_last)},
        "w": torch.rand(C, generator=generator) + 0.5,
        "b": torch.randn(C, generator=generator),
        "rm": torch.randn(C, generator=generator),
        "rv": torch.rand(C, generator=generator) + 0.5,
        "dy": torch.randn(N, C, H, W, generator=generator).to(torch.bfloat16),
        "level": level.float(),
        "special_bias": special_bias,
    }


def test_portable_setting_changes_the_path_and_not_the_bits(generator, tmp_path):
    inputs = make_inputs(generator)
    torch.save(inputs, tmp_path / "inputs.pt")
    fast = run_with_setting(None, str(tmp_path / "inputs.pt"), str(tmp_path / "fast.pt"))
    portable = run_with_setting("portable", str(tmp_path / "inputs.pt"), str(tmp_path / "portable.pt"))
    assert "avx512" not in portable["capability"]
    if torch.cpu._is_avx512_bf16_supported() and fast["capability"] != "scalar":
        assert fast["capability"] == "avx2+avx512_bf16"  # both paths really ran
    assert set(fast) == set(portable)
    for key in fast:
        if key == "capability":
            continue
        assert fast[key].dtype == torch.bfloat16
        assert fast[key].stride() == portable[key].stride(), key
        assert torch.equal(fast[key].view(torch.int16), portable[key].view(torch.int16)), key
    # The special values round as torch rounds them (denormals kept, not flushed), on both paths.
    expected = inputs["special_bias"].to(torch.bfloat16).view(1, -1, 1, 1).expand_as(fast["special/elementwise"])
    nan = expected.isnan()
    for path in (fast, portable):
        for layout in ("special", "special_channels_last"):
            y = path[layout + "/elementwise"]
            assert torch.equal(y.isnan(), nan)
            assert torch.equal(y.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def test_unknown_cpu_setting_is_refused():
    env = dict(os.environ, PYTHONPATH=ROOT, TORCH_BN_MANUAL_CPU="avx9000")
    result = subprocess.run([sys.executable, "-c", "import torch_bn_manual._C"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "TORCH_BN_MANUAL_CPU='avx9000' is not understood" in result.stderr
    assert "'portable'" in result.stderr


def test_cpu_without_the_build_baseline_gets_an_import_error(monkeypatch):
    """A build for AVX2 on an older CPU: a clear ImportError before the library loads, not SIGILL."""
    monkeypatch.setattr(_cpu_check, "_cpu_flags", lambda: {"sse2", "sse4_2", "avx"})
    fake = type(sys)("torch_bn_manual._cpu_requirements")
    fake.REQUIRED = ("avx2", "fma", "f16c")
    monkeypatch.setitem(sys.modules, "torch_bn_manual._cpu_requirements", fake)
    with pytest.raises(ImportError, match=r"this CPU lacks avx2, fma, f16c.*TORCH_BN_MANUAL_NO_AVX2=1"):
        _cpu_check.check_cpu()
    monkeypatch.setattr(_cpu_check, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma", "f16c"})
    _cpu_check.check_cpu()  # everything there: no error


def test_build_records_its_cpu_baseline():
    from torch_bn_manual._cpu_requirements import REQUIRED
    assert set(REQUIRED) <= {"avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512dq", "avx512_bf16"}
    present = _cpu_check._cpu_flags()
    assert present is None or set(REQUIRED) <= present  # this machine built it, so it meets it
