"""ELBO and IWAE-k against the exact log p(x) of linear-Gaussian models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.evaluation.bounds import evaluate_bounds, evaluate_pair, mean_and_stderr
from amortjax.families import DiagonalGaussian
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.models.linear_gaussian import make_linear_gaussian


@pytest.fixture(scope="module")
def correlated_case(lg_correlated):
    lg = lg_correlated
    model, guide, params = linear_gaussian_vae(lg)  # best diagonal q, posterior correlated
    x, _ = lg.sample(jax.random.key(7), 40)
    return lg, model, guide, params, x


def test_elbo_below_iwae_below_log_marginal(correlated_case):
    lg, model, guide, params, x = correlated_case
    log_px = np.asarray(lg.log_marginal(x))
    b = evaluate_bounds(model, guide, params, x, jax.random.key(0), num_samples=5000)
    gap = log_px - np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
    assert gap.min() > 0.05  # the family cannot express the posterior: a real gap to close
    assert np.all(b.elbo < b.iwae)
    # IWAE is a stochastic lower bound: allow its Monte Carlo error, far below the gap.
    assert np.all(b.iwae <= log_px + 0.03)
    assert b.iwae.mean() <= log_px.mean() + 0.005
    assert np.all(b.elbo <= log_px)


def test_mc_elbo_matches_the_analytic_elbo(correlated_case):
    lg, model, guide, params, x = correlated_case
    exact = np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
    b = evaluate_bounds(model, guide, params, x, jax.random.key(1), num_samples=5000)
    # ELBO estimates from 5000 draws: per-datapoint MC error ~ 0.01 nats.
    np.testing.assert_allclose(b.elbo, exact, atol=0.05)
    assert abs((b.elbo - exact).mean()) < 0.01


def _narrow_q(lg, x):
    loc, scale = lg.best_diagonal(x)
    return loc, 0.8 * scale


def test_iwae_rises_toward_log_marginal_with_k(lg_correlated):
    lg = lg_correlated
    model, guide, params = linear_gaussian_vae(lg)
    # q's scales at 0.8x the best diagonal ones: a proposal with lighter tails than the
    # posterior. 2,000 points resolve each tenfold rise of k up to 1,000 by more than 3 standard
    # errors (measured for four keys: 3.6-14 se); 40 points did not (the rise from 100 to 1,000
    # was -0.026 to +0.039 +- 0.02 across keys).
    x, _ = lg.sample(jax.random.key(7), 2000)
    enc = params["encoder$params"]["Dense_0"]
    narrow = {
        **params,
        "encoder$params": {"Dense_0": {**enc, "bias": enc["bias"].at[3:].add(np.log(0.8))}},
    }
    log_px = np.asarray(lg.log_marginal(x))
    iwae = {
        k: evaluate_bounds(
            model, guide, narrow, x, jax.random.key(2), num_samples=k, batch_size=500
        ).iwae
        for k in (1, 10, 100, 1000, 5000)
    }
    # IWAE-1 is a one-draw ELBO estimate: its gap is the exact KL on average.
    kl = lg.kl_to_posterior(x, *_narrow_q(lg, x))
    gap_1, se_1 = mean_and_stderr(log_px - iwae[1])
    assert abs(gap_1 - kl.mean()) < 3 * se_1 and gap_1 > 0.1
    # IWAE-k's draws are the first k of IWAE-10k's (draw s's key is fold_in(key_i, s)), so the
    # per-point differences are paired: each tenfold k gains more than 3 standard errors.
    for k in (1, 10, 100):
        rise, se = mean_and_stderr(iwae[10 * k] - iwae[k])
        assert rise > 3 * se, (k, rise, se)
    gap, se = mean_and_stderr(log_px - iwae[5000])
    assert -3 * se < gap < 0.01, (gap, se)  # a stochastic lower bound, and nearly tight


def test_iwae_stays_a_bound_and_rises_with_k_at_a_narrow_posterior():
    """Observation noise 1e-3: log p(x, z) is a difference of numbers near 1e6 in float32, where a
    log-sum-exp or a normalizer that is off shows at once. q is the exact best diagonal Gaussian,
    the truth float64 closed forms; 300 points.

    - x_dim 8, z_dim 3 (KL(q || posterior) 0.09 nats): IWAE-5000 is nearly tight, so a bias of a
      few thousandths would show (measured gap 0.0000 +- 0.0005; its 5,000-draw ELBO against the
      closed form +0.0001 +- 0.0003);
    - x_dim = z_dim = 6 (KL 5.5 nats, a narrow and strongly correlated posterior): each tenfold k
      gains (measured 6.0-11 standard errors over three keys) and never overtakes log p(x) on
      average (3.1 nats short at k = 1,000).
    """

    def case(x_dim, z_dim, ks):
        lg = make_linear_gaussian(jax.random.key(3), x_dim=x_dim, z_dim=z_dim, noise_scale=1e-3)
        model, guide, params = linear_gaussian_vae(lg)
        x, _ = lg.sample(jax.random.key(7), 300)
        bounds = {
            k: evaluate_bounds(model, guide, params, x, jax.random.key(0), num_samples=k)
            for k in ks
        }
        for k, b in bounds.items():  # a stochastic lower bound at every k
            gap, se = mean_and_stderr(np.asarray(lg.log_marginal(x), np.float64) - b.iwae)
            assert gap > -3 * se, (x_dim, z_dim, k, gap, se)
        err, se = mean_and_stderr(bounds[ks[-1]].elbo - lg.elbo(x, *lg.best_diagonal(x)))
        assert abs(err) < max(3 * se, 1e-3), (x_dim, z_dim, err, se)
        return lg.log_marginal(x), {k: np.asarray(b.iwae, np.float64) for k, b in bounds.items()}

    log_px, iwae = case(8, 3, (5000,))
    gap, se = mean_and_stderr(log_px - iwae[5000])
    assert gap < 0.003, (gap, se)
    _, iwae = case(6, 6, (1, 10, 100, 1000))
    for k in (1, 10, 100):
        rise, se = mean_and_stderr(iwae[10 * k] - iwae[k])
        assert rise > 3 * se, (k, rise, se)


def test_draws_are_nested_in_k_and_independent_of_the_chunk(correlated_case):
    # Draw s of datapoint i has its own key, fold_in(key_i, s): IWAE-2's draws are IWAE-1's draw
    # and one more, whatever sample_chunk, and the draws' threefry mode does not leak out.
    _, model, guide, params, x = correlated_case
    key = jax.random.key(5)
    one = evaluate_bounds(model, guide, params, x, key, num_samples=1)
    two = evaluate_bounds(model, guide, params, x, key, num_samples=2, sample_chunk=1)
    two_chunked = evaluate_bounds(model, guide, params, x, key, num_samples=2, sample_chunk=2)
    np.testing.assert_array_equal(one.elbo, one.iwae)
    lw_0, lw_1 = one.elbo, 2 * two.elbo - one.elbo
    assert np.all(np.abs(lw_1 - lw_0) > 1e-3)  # a second, different draw
    np.testing.assert_allclose(two.iwae, np.logaddexp(lw_0, lw_1) - np.log(2), atol=2e-5)
    np.testing.assert_allclose(two_chunked.elbo, two.elbo, atol=1e-6)
    np.testing.assert_allclose(two_chunked.iwae, two.iwae, atol=1e-6)
    assert jax.config.jax_threefry_partitionable  # the user's default, untouched


def test_exact_posterior_gives_elbo_equal_to_log_marginal(lg_diagonal):
    lg = lg_diagonal
    model, guide, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(3), 23)
    b = evaluate_bounds(model, guide, params, x, jax.random.key(4), num_samples=64, batch_size=10)
    log_px = np.asarray(lg.log_marginal(x))
    np.testing.assert_allclose(b.elbo, log_px, atol=1e-4)  # padded last batch included
    np.testing.assert_allclose(b.iwae, log_px, atol=1e-4)


def test_chunking_does_not_change_the_result(correlated_case):
    _, model, guide, params, x = correlated_case
    a = evaluate_bounds(
        model, guide, params, x, jax.random.key(5), num_samples=600, sample_chunk=600
    )
    b = evaluate_bounds(
        model, guide, params, x, jax.random.key(5), num_samples=600, sample_chunk=200
    )
    np.testing.assert_allclose(a.iwae, b.iwae, rtol=1e-5)
    np.testing.assert_allclose(a.elbo, b.elbo, rtol=1e-5)


def test_mean_and_stderr():
    m, se = mean_and_stderr(np.array([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    # [runs, N] gave the spread over runs as if they were datapoints (0.44 for 0.03), silently
    with pytest.raises(ValueError, match=r"one value per datapoint, \[N\].*shape \(2, 3\)"):
        mean_and_stderr(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(0,\)"):
        mean_and_stderr(np.array([]))


def test_bad_num_samples(correlated_case):
    _, model, guide, params, x = correlated_case
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_bounds(model, guide, params, x, jax.random.key(0), num_samples=0)


def test_a_datapoints_bounds_do_not_depend_on_the_batch(correlated_case):
    """Draws come from the seed and the datapoint's index, not its batch (was: up to 2.8 nats)."""
    _, model, guide, params, x = correlated_case
    a = evaluate_bounds(model, guide, params, x, jax.random.key(5), num_samples=300, batch_size=7)
    b = evaluate_bounds(model, guide, params, x, jax.random.key(5), num_samples=300, batch_size=40)
    np.testing.assert_allclose(a.iwae, b.iwae, rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.elbo, b.elbo, rtol=0, atol=1e-4)
    c = evaluate_bounds(model, guide, params, x[5:9], jax.random.key(5), num_samples=300)
    assert not np.allclose(c.iwae, a.iwae[5:9])  # index i of the subset is a new datapoint
    # ... unless it is given its index in the whole set: then it is the same datapoint
    idx = np.array([8, 5, 7, 6])
    d = evaluate_bounds(model, guide, params, x[idx], jax.random.key(5), num_samples=300,
                        indices=idx)  # fmt: skip
    np.testing.assert_allclose(d.iwae, a.iwae[idx], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"evaluate_bounds: indices must be distinct"):
        evaluate_bounds(model, guide, params, x[idx], jax.random.key(5), indices=idx * 0)


