"""The benchmark's core runs: one tiny case per mode, every available column; its output files,
progress lines, allocator passes and busy-machine checks."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
from cases import Case  # noqa: E402

TINY = ["--shapes", "4x3x6x6", "--layouts", "contiguous", "--dtypes", "float32", "--modes", "fwd+bwd,eval",
        "--min-run-time", "0.01"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "eval"])
@pytest.mark.parametrize("shape,layout,rounds", [((4, 3, 6, 6), "channels_last", 1), ((16, 5), "contiguous", 2)])
def test_run_case_times_every_column(shape, layout, rounds, mode):
    impls = bench.impls_for("cpu")
    row = bench.run_case(Case(shape, layout, "float32", mode), impls, "cpu", min_run_time=0.01, threads=1,
                         rounds=rounds)
    names = [i.name for i in impls]
    assert set(row.seconds) == set(names)
    for name in names:
        assert not row.notes[name], f"{name}: {row.notes[name]}"
        assert row.seconds[name] > 0, name
        gbps = row.gbps(name)
        assert 0 < gbps < 1e4, (name, gbps)
    assert 0 < row.copy_gbps < 1e4
    for name in names[1:]:
        assert row.ratio(name) > 0
    line = report.format_row(row, names)
    assert line.count("|") == len(report.columns(names, row.baselines)) + 1


def test_a_column_that_runs_the_wrong_thing_is_reported():
    wrong = bench.Impl("cpp", backend="cpp")  # nn.BatchNorm2d passed off as the cpp backend
    ops = {"aten::native_batch_norm"}
    with pytest.raises(RuntimeError):
        bench.check_ran(wrong, ops)
    with pytest.raises(RuntimeError):
        bench.check_ran(bench.Impl("nn"), {"torch_bn_manual::batch_norm_train_forward", "aten::native_batch_norm"})


def test_bfloat16_input_with_float32_module():
    row = bench.run_case(Case((4, 3, 5, 5), "contiguous", "bfloat16", "fwd+bwd"), bench.impls_for("cpu", []),
                         "cpu", min_run_time=0.005, threads=1)
    assert not row.notes["nn"] and row.seconds["nn"] > 0 and row.gbps("nn") > 0


def test_keep_freed_memory_reports_what_it_did():
    line = bench.keep_freed_memory()
    assert line.startswith("- allocator: ")
    assert bench.parse_args(["--quick", "--out", "-"]).allocator == "both"
    args = bench.parse_args(["--system-allocator", "--quick", "--out", "-"])
    assert args.allocator == "default" and args.rounds == 1
    assert bench.parse_args(["--out", "-"]).rounds == 8


def test_make_bench_writes_only_its_own_files():
    """The default output is cpu-latest.md/.png, never the hand-written docs or the kept run cpu.md."""
    args = bench.parse_args([])
    assert args.out.endswith(os.path.join("benchmarks", "results", "cpu-latest.md"))
    assert args.plot.endswith(os.path.join("benchmarks", "results", "cpu-latest.png"))
    assert bench.parse_args(["--no-plot"]).plot is None
    assert bench.parse_args(["--quick"]).out is None and bench.parse_args(["--quick"]).plot is None


def test_both_allocator_passes_with_progress(tmp_path, capfd):
    out = tmp_path / "r.md"
    bench.main(["--quick", *TINY, "--out", str(out), "--no-plot"])
    printed = capfd.readouterr().out
    for k in (1, 2):
        assert f"[{k}/2] 4x3x6x6 nchw float32" in printed
    assert "left" in printed.split("[2/2]", 1)[1].splitlines()[0]
    assert "machine at the start: copy" in printed and "machine at the end: copy" in printed
    text = out.read_text()
    assert "## 1. glibc defaults: what a training loop gets" in text
    assert "## 2. freed memory kept (mallopt): the kernels' own speed" in text
    assert text.count("| 4x3x6x6") >= 4 and "docs/performance.md" in text


def test_a_busy_run_is_marked_and_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "why_flagged", lambda *a: "other processes used 1.50 cores")
    out = tmp_path / "r.md"
    with pytest.raises(SystemExit) as exit_:
        bench.main([*TINY, "--rounds", "1", "--allocator", "default", "--out", str(out), "--no-plot"])
    assert exit_.value.code == bench.BUSY_EXIT
    text = out.read_text()
    assert text.index("BUSY MACHINE: these numbers are not valid") < text.index("## glibc defaults")
    assert "| 4x3x6x6 !" in text


def test_busy_signs():
    quiet = machine.Probe(50.0, (0.1, 0.1, 0.1))
    assert machine.why_flagged(quiet, machine.Probe(45.0, None), 0.05) == ""
    assert "copy bandwidth" in machine.why_flagged(quiet, machine.Probe(30.0, None), 0.05)
    assert "cores" in machine.why_flagged(quiet, machine.Probe(50.0, None), 1.2)
    others = machine.OthersMeter().start().stop()
    assert others is None or others >= 0
    assert machine.copy_probe_gbps(0.01) > 0


def test_plot_of_both_passes(tmp_path):
    pytest.importorskip("matplotlib")
    impls = bench.impls_for("cpu")
    names = [i.name for i in impls]
    row = bench.run_case(Case((4, 3, 5, 5), "contiguous", "float32", "eval"), impls, "cpu", 0.005, 1)
    passes = [{"allocator": a, "rows": [row], "busy": []} for a in ("default", "keep-freed")]
    path = tmp_path / "p.png"
    report.plot_passes(passes, names, ("nn",), str(path), bench.ALLOCATOR_TITLES)
    assert path.read_bytes()[:4] == b"\x89PNG"
