"""The gap decomposition against the linear-Gaussian closed forms.

With an imperfect encoder (the best diagonal Gaussian's mean shifted by 0.4 and its scales
stretched by 1.5, for every x), every term is known exactly: L[q] = the ELBO of that q, L[q*] =
the ELBO of the best diagonal Gaussian, log p(x) exact; so the amortization gap is L[q*] - L[q]
and the approximation gap KL(q* || posterior) > 0 (the posterior is correlated).
"""

import jax
import numpy as np
import pytest

from amortjax.data.synthetic import linear_gaussian_vae
from amortjax.evaluation.gaps import best_lower_bound, gap_decomposition
from amortjax.families import DiagonalGaussian
from amortjax.guides import encode
from amortjax.nets import MLP

QSTAR = dict(learning_rate=1e-2, num_samples=20, block_size=50, patience=5)


@pytest.fixture(scope="module")
def exact(lg_correlated):
    lg = lg_correlated
    x, _ = lg.sample(jax.random.key(11), 12)
    log_px = np.asarray(lg.log_marginal(x))
    loc, scale = lg.best_diagonal(x)
    best = np.asarray(lg.elbo(x, loc, scale))
    lam = np.asarray(DiagonalGaussian().pack(loc + 0.4, 1.5 * scale))
    encoder_elbo = np.asarray(lg.elbo(x, loc + 0.4, 1.5 * scale))
    return lg, x, log_px, best, lam, encoder_elbo


def _encoder_params(lg, which, x):
    _, _, params = linear_gaussian_vae(lg, encoder=which)
    return params, np.asarray(encode(MLP((), 2 * lg.z_dim), params, x))


@pytest.fixture(scope="module")
def imperfect_encoder_gaps(exact):
    lg, x, _, _, lam, _ = exact
    model, _, params = linear_gaussian_vae(lg)
    gaps = gap_decomposition(
        model,
        params,
        x,
        lam,
        jax.random.key(0),
        elbo_samples=20_000,  # the encoder's log-weights spread by 4.3 nats: SE 0.03
        iwae_samples=10_000,
        qstar=QSTAR,
        ais_settings=dict(num_chains=16, num_temperatures=500, leapfrog_steps=5),
        batch_size=5,  # 12 = 5 + 5 + 2: padded batches
    )
    return gaps


def test_each_term_matches_its_closed_form(exact, imperfect_encoder_gaps):
    _, _, log_px, best, _, encoder_elbo = exact
    g = imperfect_encoder_gaps
    np.testing.assert_allclose(g.elbo_q, encoder_elbo, atol=0.12)  # 4 standard errors
    np.testing.assert_allclose(g.elbo_qstar, best, atol=0.06)
    # log p̂ is the best of three noisy estimates (each within about 0.2 nats per datapoint).
    np.testing.assert_allclose(g.log_px, log_px, atol=0.2)
    assert abs(g.log_px.mean() - log_px.mean()) < 0.05
    assert (best - encoder_elbo).mean() > 1.0  # the encoder's fault is clear ...
    np.testing.assert_allclose(g.amortization, best - encoder_elbo, atol=0.12)  # ... and measured
    np.testing.assert_allclose(g.approximation, log_px - best, atol=0.12)
    # The posterior is correlated: the diagonal family misses it (by 0.093 nats on average).
    assert (log_px - best).mean() > 0.05
    assert g.approximation.mean() == pytest.approx((log_px - best).mean(), abs=0.04)


def test_gaps_add_up_and_the_summary_reports_them(imperfect_encoder_gaps):
    g = imperfect_encoder_gaps
    np.testing.assert_allclose(g.inference, g.approximation + g.amortization, atol=1e-5)
    s = g.summary()
    assert s["num_datapoints"] == 12
    assert s["log_px_estimator"] in ("iwae_q", "iwae_qstar", "ais")
    assert s["amortization_gap"]["mean"] == pytest.approx(float(g.amortization.mean()))
    se = float(g.amortization.std(ddof=1) / np.sqrt(12))
    assert s["amortization_gap"]["se"] == pytest.approx(se, rel=1e-6)
    # The chosen estimate is the one with the highest mean.
    means = s["info"]["estimates_mean"]
    assert set(means) == {"iwae_q", "iwae_qstar", "ais"}
    assert s["log_px"]["mean"] == pytest.approx(max(means.values()), abs=1e-6)


def test_an_exact_encoder_has_no_amortization_gap(lg_diagonal):
    lg = lg_diagonal  # posterior is diagonal: the encoder outputs it exactly
    model, _, _ = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(3), 8)
    params, lam = _encoder_params(lg, "best_diagonal", x)
    g = gap_decomposition(
        model,
        params,
        x,
        lam,
        jax.random.key(1),
        elbo_samples=2000,
        iwae_samples=500,
        # Started at the optimum, q* only drifts by the optimizer's noise, which a small rate
        # keeps small.
        qstar={**QSTAR, "learning_rate": 1e-3},
        ais_settings=None,
    )
    assert g.ais is None
    np.testing.assert_allclose(g.elbo_q, np.asarray(lg.log_marginal(x)), atol=1e-4)
    assert np.abs(g.amortization).max() < 0.02
    assert np.abs(g.approximation).max() < 0.02


def test_best_lower_bound_and_bad_input():
    name, values = best_lower_bound({"a": np.array([1.0, 3.0]), "b": np.array([2.5, 2.0])})
    assert name == "b" and values.tolist() == [2.5, 2.0]
    with pytest.raises(ValueError, match="no estimate"):
        best_lower_bound({})
    with pytest.raises(ValueError, match=r"encoder_params must be \[N=4, num_params\]"):
        gap_decomposition(
            None,
            {},
            np.zeros((4, 8)),
            np.zeros((3, 6)),
            jax.random.key(0),
            family=DiagonalGaussian(),
        )
