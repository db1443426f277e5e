"""Type stub of ``pymeta._C``, the raw-buffer kernel core (csrc/bindings.cpp).

Every kernel takes the launch triple ``(device, stream, threads)`` first: the CUDA device index
(-1 for the CPU), the CUDA stream handle (0 on the CPU) and the CPU thread count. Tensors are
passed as integer data pointers (``Tensor.data_ptr()`` or ``ndarray.ctypes.data``; 0 for none)
and must be dense and contiguous; ``dtype`` codes are those of ``pymeta.ops._kernels``. The
GIL is released while a kernel runs. ``pymeta.ops`` is the checked, typed interface.
"""

__version__: str
cuda_built: bool  # whether the CUDA kernels are compiled in; reading it touches no driver

def info() -> dict[str, object]:
    """version, simd, openmp (built with it), openmp_max_threads, cuda, cuda_archs,
    cuda_runtime (this one asks the CUDA driver, if there is one)."""

def pairwise_distances_forward(device: int, stream: int, threads: int, dtype: int, metric: int,
                               B: int, Q: int, N: int, D: int, x: int, y: int, out: int) -> None: ...

def pairwise_distances_backward(device: int, stream: int, threads: int, dtype: int, metric: int,
                                B: int, Q: int, N: int, D: int, grad_out: int, x: int, y: int,
                                out: int, grad_x: int, grad_y: int) -> None: ...

def class_prototypes_forward(device: int, stream: int, threads: int, dtype: int, B: int, S: int,
                             C: int, D: int, z: int, labels: int, out: int,
                             validate: bool) -> tuple[int, int, int, int]:
    """Returns the label check (status, task, index, value); status 0 is OK."""

def class_prototypes_backward(device: int, stream: int, threads: int, dtype: int, B: int, S: int,
                              C: int, D: int, grad_out: int, labels: int, grad_z: int) -> None: ...

def sgd_step(device: int, stream: int, threads: int, dtype: int, T: int, lr: float,
             descriptors: list[int]) -> None:
    """descriptors: 9 ints per tensor (out, p, g, lr pointers; p, g and lr task strides, lr
    inner stride, elements per task), see SgdTensor in csrc/common.h."""

def batch_norm_relu_pool_forward(device: int, stream: int, threads: int, dtype: int, N: int,
                                 H: int, W: int, K: int, x: int, weight: int, bias: int,
                                 eps: float, out: int, mean: int, var: int) -> None:
    """NHWC x [N, H, W, K] -> out [N, H//2, W//2, K]; mean and var are float64 [K]. CPU."""

def batch_norm_relu_pool_backward(device: int, stream: int, threads: int, dtype: int, N: int,
                                  H: int, W: int, K: int, x: int, weight: int, bias: int,
                                  mean: int, var: int, eps: float, grad_out: int, grad_x: int,
                                  grad_weight: int, grad_bias: int) -> None: ...

def batch_norm_relu_pool_double_backward(device: int, stream: int, threads: int, dtype: int,
                                         N: int, H: int, W: int, K: int, x: int, weight: int,
                                         bias: int, mean: int, var: int, eps: float,
                                         grad_out: int, gg: int, ggw: int, ggb: int, gx: int,
                                         gweight: int, ggrad_out: int) -> None:
    """Gradients of x, weight and grad_out given those (gg, ggw, ggb) of the backward's
    outputs grad_x, grad_weight and grad_bias."""
