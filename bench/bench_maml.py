"""MAML meta-training speed and memory: pymeta against `higher` and a plain-torch loop.

    python bench/bench_maml.py [--steps 1 5] [--tasks 32] [--rounds 2] [--chunks 1 4]
                               [--quick] [--no-steps-memory] [--json bench/out/maml.json]
                               [--device cpu|cuda]

One meta-step = zero_grad + meta-loss forward + backward + Adam step, conv4-64 with
BatchNorm in train mode (per-task batch statistics), 5-way 1-shot, 15 queries per class,
inner lr 0.4, second and first order, for each inner step count of ``--steps``. About 17
minutes on the 2-vCPU reference machine (``--quick``: 2 minutes); results in bench/RESULTS.md.

Contenders (same initial weights, same fixed random batch, torch's default thread count):
- pymeta ``MAML``/``FOMAML``: the default ``task_chunk="auto"`` (2 tasks at a time for
  conv models on CPU), all tasks batched (``whole``), ``task_chunk`` in ``--chunks``, and
  ``checkpoint_inner=True`` (second order, >= 5 inner steps);
- higher: ``innerloop_ctx`` per task, ``diffopt.step`` per inner step, query loss / T
  ``.backward()`` per task (first order: ``track_higher_grads=False`` and the query
  gradient w.r.t. the fast weights accumulated into ``.grad``, since higher detaches them);
- torch loop: per task, ``torch.autograd.grad(create_graph=second_order)`` and
  ``torch.func.functional_call`` (no library);
- learn2learn ``MAML.clone()/adapt()`` when it imports.

Speed: all contenders of a config in one process, round-robin (order rotating), median
(and min) seconds per meta-step over ``--rounds``, after a first step that warms up and
checks the meta-gradient against the torch loop's (relative L2 error). Freed memory is kept
for reuse for all of them (``pymeta._malloc.retain_freed_memory``, as ``pymeta train``).
Memory: each (contender, config) in a fresh subprocess (``--memory-one``), glibc's default
malloc: one warm-up step, ``malloc_trim``, reset the peak RSS (``/proc/self/clear_refs``
= 5), read VmRSS, run one step, read VmHWM; increase = VmHWM - VmRSS before (absolute peak
where clear_refs does not work). A last table compares the peak increase of second-order
steps at 1 and 10 inner steps, ``checkpoint_inner`` off and on.

``--device cuda``: everything on the GPU, each timed step synchronised; memory is the peak of
torch's CUDA allocator during one step minus what it held before; the speed goal is 5x.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pymeta._atomic import write_json
from pymeta.benchmark import _cpu_model, _loadavg
from pymeta.learners import FOMAML, MAML
from pymeta.learners.maml import CPU_TASK_CHUNK
from pymeta.nn import Conv4

OUT = Path(__file__).resolve().parent / "out" / "maml.json"
WAYS, SHOTS, QUERIES, LR, META_LR, SEED = 5, 1, 15, 0.4, 1e-3, 0
SPEED_GOALS, STEPS_MEM_GOAL = {"cpu": 1.5, "cuda": 5.0}, 2.0
DEVICE = "cpu"  # set by main() (and in the memory subprocesses) from --device

try:
    import higher
except ImportError:
    higher = None
try:
    import learn2learn as l2l
except Exception:  # noqa: BLE001 - an sdist that fails to build or import: skipped
    l2l = None


# ---- models and data ----------------------------------------------------------------------

def plain_model() -> nn.Sequential:
    """conv4-64 + linear head of plain torch layers (default memory format)."""
    layers, cin = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(cin, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                   nn.MaxPool2d(2)]
        cin = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, WAYS))


def models() -> tuple[nn.Module, nn.Module]:
    """(pymeta model, plain model) with the same initial weights."""
    torch.manual_seed(SEED)
    ours, plain = nn.Sequential(Conv4(in_channels=1), nn.Linear(64, WAYS)), plain_model()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), ours.parameters(), strict=True):
            p.copy_(q)
    return ours.to(DEVICE), plain.to(DEVICE)


def batch(tasks: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(SEED)
    sx = torch.randn(tasks, WAYS * SHOTS, 1, 28, 28, generator=g)
    qx = torch.randn(tasks, WAYS * QUERIES, 1, 28, 28, generator=g)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).contiguous()
    return tuple(t.to(DEVICE) for t in (sx, sy, qx, qy))


# ---- meta-gradients (fill .grad) of each contender ----------------------------------------

def pymeta_grads(learner, data) -> None:
    learner.meta_loss(*data).backward()


def higher_grads(model, data, steps: int, second: bool) -> None:
    sx, sy, qx, qy = data
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    for t in range(len(sx)):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                  track_higher_grads=second) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(sx[t]), sy[t]))
            loss = F.cross_entropy(fmodel(qx[t]), qy[t]) / len(sx)
            if second:
                loss.backward()
            else:  # higher detached the fast weights: accumulate their gradient by hand
                _accumulate(model, torch.autograd.grad(loss, list(fmodel.parameters())))


def _accumulate(model: nn.Module, grads) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)


def loop_grads(model, data, steps: int, second: bool) -> None:
    sx, sy, qx, qy = data
    names, params = zip(*model.named_parameters())
    for t in range(len(sx)):
        fast = list(params)
        for _ in range(steps):
            loss = F.cross_entropy(_call(model, names, fast, sx[t]), sy[t])
            grads = torch.autograd.grad(loss, fast, create_graph=second)
            fast = [w - LR * g for w, g in zip(fast, grads)]
        (F.cross_entropy(_call(model, names, fast, qx[t]), qy[t]) / len(sx)).backward()


def _call(model, names, weights, x):
    return torch.func.functional_call(model, dict(zip(names, weights)), (x,))


def l2l_grads(maml, data, steps: int) -> None:
    sx, sy, qx, qy = data
    for t in range(len(sx)):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
        (F.cross_entropy(learner(qx[t]), qy[t]) / len(sx)).backward()


# ---- contenders ---------------------------------------------------------------------------

def variants(steps: int, second: bool, chunks=(4, 8)) -> list[str]:
    names = ["pymeta", "pymeta whole", *(f"pymeta chunk={c}" for c in chunks)]
    names += ["pymeta ckpt"] if second and steps >= 5 else []
    names += ["higher"] if higher else []
    names += ["learn2learn"] if l2l else []
    return names + ["torch loop"]


def contender(name: str, steps: int, second: bool):
    """(function filling the meta-grads, the meta-parameters) of ``name``, fresh weights."""
    ours, plain = models()
    if name.startswith("pymeta"):
        chunk = _chunk_of(name)
        kw = dict(inner_lr=LR, steps=steps, task_chunk=chunk)
        learner = (MAML(ours, second_order=True, checkpoint_inner=name.endswith("ckpt"), **kw)
                   if second else FOMAML(ours, **kw)).train()
        return (lambda d: pymeta_grads(learner, d)), list(learner.parameters())
    if name == "higher":
        return (lambda d: higher_grads(plain, d, steps, second)), list(plain.parameters())
    if name == "learn2learn":
        maml = l2l.algorithms.MAML(plain, lr=LR, first_order=not second)
        return (lambda d: l2l_grads(maml, d, steps)), list(maml.parameters())
    return (lambda d: loop_grads(plain, d, steps, second)), list(plain.parameters())


def _chunk_of(name: str):
    """The task_chunk of a pymeta contender's name: chunk=N, whole (None) or auto."""
    chunk = re.search(r"chunk=(\d+)", name)
    return int(chunk.group(1)) if chunk else None if " whole" in name else "auto"


