// The hooks of the fused layers (act(BN(x) + residual), docs/derivation.md,
// section 10) on the elementwise work of the plain passes:
//
//   AddAct   epilogue of the normalize pass:   o = act(y + z)
//   ActGrad  prologue of the backward passes:  dt = dy·act'(o), applied to
//            each dy as it is loaded; the dx pass also stores dt as dz (the
//            residual's gradient) when asked
//   NoHook   plain batch norm: loads nothing, changes nothing, stores nothing
//
// act(t) = t for t > 0, slope·t otherwise (relu: slope 0). act' is read from
// the output o, whose sign is t's for slope >= 0, so t is never stored.
//
// A hook rides along in the pass's own loop, at the pass's own offsets:
//   Regs<VEC>           what it loads per vector of the pass (NoHook: nothing)
//   load<VEC>(offset)   issued beside the pass's loads, so it is in flight with them
//   apply(v, regs, k)   element k of the vector, in the compute type
//   store(offset, dt)   the dx pass hands over its dt values (only ActGrad keeps them)
// Kernels take the hook as a template parameter, by value: NoHook is an empty
// class, and the plain kernels do exactly the arithmetic they did without it.
//
// The host half at the end turns launchers.h's AddActArgs / ActGradArgs into
// a hook and calls a launch with it (with_epilogue / with_prologue).
#pragma once

#include <cstdint>

#include "launchers.h"
#include "scalar_types.cuh"

namespace torch_bn_manual {
namespace cuda {

struct Nothing {};

struct NoHook {
  template <int VEC>
  using Regs = Nothing;

  template <int VEC>
  __device__ __forceinline__ Nothing load(int64_t) const {
    return {};
  }
  template <typename T, typename R>
  __device__ __forceinline__ T apply(T v, const R&, int) const {
    return v;
  }
  template <typename T, int VEC>
  __device__ __forceinline__ void store(int64_t, const T (&)[VEC]) const {}
};

// What hook H loads for a vector of VEC elements.
template <typename H, int VEC>
using HookRegs = typename H::template Regs<VEC>;

// o = act(y + z). Identity is slope 1: t·1 is t exactly (NaN included), so
// one formula serves all three activations.
template <typename scalar_t>
struct AddAct {
  using ct = compute_t<scalar_t>;
  const scalar_t* residual;  // z, dense in the output's memory order; nullptr: none
  ct slope;

  template <int VEC>
  using Regs = Pack<scalar_t, VEC>;

  template <int VEC>
  __device__ __forceinline__ Pack<scalar_t, VEC> load(int64_t offset) const {
    Pack<scalar_t, VEC> z{};
    if (residual != nullptr) z = load_pack<scalar_t, VEC>(residual + offset);
    return z;
  }
  template <int VEC>
  __device__ __forceinline__ ct apply(ct y, const Pack<scalar_t, VEC>& z, int k) const {
    const ct t = residual != nullptr ? y + to_compute(z.v[k]) : y;
    // relu as torch.nn's: 0 where t < 0 (slope·t would give -0, and NaN for -inf)
    if (slope == ct(0)) return t < ct(0) ? ct(0) : t;
    return t > ct(0) ? t : t * slope;
  }
  template <typename T, int VEC>
  __device__ __forceinline__ void store(int64_t, const T (&)[VEC]) const {}
};

// dt = dy·act'(o): dy where o > 0, slope·dy elsewhere, in the compute type
// (the reductions and the dx pass get the same dt values).
template <typename scalar_t>
struct ActGrad {
  using ct = compute_t<scalar_t>;
  const scalar_t* output;    // o, dense in the input's memory order
  scalar_t* grad_residual;   // where the dx pass stores dt too; nullptr: nowhere
  ct slope;

  template <int VEC>
  using Regs = Pack<scalar_t, VEC>;

  template <int VEC>
  __device__ __forceinline__ Pack<scalar_t, VEC> load(int64_t offset) const {
    return load_pack<scalar_t, VEC>(output + offset);
  }
  template <int VEC>
  __device__ __forceinline__ ct apply(ct dy, const Pack<scalar_t, VEC>& o, int k) const {
    const ct out = to_compute(o.v[k]);
    // relu as threshold_backward: 0 where o <= 0 (dy·0 would give -0, and NaN for inf)
    if (slope == ct(0)) return out <= ct(0) ? ct(0) : dy;
    return out > ct(0) ? dy : dy * slope;
  }
  template <int VEC>
  __device__ __forceinline__ void store(int64_t offset, const ct (&dt)[VEC]) const {
    if (grad_residual == nullptr) return;
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_compute<scalar_t>(dt[k]);
    store_pack(grad_residual + offset, out);
  }
};

// ---- host: the hook a launch gets ---------------------------------------

// f(NoHook{}) when there is nothing to add (plain batch norm; identity
// without a residual), else f(AddAct<scalar_t>).
template <typename scalar_t, typename F>
void with_epilogue(const AddActArgs& args, F&& f) {
  if (!args.adds_anything()) {
    f(NoHook{});
    return;
  }
  using ct = compute_t<scalar_t>;
  f(AddAct<scalar_t>{static_cast<const scalar_t*>(args.residual), static_cast<ct>(args.act ? args.slope : 1.0)});
}

// f(NoHook{}) without an activation (plain batch norm; identity: dt = dy),
// else f(ActGrad<scalar_t>).
template <typename scalar_t, typename F>
void with_prologue(const ActGradArgs& args, F&& f) {
  if (args.output == nullptr) {
    f(NoHook{});
    return;
  }
  using ct = compute_t<scalar_t>;
  f(ActGrad<scalar_t>{static_cast<const scalar_t*>(args.output), static_cast<scalar_t*>(args.grad_residual),
                      static_cast<ct>(args.slope)});
}

}  // namespace cuda
}  // namespace torch_bn_manual
