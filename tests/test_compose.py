"""The ops under torch.func (grad, vmap, vmap(grad)), torch.compile and torch.library.opcheck."""
import pytest
import torch
from torch.func import grad, vmap

from conftest import METRICS, assert_close, covering_labels, gen, rand, ref_sgd
from pymeta import ops
from pymeta.ops import reference

pd, cp = ops.pairwise_distances, ops.class_prototypes
LABELS = torch.tensor([[0, 1, 2, 0, 1, 2, 2], [2, 1, 0, 0, 1, 2, 1], [1, 1, 0, 2, 2, 0, 0]])


# ---- torch.func -------------------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances_vmap_and_grad(metric):
    g = gen(7)
    x, y, y1 = rand(3, 5, 4, gen=g), rand(3, 2, 4, gen=g), rand(2, 4, gen=g)
    fn = lambda a, b: pd(a, b, metric)  # noqa: E731
    rfn = lambda a, b: reference.pairwise_distances(a, b, metric)  # noqa: E731
    assert_close(vmap(fn)(x, y), pd(x, y, metric))
    assert_close(vmap(fn, in_dims=(1, 0))(x.transpose(0, 1), y), pd(x, y, metric))
    assert_close(vmap(fn, in_dims=(0, None))(x, y1), pd(x, y1.expand(3, 2, 4), metric))
    xx, yy = torch.stack([x, x.flip(0)], 1), torch.stack([y, y.flip(0)], 1)  # two task dims
    assert_close(vmap(vmap(fn))(xx, yy), rfn(xx, yy))
    loss = lambda f: lambda a, b: (f(a, b) ** 2).sum()  # noqa: E731
    for argnums in (0, 1, (0, 1)):
        assert_close(grad(loss(fn), argnums)(x, y), grad(loss(rfn), argnums)(x, y))
        # per-task gradients, the support rows shared (unbatched)
        assert_close(vmap(grad(loss(fn), argnums), in_dims=(0, None))(x, y1),
                     vmap(grad(loss(rfn), argnums), in_dims=(0, None))(x, y1))
    # second order through func transforms
    gg = lambda f: grad(lambda a: grad(loss(f))(a, y).pow(2).sum())  # noqa: E731
    assert_close(gg(fn)(x), gg(rfn)(x))


def test_class_prototypes_vmap_and_grad():
    z = rand(3, 7, 4, gen=gen(8))
    fn = lambda a, lab: cp(a, lab, 3)  # noqa: E731
    rfn = lambda a, lab: reference.class_prototypes(a, lab, 3)  # noqa: E731
    assert_close(vmap(fn)(z, LABELS), cp(z, LABELS, 3))
    assert_close(vmap(fn, in_dims=(0, None))(z, LABELS[0]), cp(z, LABELS[0].expand(3, 7), 3))
    assert_close(vmap(fn, in_dims=(None, 0))(z[0], LABELS), cp(z[0].expand(3, 7, 4), LABELS, 3))
    loss = lambda f: lambda a, lab: (f(a, lab) ** 3).sum()  # noqa: E731
    assert_close(grad(loss(fn))(z, LABELS), grad(loss(rfn))(z, LABELS))
    assert_close(vmap(grad(loss(fn)))(z, LABELS), vmap(grad(loss(rfn)))(z, LABELS))
    assert_close(vmap(grad(loss(fn)), in_dims=(0, None))(z, LABELS[1]),
                 vmap(grad(loss(rfn)), in_dims=(0, None))(z, LABELS[1]))
    gg = lambda f: grad(lambda a: grad(loss(f))(a, LABELS).pow(2).sum())  # noqa: E731
    assert_close(gg(fn)(z), gg(rfn)(z))