def meta_step(grads_fn, opt, data) -> None:
    opt.zero_grad(set_to_none=True)
    grads_fn(data)
    opt.step()
    _sync()


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def stepper(name: str, steps: int, second: bool, tasks: int):
    """A zero-argument meta-step of ``name`` and the first step's flat meta-gradient."""
    fn, params = contender(name, steps, second)
    opt, data = torch.optim.Adam(params, lr=META_LR), batch(tasks)
    opt.zero_grad(set_to_none=True)
    fn(data)
    grad = torch.cat([p.grad.flatten() for p in params])
    opt.step()
    return (lambda: meta_step(fn, opt, data)), grad


# ---- speed --------------------------------------------------------------------------------

def time_config(steps: int, second: bool, tasks: int, rounds: int, chunks) -> dict:
    names = variants(steps, second, chunks)
    steppers, grads = {}, {}
    for n in names:  # the first step (gradient check) doubles as the warm-up
        steppers[n], grads[n] = stepper(n, steps, second, tasks)
    ref = grads["torch loop"]
    errs = {n: float((g - ref).norm() / ref.norm()) for n, g in grads.items()}
    times, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steppers[n]()
            times[n].append(time.perf_counter() - start)
            cpu[n].append(time.process_time() - start_cpu)
    return {n: {"s": statistics.median(times[n]), "min_s": min(times[n]), "times": times[n],
                "cpu_s": statistics.median(cpu[n]), "grad_rel_err": errs[n]} for n in names}


