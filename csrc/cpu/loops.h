// The two memory orders every CPU kernel handles, and the loops over them.
//
// An input (N, C, *spatial) is dense in its suggested memory format and seen
// as one of
//   NCL  (N, C, L)  contiguous:      element (n, c, l) at (n*C + c)*L + l
//   NLC  (N, L, C)  channels-last:   element (n, c, l) at (n*L + l)*C + c
// with L = prod(spatial) and M = N*L values per channel. (N, C) input is
// both; it and any input with L == 1 take the NLC path, and C == 1 input
// the NCL path (the two orders coincide there).
//
// Reductions are split into blocks fixed by the shape alone, never by the
// thread count, and blocks are folded in a fixed order. Threads only decide
// who computes a block, so results are bit-identical for any thread count.
//
//   NCL: a channel's values are N runs of L. A block is a group of whole runs
//        (about kNclBlock values) or, for long runs, a kNclBlock-long piece of
//        one run. Blocks of a channel are folded in memory order.
//   NLC: rows of C values. Channels are cut into tiles of at most kNlcTile;
//        rows into blocks of nlc.block_rows, and blocks into tasks of
//        nlc.task_rows. A task folds its blocks in order; the tasks are then
//        folded in row order, per channel.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "cpu/vec.h"

namespace torch_bn_manual {
namespace cpu {

struct View {
  int64_t N = 0, C = 0, L = 0;
  bool nlc = false;  // memory order (N, L, C)
  int64_t M() const { return N * L; }
};

// The memory format outputs of input's shape get: ATen's suggestion.
inline at::MemoryFormat output_format(const at::Tensor& input) {
  return input.suggest_memory_format();
}

// How a tensor dense in `format` is walked.
inline View make_view(const at::Tensor& t, at::MemoryFormat format) {
  View v;
  v.N = t.size(0);
  v.C = t.size(1);
  v.L = 1;
  for (int64_t d = 2; d < t.dim(); ++d) {
    v.L *= t.size(d);
  }
  v.nlc = format != at::MemoryFormat::Contiguous;
  if (v.L == 1) {
    v.nlc = true;
  } else if (v.C == 1) {
    v.nlc = false;
  }
  return v;
}

// ---------------------------------------------------------------------------
// Fixed partitions of the reductions
// ---------------------------------------------------------------------------

constexpr int64_t kNclBlock = 4096;     // values per NCL block (16 KiB of float)
constexpr int64_t kNlcTile = 512;       // channels per NLC tile
constexpr int64_t kNlcBlock = 8192;     // target values per NLC block
constexpr int64_t kNlcMinRows = 64;     // rows per NLC block at least (few merges)
constexpr int64_t kNlcTask = 65536;     // target values per NLC task
constexpr int64_t kParallelGrain = 32768;  // values below which a loop stays serial

struct NclBlocks {
  int64_t rows;      // runs per block
  int64_t seg;       // values per piece of a run
  int64_t segs;      // pieces per run
  int64_t groups;    // row groups per channel
  int64_t count() const { return groups * segs; }
};

inline NclBlocks ncl_blocks(const View& v) {
  NclBlocks b;
  if (v.L >= kNclBlock) {
    b.rows = 1;
    b.seg = kNclBlock;
    b.segs = (v.L + kNclBlock - 1) / kNclBlock;
  } else {
    b.rows = std::max<int64_t>(1, kNclBlock / std::max<int64_t>(v.L, 1));
    b.seg = v.L;
    b.segs = 1;
  }
  b.groups = (v.N + b.rows - 1) / b.rows;
  return b;
}

// Block `blk` of an NCL channel: runs [n0, n1), positions [l0, l1) of each run.
struct NclRange {
  int64_t n0, n1, l0, l1;
  int64_t count() const { return (n1 - n0) * (l1 - l0); }
};

inline NclRange ncl_block(const View& v, const NclBlocks& b, int64_t blk) {
  const int64_t g = blk / b.segs, s = blk % b.segs;
  NclRange r;
  r.n0 = g * b.rows;
  r.n1 = std::min(v.N, r.n0 + b.rows);
  r.l0 = s * b.seg;
  r.l1 = std::min(v.L, r.l0 + b.seg);
  return r;
}

struct NlcTasks {
  int64_t tile;        // channels per tile
  int64_t tiles;
  int64_t block_rows;
  int64_t task_rows;   // a multiple of block_rows
  int64_t row_tasks;
  int64_t count() const { return row_tasks * tiles; }
};

inline NlcTasks nlc_tasks(const View& v) {
  NlcTasks t;
  t.tile = std::max<int64_t>(1, std::min(v.C, kNlcTile));
  t.tiles = (v.C + t.tile - 1) / t.tile;
  t.block_rows = std::max(kNlcMinRows, kNlcBlock / t.tile);
  t.task_rows = t.block_rows * std::max<int64_t>(1, kNlcTask / (t.block_rows * t.tile));
  t.row_tasks = (v.M() + t.task_rows - 1) / t.task_rows;
  return t;
}

// Grain for at::parallel_for over items of `per_item` values each.
inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(per_item, 1));
}

