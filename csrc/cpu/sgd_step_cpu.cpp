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
// lr == nullptr meaning the scalar. With stream, aligned vectors of out bypass the cache.
template <class T>
__attribute__((always_inline)) inline void axpy_impl(T* out, const T* p, const T* g, const T* lr,
                                                     std::int64_t lr_is, T scalar,
                                                     std::int64_t n, bool stream) {
  if (lr && lr_is == 0) scalar = *lr;
  const bool per_element = lr && lr_is != 0;
  auto at = [&](std::int64_t e) {
    const T rate = per_element ? lr[e] : scalar;
    return (p ? p[e] : T(0)) - rate * g[e];
  };
  constexpr int L = kLanes<T>;
  std::int64_t e = 0;
  if (stream)  // peel to 16-byte alignment of out
    for (; e < n && !aligned16(out + e); ++e) out[e] = at(e);
  for (; e + L <= n; e += L) {
    const Vec<T> pv = p ? loadu(p + e) : Vec<T>{};
    const Vec<T> rate = per_element ? loadu(lr + e) : Vec<T>{} + scalar;
    const Vec<T> v = pv - rate * loadu(g + e);
    if (stream)
      stream_store(out + e, v);
    else
      storeu(out + e, v);
  }
  for (; e < n; ++e) out[e] = at(e);
}

PYMETA_SIMD_CLONES void axpy(float* out, const float* p, const float* g, const float* lr,
                             std::int64_t lr_is, float scalar, std::int64_t n, bool stream) {
  axpy_impl(out, p, g, lr, lr_is, scalar, n, stream);
}
PYMETA_SIMD_CLONES void axpy(double* out, const double* p, const double* g, const double* lr,
                             std::int64_t lr_is, double scalar, std::int64_t n, bool stream) {
  axpy_impl(out, p, g, lr, lr_is, scalar, n, stream);
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
  // In place (out == p), the lines are read anyway: streaming would only evict them.
  const bool stream = total * std::int64_t(sizeof(T)) >= kStreamBytes &&
                      std::none_of(ts.begin(), ts.end(),
                                   [](const SgdTensor& t) { return t.out == t.p; });
  parallel_region(threads_for(dev, total), [&] {
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
           static_cast<T>(lr), std::min(kChunk, s.numel - e0), stream);
    }
    if (stream) stream_fence();
  });

}

}  // namespace

void sgd_step(const Device& dev, DType dtype, std::int64_t T, const std::vector<SgdTensor>& ts,
              double lr) {
  dispatch_float(dtype, "sgd_step", [&](auto t) { step<decltype(t)>(dev, T, ts, lr); });
}

}  // namespace pymeta::cpu
