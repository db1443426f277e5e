"""The ``pymeta`` command line. Only this module knows the command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

METRIC_ALGOS = ["protonet", "matching", "siamese", "relation"]
GRADIENT_ALGOS = ["maml", "fomaml", "metasgd", "anil", "reptile"]
ALGOS = METRIC_ALGOS + GRADIENT_ALGOS
DATASETS = ["digits", "omniglot", "folder", "sinusoid"]
ON_DISK_DATA = ("omniglot", "folder")  # the others are bundled or generated: --root is moot
BENCH_OPS = ["pairwise_distances", "class_prototypes", "sgd_step", "batch_norm_relu_pool"]

# The accuracy protocol of bench/RESULTS.md, as one preset: Omniglot small1 with rotations
# (and small random warps) for training, a held-out fifth of small1 for validation, the
# small2-only alphabets for test.
PRESETS = {
    "omniglot": dict(data="omniglot", protocol="small", rotations=True, augment=True, ways=60,
                     shots=1, queries=5, eval_ways=20, eval_shots=1, test_settings=[[5, 1], [20, 1]],
                     steps=3500, val_every=500, val_episodes=200, lr_step=1000),
    # MAML's sinusoid regression (Finn et al. 2017, section 5.1): K=10 in training, meta-batch
    # 25, inner rate 0.01; tested at K=5 with 100 query points after 1, 5 and 10 steps. Outer
    # rate 3e-3: at the paper's 1e-3 the 5-step MSE stayed at 0.39-0.48 over four seeds. The
    # meta-gradient's norm is clipped to 1 (its median is about 1.6): without, batches of a
    # few sharp tasks steer Adam, and 3 of 6 seeds missed the paper (2 of 8 with it), two with
    # a test task that blew up. The checkpoint is chosen on 10,000 validation tasks: a few
    # hundred miss the rare task that diverges after 10 steps (bench/RESULTS.md, "Sinusoid
    # regression").
    "sinusoid": dict(algo="maml", data="sinusoid", backbone="mlp", shots=10, queries=10,
                     meta_batch=25, eval_shots=5, eval_queries=100, eval_steps=[1, 5, 10],
                     learner_kwargs={"inner_lr": 0.01, "steps": 1, "test_steps": 10},
                     lr=3e-3, grad_clip=1.0, steps=70000, schedule="none", val_every=2500,
                     val_episodes=10000, log_every=100),
    "digits": dict(data="digits", ways=5, shots=5, queries=10, eval_ways=5, eval_shots=1,
                   test_settings=[[5, 5]], steps=300, val_every=100, val_episodes=100,
                   test_episodes=1000, lr_step=200),
}


# Gradient learners on the omniglot preset: MAML's 5-way 1-shot episodes (the zero-initialised,
# non-meta-learned head still serves the 20-way tests) and 4500 meta-batches (MAML: 6000,
# below), within the budget of about 30 minutes per learner on the idle 2-vCPU machine of
# bench/RESULTS.md. Test-time steps stay at the one trained step: more scored lower on
# validation and test.
GRADIENT_PRESETS = {
    "omniglot": dict(ways=5, queries=5, meta_batch=8, eval_ways=5, steps=4500, lr_step=3000,
                     val_episodes=100),
}
# Per-learner additions. MAML takes MAML++'s learned per-step rates, a cosine schedule and
# 6000 meta-batches, which the fused BatchNorm-ReLU-pool kernel runs in the 22 minutes that
# 4500 took before it: 94.03 at 5-way 1-shot (4500 steps: 93.30-93.65 over three runs).
ALGO_PRESETS = {
    ("omniglot", "maml"): dict(schedule="cosine", steps=6000, learner_kwargs={"lslr": True}),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: no usage dump, a pointer to --help instead."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _info(args) -> int:
    from ._info import format_info, info
    print(format_info(info()))
    return 0


def _check_writable_file(flag: str, path: str) -> str:
    """Refuses an output path that cannot be written, before the work that fills it; returns
    it with ``~`` expanded."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file")
    parent = target.resolve().parent
    try:  # a real file: os.access passes root everywhere, /sys and /proc included
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: {parent} is not a writable directory "
                         f"({e.strerror})") from None
    return str(target)


def _bench(args) -> int:
    from . import benchmark
    args.json = _check_writable_file("--json", args.json)
    results = benchmark.run(suite=args.suite, ops=args.ops, device=args.device,
                            min_time=args.min_time, progress=not args.no_progress,
                            fresh_pages=args.fresh_pages)
    print(benchmark.format_table(results))
    benchmark.save_json(results, args.json)
    print(f"results written to {args.json}")
    return 0


