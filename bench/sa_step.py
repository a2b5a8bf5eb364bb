"""The cost of one SA-VAE training step against a plain VAE step, measured and counted.

Same architecture for all (x_dim-hidden-z_dim relu MLP encoder, z_dim-hidden-x_dim decoder,
Bernoulli likelihood, one sample, batch B), all trained by `Trainer(..., objective="elbo")`:

- VAE: `amortized_guide`;
- SA-VAE: `semi_amortized_guide(..., mode="sa")` with K refinement steps, the loss's gradient
  flowing back through all K steps (reverse over reverse, each step under `jax.checkpoint`);
- VAE+SVI: the same guide with `mode="svi"` (no gradient through the steps; the encoder learns
  from its own ELBO).

ms/step is the median over repeated `Trainer.run_epoch` epochs after a compile warm-up, the
variants taking turns. Beside each time ratio (variant / VAE) is the FLOP ratio, counted two
ways: analytically from the matmuls (`FLOP_FORMULA`), and from XLA's cost analysis of the
compiled `svi.update` step. XLA's analysis counts the body of a `while` loop (the K-step `scan`
and its reverse) once whatever its trip count, so the XLA count for K steps is extrapolated:
flops(K) = flops(K=0) + K * (flops(K=2) - flops(K=0)), with K=0 the same guide without steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from amortjax.guides import amortized_guide
from amortjax.guides.semi_amortized import semi_amortized_guide
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.training import Trainer
from amortjax.models import vae_model
from amortjax.nets import MLP
from bench.common import median
from bench.train_step import load_train

FLOP_FORMULA = (
    "E = 2*B*(x_dim*hidden + hidden*2*z_dim), D = 2*B*(z_dim*hidden + hidden*x_dim) (forward"
    " matmul FLOPs of encoder and decoder); VAE step = 3*(E + D) (forward, input and weight"
    " gradients); SA step = 3*(E + D) + K*8*D: each inner step is a gradient of the local ELBO"
    " in lambda = decoder forward + input-gradient backward = 2D, and the outer backward"
    " recomputes it under jax.checkpoint (2D) and transposes its 4 matmuls, each giving two"
    " cotangents since lambda and the decoder weights both need them (4D); SVI step = 3E + 2D"
    " (the encoder learns from its own ELBO: encoder forward and backward, decoder forward and"
    " input gradient) + 3D (the decoder learns from ELBO(lambda_K)) + K*2*D (inner steps,"
    " forward only) = 3E + 5D + 2*K*D; elementwise work and the optimizer ignored"
)


def analytic_flops(
    mode: str, num_steps: int, *, batch: int, x_dim: int, hidden: int, z_dim: int
) -> float:
    """FLOPs of one training step by `FLOP_FORMULA`; mode "vae", "sa" or "svi"."""
    enc = 2 * batch * (x_dim * hidden + hidden * 2 * z_dim)
    dec = 2 * batch * (z_dim * hidden + hidden * x_dim)
    if mode == "vae":
        return 3.0 * (enc + dec)
    if mode == "sa":
        return 3.0 * (enc + dec) + num_steps * 8.0 * dec
    if mode == "svi":
        return 3.0 * enc + 5.0 * dec + num_steps * 2.0 * dec
    raise ValueError(f"unknown mode {mode!r}")


def xla_step_flops(trainer: Trainer, state: Any, xb: jax.Array) -> float | None:
    """XLA's FLOP count of one compiled `svi.update` (None if the backend gives none)."""
    try:
        update = jax.jit(lambda s, x: trainer.svi.update(s, x, n_data=trainer.n_data))
        cost = update.lower(state.svi_state, xb).compile().cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # cost analysis is best effort
        return None


