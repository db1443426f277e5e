"""Data-parallel training: two gloo processes on the CPU take the same steps as one process
on the whole meta-batch (parameters, BatchNorm statistics, logged metrics, resume)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import interrupt_fit_after
from pymeta.engine import RunConfig, Trainer, build_learner, build_splits
from pymeta.engine.distributed import sum_gradients, task_share
from pymeta.engine.evaluate import episode_scores

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

# meta_batch 3: two processes take 1 and 2 tasks, so the shares must be weighted
SETTINGS = dict(data="digits", ways=2, shots=1, queries=2, meta_batch=3, steps=4, val_every=2,
                val_episodes=5, checkpoint_every=1, log_every=1, seed=3, optimizer="sgd", lr=0.1)
# SGD, not Adam: Adam moves a weight whose gradient is ~0 by ~lr * sign(gradient), so the
# order of float sums alone would decide some updates


def make_trainer(algo: str, out) -> Trainer:
    # Metric learners normalise each process's share of the tasks, as DDP without
    # SyncBatchNorm does, so they match one process exactly only without BatchNorm
    gradient = algo in ("maml", "reptile")
    cfg = RunConfig(algo=algo, backbone="conv4" if gradient else "mlp",
                    backbone_kwargs={} if gradient else {"out_features": 16}, **SETTINGS)
    data = build_splits(cfg)
    learner = build_learner(cfg, data.input_shape)
    return Trainer(learner, cfg, data.train_sampler(cfg),
                   data.eval_sampler(cfg, "val", cfg.val_episodes), out, data.preprocessing,
                   progress=False)


def _worker(rank: int, world: int, init: str, out: str, algo: str, interrupt: int | None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    # the others get run directories of their own, as on nodes without a shared disk
    run_dir = out if rank == 0 else f"{out}-rank{rank}"
    try:
        trainer = make_trainer(algo, run_dir)
        # each process gathers and warps only its tasks' images
        assert trainer._own_episodes()._share == task_share(3, rank, world)
        if rank:  # a model of its own: fit starts every process from process 0's
            with torch.no_grad():
                for p in trainer.learner.parameters():
                    p.add_(1.0)
        if interrupt is not None:
            interrupt_fit_after(trainer, interrupt)
            trainer = make_trainer(algo, run_dir)
        result = trainer.fit(resume=interrupt is not None)
        # the 5 validation episodes one per batch: 3 for process 0, 2 for process 1
        scores = [episode_scores(trainer.learner, trainer.val_episodes, batch=1, shard=shard)
                  for shard in (True, False)]
        torch.save({"state": trainer.learner.state_dict(), "result": result, "scores": scores},
                   f"{out}/rank{rank}.pt")
        dist.barrier()  # as pymeta's process_group() leaves: see there
    finally:
        dist.destroy_process_group()


def train_in_processes(tmp_path, algo: str, world: int = 2, interrupt: int | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{algo}-{world}"
    mp.spawn(_worker, args=(world, str(tmp_path / f"init-{algo}"), str(out), algo, interrupt),
             nprocs=world)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def logged(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"], r["acc"]) for r in rows]


def assert_same_state(got: dict, want: dict):
    """Equal up to float rounding: max |difference| <= 1e-4 max |reference| + 1e-6 per tensor
    (float32 sums in another order; a wrongly weighted share is off by percents). The
    absolute 1e-6 is for tensors that stay near 0, such as BatchNorm biases of ~1e-3, which
    the rounding of the O(1) values behind each update moves by ~4e-8 (Clang's build)."""
    assert got.keys() == want.keys()
    for k, w in want.items():
        if not w.is_floating_point():
            assert torch.equal(got[k], w), k
        elif w.numel():
            diff, scale = float((got[k] - w).abs().max()), float(w.abs().max())
            assert diff <= 1e-4 * scale + 1e-6, f"{k}: max |difference| {diff:.2e}, " \
                                                f"max |reference| {scale:.2e}"


@pytest.mark.parametrize("algo", ["maml", "reptile", "protonet"])
def test_two_processes_take_the_single_process_steps(tmp_path, algo):
    torch.set_num_threads(1)
    single = make_trainer(algo, tmp_path / "single")
    single.fit()
    out, ranks = train_in_processes(tmp_path, algo)
    for r in ranks:  # BatchNorm's running statistics included
        assert_same_state(r["state"], single.learner.state_dict())
    assert ranks[0]["result"] == ranks[1]["result"]
    for r in ranks:  # shared evaluation: the scores of one process, in episode order
        assert torch.equal(r["scores"][0], r["scores"][1])
    assert not list(tmp_path.glob(f"{algo}-2-rank1/*"))  # process 0 alone writes
    got, want = logged(out), logged(tmp_path / "single")
    assert [r[:2] for r in got] == [r[:2] for r in want]
    # The rounding above moves a loss near 0 (0.039) by ~6e-6, and may flip a query at a
    # near-tie: 2 of 150 validation queries in Clang's build
    torch.testing.assert_close([r[2] for r in got], [r[2] for r in want], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close([r[3] for r in got], [r[3] for r in want], rtol=0, atol=0.02)


@pytest.mark.parametrize("algo", ["maml", "siamese"])  # Siamese draws its pairs at random
def test_interrupted_data_parallel_run_resumes(tmp_path, algo):
    """Each process resumes its own random-number stream: the run continues bit for bit."""
    out, straight = train_in_processes(tmp_path, algo)
    resumed_out, resumed = train_in_processes(tmp_path / "again", algo, interrupt=3)
    for r in range(2):
        assert_same_state(resumed[r]["state"], straight[r]["state"])
    assert logged(resumed_out) == logged(out)


def _sum_mixed_dtypes(rank: int, world: int, init: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        params = [torch.zeros(3, dtype=d, requires_grad=True)
                  for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16) * 3]
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, float(i + 10 * rank))
        sum_gradients(params, 0.5)
        torch.save([p.grad for p in params], f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gradients_of_several_dtypes_are_summed_in_one_order(tmp_path):
    """Processes issue one all-reduce per dtype, in the same order in every process."""
    mp.spawn(_sum_mixed_dtypes, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for r in range(2):
        grads = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for i, g in enumerate(grads):
            assert g.dtype == (torch.float64, torch.float32, torch.float16, torch.bfloat16)[i % 4]
            assert torch.equal(g.double(), torch.full((3,), 0.5 * (2 * i + 10.0)))


def test_task_shares_cover_the_meta_batch():
    for tasks, world in [(3, 2), (32, 3), (5, 5), (8, 1)]:
        shares = [task_share(tasks, r, world) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == tasks
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1
    with pytest.raises(ValueError, match="meta-batch of 2 tasks cannot be shared by 3"):
        task_share(2, 0, 3)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_cli(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "pymeta", "train",
         "--data", "digits", "--ways", "2", "--shots", "1", "--queries", "2",
         "--meta-batch", "2", "--steps", "2", "--val-every", "2", "--val-episodes", "2",
         "--test-episodes", "2", "--no-progress", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("test 2-way 1-shot") == 1  # process 0 alone tests and reports
    assert res.stdout.count("step 2/2: ") == 1  # and logs the validation
    assert json.loads((out / "results.json").read_text())["steps"] == 2


def test_a_process_takes_its_share_of_whole_or_already_shared_episodes(tmp_path):
    trainer = make_trainer("protonet", tmp_path)
    trainer.world, trainer.my_tasks = 2, task_share(3, 1, 2)  # process 1 of 2: tasks 1, 2
    whole = trainer.train_episodes[0]
    mine, weight = trainer._own_tasks(whole)
    assert weight == 2 / 3 and torch.equal(mine.support_x, whole.support_x[1:3])
    shared = trainer._own_episodes()
    assert shared._share == (1, 3) and torch.equal(shared[0].query_x, whole.query_x[1:3])
    again, weight = trainer._own_tasks(shared[0])
    assert weight == 2 / 3 and torch.equal(again.query_x, whole.query_x[1:3])
    with pytest.raises(ValueError, match=r"episode of 1 tasks is neither the meta-batch \(3\) "
                                         r"nor this process's share of it \(2\)"):
        trainer._own_tasks(whole.task_range(0, 1))
