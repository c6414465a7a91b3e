// Host helpers that size grids: multiprocessor count, occupancy, rounding.
//
// Grid sizes depend only on the shapes and on the device (its multiprocessor
// count and the kernel's occupancy there), so a given input on a given GPU is
// always reduced by the same tree.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "scalar_types.cuh"

namespace torch_bn_manual {
namespace cuda {

constexpr int kThreads = 256;     // threads per block of every bulk kernel
constexpr int kMaxDevices = 64;
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline int multiprocessor_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    n = std::max(n, 1);
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Resident blocks per multiprocessor of kKernel, cached per device (each
// kernel is its own template instantiation, so its own cache).
template <auto kKernel>
int blocks_per_multiprocessor(int threads, int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, threads, 0));
    n = std::max(n, 1);
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks that fill the device once: every block of a grid-stride kernel then
// gets the same share of the work.
template <auto kKernel>
int64_t full_wave_blocks(int threads, int device) {
  return int64_t(multiprocessor_count(device)) * blocks_per_multiprocessor<kKernel>(threads, device);
}

template <typename T>
struct TypeTag {
  using type = T;
};
template <int V>
struct VecTag {
  static constexpr int value = V;
};

// Calls f(TypeTag<scalar_t>{}, VecTag<VEC>{}) for the element type `dtype`
// and the vector width `vec` (1 or kVec<scalar_t>): the instantiations every
// bulk kernel is compiled for.
template <typename F>
void dispatch_bulk(DType dtype, int vec, F&& f) {
  auto with_vec = [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if (vec == 1) {
      f(tag, VecTag<1>{});
    } else {
      TORCH_CHECK(vec == kVec<scalar_t>, "torch_bn_manual: bad vector width ", vec);
      f(tag, VecTag<kVec<scalar_t>>{});
    }
  };
  switch (dtype) {
    case DType::Float64: with_vec(TypeTag<double>{}); return;
    case DType::Float32: with_vec(TypeTag<float>{}); return;
    case DType::Float16: with_vec(TypeTag<__half>{}); return;
    case DType::BFloat16: with_vec(TypeTag<__nv_bfloat16>{}); return;
    default: TORCH_CHECK(false, "torch_bn_manual: unsupported input dtype");
  }
}

// Calls f(TypeTag<scalar_t>{}) for the element type `dtype`.
template <typename F>
void dispatch_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float64: f(TypeTag<double>{}); return;
    case DType::Float32: f(TypeTag<float>{}); return;
    case DType::Float16: f(TypeTag<__half>{}); return;
    case DType::BFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    default: TORCH_CHECK(false, "torch_bn_manual: unsupported input dtype");
  }
}

}  // namespace cuda
}  // namespace torch_bn_manual