def test_sgd_step_vmap_and_grad():
    g = gen(9)
    w = [rand(4, 3, gen=g), rand(3, gen=g), rand(2, gen=g)]      # shared meta-parameters
    gs = [rand(5, 4, 3, gen=g), rand(5, 3, gen=g), rand(2, gen=g)]  # per-task grads, last unbatched
    lrs = [rand(gen=g), rand(5, 3, gen=g), rand(2, gen=g)]          # 0-d, per-task, per-param
    fn = lambda p, gr, lr: ops.sgd_step(p, gr, lr)  # noqa: E731
    dims = ([None, None, None], [0, 0, None], [None, 0, None])
    out = vmap(fn, in_dims=dims)(w, gs, lrs)
    expected = ref_sgd(w, gs, lrs)
    assert_close(out[:2], expected[:2])
    assert_close(out[2], expected[2].expand(5, 2))  # all-unbatched tensor: broadcast by vmap
    assert_close(vmap(lambda gr: ops.sgd_step(w[:2], gr, 0.3))(gs[:2]), ref_sgd(w[:2], gs[:2], 0.3))
    # MAML: per-task gradients of the adapted weights w.r.t. the shared weights and rates
    def outer(f):
        def loss(p, gr, lr):
            return sum((t ** 2).sum() for t in f(p, gr, lr))
        return vmap(grad(loss, argnums=(0, 2)), in_dims=([None] * 3, [0, 0, None], None))
    assert_close(outer(ops.sgd_step)(w, gs, lrs), outer(ref_sgd)(w, gs, lrs))


