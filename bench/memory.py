"""Peak memory of the local optimizer (`fit_local`) and of IWAE-k (`evaluate_bounds`).

Both process datapoints in chunks so that their memory is bounded by the chunk, not by the
number of datapoints N: `evaluate_bounds` evaluates `batch_size` datapoints x `sample_chunk`
draws at once, `fit_local` optimizes `batch_size` datapoints at once (and then scores them with
`evaluate_bounds` under the same `batch_size`). This benchmark measures it, on the decoder of
`bench/evaluators.py` (Cremer et al.'s z_dim-200-200-784 ELU MLP, Bernoulli likelihood, random
init as NumPyro's SVI initializes it) and the statically binarized MNIST test set:

- every measurement runs in a fresh Python process (`python -m bench.memory --worker SPEC`),
  so that nothing compiled or cached by an earlier one is counted or hidden;
- in that process, after the imports, the data (N test images), the parameters and the
  variational parameters are loaded, the resident set size is the baseline; the peak resident
  set size (Linux `VmHWM`, reset to the current size through `/proc/self/clear_refs` before
  each phase; elsewhere `getrusage(RUSAGE_SELF).ru_maxrss`, which cannot be reset) is read
  (1) after a first call on one chunk of datapoints, which compiles, and (2) after the call on
  all N datapoints. Both are reported in MiB above the baseline;
- the size XLA says the compiled chunk function needs (`jax.jit(f).lower(...).compile()
  .memory_analysis()`: temporaries, arguments, outputs) is read for the same shapes.

Three configurations per estimator show what the memory depends on: (N small, chunk small),
(N large, chunk small) and (N small, chunk large). A calibration row allocates a NumPy array of
known size in the same kind of process, as a check of the method. Most of the default run's
time is IWAE-5000 on 10,000 points: 50 million decoder passes, about 4 minutes on 2 CPU cores
at the rate `bench/evaluators.py` measures;
`fit_local` runs 50 Adam steps per datapoint (one block, no early stopping) and a 100-draw
final ELBO/IWAE, whose memory is that of any larger number of draws (it draws 100 at a time).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 2.0**20
RESULT_MARKER = "BENCH_MEMORY_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent


# --- reading the resident set size of this process -------------------------------------------


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (e.g. "VmRSS", "VmHWM"), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _ru_maxrss_mib() -> float:
    """The process's peak resident set size by getrusage (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024.0


def current_rss_mib() -> float:
    """The resident set size of this process now, in MiB (the peak where it cannot be read)."""
    kib = _status_kib("VmRSS")
    return kib / 1024.0 if kib is not None else _ru_maxrss_mib()


def peak_rss_mib() -> float:
    """The peak resident set size of this process since start or the last `reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    return kib / 1024.0 if kib is not None else _ru_maxrss_mib()


def reset_peak_rss() -> bool:
    """Resets the peak resident set size to the current size (Linux >= 4.0); True if it did."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


# --- the measurement, in a fresh process --------------------------------------------------------


