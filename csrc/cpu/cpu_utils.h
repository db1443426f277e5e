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

// R sums res[r] = sum_{d<D} f(r, d) computed together (operands shared between rows are
// loaded once). Each sum has a fixed association order, lane-wise partial sums then a fixed
// tree, the same for every R, so the compiler can vectorise without -ffast-math and results
// never depend on blocking or threads.
template <int R, class T, class F>
inline void lane_sums(std::int64_t D, F f, T* res) {
  constexpr int L = 16;
  T acc[R][L] = {};
  std::int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < L; ++l) acc[r][l] += f(r, d + l);
  for (int l = 0; d < D; ++d, ++l)
    for (int r = 0; r < R; ++r) acc[r][l] += f(r, d);
  for (int r = 0; r < R; ++r) {
    for (int w = L / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) acc[r][l] += acc[r][l + w];
    res[r] = acc[r][0];
  }
}

template <class T, class F>
inline T lane_sum(std::int64_t D, F f) {
  T res;
  lane_sums<1, T>(D, [&](int, std::int64_t d) { return f(d); }, &res);
  return res;
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
