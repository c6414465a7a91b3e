// Vector building blocks for the CPU kernels (at::vec::Vectorized).
//
// Two arithmetic types appear in every kernel:
//   opmath_t<T>  the type elementwise math runs in: double for double input,
//                float for float, bfloat16 and half input;
//   double       the type every reduction accumulates in, for every input.
//
// The loops assume 256-bit vectors (8 floats, 4 doubles): that is what the
// build selects (AVX2 where the machine has it, the portable fallback of
// at::vec otherwise, which has the same widths).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_features.h"

namespace torch_bn_manual {
namespace cpu {

using at::vec::Vectorized;
using dVec = Vectorized<double>;
using fVec = Vectorized<float>;

static_assert(fVec::size() == 8 && dVec::size() == 4,
              "the CPU kernels are written for 256-bit vectors");

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// float -> bfloat16, rounded to nearest even. Where the CPU has AVX512-BF16
// (asked once at load time: use_avx512_bf16, csrc/cpu/cpu_features.h),
// vcvtneps2bf16 does it in one instruction instead of at::vec's nine integer
// steps. That instruction differs from c10's rounding in two cases only: it
// flushes denormals to zero and keeps a NaN's payload; a vector holding
// either (vfpclassps: NaN or denormal) takes at::vec's path, so every value
// gets the bits torch gives it, on either path.
#define TORCH_BN_MANUAL_CVTNE_BF16 1
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
// A native build (TORCH_BN_MANUAL_NATIVE=1 on such a machine): intrinsics.
inline bool has_nan_or_denormal(const __m256& f) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // quiet NaN, denormal, signalling NaN
  return _mm256_fpclass_ps_mask(f, kNanOrDenormal) != 0;
}
inline __m128i cvtne_bf16(const __m256& f) {
  return reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(f));
}
inline __m256i cvtne_bf16(const __m256& a, const __m256& b) {
  return reinterpret_cast<__m256i>(_mm256_cvtne2ps_pbh(b, a));  // b to the high half
}
#elif defined(__GNUC__) && !defined(__AVX512F__)
// A portable build: the compiler may not emit AVX-512, so the three
// instructions are written out; they run only when use_avx512_bf16 is true.
// Written as asm, they stay inline in the kernels' loops (a function with a
// target attribute would be a call per eight values). vfpclassps writes mask
// register k1 without declaring it: without AVX-512 enabled the compiler
// never keeps anything in a mask register, and the ABI has no callee-saved
// ones, so nothing live can be overwritten.
inline bool has_nan_or_denormal(const __m256& f) {
  unsigned mask;  // 0xa1: quiet NaN, denormal, signalling NaN
  asm("vfpclassps $0xa1, %1, %%k1\n\tkmovb %%k1, %0" : "=r"(mask) : "x"(f));
  return mask != 0;
}
inline __m128i cvtne_bf16(const __m256& f) {
  __m128i out;
  asm("vcvtneps2bf16 %1, %0" : "=x"(out) : "x"(f));
  return out;
}
inline __m256i cvtne_bf16(const __m256& a, const __m256& b) {
  __m256i out;  // AT&T order: a (to the low half), b (to the high half), destination
  asm("vcvtne2ps2bf16 %1, %2, %0" : "=x"(out) : "x"(a), "x"(b));
  return out;
}
#else
#undef TORCH_BN_MANUAL_CVTNE_BF16
#endif

inline __m128i round_to_bf16(const __m256& f) {
#ifdef TORCH_BN_MANUAL_CVTNE_BF16
  if (use_avx512_bf16 && !has_nan_or_denormal(f)) {
    return cvtne_bf16(f);
  }
#endif
  return at::vec::cvtfp32_bf16(f);
}

// a to the low 8 values, b to the high 8.
inline __m256i round_to_bf16(const __m256& a, const __m256& b) {
#ifdef TORCH_BN_MANUAL_CVTNE_BF16
  if (use_avx512_bf16 && !has_nan_or_denormal(a) && !has_nan_or_denormal(b)) {
    return cvtne_bf16(a, b);
  }
#endif
  return at::vec::cvtfp32_bf16(a, b);
}
#endif

// One vector of opmath_t values to and from memory holding T.
template <typename T>
struct VecIO {
  using op_t = opmath_t<T>;
  using Vec = Vectorized<op_t>;
  static constexpr int64_t kSize = Vec::size();

