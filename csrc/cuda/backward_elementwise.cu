// Backward elementwise pass: dx = a * dy - k * (x - m) - c per channel
// (training), dx = a * dy (eval, x not read); coefficients from
// channel_params.cuh, computed by the backward finalize or by
// backward_params_kernel from given sums.
//
// Same mappings as the forward elementwise pass (normalize.cu): a flat
// grid-stride loop over vectors for the contiguous layout, threads over
// channel vectors and a loop over rows for channels-last.
//
// The fused layers' prologue (activation.cuh) turns each dy into
// dt = dy * act'(o) as it is loaded (o loaded beside dy), dx is computed from
// dt, and dt is stored as the residual's gradient where asked.  Plain batch
// norm: NoHook.
#include <c10/cuda/CUDAException.h>

#include "activation.cuh"
#include "channel_params.cuh"
#include "elementwise_config.cuh"
#include "launch_config.cuh"
#include "launchers.h"
#include "ncl_index.cuh"

namespace torch_bn_manual {
namespace cuda {
namespace {

template <typename ct>
__global__ void backward_params_kernel(int64_t C, ChannelArg mean, ChannelArg invstd, ChannelArg weight,
                                       ChannelArg sum_dy, ChannelArg sum_dy_xmu, ChannelArg count, bool train,
                                       ChannelParams<ct>* __restrict__ params) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  params[c] = backward_params<ct>(load_channel(mean, c, 0.0), load_channel(invstd, c, 0.0),
                                  load_channel(weight, c, 1.0), load_channel(sum_dy, c, 0.0),
                                  load_channel(sum_dy_xmu, c, 0.0), load_channel(count, c, 0.0), train);
}

template <bool kTrain, typename ct>
__device__ __forceinline__ ct grad_value(const ChannelParams<ct>& p, ct g, ct v) {
  return kTrain ? apply_backward(p, g, v) : apply_backward_eval(p, g);
}

template <typename scalar_t, int VEC, bool kTrain, typename P>
__global__ void __launch_bounds__(kThreads)
    backward_elementwise_ncl_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                    const ChannelParams<compute_t<scalar_t>>* __restrict__ params,
                                    scalar_t* __restrict__ dx, NclIndex index, int64_t total, P prologue) {
  using ct = compute_t<scalar_t>;
  constexpr int U = kUnrollElementwise;
  const int64_t step = int64_t(gridDim.x) * kThreads * U;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * U + threadIdx.x; base < total; base += step) {
    Pack<scalar_t, VEC> g[U], v[U];
    HookRegs<P, VEC> h[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + int64_t(u) * kThreads;
      if (i < total) {
        g[u] = load_pack<scalar_t, VEC>(dy + i * VEC);
        v[u] = kTrain ? load_pack<scalar_t, VEC>(x + i * VEC) : g[u];  // eval: x unused
        h[u] = prologue.template load<VEC>(i * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + int64_t(u) * kThreads;
      if (i < total) {
        const ChannelParams<ct> p = params[index.channel_of(i)];
        Pack<scalar_t, VEC> out;
        ct dt[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dt[k] = prologue.apply(to_compute(g[u].v[k]), h[u], k);
          out.v[k] = from_compute<scalar_t>(grad_value<kTrain>(p, dt[k], to_compute(v[u].v[k])));
        }
        store_pack(dx + i * VEC, out);
        prologue.store(i * VEC, dt);
      }
    }
  }
}

template <typename scalar_t, int VEC, bool kTrain, typename P>
__global__ void __launch_bounds__(kThreads)
    backward_elementwise_nlc_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                    const ChannelParams<compute_t<scalar_t>>* __restrict__ params,
                                    scalar_t* __restrict__ dx, int64_t rows, int64_t Cv, P prologue) {
  using ct = compute_t<scalar_t>;
  constexpr int U = kUnrollElementwise;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= Cv) return;
  ChannelParams<ct> p[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) p[k] = params[cv * VEC + k];
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += stride * U) {
    Pack<scalar_t, VEC> g[U], v[U];
    HookRegs<P, VEC> h[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * stride;
      if (rr < rows) {
        const int64_t offset = (rr * Cv + cv) * VEC;
        g[u] = load_pack<scalar_t, VEC>(dy + offset);
        v[u] = kTrain ? load_pack<scalar_t, VEC>(x + offset) : g[u];  // eval: x unused
        h[u] = prologue.template load<VEC>(offset);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * stride;
      if (rr < rows) {
        const int64_t offset = (rr * Cv + cv) * VEC;
        Pack<scalar_t, VEC> out;
        ct dt[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dt[k] = prologue.apply(to_compute(g[u].v[k]), h[u], k);
          out.v[k] = from_compute<scalar_t>(grad_value<kTrain>(p[k], dt[k], to_compute(v[u].v[k])));
        }
        store_pack(dx + offset, out);
        prologue.store(offset, dt);
      }
    }
  }
}

