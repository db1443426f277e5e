// Shared types of the raw-buffer kernel core. Nothing here includes libtorch:
// callers pass data pointers, sizes and a CUDA stream handle.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pymeta {

// Codes shared with pymeta/ops/_kernels.py.
// Host scratch a kernel could not allocate; bindings.cpp raises it as MemoryError.
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };
enum class Metric : int { SqEuclidean = 0, Euclidean = 1, Cosine = 2, Dot = 3 };

// Where a kernel runs. index < 0 is the CPU.
struct Device {
  int index = -1;
  std::uintptr_t stream = 0;  // cudaStream_t on CUDA
  int nthreads = 1;           // OpenMP threads on CPU
  bool is_cuda() const { return index >= 0; }
};

// F.cosine_similarity's eps: each norm is clamped below by it.
constexpr double kCosineEps = 1e-8;

// Result of label validation in class_prototypes_forward.
struct LabelCheck {
  enum Status : std::int64_t { Ok = 0, OutOfRange = 1, EmptyClass = 2 };
  std::int64_t status = Ok;
  std::int64_t task = -1;
  std::int64_t index = -1;  // sample index (OutOfRange) or class (EmptyClass)
  std::int64_t value = 0;   // offending label (OutOfRange)
};

// One tensor of a fused sgd_step: out[t*M + i] = p[t*p_ts + i] - lr(t, i) * g[t*g_ts + i],
// where lr(t, i) = lr ? lr[t*lr_ts + i*lr_is] : scalar. p may be null (read as 0),
// which gives the gradient -lr*g used by the backward pass. out may alias p.
struct SgdTensor {
  void* out = nullptr;
  const void* p = nullptr;
  const void* g = nullptr;
  const void* lr = nullptr;
  std::int64_t p_task_stride = 0;
  std::int64_t g_task_stride = 0;
  std::int64_t lr_task_stride = 0;
  std::int64_t lr_inner_stride = 0;
  std::int64_t numel = 0;  // M, elements per task
};

// One conv4 block tail for batch_norm_relu_pool: NHWC x [N, H, W, K], BatchNorm's affine
// weight and bias [K] and eps, and the batch mean and biased variance [K] in float64, which
// forward writes and the backward passes read.
struct BnReluPool {
  std::int64_t N = 0, H = 0, W = 0, K = 0;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  double eps = 0;
  double* mean = nullptr;
  double* var = nullptr;
};

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace pymeta
