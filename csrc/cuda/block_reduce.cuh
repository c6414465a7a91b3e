// Warp- and block-level reductions of per-thread partial results.
//
// Two kinds of partial result are reduced: a WelfordState (the statistics
// pass, merged with welford_merge from csrc/welford.h, the same function the
// thread level and the grid level use) and a SumPair (the backward pass:
// sum of dy and sum of dy * (x - mean)).  `combine` and `shuffle_xor` are
// overloaded for both, so one set of reduction trees serves both passes.
//
// Every tree has a fixed shape that depends only on the launch geometry, never
// on timing, so results are bit-identical from run to run.
#pragma once

#include "welford.h"

namespace torch_bn_manual {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct SumPair {
  T dy;     // sum of dy
  T dy_xm;  // sum of dy * (x - m)
};

template <typename T>
__device__ __forceinline__ WelfordState<T> combine(const WelfordState<T>& a, const WelfordState<T>& b) {
  return welford_merge(a, b);
}

template <typename T>
__device__ __forceinline__ SumPair<T> combine(const SumPair<T>& a, const SumPair<T>& b) {
  return SumPair<T>{a.dy + b.dy, a.dy_xm + b.dy_xm};
}

template <typename T>
__device__ __forceinline__ WelfordState<T> shuffle_xor(const WelfordState<T>& s, int lane_mask) {
  return WelfordState<T>{__shfl_xor_sync(kFullMask, s.mean, lane_mask),
                         __shfl_xor_sync(kFullMask, s.m2, lane_mask),
                         __shfl_xor_sync(kFullMask, s.count, lane_mask)};
}

template <typename T>
__device__ __forceinline__ SumPair<T> shuffle_xor(const SumPair<T>& s, int lane_mask) {
  return SumPair<T>{__shfl_xor_sync(kFullMask, s.dy, lane_mask),
                    __shfl_xor_sync(kFullMask, s.dy_xm, lane_mask)};
}

// Butterfly over the lanes that differ in bits >= lowest_mask: afterwards a
// lane holds the combination of every lane that agrees with it in the bits
// below lowest_mask.  lowest_mask = 1 reduces the whole warp.  The whole warp
// must call it.
template <typename State>
__device__ __forceinline__ State warp_reduce(State s, int lowest_mask) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask >= 1; mask >>= 1) {
    if (mask >= lowest_mask) s = combine(s, shuffle_xor(s, mask));
  }
  return s;
}

// All threads of the block hold a partial result for the same channel; the
// total is returned in thread 0.  smem holds one State per warp.  The block
// must be a whole number of warps, at most 32 of them.
template <typename State>
__device__ __forceinline__ State block_reduce(State s, State* smem, const State& empty) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int num_warps = (blockDim.x * blockDim.y) / kWarpSize;
  s = warp_reduce(s, 1);
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < num_warps ? smem[lane] : empty;
    s = warp_reduce(s, 1);
  }
  return s;
}

// Column reduction for the channels-last kernels: the block is (bx, by) with
// bx a power of two <= 32 and bx * by a multiple of 32; thread (tx, ty) holds
// partial results for the VEC channels of column tx.  First the lanes of a
// warp that share tx are combined (shuffles), then the warps (shared memory,
// in warp order).  Afterwards thread t < bx * VEC holds the total of column
// t / VEC, channel t % VEC, which it returns in `out`; the return value says
// whether this thread holds one.  smem: (bx * by / 32) * bx * VEC States.
template <typename State, int VEC>
__device__ __forceinline__ bool block_reduce_columns(State (&s)[VEC], State* smem, State& out) {
  const int bx = blockDim.x;
  const int tid = threadIdx.x + threadIdx.y * bx;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int num_warps = (bx * blockDim.y) / kWarpSize;
#pragma unroll
  for (int k = 0; k < VEC; ++k) s[k] = warp_reduce(s[k], bx);
  if (lane < bx) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) smem[(warp * bx + lane) * VEC + k] = s[k];
  }
  __syncthreads();
  if (tid >= bx * VEC) return false;
  out = smem[tid];
  for (int w = 1; w < num_warps; ++w) out = combine(out, smem[w * bx * VEC + tid]);
  return true;
}

}  // namespace cuda
}  // namespace torch_bn_manual