def test_pair_scores_share_their_draws_and_the_mixture_is_a_bound(correlated_case):
    lg, model, _, params, x = correlated_case
    fam = DiagonalGaussian()
    loc, scale = lg.best_diagonal(x)
    best = np.asarray(fam.pack(jnp.asarray(loc), jnp.asarray(np.broadcast_to(scale, loc.shape))))
    wide = np.asarray(fam.pack(jnp.asarray(loc + 0.3), jnp.asarray(2.0 * scale)))
    same = evaluate_pair(model, params, x, best, best, jax.random.key(3), family=fam,
                         num_samples=500)  # fmt: skip
    np.testing.assert_array_equal(same.elbo_a, same.elbo_b)  # common random numbers
    np.testing.assert_allclose(same.mixture, same.iwae_a, atol=1e-5)  # each draw twice
    pair = evaluate_pair(model, params, x, best, wide, jax.random.key(4), family=fam,
                         num_samples=2000, batch_size=7)  # fmt: skip
    exact = lg.log_marginal(x)
    np.testing.assert_allclose(pair.elbo_a, lg.elbo(x, loc, scale), atol=0.05)
    wide_elbo = lg.elbo(x, loc + 0.3, 2.0 * scale)  # log-weights spread widely: noisier
    np.testing.assert_allclose(pair.elbo_b, wide_elbo, atol=0.6)
    assert abs(np.mean(pair.elbo_b - wide_elbo)) < 0.1
    err = pair.mixture - exact
    assert np.all(np.abs(err) < 0.05), err
    assert err.mean() < 2 * err.std(ddof=1) / np.sqrt(len(err))
    again = evaluate_pair(model, params, x, best, wide, jax.random.key(4), family=fam,
                          num_samples=2000, batch_size=40, sample_chunk=125)  # fmt: skip
    for a, b in zip(again[:5], pair[:5], strict=True):  # nor with the batch or the chunk
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_format_estimate_reads_pairs_dicts_and_none():
    from amortjax.evaluation.bounds import format_estimate

    assert format_estimate((-91.2345, 0.456)) == "-91.23 ± 0.46"
    assert format_estimate({"mean": 1.0, "se": 0.25}, 3) == "1.000 ± 0.250"
    assert format_estimate(None) == "—"


