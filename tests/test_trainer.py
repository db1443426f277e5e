"""The training engine: bit-for-bit resume (also after kill -9), checkpoints, load, eval."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import pymeta
from conftest import interrupt_fit_after
from pymeta.data.episodes import EpisodeSampler, fixed_episodes
from pymeta.engine import RunConfig, Trainer, build_splits, evaluate, load_checkpoint
from pymeta.learners import ProtoNet, Siamese
from pymeta.nn import Conv4

TINY = ["--data", "digits", "--ways", "3", "--shots", "2", "--queries", "3", "--steps", "24",
        "--val-every", "8", "--val-episodes", "6", "--test-episodes", "10", "--log-every", "2",
        "--checkpoint-every", "4", "--threads", "1", "--no-progress", "--seed", "5"]


def run_cli(args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "pymeta", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kw)


def logged_rows(out, split=None):
    """The rows of ``out/metrics.jsonl`` (of one ``split`` if given)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split in (None, r["split"])]


def learning_rows(out):
    """The loss/accuracy of every logged row: timings differ between runs, these must not."""
    rows = logged_rows(out)
    return [(r["step"], r["split"], r["loss"], r["acc"], r["ci95"]) for r in rows]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli(["train", *TINY, "--out", str(out)], cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return out, res.stdout


def test_train_writes_everything(reference_run):
    out, stdout = reference_run
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.jsonl", "curves.png",
                 "results.json"):
        assert (out / name).is_file(), name
    assert "accuracy" in stdout and "± " in stdout and "curves.png" in stdout
    # without a progress bar, one line per validation, with the logged validation score
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 8/24", "step 16/24", "step 24/24"]
    for line, row in zip(lines, logged_rows(out, "val")):
        assert f"val acc={row['acc']:.3f}±{row['ci95']:.3f}" in line
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 24 and state["config"]["ways"] == 3
    assert state["preprocessing"]["dataset"] == "digits"
    results = json.loads((out / "results.json").read_text())
    assert results["tests"][0]["episodes"] == 10 and 0.0 <= results["tests"][0]["acc"] <= 1.0
    val = [r for r in learning_rows(out) if r[1] == "val"]
    assert [r[0] for r in val] == [8, 16, 24]
    assert results["best_acc"] == max(r[3] for r in val)


def test_load_restores_the_best_learner(reference_run):
    out, _ = reference_run
    learner = pymeta.load(out / "best.pt")
    assert not learner.training and learner.config.ways == 3
    cfg = learner.config
    sampler = fixed_episodes(build_splits(cfg).test, 3, 2, cfg.eval_queries, n=10, seed=2024)
    ours = evaluate(learner, sampler)["acc"]
    results = json.loads((out / "results.json").read_text())
    assert ours == pytest.approx(results["tests"][0]["acc"], abs=1e-12)


