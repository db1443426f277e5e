"""The meta-training loop: episodes in, checkpoints, metrics and curves out; resumable."""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import __version__
from .._atomic import directory_lock
from .._warnings import warn_caller
from ..data.episodes import Episode, EpisodeSampler, episode_loader
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .distributed import (all_gather_objects, all_sum, broadcast_module, buffer_snapshot,
                          from_process_0, rank_and_world, sum_buffer_changes, sum_gradients,
                          task_share)
from .evaluate import autocast, better, divergence_note, evaluate, metric_name, task_scores
from .metrics import MetricsLog


def make_optimizer(learner: torch.nn.Module, cfg: RunConfig):
    if cfg.optimizer == "sgd":  # Reptile's outer step: theta += lr * (adapted - theta)
        opt = torch.optim.SGD(learner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(learner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step, cfg.lr_gamma)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched


# Settings a resumed run may change: episodes are seeded by (seed, index) whatever the
# number of loader workers; a run may move to another device, its data to another root;
# checkpoint frequency and the final test's episodes and inner steps do not touch training.
_FREE_ON_RESUME = ("workers", "device", "root", "checkpoint_every", "test_episodes",
                   "eval_steps")


def held_checkpoints(out_dir: str | Path) -> list[Path]:
    """The training checkpoints ``out_dir`` holds, in the order a resume takes them."""
    return [p for p in (Path(out_dir) / "last.pt", Path(out_dir) / "best.pt") if p.exists()]


def check_same_classes(recorded: dict, current: dict, splits, what: str) -> None:
    """Refuses data whose class names in ``splits`` differ from a run's ``recorded``
    preprocessing (their digests; runs from before the record pass): a folder that gained or
    lost a class splits anew, and the test split would then hold training classes."""
    old, new = recorded.get("split_classes"), current.get("split_classes")
    changed = [s for s in splits if old and new and old.get(s) != new.get(s)]
    if changed:
        raise ValueError(f"{what}: the data's {'/'.join(changed)} classes differ from the run's: "
                         "the dataset changed since the run was trained (classes added, removed "
                         "or renamed), so its splits no longer match; use the run's data")


class Trainer:
    """Meta-trains a learner on episodes, validating every ``val_every`` steps.

    Writes to ``out_dir``: ``last.pt`` (every validation, and every ``checkpoint_every``
    steps), ``best.pt`` (best validation accuracy, or lowest MSE), ``metrics.csv``,
    ``metrics.jsonl`` and ``curves.png``. Step ``s`` trains on episode ``s`` of the sampler,
    so a run resumed from ``last.pt`` at the same thread count continues bit for bit.

    Data-parallel: inside a ``torch.distributed`` process group (for example under
    ``torchrun``), each process adapts its share of every meta-batch's tasks and the
    meta-gradients are summed, which equals one process's step on the whole meta-batch.
    They share the validation episodes too; process 0 writes ``out_dir`` and hands its
    checkpoint to the others on resume.

    ``progress`` shows a progress bar; without it, ``log`` (if given) is called by process 0
    with one line per validation (step, training and validation scores).

    Example:
        >>> import tempfile, torch
        >>> from pymeta.data import ImageClasses, EpisodeSampler, fixed_episodes
        >>> from pymeta.engine import RunConfig, Trainer
        >>> from pymeta.learners import ProtoNet
        >>> from pymeta.nn import Conv4
        >>> store = ImageClasses(torch.randint(0, 255, (40, 1, 28, 28), dtype=torch.uint8),
        ...                      torch.arange(0, 41, 10), ["a", "b", "c", "d"])
        >>> cfg = RunConfig(ways=2, shots=1, queries=2, steps=4, val_every=2, val_episodes=4)
        >>> t = Trainer(ProtoNet(Conv4()), cfg, EpisodeSampler(store, 2, 1, 2),
        ...             fixed_episodes(store, 2, 1, 2, n=4), tempfile.mkdtemp(), progress=False)
        >>> sorted(t.fit())
        ['best_acc', 'best_step', 'steps', 'train_s']
    """

    def __init__(self, learner: torch.nn.Module, config: RunConfig, train: EpisodeSampler,
                 val: EpisodeSampler | None, out_dir: str | Path, preprocessing: dict | None = None,
                 progress: bool = True, log: Callable[[str], object] | None = None):
        self.cfg = config.validate()
        _check_matches_config(config, learner, train)
        self.rank, self.world = rank_and_world()
        # this process's tasks of every meta-batch (which must have enough for every process)
        self.my_tasks = task_share(config.meta_batch, self.rank, self.world)
        self.lead = self.rank == 0  # the one process that logs and writes
        self._rng_processes = None
        self.device = torch.device(config.device)
        self.learner = learner.to(self.device)
        self.train_episodes, self.val_episodes = train, val
        self.out_dir = Path(out_dir)
        self.preprocessing = dict(preprocessing or {})
        self.progress = progress and self.lead
        self.report = log if self.lead and not progress else None  # the bar shows the same
        self.opt, self.sched = make_optimizer(learner, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.metric = metric_name(learner)  # "acc" (higher is better) or "mse" (lower)
        self.step = 0
        self.trained_lr = config.lr
        self.best = {self.metric: None, "step": -1}
        self._window = _empty_window()
        self.elapsed = 0.0
        self.log = None

    # -- state -----------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng_state(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def state_dict(self) -> dict:
        rng = self._rng_state()
        if self.world > 1:  # each process's (gathered at the step), process 0's first
            rng = {**rng, "processes": self._rng_processes}
        return {"config": self.cfg.to_dict(), "preprocessing": self.preprocessing,
                "step": self.step, "model": self.learner.state_dict(),
                "learner_config": learner_config(self.learner),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "best": dict(self.best),
                "window": {**self._window, "loss": float(self._window["loss"]),
                           "score": float(self._window["score"])}, "elapsed": self.elapsed,
                "log": list(self.log.rows) if self.log else [],
                "versions": {"pymeta": __version__, "torch": str(torch.__version__)}}

    def load_state_dict(self, state: dict) -> None:
        cfg = self.cfg.to_dict()
        diff = sorted(k for k, v in state["config"].items()
                      if cfg.get(k) != v and k not in _FREE_ON_RESUME)
        if diff:
            raise ValueError(f"cannot resume: the checkpoint's run config differs in {diff}")
        check_same_classes(state.get("preprocessing", {}), self.preprocessing,
                           ("train", "val", "test"), "cannot resume")
        self.learner.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        per_process = rng.get("processes") or []
        if len(per_process) == self.world:
            self._set_rng_state(per_process[self.rank])
        else:  # another number of processes: process 0's stream, the others' of their own
            self._set_rng_state(rng)
            self._seed_own_stream(state["step"])
        self.step, self.best = state["step"], dict(state["best"])
        self._window, self.elapsed = dict(state["window"]), state["elapsed"]
        self.log = MetricsLog(self.out_dir, state["log"]) if self.lead else None

    def _seed_own_stream(self, step: int) -> None:
        """Processes other than 0 draw random numbers of their own (pairs, dropout)."""
        if self.rank:
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.rank + step)

    def _checkpoint_to_resume(self, resume: bool) -> dict | None:
        held = held_checkpoints(self.out_dir)
        if held and not resume:  # a fresh run would overwrite it, or test its best.pt
            raise ValueError(f"{self.out_dir} already holds a run ({held[0].name}); pass "
                             f"resume=True to continue it, or choose another directory")
        if not held:  # a fresh run
            return None
        # last.pt, else best.pt, a whole training state too (a run killed between the two
        # writes, or last.pt deleted), rather than a fresh start that would overwrite it
        if held[0].name == "best.pt":
            warn_caller(f"{self.out_dir / 'last.pt'} is missing: resuming from {held[0]}, "
                        "whose step may be earlier (the steps after it are trained again)")
        # to the CPU: RNG states must stay there, the rest moves into device tensors
        return load_checkpoint(held[0])

    def save(self, name: str) -> Path:
        path = self.out_dir / name
        save_checkpoint(path, self.state_dict())
        return path

    # -- loop ------------------------------------------------------------------------------
    def train_step(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """One outer step on one meta-batch (data-parallel: the whole, or this process's share
        as :meth:`EpisodeSampler.share` assembles it); returns (loss, query accuracy or MSE)
        as 0-d tensors, so that the loop does not wait for the device every step."""
        if not self.learner.training:  # not train() every step: it would un-freeze a
            self.learner.train()        # submodule the user keeps in eval mode
        ep, weight = self._own_tasks(ep)
        ep = ep.to(self.device, non_blocking=True)
        buffers = buffer_snapshot(self.learner) if self.world > 1 else []
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.cfg.amp):
            loss, logits = self.learner.loss(ep.support_x, ep.support_y, ep.query_x,
                                             ep.query_y, ep.ways)
        if getattr(self.learner, "sets_own_grads", False):  # Reptile: .grad is set, unscaled
            self._sum_over_processes(weight, buffers)
            self._clip_gradients(scaled=False)
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self._sum_over_processes(weight, buffers)
            self._clip_gradients(scaled=True)
            self.scaler.step(self.opt)
            self.scaler.update()
        self.trained_lr = self.opt.param_groups[0]["lr"]  # the logs report this, not the next
        self._schedule_step()
        stats = torch.stack([loss.detach().double(),
                             task_scores(logits.detach(), ep.query_y, self.metric).mean().double()])
        if self.world > 1:
            stats = all_sum(stats * weight)
        return stats[0], stats[1]

    def _schedule_step(self) -> None:
        """The rate follows the outer step count, so a step the fp16 scaler skipped (an
        overflow) still counts; torch's warning about a scheduler stepping before its
        optimizer, which that skip triggers, does not apply."""
        if not self.scaler.is_enabled():
            self.sched.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.sched.step()

    def _own_tasks(self, ep: Episode) -> tuple[Episode, float]:
        """This process's part of meta-batch ``ep`` (which may already be just that part),
        and its weight in the meta-batch mean."""
        if self.world == 1:
            return ep, 1.0
        start, stop = self.my_tasks
        if ep.tasks == self.cfg.meta_batch:
            ep = ep.task_range(start, stop)
        elif ep.tasks != stop - start:
            raise ValueError(f"process {self.rank}: a training episode of {ep.tasks} tasks is "
                             f"neither the meta-batch ({self.cfg.meta_batch}) nor this "
                             f"process's share of it ({stop - start})")
        return ep, (stop - start) / self.cfg.meta_batch

    def _own_episodes(self):
        """The training episodes, assembled only for this process's tasks where the sampler
        can (:meth:`EpisodeSampler.share`)."""
        share = getattr(self.train_episodes, "share", None)
        if self.world == 1 or share is None:
            return self.train_episodes
        return share(*self.my_tasks)

    def _clip_gradients(self, scaled: bool) -> None:
        """Clips the whole meta-batch's (process-summed) gradient; ``scaled``: ``.grad``
        holds the fp16 loss scaler's scaled gradient, unscaled first."""
        if self.cfg.grad_clip is None:
            return
        if scaled:
            self.scaler.unscale_(self.opt)  # a no-op without fp16 loss scaling
        torch.nn.utils.clip_grad_norm_(self.learner.parameters(), self.cfg.grad_clip)

    def _sum_over_processes(self, weight: float, buffers: list) -> None:
        if self.world > 1:
            sum_gradients(list(self.learner.parameters()), weight)
            sum_buffer_changes(buffers, weight)

    def fit(self, resume: bool = False) -> dict:
        """Train to ``config.steps``; with ``resume``, continue from ``out_dir/last.pt``.
        One run at a time per ``out_dir``: a second one raises at once."""
        if rank_and_world() != (self.rank, self.world):
            raise RuntimeError("the Trainer was built outside the process group it trains in: "
                               "build it after torch.distributed.init_process_group")
        if not self.lead:  # process 0 holds the directory for the group
            return self._fit(resume)
        with directory_lock(self.out_dir, "a training run"):
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict:
        self._start(resume)
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.algo}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        loader = episode_loader(self._own_episodes(), self.step, cfg.steps, cfg.workers)
        tick, train_text = time.perf_counter(), ""
        for ep in loader:
            loss, score = self.train_step(ep)
            self.step += 1
            now = time.perf_counter()
            self._accumulate(loss, score, ep.tasks if self.world == 1 else cfg.meta_batch,
                             now - tick)
            train_text = self._after_step(bar, train_text)
            bar.update(1)
            tick = time.perf_counter()  # validation and checkpoints are not training time
        bar.close()  # the last step validated, checkpointed and plotted
        result = {"steps": self.step, f"best_{self.metric}": self.best[self.metric],
                  "best_step": self.best["step"], "train_s": self.elapsed}
        return from_process_0(lambda: result)  # process 0 holds the best

    def _start(self, resume: bool) -> None:
        """Fresh, or from process 0's checkpoint; every process with process 0's model."""
        for torn in self.out_dir.glob(".*.tmp") if self.lead else ():  # a killed write's
            torn.unlink()
        # process 0's: the others need not see the run directory
        state = from_process_0(lambda: self._checkpoint_to_resume(resume))
        if state is not None:  # process 0's model, in every process
            self.load_state_dict(state)
            return
        if self.step:  # the learner has moved: a fresh start would not start from scratch
            raise ValueError(f"Trainer: {self.step} steps were trained, but {self.out_dir} holds "
                             f"no checkpoint to continue from; build a new Trainer and learner "
                             f"to start over")
        if self.lead:
            self.log = MetricsLog(self.out_dir)
        if self.world > 1:
            broadcast_module(self.learner)  # every process starts from process 0's model
            self._seed_own_stream(0)  # and draws random numbers of its own

    def _after_step(self, bar, train_text: str) -> str:
        """Validation (shared by the processes), then process 0 logs and checkpoints."""
        cfg = self.cfg
        validating = self.step % cfg.val_every == 0 or self.step == cfg.steps
        val = self._evaluate_val() if validating else None
        saving = validating or cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
        if saving and self.world > 1:
            self._rng_processes = all_gather_objects(self._rng_state())
        return self._log_and_save(bar, train_text, validating, val) if self.lead else train_text

    def _log_and_save(self, bar, train_text: str, validating: bool, val: dict | None) -> str:
        cfg = self.cfg
        # at each validation too: its line's training scores are then its own step's window
        if self.step % cfg.log_every == 0 or self.step == cfg.steps or validating:
            train_text = self._log_train()
            bar.set_postfix_str(train_text)
        if validating:
            text = ", ".join(filter(None, [train_text, self._validate(val)]))
            bar.set_postfix_str(text)
            if self.report:
                self.report(f"step {self.step}/{cfg.steps}: {text}")
        elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save("last.pt")
        return train_text

    def _plot(self) -> None:
        c = self.cfg
        ways = lambda w: f"{w}-way " if self.metric == "acc" else ""  # noqa: E731
        self.log.plot(f"train ({ways(c.ways)}{c.shots}-shot)",
                      f"validation ({ways(c.test_ways)}{c.test_shots}-shot)", self.metric)

    def _accumulate(self, loss: torch.Tensor, score: torch.Tensor, tasks: int,
                    seconds: float) -> None:
        w = self._window
        w["loss"] += loss
        w["score"] += score
        w["n"] += 1
        w["tasks"] += tasks
        w["time"] += seconds
        self.elapsed += seconds

    def _log_train(self) -> str:
        w = self._window
        if not w["n"]:
            return ""
        m = self.metric
        row = {"step": self.step, "split": "train", "loss": float(w["loss"]) / w["n"],
               m: float(w["score"]) / w["n"], "ci95": None, "lr": self.trained_lr,
               "tasks_per_s": w["tasks"] / max(w["time"], 1e-9), "elapsed_s": self.elapsed}
        self.log.append(row)
        self._window = _empty_window()
        return f"loss={row['loss']:.3f}, {m}={row[m]:.3f}, tasks/s={row['tasks_per_s']:.1f}"

    def _evaluate_val(self) -> dict | None:
        if self.val_episodes is None:
            return None
        return evaluate(self.learner, self.val_episodes, self.device, self.cfg.amp,
                        shard=self.world > 1)

    def _validate(self, res: dict | None) -> str:
        """Records validation ``res`` and checkpoints; returns the text for the progress bar."""
        msg = ""
        if res is not None:
            m = self.metric
            self.log.append({"step": self.step, "split": "val", "loss": None, m: res[m],
                             "ci95": res["ci95"], "lr": self.trained_lr,
                             "tasks_per_s": None, "elapsed_s": self.elapsed})
            if better(m, res[m], self.best[m]):
                self.best = {m: res[m], "step": self.step}
                self.save("best.pt")
            msg = f"val {m}={res[m]:.3f}±{res['ci95']:.3f}{divergence_note(res)}"
        else:  # no validation set: the latest is the best
            self.best = {self.metric: math.nan, "step": self.step}
            self.save("best.pt")
        self.save("last.pt")
        self._plot()
        return msg


def _check_matches_config(cfg: RunConfig, learner, train) -> None:
    """The run config describes the run (results, plots, :func:`pymeta.load`): it must agree
    with the learner and the training episodes it is given."""
    algo = getattr(learner, "algo", None)
    wrong = []
    if algo and algo != cfg.algo:
        wrong.append(f"algo={cfg.algo!r} but the learner is {algo!r}")
    for name, attr in (("ways", "ways"), ("shots", "shots"), ("queries", "queries"),
                       ("meta_batch", "tasks")):
        got = getattr(train, attr, None)
        if got is not None and got != getattr(cfg, name):
            wrong.append(f"{name}={getattr(cfg, name)!r} but the training episodes have {got!r}")
    if wrong:
        raise ValueError("Trainer: the run config says " + "; ".join(wrong))


def _empty_window() -> dict:
    return {"loss": 0.0, "score": 0.0, "n": 0, "tasks": 0, "time": 0.0}


def learner_config(learner: torch.nn.Module) -> dict:
    """What :func:`pymeta.load` needs to rebuild the learner (besides the run config)."""
    extra = getattr(learner, "extra_config", None)
    return {"algo": getattr(learner, "algo", None), "kwargs": extra() if extra else {}}
