"""Edge cases of the statistics that SyncBatchNorm gathers and merges, on the CPU.

- counts above 2^24 values per channel stay exact for half inputs (their
  statistics are float32, which would round 2^24 + 3 to 2^24 + 4): the count
  is float64 for every input dtype, in collect_stats and merge_stats;
- Chan's merge (csrc/welford.h, mirrored by the python backend) leaves a
  state unchanged when the other side is empty, also where delta² overflows
  float32 (bfloat16 statistics beyond about 1.8e19), instead of inf · 0 = NaN.

Each backend against float64 math on the same values.
"""
import pytest
import torch

from torch_bn_manual.backends import get_backend

from op_reference import ref_stats, rel_err

CPU = torch.device("cpu")


def randn(shape, generator, dtype, offset=0.0, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)


def test_half_count_above_2_24_is_exact(backend, generator):
    impl = get_backend(backend, CPU)
    rows = 2**24 + 3  # float32(rows) == 2^24 + 4
    assert float(torch.tensor(float(rows), dtype=torch.float32)) != rows
    x = randn((rows, 1), generator, torch.float16, offset=2.0)  # 32 MB
    mean, m2, count = impl.collect_stats(x)
    assert count.dtype == torch.float64 and count.tolist() == [float(rows)]
    ref_mean, ref_m2, _ = ref_stats(x)
    assert mean.dtype == m2.dtype == torch.float32
    assert rel_err(mean, ref_mean) <= 1e-6 and rel_err(m2, ref_m2) <= 1e-5
    # SyncBatchNorm stacks (mean, m2, count) for one all_gather, then merges:
    # the stack is float64, so the global count stays exact too.
    gathered = torch.stack([torch.stack([mean, m2, count])] * 3)
    merged = impl.merge_stats(*gathered.transpose(0, 1).unbind(0))
    assert merged[2].dtype == torch.float64 and merged[2].tolist() == [3.0 * rows]
    assert rel_err(merged[0], ref_mean) <= 1e-6 and rel_err(merged[1], 3 * ref_m2) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_count_is_float64_for_every_dtype(backend, dtype, generator):
    impl = get_backend(backend, CPU)
    x = randn((5, 3, 4), generator, dtype)
    mean, m2, count = impl.collect_stats(x)
    assert count.dtype == torch.float64 and count.tolist() == [20.0] * 3
    empty = impl.collect_stats(x[:0])
    assert empty[2].dtype == torch.float64 and empty[2].eq(0).all()
    merged = impl.merge_stats(*(torch.stack([a, b]) for a, b in zip((mean, m2, count), empty)))
    assert merged[2].dtype == torch.float64 and merged[0].dtype == mean.dtype
    assert torch.equal(merged[0], mean) and torch.equal(merged[1], m2) and torch.equal(merged[2], count)


@pytest.mark.parametrize("empty_at", [0, 1, 3])
def test_merge_with_empty_group_beyond_float32_square_range(backend, empty_at, generator):
    """bfloat16 values near 3e19: float32 statistics hold them, but the
    difference of two means squared (about 9e38) does not. A rank with no
    samples (count 0, mean 0) must drop out of the merge, not turn it NaN."""
    impl = get_backend(backend, CPU)
    channels = 4
    # group means near 3e19 and close together: m2 stays in float32's range
    parts = [randn((n, channels, 3), generator, torch.bfloat16, offset=3e19 + g * 1e18, scale=1e18)
             for g, n in enumerate([6, 5, 9])]
    parts.insert(empty_at, parts[0][:0])
    stats = [impl.collect_stats(p) for p in parts]
    assert stats[empty_at][2].eq(0).all()
    mean, m2, count = (torch.stack([s[i] for s in stats]) for i in range(3))
    merged_mean, merged_m2, merged_count = impl.merge_stats(mean, m2, count)
    ref_mean, ref_m2, ref_count = ref_stats(torch.cat(parts))
    assert torch.isfinite(merged_mean).all() and torch.isfinite(merged_m2).all()
    assert merged_count.tolist() == [float(ref_count)] * channels
    assert rel_err(merged_mean, ref_mean) <= 1e-6 and rel_err(merged_m2, ref_m2) <= 1e-5


def test_merge_of_empty_and_huge_float32_state(backend):
    """The merge itself, on given float32 statistics: an empty side first or
    last returns the other side's state bit for bit."""
    impl = get_backend(backend, CPU)
    state = (torch.tensor([2.5e19, -3e19]), torch.tensor([1e30, 2e31]), torch.tensor([7.0, 11.0], dtype=torch.float64))
    empty = (torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    for groups in ([empty, state], [state, empty], [empty, state, empty]):
        merged = impl.merge_stats(*(torch.stack([g[i] for g in groups]) for i in range(3)))
        assert all(torch.equal(a, b) for a, b in zip(merged, state)), groups
