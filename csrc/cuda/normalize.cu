// Forward elementwise pass: y = (x - m) * scale + shift with per-channel
// coefficients from channel_params.cuh (computed by the statistics finalize,
// or by forward_params_kernel from given statistics).
//
// Contiguous (N, C, L): the tensor is one flat array of vectors; a grid-stride
// loop hands thread t of a block the vectors base + t + u * 256 (u < 4), and
// the channel of a vector is (i / Lv) % C (ncl_index.cuh).
// Channels-last (M, C): thread (tx, ty) owns VEC adjacent channels, keeps
// their coefficients in registers and walks down the rows.
//
// The fused layers' epilogue (activation.cuh: + residual, then the
// activation) is applied to each value before it is stored; the residual is
// loaded at the output's offsets beside x.  Plain batch norm: NoHook.
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

// from_var (eval): the running statistics are first rounded to the statistics
// dtype, and so is the invstd computed from them (float_stats), as if they
// had been stored there; given mean/invstd (elementwise) are used as they are.
template <typename ct>
__global__ void forward_params_kernel(int64_t C, ChannelArg mean, ChannelArg second, bool from_var, bool float_stats,
                                      double eps, ChannelArg weight, ChannelArg bias,
                                      ChannelParams<ct>* __restrict__ params) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  auto stored = [float_stats](double v) { return float_stats ? static_cast<double>(static_cast<float>(v)) : v; };
  double m = load_channel(mean, c, 0.0);
  double invstd = load_channel(second, c, 0.0);
  if (from_var) {
    m = stored(m);
    invstd = stored(inverse_std(stored(invstd), eps));
  }
  params[c] = forward_params<ct>(m, invstd, load_channel(weight, c, 1.0), load_channel(bias, c, 0.0));
}

template <typename scalar_t, int VEC, typename E>
__global__ void __launch_bounds__(kThreads)
    normalize_ncl_kernel(const scalar_t* __restrict__ x, const ChannelParams<compute_t<scalar_t>>* __restrict__ params,
                         scalar_t* __restrict__ y, NclIndex index, int64_t total, E epilogue) {
  using ct = compute_t<scalar_t>;
  constexpr int U = kUnrollElementwise;
  const int64_t step = int64_t(gridDim.x) * kThreads * U;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * U + threadIdx.x; base < total; base += step) {
    Pack<scalar_t, VEC> in[U];
    HookRegs<E, VEC> extra[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + int64_t(u) * kThreads;
      if (i < total) {
        in[u] = load_pack<scalar_t, VEC>(x + i * VEC);
        extra[u] = epilogue.template load<VEC>(i * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + int64_t(u) * kThreads;
      if (i < total) {
        const ChannelParams<ct> p = params[index.channel_of(i)];
        Pack<scalar_t, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.v[k] = from_compute<scalar_t>(epilogue.apply(apply_forward(p, to_compute(in[u].v[k])), extra[u], k));
        }
        store_pack(y + i * VEC, out);
      }
    }
  }
}

template <typename scalar_t, int VEC, typename E>
__global__ void __launch_bounds__(kThreads)
    normalize_nlc_kernel(const scalar_t* __restrict__ x, const ChannelParams<compute_t<scalar_t>>* __restrict__ params,
                         scalar_t* __restrict__ y, int64_t rows, int64_t Cv, E epilogue) {
  using ct = compute_t<scalar_t>;
  constexpr int U = kUnrollElementwise;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= Cv) return;
  ChannelParams<ct> p[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) p[k] = params[cv * VEC + k];
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += stride * U) {
    Pack<scalar_t, VEC> in[U];
    HookRegs<E, VEC> extra[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * stride;
      if (rr < rows) {
        in[u] = load_pack<scalar_t, VEC>(x + (rr * Cv + cv) * VEC);
        extra[u] = epilogue.template load<VEC>((rr * Cv + cv) * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * stride;
      if (rr < rows) {
        Pack<scalar_t, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.v[k] = from_compute<scalar_t>(epilogue.apply(apply_forward(p[k], to_compute(in[u].v[k])), extra[u], k));
        }
        store_pack(y + (rr * Cv + cv) * VEC, out);
      }
    }
  }
}

}  // namespace

void launch_forward_params(int64_t C, DType dtype, ChannelArg mean, ChannelArg invstd_or_var, bool from_var,
                           double eps, ChannelArg weight, ChannelArg bias, void* params, cudaStream_t stream) {
  dispatch_type(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    using ct = compute_t<scalar_t>;
    constexpr bool kFloatStats = sizeof(stat_t<scalar_t>) == sizeof(float);
    const unsigned blocks = static_cast<unsigned>(ceil_div(C, kThreads));
    forward_params_kernel<ct><<<blocks, kThreads, 0, stream>>>(C, mean, invstd_or_var, from_var, kFloatStats, eps,
                                                               weight, bias, static_cast<ChannelParams<ct>*>(params));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_normalize(const Geometry& g, DType dtype, const void* x, const void* params, void* y,
                      cudaStream_t stream, const AddActArgs& act) {
  dispatch_bulk(dtype, g.vec, [&](auto type, auto vec) {
    using scalar_t = typename decltype(type)::type;
    using ct = compute_t<scalar_t>;
    constexpr int VEC = decltype(vec)::value;
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* pp = static_cast<const ChannelParams<ct>*>(params);
    auto* yp = static_cast<scalar_t*>(y);
    with_epilogue<scalar_t>(act, [&](auto epilogue) {
      using E = decltype(epilogue);
      if (!g.channels_last) {
        const int64_t total = g.numel() / VEC;
        const unsigned blocks = flat_grid<normalize_ncl_kernel<scalar_t, VEC, E>>(total, g.device);
        normalize_ncl_kernel<scalar_t, VEC, E><<<blocks, kThreads, 0, stream>>>(
            xp, pp, yp, NclIndex(g.N, g.C, g.L / VEC), total, epilogue);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const RowsConfig cfg = rows_config<normalize_nlc_kernel<scalar_t, VEC, E>>(g.rows(), g.C / VEC, g.device);
        normalize_nlc_kernel<scalar_t, VEC, E><<<cfg.grid, cfg.block, 0, stream>>>(xp, pp, yp, g.rows(), g.C / VEC,
                                                                                    epilogue);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace cuda
}  // namespace torch_bn_manual
