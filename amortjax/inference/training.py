"""Jit-compiled SVI training: one epoch is one `lax.scan` over minibatches of `svi.update`.

`Trainer` holds a NumPyro `SVI` and compiles its epoch once (the last partial batch is dropped,
so every step has one shape). `fit` runs epochs with a progress bar, a NaN guard, optional
evaluation callbacks and checkpoints of the whole `TrainState`, and resumes from the last
checkpoint: epoch e draws its minibatch order and preprocessing noise from
`fold_in(state.key, e)`, so a resumed run ends with exactly the parameters of an uninterrupted
one. Each checkpoint records `training_fingerprint`, what decides the parameters besides the
model and guide, and a resume under another fingerprint is refused: only `epochs` may grow.

Losses are reported per datapoint: the SVI loss (which the data plate scales to the whole
dataset) divided by the number of datapoints, i.e. an estimate of -ELBO (or -IWAE-k) in nats.

The data plate of each step holds the minibatch's true indices into the training set (see
`with_data_indices`), so that a model or guide with per-datapoint parameters (e.g.
`amortjax.guides.local_guide`) reads the rows of the datapoints it is given. This module is not
an evaluator (see `amortjax.evaluation`) nor the per-example optimizer of a frozen model (see
`amortjax.inference.local`).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from numpyro import handlers
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState
from numpyro.optim import optax_to_numpyro
from tqdm.auto import tqdm

from amortjax.checks import check_float, check_int, check_key
from amortjax.engine import release_compiled_programs
from amortjax.inference.checkpoint import (
    check_settings,
    has_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from amortjax.inference.objectives import kl_warmup_weight, kl_weighted, make_objective
from amortjax.models import DATA_PLATE
from amortjax.sharding import active_mesh, check_divisible, constrain_rows, replicate
from amortjax.traces import check_array, check_data, check_model_and_guide

History = dict[str, tuple[list[int], list[float]]]
"""Metric name -> (epochs at which it was recorded, values)."""


class TrainingDivergedError(FloatingPointError):
    """The loss or the parameters became NaN or infinite."""


class CheckpointAheadError(ValueError):
    """A checkpoint has trained more epochs than `fit` was asked for (it cannot be continued
    to fewer); carries what a caller needs to say the fix in its own terms.

    Attributes:
        directory: the checkpoint's folder.
        trained: the epochs it has trained.
        epochs: the epochs asked for.
        option: the name under which the caller's user gives `epochs` (`fit`'s `epochs_option`).
    """

    def __init__(self, directory: str | Path, trained: int, epochs: int, option: str):
        self.directory, self.trained, self.epochs, self.option = directory, trained, epochs, option
        super().__init__(
            f"the checkpoint in {directory} has trained {trained} epochs, more than "
            f"{option}={epochs}: give {option} >= {trained} to continue it, or a new "
            f"checkpoint_dir to train {epochs}"
        )


def with_data_indices(fn: Callable) -> Callable:
    """Wraps a model or guide to take the data plate's indices as a `data_indices` keyword.

    NumPyro's `plate(DATA_PLATE, n_data, subsample_size=B)` draws B random indices of its own,
    unrelated to the minibatch the caller passes. Substituting the plate's value by name (a
    "plate" message is substituted like a sample site) makes `with data_plate(x, n_data) as ind`
    give the minibatch's true indices into the dataset, in model and guide alike.

    Args:
        fn: a NumPyro model or guide with its local sites in `DATA_PLATE`.

    Returns:
        `wrapped(*args, data_indices=None, **kwargs)`, data_indices `[batch]` int: the position
        in the dataset of each row of the batch; when None, `fn` runs unchanged (NumPyro's own
        indices), so that callers of `Trainer.svi` that evaluate a loss need not pass it.
    """

    def wrapped(*args, data_indices: jax.Array | None = None, **kwargs):
        if data_indices is None:
            return fn(*args, **kwargs)
        return handlers.substitute(fn, data={DATA_PLATE: data_indices})(*args, **kwargs)

    return wrapped


class TrainState(NamedTuple):
    """Everything a run needs to continue.

    Attributes:
        svi_state: NumPyro's state: parameters, optimizer state, the sampling key.
        epoch: number of completed epochs (int32 scalar).
        key: the run's base key; epoch e uses `fold_in(key, e)` for data order and noise.
    """

    svi_state: SVIState
    epoch: jax.Array
    key: jax.Array


class FitResult(NamedTuple):
    """What `fit` returns: the final state, its parameters, the recorded history and the wall
    seconds of each training epoch this call ran (`epoch_seconds[i]`: the compiled epoch alone,
    without evaluation or checkpointing; the first one includes compilation).

    `run_epoch_seconds` and `train_seconds` cover the whole run, the calls before a resume
    included (they travel in the checkpoint): every epoch's seconds, and the wall seconds spent
    in `fit` up to the last checkpoint plus this call's. Work lost to a kill after the last
    checkpoint is not counted (it is redone and counted then)."""

    state: TrainState
    params: dict
    history: History
    epoch_seconds: tuple[float, ...] = ()
    run_epoch_seconds: tuple[float, ...] = ()
    train_seconds: float = 0.0


def seconds_per_epoch(epoch_seconds: Sequence[float]) -> float | None:
    """The steady-state time of one training epoch from `FitResult.epoch_seconds`: the median
    of the epochs after the first (which includes compilation), the first when it is the only
    one, None when no epoch ran."""
    if not epoch_seconds:
        return None
    rest = list(epoch_seconds[1:]) or list(epoch_seconds)
    return float(np.median(rest))


class Trainer:
    """SVI on a dataset held on the device, one compiled epoch at a time.

    Args:
        model: NumPyro model `model(x, *, n_data)` with local latents in the data plate.
        guide: NumPyro guide with the same signature.
        optimizer: an optax transformation (see `make_optimizer`).
        n_data: number of training datapoints (the plate size).
        batch_size: minibatch size; an epoch is `n_data // batch_size` steps.
        objective: "elbo", "meanfield_elbo" or "iwae" (see `make_objective`).
        num_particles: samples per datapoint per step (k for "iwae").
        kl_warmup_epochs: epochs over which the KL weight rises linearly from 0 to 1.
        kl_schedule: `weight(step) -> scalar`, the KL weight of each global optimizer step
            (counted from 0 over the whole run), e.g. from
            `amortjax.inference.objectives.kl_schedule` (beta-VAE, warm-up, cyclical);
            traced inside the compiled epoch. Not together with kl_warmup_epochs, and for the
            ELBO objectives only.
        preprocess: `preprocess(key, x_batch) -> x_batch`, applied to each minibatch inside the
            compiled epoch (e.g. `amortjax.data.dynamic_binarize`).
        mesh: a device mesh with a data axis (`amortjax.sharding.data_mesh()`) for
            data-parallel training: each minibatch is split over the devices, parameters and
            optimizer state are replicated, and XLA sums the gradients. None: the mesh of an
            enclosing `amortjax.sharding.data_parallel()` block, else one device.

    In each step the data plate's indices are the minibatch's indices into `x_train` (see
    `with_data_indices`); `self.svi`'s model and guide therefore take a `data_indices` keyword.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optimizer: optax.GradientTransformation,
        *,
        n_data: int,
        batch_size: int,
        objective: str = "elbo",
        num_particles: int = 1,
        kl_warmup_epochs: float = 0,
        kl_schedule: Callable[[jax.Array], jax.Array] | None = None,
        preprocess: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        mesh: Mesh | None = None,
    ):
        check_int("Trainer", 1, n_data=n_data, batch_size=batch_size, num_particles=num_particles)
        if not (callable(getattr(optimizer, "init", None))
                and callable(getattr(optimizer, "update", None))):  # fmt: skip
            raise ValueError(
                f"Trainer: optimizer must be an optax transformation (e.g. make_optimizer(1e-3) "
                f"or optax.adam(1e-3)), got {optimizer!r}"
            )
        check_float("Trainer", "kl_warmup_epochs", kl_warmup_epochs, low=0)
        for name, fn, fix in (
            ("kl_schedule", kl_schedule, "e.g. kl_schedule('linear', warmup_steps=1000)"),
            ("preprocess", preprocess, "e.g. amortjax.dynamic_binarize"),
        ):
            if fn is not None and not callable(fn):
                raise ValueError(f"Trainer: {name} must be a function or None, got {fn!r} ({fix})")
        if not 0 < batch_size <= n_data:
            raise ValueError(f"batch_size must be in [1, n_data={n_data}], got {batch_size}")
        mesh = active_mesh() if mesh is None else mesh
        if mesh is not None:
            check_divisible(batch_size, mesh)
        self.mesh = mesh
        self.n_data = n_data
        self.batch_size = batch_size
        self.steps_per_epoch = n_data // batch_size
        if kl_schedule is not None and kl_warmup_epochs:
            raise ValueError(
                f"give kl_warmup_epochs={kl_warmup_epochs} or kl_schedule, not both (a linear "
                "warm-up is kl_schedule('linear', warmup_steps=...))"
            )
        self.warmup_steps = round(kl_warmup_epochs * self.steps_per_epoch)
        if self.warmup_steps > 0:
            kl_schedule = functools.partial(kl_warmup_weight, warmup_steps=self.warmup_steps)
        if kl_schedule is not None and objective == "iwae":
            raise ValueError(
                "objective='iwae' has no KL term for kl_schedule / kl_warmup_epochs to weight "
                "(a weight on the latent sites inside IWAE's log-mean-exp makes it a bound of "
                "nothing); use objective='elbo' with the KL schedule, or IWAE without one"
            )
        self.kl_schedule = kl_schedule
        self.preprocess = preprocess
        self.optimizer, self.objective, self.num_particles = optimizer, objective, num_particles
        self.model = model  # as given: `fit` checks the data against it
        self._unweighted = (with_data_indices(model), with_data_indices(guide))  # for `init`
        if self.kl_schedule is not None:
            model, guide = kl_weighted(model), kl_weighted(guide)
        model, guide = with_data_indices(model), with_data_indices(guide)
        self.svi = SVI(
            model, guide, optax_to_numpyro(optimizer), make_objective(objective, num_particles)
        )
        self._run_epoch = jax.jit(self._epoch)

    def _kwargs(self, step: jax.Array, idx: jax.Array) -> dict:
        kwargs: dict[str, Any] = {"n_data": self.n_data, "data_indices": idx}
        if self.kl_schedule is not None:
            kwargs["kl_weight"] = self.kl_schedule(step)
        return kwargs

    def init(self, key: jax.Array, x_train: jax.Array) -> TrainState:
        """Initial state: parameters initialized from `key`, epoch 0.

        x_train is checked first (`amortjax.traces.check_array`: rows of finite numbers; a
        NaN would otherwise surface as a misleading model error, or, past the first batch, as
        NaN losses), then model and guide on the first batch
        (`amortjax.traces.check_model_and_guide`): a missing or unscaled data plate, or a guide
        that leaves latents of the model undrawn, is refused instead of training the wrong
        objective. (`fit` also checks every row against the likelihood's support.)
        """
        svi_key, run_key = jax.random.split(check_key("Trainer.init", key))
        check_array(x_train)
        x0 = jnp.asarray(x_train[: self.batch_size])
        if self.preprocess is not None:
            x0 = self.preprocess(svi_key, x0)
        check_model_and_guide(
            *self._unweighted, x0, svi_key, self.n_data, data_indices=jnp.arange(self.batch_size)
        )
        kwargs = self._kwargs(jnp.zeros((), jnp.int32), jnp.arange(self.batch_size))
        svi_state = self.svi.init(svi_key, x0, **kwargs)
        return self.place(TrainState(svi_state, jnp.zeros((), jnp.int32), run_key))

    def place(self, tree: Any) -> Any:
        """Puts a state or the training data where the compiled epoch expects it: replicated
        on every device of the mesh (as a device array when there is no mesh)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return replicate(self.mesh, tree)

    def _epoch(self, state: TrainState, x_train: jax.Array) -> tuple[TrainState, jax.Array]:
        perm_key, noise_key = jax.random.split(jax.random.fold_in(state.key, state.epoch))
        order = jax.random.permutation(perm_key, x_train.shape[0])
        batches = order[: self.steps_per_epoch * self.batch_size].reshape(
            self.steps_per_epoch, self.batch_size
        )

        def step(svi_state, inputs):
            i, idx = inputs
            idx = constrain_rows(self.mesh, idx)
            xb = constrain_rows(self.mesh, x_train[idx])
            if self.preprocess is not None:
                xb = self.preprocess(jax.random.fold_in(noise_key, i), xb)
            global_step = state.epoch * self.steps_per_epoch + i
            svi_state, loss = self.svi.update(svi_state, xb, **self._kwargs(global_step, idx))
            return svi_state, loss / self.n_data

        steps = jnp.arange(self.steps_per_epoch)
        svi_state, losses = jax.lax.scan(step, state.svi_state, (steps, batches))
        return TrainState(svi_state, state.epoch + 1, state.key), losses

    def run_epoch(self, state: TrainState, x_train: jax.Array) -> tuple[TrainState, jax.Array]:
        """One compiled epoch. Returns the new state and the per-step losses `[steps]`."""
        return self._run_epoch(state, x_train)

    def params(self, state: TrainState) -> dict:
        """The model's and guide's parameters in a state."""
        return self.svi.get_params(state.svi_state)


KL_PROBE_STEPS = 2**20
"""Steps 0, 1, ... at which `training_fingerprint` reads a KL schedule."""


def _digest(array: Any) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha1(array.tobytes()).hexdigest()[:16]


def training_fingerprint(
    trainer: Trainer, state: TrainState, x_train: np.ndarray | jax.Array, key: jax.Array
) -> dict[str, Any]:
    """What decides the parameters `fit` trains, besides the model, the guide and `epochs`.

    `fit` records it in every checkpoint and refuses to continue one recorded under another.
    The optimizer, the KL schedule and the preprocessing are functions, so they enter by what
    they do: the sizes of the optimizer's first three updates of the initial parameters
    under fixed probe gradients (1, 1000 and 0.001 in every coordinate: Adam's step size, its
    constants and gradient clipping all show), the KL weights of the first `KL_PROBE_STEPS`
    steps (a digest and the first and last), and a digest of the first minibatch
    preprocessed with a fixed key. The model and guide enter by the shapes of their
    parameters, which `restore_checkpoint` checks, and by what they compute: the loss at the
    initial parameters on that minibatch with the initial state's key, per datapoint
    (`model_loss`, compared to `checkpoint.APPROXIMATE`'s relative tolerance, so that another
    device's rounding passes and another activation, likelihood or refinement does not: a
    ReLU VAE's checkpoint was continued as a tanh one).

    Args:
        trainer: the run's trainer.
        state: its initial state (`trainer.init(key, x_train)`).
        x_train: the training data `[n_data, ...]`.
        key: the run's key.

    Returns:
        A JSON-ready dict, name -> value; floats rounded to 6 significant digits so that the
        same settings read the same on any device.
    """

    def optimizer_steps(params):
        opt_state, sizes = trainer.optimizer.init(params), []
        for scale in (1.0, 1e3, 1e-3):
            grads = jax.tree.map(lambda p, scale=scale: jnp.full_like(p, scale), params)
            updates, opt_state = trainer.optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            sizes.append(jnp.max(jnp.stack([jnp.abs(u).max() for u in jax.tree.leaves(updates)])))
        return jnp.stack(sizes)

    params = trainer.svi.optim.get_params(state.svi_state.optim_state)
    steps = [float(f"{v:.6g}") for v in np.asarray(jax.jit(optimizer_steps)(params))]
    kl = None
    if trainer.kl_schedule is not None:
        weights = np.asarray(jax.vmap(trainer.kl_schedule)(jnp.arange(KL_PROBE_STEPS)), np.float64)
        kl = (
            f"{weights[0]:.6g} at step 0, {weights[-1]:.6g} at step {KL_PROBE_STEPS - 1}, "
            f"digest {_digest(weights.round(6))}"
        )
    preprocess = None
    first = jnp.asarray(x_train[: trainer.batch_size])
    if trainer.preprocess is not None:
        first = trainer.preprocess(jax.random.key(0), first)
        preprocess = f"digest {_digest(first)}"
    kwargs = trainer._kwargs(jnp.zeros((), jnp.int32), jnp.arange(trainer.batch_size))
    loss = jax.jit(lambda s, xb: trainer.svi.evaluate(s, xb, **kwargs))(state.svi_state, first)
    x = np.asarray(x_train)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {
        "n_data": trainer.n_data,
        "batch_size": trainer.batch_size,
        "objective": trainer.objective,
        "num_particles": trainer.num_particles,
        "optimizer_first_steps": steps,
        "kl_weights": kl,
        "preprocess": preprocess,
        "model_loss": float(f"{float(loss) / trainer.n_data:.6g}"),
        "data_shape": list(x.shape),
        "data_dtype": str(x.dtype),
        "data_digest": _digest(x),
        "key": np.asarray(key).tolist(),
    }


def _all_finite(tree: Any) -> bool:
    return bool(
        jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda v: jnp.isfinite(v).all(), tree))
    )


def _record(history: History, name: str, epoch: int, value: float) -> None:
    epochs, values = history.setdefault(name, ([], []))
    epochs.append(epoch)
    values.append(float(value))


def fit(
    trainer: Trainer,
    x_train: np.ndarray | jax.Array,
    *,
    key: jax.Array,
    epochs: int,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    eval_every: int = 1,
    on_epoch_end: Callable[[TrainState, History], None] | None = None,
    progress: bool = True,
    epochs_option: str = "epochs",
) -> FitResult:
    """Trains for `epochs` epochs in all, resuming from `checkpoint_dir` when it holds a state.

    Args:
        trainer: the compiled trainer.
        x_train: training data `[n_data, ...]`, moved to the device once.
        key: PRNG key of the run.
        epochs: total number of epochs, counting those of a resumed run.
        checkpoint_dir: where the state is saved every `checkpoint_every` epochs and at the end,
            with the run's `training_fingerprint`. A checkpoint there is continued only if it
            was trained under the same fingerprint and for at most `epochs` epochs.
        checkpoint_every: epochs between checkpoints.
        evaluate: `evaluate(state) -> {metric: value}`, called every `eval_every` epochs and at
            the end; values are added to the history.
        eval_every: epochs between evaluations.
        on_epoch_end: called with the state and history after each epoch (after checkpointing).
        progress: show a progress bar with the running loss.
        epochs_option: the name of the caller's option that gives `epochs` (e.g. an
            experiment's `frozen_epochs`), named by the refusal of a checkpoint trained longer.

    Returns:
        A `FitResult`; history["train_loss"] is the mean per-datapoint loss of each epoch;
        epoch_seconds one wall time per epoch run here, run_epoch_seconds and train_seconds
        the whole run's, resumes included.

    Raises:
        ValueError: a checkpoint in checkpoint_dir trained under other settings (each named,
            old and new), under unrecorded ones, or for more than `epochs` epochs (a
            `CheckpointAheadError`).
        TrainingDivergedError: when an epoch's loss or parameters are not finite; the last
            checkpoint (from before that epoch) is kept.
    """
    key = check_key("fit", key)
    release_compiled_programs()
    check_int("fit", 1, epochs=epochs, checkpoint_every=checkpoint_every, eval_every=eval_every)
    x_host = check_array(x_train)
    x_train = trainer.place(jnp.asarray(x_host))
    if x_train.shape[0] != trainer.n_data:
        raise ValueError(
            f"x_train has {x_train.shape[0]} datapoints, the trainer was built for "
            f"n_data={trainer.n_data}"
        )
    called = time.perf_counter()
    state = trainer.init(key, x_train)
    # The data the model will see (after the trainer's preprocessing, e.g. a binarization)
    # must lie in its likelihood's support: grey levels under a Bernoulli are refused here.
    seen = x_train if trainer.preprocess is None else trainer.preprocess(key, x_train)
    check_data(trainer.model, trainer.params(state), seen, n_data=trainer.n_data)
    history: History = {}
    seconds_before, epochs_before = 0.0, []
    settings = None
    if checkpoint_dir is not None:
        settings = training_fingerprint(trainer, state, x_host, key)
    if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        state, meta = restore_checkpoint(checkpoint_dir, state)
        if meta.get("epoch", int(state.epoch)) != int(state.epoch):
            # a checkpoint written before the save ids, torn between its two files
            raise ValueError(
                f"the checkpoint in {checkpoint_dir} is torn: its state has trained "
                f"{int(state.epoch)} epochs, its metadata (history) records {meta['epoch']}; "
                "restoring it would lose the history between them. Move the folder away (or "
                "delete it) to train afresh"
            )
        check_settings(checkpoint_dir, meta.get("settings"), settings)
        if int(state.epoch) > epochs:
            raise CheckpointAheadError(checkpoint_dir, int(state.epoch), epochs, epochs_option)
        state = trainer.place(state)
        history = {k: (list(v[0]), list(v[1])) for k, v in meta.get("history", {}).items()}
        seconds_before = float(meta.get("train_seconds", 0.0))
        epochs_before = list(meta.get("epoch_seconds", []))
    start = int(state.epoch)
    bar = tqdm(
        range(start, epochs),
        initial=start,
        total=epochs,
        desc="train",
        unit="epoch",
        disable=not progress,
    )
    epoch_seconds: list[float] = []
    for _ in bar:
        tick = time.perf_counter()
        new_state, losses = trainer.run_epoch(state, x_train)
        losses = np.asarray(losses)
        jax.block_until_ready(new_state)
        epoch_seconds.append(time.perf_counter() - tick)
        epoch = int(new_state.epoch)
        if not np.isfinite(losses).all() or not _all_finite(new_state.svi_state.optim_state):
            bad = np.flatnonzero(~np.isfinite(losses))
            where = (
                f"the loss of step {bad[0]} of {len(losses)} is {losses[bad[0]]}"
                if len(bad)
                else "the parameters became non-finite"
            )
            kept = (
                f"the checkpoint in {checkpoint_dir} (epoch {start}) is kept"
                if checkpoint_dir is not None and has_checkpoint(checkpoint_dir)
                else "no checkpoint was written"
            )
            largest = float(np.max(np.abs(np.asarray(x_train[: trainer.batch_size]))))
            scale = (
                f" The data reach |x| = {largest:g}: an encoder's output overflows on inputs far "
                "from unit scale; give it an input transform (MLP(..., input_transform='log1p') "
                "for counts, or amortjax.nets.Standardize.fit(x_train))."
                if largest > 20 and bad.size and bad[0] == 0 and start == 0
                else ""
            )
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch}: {where}; {kept}. Lower the learning rate, "
                f"clip gradients or check the data.{scale}"
            )
        state = new_state
        _record(history, "train_loss", epoch, losses.mean())
        if evaluate is not None and (epoch % eval_every == 0 or epoch == epochs):
            for name, value in evaluate(state).items():
                _record(history, name, epoch, value)
        bar.set_postfix(loss=f"{losses.mean():.3f}")
        if checkpoint_dir is not None and (epoch % checkpoint_every == 0 or epoch == epochs):
            meta = {
                "epoch": epoch,
                "settings": settings,
                "history": history,
                "train_seconds": seconds_before + time.perf_counter() - called,
                "epoch_seconds": epochs_before + epoch_seconds,
            }
            save_checkpoint(checkpoint_dir, state, meta)
            start = epoch
        if on_epoch_end is not None:
            on_epoch_end(state, history)
    return FitResult(
        state,
        trainer.params(state),
        history,
        tuple(epoch_seconds),
        tuple(epochs_before + epoch_seconds),
        seconds_before + time.perf_counter() - called,
    )
