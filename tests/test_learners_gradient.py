"""Gradient-based learners (MAML, FOMAML, Meta-SGD, ANIL, MAML++ LSLR, Reptile) and the
task-batched forward, against a plain per-task reference.

The reference loops over tasks, runs the network with ``torch.func.functional_call`` and
takes inner gradients with ``torch.autograd.grad(create_graph=True)`` (the semantics of
learn2learn / higher). Meta-gradients must match in float64 to 1e-6 relative, with BatchNorm
in training mode (per-task batch statistics: where a vmap over tasks with shared statistics
would go wrong), on both the batched path and the per-task fallback.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import token_model
import pymeta.learners.functional
from pymeta.learners.maml import CPU_TASK_CHUNK
from pymeta.learners import (ANIL, FOMAML, LEARNERS, MAML, FewShotLearner, MetaSGD, Reptile,
                             batched_forward, build_learner, is_batchable)
from pymeta.nn import Conv4, ResNet12

RTOL = 1e-6
DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors on a shared machine: one thread (conftest restores the count)."""
    torch.set_num_threads(1)


# ---- models and episodes --------------------------------------------------------------------

def mlp(seed=0, ways=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, ways)).to(DT)


def conv(seed=0, channels_last=True, ways=3):
    torch.manual_seed(seed)
    return nn.Sequential(Conv4(hidden=4, out_channels=4, channels_last=channels_last),
                         nn.Linear(4, ways)).to(DT)


def resnet(seed=0, ways=3):
    torch.manual_seed(seed)
    return nn.Sequential(ResNet12(in_channels=1, channels=(2, 3, 2, 3)),
                         nn.Linear(3, ways)).to(DT)


MODELS = {"mlp": mlp, "conv_cl": lambda: conv(channels_last=True),
          "conv": lambda: conv(channels_last=False)}


