"""MAML's sinusoid regression (Finn et al. 2017, Table 2) against a pretrained baseline.

    python bench/sinusoid.py [--run DIR] [--steps 70000] [--baseline-steps 20000]

1. MAML: `pymeta train --algo maml --data sinusoid` (the sinusoid preset: MLP 1-40-40-1, K=10,
   inner rate 0.01, 1 inner step, Adam, meta-batch 25), run in DIR (default
   bench/out/sinusoid/maml, or maml-<N>steps for other --steps); a finished run is reused,
   a killed one resumes.
2. Baseline: the same MLP trained by plain regression (Adam, MSE) on points pooled from
   training tasks (the same task stream), then fine-tuned with the same inner SGD steps.
3. Both are scored on the same 1000 fixed test tasks: K=5 support points, 100 query points,
   MSE after 1, 5 and 10 steps of rate 0.01; printed beside the paper's figures.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pymeta
from pymeta._atomic import write_json
from pymeta.data import SinusoidTasks, fixed_sinusoid_tasks
from pymeta.engine.evaluate import episode_scores
from pymeta.engine.metrics import mean_ci95
from pymeta.learners import MAML
from pymeta.nn import mlp

OUT = Path(__file__).resolve().parent / "out" / "sinusoid"
PAPER = {"MAML": (0.67, 0.38, 0.35), "pretrained": (2.41, 2.23, 2.19)}  # Finn et al., Table 2
STEPS = (1, 5, 10)


def train_maml(run: Path, steps: int) -> tuple:
    done = run / "results.json"
    finished = json.loads(done.read_text())["config"]["steps"] if done.is_file() else None
    if finished not in (None, steps):
        sys.exit(f"{run} holds a finished run of {finished} steps, not {steps}: pass its "
                 f"--steps or another --run")
    if finished is None:
        cmd = [sys.executable, "-m", "pymeta", "train", "--algo", "maml", "--data", "sinusoid",
               "--steps", str(steps), "--out", str(run), "--no-progress"]
        if (run / "last.pt").is_file():
            cmd.append("--resume")
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return pymeta.load(run / "best.pt"), json.loads((run / "results.json").read_text())


def train_baseline(steps: int, seed: int = 0) -> torch.nn.Module:
    """Plain regression on the pooled points of the training task stream."""
    torch.manual_seed(seed)
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    tasks = SinusoidTasks(10, 10, tasks=25, seed=seed)
    for i in range(steps):
        ep = tasks[i]
        x = torch.cat([ep.support_x, ep.query_x], 1).reshape(-1, 1)
        y = torch.cat([ep.support_y, ep.query_y], 1).reshape(-1, 1)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def scores(learner, tasks) -> list:
    out = []
    for s in STEPS:
        mse = episode_scores(learner, tasks, steps=s)
        out.append((mean_ci95(mse), int((~torch.isfinite(mse)).sum()),
                    float(mse.nan_to_num(math.inf).median())))  # a NaN task counts as worst
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="MAML run directory (default: bench/out/sinusoid/"
                    "maml, or maml-<N>steps for other --steps)")
    ap.add_argument("--steps", type=int, default=70000, help="MAML meta-training steps")
    ap.add_argument("--baseline-steps", type=int, default=20000)
    ap.add_argument("--json", type=Path, default=OUT / "results.json")
    args = ap.parse_args()
    run = args.run or OUT / ("maml" if args.steps == 70000 else f"maml-{args.steps}steps")
    maml, maml_run = train_maml(run, args.steps)
    t = time.perf_counter()
    base = MAML(train_baseline(args.baseline_steps), inner_lr=0.01, loss="mse").eval()
    base_s = time.perf_counter() - t
    tasks = fixed_sinusoid_tasks(1000, shots=5, queries=100, seed=2024)
    rows = {"MAML": scores(maml, tasks), "pretrained": scores(base, tasks)}
    print(f"MAML: {maml_run['steps']} meta-steps in {maml_run.get('train_s', math.nan):.0f} s "
          f"of training; baseline: {args.baseline_steps} steps in {base_s:.0f} s")
    print("| model | MSE after 1 / 5 / 10 steps (± 95% CI) | median | diverged tasks | paper |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        mse = " / ".join(f"{m:.3f} ± {c:.3f}" for (m, c), _, _ in r)
        med = " / ".join(f"{x:.3f}" for _, _, x in r)
        bad = " / ".join(str(b) for _, b, _ in r)
        print(f"| {name} | {mse} | {med} | {bad} | {' / '.join(map(str, PAPER[name]))} |")
    write_json(args.json, {k: [{"steps": s, "mse": m, "ci95": c, "diverged": b, "median": med}
                               for s, ((m, c), b, med) in zip(STEPS, r)]
                           for k, r in rows.items()})  # atomic; NaN and inf as null


if __name__ == "__main__":
    main()
