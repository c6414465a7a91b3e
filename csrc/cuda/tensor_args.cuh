// Tensor-level plumbing of the CUDA ops: the CUDA side of the argument checks
// (the shared rules and messages: op_checks.h), the dense layout of the input,
// and per-channel tensors turned into kernel arguments.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>

#include "launchers.h"
#include "op_checks.h"  // stats_dtype, check_same_shape, check_merge_stats_args

namespace torch_bn_manual {
namespace cuda {

using OptTensor = std::optional<at::Tensor>;

inline bool is_present(const OptTensor& t) { return t.has_value() && t->defined(); }

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::Float64;
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kLong: return DType::Int64;
    case at::kInt: return DType::Int32;
    default: TORCH_CHECK(false, "torch_bn_manual: unsupported dtype ", t);
  }
}

// The dtype of the per-channel coefficients (ChannelParams): the compute type.
inline at::ScalarType compute_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// op_checks.h's rules, on a CUDA tensor.
inline void check_input(const at::Tensor& input, const char* op) {
  torch_bn_manual::check_input(input, op);
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA input, got ", input.device());
}

// How torch.nn's CUDA batch norm lays out its output. cuDNN, where nn picks
// it, allocates in the input's suggested memory format; ATen's own kernels use
// empty_like, which keeps the input's strides when the input is dense (a 2-D
// or 3-D input with the channels innermost stays so) and falls back to the
// suggested format otherwise.
enum class OutputLayout { SuggestedFormat, InputStrides };

// The layout of nn's output for a forward op: cuDNN's where
// native/Normalization.cpp's backend choice picks cuDNN (float64/float32/
// float16-with-float32-parameters input of 3 to 5 dims, weight and bias
// given, a batch cuDNN takes, cuDNN enabled), else ATen's empty_like. Running
// statistics are always given here (eval) or allowed to be absent (training),
// as that choice requires.
inline OutputLayout nn_output_layout(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                     bool train, double eps) {
  if (!is_present(weight) || !is_present(bias) || input.dim() < 3) return OutputLayout::InputStrides;
  const auto dt = input.scalar_type();
  const auto wdt = weight->scalar_type();
  if (dt == at::kBFloat16 || wdt == at::kBFloat16 || (dt == at::kHalf && wdt != at::kFloat)) {
    return OutputLayout::InputStrides;
  }
  if (input.size(0) > (train ? 880801 : 65535)) return OutputLayout::InputStrides;
  if (input.numel() >= std::numeric_limits<int32_t>::max()) return OutputLayout::InputStrides;
  const auto& hooks = at::detail::getCUDAHooks();
  const bool cudnn = hooks.compiledWithCuDNN() && at::globalContext().userEnabledCuDNN() &&
                     hooks.versionCuDNN() >= 5110L && eps >= hooks.batchnormMinEpsilonCuDNN();
  return cudnn ? OutputLayout::SuggestedFormat : OutputLayout::InputStrides;
}

// The input laid out densely, and its geometry. The kernels walk (N, C, L)
// blocks, channels in the middle (NCL) or innermost (NLC, `channels_last`).
// With OutputLayout::InputStrides a dense input is used as it is and the
// outputs get its strides: any dense order is such a walk, with L the stride
// of the channel dim (the values of all dims laid out inside one channel
// step) and N the rest.
struct Dense {
  at::Tensor t;
  at::MemoryFormat format;
  bool keep_strides = false;  // outputs take t's strides (else: `format`)
  Geometry g;
  DType dtype;
};

