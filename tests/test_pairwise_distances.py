import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import (DTYPES, METRICS, SETTINGS, assert_close, assert_cosine_clamp_gradients, gen,
                      lead_shapes, rand, relative_error, seeds, sizes, vjp)
from pymeta import ops
from pymeta.ops import reference

pd = ops.pairwise_distances
# past 2 x 8 float32 lanes: the forward holds support rows in vectors, then takes a tail
support_rows = st.integers(0, 20)


def _check_against_reference(lead, Q, N, D, metric, dtype, seed, strided=False):
    g = gen(seed)
    x = rand(*lead, Q, D, dtype=dtype, gen=g, requires_grad=True)
    y = rand(*lead, N, D, dtype=dtype, gen=g, requires_grad=True)
    if strided:  # support rows as the transpose of a [D, N] tensor
        y = y.detach().mT.contiguous().mT.requires_grad_()
    out, grads = vjp(lambda a, b: pd(a, b, metric), (x, y))
    ref, ref_grads = vjp(lambda a, b: reference.pairwise_distances(a, b, metric), (x, y))
    assert out.shape == (*lead, Q, N) and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(grads, ref_grads, dtype)
    with torch.no_grad():  # the light eager path computes the same thing as the autograd one
        assert torch.equal(pd(x, y, metric), out)


@SETTINGS
@given(lead=lead_shapes, Q=sizes, N=support_rows, D=st.integers(0, 40),
       metric=st.sampled_from(METRICS), seed=seeds, strided=st.booleans())
def test_matches_reference_float64(lead, Q, N, D, metric, seed, strided):
    _check_against_reference(lead, Q, N, D, metric, torch.float64, seed, strided)


@SETTINGS
@given(lead=lead_shapes, Q=sizes, N=support_rows, D=st.integers(0, 40),
       metric=st.sampled_from(METRICS), seed=seeds, strided=st.booleans())
