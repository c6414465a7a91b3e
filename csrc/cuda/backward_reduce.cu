// Backward reduction: per channel sum_dy = sum(dy) and
// sum_dy_xmu = sum(dy * (x - mean)), in one pass over dy and x.
//
// Same grid mapping and reduction tree as the statistics pass (stats.cu), with
// a SumPair instead of a WelfordState, accumulated in the statistics dtype
// from the first product on (double for float32 input).  The products use
// x - m, m the mean rounded to the statistics dtype; the finalize kernel
// corrects by (mean - m) * sum_dy in double (zero unless a double mean comes
// with half-type input).
//
// The fused layers' prologue (activation.cuh) turns each dy into
// dt = dy * act'(o) as it is loaded, o loaded beside dy and x; the sums are
// then those of dt.  Plain batch norm: NoHook.
#include <c10/cuda/CUDAException.h>

#include "activation.cuh"
#include "block_reduce.cuh"
#include "channel_params.cuh"
#include "launch_config.cuh"
#include "launchers.h"
#include "ncl_index.cuh"
#include "reduce_plan.cuh"

namespace torch_bn_manual {
namespace cuda {
namespace {

template <typename scalar_t, int VEC, typename P>
__global__ void __launch_bounds__(kThreads)
    backward_reduce_ncl_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, NclIndex index,
                               int64_t per_channel, int64_t per_split, ChannelArg mean,
                               SumPair<stat_t<scalar_t>>* __restrict__ partials, P prologue) {
  using st = stat_t<scalar_t>;
  constexpr int U = kChunkVectors<VEC>;
  __shared__ SumPair<st> smem[kThreads / kWarpSize];

  const int64_t c = blockIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * per_split;
  const int64_t end = begin + per_split < per_channel ? begin + per_split : per_channel;
  const st m = static_cast<st>(load_channel(mean, c, 0.0));

  SumPair<st> acc{st(0), st(0)};
  for (int64_t j = begin + threadIdx.x; j < end; j += U * kThreads) {
    Pack<scalar_t, VEC> g[U], v[U];
    HookRegs<P, VEC> h[U];
    int loaded = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t jj = j + int64_t(u) * kThreads;
      if (jj < end) {
        const int64_t offset = index.channel_vector(jj, c) * VEC;
        g[u] = load_pack<scalar_t, VEC>(dy + offset);
        v[u] = load_pack<scalar_t, VEC>(x + offset);
        h[u] = prologue.template load<VEC>(offset);
        ++loaded;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < loaded) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const st gk = static_cast<st>(prologue.apply(to_compute(g[u].v[k]), h[u], k));
          acc.dy += gk;
          acc.dy_xm += gk * (static_cast<st>(to_compute(v[u].v[k])) - m);
        }
      }
    }
  }

  const SumPair<st> total = block_reduce(acc, smem, SumPair<st>{st(0), st(0)});
  if (threadIdx.x == 0) partials[c * gridDim.y + blockIdx.y] = total;
}

template <typename scalar_t, int VEC, typename P>
__global__ void __launch_bounds__(kThreads)
    backward_reduce_nlc_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t rows,
                               int64_t Cv, int64_t per_split, ChannelArg mean,
                               SumPair<stat_t<scalar_t>>* __restrict__ partials, P prologue) {
  using st = stat_t<scalar_t>;
  constexpr int R = kChunkRows<VEC>;
  __shared__ SumPair<st> smem[(kThreads / kWarpSize) * kWarpSize * VEC];

  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * per_split;
  const int64_t end = begin + per_split < rows ? begin + per_split : rows;

  SumPair<st> acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = SumPair<st>{st(0), st(0)};

  if (cv < Cv) {
    st m[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) m[k] = static_cast<st>(load_channel(mean, cv * VEC + k, 0.0));

    for (int64_t r = begin + threadIdx.y; r < end; r += R * blockDim.y) {
      Pack<scalar_t, VEC> g[R], v[R];
      HookRegs<P, VEC> h[R];
      int loaded = 0;
#pragma unroll
      for (int u = 0; u < R; ++u) {
        const int64_t rr = r + int64_t(u) * blockDim.y;
        if (rr < end) {
          const int64_t offset = (rr * Cv + cv) * VEC;
          g[u] = load_pack<scalar_t, VEC>(dy + offset);
          v[u] = load_pack<scalar_t, VEC>(x + offset);
          h[u] = prologue.template load<VEC>(offset);
          ++loaded;
        }
      }
#pragma unroll
      for (int u = 0; u < R; ++u) {
        if (u < loaded) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const st gk = static_cast<st>(prologue.apply(to_compute(g[u].v[k]), h[u], k));
            acc[k].dy += gk;
            acc[k].dy_xm += gk * (static_cast<st>(to_compute(v[u].v[k])) - m[k]);
          }
        }
      }
    }
  }

  SumPair<st> total;
  if (block_reduce_columns<SumPair<st>, VEC>(acc, smem, total)) {
    const int t = threadIdx.x + threadIdx.y * blockDim.x;
    const int64_t column = int64_t(blockIdx.x) * blockDim.x + t / VEC;
    if (column < Cv) partials[(column * VEC + t % VEC) * gridDim.y + blockIdx.y] = total;
  }
}

