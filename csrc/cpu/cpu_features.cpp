#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace torch_bn_manual {
namespace cpu {
namespace {

// TORCH_BN_MANUAL_CPU: unset, "" or "auto" uses what the CPU has;
// "portable" keeps to the build's baseline (the path every x86-64 CPU that
// meets the baseline takes, and the one tests compare the fast path with).
const char* cpu_setting() {
  const char* value = std::getenv("TORCH_BN_MANUAL_CPU");
  return value == nullptr ? "" : value;
}

bool wants_portable() {
  return std::strcmp(cpu_setting(), "portable") == 0;
}

bool cpu_has_avx512_bf16() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  // Called from a static initializer: the feature table may not be set up yet.
  __builtin_cpu_init();
  // libgcc's answers include the OS check (XCR0 enables the AVX-512 state).
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace

const bool use_avx512_bf16 = !wants_portable() && cpu_has_avx512_bf16();

const char* capability_name() {
#if defined(CPU_CAPABILITY_AVX2)
  return use_avx512_bf16 ? "avx2+avx512_bf16" : "avx2";
#else
  return "scalar";
#endif
}

const char* cpu_setting_error() {
  const std::string value = cpu_setting();
  if (value.empty() || value == "auto" || value == "portable") {
    return "";
  }
  static std::string message;
  message = "TORCH_BN_MANUAL_CPU='" + value + "' is not understood; use 'auto' (the default: what this CPU has) "
            "or 'portable' (the build's baseline instructions only)";
  return message.c_str();
}

}  // namespace cpu
}  // namespace torch_bn_manual
