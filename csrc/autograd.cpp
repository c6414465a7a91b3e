// Autograd kernels of the two differentiable ops, batch_norm_train_forward
// and batch_norm_eval_forward, for every device.
//
// Why C++ and not torch.library.register_autograd: on a small layer the
// Python autograd.Function that register_autograd builds costs more than the
// kernel itself (about 50 us per forward on the 2-core development machine,
// benchmarks/results/cpu-breakdown.md). Here the forward saves what the
// backward needs and the backward calls batch_norm_backward, all without
// entering Python.
//
// First-order backward runs batch_norm_backward below autograd. When the
// graph of the backward is wanted (create_graph=True, gradgradcheck), it is
// called through autograd instead: ops.py gives batch_norm_backward its own
// derivative, the one of the differentiable formula in _python.py.
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
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace autograd_common;

using TrainForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double);
using EvalForwardSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                       const Tensor&, bool, double, std::array<bool, 3>);

// What the backward needs besides the saved tensors: eps, and the bias'
// dtype (-1: no bias; the bias itself is not needed, so it is not saved).
void save_arguments(AutogradContext* ctx, const OptTensor& bias, double eps) {
  ctx->saved_data["bias_dtype"] = present(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
  ctx->saved_data["eps"] = eps;
}

// The gradients (input, weight, bias) of either forward op, undefined where
// not needed; mean/invstd are the statistics that normalized the input.
// Gradient edges exist only for the tensors given, so the edge of the bias is
// 1 or 2 depending on the weight.
variable_list backward_of(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                          const Tensor& mean, const Tensor& invstd, bool train) {
  const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
  const bool has_weight = weight.defined();
  const bool need_input = ctx->needs_input_grad(0);
  const bool need_weight = has_weight && ctx->needs_input_grad(1);
  const bool need_bias = bias_dtype >= 0 && ctx->needs_input_grad(has_weight ? 2 : 1);
  const std::array<bool, 3> mask{need_input, need_weight, has_weight && need_bias};
  static const auto backward_op = find_op<BackwardSig>("torch_bn_manual::batch_norm_backward");
  // First order: the kernel below autograd. create_graph=True (grad mode on
  // in a backward): through batch_norm_backward's own autograd (ops.py).
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!c10::GradMode::is_enabled()) {
    below_autograd.emplace();
  }
  auto [grad_input, grad_weight, grad_bias] =
      backward_op.call(grad_output, input, optional(weight), mean, invstd, train, ctx->saved_data["eps"].toDouble(),
                       mask);
  if (need_bias && !has_weight) {
    grad_bias = grad_bias_alone(grad_output, static_cast<at::ScalarType>(bias_dtype));
  }
  return {need_input ? grad_input : Tensor(), need_weight ? grad_weight : Tensor(),
          need_bias ? grad_bias : Tensor()};
}

struct TrainForward : public torch::autograd::Function<TrainForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto op = find_op<TrainForwardSig>("torch_bn_manual::batch_norm_train_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd] = op.call(input, weight, bias, eps);
    // The input itself, so that double backward stays connected to it.
    ctx->save_for_backward({input, weight.value_or(Tensor()), save_mean, save_invstd});
    save_arguments(ctx, bias, eps);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    // No zero tensors for the gradients of save_mean/save_invstd (they have none).
    ctx->set_materialize_grads(false);
    return {output, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {  // only save_mean/save_invstd were used
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const variable_list saved = ctx->get_saved_variables();
    variable_list out = backward_of(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], /*train=*/true);
    out.emplace_back();  // eps
    return out;
  }
};

struct EvalForward : public torch::autograd::Function<EvalForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const Tensor& running_mean, const Tensor& running_var,
                               double eps) {
    static const auto op = find_op<EvalForwardSig>("torch_bn_manual::batch_norm_eval_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor output = op.call(input, weight, bias, running_mean, running_var, eps);
    // The statistics this forward used, not the buffers (autograd_common.h,
    // eval_statistics). This node exists only when a gradient is needed
    // (eval_forward_autograd).
    const auto [mean, invstd] = eval_statistics(input.scalar_type(), running_mean, running_var, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd});
    save_arguments(ctx, bias, eps);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    variable_list out = backward_of(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], /*train=*/false);
    out.resize(6);  // running_mean, running_var, eps: no gradient
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> train_forward_autograd(const Tensor& input, const OptTensor& weight,
                                                          const OptTensor& bias, double eps) {
  const variable_list out = TrainForward::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor eval_forward_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                             const Tensor& running_mean, const Tensor& running_var, double eps) {
  // No gradient wanted (inference, or nothing requires grad): the kernel
  // alone, without a graph node and without the statistics' copies.
  if (!c10::GradMode::is_enabled() ||
      !(input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    static const auto op = find_op<EvalForwardSig>("torch_bn_manual::batch_norm_eval_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, running_mean, running_var, eps);
  }
  return EvalForward::apply(input, weight, bias, running_mean, running_var, eps)[0];
}

}  // namespace
}  // namespace torch_bn_manual

TORCH_LIBRARY_IMPL(torch_bn_manual, Autograd, m) {
  m.impl("batch_norm_train_forward", &torch_bn_manual::train_forward_autograd);
  m.impl("batch_norm_eval_forward", &torch_bn_manual::eval_forward_autograd);
}
