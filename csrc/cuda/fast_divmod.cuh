// Division by a runtime constant with a multiply-high and a shift.
//
// The contiguous (N, C, L) kernels turn a flat vector index into a plane and
// a channel for every 16-byte vector; a hardware 32-bit division costs about
// twenty instructions, this costs three.  Granlund & Montgomery: with
// s = ceil(log2 d) and magic = floor(2^32 (2^s - d) / d) + 1,
//     n / d = (umulhi(n, magic) + n) >> s      for 0 <= n, d < 2^31,
// and the sum cannot overflow 32 bits because umulhi(n, magic) <= n.
// Callers fall back to 64-bit division when an index can reach 2^31.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace torch_bn_manual {
namespace cuda {

struct FastDivmod {
  uint32_t divisor;
  uint32_t magic;
  uint32_t shift;

  FastDivmod() : divisor(1), magic(1), shift(0) {}

  // d must be in [1, 2^31).
  explicit FastDivmod(uint32_t d) : divisor(d), shift(0) {
    while (shift < 32 && (uint64_t(1) << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }

  C10_HOST_DEVICE inline uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, magic);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * magic) >> 32);
#endif
    return (hi + n) >> shift;
  }

  // quotient and remainder in one go
  C10_HOST_DEVICE inline void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

}  // namespace cuda
}  // namespace torch_bn_manual
