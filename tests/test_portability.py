"""The C++ core compiles with the compilers pymeta's users build with, not only this machine's
GCC: Clang (macOS, conda toolchains), an aarch64 GCC (Grace Hopper, Graviton), and any
compiler without OpenMP (Apple Clang without libomp: one thread, csrc/openmp.h). Each case
skips when its compiler is not installed (``apt install clang g++-aarch64-linux-gnu``)."""
import concurrent.futures
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

import pymeta

CSRC = Path(__file__).resolve().parents[1] / "csrc"
# name: (compiler, OpenMP flag or None for a build without it)
COMPILERS = {"clang": ("clang++", "-fopenmp"), "aarch64-gcc": ("aarch64-linux-gnu-g++", "-fopenmp"),
             "gcc-without-openmp": ("g++", None)}


def _sources():
    if not CSRC.is_dir():
        pytest.skip("csrc/ is not beside the tests (an installed copy of the tests)")
    return sorted([*CSRC.glob("*.cpp"), *CSRC.glob("cpu/*.cpp")])


@pytest.mark.parametrize("name", sorted(COMPILERS))
def test_cpu_sources_compile(name):
    command, openmp = COMPILERS[name]
    compiler = shutil.which(command)
    if compiler is None:
        pytest.skip(f"{command} is not installed")
    pybind11 = pytest.importorskip("pybind11")
    flags = ["-std=c++17", openmp or "-Wno-unknown-pragmas", "-fsyntax-only", "-Wall",
             "-Wextra", "-Wno-psabi", f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}",
             f"-I{pybind11.get_include()}", '-DPYMETA_VERSION="test"']
    def check(source):
        run = subprocess.run([compiler, *flags, str(source)], capture_output=True, text=True)
        if run.returncode or "warning:" in run.stderr:
            return f"{source.relative_to(CSRC)}:\n{run.stderr[-2000:]}"
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(check, _sources()) if f]
    assert not failures, f"{name} rejects or warns on:\n" + "\n".join(failures)


def _configure(tmp_path, cuda: str) -> subprocess.CompletedProcess:
    cmake = shutil.which("cmake")
    if cmake is None or not (CSRC.parent / "CMakeLists.txt").is_file():
        pytest.skip("needs cmake and the source tree")
    pybind11 = pytest.importorskip("pybind11")
    return subprocess.run([cmake, "-S", str(CSRC.parent), "-B", str(tmp_path / cuda),
                           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPYMETA_CUDA={cuda}"],
                          capture_output=True, text=True)


@pytest.mark.parametrize("spelling", ["off", "0"])
def test_cmake_reads_the_cuda_option_in_any_case(tmp_path, spelling):
    """A lower-case or numeric PYMETA_CUDA (from the environment) is not a silent AUTO, and a
    plain CMake build still knows pymeta's version."""
    run = _configure(tmp_path, spelling)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"pymeta {pymeta.__version__}: CUDA kernels OFF" in run.stdout


def test_cmake_refuses_an_unknown_cuda_option(tmp_path):
    run = _configure(tmp_path, "maybe")
    assert run.returncode != 0
    assert "PYMETA_CUDA must be AUTO, ON or OFF, got 'MAYBE'" in run.stderr