// ---------------------------------------------------------------------------
// Reductions over one contiguous run (NCL), accumulated in double
// ---------------------------------------------------------------------------

template <typename T>
inline void add_values(const T* p, int64_t n, Sum4& s) {
  int64_t i = 0;
  dVec d[4];
  for (; i + 16 <= n; i += 16) {
    load16(p + i, d);
    s.v[0] += d[0];
    s.v[1] += d[1];
    s.v[2] += d[2];
    s.v[3] += d[3];
  }
  for (; i < n; ++i) {
    s.tail += static_cast<double>(p[i]);
  }
}

// Σ (x - mean)²
template <typename T>
inline void add_sq_dev(const T* p, int64_t n, double mean, Sum4& s) {
  const dVec m(mean);
  int64_t i = 0;
  dVec d[4];
  for (; i + 16 <= n; i += 16) {
    load16(p + i, d);
    for (int k = 0; k < 4; ++k) {
      const dVec t = d[k] - m;
      s.v[k] = at::vec::fmadd(t, t, s.v[k]);
    }
  }
  for (; i < n; ++i) {
    const double t = static_cast<double>(p[i]) - mean;
    s.tail = std::fma(t, t, s.tail);
  }
}

// Σ dy and Σ dy·(x - mean)
template <typename T>
inline void add_dy_dyxmu(const T* x, const T* dy, int64_t n, double mean, Sum4& sdy, Sum4& sdyx) {
  const dVec m(mean);
  int64_t i = 0;
  dVec d[4], g[4];
  for (; i + 16 <= n; i += 16) {
    load16(x + i, d);
    load16(dy + i, g);
    for (int k = 0; k < 4; ++k) {
      sdy.v[k] += g[k];
      sdyx.v[k] = at::vec::fmadd(g[k], d[k] - m, sdyx.v[k]);
    }
  }
  for (; i < n; ++i) {
    const double gi = static_cast<double>(dy[i]);
    sdy.tail += gi;
    sdyx.tail = std::fma(gi, static_cast<double>(x[i]) - mean, sdyx.tail);
  }
}

// ---------------------------------------------------------------------------
// Reductions over rows of channels (NLC): acc[c] += f(row[c]), rows in order.
// Four rows share one load/store of the accumulators; the additions per
// channel still happen row after row, so the result is that of a plain loop.
// ---------------------------------------------------------------------------

template <typename T>
inline void rows_add(const T* x, int64_t stride, int64_t rows, int64_t n, double* acc) {
  int64_t r = 0;
  dVec d[4];
  for (; r + 4 <= rows; r += 4) {
    const T* p0 = x + r * stride;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      dVec a[4];
      for (int k = 0; k < 4; ++k) a[k] = dVec::loadu(acc + c + 4 * k);
      for (int j = 0; j < 4; ++j) {
        load16(p0 + j * stride + c, d);
        for (int k = 0; k < 4; ++k) a[k] += d[k];
      }
      for (int k = 0; k < 4; ++k) a[k].store(acc + c + 4 * k);
    }
    for (; c < n; ++c) {
      for (int j = 0; j < 4; ++j) acc[c] += static_cast<double>(p0[j * stride + c]);
    }
  }
  for (; r < rows; ++r) {
    const T* p = x + r * stride;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      load16(p + c, d);
      for (int k = 0; k < 4; ++k) (dVec::loadu(acc + c + 4 * k) + d[k]).store(acc + c + 4 * k);
    }
    for (; c < n; ++c) acc[c] += static_cast<double>(p[c]);
  }
}