def episode(kind, T=3, ways=3, S=6, Q=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = (4,) if kind == "mlp" else (1, 28, 28)
    sx = torch.randn(T, S, *sample, generator=g, dtype=DT)
    qx = torch.randn(T, Q, *sample, generator=g, dtype=DT)
    sy = torch.stack([torch.arange(S)[torch.randperm(S, generator=g)] % ways for _ in range(T)])
    qy = torch.randint(0, ways, (T, Q), generator=g)
    return sx, sy, qx, qy


# ---- the reference --------------------------------------------------------------------------

def rates_of(learner, step, names):
    """The reference's rate for each adapted parameter at inner step ``step``."""
    if isinstance(learner, MetaSGD):
        return list(learner.rates)
    if getattr(learner, "lslr", False):
        row = learner.lslr_rates[min(step, learner.steps - 1)]
        return [row[i] for i in range(len(names))]
    return [learner.inner_lr] * len(names)


def task_loss(learner, out, y):
    if learner.loss_name == "mse":
        return F.mse_loss(out, y)
    return F.cross_entropy(out, y)


def reference_adapt(learner, x, y, steps, second_order, create=True):
    """One task: ``steps`` plain SGD steps with functional_call; fast weights by name."""
    model = learner.model
    names = learner._adapted_names()
    fast = dict(model.named_parameters())
    for s in range(steps):
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # stats must not leak
        loss = task_loss(learner, functional_call(model, {**fast, **buffers}, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[n] for n in names],
                                    create_graph=second_order and create)
        for n, g, lr in zip(names, grads, rates_of(learner, s, names)):
            fast[n] = fast[n] - lr * g
    return fast


def reference_meta(learner, sx, sy, qx, qy, steps=None, second_order=None):
    """Mean over tasks of the query loss after per-task adaptation, and its gradients."""
    steps = learner.steps if steps is None else steps
    second_order = learner.second_order if second_order is None else second_order
    total = 0
    for t in range(sx.shape[0]):
        fast = reference_adapt(learner, sx[t], sy[t], steps, second_order)
        buffers = {n: b.clone() for n, b in learner.model.named_buffers()}
        out = functional_call(learner.model, {**fast, **buffers}, (qx[t],))
        total = total + task_loss(learner, out, qy[t])
    loss = total / sx.shape[0]
    return loss, grads_of(learner, loss)


def grads_of(learner, loss):
    params = [p for p in learner.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(actual, expected, rtol=RTOL):
    a = torch.cat([(torch.zeros(0, dtype=DT) if g is None else g.reshape(-1)) for g in actual])
    e = torch.cat([(torch.zeros(0, dtype=DT) if g is None else g.reshape(-1)) for g in expected])
    assert a.shape == e.shape
    scale = e.abs().max()
    assert scale > 0
    err = ((a - e).abs().max() / scale).item()
    assert err <= rtol, f"meta-gradients differ: max|diff|/max|ref| = {err:.3g}"


LEARNER_KINDS = {
    "maml": lambda m, **kw: MAML(m, inner_lr=0.3, **kw),
    "fomaml": lambda m, **kw: FOMAML(m, inner_lr=0.3, **kw),
    "metasgd": lambda m, **kw: MetaSGD(m, inner_lr=0.1, **kw),
    "anil": lambda m, **kw: ANIL(m, inner_lr=0.3, **kw),
    "lslr": lambda m, **kw: MAML(m, inner_lr=0.3, lslr=True, **kw),
}


def make(kind, model, **kw):
    learner = LEARNER_KINDS[kind](model, **kw)
    with torch.no_grad():  # distinct rates, so that a wrong rate index shows
        if kind == "metasgd":
            for r in learner.rates:
                r.uniform_(0.05, 0.2)
        if kind == "lslr":
            learner.lslr_rates.uniform_(0.1, 0.5)
    return learner


# ---- meta-gradients against the reference ---------------------------------------------------

@pytest.mark.parametrize("per_task", [False, True], ids=["batched", "per_task"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("kind", sorted(LEARNER_KINDS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_meta_gradients_match_reference(model_name, kind, steps, per_task):
    learner = make(kind, MODELS[model_name](), steps=steps, per_task=per_task).train()
    data = episode("mlp" if model_name == "mlp" else "img")
    loss = learner.meta_loss(*data)
    ref_loss, ref_grads = reference_meta(learner, *data)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads_of(learner, loss), ref_grads)


@pytest.mark.parametrize("kind", sorted(LEARNER_KINDS))
def test_meta_gradients_with_token_ids(kind):
    learner = make(kind, token_model(3), steps=2).train()
    sx, sy, qx, qy = episode("mlp")
    g = torch.Generator().manual_seed(4)
    sx, qx = (torch.randint(0, 13, (*t.shape[:2], 5), generator=g) for t in (sx, qx))
    loss = learner.meta_loss(sx, sy, qx, qy)
    ref_loss, ref_grads = reference_meta(learner, sx, sy, qx, qy)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads_of(learner, loss), ref_grads)


def test_meta_gradients_resnet12():
    learner = MAML(resnet(), inner_lr=0.2, steps=2).train()
    assert is_batchable(learner.model)
    data = episode("img", T=2, S=3, Q=3)
    loss = learner.meta_loss(*data)
    assert_grads_close(grads_of(learner, loss), reference_meta(learner, *data)[1])


def test_per_task_batch_statistics_matter():
    """Guards the test above: with BatchNorm, tasks' statistics differ, so one shared batch
    over all tasks would give different gradients (the vmap(grad) trap)."""
    learner = MAML(mlp(), steps=1).train()
    sx, sy, qx, qy = episode("mlp")
    joint = learner.meta_loss(sx.reshape(1, -1, 4), sy.reshape(1, -1), qx.reshape(1, -1, 4),
                              qy.reshape(1, -1))
    assert (joint - learner.meta_loss(sx, sy, qx, qy)).abs() > 1e-6


def test_anil_unsplittable_model_adapts_head_only():
    """The head sits inside the only top-level child: the whole model runs each step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                                        nn.Linear(6, 3))).to(DT)
    learner = ANIL(model, head=["0.3"], steps=2).train()
    assert learner._split() is None and learner._adapted_names() == ["0.3.weight", "0.3.bias"]
    data = episode("mlp")
    loss = learner.meta_loss(*data)
    assert_grads_close(grads_of(learner, loss), reference_meta(learner, *data)[1])


def test_anil_splits_sequential_and_defaults_to_last_linear():
    learner = ANIL(conv())
    assert learner.head == ["1"] and learner._split() == 1
    assert set(learner.adapt(*episode("img")[:2])) == {"1.weight", "1.bias"}


def test_regression_mse_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.rand(3, 5, 1, generator=g, dtype=DT), torch.rand(3, 7, 1, generator=g, dtype=DT)
    for learner in (MAML(model, inner_lr=0.05, steps=3, loss="mse"),
                    MetaSGD(model, inner_lr=0.05, loss="mse")):
        data = (sx, sx.sin(), qx, qx.sin())
        loss = learner.meta_loss(*data)
        ref_loss, ref_grads = reference_meta(learner, *data)
        torch.testing.assert_close(loss, ref_loss)
        assert_grads_close(grads_of(learner, loss), ref_grads)
        assert learner(sx, sx.sin(), qx, ways=99).shape == (3, 7, 1)  # ways ignored


def shared_weights_model(how):
    """4 -> 4 -> 4 -> 3 with the two hidden layers sharing their weight ("tied": two
    modules, one Parameter) or weight and bias ("reused": one module used twice)."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    if how == "tied":
        b.weight = a.weight
    else:
        b = a
    return nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(4, 3)).to(DT)


def shared_weights_forward(model, how, w, x):
    """The same network in plain torch from named weights ``w`` (no module, no aliasing)."""
    b2 = w["0.bias"] if how == "reused" else w["2.bias"]
    h = torch.tanh(F.linear(torch.tanh(F.linear(x, w["0.weight"], w["0.bias"])), w["0.weight"], b2))
    return F.linear(h, w["4.weight"], w["4.bias"])


@pytest.mark.parametrize("per_task", [False, True], ids=["batched", "per_task"])
@pytest.mark.parametrize("how", ["tied", "reused"])
@pytest.mark.parametrize("cls", [MAML, ANIL])
def test_shared_weights_adapt_at_every_use(cls, how, per_task):
    model = shared_weights_model(how)
    learner = cls(model, inner_lr=0.3, steps=2, per_task=per_task).train()
    sx, sy, qx, qy = episode("mlp")
    loss = learner.meta_loss(sx, sy, qx, qy)
    meta = dict(model.named_parameters())
    adapted = set(learner._adapted_names())
    total = 0
    for t in range(sx.shape[0]):
        fast = dict(meta)
        for _ in range(2):
            task = F.cross_entropy(shared_weights_forward(model, how, fast, sx[t]), sy[t])
            grads = torch.autograd.grad(task, [fast[n] for n in adapted], create_graph=True)
            fast.update({n: fast[n] - 0.3 * g for n, g in zip(adapted, grads)})
        total = total + F.cross_entropy(shared_weights_forward(model, how, fast, qx[t]), qy[t])
    torch.testing.assert_close(loss, total / sx.shape[0], rtol=1e-10, atol=1e-12)
    assert_grads_close(grads_of(learner, loss), grads_of(learner, total / sx.shape[0]))
    # the model still holds its own Parameters (functional_call once left a reused module
    # holding a task's fast weight)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert dict(model.named_parameters()).keys() == meta.keys()


# ---- memory options give the same gradients -------------------------------------------------

@pytest.mark.parametrize("options", [dict(task_chunk=2),
                                     dict(checkpoint_inner=True, task_chunk=None),
                                     dict(task_chunk=1, checkpoint_inner=True)],
                         ids=["chunk", "ckpt_inner", "both"])
@pytest.mark.parametrize("kind", ["maml", "anil", "metasgd", "lslr"])
def test_chunks_and_checkpoints_keep_gradients(kind, options):
    data = episode("img")
    plain = make(kind, conv(), steps=2, task_chunk=None).train()
    expected = grads_of(plain, plain.meta_loss(*data))
    learner = make(kind, conv(), steps=2, **options).train()
    learner.load_state_dict(plain.state_dict())
    loss, logits = learner.loss(*data, ways=3)
    assert logits.shape == (3, 4, 3)
    assert logits.requires_grad == (options["task_chunk"] is None)  # chunks: detached logits
    assert_grads_close(grads_of(learner, loss), expected, rtol=1e-10)


@pytest.mark.parametrize("kind", ["maml", "fomaml", "metasgd", "anil"])
def test_chunked_loss_under_no_grad_is_the_whole_batch_loss(kind):
    """Validation computes losses under no_grad; chunks must not drop them."""
    data = episode("img", T=5)
    learner = LEARNER_KINDS[kind](conv(), steps=2, task_chunk=2).train()
    whole = LEARNER_KINDS[kind](conv(), steps=2, task_chunk=None).train()
    whole.load_state_dict(learner.state_dict())
    with torch.no_grad():
        loss, logits = learner.loss(*data, ways=3)
        expected, expected_logits = whole.loss(*data, ways=3)
        torch.testing.assert_close(learner.meta_loss(*data), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-12)


def test_fomaml_chunks_keep_gradients():
    data = episode("mlp")
    a, b = FOMAML(mlp(), steps=3), FOMAML(mlp(), steps=3, task_chunk=2)
    assert_grads_close(grads_of(b, b.meta_loss(*data)), grads_of(a, a.meta_loss(*data)), 1e-10)


def test_auto_chunks_conv_models_on_cpu_only():
    data = episode("img", T=5)
    auto, whole = MAML(conv()), MAML(conv(), task_chunk=None)
    assert auto.task_chunk == "auto" and auto._chunk_size(data[0]) == CPU_TASK_CHUNK
    assert not auto.loss(*data, ways=3)[1].requires_grad  # chunked: detached logits
    assert whole.loss(*data, ways=3)[1].requires_grad
    assert MAML(mlp())._chunk_size(episode("mlp", T=5)[0]) == 5
    torch.testing.assert_close(auto.meta_loss(*data), whole.meta_loss(*data))


def test_chunked_loss_backpropagates_like_the_whole_batch():
    """Chunks take their gradients early: a scaled loss, and inputs that need grad too."""
    data = episode("mlp", T=5)
    a, b = MAML(mlp(), steps=2), MAML(mlp(), steps=2, task_chunk=2)
    xa, xb = (data[0].clone().requires_grad_() for _ in range(2))
    (3 * a.meta_loss(xa, *data[1:])).backward()
    loss = b.meta_loss(xb, *data[1:])
    torch.testing.assert_close(loss, a.meta_loss(*data), rtol=1e-12, atol=0)
    (3 * loss).backward()
    assert_grads_close([p.grad for p in b.parameters()], [p.grad for p in a.parameters()], 1e-10)
    assert_grads_close([xb.grad], [xa.grad], 1e-10)
    g = torch.autograd.grad(b.meta_loss(*data), list(b.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):  # no silent 2nd pass
        torch.autograd.grad(sum(x.sum() for x in g), list(b.parameters()))


def test_checkpointed_steps_update_running_stats_once():
    data = episode("img")
    a, b = MAML(conv(), steps=3), MAML(conv(), steps=3, checkpoint_inner=True)
    a.meta_loss(*data).backward()
    b.meta_loss(*data).backward()
    for (n, x), y in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0, msg=n)


@pytest.mark.parametrize("kind", ["maml", "fomaml"])
def test_task_chunks_leave_the_running_stats_of_the_whole_batch(kind):
    """task_chunk is a memory setting: the BatchNorm running statistics that bn_mode="running"
    evaluates with must not depend on it (T=5: chunks of 2, 2 and 1 tasks)."""
    data = episode("img", T=5)
    runs = []
    for chunk in (None, 2, 1):
        learner = make(kind, conv(), steps=2, task_chunk=chunk).train()
        learner.meta_loss(*data).backward()
        learner.adapt(*data[:2])  # adaptation alone (no meta-gradient) updates them too
        runs.append(dict(learner.named_buffers()))
    assert any(k.endswith("running_mean") for k in runs[0])
    for other in runs[1:]:
        for k, v in runs[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-12, atol=1e-14, msg=k)


# ---- inner steps at test time ---------------------------------------------------------------

def test_forward_uses_test_steps_without_graph():
    learner = MAML(conv(), inner_lr=0.3, steps=1, test_steps=4).eval()
    sx, sy, qx, _ = episode("img")
    with torch.no_grad():
        logits = learner(sx, sy, qx, 3)
    assert logits.grad_fn is None and not logits.requires_grad
    learner.model.train()  # transductive eval: each batch's own statistics (on buffer copies)
    for t in range(3):
        fast = reference_adapt(learner, sx[t], sy[t], 4, False, create=False)
        with torch.no_grad():
            bufs = {n: b.clone() for n, b in learner.model.named_buffers()}
            ref = functional_call(learner.model, {**fast, **bufs}, (qx[t],))
        torch.testing.assert_close(logits[t], ref, rtol=1e-9, atol=1e-12)


def test_forward_steps_override_test_steps():
    learner = MAML(mlp(), inner_lr=0.3, steps=1, test_steps=2).eval()
    sx, sy, qx, _ = episode("mlp")
    with torch.no_grad():
        four = learner(sx, sy, qx, 3, steps=4)
        learner.test_steps = 4
        torch.testing.assert_close(four, learner(sx, sy, qx, 3), rtol=0, atol=0)
        learner.test_steps = 2
        assert not torch.allclose(four, learner(sx, sy, qx, 3))
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        learner(sx, sy, qx, 3, steps=-1)


@pytest.mark.parametrize("kind", ["maml", "anil", "reptile"])
def test_zero_steps_score_the_meta_initialisation(kind):
    """steps=0: MAML's 'pre-update' figure; adapt returns the meta-parameters per task."""
    model = conv()
    learner = (Reptile(model, inner_lr=0.3) if kind == "reptile" else make(kind, model)).eval()
    sx, sy, qx, _ = episode("img")
    fast = learner.adapt(sx, sy, steps=0)
    params = dict(learner.model.named_parameters())
    names = learner._adapted_names()
    assert all(torch.equal(fast[n], params[n].expand(3, *params[n].shape)) for n in names)
    with torch.no_grad():
        logits = learner(sx, sy, qx, 3, steps=0)
        learner.model.train()  # transductive: each task's own batch statistics
        for t in range(3):
            bufs = {n: b.clone() for n, b in learner.model.named_buffers()}
            ref = functional_call(learner.model, {**params, **bufs}, (qx[t],))
            torch.testing.assert_close(logits[t], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["maml", "anil", "metasgd"])
def test_wider_head_uses_its_first_ways_logits(kind):
    """A 5-logit model on 3-way tasks: the unused rows get no inner gradient, so loss,
    logits and meta-gradients equal those of the model cut down to its first 3 rows."""
    wide, narrow = mlp(ways=5), mlp(ways=3)
    with torch.no_grad():
        for (n, w), (_, v) in zip(wide.named_parameters(), narrow.named_parameters()):
            v.copy_(w[:3] if n.startswith("3.") else w)
    a, b = make(kind, wide, steps=2), make(kind, narrow, steps=2)
    if kind == "metasgd":
        with torch.no_grad():
            for ra, rb, (n, _) in zip(a.rates, b.rates, wide.named_parameters()):
                rb.copy_(ra[:3] if n.startswith("3.") else ra)
    sx, sy, qx, qy = episode("mlp")
    (la, oa), (lb, ob) = a.loss(sx, sy, qx, qy, 3), b.loss(sx, sy, qx, qy, 3)
    assert oa.shape == ob.shape == (3, 4, 3)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    ga, gb = grads_of(a, la), grads_of(b, lb)
    heads = [f"rates.{i}" for i, (n, _) in enumerate(wide.named_parameters()) if n[0] == "3"]
    for (n, _), x, y in zip(a.named_parameters(), ga, gb):
        if n.startswith("backbone.3.") or n in heads:
            torch.testing.assert_close(x[:3], y, rtol=1e-10, atol=1e-12)
            assert (x[3:] == 0).all()
        else:
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"logits \(or more\)"):
        a.loss(*episode("mlp", ways=6), 6)
    # adapt(ways=3) is the adaptation forward() scores with
    a.eval()
    fast = a.adapt(sx, sy, ways=3)
    body, head = a._parts()
    z = qx if body is None else a._fwd(body, a._meta("eval"), qx, False)
    queries = pymeta.learners.functional.batched_forward(head, fast, None, z)[..., :3]
    torch.testing.assert_close(queries, a(sx, sy, qx, 3, steps=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["maml", "fomaml", "anil", "metasgd", "lslr"])
def test_fixed_init_adapts_but_is_not_meta_learned(kind):
    """A zero head with fixed_init: the same inner loop and body meta-gradients as a learner
    whose zero head is meta-learned, and no meta-gradient for the head."""
    def zero_head():
        model = mlp()
        with torch.no_grad():
            model[3].weight.zero_()
            model[3].bias.zero_()
        return model
    free, fixed = make(kind, zero_head(), steps=2), make(kind, zero_head(), steps=2,
                                                         fixed_init=["3"])
    assert not fixed.model[3].weight.requires_grad and "3.weight" in fixed._adapted_names()
    sx, sy, qx, qy = episode("mlp")
    la, lb = free.meta_loss(sx, sy, qx, qy), fixed.meta_loss(sx, sy, qx, qy)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    la.backward()
    lb.backward()
    for (n, a), b in zip(free.named_parameters(), fixed.parameters()):
        if n.startswith("backbone.3."):
            assert b.grad is None and a.grad.abs().sum() > 0
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="no model parameter is named 'head'"):
        MAML(mlp(), fixed_init=["head"])


def test_reptile_leaves_fixed_init_alone():
    learner = Reptile(mlp(), inner_lr=0.1, steps=2, fixed_init=["3"])
    learner.loss(*episode("mlp"), 3)
    assert learner.model[3].weight.grad is None and learner.model[0].weight.grad is not None


def test_lslr_reuses_last_rate_beyond_trained_steps():
    learner = make("lslr", mlp(), steps=2, test_steps=4)
    sx, sy, _, _ = episode("mlp")
    with torch.no_grad():
        fast = learner.adapt(sx, sy, steps=4)
    for t in range(3):
        ref = reference_adapt(learner, sx[t], sy[t], 4, False, create=False)
        for n, w in fast.items():
            torch.testing.assert_close(w[t], ref[n].detach(), rtol=1e-10, atol=1e-12)
    # a third distinct row would change the result: the last row is what steps 2-3 used
    other = make("lslr", mlp(), steps=3)
    with torch.no_grad():
        other.lslr_rates[:2] = learner.lslr_rates
        other.lslr_rates[2] = learner.lslr_rates[1] * 2
        changed = other.adapt(sx, sy, steps=4)
    assert not torch.allclose(changed["3.weight"], fast["3.weight"])


def test_eval_adaptation_under_no_grad_equals_with_grad():
    learner = MAML(mlp(), steps=2, test_steps=3).eval()
    sx, sy, qx, _ = episode("mlp")
    with torch.no_grad():
        a = learner(sx, sy, qx, 3)
    b = learner(sx, sy, qx, 3)
    assert b.requires_grad
    torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_adapt_shapes_and_steps():
    learner = MAML(conv(), steps=1)
    sx, sy, _, _ = episode("img")
    fast = learner.adapt(sx, sy, steps=2)
    shapes = {n: (3, *p.shape) for n, p in learner.model.named_parameters()}
    assert {n: tuple(w.shape) for n, w in fast.items()} == shapes
    assert fast["1.weight"].requires_grad  # connected to the meta-parameters


# ---- BatchNorm modes and the batched forward ------------------------------------------------

class Odd(nn.Module):
    """A module the batched path does not know: the per-task loop must take it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * x[:, :1].sigmoid()


def zoo():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False), nn.BatchNorm2d(4, affine=False),
        nn.ELU(), nn.AvgPool2d(2), nn.Identity(), nn.Dropout(0.0), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6, momentum=None), nn.GELU(),
        nn.Linear(6, 2)).to(DT)


@pytest.mark.parametrize("make_model", [zoo, lambda: conv(channels_last=True), resnet,
                                        lambda: Odd().to(DT)], ids=["zoo", "conv4", "resnet12",
                                                                    "fallback"])
def test_batched_forward_matches_functional_call(make_model):
    model = make_model().train()
    sample = (4,) if isinstance(model, Odd) else ((2, 8, 8) if model[0].__class__ is nn.Conv2d
                                                 else (1, 28, 28))
    assert is_batchable(model) == (not isinstance(model, Odd))
    T = 3
    x = torch.randn(T, 5, *sample, dtype=DT)
    fast = {n: p + 0.1 * torch.randn(T, *p.shape, dtype=DT) for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    out = batched_forward(model, fast, bufs, x)
    ref = []
    for t in range(T):
        state = {n: b.clone() for n, b in model.named_buffers()}
        ref.append(functional_call(model, {**{n: p[t] for n, p in fast.items()}, **state}, (x[t],)))
    torch.testing.assert_close(out, torch.stack(ref), rtol=1e-10, atol=1e-12)
    # running statistics: the mean over tasks of the per-task updates, same on both paths
    bufs2 = {n: b.clone() for n, b in model.named_buffers()}
    batched_forward(model, fast, bufs2, x, per_task=True)
    for n in bufs:
        torch.testing.assert_close(bufs[n], bufs2[n], rtol=1e-10, atol=1e-12, msg=n)
    assert all(not torch.equal(bufs[n], b) for n, b in model.named_buffers()
               if n.endswith("running_mean"))


@pytest.mark.parametrize("T", [1, 2])
def test_batched_forward_keeps_channels_last(T):
    """Even one task on one-channel images (ambiguous strides) and per-task fast weights
    (plain strides, from sgd_step) stay channels_last: NCHW max-pooling is ~7x slower."""
    model = conv(channels_last=True).train()
    seen = []
    for m in model.modules():
        if isinstance(m, nn.MaxPool2d):
            m.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    fast = {n: (p + 0.1 * torch.randn(T, *p.shape, dtype=DT)).contiguous()
            for n, p in model.named_parameters()}
    x = torch.randn(T, 5, 1, 28, 28, dtype=DT)
    out = batched_forward(model, fast, None, x, fused=False)  # torch's max-pool, hooked
    assert len(seen) == 4 and all(
        a.is_contiguous(memory_format=torch.channels_last) and a.stride(1) == 1 for a in seen)
    ref = torch.stack([functional_call(model, {n: p[t] for n, p in fast.items()}, (x[t],))
                       for t in range(T)])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def _counting_fused(monkeypatch):
    """Counts the fused BatchNorm - ReLU - max-pool calls of the batched forward."""
    calls = []
    fused = pymeta.learners.functional.batch_norm_relu_pool
    monkeypatch.setattr(pymeta.learners.functional, "batch_norm_relu_pool",
                        lambda *a: calls.append(a[0].shape) or fused(*a))
    return calls


def test_batched_forward_fuses_conv4_tails(monkeypatch):
    """The same outputs, first and second derivatives and running statistics as
    functional_call per task, through the fused kernel (one call per block); fused=False
    keeps torch's ops."""
    calls = _counting_fused(monkeypatch)
    model = conv(channels_last=True).train()
    T, x = 3, torch.randn(3, 5, 1, 28, 28, dtype=DT)
    fast = {n: (p + 0.1 * torch.randn(T, *p.shape, dtype=DT)).requires_grad_()
            for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    out = batched_forward(model, fast, bufs, x)
    assert len(calls) == 4
    ref, states = [], []
    for t in range(T):
        states.append({n: b.clone() for n, b in model.named_buffers()})
        ref.append(functional_call(model, {**{n: p[t] for n, p in fast.items()}, **states[-1]},
                                   (x[t],)))
    ref = torch.stack(ref)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    weights = list(fast.values())

    def second(y):  # gradients of a function of the first derivatives
        firsts = torch.autograd.grad((y ** 2).sum(), weights, create_graph=True)
        return torch.autograd.grad(sum((d ** 2).sum() for d in firsts), weights)

    for n, a, e in zip(fast, second(out), second(ref)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12, msg=n)
    for n, b in bufs.items():  # the mean over tasks of the per-task momentum updates
        expect = (torch.stack([st[n] for st in states]).double().mean(0)
                  if b.is_floating_point() else states[0][n])
        torch.testing.assert_close(b, expect.to(b.dtype), rtol=1e-10, atol=1e-12, msg=n)
    calls.clear()
    batched_forward(model, fast, None, x, fused=False)
    assert not calls


@pytest.mark.parametrize("kind", ["maml", "fomaml", "anil"])
def test_learners_run_the_fused_tail_and_match_reference(kind, monkeypatch):
    """Every conv4 pass of the inner loop and of the query runs fused, second order
    included; the meta-gradients still match the per-task reference."""
    calls = _counting_fused(monkeypatch)
    learner = make(kind, conv(channels_last=True), steps=2, task_chunk=None).train()
    data = episode("img")
    loss = learner.meta_loss(*data)
    # conv4 passes: MAML and FOMAML 2 support steps + the query; ANIL the body on the
    # support and on the query (its inner loop adapts the linear head only)
    passes = {"maml": 3, "fomaml": 3, "anil": 2}[kind]
    assert len(calls) == 4 * passes
    assert_grads_close(grads_of(learner, loss), reference_meta(learner, *data)[1])


@pytest.mark.parametrize("per_task", [False, True])
def test_bn_modes_in_eval(per_task):
    model = conv(channels_last=False)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 4, 1, 28, 28, dtype=DT)
    params = dict(model.named_parameters())
    running = batched_forward(model, params, None, x, bn_mode="running", per_task=per_task)
    torch.testing.assert_close(running, model(x.flatten(0, 1)).view(2, 4, 3))
    before = [b.clone() for b in model.buffers()]
    trans = batched_forward(model, params, None, x, per_task=per_task)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # eval: no updates
    model.train()
    ref = torch.stack([functional_call(model, {n: b.clone() for n, b in model.named_buffers()},
                                       (x[t],)) for t in range(2)])
    torch.testing.assert_close(trans, ref)


def test_running_mode_learner_uses_running_stats_in_eval():
    learner = MAML(conv(), bn_mode="running", steps=1)
    data = episode("img")
    learner.train().meta_loss(*data)  # updates the running statistics
    with torch.no_grad():
        a = learner.eval()(*data[:3], 3)
        learner.bn_mode = "transductive"
        b = learner(*data[:3], 3)
    assert not torch.allclose(a, b)


# ---- Reptile --------------------------------------------------------------------------------

@pytest.mark.parametrize("per_task", [False, True])
@pytest.mark.parametrize("model_name", ["mlp", "conv_cl"])
def test_reptile_matches_reference(model_name, per_task):
    learner = Reptile(MODELS[model_name](), inner_lr=0.2, steps=3, per_task=per_task).train()
    sx, sy, qx, qy = episode("mlp" if model_name == "mlp" else "img")
    theta = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    loss, logits = learner.loss(sx, sy, qx, qy, 3)
    assert not loss.requires_grad and logits.shape == (3, 4, 3)
    adapted = [reference_adapt(learner, sx[t], sy[t], 3, False, create=False) for t in range(3)]
    for n, p in learner.model.named_parameters():
        mean = torch.stack([a[n].detach() for a in adapted]).mean(0)
        torch.testing.assert_close(p.grad, theta[n] - mean, rtol=1e-9, atol=1e-12)
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)  # theta + 0.5 * (mean - theta)
    opt.step()
    for n, p in learner.model.named_parameters():
        mean = torch.stack([a[n].detach() for a in adapted]).mean(0)
        torch.testing.assert_close(p.detach(), theta[n] + 0.5 * (mean - theta[n]))


@pytest.mark.parametrize("cls", [MAML, ANIL, Reptile])
def test_autocast_bfloat16_trains_every_parameter(cls):
    """The engine may train under CPU autocast: fast weights stay float32, losses upcast."""
    torch.manual_seed(0)
    learner = cls(nn.Sequential(Conv4(hidden=4, out_channels=4), nn.Linear(4, 3)), steps=2)
    sx, sy, qx, qy = (t.float() if t.is_floating_point() else t for t in episode("img", T=2))
    with torch.autocast("cpu", torch.bfloat16):
        loss, logits = learner.loss(sx, sy, qx, qy, 3)
    assert loss.dtype == torch.float32 and logits.shape == (2, 4, 3)
    if not learner.sets_own_grads:
        loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in learner.parameters())


