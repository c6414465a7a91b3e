// Which instructions the CPU kernels may use beyond the build's baseline,
// chosen once when the library loads (csrc/cpu/cpu_features.cpp).
//
// The baseline (AVX2 + FMA + F16C, or none) is fixed at build time and
// checked by Python before the library loads (torch_bn_manual/_cpu_check.py).
// AVX512-BF16 is not part of it: a wheel built on a machine that has it must
// run on one that has not, so the bfloat16 rounding asks at run time.
#pragma once

namespace torch_bn_manual {
namespace cpu {

// True when float -> bfloat16 rounding may use vcvtneps2bf16: this CPU has
// AVX512-BF16, VL and DQ, and TORCH_BN_MANUAL_CPU does not say "portable".
extern const bool use_avx512_bf16;

// The instruction sets the kernels run with here, e.g. "avx2+avx512_bf16",
// "avx2" or "scalar" (for torch_bn_manual._C.cpu_capability()).
const char* capability_name();

// Empty when TORCH_BN_MANUAL_CPU holds a value we understand ("", "auto",
// "portable"), else a message saying what it holds and what it may hold.
const char* cpu_setting_error();

}  // namespace cpu
}  // namespace torch_bn_manual
