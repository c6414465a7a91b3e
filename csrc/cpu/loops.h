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
//   NLC: rows of C values. Channels are cut into tiles of at most kNlcTile,
//        rows into tasks of nlc.task_rows; a task covers one tile of one row
//        range. Per channel, the tasks are folded in row order.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include <c10/macros/Macros.h>

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
constexpr int64_t kNlcTask = 65536;     // target values per NLC task
constexpr int64_t kNlcMinRows = 64;     // rows per NLC task at least
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
  int64_t task_rows;
  int64_t row_tasks;
  int64_t count() const { return row_tasks * tiles; }
};

inline NlcTasks nlc_tasks(const View& v) {
  NlcTasks t;
  t.tile = std::max<int64_t>(1, std::min(v.C, kNlcTile));
  t.tiles = (v.C + t.tile - 1) / t.tile;
  t.task_rows = std::max(kNlcMinRows, kNlcTask / t.tile);
  t.row_tasks = (v.M() + t.task_rows - 1) / t.task_rows;
  return t;
}

// Per-task results (row_tasks x C doubles) that the tasks fill completely
// before the fold reads them: no zero fill, which std::vector would do.
inline std::unique_ptr<double[]> task_buffer(const NlcTasks& t, int64_t C) {
  return std::unique_ptr<double[]>(new double[t.row_tasks * C]);
}

// Grain for at::parallel_for over items of `per_item` values each.
inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(per_item, 1));
}

// ---------------------------------------------------------------------------
// Hooks of the elementwise work (the fused layers: activation.h). Every pass
// below takes one, defaulting to these, which change nothing and compile to
// the plain pass: plain batch norm keeps its code and its bits.
//   Prologue: applied to each dy value as it is loaded (dt = dy·act'(y)).
//   Epilogue: applied to each output value before it is stored (+ z, act).
// vec(v, i) / one(v, i) get the value at offset i from the pointers the pass
// was given; at(off) shifts the hook by off values, as the pass shifts its
// own pointers. Hooks are passed by value: NoHook, an empty class, then takes
// no register, and the plain kernels compile to the same machine code.
// ---------------------------------------------------------------------------

struct NoHook {
  template <typename V>
  V vec(const V& v, int64_t) const { return v; }
  template <typename S>
  S one(S v, int64_t) const { return v; }
  NoHook at(int64_t) const { return {}; }
  int64_t tensors() const { return 0; }  // extra tensors the hook reads or writes
};

// ---------------------------------------------------------------------------
// Reductions over one contiguous run (NCL), accumulated in double
// ---------------------------------------------------------------------------

// Σ (x - shift) and Σ (x - shift)². With the shift one of the block's own
// values, |shift - mean| <= sqrt(n)·std of the block, so turning these into
// m2 = Σ(x-shift)² - (Σ(x-shift))²/n loses at most log10(n+1) of double's
// 16 digits: a one-pass, well-conditioned block summary.
template <typename T>
inline void add_shifted(const T* p, int64_t n, double shift, Sum4& s1, Sum4& s2) {
  const dVec sh(shift);
  int64_t i = 0;
  dVec d[4];
  for (; i + 16 <= n; i += 16) {
    load16(p + i, d);
    for (int k = 0; k < 4; ++k) {
      const dVec t = d[k] - sh;
      s1.v[k] += t;
      s2.v[k] = at::vec::fmadd(t, t, s2.v[k]);
    }
  }
  for (; i < n; ++i) {
    const double t = static_cast<double>(p[i]) - shift;
    s1.tail += t;
    s2.tail = std::fma(t, t, s2.tail);
  }
}

// Σ dy and Σ dy·(x - mh) with mh the mean rounded to opmath_t (the caller
// adds -(mean - mh)·Σdy). Products and sums run in opmath_t over at most
// kPartial terms per lane, then in double: each partial sum is exact to
// kPartial·u of its terms, the long sum over M values never leaves double.
constexpr int64_t kPartial = 8;

