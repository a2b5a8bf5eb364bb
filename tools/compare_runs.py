"""Compare the numbers of two experiment results folders, e.g. the same run on two commits.

    python tools/compare_runs.py RESULTS_A RESULTS_B

RESULTS_A and RESULTS_B are results roots (`--results` of `python -m experiments`) holding one
run per experiment, or two run folders of one experiment. Every number of the two `metrics.json`
is compared for equality; timings (keys naming seconds, wall time, milliseconds, the device) and
the stored config records (whose option names may differ between commits) are skipped. Figures
are compared byte for byte. Prints each difference and a line per experiment; exits 1 when a
number differs. Used to show that a refactor changed no result (issue 15: the four experiments
at tiny settings on f98055f and on its end, 0 differences).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

SKIPPED = ("config", "info", "seconds", "wall", "ms_per", "_ms", "device", "time", "date")


def differences(a, b, path: str) -> list[str]:
    """Every place where the JSON values a and b differ, skipping the `SKIPPED` keys."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if any(s in key for s in SKIPPED):
                continue
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'b' if key not in a else 'a'}")
            else:
                out += differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} entries against {len(b)}"]
        return [d for i, (u, v) in enumerate(zip(a, b, strict=True)) for d in
                differences(u, v, f"{path}[{i}]")]  # fmt: skip
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _runs(root: Path) -> dict[str, Path]:
    """experiment name -> run folder (a root of experiments, or one run's folder)."""
    if (root / "metrics.json").exists():
        return {root.parent.name: root}
    return {exp.name: run for exp in sorted(root.iterdir()) if exp.is_dir()
            for run in sorted(exp.iterdir())[-1:]}  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    runs_a, runs_b = (_runs(Path(p)) for p in argv)
    failed = False
    for name in sorted(set(runs_a) & set(runs_b)):
        a, b = runs_a[name], runs_b[name]
        found = differences(*(json.loads((r / "metrics.json").read_text()) for r in (a, b)), name)
        for line in found:
            print(line)
        figures = sorted(p.name for p in (a / "figures").glob("*.png"))
        differ = [f for f in figures if not (b / "figures" / f).exists() or
                  hashlib.sha256((a / "figures" / f).read_bytes()).digest()
                  != hashlib.sha256((b / "figures" / f).read_bytes()).digest()]  # fmt: skip
        print(f"{name}: {len(found)} numeric differences; figures differing: {differ or 'none'}")
        failed |= bool(found)
    for name in sorted(set(runs_a) ^ set(runs_b)):
        print(f"{name}: in only one of the two folders")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
