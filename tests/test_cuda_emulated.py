"""The CUDA kernels of csrc/cuda, run on the CPU by tests/cuda_emulator, against the plain-torch
references: indexing, grid-stride loops (grids capped at 3 blocks), warp reductions, label
validation, the multi-tensor batches of sgd_step, and the half types. Real GPUs add what an
emulator cannot show (timing, memory model, driver); tests/test_cuda.py covers those."""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (METRICS, WILD_LABELS, assert_cosine_clamp_gradients, assert_same_as_cpu,
                      covering_labels, gen, outputs_and_grads, pairwise_edge_cases, rand,
                      sgd_edge_inputs, with_non_finite)
from pymeta.ops import class_prototypes, pairwise_distances, reference, sgd_step, sgd_step_
from pymeta.ops._kernels import DTYPE_CODES

sys.path.insert(0, str(Path(__file__).parent / "cuda_emulator"))
import build_emulated_core as cuda_emulator  # noqa: E402

OP_MODULES = [importlib.import_module(f"pymeta.ops.{m}")
              for m in ("pairwise_distances", "class_prototypes", "sgd_step")]
# Set by test_kernels_stay_in_bounds, which reruns this module under AddressSanitizer
SANITIZED = os.environ.get("PYMETA_CUDA_EMULATOR_ASAN") == "1"


@pytest.fixture(scope="module")
def emulated():
    if importlib.util.find_spec("pybind11") is None:
        pytest.skip("pybind11 is needed to build the CUDA emulator")
    if cuda_emulator.compiler() is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    return cuda_emulator.load(cuda_emulator.build(sanitize=SANITIZED))


def route_to(monkeypatch, emulated) -> None:
    """The ops' Python layer as on CUDA tensors: every kernel call goes to device 0 of the
    emulated core (CPU tensors, so the CPU-side checks still apply)."""
    for module in OP_MODULES:
        monkeypatch.setattr(module, "_C", emulated)
        monkeypatch.setattr(module, "launch", lambda t: (0, 0, 1))


@pytest.fixture
def on_emulated_cuda(emulated, monkeypatch):
    route_to(monkeypatch, emulated)
    return emulated


def test_the_emulator_reports_itself(emulated):
    info = emulated.info()
    assert info["cuda"] and info["cuda_archs"] == "emulated"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 37), (1, 9, 4, 70), (3, 2, 1, 1)])
def test_pairwise_distances_and_gradients(on_emulated_cuda, metric, shape):
    B, Q, N, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, Q, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    if D > 1:  # a zero row (cosine's eps) and a repeated one (Euclidean's zero distance)
        with torch.no_grad():
            x[0, 0] = 0
            x[-1, -1] = y[-1, 0]
    grad_out = torch.randn(B, Q, N, generator=g, dtype=torch.float64)
    got = pairwise_distances(x, y, metric)
    want = reference.pairwise_distances(x, y, metric)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, (x, y), grad_out)
    want_grads = torch.autograd.grad(want, (x, y), grad_out)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_pairwise_distances_empty_and_noncontiguous(on_emulated_cuda):
    x = torch.randn(2, 40, 3).transpose(1, 2).requires_grad_()  # [2, 3, 40], strided
    y = torch.randn(2, 0, 40, requires_grad=True)
    out = pairwise_distances(x, y)
    assert out.shape == (2, 3, 0)
    gx, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(gx, torch.zeros_like(x))
    y = torch.randn(2, 4, 40)
    torch.testing.assert_close(pairwise_distances(x, y), reference.pairwise_distances(x, y),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("rows", ["random", "nearly opposite"])
def test_half_types_accumulate_in_float(emulated, dtype, metric, rows):
    """Raw kernel calls (the CPU build has no half kernels to route through the ops): the
    result is the float64 reference on the same half inputs, rounded once: within one unit
    of the dtype's precision of the largest value (measured: 1-1.5 roundings' worth). Nearly
    opposite rows have a cosine distance near 2, which float16 rounds 30x coarser than the
    similarity the gradient needs (6e-3 when the backward read it back from the output)."""
    B, Q, N, D = (2, 4, 3, 100) if rows == "random" else (2, 1, 1, 100)
    g = torch.Generator().manual_seed(7)
    x, y = (torch.randn(B, R, D, generator=g) for R in (Q, N))
    if rows == "nearly opposite":
        y = 1e-2 * y - x
    x, y = x.to(dtype), y.to(dtype)
    grad = torch.randn(B, Q, N, generator=g).to(dtype)
    out = torch.empty(B, Q, N, dtype=dtype)
    gx, gy = torch.empty_like(x), torch.empty_like(y)
    code, m = DTYPE_CODES[dtype], OP_MODULES[0].METRICS[metric]
    emulated.pairwise_distances_forward(0, 0, 1, code, m, B, Q, N, D, x.data_ptr(), y.data_ptr(),
                                        out.data_ptr())
    emulated.pairwise_distances_backward(0, 0, 1, code, m, B, Q, N, D, grad.data_ptr(),
                                         x.data_ptr(), y.data_ptr(), out.data_ptr(),
                                         gx.data_ptr(), gy.data_ptr())
    x64, y64 = (t.double().requires_grad_() for t in (x, y))
    want = reference.pairwise_distances(x64, y64, metric)
    want_gx, want_gy = torch.autograd.grad(want, (x64, y64), grad.double())
    for got, ref in ((out, want), (gx, want_gx), (gy, want_gy)):
        ref = ref.detach()
        err = float((got.double() - ref).abs().max() / ref.abs().max())
        assert err <= torch.finfo(dtype).eps, f"{metric} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_gradients_of_rows_at_the_norm_clamp(on_emulated_cuda, dtype):
    assert_cosine_clamp_gradients(dtype)


@pytest.mark.parametrize("shape", [(3, 7, 4, 33), (2, 25, 5, 600), (1, 1, 1, 1)])
def test_class_prototypes_and_gradient(on_emulated_cuda, shape):
    B, S, C, D = shape
    g = gen(S)
    labels = covering_labels((B,), S, C, g)
    z = rand(B, S, D, gen=g, requires_grad=True)
    got = class_prototypes(z, labels, C)
    want = reference.class_prototypes(z, labels, C)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(B, C, D, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, z, grad_out)[0],
                               torch.autograd.grad(want, z, grad_out)[0], rtol=1e-12, atol=1e-12)