def _kill_when(proc, predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.wait()
    return False


def _step_of(path):
    try:
        return load_checkpoint(path)["step"]
    except (FileNotFoundError, ValueError):
        return -1


def test_kill_9_mid_run_then_resume_is_bit_for_bit(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pymeta", "train", *TINY, "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _kill_when(proc, lambda: 12 <= _step_of(out / "last.pt") < 24), \
        "the run finished before it could be killed"
    # a resumed run may change the number of loader workers: episodes depend on (seed, index)
    res = run_cli(["train", *TINY, "--out", str(out), "--resume", "--workers", "1"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert learning_rows(out) == learning_rows(ref)
    a, b = load_checkpoint(out / "last.pt"), load_checkpoint(ref / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


KILL_IN_SAVE = """
import os, signal, sys
import pymeta.engine.checkpoint as ck
calls = {"n": 0}
real_save = ck.torch.save
def dying_save(obj, f):
    calls["n"] += 1
    if calls["n"] == int(os.environ["DIE_AT"]):
        f.write(b"torn")      # part of the temp file is on disk, then the process dies
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)
ck.torch.save = dying_save
from pymeta.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_checkpoint_write_then_resume_is_bit_for_bit(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "run"
    script = tmp_path / "die.py"
    script.write_text(KILL_IN_SAVE)
    env = {**os.environ, "DIE_AT": "5"}   # saves: last@4, best+last@8, last@12; #5 is @16
    res = subprocess.run([sys.executable, str(script), "train", *TINY, "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "last.pt")["step"] == 12    # the old file survived intact
    res = run_cli(["train", *TINY, "--out", str(out), "--resume"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert learning_rows(out) == learning_rows(ref)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # torn temp removed


def test_resume_refuses_a_different_config(reference_run, tmp_path):
    ref, _ = reference_run
    args = [a if a != "24" else "30" for a in TINY]
    res = run_cli(["train", *args, "--out", str(ref), "--resume"], cwd=tmp_path)
    assert res.returncode == 2 and "run config differs in ['steps']" in res.stderr
    res = run_cli(["train", *TINY, "--out", str(ref)], cwd=tmp_path)
    assert res.returncode == 2 and "--resume" in res.stderr


def _tiny_trainer(out, steps=6, learner=ProtoNet, algo="protonet"):
    splits = build_splits(RunConfig(data="digits"))
    torch.manual_seed(0)
    cfg = RunConfig(algo=algo, ways=3, shots=1, queries=2, steps=steps, val_every=2,
                    log_every=1, val_episodes=2)
    return Trainer(learner(Conv4(hidden=4, out_channels=4)), cfg,
                   EpisodeSampler(splits.train, 3, 1, 2, seed=0),
                   fixed_episodes(splits.val, 3, 1, 2, n=2), out, progress=False)


def test_resume_is_bit_for_bit_for_a_learner_drawing_random_numbers(tmp_path):
    """Siamese draws its training pairs from torch's global generator, which the checkpoint
    saves; starting the episode loader must not draw from it (a resumed run would then be
    one draw off)."""
    ref = _tiny_trainer(tmp_path / "ref", learner=Siamese, algo="siamese")
    ref.fit()
    interrupt_fit_after(_tiny_trainer(tmp_path / "cut", learner=Siamese, algo="siamese"), 3)
    resumed = _tiny_trainer(tmp_path / "cut", learner=Siamese, algo="siamese")
    resumed.fit(resume=True)
    for a, b in zip(ref.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    assert learning_rows(tmp_path / "ref") == learning_rows(tmp_path / "cut")


def test_resume_without_last_pt_continues_from_best_pt(tmp_path):
    """A run killed between writing best.pt and last.pt (or with last.pt deleted) resumes
    from best.pt, a whole training state, instead of restarting over it."""
    ref = _tiny_trainer(tmp_path / "ref")
    ref.fit()
    interrupt_fit_after(_tiny_trainer(tmp_path / "cut"), 4)
    (tmp_path / "cut" / "last.pt").unlink()
    best_step = load_checkpoint(tmp_path / "cut" / "best.pt")["step"]
    resumed = _tiny_trainer(tmp_path / "cut")
    with pytest.warns(UserWarning, match="last.pt is missing: resuming from") as caught:
        resumed.fit(resume=True)
    assert [w.filename for w in caught if "last.pt is missing" in str(w.message)] == [__file__]
    assert best_step in (2, 4) and resumed.step == 6
    for a, b in zip(ref.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    assert learning_rows(tmp_path / "ref") == learning_rows(tmp_path / "cut")


def test_load_explains_what_it_cannot_rebuild(tmp_path):
    """A Trainer around a learner of the user's own records no input shape: pymeta.load
    cannot rebuild it and says how to load the weights instead."""
    _tiny_trainer(tmp_path, steps=2).fit()
    with pytest.raises(ValueError, match=r"records no input shape: .*load_checkpoint"):
        pymeta.load(tmp_path / "best.pt")
    state = load_checkpoint(tmp_path / "best.pt")
    state["preprocessing"]["input_shape"] = [1, 28, 28]
    state["config"]["backbone_kwargs"] = {}  # config's conv4-64 against the saved conv4-4
    pymeta.engine.save_checkpoint(tmp_path / "wrong.pt", state)
    with pytest.raises(ValueError, match="weights that do not fit the model its config"):
        pymeta.load(tmp_path / "wrong.pt")
    pymeta.engine.save_checkpoint(tmp_path / "empty.pt", {})
    with pytest.raises(ValueError, match="not a training checkpoint"):
        pymeta.load(tmp_path / "empty.pt")


def test_trainer_refuses_a_config_that_does_not_describe_the_run(tmp_path):
    splits = build_splits(RunConfig(data="digits"))
    episodes = EpisodeSampler(splits.train, 3, 1, 2, seed=0)
    learner = ProtoNet(Conv4(hidden=4, out_channels=4))
    for cfg, message in ((RunConfig(ways=5, shots=1, queries=2), "ways=5 but the training "
                          "episodes have 3"),
                         (RunConfig(algo="matching", ways=3, shots=1, queries=2),
                          "algo='matching' but the learner is 'protonet'")):
        with pytest.raises(ValueError, match=message):
            Trainer(learner, cfg, episodes, None, tmp_path, progress=False)


def test_evaluate_refuses_empty_samplers_and_bad_batches():
    splits = build_splits(RunConfig(data="digits"))
    learner = ProtoNet(Conv4(hidden=4, out_channels=4))
    with pytest.raises(ValueError, match="no episodes to evaluate"):
        evaluate(learner, fixed_episodes(splits.val, 3, 1, 2, n=0))
    with pytest.raises(ValueError, match="batch must be a positive int or None"):
        evaluate(learner, fixed_episodes(splits.val, 3, 1, 2, n=2), batch=0)


class _DivergingRegressor(torch.nn.Module):
    """Predicts 0 for every query point, and ``value`` on the tasks in ``bad``."""
    loss_name = "mse"

    def __init__(self, bad=(), value=math.nan):
        super().__init__()
        self.bad, self.value = list(bad), value

    def forward(self, support_x, support_y, query_x, ways):
        out = torch.zeros(query_x.shape[:-1] + (1,))
        out[self.bad] = self.value
        return out


@pytest.mark.parametrize("bad,value", [((), 0.0), ((3,), math.nan), ((0, 7, 8), math.inf)])
def test_evaluate_counts_diverged_tasks(bad, value):
    from pymeta.cli import _score
    from pymeta.data import fixed_sinusoid_tasks
    tasks = fixed_sinusoid_tasks(10, shots=5, queries=20)
    res = evaluate(_DivergingRegressor(bad, value), tasks)
    assert res["diverged"] == len(bad) and res["episodes"] == 10
    text = _score({**res, "shots": 5, "queries": 20})
    if bad:
        assert not math.isfinite(res["mse"])
        assert text.endswith(f" ({len(bad)} of 10 tasks diverged)")
    else:  # predicting 0: the MSE is the mean square of the query targets
        assert res["mse"] == pytest.approx(float(tasks[0].query_y.double().square().mean()))
        assert "diverged" not in text


@pytest.mark.parametrize("field,value,message", [
    ("steps", 2.5, "steps must be an int, got 2.5"),
    ("ways", True, "ways must be an int, got True"),
    ("image_size", "28", "image_size must be an int or None"),
    ("rotations", "False", "rotations must be True or False, got 'False'"),
    ("learner_kwargs", "x", "learner_kwargs must be a dict"),
    ("test_settings", [[5]], "test_settings must be \\[ways, shots\\] pairs"),
    ("device", "gpu", "device must be a torch device such as cpu, cuda or cuda:1, got 'gpu'"),
])
def test_run_config_refuses_values_of_the_wrong_type(field, value, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**{field: value}).validate()


def test_trainer_in_process_learns_and_validates(tmp_path):
    splits = build_splits(RunConfig(data="digits"))
    torch.manual_seed(0)
    learner = ProtoNet(Conv4(hidden=16, out_channels=16))
    cfg = RunConfig(ways=5, shots=1, queries=5, steps=120, val_every=60, val_episodes=40,
                    lr=3e-3)
    trainer = Trainer(learner, cfg, EpisodeSampler(splits.train, 5, 1, 5, seed=0),
                      fixed_episodes(splits.val, 5, 1, 5, n=40), tmp_path, progress=False)
    test = fixed_episodes(splits.test, 5, 1, 5, n=100)
    before = evaluate(learner, test)["acc"]
    fit = trainer.fit()
    after = evaluate(learner, test)["acc"]
    # chance is 0.2; untrained features already give 0.46-0.49 on the unseen digits, and 120
    # steps add 0.03-0.09 (seeds 0-5; float rounding alone moves a seed's figure by a few
    # points). Longer runs overfit digits 0-4.
    assert fit["steps"] == 120 and after > before + 0.02 and after > 0.5


def test_validation_before_the_first_log_without_progress_bar(tmp_path):
    """A disabled bar has no postfix: validating before any training log must not crash.
    Each validation logs the training window up to its own step, for its report line."""
    splits = build_splits(RunConfig(data="digits"))
    cfg = RunConfig(ways=3, shots=1, queries=2, steps=3, val_every=2, log_every=10,
                    val_episodes=2)
    trainer = Trainer(ProtoNet(Conv4(hidden=4, out_channels=4)), cfg,
                      EpisodeSampler(splits.train, 3, 1, 2, seed=0),
                      fixed_episodes(splits.val, 3, 1, 2, n=2), tmp_path, progress=False)
    assert trainer.fit()["steps"] == 3
    assert [r["step"] for r in logged_rows(tmp_path, "val")] == [2, 3]
    assert [r["step"] for r in logged_rows(tmp_path, "train")] == [2, 3]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training_steps(amp, tmp_path):
    splits = build_splits(RunConfig(data="digits"))
    torch.manual_seed(0)
    learner = ProtoNet(Conv4(hidden=8, out_channels=8))
    before = [p.detach().clone() for p in learner.parameters()]
    # fp16 uses a GradScaler, which skips the first steps while it finds its scale.
    cfg = RunConfig(ways=3, shots=1, queries=2, steps=16, val_every=16, val_episodes=4, amp=amp)
    trainer = Trainer(learner, cfg, EpisodeSampler(splits.train, 3, 1, 2, seed=0),
                      fixed_episodes(splits.val, 3, 1, 2, n=4), tmp_path, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    # the rate follows the step count, skipped steps included: torch's warning is moot
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    losses = [r["loss"] for r in trainer.log.rows if r["split"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    assert all(p.dtype == torch.float32 for p in learner.parameters())


def _strict_json(text):
    def refuse(token):
        raise ValueError(f"invalid JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_logs_report_the_rate_each_step_trained_at_and_write_strict_json(tmp_path):
    """The logged lr is the one the logged step used (not the scheduler's next); an undefined
    CI (one validation episode) is null in the JSON files, not the invalid token NaN."""
    splits = build_splits(RunConfig(data="digits"))
    cfg = RunConfig(ways=3, shots=1, queries=2, steps=3, val_every=3, log_every=1,
                    val_episodes=1, lr_step=1, lr_gamma=0.5, lr=0.1)
    Trainer(ProtoNet(Conv4(hidden=4, out_channels=4)), cfg,
            EpisodeSampler(splits.train, 3, 1, 2, seed=0),
            fixed_episodes(splits.val, 3, 1, 2, n=1), tmp_path, progress=False).fit()
    rows = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["lr"]) for r in rows] == [
        (1, "train", 0.1), (2, "train", 0.05), (3, "train", 0.025), (3, "val", 0.025)]
    assert rows[-1]["ci95"] is None


def test_progress_bar_shows_the_latest_validation_only(tmp_path, capsys):
    splits = build_splits(RunConfig(data="digits"))
    cfg = RunConfig(ways=3, shots=1, queries=2, steps=3, val_every=1, log_every=100,
                    val_episodes=2)
    Trainer(ProtoNet(Conv4(hidden=4, out_channels=4)), cfg,
            EpisodeSampler(splits.train, 3, 1, 2, seed=0),
            fixed_episodes(splits.val, 3, 1, 2, n=2), tmp_path, progress=True).fit()
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.count("val acc=") == 1 and "[, " not in last and ", ," not in last, last


def test_a_directory_holding_a_run_is_not_trained_into_afresh(tmp_path):
    """A second fresh run would overwrite the first's metrics, or test its best.pt as its
    own; a Trainer that trained without a checkpoint cannot start over either."""
    trainer = _tiny_trainer(tmp_path / "run", steps=2)
    trainer.fit()
    rows = logged_rows(tmp_path / "run")
    for again in (trainer, _tiny_trainer(tmp_path / "run", steps=2)):
        with pytest.raises(ValueError, match="already holds a run .*pass resume=True"):
            again.fit()
    assert logged_rows(tmp_path / "run") == rows
    assert trainer.fit(resume=True)["steps"] == 2  # a finished run: nothing more to train
    cut = _tiny_trainer(tmp_path / "cut")  # interrupted before its first checkpoint (step 2)
    interrupt_fit_after(cut, 1)
    for resume in (False, True):
        with pytest.raises(ValueError, match="1 steps were trained, but .* holds no checkpoint"):
            cut.fit(resume=resume)


def test_evaluating_on_another_dataset_is_a_cross_domain_test(tmp_path):
    """The class check guards a run's own dataset against changed splits; another dataset
    shares no class with it."""
    from pymeta.engine.setup import evaluate_split
    learner = ProtoNet(Conv4(hidden=4, out_channels=4))
    learner.preprocessing = {"dataset": "omniglot", "split_classes": {"test": "x"}}
    cfg = RunConfig(data="digits", ways=3, shots=1, queries=2, test_episodes=2)
    res = evaluate_split(learner, cfg, build_splits(cfg))
    assert 0 <= res["acc"] <= 1 and res["ways"] == 3
    learner.preprocessing["dataset"] = "digits"  # the same dataset, other classes: refused
    with pytest.raises(ValueError, match="test classes differ from the run's"):
        evaluate_split(learner, cfg, build_splits(cfg))


def test_resume_accepts_changes_that_do_not_touch_training(tmp_path):
    """The data may move (root) and the final test may change; training must not."""
    ref = _tiny_trainer(tmp_path / "ref")
    ref.fit()
    interrupt_fit_after(_tiny_trainer(tmp_path / "cut"), 3)
    resumed = _tiny_trainer(tmp_path / "cut")
    resumed.cfg.root, resumed.cfg.test_episodes, resumed.cfg.eval_steps = "/moved", 7, [0]
    resumed.fit(resume=True)
    for a, b in zip(ref.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    changed = _tiny_trainer(tmp_path / "cut")
    changed.cfg.lr = 0.5
    with pytest.raises(ValueError, match=r"run config differs in \['lr'\]"):
        changed.fit(resume=True)


def test_train_refuses_to_overwrite_a_run_that_holds_only_best_pt(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes((ref / "best.pt").read_bytes())
    res = run_cli(["train", *TINY, "--out", str(out)], cwd=tmp_path)
    assert res.returncode == 2 and "already holds a run (best.pt)" in res.stderr
    res = run_cli(["train", *TINY, "--steps", "2", "--val-every", "2", "--out",
                   str(tmp_path / "new"), "--resume"], cwd=tmp_path)
    assert res.returncode == 0 and "holds no checkpoint yet; starting a new run" in res.stderr


def test_training_keeps_a_frozen_batchnorm_frozen(tmp_path):
    """Neither the training steps nor the validations switch a frozen BatchNorm back on."""
    trainer = _tiny_trainer(tmp_path)
    frozen = trainer.learner.backbone.blocks[0][1]
    frozen.eval()
    stats = frozen.running_mean.clone()
    trainer.fit()
    assert not frozen.training and torch.equal(frozen.running_mean, stats)
    assert trainer.learner.training


def test_resume_needs_only_the_run_directory(reference_run, tmp_path):
    """``train --resume --out DIR`` takes the run's own options; options given again must
    agree with them."""
    ref, _ = reference_run
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "best.pt"):
        (out / name).write_bytes((ref / name).read_bytes())
    res = run_cli(["train", "--out", str(out), "--resume", "--no-progress", "--threads", "1"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    done = json.loads((out / "results.json").read_text())
    assert done["tests"] == json.loads((ref / "results.json").read_text())["tests"]
    res = run_cli(["train", "--out", str(out), "--resume", "--shots", "1", "--no-progress"],
                  cwd=tmp_path)
    assert res.returncode == 2 and "run config differs in ['shots']" in res.stderr


def _one_step_trainer(tmp_path, amp=None, grad_clip=1e-3, weight_decay=0.0):
    splits = build_splits(RunConfig(data="digits"))
    torch.manual_seed(0)
    learner = ProtoNet(Conv4(hidden=8, out_channels=8))
    cfg = RunConfig(ways=3, shots=1, queries=2, steps=1, optimizer="sgd", lr=0.5,
                    grad_clip=grad_clip, weight_decay=weight_decay, amp=amp)
    return Trainer(learner, cfg, EpisodeSampler(splits.train, 3, 1, 2, seed=0), None, tmp_path,
                   progress=False)


@pytest.mark.parametrize("progress", [True, False])
def test_validation_lines_go_to_log_only_without_a_progress_bar(progress, tmp_path):
    splits = build_splits(RunConfig(data="digits"))
    cfg = RunConfig(ways=3, shots=1, queries=2, steps=2, val_every=2, val_episodes=2)
    lines = []
    Trainer(ProtoNet(Conv4(hidden=8, out_channels=8)), cfg,
            EpisodeSampler(splits.train, 3, 1, 2, seed=0), fixed_episodes(splits.val, 3, 1, 2, n=2),
            tmp_path, progress=progress, log=lines.append).fit()
    assert len(lines) == (0 if progress else 1)
    assert progress or lines[0].startswith("step 2/2: ") and "val acc=" in lines[0]


def test_grad_clip_scales_the_meta_gradient_to_its_norm(tmp_path):
    trainer = _one_step_trainer(tmp_path)
    learner, ep = trainer.learner, trainer.train_episodes[0]
    before = [p.detach().clone() for p in learner.parameters()]
    loss, _ = learner.loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.ways)
    grads = torch.autograd.grad(loss, list(learner.parameters()))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm > 1e-2  # so the clip (1e-3) acts
    trainer.train_step(ep)
    for b, p, g in zip(before, learner.parameters(), grads):  # SGD: p - lr * g * clip / |g|
        torch.testing.assert_close(p.detach(), b - 0.5 * g * (1e-3 / norm), rtol=1e-4, atol=1e-7)


def test_grad_clip_applies_to_the_unscaled_fp16_gradient(tmp_path):
    trainer = _one_step_trainer(tmp_path, amp="fp16")
    for i in range(10):  # the GradScaler skips steps whose scaled gradient overflows
        before = torch.cat([p.detach().flatten().clone() for p in trainer.learner.parameters()])
        trainer.train_step(trainer.train_episodes[i])
        moved = (torch.cat([p.detach().flatten() for p in trainer.learner.parameters()])
                 - before).norm()
        if moved > 0:
            break
    assert abs(float(moved) / (0.5 * 1e-3) - 1) < 1e-2  # lr * clip, not lr * clip / scale


def test_weight_decay_adds_its_l2_gradient(tmp_path):
    trainer = _one_step_trainer(tmp_path, grad_clip=None, weight_decay=0.1)
    learner, ep = trainer.learner, trainer.train_episodes[0]
    before = [p.detach().clone() for p in learner.parameters()]
    loss, _ = learner.loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.ways)
    grads = torch.autograd.grad(loss, list(learner.parameters()))
    trainer.train_step(ep)
    for b, p, g in zip(before, learner.parameters(), grads):  # SGD: p - lr * (g + wd * p)
        torch.testing.assert_close(p.detach(), b - 0.5 * (g + 0.1 * b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_weight_decay_must_be_finite_and_not_negative(value):
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        RunConfig(weight_decay=value).validate()


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_grad_clip_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match="grad_clip must be a positive finite number or None"):
        RunConfig(grad_clip=value).validate()
