// Backward ops: batch_norm_backward (sums + grad_input, fused per channel
// where the layout allows), backward_reduce (the sums) and
// backward_elementwise (grad_input from given sums).
//
//   sum_dy     = Σ dy                 sum_dy_xmu = Σ dy·(x - mean)
//   grad_input = a·dy + k·(x - mean) + cst     (coefficients.h; eval: a·dy)
//   grad_weight = sum_dy_xmu · invstd,  grad_bias = sum_dy
// The sums are accumulated in double; opmath_t (float for float input) only
// holds partial sums of kPartial terms (loops.h).
//
// Passes over memory (training):
//   NCL  per channel (whole channels per thread): one reduction read of x and
//        dy, then the grad_input pass over the same channel, last runs first,
//        while it is mostly still in L2;
//   NLC  one reduction pass over x and dy, then the grad_input pass, each a
//        forward sweep (loops.h: for_row_ranges).
// Passes that move 16 MiB and more write with non-temporal stores (loops.h).
// Sums use the fixed blocks/tasks of loops.h, so they are independent of the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "activation_grad.h"
#include "cpu/activation.h"
#include "cpu/coefficients.h"
#include "cpu/kernels.h"
#include "cpu/loops.h"
#include "cpu/stats.h"
#include "cpu/tensors.h"

namespace torch_bn_manual {
namespace cpu {
namespace {

struct SumPair {
  double dy = 0.0, dyx = 0.0;
};

// Σ dy·(x - mean) = Σ dy·(x - mh) - (mean - mh)·Σ dy, mh = mean in opmath_t.
template <typename op_t>
inline SumPair with_mean_lo(SumPair s, double mean, op_t mh) {
  s.dyx -= (mean - static_cast<double>(mh)) * s.dy;
  return s;
}

// Σ dy and Σ dy·(x - mh) over one NCL block.
template <typename T, typename P>
SumPair ncl_block_sums(const T* x, const T* dy, const View& v, int64_t c, const NclRange& r, opmath_t<T> mh,
                       const P& p) {
  Sum4 sdy, sdyt;
  for (int64_t n = r.n0; n < r.n1; ++n) {
    const int64_t off = (n * v.C + c) * v.L + r.l0;
    add_dy_dyt(x + off, dy + off, r.l1 - r.l0, mh, sdy, sdyt, p.at(off));
  }
  return {sdy.total(), sdyt.total()};
}

// One NCL channel: block sums added in block order.
template <typename T, typename P>
SumPair ncl_channel_sums(const T* x, const T* dy, const View& v, int64_t c, double mean, const P& p) {
  const auto mh = static_cast<opmath_t<T>>(mean);
  const NclBlocks b = ncl_blocks(v);
  SumPair s;
  for (int64_t i = 0; i < b.count(); ++i) {
    const SumPair bs = ncl_block_sums(x, dy, v, c, ncl_block(v, b, i), mh, p);
    s.dy += bs.dy;
    s.dyx += bs.dyx;
  }
  return with_mean_lo(s, mean, mh);
}

// Every channel, in parallel.
template <typename T, typename P>
void channel_sums(const T* x, const T* dy, const View& v, const std::vector<double>& mean, std::vector<SumPair>& out,
                  const P& p) {
  using op_t = opmath_t<T>;
  const int64_t C = v.C;
  std::vector<op_t> mh(C);
  for (int64_t c = 0; c < C; ++c) {
    mh[c] = static_cast<op_t>(mean[c]);
  }
  if (!v.nlc && ncl_by_channel(v)) {
    at::parallel_for(0, C, grain_for(v.M()), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        out[c] = ncl_channel_sums(x, dy, v, c, mean[c], p);
      }
    });
  } else if (!v.nlc) {
    const NclBlocks b = ncl_blocks(v);
    const int64_t nb = b.count();
    std::vector<SumPair> blocks(C * nb);
    at::parallel_for(0, C * nb, grain_for(kNclBlock), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i / nb;
        blocks[i] = ncl_block_sums(x, dy, v, c, ncl_block(v, b, i % nb), mh[c], p);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      SumPair s;
      for (int64_t i = 0; i < nb; ++i) {
        s.dy += blocks[c * nb + i].dy;
        s.dyx += blocks[c * nb + i].dyx;
      }
      out[c] = with_mean_lo(s, mean[c], mh[c]);
    }
  } else {
    const NlcTasks t = nlc_tasks(v);
    const int64_t M = v.M();
    const auto t_dy = task_buffer(t, C), t_dyt = task_buffer(t, C);
    at::parallel_for(0, t.count(), grain_for(kNlcTask), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rt = task / t.tiles, c0 = (task % t.tiles) * t.tile;
        const int64_t width = std::min(t.tile, C - c0);
        const int64_t r0 = rt * t.task_rows, rows = std::min(M, r0 + t.task_rows) - r0;
        double* a = t_dy.get() + rt * C + c0;
        double* q = t_dyt.get() + rt * C + c0;
        std::fill(a, a + width, 0.0);
        std::fill(q, q + width, 0.0);
        rows_add_dy_dyt(x + r0 * C + c0, dy + r0 * C + c0, C, rows, width, mh.data() + c0, a, q, p.at(r0 * C + c0));
      }
    });
    // Task after task, channels inside: a forward walk through the task
    // sums (channel after channel would stride C doubles), each channel's
    // additions still in row order.
    at::parallel_for(0, C, grain_for(t.row_tasks * 4), [&](int64_t begin, int64_t end) {
      std::fill(out.begin() + begin, out.begin() + end, SumPair{});
      for (int64_t rt = 0; rt < t.row_tasks; ++rt) {
        const double* a = t_dy.get() + rt * C;
        const double* q = t_dyt.get() + rt * C;
        for (int64_t c = begin; c < end; ++c) {
          out[c].dy += a[c];
          out[c].dyx += q[c];
        }
      }
      for (int64_t c = begin; c < end; ++c) {
        out[c] = with_mean_lo(out[c], mean[c], mh[c]);
      }
    });
  }
}

