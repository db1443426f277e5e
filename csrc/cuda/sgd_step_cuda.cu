// Fused multi-tensor SGD step (see SgdTensor in common.h): one launch for up to kLargeBatch
// tensors.
#include <algorithm>

#include "cuda_utils.cuh"

namespace pymeta::cuda {
namespace {

constexpr unsigned kThreads = 256;
constexpr i64 kChunk = 8 * kThreads;  // elements of one tensor handled by one (virtual) block

// Passed by value as a kernel argument (no host-to-device copy). block_start is the prefix sum
// of the tensors' chunk counts: virtual block v belongs to tensor k with
// block_start[k] <= v < block_start[k + 1]. Two capacities: conv4-sized lists take the small
// one (less to copy per launch); longer ones (ResNet-12's 62 tensors) fit the large one, in the
// 32,764 bytes of parameters that drivers of CUDA >= 12.1 allow on Volta and newer (older
// drivers, which a CUDA 12.x build accepts, get small batches only).
template <int N>
struct SgdBatch {
  SgdTensor tensors[N];
  i64 block_start[N + 1] = {};
  int count = 0;
};
constexpr int kSmallBatch = 48, kLargeBatch = 384;
static_assert(sizeof(SgdBatch<kSmallBatch>) + sizeof(i64) + sizeof(double) <= 4096,
              "the small batch must stay within the classic 4 KB of kernel parameters");
static_assert(sizeof(SgdBatch<kLargeBatch>) + sizeof(i64) + sizeof(double) <= 32764,
              "kernel parameters must stay within 32,764 bytes");

// The tensor of virtual block v: the last k with block_start[k] <= v (every tensor in a batch
// has at least one chunk, so block_start increases strictly).
template <int N>
__device__ __forceinline__ int tensor_of_block(const SgdBatch<N>& batch, i64 v) {
  int lo = 0, hi = batch.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.block_start[mid] <= v)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// out may alias p: each element is read and written by the same thread, so no __restrict__.
template <class T, int N>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const SgdBatch<N> batch, i64 tasks, acc_t<T> lr_scalar) {
  using A = acc_t<T>;
  const i64 total_blocks = batch.block_start[batch.count];
  for (i64 v = blockIdx.x; v < total_blocks; v += gridDim.x) {
    const int k = tensor_of_block(batch, v);
    const SgdTensor& t = batch.tensors[k];
    const T* p = static_cast<const T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    const T* lr = static_cast<const T*>(t.lr);
    T* out = static_cast<T*>(t.out);
    const i64 M = t.numel, begin = (v - batch.block_start[k]) * kChunk;
    const i64 end = min(begin + kChunk, tasks * M);
    i64 i = begin + threadIdx.x;
    // (task, element) of i by one division per chunk, then stepped along with i
    i64 task = i / M, e = i - task * M;
    for (; i < end; i += blockDim.x) {
      const A pv = p ? to_acc(p[task * t.p_task_stride + e]) : A(0);
      const A rate = lr ? to_acc(lr[task * t.lr_task_stride + e * t.lr_inner_stride]) : lr_scalar;
      out[i] = from_acc<T>(pv - rate * to_acc(g[task * t.g_task_stride + e]));
      for (e += blockDim.x; e >= M; e -= M) ++task;  // M may be smaller than the stride
    }
  }
}

// Launches the live tensors in batches of N (one launch when they fit).
template <class S, int N>
void launch_batches(const std::vector<SgdTensor>& tensors, i64 T, double lr_scalar,
                    cudaStream_t stream, const char* name) {
  SgdBatch<N> batch;
  auto flush = [&] {
    if (batch.count == 0) return;
    sgd_kernel<S, N><<<grid_for(batch.block_start[batch.count]), kThreads, 0, stream>>>(
        batch, T, acc_t<S>(lr_scalar));
    check_launch(name);
    batch = SgdBatch<N>{};
  };
  for (const SgdTensor& t : tensors) {
    if (t.numel <= 0) continue;  // empty tensors take no slot
    batch.tensors[batch.count] = t;
    batch.block_start[batch.count + 1] =
        batch.block_start[batch.count] + ceil_div(T * t.numel, kChunk);
    if (++batch.count == N) flush();
  }
  flush();
}

}  // namespace

void sgd_step(const Device& dev, DType dtype, i64 T, const std::vector<SgdTensor>& tensors,
              double lr_scalar) {
  constexpr const char* kName = "sgd_step";
  if (T <= 0) return;
  // Check every tensor before launching anything, so a bad one leaves all of them untouched.
  int live = 0;
  for (const SgdTensor& t : tensors) {
    if (t.numel <= 0) continue;
    if (!t.out || !t.g)
      throw std::invalid_argument("pymeta CUDA kernel sgd_step: null out or g pointer");
    ++live;
  }
  if (live == 0) return;
  DeviceGuard guard(dev, kName);
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using S = typename decltype(tag)::type;
    if (live <= kSmallBatch || !large_kernel_params())
      launch_batches<S, kSmallBatch>(tensors, T, lr_scalar, guard.stream(), kName);
    else
      launch_batches<S, kLargeBatch>(tensors, T, lr_scalar, guard.stream(), kName);
  });
}

}  // namespace pymeta::cuda
