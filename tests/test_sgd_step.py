import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import DTYPES, SETTINGS, assert_close, gen, rand, ref_sgd, vjp
from pymeta import ops


@st.composite
def sgd_problems(draw):
    """(param shapes or None, grad shapes, lr: float or list of lr shapes) over every layout:
    params [T, ...] / shared [...] / None / needing materialisation, grads [T, ...] or [...],
    rates 0-d / [...] / [T, ...] / [T, 1, ...]."""
    T = draw(st.integers(0, 3))
    n = draw(st.integers(1, 4))
    tensor_lr = draw(st.booleans())
    ps, gs, ls = [], [], []
    for _ in range(n):
        inner = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
        stacked = (T, *inner)
        kind = draw(st.sampled_from(["full", "shared", "none", "full_p_shared_g", "row"]))
        p, g = {"full": (stacked, stacked), "shared": (inner, stacked), "none": (None, stacked),
                "full_p_shared_g": (stacked, inner),
                "row": ((1, *inner[-1:]), stacked)}[kind]
        ps.append(p)
        gs.append(g)
        if tensor_lr:
            ls.append(draw(st.sampled_from([(), inner, stacked, (T,) + (1,) * len(inner)])))
    # no subnormal rates: torch < 2.6's compiled kernels (-ffast-math) flush them process-wide
    lr = ls if tensor_lr else draw(st.floats(-2, 2, allow_nan=False, allow_subnormal=False))
    return ps, gs, lr


def _make(problem, dtype, seed, requires_grad=True):
    ps, gs, lr = problem
    g = gen(seed)
    mk = lambda s: None if s is None else rand(*s, dtype=dtype, gen=g, requires_grad=requires_grad)  # noqa: E731
    return [mk(s) for s in ps], [mk(s) for s in gs], ([mk(s) for s in lr] if isinstance(lr, list) else lr)


@SETTINGS
@given(problem=sgd_problems(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(problem, dtype, seed):
    params, grads, lr = _make(problem, dtype, seed)
    leaves = [t for t in (*params, *grads, *(lr if isinstance(lr, list) else ())) if t is not None]
    n = len(grads)
    out, dl = vjp(lambda *t: ops.sgd_step(*_rebuild(params, grads, lr, t)), leaves)
    ref, dref = vjp(lambda *t: ref_sgd(*_rebuild(params, grads, lr, t)), leaves)
    assert len(out) == n and len(dl) == len(leaves)
    assert all(o.shape == r.shape and o.dtype == dtype for o, r in zip(out, ref))
    assert_close(out, ref, dtype)
    assert_close(dl, dref, dtype)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ops.sgd_step(params, grads, lr), out))


def _rebuild(params, grads, lr, leaves):
    """params, grads, lr with their tensors replaced, in order, by ``leaves``."""
    it = iter(leaves)
    params = [None if p is None else next(it) for p in params]
    grads = [next(it) for _ in grads]
    lr = [next(it) for _ in lr] if isinstance(lr, list) else lr
    return params, grads, lr


def test_gradcheck_and_gradgradcheck():
    g = gen(5)
    p = [rand(3, 4, gen=g), None, rand(2, 5, gen=g), rand(3, gen=g)]
    gr = [rand(2, 3, 4, gen=g), rand(2, 3, gen=g), rand(2, 5, gen=g), rand(2, 3, gen=g)]
    lr = [rand(gen=g), rand(3, gen=g), rand(2, 1, gen=g), rand(2, 3, gen=g)]
    leaves = [t.requires_grad_() for t in (*p, *gr, *lr) if t is not None]
    fn = lambda *t: tuple(ops.sgd_step(*_rebuild(p, gr, lr, t)))  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)
    plr = [t.detach().requires_grad_() for t in (p[0], gr[0])]
    assert torch.autograd.gradgradcheck(lambda a, b: ops.sgd_step([a], [b], 0.37)[0], plr)


