"""Benchmarks of pymeta's ops against their best plain-torch equivalents.

Every case times pymeta and its torch alternatives side by side in one process: each is
warmed up, then all are run round-robin (the order rotating each round) for several rounds,
and the median time per call is kept. ``min_time`` is the least time spent timing each
implementation of a case. Ratios are the fastest torch alternative's median over pymeta's.
A STREAM-like copy and triad measure the memory bandwidth in the same run.

Modes: ``fwd`` runs under ``torch.no_grad()`` (inference); ``fwd+bwd`` builds the inputs
with ``requires_grad`` and times ``op(...).backward(grad_out)`` (``.grad`` reset to None
between calls); ``fwd+graph`` (sgd_step) times the forward only, with params and grads
requiring grad, so the autograd graph is recorded.

Used by ``python -m pymeta bench`` and ``bench/bench_ops.py``.
"""
from __future__ import annotations

import functools
import gc
import itertools
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ._atomic import write_json
from ._info import info
from ._malloc import retain_freed_memory
from .ops import batch_norm_relu_pool, class_prototypes, pairwise_distances, sgd_step

OPS = ("pairwise_distances", "class_prototypes", "sgd_step", "batch_norm_relu_pool")
CPU_ONLY_OPS = ("batch_norm_relu_pool",)
SUITES = ("targets", "full")
SEED = 0
LR = 0.01
MIN_ROUNDS, MAX_ROUNDS = 5, 30
WARMUP_MAX_S = 0.05          # warm-up (and per-call estimate) of each implementation
BANDWIDTH_MIB = 64           # size of each STREAM buffer
BROADCAST_LIMIT_MIB = 512    # broadcast-subtract is skipped above this [T, Q, N, D] temporary

# ---- timing -------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn: Callable, number: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return time.perf_counter() - start


def _warm_up(fn: Callable, device: str, budget: float) -> float:
    """Runs ``fn`` until warm (doubling the call count until a batch takes ``budget``);
    returns the estimated seconds per call."""
    fn()
    number = 1
    while True:
        elapsed = _time_calls(fn, number, device)
        if elapsed >= budget:
            return elapsed / number
        number *= 2


def measure(impls: dict[str, Callable], min_time: float, device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed interleaved."""
    per_call = {k: _warm_up(f, device, min(WARMUP_MAX_S, min_time / 4)) for k, f in impls.items()}
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, int(min_time / max(per_call.values()))))
    numbers = {k: max(1, math.ceil(min_time / rounds / t)) for k, t in per_call.items()}
    names, samples = list(impls), {k: [] for k in impls}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                samples[k].append(_time_calls(impls[k], numbers[k], device) / numbers[k])
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


def _fwd_bwd(fn: Callable, inputs: tuple, grad_out: torch.Tensor) -> Callable:
    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad_out)
    return step


def _bind(impls: dict[str, Callable], inputs: tuple, mode: str,
          grad_out: torch.Tensor | None) -> dict[str, Callable]:
    """Zero-argument callables: forward only, or forward + backward of a fixed upstream grad."""
    if mode != "fwd+bwd":
        return {k: functools.partial(f, *inputs) for k, f in impls.items()}
    return {k: _fwd_bwd(f, inputs, grad_out) for k, f in impls.items()}


class Case(NamedTuple):
    """One case's implementations of the same computation on ``inputs``. ``same_as`` names,
    for an alternative that needs inputs arranged its way (reshape-mean's sorted labels), the
    pymeta call it must agree with instead of pymeta's own."""
    impls: dict[str, Callable]
    inputs: tuple
    nbytes: int | None = None
    same_as: dict[str, Callable] = {}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)]


def _results(fn: Callable, inputs: tuple, grad_out) -> list[torch.Tensor]:
    """fn's outputs and, with ``grad_out``, the gradients of its inputs."""
    leaves = [t for t in _tensors(inputs) if t.requires_grad]
    for t in leaves:
        t.grad = None
    out = fn(*inputs)
    results = _tensors(out)
    if grad_out is not None:
        out.backward(grad_out)
        results += [t.grad for t in leaves]
    return [t.detach() for t in results]