// The prologue as the reductions use it: they read dt, they write nothing.
inline NoHook reader(const NoHook& p) { return p; }
template <typename T>
ActGrad<T> reader(const ActGrad<T>& p) { return p.without_sink(); }

// Where the prologue writes dt (the residual's gradient); nullptr: nowhere.
template <typename T>
T* dt_sink(const NoHook&) { return nullptr; }
template <typename T>
T* dt_sink(const ActGrad<T>& p) { return p.dz; }

template <typename op_t>
struct GradCoefs {
  std::vector<op_t> a, k, cst, mh;
  explicit GradCoefs(int64_t C) : a(C), k(C), cst(C), mh(C) {}
  void set(int64_t c, const GradCoef<op_t>& g) {
    a[c] = g.a;
    k[c] = g.k;
    cst[c] = g.cst;
    mh[c] = g.mh;
  }
};

// grad_input for every value; eval mode (train=false) reads only dy
// (loops.h: the order of the pass); the output of a large pass is streamed.
template <typename T, typename P>
void grad_input_pass(const T* dy, const T* x, T* dx, const View& v, const GradCoefs<opmath_t<T>>& g, bool train,
                     const P& p) {
  const int64_t C = v.C, L = v.L;
  with_streaming(pass_bytes(v, (train ? 3 : 2) + p.tensors(), sizeof(T)), [&](auto stream) {
    constexpr bool S = decltype(stream)::value;
    if (v.nlc) {
      for_row_ranges(v, [&](int64_t r0, int64_t r1) {
        const int64_t off = r0 * C;
        if (train) {
          grad_rows<S>(dy + off, x + off, dx + off, C, r1 - r0, C, g.a.data(), g.k.data(), g.cst.data(),
                       g.mh.data(), p.at(off));
        } else {
          scale_rows<S>(dy + off, dx + off, C, r1 - r0, C, g.a.data(), p.at(off));
        }
      });
    } else {
      for_runs(v, [&](int64_t i) {
        const int64_t c = i % C, off = i * L;
        if (train) {
          grad_run<S>(dy + off, x + off, dx + off, L, g.a[c], g.k[c], g.cst[c], g.mh[c], p.at(off));
        } else {
          scale_run<S>(dy + off, dx + off, L, g.a[c], p.at(off));
        }
      });
    }
  });
}

