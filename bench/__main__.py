"""Runs the benchmarks: `python -m bench [--quick] [--out-dir DIR] [NAME ...]`.

`BENCHMARKS` is the registry: each name is a module `bench.<name>` exposing
`run(quick: bool, **sizes) -> dict`. Add a benchmark by writing its module and listing it here.

One benchmark runs in this process; several (`make bench` runs all) run one after another, each
in a fresh Python process: a module's timings then never depend on what an earlier one
compiled or left in memory, and one module's failure costs only its own result: the others
still run and write theirs, and the command ends with exit status 1, naming the failed ones.
(Measured: the ten modules in one process died in the last, `paper_presets`, after 49 minutes,
with LLVM failing to map memory for newly compiled code, "Cannot allocate memory"; each result
records its process's peak memory and memory mappings, `process`: see docs/BENCHMARKS.md.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import RESULTS_DIR, run_and_save

BENCHMARKS: dict[str, str] = {
    "train_step": "training steps/s of Trainer.run_epoch vs a hand-written JAX/Flax/Optax floor",
    "local_optimizer": "datapoint-steps/s of fit_local's vectorized Adam vs a one-at-a-time loop",
    "newton_step": "datapoint-steps/s of fit_local's Newton q* (Gaussian default) vs a hand floor",
    "sa_step": "ms per SA-VAE / VAE+SVI training step vs a VAE step, beside their FLOP ratios",
    "evaluators": "decoder evaluations/s and GFLOP/s of IWAE-k and AIS vs the matmul peak",
    "memory": "peak memory (RSS and XLA's analysis) of fit_local and IWAE-5000 on 10,000 points",
    "scaling": "time vs datapoints N, z_dim and samples of IWAE-k and fit_local, log-log slopes",
    "gap_fullset": "the gap decomposition of all 10,000 MNIST test digits, q* budget doubling",
    "gap_preset": "wall time of `make experiment NAME=amortization_gap` (quick preset)",
    "paper_presets": "s per training epoch of each paper preset and its projected training time",
}


def main(argv: list[str] | None = None) -> None:
    """Parses the command line and runs the chosen benchmarks (all by default)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="few repeats, small problems")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where results are written")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    if len(names) == 1:
        print(f"== {names[0]}: {BENCHMARKS[names[0]]}", flush=True)
        _, report = run_and_save(names[0], quick=args.quick, out_dir=args.out_dir)
        print(report, flush=True)
        return
    failed = []
    for name in names:
        command = [sys.executable, "-m", "bench", name, "--out-dir", args.out_dir]
        if subprocess.run(command + (["--quick"] if args.quick else [])).returncode != 0:
            failed.append(name)
            print(f"== {name} FAILED; going on with the others", file=sys.stderr, flush=True)
    if failed:
        sys.exit(
            f"{len(failed)} of {len(names)} benchmarks failed: {failed} (their output is above; "
            f"the others' results are in {args.out_dir}); rerun one with `python -m bench NAME`"
        )


if __name__ == "__main__":
    main()