def _memory_stats(compiled: Any) -> dict[str, float] | None:
    """XLA's memory analysis of a compiled function, in MiB (None where the backend has none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # best effort: not every backend implements it
        return None
    if stats is None:
        return None
    out = {}
    for key in ("temp", "argument", "output", "alias", "generated_code"):
        value = getattr(stats, f"{key}_size_in_bytes", None)
        if value is not None:
            out[f"{key}_mib"] = value / MIB
    out["total_mib"] = (
        out.get("temp_mib", 0.0)
        + out.get("argument_mib", 0.0)
        + out.get("output_mib", 0.0)
        - out.get("alias_mib", 0.0)
    )
    return out


def _setup(spec: dict[str, Any]) -> dict[str, Any]:
    """Loads the data and parameters of a measurement; returns its calls and their notes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if spec["what"] == "calibration":
        size = int(spec["mib"] * MIB) // 8

        def allocate():
            a = np.ones(size)  # writes every page
            return float(a[::4096].sum())

        return {"warm": lambda: None, "full": allocate, "analysis": dict, "data": "none"}

    from amortjax.engine import datapoint_keys
    from amortjax.estimators import bounds_batch
    from amortjax.evaluation.bounds import evaluate_bounds
    from amortjax.families import DiagonalGaussian
    from amortjax.guides.local import given_params_guide
    from amortjax.inference.local import QStarSettings, _optimize, fit_local
    from amortjax.models import vae_model
    from amortjax.nets import MLP
    from bench.common import load_binarized
    from bench.local_optimizer import decoder_params

    n, chunk, z_dim, x_dim = spec["n"], spec["chunk"], spec["z_dim"], spec["x_dim"]
    hidden = tuple(spec["hidden"])
    x_np, data_note = load_binarized("test", n, x_dim, spec["data"], spec["seed"])
    x = jnp.asarray(x_np)
    del x_np
    model = vae_model(MLP(hidden, x_dim, "elu"), z_dim=z_dim)
    params = decoder_params(model, x=x[:2], x_dim=x_dim, hidden=hidden[0], z_dim=z_dim,
                            seed=spec["seed"])  # fmt: skip
    family = DiagonalGaussian()
    guide = given_params_guide(family)
    key = jax.random.key(spec["seed"] + 1)

    if spec["what"] == "iwae":
        k, batch = spec["iwae_samples"], min(spec["iwae_batch"], n)
        lam = family.pack(jnp.zeros((n, z_dim)), jnp.full((n, z_dim), 0.5))
        # Sliced up front, so that no copy of the data is made inside a measured call.
        inputs = {batch: (x[:batch], lam[:batch]), n: (x, lam)}

        def iwae(rows: int):
            xr, lam_r = inputs[rows]
            return lambda: evaluate_bounds(
                model, guide, params, xr, key, num_samples=k, batch_size=batch,
                sample_chunk=chunk, guide_args=(lam_r,),
            ).iwae  # fmt: skip

        def analysis():
            keys = datapoint_keys(key, jnp.arange(batch))
            compiled = bounds_batch.lower(
                model, guide, k, min(chunk, k), params, keys, x[:batch], lam[:batch]
            ).compile()
            return {"bounds_batch": _memory_stats(compiled)}

        jax.block_until_ready((inputs, params))
        return {"warm": iwae(batch), "full": iwae(n), "analysis": analysis, "data": data_note}

    if spec["what"] == "local":
        steps, samples, final = spec["local_steps"], spec["local_samples"], spec["final_samples"]
        batch = min(chunk, n)
        lr = 1e-3
        inputs = {batch: x[:batch], n: x}  # sliced up front: no copy inside a measured call

        def local(rows: int):
            xr = inputs[rows]
            return lambda: fit_local(
                model, params, xr, key, family=family, z_dim=z_dim, num_samples=samples,
                learning_rate=lr, block_size=steps, patience=2**30, max_steps=steps,
                final_samples=final, batch_size=batch, method="adam",
            ).elbo  # fmt: skip

        def analysis():
            lam0 = jnp.zeros((batch, family.num_params(z_dim)))
            fit = _optimize.lower(
                model, family, "z", "adam", samples, steps,
                QStarSettings(method="adam").monitor_for(family), batch, False,
                QStarSettings().stl,
                params, x[:batch], lam0, key, jnp.float32(lr), jnp.int32(2**30),
                jnp.int32(steps), jnp.float32(0.0), jnp.float32(0.3), jnp.int32(0),
            ).compile()  # fmt: skip
            keys = datapoint_keys(key, jnp.arange(batch))
            final_eval = bounds_batch.lower(
                model, guide, final, min(100, final), params, keys, x[:batch], lam0
            ).compile()
            return {
                "fit_chunk": _memory_stats(fit),
                "final_bounds_batch": _memory_stats(final_eval),
            }

        jax.block_until_ready((inputs, params))
        return {"warm": local(batch), "full": local(n), "analysis": analysis, "data": data_note}

    raise ValueError(f"unknown measurement {spec['what']!r}")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measures one configuration in this process (meant to be a fresh one; see `run`).

    Returns:
        Baseline and peak resident set sizes in MiB, the peaks above the baseline of the first
        (compiling) call on one chunk and of the call on all N datapoints, their wall times and
        XLA's memory analysis of the compiled chunk functions.
    """
    from bench.common import time_call

    setup = _setup(spec)
    baseline = current_rss_mib()
    reset = reset_peak_rss()
    peak_before = peak_rss_mib()
    warm_s = time_call(setup["warm"])
    peak_warm = peak_rss_mib()
    if reset:
        reset_peak_rss()
    before_run = current_rss_mib()
    run_s = time_call(setup["full"])
    peak_run = peak_rss_mib()
    return {
        "spec": spec,
        "data": setup["data"],
        "peak_reset": reset,
        "peak_source": "VmHWM" if _status_kib("VmHWM") is not None else "ru_maxrss",
        "baseline_rss_mib": baseline,
        "peak_at_baseline_mib": peak_before,
        "first_chunk_peak_mib": peak_warm - baseline,
        "run_peak_mib": peak_run - baseline,
        "rss_before_run_mib": before_run,
        "run_growth_mib": peak_run - before_run,
        "peak_mib": max(peak_warm, peak_run) - baseline,
        "process_peak_rss_mib": _ru_maxrss_mib(),
        "first_chunk_seconds_incl_compile": warm_s,
        "run_seconds": run_s,
        "xla_memory_analysis": setup["analysis"](),
    }


def measure_in_subprocess(spec: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    """Runs `measure(spec)` in a fresh `python -m bench.memory --worker` process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--worker", json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError(
        f"memory worker for {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


