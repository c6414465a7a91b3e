// Argument checks and the statistics dtype rule, shared by the CPU and CUDA
// kernels of every op: one place for the rules and their messages. Device
// specific checks (e.g. "expected a CUDA input") stay with each device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_bn_manual {

// docs/architecture.md: float64 and float32 input keep float64 statistics,
// float16 and bfloat16 input float32 ones.
at::ScalarType stats_dtype(at::ScalarType input);

// An (N, C, *) input with 0 to 3 spatial dims, float64, float32, float16 or bfloat16.
void check_input(const at::Tensor& input, const char* op);

// `other` (e.g. grad_output) must have input's shape, dtype and device.
void check_same_shape(const at::Tensor& other, const at::Tensor& input, const char* op, const char* name);

// A parameter (weight, bias) must be on the input's device, as torch.nn
// requires, with the message of torch's own device check; absent ones pass.
// (Per-channel statistics and counts may live elsewhere: they are copied.)
void check_same_device(const std::optional<at::Tensor>& param, const at::Tensor& input, const char* op,
                       const char* name);

// batch_norm_merge_stats: mean and m2 are (G, C) floating-point tensors of one shape.
void check_merge_stats_args(const at::Tensor& mean, const at::Tensor& m2, const char* op);

}  // namespace torch_bn_manual
