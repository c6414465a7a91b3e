// Autograd kernels of the fused ops, batch_norm_act_train_forward and
// batch_norm_act_eval_forward: csrc/autograd.cpp's design (no Python on the
// training path) for act(BN(x) + residual).
//
// The forward saves the input, the output (only for relu/leaky_relu: the
// backward reads act' from it), the weight and the per-channel statistics:
// no more than nn's BatchNorm + ReLU pair keeps. The residual is not saved;
// its gradient is dt = dy·act'(o), which batch_norm_act_backward writes in
// its grad pass (identity: dy itself).
//
// First-order backward runs batch_norm_act_backward below autograd; with
// create_graph=True it is called through autograd, where ops.py registers
// its derivative.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "autograd_common.h"
#include "op_checks.h"

namespace torch_bn_manual {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptDouble = std::optional<double>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace autograd_common;

using ActTrainSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                       const OptTensor&, OptDouble, double);
using ActEvalSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                          const Tensor&, OptDouble, double);
using ActBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const OptTensor&, const Tensor&, const Tensor&,
                                                                  bool, OptDouble, double, std::array<bool, 4>);

// What the backward needs besides the saved tensors. Gradient edges exist
// only for the tensors given, so it also records which were given.
void save_arguments(AutogradContext* ctx, const OptTensor& bias, const OptTensor& residual, OptDouble slope,
                    double eps) {
  ctx->saved_data["bias_dtype"] = present(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
  ctx->saved_data["has_residual"] = present(residual);
  ctx->saved_data["has_slope"] = slope.has_value();
  ctx->saved_data["slope"] = slope.value_or(0.0);
  ctx->saved_data["eps"] = eps;
}

OptDouble slope_of(AutogradContext* ctx) {
  return ctx->saved_data["has_slope"].toBool() ? OptDouble(ctx->saved_data["slope"].toDouble()) : std::nullopt;
}

// (input, weight, bias, residual) gradients, undefined where not needed;
// the gradient list keeps one entry per forward argument.
variable_list backward_of(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                          const Tensor& mean, const Tensor& invstd, const Tensor& output, bool train) {
  const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
  const bool has_weight = weight.defined(), has_bias = bias_dtype >= 0;
  const bool has_residual = ctx->saved_data["has_residual"].toBool();
  const OptDouble slope = slope_of(ctx);
  const bool need_input = ctx->needs_input_grad(0);
  const bool need_weight = has_weight && ctx->needs_input_grad(1);
  const bool need_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
  const bool need_residual = has_residual && ctx->needs_input_grad(1 + int(has_weight) + int(has_bias));
  // The op writes dz only for an activation; for identity dz is dy itself.
  // A bias without a weight needs Σ dt, which the op gives as dz's sum.
  const bool bias_alone = need_bias && !has_weight;
  const bool want_dz = slope.has_value() && (need_residual || bias_alone);
  const std::array<bool, 4> mask{need_input, need_weight, has_weight && need_bias, want_dz};
  static const auto backward_op = find_op<ActBackwardSig>("torch_bn_manual::batch_norm_act_backward");
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!c10::GradMode::is_enabled()) {
    below_autograd.emplace();
  }
  auto [grad_input, grad_weight, grad_bias, grad_residual] =
      backward_op.call(grad_output, output, input, optional(weight), mean, invstd, train, slope,
                       ctx->saved_data["eps"].toDouble(), mask);
  const Tensor dt = slope.has_value() ? grad_residual : grad_output;
  if (bias_alone) {
    grad_bias = grad_bias_alone(dt, static_cast<at::ScalarType>(bias_dtype));
  }
  return {need_input ? grad_input : Tensor(), need_weight ? grad_weight : Tensor(), need_bias ? grad_bias : Tensor(),
          need_residual ? dt : Tensor()};
}

void save_tensors(AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const Tensor& a,
                  const Tensor& b, const Tensor& output, OptDouble slope) {
  ctx->save_for_backward({input, weight.value_or(Tensor()), a, b, slope.has_value() ? output : Tensor()});
}

struct ActTrainForward : public torch::autograd::Function<ActTrainForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, OptDouble slope, double eps) {
    static const auto op = find_op<ActTrainSig>("torch_bn_manual::batch_norm_act_train_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd] = op.call(input, weight, bias, residual, slope, eps);
    save_tensors(ctx, input, weight, save_mean, save_invstd, output, slope);
    save_arguments(ctx, bias, residual, slope, eps);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    ctx->set_materialize_grads(false);
    return {output, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {
      return variable_list(6);
    }
    const variable_list saved = ctx->get_saved_variables();
    variable_list out = backward_of(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], true);
    out.resize(6);  // slope, eps
    return out;
  }
};

struct ActEvalForward : public torch::autograd::Function<ActEvalForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const Tensor& running_mean,
                               const Tensor& running_var, OptDouble slope, double eps) {
    static const auto op = find_op<ActEvalSig>("torch_bn_manual::batch_norm_act_eval_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor output = op.call(input, weight, bias, residual, running_mean, running_var, slope, eps);
    // As csrc/autograd.cpp: the statistics this forward used, not the buffers,
    // so that a training step before the backward changes nothing here
    // (autograd_common.h, eval_statistics). This node exists only when a
    // gradient is needed (act_eval_forward_autograd).
    const auto [mean, invstd] = eval_statistics(input.scalar_type(), running_mean, running_var, eps);
    save_tensors(ctx, input, weight, mean, invstd, output, slope);
    save_arguments(ctx, bias, residual, slope, eps);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    variable_list out = backward_of(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], false);
    out.resize(8);  // running_mean, running_var, slope, eps
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> act_train_forward_autograd(const Tensor& input, const OptTensor& weight,
                                                              const OptTensor& bias, const OptTensor& residual,
                                                              OptDouble slope, double eps) {
  const variable_list out = ActTrainForward::apply(input, weight, bias, residual, slope, eps);
  return {out[0], out[1], out[2]};
}

Tensor act_eval_forward_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& residual, const Tensor& running_mean, const Tensor& running_var,
                                 OptDouble slope, double eps) {
  // No gradient wanted: the kernel alone, without a node and without the statistics' copies.
  if (!c10::GradMode::is_enabled() ||
      !(input.requires_grad() || requires_grad(weight) || requires_grad(bias) || requires_grad(residual))) {
    static const auto op = find_op<ActEvalSig>("torch_bn_manual::batch_norm_act_eval_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, residual, running_mean, running_var, slope, eps);
  }
  return ActEvalForward::apply(input, weight, bias, residual, running_mean, running_var, slope, eps)[0];
}

}  // namespace
}  // namespace torch_bn_manual

TORCH_LIBRARY_IMPL(torch_bn_manual, Autograd, m) {
  m.impl("batch_norm_act_train_forward", &torch_bn_manual::act_train_forward_autograd);
  m.impl("batch_norm_act_eval_forward", &torch_bn_manual::act_eval_forward_autograd);
}
