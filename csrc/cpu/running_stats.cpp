// batch_norm_running_stats on the CPU: one loop over the channels, the
// formula of csrc/running_stats.h in double with the operations in the same
// order as running_stats_tensor_ops. A handful of values, so the cost that
// matters is the call itself; hence a loop rather than a dozen tensor ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/tensors.h"
#include "running_stats.h"

namespace torch_bn_manual {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> running_stats(const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                                 const at::Tensor& momentum, double eps, int64_t count) {
  const char* op = "batch_norm_running_stats";
  check_running_stats_args(save_mean, save_invstd, running_mean, running_var, momentum, count);
  const int64_t C = save_mean.numel();
  const double f = channel_values(momentum, 1, op, "momentum")[0];
  const double keep = 1.0 - f;
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  const std::vector<double> mean = channel_values(save_mean, C, op, "save_mean");
  const std::vector<double> invstd = channel_values(save_invstd, C, op, "save_invstd");
  std::vector<double> new_mean = channel_values(running_mean, C, op, "running_mean");
  std::vector<double> new_var = channel_values(running_var, C, op, "running_var");
  for (int64_t c = 0; c < C; ++c) {
    // Separate roundings, as the tensor-ops version has them (no fused multiply-add).
    const volatile double var = std::max(1.0 / (invstd[c] * invstd[c]) - eps, 0.0);
    const volatile double unbiased = var * bessel;
    const volatile double mean_new = f * mean[c], mean_old = keep * new_mean[c];
    const volatile double var_new = f * unbiased, var_old = keep * new_var[c];
    new_mean[c] = mean_new + mean_old;
    new_var[c] = var_new + var_old;
  }
  return {channel_tensor(new_mean, running_mean.options(), running_mean.scalar_type()).reshape(running_mean.sizes()),
          channel_tensor(new_var, running_var.options(), running_var.scalar_type()).reshape(running_var.sizes())};
}

}  // namespace cpu
}  // namespace torch_bn_manual
