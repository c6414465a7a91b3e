"""make gpu-check (scripts/gpu_check.sh, scripts/gpu_check.py) without a GPU.

The script is made for one run on a GPU machine, where what comes back is at
most 8 files of at most 16 MiB and the run may take 8 minutes. Here: the
whole script in its no-GPU mode (GPU_CHECK_SKIP_BUILD=1: no rebuild; no GPU
visible), and its parts on made-up logs: the summary (failing tests with
their first error lines, sanitizer verdicts, the benchmark table), the
file-size cut, and that every step runs under a timeout inside the budget.
"""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "scripts", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_no_gpu_run_stops_cleanly_with_a_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SKIP_BUILD="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    summary = (out / "summary.md").read_text()
    assert "**no GPU**" in summary, log
    assert "no GPU visible to torch: stopping after the build and the op check" in log
    for step in ("tests", "sanitizer", "bench-quick", "bench"):
        assert f"{step} skipped" in summary
    assert "build: skipped" in summary and "GPU_CHECK_SKIP_BUILD=1" in summary
    # the op check ran: it passes on a CUDA build, and names what is missing on a CPU one
    ops_ok = "ops ok" in summary
    assert ops_ok or "no CUDA kernel" in summary
    assert result.returncode == (0 if ops_ok else 1), log
    files = sorted(os.listdir(out))
    assert "summary.md" in files and set(files) <= set(gpu_check.OUT_FILES)
    assert len(files) <= gpu_check.MAX_FILES
    assert all((out / f).stat().st_size <= gpu_check.MAX_FILE_BYTES for f in files)
    assert len(summary.splitlines()) <= gpu_check.SUMMARY_MAX_LINES
    assert (out / "gpu_check.log").read_text().count("== ") >= 5  # the script's own lines came back too


def test_usage_error_without_out():
    result = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage: make gpu-check OUT=dir" in result.stderr


def test_every_step_has_a_timeout_within_the_budget():
    """Each step runs under `timeout`, and the caps of the fixed steps add up to
    less than the budget, itself under the 8 minutes the run may take."""
    script = open(SCRIPT).read()
    budget = int(re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET:-(\d+)\}", script).group(1))
    assert budget <= 8 * 60 - 20
    steps = re.findall(r"^\s*run_step (\S+) (\S+) ", script, re.M)
    assert [s for s, _ in steps] == ["env", "build", "ops", "tests", "sanitizer", "bench-quick", "bench"]
    assert 'timeout -k 10 "$t" "$@"' in script  # run_step: every command under timeout
    assert "time_for" in script  # ... capped by what is left of the budget
    # the sanitizer probe and the environment's tools have timeouts of their own
    assert re.search(r"timeout -k 5 \"\$probe_t\" compute-sanitizer", script)
    assert "timeout 20 nvidia-smi" in script and "timeout 20 nvcc" in script
    # pytest: xdist, a per-test timeout, failures and errors listed, durations
    for flag in ("-n 4", "--timeout=", "-rfE", "--durations="):
        assert flag in script
    # every file the script writes into OUT is one the summary knows
    written = set(re.findall(r'\$OUT/([A-Za-z0-9_.-]+)', script))
    assert written <= set(gpu_check.OUT_FILES) and len(gpu_check.OUT_FILES) <= gpu_check.MAX_FILES


JUNIT = textwrap.dedent("""\
    <?xml version="1.0" encoding="utf-8"?>
    <testsuites><testsuite name="pytest" tests="4">
    <testcase classname="tests.test_cuda" name="test_train_forward[a]" time="0.1"/>
    <testcase classname="tests.test_cuda" name="test_backward[b]" time="0.2">
      <failure message="assert 0.5 &lt;= 0.001">def test_backward():
    &gt;       assert rel_err(dx, ref) &lt;= TOL
    E       assert 0.5 &lt;= 0.001
    E        +  where 0.5 = rel_err()</failure></testcase>
    <testcase classname="tests.test_cuda" name="test_skip" time="0"><skipped message="x"/></testcase>
    <testcase classname="tests.test_cuda" name="test_odd[c]" time="0.1">
      <error message="setup">RuntimeError: CUDA error: an illegal memory access was encountered</error></testcase>
    </testsuite></testsuites>
    """)

BENCH = textwrap.dedent("""\
    # Batch norm speed: torch_bn_manual against torch.nn (cuda)

    | shape | layout | dtype | mode | cuDNN ms | native ms | python ms | cpp ms |
    |---|---|---|---|---|---|---|---|
    | 256x256x56x56 | contiguous | float32 | fwd | 1 | 1 | 3 | 0.9 |
    | 256x2048x7x7 | channels_last | float16 | eval | 1 | 1 | 3 | 0.9 |

    ## Summary: nn / backend over shapes × layouts (> 1: backend faster)

    | mode | dtype | backend | median | min | cases | target (cpp) | met |
    |---|---|---|---|---|---|---|---|
    | fwd | float32 | python | 0.30 | 0.20 | 2 |  |  |
    | fwd | float32 | cpp | 1.10 | 1.05 | 2 |  |  |
    | fwd+bwd | float32 | cpp | 1.30 | 1.20 | 2 | median ≥ 1.5, none < 1.0 | no |
    """)


