"""Build and runtime report: ``pymeta.info()`` and ``python -m pymeta info``."""
from __future__ import annotations

import torch

from . import _C


def info() -> dict:
    """Version, compiled CUDA kernels and archs, CPU threads and SIMD level.

    Example:
        >>> import pymeta
        >>> report = pymeta.info()
        >>> report["cpu_threads"] >= 1, isinstance(report["cuda_kernels"], bool)
        (True, True)
    """
    core = _C.info()
    return {
        "version": core["version"],
        "cuda_kernels": core["cuda"],
        "cuda_archs": core["cuda_archs"] or "none",
        "cuda_runtime": core["cuda_runtime"],
        # pymeta follows torch's thread count, given OpenMP
        "cpu_threads": torch.get_num_threads() if core["openmp"] else 1,
        "openmp_max_threads": core["openmp_max_threads"] if core["openmp"] else
        "none: built without OpenMP, so the CPU kernels run on one thread",
        "simd": core["simd"],
        "torch": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
    }


def format_info(report: dict) -> str:
    width = max(map(len, report))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in report.items())
