"""How the time of IWAE-k and of the local optimizer grows with N, z_dim and the samples.

On the decoder of `bench/evaluators.py` (z_dim-200-200-784 ELU MLP, Bernoulli likelihood, random
init as NumPyro's SVI initializes it) and the first N statically binarized MNIST test images,
six sweeps, each varying one size with the others held at their base values:

- IWAE-k (`evaluate_bounds`, q = N(0, 0.5^2 I), batches of 100 datapoints, draws in chunks of
  100) against the number of datapoints N, the latent size z_dim and the draws k;
- the local optimizer (`fit_local` end to end: Adam from N(0, I) for a fixed number of steps in
  one block, no early stopping, batches of 100 datapoints, a 1-sample final ELBO) against N,
  z_dim and the draws per step S.

Each point is timed with `bench.common.time_call` (which waits for the result): one call that
compiles, then `repeats` rounds in which the points of a sweep take turns; the median is
reported. The slope of log time against log size is fitted by least squares (`loglog_slope`):
1 means time proportional to the size, 0 that the size costs nothing. Beside it, the slope of
the FLOP count of the same points (`flops`, the decoder's matmuls) is what time would do if only
the matmuls cost: 1 for N, k and S, and below 1 for z_dim, since the decoder's first layer is
the only one that grows with z_dim. A time slope below the FLOP slope means fixed costs
(dispatch, compilation-free overheads, small matrices running below the machine's peak) weigh
on the small sizes.

The result holds `sweeps` (one entry per sweep: `estimator`, `axis`, `fixed`, `sizes`,
`seconds`, `seconds_all`, `first_call_seconds_incl_compile`, `flops`, `gflops`, `time_slope`,
`flop_slope`), `figure` (the log-log plot's file name, written beside the JSON) and a `table`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import median, time_call

RESULT_KEYS = ("sizes", "data", "sweeps", "slopes", "figure", "table", "notes")
SWEEP_KEYS = (
    "estimator",
    "axis",
    "fixed",
    "sizes",
    "seconds",
    "seconds_all",
    "first_call_seconds_incl_compile",
    "flops",
    "gflops",
    "time_slope",
    "flop_slope",
)
FIGURE_NAME = "scaling.png"
AXIS_LABELS = {"N": "datapoints N", "z_dim": "latent size z_dim", "S": "samples (IWAE k, q* S)"}


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(sizes): the exponent p of values ~ size^p.

    Args:
        sizes: two or more distinct positive sizes.
        values: as many positive values (times, FLOP counts).

    Returns:
        The fitted exponent.
    """
    sizes, values = np.asarray(sizes, float), np.asarray(values, float)
    if sizes.shape != values.shape or sizes.size < 2 or len(set(sizes.tolist())) < 2:
        raise ValueError(f"need two or more distinct sizes with one value each; got {sizes}")
    if (sizes <= 0).any() or (values <= 0).any():
        raise ValueError("sizes and values must be positive")
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def time_sweep(
    make: Callable[[int], Callable[[], Any]], sizes: Sequence[int], repeats: int
) -> dict[str, list]:
    """Times `make(size)()` for each size: a first (compiling) call each, then `repeats` rounds
    in which the sizes take turns, so that drifts of a shared machine hit every size alike.

    Returns:
        `{"seconds": medians, "seconds_all": [[each round] per size],
        "first_call_seconds_incl_compile": [...]}`, in the order of `sizes`.
    """
    thunks = [make(size) for size in sizes]
    first = [time_call(thunk) for thunk in thunks]
    times: list[list[float]] = [[] for _ in sizes]
    for _ in range(repeats):
        for i, thunk in enumerate(thunks):
            times[i].append(time_call(thunk))
    return {
        "seconds": [median(t) for t in times],
        "seconds_all": times,
        "first_call_seconds_incl_compile": first,
    }


def forward_flops(z_dim: int, hidden: Sequence[int], x_dim: int) -> float:
    """FLOPs of one decoder forward pass: 2 per multiply-add of its weight matrices."""
    sizes = [z_dim, *hidden, x_dim]
    return 2.0 * sum(a * b for a, b in itertools.pairwise(sizes))


