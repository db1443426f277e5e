"""CUDA kernels against the references (skipped without a GPU or without pymeta's CUDA build)."""
import pytest
import torch

from conftest import (METRICS, WILD_LABELS, assert_close, assert_same_as_cpu, covering_labels, gen,
                      outputs_and_grads, pairwise_edge_cases, rand, ref_sgd, requires_cuda,
                      sgd_edge_inputs, vjp, with_non_finite)
from pymeta import ops
from pymeta.ops import reference

pytestmark = requires_cuda

pd, cp = ops.pairwise_distances, ops.class_prototypes
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# vs a float32/float64 reference on the same (rounded) inputs: half outputs round to ~3 digits
TOLS = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def cuda_rand(*shape, dtype, seed=0, scale=0.5, requires_grad=False):
    return (rand(*shape, gen=gen(seed)) * scale).to("cuda", dtype).requires_grad_(requires_grad)


def _ref_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compare(fn, ref_fn, inputs, dtype):
    """Forward and gradients of fn on CUDA inputs vs ref_fn on upcast copies."""
    ups = [t.detach().to(_ref_dtype(dtype)).requires_grad_() for t in inputs]
    out, grads = vjp(fn, inputs, [torch.ones_like(fn(*inputs))])
    ref, ref_grads = vjp(ref_fn, ups, [torch.ones_like(ref_fn(*ups))])
    assert out.dtype == dtype and out.is_cuda
    tol = TOLS[dtype]
    torch.testing.assert_close(out.to(ref.dtype), ref, **tol)
    for gr, rg in zip(grads, ref_grads):
        assert gr.dtype == dtype
        scale = rg.abs().max().item() if rg.numel() else 1.0
        torch.testing.assert_close(gr.to(rg.dtype), rg, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1))


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances(metric, dtype):
    x = cuda_rand(4, 15, 64, dtype=dtype, seed=1, requires_grad=True)
    y = cuda_rand(4, 5, 64, dtype=dtype, seed=2, requires_grad=True)
    _compare(lambda a, b: pd(a, b, metric), lambda a, b: reference.pairwise_distances(a, b, metric),
             (x, y), dtype)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_class_prototypes(dtype):
    z = cuda_rand(4, 25, 64, dtype=dtype, seed=3, requires_grad=True)
    labels = covering_labels((4,), 25, 5, gen(4)).cuda()
    _compare(lambda a: cp(a, labels, 5), lambda a: reference.class_prototypes(a, labels, 5), (z,), dtype)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_sgd_step(dtype):
    p = [cuda_rand(8, 3, dtype=dtype, seed=5), cuda_rand(4, 8, 3, dtype=dtype, seed=6)]
    g = [cuda_rand(4, 8, 3, dtype=dtype, seed=7), cuda_rand(4, 8, 3, dtype=dtype, seed=8)]
    lrs = [cuda_rand(dtype=dtype, seed=9), cuda_rand(8, 3, dtype=dtype, seed=10)]
    leaves = [t.requires_grad_() for t in (*p, *g, *lrs)]
    up = [t.detach().to(_ref_dtype(dtype)).requires_grad_() for t in leaves]
    for lr, rlr in ((0.3, 0.3), (lrs, up[4:])):
        out, grads = vjp(lambda *t: ops.sgd_step(list(t[:2]), list(t[2:4]), lr), leaves[:4])
        ref, ref_grads = vjp(lambda *t: reference.sgd_step(list(t[:2]), list(t[2:4]), rlr), up[:4])
        for a, b in zip([*out, *grads], [*ref, *ref_grads]):
            torch.testing.assert_close(a.to(b.dtype), b, **TOLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    x = torch.rand(2, 3, 8192, device="cuda").to(dtype)   # sums of ~8192 terms: a half
    y = torch.zeros(2, 4, 8192, device="cuda", dtype=dtype)  # accumulator would stall at 2048
    for metric in ("sqeuclidean", "dot"):
        ref = reference.pairwise_distances(x.float(), y.float() + (metric == "dot"), metric)
        out = pd(x, y + (metric == "dot"), metric).float()
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=0)
    z = (torch.rand(1, 16384, 8, device="cuda") + 0.5).to(dtype)  # class sums ~16384
    labels = torch.zeros(1, 16384, dtype=torch.long, device="cuda")
    torch.testing.assert_close(cp(z, labels, 1).float(), z.float().mean(1, keepdim=True),
                               rtol=1e-2, atol=0)