def test_sets_own_grads_flag():
    assert Reptile.sets_own_grads is True
    assert not any(c.sets_own_grads for c in (MAML, FOMAML, MetaSGD, ANIL))
    assert not getattr(FewShotLearner, "sets_own_grads", False)


# ---- registry, config and bad input ---------------------------------------------------------

@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd", "anil", "reptile"])
def test_registry_and_rebuild(algo):
    cls = LEARNERS[algo]
    assert cls.algo == algo and issubclass(cls, FewShotLearner)
    learner = build_learner(algo, mlp(), steps=2, test_steps=3)
    config = json.loads(json.dumps(learner.extra_config()))
    rebuilt = build_learner(algo, mlp(seed=1), **config)
    rebuilt.load_state_dict(learner.state_dict())
    sx, sy, qx, _ = episode("mlp")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(sx, sy, qx, 3), learner.eval()(sx, sy, qx, 3))


def test_bad_arguments():
    m = mlp()
    for kwargs, match in ((dict(inner_lr=-1.0), "inner_lr"), (dict(inner_lr=True), "inner_lr"),
                          (dict(steps=0), "steps"), (dict(test_steps=1.5), "test_steps"),
                          (dict(bn_mode="batch"), "bn_mode"), (dict(loss="l1"), "loss"),
                          (dict(task_chunk=0), "task_chunk"),
                          (dict(task_chunk="all"), "positive int, .auto. or None"),
                          (dict(second_order="False"), "second_order must be True or False"),
                          (dict(lslr=1), "lslr must be True or False"),
                          (dict(checkpoint_inner="no"), "checkpoint_inner must be True"),
                          (dict(per_task=None), "per_task must be True or False")):
        with pytest.raises(ValueError, match=match):
            MAML(m, **kwargs)
        with pytest.raises(ValueError, match=match):  # and leaves fixed_init unfrozen
            MAML(m, fixed_init=["3"], **kwargs)
        assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="no parameters"):
        MAML(nn.ReLU())
    with pytest.raises(ValueError, match="no nn.Linear"):
        ANIL(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="no model parameter is named 'head'"):
        ANIL(m, head=["head"])
    with pytest.raises(ValueError, match="covers every parameter"):
        ANIL(m, head=["0", "1", "3"])
    with pytest.raises(ValueError, match="list of parameter-name prefixes"):
        ANIL(m, head="3")
    with pytest.raises(ValueError, match="fixed_init parameters .* must lie in the head"):
        ANIL(m, head=["3"], fixed_init=["0"])  # neither adapted nor meta-learned: frozen
    assert MAML(m, test_steps=0).test_steps == 0  # scores the meta-initialisation


