#include "running_stats.h"

#include <ATen/ATen.h>

namespace torch_bn_manual {

void check_running_stats_args(const at::Tensor& save_mean, const at::Tensor& save_invstd,
                              const at::Tensor& running_mean, const at::Tensor& running_var,
                              const at::Tensor& momentum, int64_t count) {
  const char* op = "batch_norm_running_stats";
  const int64_t C = save_mean.numel();
  TORCH_CHECK(save_invstd.numel() == C && running_mean.numel() == C && running_var.numel() == C, op,
              ": save_mean, save_invstd, running_mean and running_var must have one value per channel, got ",
              save_mean.sizes(), ", ", save_invstd.sizes(), ", ", running_mean.sizes(), ", ", running_var.sizes());
  TORCH_CHECK(momentum.numel() == 1, op, ": momentum must hold one value, got shape ", momentum.sizes());
  TORCH_CHECK(count > 1, op, ": the unbiased variance needs more than one value per channel, got count ", count);
}

std::tuple<at::Tensor, at::Tensor> running_stats_tensor_ops(const at::Tensor& save_mean,
                                                            const at::Tensor& save_invstd,
                                                            const at::Tensor& running_mean,
                                                            const at::Tensor& running_var,
                                                            const at::Tensor& momentum, double eps, int64_t count) {
  check_running_stats_args(save_mean, save_invstd, running_mean, running_var, momentum, count);
  const at::Tensor f = momentum.reshape({}).to(at::kDouble);
  const at::Tensor keep = 1.0 - f;
  const at::Tensor invstd = save_invstd.to(at::kDouble);
  const at::Tensor var = (invstd.mul(invstd).reciprocal() - eps).clamp_min(0.0);
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  const at::Tensor new_mean = f * save_mean.to(at::kDouble) + keep * running_mean.to(at::kDouble);
  const at::Tensor new_var = f * (var * bessel) + keep * running_var.to(at::kDouble);
  return {new_mean.to(running_mean.scalar_type()).reshape(running_mean.sizes()),
          new_var.to(running_var.scalar_type()).reshape(running_var.sizes())};
}

}  // namespace torch_bn_manual
