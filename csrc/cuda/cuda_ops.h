// CUDA twins of csrc/cpu/cpu_ops.h. Only declared when built with PYMETA_WITH_CUDA.
#pragma once
#include "../common.h"

namespace pymeta::cuda {

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

// Compiled archs (e.g. "sm_80 sm_90 compute_90") and a runtime/driver version report.
std::string compiled_archs();
std::string runtime_info();

}  // namespace pymeta::cuda
