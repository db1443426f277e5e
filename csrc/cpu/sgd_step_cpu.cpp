// Fused SGD step over a list of tensors on the CPU: the whole list is cut into fixed-size
// chunks (never crossing a task slice) that one parallel loop shares out.
#include <algorithm>
#include <vector>

#include "cpu_ops.h"
#include "cpu_utils.h"

namespace pymeta::cpu {
namespace {

constexpr std::int64_t kChunk = 1 << 14;

// out[e] = p[e] - lr[e * lr_is] * g[e] for e < n, with p == nullptr read as 0 and
// lr == nullptr meaning the scalar.
template <class T>
__attribute__((always_inline)) inline void axpy_impl(T* out, const T* p, const T* g, const T* lr,
                                                     std::int64_t lr_is, T scalar,
                                                     std::int64_t n) {
  if (lr && lr_is == 0) scalar = *lr;
  if (!lr || lr_is == 0) {
    if (p)
      for (std::int64_t e = 0; e < n; ++e) out[e] = p[e] - scalar * g[e];
    else
      for (std::int64_t e = 0; e < n; ++e) out[e] = -scalar * g[e];
  } else {
    if (p)
      for (std::int64_t e = 0; e < n; ++e) out[e] = p[e] - lr[e] * g[e];
    else
      for (std::int64_t e = 0; e < n; ++e) out[e] = -lr[e] * g[e];
  }
}

PYMETA_SIMD_CLONES void axpy(float* out, const float* p, const float* g, const float* lr,
                             std::int64_t lr_is, float scalar, std::int64_t n) {
  axpy_impl(out, p, g, lr, lr_is, scalar, n);
}
PYMETA_SIMD_CLONES void axpy(double* out, const double* p, const double* g, const double* lr,
                             std::int64_t lr_is, double scalar, std::int64_t n) {
  axpy_impl(out, p, g, lr, lr_is, scalar, n);
}

template <class T>
void step(const Device& dev, std::int64_t T_, const std::vector<SgdTensor>& ts, double lr) {
  // first[i]: index of tensor i's first chunk; chunks of one tensor run task by task.
  std::vector<std::int64_t> first(ts.size() + 1, 0);
  std::int64_t total = 0;
  for (std::size_t i = 0; i < ts.size(); ++i) {
    first[i + 1] = first[i] + T_ * ceil_div(ts[i].numel, kChunk);
    total += T_ * ts[i].numel;
  }
#pragma omp parallel num_threads(threads_for(dev, total))
  {
    std::size_t i = 0;
#pragma omp for schedule(static)
    for (std::int64_t c = 0; c < first.back(); ++c) {
      while (c >= first[i + 1]) ++i;  // static schedule: c increases within a thread
      const SgdTensor& s = ts[i];
      const std::int64_t per_task = ceil_div(s.numel, kChunk), k = c - first[i];
      const std::int64_t t = k / per_task, e0 = (k % per_task) * kChunk;
      const T* p = static_cast<const T*>(s.p);
      const T* l = static_cast<const T*>(s.lr);
      axpy(static_cast<T*>(s.out) + t * s.numel + e0, p ? p + t * s.p_task_stride + e0 : nullptr,
           static_cast<const T*>(s.g) + t * s.g_task_stride + e0,
           l ? l + t * s.lr_task_stride + e0 * s.lr_inner_stride : nullptr, s.lr_inner_stride,
           static_cast<T>(lr), std::min(kChunk, s.numel - e0));
    }
  }
}

}  // namespace

void sgd_step(const Device& dev, DType dtype, std::int64_t T, const std::vector<SgdTensor>& ts,
              double lr) {
  dispatch_float(dtype, "sgd_step", [&](auto t) { step<decltype(t)>(dev, T, ts, lr); });
}

}  // namespace pymeta::cpu