// One warp per channel: add the channel's partial sums in a fixed order, undo
// the rounding of the mean, write what is asked for.
template <typename scalar_t>
__global__ void backward_finalize_kernel(const SumPair<stat_t<scalar_t>>* __restrict__ partials, int64_t splits,
                                         int64_t C, BackwardOutputs out) {
  using ct = compute_t<scalar_t>;
  using st = stat_t<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // whole warps leave together
  SumPair<st> s{st(0), st(0)};
  for (int64_t i = threadIdx.x; i < splits; i += kWarpSize) s = combine(s, partials[c * splits + i]);
  s = warp_reduce(s, 1);
  if (threadIdx.x != 0) return;

  const double mean = load_channel(out.mean, c, 0.0);
  const double m = static_cast<double>(static_cast<st>(mean));  // what the reduce kernel subtracted
  const st sum_dy = s.dy;
  const st sum_dy_xmu = static_cast<st>(static_cast<double>(s.dy_xm) - (mean - m) * static_cast<double>(s.dy));
  const double invstd = load_channel(out.invstd, c, 0.0);
  if (out.sum_dy) static_cast<st*>(out.sum_dy)[c] = sum_dy;
  if (out.sum_dy_xmu) static_cast<st*>(out.sum_dy_xmu)[c] = sum_dy_xmu;
  store_channel(out.grad_weight, c, static_cast<double>(sum_dy_xmu) * invstd);
  store_channel(out.grad_bias, c, static_cast<double>(sum_dy));
  if (out.params) {
    static_cast<ChannelParams<ct>*>(out.params)[c] = backward_params<ct>(
        mean, invstd, load_channel(out.weight, c, 1.0), sum_dy, sum_dy_xmu, out.count, out.train);
  }
}

}  // namespace

ReducePlan plan_backward_reduce(const Geometry& g, DType dtype) {
  ReducePlan plan;
  dispatch_bulk(dtype, g.vec, [&](auto type, auto vec) {
    using scalar_t = typename decltype(type)::type;
    constexpr int VEC = decltype(vec)::value;
    // The plain kernels' occupancy sizes the grid of the fused ones too: one
    // grid, one reduction tree per shape, with or without an activation.
    plan = reduce_plan<backward_reduce_ncl_kernel<scalar_t, VEC, NoHook>,
                       backward_reduce_nlc_kernel<scalar_t, VEC, NoHook>, VEC>(g);
  });
  return plan;
}

int64_t backward_workspace_bytes(const ReducePlan& plan, const Geometry& g, DType dtype) {
  int64_t bytes = 0;
  dispatch_type(dtype, [&](auto type) {
    bytes = g.C * plan.splits * int64_t(sizeof(SumPair<stat_t<typename decltype(type)::type>>));
  });
  return bytes;
}

void launch_backward_reduce(const ReducePlan& plan, const Geometry& g, DType dtype, const void* dy, const void* x,
                            ChannelArg mean, void* workspace, cudaStream_t stream, const ActGradArgs& act) {
  dispatch_bulk(dtype, g.vec, [&](auto type, auto vec) {
    using scalar_t = typename decltype(type)::type;
    constexpr int VEC = decltype(vec)::value;
    auto* partials = static_cast<SumPair<stat_t<scalar_t>>*>(workspace);
    const auto* dyp = static_cast<const scalar_t*>(dy);
    const auto* xp = static_cast<const scalar_t*>(x);
    const dim3 grid(plan.grid_x, plan.grid_y), block(plan.block_x, plan.block_y);
    with_prologue<scalar_t>(act.reading_only(), [&](auto prologue) {
      using P = decltype(prologue);
      if (!g.channels_last) {
        const NclIndex index(g.N, g.C, g.L / VEC);
        backward_reduce_ncl_kernel<scalar_t, VEC, P><<<grid, block, 0, stream>>>(
            dyp, xp, index, g.N * (g.L / VEC), plan.per_split, mean, partials, prologue);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        backward_reduce_nlc_kernel<scalar_t, VEC, P><<<grid, block, 0, stream>>>(
            dyp, xp, g.rows(), g.C / VEC, plan.per_split, mean, partials, prologue);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

void launch_backward_finalize(const ReducePlan& plan, const Geometry& g, DType dtype, const void* workspace,
                              const BackwardOutputs& out, cudaStream_t stream) {
  dispatch_type(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    constexpr int kChannelsPerBlock = 8;
    const dim3 block(kWarpSize, kChannelsPerBlock);
    const dim3 grid(static_cast<unsigned>(ceil_div(g.C, kChannelsPerBlock)));
    backward_finalize_kernel<scalar_t><<<grid, block, 0, stream>>>(
        static_cast<const SumPair<stat_t<scalar_t>>*>(workspace), plan.splits, g.C, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace torch_bn_manual
