// The torch_bn_manual operator schemas: the one place they are declared.
// Meanings, dtype rules and shapes: docs/architecture.md. Kernels attach per
// device elsewhere (csrc/cpu/register.cpp, csrc/cuda/); the two forward ops
// get their autograd kernels in csrc/autograd.cpp, and batch_norm_backward
// its derivative (double backward) in torch_bn_manual/ops.py.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"

// Importing torch_bn_manual._C loads this library, which runs the
// registrations below. The module holds one function: cpu_capability(), the
// instruction sets the CPU kernels use on this machine.
namespace {
PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(torch_bn_manual::cpu::capability_name());
}
PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction sets the CPU kernels use here, e.g. 'avx2+avx512_bf16' (TORCH_BN_MANUAL_CPU=portable: "
     "the build's baseline only)."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  // A misspelt TORCH_BN_MANUAL_CPU would otherwise be ignored without a word.
  const char* setting_error = torch_bn_manual::cpu::cpu_setting_error();
  if (setting_error[0] != '\0') {
    PyErr_SetString(PyExc_ValueError, setting_error);
    return nullptr;
  }
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "torch_bn_manual operator library", -1,
                                      module_methods};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(torch_bn_manual, m) {
  // Differentiable (autograd kernels: csrc/autograd.cpp).
  m.def(
      "batch_norm_train_forward(Tensor input, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_eval_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, float eps) -> Tensor");
  // The gradient itself, and the decomposed steps SyncBatchNorm combines.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean,"
      " Tensor save_invstd, bool train, float eps, bool[3] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def("batch_norm_collect_stats(Tensor input) -> (Tensor mean, Tensor m2, Tensor count)");
  m.def("batch_norm_merge_stats(Tensor mean, Tensor m2, Tensor count) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_elementwise(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd)"
      " -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd)"
      " -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "batch_norm_backward_elementwise(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd,"
      " Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, Tensor count) -> Tensor");
  // The running statistics after a training batch (functional: the Python
  // layer copies the results into the buffers).
  m.def(
      "batch_norm_running_stats(Tensor save_mean, Tensor save_invstd, Tensor running_mean, Tensor running_var,"
      " Tensor momentum, float eps, SymInt count) -> (Tensor new_running_mean, Tensor new_running_var)");
  // Fused: output = act(BN(input) + residual), act(t) = t for t > 0 and
  // negative_slope·t otherwise (0: relu), identity when negative_slope is
  // None. Differentiable (autograd kernels: csrc/autograd_act.cpp); the
  // backward reads act' from the output.
  m.def(
      "batch_norm_act_train_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual,"
      " float? negative_slope, float eps) -> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_act_eval_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual,"
      " Tensor running_mean, Tensor running_var, float? negative_slope, float eps) -> Tensor");
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor output, Tensor input, Tensor? weight, Tensor save_mean,"
      " Tensor save_invstd, bool train, float? negative_slope, float eps, bool[4] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}

namespace {

// The ops without a derivative formula: run the device kernel with autograd
// out of the way, so their outputs never require grad (rather than carry a
// graph that cannot be differentiated).
void without_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_bn_manual, Autograd, m) {
  for (const char* name : {"batch_norm_collect_stats", "batch_norm_merge_stats",
                           "batch_norm_elementwise", "batch_norm_backward_reduce",
                           "batch_norm_backward_elementwise", "batch_norm_running_stats"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autograd>());
  }
}