@pytest.mark.parametrize("which", ["params", "grads", "lrs"])
def test_gradient_to_one_group_only(which):
    """Meta-SGD learns only the rates, MAML only the params, etc.: the other groups are plain."""
    g = gen(6)
    groups = {"params": [rand(3, 4, gen=g), rand(5, gen=g)],
              "grads": [rand(2, 3, 4, gen=g), rand(2, 5, gen=g)],
              "lrs": [rand(3, 4, gen=g), rand(gen=g)]}
    leaves = [t.requires_grad_() for t in groups[which]]
    call = lambda f: f(groups["params"], groups["grads"], groups["lrs"])  # noqa: E731
    out, ref = call(ops.sgd_step), call(ref_sgd)
    assert_close(out, ref)
    gos = [torch.ones_like(o) for o in out]
    assert_close(torch.autograd.grad(out, leaves, gos), torch.autograd.grad(ref, leaves, gos))


@pytest.mark.parametrize("inplace", [False, True])
def test_one_tensor_rate_for_every_param(inplace):
    """A single (learned) rate tensor acts as that tensor repeated per param; its gradient
    sums over all params, as the plain-torch step gives."""
    g = gen(7)
    params = [rand(2, 3, 4, gen=g), rand(2, 5, gen=g)]
    grads = [rand(2, 3, 4, gen=g), rand(2, 5, gen=g)]
    rate = rand(gen=g).abs().requires_grad_()
    if inplace:
        with torch.no_grad():
            out = ops.sgd_step_([p.clone() for p in params], grads, rate)
        assert_close(out, ref_sgd(params, grads, [rate.detach()] * 2))
        return
    out = ops.sgd_step(params, grads, rate)
    ref = ref_sgd(params, grads, [rate] * 2)
    assert_close(out, ref)
    gos = [torch.ones_like(o) for o in out]
    (got,) = torch.autograd.grad(out, rate, gos)
    assert_close(got, -sum(g_.sum() for g_ in grads))
    assert_close(ops.sgd_step([p.numpy() for p in params], [g_.numpy() for g_ in grads],
                              rate.detach().numpy()), [r.detach().numpy() for r in ref])


@pytest.mark.parametrize("n", [18, 60])
def test_long_lists(n):
    """conv4-like lists and more tensors than one CUDA launch takes, mixing shared and per-task."""
    g = gen(n)
    shapes = [(64, 3, 3, 3) if i % 6 == 0 else (64,) if i % 2 else (5, 64) for i in range(n)]
    params = [rand(*s, gen=g) if i % 3 else rand(4, *s, gen=g) for i, s in enumerate(shapes)]
    grads = [rand(4, *s, gen=g) for s in shapes]
    assert_close(ops.sgd_step(params, grads, 0.01), ref_sgd(params, grads, 0.01))
    lrs = [rand(*s, gen=g) if i % 2 else rand(gen=g) for i, s in enumerate(shapes)]
    assert_close(ops.sgd_step(params, grads, lrs), ref_sgd(params, grads, lrs))


@pytest.mark.parametrize("shared", [False, True])
def test_working_sets_past_the_cache(shared):
    """Past the last-level cache (32-256 MiB) outputs bypass the cache through non-temporal
    stores after an alignment peel (odd task slices start unaligned): same results."""
    g = gen(9)
    T, n = 6, 2_000_003
    params = [rand(*(() if shared else (T,)), n, gen=g), rand(3, gen=g)]
    grads = [rand(T, n, gen=g), rand(T, 3, gen=g)]
    assert_close(ops.sgd_step(params, grads, 0.01), ref_sgd(params, grads, 0.01))  # float64


def test_zero_task_dim_next_to_other_tensors():
    # a T=0 shared parameter must not stop the other tensors from being computed
    p, g = [torch.randn(5), torch.randn(3)], [torch.randn(0, 5), torch.randn(3)]
    out = ops.sgd_step(p, g, 0.5)
    assert out[0].shape == (0, 5)
    assert_close(out, ref_sgd(p, g, 0.5), torch.float32)


