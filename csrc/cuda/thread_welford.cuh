// Thread level of the statistics pass.
//
// A thread reads its values a few at a time (the lanes of a few 16-byte
// vectors, or one channel of a few rows).  Such a chunk of N values of one
// channel sits in registers, so its mean and M2 are computed the textbook way
// (mean first, then the squared deviations from it), and the chunk is folded
// into the thread's running state with welford_merge.  This is Welford's
// update applied to chunks instead of single values: the same stability, one
// division per chunk instead of one per value.  Everything here is in the
// statistics dtype (double for float32 input).
#pragma once

#include "welford.h"

namespace torch_bn_manual {
namespace cuda {

// State of the first n (0 <= n <= N) entries of d.  The others are ignored.
template <typename T, int N>
__device__ __forceinline__ WelfordState<T> chunk_state(const T (&d)[N], int n) {
  T sum = T(0);
#pragma unroll
  for (int i = 0; i < N; ++i) sum += i < n ? d[i] : T(0);
  // N is a power of two in every caller, so the full-chunk scale is exact.
  const T mean = n == N ? sum * (T(1) / T(N)) : (n > 0 ? sum / T(n) : T(0));
  T m2 = T(0);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const T dev = d[i] - mean;
    m2 += i < n ? dev * dev : T(0);
  }
  return WelfordState<T>{mean, m2, T(n)};
}

}  // namespace cuda
}  // namespace torch_bn_manual
