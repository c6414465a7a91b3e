"""The benchmark's core runs: one tiny case per mode, every available column."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench  # noqa: E402
import report  # noqa: E402
from cases import Case  # noqa: E402


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
    assert not bench.parse_args(["--quick", "--out", "-"]).system_allocator
    args = bench.parse_args(["--system-allocator", "--quick", "--out", "-"])
    assert args.system_allocator and args.rounds == 1
    assert bench.parse_args(["--out", "-"]).rounds == 8