template <typename T, typename op_t = opmath_t<T>, typename P = NoHook>
inline void add_dy_dyt(const T* x, const T* dy, int64_t n, op_t mh, Sum4& sdy, Sum4& sdyt, P p = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const V m(mh);
  int64_t i = 0;
  while (i + 2 * K <= n) {
    const int64_t end = std::min(n, i + kPartial * 2 * K);
    V a0(op_t(0)), a1(op_t(0)), b0(op_t(0)), b1(op_t(0));
    for (; i + 2 * K <= end; i += 2 * K) {
      const V g0 = p.vec(IO::load(dy + i), i), g1 = p.vec(IO::load(dy + i + K), i + K);
      a0 += g0;
      a1 += g1;
      b0 = at::vec::fmadd(g0, IO::load(x + i) - m, b0);
      b1 = at::vec::fmadd(g1, IO::load(x + i + K) - m, b1);
    }
    sdy.add(a0, a1);
    sdyt.add(b0, b1);
  }
  for (; i < n; ++i) {
    const double g = p.one(static_cast<double>(dy[i]), i);
    sdy.tail += g;
    sdyt.tail = std::fma(g, static_cast<double>(static_cast<op_t>(x[i]) - mh), sdyt.tail);
  }
}

// ---------------------------------------------------------------------------
// Reductions over rows of channels (NLC): acc[c] += f(row[c]), rows in order.
// The additions per channel happen row after row, so the result is that of
// a plain row loop.
// ---------------------------------------------------------------------------

// The two NLC reductions walk a task differently.
//
// Statistics: strips of sixteen channels over a block of kStatRows rows, the
// accumulators in registers, and while a block is summed, the next block is
// prefetched. In L3 the strips are what makes the pass
// fast (no accumulator stores per row); from DRAM they are only fast with
// the prefetch: the hardware prefetchers do not follow a walk that visits
// kStatRows rows side by side, so the next block is requested in memory
// order (rows whole; for the tiles of wider rows the prefetch is left to the
// hardware). Channels-last float32, collect_stats alone,
// inputs rotated among four copies (each call reads from DRAM), 2 threads,
// runs alternating:
//   rows in memory order (one accumulator load/store per value)
//     32x128x28x28 0.64-0.68 ms, 32x256x14x14 0.31-0.39, 32x512x7x7 0.15-0.17,
//     32x64x56x56 1.09-1.29
//   strips of 8 rows, no prefetch
//     32x128x28x28 1.07 ms, 32x512x7x7 0.10-0.12, 32x64x56x56 1.16-1.22
//   strips of 8 rows, next block prefetched
//     32x128x28x28 0.35-0.38 ms, 32x256x14x14 0.18-0.23, 32x512x7x7 0.11-0.12,
//     32x64x56x56 0.86-1.08
//   (x.sum(), a plain read of the same copies: 0.24-0.28, -, 0.028, 0.73-0.83)
// With the prefetch, strips of 16 rows measured slower than 8 (without it,
// 2 and 4 rows no better); prefetching a fixed 2 to 16 KiB ahead instead of
// one block, the same or slower.
//
// Backward reduction: by whether the task holds whole rows (n == stride,
// i.e. C <= kNlcTile):
//   whole rows:  rows in memory order, one forward stream through the task,
//                which is what the hardware prefetchers follow from DRAM;
//   a tile of each row: strips of channels over a few rows (register
//                accumulators). Rows in memory order measured 2x slower at
//                C = 1024 (4096x1024): the per-channel accumulators of a
//                long row crowd the 32 KiB L1.
// Measured as above: backward reduction 32x256x14x14 0.89-0.97 -> 0.47-0.78
// ms, 32x512x7x7 0.26-0.53 -> 0.21-0.26 ms; 4096x1024 2.0 -> 2.6 ms.
// Every walk adds a channel's values row after row, so all give the same bits.
inline bool whole_rows(int64_t n, int64_t stride) { return n == stride && n <= kNlcTile; }

constexpr int64_t kStatRows = 8;  // rows per block of the statistics strips

