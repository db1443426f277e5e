// The kernel core's entry points. Each dispatches to csrc/cpu or csrc/cuda.
// All tensors are dense and contiguous; the Python layer guarantees shapes.
#pragma once
#include "common.h"

namespace pymeta {

// x [B,Q,D], y [B,N,D] -> out [B,Q,N].
void pairwise_distances_forward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                std::int64_t Q, std::int64_t N, std::int64_t D, const void* x,
                                const void* y, void* out);

// grad_out and out [B,Q,N]; grad_x [B,Q,D] and grad_y [B,N,D] may each be null.
void pairwise_distances_backward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                 std::int64_t Q, std::int64_t N, std::int64_t D,
                                 const void* grad_out, const void* x, const void* y,
                                 const void* out, void* grad_x, void* grad_y);

// z [B,S,D], labels int64 [B,S] -> out [B,C,D], per-class means. Labels outside [0, C)
// are ignored; a class without examples gets NaN. With validate, the first problem found
// (lowest task; in it an out-of-range label before an empty class) is reported.
LabelCheck class_prototypes_forward(const Device& dev, DType dtype, std::int64_t B,
                                    std::int64_t S, std::int64_t C, std::int64_t D,
                                    const void* z, const std::int64_t* labels, void* out,
                                    bool validate);

// grad_out [B,C,D] -> grad_z [B,S,D] = grad_out[label] / count[label] (0 for ignored labels).
void class_prototypes_backward(const Device& dev, DType dtype, std::int64_t B, std::int64_t S,
                               std::int64_t C, std::int64_t D, const void* grad_out,
                               const std::int64_t* labels, void* grad_z);

// One fused update over a list of tensors, each with T task slices (see SgdTensor).
void sgd_step(const Device& dev, DType dtype, std::int64_t T,
              const std::vector<SgdTensor>& tensors, double lr_scalar);

// Training-mode BatchNorm (batch statistics) + ReLU + 2x2 max-pool (stride 2, floor) on NHWC
// x [N,H,W,K] -> out [N,H/2,W/2,K]; mean and biased var [K] (float64) come out of forward
// and go back into backward. grad_x, grad_weight and grad_bias may each be null. CPU only.
void batch_norm_relu_pool_forward(const Device& dev, DType dtype, const BnReluPool& a,
                                  void* out);

void batch_norm_relu_pool_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                   const void* grad_out, void* grad_x, void* grad_weight,
                                   void* grad_bias);

// Backward of the backward: given the gradients gg [N,H,W,K], ggw and ggb [K] of grad_x,
// grad_weight and grad_bias, the gradients of x (gx), weight (gweight) and grad_out
// (ggrad_out); each output may be null (bias gets none: it only moves the winners).
void batch_norm_relu_pool_double_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                          const void* grad_out, const void* gg, const void* ggw,
                                          const void* ggb, void* gx, void* gweight,
                                          void* ggrad_out);

}  // namespace pymeta
