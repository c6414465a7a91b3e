// Batch statistics: the reduction of train_forward and collect_stats, and
// the batch_norm_merge_stats op.
#include "cpu/stats.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "cpu/kernels.h"
#include "cpu/tensors.h"

namespace torch_bn_manual {
namespace cpu {
namespace {

// The summary of n values from their shifted sums s1 = Σ(x - shift) and
// s2 = Σ(x - shift)², shift being one of the values (see add_shifted).
inline State shifted_state(double shift, double s1, double s2, double n) {
  const double d = s1 / n;
  return State{shift + d, std::max(0.0, s2 - s1 * d), n};
}

// One NCL block in one pass, shifted by its first value.
template <typename T>
State ncl_block_state(const T* x, const View& v, int64_t c, const NclRange& r) {
  const int64_t len = r.l1 - r.l0;
  const double count = static_cast<double>(r.count());
  if (count == 0) {
    return State{0.0, 0.0, 0.0};
  }
  const double shift = static_cast<double>(x[(r.n0 * v.C + c) * v.L + r.l0]);
  Sum4 s1, s2;
  for (int64_t n = r.n0; n < r.n1; ++n) {
    add_shifted(x + (n * v.C + c) * v.L + r.l0, len, shift, s1, s2);
  }
  return shifted_state(shift, s1.total(), s2.total(), count);
}

// NCL with few channels: all (channel, block) pairs in parallel, then the fold.
template <typename T>
void ncl_states_by_block(const T* x, const View& v, State* out) {
  const NclBlocks b = ncl_blocks(v);
  const int64_t nb = b.count();
  std::vector<State> blocks(v.C * nb);
  at::parallel_for(0, v.C * nb, grain_for(kNclBlock), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      blocks[i] = ncl_block_state(x, v, i / nb, ncl_block(v, b, i % nb));
    }
  });
  for (int64_t c = 0; c < v.C; ++c) {
    State s{0.0, 0.0, 0.0};
    for (int64_t i = 0; i < nb; ++i) {
      s = welford_merge(s, blocks[c * nb + i]);
    }
    out[c] = s;
  }
}

// NLC: each task summarises its rows of a channel tile in one pass of
// shifted sums (shifted by the task's first row); the tasks of a tile are
// then folded in row order.
template <typename T>
void nlc_states(const T* x, const View& v, State* out) {
  const NlcTasks t = nlc_tasks(v);
  const int64_t C = v.C, M = v.M();
  // task states, [row task][channel]
  const auto t_mean = task_buffer(t, C), t_m2 = task_buffer(t, C);
  at::parallel_for(0, t.count(), grain_for(kNlcTask), [&](int64_t begin, int64_t end) {
    std::vector<double> s1(t.tile), s2(t.tile), shift(t.tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rt = task / t.tiles, c0 = (task % t.tiles) * t.tile;
      const int64_t width = std::min(t.tile, C - c0);
      const int64_t r0 = rt * t.task_rows, rows = std::min(M, r0 + t.task_rows) - r0;
      const T* base = x + r0 * C + c0;
      for (int64_t c = 0; c < width; ++c) {
        shift[c] = static_cast<double>(base[c]);
      }
      std::fill(s1.begin(), s1.begin() + width, 0.0);
      std::fill(s2.begin(), s2.begin() + width, 0.0);
      rows_add_shifted(base, C, rows, width, shift.data(), s1.data(), s2.data());
      for (int64_t c = 0; c < width; ++c) {
        const State st = shifted_state(shift[c], s1[c], s2[c], static_cast<double>(rows));
        t_mean[rt * C + c0 + c] = st.mean;
        t_m2[rt * C + c0 + c] = st.m2;
      }
    }
  });
  // Task after task, channels inside: each channel's merges stay in row
  // order (the same bits), but consecutive merges are of different channels,
  // so their division and fma latencies overlap instead of forming one
  // chain per channel.
  at::parallel_for(0, C, grain_for(t.row_tasks * 8), [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, State{0.0, 0.0, 0.0});
    for (int64_t rt = 0; rt < t.row_tasks; ++rt) {
      const double count = static_cast<double>(std::min(M, (rt + 1) * t.task_rows) - rt * t.task_rows);
      const double* mean = t_mean.get() + rt * C;
      const double* m2 = t_m2.get() + rt * C;
      for (int64_t c = begin; c < end; ++c) {
        out[c] = welford_merge(out[c], State{mean[c], m2[c], count});
      }
    }
  });
}

}  // namespace

