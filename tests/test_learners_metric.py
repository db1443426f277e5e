"""Metric learners (ProtoNet, MatchingNet, Siamese, RelationNet) against plain-torch references.

Each reference below loops over tasks, queries and classes and uses torch.cdist,
F.cosine_similarity or the paper's formulas directly; the learners must agree in values and
in the gradients they send to the backbone (float64, BatchNorm-free backbones so that
per-task backbone calls equal the learners' one batched call).
"""
import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymeta.learners
from conftest import requires_cuda, token_model
from pymeta.learners import (LEARNERS, FewShotLearner, MatchingNet, ProtoNet, RelationNet,
                             Siamese, balanced_pairs, build_learner)
from pymeta.nn import Conv4

TOL = dict(rtol=1e-9, atol=1e-10)
SAMPLE = (1, 3, 3)          # tiny "images"
D = 5                       # embedding size of the reference backbone


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add sync overhead (badly so on a shared machine);
    conftest restores the thread count after each test."""
    torch.set_num_threads(1)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, D), nn.Tanh()).double()


def conv_maps(seed: int = 0, channels: int = 3) -> nn.Module:
    """Feature maps [C, 3, 3] for RelationNet."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh()).double()


def episode(T=3, ways=3, S=7, Q=5, seed=0, dtype=torch.float64):
    """Shuffled support labels with uneven shots (every class present), random queries."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(T):
        labels = torch.cat([torch.arange(ways), torch.randint(0, ways, (S - ways,), generator=g)])
        rows.append(labels[torch.randperm(S, generator=g)])
    sx = torch.randn(T, S, *SAMPLE, generator=g, dtype=torch.float64).to(dtype)
    qx = torch.randn(T, Q, *SAMPLE, generator=g, dtype=torch.float64).to(dtype)
    return sx, torch.stack(rows), qx, torch.randint(0, ways, (T, Q), generator=g)


def grads(loss: torch.Tensor, module: nn.Module) -> list:
    return torch.autograd.grad(loss, list(module.parameters()))


def assert_same(learner_out, ref_out, params_of: nn.Module):
    """Equal (loss, logits) and equal gradients of the loss w.r.t. ``params_of``."""
    (loss, logits), (ref_loss, ref_logits) = learner_out, ref_out
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for g, rg in zip(grads(loss, params_of), grads(ref_loss, params_of)):
        torch.testing.assert_close(g, rg, **TOL)


def class_indices(labels: torch.Tensor, c: int) -> torch.Tensor:
    return (labels == c).nonzero().squeeze(-1)


# ---- references ---------------------------------------------------------------------------

def ref_protonet(net, sx, sy, qx, qy, ways, metric):
    logits, losses = [], []
    for t in range(sx.shape[0]):
        zs, zq = net(sx[t]), net(qx[t])
        protos = torch.stack([zs[class_indices(sy[t], c)].mean(0) for c in range(ways)])
        exact = "donot_use_mm_for_euclid_dist"
        dist = {
            "sqeuclidean": lambda: torch.cdist(zq, protos, compute_mode=exact) ** 2,
            "euclidean": lambda: torch.cdist(zq, protos, compute_mode=exact),
            "cosine": lambda: 1 - F.cosine_similarity(zq[:, None], protos[None], dim=-1),
            "dot": lambda: -zq @ protos.T,
        }[metric]()
        logits.append(-dist)
        losses.append(F.cross_entropy(-dist, qy[t]))
    return torch.stack(losses).mean(), torch.stack(logits)


def ref_matching(net, sx, sy, qx, qy, ways, scale, fce_of=None):
    logits, losses = [], []
    for t in range(sx.shape[0]):
        zs, zq = net(sx[t]), net(qx[t])
        if fce_of is not None:
            zs = ref_fce_support(fce_of.support_lstm, zs)
            zq = torch.stack([ref_fce_query(fce_of.query_cell, f, zs, fce_of.fce_steps)
                              for f in zq])
        rows = []
        for q in range(zq.shape[0]):
            attention = torch.softmax(scale * F.cosine_similarity(zq[q][None], zs, dim=-1), 0)
            rows.append(torch.stack([attention[class_indices(sy[t], c)].sum()
                                     for c in range(ways)]))
        log_prob = torch.stack(rows).log()
        logits.append(log_prob)
        losses.append(F.nll_loss(log_prob, qy[t]))
    return torch.stack(losses).mean(), torch.stack(logits)


def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def ref_fce_support(lstm: nn.LSTM, zs):
    """g = z + forward states + backward states, one support at a time."""
    def run(order, suffix):
        w = [getattr(lstm, f"{n}_l0{suffix}")
             for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h = c = torch.zeros_like(zs[0])
        out = {}
        for i in order:
            h, c = lstm_step(zs[i], h, c, *w)
            out[i] = h
        return torch.stack([out[i] for i in range(len(zs))])
    n = len(zs)
    return zs + run(range(n), "") + run(reversed(range(n)), "_reverse")


def ref_fce_query(cell: nn.LSTMCell, f, g, steps):
    h = c = read = torch.zeros_like(f)
    for _ in range(steps):
        h, c = lstm_step(torch.cat([f, read]), h, c, cell.weight_ih, cell.weight_hh,
                         cell.bias_ih, cell.bias_hh)
        h = h + f
        attention = torch.softmax(g @ h, 0)
        read = (attention[:, None] * g).sum(0)
    return h


def ref_pair_logit(learner: Siamese, a, b):
    if learner.pair_loss == "contrastive":
        return -((a - b).abs().sum() if learner.head == "l1" else (a - b).norm())
    if learner.head == "l1":
        return learner.scorer((a - b).abs()).squeeze()
    return learner.scorer.weight.squeeze() * (a - b).norm() + learner.scorer.bias.squeeze()


def ref_siamese(learner, sx, sy, qx, qy, ways, pairs):
    q_idx, s_idx, same = pairs
    logits, losses = [], []
    for t in range(sx.shape[0]):
        zs, zq = learner.backbone(sx[t]), learner.backbone(qx[t])
        score = torch.stack([torch.stack([ref_pair_logit(learner, zq[q], zs[s])
                                          for s in range(len(zs))]) for q in range(len(zq))])
        logits.append(torch.stack([score[:, class_indices(sy[t], c)].max(1).values
                                   for c in range(ways)], 1))
        for q, s, y in zip(q_idx[t].tolist(), s_idx[t].tolist(), same[t].tolist()):
            if learner.pair_loss == "bce":
                losses.append(-F.logsigmoid(score[q, s] if y else -score[q, s]))
            else:
                d = -score[q, s]
                losses.append(d ** 2 if y else torch.clamp(learner.margin - d, min=0) ** 2)
    return torch.stack(losses).mean(), torch.stack(logits)


def ref_relation(learner, sx, sy, qx, qy, ways):
    """Concatenated (class mean, query) maps of all tasks through the module in one batch
    (the BatchNorm statistics span all pairs, as in the learner)."""
    T, Q = qx.shape[:2]
    pairs = []
    for t in range(T):
        zs, zq = learner.backbone(sx[t]), learner.backbone(qx[t])
        classes = [zs[class_indices(sy[t], c)].mean(0) for c in range(ways)]
        pairs += [torch.cat([classes[c], zq[q]]) for q in range(Q) for c in range(ways)]
    scores = learner.relation(torch.stack(pairs)).view(T, Q, ways)
    target = torch.stack([torch.stack([F.one_hot(y, ways) for y in qy[t]]) for t in range(T)])
    return ((scores - target) ** 2).mean(), scores


# ---- learners match their references --------------------------------------------------------

@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine", "dot"])
def test_protonet_matches_reference(metric):
    sx, sy, qx, qy = episode(seed=1)
    learner = ProtoNet(mlp(), metric=metric)
    ref = ref_protonet(learner.backbone, sx, sy, qx, qy, 3, metric)
    assert_same(learner.loss(sx, sy, qx, qy, 3), ref, learner)
    torch.testing.assert_close(learner(sx, sy, qx, 3), learner.loss(sx, sy, qx, qy, 3)[1], **TOL)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_protonet_takes_token_ids(dtype):
    sx, sy, qx, qy = episode(seed=2)
    g = torch.Generator().manual_seed(3)
    sx, qx = (torch.randint(0, 11, (*t.shape[:2], 4), generator=g, dtype=dtype) for t in (sx, qx))
    learner = ProtoNet(token_model(D))
    ref = ref_protonet(learner.backbone, sx, sy, qx, qy, 3, "sqeuclidean")
    assert_same(learner.loss(sx, sy, qx, qy, 3), ref, learner)


@pytest.mark.parametrize("fce, scale", [(False, {}), (True, {}),
                                         (False, dict(scale=1, learn_scale=False))])
def test_matching_matches_reference(fce, scale):
    sx, sy, qx, qy = episode(seed=2, ways=4, S=9)
    learner = MatchingNet(mlp(), fce=fce, fce_steps=3, feature_dim=D, **scale).double()
    out = learner.loss(sx, sy, qx, qy, 4)
    ref = ref_matching(learner.backbone, sx, sy, qx, qy, 4, learner.scale,
                       learner if fce else None)
    assert_same(out, ref, learner)  # gradients include the learned scale's
    torch.testing.assert_close(out[1].exp().sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert learner.scale.requires_grad == ("learn_scale" not in scale)


def test_matching_fixed_scale_is_exactly_the_one_given():
    """A fixed scale was stored as a float32 log: 7 became 7.0000005 in a float64 model."""
    sx, sy, qx, qy = episode(seed=3, ways=4, S=9)
    learner = MatchingNet(mlp(), scale=7.0, learn_scale=False).double()
    assert learner.scale.item() == 7.0 and learner.extra_config()["scale"] == 7.0
    ref = ref_matching(learner.backbone, sx, sy, qx, qy, 4, 7.0)[1]
    torch.testing.assert_close(learner(sx, sy, qx, 4), ref, rtol=1e-13, atol=1e-13)
    old = {**learner.state_dict(), "log_scale": torch.tensor(7.0).log()}  # a buffer, once
    learner.load_state_dict(old)
    assert learner.scale.item() == 7.0


def test_matching_sharp_attention_stays_finite():
    """Sharp attention underflows float32 probabilities (< e^-87); the log-probs stay exact."""
    sx, sy, qx, qy = episode(seed=2, ways=4, S=9)
    learner = MatchingNet(mlp(), scale=100.0).double()
    ref = ref_matching(learner.backbone, sx, sy, qx, qy, 4, 100.0)[1]  # float64: no underflow
    assert (ref < -88).any()
    logits = learner.float()(sx.float(), sy, qx.float(), 4)
    torch.testing.assert_close(logits.double(), ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("head, loss", [("l1", "bce"), ("euclidean", "bce"),
                                        ("l1", "contrastive"), ("euclidean", "contrastive")])
def test_siamese_matches_reference(head, loss):
    sx, sy, qx, qy = episode(seed=3)
    learner = Siamese(mlp(), head=head, loss=loss, margin=1.5, feature_dim=D,
                      pairs_per_query=2).double()
    out = learner.loss(sx, sy, qx, qy, 3, generator=torch.Generator().manual_seed(7))
    pairs = balanced_pairs(sy, qy, 2, generator=torch.Generator().manual_seed(7))
    assert_same(out, ref_siamese(learner, sx, sy, qx, qy, 3, pairs), learner)


def test_relation_matches_reference():
    sx, sy, qx, qy = episode(seed=4, T=2)
    learner = RelationNet(conv_maps(), feature_channels=3, hidden=4).double()
    assert learner.training  # BatchNorm on batch statistics
    assert_same(learner.loss(sx, sy, qx, qy, 3), ref_relation(learner, sx, sy, qx, qy, 3), learner)
    learner.eval()
    assert_same(learner.loss(sx, sy, qx, qy, 3), ref_relation(learner, sx, sy, qx, qy, 3), learner)


def test_relation_module_handles_1x1_maps():
    module = pymeta.learners.RelationModule(feature_channels=2, hidden=3)
    assert module(torch.randn(4, 4, 1, 1)).shape == (4,)
    scores = module.score_all(torch.randn(2, 3, 2, 1, 1), torch.randn(2, 5, 2, 1, 1))
    assert scores.shape == (2, 5, 3) and ((scores > 0) & (scores < 1)).all()


def test_int32_labels_and_label_order_do_not_matter():
    sx, sy, qx, qy = episode(seed=5)
    learner = ProtoNet(mlp())
    perm = torch.randperm(sy.shape[1])
    a = learner(sx, sy, qx, 3)
    torch.testing.assert_close(learner(sx[:, perm], sy[:, perm].int(), qx, 3), a, **TOL)


# ---- balanced pair sampler ------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_balanced_pairs(k):
    _, sy, _, qy = episode(T=4, ways=4, S=9, Q=6, seed=6)
    q_idx, s_idx, same = balanced_pairs(sy, qy, k, generator=torch.Generator().manual_seed(0))
    assert q_idx.shape == s_idx.shape == same.shape == (4, 2 * 6 * k) and same.dtype == torch.bool
    assert (same.sum(1) == (~same).sum(1)).all()                      # balanced in every task
    assert torch.equal(sy.gather(1, s_idx) == qy.gather(1, q_idx), same)  # labels agree
    assert (torch.stack([torch.bincount(q, minlength=6) for q in q_idx]) == 2 * k).all()
    again = balanced_pairs(sy, qy, k, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((q_idx, s_idx, same), again))


def test_balanced_pairs_draw_every_candidate():
    sy, qy = torch.tensor([[0, 0, 0, 1, 1, 2]]), torch.tensor([[0]])
    _, s_idx, same = balanced_pairs(sy, qy, 200, generator=torch.Generator().manual_seed(0))
    assert set(s_idx[same].tolist()) == {0, 1, 2} and set(s_idx[~same].tolist()) == {3, 4, 5}


def test_balanced_pairs_errors():
    with pytest.raises(ValueError, match="query 1 of task 0 .class 2. has no support of same"):
        balanced_pairs(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="no support of another class"):
        balanced_pairs(torch.tensor([[0, 0]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="integer tensor"):
        balanced_pairs(torch.tensor([[0.0, 1.0]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="same task count"):
        balanced_pairs(torch.tensor([[0, 1]]), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="pairs_per_query"):
        balanced_pairs(torch.tensor([[0, 1]]), torch.tensor([[0]]), 0)


# ---- interface, registry, bad inputs -----------------------------------------------------------

def small_learners():
    """Every learner on a small Conv4 for 1x28x28 images (4 features, or a 4x1x1 map)."""
    conv = lambda flatten=True: Conv4(hidden=4, out_channels=4, flatten=flatten)  # noqa: E731
    torch.manual_seed(0)
    return [ProtoNet(conv()), MatchingNet(conv(), fce=True, fce_steps=2, feature_dim=4),
            Siamese(conv(), feature_dim=4), Siamese(conv(), head="euclidean", loss="contrastive"),
            RelationNet(conv(False), feature_channels=4, hidden=4)]


def image_episode(T=2, ways=3, S=5, Q=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sy = torch.tensor([0, 1, 2, 1, 0])[torch.randperm(S, generator=g)].expand(T, S)
    sx, qx = (torch.randn(T, n, 1, 28, 28, generator=g) for n in (S, Q))
    return sx, sy, qx, torch.randint(0, ways, (T, Q), generator=g)


def test_registry():
    metric = {"protonet": ProtoNet, "matching": MatchingNet, "siamese": Siamese,
              "relation": RelationNet}
    assert metric.items() <= LEARNERS.items()
    assert all(cls.algo == name and issubclass(cls, FewShotLearner)
               for name, cls in LEARNERS.items())
    assert isinstance(build_learner("protonet", mlp(), metric="cosine"), ProtoNet)
    with pytest.raises(ValueError, match=r"unknown learner 'nope'.*'matching'.*'protonet'"):
        build_learner("nope", mlp())


@pytest.mark.parametrize("index", range(5))
def test_rebuild_from_config_and_save(index):
    learner = small_learners()[index].eval()
    sx, sy, qx, _ = image_episode()
    expected = learner(sx, sy, qx, 3)
    config = json.loads(json.dumps(learner.extra_config()))  # JSON round trip
    torch.manual_seed(123)
    backbone = Conv4(hidden=4, out_channels=4, flatten=not isinstance(learner, RelationNet))
    rebuilt = build_learner(learner.algo, backbone, **config)
    rebuilt.load_state_dict(learner.state_dict())
    torch.testing.assert_close(rebuilt.eval()(sx, sy, qx, 3), expected)
    buf = io.BytesIO()
    torch.save(learner, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(sx, sy, qx, 3), expected)


def test_siamese_lazy_head_reports_its_size():
    learner = Siamese(Conv4(hidden=4, out_channels=4))
    assert learner.extra_config()["feature_dim"] is None
    sx, sy, qx, _ = image_episode()
    learner(sx, sy, qx, 3)
    assert learner.extra_config()["feature_dim"] == 4


@pytest.mark.parametrize("index", range(5))
def test_autocast_bfloat16_trains_every_parameter(index):
    learner = small_learners()[index]
    sx, sy, qx, qy = image_episode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = learner.loss(sx, sy, qx, qy, 3)
    assert logits.shape == (2, 4, 3) and logits.dtype == torch.float32
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(logits).all()
    loss.backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    backbone_grads = [p.grad.abs().sum() for p in learner.backbone.parameters()]
    assert all(g > 0 for g in backbone_grads)


def test_embed_keeps_leading_dims():
    learner = ProtoNet(Conv4(hidden=4, out_channels=4))
    learner.eval()
    x = torch.randn(2, 3, 1, 28, 28)
    z = learner.embed(x)
    assert z.shape == (2, 3, 4)
    torch.testing.assert_close(z[1, 2], learner.embed(x[1, 2]))
    assert RelationNet(Conv4(flatten=False)).embed(torch.randn(3, 1, 28, 28)).shape == (3, 64, 1, 1)
    vectors = ProtoNet(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))).eval()
    v = torch.randn(2, 3, 6)
    torch.testing.assert_close(vectors.embed(v, batch_dims=2)[1], vectors.embed(v[1], batch_dims=1))
    with pytest.raises(ValueError, match="needs 3 batch dims and a sample shape"):
        vectors.embed(v, batch_dims=3)


def test_evaluation_keeps_a_frozen_batchnorm_frozen():
    """evaluate() switches to eval mode and back per submodule: a BatchNorm the user froze
    must not start updating its statistics afterwards."""
    from pymeta.data.episodes import fixed_episodes
    from pymeta.engine import RunConfig, build_splits, evaluate
    splits = build_splits(RunConfig(data="digits"))
    learner = ProtoNet(Conv4(hidden=4, out_channels=4))
    frozen = learner.backbone.blocks[0][1]
    frozen.eval()
    evaluate(learner, fixed_episodes(splits.val, 3, 1, 2, n=2))
    assert learner.training and not frozen.training


def test_bad_episodes():
    learner = ProtoNet(mlp())
    sx, sy, qx, qy = episode()
    cases = [
        ((sx[0, :, 0, 0], sy, qx, 3), r"support_x must be \[T, S, \*sample\].*x\[None\]"),
        ((sx[0], sy, qx, 3), "query_x must be"),
        ((sx, sy, qx[:2], 3), "support_x has 3 tasks but query_x has 2"),
        ((sx, sy[:, :4], qx, 3), r"support_y must have shape \[T, S\] = \[3, 7\]"),
        ((sx, sy[0], qx, 3), "support_y must have shape"),
        ((sx, sy.double(), qx, 3), "support_y must hold integer class indices"),
        ((sx, sy > 0, qx, 3), "integer class indices"),
        ((sx, sy, qx, 0), "ways must be a positive int"),
        ((sx, sy, qx, 3.0), "ways must be a positive int"),
        ((sx, sy, qx, 2), r"support_y\[\d, \d\] = 2 is outside \[0, 2\)"),
        ((sx, torch.where(sy == 2, 0, sy), qx, 3), r"class 2 has no support sample in task 0"),
        ((sx, sy - 1, qx, 3), r"= -1 is outside"),
        ((sx[:, :0], sy[:, :0], qx, 3), "empty episode"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            learner(*args)
    with pytest.raises(ValueError, match=r"query_y\[\d, \d\] = 3 is outside \[0, 3\)"):
        learner.loss(sx, sy, qx, torch.full_like(qy, 3), 3)
    with pytest.raises(ValueError, match=r"query_y must have shape \[T, Q\] = \[3, 5\]"):
        learner.loss(sx, sy, qx, qy[:, :2], 3)
    with pytest.raises(ValueError, match="query_y must hold integer"):
        learner.loss(sx, sy, qx, qy.float(), 3)


def test_bad_learner_arguments():
    with pytest.raises(ValueError, match="unknown metric 'l2'"):
        ProtoNet(mlp(), metric="l2")
    with pytest.raises(ValueError, match="fce=True needs feature_dim"):
        MatchingNet(mlp(), fce=True)
    with pytest.raises(ValueError, match="scale must be a positive float, got -1"):
        MatchingNet(mlp(), scale=-1)
    for kwargs in (dict(fce="False"), dict(learn_scale="false")):   # strings are not bools
        with pytest.raises(ValueError, match="must be True or False, got '[Ff]alse'"):
            MatchingNet(mlp(), **kwargs)
    sx, sy, qx, _ = episode()
    with pytest.raises(ValueError, match="gives 5 features but feature_dim=4"):
        MatchingNet(mlp(), fce=True, feature_dim=4).double()(sx, sy, qx, 3)
    with pytest.raises(ValueError, match="unknown head 'cos'"):
        Siamese(mlp(), head="cos")
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        Siamese(mlp(), loss="hinge")
    with pytest.raises(ValueError, match="gives 5 features but the l1 head takes feature_dim=4"):
        Siamese(mlp(), feature_dim=4).double()(sx, sy, qx, 3)
    for kwargs, message in ((dict(feature_dim=0), "feature_dim must be a positive int or None"),
                            (dict(margin=-1.0), "margin must be a number >= 0, got -1.0"),
                            (dict(margin="1"), "margin must be a number >= 0, got '1'")):
        with pytest.raises(ValueError, match=message):
            Siamese(mlp(), **kwargs)
    with pytest.raises(ValueError, match="fce_steps must be a positive int, got 2.5"):
        MatchingNet(mlp(), fce_steps=2.5)
    for kwargs in (dict(feature_channels=8.9), dict(hidden=0)):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a positive int"):
            RelationNet(mlp(), **kwargs)
    with pytest.raises(ValueError, match=r"must return feature maps \[C=3, h, w\]"):
        RelationNet(mlp(), feature_channels=3)(sx, sy, qx, 3)
    with pytest.raises(TypeError, match="backbone must be an nn.Module"):
        ProtoNet(lambda x: x)
    with pytest.raises(ValueError, match="no support of another class"):  # one-way Siamese
        Siamese(mlp(), feature_dim=D).double().loss(sx, sy * 0, qx, qx.new_zeros(3, 5).long(), 1)


def test_protonet_learns_a_separable_task():
    torch.manual_seed(0)
    means = 3 * torch.randn(3, 9, dtype=torch.float64)
    y = torch.arange(3).repeat(4)[torch.randperm(12)].expand(8, 12)
    x = (means[y] + torch.randn(8, 12, 9, dtype=torch.float64)).view(8, 12, 1, 3, 3)
    learner = ProtoNet(mlp())
    opt = torch.optim.Adam(learner.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss, _ = learner.loss(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:], 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]



@pytest.mark.parametrize("index", [pytest.param(i, marks=requires_cuda) for i in range(5)])
def test_cuda_matches_cpu(index):
    learner = small_learners()[index].eval()
    sx, sy, qx, qy = image_episode()
    expected = learner.loss(sx, sy, qx, qy, 3)
    learner.cuda()
    loss, logits = learner.loss(sx.cuda(), sy.cuda(), qx.cuda(), qy.cuda(), 3)
    torch.testing.assert_close(logits.cpu(), expected[1], rtol=1e-3, atol=1e-4)
    if isinstance(learner, Siamese):  # its pairs come from the device's own generator
        assert torch.isfinite(loss)
    else:
        torch.testing.assert_close(loss.cpu(), expected[0], rtol=1e-3, atol=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in learner.backbone.parameters())


@pytest.mark.parametrize("make", [
    lambda: RelationNet(Conv4(hidden=8, out_channels=8, flatten=False), feature_channels=8),
    lambda: Siamese(Conv4(hidden=8, out_channels=8), feature_dim=8),
    lambda: MatchingNet(Conv4(hidden=8, out_channels=8), fce=True, feature_dim=8),
], ids=["relation", "siamese", "matching_fce"])
def test_learned_heads_run_in_a_model_cast_to_half(make):
    """The embeddings are upcast for the kernels; a learned head cast to half precision with
    the rest of the model must still take them (in its own dtype)."""
    torch.manual_seed(0)
    sx, qx = torch.randn(2, 4, 1, 28, 28), torch.randn(2, 3, 1, 28, 28)
    sy, qy = torch.tensor([[0, 1, 0, 1]] * 2), torch.tensor([[0, 1, 1]] * 2)
    torch.manual_seed(1)
    full = make().eval()
    torch.manual_seed(1)
    half = make().half().eval()
    logits = half(sx.half(), sy, qx.half(), 2)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, full(sx, sy, qx, 2), atol=0.05, rtol=0)
    half.loss(sx.half(), sy, qx.half(), qy, 2)[0].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.half and p.grad.isfinite().all()
               for p in half.parameters() if p.requires_grad)


def test_siamese_lazy_head_sized_in_inference_mode_still_trains():
    """A first call under inference_mode (a sanity-check evaluation) sizes the lazy head
    with ordinary parameters: training afterwards works, as if sized outside it."""
    sx, sy, qx, qy = image_episode()
    learners = []
    for context in (torch.inference_mode, contextlib.nullcontext):
        torch.manual_seed(0)
        learner = Siamese(Conv4(hidden=4, out_channels=4)).eval()
        with context():
            learner(sx, sy, qx, 3)
        learner.train().loss(sx, sy, qx, qy, 3)[0].backward()
        learners.append(learner)
    assert not learners[0].scorer.weight.is_inference()
    for a, b in zip(*(learner.parameters() for learner in learners)):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_siamese_lazy_head_takes_the_backbone_dtype():
    """A float64 backbone with the default (lazy) head: the head becomes float64 too,
    instead of casting the embeddings down to float32."""
    learner = Siamese(nn.Linear(3, 4).double())
    sx, qx = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64)
    logits = learner(sx, torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]]), qx, 2)
    assert logits.dtype == torch.float64 and learner.scorer.weight.dtype == torch.float64


@pytest.mark.parametrize("algo", ["protonet", "matching", "siamese", "relation"])
def test_inputs_of_another_dtype_than_the_model_are_named(algo):
    learner = build_learner(algo, Conv4(hidden=4, out_channels=4), **(
        {"feature_channels": 4} if algo == "relation" else {}))
    sx, qx = torch.rand(1, 2, 1, 28, 28, dtype=torch.float64), torch.rand(1, 2, 1, 28, 28,
                                                                          dtype=torch.float64)
    with pytest.raises(ValueError, match="the inputs are torch.float64 but the model's weights "
                                         "are torch.float32"):
        learner(sx, torch.tensor([[0, 1]]), qx, 2)