// Asks for the cache line holding p (read, keep in all levels).
template <typename T>
inline void prefetch(const T* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// s1[c] += x - shift[c],  s2[c] += (x - shift[c])²
// Sixteen channels at a time (eight independent accumulator chains, enough to
// cover the add/fma latency) over kStatRows rows per load/store of the
// accumulators.
template <typename T>
C10_NOINLINE void rows_add_shifted(const T* x, int64_t stride, int64_t rows, int64_t n, const double* shift,
                                   double* s1, double* s2) {
  constexpr int64_t kLine = 64 / sizeof(T);  // values per cache line
  const bool ahead = whole_rows(n, stride);
  const T* end = x + rows * stride;
  for (int64_t r0 = 0; r0 < rows; r0 += kStatRows) {
    const int64_t r1 = std::min(rows, r0 + kStatRows);
    // With whole rows the next block is one run of memory: strip i asks for
    // its i-th kStatRows·16 values, so the block is requested in order.
    const T* next = x + r1 * stride;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      if (ahead) {
        const T* p = next + c * kStatRows;
        const T* p_end = std::min(end, p + 16 * kStatRows);
        for (; p < p_end; p += kLine) {
          prefetch(p);
        }
      }
      dVec h[4], a[4], q[4];
      for (int k = 0; k < 4; ++k) {
        h[k] = dVec::loadu(shift + c + 4 * k);
        a[k] = dVec::loadu(s1 + c + 4 * k);
        q[k] = dVec::loadu(s2 + c + 4 * k);
      }
      for (int64_t r = r0; r < r1; ++r) {
        dVec d[4];
        load16(x + r * stride + c, d);
        for (int k = 0; k < 4; ++k) {
          d[k] = d[k] - h[k];
          a[k] += d[k];
          q[k] = at::vec::fmadd(d[k], d[k], q[k]);
        }
      }
      for (int k = 0; k < 4; ++k) {
        a[k].store(s1 + c + 4 * k);
        q[k].store(s2 + c + 4 * k);
      }
    }
    for (; c + 8 <= n; c += 8) {
      const dVec h0 = dVec::loadu(shift + c), h1 = dVec::loadu(shift + c + 4);
      dVec a0 = dVec::loadu(s1 + c), a1 = dVec::loadu(s1 + c + 4);
      dVec q0 = dVec::loadu(s2 + c), q1 = dVec::loadu(s2 + c + 4);
      for (int64_t r = r0; r < r1; ++r) {
        dVec lo, hi;
        load8(x + r * stride + c, lo, hi);
        lo = lo - h0;
        hi = hi - h1;
        a0 += lo;
        a1 += hi;
        q0 = at::vec::fmadd(lo, lo, q0);
        q1 = at::vec::fmadd(hi, hi, q1);
      }
      a0.store(s1 + c);
      a1.store(s1 + c + 4);
      q0.store(s2 + c);
      q1.store(s2 + c + 4);
    }
    for (; c < n; ++c) {
      for (int64_t r = r0; r < r1; ++r) {
        const double t = static_cast<double>(x[r * stride + c]) - shift[c];
        s1[c] += t;
        s2[c] = std::fma(t, t, s2[c]);
      }
    }
  }
}

// sdy[c] += dy,  sdyt[c] += dy·(x - mh[c]), two ways with the same additions
// in the same order per channel (so the same bits): partial sums over
// kPartial rows in opmath_t, then added in double.
//
// by_row: rows in memory order, the partial sums in L1 arrays (whole rows).
// by_strip: four vectors of channels at a time over kPartial rows, the
// partial sums in registers (eight independent chains cover the add/fma
// latency), a strided walk through the block (a tile of each row).
template <typename T, typename op_t = opmath_t<T>, typename P = NoHook>
C10_NOINLINE void rows_add_dy_dyt_by_row(const T* x, const T* dy, int64_t stride, int64_t rows, int64_t n,
                                        const op_t* mh, double* sdy, double* sdyt, P p = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  alignas(64) op_t pa[kNlcTile];
  alignas(64) op_t pb[kNlcTile];
  for (int64_t r0 = 0; r0 < rows; r0 += kPartial) {
    const int64_t r1 = std::min(rows, r0 + kPartial);
    std::fill(pa, pa + n, op_t(0));
    std::fill(pb, pb + n, op_t(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * stride;
      const T* gr = dy + r * stride;
      const P pr = p.at(r * stride);
      int64_t c = 0;
      for (; c + K <= n; c += K) {
        const V g = pr.vec(IO::load(gr + c), c);
        (V::loadu(pa + c) + g).store(pa + c);
        at::vec::fmadd(g, IO::load(xr + c) - V::loadu(mh + c), V::loadu(pb + c)).store(pb + c);
      }
      for (; c < n; ++c) {
        const op_t g = pr.one(static_cast<op_t>(gr[c]), c);
        pa[c] += g;
        pb[c] = std::fma(g, static_cast<op_t>(xr[c]) - mh[c], pb[c]);
      }
    }
    int64_t c = 0;
    for (; c + K <= n; c += K) {
      add_to_double(sdy + c, V::loadu(pa + c));
      add_to_double(sdyt + c, V::loadu(pb + c));
    }
    for (; c < n; ++c) {
      sdy[c] += static_cast<double>(pa[c]);
      sdyt[c] += static_cast<double>(pb[c]);
    }
  }
}

template <typename T, typename op_t = opmath_t<T>, typename P = NoHook>
C10_NOINLINE void rows_add_dy_dyt_by_strip(const T* x, const T* dy, int64_t stride, int64_t rows, int64_t n,
                                          const op_t* mh, double* sdy, double* sdyt, P p = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  for (int64_t r0 = 0; r0 < rows; r0 += kPartial) {
    const int64_t r1 = std::min(rows, r0 + kPartial);
    int64_t c = 0;
    for (; c + 4 * K <= n; c += 4 * K) {
      V m[4], a[4], b[4];
      for (int j = 0; j < 4; ++j) {
        m[j] = V::loadu(mh + c + j * K);
        a[j] = V(op_t(0));
        b[j] = V(op_t(0));
      }
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * stride + c;
        const T* gr = dy + r * stride + c;
        for (int j = 0; j < 4; ++j) {
          const V g = p.vec(IO::load(gr + j * K), r * stride + c + j * K);
          a[j] += g;
          b[j] = at::vec::fmadd(g, IO::load(xr + j * K) - m[j], b[j]);
        }
      }
      for (int j = 0; j < 4; ++j) {
        add_to_double(sdy + c + j * K, a[j]);
        add_to_double(sdyt + c + j * K, b[j]);
      }
    }
    for (; c + K <= n; c += K) {
      const V m = V::loadu(mh + c);
      V a(op_t(0)), b(op_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const V g = p.vec(IO::load(dy + r * stride + c), r * stride + c);
        a += g;
        b = at::vec::fmadd(g, IO::load(x + r * stride + c) - m, b);
      }
      add_to_double(sdy + c, a);
      add_to_double(sdyt + c, b);
    }
    for (; c < n; ++c) {
      op_t a(0), b(0);
      for (int64_t r = r0; r < r1; ++r) {
        const op_t g = p.one(static_cast<op_t>(dy[r * stride + c]), r * stride + c);
        a += g;
        b = std::fma(g, static_cast<op_t>(x[r * stride + c]) - mh[c], b);
      }
      sdy[c] += static_cast<double>(a);
      sdyt[c] += static_cast<double>(b);
    }
  }
}

