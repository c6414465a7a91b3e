// Per-channel batch statistics on the CPU: Welford states (mean, m2, count)
// summarised block by block (one pass of shifted sums in double, the shift
// being one of the block's values) and folded with welford_merge in the
// fixed order of loops.h.
#pragma once

#include <ATen/Parallel.h>

#include "cpu/loops.h"
#include "welford.h"

namespace torch_bn_manual {
namespace cpu {

using State = WelfordState<double>;

// Whether the NCL kernels hand out whole channels to threads (each channel's
// values then stay in that core's cache from the reduction to the
// elementwise pass) or split channels into blocks. Either way every block
// and every fold is the same arithmetic, so this choice never changes a bit.
inline bool ncl_by_channel(const View& v) {
  return v.C >= 4 * static_cast<int64_t>(at::get_num_threads());
}

// One NCL channel, serially: its blocks folded in order.
template <typename T>
State ncl_channel_state(const T* x, const View& v, int64_t c);

// Every channel of a dense input (NCL or NLC), in parallel; out has C states.
template <typename T>
void channel_states(const T* x, const View& v, State* out);

}  // namespace cpu
}  // namespace torch_bn_manual
