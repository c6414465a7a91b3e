// Per-channel coefficients of the two elementwise formulas, computed once per
// channel in double and rounded to the elementwise type (opmath_t):
//
//   forward   y  = ((x - mean_hi) - mean_lo) * scale + shift
//             scale = invstd * w,  shift = b
//   backward  dx = a * dy + k * ((x - mean_hi) - mean_lo) + cst
//             a = w * invstd,  k = -a * invstd² * Σdy·(x-mean) / M,  cst = -a * Σdy / M
//             (eval: k = cst = 0)
//
// mean_hi + mean_lo is the double mean written as two opmath_t values, so the
// float kernels subtract a float64-accurate mean (mean_lo is 0 for double).
#pragma once

#include <cmath>

namespace torch_bn_manual {
namespace cpu {

template <typename op_t>
struct SplitMean {
  op_t hi, lo;
};

template <typename op_t>
inline SplitMean<op_t> split_mean(double mean) {
  const op_t hi = static_cast<op_t>(mean);
  return {hi, static_cast<op_t>(mean - static_cast<double>(hi))};
}

// 1 / sqrt(var + eps) for a state with `count` values and sum of squared
// deviations m2 (no values: var is taken as 0).
inline double invstd_of(double m2, double count, double eps) {
  const double var = count > 0 ? m2 / count : 0.0;
  return 1.0 / std::sqrt(var + eps);
}

template <typename op_t>
struct NormCoef {
  op_t mh, ml, scale, shift;
};

template <typename op_t>
inline NormCoef<op_t> norm_coef(double mean, double invstd, double w, double b) {
  const SplitMean<op_t> m = split_mean<op_t>(mean);
  return {m.hi, m.lo, static_cast<op_t>(invstd * w), static_cast<op_t>(b)};
}

template <typename op_t>
struct GradCoef {
  op_t a, k, cst, mh, ml;
};

template <typename op_t>
inline GradCoef<op_t> grad_coef(double mean, double invstd, double w, double sum_dy, double sum_dy_xmu,
                                double count, bool train) {
  const double a = w * invstd;
  double k = 0.0, cst = 0.0;
  if (train && count > 0) {
    k = -a * invstd * invstd * sum_dy_xmu / count;
    cst = -a * sum_dy / count;
  }
  const SplitMean<op_t> m = split_mean<op_t>(mean);
  return {static_cast<op_t>(a), static_cast<op_t>(k), static_cast<op_t>(cst), m.hi, m.lo};
}

}  // namespace cpu
}  // namespace torch_bn_manual