def test_validation_errors_on_cuda():
    z = cuda_rand(2, 6, 4, dtype=torch.float32)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 5]], device="cuda")
    with pytest.raises(ValueError, match=r"label 5 at sample 5 of task 1 is outside \[0, 3\)"):
        cp(z, labels, 3)
    with pytest.raises(ValueError, match="class 2 has no example in task 0"):
        cp(z, torch.tensor([[0, 1, 0, 0, 1, 1]] * 2, device="cuda"), 3)
    out = cp(z, labels, 3, validate=False)  # unvalidated: ignored, never out of bounds
    assert_close(out, reference.class_prototypes(z, labels, 3), torch.float32)
    with pytest.raises(ValueError, match="feature dims differ"):
        pd(z, cuda_rand(2, 3, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.sgd_step([z], [cuda_rand(3, 6, 4, dtype=torch.float32)], 0.1)


def test_cpu_cuda_mix():
    c, g = rand(3, 4, dtype=torch.float32), rand(3, 4, dtype=torch.float32).cuda()
    with pytest.raises(ValueError, match="cpu.*cuda|cuda.*cpu"):
        pd(c, g)
    with pytest.raises(ValueError, match="cpu.*cuda|cuda.*cpu"):
        cp(g, torch.tensor([0, 1, 0]), 2)
    with pytest.raises(ValueError, match="cpu.*cuda|cuda.*cpu"):
        ops.sgd_step([c, g], [c, g], 0.1)
    with pytest.raises(ValueError, match="cpu.*cuda|cuda.*cpu"):
        ops.sgd_step([g], [g], [torch.tensor(0.1)])


def test_non_contiguous_inputs():
    x = cuda_rand(3, 16, 8, dtype=torch.float32)[:, ::2]
    y = cuda_rand(3, 4, 8, dtype=torch.float32).transpose(-1, -2).contiguous().transpose(-1, -2)
    y2 = cuda_rand(1, 4, 8, dtype=torch.float32).expand(3, 4, 8)
    for metric in METRICS:
        for b in (y, y2):
            assert torch.equal(pd(x, b, metric), pd(x.contiguous(), b.contiguous(), metric))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], device="cuda").expand(3, 8)
    assert torch.equal(cp(x, labels, 3), cp(x.contiguous(), labels.contiguous(), 3))
    p = [x.transpose(1, 2)]
    assert torch.equal(ops.sgd_step(p, [y2[:, :1].expand(3, 8, 8)], 0.1)[0],
                       ops.sgd_step([p[0].contiguous()], [y2[:, :1].expand(3, 8, 8).contiguous()], 0.1)[0])


@pytest.mark.parametrize("n", [18, 60])
def test_sgd_step_long_lists(n):
    shapes = [(64, 3, 3, 3) if i % 6 == 0 else (64,) if i % 2 else (5, 64) for i in range(n)]
    params = [cuda_rand(*s, dtype=torch.float32, seed=i) if i % 3 else
              cuda_rand(4, *s, dtype=torch.float32, seed=i) for i, s in enumerate(shapes)]
    grads = [cuda_rand(4, *s, dtype=torch.float32, seed=100 + i) for i, s in enumerate(shapes)]
    lrs = [cuda_rand(*s, dtype=torch.float32, seed=200 + i) if i % 2 else
           cuda_rand(dtype=torch.float32, seed=200 + i) for i, s in enumerate(shapes)]
    for lr in (0.01, lrs):
        assert_close(ops.sgd_step(params, grads, lr), ref_sgd(params, grads, lr), torch.float32)
    stacked = [p.expand(4, *s).clone() if p.dim() == len(s) else p.clone() for p, s in zip(params, shapes)]
    expected = ref_sgd(stacked, grads, 0.01)
    with torch.no_grad():
        ops.sgd_step_(stacked, grads, 0.01)
    assert_close(stacked, expected, torch.float32)


