#include "cpu/tensors.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

namespace torch_bn_manual {
namespace cpu {

namespace {

bool dense_in_a_format(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// The first format t is dense in (t must be dense in one).
at::MemoryFormat first_dense_format(const at::Tensor& t) {
  if (t.is_contiguous()) {
    return at::MemoryFormat::Contiguous;
  }
  return t.is_contiguous(at::MemoryFormat::ChannelsLast3d) ? at::MemoryFormat::ChannelsLast3d
                                                           : at::MemoryFormat::ChannelsLast;
}

Dense dense_in(const at::Tensor& input, at::MemoryFormat format) {
  Dense d;
  d.format = format;
  d.t = input.contiguous(format);
  d.v = make_view(d.t, format);
  return d;
}

}  // namespace

bool all_contiguous(std::initializer_list<const std::optional<at::Tensor>*> tensors) {
  for (const std::optional<at::Tensor>* t : tensors) {
    if (t->has_value() && (*t)->defined() && !(*t)->is_contiguous()) {
      return false;
    }
  }
  return true;
}

Dense dense_input(const at::Tensor& input, bool parameters_contiguous) {
  const bool fast = parameters_contiguous && dense_in_a_format(input);
  return dense_in(input, fast ? first_dense_format(input) : input.suggest_memory_format());
}

Dense dense_input_for_grad(const at::Tensor& input, const at::Tensor& grad_output) {
  const bool fast = dense_in_a_format(input) && dense_in_a_format(grad_output) &&
                    input.suggest_memory_format() == grad_output.suggest_memory_format();
  return dense_in(input, fast ? first_dense_format(input) : input.suggest_memory_format());
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
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  // Read in place (no conversion tensors: these are per-call costs).
  const at::Tensor flat = t.dim() == 1 ? t : t.reshape({-1});
  const int64_t stride = flat.numel() == 1 ? 0 : flat.stride(0);
  std::vector<double> out(C);
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, flat.scalar_type(), "batch_norm_channel_values", [&] {
    const scalar_t* p = flat.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<double>(p[c * stride]);
    }
  });
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
  at::Tensor out = at::empty({C}, options.dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "batch_norm_channel_tensor", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      p[c] = static_cast<scalar_t>(v[c]);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace torch_bn_manual
