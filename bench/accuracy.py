"""Omniglot accuracy of the few-shot learners on the bench/RESULTS.md protocol.

    python bench/accuracy.py [--algos protonet matching ... maml anil reptile] [--steps N]

Runs `pymeta train --preset omniglot --algo A` for each learner, one after another (meta-train
on small1 with rotations, validate on a held-out fifth of small1's characters, test the best
checkpoint on the small2-only alphabets over the same 1000 fixed episodes at 5-way and 20-way
1-shot; the gradient learners train on 5-way episodes, see pymeta/cli.py's
GRADIENT_PRESETS), then prints one table with accuracies ± 95% CI, steps, and the CPU time each run
used. Runs already finished under bench/out/accuracy/<algo> (<algo>-<N>steps with --steps N)
are reused; killed ones resume.
Needs Omniglot's small archives under $PYMETA_DATA/omniglot or ../shared/data/omniglot.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from bench_protonet import data_root  # the same Omniglot lookup (bench/ is on sys.path)
from pymeta._atomic import write_json

OUT = Path(__file__).resolve().parent / "out" / "accuracy"


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(algo: str, steps: int | None) -> dict:
    out = OUT / (f"{algo}-{steps}steps" if steps else algo)  # other steps: another run
    extra = ["--steps", str(steps)] if steps else []
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "pymeta", "train", "--preset", "omniglot", "--algo", algo,
           "--root", str(data_root()), "--out", str(out), "--no-progress", *extra]
    if (out / "last.pt").is_file():
        cmd.append("--resume")
    print("+", " ".join(cmd), flush=True)
    cpu = children_cpu_s()
    subprocess.run(cmd, check=True)
    res = json.loads(done.read_text())
    res["cpu_s"] = children_cpu_s() - cpu
    write_json(done, res)
    return res


def table(results: dict) -> str:
    lines = ["| learner | 5-way 1-shot | 20-way 1-shot | best val (eval ways, 1-shot) | steps "
             "(episodes) | CPU time |", "| --- | --- | --- | --- | --- | --- |"]
    for algo, r in results.items():
        acc = {(t["ways"], t["shots"]): t for t in r["tests"]}
        cell = lambda k: f"{100 * acc[k]['acc']:.2f} ± {100 * acc[k]['ci95']:.2f}"  # noqa: E731
        cpu = f"{r['cpu_s'] / 60:.1f} min" if "cpu_s" in r else "-"
        lines.append(f"| {algo} | {cell((5, 1))} | {cell((20, 1))} | "
                     f"{100 * r['best_acc']:.2f} (step {r['best_step']}) | {r['steps']} "
                     f"({r['tasks_seen']}) | {cpu} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["protonet", "matching", "siamese", "relation",
                                                  "maml", "fomaml", "metasgd", "anil",
                                                  "reptile"])
    p.add_argument("--steps", type=int, help="override the preset's steps")
    args = p.parse_args()
    results = {algo: run(algo, args.steps) for algo in args.algos}
    print(table(results))
    (OUT / "summary.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