struct BackwardArgs {
  std::vector<double> mean, invstd, w;
  at::ScalarType sdt;
};

// The training backward of an NCL input with whole channels per thread:
// sums, then grad_input of the channel while its values are still in cache.
// p: the prologue. Its sums read dy through it; where it has a sink (the
// residual's gradient is asked), they also write dt there and the grad pass
// reads dt back as plain batch norm, else the grad pass reads dy through it.
template <typename T, typename P>
void fused_ncl_backward(const T* dy, const T* x, T* dx, const View& v, const BackwardArgs& a,
                        std::vector<SumPair>& sums, const P& p) {
  using op_t = opmath_t<T>;
  const int64_t C = v.C, L = v.L;
  const double count = static_cast<double>(v.M());
  const T* dt = dt_sink<T>(p);
  with_streaming(pass_bytes(v, 3 + p.tensors(), sizeof(T)), [&](auto stream) {
    constexpr bool S = decltype(stream)::value;
    at::parallel_for(0, C, grain_for(v.M()), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        SumPair s = dt != nullptr ? ncl_channel_sums(x, dy, v, c, a.mean[c], p)
                                  : ncl_channel_sums(x, dy, v, c, a.mean[c], reader(p));
        s.dy = round_to(s.dy, a.sdt);
        s.dyx = round_to(s.dyx, a.sdt);
        sums[c] = s;
        const GradCoef<op_t> g = grad_coef<op_t>(a.mean[c], a.invstd[c], a.w[c], s.dy, s.dyx, count, true);
        // Last runs first: they are the ones still in cache.
        for (int64_t n = v.N; n-- > 0;) {
          const int64_t off = (n * C + c) * L;
          if (dt != nullptr) {
            grad_run<S>(dt + off, x + off, dx + off, L, g.a, g.k, g.cst, g.mh);
          } else {
            grad_run<S>(dy + off, x + off, dx + off, L, g.a, g.k, g.cst, g.mh, p.at(off));
          }
        }
      }
      stream_fence();
    });
  });
}

template <typename T, typename P = NoHook>
void sums_rounded(const T* x, const T* dy, const View& v, const std::vector<double>& mean, at::ScalarType sdt,
                  std::vector<SumPair>& sums, const P& p = {}) {
  channel_sums(x, dy, v, mean, sums, p);
  for (auto& s : sums) {
    s.dy = round_to(s.dy, sdt);
    s.dyx = round_to(s.dyx, sdt);
  }
}

}  // namespace

