// Per-class means of z [B,S,D] under int64 labels [B,S] (see ops.h), and their gradient.
// Few-shot S is small, so each block scans its task's labels in order: deterministic, no atomics
// on the outputs, and labels outside [0, C) are never used as an index.
#include <cmath>

#include "cuda_utils.cuh"

namespace pymeta::cuda {
namespace {

using Key = unsigned long long;
constexpr Key kNoProblem = ~Key(0);
constexpr unsigned kValidateThreads = 128;

// One block per (b, c), threads over D: out[b,c,:] = mean of the rows labelled c, NaN if none.
template <class T>
__global__ void forward_kernel(i64 B, i64 S, i64 C, i64 D, const T* __restrict__ z,
                               const i64* __restrict__ labels, T* __restrict__ out) {
  using A = acc_t<T>;
  for (i64 row = blockIdx.x; row < B * C; row += gridDim.x) {
    const i64 b = row / C, c = row % C;
    const i64* lab = labels + b * S;
    for (i64 d = threadIdx.x; d < D; d += blockDim.x) {
      A sum = 0;
      i64 count = 0;
      for (i64 s = 0; s < S; ++s) {
        if (lab[s] != c) continue;
        sum += to_acc(z[(b * S + s) * D + d]);
        ++count;
      }
      out[row * D + d] = from_acc<T>(count > 0 ? sum / A(count) : A(NAN));
    }
  }
}

// Problems are ordered by key = (2*task + kind) * K + index with kind 0 = out-of-range label
// (index = sample), 1 = empty class (index = class), K = max(S, C): the lowest task wins, and
// within it an out-of-range label comes before an empty class. atomicMin makes it deterministic.
__device__ __forceinline__ Key problem_key(i64 b, i64 kind, i64 index, i64 K) {
  return Key((2 * b + kind) * K + index);
}

// One block per task; only the per-thread first hit is reported, the rest cannot be lower.
__global__ void validate_kernel(i64 B, i64 S, i64 C, const i64* __restrict__ labels,
                                Key* __restrict__ first) {
  const i64 K = max(S, C);
  for (i64 b = blockIdx.x; b < B; b += gridDim.x) {
    const i64* lab = labels + b * S;
    for (i64 s = threadIdx.x; s < S; s += blockDim.x) {
      if (lab[s] < 0 || lab[s] >= C) {
        atomicMin(first, problem_key(b, 0, s, K));
        break;
      }
    }
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
      bool found = false;
      for (i64 s = 0; s < S && !found; ++s) found = lab[s] == c;
      if (!found) {
        atomicMin(first, problem_key(b, 1, c, K));
        break;
      }
    }
  }
}

// One block per (b, s), threads over D: grad_z[b,s,:] = grad_out[b,l,:] / count(l), l = label.
template <class T>
__global__ void backward_kernel(i64 B, i64 S, i64 C, i64 D, const T* __restrict__ grad_out,
                                const i64* __restrict__ labels, T* __restrict__ grad_z) {
  using A = acc_t<T>;
  for (i64 row = blockIdx.x; row < B * S; row += gridDim.x) {
    const i64 b = row / S, label = labels[row];
    const bool valid = label >= 0 && label < C;
    i64 count = 0;  // >= 1 for a valid label: the row itself
    if (valid)
      for (i64 s = 0; s < S; ++s) count += labels[b * S + s] == label;
    const T* g = grad_out + (b * C + (valid ? label : 0)) * D;
    for (i64 d = threadIdx.x; d < D; d += blockDim.x)
      grad_z[row * D + d] = from_acc<T>(valid ? to_acc(g[d]) / A(count) : A(0));
  }
}

// Runs validate_kernel and copies its verdict to the host (synchronizes the stream).
LabelCheck validate(i64 B, i64 S, i64 C, const i64* labels, cudaStream_t stream, const char* name) {
  Scratch first(sizeof(Key), stream, name);
  PYMETA_CUDA_CHECK(name, cudaMemsetAsync(first.as<Key>(), 0xFF, sizeof(Key), stream));
  validate_kernel<<<grid_for(B), kValidateThreads, 0, stream>>>(B, S, C, labels, first.as<Key>());
  check_launch(name);
  Key key = kNoProblem;
  PYMETA_CUDA_CHECK(name, cudaMemcpyAsync(&key, first.as<Key>(), sizeof(Key),
                                          cudaMemcpyDeviceToHost, stream));
  PYMETA_CUDA_CHECK(name, cudaStreamSynchronize(stream));
  if (key == kNoProblem) return LabelCheck{};
  const i64 K = std::max(S, C);
  LabelCheck result;
  result.task = i64(key / Key(2 * K));
  result.index = i64(key % Key(K));
  if ((key / Key(K)) % 2 == 1) {
    result.status = LabelCheck::EmptyClass;
    return result;
  }
  result.status = LabelCheck::OutOfRange;
  PYMETA_CUDA_CHECK(name, cudaMemcpyAsync(&result.value, labels + result.task * S + result.index,
                                          sizeof(i64), cudaMemcpyDeviceToHost, stream));
  PYMETA_CUDA_CHECK(name, cudaStreamSynchronize(stream));
  return result;
}

}  // namespace

LabelCheck class_prototypes_forward(const Device& dev, DType dtype, i64 B, i64 S, i64 C, i64 D,
                                    const void* z, const i64* labels, void* out,
                                    bool validate_labels) {
  constexpr const char* kName = "class_prototypes_forward";
  const bool compute = B > 0 && C > 0 && D > 0;
  // Validation still runs when out is empty (D == 0): labels can be wrong regardless.
  const bool check_labels = validate_labels && B > 0 && (S > 0 || C > 0);
  if (!compute && !check_labels) return LabelCheck{};
  DeviceGuard guard(dev, kName);
  if (compute) {
    dispatch_dtype(dtype, kName, [&](auto tag) {
      using T = typename decltype(tag)::type;
      forward_kernel<T><<<grid_for(B * C), threads_for(D), 0, guard.stream()>>>(
          B, S, C, D, static_cast<const T*>(z), labels, static_cast<T*>(out));
      check_launch(kName);
    });
  }
  return check_labels ? validate(B, S, C, labels, guard.stream(), kName) : LabelCheck{};
}

void class_prototypes_backward(const Device& dev, DType dtype, i64 B, i64 S, i64 C, i64 D,
                               const void* grad_out, const i64* labels, void* grad_z) {
  constexpr const char* kName = "class_prototypes_backward";
  if (B <= 0 || S <= 0 || D <= 0) return;  // empty grad_z (C == 0 still writes zeros)
  DeviceGuard guard(dev, kName);
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    backward_kernel<T><<<grid_for(B * S), threads_for(D), 0, guard.stream()>>>(
        B, S, C, D, static_cast<const T*>(grad_out), labels, static_cast<T*>(grad_z));
    check_launch(kName);
  });
}

}  // namespace pymeta::cuda
