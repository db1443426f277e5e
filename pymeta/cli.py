"""The ``pymeta`` command line. Only this module knows the command line."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from ._info import format_info, info
    print(format_info(info()))
    return 0


def _bench(args) -> int:
    from . import benchmark
    results = benchmark.run(suite=args.suite, ops=args.ops, device=args.device,
                            min_time=args.min_time, progress=not args.no_progress,
                            fresh_pages=args.fresh_pages)
    print(benchmark.format_table(results))
    benchmark.save_json(results, args.json)
    print(f"results written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pymeta", description="pymeta: meta-learning for PyTorch on compiled kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="version, CUDA kernels and archs, threads, SIMD level")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="benchmark the ops against their best torch equivalents",
                       description="Times each op and its torch alternatives side by side in "
                                   "one process and prints medians and ratios.")
    p.add_argument("--suite", choices=["targets", "full"], default="targets",
                   help="targets: the shapes with speed goals (default); full: every shape")
    p.add_argument("--ops", nargs="+", default=["pairwise_distances", "class_prototypes",
                                                "sgd_step"],
                   choices=["pairwise_distances", "class_prototypes", "sgd_step"],
                   help="which ops to time (default: all)")
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"pymeta {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
