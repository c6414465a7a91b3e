// Grid shape of the reductions (statistics and backward sums).
//
// Blocks of one reduction do equal work, so the grid should fill whole waves
// (a wave: multiprocessors x resident blocks of the kernel):
//   contiguous (N, C, L): grid (C, splits), each channel's N * L values cut
//     into `splits` slices, so a few channels with huge N * L are spread over
//     many blocks and many channels get a block each;
//   channels-last (M, C): grid (column tiles, splits), the rows cut into
//     `splits` ranges, so small C with huge M fills the device too.
// choose_splits picks the number of slices whose grid wastes the least of its
// last wave.  A slice is never shorter than two chunks per thread, and splits
// never exceeds the grid's y limit.  The shape depends only on the geometry
// and the device, which keeps the reduction order, and so the bits, fixed.
#pragma once

#include <algorithm>
#include <cstdint>

#include "block_reduce.cuh"
#include "launch_config.cuh"
#include "launchers.h"

namespace torch_bn_manual {
namespace cuda {

// What a thread of a reduction loads per step (a "chunk"): contiguous
// layout: kChunkVectors vectors of its channel; channels-last: the vectors of
// kChunkRows rows.  At least 4 loads in flight, 16 for single elements, and
// at most 16 (32 for the half types) values held per channel.
template <int VEC>
constexpr int kChunkVectors = VEC >= 4 ? 4 : 16 / VEC;
template <int VEC>
constexpr int kChunkRows = VEC >= 4 ? 4 : 16 / VEC;

// Slices per tile for `tiles` tiles: the count, up to four waves' worth, with
// the largest share of busy block slots over the waves the grid occupies
// (blocks / (waves * wave)); among equals the smallest.  At most `useful`.
inline int64_t choose_splits(int64_t tiles, int64_t wave, int64_t useful) {
  const int64_t most = std::max<int64_t>(1, std::min({ceil_div(4 * wave, tiles), useful, kMaxGridY}));
  int64_t best = 1;
  double best_share = 0.0;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t blocks = tiles * s;
    const double share = double(blocks) / double(ceil_div(blocks, wave) * wave);
    if (share > best_share + 1e-9) {
      best_share = share;
      best = s;
    }
  }
  return best;
}

// kNcl / kNlc: the two bulk kernels of the pass (for their occupancy).
template <auto kNcl, auto kNlc, int VEC>
ReducePlan reduce_plan(const Geometry& g) {
  const int vec = VEC;
  const int ncl_chunk = kChunkVectors<VEC>;
  const int nlc_chunk = kChunkRows<VEC>;
  ReducePlan plan;
  int64_t work, tiles, min_per_block;
  if (!g.channels_last) {
    work = g.N * (g.L / vec);
    tiles = g.C;
    min_per_block = int64_t(kThreads) * ncl_chunk * 2;
    plan.block_x = kThreads;
    plan.block_y = 1;
  } else {
    const int64_t Cv = g.C / vec;
    const int bx = Cv <= 16 ? next_pow2(Cv) : kWarpSize;
    const int by = kThreads / bx;
    work = g.rows();
    tiles = ceil_div(Cv, bx);
    min_per_block = int64_t(by) * nlc_chunk * 2;
    plan.block_x = bx;
    plan.block_y = by;
  }
  const int64_t wave = g.channels_last ? full_wave_blocks<kNlc>(kThreads, g.device)
                                       : full_wave_blocks<kNcl>(kThreads, g.device);
  const int64_t useful = std::max<int64_t>(1, ceil_div(work, min_per_block));
  const int64_t splits = choose_splits(tiles, wave, useful);
  plan.per_split = ceil_div(work, splits);
  plan.splits = ceil_div(work, plan.per_split);
  plan.grid_x = static_cast<unsigned>(tiles);
  plan.grid_y = static_cast<unsigned>(plan.splits);
  return plan;
}

}  // namespace cuda
}  // namespace torch_bn_manual