def _config_from_args(args, resumed: dict | None = None):
    """The run config: presets under the options given; with ``resumed`` (a checkpoint's
    config), that config under them instead, so ``--resume --out DIR`` needs no options."""
    from .engine import RunConfig
    preset = args.preset or ("sinusoid" if args.data == "sinusoid" else None)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
               if getattr(args, f.name, None) is not None}  # unset options keep the preset's
    if args.no_rotations:
        options["rotations"] = False
    if options.get("root"):  # runs are evaluated from other directories too
        options["root"] = str(Path(options["root"]).expanduser().resolve())
    for name, pairs in (("learner_kwargs", args.learner_opt),
                        ("backbone_kwargs", args.backbone_opt)):
        if pairs:
            options[name] = dict(_key_value(p) for p in pairs)
    fields: dict = {}
    layers = (PRESETS.get(preset, {}),  # most general first, the command line last
              GRADIENT_PRESETS.get(preset, {}) if args.algo in GRADIENT_ALGOS else {},
              ALGO_PRESETS.get((preset, args.algo), {})) if resumed is None else (resumed,)
    for layer in (*layers, options):
        _merge(fields, layer)
    if fields.get("device") == "cuda":
        _require_cuda()
    _no_ways_for_regression(fields.get("data"), args.ways or args.eval_ways)
    _only_applicable(fields.get("data", RunConfig.data), fields.get("backbone", "conv4"), args)
    _step_options_apply(fields.get("schedule", RunConfig.schedule), args, resumed)
    return RunConfig(**fields).validate()


def _step_options_apply(schedule: str, args, resumed: dict | None) -> None:
    """Refuses --lr-step/--lr-gamma where the schedule (maybe a preset's) ignores them."""
    if schedule != "step" and (args.lr_step is not None or args.lr_gamma is not None):
        origin = "" if args.schedule else " (the run's)" if resumed else " (the preset's)"
        raise ValueError(f"--lr-step/--lr-gamma apply to --schedule step only; this run's "
                         f"schedule is {schedule}{origin}")


def _only_applicable(data: str, backbone: str, args) -> None:
    """Refuses options the data ignores: a run must not silently differ from its command."""
    from .engine.setup import REGRESSION_DATA
    given = {"--image-size": args.image_size is not None, "--augment": args.augment is not None,
             "--protocol": args.protocol is not None, "--no-rotations": args.no_rotations,
             "--root": args.root is not None}
    unused = [] if data == "omniglot" else ["--protocol", "--no-rotations"]
    if data not in ON_DISK_DATA:
        unused.append("--root")
    if data in REGRESSION_DATA:
        unused += ["--image-size", "--augment"]
        if backbone != "mlp":
            raise ValueError(f"{data} inputs are single numbers: the backbone must be mlp, "
                             f"got {backbone!r}")
    ignored = [name for name in unused if given[name]]
    if ignored:
        raise ValueError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not "
                         f"apply to --data {data}")


def _no_ways_for_regression(data, ways) -> None:
    from .engine.setup import REGRESSION_DATA
    if data in REGRESSION_DATA and ways:
        raise ValueError(f"{data} is a regression task: --ways/--eval-ways do not apply")


def _merge(fields: dict, layer: dict) -> None:
    """``layer`` on top of ``fields``; constructor kwargs (dicts) merge key by key."""
    for key, value in layer.items():
        fields[key] = {**fields.get(key, {}), **value} if isinstance(value, dict) else value


_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False,
          "none": None, "null": None}


def _key_value(text: str) -> tuple:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, lists), as a bool or
    None for true/false/yes/no/on/off/none/null in any case, else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    if value.strip().lower() in _WORDS:
        return key, _WORDS[value.strip().lower()]
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _device(args) -> str:
    device = args.device or "cpu"
    if device == "cuda":
        _require_cuda()
    return device


def _require_cuda() -> None:
    import torch
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was given, but torch sees no CUDA device")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _score(t: dict) -> str:
    """One evaluation as text: setting, then accuracy or MSE with its 95% CI (none from a
    single episode), and how many tasks diverged if any did."""
    from .engine.evaluate import divergence_note
    ways = f"{t['ways']}-way " if t.get("ways") else ""
    steps = f", {_count(t['steps'], 'inner step')}" if "steps" in t else ""
    q = t["queries"]
    head = f"{ways}{t['shots']}-shot ({q} {'query' if q == 1 else 'queries'}{steps})"
    n = t["episodes"]
    if "mse" in t:
        ci = f" ± {t['ci95']:.3f} (95% CI, {_count(n, 'task')})" if n > 1 else " (1 task)"
        return f"{head}: MSE {t['mse']:.3f}{ci}{divergence_note(t)}"
    ci = (f" ± {100 * t['ci95']:.2f}% (95% CI, {_count(n, 'episode')})" if n > 1
          else " (1 episode)")
    return f"{head}: accuracy {100 * t['acc']:.2f}%{ci}{divergence_note(t)}"


