// The CPU implementations of the torch_bn_manual ops (schemas: csrc/ops.cpp,
// meanings: docs/architecture.md). register.cpp attaches them to the CPU key.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace torch_bn_manual {
namespace cpu {

using OptTensor = std::optional<at::Tensor>;

// forward.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_forward(const at::Tensor& input, const OptTensor& weight,
                                                             const OptTensor& bias, double eps);
at::Tensor eval_forward(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps);
at::Tensor elementwise(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const at::Tensor& mean, const at::Tensor& invstd);

// stats.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> collect_stats(const at::Tensor& input);
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_stats(const at::Tensor& mean, const at::Tensor& m2,
                                                           const at::Tensor& count);

// backward.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const OptTensor& weight, const at::Tensor& save_mean,
                                                        const at::Tensor& save_invstd, bool train, double eps,
                                                        std::array<bool, 3> output_mask);
std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& mean, const at::Tensor& invstd);
at::Tensor backward_elementwise(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                const at::Tensor& invstd, const OptTensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, const at::Tensor& count);

// The fused layers (act(BN(x) + residual)): forward.cpp and backward.cpp, the
// same passes with the activation hooks of activation.h.
std::tuple<at::Tensor, at::Tensor, at::Tensor> act_train_forward(const at::Tensor& input, const OptTensor& weight,
                                                                 const OptTensor& bias, const OptTensor& residual,
                                                                 std::optional<double> negative_slope, double eps);
at::Tensor act_eval_forward(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& residual, const at::Tensor& running_mean,
                            const at::Tensor& running_var, std::optional<double> negative_slope, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input, const OptTensor& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool train, std::optional<double> negative_slope,
    double eps, std::array<bool, 4> output_mask);

// running_stats.cpp
std::tuple<at::Tensor, at::Tensor> running_stats(const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                                 const at::Tensor& momentum, double eps, int64_t count);

}  // namespace cpu
}  // namespace torch_bn_manual
