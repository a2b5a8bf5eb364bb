"""Command line: `python -m experiments NAME [--preset quick|paper] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys
import time

from amortjax.runner import available_experiments, run_experiment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Run an amortjax experiment into a fresh results folder.",
        epilog=f"experiments: {', '.join(available_experiments())}",
    )
    parser.add_argument("name", help="experiment name")
    parser.add_argument("--preset", default="quick", help="preset (default: quick)")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    parser.add_argument("--resume", default=None, help="results folder of a run to continue")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_intermixed_args(argv)
    start = time.perf_counter()
    try:
        workdir, _ = run_experiment(
            args.name,
            preset=args.preset,
            overrides=args.overrides,
            results_root=args.results,
            resume=args.resume,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - start) / 60
    print(f"done in {minutes:.1f} min; results in {workdir} (report: {workdir / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