# ---- memory -------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    """VmRSS and VmHWM in KiB."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def clear_refs_works() -> bool:
    """Whether writing 5 to clear_refs resets VmHWM here (checked with a 200 MB tensor)."""
    x = torch.ones(50_000_000)
    x.add_(1)
    del x
    high = _status()["VmHWM"]
    return _reset_peak() and _status()["VmHWM"] < high - 100_000


def memory_one(name: str, steps: int, second: bool, tasks: int) -> dict:
    """Peak-RSS increase (MiB) of one meta-step after a warm-up step (run in a subprocess)."""
    step, _ = stepper(name, steps, second, tasks)
    gc.collect()
    if DEVICE == "cuda":
        return _cuda_memory_one(step)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    reset = _reset_peak()
    before = _status()["VmRSS"]
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _status()["VmHWM"]
    return {"before_mib": before / 1024, "peak_mib": peak / 1024, "reset": reset,
            "increase_mib": (peak - before) / 1024 if reset else None, "s": seconds}


def _cuda_memory_one(step) -> dict:
    """The CUDA allocator's peak during one step minus what it held before, in MiB."""
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    return {"before_mib": before / 2**20, "peak_mib": peak / 2**20, "reset": True,
            "increase_mib": (peak - before) / 2**20, "s": seconds}


def memory(name: str, steps: int, second: bool, tasks: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-one", name, "--steps", str(steps),
           "--tasks", str(tasks), "--order", "second" if second else "first",
           "--device", DEVICE]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------

def _mem(m: dict):
    return m.get("increase_mib", m.get("peak_mib")) if m else None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def config_rows(key: str, res: dict, tasks: int) -> list[str]:
    base = res.get("higher")
    rows = []
    for n, r in res.items():
        speed = base["s"] / r["s"] if base else None
        m, bm = _mem(r.get("mem")), _mem(base.get("mem")) if base else None
        rel = m / bm if m is not None and bm else None
        rows.append(f"| {key} | {n} | {r['s']:.2f} | {r['min_s']:.2f} | {tasks / r['s']:.1f} | "
                    f"{_fmt(speed, '.2f')}x | {_fmt(m, '.0f')} | {_fmt(rel, '.2f')}x | "
                    f"{r['grad_rel_err']:.1e} |")
    return rows


def speed_table(results: dict, tasks: int) -> str:
    head = ["| config | contender | s/step | min s | tasks/s | tasks/s vs higher | peak-mem "
            "increase MiB | mem vs higher | grad rel. err |", "|" + " --- |" * 9]
    body = [row for key, res in results["configs"].items() for row in config_rows(key, res, tasks)]
    return "\n".join(head + body)


def _has_higher(results: dict) -> bool:
    return any(res.get("higher") for res in results["configs"].values())