def test_matches_reference_float32(lead, Q, N, D, metric, seed, strided):
    _check_against_reference(lead, Q, N, D, metric, torch.float32, seed, strided)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_builtins(dtype):
    x, y = rand(3, 7, 33, dtype=dtype), rand(3, 4, 33, dtype=dtype)
    cdist = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    cos = F.cosine_similarity(x.unsqueeze(-2), y.unsqueeze(-3), dim=-1)
    assert_close(pd(x, y, "euclidean"), cdist, dtype)
    assert_close(pd(x, y, "sqeuclidean"), cdist ** 2, dtype)
    assert_close(pd(x, y, "cosine"), 1 - cos, dtype)
    assert_close(pd(x, y, "dot"), -torch.einsum("tqd,tnd->tqn", x, y), dtype)
    assert_close(pd(x, y), pd(x, y, "sqeuclidean"), dtype)  # the default metric


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_and_gradgradcheck(metric):
    g = gen(3)
    x = rand(2, 3, 4, gen=g, requires_grad=True)
    y = rand(2, 5, 4, gen=g, requires_grad=True)
    fn = lambda a, b: pd(a, b, metric)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y))
    assert torch.autograd.gradgradcheck(fn, (x, y))
    # one side only needing a gradient
    assert torch.autograd.gradgradcheck(fn, (x, y.detach()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_gradients_of_rows_at_the_norm_clamp(dtype):
    """Rows whose norm is far below the clamp once lost the other side's radial term (the
    similarity was read back from 1 - distance: 29% off)."""
    assert_cosine_clamp_gradients(dtype)


def test_cosine_zero_vector_is_distance_one_with_finite_grads():
    x = torch.zeros(2, 3, 5, dtype=torch.float64)
    x[:, 1] = torch.randn(2, 5, dtype=torch.float64)
    y = rand(2, 4, 5)
    y[0, 2] = 0
    x.requires_grad_(), y.requires_grad_()
    out, grads = vjp(lambda a, b: pd(a, b, "cosine"), (x, y))
    _, ref_grads = vjp(lambda a, b: reference.pairwise_distances(a, b, "cosine"), (x, y))
    cos = F.cosine_similarity(x.unsqueeze(-2), y.unsqueeze(-3), dim=-1, eps=1e-8)
    assert_close(out, 1 - cos)
    assert (out[:, 0] == 1).all() and (out[0, :, 2] == 1).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert_close(grads, ref_grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_euclidean_gradient_is_zero_at_zero_distance(dtype):
    y = rand(1, 3, 6, dtype=dtype)
    x = torch.cat([y[:, 1:2], rand(1, 2, 6, dtype=dtype)], 1)  # query 0 == support 1
    x.requires_grad_(), y.requires_grad_()
    out, grads = vjp(lambda a, b: pd(a, b, "euclidean"), (x, y))
    cd_out, cd_grads = vjp(torch.cdist, (x, y))
    assert out[0, 0, 1] == 0
    assert_close(out, cd_out, dtype)
    assert_close(grads, cd_grads, dtype)
    assert all(torch.isfinite(g).all() for g in grads)


def test_euclidean_gradient_of_a_nan_distance_is_nan():
    """A NaN distance is not a zero distance: its gradient is NaN, as torch.cdist's."""
    x = torch.tensor([[float("nan"), 1.0, 2.0], [1.0, 2.0, 3.0]], dtype=torch.float64,
                     requires_grad=True)
    y = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    _, grads = vjp(lambda a, b: pd(a, b, "euclidean"), (x, y))
    _, ref_grads = vjp(lambda a, b: torch.cdist(a, b), (x, y))
    assert grads[0][0].isnan().all() and grads[1].isnan().all()
    assert_close(grads, ref_grads)  # NaN where cdist has NaN, equal elsewhere


@pytest.mark.parametrize("metric", METRICS)
def test_output_edited_in_place_keeps_the_backward_of_metrics_that_do_not_read_it(metric):
    """sqeuclidean and dot do not save the distances, so scaling them in place (a
    temperature) works as with the reference; euclidean and cosine need them, and torch
    says so."""
    x, y = rand(5, 4, requires_grad=True), rand(3, 4, requires_grad=True)
    d = pd(x, y, metric)
    d.div_(0.5)
    if metric in ("euclidean", "cosine"):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            d.sum().backward()
        return
    d.sum().backward()
    ref = reference.pairwise_distances(x, y, metric) / 0.5
    assert_close([x.grad, y.grad], torch.autograd.grad(ref.sum(), (x, y)))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [  # (lead, Q, N, D)
    ((2,), 0, 3, 4), ((2,), 3, 0, 4), ((2,), 3, 4, 0), ((0,), 3, 4, 5), ((2, 0), 1, 1, 1)])
def test_empty_dims(metric, shape):
    lead, Q, N, D = shape
    x = rand(*lead, Q, D, requires_grad=True)
    y = rand(*lead, N, D, requires_grad=True)
    out, (gx, gy) = vjp(lambda a, b: pd(a, b, metric), (x, y))
    ref = reference.pairwise_distances(x, y, metric)
    assert out.shape == ref.shape == (*lead, Q, N)
    assert_close(out, ref)
    assert gx.shape == x.shape and gy.shape == y.shape
    assert not gx.any() and not gy.any()


@pytest.mark.parametrize("metric", METRICS)
def test_nan_and_inf_propagate_like_reference(metric):
    x, y = rand(2, 4, 6), rand(2, 3, 6)
    x[0, 1, 2] = float("nan")
    x[1, 2, 0] = float("inf")
    y[1, 0, 5] = -float("inf")
    out = pd(x, y, metric)
    ref = reference.pairwise_distances(x, y, metric)
    assert_close(out, ref)
    if metric == "euclidean":  # the reference agrees with torch.cdist on NaN/Inf too
        assert_close(ref, torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist"))
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_match_contiguous(metric, dtype):
    base_x = rand(3, 9, 5, dtype=dtype)
    variants = {
        "transposed": (base_x.transpose(-1, -2).contiguous().transpose(-1, -2), rand(3, 4, 5, dtype=dtype)),
        "sliced": (rand(3, 18, 10, dtype=dtype)[:, ::2, 1::2], rand(3, 8, 5, dtype=dtype)[:, ::2]),
        "expanded": (base_x, rand(1, 4, 5, dtype=dtype).expand(3, 4, 5)),
    }
    for name, (x, y) in variants.items():
        assert not (x.is_contiguous() and y.is_contiguous()), name
        x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        xc = x.detach().contiguous().requires_grad_()
        yc = y.detach().contiguous().requires_grad_()
        go = rand(3, x.shape[1], 4, dtype=dtype)
        out, grads = vjp(lambda a, b: pd(a, b, metric), (x, y), [go])
        outc, gradsc = vjp(lambda a, b: pd(a, b, metric), (xc, yc), [go])
        assert torch.equal(out, outc), name
        assert all(torch.equal(a, b) for a, b in zip(grads, gradsc)), name


def test_large_values_accumulate_like_reference():
    """A long feature dim through the lane-sum path, in float32 against float64: within 1e-6
    of the largest value (measured 0.5-2.8e-7; one running float32 sum is ~2e-6 off)."""
    x, y = rand(2, 5, 3001, dtype=torch.float32), rand(2, 4, 3001, dtype=torch.float32)
    for metric in METRICS:
        ref = reference.pairwise_distances(x.double(), y.double(), metric)
        assert relative_error(pd(x, y, metric), ref) < 1e-6, metric


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("N", [8, 9, 17])  # 8 float32 lanes of support rows, then a tail
def test_float32_support_rows_in_vectors(metric, N):
    """Output and gradients against float64, with strided support rows; float32 rounding
    leaves ~2e-7 of the largest value (measured)."""
    g = gen(N)
    x = rand(2, 11, 37, dtype=torch.float32, gen=g, requires_grad=True)
    y = rand(2, 37, N, dtype=torch.float32, gen=g).transpose(-1, -2).detach().requires_grad_()
    go = rand(2, 11, N, dtype=torch.float32, gen=g)
    out, grads = vjp(lambda a, b: pd(a, b, metric), (x, y), [go])
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    ref, ref_grads = vjp(lambda a, b: reference.pairwise_distances(a, b, metric), (x64, y64),
                         [go.double()])
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("N,D", [(5, 64), (3, 7)])  # vector and scalar feature loops
def test_gradient_of_close_rows_keeps_float32_precision(metric, N, D):
    # rows near 10 that differ by ~1e-3: grad = sum 2g (x - y) must not come from 2g x - 2g y
    g = gen(5)
    x = (10 + 1e-3 * torch.randn(4, 6, D, generator=g)).requires_grad_()
    y = (10 + 1e-3 * torch.randn(4, N, D, generator=g)).requires_grad_()
    up = torch.randn(4, 6, N, generator=g)
    grads = torch.autograd.grad(pd(x, y, metric), (x, y), up)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = torch.autograd.grad(reference.pairwise_distances(x64, y64, metric), (x64, y64),
                              up.double())
    for got, want in zip(grads, ref):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, f"{metric}: relative gradient error {err:.2e}"


def test_dot_gradient_keeps_an_infinite_input_out_of_its_own_gradient():
    # d(-x.y)/dx = -y whatever x holds: 0 * Inf from a zero self term must not make it NaN
    inf = float("inf")
    x = torch.tensor([[[inf, 1.0], [1.0, 2.0]]], requires_grad=True)
    y = torch.tensor([[[0.0, 0.0], [1.0, inf]]], requires_grad=True)
    got = torch.autograd.grad(pd(x, y, "dot").sum(), (x, y))
    x2, y2 = x.detach().requires_grad_(), y.detach().requires_grad_()
    want = torch.autograd.grad((-(x2 @ y2.transpose(1, 2))).sum(), (x2, y2))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_results_are_not_flushed(dtype):
    """Squares of 1e-20 (float32) or 1e-160 (float64) are subnormal: kept, as torch keeps
    them, not flushed to zero by the kernels."""
    scale = 1e-20 if dtype == torch.float32 else 1e-160
    x, y = rand(2, 3, 9, dtype=dtype) * scale, torch.zeros(2, 4, 9, dtype=dtype)
    for metric in ("sqeuclidean", "dot"):
        other = y + x[:, :1] if metric == "dot" else y  # dot needs a nonzero other side
        out, ref = pd(x, other, metric), reference.pairwise_distances(x, other, metric)
        assert ref.abs().max() < torch.finfo(dtype).tiny and (ref != 0).all()
        assert relative_error(out, ref) < 1e-5, metric
