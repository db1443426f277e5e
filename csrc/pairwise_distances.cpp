#include "dispatch.h"
#include "ops.h"

namespace pymeta {

void pairwise_distances_forward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                std::int64_t Q, std::int64_t N, std::int64_t D, const void* x,
                                const void* y, void* out) {
  if (B * Q * N == 0) return;
  PYMETA_DISPATCH(dev, pairwise_distances_forward, dev, dtype, metric, B, Q, N, D, x, y, out);
}

void pairwise_distances_backward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                 std::int64_t Q, std::int64_t N, std::int64_t D,
                                 const void* grad_out, const void* x, const void* y,
                                 const void* out, void* grad_x, void* grad_y) {
  PYMETA_DISPATCH(dev, pairwise_distances_backward, dev, dtype, metric, B, Q, N, D, grad_out, x,
                  y, out, grad_x, grad_y);
}

}  // namespace pymeta