def test_class_prototypes_label_errors_match_the_cpu(on_emulated_cuda):
    z = torch.randn(3, 4, 8)
    wrong = torch.tensor([[0, 1, 0, 1], [0, 1, 5, 1], [0, 0, 0, 0]])  # task 1: 5 out of range
    with pytest.raises(ValueError, match=r"5.*task 1|task 1.*5"):
        class_prototypes(z, wrong, 2)
    empty = torch.tensor([[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]])  # task 2 lacks class 1
    with pytest.raises(ValueError, match=r"class 1.*task 2|task 2.*class 1"):
        class_prototypes(z, empty, 2)
    out = class_prototypes(z, empty, 2, validate=False)  # unvalidated: NaN row, nothing worse
    assert out[2, 1].isnan().all() and not out[:2].isnan().any()


def _conv4_like(T, shared, count=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (5, 8), (5,), (1,)] * (count // 5 + 1)
    shapes = shapes[:count]
    params = [torch.randn(*(() if shared else (T,)), *s, generator=g, dtype=torch.float64)
              for s in shapes]
    grads = [torch.randn(T, *s, generator=g, dtype=torch.float64) for s in shapes]
    return params, grads


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("rates", ["float", "per-layer", "per-parameter", "per-task"])
def test_sgd_step_layouts_and_rates(on_emulated_cuda, shared, rates):
    T = 3
    params, grads = _conv4_like(T, shared)
    lr = {"float": 0.1,
          "per-layer": [torch.tensor(0.01 * (i + 1), dtype=torch.float64) for i in range(18)],
          "per-parameter": [torch.rand(p.shape[0 if shared else 1:], dtype=torch.float64)
                            for p in params],
          "per-task": [torch.rand(T, *p.shape[0 if shared else 1:], dtype=torch.float64)
                       for p in params]}[rates]
    inputs = [t.requires_grad_() for t in [*params, *grads, *(lr if rates != "float" else [])]]
    got = sgd_step(params, grads, lr)
    want = reference.sgd_step(params, grads, lr)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ups = [torch.randn_like(o) for o in got]  # the grads' gradient is the kernel's -lr * up
    for a, b in zip(torch.autograd.grad(got, inputs, ups), torch.autograd.grad(want, inputs, ups)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("driver", ["13000", "12000"])  # 12.0: at most 4 KB of parameters
@pytest.mark.parametrize("count", [60, 400])  # the 384-tensor batch, then two launches
def test_sgd_step_long_lists_in_place(on_emulated_cuda, monkeypatch, count, driver):
    monkeypatch.setenv("PYMETA_EMULATED_DRIVER", driver)
    params, grads = _conv4_like(2, False, count, seed=count)
    want = [p - 0.5 * g for p, g in zip(params, grads)]
    sgd_step_(params, grads, 0.5)
    for a, b in zip(params, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_labels_are_validated_when_the_output_is_empty(emulated):
    """D = 0: no prototype to compute, yet the validation kernel still judges the labels."""
    z, out = torch.empty(2, 3, 0), torch.empty(2, 2, 0)
    for labels, want in (([[0, 1, 1], [1, 0, 0]], (0, -1, -1, 0)),   # fine
                         ([[0, 1, 1], [1, 7, 0]], (1, 1, 1, 7)),      # task 1, sample 1: 7
                         ([[0, 0, 0], [1, 0, 0]], (2, 0, 1, 0))):     # task 0 lacks class 1
        labels = torch.tensor(labels)
        status = emulated.class_prototypes_forward(0, 0, 1, 0, 2, 3, 2, 0, z.data_ptr(),
                                                   labels.data_ptr(), out.data_ptr(), True)
        assert tuple(status) == want


@pytest.mark.skipif(SANITIZED, reason="this is the sanitized run")
def test_kernels_stay_in_bounds(emulated):
    """This module again, with the kernels under AddressSanitizer (the role compute-sanitizer
    plays on a GPU): an out-of-bounds read or write anywhere fails it with the report."""
    runtime = cuda_emulator.asan_runtime()
    if runtime is None:
        pytest.skip("no AddressSanitizer runtime")
    env = {**os.environ, "PYMETA_CUDA_EMULATOR_ASAN": "1", "LD_PRELOAD": runtime,
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"}
    res = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-s",
                          "-p", "no:cacheprovider"], env=env, capture_output=True, text=True,
                         timeout=1200, cwd=Path(__file__).parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout


# ---- the CUDA kernels against the CPU kernels on edge cases (as tests/test_cuda.py does) --

def same_as_cpu_kernels(monkeypatch, emulated, fn, inputs, dtype):
    """fn's output and input gradients through the emulated CUDA kernels equal those through
    the CPU kernels."""
    cpu = outputs_and_grads(fn, inputs, dtype)
    with monkeypatch.context() as m:
        route_to(m, emulated)
        assert_same_as_cpu(outputs_and_grads(fn, inputs, dtype), cpu, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances_edge_cases_match_the_cpu(emulated, monkeypatch, metric, dtype):
    for a, b in pairwise_edge_cases(dtype):
        same_as_cpu_kernels(monkeypatch, emulated, lambda a, b: pairwise_distances(a, b, metric),
                            (a, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unvalidated_wild_labels_match_the_cpu(emulated, monkeypatch, dtype):
    """Labels out of range and classes without samples, unvalidated: the same NaN rows and
    zero gradients (and no out-of-bounds access: the sanitized run checks that)."""
    z = rand(3, 8, 5, dtype=dtype, gen=gen(12))
    for zz in (z, with_non_finite(z)):
        same_as_cpu_kernels(monkeypatch, emulated,
                            lambda a, lab: class_prototypes(a, lab, 5, validate=False),
                            (zz, WILD_LABELS), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_step_edge_cases_match_the_cpu(emulated, monkeypatch, dtype):
    same_as_cpu_kernels(
        monkeypatch, emulated,
        lambda *t: torch.cat([o.flatten() for o in sgd_step(list(t[:2]), list(t[2:]), 0.5)]),
        sgd_edge_inputs(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_prototypes_are_bitwise_the_cpu_kernels(emulated, monkeypatch, dtype):
    """Both sum each class in sample order and scale by 1/count: the same bits, uneven shots
    and unsorted labels included (outputs and gradients)."""
    g = gen(7)
    labels = torch.stack([torch.randint(0, 3, (11,), generator=g) for _ in range(4)])
    labels[:, :3] = torch.arange(3)  # every class present; shots differ
    z = rand(4, 11, 37, dtype=dtype, gen=g) * 3
    fn = lambda a, lab: class_prototypes(a, lab, 3)  # noqa: E731
    cpu = outputs_and_grads(fn, (z, labels), dtype)
    with monkeypatch.context() as m:
        route_to(m, emulated)
        for got, want in zip(outputs_and_grads(fn, (z, labels), dtype), cpu):
            assert torch.equal(got, want)
