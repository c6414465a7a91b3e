// Forward ops: train_forward (statistics + normalize, fused per channel where
// the layout allows), eval_forward and elementwise (normalize only).
//
// Passes over memory:
//   train_forward NCL  per channel (whole channels per thread): one read of x
//                      for the statistics (stats.h), then the normalize pass
//                      over the same channel, last runs first, mostly from L2;
//   train_forward NLC  one statistics pass over x, then one normalize pass
//                      reading x and writing y, each a forward sweep;
//   eval / elementwise one read of x, one write of y.
// Passes that move 16 MiB and more write with non-temporal stores (loops.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/activation.h"
#include "cpu/coefficients.h"
#include "cpu/kernels.h"
#include "cpu/loops.h"
#include "cpu/stats.h"
#include "cpu/tensors.h"

namespace torch_bn_manual {
namespace cpu {
namespace {

template <typename op_t>
struct NormCoefs {
  std::vector<op_t> mh, scale, shift;
  explicit NormCoefs(int64_t C) : mh(C), scale(C), shift(C) {}
  void set(int64_t c, const NormCoef<op_t>& k) {
    mh[c] = k.mh;
    scale[c] = k.scale;
    shift[c] = k.shift;
  }
};

// y for every value, given per-channel coefficients (loops.h: the order of
// the pass), with the epilogue e applied before each store; the output of a
// large pass is streamed.
template <typename T, typename E>
void normalize(const T* x, T* y, const View& v, const NormCoefs<opmath_t<T>>& k, const E& e) {
  const int64_t C = v.C, L = v.L;
  with_streaming(pass_bytes(v, 2 + e.tensors(), sizeof(T)), [&](auto stream) {
    constexpr bool S = decltype(stream)::value;
    if (v.nlc) {
      for_row_ranges(v, [&](int64_t r0, int64_t r1) {
        normalize_rows<S>(x + r0 * C, y + r0 * C, C, r1 - r0, C, k.mh.data(), k.scale.data(), k.shift.data(),
                          e.at(r0 * C));
      });
    } else {
      for_runs(v, [&](int64_t i) {
        const int64_t c = i % C;
        normalize_run<S>(x + i * L, y + i * L, L, k.mh[c], k.scale[c], k.shift[c], e.at(i * L));
      });
    }
  });
}

template <typename T, typename E>
void train_forward_kernel(const Dense& d, const std::vector<double>& w, const std::vector<double>& b, double eps,
                          at::ScalarType sdt, T* y, std::vector<double>& mean_out,
                          std::vector<double>& invstd_out, const E& e) {
  using op_t = opmath_t<T>;
  const T* x = d.t.const_data_ptr<T>();
  const View& v = d.v;
  // Statistics as stored (rounded to the statistics dtype), then coefficients
  // from the stored values: the same numbers elementwise() would get.
  auto finish = [&](int64_t c, const State& s) {
    const double mean = round_to(s.mean, sdt);
    const double invstd = round_to(invstd_of(s.m2, s.count, eps), sdt);
    mean_out[c] = mean;
    invstd_out[c] = invstd;
    return norm_coef<op_t>(mean, invstd, w[c], b[c]);
  };
  if (!v.nlc && ncl_by_channel(v)) {
    const int64_t C = v.C, L = v.L;
    with_streaming(pass_bytes(v, 2 + e.tensors(), sizeof(T)), [&](auto stream) {
      constexpr bool S = decltype(stream)::value;
      at::parallel_for(0, C, grain_for(v.M()), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const NormCoef<op_t> k = finish(c, ncl_channel_state(x, v, c));
          // Last runs first: they are the ones still in cache.
          for (int64_t n = v.N; n-- > 0;) {
            const int64_t off = (n * C + c) * L;
            normalize_run<S>(x + off, y + off, L, k.mh, k.scale, k.shift, e.at(off));
          }
        }
        stream_fence();
      });
    });
    return;
  }
  std::vector<State> states(v.C);
  channel_states(x, v, states.data());
  NormCoefs<op_t> k(v.C);
  for (int64_t c = 0; c < v.C; ++c) {
    k.set(c, finish(c, states[c]));
  }
  normalize(x, y, v, k, e);
}

// What the fused ops add after the normalize: a residual (dense like the
// input) and an activation slope (none: identity). Empty: plain batch norm.
struct Fusion {
  at::Tensor residual;
  std::optional<double> slope;
  bool on = false;
};

Fusion fusion_of(const Dense& d, const OptTensor& residual, std::optional<double> slope, const char* op) {
  Fusion f;
  f.on = true;
  f.slope = slope;
  if (residual.has_value() && residual->defined()) {
    check_same_shape(*residual, d.t, op, "residual");
    f.residual = dense_like(*residual, d);
  }
  return f;
}

// Calls k(epilogue): NoHook for plain batch norm, AddAct otherwise.
template <typename T, typename K>
void with_epilogue(const Fusion& f, const K& k) {
  if (!f.on) {
    k(NoHook{});
    return;
  }
  AddAct<T> e;
  e.z = f.residual.defined() ? f.residual.const_data_ptr<T>() : nullptr;
  e.act = f.slope.has_value();
  e.slope = static_cast<opmath_t<T>>(f.slope.value_or(0.0));
  k(e);
}

// normalize() with coefficients from given per-channel mean and invstd.
at::Tensor normalize_with(const char* op, const Dense& d, const std::vector<double>& mean,
                          const std::vector<double>& invstd, const OptTensor& weight, const OptTensor& bias,
                          const Fusion& fusion = {}) {
  const int64_t C = d.v.C;
  const std::vector<double> w = channel_values(weight, C, 1.0, op, "weight");
  const std::vector<double> b = channel_values(bias, C, 0.0, op, "bias");
  at::Tensor y = empty_like_dense(d, d.t.scalar_type());
  if (d.v.M() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, d.t.scalar_type(), "batch_norm_normalize", [&] {
    using op_t = opmath_t<scalar_t>;
    NormCoefs<op_t> k(C);
    for (int64_t c = 0; c < C; ++c) {
      k.set(c, norm_coef<op_t>(mean[c], invstd[c], w[c], b[c]));
    }
    with_epilogue<scalar_t>(fusion, [&](const auto& e) {
      normalize(d.t.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), d.v, k, e);
    });
  });
  return y;
}

}  // namespace

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> train_forward_with(const char* op, const Dense& d,
                                                                  const OptTensor& weight, const OptTensor& bias,
                                                                  double eps, const Fusion& fusion) {
  const at::Tensor& input = d.t;
  const int64_t C = d.v.C;
  const auto sdt = stats_dtype(input.scalar_type());
  const std::vector<double> w = channel_values(weight, C, 1.0, op, "weight");
  const std::vector<double> b = channel_values(bias, C, 0.0, op, "bias");
  at::Tensor y = empty_like_dense(d, input.scalar_type());
  std::vector<double> mean(C, 0.0), invstd(C, round_to(invstd_of(0.0, 0.0, eps), sdt));
  if (d.v.M() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_train_forward", [&] {
      with_epilogue<scalar_t>(fusion, [&](const auto& e) {
        train_forward_kernel<scalar_t>(d, w, b, eps, sdt, y.mutable_data_ptr<scalar_t>(), mean, invstd, e);
      });
    });
  }
  return {y, channel_tensor(mean, input.options(), sdt), channel_tensor(invstd, input.options(), sdt)};
}

