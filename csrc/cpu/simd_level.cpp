#include "cpu_ops.h"

namespace pymeta::cpu {

std::string simd_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512 (x86-64-v4)";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2+fma (x86-64-v3)";
  return "sse2 (x86-64 baseline)";
#elif defined(__aarch64__)
  return "neon";
#else
  return "compiler default";
#endif
}

}  // namespace pymeta::cpu
