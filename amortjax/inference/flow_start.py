"""A flow q*'s full-rank start or floor: the coupling flow whose q is N(m, L L^T).

What it is for: `fit_local(family=AffineCouplingFlow(), flow_start="full_rank")` without `init`,
and every flow q*'s floor (`QStarSettings.flow_floor`: the flow family's best lies at or above
this member of it, so a q* it beats is provably short). Adam on the flow's own weights cannot
find a posterior that is narrow along oblique directions (a linear-Gaussian model, x_dim 4 <
z_dim 8, noise 1e-2: 19.4 +- 0.65 nats below log p(x) from the diagonal start; 27,100 at noise
1e-3, where even the diagonal start diverged); the full-rank Gaussian's q* (Newton steps in q's
whitened frame) reaches such a posterior at any condition number, and a 2-layer coupling flow
with linear conditioners can represent every Gaussian. So the flow starts at the full-rank q*,
and Adam goes on from there (on a non-Gaussian posterior the flow can do better than any
Gaussian).

The construction. Write d = z_dim, a = ceil(d/2) (layer 0's conditioning half), b = d - a.
With linear conditioners t_l(y) = A_l (y - c_l), every log-scale s = 0 and the base
u = m + D eps, D = diag(Da, Db), eps ~ N(0, I), the first two layers give z = m + M eps with
M = T1 T0 D, T0 = [[I, 0], [A0, I]], T1 = [[I, A1], [0, I]] (the mean is exactly m). With
H = Db^-1 A0 Da and the target Sigma = L L^T, X = Sigma_bb, Y = (Sigma^-1)_aa:
A1 = B - Lambda^-1 A0^T Db^-2 (B = Sigma_ab X^-1, the target's regression of z_a on z_b;
Lambda = Da^-1 (I + H^T H) Da^-1, the flow's precision of z_a given z_b)
matches the conditional means exactly (chain rule of KL), and

    KL = 1/2 [tr(Px (I + H H^T)) + tr(Qy (I + H^T H)^-1) - 2 sum log D + log|X| - log|Y| - d],
    Px = Db X^-1 Db,  Qy = Da Y Da.

For fixed D the best H is in closed form (von Neumann's trace inequality): pair Px's
eigenvalues p_i ascending with Qy's q_i descending, 1 + s_i^2 = max(1, sqrt(q_i / p_i)),
leaving KL*(D) = 1/2 [sum_i phi(p_i, q_i) + sum_{i > b} q_i - 2 sum log D + const],
phi(p, q) = 2 sqrt(p q) if q >= p else p + q. KL* = 0 is an inverse eigenvalue problem in the
d log-scales with no closed form known to us: it is solved in float64, one datapoint after
another (`lax.map`: vmapped, its batched eigendecompositions, up to 15 in the compiled program,
could each block a thread of XLA's CPU pool while waiting for it, and four at once deadlocked a
4-thread pool: a hung `amortization_gap` run, and every first call at 2 or 3 threads; unbatched
they run inline, in the same time and to the same digits, 1e-10) (at most 60 BFGS steps,
then damped saddle-free Newton; a step must land where KL* can be trusted: KL* >= 0 and both
scaled matrices conditioned below 1e12, else eigvalsh's roundoff lets KL* run to -1e100), from
three starts, the best end kept. Measured (one start, before
the other two were added): KL of the linear flow to N(m, L L^T) at most 1.1e-6 nats on
linear-Gaussian posteriors z = 5 (odd), 8, 20, 50 at noise 1e-2 and 1e-3 and on 100 random
z = 50 covariances of condition numbers up to 1e8; 8-40 ms per datapoint at z = 50 once
compiled (about 8 s per shape; three starts cost up to three times that). At z = 4 (and
sometimes 5) the reduced solver can stall on a stationary point of the full problem from every
start (an audit: 7-13 of 20 linear-Gaussian posteriors 0.25-0.66 nats away, random
covariances up to 1.38); where it ends above `REFIT_KL` and z_dim <= `REFIT_MAX_DIM`, the full
problem (all d + 2ab parameters: smooth, no kinks) is solved again by BFGS from the marginal
scales and kept where it ends lower (`_full_refit`): since then at most 4.2e-6 nats on those
cases (`test_flows.py`), except a posterior of condition number 1.4e7 at z = 4 (5.9 nats, was
NaN), which `fit_local` warns about.

The embedding in the tanh conditioners, (s_raw, t) = W2^T tanh(W1^T y_a + b1) + b2: hidden
unit j < a computes tanh(eps_j (y_j - c_j)) and its t-row of W2 is A[:, j] / eps_j, so
t(y) = A (y - c) - O(eps^2 (y - c)^3); eps_j = kappa / (5 sd_j) keeps each term's relative
error below kappa^2 / 3 over +-5 sd, kappa chosen per datapoint and layer as the largest
<= 1 whose cubic error there stays within 0.3 of the transformed coordinate's conditional sd
(the flow's KL to N(m, L L^T): about 1e-4 nats). The other hidden units keep
`standard_params`' first-layer draws (centred) with zero output weights, and layers beyond
the second are the identity. Needs num_layers >= 2, tanh and hidden >= ceil(d / 2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.flows import AffineCouplingFlow, CouplingLayer

DEFAULT_TOL = 0.3  # bound on the coupling's cubic error at +-5 sd, in conditional sds
FTOL = 1e-6  # nats: KL* below this counts as solved (the tanh embedding costs ~1e-4)
REFIT_KL = 1e-5  # nats: a reduced fit that ends above this is fitted again in full (small d)
REFIT_MAX_DIM = 12  # largest z_dim of that refit (d + 2ab parameters, BFGS on the host)


# ------------------------------------------------------------------ reduced problem (float64)


def _reduced_kl(theta, xinv, y, const, a, b):
    """KL*(Da, Db) for theta = [log Da (a), log Db (b)] (see the module docstring)."""
    la, lb = theta[:a], theta[a:]
    px = jnp.exp(lb)[:, None] * xinv * jnp.exp(lb)[None, :]
    qy = jnp.exp(la)[:, None] * y * jnp.exp(la)[None, :]
    p = jnp.linalg.eigvalsh(px)  # ascending [b]
    q = jnp.linalg.eigvalsh(qy)[::-1]  # descending [a]
    qb = q[:b]
    pos_p, pos_q = jnp.maximum(p, 1e-300), jnp.maximum(qb, 1e-300)
    phi = jnp.where(qb >= p, 2.0 * jnp.sqrt(pos_p * pos_q), p + qb)
    return 0.5 * (phi.sum() + q[b:].sum() - 2.0 * theta.sum() + const)


def _trusted(theta, xinv, y, fv, a, b):
    """Whether KL*(theta) can be believed: KL >= 0 (up to roundoff) and both scaled matrices
    well enough conditioned for eigvalsh's absolute error (eps * norm) to leave their smallest
    eigenvalues accurate. Far from the solution, where the diagonal scalings grade Px or Qy
    extremely, roundoff makes small eigenvalues wrong (even negative) and KL* unbounded below;
    a step may not go there. (At the solution Px <= I and Qy >= I, with condition numbers
    t_max = 1 + s_max^2, e.g. ~1e2-1e4 at noise 1e-2 to 1e-3.)"""
    la, lb = theta[:a], theta[a:]
    px = jnp.exp(lb)[:, None] * xinv * jnp.exp(lb)[None, :]
    qy = jnp.exp(la)[:, None] * y * jnp.exp(la)[None, :]
    p = jnp.linalg.eigvalsh(px)
    q = jnp.linalg.eigvalsh(qy)
    return (fv > -1e-9) & (p[0] > 1e-12 * p[-1]) & (q[0] > 1e-12 * q[-1])


def _solve_one(xinv, y, const, theta0, a, b, max_iter, tol, ftol=FTOL):
    """Levenberg-Marquardt-damped Newton on KL*, with eigenvalue-modified Hessian.

    Per iteration one gradient and Hessian; the damping lam is raised (x10) on the same
    eigendecomposition until a step lowers KL* to a trusted value (`_trusted`), and lowered
    (/3) after each accepted step. Stops at KL* < ftol (the minimum is 0 where reachable), a
    gradient below tol, no further decrease, or max_iter.
    """
    f = lambda th: _reduced_kl(th, xinv, y, const, a, b)  # noqa: E731
    grad = jax.grad(f)
    hess = jax.hessian(f)
    n = a + b

    def step(state):
        th, fv, lam, it, _ = state
        g = grad(th)
        hm = hess(th)
        ok = jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(hm))
        hm = jnp.where(ok, 0.5 * (hm + hm.T), jnp.eye(n))
        g = jnp.where(jnp.isfinite(g), g, 0.0)
        w, v = jnp.linalg.eigh(hm)
        gv = v.T @ g

        def try_cond(c):
            return ~c[2] & (c[0] < 1e12)

        def try_body(c):
            lam_c = c[0]
            th_new = th - v @ (gv / (jnp.abs(w) + lam_c))  # saddle-free Newton + LM damping
            f_new = f(th_new)
            good = jnp.isfinite(f_new) & (f_new < fv) & _trusted(th_new, xinv, y, f_new, a, b)
            return jnp.where(good, lam_c, lam_c * 10.0), f_new, good, th_new

        lam, f_new, good, th_new = jax.lax.while_loop(
            try_cond, try_body, (lam, fv, jnp.asarray(False), th)
        )
        done = (jnp.max(jnp.abs(g)) < tol) | ~good | (fv - f_new < 1e-15) | (f_new < ftol)
        th = jnp.where(good, th_new, th)
        fv = jnp.where(good, f_new, fv)
        lam = jnp.where(good, jnp.maximum(lam / 3.0, 1e-12), lam)
        return th, fv, lam, it + 1, done

    def cond(state):
        return (state[3] < max_iter) & ~state[4]

    f0 = f(theta0)
    state = (theta0, f0, jnp.asarray(1e-3, theta0.dtype), 0, f0 < ftol)
    th, fv, _, it, _ = jax.lax.while_loop(cond, step, state)
    return th, fv, it


def _solve_one_bfgs(xinv, y, const, theta0, a, b, max_iter, tol):
    """Dense BFGS (inverse-Hessian update) with backtracking Armijo steps, on KL*."""
    f = lambda th: _reduced_kl(th, xinv, y, const, a, b)  # noqa: E731
    vg = jax.value_and_grad(f)
    n = a + b

    def line(th, fv, g, d):
        def lcond(c):
            return (~c[2]) & (c[1] < 40)

        def lbody(c):
            alpha, it, _ = c[0], c[1], c[2]
            tn = th + alpha * d
            fn = f(tn)
            ok = jnp.isfinite(fn) & (fn <= fv + 1e-4 * alpha * (g @ d))
            ok = ok & _trusted(tn, xinv, y, fn, a, b)
            return jnp.where(ok, alpha, alpha * 0.3), it + 1, ok

        alpha, _, ok = jax.lax.while_loop(lcond, lbody, (jnp.asarray(1.0, th.dtype), 0, False))
        return alpha, ok

    def step(state):
        th, fv, g, hinv, it, _ = state
        d = -hinv @ g
        d = jnp.where(g @ d < 0, d, -g)  # keep a descent direction
        alpha, ok = line(th, fv, g, d)
        th_new = jnp.where(ok, th + alpha * d, th)
        fn, gn = vg(th_new)
        sk, yk = th_new - th, gn - g
        sy = sk @ yk
        rho = jnp.where(sy > 1e-300, 1.0 / sy, 0.0)
        eye = jnp.eye(n)
        upd = (eye - rho * jnp.outer(sk, yk)) @ hinv @ (eye - rho * jnp.outer(yk, sk))
        upd = upd + rho * jnp.outer(sk, sk)
        hinv = jnp.where(ok & (sy > 1e-300), upd, jnp.where(ok, hinv, eye))
        done = (jnp.max(jnp.abs(gn)) < tol) | (~ok & (it > 0)) | (ok & (fv - fn < 1e-15))
        done = done | (ok & (fn < FTOL))
        return th_new, jnp.where(ok, fn, fv), gn, hinv, it + 1, done

    f0, g0 = vg(theta0)
    state = (theta0, f0, g0, jnp.eye(n) * 0.1, 0, jnp.asarray(False))
    th, fv, _, _, it, _ = jax.lax.while_loop(lambda s: (s[4] < max_iter) & ~s[5], step, state)
    return th, fv, it


def _solve_one_hybrid(xinv, y, const, theta0, a, b, max_iter, tol):
    """BFGS for at most 60 iterations (cheap: gradients only), then Newton to convergence."""
    th, _, it1 = _solve_one_bfgs(xinv, y, const, theta0, a, b, 60, tol)
    th, fv, it2 = _solve_one(xinv, y, const, th, a, b, max_iter, tol)
    return th, fv, it1 + 1000 * it2  # iterations: bfgs + 1000 * newton


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _solve_batch(xinv, y, const, theta0, a, b, max_iter, tol):
    return jax.lax.map(
        lambda args: _solve_one_hybrid(*args, a, b, max_iter, tol), (xinv, y, const, theta0)
    )


def linear_coupling_fit(loc, scale_tril, *, max_iter=300, tol=1e-10):
    """The 2-layer linear coupling flow closest in KL to N(loc, L L^T), in float64 NumPy.

    Args:
        loc: `[N, d]`.
        scale_tril: `[N, d, d]` lower-triangular L.

    Returns:
        dict with `base_scale [N, d]` (Da, Db), `a0 [N, b, a]`, `a1 [N, a, b]`, `kl [N]` (the
        KL of the constructed Gaussian to N(loc, L L^T), recomputed from M), `kl_reduced [N]`
        (the reduced optimizer's value), `iters [N]`, `refit [N]` (True where the full
        problem was solved again from the marginal scales and ended lower: `REFIT_KL`).
    """
    loc = np.asarray(loc, np.float64)
    ltr = np.tril(np.asarray(scale_tril, np.float64))
    n, d = loc.shape
    a = (d + 1) // 2
    b = d - a
    sigma = ltr @ np.swapaxes(ltr, -1, -2)
    eye = np.broadcast_to(np.eye(d), ltr.shape)
    linv = np.linalg.solve(ltr, eye)  # L^-1 (triangular; small d)
    prec = np.swapaxes(linv, -1, -2) @ linv  # Sigma^-1 = L^-T L^-1
    x = sigma[:, a:, a:]
    y = prec[:, :a, :a]
    # X^-1 = (Sigma_bb)^-1 = P_bb - P_ba P_aa^-1 P_ab (Schur complement of the precision)
    xinv = prec[:, a:, a:] - prec[:, a:, :a] @ np.linalg.solve(y, prec[:, :a, a:])
    xinv = 0.5 * (xinv + np.swapaxes(xinv, -1, -2))
    logdet_sigma = 2.0 * np.log(np.abs(np.diagonal(ltr, axis1=1, axis2=2))).sum(-1)
    logdet_x = np.linalg.slogdet(x)[1]
    logdet_y = np.linalg.slogdet(y)[1]
    const = logdet_x - logdet_y - d
    # Three starts per datapoint, the best end kept: the conditional scales of both halves, their
    # marginal ones, and the first half's conditional with the second's marginal. From any one
    # start the solver can stop at the edge of the region where KL* is trusted (0.15 nats on a
    # z = 5 case from the first start, 6e-7 from the third; which start fails moved with the
    # JAX version's rounding).
    conditional_a = -0.5 * np.log(np.diagonal(y, axis1=1, axis2=2))
    conditional_b = -0.5 * np.log(np.diagonal(xinv, axis1=1, axis2=2))
    marginal = 0.5 * np.log(np.diagonal(sigma, axis1=1, axis2=2))
    starts = np.stack(
        [
            np.concatenate([conditional_a, conditional_b], -1),
            marginal,
            np.concatenate([conditional_a, marginal[:, a:]], -1),
        ],
        axis=1,
    )  # fmt: skip  [N, 3, d]
    k = starts.shape[1]
    with jax.enable_x64(True):
        th, fv, iters = _solve_batch(
            jnp.asarray(np.repeat(xinv, k, 0)), jnp.asarray(np.repeat(y, k, 0)),
            jnp.asarray(np.repeat(const, k, 0)), jnp.asarray(starts.reshape(n * k, d)), a, b,
            int(max_iter), float(tol),
        )  # fmt: skip
        th, fv, iters = (np.asarray(v).reshape(n, k, *v.shape[1:]) for v in (th, fv, iters))
    fv = np.where(np.isfinite(fv) & (fv > -1e-9), fv, np.inf)
    best = np.argmin(fv, axis=1)
    rows = np.arange(n)
    th, fv, iters = th[rows, best], fv[rows, best], iters[rows, best]
    da, db = np.exp(th[:, :a]), np.exp(th[:, a:])
    px = db[:, :, None] * xinv * db[:, None, :]
    qy = da[:, :, None] * y * da[:, None, :]
    p, u = np.linalg.eigh(px)
    q, v = np.linalg.eigh(qy)
    q, v = q[:, ::-1], v[:, :, ::-1]
    s2 = np.maximum(0.0, np.sqrt(np.maximum(q[:, :b], 0.0) / p) - 1.0)
    h = (u * np.sqrt(s2)[:, None, :]) @ np.swapaxes(v[:, :, :b], -1, -2)  # [N, b, a]
    a0 = db[:, :, None] * h / da[:, None, :]
    reg = -np.linalg.solve(y, prec[:, :a, a:])  # B = Sigma_ab Sigma_bb^-1 = -P_aa^-1 P_ab
    lam = (np.eye(a) + np.swapaxes(h, -1, -2) @ h) / da[:, :, None] / da[:, None, :]
    a1 = reg - np.linalg.solve(lam, np.swapaxes(a0, -1, -2) / db[:, None, :] ** 2)
    base = np.concatenate([da, db], axis=-1)

    def exact_kl(base, a0, a1):
        """KL of N(m, M M^T) to N(m, Sigma), M = T1 T0 D, via whitening W = L^-1 M."""
        t0 = np.broadcast_to(np.eye(d), (n, d, d)).copy()
        t0[:, a:, :a] = a0
        t1 = np.broadcast_to(np.eye(d), (n, d, d)).copy()
        t1[:, :a, a:] = a1
        w = linv @ (t1 @ t0 * base[:, None, :])
        return 0.5 * ((w**2).sum((-1, -2)) - d + logdet_sigma - 2.0 * np.log(base).sum(-1))

    kl = exact_kl(base, a0, a1)
    # Where the reduced solver stalled (seen at d = 4 and 5, never at 6-50), the full problem
    # from the marginal scales, kept where it ends lower.
    refit = np.zeros(n, bool)
    if b and d <= REFIT_MAX_DIM:
        for i in np.flatnonzero(~(kl <= REFIT_KL)):
            theta0 = np.concatenate([marginal[i], np.zeros(2 * a * b)])
            theta, kl_i = _full_refit(linv[i], logdet_sigma[i], theta0, a, b)
            if kl_i < kl[i] or (np.isfinite(kl_i) and not np.isfinite(kl[i])):
                refit[i] = True
                base[i] = np.exp(theta[:d])
                a0[i] = theta[d : d + a * b].reshape(b, a)
                a1[i] = theta[d + a * b :].reshape(a, b)
        if refit.any():
            kl = exact_kl(base, a0, a1)
    return dict(base_scale=base, a0=a0, a1=a1, kl=kl, kl_reduced=fv, iters=iters, refit=refit,
                cov_bb=x, prec_diag=np.diagonal(prec, axis1=1, axis2=2))  # fmt: skip


@functools.partial(jax.jit, static_argnums=(3, 4))
@functools.partial(jax.value_and_grad, argnums=0)
def _full_kl_and_grad(theta, linv, logdet_sigma, a, b):
    """KL(N(m, M M^T) || N(m, Sigma)) of theta = [log D, A0, A1], M = T1 T0 D, through the
    whitening W = L^-1 M, and its gradient in theta; compiled once per (a, b) and float
    width, not per datapoint."""
    d = a + b
    t0 = jnp.eye(d).at[a:, :a].set(theta[d : d + a * b].reshape(b, a))
    t1 = jnp.eye(d).at[:a, a:].set(theta[d + a * b :].reshape(a, b))
    w = linv @ (t1 @ t0 * jnp.exp(theta[:d])[None, :])
    return 0.5 * ((w**2).sum() - d + logdet_sigma) - theta[:d].sum()


def _full_refit(linv: np.ndarray, logdet_sigma: float, theta0: np.ndarray, a: int, b: int):
    """KL(N(m, M M^T) || N(m, Sigma)) minimized over all of theta = [log D, A0, A1] by BFGS
    (float64, gradients by JAX), from theta0: `(theta, kl)`. A smooth problem in d + 2ab
    parameters, without the reduced problem's kinks; where the reduced solver stalls (it can
    end on a stationary point of the full problem, 0.25-0.66 nats from N(m, Sigma) at d = 4),
    this from the marginal scales reaches it (measured below 1e-14 at d = 4)."""
    import scipy.optimize

    with jax.enable_x64(True):
        linv_, logdet_ = jnp.asarray(linv), jnp.asarray(logdet_sigma)

        def fun(theta):
            v, g = _full_kl_and_grad(jnp.asarray(theta), linv_, logdet_, a, b)
            v, g = np.asarray(v, np.float64), np.asarray(g, np.float64)
            ok = np.isfinite(v) and np.all(np.isfinite(g))
            return (float(v), g) if ok else (np.inf, np.zeros_like(theta))

        res = scipy.optimize.minimize(
            fun, theta0, jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 2000}
        )
    return res.x, (res.fun if np.isfinite(res.fun) else np.inf)


# ------------------------------------------------------------------------- embedding


def flow_from_gaussian(
    family: AffineCouplingFlow, loc, scale_tril, *, kappa=None, tol=DEFAULT_TOL, kappa_max=1.0,
    return_info=False, max_iter=300,
):  # fmt: skip
    """lambda `[N, P]` of `family` (an AffineCouplingFlow) whose q is ~ N(loc_i, L_i L_i^T).

    See the module docstring for the construction (a 2-layer linear coupling flow fitted in
    float64 to the Gaussian, then embedded in the tanh conditioners with slope eps_j =
    kappa / (5 sd_j)).

    Args:
        family: `AffineCouplingFlow` with num_layers >= 2, hidden >= ceil(d / 2), tanh.
        loc: `[N, d]` means.
        scale_tril: `[N, d, d]` lower-triangular scale factors (e.g. `FullRankGaussian().split`).
        kappa: the largest tanh argument over +-5 sd of each conditioning coordinate (the
            relative error of each coupling term is <= kappa^2 / 3 there), one number for all;
            None (default): chosen per datapoint and layer as the largest kappa <= kappa_max
            whose error bound at +-5 sd, sum_j |A_ij| 5 sd_j kappa^2 / 3, is at most `tol`
            times the transformed coordinate's conditional sd c_i (1 / sqrt(P_ii), given all
            other coordinates; Db_i for layer 0): a wide posterior gets kappa ~ 1 (weights of
            order one, which Adam can move), a narrow oblique one a small kappa.
        tol: that bound (default 0.3; the expected KL cost is ~ 5e-4 d tol^2 or less).
        kappa_max: the largest kappa (default 1).
        return_info: also return the dict of `linear_coupling_fit` (KL reached etc.).
        max_iter: the Newton iterations' cap of the (Da, Db) problem (after <= 60 BFGS steps).

    Returns:
        lambda `[N, P]` float32 (and the info dict if asked).
    """
    if family.num_layers < 2:
        raise ValueError("a full-rank start needs num_layers >= 2")
    if family.activation != "tanh":
        raise ValueError("the embedding assumes tanh conditioners (act(0) = 0, act'(0) = 1)")
    loc = np.asarray(loc, np.float64)
    n, d = loc.shape
    a = (d + 1) // 2
    hid = family.hidden
    if hid < a:
        raise ValueError(f"needs hidden >= ceil(z_dim / 2) = {a}; got {hid}")
    fit = linear_coupling_fit(loc, scale_tril, max_iter=max_iter)
    base = fit["base_scale"]
    std = np.asarray(family.standard_params(d), np.float64)
    _, _, std_layers = family.split(std)
    # conditioning coordinates' means and sds: layer 0 conditions on u_a (mean m_a, sd Da),
    # layer 1 on z_b (mean m_b, sd sqrt(diag Sigma_bb)).
    conds = [
        (loc[:, :a], base[:, :a], fit["a0"], base[:, a:]),  # layer 0: t0 = A0 (y_a - m_a)
        (
            loc[:, a:],
            np.sqrt(np.diagonal(fit["cov_bb"], axis1=1, axis2=2)),
            fit["a1"],
            1.0 / np.sqrt(fit["prec_diag"][:, :a]),
        ),  # layer 1: t1 = A1 (z_b - m_b)
    ]  # (center, sd of the conditioning coords, A, conditional sd of the transformed coords)
    kappas = []
    layers = []
    for index, spec_layer in enumerate(std_layers):
        w1 = np.broadcast_to(np.asarray(spec_layer.w1), (n, *spec_layer.w1.shape)).copy()
        b1 = np.zeros((n, hid))
        nb = spec_layer.b2.shape[-1] // 2
        w2 = np.zeros((n, hid, 2 * nb))
        b2 = np.zeros((n, 2 * nb))
        if index < 2:
            center, sd, amat, csd = conds[index]  # amat [N, nb, na]
            na = center.shape[-1]
            if kappa is None:
                reach = (np.abs(amat) * 5.0 * sd[:, None, :]).sum(-1) / csd  # [N, nb]
                kap = np.sqrt(3.0 * tol / np.maximum(reach.max(-1), 1e-300))
                kap = np.minimum(kap, kappa_max)
            else:
                kap = np.full(n, float(kappa))
            kappas.append(kap)
            eps = kap[:, None] / (5.0 * sd)  # [N, na]
            b1[:] = -np.einsum("ni,nij->nj", center, w1)  # free units centred on c too
            w1[:, :, :na] = 0.0  # hidden unit j < na reads only coordinate j
            w1[:, np.arange(na), np.arange(na)] = eps
            b1[:, :na] = -eps * center
            w2[:, :na, nb:] = np.swapaxes(amat, -1, -2) / eps[:, :, None]
        layers.append((w1, b1, w2, b2))
    with jax.enable_x64(True):
        lam = family.pack(
            jnp.asarray(loc), jnp.log(jnp.asarray(base)),
            [CouplingLayer(*(jnp.asarray(p) for p in lay)) for lay in layers],
        )  # fmt: skip
        lam = np.asarray(lam)
    lam = jnp.asarray(lam, jnp.float32)
    fit["kappa"] = np.stack(kappas, -1)  # [N, 2]
    return (lam, fit) if return_info else lam