template <typename T>
inline void rows_add_sq_dev(const T* x, int64_t stride, int64_t rows, int64_t n, const double* mean,
                            double* acc) {
  int64_t r = 0;
  dVec d[4];
  for (; r + 4 <= rows; r += 4) {
    const T* p0 = x + r * stride;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      dVec a[4], m[4];
      for (int k = 0; k < 4; ++k) {
        a[k] = dVec::loadu(acc + c + 4 * k);
        m[k] = dVec::loadu(mean + c + 4 * k);
      }
      for (int j = 0; j < 4; ++j) {
        load16(p0 + j * stride + c, d);
        for (int k = 0; k < 4; ++k) {
          const dVec t = d[k] - m[k];
          a[k] = at::vec::fmadd(t, t, a[k]);
        }
      }
      for (int k = 0; k < 4; ++k) a[k].store(acc + c + 4 * k);
    }
    for (; c < n; ++c) {
      for (int j = 0; j < 4; ++j) {
        const double t = static_cast<double>(p0[j * stride + c]) - mean[c];
        acc[c] = std::fma(t, t, acc[c]);
      }
    }
  }
  for (; r < rows; ++r) {
    const T* p = x + r * stride;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      load16(p + c, d);
      for (int k = 0; k < 4; ++k) {
        const dVec t = d[k] - dVec::loadu(mean + c + 4 * k);
        at::vec::fmadd(t, t, dVec::loadu(acc + c + 4 * k)).store(acc + c + 4 * k);
      }
    }
    for (; c < n; ++c) {
      const double t = static_cast<double>(p[c]) - mean[c];
      acc[c] = std::fma(t, t, acc[c]);
    }
  }
}

template <typename T>
inline void rows_add_dy_dyxmu(const T* x, const T* dy, int64_t stride, int64_t rows, int64_t n,
                              const double* mean, double* sdy, double* sdyx) {
  int64_t r = 0;
  dVec d[4], g[4];
  for (; r + 4 <= rows; r += 4) {
    const T* x0 = x + r * stride;
    const T* g0 = dy + r * stride;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      dVec a[4], b[4], m[4];
      for (int k = 0; k < 4; ++k) {
        a[k] = dVec::loadu(sdy + c + 4 * k);
        b[k] = dVec::loadu(sdyx + c + 4 * k);
        m[k] = dVec::loadu(mean + c + 4 * k);
      }
      for (int j = 0; j < 4; ++j) {
        load16(x0 + j * stride + c, d);
        load16(g0 + j * stride + c, g);
        for (int k = 0; k < 4; ++k) {
          a[k] += g[k];
          b[k] = at::vec::fmadd(g[k], d[k] - m[k], b[k]);
        }
      }
      for (int k = 0; k < 4; ++k) {
        a[k].store(sdy + c + 4 * k);
        b[k].store(sdyx + c + 4 * k);
      }
    }
    for (; c < n; ++c) {
      for (int j = 0; j < 4; ++j) {
        const double gi = static_cast<double>(g0[j * stride + c]);
        sdy[c] += gi;
        sdyx[c] = std::fma(gi, static_cast<double>(x0[j * stride + c]) - mean[c], sdyx[c]);
      }
    }
  }
  for (; r < rows; ++r) {
    const T* xp = x + r * stride;
    const T* gp = dy + r * stride;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      load16(xp + c, d);
      load16(gp + c, g);
      for (int k = 0; k < 4; ++k) {
        (dVec::loadu(sdy + c + 4 * k) + g[k]).store(sdy + c + 4 * k);
        const dVec t = d[k] - dVec::loadu(mean + c + 4 * k);
        at::vec::fmadd(g[k], t, dVec::loadu(sdyx + c + 4 * k)).store(sdyx + c + 4 * k);
      }
    }
    for (; c < n; ++c) {
      const double gi = static_cast<double>(gp[c]);
      sdy[c] += gi;
      sdyx[c] = std::fma(gi, static_cast<double>(xp[c]) - mean[c], sdyx[c]);
    }
  }
}

// ---------------------------------------------------------------------------
// Elementwise passes, in opmath_t. The mean enters as mean_hi + mean_lo (the
// float64 mean split in two floats for float input): x - mean_hi is exact
// when x is within a factor 2 of the mean, so large offsets cancel exactly.
// ---------------------------------------------------------------------------

