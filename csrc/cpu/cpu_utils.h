// Helpers shared by the CPU kernels.
#pragma once
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../common.h"
#include "../openmp.h"

// Hot loops are compiled for several SIMD levels and picked at load time (GCC/Clang ifunc),
// so one wheel runs everywhere and still uses AVX2/AVX-512 where present.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYMETA_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYMETA_SIMD_CLONES
#endif

namespace pymeta::cpu {

// Below this many scalar operations a parallel region costs more than it saves.
constexpr std::int64_t kParallelGrain = 1 << 15;

inline int threads_for(const Device& dev, std::int64_t work) {
  return work < kParallelGrain ? 1 : (dev.nthreads < 1 ? 1 : dev.nthreads);
}

// Runs body in a parallel region of nt threads, or directly when nt == 1 (an OpenMP team,
// even of one thread, costs more than a small op). Worksharing loops (`#pragma omp for`)
// inside body then run all their iterations in the calling thread.
template <class F>
inline void parallel_region(int nt, F body) {
  if (nt <= 1) {
    body();
    return;
  }
#pragma omp parallel num_threads(nt)
  body();
}

// Per-thread scratch for a parallel_region of nt threads, allocated before the region: an
// allocation that fails inside one cannot be caught (std::terminate), while here it reaches
// Python as MemoryError. get() is the calling thread's slice; with nt == 1 the body runs in
// the caller, which may itself be a thread of someone else's OpenMP team, so slice 0.
template <class T>
class ThreadScratch {
 public:
  ThreadScratch(int nt, std::int64_t per_thread) : nt_(nt < 1 ? 1 : nt), per_thread_(per_thread) {
    try {
      buf_.resize(std::size_t(nt_ * per_thread));
    } catch (const std::bad_alloc&) {
      throw OutOfMemory("out of memory for " + std::to_string((nt_ * per_thread * sizeof(T)) >> 20) +
                        " MiB of kernel scratch (" + std::to_string(nt_) +
                        " threads); use fewer threads (torch.set_num_threads) or smaller inputs");
    }
  }
  T* get() { return buf_.data() + (nt_ == 1 ? 0 : omp_get_thread_num()) * per_thread_; }

 private:
  std::int64_t nt_, per_thread_;
  std::vector<T> buf_;
};

// Explicit 32-byte vectors (GCC/Clang vector extensions): 8 floats or 4 doubles, one AVX
// register (two SSE ones in the baseline clone; wider generic vectors spill to the stack).
// Every reduction uses the same lanes and the same final tree whatever the thread count.
template <class T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <class T>
using Vec = typename VecOf<T>::type;
template <class T>
constexpr int kLanes = 32 / sizeof(T);

template <class T>
__attribute__((always_inline)) inline Vec<T> loadu(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The first n <= kLanes elements of p, zeros after.
template <class T>
__attribute__((always_inline)) inline Vec<T> load_partial(const T* p, std::int64_t n) {
  Vec<T> v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}

template <class T>
__attribute__((always_inline)) inline void storeu(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}

// Outputs at least this large bypass the cache: non-temporal stores skip the read-for-ownership
// of every written line, a third of the traffic of a streaming kernel.
constexpr std::int64_t kStreamBytes = std::int64_t(4) << 20;

// The last-level cache this CPU reaches, in bytes: Linux's sysfs entry for it (what lscpu
// shows) where there is one, else glibc's sysconf, which on some VMs reports the whole
// package's L3 (256 MiB for a 32 MiB one here); 0 if neither knows.
inline std::int64_t last_level_cache_bytes() {
  if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long size = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &size, &unit);
    std::fclose(f);
    if (got >= 1 && size > 0)
      return size << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0);
  }
#if defined(_SC_LEVEL3_CACHE_SIZE)  // glibc's; macOS has neither this nor the sysfs entry
  return std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#else
  return 0;
#endif
}

// Operands past this size do not stay in the last-level cache from one call to the next:
// half of it (at least kStreamBytes), since other data shares it. A kernel whose working set
// stays cached gains nothing from bypassing the cache: a training loop reuses freed buffers
// that are still cached, and regular stores to them are about 3x faster (a 5 MB
// class_prototypes gradient: 73 against 226 us here). sgd_step on conv4 x 32 with shared
// params (29 MB against a 32 MB L3) ran 15-25% faster streaming (2026-11-25).
inline std::int64_t past_cache_bytes() {
  static const std::int64_t bytes = std::max(kStreamBytes, last_level_cache_bytes() / 2);
  return bytes;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

// Non-temporal store of one vector; p must be 16-byte aligned. Callers fence (stream_fence).
template <class T>
__attribute__((always_inline)) inline void stream_store(T* p, Vec<T> v) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    __m128 half[2];
    std::memcpy(half, &v, sizeof v);
    _mm_stream_ps(p, half[0]);
    _mm_stream_ps(p + 4, half[1]);
  } else {
    __m128d half[2];
    std::memcpy(half, &v, sizeof v);
    _mm_stream_pd(p, half[0]);
    _mm_stream_pd(p + 2, half[1]);
  }
#else
  storeu(p, v);
#endif
}

// Orders this thread's non-temporal stores before anything it does next.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// v with its lanes permuted: lane i of the result is v[index i] (GCC and Clang name the
// builtin differently; GCC before 12 lacks Clang's).
#if defined(__clang__)
#define PYMETA_PERMUTE(v, Mask, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define PYMETA_PERMUTE(v, Mask, ...) __builtin_shuffle(v, Mask{__VA_ARGS__})
#endif

// Sum of the lanes by a fixed shuffle tree (halves, then quarters, then pairs).
__attribute__((always_inline)) inline float hsum(Vec<float> v) {
  using Mask [[maybe_unused]] = std::int32_t __attribute__((vector_size(32)));
  v += PYMETA_PERMUTE(v, Mask, 4, 5, 6, 7, 0, 1, 2, 3);
  v += PYMETA_PERMUTE(v, Mask, 2, 3, 0, 1, 6, 7, 4, 5);
  v += PYMETA_PERMUTE(v, Mask, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

__attribute__((always_inline)) inline double hsum(Vec<double> v) {
  using Mask [[maybe_unused]] = std::int64_t __attribute__((vector_size(32)));
  v += PYMETA_PERMUTE(v, Mask, 2, 3, 0, 1);
  v += PYMETA_PERMUTE(v, Mask, 1, 0, 3, 2);
  return v[0];
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
