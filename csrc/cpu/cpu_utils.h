// Helpers shared by the CPU kernels.
#pragma once
#include <omp.h>

#include <cstdint>

#include "../common.h"

// Hot loops are compiled for several SIMD levels and picked at load time (GCC/Clang ifunc),
// so one wheel runs everywhere and still uses AVX2/AVX-512 where present.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYMETA_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYMETA_SIMD_CLONES
#endif

namespace pymeta::cpu {

// Below this many scalar operations a parallel region costs more than it saves.
constexpr std::int64_t kParallelGrain = 1 << 15;

inline int threads_for(const Device& dev, std::int64_t work) {
  return work < kParallelGrain ? 1 : (dev.nthreads < 1 ? 1 : dev.nthreads);
}

// sum_{d<D} f(d) with a fixed association order (lane-wise partial sums, then a fixed tree),
// so that the compiler can vectorise without -ffast-math and results never depend on threads.
template <class T, class F>
inline T lane_sum(std::int64_t D, F f) {
  constexpr int L = 16;
  T acc[L] = {};
  std::int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int l = 0; l < L; ++l) acc[l] += f(d + l);
  for (int l = 0; d < D; ++d, ++l) acc[l] += f(d);
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

template <class F>
inline void dispatch_float(DType dtype, const char* op, F f) {
  switch (dtype) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    default:
      throw std::invalid_argument(std::string(op) +
                                  ": CPU kernels support float32 and float64 only");
  }
}

}  // namespace pymeta::cpu
