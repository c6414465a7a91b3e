// The torch_bn_manual ops on CUDA tensors (schemas: csrc/ops.cpp, meanings:
// docs/architecture.md): argument checks, allocation, and the passes of
// launchers.h in order, all on the current stream of the input's device.
//
//   train_forward         statistics -> finalize (mean, invstd, coefficients) -> normalize
//   eval_forward          coefficients from running stats -> normalize
//   elementwise           coefficients from mean/invstd -> normalize
//   collect_stats         statistics -> finalize (mean, m2, count)
//   merge_stats           one merge kernel over (G, C), in double
//   backward              reduce dy, dy*(x-mean) -> finalize (grads, coefficients) -> dx
//   backward_reduce       reduce -> finalize (sums)
//   backward_elementwise  coefficients from given sums -> dx
//
// The fused ops (act(BN(x) + residual)) are the forward and backward passes
// above with the hooks of activation.cuh, no pass added:
//   act_train_forward     as train_forward, the normalize pass adding the residual and applying act
//   act_eval_forward      as eval_forward, the same epilogue
//   act_backward          as backward, dt = dy * act'(o) for each dy loaded by the
//                         reduce and dx passes, dt stored as grad_residual by the dx pass
//
// An empty input (M = 0 or C = 0) launches nothing: empty outputs, zero sums,
// mean 0, m2 0, count 0, invstd 1/sqrt(eps).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "activation_grad.h"
#include "launchers.h"
#include "running_stats.h"
#include "tensor_args.cuh"