def make_run(tmp_path, steps, files):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    (scratch / "steps.tsv").write_text("".join("\t".join(s) + "\n" for s in steps))
    (scratch / "env.json").write_text('{"python": "python3", "torch": "2.11.0+cu130", "cuda": "13.0", '
                                      '"cudnn": 91000, "gpu_count": 1, "gpu": "NVIDIA H200", "capability": "9.0", '
                                      '"multiprocessors": 132, "gpu_memory_gib": 139.8}')
    for name, text in files.items():
        (scratch if name == "tests.xml" else out).joinpath(name).write_text(text)
    return str(out), str(scratch)


def test_summary_of_a_gpu_run(tmp_path):
    steps = [("env", "ok", "3", ""), ("build", "ok", "74", "TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16"),
             ("ops", "ok", "2", ""), ("tests", "failed", "130", "exit 1"), ("sanitizer", "ok", "61", "memcheck"),
             ("bench-quick", "ok", "40", ""), ("bench", "timeout", "150", "killed after 150 s")]
    sanitizer_log = "--- probe\nsanitizer probe ok\n========= ERROR SUMMARY: 0 errors\n" \
                    "--- memcheck\ncuda_memcheck_script: ok\n========= ERROR SUMMARY: 0 errors\n"
    out, scratch = make_run(tmp_path, steps, {"tests.xml": JUNIT, "sanitizer.log": sanitizer_log,
                                              "bench.md": BENCH, "bench-quick.md": BENCH, "tests.log": "x"})
    text = gpu_check.summary(out, scratch)
    assert text == open(os.path.join(out, "summary.md")).read()
    assert "NVIDIA H200 (sm 9.0, 132 SMs" in text and "torch 2.11.0+cu130, CUDA 13.0" in text
    assert "build: ok in 74 s (TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16)" in text
    assert "1 passed, 1 failed, 1 error, 1 skipped" in text
    assert "FAILED test_backward[b]: assert 0.5 <= 0.001" in text
    assert "FAILED test_odd[c]: RuntimeError: CUDA error: an illegal memory access was encountered" in text
    assert "memcheck clean (ERROR SUMMARY: 0 errors)" in text
    # the full bench's table (it timed out: its rows so far), compiled backend rows only
    assert "## benchmark: bench.md (timeout, 150 s, 2 cases)" in text
    assert "| fwd+bwd | float32 | cpp | 1.30 |" in text and "| python |" not in text
    assert len(text.splitlines()) <= gpu_check.SUMMARY_MAX_LINES


@pytest.mark.parametrize("log, status, note, verdict", [
    ("========= ERROR SUMMARY: 3 errors\n", "failed", "exit 86", "memcheck found 3 error(s)"),
    ("", "skipped", "compute-sanitizer refused the device: Device not supported",
     "skipped: compute-sanitizer refused the device: Device not supported"),
    ("", "timeout", "killed after 180 s", "timed out"),
    ("cuda_memcheck_script: ok\n", "failed", "exit 1", "failed: exit 1; see sanitizer.log"),
])
def test_sanitizer_verdicts(log, status, note, verdict):
    assert gpu_check.sanitizer_verdict(log, status, note).startswith(verdict)


def test_tests_from_log_when_there_is_no_junit_file():
    log = "FAILED tests/test_cuda.py::test_backward[b] - assert 0.5 <= 0.001\n= 1 failed, 7 passed in 3.0s ="
    res = gpu_check.tests_from_log(log)
    assert res["counts"] == {"failed": 1, "passed": 7}
    assert res["failures"] == [("test_backward[b]", "assert 0.5 <= 0.001")]


def test_summary_is_cut_to_one_screen(tmp_path):
    failures = "".join(f'<testcase name="t{i}"><failure>E   boom {i}</failure></testcase>' for i in range(80))
    junit = f"<testsuites><testsuite>{failures}</testsuite></testsuites>"
    out, scratch = make_run(tmp_path, [("tests", "failed", "9", "exit 1")], {"tests.xml": junit})
    text = gpu_check.summary(out, scratch)
    assert "80 failed" in text and "FAILED t0: boom 0" in text and "65 more in tests.log" in text
    assert len(text.splitlines()) <= gpu_check.SUMMARY_MAX_LINES


def test_fit_cuts_oversized_files_and_counts_them(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(gpu_check, "KEEP_BYTES", 600)
    big = tmp_path / "tests.log"
    big.write_bytes(b"a" * 1500 + b"the end\n")
    assert gpu_check.fit(str(tmp_path)) == []
    data = big.read_bytes()
    assert len(data) < 1000 and data.startswith(b"[cut: the first") and data.endswith(b"the end\n")
    for i in range(8):
        (tmp_path / f"f{i}.log").write_text("x")
    problems = gpu_check.fit(str(tmp_path))
    assert len(problems) == 1 and "9 files" in problems[0]


def test_summary_falls_back_to_the_quick_bench_when_the_full_one_was_cut(tmp_path):
    cut = BENCH.split("## Summary")[0]  # killed before its summary table
    steps = [("bench-quick", "ok", "40", ""), ("bench", "timeout", "150", "killed after 150 s")]
    out, scratch = make_run(tmp_path, steps, {"bench.md": cut, "bench-quick.md": BENCH})
    text = gpu_check.summary(out, scratch)
    assert "## benchmark: bench.md (timeout, 150 s, 2 cases)\nno summary table here; the rows are in bench.md" in text
    assert "## benchmark: bench-quick.md (ok, 40 s, 2 cases)" in text and "| fwd | float32 | cpp | 1.10 |" in text
