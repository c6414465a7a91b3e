"""The demo runs end to end in --quick mode and shows training parity with nn.BatchNorm2d."""
import re

import torch_bn_manual as bnm
from torch_bn_manual import demo

NUMBER = r"([0-9.]+e[-+]\d+|0)"


def table_after(output, title):
    return output.split(title, 1)[1].split("\n\n", 1)[0]


def rows_of_ours(table, pattern):
    """{label: numbers} for the rows of our backends that match `label pattern`."""
    found = re.findall(rf"^\s+(ours-\w+)\s+{pattern}$", table, re.M)
    return {row[0]: [float(v) for v in row[1:]] for row in found}


def test_demo_quick(capsys):
    failures = demo.main(["--quick"])
    output = capsys.readouterr().out

    assert failures == 0, output
    for heading in ("1. Training", "2. Parity", "3. Hard input", "every error within tolerance"):
        assert heading in output
    for header in ("loss nn", "acc nn", "grads~f64 median", "whole run", "step ms", "BN layer us", "dweight"):
        assert header in output

    lockstep = rows_of_ours(table_after(output, "lockstep:"), r"\s+".join([NUMBER] * 5))
    free = rows_of_ours(table_after(output, "free-running:"), rf"{NUMBER}\s+{NUMBER}\s+\d+")
    for backend in bnm.available_backends():
        label = f"ours-{backend}"
        assert f"loss {label}" in output
        assert len(re.findall(rf"^\s+{backend}\s+cpu\s+(float64|float32|bfloat16|float16)\s", output, re.M)) == 4
        loss, grads_vs_nn_median, _, grads_vs_float64_median, _ = lockstep[label]
        assert loss < 1e-5 and grads_vs_nn_median < 1e-4 and grads_vs_float64_median < 1e-4, lockstep
        assert free[label][1] < 1e-3, free
