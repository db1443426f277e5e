// Fused SGD step over a list of tensors on the CPU: one parallel region in which each thread
// updates an equal share of the list's elements.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"
#include "cpu_utils.h"

namespace pymeta::cpu {
namespace {

// out[e] = p[e] - rate * g[e] for e < n, with p == nullptr read as 0 and rate lr[e] when
// per_element, else scalar. Each case is its own loop: with the choices hoisted out of the
// vector loop, GCC emits a plain unrolled AVX loop (a single loop with the branches inside
// ran about 25% slower than torch.add).
template <bool HasP, bool PerElement, bool Stream, class T>
__attribute__((always_inline)) inline void axpy_loop(T* out, const T* p, const T* g, const T* lr,
                                                     T scalar, std::int64_t n) {
  auto at = [&](std::int64_t e) {
    const T rate = PerElement ? lr[e] : scalar;
    return (HasP ? p[e] : T(0)) - rate * g[e];
  };
  constexpr int L = kLanes<T>;
  std::int64_t e = 0;
  if constexpr (Stream)  // peel to 16-byte alignment of out
    for (; e < n && !aligned16(out + e); ++e) out[e] = at(e);
  const Vec<T> s = Vec<T>{} + scalar;
  for (; e + L <= n; e += L) {
    Vec<T> v = (PerElement ? loadu(lr + e) : s) * loadu(g + e);
    v = (HasP ? loadu(p + e) : Vec<T>{}) - v;  // 0 - x, not -x: +0 for a zero product
    if constexpr (Stream)
      stream_store(out + e, v);
    else
      storeu(out + e, v);
  }
  for (; e < n; ++e) out[e] = at(e);
}

template <class T>
__attribute__((always_inline)) inline void axpy_impl(T* out, const T* p, const T* g, const T* lr,
                                                     std::int64_t lr_is, T scalar,
                                                     std::int64_t n, bool stream) {
  if (lr && lr_is == 0) scalar = *lr;
  const bool per_element = lr && lr_is != 0;
  auto run = [&](auto has_p, auto per_elem, auto strm) {
    axpy_loop<decltype(has_p)::value, decltype(per_elem)::value, decltype(strm)::value>(
        out, p, g, lr, scalar, n);
  };
  using std::false_type, std::true_type;
  auto with_stream = [&](auto has_p, auto per_elem) {
    stream ? run(has_p, per_elem, true_type{}) : run(has_p, per_elem, false_type{});
  };
  auto with_rate = [&](auto has_p) {
    per_element ? with_stream(has_p, true_type{}) : with_stream(has_p, false_type{});
  };
  p ? with_rate(true_type{}) : with_rate(false_type{});
}

PYMETA_SIMD_CLONES void axpy(float* out, const float* p, const float* g, const float* lr,
                             std::int64_t lr_is, float scalar, std::int64_t n, bool stream) {
  axpy_impl(out, p, g, lr, lr_is, scalar, n, stream);
}
PYMETA_SIMD_CLONES void axpy(double* out, const double* p, const double* g, const double* lr,
                             std::int64_t lr_is, double scalar, std::int64_t n, bool stream) {
  axpy_impl(out, p, g, lr, lr_is, scalar, n, stream);
}

// Updates elements [lo, hi) of the list seen as one array: tensor i holds elements
// [first[i], first[i + 1]), task slice after task slice.
template <class T>
void step_range(const std::vector<SgdTensor>& ts, const std::vector<std::int64_t>& first,
                std::int64_t lo, std::int64_t hi, T lr, bool stream) {
  std::size_t i = std::upper_bound(first.begin(), first.end(), lo) - first.begin() - 1;
  for (std::int64_t e = lo; e < hi; ++i) {
    const SgdTensor& s = ts[i];
    for (std::int64_t k = e - first[i]; e < hi && k < first[i + 1] - first[i];) {
      const std::int64_t t = k / s.numel, e0 = k % s.numel;
      const std::int64_t n = std::min(s.numel - e0, hi - e);
      const T* p = static_cast<const T*>(s.p);
      const T* l = static_cast<const T*>(s.lr);
      axpy(static_cast<T*>(s.out) + k, p ? p + t * s.p_task_stride + e0 : nullptr,
           static_cast<const T*>(s.g) + t * s.g_task_stride + e0,
           l ? l + t * s.lr_task_stride + e0 * s.lr_inner_stride : nullptr, s.lr_inner_stride,
           lr, n, stream);
      e += n;
      k += n;
    }
  }
}

template <class T>
void step(const Device& dev, std::int64_t T_, const std::vector<SgdTensor>& ts, double lr) {
  std::vector<std::int64_t> first(ts.size() + 1, 0);
  std::int64_t touched = 0;  // elements read or written: the kernel's working set
  for (std::size_t i = 0; i < ts.size(); ++i) {
    const SgdTensor& s = ts[i];
    first[i + 1] = first[i] + T_ * s.numel;
    touched += T_ * s.numel * (1 + (s.g_task_stride != 0) + (s.p && s.p_task_stride != 0)) +
               s.numel * ((s.g_task_stride == 0) + (s.p && s.p_task_stride == 0));
  }
  const std::int64_t total = first.back();
  // Outputs bypass the cache only when the operands outgrow it (they then come from memory
  // anyway), and never in place (out == p): its lines are read anyway.
  const bool stream = touched * std::int64_t(sizeof(T)) >= past_cache_bytes() &&
                      std::none_of(ts.begin(), ts.end(),
                                   [](const SgdTensor& t) { return t.out == t.p; });
  // Equal element counts per thread, whatever the tensor sizes (chunks of one size shared
  // out by count left one thread 40% more bytes on conv4), split at cache-line multiples.
  parallel_region(threads_for(dev, total), [&] {
    const std::int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    constexpr std::int64_t kLine = 64 / sizeof(T);
    auto bound = [&](std::int64_t j) { return std::min(total, ceil_div(total * j / nt, kLine) * kLine); };
    step_range<T>(ts, first, bound(id), bound(id + 1), static_cast<T>(lr), stream);
    if (stream) stream_fence();
  });
}

}  // namespace

void sgd_step(const Device& dev, DType dtype, std::int64_t T, const std::vector<SgdTensor>& ts,
              double lr) {
  dispatch_float(dtype, "sgd_step", [&](auto t) { step<decltype(t)>(dev, T, ts, lr); });
}

}  // namespace pymeta::cpu