@pytest.mark.parametrize("shapes", [[(0,)], [(2, 0)], [(0, 3)], [()], [(0,), (2,)]])
def test_empty_and_scalar_tensors(shapes):
    p = [rand(*s, requires_grad=True) for s in shapes]
    g = [rand(*s, requires_grad=True) for s in shapes]
    out, grads = vjp(lambda *t: ops.sgd_step(list(t[:len(p)]), list(t[len(p):]), 0.3), (*p, *g))
    ref, rgrads = vjp(lambda *t: ref_sgd(list(t[:len(p)]), list(t[len(p):]), 0.3), (*p, *g))
    assert_close(out, ref)
    assert_close(grads, rgrads)


def test_nan_and_inf_propagate_like_reference():
    p = [torch.tensor([1.0, float("nan"), float("inf"), 2.0])]
    g = [torch.tensor([float("inf"), 1.0, 1.0, float("nan")])]
    for lr in (0.5, [torch.tensor([0.0, 1.0, float("inf"), 1.0])]):
        assert_close(ops.sgd_step(p, g, lr), ref_sgd(p, g, lr), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_match_contiguous(dtype):
    g = gen(2)
    base = rand(4, 6, 8, dtype=dtype, gen=g)
    params = [base.transpose(1, 2), base[:, ::2], rand(6, dtype=dtype, gen=g).expand(4, 6)]
    grads = [rand(4, 6, 8, dtype=dtype, gen=g).transpose(1, 2),
             rand(4, 6, 8, dtype=dtype, gen=g)[:, 1::2], rand(4, 1, dtype=dtype, gen=g).expand(4, 6)]
    lrs = [rand(6, 1, dtype=dtype, gen=g).expand(6, 8).t(), rand(8, dtype=dtype, gen=g)[None].expand(3, 8),
           rand(4, 12, dtype=dtype, gen=g)[:, ::2]]
    for lr in (0.25, lrs):
        contiguous = ops.sgd_step([t.contiguous() for t in params], [t.contiguous() for t in grads],
                                  lr if lr == 0.25 else [t.contiguous() for t in lr])
        assert all(torch.equal(a, b) for a, b in zip(ops.sgd_step(params, grads, lr), contiguous))
        assert_close(contiguous, ref_sgd(params, grads, lr), dtype)


# ---- sgd_step_ (in place) -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_matches_out_of_place(dtype):
    g = gen(4)
    params = [rand(3, 4, dtype=dtype, gen=g), rand(5, 2, dtype=dtype, gen=g).t(), rand(2, 7, dtype=dtype, gen=g)]
    grads = [rand(3, 4, dtype=dtype, gen=g), rand(2, 5, dtype=dtype, gen=g), rand(7, dtype=dtype, gen=g)]
    for lr in (0.3, [rand(dtype=dtype, gen=g), rand(5, dtype=dtype, gen=g), rand(2, 1, dtype=dtype, gen=g)]):
        expected = ops.sgd_step(params, grads, lr)
        versions = [p._version for p in params]
        ids = [id(p) for p in params]
        result = ops.sgd_step_(params, grads, lr)
        assert result is params and [id(p) for p in result] == ids
        assert all(torch.equal(p, e) for p, e in zip(params, expected))
        assert all(p._version > v for p, v in zip(params, versions))
    assert not params[1].is_contiguous()  # updated through the view, not replaced


def test_empty_lists():
    assert ops.sgd_step([], [], 0.1) == []
    assert ops.sgd_step_([], [], 0.1) == []


def test_inplace_refuses_tensors_requiring_grad():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place update of tensors that require grad"):
        ops.sgd_step_([w], [torch.ones(3)], 0.1)
    before = w.detach().clone()
    with torch.no_grad():
        ops.sgd_step_([w], [torch.ones(3)], 0.1)
    assert_close(w.detach(), before - 0.1, torch.float32)


def test_inplace_under_forward_ad_refuses_only_dual_tensors():
    """Plain tensors update in place inside a dual level (as torch's own sub_ does); a
    dual param or grad would lose its tangent, so it is refused."""
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        p = torch.zeros(3)
        ops.sgd_step_([p], [torch.ones(3)], 0.1)
        assert_close(p, torch.full((3,), -0.1), torch.float32)
        dual = fwAD.make_dual(torch.ones(3), torch.ones(3))
        for params, grads in (([torch.zeros(3)], [dual]), ([dual], [torch.ones(3)])):
            with torch.no_grad(), pytest.raises(RuntimeError, match="dual tensors"):
                ops.sgd_step_(params, grads, 0.1)


def test_inplace_refuses_params_that_overlap_other_operands():
    """Aliased or overlapping params would make the result depend on the order of the
    updates (and on the thread count); disjoint views of one buffer and shared reads are fine."""
    a, one = torch.zeros(4), torch.ones(4)
    x = torch.arange(1.0, 2001.0)
    cases = [([a, a], [one, one], "params\\[0\\] shares memory with params\\[1\\]"),
             ([x[1:]], [x[:-1]], "shares memory with a grad or rate"),
             ([torch.zeros(4, 3).t(), None], [torch.ones(3, 4)] * 2, "params\\[0\\] shares"),
             ([a.numpy(), a.numpy()], [one.numpy()] * 2, "shares memory with params")]
    for params, grads, match in cases:
        if params[-1] is None:
            params[-1] = params[0]
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            ops.sgd_step_(params, grads, 0.5)
    flat, rate = torch.zeros(10), torch.tensor(0.5)
    with torch.no_grad():
        ops.sgd_step_([flat[:4], flat[4:]], [one, torch.ones(6)], [rate, rate])
    assert torch.equal(flat, torch.full((10,), -0.5))


def test_inplace_requires_the_result_shape():
    with pytest.raises(ValueError, match=r"params\[0\] \[3\] cannot hold the update of shape \[2, 3\]"):
        ops.sgd_step_([torch.zeros(3)], [torch.ones(2, 3)], 0.1)
    with pytest.raises(ValueError, match=r"params\[1\] \[4\] cannot hold .* \[2, 4\]"):
        ops.sgd_step_([torch.zeros(3), torch.zeros(4)], [torch.ones(3), torch.ones(4)],
                      [torch.ones(()), torch.ones(2, 4)])
    with pytest.raises(ValueError, match="params must all be tensors"):
        ops.sgd_step_([None], [torch.ones(3)], 0.1)


def test_outputs_are_independent_tensors():
    """Outputs may be modified in place, also under autograd (no shared buffer)."""
    w = torch.randn(4, requires_grad=True)
    fast = ops.sgd_step([w, w], [torch.ones(4), torch.ones(4)], 0.1)
    fast[0].mul_(2)
    fast[0].sum().backward()
    assert_close(w.grad, torch.full((4,), 2.0), torch.float32)


def test_inplace_refuses_expanded_and_inference_params_before_writing_any():
    a, b = torch.randn(3, 4), torch.randn(4)
    before = a.clone()
    with torch.no_grad(), pytest.raises(ValueError, match=r"params\[1\] is an expanded view"):
        ops.sgd_step_([a, b.expand(3, 4)], [torch.ones(3, 4)] * 2, 0.1)
    assert torch.equal(a, before)  # the list is updated whole or not at all
    with torch.inference_mode():
        frozen = torch.zeros(3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        ops.sgd_step_([frozen], [torch.ones(3)], 0.1)
    with torch.inference_mode():
        ops.sgd_step_([frozen], [torch.ones(3)], 0.1)
    assert torch.equal(frozen, torch.full((3,), -0.1))


def test_meta_tensors_get_a_clear_error():
    m = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match="unsupported device meta"):
        ops.sgd_step([m], [m], 0.1)  # the raw kernel once read meta "pointers" and crashed


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_params_are_not_flushed(dtype):
    tiny = torch.finfo(dtype).tiny / 4
    p = torch.full((3, 17), tiny, dtype=dtype)
    out = ops.sgd_step([p], [torch.full_like(p, tiny)], 0.5)[0]
    assert torch.equal(out, p - 0.5 * torch.full_like(p, tiny)) and (out != 0).all()
