"""Command line: `python -m experiments NAME [--preset quick|paper] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from amortjax.data.builders import DataNotFoundError
from amortjax.data.loading import DamagedDataError
from amortjax.inference.training import TrainingDivergedError
from experiments.runner import available_experiments, run_experiment
from experiments.watchdog import Watchdog, stall_seconds_from_env

EXIT_BAD_OPTION = 2  # an unknown or out-of-range option, a folder of another experiment
EXIT_MISSING = 3  # a file or folder that is not there (raw data, a resume folder)
EXIT_DIVERGED = 4  # training diverged (NaN or infinite loss)
EXIT_PERMISSION = 5  # a folder that cannot be written
EXIT_DAMAGED = 6  # prepared data that cannot be read
# EXIT_HUNG = 7 (experiments.watchdog): no CPU used for AMORTJAX_STALL_SECONDS, a deadlock
_EXPECTED = {
    TrainingDivergedError: ("training diverged", EXIT_DIVERGED),
    FileNotFoundError: ("missing file", EXIT_MISSING),
    DataNotFoundError: ("missing raw data", EXIT_MISSING),
    PermissionError: ("cannot write", EXIT_PERMISSION),
    DamagedDataError: ("damaged prepared data", EXIT_DAMAGED),
}


def _classify(err: Exception) -> tuple[str, int]:
    for cls, found in _EXPECTED.items():
        if isinstance(err, cls):
            return found
    return "bad option or input", EXIT_BAD_OPTION


def _newest_folder(parent: Path, since: float) -> Path | None:
    """The newest results folder in `parent` made at or after `since` (None: none)."""
    found = [p for p in parent.glob("*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Run an amortjax experiment into a fresh results folder.",
        epilog=f"experiments: {', '.join(available_experiments())}",
    )
    parser.add_argument("name", help="experiment name")
    parser.add_argument("--preset", default=None, help="preset (default: quick)")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    parser.add_argument("--resume", default=None, help="results folder of a run to continue")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None and args.preset is not None:
        print(
            "error: --preset does not apply with --resume: a resumed run keeps its folder's "
            "preset (change single options with key=value)",
            file=sys.stderr,
        )
        return EXIT_BAD_OPTION
    start = time.perf_counter()
    try:
        stall = stall_seconds_from_env()
        began = time.time()

        def resume_hint() -> str:
            folder = args.resume or _newest_folder(Path(args.results) / args.name, began)
            if folder is None:
                return ""
            return f"Resume with: python -m experiments {args.name} --resume {folder}"

        with Watchdog(stall, describe=resume_hint):
            workdir, _ = run_experiment(
                args.name,
                preset=args.preset or "quick",
                overrides=args.overrides,
                results_root=args.results,
                resume=args.resume,
            )
    except (ValueError, *_EXPECTED) as err:
        if args.debug:
            raise
        kind, status = _classify(err)
        print(f"error ({kind}): {err}", file=sys.stderr)
        if status == EXIT_DIVERGED:
            print(
                "the run's checkpoints hold its last finite state; a smaller learning_rate is a "
                f"new run: python -m experiments {args.name} --results <folder> "
                "learning_rate=... (a resume keeps the options that decide what is trained)",
                file=sys.stderr,
            )
        return status
    minutes = (time.perf_counter() - start) / 60
    print(f"done in {minutes:.1f} min; results in {workdir} (report: {workdir / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
