"""Gradient-based learners in the engine and CLI: classifier head, test-time inner steps,
sinusoid regression (MSE, lower is better) and bit-for-bit resume."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import pymeta
from pymeta.engine import RunConfig, Trainer, build_learner, build_splits, load_checkpoint


def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "pymeta", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


SINE = ["train", "--algo", "maml", "--data", "sinusoid", "--steps", "800", "--val-every", "400",
        "--val-episodes", "100", "--test-episodes", "300", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sine") / "run"
    res = run_cli([*SINE, "--out", str(out)], cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return out, res.stdout


def test_sinusoid_learns_and_reports_mse_per_step_count(sine_run):
    out, stdout = sine_run
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "mse" and res["config"]["backbone"] == "mlp"
    mse = {t["steps"]: t["mse"] for t in res["tests"]}
    assert sorted(mse) == [1, 5, 10] and all(t["shots"] == 5 and t["queries"] == 100
                                            for t in res["tests"])
    # An untrained net scores about E[A^2]/2 = 4.2; plain pretraining about 2.2 (Finn et al.).
    assert mse[10] < mse[1] and mse[10] < 2.0, mse
    assert "MSE" in stdout and "10 inner steps" in stdout
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["mse"] for r in rows if r["split"] == "val"]
    assert res["best_mse"] == min(val)


def test_eval_reproduces_the_test_scores(sine_run, tmp_path):
    out, _ = sine_run
    res = run_cli(["eval", "--checkpoint", str(out / "best.pt"), "--steps", "5", "--episodes",
                   "300", "--no-progress"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    want = [t for t in json.loads((out / "results.json").read_text())["tests"]
            if t["steps"] == 5][0]
    assert f"MSE {want['mse']:.3f} ± {want['ci95']:.3f}" in res.stdout


def test_classifier_head_sized_for_every_tested_way_count():
    cfg = RunConfig(algo="anil", data="digits", ways=3, eval_ways=4, test_settings=[[5, 1]])
    learner = build_learner(cfg, (1, 28, 28))
    model = learner.model
    assert list(dict(model.named_children())) == ["body", "head"]
    assert model.head.out_features == 5 and learner.head == ["head"]
    assert not model.head.weight.any() and not model.head.bias.any()   # zero-initialised
    assert learner._split() == 1      # ANIL runs the body once per meta-batch


@pytest.mark.parametrize("algo,message", [
    ("protonet", "regression task: it needs a gradient-based learner"),
])
def test_regression_needs_a_gradient_learner(algo, message, tmp_path):
    res = run_cli(["train", "--algo", algo, "--data", "sinusoid", "--steps", "1"], cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr


def test_eval_steps_only_for_gradient_learners(tmp_path):
    res = run_cli(["train", "--algo", "protonet", "--eval-steps", "3", "--steps", "1"],
                  cwd=tmp_path)
    assert res.returncode == 2 and "only apply to gradient-based learners" in res.stderr


TINY = dict(data="digits", ways=3, shots=1, queries=2, meta_batch=2, steps=6, val_every=3,
            val_episodes=4, checkpoint_every=2, log_every=1, seed=1,
            learner_kwargs={"steps": 2, "test_steps": 3})


class _Interrupt(Exception):
    pass


class _Dying:
    """A train sampler that dies before handing out episode ``at``."""

    def __init__(self, sampler, at):
        self.sampler, self.at = sampler, at

    def __len__(self):
        return len(self.sampler)

    def __getitem__(self, i):
        if i == self.at:
            raise _Interrupt
        return self.sampler[i]


def _trainer(cfg, out, train=None):
    data = build_splits(cfg)
    learner = build_learner(cfg, data.input_shape)
    return Trainer(learner, cfg, train or data.train_sampler(cfg),
                   data.eval_sampler(cfg, "val", cfg.val_episodes), out, data.preprocessing,
                   progress=False)


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_interrupted_gradient_run_resumes_bit_for_bit(algo, tmp_path):
    torch.set_num_threads(1)
    cfg = RunConfig(algo=algo, **TINY)
    _trainer(cfg, tmp_path / "ref").fit()
    cut = _trainer(cfg, tmp_path / "cut")
    cut.train_episodes = _Dying(cut.train_episodes, 5)
    with pytest.raises(_Interrupt):
        cut.fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4
    _trainer(cfg, tmp_path / "cut").fit(resume=True)
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("ref", "cut"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["log"] == [{**r, "elapsed_s": a["log"][i]["elapsed_s"],
                         "tasks_per_s": a["log"][i]["tasks_per_s"]}
                        for i, r in enumerate(b["log"])]


def test_loaded_gradient_learner_keeps_its_options(tmp_path):
    cfg = RunConfig(algo="maml", **TINY)
    _trainer(cfg, tmp_path).fit()
    learner = pymeta.load(tmp_path / "best.pt")
    assert (learner.steps, learner.test_steps) == (2, 3)
    assert isinstance(learner.model.head, nn.Linear) and learner.model.head.out_features == 3


def test_cli_learner_lists_match_the_registry():
    from pymeta.cli import ALGOS, GRADIENT_ALGOS
    from pymeta.learners import LEARNERS, GradientLearner
    assert sorted(ALGOS) == sorted(LEARNERS)
    assert sorted(GRADIENT_ALGOS) == sorted(a for a, c in LEARNERS.items()
                                            if issubclass(c, GradientLearner))


def test_cli_bench_ops_match_the_benchmark():
    from pymeta.benchmark import OPS
    from pymeta.cli import BENCH_OPS
    assert list(BENCH_OPS) == list(OPS)


def test_omniglot_preset_gives_gradient_learners_5_way_episodes_and_maml_lslr():
    from pymeta.cli import _config_from_args, build_parser
    parse = lambda *a: _config_from_args(build_parser().parse_args(["train", *a]))  # noqa: E731
    maml = parse("--preset", "omniglot", "--algo", "maml", "--learner-opt", "inner_lr=0.1")
    assert (maml.ways, maml.eval_ways, maml.test_grid()) == (5, 5, [(5, 1), (20, 1)])
    assert maml.learner_kwargs == {"lslr": True, "inner_lr": 0.1} and maml.max_ways == 20
    assert (maml.schedule, maml.steps) == ("cosine", 6000)
    anil = parse("--preset", "omniglot", "--algo", "anil", "--learner-opt", "inner_lr=0.1")
    assert (anil.learner_kwargs, anil.schedule, anil.steps) == ({"inner_lr": 0.1}, "step", 4500)
    assert parse("--preset", "omniglot", "--algo", "maml", "--steps", "10").steps == 10
    assert parse("--preset", "omniglot", "--algo", "maml", "--schedule", "step").schedule == "step"
    assert parse("--preset", "omniglot", "--algo", "protonet").ways == 60
    sine = parse("--algo", "reptile", "--data", "sinusoid", "--steps", "5")
    assert (sine.backbone, sine.shots, sine.eval_steps, sine.steps) == ("mlp", 10, [1, 5, 10], 5)
    sine = parse("--algo", "maml", "--data", "sinusoid", "--learner-opt", "steps=2")
    assert sine.learner_kwargs == {"inner_lr": 0.01, "steps": 2, "test_steps": 10}  # merged


def test_better_follows_the_metric_direction_and_never_takes_nan_or_inf():
    from pymeta.engine.evaluate import better
    assert better("acc", 0.5, None) and better("acc", 0.6, 0.5) and not better("acc", 0.4, 0.5)
    assert better("mse", 0.3, 0.4) and not better("mse", 0.5, 0.4)
    assert not better("mse", float("nan"), None) and not better("acc", float("nan"), 0.1)
    assert not better("mse", float("inf"), 0.4) and better("mse", 0.4, float("inf"))
    assert not better("mse", float("inf"), None)  # a first validation that diverged
