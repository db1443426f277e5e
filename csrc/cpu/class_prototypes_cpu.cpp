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

template <class T>
void forward(const Device& dev, std::int64_t B, std::int64_t S, std::int64_t C, std::int64_t D,
             const T* z, const std::int64_t* labels, const std::vector<std::int64_t>& counts,
             T* out) {
  const std::int64_t nblk = std::max<std::int64_t>(ceil_div(D, kFeatureBlock), 1);
#pragma omp parallel for num_threads(threads_for(dev, B * (S + C) * D)) schedule(static)
  for (std::int64_t u = 0; u < B * nblk; ++u) {
    const std::int64_t b = u / nblk, d0 = (u % nblk) * kFeatureBlock;
    const std::int64_t w = std::min(kFeatureBlock, D - d0);
    T* ob = out + b * C * D + d0;
    for (std::int64_t c = 0; c < C; ++c) std::fill(ob + c * D, ob + c * D + w, T(0));
    for (std::int64_t s = 0; s < S; ++s) {
      const std::int64_t l = labels[b * S + s];
      if (!in_range(l, C)) continue;
      const T* zs = z + (b * S + s) * D + d0;
      T* oc = ob + l * D;
      for (std::int64_t d = 0; d < w; ++d) oc[d] += zs[d];
    }
    for (std::int64_t c = 0; c < C; ++c) {
      const std::int64_t n = counts[b * C + c];
      const T inv_nan = std::numeric_limits<T>::quiet_NaN();
      T* oc = ob + c * D;
      for (std::int64_t d = 0; d < w; ++d) oc[d] = n ? oc[d] / static_cast<T>(n) : inv_nan;
    }
  }
}

template <class T>
void backward(const Device& dev, std::int64_t B, std::int64_t S, std::int64_t C, std::int64_t D,
              const T* g, const std::int64_t* labels, const std::vector<std::int64_t>& counts,
              T* gz) {
#pragma omp parallel for num_threads(threads_for(dev, B * S * D)) schedule(static)
  for (std::int64_t r = 0; r < B * S; ++r) {
    const std::int64_t b = r / S, l = labels[r];
    T* dst = gz + r * D;
    if (!in_range(l, C)) {
      std::fill(dst, dst + D, T(0));
      continue;
    }
    const T scale = T(1) / static_cast<T>(counts[b * C + l]);
    const T* src = g + (b * C + l) * D;
    for (std::int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
  }
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