def run(
    quick: bool = False,
    *,
    num_steps: tuple[int, ...] | None = None,
    modes: tuple[str, ...] = ("sa", "svi"),
    steps_per_epoch: int | None = None,
    batch_size: int = 100,
    x_dim: int = 784,
    hidden: int = 400,
    z_dim: int = 20,
    step_size: float = 0.01,
    repeats: int | None = None,
    xla_flops: bool = True,
    data: str = "binarized_mnist",
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its result (see the module docstring).

    Args:
        quick: fewer steps and repeats, for tests and smoke runs.
        num_steps: the K values (default 5, 10, 20; quick 2, 4).
        modes: semi-amortized modes to time ("sa", "svi").
        steps_per_epoch: training steps per timed epoch (default 50, quick 5).
        batch_size: minibatch size B.
        x_dim, hidden, z_dim: the architecture.
        step_size: the refinement's SGD step size (momentum 0.5, clip 5). The default is the
            semi_amortized experiment's 0.01: Kim et al.'s nominal 1 makes this model's SA-VAE
            training diverge within a few hundred steps (K=10: loss 17,871 after 200 steps,
            K=20: NaN), so the timed steps would not be the ones a user runs.
        repeats: timed epochs per variant after a warm-up epoch (default 3, quick 1).
        xla_flops: also count FLOPs with XLA's cost analysis (compiles each step once more).
        data: "binarized_mnist" (random data if it cannot be loaded) or "random".
        seed: seed of the initializations and data order.

    Returns:
        A dict with sizes, per-variant timings and FLOP counts, the ratios to the VAE, the
        formula, and a `table`.
    """
    num_steps = num_steps or ((2, 4) if quick else (5, 10, 20))
    steps_per_epoch = steps_per_epoch or (5 if quick else 50)
    repeats = repeats or (1 if quick else 3)
    n_data = steps_per_epoch * batch_size
    x_np, data_note = load_train(n_data, x_dim, data, seed)
    x_train = jnp.asarray(x_np)
    model = vae_model(MLP((hidden,), x_dim, "relu"), z_dim=z_dim, likelihood="bernoulli")

    def encoder() -> MLP:
        return MLP((hidden,), 2 * z_dim, "relu")

    def guide(mode: str, k: int) -> Callable[..., None]:
        if mode == "vae":
            return amortized_guide(encoder(), x_dim=x_dim)
        return semi_amortized_guide(
            encoder(), model, x_dim=x_dim, num_steps=k, mode=mode, step_size=step_size
        )

    def trainer(mode: str, k: int) -> Trainer:
        return Trainer(
            model,
            guide(mode, k),
            make_optimizer(1e-3),
            n_data=n_data,
            batch_size=batch_size,
            objective="elbo",
        )

    variants = [("vae", 0)] + [(mode, k) for mode in modes for k in num_steps]
    trainers = {v: trainer(*v) for v in variants}
    states = {v: t.init(jax.random.key(seed), x_train) for v, t in trainers.items()}

    sizes = dict(batch=batch_size, x_dim=x_dim, hidden=hidden, z_dim=z_dim)
    xb = x_train[:batch_size]
    xla: dict[tuple[str, int], float | None] = {v: None for v in variants}
    xla_raw: dict[str, float | None] = {}
    for mode in ("vae", *modes) if xla_flops else ():
        if mode == "vae":
            xla[("vae", 0)] = xla_raw["vae"] = xla_step_flops(
                trainers[("vae", 0)], states[("vae", 0)], xb
            )
            continue
        raw = {}
        for k in (0, 2):
            t = trainer(mode, k)
            raw[k] = xla_step_flops(t, t.init(jax.random.key(seed), x_train), xb)
            xla_raw[f"{mode}_K{k}"] = raw[k]
        for k in num_steps:
            ok = raw[0] is not None and raw[2] is not None
            xla[(mode, k)] = raw[0] + k * (raw[2] - raw[0]) if ok else None

    times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    compile_s: dict[tuple[str, int], float] = {}
    last_loss: dict[tuple[str, int], float] = {}
    for epoch in range(repeats + 1):  # epoch 0 compiles; the variants take turns
        for v, t in trainers.items():
            start = time.perf_counter()
            states[v], losses = jax.block_until_ready(t.run_epoch(states[v], x_train))
            seconds = time.perf_counter() - start
            if epoch == 0:
                compile_s[v] = seconds
            else:
                times[v].append(seconds)
            last_loss[v] = float(jnp.mean(losses))
    diverged = [v for v, loss in last_loss.items() if not math.isfinite(loss)]

    base_ms = 1e3 * median(times[("vae", 0)]) / steps_per_epoch
    base_flops = analytic_flops("vae", 0, **sizes)
    results: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for mode, k in variants:
        ms = 1e3 * median(times[(mode, k)]) / steps_per_epoch
        flops = analytic_flops(mode, k, **sizes)
        xla_count = xla[(mode, k)]
        time_ratio = ms / base_ms
        flop_ratio = flops / base_flops
        xla_ratio = (
            xla_count / xla[("vae", 0)]
            if xla_count is not None and xla[("vae", 0)] is not None
            else None
        )
        entry = {
            "mode": mode,
            "num_steps": k,
            "ms_per_step": ms,
            "seconds_per_epoch_all": times[(mode, k)],
            "first_epoch_seconds_incl_compile": compile_s[(mode, k)],
            "analytic_flops": flops,
            "xla_flops": xla_count,
            "time_ratio": time_ratio,
            "analytic_flop_ratio": flop_ratio,
            "xla_flop_ratio": xla_ratio,
            "time_over_analytic_flop_ratio": time_ratio / flop_ratio,
            "time_over_xla_flop_ratio": time_ratio / xla_ratio if xla_ratio else None,
            "gflops_analytic": flops / ms / 1e6,
            "mean_loss_last_epoch": last_loss[(mode, k)] if (mode, k) not in diverged else None,
        }
        results.append(entry)
        rows.append(
            {
                "variant": "VAE" if mode == "vae" else f"{mode.upper()} K={k}",
                "ms/step": ms,
                "time / VAE": time_ratio,
                "FLOP ratio (analytic)": flop_ratio,
                "FLOP ratio (XLA)": xla_ratio if xla_ratio is not None else "n/a",
                "time ratio / FLOP ratio (XLA)": entry["time_over_xla_flop_ratio"] or "n/a",
                "GFLOP/s (analytic)": entry["gflops_analytic"],
                "loss last epoch": entry["mean_loss_last_epoch"] or "diverged",
            }
        )
    worst = max(
        (e for e in results if e["mode"] != "vae"),
        key=lambda e: e["time_over_xla_flop_ratio"] or e["time_over_analytic_flop_ratio"],
    )
    notes = [
        data_note,
        f"batch {batch_size}, {steps_per_epoch} steps/epoch, median of {repeats} epochs after a "
        f"compile warm-up; refinement: SGD step {step_size}, momentum 0.5, clip 5, one sample, "
        "jax.checkpoint per step (the guide's defaults)",
        f"analytic FLOPs: {FLOP_FORMULA}",
        "XLA FLOPs: cost analysis of the compiled svi.update; it counts a while-loop body once, so"
        " flops(K) = flops(K=0) + K * (flops(K=2) - flops(K=0)); raw counts (MFLOP): "
        + ", ".join(f"{n}: {v / 1e6:.1f}" for n, v in xla_raw.items() if v is not None),
        f"largest time ratio / FLOP ratio: {worst['mode'].upper()} K={worst['num_steps']}: "
        f"{worst['time_over_xla_flop_ratio'] or worst['time_over_analytic_flop_ratio']:.2f} "
        "(target <= 1.3)",
    ]
    if diverged:
        notes.append(
            "training diverged (non-finite loss) for "
            + ", ".join(f"{m} K={k}" for m, k in diverged)
            + f"; their times are of diverged steps: lower step_size (now {step_size})"
        )
    return {
        "sizes": {
            "n_data": n_data,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "num_steps": list(num_steps),
            "modes": list(modes),
            "x_dim": x_dim,
            "hidden": hidden,
            "z_dim": z_dim,
            "step_size": step_size,
            "repeats": repeats,
        },
        "data": data_note,
        "flops_formula": FLOP_FORMULA,
        "xla_raw_flops": xla_raw,
        "results": results,
        "table": {"columns": list(rows[0]), "rows": rows},
        "notes": notes,
    }