def _xla_main(result: dict[str, Any]) -> dict[str, float] | None:
    """XLA's analysis of the function that bounds the memory: the largest of the compiled ones."""
    stats = [s for s in (result["xla_memory_analysis"] or {}).values() if s]
    return max(stats, key=lambda s: s["total_mib"]) if stats else None


def run(
    quick: bool = False,
    *,
    datapoints: tuple[int, int] | None = None,
    chunks: tuple[int, int] | None = None,
    estimators: tuple[str, ...] = ("iwae", "local"),
    iwae_samples: int | None = None,
    iwae_batch: int = 100,
    local_steps: int | None = None,
    local_samples: int = 1,
    final_samples: int = 100,
    hidden: tuple[int, ...] = (200, 200),
    z_dim: int = 50,
    x_dim: int = 784,
    calibration_mib: float | None = None,
    data: str = "binarized_mnist",
    seed: int = 0,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its result (see the module docstring).

    Args:
        quick: small problems, for tests and smoke runs.
        datapoints: (small N, large N) (default 1,000 and 10,000; quick 200 and 1,000).
        chunks: (small, large) chunk: IWAE's `sample_chunk` (draws at once, with `iwae_batch`
            datapoints), `fit_local`'s `batch_size` (datapoints at once) (default 100 and
            1,000; quick 10 and 100).
        estimators: of "iwae" and "local".
        iwae_samples: k of IWAE-k (default 5000, quick 100).
        iwae_batch: IWAE's `batch_size` (datapoints per compiled call).
        local_steps: Adam steps of every datapoint (one block, no early stop; default 50, quick
            10).
        local_samples: S, draws per datapoint per step of `fit_local`.
        final_samples: draws of `fit_local`'s final ELBO/IWAE (its memory is that of 100: the
            evaluation draws at most 100 at once).
        hidden, z_dim, x_dim: the decoder z_dim-hidden-x_dim (ELU).
        calibration_mib: size of the NumPy array of the calibration row (default 256, quick 64).
        data: "binarized_mnist" (random data if it cannot be loaded) or "random".
        seed: seed of the parameters, data and draws.
        timeout: seconds allowed to each measurement's process.

    Returns:
        A dict with the sizes, one entry per measurement (`measurements`), a `summary` per
        estimator (peak at large N over peak at small N; XLA's temporaries at the large chunk
        over the small chunk) and a `table`.
    """
    small_n, large_n = datapoints or ((200, 1000) if quick else (1000, 10_000))
    small_c, large_c = chunks or ((10, 100) if quick else (100, 1000))
    k = iwae_samples or (100 if quick else 5000)
    steps = local_steps or (10 if quick else 50)
    calibration_mib = calibration_mib or (64 if quick else 256)
    unknown = set(estimators) - {"iwae", "local"}
    if unknown:
        raise ValueError(f"unknown estimators {sorted(unknown)}; choose 'iwae' or 'local'")
    common = dict(hidden=list(hidden), z_dim=z_dim, x_dim=x_dim, data=data, seed=seed)

    def configs_of(what: str) -> list[tuple[int, int]]:
        # the chunk as the library applies it: at most k draws, at most N datapoints
        def clip(n: int, c: int) -> int:
            return min(c, k) if what == "iwae" else min(c, n)

        pairs = ((small_n, small_c), (large_n, small_c), (small_n, large_c))
        return [(n, clip(n, c)) for n, c in pairs]

    specs: list[dict[str, Any]] = [{"what": "calibration", "mib": calibration_mib}]
    for what in estimators:
        for n, chunk in configs_of(what):
            spec = {"what": what, "n": n, "chunk": chunk, **common}
            if what == "iwae":
                spec.update(iwae_samples=k, iwae_batch=iwae_batch)
            else:
                spec.update(
                    local_steps=steps, local_samples=local_samples, final_samples=final_samples
                )
            specs.append(spec)

    measurements = [measure_in_subprocess(spec, timeout) for spec in specs]
    names = {
        "iwae": f"IWAE-{k} (evaluate_bounds, {iwae_batch} datapoints x sample_chunk draws)",
        "local": f"fit_local ({steps} Adam steps, S={local_samples}, batch_size = chunk, "
        f"final {final_samples}-sample ELBO/IWAE)",
    }
    rows: list[dict[str, Any]] = []
    for m in measurements:
        spec = m["spec"]
        if spec["what"] == "calibration":
            rows.append(
                {
                    "measurement": f"calibration: np.ones of {spec['mib']:.0f} MiB",
                    "peak over baseline (MiB)": m["peak_mib"],
                    "run seconds": m["run_seconds"],
                }
            )
            continue
        xla = _xla_main(m)
        rows.append(
            {
                "measurement": names[spec["what"]],
                "N": spec["n"],
                "chunk": spec["chunk"],
                "baseline RSS (MiB)": m["baseline_rss_mib"],
                "first chunk, incl. compile (MiB)": m["first_chunk_peak_mib"],
                "all N (MiB)": m["run_peak_mib"],
                "growth in all-N call (MiB)": m["run_growth_mib"],
                "peak over baseline (MiB)": m["peak_mib"],
                "XLA temp (MiB)": xla["temp_mib"] if xla else "n/a",
                "XLA temp+args+out (MiB)": xla["total_mib"] if xla else "n/a",
                "run seconds": m["run_seconds"],
            }
        )

    summary: dict[str, Any] = {}
    for what in estimators:
        by_config = {(m["spec"]["n"], m["spec"]["chunk"]): m for m in measurements
                     if m["spec"]["what"] == what}  # fmt: skip
        configs = configs_of(what)
        small, large_data, large_chunk = (by_config[c] for c in configs)
        xs, xl = _xla_main(small), _xla_main(large_chunk)
        analysis = small["xla_memory_analysis"] or {}
        summary[what] = {
            "datapoints": [small_n, large_n],
            "chunks": [configs[0][1], configs[2][1]],
            "peak_mib_small_n": small["peak_mib"],
            "peak_mib_large_n": large_data["peak_mib"],
            "peak_ratio_large_n_over_small_n": large_data["peak_mib"] / small["peak_mib"],
            "run_peak_ratio_large_n_over_small_n": large_data["run_peak_mib"]
            / small["run_peak_mib"],
            "peak_mib_large_chunk": large_chunk["peak_mib"],
            "xla_temp_mib_small_chunk": xs["temp_mib"] if xs else None,
            "xla_temp_mib_large_chunk": xl["temp_mib"] if xl else None,
            "xla_temp_ratio_large_chunk_over_small": (
                xl["temp_mib"] / xs["temp_mib"] if xs and xl and xs["temp_mib"] > 0 else None
            ),
            "xla_largest_function": max(
                (name for name in analysis if analysis[name]),
                key=lambda name: analysis[name]["total_mib"],
                default=None,
            ),
        }
    calibration = measurements[0]
    reset = all(m["peak_reset"] for m in measurements)
    notes = [
        next((m["data"] for m in measurements[1:]), "data: none"),
        f"decoder {z_dim}-{'-'.join(map(str, hidden))}-{x_dim} ELU, Bernoulli, random init "
        "(as bench/evaluators.py); IWAE's q: N(0, 0.5^2 I) for every datapoint; fit_local: "
        f"Adam 1e-3 from N(0, I), {steps} steps in one block, no early stopping, S="
        f"{local_samples}, then its {final_samples}-sample ELBO/IWAE under the same batch_size",
        "each row: a fresh Python process; baseline = resident set size after imports, data, "
        "parameters; MiB above it at the peak of the first call on one chunk (it compiles) and "
        "of the call on all N datapoints that follows; peak over baseline = the larger of the "
        "two; growth = the all-N call's peak above the resident size just before it; "
        + (
            "peaks from VmHWM, reset through /proc/self/clear_refs before each phase"
            if reset
            else "peaks from ru_maxrss/VmHWM, which could not be reset: they include the imports"
        ),
        "XLA: `jax.jit(f).lower(...).compile().memory_analysis()` of the compiled chunk "
        "function (fit_local: the larger of its fit chunk and its final-evaluation batch)",
        f"calibration: an np.ones array of {calibration_mib:.0f} MiB measures "
        f"{calibration['peak_mib']:.1f} MiB above the baseline",
    ]
    for what, s in summary.items():
        notes.append(
            f"{what}: peak over baseline {s['peak_mib_small_n']:.0f} MiB at N={small_n}, "
            f"{s['peak_mib_large_n']:.0f} MiB at N={large_n} "
            f"(x{s['peak_ratio_large_n_over_small_n']:.2f} for x{large_n / small_n:.0f} "
            f"datapoints), {s['peak_mib_large_chunk']:.0f} MiB with chunk {s['chunks'][1]}; XLA "
            f"temporaries of {s['xla_largest_function']} {s['xla_temp_mib_small_chunk'] or 0:.1f}"
            f" MiB at chunk {s['chunks'][0]} vs {s['xla_temp_mib_large_chunk'] or 0:.1f} MiB at "
            f"chunk {s['chunks'][1]}"
        )
    return {
        "sizes": {
            "datapoints": [small_n, large_n],
            "chunks": [small_c, large_c],
            "estimators": list(estimators),
            "iwae_samples": k,
            "iwae_batch": iwae_batch,
            "local_steps": steps,
            "local_samples": local_samples,
            "final_samples": final_samples,
            "decoder": [z_dim, *hidden, x_dim],
            "calibration_mib": calibration_mib,
        },
        "method": "fresh process per row; peak RSS minus the RSS after imports and data",
        "calibration": calibration,
        "measurements": measurements[1:],
        "summary": summary,
        "table": {"columns": list(rows[1]) if len(rows) > 1 else list(rows[0]), "rows": rows},
        "notes": notes,
    }


def _worker_main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "--worker":
        raise SystemExit("usage: python -m bench.memory --worker SPEC_JSON")
    spec = json.loads(argv[1])
    start = time.perf_counter()
    result = measure(spec)
    result["process_seconds"] = time.perf_counter() - start
    print(RESULT_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
