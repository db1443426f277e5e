#include "cpu/cpu_ops.h"
#include "ops.h"

namespace pymeta {

// CPU only: on CUDA, pymeta runs torch's own BatchNorm, ReLU and max-pool kernels. The
// Python layer checks shapes; these guards keep a raw call from reading out of bounds.
static void check(const Device& dev, const BnReluPool& a) {
  if (dev.is_cuda())
    throw std::invalid_argument("batch_norm_relu_pool: CPU tensors only (no CUDA kernel)");
  if (a.N < 1 || a.H < 2 || a.W < 2)
    throw std::invalid_argument("batch_norm_relu_pool: needs N >= 1 and H, W >= 2");
}

void batch_norm_relu_pool_forward(const Device& dev, DType dtype, const BnReluPool& a,
                                  void* out) {
  check(dev, a);
  cpu::batch_norm_relu_pool_forward(dev, dtype, a, out);
}

void batch_norm_relu_pool_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                   const void* grad_out, void* grad_x, void* grad_weight,
                                   void* grad_bias) {
  check(dev, a);
  cpu::batch_norm_relu_pool_backward(dev, dtype, a, grad_out, grad_x, grad_weight, grad_bias);
}

void batch_norm_relu_pool_double_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                          const void* grad_out, const void* gg, const void* ggw,
                                          const void* ggb, void* gx, void* gweight,
                                          void* ggrad_out) {
  check(dev, a);
  cpu::batch_norm_relu_pool_double_backward(dev, dtype, a, grad_out, gg, ggw, ggb, gx, gweight,
                                            ggrad_out);
}

}  // namespace pymeta
