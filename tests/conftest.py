"""Shared helpers for the pymeta test suite (imported by the test modules as ``conftest``)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import pymeta
from pymeta import ops
from pymeta.ops import reference

METRICS = sorted(ops.METRICS)
DTYPES = [torch.float32, torch.float64]
# float64 kernels must match the reference to rounding; float32 loosely (different sum orders).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

HAS_CUDA_KERNELS = torch.cuda.is_available() and pymeta.info()["cuda_kernels"]
requires_cuda = [pytest.mark.cuda, pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA GPU and pymeta built with CUDA kernels")]

# Hypothesis: many random shapes, reproducible (derandomized), no deadline (first calls are slow).
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
sizes = st.integers(0, 5)           # a dim that may be empty or 1
lead_shapes = st.lists(st.integers(0, 3), max_size=2).map(tuple)   # task dims ([], [T], [T1, T2])
seeds = st.integers(0, 2**31 - 1)


def rand(*shape, dtype=torch.float64, gen=None, requires_grad=False):
    """Standard normal CPU tensor, drawn in float64 so that every dtype sees the same values."""
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype).requires_grad_(requires_grad)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def covering_labels(lead, S, C, g=None) -> torch.Tensor:
    """Shuffled labels [*lead, S] in [0, C) with every class present (needs S >= C)."""
    assert S >= C
    base = torch.arange(S) % max(C, 1)
    rows = [base[torch.randperm(S, generator=g)] for _ in range(torch.Size(lead).numel())]
    return (torch.stack(rows) if rows else base.new_empty(0, S)).reshape(*lead, S)


# ---- edge cases on which the CUDA kernels (real or emulated) must match the CPU kernels ----

def with_non_finite(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[::7] = float("nan")
    t.view(-1)[3::11] = float("inf")
    t.view(-1)[5::13] = -float("inf")
    return t


def pairwise_edge_cases(dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = gen(11)
    x, y = rand(2, 6, 9, dtype=dtype, gen=g), rand(2, 4, 9, dtype=dtype, gen=g)
    zero_rows = x.clone()
    zero_rows[:, 0] = 0                   # cosine's eps, Euclidean's zero distance
    zero_rows[:, 1] = 1e-12
    return [(with_non_finite(x), y), (x, with_non_finite(y)), (zero_rows, zero_rows[:, :4]),
            (rand(2, 0, 9, dtype=dtype), y), (x, rand(2, 0, 9, dtype=dtype)),
            (rand(2, 6, 0, dtype=dtype), rand(2, 4, 0, dtype=dtype)),
            (x * 1e18, y * 1e18), (x * 1e-20, y * 0)]   # no fast-math overflow or flush


def assert_cosine_clamp_gradients(dtype) -> None:
    """Cosine gradients where a row's norm is far below the clamp (1e-8; not zero, so the
    pair's similarity is far below an ulp of 1 - distance), on either side, match float64,
    also per row block (those rows' gradients are tiny). A norm exactly at the clamp passes
    its gradient through, as torch.clamp_min's does."""
    g = gen(5)
    x, y = rand(2, 3, 4, dtype=dtype, gen=g), rand(2, 2, 4, dtype=dtype, gen=g)
    x[:, 0] *= 1e-16 if dtype == torch.float32 else 1e-25
    y[1, 1] *= 1e-16 if dtype == torch.float32 else 1e-25
    go = torch.randn(2, 3, 2, dtype=dtype, generator=gen(3))
    grads = vjp(lambda a, b: ops.pairwise_distances(a, b, "cosine"),
                (x.requires_grad_(), y.requires_grad_()), go)[1]
    exact = vjp(lambda a, b: reference.pairwise_distances(a, b, "cosine"),
                (x.double().requires_grad_(), y.double().requires_grad_()), go.double())[1]
    tol = 10 * torch.finfo(dtype).eps
    for got, want in [*zip(grads, exact), (grads[1][0], exact[1][0]), (grads[0][1], exact[0][1])]:
        assert relative_error(got, want) < tol
    at_limit, ones = torch.tensor([[[1e-8, 0]]], dtype=dtype), torch.ones(1, 1, 2, dtype=dtype)
    got, want = (vjp(lambda a: fn(a, ones, "cosine"), (at_limit.clone().requires_grad_(),))[1][0]
                 for fn in (ops.pairwise_distances, reference.pairwise_distances))
    assert relative_error(got, want) < tol  # [0, -7.1e7]: the radial term cancels the first
    assert got[0, 0, 0].abs() < 1e-6 * got[0, 0, 1].abs()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


# out-of-range labels and classes without samples, for unvalidated class_prototypes (C = 5)
WILD_LABELS = torch.tensor([[0, 1, 2, 3, -1, 4, 100, 2], [0, 0, 0, 0, 0, 0, 0, 0],
                            [4, 3, 2, 1, 0, 5, -7, 1]])


def sgd_edge_inputs(dtype) -> tuple[torch.Tensor, ...]:
    """(p0, p1, g0, g1): a subnormal (no flush to zero), NaN and inf, an empty task batch."""
    tiny = torch.finfo(dtype).tiny / 4
    return (torch.tensor([tiny, 1.0, float("nan"), float("inf")], dtype=dtype),
            rand(4, 3, dtype=dtype), torch.tensor([0.0, float("inf"), 1.0, 1.0], dtype=dtype),
            rand(0, 4, 3, dtype=dtype))


def outputs_and_grads(fn, inputs, dtype) -> list[torch.Tensor]:
    """fn's output and the gradients of every floating input for a fixed upstream gradient
    (zeros for an input the output does not reach)."""
    ts = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*ts)
    leaves = [t for t in ts if t.requires_grad]
    go = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape).to(out.device)
    grads = torch.autograd.grad(out, leaves, go, allow_unused=True)
    return [out, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))]