def _print_results(res: dict, out: Path) -> None:
    for t in res["tests"]:
        print(f"test {_score(t)}")
    m = res["metric"]
    best = f"MSE {res['best_mse']:.3f}" if m == "mse" else f"accuracy {100 * res['best_acc']:.2f}%"
    print(f"best validation {best} at step {res['best_step']}; "
          f"{_count(res['tasks_seen'], 'training task')}")
    print(f"checkpoints: {out / 'best.pt'}, {out / 'last.pt'}")
    print(f"learning curves: {res['plot']}; metrics: {out / 'metrics.csv'}")


def _train(args) -> int:
    from .engine import process_group, train
    from .engine.distributed import check_device, from_process_0
    _prepare_process(args.threads)
    with process_group() as rank:
        # process 0 reads the run directory (the others may not see it) and tells the others
        out, resumed = from_process_0(lambda: _run_plan(args))
        cfg = _config_from_args(args, resumed)
        check_device(cfg.device)
        res = train(cfg, out, resume=args.resume, progress=not args.no_progress,
                    log=print if rank == 0 else lambda *a: None)
        if rank == 0:
            _print_results(res, out)
    return 0


def _run_plan(args) -> tuple[Path, dict | None]:
    """(the run directory, the config of the run to resume or None)."""
    from .engine import held_checkpoints, load_checkpoint
    if args.out:
        out = Path(args.out)
    else:
        fresh = _config_from_args(args)
        out = Path(f"runs/{fresh.algo}-{fresh.data}")
    _check_run_dir(out)
    held = held_checkpoints(out)
    if held and not args.resume:
        raise ValueError(f"{out} already holds a run ({held[0].name}); pass --resume to "
                         f"continue it or choose another --out")
    if args.resume and not held:  # a job that always passes --resume starts this way
        print(f"pymeta train: --resume: {out} holds no checkpoint yet; starting a new run",
              file=sys.stderr)
    # with --resume, options not given again keep the run's values
    return out, load_checkpoint(held[0])["config"] if args.resume and held else None


def _check_run_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")


def _demo(args) -> int:
    from .engine import RunConfig, held_checkpoints, train
    _prepare_process(args.threads)
    cfg = RunConfig(algo="protonet", **PRESETS["digits"], device=_device(args))
    out = Path(args.out)
    _check_run_dir(out)
    print("pymeta demo: ProtoNet (conv4) meta-trained on digits 0-4 (scikit-learn's 8x8 "
          "digits, upsampled to 28x28), tested on the unseen digits 5-9")
    res = train(cfg, out, resume=bool(held_checkpoints(out)),  # a checkpoint is never overwritten
                progress=not args.no_progress)
    _print_results(res, out)
    return 0


def _load_learner(args) -> tuple:
    """(the checkpoint's learner, the device it is on)."""
    from .engine import load
    _prepare_process(args.threads)
    device = _device(args)
    return load(args.checkpoint, device), device


def _eval(args) -> int:
    from .engine import build_splits, evaluate_split
    learner, device = _load_learner(args)
    cfg = learner.config
    cfg.device = str(device)
    _no_ways_for_regression(cfg.data, args.ways)
    if args.root:
        if cfg.data not in ON_DISK_DATA:
            raise ValueError(f"--root does not apply: {args.checkpoint} was trained on "
                             f"{cfg.data}, which is bundled or generated")
        cfg.root = args.root
    data = build_splits(cfg)
    for steps in args.steps or [None]:
        res = evaluate_split(learner, cfg, data, ways=args.ways, shots=args.shots, steps=steps,
                             progress=not args.no_progress, split=args.split,
                             episodes=args.episodes, queries=args.queries)
        print(f"{args.split} {_score(res)}")
    return 0


def _eval_runs(args) -> int:
    from .data.runs import load_runs
    from .engine import evaluate_runs
    if args.json:  # checked first: not after a whole evaluation
        args.json = _check_writable_file("--json", args.json)
    learner, device = _load_learner(args)
    pre = learner.preprocessing
    if pre.get("dataset") != "omniglot":
        raise ValueError(f"{args.checkpoint} was trained on {pre.get('dataset')!r}; one-shot "
                         f"runs need an Omniglot-trained learner")
    runs = load_runs(args.runs, image_size=pre["image_size"])
    res = evaluate_runs(learner, runs, device)
    for name, err in res["runs"].items():
        print(f"{name}: {err:.1f}% error")
    print(f"mean error over {len(runs)} runs: {res['error']:.2f}%")
    if args.json:
        from ._atomic import write_json
        write_json(args.json, res)
    return 0


