// What the two autograd files (csrc/autograd.cpp for batch norm,
// csrc/autograd_act.cpp for the fused ops) share: finding an op once, the
// optional-tensor helpers, the statistics an eval node saves, and the bias
// gradient when no weight was given.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <utility>
#include <vector>

#include "op_checks.h"

namespace torch_bn_manual {
namespace autograd_common {

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return present(t) && t->requires_grad();
}

// The statistics an eval-mode forward normalized with, as its backward needs
// them: (mean, invstd) in the statistics dtype, as new tensors (2·C values).
// Saving the running buffers themselves would tie the gradient to their
// later values: a training step between forward and backward updates them in
// place, and the backward would then either fail (autograd's version check)
// or, as torch.nn does, use statistics the output was never computed with.
// Called below autograd, where no op may hand back its input: hence the
// explicit copy of the mean.
inline std::pair<at::Tensor, at::Tensor> eval_statistics(at::ScalarType input_dtype, const at::Tensor& running_mean,
                                                         const at::Tensor& running_var, double eps) {
  const auto sdt = stats_dtype(input_dtype);
  at::Tensor mean = running_mean.to(sdt, /*non_blocking=*/false, /*copy=*/true);
  const at::Tensor var = running_var.scalar_type() == sdt ? running_var : running_var.to(sdt);
  return {mean, (var + eps).rsqrt()};
}

// Σ dy per channel in the bias' dtype, for a bias given without a weight (the
// kernels take a bias only with its weight; functional.py always pairs them).
inline at::Tensor grad_bias_alone(const at::Tensor& grad_output, at::ScalarType bias_dtype) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < grad_output.dim(); ++d) {
    dims.push_back(d);
  }
  return grad_output.to(stats_dtype(grad_output.scalar_type())).sum(dims).to(bias_dtype);
}

}  // namespace autograd_common
}  // namespace torch_bn_manual
