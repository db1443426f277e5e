#include "cuda_utils.cuh"

#include <cuda.h>  // driver API types only: its functions are reached through the runtime

#include <atomic>
#include <cstdint>
#include <mutex>

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

// The current device's compute capability as CMake writes it ("86"; "?" if unknown).
std::string device_arch() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return "?";
  }
  return std::to_string(major) + std::to_string(minor);
}

// What to do about the errors a build/GPU/driver mismatch gives at the first launch.
std::string hint(cudaError_t err) {
  switch (err) {
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidKernelImage: {
      const std::string arch = device_arch();
      return "; pymeta's kernels were built for " + compiled_archs() + ", which this GPU (sm_" +
             arch + ") cannot run: rebuild pymeta for it (CMAKE_ARGS=" +
             "-DCMAKE_CUDA_ARCHITECTURES=" + arch + " pip install .)";
    }
    case cudaErrorUnsupportedPtxVersion:
      return "; this GPU (sm_" + device_arch() + ") runs pymeta's PTX, which needs a driver at "
             "least as new as CUDA " + version_string(runtime_version()) + ": update the driver";
    default:
      return "";
  }
}

}  // namespace

void check(cudaError_t err, const char* name) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so the next launch check does not repeat it
  throw std::runtime_error(std::string("pymeta CUDA kernel ") + name +
                           " failed: " + cudaGetErrorString(err) + hint(err));
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

bool large_kernel_params() {
  static const bool ok = driver_version() >= 12010;
  return ok;
}

DeviceGuard::DeviceGuard(const Device& dev, const char* name)
    : index_(dev.index), stream_(reinterpret_cast<cudaStream_t>(dev.stream)) {
  if (!dev.is_cuda())
    throw std::invalid_argument(std::string("pymeta CUDA kernel ") + name + " called for the CPU");
  ensure_driver();
  PYMETA_CUDA_CHECK(name, cudaGetDevice(&prev_));
  if (prev_ != index_) PYMETA_CUDA_CHECK(name, cudaSetDevice(index_));
}

namespace {

// Whether the device's primary context exists (true when the driver cannot say). Switching
// to a device creates its context: a few hundred MB of that GPU's memory.
bool has_primary_context(int device) {
  using GetState = CUresult (*)(CUdevice, unsigned int*, int*);
  static const GetState get_state = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<GetState>(fn);
  }();
  unsigned int flags = 0;
  int active = 0;
  return !get_state || get_state(device, &flags, &active) != CUDA_SUCCESS || active;
}

}  // namespace

DeviceGuard::~DeviceGuard() {
  // Like torch's guard, the previous device is restored only if it has a context already:
  // a thread that never used it (cudaGetDevice then says 0) must not create one on GPU 0.
  // Destructors must not throw: a failed restore is cleared and ignored.
  if (prev_ >= 0 && prev_ != index_ && has_primary_context(prev_) &&
      cudaSetDevice(prev_) != cudaSuccess)
    (void)cudaGetLastError();
}

namespace {

// pymeta's own stream-ordered pool on the device (the default pool's settings belong to the
// whole process). It keeps up to kScratchKeep bytes across synchronisations, so scratch is not
// a fresh driver allocation per op. Null where the device has no memory pools (some vGPUs).
constexpr std::uint64_t kScratchKeep = std::uint64_t(64) << 20;

cudaMemPool_t create_scratch_pool(int device) {
  int supported = 0;
  cudaMemPool_t pool = nullptr;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  std::uint64_t keep = kScratchKeep;
  if (cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess ||
      !supported || cudaMemPoolCreate(&pool, &props) != cudaSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  if (cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep) != cudaSuccess)
    (void)cudaGetLastError();  // only a speed-up: never an error
  return pool;
}

cudaMemPool_t scratch_pool(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static cudaMemPool_t pools[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return nullptr;
  std::call_once(once[device], [device] { pools[device] = create_scratch_pool(device); });
  return pools[device];
}

}  // namespace

Scratch::Scratch(std::size_t bytes, cudaStream_t stream, const char* name) : stream_(stream) {
  if (bytes == 0) return;
  int device = 0;
  PYMETA_CUDA_CHECK(name, cudaGetDevice(&device));
  if (cudaMemPool_t pool = scratch_pool(device)) {
    PYMETA_CUDA_CHECK(name, cudaMallocFromPoolAsync(&ptr_, bytes, pool, stream));
  } else {
    synchronous_ = true;  // cudaFree waits for the device, so no stream order is needed
    PYMETA_CUDA_CHECK(name, cudaMalloc(&ptr_, bytes));
  }
}

Scratch::~Scratch() {
  if (!ptr_) return;
  if ((synchronous_ ? cudaFree(ptr_) : cudaFreeAsync(ptr_, stream_)) != cudaSuccess)
    (void)cudaGetLastError();
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