def test_maml_protonet_second_order():
    """Inner SGD on a shared embedding, ProtoNet loss on the adapted one, meta-gradient
    through everything (second order): kernels against the references."""
    g = gen(10)
    xs, xq = rand(3, 6, 5, gen=g), rand(3, 4, 5, gen=g)
    ys = covering_labels((3,), 6, 3, g)
    yq = covering_labels((3,), 4, 3, g)
    w0 = rand(5, 8, gen=g, requires_grad=True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def meta_loss(pdist, protos, sgd):
        def loss(w, x, labels, xs_):
            logits = -pdist(x @ w, protos(xs_ @ w, ys, 3), "euclidean")
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        gw = torch.autograd.grad(loss(w0, xs, ys, xs), w0, create_graph=True)[0]
        fast = sgd([w0], [gw], [lr])[0]
        return loss(fast, xq, yq, xs)

    out = meta_loss(pd, cp, ops.sgd_step)
    ref = meta_loss(reference.pairwise_distances, reference.class_prototypes, ref_sgd)
    assert_close(out, ref)
    assert_close(torch.autograd.grad(out, (w0, lr)), torch.autograd.grad(ref, (w0, lr)))


# ---- torch.compile ----------------------------------------------------------------------

def _all_ops(x, y, w, gr, lr, labels, impl=ops):
    """Every op once; ``impl=reference`` computes the same with torch's own ops."""
    d = impl.pairwise_distances(x, y, "euclidean") + impl.pairwise_distances(x, y, "cosine")
    p = impl.class_prototypes(x, labels, 3)
    zero = None if impl is ops else torch.zeros_like(w)  # the reference has no None params
    s = impl.sgd_step([w, zero, w], [gr, gr, gr], [lr, lr, lr])
    t = impl.sgd_step([w], [gr], 0.25)
    return d.sum() + (p ** 2).sum() + (s[0] ** 2).sum() + s[1].sum() + s[2].mean() + t[0].sum()


def test_compile_fullgraph_forward_and_backward():
    compiled = torch.compile(_all_ops, fullgraph=True)
    g = gen(11)
    args = [rand(3, 7, 4, gen=g), rand(3, 2, 4, gen=g), rand(4, gen=g), rand(3, 4, gen=g), rand(gen=g)]
    args = [a.requires_grad_() for a in args]
    out = compiled(*args, LABELS)
    grads = torch.autograd.grad(out, args)
    for impl in (ops, reference):  # eager kernels, and torch's ops (independent of them)
        expected = _all_ops(*args, LABELS, impl)
        assert_close(out, expected)
        assert_close(grads, torch.autograd.grad(expected, args))
    with torch.no_grad():  # inference graph, another dtype
        args32 = [a.detach().float() for a in args]
        assert_close(compiled(*args32, LABELS), _all_ops(*args32, LABELS), torch.float32)


# ---- torch.library.opcheck --------------------------------------------------------------

def _opcheck_cases():
    g = gen(12)
    for dtype, req in ((torch.float64, True), (torch.float64, False), (torch.float32, True)):
        r = lambda *s: rand(*s, dtype=dtype, gen=g, requires_grad=req)  # noqa: E731
        for metric in METRICS:
            x, y = r(2, 3, 4), r(2, 5, 4)
            out = pd(x.detach(), y.detach(), metric)
            yield f"pd-{metric}-{dtype}-{req}", "pairwise_distances", (x, y, metric)
            yield (f"pdb-{metric}-{dtype}-{req}", "pairwise_distances_backward",
                   (r(2, 3, 5), x, y, out, metric))
            if metric in ("sqeuclidean", "dot"):  # their backward reads no distances
                yield (f"pdb-{metric}-{dtype}-{req}-no-out", "pairwise_distances_backward",
                       (r(2, 3, 5), x, y, None, metric))
        yield f"cp-{dtype}-{req}", "class_prototypes", (r(3, 7, 4), LABELS, 3)
        yield f"cpb-{dtype}-{req}", "class_prototypes_backward", (r(3, 3, 4), LABELS, 3)
        yield f"sgd-{dtype}-{req}", "sgd_step", ([r(3, 4), r(5)], [r(3, 4), r(5)], [], 0.3)
        yield (f"sgd-lrs-{dtype}-{req}", "sgd_step",
               ([r(3, 4), r(2, 5)], [r(2, 3, 4), r(2, 5)], [r(), r(5)], 0.0))


OPCHECK = {name: (op, args) for name, op, args in _opcheck_cases()}


@pytest.mark.parametrize("case", list(OPCHECK))
def test_opcheck(case):
    op, args = OPCHECK[case]
    torch.library.opcheck(getattr(torch.ops.pymeta, op).default, args)


# ---- tracers, fake tensors, forward-mode AD -------------------------------------------

OPS = {"pairwise_distances": (lambda a, b: pd(a, b, "euclidean"),
                              lambda a, b: reference.pairwise_distances(a, b, "euclidean")),
       "class_prototypes": (lambda a, b: cp(a, LABELS, 3) + b.sum(),
                            lambda a, b: reference.class_prototypes(a, LABELS, 3) + b.sum()),
       "sgd_step": (lambda a, b: ops.sgd_step([b], [a[:, :2]], 0.5)[0],
                    lambda a, b: b - 0.5 * a[:, :2])}


def _inputs(seed):
    g = gen(seed)
    return rand(3, 7, 4, gen=g), rand(3, 2, 4, gen=g)


@pytest.mark.parametrize("op", sorted(OPS))
def test_make_fx_and_jit_trace_record_the_op(op):
    """Tracers hold no data for the raw kernels: they record the registered op, which then
    computes on new inputs (recording the kernel's empty output gave garbage)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    fn, ref = OPS[op]
    graph = make_fx(fn)(*_inputs(0))
    assert f"pymeta.{op}" in graph.code
    new = _inputs(1)
    assert_close(graph(*new), ref(*new))
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(fn, _inputs(0), check_trace=False)
    assert_close(traced(*new), ref(*new))


@pytest.mark.parametrize("op", sorted(OPS))
def test_fake_tensors_get_shapes_not_kernel_calls(op):
    from torch._subclasses.fake_tensor import FakeTensorMode
    fn, ref = OPS[op]
    expected = ref(*_inputs(0)).shape
    with FakeTensorMode(allow_non_fake_inputs=True):  # raw pointers of fakes crashed the process
        assert fn(*_inputs(0)).shape == expected


@pytest.mark.parametrize("op", sorted(OPS))
def test_forward_mode_ad_matches_the_reference(op):
    """Tangents through forward_ad dual tensors and torch.func.jvp (once silently dropped)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp
    fn, ref = OPS[op]
    a, b = _inputs(0)
    da, db = _inputs(1)
    expected = jvp(ref, (a, b), (da, db))[1]
    assert_close(jvp(fn, (a, b), (da, db))[1], expected)
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(a, da), fwAD.make_dual(b, db))
        assert_close(fwAD.unpack_dual(out).tangent, expected)