def test_bad_episodes():
    learner = MAML(mlp())
    sx, sy, qx, qy = episode("mlp")
    with pytest.raises(ValueError, match="outside"):
        learner.loss(sx, sy + 5, qx, qy, 3)
    with pytest.raises(ValueError, match="ways"):
        learner.loss(sx, sy, qx, qy % 2, 2)  # the model outputs 3 logits
    with pytest.raises(ValueError, match="tasks"):
        learner.meta_loss(sx, sy, qx[:2], qy[:2])
    for bad_sy, bad_qy in ((sy + 3, qy), (sy, qy - 1)):  # no ways given: checked against the head
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for a model with 3"):
            learner.meta_loss(sx, bad_sy, qx, bad_qy)
    with pytest.raises(ValueError, match="integer class"):
        learner.meta_loss(sx, sy.double(), qx, qy)
    for dtype in (torch.uint8, torch.bool):  # images left as bytes; not token ids either
        with pytest.raises(ValueError, match="floating-point tensors of one dtype, or "
                                             "int64/int32 token ids"):
            learner.meta_loss((sx * 10).to(dtype), sy, (qx * 10).to(dtype), qy)
    with pytest.raises(ValueError, match="floating-point tensors of one dtype"):
        learner.meta_loss(sx.long(), sy, qx, qy)
    for ways in (None, 3):
        with pytest.raises(ValueError, match="inputs are torch.float32 but the model's weights "
                                             "are torch.float64"):
            learner.loss(sx.float(), sy, qx.float(), qy, ways) if ways else \
                learner.meta_loss(sx.float(), sy, qx.float(), qy)
    with pytest.raises(ValueError, match=r"\[T, S"):
        learner.adapt(sx[0, 0], sy)
    with pytest.raises(ValueError, match="steps must be an int >= 0, got 1.5"):
        learner.adapt(sx, sy, steps=1.5)
    reg = MAML(mlp(), loss="mse")
    with pytest.raises(ValueError, match="float targets"):
        reg.meta_loss(sx, sy, qx, qy)
    with pytest.raises(ValueError, match="outputs"):
        reg.meta_loss(sx, sy.double()[..., None], qx, qy.double()[..., None])  # 3 outputs vs 1


