"""Throughput of the log p(x) estimators: IWAE-k and AIS, in decoder evaluations per second.

On Cremer et al.'s decoder (z_dim-200-200-784 ELU MLP, Bernoulli likelihood; random init, as
NumPyro's SVI initializes it), measured in one run after a compile warm-up, the median of
`repeats` calls:

- IWAE-k (`evaluate_bounds`): N datapoints x k draws from a diagonal-Gaussian q, one decoder
  forward pass per draw: N k decoder evaluations;
- AIS (`ais`): N datapoints x C chains x T temperatures x L leapfrog steps, each leapfrog step
  one decoder forward pass and the gradient with respect to its input (no weight gradients):
  N (C + C_pilot) T L evaluations (the step sizes come from a pilot pass of C_pilot = min(4, C)
  chains, counted as work), each costing two forward passes' FLOPs;

and, in the same run, each estimator's hand-written floor: the same decoder as three explicit
matmuls with the Bernoulli log-density written out, in plain JAX (`_floors`):

- IWAE floor: z = mu + sigma eps, log p(x, z) - log q(z), log-sum-exp over k, in chunks of
  `sample_chunk` draws (what `evaluate_bounds` computes, without NumPyro; 100, its fastest
  measured: 1.39 s against 1.44 at 50 and 1.49 at 25 for N 100, k 5000; the library runs at
  its own default chunk, `amortjax.estimators.SAMPLE_CHUNK`, 50, its fastest);
- IWAE floor with per-draw keys: the same in chunks of `SAMPLE_CHUNK`, each draw's noise from
  its own key (`fold_in` of datapoint i's key and the draw's index, in threefry's compact mode,
  `amortjax.engine.compact_threefry`), as the library draws them so that no number depends on
  the batch or the chunk: what that independence costs (the batched floor in the compact mode
  ran no faster: 2.30 s against 2.28, N 100, k 5000, one run);
- AIS floor: a `lax.scan` of gradients of sum_m log p(x_m, z_m) over the N C rows, one per
  leapfrog step, the value as well only at the last of each transition's L steps, where the
  Metropolis test reads it (the decoder work of AIS, without its schedule, momenta, accept
  test or log q0).

and two ceilings of the IWAE floor's decoder work, the same chunks of rows without the
log-densities: the three matmuls alone (with biases, reduced by a max so that XLA cannot fold
them into a matrix-vector product) and the matmuls with the ELUs; and the machine's float32
matmul peak (`bench.train_step.matmul_peak`). FLOPs are counted from
the decoder's matmuls (`FLOP_FORMULA`); the rest (log-densities, leapfrog arithmetic, sampling)
is overhead that the ratio to the peak charges to the estimator. The floors show how much of
that overhead is the CPU's (transcendentals per pixel and hidden unit, and the backward pass's
transposed matmuls) rather than the library's.

The table's library / floor is the ratio of the two medians. Each round also times the two
seconds apart, so each round gives a ratio of its own; their geometric mean and its 95%
Student-t interval (`bench.common.ratio_interval`) judge the target, library / floor >= 0.95:
met when the whole interval is above it, not met when it is wholly below, not resolved when it
straddles it (a machine whose speed moves within minutes, as this shared one's does, needs more
rounds or a quieter hour).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.engine import chunked_draw_keys, compact_threefry, datapoint_keys
from amortjax.estimators import SAMPLE_CHUNK
from amortjax.evaluation.ais import ais
from amortjax.evaluation.bounds import evaluate_bounds
from amortjax.families import DiagonalGaussian
from amortjax.guides.local import given_params_guide
from amortjax.models import vae_model
from amortjax.nets import MLP
from bench.common import (
    RATIO_TARGET,
    describe_rounds,
    hand_bernoulli_log_px,
    median,
    round_ratios,
    time_call,
    turns,
)
from bench.local_optimizer import decoder_params, load_test
from bench.train_step import matmul_peak

FLOP_FORMULA = (
    "forward = 2 * sum of the decoder's weight-matrix sizes (z_dim*200 + 200*200 + 200*784 MACs);"
    " IWAE: one forward per draw; AIS: one forward + one input-gradient backward (another"
    " forward's worth of matmul FLOPs) per leapfrog step"
)


def hand_logits(params: dict, z: jax.Array, activation=jax.nn.elu) -> jax.Array:
    """The MLP decoder's output written out as explicit matmuls: z `[..., z_dim]` ->
    `[..., x_dim]`, `activation` between the layers (ELU by default)."""
    dec = params["decoder$params"]
    layers = [(dec[f"Dense_{i}"]["kernel"], dec[f"Dense_{i}"]["bias"]) for i in range(len(dec))]
    h = z
    for w, b in layers[:-1]:
        h = activation(h @ w + b)
    return h @ layers[-1][0] + layers[-1][1]


def hand_log_joint(params: dict, z: jax.Array, x: jax.Array) -> jax.Array:
    """log p(x, z) of the ELU MLP decoder written out in plain JAX, up to the constant
    -z_dim/2 log(2 pi) (it cancels in every log-weight): z `[..., z_dim]`, x broadcasting to the
    logits `[..., x_dim]` -> `[...]`."""
    return hand_bernoulli_log_px(x, hand_logits(params, z)) - 0.5 * jnp.sum(z**2, axis=-1)


def _floors(params: dict, x: jax.Array, mu: jax.Array, log_scale: jax.Array, *, num_samples: int,
            sample_chunk: int, chains: int, steps: int, leapfrog: int):  # fmt: skip
    """Hand-written functions `key -> array` on the ELU decoder: IWAE-k, the AIS gradients, and
    the IWAE floor's decoder work alone, as matmuls and as matmuls with ELUs (the ceilings).

    Each is compiled with the parameters, data and q as arguments, as the library's are: closed
    over, they become constants, and XLA folds the zero biases of a freshly initialized decoder
    away and lays the weights out for free, work that no trained model's run can skip."""
    keys_of = lambda key: jax.random.split(key, -(-num_samples // sample_chunk))  # noqa: E731

    def draw(k, mu, log_scale):
        eps = jax.random.normal(k, (sample_chunk, *mu.shape))
        return eps, mu + jnp.exp(log_scale) * eps

    def with_arguments(fn):
        compiled = jax.jit(fn)
        return lambda key: compiled(key, params, x, mu, log_scale)

    def iwae(key, params, x, mu, log_scale):
        def chunk(_, k):
            eps, z = draw(k, mu, log_scale)
            log_w = (
                hand_log_joint(params, z, x) + 0.5 * jnp.sum(eps**2, -1) + jnp.sum(log_scale, -1)
            )
            return None, jax.nn.logsumexp(log_w, axis=0)

        _, lse = jax.lax.scan(chunk, None, keys_of(key))
        return jax.nn.logsumexp(lse, axis=0) - jnp.log(num_samples)

    @compact_threefry
    def iwae_keyed(key, params, x, mu, log_scale):
        # The library's randomness: draw s of datapoint i from fold_in(fold_in(key, i), s), one
        # normal draw per key (so that no number depends on the batch or the chunk) in threefry's
        # compact mode, here in chunks of SAMPLE_CHUNK as the library evaluates them.
        chunk_size = min(SAMPLE_CHUNK, num_samples)
        num_chunks = num_samples // chunk_size
        if num_chunks * chunk_size != num_samples:
            raise ValueError(f"k={num_samples} is not a multiple of SAMPLE_CHUNK={chunk_size}")
        keys_by_draw = jax.vmap(lambda k: chunked_draw_keys(k, num_samples, chunk_size)[0])(
            datapoint_keys(key, jnp.arange(mu.shape[0]))
        )

        def chunk(_, keys):
            normal = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, mu.shape[-1:])))
            eps = jnp.swapaxes(normal(keys), 0, 1)
            z = mu + jnp.exp(log_scale) * eps
            log_w = (
                hand_log_joint(params, z, x) + 0.5 * jnp.sum(eps**2, -1) + jnp.sum(log_scale, -1)
            )
            return None, jax.nn.logsumexp(log_w, axis=0)

        _, lse = jax.lax.scan(chunk, None, jnp.swapaxes(keys_by_draw, 0, 1))
        return jax.nn.logsumexp(lse, axis=0) - jnp.log(num_chunks * chunk_size)

    def ceiling(activation):
        def decoder_work(key, params, x, mu, log_scale):
            def chunk(_, k):
                z = draw(k, mu, log_scale)[1]
                return None, jnp.max(hand_logits(params, z, activation), axis=-1)

            return jnp.max(jax.lax.scan(chunk, None, keys_of(key))[1], axis=0)

        return decoder_work

    def ais_gradients(key, params, x, mu, log_scale):
        rows = jnp.repeat(x, chains, axis=0)

        def log_joint(z):
            return jnp.sum(hand_log_joint(params, z, rows))

        def gradient_step(z, _):
            return z + 1e-3 * jax.grad(log_joint)(z), None

        def transition(z, _):  # L - 1 gradients, then the last one with its value
            z = jax.lax.scan(gradient_step, z, None, length=leapfrog - 1)[0]
            value, grad = jax.value_and_grad(log_joint)(z)
            return z + 1e-3 * grad, value

        z0 = jax.random.normal(key, (rows.shape[0], mu.shape[-1]))
        return jax.lax.scan(transition, z0, None, length=steps // leapfrog)[1]

    return tuple(
        with_arguments(fn)
        for fn in (iwae, iwae_keyed, ais_gradients, ceiling(lambda h: h), ceiling(jax.nn.elu))
    )


def run(
    quick: bool = False,
    *,
    datapoints: int | None = None,
    iwae_samples: int | None = None,
    sample_chunk: int = 100,
    ais_chains: int | None = None,
    ais_temperatures: int | None = None,
    ais_leapfrog: int = 10,
    hidden: tuple[int, ...] = (200, 200),
    z_dim: int = 50,
    x_dim: int = 784,
    repeats: int | None = None,
    matmul_sizes: tuple[int, ...] | None = None,
    data: str = "binarized_mnist",
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its result (see the module docstring).

    Args:
        quick: small problems and one repeat, for tests and smoke runs.
        datapoints: N (default 100, quick 10).
        iwae_samples: k (default 5000, quick 50).
        sample_chunk: draws per compiled chunk of the IWAE floor and ceilings (the library
            runs at its default, `SAMPLE_CHUNK`).
        ais_chains, ais_temperatures, ais_leapfrog: C, T, L (default 16, 100, 10; quick 2, 5).
        hidden, z_dim, x_dim: the decoder z_dim-hidden-x_dim.
        repeats: timed calls after the warm-up (default 10, quick 1).
        matmul_sizes: square sizes of the peak (default 1024, 2048; quick 128).
        data: "binarized_mnist" (random data if it cannot be loaded) or "random".
        seed: seed of parameters, data and draws.

    Returns:
        A dict with sizes, FLOP counts, timings, throughput, GFLOP/s and a `table`.
    """
    n = datapoints or (10 if quick else 100)
    k = iwae_samples or (50 if quick else 5000)
    chains = ais_chains or (2 if quick else 16)
    temps = ais_temperatures or (5 if quick else 100)
    repeats = repeats or (1 if quick else 10)
    matmul_sizes = tuple(matmul_sizes or ((128,) if quick else (1024, 2048)))
    peak = matmul_peak(matmul_sizes, 2 if quick else 5)
    x_np, data_note = load_test(n, x_dim, data, seed)
    x = jnp.asarray(x_np)
    model = vae_model(MLP(hidden, x_dim, "elu"), z_dim=z_dim)
    params = decoder_params(model, x=x[:2], x_dim=x_dim, hidden=hidden[0], z_dim=z_dim, seed=seed)
    family = DiagonalGaussian()
    lam = family.pack(jnp.zeros((n, z_dim)), jnp.full((n, z_dim), 0.5))
    guide = given_params_guide(family)
    sizes = [z_dim, *hidden, x_dim]
    forward = 2.0 * sum(a * b for a, b in itertools.pairwise(sizes))

    def iwae():
        return evaluate_bounds(
            model, guide, params, x, jax.random.key(seed + 1), num_samples=k,
            batch_size=n, sample_chunk=min(SAMPLE_CHUNK, k), guide_args=(lam,),
        ).iwae  # fmt: skip

    # Whole transitions of L leapfrog steps, at least one: by default T x L, the estimating
    # run's decoder work per chain (about 5 s). A floor of 200 steps (0.9 s) put AIS's ratio
    # anywhere in 0.94-1.07 over five runs on 2026-12-07: the short floor's timing was the noise.
    floor_steps = max(min(temps, (50 if quick else 1000) // ais_leapfrog), 1) * ais_leapfrog
    iwae_floor, iwae_keyed, ais_floor, matmuls_only, matmuls_elu = _floors(
        params, x, jnp.zeros((n, z_dim)), jnp.full((n, z_dim), 0.5), num_samples=k,
        sample_chunk=min(sample_chunk, k), chains=chains, steps=floor_steps, leapfrog=ais_leapfrog,
    )  # fmt: skip

    def annealed():
        return ais(
            model, params, x, jax.random.key(seed + 2), z_dim=z_dim, num_chains=chains,
            num_temperatures=temps, leapfrog_steps=ais_leapfrog, batch_size=n,
        ).log_px  # fmt: skip

    rows, results = [], {}
    variants = (
        ("IWAE", iwae, n * k, forward),
        ("IWAE floor", lambda: iwae_floor(jax.random.key(seed + 1)), n * k, forward),
        ("IWAE floor, per-draw keys", lambda: iwae_keyed(jax.random.key(seed + 1)), n * k,
         forward),
        # AIS's work includes its pilot pass (min(4, C) chains through the same temperatures).
        ("AIS", annealed, n * (chains + min(4, chains)) * temps * ais_leapfrog, 2.0 * forward),
        ("AIS floor", lambda: ais_floor(jax.random.key(seed + 2)), n * chains * floor_steps,
         2.0 * forward),
        ("ceiling: matmuls", lambda: matmuls_only(jax.random.key(seed + 1)), n * k, forward),
        ("ceiling: matmuls + ELU", lambda: matmuls_elu(jax.random.key(seed + 1)), n * k, forward),
    )  # fmt: skip
    # Compile everything, then time the variants in turns, so that a noisy neighbour on a shared
    # machine slows every variant's repeats alike rather than one variant's; the matmul peak is
    # measured again in each round and the best of all its measurements is the one divided by.
    compile_s = {name: time_call(fn) for name, fn, _, _ in variants}
    all_times: dict[str, list[float]] = {name: [] for name, _, _, _ in variants}
    round_peaks = []
    for r in range(repeats):
        for name, fn, _, _ in turns(list(variants), r):
            all_times[name].append(time_call(fn))
        round_peaks.append(matmul_peak(matmul_sizes[-1:], 2)["peak_gflops"])
    peak = {
        **peak,
        "up_front_gflops": peak["peak_gflops"],
        "rounds_gflops": round_peaks,
        "peak_gflops": max(peak["peak_gflops"], *round_peaks),
    }
    for name, fn, evals, flops_per_eval in variants:
        times = all_times[name]
        sec = median(times)
        rate = evals / sec
        gflops = rate * flops_per_eval / 1e9
        results[name] = {
            "decoder_evaluations": evals,
            "flops_per_evaluation": flops_per_eval,
            "seconds_median": sec,
            "seconds_all": times,
            "first_call_seconds_incl_compile": compile_s[name],
            "decoder_evaluations_per_s": rate,
            "gflops": gflops,
            "fraction_of_peak": gflops / peak["peak_gflops"],
            "finite": bool(np.isfinite(np.asarray(fn())).all()),
        }
        rows.append(
            {
                "estimator": name,
                "work": {
                    "IWAE": f"N={n}, k={k}, chunks of {min(SAMPLE_CHUNK, k)}",
                    "IWAE floor": f"N={n}, k={k}, chunks of {min(sample_chunk, k)}, hand-written",
                    "IWAE floor, per-draw keys": f"N={n}, k={k}, chunks of "
                    f"{min(SAMPLE_CHUNK, k)}, hand-written, a key per draw (the library's)",
                    "AIS": f"N={n}, C={chains}, T={temps}, L={ais_leapfrog}",
                    "AIS floor": f"{n * chains} rows x {floor_steps} gradient steps, hand-written",
                    "ceiling: matmuls": "IWAE floor's decoder, no activation or likelihood",
                    "ceiling: matmuls + ELU": "IWAE floor's decoder, no likelihood",
                }[name],
                "decoder evals": evals,
                "seconds": sec,
                "decoder evals/s": rate,
                "GFLOP/s": gflops,
                "% of matmul peak": 100 * gflops / peak["peak_gflops"],
                "library / floor": "",
            }
        )
    for row in rows:
        floor = results.get(f"{row['estimator']} floor")
        if floor is not None:
            row["library / floor"] = row["decoder evals/s"] / floor["decoder_evaluations_per_s"]
    rows.append({"estimator": "matmul peak (jnp.dot f32)", "GFLOP/s": peak["peak_gflops"]})
    for name in ("IWAE", "AIS"):  # the reported ratio of medians, and the ratio round by round
        lib, floor = results[name], results[f"{name} floor"]
        lib["over_floor_by_round"] = round_ratios(
            lib["seconds_all"], floor["seconds_all"],
            lib["decoder_evaluations"], floor["decoder_evaluations"],
        )  # fmt: skip
    keyed_ratio = (
        results["IWAE"]["decoder_evaluations_per_s"]
        / results["IWAE floor, per-draw keys"]["decoder_evaluations_per_s"]
    )
    keys_cost = (
        results["IWAE floor, per-draw keys"]["decoder_evaluations_per_s"]
        / results["IWAE floor"]["decoder_evaluations_per_s"]
    )
    return {
        "sizes": {
            "datapoints": n,
            "iwae_samples": k,
            "sample_chunk": sample_chunk,
            "ais_chains": chains,
            "ais_temperatures": temps,
            "ais_leapfrog": ais_leapfrog,
            "ais_floor_steps": floor_steps,
            "decoder": sizes,
            "repeats": repeats,
        },
        "data": data_note,
        "flop_formula": FLOP_FORMULA,
        "matmul": peak,
        "results": results,
        "table": {"columns": list(rows[0]), "rows": rows},
        "notes": [
            data_note,
            f"decoder {'-'.join(map(str, sizes))} ELU, Bernoulli, random init; "
            f"{forward / 1e6:.3f} MFLOP per forward pass; {FLOP_FORMULA}",
            f"median of {repeats} calls after a compile warm-up, the variants timed in turns "
            "(in reverse order every other round); "
            "targets: >= 60% of the peak; the peak is the best of the up-front measurement ("
            f"{peak['up_front_gflops']:.0f} GFLOP/s) and one per round ("
            + ", ".join(f"{g:.0f}" for g in round_peaks)
            + ")",
            f"IWAE: library / the floor with the library's per-draw keys {keyed_ratio:.3f}; that "
            f"floor / the floor with one batched draw per chunk {keys_cost:.3f} (the price of "
            "numbers that depend on neither batch nor chunk)",
            "library / floor round by round (the two timed in the same round): "
            + "; ".join(
                f"{name} " + describe_rounds(results[name]["over_floor_by_round"], RATIO_TARGET)
                for name in ("IWAE", "AIS")
            ),
        ],
    }
