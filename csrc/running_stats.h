// batch_norm_running_stats: the new running statistics after one training
// batch, computed from what train_forward saved (docs/derivation.md,
// "Running statistics"):
//
//   var          = max(1 / invstd² - eps, 0)           (biased batch variance)
//   running_mean = f · mean                + (1 - f) · running_mean
//   running_var  = f · var · M / (M - 1)   + (1 - f) · running_var
//
// in double, returned in the running buffers' dtype. f (momentum) is a 0-d
// tensor so that momentum=None (f = 1 / num_batches_tracked) needs no host
// value. The op is functional; functional.py copies the results into the
// buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace torch_bn_manual {

// Checks shared by every device's kernel.
void check_running_stats_args(const at::Tensor& save_mean, const at::Tensor& save_invstd,
                              const at::Tensor& running_mean, const at::Tensor& running_var,
                              const at::Tensor& momentum, int64_t count);

// The formula in ATen tensor ops, for any device (the CUDA build registers it
// for CUDA tensors; csrc/cpu/running_stats.cpp is the CPU loop).
std::tuple<at::Tensor, at::Tensor> running_stats_tensor_ops(const at::Tensor& save_mean,
                                                            const at::Tensor& save_invstd,
                                                            const at::Tensor& running_mean,
                                                            const at::Tensor& running_var,
                                                            const at::Tensor& momentum, double eps, int64_t count);

}  // namespace torch_bn_manual
