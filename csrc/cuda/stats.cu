// Statistics pass: per-channel mean and M2 of the input.
//
//   thread  chunks of a few values held in registers (thread_welford.cuh),
//           welford_merge
//   warp    butterfly of shuffles, welford_merge
//   block   one state per warp in shared memory, welford_merge
//   grid    `splits` partial states per channel in global memory, merged in
//           a second kernel by one warp per channel, welford_merge
//
// Values are shifted by the first element of their channel before any of it
// (see channel_params.cuh); the finalize kernel adds the shift back in double.
//
// Contiguous (N, C, L): grid (C, splits); a block reads a range of the
// N * L / VEC vectors of one channel, thread t taking vectors t, t + 256, ...
// so that every load instruction of a warp is contiguous.
// Channels-last (M, C): grid (ceil(C / VEC / bx), splits); thread (tx, ty)
// owns VEC adjacent channels and reads them from rows ty, ty + by, ... of the
// block's row range; the block then reduces its columns.
#include <c10/cuda/CUDAException.h>

#include "block_reduce.cuh"
#include "channel_params.cuh"
#include "launch_config.cuh"
#include "launchers.h"
#include "ncl_index.cuh"
#include "reduce_plan.cuh"
#include "thread_welford.cuh"

namespace torch_bn_manual {
namespace cuda {
namespace {

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    stats_ncl_kernel(const scalar_t* __restrict__ x, NclIndex index, int64_t per_channel, int64_t per_split,
                     WelfordState<stat_t<scalar_t>>* __restrict__ partials) {
  using st = stat_t<scalar_t>;
  constexpr int U = kChunkVectors<VEC>;
  __shared__ WelfordState<st> smem[kThreads / kWarpSize];

  const int64_t c = blockIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * per_split;
  const int64_t end = begin + per_split < per_channel ? begin + per_split : per_channel;
  const st shift = channel_shift(static_cast<st>(to_compute(x[c * index.Lv * VEC])));

  WelfordState<st> state{st(0), st(0), st(0)};
  for (int64_t j = begin + threadIdx.x; j < end; j += U * kThreads) {
    Pack<scalar_t, VEC> pack[U];
    int loaded = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t jj = j + int64_t(u) * kThreads;
      if (jj < end) {
        pack[u] = load_pack<scalar_t, VEC>(x + index.channel_vector(jj, c) * VEC);
        ++loaded;
      }
    }
    st d[U * VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        d[u * VEC + k] = u < loaded ? static_cast<st>(to_compute(pack[u].v[k])) - shift : st(0);
      }
    }
    state = welford_merge(state, chunk_state<st, U * VEC>(d, loaded * VEC));
  }