namespace {

// What the fused backward adds before the batch norm backward: dt = dy·act'(o)
// from the forward's output o (dense like the input), and dz = dt when asked.
// dz is written by the first pass that reads dy: the sums, which then leave
// the grad pass a plain batch norm backward of dz (reading dz and x, not dy,
// o and x: one tensor less), or else the grad pass. Off: plain batch norm.
struct ActBackward {
  at::Tensor output;
  double slope = 0.0;
  at::Tensor grad_residual;  // undefined: not asked for
  bool on = false;
  mutable bool dz_written = false;  // set by backward_with
};

// Calls k(prologue): NoHook for plain batch norm, ActGrad otherwise.
template <typename T, typename K>
void with_prologue(const ActBackward& f, const K& k) {
  if (!f.on) {
    k(NoHook{});
    return;
  }
  ActGrad<T> p;
  p.out = f.output.const_data_ptr<T>();
  p.slope = static_cast<opmath_t<T>>(f.slope);
  p.dz = f.grad_residual.defined() ? f.grad_residual.mutable_data_ptr<T>() : nullptr;
  k(p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_with(const char* op, const Dense& d, const at::Tensor& dy,
                                                             const OptTensor& weight, const at::Tensor& save_mean,
                                                             const at::Tensor& save_invstd, bool train,
                                                             std::array<bool, 3> output_mask,
                                                             const ActBackward& act) {
  const at::Tensor& input = d.t;
  const View& v = d.v;
  const int64_t C = v.C;
  const bool has_w = weight.has_value() && weight->defined();
  BackwardArgs a;
  a.sdt = stats_dtype(input.scalar_type());
  a.mean = channel_values(save_mean, C, op, "save_mean");
  a.invstd = channel_values(save_invstd, C, op, "save_invstd");
  a.w = channel_values(weight, C, 1.0, op, "weight");
  const bool need_gi = output_mask[0];
  const bool need_gw = has_w && output_mask[1];
  const bool need_gb = has_w && output_mask[2];
  const bool need_sums = need_gw || need_gb || (train && need_gi);

  at::Tensor grad_input = need_gi ? empty_like_dense(d, input.scalar_type()) : at::empty({0}, input.options());
  std::vector<SumPair> sums(C);
  if (v.M() > 0 && (need_gi || need_sums)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward", [&] {
      using op_t = opmath_t<scalar_t>;
      const scalar_t* xp = d.t.const_data_ptr<scalar_t>();
      const scalar_t* gp = dy.const_data_ptr<scalar_t>();
      scalar_t* dxp = need_gi ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
      with_prologue<scalar_t>(act, [&](const auto& p) {
        const scalar_t* dt = dt_sink<scalar_t>(p);
        act.dz_written = dt != nullptr;
        if (train && need_gi && !v.nlc && ncl_by_channel(v)) {
          fused_ncl_backward(gp, xp, dxp, v, a, sums, p);
          return;
        }
        if (need_sums) {
          if (dt != nullptr) {
            sums_rounded(xp, gp, v, a.mean, a.sdt, sums, p);
          } else {
            sums_rounded(xp, gp, v, a.mean, a.sdt, sums, reader(p));
          }
        }
        if (need_gi) {
          GradCoefs<op_t> g(C);
          const double count = static_cast<double>(v.M());
          for (int64_t c = 0; c < C; ++c) {
            g.set(c, grad_coef<op_t>(a.mean[c], a.invstd[c], a.w[c], sums[c].dy, sums[c].dyx, count, train));
          }
          if (need_sums && dt != nullptr) {
            grad_input_pass(dt, xp, dxp, v, g, train, NoHook{});
          } else {
            grad_input_pass(gp, xp, dxp, v, g, train, p);
          }
        }
      });
    });
  }
  const auto wopt = has_w ? weight->options() : input.options();
  const auto wdt = has_w ? weight->scalar_type() : input.scalar_type();
  at::Tensor grad_weight = at::empty({0}, wopt.dtype(wdt));
  at::Tensor grad_bias = at::empty({0}, wopt.dtype(wdt));
  if (need_gw) {
    std::vector<double> gw(C);
    for (int64_t c = 0; c < C; ++c) {
      gw[c] = sums[c].dyx * a.invstd[c];
    }
    grad_weight = channel_tensor(gw, wopt, wdt);
  }
  if (need_gb) {
    std::vector<double> gb(C);
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = sums[c].dy;
    }
    grad_bias = channel_tensor(gb, wopt, wdt);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const OptTensor& weight, const at::Tensor& save_mean,
                                                        const at::Tensor& save_invstd, bool train, double eps,
                                                        std::array<bool, 3> output_mask) {
  (void)eps;  // only the double backward (ops.py) rebuilds statistics with it
  const char* op = "batch_norm_backward";
  check_input(input, op);
  check_same_shape(grad_output, input, op, "grad_output");
  const Dense d = dense_input_for_grad(input, grad_output);
  return backward_with(op, d, dense_like(grad_output, d), weight, save_mean, save_invstd, train, output_mask,
                       ActBackward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input, const OptTensor& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool train, std::optional<double> negative_slope,
    double eps, std::array<bool, 4> output_mask) {
  (void)eps;
  const char* op = "batch_norm_act_backward";
  check_input(input, op);
  check_same_shape(grad_output, input, op, "grad_output");
  const Dense d = dense_input_for_grad(input, grad_output);
  const at::Tensor dy = dense_like(grad_output, d);
  const std::array<bool, 3> bn_mask{output_mask[0], output_mask[1], output_mask[2]};
  if (!negative_slope.has_value()) {  // identity: dt = dy
    auto [gi, gw, gb] = backward_with(op, d, dy, weight, save_mean, save_invstd, train, bn_mask, ActBackward{});
    return {gi, gw, gb, output_mask[3] ? dy.clone() : at::empty({0}, input.options())};
  }
  check_same_shape(output, input, op, "output");
  ActBackward act;
  act.on = true;
  act.output = dense_like(output, d);
  act.slope = *negative_slope;
  if (output_mask[3]) {
    act.grad_residual = empty_like_dense(d, input.scalar_type());
  }
  auto [gi, gw, gb] = backward_with(op, d, dy, weight, save_mean, save_invstd, train, bn_mask, act);
  if (output_mask[3] && !act.dz_written) {
    // No pass ran to write dz: dt on its own.
    act.grad_residual.copy_(activation_grad(dy, act.output, negative_slope));
  }
  return {gi, gw, gb, output_mask[3] ? act.grad_residual : at::empty({0}, input.options())};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& mean, const at::Tensor& invstd) {
  const char* op = "batch_norm_backward_reduce";
  check_input(input, op);
  check_same_shape(grad_output, input, op, "grad_output");
  const Dense d = dense_input(input);
  const at::Tensor dy = dense_like(grad_output, d);
  const int64_t C = d.v.C;
  const auto sdt = stats_dtype(input.scalar_type());
  const std::vector<double> m = channel_values(mean, C, op, "mean");
  channel_values(invstd, C, op, "invstd");  // checked, not needed for the sums
  std::vector<SumPair> sums(C);
  if (d.v.M() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_reduce", [&] {
      sums_rounded(d.t.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), d.v, m, sdt, sums);
    });
  }
  std::vector<double> sdy(C), sdyx(C);
  for (int64_t c = 0; c < C; ++c) {
    sdy[c] = sums[c].dy;
    sdyx[c] = sums[c].dyx;
  }
  return {channel_tensor(sdy, input.options(), sdt), channel_tensor(sdyx, input.options(), sdt)};
}