def goal_lines(results: dict) -> list[str]:
    if not _has_higher(results):
        return ["higher is not installed (pip install higher): no speed or memory goal checked"]
    lines = []
    for key, res in results["configs"].items():
        base = res.get("higher")
        if not base:
            continue
        for n, r in res.items():
            if not n.startswith("pymeta"):
                continue
            speed, m, bm = base["s"] / r["s"], _mem(r.get("mem")), _mem(base.get("mem"))
            mem_ok = m is not None and bm is not None and m <= bm
            goal = SPEED_GOALS[DEVICE]
            ok = speed >= goal and mem_ok
            lines.append(f"{'PASS' if ok else 'FAIL'} {key} {n}: {speed:.2f}x higher's tasks/s "
                         f"(goal >= {goal}x), peak increase {_fmt(m, '.0f')} MiB vs "
                         f"higher {_fmt(bm, '.0f')} MiB")
    return lines


def _chunk_scores(results: dict, name: str) -> tuple[float, bool, float]:
    """(geometric-mean speed vs higher, memory within higher's everywhere, worst memory)."""
    speeds, fits, worst = [], True, 0.0
    for res in results["configs"].values():
        base, m = res.get("higher"), _mem(res[name].get("mem"))
        bm = _mem(base.get("mem")) if base else None
        speeds.append(math.log(base["s"] / res[name]["s"]) if base else 0.0)
        fits = fits and m is not None and bm is not None and m <= bm
        worst = max(worst, math.inf if m is None else m)
    return math.exp(statistics.mean(speeds)), fits, worst


def recommend_chunk(results: dict) -> tuple:
    """(task_chunk, why): the fastest chunk setting whose memory stays within higher's in
    every config; if none does, the one with the least peak memory; without higher, the
    fastest."""
    first = next(iter(results["configs"].values()))
    cands = {n: _chunk_of(n) for n in first if n.startswith("pymeta") and not n.endswith("ckpt")}
    if not _has_higher(results):
        times = {n: statistics.geometric_mean([res[n]["s"] for res in results["configs"].values()])
                 for n in cands}
        best = min(cands, key=times.get)
        return cands[best], f"{best}, fastest (higher not installed: memory not compared)"
    scores = {n: _chunk_scores(results, n) for n in cands}
    fitting = [n for n in cands if scores[n][1]]
    if fitting:
        best = max(fitting, key=lambda n: scores[n][0])
        why = "fastest within higher's memory"
    else:
        best = min(cands, key=lambda n: scores[n][2])
        why = "no setting stays within higher's memory in every config; least peak memory"
    return cands[best], f"{best}, {scores[best][0]:.2f}x higher's speed (geomean): {why}"


def steps_memory_table(rows: list[dict]) -> list[str]:
    out = ["| contender | peak increase 1 step MiB | 10 steps MiB | ratio 10/1 | goal |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows:
        a, b = _mem(r["mem"][0]), _mem(r["mem"][1])
        ratio = b / a if a and b is not None else None
        goal = ("-" if "ckpt" not in r["name"] else
                "PASS" if ratio is not None and ratio <= STEPS_MEM_GOAL else "FAIL")
        out.append(f"| {r['name']} | {_fmt(a, '.0f')} | {_fmt(b, '.0f')} | "
                   f"{_fmt(ratio, '.2f')}x | {goal} |")
    return out


# ---- driver -------------------------------------------------------------------------------

def header(args, load: float, reset: bool) -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": (torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"),
            "torch": torch.__version__, "higher": _version("higher"),
            "learn2learn": _version("learn2learn") if l2l else "not importable (skipped)",
            "loadavg_start": load, "clear_refs": reset, "tasks": args.tasks,
            "rounds": args.rounds, "argv": sys.argv[1:]}


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def run_configs(args, results: dict) -> None:
    from pymeta._malloc import retain_freed_memory
    for steps in args.steps:
        for second in (True, False):
            key = f"{steps} step{'s' * (steps > 1)}, {'2nd' if second else '1st'} order"
            print(f"[{time.strftime('%X')}] timing {key}", file=sys.stderr, flush=True)
            results["malloc"] = retain_freed_memory()  # timing only; memory runs use default
            res = time_config(steps, second, args.tasks, args.rounds, args.chunks)
            for n in res:
                res[n]["mem"] = memory(n, steps, second, args.tasks)
            results["configs"][key] = res


