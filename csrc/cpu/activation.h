// The hooks of the fused layers (loops.h: NoHook is the plain pass):
//   AddAct   epilogue of the normalize pass:  o = act(y + z)
//   ActGrad  prologue of the backward passes: dt = dy·act'(o), optionally
//            also written to dz (the residual's gradient) by the first pass
//            that reads dy (backward.cpp: ActBackward)
// act(t) = t for t > 0, slope·t otherwise (relu: slope 0); act' is read from
// the output o, whose sign is t's for slope >= 0 (docs/derivation.md, 10).
// Relu is torch.nn's to the bit: 0 where t < 0, t elsewhere (-0 and NaN kept;
// slope·t would give -0 for t < 0 and NaN for -inf), and its gradient 0
// where o <= 0, dy elsewhere (threshold_backward; dy·0 would give -0 and NaN).
// Both are applied to values already in registers: no pass of their own.
#pragma once

#include <cstdint>

#include "cpu/vec.h"

namespace torch_bn_manual {
namespace cpu {

template <typename T>
struct AddAct {
  using op_t = opmath_t<T>;
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  const T* z = nullptr;  // residual, at the output's offsets; nullptr: none
  op_t slope = 0;
  bool act = false;      // false: identity

  V vec(V t, int64_t i) const {
    if (z != nullptr) {
      t = t + IO::load(z + i);
    }
    if (!act) {
      return t;
    }
    const V zero(op_t(0));
    return slope == op_t(0) ? V::blendv(t, zero, t < zero) : V::blendv(t * V(slope), t, t > zero);
  }
  op_t one(op_t t, int64_t i) const {
    if (z != nullptr) {
      t += static_cast<op_t>(z[i]);
    }
    if (!act) {
      return t;
    }
    if (slope == op_t(0)) {
      return t < op_t(0) ? op_t(0) : t;
    }
    return t > op_t(0) ? t : t * slope;
  }
  AddAct at(int64_t off) const { return {z == nullptr ? nullptr : z + off, slope, act}; }
  int64_t tensors() const { return z == nullptr ? 0 : 1; }
};

template <typename T>
struct ActGrad {
  using op_t = opmath_t<T>;
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  const T* out = nullptr;  // the forward's output o
  op_t slope = 0;
  T* dz = nullptr;         // where dt goes as well; nullptr: nowhere

  V vec(const V& g, int64_t i) const {
    const V o = IO::load(out + i), zero(op_t(0));
    const V dt = slope == op_t(0) ? V::blendv(g, zero, o <= zero) : V::blendv(g * V(slope), g, o > zero);
    if (dz != nullptr) {
      IO::store(dz + i, dt);
    }
    return dt;
  }
  template <typename S>
  S one(S g, int64_t i) const {
    const op_t o = static_cast<op_t>(out[i]);
    const S dt = slope == op_t(0) ? (o <= op_t(0) ? S(0) : g) : (o > op_t(0) ? g : g * static_cast<S>(slope));
    if (dz != nullptr) {
      dz[i] = static_cast<T>(dt);
    }
    return dt;
  }
  ActGrad at(int64_t off) const { return {out + off, slope, dz == nullptr ? nullptr : dz + off}; }
  int64_t tensors() const { return dz == nullptr ? 1 : 2; }
  ActGrad without_sink() const { return {out, slope, nullptr}; }
};

}  // namespace cpu
}  // namespace torch_bn_manual