def test_non_default_stream():
    stream = torch.cuda.Stream()
    big = torch.randn(4096, 4096, device="cuda")
    labels = (torch.arange(25, device="cuda") % 5).expand(8, 25)
    expected = None
    for use_stream in (False, True):
        ctx = torch.cuda.stream(stream) if use_stream else torch.cuda.stream(torch.cuda.current_stream())
        with ctx:
            stream.wait_stream(torch.cuda.default_stream())
            h = big @ big                  # keeps the stream busy: a kernel on the wrong
            x = h[:8 * 75].reshape(8, 75, -1)[..., :64] * 1e-3  # stream would read early
            y = h[-8 * 5:].reshape(8, 5, -1)[..., :64] * 1e-3
            out = [pd(x, y, "euclidean"), cp(x[:, :25], labels, 5),
                   ops.sgd_step([y], [x[:, :5]], 0.5)[0]]
        torch.cuda.synchronize()
        if expected is None:
            expected = [reference.pairwise_distances(x, y, "euclidean"),
                        reference.class_prototypes(x[:, :25], labels, 5), y - 0.5 * x[:, :5]]
        assert_close(out, expected, torch.float32, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_gradient_of_close_rows_keeps_float32_precision(metric):
    """Rows near 10 that differ by ~1e-3: the backward sums over differences, as on the CPU."""
    g = gen(5)
    x = (10 + 1e-3 * torch.randn(4, 6, 64, generator=g, dtype=torch.float64))
    y = (10 + 1e-3 * torch.randn(4, 5, 64, generator=g, dtype=torch.float64))
    up = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    xc, yc = (t.float().cuda().requires_grad_() for t in (x, y))
    got = torch.autograd.grad(pd(xc, yc, metric), (xc, yc), up.float().cuda())
    x64, y64 = (t.float().double().requires_grad_() for t in (x, y))  # the same rounded inputs
    want = torch.autograd.grad(reference.pairwise_distances(x64, y64, metric), (x64, y64), up)
    for a, b in zip(got, want):
        assert ((a.double().cpu() - b).abs().max() / b.abs().max()).item() < 1e-5


def test_ops_replay_in_a_cuda_graph():
    """Captured launches replay on new data; class_prototypes skips its host-syncing check."""
    x, y = cuda_rand(4, 30, 16, dtype=torch.float32), cuda_rand(4, 5, 16, dtype=torch.float32, seed=1)
    labels = (torch.arange(30, device="cuda") % 5).expand(4, 30).contiguous()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up off the capture, as torch advises
        cp(x, labels, 5)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad(), torch.cuda.graph(graph):
        out = [pd(x, y, "euclidean"), cp(x, labels, 5), ops.sgd_step([y], [x[:, :5]], 0.5)[0]]
    x.copy_(cuda_rand(4, 30, 16, dtype=torch.float32, seed=2))
    graph.replay()
    torch.cuda.synchronize()
    expected = [reference.pairwise_distances(x, y, "euclidean"),
                reference.class_prototypes(x, labels, 5), y - 0.5 * x[:, :5]]
    assert_close(out, expected, torch.float32, rtol=1e-4, atol=1e-4)


def test_batch_norm_relu_pool_refuses_cuda():
    """The fused op is CPU-only (the batched forward keeps torch's ops on CUDA)."""
    x = rand(2, 3, 4, 4).cuda()
    w, b = torch.ones(3, device="cuda", dtype=x.dtype), torch.zeros(3, device="cuda", dtype=x.dtype)
    with pytest.raises(ValueError, match="CPU tensors only"):
        ops.batch_norm_relu_pool(x, w, b)


# ---- the CUDA kernels against the CPU kernels on edge cases ------------------------------

def _same_as_cpu(fn, inputs, dtype):
    """fn's output and input gradients on CUDA equal those of the CPU kernels."""
    cpu = outputs_and_grads(fn, inputs, dtype)
    assert_same_as_cpu(outputs_and_grads(fn, [t.cuda() for t in inputs], dtype), cpu, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances_edge_cases_match_cpu(metric, dtype):
    for a, b in pairwise_edge_cases(dtype):
        _same_as_cpu(lambda a, b: pd(a, b, metric), (a, b), dtype)
        _same_as_cpu(lambda a, b: pd(a, b.detach(), metric), (a, b), dtype)  # grad of x only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_prototypes_edge_cases_match_cpu(dtype):
    z = rand(3, 8, 5, dtype=dtype, gen=gen(12))
    for zz in (z, with_non_finite(z)):
        _same_as_cpu(lambda a, lab: cp(a, lab, 5, validate=False), (zz, WILD_LABELS), dtype)
    for shape, C in (((3, 0, 5), 4), ((3, 8, 0), 5), ((0, 8, 5), 5)):
        labels = torch.arange(shape[1]).remainder(max(C, 1)).expand(*shape[:-1])
        _same_as_cpu(lambda a, lab: cp(a, lab, C, validate=False), (rand(*shape, dtype=dtype), labels), dtype)


def test_grid_stride_loops_cover_large_work():
    """More outputs than the capped grid has threads: every element must still be written."""
    z = rand(16384, 80, 1, gen=gen(13))                    # B*C > 2^20 prototype rows
    labels = torch.arange(80).expand(16384, 80)
    _same_as_cpu(lambda a, lab: cp(a, lab, 80), (z, labels), torch.float32)
    x, y = rand(1024, 100, 2, gen=gen(14)), rand(1024, 100, 2, gen=gen(15))  # > 8M distances
    _same_as_cpu(lambda a, b: pd(a, b), (x, y), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_step_edge_cases_match_cpu(dtype):
    _same_as_cpu(lambda *t: torch.cat([o.flatten() for o in ops.sgd_step(list(t[:2]), list(t[2:]), 0.5)]),
                 sgd_edge_inputs(dtype), dtype)


# ---- the gradient learners and the engine on CUDA ---------------------------------------

@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("kind", ["maml", "fomaml", "metasgd", "anil", "lslr"])
@pytest.mark.parametrize("model_name", ["mlp", "conv_cl"])
def test_gradient_learner_meta_gradients_on_cuda(model_name, kind, steps):
    """float64 on the GPU (grouped convolutions, per-task BatchNorm, CUDA sgd_step) against
    the per-task autograd loop, as the CPU tests do."""
    from test_learners_gradient import MODELS, episode, grads_of, make, reference_meta
    learner = make(kind, MODELS[model_name](), steps=steps).train().cuda()
    data = [t.cuda() for t in episode("mlp" if model_name == "mlp" else "img")]
    loss = learner.meta_loss(*data)
    ref_loss, ref_grads = reference_meta(learner, *data)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    got = torch.cat([g.flatten() for g in grads_of(learner, loss) if g is not None])
    want = torch.cat([g.flatten() for g in ref_grads if g is not None])
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6


def test_cli_trains_and_evaluates_on_cuda(tmp_path):
    from test_engine_gradient import run_cli
    out = tmp_path / "run"
    train = ["train", "--algo", "maml", "--data", "sinusoid", "--steps", "50", "--val-every",
             "25", "--val-episodes", "20", "--test-episodes", "20", "--device", "cuda",
             "--no-progress", "--out", str(out)]
    res = run_cli(train, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run_cli([*train, "--resume"], cwd=tmp_path)  # restores the CPU and CUDA RNG states
    assert res.returncode == 0, res.stderr
    res = run_cli(["eval", "--checkpoint", str(out / "best.pt"), "--steps", "5", "--episodes",
                   "20", "--device", "cuda", "--no-progress"], cwd=tmp_path)
    assert res.returncode == 0 and "MSE" in res.stdout, res.stderr
