#include "op_checks.h"

#include <ATen/ATen.h>

namespace torch_bn_manual {

at::ScalarType stats_dtype(at::ScalarType input) {
  return (input == at::kDouble || input == at::kFloat) ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5, op, ": expected input of shape (N, C, *) with 0 to 3 ",
              "spatial dims, got ", input.dim(), " dims");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": input must be float64, float32, float16 or bfloat16, got ", dtype);
}

void check_same_shape(const at::Tensor& other, const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(other.sizes() == input.sizes(), op, ": ", name, " must have the input's shape ", input.sizes(),
              ", got ", other.sizes());
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
              input.scalar_type(), ", got ", other.scalar_type());
  TORCH_CHECK(other.device() == input.device(), op, ": ", name, " must be on the input's device ", input.device(),
              ", got ", other.device());
}

void check_same_device(const std::optional<at::Tensor>& param, const at::Tensor& input, const char* op,
                       const char* name) {
  if (!param.has_value() || !param->defined()) return;
  TORCH_CHECK(param->device() == input.device(), "Expected all tensors to be on the same device, but got ", name,
              " is on ", param->device(), ", different from other tensors on ", input.device(),
              " (when checking argument in method ", op, ")");
}

void check_merge_stats_args(const at::Tensor& mean, const at::Tensor& m2, const char* op) {
  TORCH_CHECK(mean.dim() == 2, op, ": mean must be (G, C), got ", mean.sizes());
  TORCH_CHECK(m2.sizes() == mean.sizes(), op, ": m2 must have mean's shape ", mean.sizes(), ", got ", m2.sizes());
  TORCH_CHECK(at::isFloatingType(mean.scalar_type()), op, ": mean must be floating point, got ", mean.scalar_type());
}

}  // namespace torch_bn_manual