template <typename scalar_t, int VEC, bool kTrain, typename P>
void launch_bulk(const Geometry& g, const void* dy, const void* x, const void* params, void* dx, P prologue,
                 cudaStream_t stream) {
  using ct = compute_t<scalar_t>;
  const auto* gp = static_cast<const scalar_t*>(dy);
  const auto* xp = static_cast<const scalar_t*>(x);
  const auto* pp = static_cast<const ChannelParams<ct>*>(params);
  auto* out = static_cast<scalar_t*>(dx);
  if (!g.channels_last) {
    const int64_t total = g.numel() / VEC;
    const unsigned blocks = flat_grid<backward_elementwise_ncl_kernel<scalar_t, VEC, kTrain, P>>(total, g.device);
    backward_elementwise_ncl_kernel<scalar_t, VEC, kTrain, P><<<blocks, kThreads, 0, stream>>>(
        gp, xp, pp, out, NclIndex(g.N, g.C, g.L / VEC), total, prologue);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const RowsConfig cfg =
        rows_config<backward_elementwise_nlc_kernel<scalar_t, VEC, kTrain, P>>(g.rows(), g.C / VEC, g.device);
    backward_elementwise_nlc_kernel<scalar_t, VEC, kTrain, P><<<cfg.grid, cfg.block, 0, stream>>>(
        gp, xp, pp, out, g.rows(), g.C / VEC, prologue);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_backward_params(int64_t C, DType dtype, ChannelArg mean, ChannelArg invstd, ChannelArg weight,
                            ChannelArg sum_dy, ChannelArg sum_dy_xmu, ChannelArg count, bool train, void* params,
                            cudaStream_t stream) {
  dispatch_type(dtype, [&](auto type) {
    using ct = compute_t<typename decltype(type)::type>;
    const unsigned blocks = static_cast<unsigned>(ceil_div(C, kThreads));
    backward_params_kernel<ct><<<blocks, kThreads, 0, stream>>>(C, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                                                                train, static_cast<ChannelParams<ct>*>(params));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_backward_elementwise(const Geometry& g, DType dtype, const void* dy, const void* x, const void* params,
                                 bool train, void* dx, cudaStream_t stream, const ActGradArgs& act) {
  dispatch_bulk(dtype, g.vec, [&](auto type, auto vec) {
    using scalar_t = typename decltype(type)::type;
    constexpr int VEC = decltype(vec)::value;
    with_prologue<scalar_t>(act, [&](auto prologue) {
      using P = decltype(prologue);
      if (train) {
        launch_bulk<scalar_t, VEC, true, P>(g, dy, x, params, dx, prologue, stream);
      } else {
        launch_bulk<scalar_t, VEC, false, P>(g, dy, x, params, dx, prologue, stream);
      }
    });
  });
}

}  // namespace cuda
}  // namespace torch_bn_manual
