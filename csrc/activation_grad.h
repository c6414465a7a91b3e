// dt = dy·act'(output) in tensor ops, for the fused backward's residual
// gradient when no kernel pass wrote it (CPU and CUDA). The kernels' hooks
// (cpu/activation.h, cuda/activation.cuh) apply the same rule per value:
//   identity (no slope)  dt = dy
//   relu (slope 0)       dt = 0 where output <= 0, dy elsewhere (threshold_backward)
//   leaky_relu           dt = dy where output > 0, slope·dy elsewhere
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace torch_bn_manual {

inline at::Tensor activation_grad(const at::Tensor& dy, const at::Tensor& output, std::optional<double> slope) {
  if (!slope.has_value()) {
    return dy;
  }
  if (*slope == 0.0) {
    return dy.masked_fill(output.le(0), 0);
  }
  return at::where(output.gt(0), dy, dy * *slope);
}

}  // namespace torch_bn_manual