template <typename T>
State ncl_channel_state(const T* x, const View& v, int64_t c) {
  const NclBlocks b = ncl_blocks(v);
  State s{0.0, 0.0, 0.0};
  for (int64_t i = 0; i < b.count(); ++i) {
    s = welford_merge(s, ncl_block_state(x, v, c, ncl_block(v, b, i)));
  }
  return s;
}

template <typename T>
void channel_states(const T* x, const View& v, State* out) {
  if (v.M() == 0) {
    std::fill(out, out + v.C, State{0.0, 0.0, 0.0});
  } else if (v.nlc) {
    nlc_states(x, v, out);
  } else if (ncl_by_channel(v)) {
    at::parallel_for(0, v.C, grain_for(v.M()), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        out[c] = ncl_channel_state(x, v, c);
      }
    });
  } else {
    ncl_states_by_block(x, v, out);
  }
}

#define TORCH_BN_MANUAL_INSTANTIATE(T)                                 \
  template State ncl_channel_state<T>(const T*, const View&, int64_t); \
  template void channel_states<T>(const T*, const View&, State*);
TORCH_BN_MANUAL_INSTANTIATE(double)
TORCH_BN_MANUAL_INSTANTIATE(float)
TORCH_BN_MANUAL_INSTANTIATE(c10::BFloat16)
TORCH_BN_MANUAL_INSTANTIATE(c10::Half)
#undef TORCH_BN_MANUAL_INSTANTIATE

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> collect_stats(const at::Tensor& input) {
  check_input(input, "batch_norm_collect_stats");
  const Dense d = dense_input(input);
  const int64_t C = d.v.C;
  std::vector<State> states(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_collect_stats", [&] {
    channel_states(d.t.const_data_ptr<scalar_t>(), d.v, states.data());
  });
  std::vector<double> mean(C), m2(C), count(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = states[c].mean;
    m2[c] = states[c].m2;
    count[c] = states[c].count;
  }
  const auto sdt = stats_dtype(input.scalar_type());
  // count in float64 whatever the input: float32 (the statistics dtype of
  // half inputs) would round counts above 2^24.
  return {channel_tensor(mean, input.options(), sdt), channel_tensor(m2, input.options(), sdt),
          channel_tensor(count, input.options(), at::kDouble)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_stats(const at::Tensor& mean, const at::Tensor& m2,
                                                           const at::Tensor& count) {
  const char* op = "batch_norm_merge_stats";
  check_merge_stats_args(mean, m2, op);
  const int64_t G = mean.size(0), C = mean.size(1);
  const at::Tensor mean_d = mean.detach().to(at::kDouble).contiguous();
  const at::Tensor m2_d = m2.detach().to(at::kDouble).contiguous();
  const at::Tensor count_d = count.detach().to(at::kDouble).expand({G, C}).contiguous();
  const double* pm = mean_d.const_data_ptr<double>();
  const double* pq = m2_d.const_data_ptr<double>();
  const double* pn = count_d.const_data_ptr<double>();
  std::vector<double> out_mean(C), out_m2(C), out_count(C);
  for (int64_t c = 0; c < C; ++c) {
    State s{0.0, 0.0, 0.0};
    for (int64_t g = 0; g < G; ++g) {
      s = welford_merge(s, State{pm[g * C + c], pq[g * C + c], pn[g * C + c]});
    }
    out_mean[c] = s.mean;
    out_m2[c] = s.m2;
    out_count[c] = s.count;
  }
  const auto dtype = mean.scalar_type();
  return {channel_tensor(out_mean, mean.options(), dtype), channel_tensor(out_m2, mean.options(), dtype),
          channel_tensor(out_count, mean.options(), at::kDouble)};
}

}  // namespace cpu
}  // namespace torch_bn_manual
