#include "dispatch.h"
#include "ops.h"

namespace pymeta {

void sgd_step(const Device& dev, DType dtype, std::int64_t T,
              const std::vector<SgdTensor>& tensors, double lr_scalar) {
  if (T == 0 || tensors.empty()) return;
  PYMETA_DISPATCH(dev, sgd_step, dev, dtype, T, tensors, lr_scalar);
}

}  // namespace pymeta