@pytest.mark.parametrize("metric", METRICS)
def test_hessian_forward_over_reverse(metric):
    from torch.func import hessian
    a, b = _inputs(2)
    got = hessian(lambda u, v: pd(u, v, metric).sin().sum(), argnums=(0, 1))(a, b)
    want = hessian(lambda u, v: reference.pairwise_distances(u, v, metric).sin().sum(),
                   argnums=(0, 1))(a, b)
    for row, ref_row in zip(got, want):
        assert_close(list(row), list(ref_row))
    lr = torch.tensor(0.3, dtype=a.dtype)
    g = a[:, :2]
    got = hessian(lambda p, r: ops.sgd_step([p], [g], [r])[0].sin().sum(), argnums=(0, 1))(b, lr)
    want = hessian(lambda p, r: (p - r * g).sin().sum(), argnums=(0, 1))(b, lr)
    for row, ref_row in zip(got, want):
        assert_close(list(row), list(ref_row))
    got = hessian(lambda z: cp(z, LABELS, 3).sin().sum())(a)
    assert_close(got, hessian(lambda z: reference.class_prototypes(z, LABELS, 3).sin().sum())(a))


@pytest.mark.parametrize("metric", METRICS)
def test_hessian_of_a_sum(metric):
    """.sum()'s gradient is an expanded tensor, which the reference jvp once wrote into."""
    from torch.func import hessian
    a, b = _inputs(3)
    got = hessian(lambda u: pd(u, b, metric).sum())(a)
    assert_close(got, hessian(lambda u: reference.pairwise_distances(u, b, metric).sum())(a))


def _in_place_step(p, g):
    with torch.no_grad():
        ops.sgd_step_([p], [g], 0.5)
    return p


@pytest.mark.parametrize("tracer", ["make_fx", "jit.trace", "compile"])
def test_in_place_step_is_recorded(tracer):
    """Traced and compiled graphs keep sgd_step_'s update (tracers once dropped it: the
    kernel ran at trace time and nothing was recorded)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    example = (torch.zeros(2, 3), torch.ones(2, 3))
    if tracer == "make_fx":
        fn = make_fx(_in_place_step)(*example)
    elif tracer == "jit.trace":
        with pytest.warns(torch.jit.TracerWarning):
            fn = torch.jit.trace(_in_place_step, example, check_trace=False)
    else:
        fn = torch.compile(_in_place_step, fullgraph=True)
    p, g = rand(2, 3), rand(2, 3)
    expected = p - 0.5 * g
    fn(p, g)
    assert_close(p, expected)


def test_sgd_step_jvp_takes_the_shape_of_the_output():
    """Shared params and per-task rates: the tangent is [T, ...] like the output."""
    from torch.func import jvp
    g = gen(4)
    p, grad, lr = rand(2, 4, gen=g), rand(2, 4, gen=g), rand(3, 1, 1, gen=g)  # T from lr
    dp, dlr = rand(2, 4, gen=g), rand(3, 1, 1, gen=g)
    got = jvp(lambda a, r: ops.sgd_step([a], [grad], [r])[0], (p, lr), (dp, dlr))[1]
    want = jvp(lambda a, r: a - r * grad, (p, lr), (dp, dlr))[1]
    assert got.shape == (3, 2, 4)
    assert_close(got, want)


# ---- torch.export -----------------------------------------------------------------------

class _Exported(torch.nn.Module):
    """Each op once; the class count comes from an input's (dynamic) size."""

    def forward(self, x, y, z, labels, onehot, w, b):
        protos = cp(z, labels, onehot.shape[-1])
        fast = ops.sgd_step([w], [protos.sum(-2, keepdim=True).mean(0)], 0.1)[0]
        pooled = ops.batch_norm_relu_pool(x.reshape(2, 3, 4, 4) * fast.sum(), w[0, :3], b)[0]
        return pd(x, y, "cosine").sum() + protos.sum() + pooled.sum()


def _export_inputs(C):
    g = gen(C)
    return (rand(2, 48, gen=g), rand(5, 48, gen=g), rand(2, 12, 8, gen=g),
            covering_labels((2,), 12, C, g), torch.zeros(C), rand(1, 8, gen=g), rand(3, gen=g))


