// Per-channel coefficients of the elementwise passes, computed once per
// channel in double and read by the bulk kernels in the compute type.
//
// Forward:   y  = (x - m) * scale + shift
//            m     = mean rounded to the compute type
//            scale = invstd * w
//            shift = b - (mean - m) * scale
// Backward:  dx = a * dy - k * (x - m) - c
//            a = w * invstd
//            k = a * invstd^2 * sum_dy_xmu / count
//            c = a * sum_dy / count - k * (mean - m)
//            (eval, or count 0: k = c = 0; eval reads only dy)
//
// For float32 input the mean is a double; x - m is exact in float whenever x
// lies within a factor two of m (Sterbenz), so the only large quantity is
// subtracted without error and the part of the mean that float cannot hold,
// mean - m, enters through `shift` / `c` in double.  This is what keeps
// 1e6 + N(0, 1) within 1e-5 of float64 math while the bulk work stays float.
#pragma once

#include <cmath>

#include "scalar_types.cuh"

namespace torch_bn_manual {
namespace cuda {

template <typename T>
struct alignas(4 * sizeof(T)) ChannelParams {
  T v0, v1, v2, v3;
};

template <typename ct>
__device__ __forceinline__ ChannelParams<ct> forward_params(double mean, double invstd, double w, double b) {
  const ct m = static_cast<ct>(mean);
  const double scale = invstd * w;
  const double shift = b - (mean - static_cast<double>(m)) * scale;
  return ChannelParams<ct>{m, static_cast<ct>(scale), static_cast<ct>(shift), ct(0)};
}

template <typename ct>
__device__ __forceinline__ ct apply_forward(const ChannelParams<ct>& p, ct x) {
  return (x - p.v0) * p.v1 + p.v2;
}

template <typename ct>
__device__ __forceinline__ ChannelParams<ct> backward_params(double mean, double invstd, double w, double sum_dy,
                                                             double sum_dy_xmu, double count, bool train) {
  const double a = w * invstd;
  const ct m = static_cast<ct>(mean);
  double k = 0.0, c = 0.0;
  if (train && count > 0) {
    k = a * invstd * invstd * sum_dy_xmu / count;
    c = a * sum_dy / count - k * (mean - static_cast<double>(m));
  }
  return ChannelParams<ct>{m, static_cast<ct>(a), static_cast<ct>(k), static_cast<ct>(c)};
}

template <typename ct>
__device__ __forceinline__ ct apply_backward(const ChannelParams<ct>& p, ct dy, ct x) {
  return p.v1 * dy - p.v2 * (x - p.v0) - p.v3;
}

template <typename ct>
__device__ __forceinline__ ct apply_backward_eval(const ChannelParams<ct>& p, ct dy) {
  return p.v1 * dy;
}

// The value every element of a channel is shifted by before the Welford pass:
// one sample of the channel (its first element), so that large offsets leave
// the float arithmetic.  A non-finite sample would poison every difference,
// so it is replaced by 0 (the statistics are then NaN/inf as they should be).
template <typename ct>
__device__ __forceinline__ ct channel_shift(ct first) {
  return isfinite(first) ? first : ct(0);
}

// 1 / sqrt(var + eps) in double; var + eps <= 0 gives inf, as the formula does.
__device__ __forceinline__ double inverse_std(double var, double eps) { return 1.0 / sqrt(var + eps); }

}  // namespace cuda
}  // namespace torch_bn_manual
