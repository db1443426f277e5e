#include "dispatch.h"
#include "ops.h"

namespace pymeta {

LabelCheck class_prototypes_forward(const Device& dev, DType dtype, std::int64_t B,
                                    std::int64_t S, std::int64_t C, std::int64_t D,
                                    const void* z, const std::int64_t* labels, void* out,
                                    bool validate) {
  if (B == 0 || (C * D == 0 && !validate)) return {};
  return PYMETA_DISPATCH(dev, class_prototypes_forward, dev, dtype, B, S, C, D, z, labels, out,
                         validate);
}

void class_prototypes_backward(const Device& dev, DType dtype, std::int64_t B, std::int64_t S,
                               std::int64_t C, std::int64_t D, const void* grad_out,
                               const std::int64_t* labels, void* grad_z) {
  if (B * S * D == 0) return;
  PYMETA_DISPATCH(dev, class_prototypes_backward, dev, dtype, B, S, C, D, grad_out, labels,
                  grad_z);
}

}  // namespace pymeta
