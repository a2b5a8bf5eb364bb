"""The budget-doubling check of q* from `bench gap_fullset`, alone (without the 10,000-digit
decomposition): the quick preset's MNIST FFG and Flow models (trained, or reloaded from
`bench/results/gap_fullset_models/`), 100 seeded test digits, q* with the quick preset's
settings and with every budget doubled, both scored on the same 5,000 common random draws per
digit. The same digits, keys and settings as the benchmark. Writes
`bench/results/gap_fullset_doubling.json` and prints one line per family.

    python tools/qstar_doubling.py
"""

import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortjax.data import load_data
from bench.common import RESULTS_DIR
from bench.gap_fullset import MODEL_DIR, _doubling, _train, seeded_test_digits
from experiments.amortization_gap import Config


def main(points: int = 100) -> dict:
    config = Config(datasets=("mnist",))
    data = load_data("mnist", seed=config.seed)
    x = seeded_test_digits(config, data, points)
    out = {}
    for family in ("diagonal", "flow"):
        setup, params, _ = _train(config, family, data, MODEL_DIR)
        start = time.perf_counter()
        d = out[family] = _doubling(config, setup, params, x, jax.random.key(config.seed + 21))
        print(
            f"{family}: doubling moved mean L[q*] by {d['change']:+.3f} ± {d['change_se']:.3f} "
            f"nats on {points} digits ({d['elbo_qstar_quick']:.3f} -> "
            f"{d['elbo_qstar_doubled']:.3f}; {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    path = Path(RESULTS_DIR) / "gap_fullset_doubling.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
