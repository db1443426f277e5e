"""The fused BatchNorm - ReLU - max-pool op against torch's own three ops."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import DTYPES, SETTINGS, assert_close, gen, num_threads, rand, seeds, vjp
DT = torch.float64
from pymeta.ops import batch_norm_relu_pool, reference

f = batch_norm_relu_pool


def params(C, dtype=torch.float64, g=None):
    """Weights of both signs (a negative weight turns the window maximum into a minimum)."""
    w = (torch.rand(C, dtype=torch.float64, generator=g) * 2 - 0.5).to(dtype).requires_grad_()
    return w, rand(C, dtype=dtype, gen=g, requires_grad=True)


@SETTINGS
@given(N=st.integers(1, 4), C=st.integers(1, 11), H=st.integers(2, 7), W=st.integers(2, 7),
       channels_last=st.booleans(), dtype=st.sampled_from(DTYPES), seed=seeds)
def test_matches_reference(N, C, H, W, channels_last, dtype, seed):
    g = gen(seed)
    x = rand(N, C, H, W, dtype=dtype, gen=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = params(C, dtype, g)
    out, grads = vjp(lambda *a: f(*a)[0], (x, w, b))
    ref, ref_grads = vjp(lambda *a: reference.batch_norm_relu_pool(*a)[0], (x, w, b))
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(grads, ref_grads, dtype)
    _, mean, var = f(x, w, b)
    _, ref_mean, ref_var = reference.batch_norm_relu_pool(x, w, b)
    assert_close((mean, var), (ref_mean, ref_var), dtype)
    assert not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 4, 4), (1, 2, 7, 5)])
def test_gradcheck_and_gradgradcheck(shape):
    """Second derivatives too: second-order MAML differentiates the backward."""
    g = gen(3)
    x = rand(*shape, gen=g, requires_grad=True)
    w, b = params(shape[1], g=g)
    fn = lambda *a: f(*a)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_second_derivatives_match_reference():
    """A scalar of all three first derivatives, differentiated again, as torch's ops give."""
    x = rand(4, 3, 6, 5, gen=gen(8), requires_grad=True)
    w, b = params(3, g=gen(9))
    grad_out = rand(4, 3, 3, 2, gen=gen(10))

    def second(fn):
        gx, gw, gb = torch.autograd.grad(fn(x, w, b)[0], (x, w, b), grad_out, create_graph=True)
        s = (gx ** 2).sum() + (gw * torch.arange(3.0, dtype=DT)).sum() + (gb ** 3).sum()
        grads = torch.autograd.grad(s, (x, w, b), allow_unused=True)
        return [torch.zeros_like(t) if d is None else d for d, t in zip(grads, (x, w, b))]

    assert_close(second(f), second(reference.batch_norm_relu_pool))


def test_third_derivative_raises():
    """create_graph through the second derivative must raise, not return a constant."""
    x = rand(2, 3, 4, 4, requires_grad=True)
    w, b = params(3)
    gx, = torch.autograd.grad(f(x, w, b)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative is not differentiable"):
        torch.autograd.grad((gx ** 2).sum(), x, create_graph=True)


def test_ties_send_the_gradient_to_the_first_maximum():
    """Equal values in a window: torch's max-pool picks the first; so must the kernel."""
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).view(2, 3, 2, 2)
    x = x.repeat_interleave(2, -1).repeat_interleave(2, -2).requires_grad_()  # 2x2 blocks
    w, b = params(3, g=gen(1))
    out, grads = vjp(lambda *a: f(*a)[0], (x, w, b))
    ref, ref_grads = vjp(lambda *a: reference.batch_norm_relu_pool(*a)[0], (x, w, b))
    assert_close(out, ref)
    assert torch.equal(grads[0] != 0, ref_grads[0] != 0)
    assert_close(grads, ref_grads)