def plot_sweeps(sweeps: list[dict[str, Any]], path: str | Path) -> None:
    """The log-log plot of time against size, one panel per axis, one line per estimator."""
    from matplotlib.figure import Figure

    axes_names = [a for a in AXIS_LABELS if any(s["axis"] == a for s in sweeps)]
    fig = Figure(figsize=(4.2 * len(axes_names), 3.8), layout="constrained")
    panels = fig.subplots(1, len(axes_names), squeeze=False)[0]
    markers = {"iwae": "o", "local": "s"}
    for ax, axis in zip(panels, axes_names, strict=True):
        for s in (s for s in sweeps if s["axis"] == axis):
            size = np.asarray(s["sizes"], float)
            sec = np.asarray(s["seconds"], float)
            label = f"{s['label']}: slope {s['time_slope']:.2f} (FLOPs {s['flop_slope']:.2f})"
            (line,) = ax.loglog(size, sec, marker=markers.get(s["estimator"], "o"), label=label)
            # Where time would go if it followed the FLOP count from the largest size down.
            flops = np.asarray(s["flops"], float)
            ax.loglog(size, sec[-1] * flops / flops[-1], ls=":", color=line.get_color(), lw=1)
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.set_ylabel("seconds (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("time vs size (dotted: proportional to the FLOP count)", fontsize=10)
    fig.savefig(path, dpi=110)


def run(
    quick: bool = False,
    *,
    estimators: tuple[str, ...] = ("iwae", "local"),
    axes: tuple[str, ...] = ("N", "z_dim", "S"),
    n_grid: tuple[int, ...] | None = None,
    z_grid: tuple[int, ...] | None = None,
    k_grid: tuple[int, ...] | None = None,
    s_grid: tuple[int, ...] | None = None,
    base_n: int | None = None,
    base_z: int = 50,
    iwae_samples: int | None = None,
    iwae_samples_z_sweep: int | None = None,
    local_samples: int = 1,
    local_samples_z_sweep: int = 4,
    local_steps: int | None = None,
    batch_size: int = 100,
    hidden: tuple[int, ...] = (200, 200),
    x_dim: int = 784,
    repeats: int | None = None,
    data: str = "binarized_mnist",
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Runs the sweeps and returns their timings and slopes (see the module docstring).

    Args:
        quick: small grids and one repeat, for tests and smoke runs.
        estimators: of "iwae" and "local".
        axes: of "N", "z_dim" and "S".
        n_grid: datapoints N (default 100, 300, 1000, 3000; quick 25, 50, 100).
        z_grid: latent sizes (default 8, 64, 512, 2048; quick 4, 32, 256).
        k_grid: IWAE's draws k (default 100, 300, 1000, 3000; quick 25, 50, 100).
        s_grid: the local optimizer's draws per step S (default 1, 3, 10, 30; quick 1, 4, 16).
        base_n: N while another size varies (default 100, quick 25).
        base_z: z_dim while another size varies.
        iwae_samples: k of the N sweep (default 200, quick 25).
        iwae_samples_z_sweep: k of the z_dim sweep (default 500, quick 25).
        local_samples: S of the local optimizer's N sweep.
        local_samples_z_sweep: S of its z_dim sweep.
        local_steps: Adam steps per datapoint (default 50, quick 10).
        batch_size: datapoints per compiled call of both (IWAE's draws go in chunks of 100).
        hidden, x_dim: the decoder's hidden layers (ELU) and output size.
        repeats: timed rounds after the compiling call (default 3, quick 1).
        data: "binarized_mnist" (random data if it cannot be loaded) or "random".
        seed: seed of the parameters, data and draws.
        out_dir: where the log-log plot is written (`run_and_save` passes its folder); None
            writes no plot.

    Returns:
        A dict with the keys `RESULT_KEYS`; each sweep has the keys `SWEEP_KEYS`.
    """
    import jax
    import jax.numpy as jnp

    from amortjax.evaluation.bounds import evaluate_bounds
    from amortjax.families import DiagonalGaussian
    from amortjax.guides.local import given_params_guide
    from amortjax.inference.local import fit_local
    from amortjax.models import vae_model
    from amortjax.nets import MLP
    from bench.common import load_binarized
    from bench.local_optimizer import decoder_params

    unknown = (set(estimators) - {"iwae", "local"}) | (set(axes) - set(AXIS_LABELS))
    if unknown:
        raise ValueError(
            f"unknown estimators or axes {sorted(unknown)}; estimators are 'iwae' and 'local', "
            f"axes {list(AXIS_LABELS)}"
        )
    n_grid = n_grid or ((25, 50, 100) if quick else (100, 300, 1000, 3000))
    z_grid = z_grid or ((4, 32, 256) if quick else (8, 64, 512, 2048))
    k_grid = k_grid or ((25, 50, 100) if quick else (100, 300, 1000, 3000))
    s_grid = s_grid or ((1, 4, 16) if quick else (1, 3, 10, 30))
    base_n = base_n or (25 if quick else 100)
    k_n = iwae_samples or (25 if quick else 200)
    k_z = iwae_samples_z_sweep or (25 if quick else 500)
    steps = local_steps or (10 if quick else 50)
    repeats = repeats or (1 if quick else 3)
    batch, chunk, lr = batch_size, 100, 1e-3

    x_np, data_note = load_binarized("test", max(*n_grid, base_n), x_dim, data, seed)
    x_all = jnp.asarray(x_np)
    rows_of = {n: x_all[:n] for n in {*n_grid, base_n}}  # sliced once, outside the timed calls
    family = DiagonalGaussian()
    guide = given_params_guide(family)
    models: dict[int, tuple[Any, dict]] = {}

    def model_of(z_dim: int) -> tuple[Any, dict]:
        if z_dim not in models:
            model = vae_model(MLP(hidden, x_dim, "elu"), z_dim=z_dim)
            params = decoder_params(model, x=x_all[:2], x_dim=x_dim, hidden=hidden[0],
                                    z_dim=z_dim, seed=seed)  # fmt: skip
            models[z_dim] = (model, params)
        return models[z_dim]

    def iwae(n: int, z_dim: int, k: int) -> Callable[[], Any]:
        model, params = model_of(z_dim)
        lam = family.pack(jnp.zeros((n, z_dim)), jnp.full((n, z_dim), 0.5))
        x, key = rows_of[n], jax.random.key(seed + 1)
        return lambda: evaluate_bounds(
            model, guide, params, x, key, num_samples=k, batch_size=min(batch, n),
            sample_chunk=min(chunk, k), guide_args=(lam,),
        ).iwae  # fmt: skip

    def local(n: int, z_dim: int, s: int) -> Callable[[], Any]:
        model, params = model_of(z_dim)
        x, key = rows_of[n], jax.random.key(seed + 2)
        # The optimizer's own scaling: without the convergence certificate, whose Hessians
        # (z_dim tangents per draw) would dominate at z_dim 2048 and did not fit in memory there.
        return lambda: fit_local(
            model, params, x, key, family=family, z_dim=z_dim, num_samples=s, learning_rate=lr,
            block_size=steps, patience=2**30, max_steps=steps, final_samples=1,
            batch_size=min(batch, n), method="adam", certify_samples=0,
        ).elbo  # fmt: skip

    def iwae_flops(n: int, z_dim: int, k: int) -> float:
        return n * k * forward_flops(z_dim, hidden, x_dim)

    def local_flops(n: int, z_dim: int, s: int) -> float:
        # forward + input-gradient backward per draw and step, and the 1-draw final ELBO
        return n * (2 * steps * s + 1) * forward_flops(z_dim, hidden, x_dim)

    plans: list[tuple[str, str, tuple[int, ...], dict[str, int]]] = []
    for estimator in estimators:
        samples_n = k_n if estimator == "iwae" else local_samples
        samples_z = k_z if estimator == "iwae" else local_samples_z_sweep
        for axis in axes:
            if axis == "N":
                plans.append((estimator, axis, n_grid, {"z_dim": base_z, "S": samples_n}))
            elif axis == "z_dim":
                plans.append((estimator, axis, z_grid, {"N": base_n, "S": samples_z}))
            else:
                grid = k_grid if estimator == "iwae" else s_grid
                plans.append((estimator, axis, grid, {"N": base_n, "z_dim": base_z}))

    sweeps: list[dict[str, Any]] = []
    for estimator, axis, grid, fixed in plans:
        make, count = (iwae, iwae_flops) if estimator == "iwae" else (local, local_flops)

        def point(size: int, fixed=fixed, axis=axis) -> tuple[int, int, int]:
            where = {**fixed, axis: size}
            return where["N"], where["z_dim"], where["S"]

        timing = time_sweep(lambda size, make=make, point=point: make(*point(size)), grid, repeats)
        flops = [count(*point(size)) for size in grid]
        label = "IWAE" if estimator == "iwae" else f"q* ({steps} Adam steps)"
        sweeps.append(
            {
                "estimator": estimator,
                "axis": axis,
                "label": label,
                "fixed": fixed,
                "sizes": list(grid),
                **timing,
                "flops": flops,
                "gflops": [f / t / 1e9 for f, t in zip(flops, timing["seconds"], strict=True)],
                "time_slope": loglog_slope(grid, timing["seconds"]),
                "flop_slope": loglog_slope(grid, flops),
            }
        )

    figure = None
    if out_dir is not None and sweeps:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        plot_sweeps(sweeps, Path(out_dir) / FIGURE_NAME)
        figure = FIGURE_NAME

    axis_name = {"N": "N", "z_dim": "z_dim", "S": "k"}
    rows: list[dict[str, Any]] = []
    for s in sweeps:
        var = axis_name[s["axis"]] if s["estimator"] == "iwae" else s["axis"]
        fixed = ", ".join(
            f"{axis_name[k] if s['estimator'] == 'iwae' else k}={v}" for k, v in s["fixed"].items()
        )
        for i, (size, sec, gf) in enumerate(
            zip(s["sizes"], s["seconds"], s["gflops"], strict=True)
        ):
            rows.append(
                {
                    "estimator": s["label"],
                    "varies": var,
                    "value": size,
                    "fixed": fixed,
                    "seconds": sec,
                    "GFLOP/s": gf,
                    "slope, time": s["time_slope"] if i == 0 else "",
                    "slope, FLOPs": s["flop_slope"] if i == 0 else "",
                }
            )
    slopes = {f"{s['estimator']}/{s['axis']}": s["time_slope"] for s in sweeps}
    notes = [
        data_note,
        f"decoder z_dim-{'-'.join(map(str, hidden))}-{x_dim} ELU, Bernoulli, random init; IWAE: "
        f"evaluate_bounds with q = N(0, 0.5^2 I), batch_size {batch}, sample_chunk {chunk}; q*: "
        f"fit_local end to end, Adam {lr} from N(0, I), {steps} steps (one block, no early "
        f"stop), batch_size {batch}, final_samples 1",
        f"median of {repeats} rounds after a compiling call, the sizes of a sweep taking turns; "
        "slope = least-squares slope of log seconds vs log size; 'slope, FLOPs' = the same fit "
        "of the decoder's matmul FLOP count (forward per IWAE draw; forward + input-gradient "
        "backward per q* draw and step)",
        "fitted slopes of time: "
        + ", ".join(f"{name} {value:.2f}" for name, value in slopes.items()),
    ]
    if figure:
        notes.append(f"log-log plot: {figure} (beside this file)")
    return {
        "sizes": {
            "estimators": list(estimators),
            "axes": list(axes),
            "n_grid": list(n_grid),
            "z_grid": list(z_grid),
            "k_grid": list(k_grid),
            "s_grid": list(s_grid),
            "base_n": base_n,
            "base_z": base_z,
            "iwae_samples_n_sweep": k_n,
            "iwae_samples_z_sweep": k_z,
            "local_samples_n_sweep": local_samples,
            "local_samples_z_sweep": local_samples_z_sweep,
            "local_steps": steps,
            "batch_size": batch,
            "sample_chunk": chunk,
            "hidden": list(hidden),
            "x_dim": x_dim,
            "repeats": repeats,
        },
        "data": data_note,
        "sweeps": sweeps,
        "slopes": slopes,
        "figure": figure,
        "table": {"columns": list(rows[0]) if rows else ["estimator"], "rows": rows},
        "notes": notes,
    }