// y = ((x - mh) - ml) * scale + shift over a run with one channel's coefficients.
template <typename T, typename op_t = opmath_t<T>>
inline void normalize_run(const T* x, T* y, int64_t n, op_t mh, op_t ml, op_t scale, op_t shift) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const V vmh(mh), vml(ml), vs(scale), vb(shift);
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    const V a = (IO::load(x + i) - vmh) - vml;
    const V b = (IO::load(x + i + K) - vmh) - vml;
    IO::store(y + i, at::vec::fmadd(a, vs, vb));
    IO::store(y + i + K, at::vec::fmadd(b, vs, vb));
  }
  for (; i + K <= n; i += K) {
    IO::store(y + i, at::vec::fmadd((IO::load(x + i) - vmh) - vml, vs, vb));
  }
  for (; i < n; ++i) {
    y[i] = static_cast<T>(std::fma((static_cast<op_t>(x[i]) - mh) - ml, scale, shift));
  }
}

// dx = a·dy + k·((x - mh) - ml) + cst over a run.
template <typename T, typename op_t = opmath_t<T>>
inline void grad_run(const T* dy, const T* x, T* dx, int64_t n, op_t a, op_t k, op_t cst, op_t mh, op_t ml) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const V va(a), vk(k), vc(cst), vmh(mh), vml(ml);
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    const V u = at::vec::fmadd(va, IO::load(dy + i), vc);
    const V w = at::vec::fmadd(va, IO::load(dy + i + K), vc);
    IO::store(dx + i, at::vec::fmadd(vk, (IO::load(x + i) - vmh) - vml, u));
    IO::store(dx + i + K, at::vec::fmadd(vk, (IO::load(x + i + K) - vmh) - vml, w));
  }
  for (; i + K <= n; i += K) {
    const V u = at::vec::fmadd(va, IO::load(dy + i), vc);
    IO::store(dx + i, at::vec::fmadd(vk, (IO::load(x + i) - vmh) - vml, u));
  }
  for (; i < n; ++i) {
    const op_t u = std::fma(a, static_cast<op_t>(dy[i]), cst);
    dx[i] = static_cast<T>(std::fma(k, (static_cast<op_t>(x[i]) - mh) - ml, u));
  }
}

// dx = a·dy over a run (eval mode: the statistics are constants).
template <typename T, typename op_t = opmath_t<T>>
inline void scale_run(const T* dy, T* dx, int64_t n, op_t a) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const V va(a);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    IO::store(dx + i, IO::load(dy + i) * va);
  }
  for (; i < n; ++i) {
    dx[i] = static_cast<T>(static_cast<op_t>(dy[i]) * a);
  }
}

// The same three over one NLC row, with per-channel coefficient arrays.
template <typename T, typename op_t = opmath_t<T>>
inline void normalize_row(const T* x, T* y, int64_t n, const op_t* mh, const op_t* ml, const op_t* scale,
                          const op_t* shift) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  int64_t c = 0;
  for (; c + K <= n; c += K) {
    const V t = (IO::load(x + c) - V::loadu(mh + c)) - V::loadu(ml + c);
    IO::store(y + c, at::vec::fmadd(t, V::loadu(scale + c), V::loadu(shift + c)));
  }
  for (; c < n; ++c) {
    y[c] = static_cast<T>(std::fma((static_cast<op_t>(x[c]) - mh[c]) - ml[c], scale[c], shift[c]));
  }
}

template <typename T, typename op_t = opmath_t<T>>
inline void grad_row(const T* dy, const T* x, T* dx, int64_t n, const op_t* a, const op_t* k, const op_t* cst,
                     const op_t* mh, const op_t* ml) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  int64_t c = 0;
  for (; c + K <= n; c += K) {
    const V u = at::vec::fmadd(V::loadu(a + c), IO::load(dy + c), V::loadu(cst + c));
    const V t = (IO::load(x + c) - V::loadu(mh + c)) - V::loadu(ml + c);
    IO::store(dx + c, at::vec::fmadd(V::loadu(k + c), t, u));
  }
  for (; c < n; ++c) {
    const op_t u = std::fma(a[c], static_cast<op_t>(dy[c]), cst[c]);
    dx[c] = static_cast<T>(std::fma(k[c], (static_cast<op_t>(x[c]) - mh[c]) - ml[c], u));
  }
}

template <typename T, typename op_t = opmath_t<T>>
inline void scale_row(const T* dy, T* dx, int64_t n, const op_t* a) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  int64_t c = 0;
  for (; c + K <= n; c += K) {
    IO::store(dx + c, IO::load(dy + c) * V::loadu(a + c));
  }
  for (; c < n; ++c) {
    dx[c] = static_cast<T>(static_cast<op_t>(dy[c]) * a[c]);
  }
}

}  // namespace cpu
}  // namespace torch_bn_manual
