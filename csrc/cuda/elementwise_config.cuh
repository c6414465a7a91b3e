// Grid shapes of the elementwise passes (forward normalize, backward dx).
//
// Both are grid-stride loops sized to one full wave of resident blocks, so
// every block gets the same share and there is no tail wave.
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch_config.cuh"

namespace torch_bn_manual {
namespace cuda {

constexpr int kUnrollElementwise = 4;  // vectors in flight per thread

// Contiguous layout: 1-D grid over `total` vectors, kThreads per block.
template <auto kKernel>
unsigned flat_grid(int64_t total, int device) {
  const int64_t needed = ceil_div(total, int64_t(kThreads) * kUnrollElementwise);
  const int64_t wave = full_wave_blocks<kKernel>(kThreads, device);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, wave)));
}

// Channels-last layout: block (bx, by) with bx threads across the Cv channel
// vectors of a row (bx = Cv when it fits in a block, else Cv split evenly
// over tiles) and by rows; grid (tiles, row blocks).
struct RowsConfig {
  dim3 grid;
  dim3 block;
};

template <auto kKernel>
RowsConfig rows_config(int64_t rows, int64_t Cv, int device) {
  const int64_t tiles = Cv <= kThreads ? 1 : ceil_div(Cv, kThreads);
  const int64_t bx = ceil_div(Cv, tiles);
  const int64_t by = std::max<int64_t>(1, kThreads / bx);
  const int64_t needed = ceil_div(rows, by * kUnrollElementwise);
  // occupancy was measured with kThreads per block; scale to this block size
  const int64_t wave = full_wave_blocks<kKernel>(kThreads, device) * kThreads / (bx * by);
  const int64_t row_blocks = std::max<int64_t>(1, std::min({ceil_div(wave, tiles), needed, kMaxGridY}));
  RowsConfig cfg;
  cfg.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks));
  cfg.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  return cfg;
}

}  // namespace cuda
}  // namespace torch_bn_manual
