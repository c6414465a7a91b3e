#include "cpu/tensors.h"

#include <ATen/ATen.h>

namespace torch_bn_manual {
namespace cpu {

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
}

Dense dense_input(const at::Tensor& input) {
  Dense d;
  d.format = output_format(input);
  d.t = input.contiguous(d.format);
  d.v = make_view(d.t, d.format);
  return d;
}

at::Tensor dense_like(const at::Tensor& other, const Dense& d) {
  return other.contiguous(d.format);
}

at::Tensor empty_like_dense(const Dense& d, at::ScalarType dtype) {
  return at::empty(d.t.sizes(), d.t.options().dtype(dtype).memory_format(d.format));
}

std::vector<double> channel_values(const at::Tensor& t, int64_t C, const char* op, const char* name,
                                   bool allow_broadcast) {
  TORCH_CHECK(t.numel() == C || (allow_broadcast && t.numel() == 1), op, ": ", name, " must have ", C,
              " elements (one per channel), got ", t.numel());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false), op, ": ", name,
              " must be a real tensor, got ", t.scalar_type());
  const at::Tensor d = t.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  std::vector<double> out(C);
  for (int64_t c = 0; c < C; ++c) {
    out[c] = p[d.numel() == 1 ? 0 : c];
  }
  return out;
}

std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t C, double fill, const char* op,
                                   const char* name) {
  if (!t.has_value() || !t->defined()) {
    return std::vector<double>(C, fill);
  }
  return channel_values(*t, C, op, name);
}

at::Tensor channel_tensor(const std::vector<double>& v, const at::TensorOptions& options, at::ScalarType dtype) {
  const int64_t C = static_cast<int64_t>(v.size());
  at::Tensor out = at::empty({C}, options.dtype(at::kDouble).memory_format(at::MemoryFormat::Contiguous));
  std::copy(v.begin(), v.end(), out.data_ptr<double>());
  return dtype == at::kDouble ? out : out.to(dtype);
}

}  // namespace cpu
}  // namespace torch_bn_manual