def _verify(case: Case, grad_out, label: str) -> None:
    """Every alternative computes what pymeta does (to float32 rounding): a ratio between
    different computations would be meaningless."""
    want = _results(case.impls["pymeta"], case.inputs, grad_out)
    for name, fn in case.impls.items():
        if name == "pymeta":
            continue
        expected = want
        if name in case.same_as:
            expected = _results(case.same_as[name], case.inputs, grad_out)
        got = _results(fn, case.inputs, grad_out)
        errors = [float((a.double() - b.double()).abs().max() / b.abs().max().clamp_min(1e-30))
                  for a, b in zip(got, expected) if b.numel()]
        if len(got) != len(expected) or max(errors, default=0.0) > 1e-3:
            raise RuntimeError(f"benchmark case {label}: {name} does not compute what pymeta "
                               f"does (relative differences {errors}); its time would not be "
                               "comparable")


def build_case(op: str, key: tuple, mode: str,
               device: str) -> tuple[dict[str, Callable], int | None]:
    """The case's zero-argument callables, checked to agree, and pymeta's bytes moved."""
    case = BUILDERS[op](key, mode, device)
    grad_out = None
    if mode == "fwd+bwd":
        with torch.no_grad():
            grad_out = torch.randn_like(case.impls["pymeta"](*case.inputs))
    _verify(case, grad_out, f"{op} {case_label(op, key)} {mode}")
    return _bind(case.impls, case.inputs, mode, grad_out), case.nbytes


def _randn(device: str, requires_grad: bool, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=device).requires_grad_(requires_grad)


# ---- pairwise_distances -------------------------------------------------------------------


def _sq_cdist(x, y):
    return torch.cdist(x, y) ** 2


def _sq_expansion(x, y):
    """x2 + y2 - 2 x y^T, the add fused into the batched matmul (baddbmm)."""
    x2 = (x * x).sum(-1, keepdim=True)
    y2 = (y * y).sum(-1).unsqueeze(-2)
    return torch.baddbmm(x2 + y2, x, y.mT, alpha=-2)


def _sq_broadcast(x, y):
    return ((x[:, :, None] - y[:, None]) ** 2).sum(-1)


def _pairwise_case(key, mode, device):
    T, Q, N, D = key
    grad = mode == "fwd+bwd"
    x, y = _randn(device, grad, T, Q, D), _randn(device, grad, T, N, D)
    impls = {"pymeta": functools.partial(pairwise_distances, metric="sqeuclidean"),
             "cdist": _sq_cdist, "expansion": _sq_expansion}
    if T * Q * N * D * x.element_size() <= BROADCAST_LIMIT_MIB << 20:
        impls["broadcast"] = _sq_broadcast
    # fwd: x, y read, out written; fwd+bwd adds the upstream grad read, dx and dy written
    passes = 2 if grad else 1
    nbytes = (T * Q * D + T * N * D + T * Q * N) * x.element_size() * passes
    return Case(impls, (x, y), nbytes)


# ---- class_prototypes ---------------------------------------------------------------------


def _index_add_means(z, labels, offsets, C):
    T, S, D = z.shape
    index = (labels + offsets).view(-1)  # task * C + class
    sums = z.new_zeros(T * C, D).index_add_(0, index, z.reshape(T * S, D))
    counts = z.new_zeros(T * C).index_add_(0, index, z.new_ones(T * S))
    return (sums / counts[:, None]).view(T, C, D)


def _onehot_means(z, labels, classes):
    onehot = (labels.unsqueeze(-1) == classes).to(z.dtype)  # [T, S, C]
    return (onehot.mT @ z) / onehot.sum(1).unsqueeze(-1)


