// Per-channel coefficients of the two elementwise formulas, computed once per
// channel in double and rounded to the elementwise type (opmath_t):
//
//   forward   y  = (x - mh) * scale + shift
//   backward  dx = k * (x - mh) + (a * dy + cst)
//
// with mh the float64 mean rounded to opmath_t and lo = mean - mh (0 for
// double input) folded into the constants:
//   scale = invstd * w                     shift = b - lo * scale
//   a = w * invstd                         k = -a * invstd² * Σdy·(x-mean) / M
//   cst = -a * Σdy / M - k * lo            (eval: k = 0, cst = 0)
//
// x - mh is exact for x within a factor 2 of mh (Sterbenz), so for float
// input an offset of 1e6 cancels exactly and the remaining rounding is that
// of values of the size of y or dx.
#pragma once

#include <cmath>

namespace torch_bn_manual {
namespace cpu {

// 1 / sqrt(var + eps) for a state with `count` values and sum of squared
// deviations m2 (no values: var is taken as 0).
inline double invstd_of(double m2, double count, double eps) {
  const double var = count > 0 ? m2 / count : 0.0;
  return 1.0 / std::sqrt(var + eps);
}

template <typename op_t>
struct NormCoef {
  op_t mh, scale, shift;
};

template <typename op_t>
inline NormCoef<op_t> norm_coef(double mean, double invstd, double w, double b) {
  const op_t mh = static_cast<op_t>(mean);
  const double lo = mean - static_cast<double>(mh);
  const op_t scale = static_cast<op_t>(invstd * w);
  return {mh, scale, static_cast<op_t>(b - lo * static_cast<double>(scale))};
}

template <typename op_t>
struct GradCoef {
  op_t a, k, cst, mh;
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
  const op_t mh = static_cast<op_t>(mean);
  const double lo = mean - static_cast<double>(mh);
  const op_t k_t = static_cast<op_t>(k);
  return {static_cast<op_t>(a), k_t, static_cast<op_t>(cst - lo * static_cast<double>(k_t)), mh};
}

}  // namespace cpu
}  // namespace torch_bn_manual
