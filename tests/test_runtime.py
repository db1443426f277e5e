"""Threads (bitwise determinism), import orders, forked DataLoader workers, info and the CLI."""
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import pymeta
from conftest import (DTYPES, METRICS, assert_close, covering_labels, gen, num_threads, rand, ref_sgd,
                      relative_error, run_python)
from pymeta import ops
from pymeta.ops import reference

THREADS = (1, 2, 3)


def _same_at_every_thread_count(fn):
    """Runs fn() at 1, 2 and 3 threads; all results must be bitwise equal. Returns them."""
    results = []
    for n in THREADS:
        with num_threads(n):
            results.append(fn())
    for r in results[1:]:
        assert len(r) == len(results[0])
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))
    return results[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [32, 1])
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances_threads(metric, T, dtype):
    g = gen(T)
    x = rand(T, 75, 1600, dtype=dtype, gen=g, requires_grad=True)
    y = rand(T, 5, 1600, dtype=dtype, gen=g, requires_grad=True)
    go = rand(T, 75, 5, dtype=dtype, gen=g)

    def run():
        out = ops.pairwise_distances(x, y, metric)
        return (out, *torch.autograd.grad(out, (x, y), go))
    out, gx, gy = _same_at_every_thread_count(run)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    ref = reference.pairwise_distances(x64, y64, metric)
    ref_grads = torch.autograd.grad(ref, (x64, y64), go.double())
    for got, want in zip((out, gx, gy), (ref, *ref_grads)):  # float32: measured <= 3e-7
        assert relative_error(got, want) < (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (1,), (4,)])
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances_second_order_threads(metric, lead, dtype):
    """Second derivatives run through the torch reference; its dot and cosine were matmuls,
    whose rounding followed the thread count."""
    g = gen(9)
    x = rand(*lead, 75, 64, dtype=dtype, gen=g, requires_grad=True)
    y = rand(*lead, 5, 64, dtype=dtype, gen=g, requires_grad=True)

    def run():
        out = ops.pairwise_distances(x, y, metric)
        gx, gy = torch.autograd.grad(out.logsumexp(-1).sum(), (x, y), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gy.square().sum(), (x, y))
    hx, hy = _same_at_every_thread_count(run)
    ref = reference.pairwise_distances(x, y, metric)
    rgx, rgy = torch.autograd.grad(ref.logsumexp(-1).sum(), (x, y), create_graph=True)
    want = torch.autograd.grad(rgx.square().sum() + rgy.square().sum(), (x, y))
    for got, w in zip((hx, hy), want):  # float32 sums of squares cancel: relative to the scale
        assert relative_error(got, w) < (1e-4 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 100, 20, 3000), (32, 25, 5, 1600)])  # (T, S, C, D)