  static inline Vec load(const T* p) {
    if constexpr (std::is_same_v<T, op_t>) {
      return Vec::loadu(p);
    } else {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
  }

  static inline void store(T* p, const Vec& v) {
    if constexpr (std::is_same_v<T, op_t>) {
      v.store(p);
    } else {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
      // Eight values rounded to 16 bits and written with one 16-byte store.
      // (convert_from_float rounds sixteen, and a partial Vectorized store
      // goes through a buffer: together three times the work.)
      const __m256 f = v;
      __m128i h;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        h = round_to_bf16(f);
      } else {
        h = at::vec::cvtfp32_fp16(f);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#else
      at::vec::convert_from_float<T>(v, v).store(p, kSize);
#endif
    }
  }

  // Two vectors to p[0, 2 * kSize). For 16-bit T the sixteen values are
  // rounded and packed together and go out in one 32-byte store: the pack
  // and lane permute of the conversion are shared by both halves.
  static inline void store2(T* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<T, op_t>) {
      a.store(p);
      b.store(p + kSize);
    } else {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
      __m256i h;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        h = round_to_bf16(__m256(a), __m256(b));
      } else {
        h = at::vec::cvtfp32_fp16(__m256(a), __m256(b));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#else
      at::vec::convert_from_float<T>(a, b).store(p);
#endif
    }
  }
};

// Eight floats as two vectors of four doubles (exact).
inline void widen(const fVec& v, dVec& lo, dVec& hi) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  const __m256 f = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
#else
  __at_align__ float f[8];
  __at_align__ double d[8];
  v.store(f);
  for (int i = 0; i < 8; ++i) {
    d[i] = static_cast<double>(f[i]);
  }
  lo = dVec::loadu(d);
  hi = dVec::loadu(d + 4);
#endif
}

// Eight consecutive values of T as two double vectors.
template <typename T>
inline void load8(const T* p, dVec& lo, dVec& hi) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<T, float>) {
    // Two converting loads of four floats: no cross-lane extract.
    lo = _mm256_cvtps_pd(_mm_loadu_ps(p));
    hi = _mm256_cvtps_pd(_mm_loadu_ps(p + 4));
    return;
  }
#endif
  if constexpr (std::is_same_v<T, double>) {
    lo = dVec::loadu(p);
    hi = dVec::loadu(p + 4);
  } else {
    widen(VecIO<T>::load(p), lo, hi);
  }
}

// Sixteen consecutive values of T as four double vectors.
template <typename T>
inline void load16(const T* p, dVec (&d)[4]) {
  if constexpr (std::is_same_v<T, double>) {
    d[0] = dVec::loadu(p);
    d[1] = dVec::loadu(p + 4);
    d[2] = dVec::loadu(p + 8);
    d[3] = dVec::loadu(p + 12);
  } else {
    load8(p, d[0], d[1]);
    load8(p + 8, d[2], d[3]);
  }
}

// acc[0..lanes) += v, in double (v holds 8 floats or 4 doubles).
template <typename op_t>
inline void add_to_double(double* acc, const Vectorized<op_t>& v) {
  if constexpr (std::is_same_v<op_t, double>) {
    (dVec::loadu(acc) + v).store(acc);
  } else {
    dVec lo, hi;
    widen(v, lo, hi);
    (dVec::loadu(acc) + lo).store(acc);
    (dVec::loadu(acc + 4) + hi).store(acc + 4);
  }
}

// A sum kept as four vector partial sums plus a scalar tail, folded in a
// fixed order: the result depends only on the sequence of values added.
struct Sum4 {
  dVec v[4] = {dVec(0.0), dVec(0.0), dVec(0.0), dVec(0.0)};
  double tail = 0.0;

  // Adds two opmath_t vectors (16 floats or 8 doubles) in double.
  template <typename op_t>
  void add(const Vectorized<op_t>& a, const Vectorized<op_t>& b) {
    if constexpr (std::is_same_v<op_t, double>) {
      v[0] += a;
      v[1] += b;
    } else {
      dVec lo, hi;
      widen(a, lo, hi);
      v[0] += lo;
      v[1] += hi;
      widen(b, lo, hi);
      v[2] += lo;
      v[3] += hi;
    }
  }

  double total() const {
    __at_align__ double lanes[4];
    ((v[0] + v[1]) + (v[2] + v[3])).store(lanes);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + tail;
  }
};

}  // namespace cpu
}  // namespace torch_bn_manual
