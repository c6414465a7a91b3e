"""examples/ddp_train.py on two CPU processes: the run matches plain torch.nn in one process."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("sklearn")


@pytest.mark.slow
def test_ddp_example_prints_the_one_process_nn_run_next_to_it():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "examples", "ddp_train.py"), "--steps", "6"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "OK: parameters and running statistics are identical on every rank" in out
    rows = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
    assert len(rows) >= 4, out
    for _, ddp, nn in rows:
        assert abs(float(ddp) - float(nn)) < 1e-5, rows
    largest = float(re.search(r"largest loss difference over the 6 steps: ([0-9.e+-]+)", out).group(1))
    assert largest < 1e-5
    ddp_acc, nn_acc = re.search(r"held-out accuracy: DDP\+SyncBatchNorm ([0-9.]+), nn in one process ([0-9.]+)",
                                out).groups()
    assert abs(float(ddp_acc) - float(nn_acc)) <= 1 / 297 + 1e-9  # at most one of the 297 test images
    assert "--steps 200" in out