def _prototypes_case(key, mode, device):
    """pymeta, index_add and one-hot get labels shuffled per task; reshape-mean assumes
    sorted, balanced shots (sample n * K + k has class n)."""
    T, N, K, D = key
    z = _randn(device, mode == "fwd+bwd", T, N * K, D)
    classes = torch.arange(N, device=device)
    ordered = classes.repeat_interleave(K)
    shuffled = torch.stack([ordered[torch.randperm(N * K, device=device)] for _ in range(T)])
    offsets = torch.arange(T, device=device)[:, None] * N
    impls = {"pymeta": lambda z: class_prototypes(z, shuffled, N),
             "reshape_mean": lambda z: z.view(T, N, K, D).mean(2),
             "index_add": lambda z: _index_add_means(z, shuffled, offsets, N),
             "onehot_bmm": lambda z: _onehot_means(z, shuffled, classes)}
    sorted_labels = ordered.expand(T, -1)
    same_as = {"reshape_mean": lambda z: class_prototypes(z, sorted_labels, N)}
    return Case(impls, (z,), same_as=same_as)


# ---- sgd_step -----------------------------------------------------------------------------


def conv4_shapes(in_channels: int = 1, hidden: int = 64, ways: int = 5) -> list[tuple]:
    """Parameter shapes of the standard conv4: 4 x (Conv2d 3x3 + BatchNorm2d), Linear head."""
    shapes, c = [], in_channels
    for _ in range(4):
        shapes += [(hidden, c, 3, 3), (hidden,), (hidden,), (hidden,)]
        c = hidden
    return shapes + [(ways, hidden), (ways,)]


def _loop_step(params, grads):
    return [p - LR * g for p, g in zip(params, grads)]


def _foreach_step(params, grads):
    """torch._foreach_add broadcasting shared params against [T, ...] grads: as fast as
    adding ``p.expand_as(g)`` and about twice as fast as _foreach_mul + _foreach_add_."""
    return torch._foreach_add(params, grads, alpha=-LR)


def _sgd_case(key, mode, device):
    """Layouts: ``shared`` params [...] with grads [T, ...]; ``stacked`` params and grads
    [T, ...]; ``single`` params and grads [...] (one task, unstacked)."""
    T, layout = key
    grad = mode == "fwd+graph"
    p_lead = (T,) if layout == "stacked" else ()
    g_lead = () if layout == "single" else (T,)
    params = [_randn(device, grad, *p_lead, *s) for s in conv4_shapes()]
    grads = [_randn(device, grad, *g_lead, *s) for s in conv4_shapes()]
    impls = {"pymeta": functools.partial(sgd_step, lr=LR), "loop": _loop_step,
             "foreach": _foreach_step}
    nbytes = sum(p.nbytes + 2 * g.nbytes for p, g in zip(params, grads))  # p, g read; out written
    return Case(impls, (params, grads), nbytes)


# ---- batch_norm_relu_pool -----------------------------------------------------------------


def _torch_tail(x, w, b):
    return F.max_pool2d(F.relu(F.batch_norm(x, None, None, w, b, True)), 2)


def _torch_tail_2d(x, w, b):
    """The same with BatchNorm on the free ``[N*H*W, C]`` view of a channels_last ``x``:
    the batched forward's unfused path."""
    from .learners.functional import _nhwc_batch_norm
    return F.max_pool2d(F.relu(_nhwc_batch_norm(x, None, None, w, b, True)), 2)


def _tail_case(key, mode, device):
    """conv4's block tail on channels_last activations ``[N, C, H, W]``: MAML's query pass
    of 2 tasks at a time has N = 75 images and C = 2 x 64 task-channels."""
    N, C, H, W = key
    grad = mode == "fwd+bwd"
    x = torch.randn(N, C, H, W, device=device).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    impls = {"pymeta": lambda *a: batch_norm_relu_pool(*a)[0], "torch": _torch_tail,
             "torch_2d": _torch_tail_2d}
    return Case(impls, tuple(t.requires_grad_(grad) for t in (x, w, b)))


# ---- suites and goals ---------------------------------------------------------------------

BUILDERS = {"pairwise_distances": _pairwise_case, "class_prototypes": _prototypes_case,
            "sgd_step": _sgd_case, "batch_norm_relu_pool": _tail_case}
KEY_NAMES = {"pairwise_distances": ("T", "Q", "N", "D"), "class_prototypes": ("T", "N", "K", "D"),
             "sgd_step": ("T", "layout"), "batch_norm_relu_pool": ("N", "C", "H", "W")}


