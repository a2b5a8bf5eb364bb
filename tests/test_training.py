"""The jitted-epoch trainer: it learns, it resumes exactly, it stops on NaN."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.evaluation.bounds import evaluate_bounds
from amortjax.guides import amortized_guide
from amortjax.inference.checkpoint import restore_checkpoint
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.training import Trainer, TrainingDivergedError, fit, seconds_per_epoch
from amortjax.models import vae_model
from amortjax.models.linear_gaussian import make_linear_gaussian
from amortjax.nets import MLP


def _binarize(key, x):
    return (jax.random.uniform(key, x.shape) < x).astype(x.dtype)


def _tiny_bernoulli_trainer(n=240, lr=3e-3, activation="relu", **settings):
    """A small Bernoulli VAE's trainer and grey-level data; `settings` replace Trainer's."""
    grey = np.random.default_rng(0).uniform(size=(n, 12)).astype(np.float32)
    model = vae_model(MLP((16,), 12, activation), z_dim=3)
    guide = amortized_guide(MLP((16,), 6), x_dim=12)
    settings = {"batch_size": 32, "kl_warmup_epochs": 1.5, "preprocess": _binarize, **settings}
    trainer = Trainer(model, guide, make_optimizer(lr), n_data=n, **settings)
    return trainer, grey


def _leaves(tree):
    def as_numpy(v):
        if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(v))
        return np.asarray(v)

    return [as_numpy(v) for v in jax.tree.leaves(tree)]


def test_linear_vae_learns_the_generating_model():
    # PPCA data with a diagonal posterior: a linear VAE can reach ELBO = log p(x) of the MLE,
    # which is at least the log-likelihood of the true parameters up to sampling noise.
    lg = make_linear_gaussian(jax.random.key(0), x_dim=6, z_dim=2, diagonal_posterior=True)
    x, _ = lg.sample(jax.random.key(1), 2000)
    model = vae_model(MLP((), 6), z_dim=2, likelihood="gaussian")
    guide = amortized_guide(MLP((), 4), x_dim=6)
    trainer = Trainer(model, guide, make_optimizer(1e-2), n_data=2000, batch_size=100)
    result = fit(trainer, x, key=jax.random.key(2), epochs=60, progress=False)
    losses = result.history["train_loss"][1]
    assert losses[-1] < losses[0] - 1.0
    bounds = evaluate_bounds(model, guide, result.params, x, jax.random.key(3), num_samples=10)
    true_log_px = float(lg.log_marginal(x).mean())
    assert bounds.elbo.mean() > true_log_px - 0.05, (bounds.elbo.mean(), true_log_px)
    assert bounds.elbo.mean() < true_log_px + 0.1


def test_interrupted_run_resumes_to_identical_parameters(tmp_path):
    trainer, x = _tiny_bernoulli_trainer()
    full = fit(trainer, x, key=jax.random.key(0), epochs=5, progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_3(state, history):
        if int(state.epoch) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(
            trainer,
            x,
            key=jax.random.key(0),
            epochs=5,
            checkpoint_dir=tmp_path,
            on_epoch_end=stop_at_3,
            progress=False,
        )
    _, meta = restore_checkpoint(tmp_path, trainer.init(jax.random.key(0), x))
    assert meta["epoch"] == 3
    trainer2, _ = _tiny_bernoulli_trainer()  # a fresh process would build a fresh trainer
    resumed = fit(
        trainer2, x, key=jax.random.key(0), epochs=5, checkpoint_dir=tmp_path, progress=False
    )
    for a, b in zip(_leaves(full.params), _leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history["train_loss"] == full.history["train_loss"]
    # one wall time per epoch run by that call: 5 for the full run, the last 2 when resumed
    assert len(full.epoch_seconds) == 5 and len(resumed.epoch_seconds) == 2
    assert all(t > 0 for t in full.epoch_seconds + resumed.epoch_seconds)
    # ... and the whole run's, carried by the checkpoint: the 3 epochs before the resume count
    assert len(resumed.run_epoch_seconds) == 5
    assert resumed.run_epoch_seconds[3:] == resumed.epoch_seconds
    assert resumed.train_seconds > sum(resumed.run_epoch_seconds) > sum(resumed.epoch_seconds)


def test_seconds_per_epoch_leaves_out_the_compiling_first_epoch():
    assert seconds_per_epoch([9.0, 1.0, 3.0, 2.0]) == 2.0
    assert seconds_per_epoch([4.0]) == 4.0
    assert seconds_per_epoch([]) is None


def test_killed_process_resumes_to_identical_parameters(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        import jax, numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_training import _tiny_bernoulli_trainer, fit
        trainer, x = _tiny_bernoulli_trainer()
        def die(state, history):
            if int(state.epoch) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        fit(trainer, x, key=jax.random.key(0), epochs=4, checkpoint_dir={str(tmp_path)!r},
            on_epoch_end=die, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    trainer, x = _tiny_bernoulli_trainer()
    resumed = fit(
        trainer, x, key=jax.random.key(0), epochs=4, checkpoint_dir=tmp_path, progress=False
    )
    assert resumed.history["train_loss"][0] == [1, 2, 3, 4]
    full = fit(trainer, x, key=jax.random.key(0), epochs=4, progress=False)
    for a, b in zip(_leaves(full.params), _leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_checkpoint_trained_under_other_settings(tmp_path):
    """A checkpoint continues only under the settings that trained it: any other learning
    rate, batch size, objective, KL schedule, preprocessing, data, key or decoder (by its loss
    at the initial parameters) is named and refused
    (it used to return the first run's parameters, or extend them under the new settings);
    only the number of epochs may grow."""
    trainer, x = _tiny_bernoulli_trainer(n=64)
    first = fit(
        trainer, x, key=jax.random.key(0), epochs=2, checkpoint_dir=tmp_path, progress=False
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["settings"]["batch_size"] == 32 and meta["settings"]["key"] == [0, 0]
    other_data = x.copy()
    other_data[7, 3] = 1 - other_data[7, 3]
    for changes, data, key, named in (
        ({"lr": 0.5}, x, 0, r"optimizer_first_steps: \[0\.00299.* in the checkpoint, \[0\.49"),
        ({"batch_size": 16}, x, 0, "batch_size: 32 in the checkpoint, 16 now"),
        ({"objective": "iwae", "num_particles": 5, "kl_warmup_epochs": 0}, x, 0, "objective"),
        ({"kl_warmup_epochs": 3.0}, x, 0, "kl_weights: '0.333333 at step 0.*'0.166667 at step 0"),
        ({"preprocess": None}, (x > 0.5).astype(np.float32), 0, "preprocess: 'digest"),
        ({}, other_data, 0, "data_digest"),
        ({}, x, 99, r"key: \[0, 0\] in the checkpoint, \[0, 99\] now"),
        # the same parameter shapes, another decoder (was continued without a word)
        ({"activation": "tanh"}, x, 0, "model_loss: .* another model, guide, likelihood"),
    ):
        other, _ = _tiny_bernoulli_trainer(n=64, **changes)
        with pytest.raises(ValueError, match=f"other settings.*{named}.*new checkpoint_dir"):
            fit(other, data, key=jax.random.key(key), epochs=2, checkpoint_dir=tmp_path,
                progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="has trained 2 epochs, more than epochs=1"):
        fit(trainer, x, key=jax.random.key(0), epochs=1, checkpoint_dir=tmp_path, progress=False)
    # the refusal names the caller's option (an encoder on a frozen decoder: frozen_epochs)
    with pytest.raises(ValueError, match="more than frozen_epochs=1: give frozen_epochs >= 2"):
        fit(trainer, x, key=jax.random.key(0), epochs=1, checkpoint_dir=tmp_path, progress=False,
            epochs_option="frozen_epochs")  # fmt: skip
    assert json.loads((tmp_path / "meta.json").read_text()) == meta  # the refusals wrote nothing
    more = fit(trainer, x, key=jax.random.key(0), epochs=3, checkpoint_dir=tmp_path, progress=False)
    assert more.history["train_loss"][1][:2] == first.history["train_loss"][1]
    # A checkpoint written before the settings were recorded cannot be checked: refused.
    meta = json.loads((tmp_path / "meta.json").read_text())  # the epoch-3 save's
    del meta["settings"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="records no training settings.*new checkpoint_dir"):
        fit(trainer, x, key=jax.random.key(0), epochs=3, checkpoint_dir=tmp_path, progress=False)


def test_a_save_killed_between_its_two_files_is_completed_or_refused(tmp_path, monkeypatch):
    """state.npz and meta.json are renamed one after the other; a kill between the renames
    paired the new state (epoch 3) with the old metadata (epoch 2), and a resume restored it,
    dropping epoch 3 from the history. Now the new metadata's temporary file completes the
    pair; without it the checkpoint is refused, naming the fix."""
    import shutil

    from amortjax.inference import checkpoint

    trainer, x = _tiny_bernoulli_trainer(n=64)
    full = fit(trainer, x, key=jax.random.key(0), epochs=4, progress=False)
    fit(trainer, x, key=jax.random.key(0), epochs=2, checkpoint_dir=tmp_path, progress=False)
    replace = os.replace

    class Killed(BaseException):
        pass

    def killed_before_meta(src, dst):
        if Path(dst).name == "meta.json":
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_before_meta)
    with pytest.raises(Killed):
        fit(trainer, x, key=jax.random.key(0), epochs=3, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert json.loads((tmp_path / "meta.json").read_text())["epoch"] == 2  # the torn pair
    torn = tmp_path.parent / "torn"
    shutil.copytree(tmp_path, torn)
    resumed = fit(
        trainer, x, key=jax.random.key(0), epochs=4, checkpoint_dir=tmp_path, progress=False
    )
    assert resumed.history["train_loss"] == full.history["train_loss"]  # epochs 1, 2, 3, 4
    assert not (tmp_path / "meta.json.tmp").exists()
    # without the temporary file the state's history is lost: refused, not restored
    (torn / "meta.json.tmp").unlink()
    with pytest.raises(ValueError, match=r"torn: state.npz is from save .* move .* away"):
        fit(trainer, x, key=jax.random.key(0), epochs=4, checkpoint_dir=torn, progress=False)
    # a checkpoint written before the save ids: its epochs are compared
    with np.load(torn / "state.npz") as data:
        leaves = {k: data[k] for k in data.files if k != "checkpoint_id"}
    np.savez(torn / "state.npz", **leaves)
    with pytest.raises(ValueError, match="torn: its state has trained 3 epochs.*records 2"):
        fit(trainer, x, key=jax.random.key(0), epochs=4, checkpoint_dir=torn, progress=False)


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_fix(tmp_path):
    """A truncated state.npz raised zipfile.BadZipFile, a truncated meta.json "Unterminated
    string starting at ...", naming neither the file nor the fix."""
    trainer, x = _tiny_bernoulli_trainer(n=64)
    fit(trainer, x, key=jax.random.key(0), epochs=1, checkpoint_dir=tmp_path, progress=False)
    for name in ("meta.json", "state.npz"):
        path = tmp_path / name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(ValueError, match=f"damaged: .*{name} cannot be read.*Move .* away"):
            fit(trainer, x, key=jax.random.key(0), epochs=2, checkpoint_dir=tmp_path,
                progress=False)  # fmt: skip
        path.write_bytes(whole)
    fit(trainer, x, key=jax.random.key(0), epochs=2, checkpoint_dir=tmp_path, progress=False)


def test_seed_determines_the_run():
    trainer, x = _tiny_bernoulli_trainer()
    a = fit(trainer, x, key=jax.random.key(0), epochs=2, progress=False)
    b = fit(trainer, x, key=jax.random.key(0), epochs=2, progress=False)
    c = fit(trainer, x, key=jax.random.key(1), epochs=2, progress=False)
    assert a.history == b.history
    assert a.history != c.history


def test_divergence_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    # the step size jumps to 1e9 after two epochs of 7 steps, so the third epoch diverges
    trainer, x = _tiny_bernoulli_trainer(lr=lambda step: jnp.where(step < 14, 3e-3, 1e9))
    fit(trainer, x, key=jax.random.key(0), epochs=2, checkpoint_dir=tmp_path, progress=False)
    saved, _ = restore_checkpoint(tmp_path, trainer.init(jax.random.key(0), x))
    with pytest.raises(TrainingDivergedError, match=r"epoch 3.*checkpoint .* \(epoch 2\) is kept"):
        fit(trainer, x, key=jax.random.key(0), epochs=6, checkpoint_dir=tmp_path, progress=False)
    after, meta = restore_checkpoint(tmp_path, trainer.init(jax.random.key(0), x))
    assert meta["epoch"] == 2
    for a, b in zip(_leaves(saved), _leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_wrong_sizes_are_rejected():
    trainer, x = _tiny_bernoulli_trainer()
    with pytest.raises(ValueError, match="n_data=240"):
        fit(trainer, x[:100], key=jax.random.key(0), epochs=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(None, None, make_optimizer(1e-3), n_data=10, batch_size=11)
    for bad, match in (
        ({"epochs": 0}, "fit: epochs must be an integer >= 1, got 0"),
        ({"checkpoint_every": -1}, "fit: checkpoint_every must be an integer >= 1"),
        ({"eval_every": 1.5}, "fit: eval_every must be an integer >= 1, got 1.5"),
    ):
        with pytest.raises(ValueError, match=match):
            fit(trainer, x, key=jax.random.key(0), progress=False, **{"epochs": 1, **bad})
    opt = make_optimizer(1e-3)
    with pytest.raises(ValueError, match="Trainer: num_particles must be an integer >= 1"):
        Trainer(None, None, opt, n_data=10, batch_size=5, num_particles=0)
    with pytest.raises(ValueError, match=r"Trainer: kl_warmup_epochs must be a finite number in"):
        Trainer(None, None, opt, n_data=10, batch_size=5, kl_warmup_epochs=float("nan"))
    # a learning rate where the optimizer goes failed inside NumPyro's optimizer wrapper
    with pytest.raises(ValueError, match=r"Trainer: optimizer must be an optax .*got 0.001"):
        Trainer(None, None, 1e-3, n_data=10, batch_size=5)


def test_fit_refuses_data_outside_the_likelihood_after_preprocessing():
    """Grey levels train a Bernoulli VAE only through a binarizing preprocess."""
    trainer, grey = _tiny_bernoulli_trainer(n=64)
    fit(trainer, grey, key=jax.random.key(0), epochs=1, progress=False)  # binarized per epoch
    plain = Trainer(trainer.model, amortized_guide(MLP((16,), 6), x_dim=12), make_optimizer(1e-3),
                    n_data=64, batch_size=32)  # fmt: skip
    with pytest.raises(ValueError, match="64 rows of x .* outside the support .* binarize"):
        fit(plain, grey, key=jax.random.key(0), epochs=1, progress=False)
    nan = (grey > 0.5).astype(np.float32)
    nan[5, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 of 64 rows \(first: row 5"):
        fit(plain, nan, key=jax.random.key(0), epochs=1, progress=False)


def test_iwae_refuses_a_kl_weight():
    """IWAE has no KL term: a weight on the latent sites inside its log-mean-exp is no bound."""
    from amortjax.inference.objectives import kl_schedule

    opt = make_optimizer(1e-3)
    for kwargs in ({"kl_warmup_epochs": 1.0}, {"kl_schedule": kl_schedule("constant", beta=0.5)}):
        with pytest.raises(ValueError, match="objective='iwae' has no KL term"):
            Trainer(None, None, opt, n_data=10, batch_size=5, objective="iwae", **kwargs)
