// Host entry points of the CUDA kernels, one group per pass.
//
// The kernel files take raw device pointers and a Geometry, so that they need
// no ATen headers; csrc/cuda/ops_cuda.cu turns tensors into these calls and
// composes the passes into the operators of docs/architecture.md.
//
// Layouts.  The input is viewed as (N, C, L), L = product of the spatial sizes:
//   channels_last = false: memory order (N, C, L), each channel is N runs of L;
//   channels_last = true:  memory order (N, L, C) = (M, C) rows, M = N * L.
// A tensor with L == 1 is treated as channels_last (both orders coincide).
//
// Every reduction runs in two kernels: a bulk kernel in which each block
// reduces a slice of one or more channels to one partial result per channel
// (thread -> warp -> block), and a finalize kernel in which one warp per
// channel combines that channel's partial results in a fixed order (grid).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "scalar_types.cuh"

namespace torch_bn_manual {
namespace cuda {

struct Geometry {
  int64_t N = 0;
  int64_t C = 0;
  int64_t L = 1;
  bool channels_last = false;
  // Elements per vector access of the bulk kernels: kVec<scalar_t> when the
  // innermost extent (L, or C for channels_last) is a multiple of it and all
  // bulk pointers are 16-byte aligned, else 1.
  int vec = 1;
  int device = 0;

  int64_t rows() const { return N * L; }  // M, values per channel
  int64_t numel() const { return N * C * L; }
};

// How a reduction is split: grid (grid_x, grid_y) of blocks (block_x, block_y);
// `splits` partial results per channel, each covering `per_split` vectors of
// one channel (contiguous layout) or rows (channels_last).
struct ReducePlan {
  unsigned grid_x = 1, grid_y = 1;
  unsigned block_x = 1, block_y = 1;
  int64_t per_split = 0;
  int64_t splits = 1;
};

// ---- the fused layers' hooks (activation.cuh) --------------------------------
//
// What act(BN(x) + residual) adds to the elementwise work of the passes below;
// act(t) = t for t > 0, slope * t otherwise.  The defaults add nothing: the
// plain kernels run.  Every pointer is dense in the input's memory order.

// Epilogue of the normalize pass: o = act(y + residual).
struct AddActArgs {
  const void* residual = nullptr;  // nullptr: no residual
  bool act = false;                // false: identity
  double slope = 0.0;
  bool adds_anything() const { return residual != nullptr || act; }
};

// Prologue of the backward passes: dt = dy * act'(o), act' read from the
// output o's sign; the dx pass also stores dt in grad_residual.
struct ActGradArgs {
  const void* output = nullptr;  // o; nullptr: no activation (dt = dy)
  void* grad_residual = nullptr;  // nullptr: dt not wanted
  double slope = 0.0;
  // The reductions read dt and write nothing.
  ActGradArgs reading_only() const { return ActGradArgs{output, nullptr, slope}; }
};

// ---- statistics (stats.cu) -------------------------------------------------

// Bytes of the partial results of a plan, for element type `dtype`.
int64_t stats_workspace_bytes(const ReducePlan& plan, const Geometry& g, DType dtype);
ReducePlan plan_stats(const Geometry& g, DType dtype);
void launch_stats(const ReducePlan& plan, const Geometry& g, DType dtype, const void* x, void* workspace,
                  cudaStream_t stream);

// What the statistics finalize writes; null pointers are skipped.  mean, m2,
// invstd are (C,) arrays of the statistics dtype, count a (C,) float64 array
// (exact: float32 would round counts above 2^24); params is the (C,)
// array of forward ChannelParams in the compute type.
struct StatsOutputs {
  void* mean = nullptr;
  void* m2 = nullptr;
  void* count = nullptr;
  void* invstd = nullptr;
  void* params = nullptr;
  ChannelArg weight{nullptr, DType::Float32, 1};
  ChannelArg bias{nullptr, DType::Float32, 1};
  double eps = 0.0;
};
void launch_stats_finalize(const ReducePlan& plan, const Geometry& g, DType dtype, const void* x,
                           const void* workspace, const StatsOutputs& out, cudaStream_t stream);

// ---- forward elementwise (normalize.cu) -------------------------------------

// params[c] = forward_params(mean[c], invstd[c], weight[c], bias[c]); with
// from_var (eval), the second argument is a variance, invstd = 1/sqrt(var + eps),
// and mean, var and invstd are rounded to the statistics dtype first.
void launch_forward_params(int64_t C, DType dtype, ChannelArg mean, ChannelArg invstd_or_var, bool from_var,
                           double eps, ChannelArg weight, ChannelArg bias, void* params, cudaStream_t stream);
void launch_normalize(const Geometry& g, DType dtype, const void* x, const void* params, void* y,
                      cudaStream_t stream, const AddActArgs& act = {});

// ---- backward reduction (backward_reduce.cu) -------------------------------

int64_t backward_workspace_bytes(const ReducePlan& plan, const Geometry& g, DType dtype);
ReducePlan plan_backward_reduce(const Geometry& g, DType dtype);
// mean: per-channel mean (any dtype); the pass accumulates dy and dy * (x - m),
// m = mean rounded to the compute type (dt for dy with an activation: the
// plan is the plain pass's, so the grid and the reduction tree are too).
void launch_backward_reduce(const ReducePlan& plan, const Geometry& g, DType dtype, const void* dy, const void* x,
                            ChannelArg mean, void* workspace, cudaStream_t stream, const ActGradArgs& act = {});

struct BackwardOutputs {
  ChannelArg mean{nullptr, DType::Float64, 1};
  ChannelArg invstd{nullptr, DType::Float64, 1};
  ChannelArg weight{nullptr, DType::Float32, 1};
  double count = 0.0;   // values per channel (the M of the formula)
  bool train = true;    // params for the training formula, else eval
  void* sum_dy = nullptr;      // (C,) statistics dtype
  void* sum_dy_xmu = nullptr;  // (C,) statistics dtype
  ChannelOut grad_weight{nullptr, DType::Float32};
  ChannelOut grad_bias{nullptr, DType::Float32};
  void* params = nullptr;      // (C,) backward ChannelParams, compute type
};
void launch_backward_finalize(const ReducePlan& plan, const Geometry& g, DType dtype, const void* workspace,
                              const BackwardOutputs& out, cudaStream_t stream);

// ---- backward elementwise (backward_elementwise.cu) -------------------------

void launch_backward_params(int64_t C, DType dtype, ChannelArg mean, ChannelArg invstd, ChannelArg weight,
                            ChannelArg sum_dy, ChannelArg sum_dy_xmu, ChannelArg count, bool train, void* params,
                            cudaStream_t stream);
// train: dx = a*dy - k*(x - m) - c; else dx = a*dy (x is not read).  With
// an activation, dt in place of dy, and dt stored in act.grad_residual.
void launch_backward_elementwise(const Geometry& g, DType dtype, const void* dy, const void* x, const void* params,
                                 bool train, void* dx, cudaStream_t stream, const ActGradArgs& act = {});

// ---- merge of per-group statistics (merge_stats.cu) -------------------------

// (G, C) contiguous float64 mean, m2, count -> (C,) each.
void launch_merge_stats(int64_t G, int64_t C, const double* mean, const double* m2, const double* count,
                        double* mean_out, double* m2_out, double* count_out, cudaStream_t stream);

}  // namespace cuda
}  // namespace torch_bn_manual