def _ratio(minimum, baseline=None):
    """pymeta at least ``minimum`` times faster than ``baseline`` (None: the fastest torch)."""
    return ("ratio", baseline, minimum)


def _bandwidth(fraction, stream):
    """pymeta's achieved GB/s at least ``fraction`` of the measured ``stream`` bandwidth."""
    return ("bandwidth", stream, fraction)


# (op, key, mode) -> goals. The "targets" suite is exactly these cases.
TARGETS = {
    ("pairwise_distances", (32, 75, 5, 1600), "fwd+bwd"): (_ratio(4.0), _bandwidth(0.5, "copy")),
    ("pairwise_distances", (32, 75, 20, 64), "fwd+bwd"): (_ratio(1.5),),
    ("pairwise_distances", (1, 75, 5, 64), "fwd"): (_ratio(2.0),),
    ("pairwise_distances", (1, 75, 5, 64), "fwd+bwd"): (_ratio(1.0),),
    **{("class_prototypes", key, mode): goals
       for key in ((32, 5, 5, 1600), (32, 20, 1, 64))
       for mode, goals in (("fwd+bwd", (_ratio(2.0, "index_add"), _ratio(1.0, "reshape_mean"))),
                           ("fwd", (_ratio(1.2, "reshape_mean"),)))},
    **{("sgd_step", (32, layout), mode): (_ratio(1.1, "foreach"), _bandwidth(0.85, "triad"))
       for layout in ("shared", "stacked") for mode in ("fwd", "fwd+graph")},
    ("sgd_step", (1, "single"), "fwd"): (_ratio(5.0, "loop"),),
}

TARGET_OPS = sorted({op for op, _, _ in TARGETS})

GRIDS = {"pairwise_distances": ((1, 32), (75, 100), (5, 20, 100), (64, 1600)),
         "class_prototypes": ((1, 32), (5, 20, 100), (1, 5), (64, 1600))}


def _full_cases(op: str) -> list[tuple]:
    if op == "batch_norm_relu_pool":  # conv4's first three blocks, and a support pass
        return [(key, mode) for key in ((75, 128, 28, 28), (75, 128, 14, 14), (75, 128, 7, 7),
                                        (5, 128, 28, 28)) for mode in ("fwd", "fwd+bwd")]
    if op == "sgd_step":
        return [((T, layout), mode) for T in (1, 32) for layout in ("shared", "stacked")
                for mode in ("fwd", "fwd+graph")] + [((1, "single"), "fwd")]
    return [(key, mode) for key in itertools.product(*GRIDS[op]) for mode in ("fwd", "fwd+bwd")]


def _cases(suite: str, op_names) -> list[tuple]:
    if suite == "targets":
        untargeted = sorted(set(op_names) - set(TARGET_OPS))
        if untargeted:  # measuring nothing and saying "done" would mislead
            raise ValueError(f"the targets suite has no case for {', '.join(untargeted)}; "
                             f"time it with --suite full")
        return [(op, key, mode) for op, key, mode in TARGETS if op in op_names]
    return [(op, key, mode) for op in OPS if op in op_names for key, mode in _full_cases(op)]


def case_label(op: str, key: tuple) -> str:
    if op == "sgd_step":
        return f"conv4 T={key[0]} {key[1]}"
    return " ".join(f"{n}={v}" for n, v in zip(KEY_NAMES[op], key))


# ---- running --------------------------------------------------------------------------------


def measure_bandwidth(device: str, min_time: float) -> dict[str, float]:
    """STREAM-like copy (bytes: 2 x buffer) and triad (3 x buffer), GB/s of the medians."""
    n = (BANDWIDTH_MIB << 20) // 4
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    times = measure({"copy": lambda: a.copy_(b),
                     "triad": lambda: torch.add(b, c, alpha=3.0, out=a)}, min_time, device)
    return {"copy": 2 * a.nbytes / times["copy"] / 1e9,
            "triad": 3 * a.nbytes / times["triad"] / 1e9}