def test_class_prototypes_threads(shape, dtype):
    T, S, C, D = shape
    g = gen(S)
    z = rand(T, S, D, dtype=dtype, gen=g, requires_grad=True)
    labels = covering_labels((T,), S, C, g)
    go = rand(T, C, D, dtype=dtype, gen=g)

    def run():
        out = ops.class_prototypes(z, labels, C)
        return out, torch.autograd.grad(out, z, go)[0]
    out, gz = _same_at_every_thread_count(run)
    ref = reference.class_prototypes(z, labels, C)
    assert_close(out, ref, dtype)
    assert_close(gz, torch.autograd.grad(ref, z, go)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_step_threads(dtype):
    g = gen(3)
    shapes = [(64, 3, 3, 3), (64,), *[(64, 64, 3, 3), (64,)] * 3, (5, 1600), (5,)]  # conv4
    assert sum(torch.Size(s).numel() for s in shapes) > 113_000
    params = [rand(*s, dtype=dtype, gen=g, requires_grad=True) for s in shapes]
    grads = [rand(2, *s, dtype=dtype, gen=g, requires_grad=True) for s in shapes]
    lrs = [rand(dtype=dtype, gen=g, requires_grad=True) if i % 2 else rand(*s, dtype=dtype, gen=g, requires_grad=True)
           for i, s in enumerate(shapes)]
    leaves = [*params, *grads, *lrs]
    gos = [rand(2, *s, dtype=dtype, gen=g) for s in shapes]

    def run(lr):
        out = ops.sgd_step(params, grads, lr)
        return (*out, *torch.autograd.grad(out, leaves, gos, allow_unused=True, materialize_grads=True))
    for lr in (0.01, lrs):
        result = _same_at_every_thread_count(lambda: run(lr))
        with torch.no_grad():  # the plain eager path and the in-place op too
            plain = _same_at_every_thread_count(lambda: ops.sgd_step(params, grads, lr))
            copies = [p.detach().expand(2, *p.shape).clone() for p in params]
            inplace = _same_at_every_thread_count(lambda: ops.sgd_step_([c.clone() for c in copies], grads, lr))
        assert all(torch.equal(a, b) for a, b in zip(plain, result))
        assert all(torch.equal(a, b) for a, b in zip(inplace, result))
        assert_close(list(result[:len(shapes)]), ref_sgd(params, grads, lr), dtype)


def test_info_reports_build_and_follows_torch_threads():
    info = pymeta.info()
    for key in ("version", "cuda_kernels", "cuda_archs", "simd", "cpu_threads"):
        assert key in info
    assert info["version"] == pymeta.__version__ == importlib.metadata.version("pymeta")
    assert isinstance(info["cuda_kernels"], bool) and isinstance(info["cuda_archs"], str)
    assert isinstance(info["simd"], str) and info["simd"]
    # the attributes import reads instead of info(), which would start a CUDA driver
    assert pymeta._C.cuda_built is info["cuda_kernels"] and pymeta._C.__version__ == info["version"]
    parallel = pymeta._C.info()["openmp"]
    for n in (1, 2, 3):
        with num_threads(n):
            assert pymeta.info()["cpu_threads"] == (n if parallel else 1)


def test_cli_info():
    result = run_python("-m", "pymeta", "info")
    result_main = run_python("-c", "from pymeta.cli import main; raise SystemExit(main(['info']))")
    for r in (result, result_main):
        assert r.returncode == 0, r.stderr
        lines = dict(line.split(None, 1) for line in r.stdout.strip().splitlines())
        assert lines["version"] == pymeta.__version__
        assert lines["cuda_kernels"] in ("True", "False")
        for key in ("cuda_archs", "simd", "cpu_threads"):
            assert lines[key]


def test_the_package_ships_its_types_and_license():
    """py.typed makes type checkers read the hints and _C.pyi of an installed pymeta."""
    here = Path(pymeta.__file__).parent
    assert (here / "py.typed").is_file() and (here / "_C.pyi").is_file()
    assert any(f.name == "LICENSE" for f in importlib.metadata.files("pymeta") or ())


def test_cli_output_into_a_closed_pipe_is_no_error():
    """`pymeta info | head -1`: the reader has gone (here, before anything is written)."""
    child = subprocess.Popen([sys.executable, "-m", "pymeta", "info"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    child.stdout.close()
    err = child.stderr.read()
    assert child.wait(timeout=60) == 1
    assert "error" not in err.lower() and "Exception ignored" not in err, err


# ---- subprocesses: import order and fork safety -----------------------------------------

_WORKLOAD = textwrap.dedent("""
    from pymeta import ops
    from pymeta.ops import reference

    def workload(seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(32, 75, 1600, generator=g), torch.randn(32, 5, 1600, generator=g)
        z = torch.randn(2, 50, 4000, generator=g)
        labels = (torch.arange(50) % 5).expand(2, 50)
        p, gr = [torch.randn(120_000, generator=g)], [torch.randn(120_000, generator=g)]
        x.requires_grad_()
        d = ops.pairwise_distances(x, y, "cosine")
        gx, = torch.autograd.grad(d.sum(), x)
        out = [d.detach(), gx, ops.class_prototypes(z, labels, 5), ops.sgd_step(p, gr, 0.1)[0]]
        ref = [reference.pairwise_distances(x, y, "cosine").detach(), None,
               reference.class_prototypes(z, labels, 5), reference.sgd_step(p, gr, 0.1)[0]]
        for a, b in zip(out, ref):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        return out
""")


@pytest.mark.parametrize("order", ["import pymeta\nimport torch", "import torch\nimport pymeta"])
def test_import_order(order):
    code = order + "\ntorch.set_num_threads(2)\n" + _WORKLOAD + "workload(0)\nprint('ok')\n"
    r = run_python("-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_source_checkout_without_the_core_says_so(tmp_path):
    """Python started in a checkout imports its pymeta/, which has no compiled core: the error
    says so, not "partially initialized module (most likely due to a circular import)"."""
    package = tmp_path / "pymeta"
    package.mkdir()
    for source in Path(pymeta.__file__).parent.glob("*.py"):
        shutil.copy(source, package)
    # -S: no site-packages, so no editable-install finder redirects the import
    r = subprocess.run([sys.executable, "-S", "-c", "import pymeta"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "pymeta's compiled core (pymeta._C) is not built in" in r.stderr, r.stderr[-2000:]


def test_forked_dataloader_workers_do_not_hang():
    code = "import torch\n" + _WORKLOAD + textwrap.dedent("""
        torch.set_num_threads(2)
        expected = workload(0)          # the parent runs the parallel kernels first

        class Tasks(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return workload(i % 2)

        loader = torch.utils.data.DataLoader(Tasks(), batch_size=None, num_workers=2,
                                             multiprocessing_context="fork")
        results = list(loader)
        assert len(results) == 4
        for got in results[0::2]:
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        workload(1)                     # and the parent still works afterwards
        print("ok")
    """)
    r = run_python("-c", code, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_raw_fork_child_runs_pymeta_ops():
    """GNU OpenMP's pool does not survive fork(): pymeta drops to one thread in forked children
    instead of hanging, and still gives the parent's (thread-count independent) results."""
    code = textwrap.dedent("""
        import os, numpy as np, torch
        from pymeta import ops
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 75, 1600, generator=g), torch.randn(32, 5, 1600, generator=g)
        z, labels = torch.randn(2, 50, 4000, generator=g), (torch.arange(50) % 5).expand(2, 50)
        p, gr = [torch.randn(120_000, generator=g)], [torch.randn(120_000, generator=g)]
        run = lambda: [ops.pairwise_distances(x, y).numpy(), ops.class_prototypes(z, labels, 5).numpy(),
                       ops.sgd_step(p, gr, 0.1)[0].numpy()]
        expected = run()                      # the parent's OpenMP pool is now live
        pid = os.fork()
        if pid == 0:                          # child: numpy only besides pymeta, no torch kernels
            os._exit(0 if all(np.array_equal(a, b) for a, b in zip(run(), expected)) else 1)
        _, status = os.waitpid(pid, 0)
        print("ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else f"bad {status}")
    """)
    r = run_python("-c", code, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