template <typename T, typename op_t = opmath_t<T>, typename P = NoHook>
inline void rows_add_dy_dyt(const T* x, const T* dy, int64_t stride, int64_t rows, int64_t n, const op_t* mh,
                            double* sdy, double* sdyt, P p = {}) {
  if (whole_rows(n, stride)) {
    rows_add_dy_dyt_by_row(x, dy, stride, rows, n, mh, sdy, sdyt, p);
  } else {
    rows_add_dy_dyt_by_strip(x, dy, stride, rows, n, mh, sdy, sdyt, p);
  }
}

// ---------------------------------------------------------------------------
// Elementwise passes, in opmath_t, with the coefficients of coefficients.h:
//   y  = (x - mh) * scale + shift
//   dx = k * (x - mh) + (a * dy + cst)
// mh is the float64 mean rounded to opmath_t; x - mh is exact when x is
// within a factor 2 of the mean, so large offsets cancel exactly, and the
// rounding of mh is folded into shift and cst.
//
// kStream: the output goes out with non-temporal stores (float and double,
// AVX2), for passes that move too much to stay in cache anyway: no
// read-for-ownership of the destination lines, and the inputs the pass reads
// again are not evicted by the output. The caller runs stream_fence() after
// the pass.
//
// The rule counts what the pass moves, inputs read plus output written: from
// kStreamBytes on, half this machine's 32 MiB L3. Counting the output alone
// (from 16 MiB on) measured slower wherever the pass overflows the cache
// without a large output (float32, 2 threads, ops timed for 0.4 s in rounds,
// runs alternating, two sessions each): channels_last 32x128x28x28 eval
// 0.58-0.93 -> 0.32-0.51 ms, forward 1.22-1.61 -> 0.94-1.10 ms, a training
// step on rotated inputs 3.8-5.1 -> 2.9-3.6 ms (nn 3.0-4.7 ms); contiguous
// 32x128x28x28 step 4.3-4.6 -> 3.0-3.3 ms. Passes that stay in cache (the
// 6.4 MB eval at 32x256x14x14) keep normal stores: streamed, that eval
// measured 0.16-0.17 against 0.12-0.13 ms.
// ---------------------------------------------------------------------------

constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T>
constexpr bool can_stream() {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  return std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
  return false;
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  _mm_sfence();
#endif
}

