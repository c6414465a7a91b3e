// What the two autograd files (csrc/autograd.cpp for batch norm,
// csrc/autograd_act.cpp for the fused ops) share: finding an op once, the
// optional-tensor helpers, and the bias gradient when no weight was given.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
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
