"""Full benchmark of pymeta's ops against their best plain-torch equivalents.

    python bench/bench_ops.py [--min-time SEC] [--device cpu|cuda]

Runs every shape of ``pymeta.benchmark``'s "full" suite, prints the tables and writes the
results to bench/out/ops.json (see bench/RESULTS.md). ``python -m pymeta bench`` runs the
shorter "targets" suite.
"""
import argparse
import os

from pymeta import benchmark

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "ops.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=0.2, metavar="SEC",
                        help="minimum seconds timed per implementation and case (default 0.2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="glibc's default malloc (page faults on every big output)")
    args = parser.parse_args()
    results = benchmark.run(suite="full", device=args.device, min_time=args.min_time,
                            fresh_pages=args.fresh_pages)
    print(benchmark.format_table(results))
    benchmark.save_json(results, OUT)
    print(f"results written to {OUT}")


if __name__ == "__main__":
    main()
