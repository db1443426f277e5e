// Device dispatch: routes an entry point of ops.h to its csrc/cpu or csrc/cuda twin.
#pragma once
#include "common.h"
#include "cpu/cpu_ops.h"
#ifdef PYMETA_WITH_CUDA
#include "cuda/cuda_ops.h"
#define PYMETA_DISPATCH(dev, fn, ...) \
  ((dev).is_cuda() ? ::pymeta::cuda::fn(__VA_ARGS__) : ::pymeta::cpu::fn(__VA_ARGS__))
#else
#define PYMETA_DISPATCH(dev, fn, ...)                                                  \
  ((dev).is_cuda() ? throw std::runtime_error(                                        \
                         "pymeta was built without CUDA kernels; reinstall with a CUDA " \
                         "toolkit present (PYMETA_CUDA=ON) to use CUDA tensors")       \
                   : ::pymeta::cpu::fn(__VA_ARGS__))
#endif
