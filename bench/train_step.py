"""Training speed of amortjax's compiled SVI epoch against a hand-written JAX floor.

Measured in one run, on the same data and machine:

1. the machine's float32 matmul peak (jitted `jnp.dot` of square matrices, best GFLOP/s);
2. the library: `Trainer.run_epoch` of a VAE (784-400-20 MLP encoder, 20-400-784 decoder,
   Bernoulli likelihood, single-sample ELBO, Adam 1e-3, batch 128), one `lax.scan` per epoch;
3. the floor: the same model and update written directly in JAX + Flax + Optax, (a) a jitted
   step called from a Python loop and (b) that step inside a jitted `lax.scan` over an epoch of
   minibatches drawn from a permutation, as the library does;
4. NumPyro's usual style: the library's model and guide in a plain `numpyro.infer.SVI`, its
   `update` jitted and called once per minibatch from a Python loop;
5. Pyro (when PyTorch and Pyro are installed): the same VAE as `torch.nn` modules in a Pyro
   model and guide, `pyro.infer.SVI(..., Trace_ELBO()).step` once per minibatch.

Steps/s is the median over repeated epochs after a compile warm-up; the variants take turns so
that drifts of the machine hit all of them alike. FLOPs per step are counted analytically from
the matmuls. The per-datapoint loss at initialization is compared as a sanity check that both
compute the same objective: on the library's own initial parameters (Monte Carlo averages over
the noise) and at an independent initialization.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from amortjax.guides import amortized_guide
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.training import Trainer
from amortjax.models import vae_model
from amortjax.nets import MLP
from bench.common import hand_bernoulli_log_px, load_binarized, median, time_call

FLOP_FORMULA = (
    "flops_per_step = 3 * 2 * B * (x_dim*hidden + hidden*2*z_dim + z_dim*hidden + hidden*x_dim)"
    " (forward matmul MACs of encoder and decoder, x2 FLOPs per MAC, x3 for forward + backward;"
    " elementwise work, the optimizer and the first layer's unneeded input gradient ignored)"
)


def matmul_peak(sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Best float32 GFLOP/s of a jitted square `jnp.dot` (FLOPs = 2 n^3) over the sizes.

    Args:
        sizes: matrix sizes n.
        repeats: timed calls per size, after one warm-up call.

    Returns:
        `{"gflops_by_size": {str(n): best GFLOP/s}, "peak_gflops": the best of all}`.
    """
    dot = jax.jit(jnp.dot)
    by_size = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.float32)
        b = jax.random.normal(kb, (n, n), jnp.float32)
        dot(a, b).block_until_ready()
        best = min(time_call(lambda a=a, b=b: dot(a, b)) for _ in range(repeats))
        by_size[str(n)] = 2.0 * n**3 / best / 1e9
    return {"gflops_by_size": by_size, "peak_gflops": max(by_size.values())}


def load_train(n_data: int, x_dim: int, data: str, seed: int) -> tuple[np.ndarray, str]:
    """The first `n_data` binarized-MNIST training images, or random binary vectors (see
    `bench.common.load_binarized`)."""
    return load_binarized("train", n_data, x_dim, data, seed)


