"""Command line: `python -m experiments NAME [--preset quick|paper] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
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
EXIT_PERMISSION = 5  # a path that cannot be written (permissions, a full or read-only disk, a file)
EXIT_DAMAGED = 6  # prepared data that cannot be read
# EXIT_HUNG = 7 (experiments.watchdog): no CPU used for AMORTJAX_STALL_SECONDS, a deadlock
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
_EXPECTED = {
    TrainingDivergedError: ("training diverged", EXIT_DIVERGED),
    FileNotFoundError: ("missing file", EXIT_MISSING),
    DataNotFoundError: ("missing raw data", EXIT_MISSING),
    PermissionError: ("cannot write", EXIT_PERMISSION),
    DamagedDataError: ("damaged prepared data", EXIT_DAMAGED),
    OSError: ("cannot write", EXIT_PERMISSION),
}


def _classify(err: Exception) -> tuple[str, int]:
    for cls, found in _EXPECTED.items():
        if isinstance(err, cls):
            return found
    return "bad option or input", EXIT_BAD_OPTION


def _cannot_write(err: OSError, resume: str | None) -> str:
    """The message for an operating-system error on a path: the runner raises its own missing
    files without one (a resume folder without config.json), so an error naming a path is one
    met while making or writing the results (--results naming a file, a read-only or full
    disk), whatever its errno."""
    where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    fix = (
        f"make {resume} writable, or copy it somewhere writable and resume the copy"
        if resume is not None
        else "choose another --results"
    )
    return f"cannot write {where} ({err.strerror or err}): {fix}"


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
    workdirs: list[Path] = []  # the folder this run writes, once the runner has made it

    def announce(workdir: Path) -> None:
        workdirs.append(workdir)
        print(f"results folder: {workdir}", flush=True)

    def resume_hint() -> str:
        # this run's own folder: another run may be writing a newer one under the same root
        if not workdirs or not workdirs[0].exists():
            return ""
        return f"Resume with: python -m experiments {args.name} --resume {workdirs[0]}"

    try:
        stall = stall_seconds_from_env()
        with Watchdog(stall, describe=resume_hint):
            workdir, _ = run_experiment(
                args.name,
                preset=args.preset or "quick",
                overrides=args.overrides,
                results_root=args.results,
                resume=args.resume,
                on_workdir=announce,
            )
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = resume_hint()
        kept = (
            f"everything saved so far (checkpoints, finished results) is in {workdirs[0]}. {hint}"
            if hint
            else "nothing was saved, so nothing was kept (the fresh results folder was removed)"
        )
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, *_EXPECTED) as err:
        if args.debug:
            raise
        if isinstance(err, OSError) and err.filename is not None:
            print(f"error (cannot write): {_cannot_write(err, args.resume)}", file=sys.stderr)
            return EXIT_PERMISSION
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
    status = main()
    if status == EXIT_INTERRUPTED:
        # XLA may still be compiling on its own threads, and an interpreter shutdown under them
        # crashed (rc -11 after the message): leave at once, everything saved already is saved.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