def _check(goal: tuple, row: dict, bandwidth: dict) -> dict:
    kind, ref, need = goal
    if kind == "ratio":
        base = ref or row["fastest_torch"]
        got = row["times_us"][base] / row["times_us"]["pymeta"]
        text = f">={need:g}x {ref or 'fastest'}: {got:.2f}x"
    else:
        got = row["gbps"] / bandwidth[ref]
        text = f">={need:.0%} {ref}: {got:.0%}"
    return {"kind": kind, "reference": ref or row["fastest_torch"], "min": need, "value": got,
            "passed": got >= need, "text": text}


def _run_case(op: str, key: tuple, mode: str, device: str, min_time: float) -> dict:
    torch.manual_seed(SEED)
    with torch.set_grad_enabled(mode != "fwd"):
        impls, nbytes = build_case(op, key, mode, device)
        seconds = measure(impls, min_time, device)
    us = {k: t * 1e6 for k, t in seconds.items()}
    fastest = min((k for k in us if k != "pymeta"), key=us.get)
    return {"op": op, "case": case_label(op, key), "shape": dict(zip(KEY_NAMES[op], key)),
            "mode": mode, "times_us": us, "fastest_torch": fastest,
            "ratio": us[fastest] / us["pymeta"],
            "gbps": nbytes / seconds["pymeta"] / 1e9 if nbytes else None}


def _score(row: dict, key: tuple, bandwidth: dict) -> None:
    """Adds the row's goals (if any) and whether all of them passed."""
    goals = TARGETS.get((row["op"], key, row["mode"]), ())
    row["goals"] = [_check(g, row, bandwidth) for g in goals]
    row["passed"] = all(g["passed"] for g in row["goals"]) if row["goals"] else None


