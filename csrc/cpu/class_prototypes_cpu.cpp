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
  for (std::int64_t b = 0; b < B; ++b)  // nested: no 64-bit division per label
    for (std::int64_t s = 0; s < S; ++s)
      if (const std::int64_t l = labels[b * S + s]; in_range(l, C)) ++counts[b * C + l];
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

// Each task's samples grouped by class, in sample order: class c of task b owns
// index[first[b * (C + 1) + c], first[b * (C + 1) + c + 1]), sample numbers in the task.
struct ClassMembers {
  std::vector<std::int64_t> first, index;

  ClassMembers(std::int64_t B, std::int64_t S, std::int64_t C, const std::int64_t* labels,
               const std::vector<std::int64_t>& counts)
      : first(B * (C + 1)), index(B * S) {
    std::vector<std::int64_t> next(C);
    for (std::int64_t b = 0; b < B; ++b) {
      std::int64_t* f = first.data() + b * (C + 1);
      f[0] = b * S;
      for (std::int64_t c = 0; c < C; ++c) f[c + 1] = f[c] + counts[b * C + c];
      std::copy(f, f + C, next.begin());
      for (std::int64_t s = 0; s < S; ++s)
        if (const std::int64_t l = labels[b * S + s]; in_range(l, C)) index[next[l]++] = s;
    }
  }
};

// One task's prototypes over features [d0, d0 + w): z and out point at feature d0 of the task,
// rows D apart; first and index are the task's ClassMembers. Four vectors of a class's rows are
// summed in registers and stored once (summed in sample order, as a loop of += would).
template <class T>
__attribute__((always_inline)) inline void prototype_block_impl(
    const T* __restrict__ z, const std::int64_t* __restrict__ first,
    const std::int64_t* __restrict__ index, std::int64_t C, std::int64_t D, std::int64_t w,
    T* __restrict__ out) {
  constexpr int L = kLanes<T>;
  for (std::int64_t c = 0; c < C; ++c, out += D) {
    const std::int64_t* rows = index + first[c];
    const std::int64_t n = first[c + 1] - first[c];
    const T scale = n ? T(1) / static_cast<T>(n) : std::numeric_limits<T>::quiet_NaN();
    std::int64_t d = 0;
    for (; d + 4 * L <= w; d += 4 * L) {
      Vec<T> a0{}, a1{}, a2{}, a3{};
      for (std::int64_t k = 0; k < n; ++k) {
        const T* zs = z + rows[k] * D + d;
        a0 += loadu(zs);
        a1 += loadu(zs + L);
        a2 += loadu(zs + 2 * L);
        a3 += loadu(zs + 3 * L);
      }
      storeu(out + d, a0 * scale);
      storeu(out + d + L, a1 * scale);
      storeu(out + d + 2 * L, a2 * scale);
      storeu(out + d + 3 * L, a3 * scale);
    }
    for (; d < w; ++d) {
      T a = 0;
      for (std::int64_t k = 0; k < n; ++k) a += z[rows[k] * D + d];
      out[d] = a * scale;
    }
  }
}

#define PYMETA_BLOCK_KERNEL(T)                                                              \
  PYMETA_SIMD_CLONES void prototype_block(const T* z, const std::int64_t* first,           \
                                          const std::int64_t* index, std::int64_t C,       \
                                          std::int64_t D, std::int64_t w, T* out) {        \
    prototype_block_impl(z, first, index, C, D, w, out);                                    \
  }
PYMETA_BLOCK_KERNEL(float)
PYMETA_BLOCK_KERNEL(double)
#undef PYMETA_BLOCK_KERNEL

template <class T>
void forward(const Device& dev, std::int64_t B, std::int64_t S, std::int64_t C, std::int64_t D,
             const T* z, const std::int64_t* labels, const std::vector<std::int64_t>& counts,
             T* out) {
  const ClassMembers m(B, S, C, labels, counts);
  const std::int64_t nblk = std::max<std::int64_t>(ceil_div(D, kFeatureBlock), 1);
  parallel_region(threads_for(dev, B * (S + C) * D), [&] {
#pragma omp for schedule(static)
    for (std::int64_t u = 0; u < B * nblk; ++u) {
      const std::int64_t b = u / nblk, d0 = (u % nblk) * kFeatureBlock;
      prototype_block(z + b * S * D + d0, m.first.data() + b * (C + 1), m.index.data(), C, D,
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