def test_nan_propagates_like_torch():
    """Outputs and gradients; the ReLU passes a NaN's gradient, as torch's does (the bias of
    a NaN channel once got 0 instead of its pooled output count)."""
    x = rand(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        x[1, 2, 3, 0] = float("nan")
    w, b = params(3)
    out, grads = vjp(lambda *a: f(*a)[0], (x, w, b))
    ref, ref_grads = vjp(lambda *a: reference.batch_norm_relu_pool(*a)[0], (x, w, b))
    assert torch.equal(out.isnan(), ref.isnan()) and out[:, 2].isnan().all()
    assert_close([out, *grads], [ref, *ref_grads])
    assert grads[2][2] == ref_grads[2][2] != 0


def test_bitwise_identical_across_thread_counts():
    x = rand(40, 24, 14, 14, gen=gen(5)).float().contiguous(memory_format=torch.channels_last)
    w, b = params(24, torch.float32, gen(6))
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            xx = x.clone().requires_grad_()
            out, mean, var = f(xx, w, b)
            grads = torch.autograd.grad(out, (xx, w, b), torch.ones_like(out))
            results.append((out, mean, var, *grads))
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


def test_gradient_only_where_requested():
    x = rand(2, 3, 4, 4)
    w, b = params(3)
    gw, = torch.autograd.grad(f(x, w, b.detach())[0].sum(), w)
    ref, = torch.autograd.grad(reference.batch_norm_relu_pool(x, w, b.detach())[0].sum(), w)
    assert_close(gw, ref)


@pytest.mark.parametrize("case, match", [
    (lambda w, b: (rand(3, 4, 4), w, b), r"\[N, C, H, W\]"),
    (lambda w, b: (rand(2, 3, 4, 4), w[:2], b), r"weight must be \[3\]"),
    (lambda w, b: (rand(2, 3, 4, 4), w, b.view(3, 1)), r"bias must be \[3\]"),
    (lambda w, b: (rand(2, 3, 1, 4), w, b), "H and W >= 2"),
    (lambda w, b: (torch.ones(2, 3, 4, 4, dtype=torch.int64), w, b), "floating"),
    (lambda w, b: (rand(2, 3, 4, 4).float(), w, b), "one dtype"),
    (lambda w, b: (rand(2, 3, 4, 4).half(), w.half(), b.half()), "float32 and float64"),
    (lambda w, b: (rand(2, 3, 4, 4).numpy(), w, b), "x must be a torch.Tensor, got ndarray"),
    (lambda w, b: (rand(2, 3, 4, 4), w, b, 0.0), "eps must be a positive float, got 0.0"),
], ids=["rank", "weight", "bias", "too small", "int", "mixed", "half", "numpy", "eps"])
def test_bad_input_raises(case, match):
    w, b = params(3)
    with pytest.raises((ValueError, TypeError), match=match):
        f(*case(w.detach(), b.detach()))



def test_numpy_scalar_eps_is_a_float():
    import numpy as np
    x = rand(2, 3, 4, 4)
    w, b = params(3)
    assert_close(f(x, w, b, np.float32(1e-3))[0], reference.batch_norm_relu_pool(x, w, b, 1e-3)[0])


def test_returned_statistics_are_not_the_saved_ones():
    """Editing the returned mean in place (as a running-stats update might) must not touch
    what backward reads; in float64 they were views of the saved statistics."""
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w, b = torch.rand(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    out, mean, var = batch_norm_relu_pool(x, w, b)
    expected = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    mean.mul_(0.9)
    var.add_(1.0)
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], expected)


def test_outputs_follow_the_input_device_not_the_default_one():
    """Outputs allocated on torch's default device (meta here) were written through by the
    CPU kernel: a crash."""
    x, (w, b) = rand(2, 3, 4, 4), params(3)
    expected = f(x, w, b)
    torch.set_default_device("meta")
    try:
        got = f(x, w, b)
    finally:
        torch.set_default_device(None)
    assert all(t.device.type == "cpu" for t in got)
    assert_close(got, expected, DT)


def test_fake_traced_and_functorch_tensors_take_torchs_ops():
    """Tensors without data (FakeTensorMode, make_fx) reached the kernel as null pointers;
    they, and torch.func's wrappers, now run the reference ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    x, (w, b) = rand(2, 3, 4, 6), params(3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert [tuple(t.shape) for t in f(x, w, b)] == [(2, 3, 2, 3), (3,), (3,)]
    traced = make_fx(lambda *a: f(*a)[0])(x, w.detach(), b.detach())
    x2 = rand(2, 3, 4, 6, gen=gen(5))
    assert_close(traced(x2, w.detach(), b.detach()),
                 reference.batch_norm_relu_pool(x2, w, b)[0], DT)
    grad = torch.func.grad(lambda u: f(u, w, b)[0].square().sum())(x)
    ref = torch.func.grad(lambda u: reference.batch_norm_relu_pool(u, w, b)[0].square().sum())(x)
    assert_close(grad, ref, DT)
