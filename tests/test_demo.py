"""The demo runs end to end in --quick mode and shows training parity with nn.BatchNorm2d."""
import re

import torch_bn_manual as bnm
from torch_bn_manual import demo


def loss_difference_rows(output):
    """{run label: largest per-step loss difference over the run} from the demo's table."""
    section = output.split("largest per-step |loss - loss of nn|", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\s+(\S.*?)\s+([0-9.]+e[-+]\d+)\s+([0-9.]+e[-+]\d+)\s+(\d+)$", section, re.M)
    return {label: float(whole_run) for label, _first, whole_run, _step in rows}


def test_demo_quick(capsys):
    failures = demo.main(["--quick"])
    output = capsys.readouterr().out

    assert failures == 0, output
    for heading in ("1. Training", "2. Parity", "3. Hard input", "every error within tolerance"):
        assert heading in output
    for header in ("loss nn", "acc nn", "step ms", "BN layer us", "dweight", "y ours~f64"):
        assert header in output

    backends = bnm.available_backends()
    for backend in backends:
        assert f"loss ours-{backend}" in output
        assert len(re.findall(rf"^\s+{backend}\s+cpu\s+(float64|float32|bfloat16|float16)\s", output, re.M)) == 4

    differences = loss_difference_rows(output)
    for backend in backends:
        assert differences[f"ours-{backend}"] < 1e-3, differences
