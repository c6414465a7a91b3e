"""The Python parts of scripts/gpu_check.sh (make gpu-check OUT=dir).

    python scripts/gpu_check.py env SCRATCH     environment facts: printed, and SCRATCH/env.json
    python scripts/gpu_check.py ops            every op has a CPU kernel and a CUDA one (exit 1 if not)
    python scripts/gpu_check.py summary OUT SCRATCH   OUT/summary.md from the step records and logs
    python scripts/gpu_check.py fit OUT        OUT within what comes back from the GPU machine

Only the standard library at module level: `summary` and `fit` must work
whatever state torch and the build are in.
"""
from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET

# What comes back from the GPU machine (/work/.library/device/README.md):
# at most 8 files, none over 16 MiB.
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024
KEEP_BYTES = 15 * 1024 * 1024  # an oversized log keeps its last 15 MiB
# The files the script writes into OUT, in the order the summary lists them.
OUT_FILES = ("summary.md", "gpu_check.log", "env.log", "build.log", "tests.log", "sanitizer.log",
             "bench-quick.md", "bench.md")
SUMMARY_MAX_LINES = 60  # one screen
OPS = ("batch_norm_train_forward", "batch_norm_eval_forward", "batch_norm_backward",
       "batch_norm_collect_stats", "batch_norm_merge_stats", "batch_norm_elementwise",
       "batch_norm_backward_reduce", "batch_norm_backward_elementwise", "batch_norm_running_stats",
       "batch_norm_act_train_forward", "batch_norm_act_eval_forward", "batch_norm_act_backward")


# ---------------------------------------------------------------- env

def env(scratch: str) -> int:
    """Print what the machine has and write scratch/env.json for the script and the summary."""
    import importlib.util
    info = {"python": sys.executable, "torch": None, "cuda": None, "cudnn": None, "gpu_count": 0,
            "gpu": None, "capability": None, "arch": None}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.version.cuda else None
        if torch.cuda.is_available():
            info["gpu_count"] = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            major, minor = torch.cuda.get_device_capability(0)
            info["gpu"] = props.name
            info["capability"] = f"{major}.{minor}"
            info["arch"] = f"{major}.{minor}"
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["multiprocessors"] = props.multi_processor_count
    except Exception as e:  # torch missing or broken: the summary says so
        info["torch_error"] = f"{type(e).__name__}: {e}"
    for module in ("pytest", "xdist", "pytest_timeout", "ninja", "numpy"):
        info["has_" + module] = importlib.util.find_spec(module) is not None
    for key, value in info.items():
        print(f"{key}: {value}")
    with open(os.path.join(scratch, "env.json"), "w") as f:
        json.dump(info, f)
    return 0


# ---------------------------------------------------------------- ops

