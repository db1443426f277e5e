// Shared helpers of the CUDA kernels: error checks, the device guard, stream-ordered scratch
// memory, dtype dispatch and load/store conversions (float accumulation, double for Float64).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "cuda_ops.h"

namespace pymeta::cuda {

using i64 = std::int64_t;

// Throws std::runtime_error("pymeta CUDA kernel <name> failed: <reason>") on any error.
void check(cudaError_t err, const char* name);
#define PYMETA_CUDA_CHECK(name, expr) ::pymeta::cuda::check((expr), (name))

// Call after every launch: catches bad launch configurations (and earlier asynchronous errors).
inline void check_launch(const char* name) { check(cudaGetLastError(), name); }

// Throws a clear std::runtime_error when there is no driver or GPU, or the driver is older than
// the CUDA runtime pymeta was built with. Checked once per process (until it succeeds).
void ensure_driver();

// Whether kernels may take more than 4 KB of parameters (drivers of CUDA 12.1 and later).
bool large_kernel_params();

// Runs ensure_driver, then makes dev.index the current device for the scope.
class DeviceGuard {
 public:
  DeviceGuard(const Device& dev, const char* name);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaStream_t stream() const { return stream_; }

 private:
  int prev_ = -1;
  int index_ = -1;
  cudaStream_t stream_ = nullptr;
};

// Device scratch memory allocated and freed in stream order (no device-wide sync), from a pool
// of pymeta's own.
class Scratch {
 public:
  Scratch(std::size_t bytes, cudaStream_t stream, const char* name);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool synchronous_ = false;  // cudaMalloc'd: the device has no memory pools
};

// Grid-stride loops cover any amount of work, so grids are capped well below the hardware limit
// (tests/cuda_emulator builds with a cap of a few blocks, so that the loops wrap).
#ifndef PYMETA_CUDA_MAX_BLOCKS
#define PYMETA_CUDA_MAX_BLOCKS (i64(1) << 20)
#endif
constexpr i64 kMaxBlocks = PYMETA_CUDA_MAX_BLOCKS;
inline unsigned grid_for(i64 blocks) { return unsigned(std::clamp<i64>(blocks, 1, kMaxBlocks)); }
// Threads for a block whose threads stride over a row of D elements.
inline unsigned threads_for(i64 D) {
  return unsigned(std::clamp<i64>(ceil_div(D, 32) * 32, 32, 512));
}

// Calls f(TypeTag<T>{}) with the storage type T of dtype.
template <class T>
struct TypeTag {
  using type = T;
};
template <class F>
void dispatch_dtype(DType dtype, const char* name, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float16: return f(TypeTag<__half>{});
    case DType::BFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  const std::string code = std::to_string(static_cast<int>(dtype));
  throw std::invalid_argument(std::string("pymeta CUDA kernel ") + name + ": bad dtype " + code);
}

// Accumulation type: float for every storage type except double.
template <class T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_acc(acc_t<T> v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Sum over the 32 lanes of a warp; every lane gets the result. All lanes must call it.
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace pymeta::cuda