def test_batched_forward_bad_input():
    model = mlp()
    x = torch.randn(2, 5, 4, dtype=DT)
    with pytest.raises(ValueError, match="not a parameter"):
        batched_forward(model, {"nope": torch.zeros(2)}, None, x)
    with pytest.raises(ValueError, match=r"per task, T=2"):
        batched_forward(model, {"0.weight": torch.zeros(3, 8, 4, dtype=DT)}, None, x)
    with pytest.raises(ValueError, match="x must be"):
        batched_forward(model, {}, None, torch.zeros(4))
    with pytest.raises(ValueError, match="bn_mode"):
        batched_forward(model, {}, None, x, bn_mode="eval")
    with pytest.raises(ValueError, match="Conv4: expected input"):
        batched_forward(conv(), {}, None, torch.zeros(2, 3, 3, 28, 28, dtype=DT))



# ---- modes, inference mode, buffers and errors ----------------------------------------------

@pytest.mark.parametrize("per_task", [False, True], ids=["batched", "per_task"])
@pytest.mark.parametrize("model_name", ["mlp", "conv"])
def test_a_frozen_batchnorm_stays_frozen_while_the_rest_trains(model_name, per_task):
    """A BatchNorm the user put in eval mode normalises with its running statistics and
    keeps them, as functional_call (and learn2learn, higher) would."""
    learner = make("maml", MODELS[model_name](), steps=2, per_task=per_task).train()
    bns = [m for m in learner.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    bns[0].eval()
    frozen = bns[0].running_mean.clone()
    sx, sy, qx, qy = episode(model_name)
    ref_loss, ref_grads = reference_meta(learner, sx, sy, qx, qy)
    loss = learner.meta_loss(sx, sy, qx, qy)
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_close(grads_of(learner, loss), ref_grads)
    assert torch.equal(bns[0].running_mean, frozen) and not bns[0].training
    assert learner.training and all(m.training for m in learner.modules() if m is not bns[0])


@pytest.mark.parametrize("cls", [MAML, Reptile])
def test_inference_mode_evaluates_like_no_grad(cls):
    """Lightning evaluates under torch.inference_mode(): the inner loop still needs autograd."""
    learner = cls(mlp(), inner_lr=0.3, steps=2).eval()
    sx, sy, qx, qy = episode("mlp")
    with torch.no_grad():
        expected, fast = learner(sx, sy, qx, 3), learner.adapt(sx, sy)
    with torch.inference_mode():
        got, fast_got = learner(sx, sy, qx, 3), learner.adapt(sx, sy)
    torch.testing.assert_close(got, expected)
    for name in fast:
        torch.testing.assert_close(fast_got[name], fast[name])


class Standardize(nn.Module):
    """Constant float buffers: nothing in training may change them."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1, 1, n) / 3)
        self.register_buffer("std", torch.linspace(0.5, 2, n) / 3)

    def forward(self, x):
        return (x - self.mean) / self.std


def test_per_task_path_leaves_constant_buffers_alone():
    """Writing back the mean of T identical per-task copies drifted them (float32, T=7)."""
    torch.manual_seed(0)
    model = nn.Sequential(Standardize(16), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 3))
    learner = MAML(model, inner_lr=0.3, steps=1).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        sx, qx = torch.randn(7, 6, 16, generator=g), torch.randn(7, 4, 16, generator=g)
        learner.meta_loss(sx, torch.arange(6).repeat(7, 1) % 3, qx,
                          torch.randint(0, 3, (7, 4), generator=g))
    assert torch.equal(model[0].mean, before["0.mean"]) and torch.equal(model[0].std, before["0.std"])
    assert not torch.equal(model[2].running_mean, before["2.running_mean"])  # stats do update


def test_unclear_torch_errors_are_named():
    learner = MAML(conv(), inner_lr=0.3, steps=1)
    sx, sy, qx, qy = episode("conv")
    with pytest.raises(ValueError, match=r"Conv4: input \(12, 12\) is too small for 4 2x2"):
        learner.meta_loss(sx[..., :12, :12], sy, qx[..., :12, :12], qy)
    single = MAML(mlp(ways=1), inner_lr=0.3, steps=1).train()
    sx, sy, qx, qy = episode("mlp", ways=1, S=1, Q=1)
    with pytest.raises(ValueError, match="BatchNorm1d 1: batch statistics need more than one "
                                         "value per channel in each task, but each task has "
                                         "one sample of 8 channels"):
        single.meta_loss(sx, sy, qx, qy)
    # torch's messages would describe the task-stacked layout (groups=T, T*C channels)
    sx, sy, qx, qy = episode("mlp")
    with pytest.raises(ValueError, match=r"Linear 0: expects samples \[\.\.\., 4\], got "
                                         r"samples \[3\]"):
        MAML(mlp()).meta_loss(sx[..., :3], sy, qx[..., :3], qy)
    rgb = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2, 3)).to(DT)
    sx, sy, qx, qy = episode("conv")
    for chunk in ("auto", None):
        with pytest.raises(ValueError, match=r"Conv2d 0: expects samples \[3, H, W\], got "
                                             r"samples \[1, 28, 28\]"):
            MAML(rgb, task_chunk=chunk).meta_loss(sx, sy, qx, qy)


@pytest.mark.parametrize("cls, kwargs", [(MAML, {}), (MAML, {"checkpoint_inner": True}),
                                         (MAML, {"task_chunk": 1}), (FOMAML, {}),
                                         (MetaSGD, {}), (Reptile, {})],
                         ids=["maml", "checkpointed", "chunked", "fomaml", "metasgd", "reptile"])
def test_parameters_the_loss_never_reaches_get_no_gradient(cls, kwargs):
    """An unused parameter's .grad stays None, as plain autograd leaves it (a zero .grad is
    still moved by weight decay and momentum), and the others' gradients are unchanged."""
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.aux, self.b = nn.Linear(3, 4), nn.Linear(3, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = WithAux().double()
    plain = nn.Sequential(model.a, nn.Tanh(), model.b)
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(2, 4, 3, generator=g, dtype=DT), torch.randn(2, 3, 3, generator=g, dtype=DT)
    sy, qy = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]]), torch.tensor([[0, 1, 1], [1, 1, 0]])

    def meta_gradients(m):
        learner = cls(m, steps=2, **kwargs)
        if learner.sets_own_grads:  # Reptile fills .grad itself
            learner.loss(sx, sy, qx, qy, 2)
        else:
            learner.meta_loss(sx, sy, qx, qy, 2).backward()

    meta_gradients(model)
    assert model.aux.weight.grad is None and model.aux.bias.grad is None
    got = [p.grad.clone() for p in plain.parameters()]
    plain.zero_grad(set_to_none=True)
    meta_gradients(plain)
    assert all(torch.allclose(a, p.grad, rtol=1e-12, atol=1e-14) for a, p in zip(got, plain.parameters()))