  const WelfordState<st> total = block_reduce(state, smem, WelfordState<st>{st(0), st(0), st(0)});
  if (threadIdx.x == 0) partials[c * gridDim.y + blockIdx.y] = total;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    stats_nlc_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t Cv, int64_t per_split,
                     WelfordState<stat_t<scalar_t>>* __restrict__ partials) {
  using st = stat_t<scalar_t>;
  constexpr int R = kChunkRows<VEC>;
  __shared__ WelfordState<st> smem[(kThreads / kWarpSize) * kWarpSize * VEC];

  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * per_split;
  const int64_t end = begin + per_split < rows ? begin + per_split : rows;

  WelfordState<st> state[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) state[k] = WelfordState<st>{st(0), st(0), st(0)};

  if (cv < Cv) {
    st shift[VEC];
    const auto first = load_pack<scalar_t, VEC>(x + cv * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) shift[k] = channel_shift(static_cast<st>(to_compute(first.v[k])));

    for (int64_t r = begin + threadIdx.y; r < end; r += R * blockDim.y) {
      Pack<scalar_t, VEC> pack[R];
      int loaded = 0;
#pragma unroll
      for (int u = 0; u < R; ++u) {
        const int64_t rr = r + int64_t(u) * blockDim.y;
        if (rr < end) {
          pack[u] = load_pack<scalar_t, VEC>(x + (rr * Cv + cv) * VEC);
          ++loaded;
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        st d[R];
#pragma unroll
        for (int u = 0; u < R; ++u) d[u] = u < loaded ? static_cast<st>(to_compute(pack[u].v[k])) - shift[k] : st(0);
        state[k] = welford_merge(state[k], chunk_state<st, R>(d, loaded));
      }
    }
  }

  WelfordState<st> total;
  if (block_reduce_columns<WelfordState<st>, VEC>(state, smem, total)) {
    const int t = threadIdx.x + threadIdx.y * blockDim.x;
    const int64_t column = int64_t(blockIdx.x) * blockDim.x + t / VEC;
    if (column < Cv) partials[(column * VEC + t % VEC) * gridDim.y + blockIdx.y] = total;
  }
}

// One warp per channel: merge the channel's partial states in a fixed order,
// add the shift back, write what is asked for.
template <typename scalar_t>
__global__ void stats_finalize_kernel(const WelfordState<stat_t<scalar_t>>* __restrict__ partials, int64_t splits,
                                      int64_t C, const scalar_t* __restrict__ x, int64_t shift_stride, double count,
                                      StatsOutputs out) {
  using ct = compute_t<scalar_t>;
  using st = stat_t<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // whole warps leave together
  WelfordState<st> s{st(0), st(0), st(0)};
  for (int64_t i = threadIdx.x; i < splits; i += kWarpSize) s = welford_merge(s, partials[c * splits + i]);
  s = warp_reduce(s, 1);
  if (threadIdx.x != 0) return;

  const double shift = static_cast<double>(channel_shift(static_cast<st>(to_compute(x[c * shift_stride]))));
  const st mean = static_cast<st>(shift + static_cast<double>(s.mean));
  const st m2 = s.m2;
  const st invstd = static_cast<st>(inverse_std(count > 0 ? static_cast<double>(m2) / count : 0.0, out.eps));
  if (out.mean) static_cast<st*>(out.mean)[c] = mean;
  if (out.m2) static_cast<st*>(out.m2)[c] = m2;
  if (out.count) static_cast<double*>(out.count)[c] = count;  // float64: exact
  if (out.invstd) static_cast<st*>(out.invstd)[c] = invstd;
  if (out.params) {
    static_cast<ChannelParams<ct>*>(out.params)[c] =
        forward_params<ct>(mean, invstd, load_channel(out.weight, c, 1.0), load_channel(out.bias, c, 0.0));
  }
}

}  // namespace

ReducePlan plan_stats(const Geometry& g, DType dtype) {
  ReducePlan plan;
  dispatch_bulk(dtype, g.vec, [&](auto type, auto vec) {
    using scalar_t = typename decltype(type)::type;
    constexpr int VEC = decltype(vec)::value;
    plan = reduce_plan<stats_ncl_kernel<scalar_t, VEC>, stats_nlc_kernel<scalar_t, VEC>, VEC>(g);
  });
  return plan;
}

int64_t stats_workspace_bytes(const ReducePlan& plan, const Geometry& g, DType dtype) {
  int64_t bytes = 0;
  dispatch_type(dtype, [&](auto type) {
    bytes = g.C * plan.splits * int64_t(sizeof(WelfordState<stat_t<typename decltype(type)::type>>));
  });
  return bytes;
}

void launch_stats(const ReducePlan& plan, const Geometry& g, DType dtype, const void* x, void* workspace,
                  cudaStream_t stream) {
  dispatch_bulk(dtype, g.vec, [&](auto type, auto vec) {
    using scalar_t = typename decltype(type)::type;
    constexpr int VEC = decltype(vec)::value;
    auto* partials = static_cast<WelfordState<stat_t<scalar_t>>*>(workspace);
    const dim3 grid(plan.grid_x, plan.grid_y), block(plan.block_x, plan.block_y);
    if (!g.channels_last) {
      const NclIndex index(g.N, g.C, g.L / VEC);
      stats_ncl_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(
          static_cast<const scalar_t*>(x), index, g.N * (g.L / VEC), plan.per_split, partials);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      stats_nlc_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(static_cast<const scalar_t*>(x), g.rows(),
                                                                    g.C / VEC, plan.per_split, partials);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void launch_stats_finalize(const ReducePlan& plan, const Geometry& g, DType dtype, const void* x,
                           const void* workspace, const StatsOutputs& out, cudaStream_t stream) {
  dispatch_type(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    constexpr int kChannelsPerBlock = 8;
    const dim3 block(kWarpSize, kChannelsPerBlock);
    const dim3 grid(static_cast<unsigned>(ceil_div(g.C, kChannelsPerBlock)));
    stats_finalize_kernel<scalar_t><<<grid, block, 0, stream>>>(
        static_cast<const WelfordState<stat_t<scalar_t>>*>(workspace), plan.splits, g.C,
        static_cast<const scalar_t*>(x), g.channels_last ? 1 : g.L, static_cast<double>(g.rows()), out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace torch_bn_manual
