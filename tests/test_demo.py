"""The demo runs end to end in --quick mode and shows training parity with nn.BatchNorm2d."""
import re

import torch_bn_manual as bnm
from torch_bn_manual import demo

NUMBER = r"([0-9.]+e[-+]\d+|0)"


def loss_difference_rows(output):
    """{label: (lockstep loss, lockstep grads, free epoch 1, free run)} for ours, from the demo's table."""
    table = output.split("largest difference from nn per step", 1)[1].split("\n\n", 1)[0]
    pattern = rf"^\s+(ours-\w+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\d+$"
    return {m[0]: tuple(float(v) for v in m[1:]) for m in re.findall(pattern, table, re.M)}


def test_demo_quick(capsys):
    failures = demo.main(["--quick"])
    output = capsys.readouterr().out

    assert failures == 0, output
    for heading in ("1. Training", "2. Parity", "3. Hard input", "every error within tolerance"):
        assert heading in output
    for header in ("loss nn", "acc nn", "lockstep loss", "step ms", "BN layer us", "dweight", "y ours~f64"):
        assert header in output

    backends = bnm.available_backends()
    differences = loss_difference_rows(output)
    for backend in backends:
        assert f"loss ours-{backend}" in output
        assert len(re.findall(rf"^\s+{backend}\s+cpu\s+(float64|float32|bfloat16|float16)\s", output, re.M)) == 4
        lockstep_loss, lockstep_grads, _, free_run = differences[f"ours-{backend}"]
        assert lockstep_loss < 1e-5 and lockstep_grads < 1e-4, differences
        assert free_run < 1e-3, differences