def test_changes_after_construction_are_named():
    """Learned rates are sized and typed when the learner is built: freezing a layer or
    converting only the model afterwards gets an error that says so; nothing to adapt too."""
    sx, qx = torch.randn(2, 4, 3, dtype=DT), torch.randn(2, 3, 3, dtype=DT)
    sy, qy = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]]), torch.tensor([[0, 1, 1], [1, 1, 0]])
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    learner = MetaSGD(model)
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="4 learned inner rates for 2 adapting parameters"):
        learner.meta_loss(sx, sy, qx, qy, 2)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    learner = MAML(model, lslr=True)
    model.double()
    with pytest.raises(TypeError, match=r"convert the whole learner \(learner.to\(dtype\)\)"):
        learner.meta_loss(sx, sy, qx, qy, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter adapts"):
        MAML(model).meta_loss(sx, sy, qx, qy, 2)


def test_numpy_integer_options_are_stored_as_ints():
    import json
    import numpy as np
    learner = MAML(nn.Linear(3, 2), steps=np.int64(2), task_chunk=np.int64(2))
    assert json.loads(json.dumps(learner.extra_config()))["task_chunk"] == 2


def test_compiled_callers_get_the_eager_inner_loop():
    """Traced by torch.compile (AOTAutograd), the inner loop's autograd.grad gave no
    gradients, so tasks silently did not adapt; the learners' entry points run eagerly."""
    learner = MAML(mlp(), steps=2)
    sx, sy, qx, qy = episode("mlp")

    def meta_gradients(fn):
        learner.zero_grad(set_to_none=True)
        loss = fn(sx, sy, qx, qy)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in learner.parameters()]

    loss, grads = meta_gradients(learner.meta_loss)
    got_loss, got_grads = meta_gradients(torch.compile(learner.meta_loss, backend="aot_eager"))
    torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grads, grads, rtol=1e-10, atol=1e-12)
    fast = torch.compile(learner.adapt, backend="aot_eager")(sx, sy)
    torch.testing.assert_close(fast, learner.adapt(sx, sy), rtol=1e-12, atol=1e-14)