def run_steps_memory(args, chunk) -> list[dict]:
    names = ["pymeta", "pymeta ckpt", "pymeta whole", "pymeta whole ckpt"]
    if isinstance(chunk, int) and chunk != CPU_TASK_CHUNK:
        names += [f"pymeta chunk={chunk}", f"pymeta chunk={chunk} ckpt"]
    names += ["higher"] if higher and not args.quick else []
    rows = []
    for n in names:
        print(f"[{time.strftime('%X')}] memory vs steps: {n}", file=sys.stderr, flush=True)
        rows.append({"name": n, "mem": [memory(n, s, True, args.tasks) for s in (1, 10)]})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", help="inner steps (default 1 5)")
    p.add_argument("--tasks", type=int, help="meta-batch (default 32)")
    p.add_argument("--rounds", type=int, help="timing rounds (default 2)")
    p.add_argument("--chunks", type=int, nargs="+",
                   help="task_chunk values timed besides the default (auto) and all tasks "
                        "(default 1 4)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: defaults of 4 tasks, 1 step, 1 round, chunk 1")
    p.add_argument("--json", type=Path, default=OUT)
    p.add_argument("--no-steps-memory", action="store_true",
                   help="skip the memory-vs-inner-steps table (1 and 10 steps)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--memory-one", help=argparse.SUPPRESS)
    p.add_argument("--order", choices=["first", "second"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = (dict(tasks=4, steps=[1], rounds=1, chunks=[1]) if args.quick else
                dict(tasks=32, steps=[1, 5], rounds=2, chunks=[1, 4]))
    for name, value in defaults.items():  # options given explicitly win over --quick
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> None:
    global DEVICE
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_maml: --device cuda, but torch sees no CUDA device")
    DEVICE = args.device
    if args.memory_one:
        print(json.dumps(memory_one(args.memory_one, args.steps[0], args.order == "second",
                                    args.tasks)))
        return
    load = _loadavg()
    results = {"machine": header(args, load, clear_refs_works()), "configs": {}}
    run_configs(args, results)
    chunk, why = recommend_chunk(results)
    results["recommended_task_chunk"], results["recommendation"] = chunk, why
    if not args.no_steps_memory:
        results["steps_memory"] = run_steps_memory(args, chunk)
    results["machine"]["loadavg_end"] = _loadavg()
    report(results, args)


def report(results: dict, args) -> None:
    m = results["machine"]
    reset = "works" if m["clear_refs"] else "unavailable: absolute peak RSS reported"
    lines = [f"bench_maml {m['date']} | device {m['device']} | {m['cpu']} | {m['cpus']} CPUs, "
             f"{m['threads']} threads "
             f"| torch {m['torch']} | higher {m['higher']} | learn2learn {m['learn2learn']} | "
             f"1-min load at start/end {_fmt(m['loadavg_start'], '.2f')}/"
             f"{_fmt(m['loadavg_end'], '.2f')} | tasks {m['tasks']} | "
             f"rounds {m['rounds']} | peak reset (clear_refs) {reset}", "",
             speed_table(results, args.tasks), "", *goal_lines(results), "",
             f"recommended task_chunk: {results['recommended_task_chunk']} "
             f"({results['recommendation']})"]
    if "steps_memory" in results:
        what = "CUDA allocator peak" if DEVICE == "cuda" else "peak-RSS"
        lines += ["", f"Memory vs inner steps (second order, {what} increase of one step):",
                  *steps_memory_table(results["steps_memory"])]
    print("\n".join(lines))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