def test_export_with_a_dynamic_class_count_saves_and_loads(tmp_path):
    """Non-strict export once refused num_classes as a SymInt, and a reloaded program that
    used batch_norm_relu_pool failed (its reference kept a no_grad block without values)."""
    auto = torch.export.Dim.AUTO
    dims = {"x": None, "y": None, "z": {1: auto}, "labels": {1: auto}, "onehot": {0: auto},
            "w": None, "b": None}
    module = _Exported().double()
    program = torch.export.export(module, _export_inputs(3), dynamic_shapes=dims, strict=False)
    torch.export.save(program, tmp_path / "program.pt2")
    loaded = torch.export.load(tmp_path / "program.pt2").module()
    for C in (3, 4):
        assert_close(loaded(*_export_inputs(C)), module(*_export_inputs(C)))


# ---- torch.autocast ---------------------------------------------------------------------

def test_autocast_computes_half_inputs_in_float32():
    """Under CPU autocast a Linear or conv gives bfloat16, which the CPU kernels lack: the
    ops cast up, as torch.cdist does (they used to raise), and gradients flow back."""
    g, f32 = gen(4), torch.float32
    x, y, z = (rand(2, n, 8, dtype=f32, gen=g) for n in (6, 3, 6))
    images, w, b = (rand(*s, dtype=f32, gen=g) for s in ((2, 3, 4, 4), (3,), (3,)))
    half = [t.bfloat16().requires_grad_() for t in (x, y, z, images)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [pd(half[0], half[1], "cosine"), cp(half[2], LABELS[:2, :6], 3),
                ops.batch_norm_relu_pool(half[3], w, b)[0]]
    wants = [pd(half[0].float(), half[1].float(), "cosine"),
             cp(half[2].float(), LABELS[:2, :6], 3),
             ops.batch_norm_relu_pool(half[3].float(), w, b)[0]]
    for out, want in zip(outs, wants):
        assert out.dtype == torch.float32 and torch.equal(out, want)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), half)
    assert all(gr.dtype == torch.bfloat16 and gr.abs().sum() > 0 for gr in grads)
    with pytest.raises(TypeError, match=r"got torch.bfloat16 \(cast with .float\(\)\)"):
        pd(half[0], half[1])  # outside autocast: no silent cast


# ---- tensors with the negative bit -------------------------------------------------------

def test_negative_bit_views_are_read_as_their_values():
    """A contiguous tensor with the negative bit (torch._neg_view, or a complex .conj().imag)
    stores its values negated: the kernels once read the raw memory (every op was off).
    Each case runs with such views, then with plain negations (copies without the bit)."""
    g = gen(6)
    x, y, z = (rand(2, n, 8, gen=g, requires_grad=True) for n in (6, 3, 6))
    images = rand(2, 3, 4, 4, gen=g).contiguous(memory_format=torch.channels_last)
    w, b, p, grad = rand(3, gen=g), rand(3, gen=g), rand(4, 3, gen=g), rand(4, 3, gen=g)
    lr = torch.tensor(0.25 + 0.5j, dtype=torch.complex128).conj().imag  # -0.5, negative bit
    assert lr.is_neg() and torch._neg_view(p).is_neg()
    cases = [
        (lambda neg, a, c: pd(neg(a), c, "dot"), (x, y)),
        (lambda neg, a: cp(neg(a), neg(-LABELS[:2, :6]), 3), (z,)),
        (lambda neg, a: ops.batch_norm_relu_pool(neg(a), neg(w), neg(b))[0],
         (images.requires_grad_(),)),
        (lambda neg, a: ops.sgd_step([neg(a)], [neg(grad)], [lr if neg is torch._neg_view
                                                              else lr.clone()])[0],
         (p.requires_grad_(),)),
    ]
    for fn, inputs in cases:
        out, want = fn(torch._neg_view, *inputs), fn(torch.neg, *inputs)
        assert_close(out, want)
        go = torch.randn(out.shape, dtype=out.dtype, generator=gen(1))
        assert_close(torch.autograd.grad(out, inputs, go), torch.autograd.grad(want, inputs, go))
    q = p.detach().clone()
    with torch.no_grad():
        ops.sgd_step_([torch._neg_view(q)], [grad], 0.5)  # in place: q = -(-q - 0.5 g)
    assert_close(q, p.detach() + 0.5 * grad)