inline Dense dense_input(const at::Tensor& input, OutputLayout layout = OutputLayout::SuggestedFormat) {
  Dense d;
  d.dtype = to_dtype(input.scalar_type());
  d.g.N = input.size(0);
  d.g.C = input.size(1);
  d.g.L = 1;
  for (int64_t i = 2; i < input.dim(); ++i) d.g.L *= input.size(i);
  d.g.device = input.get_device();
  d.g.vec = 1;
  d.keep_strides = layout == OutputLayout::InputStrides && input.is_non_overlapping_and_dense();
  if (d.keep_strides) {
    d.t = input;
    if (input.is_contiguous()) {
      d.format = at::MemoryFormat::Contiguous;
    } else if (input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      d.format = at::MemoryFormat::ChannelsLast;
    } else if (input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
      d.format = at::MemoryFormat::ChannelsLast3d;
    } else {  // another dense order (e.g. (N, C, L) with C innermost): by the channel stride
      d.format = at::MemoryFormat::Preserve;
      const int64_t numel = input.numel();
      if (d.g.C > 1 && numel > 0) {
        d.g.L = input.stride(1);
        d.g.N = numel / (d.g.C * d.g.L);
      }
    }
  } else {
    d.format = input.suggest_memory_format();
    d.t = input.contiguous(d.format);
  }
  d.g.channels_last = d.format != at::MemoryFormat::Contiguous;
  if (d.g.L == 1) {
    d.g.channels_last = true;  // (N, C): the rows are the samples
  } else if (d.g.C == 1) {
    d.g.channels_last = false;  // one channel: both orders coincide
  } else if (d.format == at::MemoryFormat::Preserve) {
    d.g.channels_last = false;  // L > 1 values inside each channel step
  }
  return d;
}

// `other` (grad_output) in the memory order of d.t.
inline at::Tensor dense_like(const at::Tensor& other, const Dense& d) {
  if (d.format != at::MemoryFormat::Preserve) return other.contiguous(d.format);
  if (other.strides() == d.t.strides()) return other;
  return at::empty_strided(d.t.sizes(), d.t.strides(), other.options()).copy_(other);
}

// A new tensor of d's shape and memory order: the input's strides where
// they are kept, else d's memory format.
inline at::Tensor empty_like_dense(const Dense& d) {
  if (d.keep_strides) return at::empty_strided(d.t.sizes(), d.t.strides(), d.t.options());
  return at::empty(d.t.sizes(), d.t.options().memory_format(d.format));
}

// The widest vector access the bulk kernels may use for these pointers: 16
// bytes when the innermost extent is a multiple of it and every pointer is
// 16-byte aligned, else one element.
inline int vector_width(const Dense& d, std::initializer_list<const void*> pointers) {
  const int64_t width = 16 / static_cast<int64_t>(d.t.element_size());
  const int64_t inner = d.g.channels_last ? d.g.C : d.g.L;
  if (inner % width != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return static_cast<int>(width);
}

// A per-channel tensor (C values, or one broadcast to all with
// allow_broadcast) as a kernel argument.  Values on another device (a CPU
// scalar, say) are copied to the input's device, dtypes the kernels do not
// read are converted to float64; `holder` keeps such a copy alive.
inline ChannelArg channel_arg(const at::Tensor& t, int64_t C, const at::Tensor& input, const char* op,
                              const char* name, at::Tensor& holder, bool allow_broadcast = false) {
  TORCH_CHECK(t.numel() == C || (allow_broadcast && t.numel() == 1), op, ": ", name, " must have ", C,
              " elements (one per channel), got ", t.numel());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false), op, ": ", name,
              " must be a real tensor, got ", t.scalar_type());
  holder = t.detach();
  if (holder.device() != input.device()) holder = holder.to(input.device());
  const auto dt = holder.scalar_type();
  if (dt != at::kDouble && dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16 && dt != at::kLong &&
      dt != at::kInt) {
    holder = holder.to(at::kDouble);
  }
  holder = holder.reshape({-1});
  return ChannelArg{holder.data_ptr(), to_dtype(holder.scalar_type()), holder.numel() == 1 ? 0 : holder.stride(0)};
}

inline ChannelArg optional_channel_arg(const OptTensor& t, int64_t C, const at::Tensor& input, const char* op,
                                       const char* name, at::Tensor& holder) {
  if (!is_present(t)) return ChannelArg{nullptr, DType::Float32, 0};
  return channel_arg(*t, C, input, op, name, holder);
}

inline ChannelOut channel_out(at::Tensor& t) {
  return t.numel() > 0 ? ChannelOut{t.data_ptr(), to_dtype(t.scalar_type())} : ChannelOut{nullptr, DType::Float32};
}

}  // namespace cuda
}  // namespace torch_bn_manual
