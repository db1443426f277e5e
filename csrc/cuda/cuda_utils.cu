#include "cuda_utils.cuh"

#include <atomic>
#include <cstdint>

namespace pymeta::cuda {
namespace {

// CUDA encodes versions as 1000*major + 10*minor.
std::string version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : CUDART_VERSION;
}

// 0 when no driver is installed (or it cannot be queried).
int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  (void)cudaGetLastError();  // a failed query must not surface later as a launch error
  return v;
}

[[noreturn]] void throw_driver_error(int driver, int runtime) {
  const std::string built = "CUDA " + version_string(runtime);
  if (driver == 0)
    throw std::runtime_error("pymeta CUDA kernels need an NVIDIA driver but none was found; "
                             "pymeta's kernels were built with " + built);
  throw std::runtime_error("pymeta: the installed NVIDIA driver supports CUDA " +
                           version_string(driver) + " but pymeta's kernels were built with " +
                           built + "; update the driver");
}

}  // namespace

void check(cudaError_t err, const char* name) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so the next launch check does not repeat it
  throw std::runtime_error(std::string("pymeta CUDA kernel ") + name +
                           " failed: " + cudaGetErrorString(err));
}

void ensure_driver() {
  static std::atomic<bool> ok{false};
  if (ok.load(std::memory_order_acquire)) return;
  const int runtime = runtime_version(), driver = driver_version();
  // CUDA minor-version compatibility: any driver of the same major version runs our SASS.
  if (driver == 0 || driver / 1000 < runtime / 1000) throw_driver_error(driver, runtime);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  (void)cudaGetLastError();
  if (err == cudaErrorInsufficientDriver) throw_driver_error(driver, runtime);
  if (err != cudaSuccess || count == 0)
    throw std::runtime_error(std::string("pymeta CUDA kernels found no usable GPU: ") +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "no CUDA device"));
  ok.store(true, std::memory_order_release);
}

DeviceGuard::DeviceGuard(const Device& dev, const char* name)
    : index_(dev.index), stream_(reinterpret_cast<cudaStream_t>(dev.stream)) {
  if (!dev.is_cuda())
    throw std::invalid_argument(std::string("pymeta CUDA kernel ") + name + " called for the CPU");
  ensure_driver();
  PYMETA_CUDA_CHECK(name, cudaGetDevice(&prev_));
  if (prev_ != index_) PYMETA_CUDA_CHECK(name, cudaSetDevice(index_));
}

DeviceGuard::~DeviceGuard() {
  // Destructors must not throw: a failed restore is cleared and ignored.
  if (prev_ >= 0 && prev_ != index_ && cudaSetDevice(prev_) != cudaSuccess)
    (void)cudaGetLastError();
}

namespace {

// The default pool hands freed memory back to the driver at every synchronisation (release
// threshold 0), so each op's scratch would be a fresh driver allocation: keep it instead.
void keep_pool_memory(const char* name) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  int device = 0;
  PYMETA_CUDA_CHECK(name, cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices || done[device].exchange(true)) return;
  cudaMemPool_t pool;
  std::uint64_t threshold = UINT64_MAX;
  if (cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess ||
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold) != cudaSuccess)
    (void)cudaGetLastError();  // only a speed-up: never an error
}

}  // namespace

Scratch::Scratch(std::size_t bytes, cudaStream_t stream, const char* name) : stream_(stream) {
  if (bytes == 0) return;
  keep_pool_memory(name);
  PYMETA_CUDA_CHECK(name, cudaMallocAsync(&ptr_, bytes, stream));
}

Scratch::~Scratch() {
  if (ptr_ && cudaFreeAsync(ptr_, stream_) != cudaSuccess) (void)cudaGetLastError();
}

// CMake's CUDA_ARCHITECTURES ("80-real;90") as compiler targets ("sm_80 sm_90 compute_90").
std::string compiled_archs() {
#ifdef PYMETA_CUDA_ARCHS
  const std::string spec = PYMETA_CUDA_ARCHS;
  std::string out;
  auto add = [&out](const std::string& s) { out += (out.empty() ? "" : " ") + s; };
  for (std::size_t start = 0; start < spec.size();) {
    std::size_t end = spec.find(' ', start);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(start, end - start);
    start = end + 1;
    const std::size_t dash = item.find('-');
    const std::string arch = item.substr(0, dash);
    const std::string kind = dash == std::string::npos ? "" : item.substr(dash + 1);
    if (arch.empty()) continue;
    if (arch[0] < '0' || arch[0] > '9') {  // "native", "all", ...: keep CMake's word
      add(item);
      continue;
    }
    if (kind != "virtual") add("sm_" + arch);
    if (kind != "real") add("compute_" + arch);
  }
  return out.empty() ? "unknown" : out;
#else
  return "unknown";
#endif
}

// Never throws for a missing driver or GPU: it is what users call to diagnose those.
std::string runtime_info() {
  const int driver = driver_version();
  int count = 0;
  if (driver == 0 || cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  (void)cudaGetLastError();
  return "CUDA runtime " + version_string(runtime_version()) + ", " +
         (driver == 0 ? std::string("no driver") : "driver " + version_string(driver)) + ", " +
         std::to_string(count) + " device(s)";
}

}  // namespace pymeta::cuda
