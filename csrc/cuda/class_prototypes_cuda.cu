// Per-class means of z [B,S,D] under int64 labels [B,S] (see ops.h), and their gradient.
// The forward's blocks scan their task's labels in order: deterministic, no atomics on the
// outputs, and (summed in sample order, scaled by 1/count) bitwise the CPU kernels' float32
// and float64 results. Class counts (validation, backward) take one pass with integer atomics. Labels
// outside [0, C) are never used as an index.
#include <cmath>

#include "cuda_utils.cuh"

namespace pymeta::cuda {
namespace {

using Key = unsigned long long;
using Count = unsigned long long;
constexpr Key kNoProblem = ~Key(0);
constexpr unsigned kFlatThreads = 256;  // blocks of the label-wise kernels

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
      out[row * D + d] = from_acc<T>(count > 0 ? sum * (A(1) / A(count)) : A(NAN));
    }
  }
}

// Problems are ordered by key = (2*task + kind) * K + index with kind 0 = out-of-range label
// (index = sample), 1 = empty class (index = class), K = max(S, C): the lowest task wins, and
// within it an out-of-range label comes before an empty class. atomicMin makes it deterministic.
__device__ __forceinline__ Key problem_key(i64 b, i64 kind, i64 index, i64 K) {
  return Key((2 * b + kind) * K + index);
}

// Threads over all B*S labels: counts[b, label] (zeroed before) for labels in [0, C); the first
// out-of-range label goes to *first when given. Integer atomics: exact in any order.
__global__ void count_kernel(i64 B, i64 S, i64 C, const i64* __restrict__ labels,
                             Count* __restrict__ counts, Key* __restrict__ first) {
  const i64 K = max(S, C);
  for (i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x; i < B * S;
       i += i64(gridDim.x) * blockDim.x) {
    const i64 b = i / S, label = labels[i];
    if (label >= 0 && label < C)
      atomicAdd(counts + b * C + label, Count(1));
    else if (first)
      atomicMin(first, problem_key(b, 0, i % S, K));
  }
}

// Threads over all B*C classes: a class without an example goes to *first.
__global__ void empty_class_kernel(i64 B, i64 S, i64 C, const Count* __restrict__ counts,
                                   Key* __restrict__ first) {
  const i64 K = max(S, C);
  for (i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x; i < B * C;
       i += i64(gridDim.x) * blockDim.x)
    if (counts[i] == 0) atomicMin(first, problem_key(i / C, 1, i % C, K));
}

// Scratch counts [B, C] of each class's examples, filled by count_kernel.
class ClassCounts {
 public:
  ClassCounts(i64 B, i64 S, i64 C, const i64* labels, Key* first, cudaStream_t stream,
              const char* name)
      : scratch_(std::max<i64>(B * C, 1) * sizeof(Count), stream, name) {
    PYMETA_CUDA_CHECK(name, cudaMemsetAsync(get(), 0, B * C * sizeof(Count), stream));
    count_kernel<<<grid_for(ceil_div(B * S, kFlatThreads)), kFlatThreads, 0, stream>>>(
        B, S, C, labels, get(), first);
    check_launch(name);
  }
  Count* get() const { return scratch_.as<Count>(); }

 private:
  Scratch scratch_;
};

// One block per (b, s), threads over D: grad_z[b,s,:] = grad_out[b,l,:] / count(l), l = label
// (zero for a label outside [0, C), which only unvalidated calls can pass).
template <class T>
__global__ void backward_kernel(i64 B, i64 S, i64 C, i64 D, const T* __restrict__ grad_out,
                                const i64* __restrict__ labels, const Count* __restrict__ counts,
                                T* __restrict__ grad_z) {
  using A = acc_t<T>;
  for (i64 row = blockIdx.x; row < B * S; row += gridDim.x) {
    const i64 b = row / S, label = labels[row];
    const bool valid = label >= 0 && label < C;
    const A scale = valid ? A(1) / A(counts[b * C + label]) : A(0);  // count >= 1: the row
    const T* g = grad_out + (b * C + (valid ? label : 0)) * D;
    for (i64 d = threadIdx.x; d < D; d += blockDim.x)
      grad_z[row * D + d] = from_acc<T>(valid ? to_acc(g[d]) * scale : A(0));
  }
}

// Counts each class's examples, finds the first problem and copies it to the host
// (synchronizes the stream).
LabelCheck validate(i64 B, i64 S, i64 C, const i64* labels, cudaStream_t stream, const char* name) {
  Scratch first(sizeof(Key), stream, name);
  PYMETA_CUDA_CHECK(name, cudaMemsetAsync(first.as<Key>(), 0xFF, sizeof(Key), stream));
  const ClassCounts counts(B, S, C, labels, first.as<Key>(), stream, name);
  empty_class_kernel<<<grid_for(ceil_div(B * C, kFlatThreads)), kFlatThreads, 0, stream>>>(
      B, S, C, counts.get(), first.as<Key>());
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
  const ClassCounts counts(B, S, C, labels, nullptr, guard.stream(), kName);
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    backward_kernel<T><<<grid_for(B * S), threads_for(D), 0, guard.stream()>>>(
        B, S, C, D, static_cast<const T*>(grad_out), labels, counts.get(),
        static_cast<T*>(grad_z));
    check_launch(kName);
  });
}

}  // namespace pymeta::cuda
