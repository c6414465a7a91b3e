// Tensor-level plumbing shared by the CPU ops: the dense layout of the input,
// and per-channel values to and from tensors (argument checks: op_checks.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "cpu/loops.h"
#include "op_checks.h"  // stats_dtype, check_input, check_same_shape

namespace torch_bn_manual {
namespace cpu {

// A value as the statistics dtype stores it (float32 rounding where it is float32).
inline double round_to(double v, at::ScalarType dtype) {
  return dtype == at::kFloat ? static_cast<double>(static_cast<float>(v)) : v;
}

// The input laid out densely in `format`, and how to walk it.
struct Dense {
  at::Tensor t;
  at::MemoryFormat format;
  View v;
};
// Output layouts follow ATen's CPU batch norm (native/Normalization.cpp):
// when the input is dense in one of the three memory formats and every
// per-channel tensor is contiguous, the output takes the first of
// contiguous / channels_last_3d / channels_last the input satisfies; otherwise
// the input's suggest_memory_format(). The two differ for ambiguous strides,
// e.g. a (1, 2, 3, 1) input with strides (6, 1, 2, 1) is channels_last
// contiguous while suggest_memory_format() says contiguous. The input is
// walked in the output's format (a copy only when it is not dense in it).
// `parameters_contiguous`: weight, bias (and running stats) all contiguous.
Dense dense_input(const at::Tensor& input, bool parameters_contiguous = true);
// For a gradient of input's shape, as ATen's CPU batch norm backward picks
// it: the rule above when input and grad_output are both dense in a format
// and suggest the same one, else the input's suggest_memory_format().
Dense dense_input_for_grad(const at::Tensor& input, const at::Tensor& grad_output);
// True when every tensor given is missing or contiguous.
bool all_contiguous(std::initializer_list<const std::optional<at::Tensor>*> tensors);
// `other` (e.g. grad_output) in the same memory order as d.t.
at::Tensor dense_like(const at::Tensor& other, const Dense& d);
// A new tensor of d's shape and memory format.
at::Tensor empty_like_dense(const Dense& d, at::ScalarType dtype);

// A per-channel tensor (C values, or 1 broadcast to C) as doubles.
std::vector<double> channel_values(const at::Tensor& t, int64_t C, const char* op, const char* name,
                                   bool allow_broadcast = false);
// Same for an optional tensor; missing means `fill` for every channel.
std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t C, double fill, const char* op,
                                   const char* name);
// A (C,) tensor of `dtype` holding v.
at::Tensor channel_tensor(const std::vector<double>& v, const at::TensorOptions& options, at::ScalarType dtype);

}  // namespace cpu
}  // namespace torch_bn_manual
