// pymeta._C: the raw-buffer kernel core. Tensors arrive as integer data pointers plus sizes;
// nothing here knows torch or numpy. The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/cpu_ops.h"
#include "openmp.h"
#include "ops.h"
#ifdef PYMETA_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace py = pybind11;
using pymeta::Device;
using pymeta::DType;
using std::int64_t;
using ptr = std::uintptr_t;

namespace {

Device device(int index, ptr stream, int nthreads) { return Device{index, stream, nthreads}; }

template <class T>
T* as(ptr p) {
  return reinterpret_cast<T*>(p);
}

pymeta::BnReluPool tail(int64_t N, int64_t H, int64_t W, int64_t K, ptr x, ptr weight, ptr bias,
                        double eps, ptr mean, ptr var) {
  return {N, H, W, K, as<void>(x), as<void>(weight), as<void>(bias), eps, as<double>(mean),
          as<double>(var)};
}

// Fields per tensor in sgd_step's flat descriptor list.
constexpr std::size_t kSgdFields = 9;

std::vector<pymeta::SgdTensor> sgd_tensors(const std::vector<int64_t>& flat) {
  if (flat.size() % kSgdFields)
    throw std::invalid_argument("sgd_step: descriptor list length must be a multiple of 9");
  std::vector<pymeta::SgdTensor> ts(flat.size() / kSgdFields);
  for (std::size_t i = 0; i < ts.size(); ++i) {
    const int64_t* f = flat.data() + i * kSgdFields;
    ts[i] = {as<void>(f[0]), as<const void>(f[1]), as<const void>(f[2]), as<const void>(f[3]),
             f[4], f[5], f[6], f[7], f[8]};
  }
  return ts;
}

py::dict info() {
  py::dict d;
  d["version"] = PYMETA_VERSION;
  d["simd"] = pymeta::cpu::simd_level();
  d["openmp"] = pymeta::kOpenMP;
  d["openmp_max_threads"] = omp_get_max_threads();
#ifdef PYMETA_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = pymeta::cuda::compiled_archs();
  d["cuda_runtime"] = pymeta::cuda::runtime_info();
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_runtime"] = "not built";
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymeta's compiled kernels over raw buffers (see pymeta/_C.pyi)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const pymeta::OutOfMemory& oom) {
      PyErr_SetString(PyExc_MemoryError, oom.what());
    }
  });

  m.def(
      "pairwise_distances_forward",
      [](int dev, ptr stream, int nt, int dtype, int metric, int64_t B, int64_t Q, int64_t N,
         int64_t D, ptr x, ptr y, ptr out) {
        pymeta::pairwise_distances_forward(device(dev, stream, nt), DType(dtype),
                                           pymeta::Metric(metric), B, Q, N, D, as<void>(x),
                                           as<void>(y), as<void>(out));
      },
      nogil);
  m.def(
      "pairwise_distances_backward",
      [](int dev, ptr stream, int nt, int dtype, int metric, int64_t B, int64_t Q, int64_t N,
         int64_t D, ptr grad_out, ptr x, ptr y, ptr out, ptr grad_x, ptr grad_y) {
        pymeta::pairwise_distances_backward(device(dev, stream, nt), DType(dtype),
                                            pymeta::Metric(metric), B, Q, N, D,
                                            as<void>(grad_out), as<void>(x), as<void>(y),
                                            as<void>(out), as<void>(grad_x), as<void>(grad_y));
      },
      nogil);
  m.def(
      "class_prototypes_forward",
      [](int dev, ptr stream, int nt, int dtype, int64_t B, int64_t S, int64_t C, int64_t D,
         ptr z, ptr labels, ptr out, bool validate) {
        const auto c = pymeta::class_prototypes_forward(device(dev, stream, nt), DType(dtype), B,
                                                        S, C, D, as<void>(z), as<int64_t>(labels),
                                                        as<void>(out), validate);
        return std::make_tuple(c.status, c.task, c.index, c.value);
      },
      nogil);
  m.def(
      "class_prototypes_backward",
      [](int dev, ptr stream, int nt, int dtype, int64_t B, int64_t S, int64_t C, int64_t D,
         ptr grad_out, ptr labels, ptr grad_z) {
        pymeta::class_prototypes_backward(device(dev, stream, nt), DType(dtype), B, S, C, D,
                                          as<void>(grad_out), as<int64_t>(labels),
                                          as<void>(grad_z));
      },
      nogil);
  m.def(
      "sgd_step",
      [](int dev, ptr stream, int nt, int dtype, int64_t T, double lr,
         const std::vector<int64_t>& descriptors) {
        const auto ts = sgd_tensors(descriptors);
        py::gil_scoped_release release;
        pymeta::sgd_step(device(dev, stream, nt), DType(dtype), T, ts, lr);
      });
  m.def(
      "batch_norm_relu_pool_forward",
      [](int dev, ptr stream, int nt, int dtype, int64_t N, int64_t H, int64_t W, int64_t K,
         ptr x, ptr weight, ptr bias, double eps, ptr out, ptr mean, ptr var) {
        pymeta::batch_norm_relu_pool_forward(device(dev, stream, nt), DType(dtype),
                                             tail(N, H, W, K, x, weight, bias, eps, mean, var),
                                             as<void>(out));
      },
      nogil);
  m.def(
      "batch_norm_relu_pool_backward",
      [](int dev, ptr stream, int nt, int dtype, int64_t N, int64_t H, int64_t W, int64_t K,
         ptr x, ptr weight, ptr bias, ptr mean, ptr var, double eps, ptr grad_out, ptr grad_x,
         ptr grad_weight, ptr grad_bias) {
        pymeta::batch_norm_relu_pool_backward(
            device(dev, stream, nt), DType(dtype),
            tail(N, H, W, K, x, weight, bias, eps, mean, var), as<void>(grad_out),
            as<void>(grad_x), as<void>(grad_weight), as<void>(grad_bias));
      },
      nogil);
  m.def(
      "batch_norm_relu_pool_double_backward",
      [](int dev, ptr stream, int nt, int dtype, int64_t N, int64_t H, int64_t W, int64_t K,
         ptr x, ptr weight, ptr bias, ptr mean, ptr var, double eps, ptr grad_out, ptr gg,
         ptr ggw, ptr ggb, ptr gx, ptr gweight, ptr ggrad_out) {
        pymeta::batch_norm_relu_pool_double_backward(
            device(dev, stream, nt), DType(dtype),
            tail(N, H, W, K, x, weight, bias, eps, mean, var), as<void>(grad_out), as<void>(gg),
            as<void>(ggw), as<void>(ggb), as<void>(gx), as<void>(gweight), as<void>(ggrad_out));
      },
      nogil);
  m.def("info", &info);
  // Plain attributes: reading them at import must not start the CUDA driver (info() does).
  m.attr("__version__") = PYMETA_VERSION;
#ifdef PYMETA_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
