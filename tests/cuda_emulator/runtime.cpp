// The host side of csrc/cuda/cuda_utils.cu for the emulator: no driver, host memory.
#include <cstdlib>

#include "cuda_utils.cuh"

namespace pymeta::cuda {

void check(cudaError_t err, const char* name) {
  if (err == cudaSuccess) return;
  const std::string what = cudaGetErrorString(err);
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("pymeta CUDA kernel ") + name + " failed: " + what);
}

void ensure_driver() {}

bool large_kernel_params() { return emu::max_param_bytes() > 4096; }

DeviceGuard::DeviceGuard(const Device& dev, const char*)
    : index_(dev.index), stream_(reinterpret_cast<cudaStream_t>(dev.stream)) {}
DeviceGuard::~DeviceGuard() {}

Scratch::Scratch(std::size_t bytes, cudaStream_t stream, const char* name) : stream_(stream) {
  if (bytes == 0) return;
  ptr_ = std::malloc(bytes);
  if (!ptr_) check(cudaErrorInvalidValue, name);
}
Scratch::~Scratch() { std::free(ptr_); }

std::string compiled_archs() { return "emulated"; }
std::string runtime_info() { return "CUDA emulated on the CPU (tests/cuda_emulator)"; }

}  // namespace pymeta::cuda