def _one_process_unless_training(command: str) -> None:
    from .engine.distributed import launched_world
    if command != "train" and launched_world() > 1:
        raise ValueError(f"pymeta {command} runs in one process; of the commands, only "
                         f"train shares its work among processes (torchrun)")


def _prepare_process(n: int | None) -> None:
    from ._malloc import retain_freed_memory
    retain_freed_memory()  # the CLI owns this process: reuse freed pages (see _malloc)
    if n:
        import torch
        torch.set_num_threads(n)


def _int_at_least(low: int):
    """An argparse type: an int >= low (argparse then names the option in its error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's "invalid int value" message for non-numbers
    return parse


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _add_common(p, device=True) -> None:
    if device:
        p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="where to run (default: cpu)")
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="meta-train a few-shot learner",
                       description="Meta-train a learner on episodes, validating on held-out "
                                   "classes; writes best/last checkpoints, metrics.csv/jsonl and "
                                   "curves.png to --out, then tests the best checkpoint.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named protocol; each option "
                   "given overrides its value, and --learner-opt/--backbone-opt only the keys "
                   "they name (omniglot: the bench/RESULTS.md accuracy protocol, 5-way "
                   "episodes for the gradient learners, MAML++ rates and a cosine schedule for "
                   "maml; a preset also sets the validation and test ways and shots)")
    p.add_argument("--algo", choices=ALGOS, help="learner (default protonet)")
    p.add_argument("--backbone", choices=["conv4", "resnet12", "mlp"],
                   help="default conv4 (mlp for --data sinusoid)")
    p.add_argument("--learner-opt", action="append", metavar="KEY=VALUE",
                   help="a learner constructor option, repeatable: e.g. fce=true "
                        "scale=1 learn_scale=false (matching), metric=cosine (protonet), "
                        "loss=contrastive (siamese), inner_lr=0.4 steps=1 test_steps=3 "
                        "(maml, ...), task_chunk=1|null, checkpoint_inner=true (maml)")
    p.add_argument("--backbone-opt", action="append", metavar="KEY=VALUE",
                   help="a backbone constructor option, repeatable: e.g. hidden=32 (conv4), "
                        "channels=[4,8,8,16] (resnet12), hidden=[40,40] (mlp)")
    p.add_argument("--data", choices=DATASETS, help="default digits (embedded, no download); "
                   "sinusoid: MAML's sine regression, with the sinusoid preset's settings")
    p.add_argument("--root", help="data directory (default: $PYMETA_DATA, else "
                                  "$XDG_CACHE_HOME/pymeta, by default ~/.cache/pymeta)")
    p.add_argument("--protocol", choices=["small", "lake", "vinyals"],
                   help="omniglot split protocol (default small)")
    p.add_argument("--no-rotations", action="store_true",
                   help="omniglot: no 90/180/270-degree rotated training classes")
    p.add_argument("--image-size", type=POSITIVE, help="images are resized to this square size")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random small rotation/scale/shift of every training image (on in "
                        "the omniglot preset)")
    for name, help_ in (("ways", "N classes per task"), ("shots", "K support images per class"),
                        ("queries", "Q query images per class"),
                        ("meta-batch", "tasks per outer step"),
                        ("eval-ways", "N for validation and test (default: --ways, or "
                                      "the preset's)"),
                        ("eval-shots", "K for validation and test (default: --shots, or "
                                       "the preset's)"),
                        ("eval-queries", "Q for validation and test (default 15)"),
                        ("steps", "outer steps"), ("lr-step", "multiply the rate by --lr-gamma "
                                                   "every this many steps (schedule step)"),
                        ("val-every", "validate and checkpoint every this many steps"),
                        ("val-episodes", "validation episodes"),
                        ("test-episodes", "final test episodes (default 1000)"),
                        ("checkpoint-every", "also checkpoint every this many steps"),
                        ("log-every", "log training metrics every this many steps"),
                        ("seed", "run seed"), ("workers", "DataLoader workers for episodes")):
        counts = ("seed", "workers", "checkpoint-every")
        p.add_argument(f"--{name}", type=NON_NEGATIVE if name in counts else POSITIVE, help=help_)
    p.add_argument("--eval-steps", type=NON_NEGATIVE, nargs="+", metavar="N",
                   help="gradient learners: test after each of these numbers of inner steps "
                        "(default: the learner's test_steps; 0: the meta-initialisation)")
    p.add_argument("--lr", type=float, help="outer learning rate (default 1e-3)")
    p.add_argument("--lr-gamma", type=float, metavar="FACTOR",
                   help="the step schedule's factor every --lr-step steps (default 0.5)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="outer optimizer (default adam)")
    p.add_argument("--weight-decay", type=float, metavar="L2",
                   help="the outer optimizer's L2 penalty on the meta-parameters (default 0)")
    p.add_argument("--grad-clip", type=float, metavar="NORM",
                   help="clip the meta-gradient's global norm to NORM before each outer step "
                        "(default: none; the sinusoid preset: 1)")
    p.add_argument("--schedule", choices=["step", "cosine", "none"],
                   help="outer learning-rate schedule (default step; cosine in the omniglot "
                        "preset's maml)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype")
    p.add_argument("--out", help="run directory (default runs/<algo>-<data>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out; options not given again keep its values")
    _add_common(p)
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pymeta",
                     description="pymeta: meta-learning for PyTorch on compiled kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("demo", help="the quick-start job: ProtoNet on the embedded digits",
                       description="Meta-train ProtoNet on digits 0-4 and test it on the unseen "
                                   "digits 5-9 (no download; about 1.5 minutes on 2 CPU cores).")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    _add_common(p)
    p.set_defaults(func=_demo, device="cpu")

    _add_train(sub)

    p = sub.add_parser("eval", help="accuracy (or regression MSE) ± 95%% CI of a checkpoint "
                                    "on held-out tasks")
    p.add_argument("--checkpoint", required=True, help="a .pt file written by pymeta train")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--root", help="data directory, if it moved since training")
    p.add_argument("--ways", type=POSITIVE)
    p.add_argument("--shots", type=POSITIVE)
    p.add_argument("--queries", type=POSITIVE)
    p.add_argument("--episodes", type=POSITIVE, default=1000, help="default 1000")
    p.add_argument("--steps", type=NON_NEGATIVE, nargs="+", metavar="N",
                   help="gradient learners: inner steps at test time, one score per value "
                        "(default: the learner's test_steps; 0: the meta-initialisation)")
    _add_common(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("eval-runs", help="Lake et al.'s Omniglot one-shot runs: mean error %%",
                       description="Score an Omniglot-trained metric learner on one-shot runs "
                                   "(runNN/ folders with class_labels.txt, or a zip of them).")
    p.add_argument("--runs", required=True, help="folder or zip of runNN/ folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", help="also write the per-run errors here")
    _add_common(p)
    p.set_defaults(func=_eval_runs)

    p = sub.add_parser("info", help="version, CUDA kernels and archs, threads, SIMD level")
    p.set_defaults(func=_info)

    _add_bench(sub)
    return parser


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the ops against their best torch equivalents",
                       description="Times each op and its torch alternatives side by side in "
                                   "one process and prints medians and ratios.")
    p.add_argument("--suite", choices=["targets", "full"], default="targets",
                   help="targets: the shapes with speed goals (default); full: every shape")
    p.add_argument("--ops", nargs="+", choices=BENCH_OPS,
                   help="which ops to time (default: every op the suite has cases for)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--min-time", type=float, default=0.2, metavar="SEC",
                   help="minimum seconds spent per measurement (default 0.2)")
    p.add_argument("--json", metavar="PATH", default="pymeta-bench.json",
                   help="where to write the results as JSON (default: pymeta-bench.json)")
    p.add_argument("--fresh-pages", action="store_true",
                   help="keep glibc's default of returning freed memory to the OS, so that "
                        "big outputs pay page faults on every call (default: memory is reused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _one_process_unless_training(args.command)
        return args.func(args)
    except BrokenPipeError:  # `pymeta info | head -1`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit flush
        return 1
    except (ValueError, RuntimeError, OSError, KeyError, IndexError) as e:
        msg = " ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__
        print(f"pymeta {args.command}: error: {msg}", file=sys.stderr)
        if os.environ.get("PYMETA_DEBUG"):
            raise
        return 2
    except KeyboardInterrupt:
        print(f"interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """How to continue an interrupted run, if it wrote a checkpoint."""
    from .engine import held_checkpoints
    out = getattr(args, "out", None)
    if args.command not in ("train", "demo") or not out:
        return ""
    if not held_checkpoints(out):
        return f"; no checkpoint in {out} yet, so nothing to resume: run the command again"
    return (f"; continue from its last checkpoint with: pymeta {args.command} --out {out}"
            f"{' --resume' * (args.command == 'train')}")