// The bytes a pass over `tensors` tensors of v's shape moves (the inputs it
// reads plus the output it writes).
inline int64_t pass_bytes(const View& v, int64_t tensors, int64_t elem_size) {
  return v.M() * v.C * tensors * elem_size;
}

// Calls f(std::true_type) when a pass moving `bytes` should stream its
// output, f(std::false_type) otherwise.
template <typename F>
inline void with_streaming(int64_t bytes, const F& f) {
  if (bytes >= kStreamBytes) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// out[i] for i in [0, n): vec(i) gives the opmath vector at i (aligned or
// not), one(i) the single value.
//
// With kStream only whole 64-byte lines go out non-temporally; the partial
// lines at either end of `out` get normal stores. A line filled partly by
// streaming stores is flushed from the write-combining buffer half empty,
// and where runs are not whole lines (NCL runs of 196 floats, 784 bytes) the
// next run fills the rest of it from the cache: measured 0.52-0.59 ms for
// the contiguous 32x256x14x14 grad_input pass (backward_elementwise) with
// 32-byte streaming, against 0.25-0.27 ms for 32x196x16x16, the same bytes
// in runs of whole lines (2 threads, runs alternating).
template <bool kStream, typename T, typename VF, typename SF>
inline void map_out(T* out, int64_t n, const VF& vec, const SF& one) {
  using IO = VecIO<T>;
  constexpr int64_t K = IO::kSize;
  int64_t i = 0;
  if constexpr (kStream && can_stream<T>()) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    static_assert(2 * K * sizeof(T) == 64, "two vectors fill one cache line");
    const auto addr = [&](int64_t j) { return reinterpret_cast<uintptr_t>(out + j); };
    for (; i < n && (addr(i) & 31) != 0; ++i) {
      out[i] = static_cast<T>(one(i));
    }
    if (i + K <= n && (addr(i) & 63) != 0) {
      IO::store(out + i, vec(i));
      i += K;
    }
    for (; i + 2 * K <= n; i += 2 * K) {
      if constexpr (std::is_same_v<T, float>) {
        _mm256_stream_ps(out + i, vec(i));
        _mm256_stream_ps(out + i + K, vec(i + K));
      } else {
        _mm256_stream_pd(out + i, vec(i));
        _mm256_stream_pd(out + i + K, vec(i + K));
      }
    }
    for (; i + K <= n; i += K) {
      IO::store(out + i, vec(i));
    }
#endif
  } else {
    for (; i + 2 * K <= n; i += 2 * K) {
      IO::store2(out + i, vec(i), vec(i + K));
    }
    for (; i + K <= n; i += K) {
      IO::store(out + i, vec(i));
    }
    // The last values as one vector ending at n, overlapping values already
    // written (out never aliases an input, so they are written again with
    // the same bits): cheaper than one-by-one conversions of bfloat16 and
    // half. Contiguous bfloat16 eval, runs of 196 (four left over per run),
    // 32x256x14x14: 0.184-0.197 -> 0.161-0.168 ms, nn 0.154-0.188 (runs
    // alternating).
    if (i < n && n >= K) {
      IO::store(out + n - K, vec(n - K));
      i = n;
    }
  }
  for (; i < n; ++i) {
    out[i] = static_cast<T>(one(i));
  }
}

template <bool kStream, typename T, typename op_t = opmath_t<T>, typename E = NoHook>
inline void normalize_run(const T* x, T* y, int64_t n, op_t mh, op_t scale, op_t shift, E e = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  const V vm(mh), vs(scale), vb(shift);
  map_out<kStream>(
      y, n, [&](int64_t i) { return e.vec(at::vec::fmadd(IO::load(x + i) - vm, vs, vb), i); },
      [&](int64_t i) { return e.one(std::fma(static_cast<op_t>(x[i]) - mh, scale, shift), i); });
}

template <bool kStream, typename T, typename op_t = opmath_t<T>, typename P = NoHook>
inline void grad_run(const T* dy, const T* x, T* dx, int64_t n, op_t a, op_t k, op_t cst, op_t mh, P p = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  const V va(a), vk(k), vc(cst), vm(mh);
  map_out<kStream>(
      dx, n,
      [&](int64_t i) {
        return at::vec::fmadd(vk, IO::load(x + i) - vm, at::vec::fmadd(va, p.vec(IO::load(dy + i), i), vc));
      },
      [&](int64_t i) {
        return std::fma(k, static_cast<op_t>(x[i]) - mh, std::fma(a, p.one(static_cast<op_t>(dy[i]), i), cst));
      });
}

