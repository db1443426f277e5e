// Fused multi-tensor SGD step (see SgdTensor in common.h): one launch per kMaxTensors tensors.
#include <algorithm>

#include "cuda_utils.cuh"

namespace pymeta::cuda {
namespace {

constexpr int kMaxTensors = 48;
constexpr unsigned kThreads = 256;
constexpr i64 kChunk = 8 * kThreads;  // elements of one tensor handled by one (virtual) block

// Passed by value as a kernel argument (no host-to-device copy). block_start is the prefix sum
// of the tensors' chunk counts: virtual block v belongs to tensor k with
// block_start[k] <= v < block_start[k + 1].
struct SgdBatch {
  SgdTensor tensors[kMaxTensors];
  i64 block_start[kMaxTensors + 1] = {};
  int count = 0;
};
static_assert(sizeof(SgdBatch) + sizeof(i64) + sizeof(double) <= 4096,
              "kernel parameters must stay within the 4 KB limit");

// out may alias p: each element is read and written by the same thread, so no __restrict__.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const SgdBatch batch, i64 tasks, acc_t<T> lr_scalar) {
  using A = acc_t<T>;
  const i64 total_blocks = batch.block_start[batch.count];
  for (i64 v = blockIdx.x; v < total_blocks; v += gridDim.x) {
    int k = 0;
    while (v >= batch.block_start[k + 1]) ++k;
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

}  // namespace

void sgd_step(const Device& dev, DType dtype, i64 T, const std::vector<SgdTensor>& tensors,
              double lr_scalar) {
  constexpr const char* kName = "sgd_step";
  if (T <= 0) return;
  // Check every tensor before launching anything, so a bad one leaves all of them untouched.
  bool any = false;
  for (const SgdTensor& t : tensors) {
    if (t.numel <= 0) continue;
    if (!t.out || !t.g)
      throw std::invalid_argument("pymeta CUDA kernel sgd_step: null out or g pointer");
    any = true;
  }
  if (!any) return;
  DeviceGuard guard(dev, kName);
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using S = typename decltype(tag)::type;
    SgdBatch batch;
    auto flush = [&] {
      if (batch.count == 0) return;
      sgd_kernel<S><<<grid_for(batch.block_start[batch.count]), kThreads, 0, guard.stream()>>>(
          batch, T, acc_t<S>(lr_scalar));
      check_launch(kName);
      batch = SgdBatch{};
    };
    for (const SgdTensor& t : tensors) {
      if (t.numel <= 0) continue;  // empty tensors take no slot
      batch.tensors[batch.count] = t;
      batch.block_start[batch.count + 1] =
          batch.block_start[batch.count] + ceil_div(T * t.numel, kChunk);
      if (++batch.count == kMaxTensors) flush();
    }
    flush();
  });
}

}  // namespace pymeta::cuda
