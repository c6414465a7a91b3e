// Attaches the CPU kernels to the schemas declared in csrc/ops.cpp.
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY_IMPL(torch_bn_manual, CPU, m) {
  using namespace torch_bn_manual::cpu;
  m.impl("batch_norm_train_forward", &train_forward);
  m.impl("batch_norm_eval_forward", &eval_forward);
  m.impl("batch_norm_backward", &backward);
  m.impl("batch_norm_collect_stats", &collect_stats);
  m.impl("batch_norm_merge_stats", &merge_stats);
  m.impl("batch_norm_elementwise", &elementwise);
  m.impl("batch_norm_backward_reduce", &backward_reduce);
  m.impl("batch_norm_backward_elementwise", &backward_elementwise);
  m.impl("batch_norm_running_stats", &running_stats);
  m.impl("batch_norm_act_train_forward", &act_train_forward);
  m.impl("batch_norm_act_eval_forward", &act_eval_forward);
  m.impl("batch_norm_act_backward", &act_backward);
}
