// Merge of per-group statistics (one group per rank of SyncBatchNorm):
// (G, C) mean, m2, count -> (C,).  One thread per channel folds the groups in
// group order with welford_merge, in double whatever the statistics dtype
// (the host converts), the same fold as the CPU kernel.  Groups with count 0
// drop out of the merge by its definition.  G is the number of ranks, so the
// sequential fold is short; the reads of a group are coalesced over channels.
#include <c10/cuda/CUDAException.h>

#include "launch_config.cuh"
#include "launchers.h"
#include "welford.h"

namespace torch_bn_manual {
namespace cuda {
namespace {

__global__ void merge_stats_kernel(int64_t G, int64_t C, const double* __restrict__ mean,
                                   const double* __restrict__ m2, const double* __restrict__ count,
                                   double* __restrict__ mean_out, double* __restrict__ m2_out,
                                   double* __restrict__ count_out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  WelfordState<double> s{0.0, 0.0, 0.0};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t i = g * C + c;
    s = welford_merge(s, WelfordState<double>{mean[i], m2[i], count[i]});
  }
  mean_out[c] = s.mean;
  m2_out[c] = s.m2;
  count_out[c] = s.count;
}

}  // namespace

void launch_merge_stats(int64_t G, int64_t C, const double* mean, const double* m2, const double* count,
                        double* mean_out, double* m2_out, double* count_out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(C, kThreads));
  merge_stats_kernel<<<blocks, kThreads, 0, stream>>>(G, C, mean, m2, count, mean_out, m2_out, count_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace torch_bn_manual
