"""Three checks of q*'s Gaussian and flow defaults on the quick preset's MNIST models (trained, or
reloaded from `bench/results/gap_fullset_models/`), on seeded test digits:

1. `newton_frame`: the diagonal Gaussian's Newton q* (`QStarSettings()` defaults) from the
   encoder's output with the Hessian in z's frame, "auto" (the default) and "eigen", in turns
   (each twice, the second warm); seconds, steps, the certificate, and L[q*] of "auto" and
   "eigen" against "z" on 5,000 common draws.
2. `certify_retries`: the same q*, from the encoder and from N(0, I), without continuation
   (0) and with the default (2): how many digits the certificate rejected, how many were
   continued, and what they gained (common draws).
3. `flow_start`: the Flow model's q* with the quick preset's settings from the encoder's output,
   from "diagonal" (the default without init) and from "full_rank"; L[q*] of each pair on
   2,000 common draws.

Writes `bench/results/qstar_mnist_checks.json` and prints one line per fit; `--sections` runs
some of them and replaces only theirs in the file.

    python tools/qstar_mnist_checks.py [--digits 200] [--flow-digits 50] \
        [--sections newton_frame,certify_retries,flow_start]
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortjax.data import load_data
from amortjax.evaluation.bounds import evaluate_pair, mean_and_stderr
from amortjax.guides import encode
from amortjax.inference.local import QStarSettings, fit_local
from bench.common import RESULTS_DIR
from bench.gap_fullset import MODEL_DIR, _train, seeded_test_digits
from experiments.amortization_gap import Config, qstar_settings


def _fit(setup, params, x, key, settings, init, z_dim):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the record says what a warning would)
        q = fit_local(setup.model, params, x, key, settings, family=setup.family, init=init,
                      z_dim=z_dim, final_samples=0)  # fmt: skip
    record = {
        "seconds": time.perf_counter() - start,
        "steps_mean": float(q.steps.mean()),
        "rule_or_certificate": q.convergence()["text"],
    }
    if q.newton_gap is not None:
        record["rejected"] = int(np.sum(~(q.newton_gap <= settings.certify_tol)))
        record["newton_gap_max"] = float(np.max(q.newton_gap))
    if q.continued is not None:
        record["continued"] = int(np.sum(q.continued))
    return q, record


def _pair(setup, params, x, a, b, key, draws) -> dict:
    pair = evaluate_pair(setup.model, params, x, a.params, b.params, key, family=setup.family,
                         num_samples=draws)  # fmt: skip
    diff = np.asarray(pair.elbo_b, np.float64) - np.asarray(pair.elbo_a, np.float64)
    mean, se = mean_and_stderr(diff)
    return {"difference": mean, "se": se, "per_point": diff}


SECTIONS = ("newton_frame", "certify_retries", "flow_start")


def main(digits: int, flow_digits: int, sections: tuple[str, ...] = SECTIONS) -> dict:
    config = Config(datasets=("mnist",))
    data = load_data("mnist", seed=config.seed)
    key = jax.random.key(config.seed + 31)
    out: dict = {"digits": digits, "flow_digits": flow_digits}
    if {"newton_frame", "certify_retries"} & set(sections):
        setup, params, _ = _train(config, "diagonal", data, MODEL_DIR)
        x = seeded_test_digits(config, data, digits)
        lam = np.asarray(encode(setup.encoder, params, jnp.asarray(x)))
        base = QStarSettings().for_family(setup.family)
        if "newton_frame" in sections:
            out["newton_frame"] = _newton_frame(setup, params, x, lam, key, base)
        if "certify_retries" in sections:
            out["certify_retries"] = _certify_retries(setup, params, x, lam, key, base, config)
    if "flow_start" in sections:
        out["flow_start"] = _flow_start(config, data, flow_digits, key)
    return out


def _newton_frame(setup, params, x, lam, key, base) -> dict:
    frames, out = {}, {}
    for turn in range(2):
        for frame in ("z", "auto", "eigen"):
            q, rec = _fit(setup, params, x, key, base._replace(newton_frame=frame), lam, None)
            frames[frame] = q
            out[f"{frame}_{'cold' if turn == 0 else 'warm'}"] = rec
            print("newton_frame", frame, rec, flush=True)
    for frame in ("auto", "eigen"):
        pair = _pair(setup, params, x, frames["z"], frames[frame], jax.random.fold_in(key, 1),
                     5000)  # fmt: skip
        pair.pop("per_point")
        out[f"{frame}_minus_z"] = pair
        print(f"L[q*] {frame} - z", pair, flush=True)
    return out


def _certify_retries(setup, params, x, lam, key, base, config) -> dict:
    out = {}
    for start, init in (("encoder", lam), ("prior", None)):
        fits = {}
        for retries in (0, base.certify_retries):
            settings = base._replace(certify_retries=retries)
            fits[retries], rec = _fit(setup, params, x, key, settings, init, config.z_dim)
            out[f"{start}_{retries}"] = rec
            print("certify_retries", start, retries, rec, flush=True)
        pair = _pair(setup, params, x, fits[0], fits[base.certify_retries],
                     jax.random.fold_in(key, 1), 5000)  # fmt: skip
        continued = fits[base.certify_retries].continued
        pair["gain_of_the_continued"] = pair.pop("per_point")[continued].round(3).tolist()
        out[f"{start}_gain"] = pair
        print("continuation's gain", start, pair, flush=True)
    return out


def _flow_start(config, data, flow_digits, key) -> dict:
    setup, params, _ = _train(config, "flow", data, MODEL_DIR)
    x = seeded_test_digits(config, data, flow_digits)
    lam = np.asarray(encode(setup.encoder, params, jnp.asarray(x)))
    flow = qstar_settings(config, setup.family)
    starts, out = {}, {}
    for name, init, settings in (
        ("encoder", lam, flow),
        ("diagonal", None, flow),
        ("full_rank", None, flow._replace(flow_start="full_rank")),
    ):
        starts[name], rec = _fit(setup, params, x, key, settings, init, config.z_dim)
        out[name] = rec
        print("flow_start", name, rec, flush=True)
    for a, b in (("encoder", "diagonal"), ("encoder", "full_rank"), ("diagonal", "full_rank")):
        pair = _pair(setup, params, x, starts[a], starts[b], jax.random.fold_in(key, 1), 2000)
        pair.pop("per_point")
        out[f"{b}_minus_{a}"] = pair
        print(f"L[q*] {b} - {a}", pair, flush=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=200)
    parser.add_argument("--flow-digits", type=int, default=50)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    sections = tuple(args.sections.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    path = RESULTS_DIR / "qstar_mnist_checks.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    result = main(args.digits, args.flow_digits, sections)
    if previous.get("digits") == args.digits and previous.get("flow_digits") == args.flow_digits:
        result = {**previous, **result}  # the other sections' results, made on the same digits
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)
