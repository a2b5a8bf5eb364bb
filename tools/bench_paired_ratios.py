"""The speed ratios of a `make bench` run read round by round: how much of a ratio's distance
from its target is the machine's drift between rounds.

Each ratio module times its variants in turns, `repeats` rounds after a warm-up, and reports
median(library) / median(floor) in throughput. The two medians can come from different rounds,
so a machine that speeds up or slows down between rounds (this 2-core CPU's matmul rate moves by
10-20% within an hour) moves the ratio although the library and its floor shared every round.
This reads the committed results (`bench/results/*.json`, their `seconds_all`: one time per
round, in the order the rounds ran) and gives, for each ratio with a target, the ratio within
each round (library and floor timed seconds apart), their median and their range, beside the
reported ratio of medians, and the rounds' geometric mean with its 95% interval and what it
says of the target, library / floor >= 0.95 (`bench.common.round_ratios` and `verdict`, which
the modules also record since this tool was written, as `over_floor_by_round`; older runs have
only the times). It times nothing.

    .venv/bin/python tools/bench_paired_ratios.py [RESULTS_DIR]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RATIO_TARGET, round_ratios, verdict


def _evaluators(r: dict) -> dict[str, tuple[list[float], list[float], float, float]]:
    res = r["results"]
    out = {}
    for name in ("IWAE", "AIS"):
        lib, floor = res[name], res[f"{name} floor"]
        out[f"evaluators {name}"] = (
            lib["seconds_all"], floor["seconds_all"],
            lib["decoder_evaluations"], floor["decoder_evaluations"],
        )  # fmt: skip
    return out


def _local_optimizer(r: dict) -> dict[str, tuple[list[float], list[float], float, float]]:
    by = {(e["variant"], e["datapoints"], e["num_samples"]): e for e in r["results"]}
    out = {}
    for variant, b, s in by:
        if variant != "library" or b != 100:
            continue
        lib, floor = by[(variant, b, s)], by[("floor", b, s)]
        out[f"local_optimizer B={b} S={s}"] = (lib["seconds_all"], floor["seconds_all"], 1, 1)
    return out


def _newton_step(r: dict) -> dict[str, tuple[list[float], list[float], float, float]]:
    lib, floor = r["results"]["library"], r["results"]["floor"]
    return {
        "newton_step": (
            lib["seconds_all"],
            floor["seconds_all"],
            lib["steps_of_work"],
            floor["steps_of_work"],
        )
    }


READERS = {"evaluators": _evaluators, "local_optimizer": _local_optimizer,
           "newton_step": _newton_step}  # fmt: skip


def main(results_dir: Path) -> dict:
    out = {}
    for module, read in READERS.items():
        path = results_dir / f"{module}.json"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make bench` (or python -m bench {module})")
        r = json.loads(path.read_text())
        commit = r["machine"]["code"]["commit"]
        for name, args in read(r).items():
            out[name] = {**round_ratios(*args), "commit": commit}
    print(
        "| ratio | reported (ratio of medians) | per round | median per round | geometric mean"
        f" [95% interval] | >= {RATIO_TARGET} |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, p in out.items():
        rounds = ", ".join(f"{v:.3f}" for v in p["per_round"])
        low, high = p["interval"] or (float("nan"), float("nan"))
        print(
            f"| {name} | {p['ratio_of_medians']:.3f} | {rounds} | {p['median_per_round']:.3f} |"
            f" {p['geometric_mean']:.3f} [{low:.3f}, {high:.3f}] |"
            f" {verdict(p['interval'], RATIO_TARGET)} |"
        )
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results"))
