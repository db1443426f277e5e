// A host-only stand-in for the parts of CUDA that pymeta's kernels use, so that tests can run
// the kernels of csrc/cuda on machines without a GPU. Each block's threads run as std::threads;
// the 32 lanes of a warp meet at every shuffle, as on the hardware. Violations of CUDA's rules
// that would be undefined behaviour on a GPU (a shuffle in a partial warp, lanes of a warp that
// diverge at a shuffle, a bad launch configuration) are reported as errors.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CUDART_VERSION 13000

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

namespace emu {

// The first problem found since the last cudaGetLastError (launches are synchronous here).
struct Errors {
  std::mutex m;
  cudaError_t code = cudaSuccess;
  std::string message;
  void set(cudaError_t c, const std::string& msg) {
    std::lock_guard<std::mutex> lock(m);
    if (code == cudaSuccess) code = c, message = msg;
  }
};
inline Errors errors;

// The emulated driver's CUDA version (PYMETA_EMULATED_DRIVER, default 13000). Drivers before
// CUDA 12.1 take at most 4 KB of kernel parameters; later ones 32,764 bytes.
inline int driver_version() {
  const char* v = std::getenv("PYMETA_EMULATED_DRIVER");
  return v && *v ? std::atoi(v) : 13000;
}
inline std::size_t max_param_bytes() { return driver_version() >= 12010 ? 32764 : 4096; }

// Lanes of one warp exchange values through slots, meeting at a barrier that times out (and
// reports divergence) instead of hanging.
struct Warp {
  explicit Warp(int n) : size(n) {}
  int size;
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0;
  unsigned long generation = 0;
  std::uint64_t slots[32] = {};
  void meet() {
    std::unique_lock<std::mutex> lock(m);
    const unsigned long g = generation;
    if (++arrived == size) {
      arrived = 0, ++generation;
      cv.notify_all();
      return;
    }
    if (!cv.wait_for(lock, std::chrono::seconds(20), [&] { return generation != g; })) {
      errors.set(cudaErrorLaunchFailure, "lanes of a warp diverged at a shuffle (deadlock)");
      arrived = 0, ++generation;
      cv.notify_all();
    }
  }
};

struct ThreadState {
  dim3 thread, block, block_dim, grid_dim;
  Warp* warp = nullptr;
};
inline thread_local ThreadState state;

template <class F>
void run(dim3 grid, dim3 block, const F& body) {
  if (block.x < 1 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.x < 1 ||
      grid.y != 1 || grid.z != 1) {
    errors.set(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  for (unsigned b = 0; b < grid.x; ++b) {
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned first = 0; first < block.x; first += 32)
      warps.push_back(std::make_unique<Warp>(int(std::min(32u, block.x - first))));
    std::vector<std::thread> threads;
    threads.reserve(block.x);
    for (unsigned t = 0; t < block.x; ++t)
      threads.emplace_back([&, t] {
        state = ThreadState{dim3(t), dim3(b), block, grid, warps[t / 32].get()};
        body();
      });
    for (auto& th : threads) th.join();
  }
}

template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  template <class... A>
  void operator()(A&&... args) const {
    if ((sizeof(P) + ... + 0) > max_param_bytes()) {
      errors.set(cudaErrorInvalidValue, "kernel parameters exceed the driver's limit");
      return;
    }
    run(grid, block, [&] { kernel(P(args)...); });  // by value per thread, as on a GPU
  }
};

}  // namespace emu

#define threadIdx (::emu::state.thread)
#define blockIdx (::emu::state.block)
#define blockDim (::emu::state.block_dim)
#define gridDim (::emu::state.grid_dim)

// What `kernel<<<grid, block, shared, stream>>>(args)` becomes (see build_emulated_core.py).
template <class... P>
emu::Launch<P...> emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t = 0,
                             cudaStream_t = nullptr) {
  return {kernel, grid, block};
}

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(emu::errors.m);
  const cudaError_t c = emu::errors.code;
  emu::errors.code = cudaSuccess;
  return c;
}
inline const char* cudaGetErrorString(cudaError_t) {
  thread_local std::string text;
  text = "emulated CUDA error: " + emu::errors.message;
  return text.c_str();
}
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t n, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  emu::Warp& w = *emu::state.warp;
  if (mask != 0xffffffffu || w.size != 32) {
    emu::errors.set(cudaErrorLaunchFailure, "full-mask shuffle in a partial warp");
    return v;
  }
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&w.slots[lane], &v, sizeof(T));
  w.meet();
  T r;
  std::memcpy(&r, &w.slots[(lane ^ unsigned(lane_mask)) % 32], sizeof(T));
  w.meet();
  return r;
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long v) {
  unsigned long long old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (v < old &&
         !__atomic_compare_exchange_n(address, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long v) {
  return __atomic_fetch_add(address, v, __ATOMIC_SEQ_CST);
}

template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
using std::sqrt;

// Half types with the bit layouts of torch's float16 and bfloat16 (round to nearest even).
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return __half{_Float16(f)}; }

struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const std::uint32_t u = std::uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{std::uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fff + ((u >> 16) & 1);
  return __nv_bfloat16{std::uint16_t(u >> 16)};
}
