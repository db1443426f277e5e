// CPU (OpenMP) kernels. Parallel regions use dev.nthreads; results never depend on it.
#pragma once
#include "../common.h"

namespace pymeta::cpu {

void pairwise_distances_forward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                std::int64_t Q, std::int64_t N, std::int64_t D, const void* x,
                                const void* y, void* out);
void pairwise_distances_backward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                 std::int64_t Q, std::int64_t N, std::int64_t D,
                                 const void* grad_out, const void* x, const void* y,
                                 const void* out, void* grad_x, void* grad_y);
LabelCheck class_prototypes_forward(const Device& dev, DType dtype, std::int64_t B,
                                    std::int64_t S, std::int64_t C, std::int64_t D,
                                    const void* z, const std::int64_t* labels, void* out,
                                    bool validate);
void class_prototypes_backward(const Device& dev, DType dtype, std::int64_t B, std::int64_t S,
                               std::int64_t C, std::int64_t D, const void* grad_out,
                               const std::int64_t* labels, void* grad_z);
void sgd_step(const Device& dev, DType dtype, std::int64_t T,
              const std::vector<SgdTensor>& tensors, double lr_scalar);

void batch_norm_relu_pool_forward(const Device& dev, DType dtype, const BnReluPool& a,
                                  void* out);
void batch_norm_relu_pool_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                   const void* grad_out, void* grad_x, void* grad_weight,
                                   void* grad_bias);
void batch_norm_relu_pool_double_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                          const void* grad_out, const void* gg, const void* ggw,
                                          const void* ggb, void* gx, void* gweight,
                                          void* ggrad_out);

// SIMD level this build dispatches to at run time ("avx512", "avx2", "sse2", ...).
std::string simd_level();

}  // namespace pymeta::cpu