class HandMLP(nn.Module):
    """One hidden relu layer and a linear output; same parameter tree as `amortjax.nets.MLP`."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden)(x))  # Dense_0, then Dense_1, as in the library
        return nn.Dense(self.out)(h)


class HandState(NamedTuple):
    """Parameters and Adam state of the hand-written VAE."""

    params: dict
    opt_state: Any


class HandVAE:
    """The hand-written floor: the library's VAE and single-sample ELBO, written directly.

    loss = -(n_data / B) * sum_i [log p(x_i | z_i) + log N(z_i; 0, I) - log q(z_i | x_i)] with
    z_i = mu_i + sigma_i * eps_i; the Gaussians' normalizing constants cancel and are left out.
    Dividing by n_data gives the per-datapoint -ELBO that `Trainer` reports.
    """

    def __init__(self, *, x_dim: int, hidden: int, z_dim: int, n_data: int, batch_size: int):
        self.x_dim, self.z_dim = x_dim, z_dim
        self.n_data, self.batch_size = n_data, batch_size
        self.steps_per_epoch = n_data // batch_size
        self.encoder = HandMLP(hidden, 2 * z_dim)
        self.decoder = HandMLP(hidden, x_dim)
        self.optimizer = optax.adam(1e-3)
        self.jit_step = jax.jit(self._step_on_indices)
        self.jit_epoch = jax.jit(self._epoch)

    def init(self, key: jax.Array) -> HandState:
        """Flax's default initialization of both networks, and Adam's zero moments."""
        k_enc, k_dec = jax.random.split(key)
        params = {
            "encoder": self.encoder.init(k_enc, jnp.zeros((1, self.x_dim)))["params"],
            "decoder": self.decoder.init(k_dec, jnp.zeros((1, self.z_dim)))["params"],
        }
        return HandState(params, self.optimizer.init(params))

    def loss(self, params: dict, xb: jax.Array, eps: jax.Array) -> jax.Array:
        """The data-plate-scaled negative ELBO of a minibatch for standard-normal noise eps."""
        lam = self.encoder.apply({"params": params["encoder"]}, xb)
        loc, log_scale = jnp.split(lam, 2, axis=-1)
        z = loc + jnp.exp(log_scale) * eps
        logits = self.decoder.apply({"params": params["decoder"]}, z)
        log_px = hand_bernoulli_log_px(xb, logits)
        log_pz_minus_log_qz = jnp.sum(0.5 * (eps**2 - z**2) + log_scale, axis=-1)
        return -(self.n_data / xb.shape[0]) * jnp.sum(log_px + log_pz_minus_log_qz)

    def step(self, state: HandState, xb: jax.Array, key: jax.Array) -> tuple[HandState, jax.Array]:
        """One Adam step on a minibatch; returns the new state and the per-datapoint loss."""
        eps = jax.random.normal(key, (xb.shape[0], self.z_dim))
        loss, grads = jax.value_and_grad(self.loss)(state.params, xb, eps)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        return HandState(optax.apply_updates(state.params, updates), opt_state), loss / self.n_data

    def _step_on_indices(
        self, state: HandState, x_train: jax.Array, idx: jax.Array, key: jax.Array
    ) -> tuple[HandState, jax.Array]:
        return self.step(state, x_train[idx], key)

    def _batches(self, key: jax.Array, n: int) -> jax.Array:
        order = jax.random.permutation(key, n)
        return order[: self.steps_per_epoch * self.batch_size].reshape(
            self.steps_per_epoch, self.batch_size
        )

    def _epoch(
        self, state: HandState, x_train: jax.Array, key: jax.Array
    ) -> tuple[HandState, jax.Array]:
        perm_key, noise_key = jax.random.split(key)
        batches = self._batches(perm_key, x_train.shape[0])

        def body(state, inputs):
            i, idx = inputs
            return self.step(state, x_train[idx], jax.random.fold_in(noise_key, i))

        steps = jnp.arange(self.steps_per_epoch)
        return jax.lax.scan(body, state, (steps, batches))

    def scan_epoch(
        self, state: HandState, x_train: jax.Array, key: jax.Array
    ) -> tuple[HandState, jax.Array]:
        """One epoch as a single jitted `lax.scan` over minibatches (as `Trainer` does)."""
        return self.jit_epoch(state, x_train, key)

    def loop_epoch(
        self, state: HandState, x_train: jax.Array, key: jax.Array
    ) -> tuple[HandState, jax.Array]:
        """One epoch as a Python loop of jitted steps (the minibatch gather inside the step)."""
        perm_key, noise_key = jax.random.split(key)
        batches = np.asarray(self._batches(perm_key, x_train.shape[0]))
        losses = []
        for i in range(self.steps_per_epoch):
            state, loss = self.jit_step(
                state, x_train, batches[i], jax.random.fold_in(noise_key, i)
            )
            losses.append(loss)
        return state, jnp.stack(losses)


def init_losses(
    trainer: Trainer, hand: HandVAE, x_eval: jax.Array, *, seed: int, draws: int
) -> dict[str, float]:
    """Per-datapoint -ELBO at initialization, library vs hand-written, averaged over noise.

    Args:
        trainer: the library's trainer.
        hand: the hand-written VAE of the same architecture.
        x_eval: the datapoints to score.
        seed: seed of the initializations and the noise.
        draws: Monte Carlo draws of the noise to average.

    Returns:
        `library` (its own initial parameters), `hand_same_params` (the hand-written loss on
        those parameters), `hand_own_init` (on an independent Flax initialization), and the
        relative differences of the two hand-written ones to the library's.
    """
    svi = trainer.svi
    lib_params = trainer.params(trainer.init(jax.random.key(seed), x_eval))
    same = {"encoder": lib_params["encoder$params"], "decoder": lib_params["decoder$params"]}
    own = hand.init(jax.random.key(seed + 1)).params
    n = trainer.n_data

    @jax.jit
    def lib_loss(key):
        return svi.loss.loss(key, lib_params, svi.model, svi.guide, x_eval, n_data=n) / n

    @jax.jit
    def hand_loss(params, key):
        eps = jax.random.normal(key, (x_eval.shape[0], hand.z_dim))
        return hand.loss(params, x_eval, eps) / n  # scaled by n / len(x_eval) inside

    keys = jax.random.split(jax.random.key(seed + 2), draws)
    lib = float(np.mean([lib_loss(k) for k in keys]))
    hand_same = float(np.mean([hand_loss(same, k) for k in keys]))
    hand_own = float(np.mean([hand_loss(own, k) for k in keys]))
    return {
        "library": lib,
        "hand_same_params": hand_same,
        "hand_own_init": hand_own,
        "rel_diff_same_params": abs(hand_same - lib) / abs(lib),
        "rel_diff_own_init": abs(hand_own - lib) / abs(lib),
        "draws": draws,
        "num_datapoints": int(x_eval.shape[0]),
    }


class NumPyroLoop:
    """NumPyro's usual training loop: `jax.jit(svi.update)` called once per minibatch."""

    def __init__(self, model: Callable, guide: Callable, *, n_data: int, batch_size: int):
        from numpyro.infer import SVI, Trace_ELBO
        from numpyro.optim import optax_to_numpyro

        self.svi = SVI(model, guide, optax_to_numpyro(make_optimizer(1e-3)), Trace_ELBO())
        self.update = jax.jit(lambda state, xb: self.svi.update(state, xb, n_data=n_data))
        self.n_data, self.batch_size = n_data, batch_size

    def init(self, key: jax.Array, x_train: jax.Array) -> Any:
        return self.svi.init(key, x_train[: self.batch_size], n_data=self.n_data)

    def epoch(self, state: Any, x_train: jax.Array, key: jax.Array) -> tuple[Any, jax.Array]:
        order = np.asarray(jax.random.permutation(key, self.n_data))
        losses = []
        for i in range(self.n_data // self.batch_size):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            state, loss = self.update(state, x_train[idx])
            losses.append(loss)
        return state, jnp.stack(losses) / self.n_data


class PyroVAE:
    """The same VAE in Pyro: torch.nn encoder and decoder, `pyro.plate` with subsampling,
    `SVI(model, guide, Adam(1e-3), Trace_ELBO()).step` per minibatch. Needs torch and pyro."""

    def __init__(self, *, x_dim: int, hidden: int, z_dim: int, n_data: int, batch_size: int):
        import pyro
        import pyro.distributions as pdist
        import torch
        from pyro.infer import SVI, Trace_ELBO
        from pyro.optim import Adam

        self.torch, self.n_data, self.batch_size = torch, n_data, batch_size
        torch.manual_seed(0)
        pyro.clear_param_store()
        nn_ = torch.nn
        encoder = nn_.Sequential(
            nn_.Linear(x_dim, hidden), nn_.ReLU(), nn_.Linear(hidden, 2 * z_dim)
        )
        decoder = nn_.Sequential(nn_.Linear(z_dim, hidden), nn_.ReLU(), nn_.Linear(hidden, x_dim))

        def model(xb):
            pyro.module("decoder", decoder)
            with pyro.plate("data", n_data, subsample_size=xb.shape[0]):
                z = pyro.sample(
                    "z", pdist.Normal(xb.new_zeros(z_dim), xb.new_ones(z_dim)).to_event(1)
                )
                pyro.sample("x", pdist.Bernoulli(logits=decoder(z)).to_event(1), obs=xb)

        def guide(xb):
            pyro.module("encoder", encoder)
            with pyro.plate("data", n_data, subsample_size=xb.shape[0]):
                loc, log_scale = encoder(xb).chunk(2, dim=-1)
                pyro.sample("z", pdist.Normal(loc, log_scale.exp()).to_event(1))

        self.svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())

    def epoch(self, x_train: Any, seed: int) -> np.ndarray:
        order = np.random.default_rng(seed).permutation(self.n_data)
        losses = []
        for i in range(self.n_data // self.batch_size):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            losses.append(self.svi.step(x_train[idx]))
        return np.asarray(losses) / self.n_data


def _pyro_available() -> bool:
    try:
        import pyro  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(
    quick: bool = False,
    *,
    steps_per_epoch: int | None = None,
    batch_size: int = 128,
    x_dim: int = 784,
    hidden: int = 400,
    z_dim: int = 20,
    repeats: int | None = None,
    matmul_sizes: tuple[int, ...] | None = None,
    matmul_repeats: int | None = None,
    data: str = "binarized_mnist",
    init_draws: int | None = None,
    pyro_baseline: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its result (see the module docstring).

    Args:
        quick: fewer steps, repeats and smaller matmuls, for tests and smoke runs.
        steps_per_epoch: minibatches per epoch; n_data = steps_per_epoch * batch_size
            (default 200, or 20 when quick).
        batch_size: minibatch size B.
        x_dim: observation size (784 for MNIST).
        hidden: width of the encoder's and decoder's hidden layer.
        z_dim: latent size.
        repeats: timed epochs per variant, after a warm-up epoch (default 7, or 2 when quick).
        matmul_sizes: square matmul sizes for the peak (default 1024, 2048, 3072; quick 256, 512).
        matmul_repeats: timed matmuls per size (default 5, or 2 when quick).
        data: "binarized_mnist" (random data if it cannot be loaded) or "random".
        init_draws: noise draws for the loss-at-init comparison (default 32, or 8 when quick).
        pyro_baseline: also time the Pyro VAE when PyTorch and Pyro are installed.
        seed: seed of the initializations, data order and noise.

    Returns:
        A dict with the sizes, the FLOP count and its formula, the matmul peak, per-variant
        timings, the ratios library / floor, the losses at initialization, and a `table`.
    """
    steps_per_epoch = steps_per_epoch or (20 if quick else 200)
    repeats = repeats or (2 if quick else 7)
    matmul_sizes = matmul_sizes or ((256, 512) if quick else (1024, 2048, 3072))
    matmul_repeats = matmul_repeats or (2 if quick else 5)
    init_draws = init_draws or (8 if quick else 32)
    n_data = steps_per_epoch * batch_size

    peak = matmul_peak(tuple(matmul_sizes), matmul_repeats)

    x_np, data_note = load_train(n_data, x_dim, data, seed)
    x_train = jnp.asarray(x_np)

    model = vae_model(MLP((hidden,), x_dim, "relu"), z_dim=z_dim, likelihood="bernoulli")
    guide = amortized_guide(MLP((hidden,), 2 * z_dim, "relu"), x_dim=x_dim)
    trainer = Trainer(
        model, guide, make_optimizer(1e-3), n_data=n_data, batch_size=batch_size, objective="elbo"
    )
    hand = HandVAE(x_dim=x_dim, hidden=hidden, z_dim=z_dim, n_data=n_data, batch_size=batch_size)
    init = init_losses(trainer, hand, x_train[: 4 * batch_size], seed=seed, draws=init_draws)

    epoch_key = jax.random.key(seed + 3)
    variants: dict[str, Callable[[Any, int], tuple[Any, jax.Array]]] = {
        "library (Trainer.run_epoch)": lambda s, e: trainer.run_epoch(s, x_train),
        "hand-written lax.scan epoch": lambda s, e: hand.scan_epoch(
            s, x_train, jax.random.fold_in(epoch_key, e)
        ),
        "hand-written Python loop": lambda s, e: hand.loop_epoch(
            s, x_train, jax.random.fold_in(epoch_key, e)
        ),
    }
    states: dict[str, Any] = {
        "library (Trainer.run_epoch)": trainer.init(jax.random.key(seed), x_train),
        "hand-written lax.scan epoch": hand.init(jax.random.key(seed)),
        "hand-written Python loop": hand.init(jax.random.key(seed)),
    }
    numpyro_loop = NumPyroLoop(model, guide, n_data=n_data, batch_size=batch_size)
    variants["NumPyro style: jit(svi.update) in a Python loop"] = lambda s, e: numpyro_loop.epoch(
        s, x_train, jax.random.fold_in(epoch_key, e)
    )
    states["NumPyro style: jit(svi.update) in a Python loop"] = numpyro_loop.init(
        jax.random.key(seed), x_train
    )
    if pyro_baseline and _pyro_available():
        import torch

        pyro_vae = PyroVAE(
            x_dim=x_dim, hidden=hidden, z_dim=z_dim, n_data=n_data, batch_size=batch_size
        )
        x_torch = torch.from_numpy(np.array(x_np, np.float32))
        variants["Pyro SVI (PyTorch)"] = lambda s, e: (None, pyro_vae.epoch(x_torch, seed + e))
        states["Pyro SVI (PyTorch)"] = None
    times: dict[str, list[float]] = {name: [] for name in variants}
    compile_s: dict[str, float] = {}
    last_losses: dict[str, float] = {}
    for epoch in range(repeats + 1):  # epoch 0 compiles; the variants take turns
        for name, epoch_fn in variants.items():
            start = time.perf_counter()
            states[name], losses = jax.block_until_ready(epoch_fn(states[name], epoch))
            seconds = time.perf_counter() - start
            if epoch == 0:
                compile_s[name] = seconds
            else:
                times[name].append(seconds)
            last_losses[name] = float(jnp.mean(losses))

    flops_fwd = 2 * batch_size * (x_dim * hidden + hidden * 2 * z_dim + z_dim * hidden)
    flops_fwd += 2 * batch_size * hidden * x_dim
    flops_step = 3 * flops_fwd
    results: dict[str, dict[str, float]] = {}
    for name, ts in times.items():
        sec = median(ts)
        steps_s = steps_per_epoch / sec
        gflops = flops_step * steps_s / 1e9
        results[name] = {
            "seconds_per_epoch_median": sec,
            "seconds_per_epoch_all": ts,
            "first_epoch_seconds_incl_compile": compile_s[name],
            "steps_per_s": steps_s,
            "ms_per_step": 1e3 / steps_s,
            "gflops": gflops,
            "fraction_of_peak": gflops / peak["peak_gflops"],
            "mean_loss_last_epoch": last_losses[name],
        }
    lib, scan, loop, numpyro_rate = (results[name]["steps_per_s"] for name in list(variants)[:4])
    ratios = {
        "library_over_hand_scan": lib / scan,
        "library_over_hand_loop": lib / loop,
        "library_over_numpyro_loop": lib / numpyro_rate,
    }
    if "Pyro SVI (PyTorch)" in results:
        ratios["library_over_pyro"] = lib / results["Pyro SVI (PyTorch)"]["steps_per_s"]
    rows = [
        {
            "variant": name,
            "steps/s": r["steps_per_s"],
            "ms/step": r["ms_per_step"],
            "GFLOP/s": r["gflops"],
            "% of matmul peak": 100 * r["fraction_of_peak"],
            "library / this": lib / r["steps_per_s"],
            "loss last epoch": r["mean_loss_last_epoch"],
        }
        for name, r in results.items()
    ]
    rows.append({"variant": "matmul peak (jnp.dot f32)", "GFLOP/s": peak["peak_gflops"]})
    notes = [
        data_note,
        f"n_data = {n_data}, batch {batch_size}, {steps_per_epoch} steps/epoch, median of "
        f"{repeats} epochs after a compile warm-up",
        f"FLOPs/step = {flops_step / 1e6:.1f} M: {FLOP_FORMULA}",
        "matmul peak by size (GFLOP/s): "
        + ", ".join(f"{n}: {g:.1f}" for n, g in peak["gflops_by_size"].items()),
        f"-ELBO/datapoint at init on {init['num_datapoints']} points ({init_draws} draws): "
        f"library {init['library']:.2f}, hand-written on the library's parameters "
        f"{init['hand_same_params']:.2f} (rel. diff {init['rel_diff_same_params']:.2%}), "
        f"hand-written own init {init['hand_own_init']:.2f} "
        f"(rel. diff {init['rel_diff_own_init']:.2%})",
        f"library / hand-written scan = {ratios['library_over_hand_scan']:.3f} (targets >= 0.9,"
        f" issue 6: >= 0.98); library / hand-written Python loop = "
        f"{ratios['library_over_hand_loop']:.3f}; library / NumPyro-style loop = "
        f"{ratios['library_over_numpyro_loop']:.3f}; library / Pyro = "
        + (
            f"{ratios['library_over_pyro']:.2f} (target >= 2.3)"
            if "library_over_pyro" in ratios
            else "not measured (PyTorch or Pyro not installed)"
        ),
    ]
    return {
        "sizes": {
            "n_data": n_data,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "x_dim": x_dim,
            "hidden": hidden,
            "z_dim": z_dim,
            "repeats": repeats,
        },
        "data": data_note,
        "flops_per_step": flops_step,
        "flops_formula": FLOP_FORMULA,
        "matmul": peak,
        "variants": results,
        "ratios": ratios,
        "init_loss_per_datapoint": init,
        "table": {"columns": list(rows[0]), "rows": rows},
        "notes": notes,
    }
