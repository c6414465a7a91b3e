// Index arithmetic of the contiguous (N, C, L) layout, in units of vectors
// (VEC consecutive elements of one plane; L is a multiple of VEC).
//
//   channel view:  vector j of channel c, j in [0, N * Lv), lies at
//                  ((j / Lv) * C + c) * Lv + j % Lv
//   flat view:     flat vector i belongs to channel (i / Lv) % C
//
// The divisions use FastDivmod while the dividend stays below 2^31, and 64-bit
// division beyond (tensors of more than 2^31 vectors).
#pragma once

#include <cstdint>

#include "fast_divmod.cuh"

namespace torch_bn_manual {
namespace cuda {

struct NclIndex {
  int64_t C = 0;
  int64_t Lv = 1;          // vectors per (n, c) plane
  FastDivmod by_lv;        // divides by Lv
  FastDivmod by_c;         // divides by C
  bool channel_view_32 = false;  // N * Lv < 2^31
  bool flat_view_32 = false;     // N * C * Lv < 2^31

  NclIndex() = default;
  NclIndex(int64_t N, int64_t C_, int64_t Lv_) : C(C_), Lv(Lv_) {
    const int64_t limit = int64_t(1) << 31;
    if (Lv < limit) by_lv = FastDivmod(static_cast<uint32_t>(Lv));
    if (C < limit) by_c = FastDivmod(static_cast<uint32_t>(C));
    channel_view_32 = Lv < limit && N * Lv < limit;
    flat_view_32 = Lv < limit && C < limit && N * C * Lv < limit;
  }

  __device__ __forceinline__ int64_t channel_vector(int64_t j, int64_t c) const {
    int64_t n, l;
    if (channel_view_32) {
      uint32_t q, r;
      by_lv.divmod(static_cast<uint32_t>(j), q, r);
      n = q;
      l = r;
    } else {
      n = j / Lv;
      l = j - n * Lv;
    }
    return (n * C + c) * Lv + l;
  }

  __device__ __forceinline__ int64_t channel_of(int64_t i) const {
    if (flat_view_32) {
      const uint32_t plane = by_lv.div(static_cast<uint32_t>(i));
      return plane - by_c.div(plane) * static_cast<uint32_t>(C);
    }
    return (i / Lv) % C;
  }
};

}  // namespace cuda
}  // namespace torch_bn_manual