def ops() -> int:
    """Every op of the torch_bn_manual namespace has a CPU kernel and a CUDA one."""
    import torch
    import torch_bn_manual._C  # noqa: F401  (runs the registrations)
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("torch_bn_manual::"))
    problems = []
    if set(names) != set(OPS):
        problems.append(f"ops in the namespace {names}, expected {sorted(OPS)}")
    for name in names:
        for key in ("CUDA", "CPU"):
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_bn_manual::{name}", key)
            print(f"{name:34s} {key:4s} {'ok' if ok else 'MISSING'}")
            if not ok:
                problems.append(f"{name}: no {key} kernel")
    for p in problems:
        print("PROBLEM: " + p)
    print(f"ops: {'every op has its kernels' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


# ---------------------------------------------------------------- reading the logs

def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_steps(path: str) -> list:
    """scratch/steps.tsv: name, status (ok/failed/timeout/skipped), seconds, note; one line per step."""
    steps = []
    for line in read(path).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            steps.append({"name": parts[0], "status": parts[1], "seconds": parts[2],
                          "note": parts[3] if len(parts) > 3 else ""})
    return steps


def first_error_line(text: str) -> str:
    """The line of a failure that says what went wrong: pytest's 'E   ...' line, else the last line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("E "):
            return ln[1:].strip()
    return lines[-1] if lines else ""


def test_results(junit_path: str) -> dict:
    """Counts and failures from pytest's junit xml; {} when there is none (the run did not finish)."""
    try:
        root = ET.parse(junit_path).getroot()
    except (OSError, ET.ParseError):
        return {}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed" if child.tag == "failure" else "error"
                failures.append((name, first_error_line(child.text or child.get("message", ""))))
                break
            if child.tag == "skipped":
                status = "skipped"
        counts[status] += 1
    return {"counts": counts, "failures": failures}


def tests_from_log(log: str) -> dict:
    """Fallback when there is no junit file: pytest's last summary line and its FAILED/ERROR lines."""
    counts = {}
    for m in re.finditer(r"(\d+) (passed|failed|errors?|skipped)", log):
        counts[m.group(2).rstrip("s") if m.group(2).startswith("error") else m.group(2)] = int(m.group(1))
    failures = [(m.group(2), m.group(3) or "") for m in
                re.finditer(r"^(FAILED|ERROR) \S*?::(\S+)(?: - (.*))?$", log, re.M)]
    return {"counts": counts, "failures": failures} if counts or failures else {}


def sanitizer_verdict(log: str, status: str, note: str) -> str:
    if status == "skipped":
        return f"skipped: {note}"
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", log)
    if status == "timeout":
        return "timed out" + (f" after {m.group(0)}" if m else "")
    if m and int(m.group(1)) == 0 and "cuda_memcheck_script: ok" in log and status == "ok":
        return "memcheck clean (ERROR SUMMARY: 0 errors)"
    if m and int(m.group(1)) > 0:
        return f"memcheck found {m.group(1)} error(s); see sanitizer.log"
    return f"{status}: {note or 'no ERROR SUMMARY line'}; see sanitizer.log"


def bench_summary(text: str) -> list:
    """The bench's own summary table (nn / backend per mode and dtype), compiled backend rows only."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("## Summary"):
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                if lines:
                    break
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) > 2 and cells[2] not in ("backend", "---", "cpp"):
                continue  # the python backend's rows: in the full log
            lines.append(line)
    return lines


def bench_rows(text: str) -> int:
    """How many case rows a bench log holds (4 leading cells: shape, layout, dtype, mode)."""
    return sum(1 for ln in text.splitlines() if re.match(r"^\| \d+x\d+", ln))


# ---------------------------------------------------------------- summary

def summary(out: str, scratch: str) -> str:
    steps = read_steps(os.path.join(scratch, "steps.tsv"))
    by_name = {s["name"]: s for s in steps}
    try:
        with open(os.path.join(scratch, "env.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    lines = ["# make gpu-check", ""]
    gpu = info.get("gpu")
    if gpu:
        lines.append(f"- GPU: {gpu} (sm {info.get('capability')}, {info.get('multiprocessors')} SMs, "
                     f"{info.get('gpu_memory_gib')} GiB); {info.get('gpu_count')} visible")
    else:
        lines.append("- GPU: **no GPU** visible to torch: the run stopped after the build and the op check")
    lines.append(f"- torch {info.get('torch')}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}; "
                 f"python {info.get('python')}" + (f"; {info['torch_error']}" if info.get("torch_error") else ""))
    build = by_name.get("build")
    if build:
        lines.append(f"- build: {build['status']} in {build['seconds']} s ({build['note']})")
    lines.append("- steps: " + ", ".join(f"{s['name']} {s['status']} {s['seconds']} s" for s in steps))
    for s in steps:  # why a step did not pass (the build's note is above; "no GPU" is said once)
        if s["status"] in ("skipped", "failed", "timeout") and s["note"] and s["name"] != "build" \
                and s["note"] != "no GPU":
            lines.append(f"  - {s['name']} {s['status']}: {s['note']}")
    ops_step = by_name.get("ops")
    if ops_step and ops_step["status"] != "ok":
        log = read(os.path.join(out, "build.log")).splitlines()
        found = [ln for ln in log if ln.startswith(("PROBLEM", "ops:"))] or [ln for ln in log if ln.strip()][-1:]
        lines += ["  - " + ln for ln in found[:4]] + ([f"  - ... {len(found) - 4} more in build.log"]
                                                      if len(found) > 4 else [])

    tests = by_name.get("tests")
    if tests and tests["status"] != "skipped":
        res = test_results(os.path.join(scratch, "tests.xml")) or tests_from_log(read(os.path.join(out, "tests.log")))
        lines += ["", f"## tests/test_cuda.py ({tests['status']}, {tests['seconds']} s)"]
        if not res:
            lines.append("no results (see tests.log)")
        else:
            c = res["counts"]
            lines.append(", ".join(f"{v} {k}" for k, v in c.items() if v) or "no tests ran")
            for name, error in res["failures"][:15]:
                lines.append(f"- FAILED {name}: {error[:160]}")
            if len(res["failures"]) > 15:
                lines.append(f"- ... {len(res['failures']) - 15} more in tests.log")

    san = by_name.get("sanitizer")
    if san:
        lines += ["", "## compute-sanitizer", sanitizer_verdict(read(os.path.join(out, "sanitizer.log")),
                                                                san["status"], san["note"])]

    # The full run's summary table when it has one, else the quick run's; one table in all.
    shown = False
    for name, file in (("bench", "bench.md"), ("bench-quick", "bench-quick.md")):
        step = by_name.get(name)
        if not step or step["status"] == "skipped":
            continue
        text = read(os.path.join(out, file))
        table = [] if shown else bench_summary(text)
        head = f"## benchmark: {file} ({step['status']}, {step['seconds']} s, {bench_rows(text)} cases)"
        if table:
            lines += ["", head] + table
            shown = True
        else:
            lines += ["", head, "no summary table here" + ("" if shown else "; the rows are in " + file)]

    lines += ["", "Files: " + ", ".join(f for f in OUT_FILES if f == "summary.md" or os.path.exists(os.path.join(out, f)))]
    if len(lines) > SUMMARY_MAX_LINES:
        lines = lines[:SUMMARY_MAX_LINES - 1] + ["(cut to one screen; the logs hold the rest)"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------- fit

def fit(out: str) -> list:
    """Cut every file in out to MAX_FILE_BYTES (keeping its end) and list what would still not come back."""
    problems = []
    files = sorted(f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)))
    for name in files:
        path = os.path.join(out, name)
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            with open(path, "rb") as f:
                f.seek(size - KEEP_BYTES)
                tail = f.read()
            with open(path, "wb") as f:
                f.write(f"[cut: the first {size - KEEP_BYTES} of {size} bytes left out]\n".encode())
                f.write(tail)
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in {out}, only {MAX_FILES} come back: {files}")
    others = [f for f in os.listdir(out) if not os.path.isfile(os.path.join(out, f))]
    if others:
        problems.append(f"not plain files, will not come back: {others}")
    return problems


def main(argv) -> int:
    if len(argv) >= 2 and argv[0] == "env":
        return env(argv[1])
    if argv[:1] == ["ops"]:
        return ops()
    if len(argv) >= 3 and argv[0] == "summary":
        print(summary(argv[1], argv[2]), end="")
        return 0
    if len(argv) >= 2 and argv[0] == "fit":
        problems = fit(argv[1])
        for p in problems:
            print("gpu-check: " + p)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
