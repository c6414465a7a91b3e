// Element types of the CUDA kernels and the arithmetic types they use.
//
// The kernels see raw device pointers of the CUDA native types (double,
// float, __half, __nv_bfloat16); the host code maps at::ScalarType onto the
// DType enum below.  For every input type there are two arithmetic types:
//
//   compute_t  the elementwise passes (double for float64, float otherwise);
//   stat_t     the reductions, from the first value a thread reads to the
//              merge of the grid's partial results, and every per-channel
//              result: the statistics dtype of docs/architecture.md (double
//              for float64 and float32 input, float for the half types).
//
// float32 input is normalized in float and still accurate at large offsets:
// the elementwise passes subtract the float rounding of the double mean, whose
// remainder enters the per-channel coefficients in double (channel_params.cuh).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace torch_bn_manual {
namespace cuda {

// Element types the kernels are instantiated for, plus the integer types a
// per-channel tensor (the `count` argument) may have.
enum class DType : int { Float64 = 0, Float32 = 1, Float16 = 2, BFloat16 = 3, Int64 = 4, Int32 = 5 };

template <typename scalar_t>
struct TypeInfo;

template <>
struct TypeInfo<double> {
  using compute_t = double;
  using stat_t = double;
};
template <>
struct TypeInfo<float> {
  using compute_t = float;
  using stat_t = double;
};
template <>
struct TypeInfo<__half> {
  using compute_t = float;
  using stat_t = float;
};
template <>
struct TypeInfo<__nv_bfloat16> {
  using compute_t = float;
  using stat_t = float;
};

template <typename scalar_t>
using compute_t = typename TypeInfo<scalar_t>::compute_t;
template <typename scalar_t>
using stat_t = typename TypeInfo<scalar_t>::stat_t;

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

// Element -> compute type, and back with round-to-nearest-even.
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_compute(compute_t<scalar_t> v);
template <>
__device__ __forceinline__ double from_compute<double>(double v) { return v; }
template <>
__device__ __forceinline__ float from_compute<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A run of N elements loaded or stored as one access of N * sizeof(T) bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// A (C,)-shaped tensor of any supported dtype, read or written one channel
// at a time.  Only the per-channel kernels use it (weights, running stats,
// counts, results), so the runtime switch costs nothing that matters; the
// stride may be 0 to broadcast one value to every channel.
struct ChannelArg {
  const void* ptr;  // nullptr: absent (weight 1, bias 0)
  DType dtype;
  int64_t stride;
};

struct ChannelOut {
  void* ptr;  // nullptr: not wanted
  DType dtype;
};

__device__ __forceinline__ double load_channel(const ChannelArg& t, int64_t c, double if_absent) {
  if (t.ptr == nullptr) return if_absent;
  const int64_t i = c * t.stride;
  switch (t.dtype) {
    case DType::Float64: return static_cast<const double*>(t.ptr)[i];
    case DType::Float32: return static_cast<const float*>(t.ptr)[i];
    case DType::Float16: return __half2float(static_cast<const __half*>(t.ptr)[i]);
    case DType::BFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(t.ptr)[i]);
    case DType::Int64: return static_cast<double>(static_cast<const int64_t*>(t.ptr)[i]);
    case DType::Int32: return static_cast<double>(static_cast<const int32_t*>(t.ptr)[i]);
  }
  return if_absent;
}

__device__ __forceinline__ void store_channel(const ChannelOut& t, int64_t c, double v) {
  if (t.ptr == nullptr) return;
  switch (t.dtype) {
    case DType::Float64: static_cast<double*>(t.ptr)[c] = v; break;
    case DType::Float32: static_cast<float*>(t.ptr)[c] = static_cast<float>(v); break;
    case DType::Float16: static_cast<__half*>(t.ptr)[c] = __double2half(v); break;
    case DType::BFloat16: static_cast<__nv_bfloat16*>(t.ptr)[c] = __double2bfloat16(v); break;
    case DType::Int64: static_cast<int64_t*>(t.ptr)[c] = static_cast<int64_t>(v); break;
    case DType::Int32: static_cast<int32_t*>(t.ptr)[c] = static_cast<int32_t>(v); break;
  }
}

}  // namespace cuda
}  // namespace torch_bn_manual