// The running statistics as eval normalizes with them: rounded to the statistics dtype.
void eval_stats(const Dense& d, const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                const char* op, std::vector<double>& mean, std::vector<double>& invstd) {
  const int64_t C = d.v.C;
  const auto sdt = stats_dtype(d.t.scalar_type());
  mean = channel_values(running_mean, C, op, "running_mean");
  invstd = channel_values(running_var, C, op, "running_var");
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = round_to(mean[c], sdt);
    invstd[c] = round_to(1.0 / std::sqrt(round_to(invstd[c], sdt) + eps), sdt);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> train_forward(const at::Tensor& input, const OptTensor& weight,
                                                             const OptTensor& bias, double eps) {
  const char* op = "batch_norm_train_forward";
  check_input(input, op);
  return train_forward_with(op, dense_input(input, all_contiguous({&weight, &bias})), weight, bias, eps, Fusion{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_train_forward(const at::Tensor& input, const OptTensor& weight,
                                                                 const OptTensor& bias, const OptTensor& residual,
                                                                 std::optional<double> negative_slope, double eps) {
  const char* op = "batch_norm_act_train_forward";
  check_input(input, op);
  const Dense d = dense_input(input, all_contiguous({&weight, &bias}));
  return train_forward_with(op, d, weight, bias, eps, fusion_of(d, residual, negative_slope, op));
}

at::Tensor act_eval_forward(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& residual, const at::Tensor& running_mean,
                            const at::Tensor& running_var, std::optional<double> negative_slope, double eps) {
  const char* op = "batch_norm_act_eval_forward";
  check_input(input, op);
  const Dense d = dense_input(input, all_contiguous({&weight, &bias}) && running_mean.is_contiguous() &&
                                         running_var.is_contiguous());
  std::vector<double> mean, invstd;
  eval_stats(d, running_mean, running_var, eps, op, mean, invstd);
  return normalize_with(op, d, mean, invstd, weight, bias, fusion_of(d, residual, negative_slope, op));
}

at::Tensor eval_forward(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  const char* op = "batch_norm_eval_forward";
  check_input(input, op);
  const Dense d = dense_input(input, all_contiguous({&weight, &bias}) && running_mean.is_contiguous() &&
                                         running_var.is_contiguous());
  std::vector<double> mean, invstd;
  eval_stats(d, running_mean, running_var, eps, op, mean, invstd);
  return normalize_with(op, d, mean, invstd, weight, bias);
}

at::Tensor elementwise(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const at::Tensor& mean, const at::Tensor& invstd) {
  const char* op = "batch_norm_elementwise";
  check_input(input, op);
  const Dense d = dense_input(input, all_contiguous({&weight, &bias}));
  const int64_t C = d.v.C;
  return normalize_with(op, d, channel_values(mean, C, op, "mean"), channel_values(invstd, C, op, "invstd"),
                        weight, bias);
}

}  // namespace cpu
}  // namespace torch_bn_manual
