// Welford running statistics and Chan's pairwise merge.
//
// This is the one merge function of the project: the CPU kernels use it to
// fold per-thread partial results, the CUDA kernels use it at thread, warp,
// block and grid level, and batch_norm_merge_stats uses it to combine the
// per-rank statistics of SyncBatchNorm.  Keeping a single definition means
// every level has the same (well-conditioned) arithmetic.
//
// A state summarises `count` values by their mean and by
//   m2 = sum_i (x_i - mean)^2,
// never by sum(x^2), which cancels catastrophically (docs/derivation.md).
#pragma once

#include <c10/macros/Macros.h>

namespace torch_bn_manual {

template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;
  acc_t count;
};

// Chan, Golub & LeVeque: merge two summaries of disjoint sets.
//   n     = n_a + n_b
//   delta = mean_b - mean_a
//   mean  = mean_a + delta * n_b / n
//   m2    = m2_a + m2_b + delta^2 * n_a * n_b / n
// An empty side (count 0) leaves the other unchanged, returned as it is: the
// formula would give delta^2 * 0, which is NaN where delta^2 overflows
// (float statistics of bfloat16 values beyond about 1.8e19).
template <typename acc_t>
C10_HOST_DEVICE inline WelfordState<acc_t> welford_merge(
    const WelfordState<acc_t>& a, const WelfordState<acc_t>& b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t count = a.count + b.count;
  const acc_t b_share = b.count / count;
  const acc_t delta = b.mean - a.mean;
  WelfordState<acc_t> out;
  out.mean = a.mean + delta * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  out.count = count;
  return out;
}

// Adding one value is a merge with the one-element state {x, 0, 1}.
template <typename acc_t>
C10_HOST_DEVICE inline WelfordState<acc_t> welford_update(
    const WelfordState<acc_t>& state, acc_t x) {
  return welford_merge(state, WelfordState<acc_t>{x, acc_t(0), acc_t(1)});
}

}  // namespace torch_bn_manual
