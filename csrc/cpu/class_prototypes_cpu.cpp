// Per-class means on the CPU. Work units are (task, feature block), so one task with wide
// features still spreads over threads; every output element is summed in sample order.
#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_ops.h"
#include "cpu_utils.h"

namespace pymeta::cpu {
namespace {

constexpr std::int64_t kFeatureBlock = 512;

inline bool in_range(std::int64_t label, std::int64_t C) { return label >= 0 && label < C; }

// Per-task class counts; labels outside [0, C) are not counted.
std::vector<std::int64_t> class_counts(std::int64_t B, std::int64_t S, std::int64_t C,
                                       const std::int64_t* labels) {
  std::vector<std::int64_t> counts(B * C, 0);
  for (std::int64_t i = 0; i < B * S; ++i)
    if (in_range(labels[i], C)) ++counts[(i / S) * C + labels[i]];
  return counts;
}

LabelCheck check_labels(std::int64_t B, std::int64_t S, std::int64_t C,
                        const std::int64_t* labels, const std::vector<std::int64_t>& counts) {
  // Lowest task first; within a task, an out-of-range label before an empty class.
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t s = 0; s < S; ++s)
      if (!in_range(labels[b * S + s], C)) return {LabelCheck::OutOfRange, b, s, labels[b * S + s]};
    for (std::int64_t c = 0; c < C; ++c)
      if (counts[b * C + c] == 0) return {LabelCheck::EmptyClass, b, c, 0};
  }
  return {};
}

// One task's prototypes over features [d0, d0 + w): z and out point at feature d0 of the task;
// rows are D apart.
template <class T>
__attribute__((always_inline)) inline void prototype_block_impl(
    const T* __restrict__ z, const std::int64_t* __restrict__ labels,
    const std::int64_t* __restrict__ counts, std::int64_t S, std::int64_t C, std::int64_t D,
    std::int64_t w, T* __restrict__ out) {
  for (std::int64_t c = 0; c < C; ++c) std::fill(out + c * D, out + c * D + w, T(0));
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int64_t l = labels[s];
    if (!in_range(l, C)) continue;
    const T* __restrict__ zs = z + s * D;
    T* __restrict__ oc = out + l * D;
    for (std::int64_t d = 0; d < w; ++d) oc[d] += zs[d];
  }
  for (std::int64_t c = 0; c < C; ++c) {  // a scale, not a division, so this vectorises
    const std::int64_t n = counts[c];
    const T scale = n ? T(1) / static_cast<T>(n) : std::numeric_limits<T>::quiet_NaN();
    T* __restrict__ oc = out + c * D;
    for (std::int64_t d = 0; d < w; ++d) oc[d] *= scale;
  }
}

#define PYMETA_BLOCK_KERNEL(T)                                                               \
  PYMETA_SIMD_CLONES void prototype_block(const T* z, const std::int64_t* labels,           \
                                          const std::int64_t* counts, std::int64_t S,       \
                                          std::int64_t C, std::int64_t D, std::int64_t w,   \
                                          T* out) {                                          \
    prototype_block_impl(z, labels, counts, S, C, D, w, out);                                \
  }
PYMETA_BLOCK_KERNEL(float)
PYMETA_BLOCK_KERNEL(double)
#undef PYMETA_BLOCK_KERNEL

template <class T>
void forward(const Device& dev, std::int64_t B, std::int64_t S, std::int64_t C, std::int64_t D,
             const T* z, const std::int64_t* labels, const std::vector<std::int64_t>& counts,
             T* out) {
  const std::int64_t nblk = std::max<std::int64_t>(ceil_div(D, kFeatureBlock), 1);
  parallel_region(threads_for(dev, B * (S + C) * D), [&] {
#pragma omp for schedule(static)
    for (std::int64_t u = 0; u < B * nblk; ++u) {
      const std::int64_t b = u / nblk, d0 = (u % nblk) * kFeatureBlock;
      prototype_block(z + b * S * D + d0, labels + b * S, counts.data() + b * C, S, C, D,
                      std::min(kFeatureBlock, D - d0), out + b * C * D + d0);
    }
  });
}

// dst = scale * src over n features; streamed past the cache when asked (dst 16-byte aligned).
template <class T>
__attribute__((always_inline)) inline void scaled_row_impl(T* dst, const T* src, T scale,
                                                           std::int64_t n, bool stream) {
  constexpr int L = kLanes<T>;
  std::int64_t d = 0;
  for (; d + L <= n; d += L) {
    const Vec<T> v = scale * loadu(src + d);
    if (stream)
      stream_store(dst + d, v);
    else
      storeu(dst + d, v);
  }
  for (; d < n; ++d) dst[d] = scale * src[d];
}

PYMETA_SIMD_CLONES void scaled_row(float* dst, const float* src, float scale, std::int64_t n,
                                   bool stream) {
  scaled_row_impl(dst, src, scale, n, stream);
}
PYMETA_SIMD_CLONES void scaled_row(double* dst, const double* src, double scale, std::int64_t n,
                                   bool stream) {
  scaled_row_impl(dst, src, scale, n, stream);
}

template <class T>
void backward(const Device& dev, std::int64_t B, std::int64_t S, std::int64_t C, std::int64_t D,
              const T* g, const std::int64_t* labels, const std::vector<std::int64_t>& counts,
              T* gz) {
  // grad_z is written once, not read here: when it and grad_out outgrow the last-level cache
  // it bypasses the cache.
  const std::int64_t bytes = (B * S + B * C) * D * std::int64_t(sizeof(T));
  const bool stream = bytes >= past_cache_bytes() &&
                      aligned16(gz) && (D * sizeof(T)) % 16 == 0;
  parallel_region(threads_for(dev, B * S * D), [&] {
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < B * S; ++r) {
      const std::int64_t b = r / S, l = labels[r];
      if (in_range(l, C))
        scaled_row(gz + r * D, g + (b * C + l) * D, T(1) / static_cast<T>(counts[b * C + l]), D,
                   stream);
      else
        std::fill(gz + r * D, gz + r * D + D, T(0));
    }
    if (stream) stream_fence();
  });
}

}  // namespace

LabelCheck class_prototypes_forward(const Device& dev, DType dtype, std::int64_t B,
                                    std::int64_t S, std::int64_t C, std::int64_t D,
                                    const void* z, const std::int64_t* labels, void* out,
                                    bool validate) {
  const auto counts = class_counts(B, S, C, labels);
  if (validate) {
    const LabelCheck check = check_labels(B, S, C, labels, counts);
    if (check.status != LabelCheck::Ok) return check;
  }
  dispatch_float(dtype, "class_prototypes", [&](auto t) {
    using T = decltype(t);
    forward<T>(dev, B, S, C, D, static_cast<const T*>(z), labels, counts, static_cast<T*>(out));
  });
  return {};
}

void class_prototypes_backward(const Device& dev, DType dtype, std::int64_t B, std::int64_t S,
                               std::int64_t C, std::int64_t D, const void* grad_out,
                               const std::int64_t* labels, void* grad_z) {
  const auto counts = class_counts(B, S, C, labels);
  dispatch_float(dtype, "class_prototypes backward", [&](auto t) {
    using T = decltype(t);
    backward<T>(dev, B, S, C, D, static_cast<const T*>(grad_out), labels, counts,
                static_cast<T*>(grad_z));
  });
}

}  // namespace pymeta::cpu