def test_a_legacy_uint32_key_is_the_same_key(correlated_case):
    """`jax.random.PRNGKey(0)` (uint32[2]) had failed in a reshape deep inside; it is wrapped."""
    _, model, guide, params, x = correlated_case
    legacy = evaluate_bounds(model, guide, params, x, jax.random.PRNGKey(3), num_samples=100)
    typed = evaluate_bounds(model, guide, params, x, jax.random.key(3), num_samples=100)
    np.testing.assert_array_equal(legacy.iwae, typed.iwae)


def test_parameters_of_the_wrong_width_are_named_before_scoring(correlated_case):
    """lambda for another latent size used to fail inside the model (a matmul's shape error),
    or, for a width that broadcasts, could score a z of the wrong shape."""
    from amortjax.guides import given_params_guide

    lg, model, _, params, x = correlated_case
    z_dim, key = lg.z_dim, jax.random.key(0)
    guide = given_params_guide(DiagonalGaussian())
    good = jnp.zeros((x.shape[0], 2 * z_dim))
    b = evaluate_bounds(model, guide, params, x, key, num_samples=2, guide_args=(good,))
    assert np.all(np.isfinite(b.elbo))
    with pytest.raises(
        ValueError,
        match=rf"evaluate_bounds: the guide draws site 'z' with shape \(1, {z_dim + 1}\), the "
        rf"model's has shape \(1, {z_dim}\).*family.num_params\(z_dim\)",
    ):
        evaluate_bounds(
            model,
            guide,
            params,
            x,
            key,
            guide_args=(jnp.zeros((x.shape[0], 2 * z_dim + 2)),),
        )
    with pytest.raises(ValueError, match=r"evaluate_bounds: the guide cannot draw .* \[\(7,\)\]"):
        evaluate_bounds(model, guide, params, x, key, guide_args=(jnp.zeros((x.shape[0], 7)),))
    with pytest.raises(ValueError, match=r"the guide draws sites \['w'\] the model does not"):
        evaluate_bounds(model, given_params_guide(site="w"), params, x, key, guide_args=(good,))