namespace torch_bn_manual {
namespace cuda {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor workspace(int64_t bytes, const at::Tensor& like) {
  return at::empty({bytes}, like.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor channel_empty(int64_t C, const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({C}, like.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

// Coefficients (C,) of ChannelParams in the compute type: 4 values per channel.
at::Tensor params_buffer(int64_t C, const at::Tensor& input) {
  return channel_empty(4 * C, input, compute_dtype(input.scalar_type()));
}

// What the fused forward ops add: a residual (the input's shape, dtype and
// device: op_checks.h) and an activation. Empty: the plain ops.
struct Fusion {
  const at::Tensor* residual = nullptr;  // nullptr: none
  std::optional<double> slope;           // none: identity
};

Fusion fusion_of(const OptTensor& residual, std::optional<double> negative_slope) {
  return Fusion{is_present(residual) ? &*residual : nullptr, negative_slope};
}

void check_residual(const Fusion& f, const at::Tensor& input, const char* op) {
  if (f.residual != nullptr) check_same_shape(*f.residual, input, op, "residual");
}

// The epilogue's arguments. The residual is made dense in the input's memory
// order, which the output has too, so the normalize pass reads it at the
// output's offsets; `holder` keeps such a copy alive.
AddActArgs add_act_args(const Fusion& f, const Dense& d, at::Tensor& holder) {
  AddActArgs args;
  if (f.residual != nullptr) {
    holder = dense_like(*f.residual, d);
    args.residual = holder.const_data_ptr();
  }
  args.act = f.slope.has_value();
  args.slope = f.slope.value_or(0.0);
  return args;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> train_forward_with(const char* op, const at::Tensor& input,
                                                                  const OptTensor& weight, const OptTensor& bias,
                                                                  double eps, const Fusion& fusion) {
  check_input(input, op);
  check_same_device(weight, input, op, "weight");
  check_same_device(bias, input, op, "bias");
  check_residual(fusion, input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  Dense d = dense_input(input, nn_output_layout(input, weight, bias, /*train=*/true, eps));
  const int64_t C = d.g.C;
  at::Tensor hw, hb;
  StatsOutputs out;
  out.weight = optional_channel_arg(weight, C, input, op, "weight", hw);
  out.bias = optional_channel_arg(bias, C, input, op, "bias", hb);
  out.eps = eps;
  const auto sdt = stats_dtype(input.scalar_type());
  at::Tensor y = empty_like_dense(d);
  at::Tensor mean = channel_empty(C, input, sdt);
  at::Tensor invstd = channel_empty(C, input, sdt);
  if (d.g.numel() == 0) {
    mean.zero_();
    invstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, invstd};
  }
  at::Tensor residual;
  const AddActArgs act = add_act_args(fusion, d, residual);
  d.g.vec = vector_width(d, {d.t.const_data_ptr(), y.const_data_ptr(), act.residual});
  at::Tensor params = params_buffer(C, input);
  out.mean = mean.data_ptr();
  out.invstd = invstd.data_ptr();
  out.params = params.data_ptr();
  const ReducePlan plan = plan_stats(d.g, d.dtype);
  at::Tensor ws = workspace(stats_workspace_bytes(plan, d.g, d.dtype), input);
  const cudaStream_t stream = current_stream();
  launch_stats(plan, d.g, d.dtype, d.t.const_data_ptr(), ws.data_ptr(), stream);
  launch_stats_finalize(plan, d.g, d.dtype, d.t.const_data_ptr(), ws.const_data_ptr(), out, stream);
  launch_normalize(d.g, d.dtype, d.t.const_data_ptr(), params.const_data_ptr(), y.data_ptr(), stream, act);
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> train_forward(const at::Tensor& input, const OptTensor& weight,
                                                             const OptTensor& bias, double eps) {
  return train_forward_with("batch_norm_train_forward", input, weight, bias, eps, Fusion{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_train_forward(const at::Tensor& input, const OptTensor& weight,
                                                                 const OptTensor& bias, const OptTensor& residual,
                                                                 std::optional<double> negative_slope, double eps) {
  return train_forward_with("batch_norm_act_train_forward", input, weight, bias, eps,
                            fusion_of(residual, negative_slope));
}

// y from given per-channel statistics: running mean/var (from_var) or mean/invstd.
at::Tensor normalize_with(const char* op, const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const at::Tensor& mean, const at::Tensor& second, const char* second_name, bool from_var,
                          double eps, const Fusion& fusion = Fusion{}) {
  check_input(input, op);
  check_same_device(weight, input, op, "weight");
  check_same_device(bias, input, op, "bias");
  check_residual(fusion, input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  // The layout nn gives: eval as batch norm's forward, elementwise (SyncBatchNorm) as batch_norm_elemt (empty_like).
  Dense d = dense_input(input, from_var ? nn_output_layout(input, weight, bias, /*train=*/false, eps)
                                        : OutputLayout::InputStrides);
  const int64_t C = d.g.C;
  at::Tensor hw, hb, hm, hs;
  const ChannelArg w = optional_channel_arg(weight, C, input, op, "weight", hw);
  const ChannelArg b = optional_channel_arg(bias, C, input, op, "bias", hb);
  const ChannelArg m = channel_arg(mean, C, input, op, from_var ? "running_mean" : "mean", hm);
  const ChannelArg s = channel_arg(second, C, input, op, second_name, hs);
  at::Tensor y = empty_like_dense(d);
  if (d.g.numel() == 0) return y;
  at::Tensor residual;
  const AddActArgs act = add_act_args(fusion, d, residual);
  d.g.vec = vector_width(d, {d.t.const_data_ptr(), y.const_data_ptr(), act.residual});
  at::Tensor params = params_buffer(C, input);
  const cudaStream_t stream = current_stream();
  launch_forward_params(C, d.dtype, m, s, from_var, eps, w, b, params.data_ptr(), stream);
  launch_normalize(d.g, d.dtype, d.t.const_data_ptr(), params.const_data_ptr(), y.data_ptr(), stream, act);
  return y;
}

at::Tensor eval_forward(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  return normalize_with("batch_norm_eval_forward", input, weight, bias, running_mean, running_var, "running_var",
                        /*from_var=*/true, eps);
}

at::Tensor act_eval_forward(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& residual, const at::Tensor& running_mean, const at::Tensor& running_var,
                            std::optional<double> negative_slope, double eps) {
  return normalize_with("batch_norm_act_eval_forward", input, weight, bias, running_mean, running_var, "running_var",
                        /*from_var=*/true, eps, fusion_of(residual, negative_slope));
}

at::Tensor elementwise(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
                       const at::Tensor& invstd) {
  return normalize_with("batch_norm_elementwise", input, weight, bias, mean, invstd, "invstd", /*from_var=*/false,
                        0.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> collect_stats(const at::Tensor& input) {
  const char* op = "batch_norm_collect_stats";
  check_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  Dense d = dense_input(input);
  const int64_t C = d.g.C;
  const auto sdt = stats_dtype(input.scalar_type());
  at::Tensor mean = channel_empty(C, input, sdt);
  at::Tensor m2 = channel_empty(C, input, sdt);
  // float64 whatever the input: the float32 statistics of half inputs would
  // round counts above 2^24, and SyncBatchNorm merges and divides by them.
  at::Tensor count = channel_empty(C, input, at::kDouble);
  if (d.g.numel() == 0) {
    mean.zero_();
    m2.zero_();
    count.zero_();
    return {mean, m2, count};
  }
  d.g.vec = vector_width(d, {d.t.const_data_ptr()});
  StatsOutputs out;
  out.mean = mean.data_ptr();
  out.m2 = m2.data_ptr();
  out.count = count.data_ptr();
  const ReducePlan plan = plan_stats(d.g, d.dtype);
  at::Tensor ws = workspace(stats_workspace_bytes(plan, d.g, d.dtype), input);
  const cudaStream_t stream = current_stream();
  launch_stats(plan, d.g, d.dtype, d.t.const_data_ptr(), ws.data_ptr(), stream);
  launch_stats_finalize(plan, d.g, d.dtype, d.t.const_data_ptr(), ws.const_data_ptr(), out, stream);
  return {mean, m2, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_stats(const at::Tensor& mean, const at::Tensor& m2,
                                                           const at::Tensor& count) {
  const char* op = "batch_norm_merge_stats";
  check_merge_stats_args(mean, m2, op);
  TORCH_CHECK(mean.is_cuda(), op, ": expected CUDA statistics, got ", mean.device());
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t G = mean.size(0), C = mean.size(1);
  const auto as_double = [&](const at::Tensor& t) {
    return t.detach().to(mean.device(), at::kDouble).expand({G, C}).contiguous();
  };
  const at::Tensor mean_d = as_double(mean), m2_d = as_double(m2), count_d = as_double(count);
  at::Tensor out_mean = channel_empty(C, mean_d, at::kDouble);
  at::Tensor out_m2 = channel_empty(C, mean_d, at::kDouble);
  at::Tensor out_count = channel_empty(C, mean_d, at::kDouble);
  if (C > 0) {  // G == 0 gives zeros
    launch_merge_stats(G, C, mean_d.const_data_ptr<double>(), m2_d.const_data_ptr<double>(),
                       count_d.const_data_ptr<double>(), out_mean.data_ptr<double>(), out_m2.data_ptr<double>(),
                       out_count.data_ptr<double>(), current_stream());
  }
  const auto dtype = mean.scalar_type();
  return {out_mean.to(dtype), out_m2.to(dtype), out_count};  // the count stays float64: exact
}

// What the fused backward adds in front of batch norm's: dt = dy * act'(o),
// act' read from the forward's output o, and dt as the residual's gradient.
// Empty: the plain op.
struct ActBackward {
  const at::Tensor* output = nullptr;  // o, read only with an activation
  std::optional<double> slope;         // none: identity (dt = dy)
  bool want_grad_residual = false;
};

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (grad_input, grad_weight, grad_bias, grad_residual); grad_residual is an
// empty (0,) tensor unless act.want_grad_residual.
Grads backward_with(const char* op, const at::Tensor& grad_output, const at::Tensor& input, const OptTensor& weight,
                    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool train,
                    std::array<bool, 3> output_mask, const ActBackward& act) {
  check_input(input, op);
  check_same_shape(grad_output, input, op, "grad_output");
  if (act.slope.has_value()) check_same_shape(*act.output, input, op, "output");
  check_same_device(weight, input, op, "weight");
  const c10::cuda::CUDAGuard guard(input.device());
  Dense d = dense_input(input);
  const int64_t C = d.g.C;
  at::Tensor hm, hi, hw;
  BackwardOutputs out;
  out.mean = channel_arg(save_mean, C, input, op, "save_mean", hm);
  out.invstd = channel_arg(save_invstd, C, input, op, "save_invstd", hi);
  out.weight = optional_channel_arg(weight, C, input, op, "weight", hw);
  out.count = static_cast<double>(d.g.rows());
  out.train = train;
  const bool has_w = is_present(weight);
  const bool need_gi = output_mask[0];
  const bool need_gw = has_w && output_mask[1];
  const bool need_gb = has_w && output_mask[2];
  const bool need_sums = need_gw || need_gb || (train && need_gi);

  // On the input's device (where the finalize kernel writes them), in the
  // weight's dtype (docs/architecture.md), as the fake kernel in ops.py says.
  const auto wopt = input.options().dtype(has_w ? weight->scalar_type() : input.scalar_type());
  at::Tensor grad_input = need_gi ? empty_like_dense(d) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({need_gw ? C : 0}, wopt);
  at::Tensor grad_bias = at::empty({need_gb ? C : 0}, wopt);
  at::Tensor grad_residual = act.want_grad_residual ? empty_like_dense(d) : at::empty({0}, input.options());
  if (d.g.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }
  const at::Tensor dy = dense_like(grad_output, d);
  // The prologue: o dense like the input (read at dy's offsets); the dx pass
  // stores dt as grad_residual.
  at::Tensor o;
  ActGradArgs prologue;
  if (act.slope.has_value()) {
    o = dense_like(*act.output, d);
    prologue.output = o.const_data_ptr();
    prologue.slope = *act.slope;
    if (act.want_grad_residual && need_gi) prologue.grad_residual = grad_residual.data_ptr();
  }
  d.g.vec = vector_width(d, {d.t.const_data_ptr(), dy.const_data_ptr(),
                             need_gi ? grad_input.const_data_ptr() : nullptr, prologue.output,
                             prologue.grad_residual});
  at::Tensor params = need_gi ? params_buffer(C, input) : at::Tensor();
  const cudaStream_t stream = current_stream();
  if (need_sums) {
    out.grad_weight = channel_out(grad_weight);
    out.grad_bias = channel_out(grad_bias);
    out.params = need_gi ? params.data_ptr() : nullptr;
    const ReducePlan plan = plan_backward_reduce(d.g, d.dtype);
    at::Tensor ws = workspace(backward_workspace_bytes(plan, d.g, d.dtype), input);
    launch_backward_reduce(plan, d.g, d.dtype, dy.const_data_ptr(), d.t.const_data_ptr(), out.mean, ws.data_ptr(),
                           stream, prologue);
    launch_backward_finalize(plan, d.g, d.dtype, ws.const_data_ptr(), out, stream);
  } else if (need_gi) {  // eval, no parameter gradients: dx = w * invstd * dy
    const ChannelArg none{nullptr, DType::Float64, 0};
    launch_backward_params(C, d.dtype, out.mean, out.invstd, out.weight, none, none, none, /*train=*/false,
                           params.data_ptr(), stream);
  }
  if (need_gi) {
    launch_backward_elementwise(d.g, d.dtype, dy.const_data_ptr(), d.t.const_data_ptr(), params.const_data_ptr(),
                                train, grad_input.data_ptr(), stream, prologue);
  }
  if (act.want_grad_residual && prologue.grad_residual == nullptr) {
    // No dx pass wrote dt (identity, or no grad_input asked for): dt on its own,
    // the prologue's formula in tensor ops (the same roundings).
    grad_residual.copy_(activation_grad(dy, o, act.slope));
  }
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const OptTensor& weight, const at::Tensor& save_mean,
                                                        const at::Tensor& save_invstd, bool train, double eps,
                                                        std::array<bool, 3> output_mask) {
  (void)eps;  // only the double backward (ops.py) rebuilds statistics with it
  const Grads grads = backward_with("batch_norm_backward", grad_output, input, weight, save_mean, save_invstd, train,
                                    output_mask, ActBackward{});
  return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
}

Grads act_backward(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
                   const OptTensor& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd, bool train,
                   std::optional<double> negative_slope, double eps, std::array<bool, 4> output_mask) {
  (void)eps;  // as in backward
  const ActBackward act{&output, negative_slope, output_mask[3]};
  return backward_with("batch_norm_act_backward", grad_output, input, weight, save_mean, save_invstd, train,
                       {output_mask[0], output_mask[1], output_mask[2]}, act);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& mean, const at::Tensor& invstd) {
  const char* op = "batch_norm_backward_reduce";
  check_input(input, op);
  check_same_shape(grad_output, input, op, "grad_output");
  const c10::cuda::CUDAGuard guard(input.device());
  Dense d = dense_input(input);
  const int64_t C = d.g.C;
  at::Tensor hm, hi;
  BackwardOutputs out;
  out.mean = channel_arg(mean, C, input, op, "mean", hm);
  out.invstd = channel_arg(invstd, C, input, op, "invstd", hi);  // checked; the sums do not need it
  const auto sdt = stats_dtype(input.scalar_type());
  at::Tensor sum_dy = channel_empty(C, input, sdt);
  at::Tensor sum_dy_xmu = channel_empty(C, input, sdt);
  if (d.g.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  const at::Tensor dy = dense_like(grad_output, d);
  d.g.vec = vector_width(d, {d.t.const_data_ptr(), dy.const_data_ptr()});
  out.sum_dy = sum_dy.data_ptr();
  out.sum_dy_xmu = sum_dy_xmu.data_ptr();
  const ReducePlan plan = plan_backward_reduce(d.g, d.dtype);
  at::Tensor ws = workspace(backward_workspace_bytes(plan, d.g, d.dtype), input);
  const cudaStream_t stream = current_stream();
  launch_backward_reduce(plan, d.g, d.dtype, dy.const_data_ptr(), d.t.const_data_ptr(), out.mean, ws.data_ptr(),
                         stream);
  launch_backward_finalize(plan, d.g, d.dtype, ws.const_data_ptr(), out, stream);
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elementwise(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                const at::Tensor& invstd, const OptTensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, const at::Tensor& count) {
  const char* op = "batch_norm_backward_elementwise";
  check_input(input, op);
  check_same_shape(grad_output, input, op, "grad_output");
  check_same_device(weight, input, op, "weight");
  const c10::cuda::CUDAGuard guard(input.device());
  Dense d = dense_input(input);
  const int64_t C = d.g.C;
  at::Tensor hm, hi, hw, hs, hx, hn;
  const ChannelArg m = channel_arg(mean, C, input, op, "mean", hm);
  const ChannelArg is = channel_arg(invstd, C, input, op, "invstd", hi);
  const ChannelArg w = optional_channel_arg(weight, C, input, op, "weight", hw);
  const ChannelArg sdy = channel_arg(sum_dy, C, input, op, "sum_dy", hs);
  const ChannelArg sdyx = channel_arg(sum_dy_xmu, C, input, op, "sum_dy_xmu", hx);
  const ChannelArg n = channel_arg(count, C, input, op, "count", hn, /*allow_broadcast=*/true);
  at::Tensor grad_input = empty_like_dense(d);
  if (d.g.numel() == 0) return grad_input;
  const at::Tensor dy = dense_like(grad_output, d);
  d.g.vec = vector_width(d, {d.t.const_data_ptr(), dy.const_data_ptr(), grad_input.const_data_ptr()});
  at::Tensor params = params_buffer(C, input);
  const cudaStream_t stream = current_stream();
  launch_backward_params(C, d.dtype, m, is, w, sdy, sdyx, n, /*train=*/true, params.data_ptr(), stream);
  launch_backward_elementwise(d.g, d.dtype, dy.const_data_ptr(), d.t.const_data_ptr(), params.const_data_ptr(),
                              /*train=*/true, grad_input.data_ptr(), stream);
  return grad_input;
}

}  // namespace
}  // namespace cuda
}  // namespace torch_bn_manual

TORCH_LIBRARY_IMPL(torch_bn_manual, CUDA, m) {
  using namespace torch_bn_manual::cuda;
  m.impl("batch_norm_train_forward", &train_forward);
  m.impl("batch_norm_eval_forward", &eval_forward);
  m.impl("batch_norm_backward", &backward);
  m.impl("batch_norm_collect_stats", &collect_stats);
  m.impl("batch_norm_merge_stats", &merge_stats);
  m.impl("batch_norm_elementwise", &elementwise);
  m.impl("batch_norm_backward_reduce", &backward_reduce);
  m.impl("batch_norm_backward_elementwise", &backward_elementwise);
  // A few values per channel: the tensor-ops formula (csrc/running_stats.h).
  m.impl("batch_norm_running_stats", &torch_bn_manual::running_stats_tensor_ops);
  m.impl("batch_norm_act_train_forward", &act_train_forward);
  m.impl("batch_norm_act_eval_forward", &act_eval_forward);
  m.impl("batch_norm_act_backward", &act_backward);
}