at::Tensor backward_elementwise(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                const at::Tensor& invstd, const OptTensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, const at::Tensor& count) {
  const char* op = "batch_norm_backward_elementwise";
  check_input(input, op);
  check_same_shape(grad_output, input, op, "grad_output");
  const Dense d = dense_input_for_grad(input, grad_output);
  const at::Tensor dy = dense_like(grad_output, d);
  const int64_t C = d.v.C;
  const std::vector<double> m = channel_values(mean, C, op, "mean");
  const std::vector<double> is = channel_values(invstd, C, op, "invstd");
  const std::vector<double> w = channel_values(weight, C, 1.0, op, "weight");
  const std::vector<double> sdy = channel_values(sum_dy, C, op, "sum_dy");
  const std::vector<double> sdyx = channel_values(sum_dy_xmu, C, op, "sum_dy_xmu");
  const std::vector<double> n = channel_values(count, C, op, "count", /*allow_broadcast=*/true);
  at::Tensor grad_input = empty_like_dense(d, input.scalar_type());
  if (d.v.M() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_elementwise", [&] {
      using op_t = opmath_t<scalar_t>;
      GradCoefs<op_t> g(C);
      for (int64_t c = 0; c < C; ++c) {
        g.set(c, grad_coef<op_t>(m[c], is[c], w[c], sdy[c], sdyx[c], n[c], true));
      }
      grad_input_pass(dy.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(),
                      grad_input.mutable_data_ptr<scalar_t>(), d.v, g, true, NoHook{});
    });
  }
  return grad_input;
}

}  // namespace cpu
}  // namespace torch_bn_manual