def _loadavg():
    """The 1-minute load average (None where unknown): a busy shared machine shows here."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict:
    report = info()
    meta = {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "cpu": _cpu_model(),
            "python": platform.python_version(), "torch": torch.__version__,
            "pymeta": report["version"], "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "simd": report["simd"]}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def _check_args(suite: str, op_names, device: str, min_time: float) -> None:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    unknown = sorted(set(op_names) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    cpu_only = sorted(set(op_names) & set(CPU_ONLY_OPS))
    if device != "cpu" and cpu_only:
        raise ValueError(f"{', '.join(cpu_only)} has no {device} kernel to time; leave it out "
                         "of the ops")
    if device == "cuda" and not (torch.cuda.is_available() and info()["cuda_kernels"]):
        raise RuntimeError("device cuda needs a CUDA GPU and pymeta built with CUDA kernels")
    if not (min_time > 0 and math.isfinite(min_time)):
        raise ValueError(f"min_time must be a finite number > 0, got {min_time}")


def run(suite: str = "targets", ops=None, device: str = "cpu", min_time: float = 0.2,
        progress: bool = True, fresh_pages: bool = False) -> dict:
    """Times the cases of ``suite`` for ``ops`` (default: every op the suite has cases for);
    returns the results (see ``save_json``).

    The memory bandwidth (and the load average) is measured before and after the cases;
    bandwidth goals use the higher of the two measurements. Unless ``fresh_pages``, freed
    memory is kept for reuse (:func:`retain_freed_memory`) for the rest of the process.
    """
    if ops is None:
        ops = TARGET_OPS if suite == "targets" else OPS
        ops = [op for op in ops if device == "cpu" or op not in CPU_ONLY_OPS]
    _check_args(suite, ops, device, min_time)
    cases = _cases(suite, ops)
    malloc = "default" if fresh_pages else retain_freed_memory()
    results = {"suite": suite, "device": device, "min_time": min_time,
               "machine": {**machine_info(device), "malloc": malloc},
               "bandwidth_runs": [], "loadavg": [], "rows": []}
    bar = tqdm(total=len(cases) + 2, desc=f"pymeta bench {suite}", unit="case",
               file=sys.stderr, disable=not progress)
    with bar:
        for step in ["bandwidth", *cases, "bandwidth"]:
            if step == "bandwidth":
                results["loadavg"].append(_loadavg())
                results["bandwidth_runs"].append(measure_bandwidth(device, min_time))
            else:
                bar.set_postfix_str(f"{step[0]} {case_label(*step[:2])} {step[2]}")
                results["rows"].append(_run_case(*step, device, min_time))
            bar.update()
    runs = results["bandwidth_runs"]
    results["bandwidth"] = {k: max(r[k] for r in runs) for k in runs[0]}
    for (_, key, _), row in zip(cases, results["rows"]):
        _score(row, key, results["bandwidth"])
    return results


# ---- output -------------------------------------------------------------------------------

_LEFT = {"case", "mode", "fastest", "goals (measured)", "result"}


def _us(value) -> str:
    if value is None:
        return "skip"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _align(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    left = [h in _LEFT for h in table[0]]
    lines = ["  ".join(c.ljust(w) if l else c.rjust(w) for c, w, l in zip(row, widths, left))
             for row in table]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def _op_table(rows: list[dict]) -> list[str]:
    impls = list(dict.fromkeys(k for r in rows for k in r["times_us"]))
    head = ["case", "mode", *(f"{k} us" for k in impls), "fastest", "ratio", "GB/s",
            "goals (measured)", "result"]
    body = [[r["case"], r["mode"], *(_us(r["times_us"].get(k)) for k in impls),
             r["fastest_torch"], f"{r['ratio']:.2f}x",
             "-" if r["gbps"] is None else f"{r['gbps']:.1f}",
             ", ".join(g["text"] for g in r["goals"]) or "-",
             {True: "PASS", False: "FAIL", None: ""}[r["passed"]]] for r in rows]
    return _align([head, *body])


def _contention_warning(results: dict) -> list[str]:
    """A warning when other processes kept CPUs busy at the start (1-minute load average)."""
    m = results["machine"]
    load, threads, cpus = results["loadavg"][0], m["threads"], m.get("cpus")
    if results["device"] != "cpu" or load is None or not cpus or load + threads <= cpus + 0.5:
        return []
    return [f"WARNING: load average {load:.2f} before the run, with {threads} thread(s) on "
            f"{cpus} CPUs: other processes compete for the cores and parallel regions wait for "
            f"them; compare with {'a run under OMP_NUM_THREADS=1 or ' if threads > 1 else ''}"
            "a run on an idle machine"]


def _header(results: dict) -> list[str]:
    m, bw = results["machine"], results["bandwidth"]
    runs = ", ".join(f"{r['copy']:.1f}/{r['triad']:.1f}" for r in results["bandwidth_runs"])
    load = "/".join("?" if v is None else f"{v:.2f}" for v in results["loadavg"])
    gpu = f" | gpu {m['gpu']}" if "gpu" in m else ""
    return [f"pymeta bench: suite {results['suite']}, device {results['device']}, "
            f"min_time {results['min_time']:g} s, {m['date']}",
            f"machine: {m['platform']} | {m['cpu']} | python {m['python']} | torch {m['torch']} "
            f"| pymeta {m['pymeta']} | threads {m['threads']} of {m['cpus']} CPUs | simd "
            f"{m['simd']}{gpu} | malloc {m.get('malloc', 'default')}",
            f"memory bandwidth ({BANDWIDTH_MIB} MiB float32 buffers, best of start/end runs "
            f"{runs}): copy {bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s; "
            f"1-min load average at start/end: {load}",
            "times: median us per call; ratio = fastest torch / pymeta; GB/s = pymeta's "
            "achieved bandwidth"]


def format_table(results: dict) -> str:
    """The results as text: a header (date, machine, bandwidth) and one table per op."""
    lines = _header(results) + _contention_warning(results)
    for op in OPS:
        rows = [r for r in results["rows"] if r["op"] == op]
        if rows:
            lines += ["", op, *_op_table(rows)]
    scored = [r["passed"] for r in results["rows"] if r["passed"] is not None]
    if scored:
        lines += ["", f"goals: {sum(scored)} of {len(scored)} rows pass"]
    return "\n".join(lines)


def save_json(results: dict, path) -> None:
    """Writes the results as JSON atomically (a temporary file, then os.replace)."""
    write_json(path, results)