# ---- tensor subclasses ------------------------------------------------------------------

def test_wrapper_subclasses_take_the_registered_ops():
    """A Python-dispatch wrapper (torch's TwoTensor: its data lives in inner tensors) and a
    fake tensor used outside its mode have no data of their own: the ops once passed their
    null data pointer to the kernels and crashed the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    g = gen(2)
    x, y, z, p = rand(6, 8, gen=g), rand(3, 8, gen=g), rand(6, 8, gen=g), rand(4, 3, gen=g)
    images, w, b = rand(2, 3, 4, 4, gen=g), rand(3, gen=g), rand(3, gen=g)
    two = lambda t: TwoTensor(t, t.clone())  # noqa: E731
    runs = [(lambda a, c: pd(a, c, "cosine"), (x, y)),
            (lambda a: cp(a, LABELS[0, :6], 3), (z,)),
            (lambda a, c: ops.sgd_step([a], [c], 0.3)[0], (p, p)),
            (lambda a: ops.batch_norm_relu_pool(a, w, b)[0], (images,))]
    for fn, inputs in runs:
        out = fn(*map(two, inputs))
        assert type(out) is TwoTensor
        assert_close([out.a, out.b], [fn(*inputs)] * 2)
    q = two(p.clone())
    ops.sgd_step_([q], [two(p)], 0.5)
    assert_close([q.a, q.b], [p * 0.5] * 2)
    with FakeTensorMode():
        fx, fy = torch.randn(5, 4), torch.randn(3, 4)
    assert pd(fx, fy).shape == (5, 3) and ops.sgd_step([fx], [fx], 0.1)[0].shape == (5, 4)


# ---- autograd's own batching -------------------------------------------------------------

def test_vectorized_jacobians_and_batched_gradients():
    """torch.autograd.functional's vectorize=True and autograd.grad(is_grads_batched=True)
    batch gradients without storage: the backward once handed them to the kernels (a
    RuntimeError); it now takes torch's ops for them."""
    from torch.autograd.functional import hessian, jacobian
    g = gen(8)
    x, y, z = rand(2, 3, 4, gen=g), rand(2, 2, 4, gen=g), rand(2, 6, 3, gen=g)
    p, grads = rand(4, 3, gen=g), rand(2, 4, 3, gen=g)
    images, w, b = rand(3, 2, 4, 4, gen=g), rand(2, gen=g), rand(2, gen=g)
    cases = [  # (op with one input, the same through the reference, input, forward-mode too)
        (lambda a: pd(a, y, "cosine"), lambda a: reference.pairwise_distances(a, y, "cosine"),
         x, False),
        (lambda a: cp(a, LABELS[:2, :6], 3),
         lambda a: reference.class_prototypes(a, LABELS[:2, :6], 3), z, True),
        (lambda a: ops.sgd_step([p], [a], 0.3)[0], lambda a: p - 0.3 * a, grads, True),
        (lambda a: ops.sgd_step([a], [grads], 0.3)[0], lambda a: a - 0.3 * grads, p, True),
        (lambda a: ops.batch_norm_relu_pool(a, w, b)[0],
         lambda a: reference.batch_norm_relu_pool(a, w, b)[0], images, False),
    ]
    for fn, ref, inp, forward_mode in cases:
        assert_close(jacobian(fn, inp, vectorize=True), jacobian(ref, inp))
        if forward_mode:
            assert_close(jacobian(fn, inp, vectorize=True, strategy="forward-mode"),
                         jacobian(ref, inp))
        leaf = inp.clone().requires_grad_()
        out, ref_out = fn(leaf), ref(leaf)
        batch = torch.randn(5, *out.shape, dtype=out.dtype, generator=gen(1))
        assert_close(torch.autograd.grad(out, leaf, batch, is_grads_batched=True),
                     torch.autograd.grad(ref_out, leaf, batch, is_grads_batched=True))
    for fn, ref, inp, _ in cases[:4]:
        assert_close(hessian(lambda a: fn(a).pow(3).sum(), inp, vectorize=True),
                     hessian(lambda a: ref(a).pow(3).sum(), inp))