def assert_same_as_cpu(got: list, cpu: list, dtype) -> None:
    """NaN where the CPU kernels have NaN, inf where inf; atol relative to each tensor's scale
    (sums that cancel: 1e18-sized inputs differ by 1.4e-5 in float32 between the kernels), so
    subnormal results must match too: a flush to zero fails."""
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for g, c in zip(got, cpu):
        scale = float(c.detach().nan_to_num(0, 0, 0).abs().max()) if c.numel() else 0.0
        torch.testing.assert_close(g.detach().cpu(), c.detach(), equal_nan=True, rtol=rtol,
                                   atol=rtol * scale)


class _MeanOverTokens(torch.nn.Module):
    def forward(self, x):
        return x.mean(-2)  # [B, L, E] token embeddings -> [B, E]


def token_model(out: int) -> torch.nn.Module:
    """A text model in float64: int64/int32 token ids ``[L]`` -> mean embedding -> LayerNorm
    -> ``[out]`` (not nn.EmbeddingBag: torch has no second derivative for it)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(13, 6), _MeanOverTokens(),
                               torch.nn.LayerNorm(6), torch.nn.Tanh(),
                               torch.nn.Linear(6, out)).double()


def interrupt_fit_after(trainer, step: int) -> None:
    """Runs ``trainer.fit()`` until a KeyboardInterrupt stops it after ``step`` steps."""
    train_step = trainer.train_step

    def interrupted(ep):
        if trainer.step == step:
            raise KeyboardInterrupt
        return train_step(ep)
    trainer.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def vjp(fn, inputs, grad_out=None):
    """(output, grads of <output, grad_out> w.r.t. every input); unused inputs get zeros."""
    out = fn(*inputs)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if grad_out is None:
        grad_out = [torch.randn(o.shape, dtype=torch.float64, generator=gen(1)).to(o)
                    for o in outs]
    grads = torch.autograd.grad(outs, inputs, grad_out, allow_unused=True)
    return out, [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


def assert_close(actual, expected, dtype=torch.float64, **kw):
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype, **kw)
        return
    torch.testing.assert_close(actual, expected, **{**TOL[dtype], "equal_nan": True, **kw})


def ref_sgd(params, grads, lr):
    """The reference step, with None params read as zero."""
    return reference.sgd_step([torch.zeros_like(g) if p is None else p
                               for p, g in zip(params, grads)], grads, lr)


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_python(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python *argv`` in a fresh interpreter; a hang fails the test instead of stalling it."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    try:  # run outside the checkout, so `import pymeta` finds the installed package
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"subprocess hung (> {timeout} s); output so far:\n{e.stdout}\n{e.stderr}")


@pytest.fixture(autouse=True)
def _restore_threads():
    """No test may leak a changed thread count to the next."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --- dataset readers ---------------------------------------------------------------------
OMNIGLOT_SMALL = ("images_background_small1.zip", "images_background_small2.zip")


def _omniglot_data_root():
    """``$PYMETA_DATA``, else ``<repo>/../shared/data``: the first holding both small zips."""
    from pathlib import Path

    candidates = [Path(os.environ["PYMETA_DATA"])] if os.environ.get("PYMETA_DATA") else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for root in candidates:
        if all((root / "omniglot" / name).is_file() for name in OMNIGLOT_SMALL):
            return root
    return None


@pytest.fixture(scope="session")
def omniglot_root():
    """Data root holding ``omniglot/images_background_small{1,2}.zip``; skips without it.

    Treat it as read-only: load with ``cache=False`` or a temp cache directory.
    """
    root = _omniglot_data_root()
    if root is None:
        pytest.skip("Omniglot small archives not found: set PYMETA_DATA to a folder with "
                    "omniglot/images_background_small1.zip and ..._small2.zip")
    return root


def reference_omniglot(png: bytes, size: int):
    """Independent Omniglot preprocessing: ink (< 128) via a PIL lookup table, LANCZOS resize."""
    import io

    import numpy as np
    from PIL import Image

    ink = Image.open(io.BytesIO(png)).convert("L").point(lambda v: 255 if v < 128 else 0)
    return np.array(ink.resize((size, size), Image.LANCZOS))
