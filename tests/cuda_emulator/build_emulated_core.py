"""Builds pymeta's compiled core with the CUDA kernels of csrc/cuda running on the CPU.

The ``.cu`` files are compiled as C++ against ``include/cuda_emulator.h`` after one rewrite,
``kernel<<<grid, block, ...>>>(args)`` -> ``emu_launch(kernel, grid, block, ...)(args)``;
``runtime.cpp`` stands in for ``cuda_utils.cu``. The result is a module with ``pymeta._C``'s
functions, where device index >= 0 runs the CUDA kernel on host memory. Needs g++ (C++17,
``_Float16``) and pybind11; the build is cached by the hash of its sources.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
MAX_BLOCKS = 3  # grids of at most 3 blocks, so that every grid-stride loop wraps


def translate(cu_source: str) -> str:
    return LAUNCH.sub(lambda m: f"emu_launch({m[1]}, {m[2]})(", cu_source)


def _sources() -> list[Path]:
    return sorted([*CSRC.glob("*.cpp"), *CSRC.glob("cpu/*.cpp"), *CSRC.glob("cuda/*_cuda.cu"),
                   HERE / "runtime.cpp"])


def _digest() -> str:
    h = hashlib.sha256()
    for p in [*_sources(), *CSRC.rglob("*.h"), *CSRC.rglob("*.cuh"), *HERE.rglob("*.h"),
              Path(__file__)]:
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def asan_runtime() -> str | None:
    """The AddressSanitizer runtime to preload into Python for a ``sanitize`` build."""
    cxx = compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return str(Path(path).resolve()) if os.path.isabs(path) and Path(path).exists() else None


def build(cache: Path | None = None, sanitize: bool = False) -> Path:
    """Compiles (or finds cached) and returns the path of the emulated ``_C`` module. With
    ``sanitize``, under AddressSanitizer: every out-of-bounds access of a kernel aborts with
    a report (the process must preload :func:`asan_runtime`)."""
    import pybind11
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    cache = (Path(cache or tempfile.gettempdir())
             / f"pymeta-cuda-emulator-{_digest()}{'-asan' * sanitize}")
    module = cache / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if module.exists():
        return module
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache.parent))
    flags = ["-std=c++17", "-O1", "-fPIC", "-fopenmp", "-pthread", "-w", *asan,
             "-DPYMETA_WITH_CUDA", '-DPYMETA_VERSION="emulated"',
             '-DPYMETA_CUDA_ARCHS="emulated"', f"-DPYMETA_CUDA_MAX_BLOCKS={MAX_BLOCKS}",
             f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{CSRC / 'cuda'}",
             f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]

    def compile_one(src: Path) -> Path:
        if src.suffix == ".cu":
            text = translate(src.read_text())
            src = work / (src.stem + ".cpp")
            src.write_text(text)
        obj = work / (src.stem + ".o")
        subprocess.run([cxx, *flags, "-c", str(src), "-o", str(obj)], check=True,
                       capture_output=True, text=True)
        return obj

    try:
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            objects = list(pool.map(compile_one, _sources()))
        built = work / module.name
        subprocess.run([cxx, "-shared", "-fopenmp", "-pthread", *asan, *map(str, objects), "-o",
                        str(built)], check=True, capture_output=True, text=True)
        cache.mkdir(parents=True, exist_ok=True)
        os.replace(built, module)  # atomic: a concurrent build finds a whole module or none
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"building the CUDA emulator failed:\n{e.stderr}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return module


def load(path: Path):
    spec = importlib.util.spec_from_file_location("pymeta_cuda_emulated._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build(sanitize="--sanitize" in sys.argv))