// dx = a·dy (eval mode: the statistics are constants).
template <bool kStream, typename T, typename op_t = opmath_t<T>, typename P = NoHook>
inline void scale_run(const T* dy, T* dx, int64_t n, op_t a, P p = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  const V va(a);
  map_out<kStream>(
      dx, n, [&](int64_t i) { return p.vec(IO::load(dy + i), i) * va; },
      [&](int64_t i) { return p.one(static_cast<op_t>(dy[i]), i) * a; });
}

// The elementwise passes: every value on its own, in parallel, and the
// streamed stores (kStream) fenced before the threads finish.
//
// NLC: f(r0, r1) on each thread's share of the rows, one forward sweep
// (what the hardware prefetchers follow). Visiting the share last rows first,
// in blocks, to find the rows the reduction left in cache, measured slower:
// 15-35% on the channels-last backward (3.4 vs 2.9 ms at 32x64x56x56, 0.62
// vs 0.44 ms at 32x256x14x14 float32), no gain on the forward.
template <typename F>
inline void for_row_ranges(const View& v, const F& f) {
  at::parallel_for(0, v.M(), grain_for(v.C), [&](int64_t begin, int64_t end) {
    f(begin, end);
    stream_fence();
  });
}

// NCL: f(i) for every run i = n * C + c (L values at i * L), first to last.
template <typename F>
inline void for_runs(const View& v, const F& f) {
  at::parallel_for(0, v.N * v.C, grain_for(v.L), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      f(i);
    }
    stream_fence();
  });
}

// The same three over `rows` consecutive NLC rows with per-channel
// coefficient arrays, row after row (a plain forward sweep through memory;
// the coefficients stay in L1). The row kernels are not inlined: each call
// covers thousands of values, and on its own the loop keeps its pointers in
// registers.
template <bool kStream, typename T, typename op_t = opmath_t<T>, typename E = NoHook>
C10_NOINLINE void normalize_rows(const T* x, T* y, int64_t stride, int64_t rows, int64_t n, const op_t* mh,
                                 const op_t* scale, const op_t* shift, E e = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  for (int64_t r = 0; r < rows; ++r, x += stride, y += stride) {
    const E er = e.at(r * stride);
    map_out<kStream>(
        y, n,
        [&](int64_t c) {
          return er.vec(
              at::vec::fmadd(IO::load(x + c) - V::loadu(mh + c), V::loadu(scale + c), V::loadu(shift + c)), c);
        },
        [&](int64_t c) { return er.one(std::fma(static_cast<op_t>(x[c]) - mh[c], scale[c], shift[c]), c); });
  }
}

template <bool kStream, typename T, typename op_t = opmath_t<T>, typename P = NoHook>
C10_NOINLINE void grad_rows(const T* dy, const T* x, T* dx, int64_t stride, int64_t rows, int64_t n, const op_t* a,
                            const op_t* k, const op_t* cst, const op_t* mh, P p = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  for (int64_t r = 0; r < rows; ++r, dy += stride, x += stride, dx += stride) {
    const P pr = p.at(r * stride);
    map_out<kStream>(
        dx, n,
        [&](int64_t c) {
          const V u = at::vec::fmadd(V::loadu(a + c), pr.vec(IO::load(dy + c), c), V::loadu(cst + c));
          return at::vec::fmadd(V::loadu(k + c), IO::load(x + c) - V::loadu(mh + c), u);
        },
        [&](int64_t c) {
          return std::fma(k[c], static_cast<op_t>(x[c]) - mh[c],
                          std::fma(a[c], pr.one(static_cast<op_t>(dy[c]), c), cst[c]));
        });
  }
}

template <bool kStream, typename T, typename op_t = opmath_t<T>, typename P = NoHook>
C10_NOINLINE void scale_rows(const T* dy, T* dx, int64_t stride, int64_t rows, int64_t n, const op_t* a,
                             P p = {}) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  for (int64_t r = 0; r < rows; ++r, dy += stride, dx += stride) {
    const P pr = p.at(r * stride);
    map_out<kStream>(
        dx, n, [&](int64_t c) { return pr.vec(IO::load(dy + c), c) * V::loadu(a + c); },
        [&](int64_t c) { return pr.one(static_cast<op_t>(dy[c]), c) * a[c]; });
  }
}

}  // namespace cpu
}  // namespace torch_bn_manual
