"""Per-example inference: fit each datapoint's own variational parameters (the q* of Cremer et
al. 2018), all datapoints at once.

For one datapoint x_i and fixed model parameters theta, the local ELBO of lambda_i is

    L(lambda_i; x_i) = E_{z ~ q(z; lambda_i)} [log p_theta(x_i, z) - log q(z; lambda_i)],

estimated with S reparameterized draws through the library's one adapter (`traces.log_weights`
with `given_params_guide`), so the model's own log joint is what gets maximized.

The optimizer, per datapoint (every quantity below is a row of a `[B, ...]` array; the rows
never interact):

- Adam on lambda_i with its own step size lr_i, on the "sticking the landing" gradient (the score
  term of log q dropped: unbiased, and quiet near q*; `stl`, see
  `amortjax.guides.local.local_elbo`). Steps are grouped in blocks of `block_size`; a block
  reports the average of its iterates (Polyak averaging: at a plateau the averaged iterate sits
  closer to the optimum than any single noisy iterate) and a score, its stopping signal. The score
  is either the average of the block's per-step S-draw ELBO estimates (Cremer et al.'s rule;
  `monitor_samples=0`) or the ELBO of the block's averaged iterate estimated with
  `monitor_samples` = M draws fixed for the datapoint through the run (the monitor). On those
  common random numbers two blocks' scores differ by what the iterate gained, plus noise that
  grows with the distance it moved and with the dimension it moved in, where independent draws add
  fresh noise to every block and can end a slow climb as if it were a plateau. The monitor is
  Adam's default for the Gaussian families, the per-step average for the others: measured (with
  Adam, S = 4, blocks of 50, patience 4), on a correlated posterior (factor analysis, x_dim 8,
  z_dim 3, 40 points, three keys) the diagonal Gaussian's q* ended 0.044-0.055 nats below the best
  diagonal Gaussian on average (0.22-0.27 at worst) with the per-step average, 0.0064-0.0069
  (0.036-0.054) with a 32-draw monitor; on the quick MNIST FFG model (100 test digits, from the
  encoder) both reached the same L[q*] (+0.000 nats), the monitor in 0.80 of the time (its steps
  compute no values); but on the quick MNIST Flow model (7,800 parameters per digit) the monitor
  stopped earlier, 0.014 +- 0.003 nats lower (M = 32; 0.024 at M = 16).
- Or, for the Gaussian families, damped Newton / natural-gradient steps (`method="newton"`,
  see `_newton_one`), whose step a_i plays the part of lr_i.
- The start lambda_i^0 is scored before the first step, the first reference of the plateau
  rule (by the monitor, or, with the per-step average, by one block that does not move).
- A block whose score beats the best so far by `min_improvement` is an improvement. After
  `patience` blocks without one the step size is reduced, lr_i <- `lr_decay` * lr_i, and the
  iterate restarts from the block's averaged iterate (reduce-on-plateau: the steady-state noise
  of a stochastic step is proportional to lr, so each reduction lets it settle closer to the
  optimum of a narrow or correlated posterior); after `num_decays` reductions and one more
  plateau the datapoint has converged. `max_steps` caps the steps of any datapoint.
- The end point is the last block's averaged iterate. Optionally (`polish_steps`, Adam only) a
  polishing stage follows: every datapoint takes `polish_steps` Adam steps from the end point at
  a fixed step size with `polish_samples` draws per step, and the average of its last tenth of
  iterates is a further candidate. Where the first stage ends where its gradient noise holds it
  (a flow's thousands of parameters per datapoint), more draws per step late in the run climb
  further than more draws throughout, at less cost (measured: `QStarSettings.polish_steps`).
  The stage has no stopping rule, so every datapoint takes the same steps and the chunks of
  `engine.map_datapoints` need no slots.
- The candidates (the start, the end point, the polished end) are compared on common random
  numbers (`select_samples` draws, independent of all other draws) and the best is q*: q*
  never ends below where it started, beyond that comparison's small noise. A convergence
  record comes with it: steps, converged or stopped by `max_steps`, the gain of the best block
  score during the last step-size stage, and which candidate was kept.
- For the Gaussian families a certificate checks "converged" (`_newton_gap_one`): the nats by
  which q*'s ELBO lies below the best of its family by the Newton model, from `certify_samples`
  draws of the gradient and Hessian of log p in q's whitened frame. It is exact on a
  linear-Gaussian model and zero at the optimum of any model; a q* whose certificate exceeds
  `certify_tol` is not converged, whatever its stopping rule said (with a warning). Measured: a
  stopping rule cannot tell a stall from an optimum, Adam on a full-rank q of a narrow correlated
  posterior (noise 1e-2, x_dim 4 < z_dim 8; blocks of 50, patience 4) plateaued 122 nats short on
  average and its last-stage gain was no signal either (extra step-size reductions drove it below
  0.25 nats with q* as far); the certificate read 121.7 (exact: 121.7). On the quick MNIST FFG
  model's converged q* it reads 0.009 nats on average (max 0.06; 100 test digits, 32 draws), on
  the paper-length MNIST FFG model's -0.001 (max 0.09; z = 50). A datapoint the certificate
  rejects goes on from where it stopped (`certify_retries` rounds, each with twice the draws and
  patience and one more step-size stage; `LocalFit.continued`), its draws keyed by this round and
  its own index; the warning names those still rejected after.
  Flows have no such certificate (a Newton model over a flow's thousands of parameters is out
  of reach), and their rule alone can stop far short: on a narrow correlated posterior
  (linear-Gaussian, noise 1e-2, x_dim 4 < z_dim 8, 20 points; a 2-layer coupling flow can reach
  the exact posterior) the flow q* from the diagonal start ended 19.4 +- 0.7 nats below log p(x),
  5.1 +- 0.7 with patience 10, 16 draws, four reductions and 2,000 polishing steps, the rule
  stopping every point both times. What they have is a one-sided certificate, a floor
  (`QStarSettings.flow_floor`): the full-rank Gaussian's certified q*, made a coupling flow
  (`inference.flow_start.flow_from_gaussian`, within 0.01 nats), is a member of the family, so
  a q* it beats on common random numbers by more than `certify_tol` is provably short of the
  family's best; such a q* goes on from the floor (one round; `LocalFit.floor_gap`,
  `LocalFit.continued`). On x_dim = z_dim = 4, noise 1e-2, the floor beat 11 of 12 default
  flow q* by 0.48-1.43 nats; gone on from it, every point ended within 0.006 of log p(x). A
  q* the floor does not beat may still be short of the family's best (by what a flow gains
  over every Gaussian); the budget-doubling check is `tools/qstar_doubling.py`, and
  `LocalFit.convergence` says "stopped by its rule", not "converged". Without `init` a flow
  starts at the diagonal Gaussian's certified q* (from N(0, I) on a narrow posterior its q* had
  ended 161 nats below that).
- Every certificate is local: it says q* tops its basin. On a multimodal posterior an encoder's
  output can start q* in a minor mode (seen on the quick run's z = 2 MNIST model: one digit's
  FFG q* 8.4 nats below the Flow's q*, in another mode). `QStarSettings.second_start` fits q*
  again from `fit_local`'s own start and keeps, per datapoint, the better of the two on common
  random numbers (`LocalFit.basin_gap`); `QStarSettings.random_starts` adds starts drawn from
  the prior and `fit_local(starts=)` any others (another family's q*: that digit's FFG q*
  started from the Flow's q* reached the major mode, which neither of its own starts did);
  `tools/second_start.py` measures them on MNIST.

Continuous batching: the `[B]` rows are slots, not datapoints. All datapoints wait in a queue on
the device; when a datapoint finishes, its result is written out and the next waiting datapoint
takes its slot (its parameters and optimizer state replace the finished row) inside the one
compiled `lax.while_loop`, so no slot idles while others catch up. Once the queue is empty, the
loop stops when half of its slots are empty; where its tail (the blocks since the queue
emptied) ran for `SHRINK_SECONDS` to that point, the busy datapoints go on in half as many slots,
and so on at every halving down to `MIN_SLOTS` (each size compiled once, a few seconds); a
shorter tail goes on in the same slots (one compiled loop). On the quick MNIST Flow model's 100
test digits in 100 slots the share of slot-steps spent on empty slots fell from 40% to 9% and
the first stage from 129 s to 93 s (warm; `tools/qstar_tail.py`); the quick FFG model's fit (7 s)
does not shrink, since its compiles would cost more than they save (13 s more, cold).
Every draw of datapoint i comes from `fold_in(fold_in(key, i), step)` (its monitor's from
`fold_in(fold_in(key, 2**32 - 1), i)`, its polishing steps' from `fold_in(fold_in(fold_in(key,
2**32 - 2), i), step)`; i is its index, `indices[i]` where given): its result depends on the
seed and its index only, not on the slot, the batch size, the number of devices or the other
rows fitted with it (a subset fitted with its indices gives the whole fit's rows).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from amortjax.checks import (
    check_finite,
    check_float,
    check_indices,
    check_int,
    check_key,
    resolve_settings,
)
from amortjax.engine import datapoint_keys, map_datapoints, release_compiled_programs
from amortjax.estimators import SAMPLE_CHUNK, bounds_batch
from amortjax.families import DiagonalGaussian, Family, FullRankGaussian, resolve_family
from amortjax.flows import AffineCouplingFlow
from amortjax.guides.local import given_params_guide, local_elbo
from amortjax.inference.flow_start import flow_from_gaussian
from amortjax.latents import Site, check_site, latent_size, log_joint_unconstrained
from amortjax.sharding import DATA_AXIS, active_mesh, check_divisible, replicate
from amortjax.traces import check_data

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
_MIN_CURVATURE = 1e-3  # floor of the Newton step's curvature eigenvalues
CERTIFY_CHUNK = 2
"""Draws whose Hessians the certificate (`_newton_gap_one`) takes at once: one antithetic pair.
A Hessian pushes z_dim tangents through the decoder for each draw, so all 32 of
`certify_samples` at once held 32 z_dim copies of the decoder's activations per datapoint: 12 GB
resident for `fit_local` with batch_size=1000 at z_dim 50 (`python -m bench memory`), and an
allocation of 110 GB at z_dim 2048 (`python -m bench scaling`, which failed)."""
EIGEN_FRAME_CONDITION = 1e5
"""newton_frame="auto" takes the diagonal Gaussian's Hessian again in its eigenbasis where its
condition number in z's frame passes this: float32 (eps 1.2e-7) then holds the smallest
eigenvalues to about 1% of themselves or worse."""
NEWTON_FRAMES = ("z", "eigen", "auto")
METHODS = ("auto", "adam", "newton")
DEFAULTS = {  # per stopping signal: (learning_rate, block_size, patience)
    "adam": (3e-3, 50, 4),  # Adam, the per-step average (the flows')
    "adam_monitor": (3e-3, 400, 1),  # Adam, the monitor (the Gaussians')
    "newton": (0.5, 10, 4),
}
"""Blocks and patience are per stopping signal, since a block costs what its signal does. The
monitor costs M forward passes per block, 14% of a one-draw step at blocks of 100 (Cremer et
al.'s) and 25% at 50; at blocks of 400 with patience 1 (a plateau: one block, 400 steps,
without a better score) it costs 4%, and Adam's q* ends closer to the best of its family:
`tools/monitor_block.py` (40 points x 3 keys, shortfall from the best diagonal Gaussian in exact
ELBO, mean), S = 1: 0.0029 nats against 0.0129 at blocks of 50 and patience 4 on a correlated
factor-analysis posterior (x 8, z 3), 0.087 against 8.0 on x 3 < z 5 (noise 0.1), in 40% and
30% more steps; S = 4: 0.0019 against 0.0067 and 0.055 against 0.95. The per-step average costs
nothing per block but its first block, which scores the start without moving: it keeps blocks
of 50 (its patience 4 the same 200-step plateau window as before)."""
MONITOR_SAMPLES = 32  # draws of Adam's stopping signal for the Gaussian families


class QStarSettings(NamedTuple):
    """The per-example optimizer's settings: `fit_local(..., settings)`, `PerExample(settings)`,
    `gap_decomposition(qstar=settings)`; `fit_local` also takes any field as a keyword.

    Attributes:
        method: "adam" (any family), "newton" (damped Newton / natural-gradient steps, for the
            Gaussian families: see `_newton_one`; each step costs a Hessian of log p in z, about
            `z_dim` gradients, and makes the correlated and narrow posteriors easy), or "auto"
            (newton for the diagonal and full-rank Gaussians, adam otherwise).
        num_samples: S, draws per datapoint per step.
        learning_rate: the initial step size: Adam's (default 3e-3) or the Newton step's
            damping a in (0, 1] (default 0.5).
        block_size: steps per block of the stopping rule (default: 400 for adam with the
            monitor, the Gaussians' default; 50 for adam with the per-step average, the
            flows'; 10 for newton: `DEFAULTS`).
        patience: blocks without improvement of the block score before the step size is
            reduced (or, after `num_decays` reductions, before the datapoint stops); default
            1 for adam with the monitor, 4 otherwise (`DEFAULTS`).
        max_steps: cap on the steps of any datapoint; steps come in whole blocks, so a
            datapoint stops at the last whole block within it (a cap under one block shortens
            the block to it).
        min_improvement: nats a block score must gain over the best to count as improvement.
        lr_decay: factor of each step-size reduction, in (0, 1).
        num_decays: step-size reductions before convergence (0: Cremer et al.'s rule, stop at
            the first plateau).
        select_samples: draws of the final comparison of the start with the end (common
            random numbers), which keeps the better of the two.
        final_samples: fresh draws for the reported ELBO and IWAE of the fitted q; 0 skips them
            (when the caller scores q* itself, as `gap_decomposition` does).
        batch_size: slots optimized at once (bounds memory); waiting datapoints take the slots
            of finished ones, and a long tail goes on in fewer slots (`SHRINK_SECONDS`).
        stl: Adam's gradient drops the score term of log q ("sticking the landing", see
            `guides.local.local_elbo`): unbiased, with less noise near q*, so Adam settles
            closer to it (measured on the quick MNIST Flow model: +0.4 nats of L[q*] at the
            same budget, in less time). False: the plain reparameterization gradient.
        monitor_samples: M, draws of Adam's stopping signal (see the module docstring):
            each block's averaged iterate is scored with M draws that stay the same for the
            datapoint through the whole run (common random numbers), and the steps compute
            gradients only. 0: the signal is the block's average of its per-step S-draw ELBO
            estimates (Cremer et al.'s rule; the values cost what the gradient does not, a
            log1p per logit of a Bernoulli likelihood: 13-19% of a step in `python -m bench
            local_optimizer`). None: `MONITOR_SAMPLES` for the diagonal and full-rank
            Gaussians, 0 for other families (measured better for each). Newton steps always
            read their own per-step values.
        polish_steps: Adam steps of a second, polishing stage (0: none; Adam only): from the
            first stage's end, every datapoint takes this many steps at the fixed step size
            `polish_learning_rate` with `polish_samples` draws per step, and the average of
            its last tenth of iterates joins the final comparison. Where the first stage ends
            noise-limited (on the quick MNIST Flow model 1,000 more steps gained +0.011 nats
            at its own 16 draws and final rate, +0.063 at 64 draws and rate 3e-3:
            `tools/qstar_continuation.py`), more draws per step late in the run climb further
            at less cost than more draws throughout.
        polish_samples: draws per step of the polishing stage.
        polish_learning_rate: its fixed Adam step size.
        certify_samples: antithetic draws of the convergence certificate of the Gaussian
            families (`LocalFit.newton_gap`, see `_newton_gap_one`): how far q* lies below the
            best of its family by the Newton model, exact on a linear-Gaussian model; it costs
            about `z_dim` gradients per draw and datapoint, once. 0: none.
        certify_tol: nats; a Gaussian q* whose certificate exceeds this is not converged,
            whatever its stopping rule said. The certificate's own noise sets it: on converged
            q* (100 test digits each, 32 draws) it read at most 0.06 on the quick MNIST FFG
            model (0.009 on average) and 0.09 on the paper-length one (z = 50; -0.001 on
            average), against 122 nats for a stalled Adam (see the module docstring).
        certify_retries: rounds of continuation for a Gaussian q* that its rule stopped but
            its certificate does not pass: it goes on from where it stopped, with twice the
            draws per step and the patience, and one more step-size stage, each round. On the
            quick MNIST FFG model (200 test digits) Newton's rule had stopped 3 digits from
            the encoder 0.31-0.87 nats short and 5 from N(0, I) 0.24-470 short, all named by
            the certificate; continued, every one passed it. 0: warn only. (A flow below its
            floor by more than `certify_tol` goes on from the floor once where this is >= 1:
            `flow_floor`.)
        newton_frame: where the diagonal Gaussian's Newton step takes the Hessian of log p:
            "z" (z's own frame: one Hessian per step), "eigen" (again in the first one's
            eigenbasis: two per step) or "auto" (the default: again in the eigenbasis only
            where the first one's condition number passes `EIGEN_FRAME_CONDITION`, 1e5, for
            any moving datapoint of the chunk). In float32 a Hessian in z's frame holds its
            small eigenvalues only to about 1e-7 times its largest, so where the posterior is
            narrow along some directions and wide along others (condition number above ~1e6:
            noise 1e-3 with x_dim 4 < z_dim 8) the "z" steps overshoot along the wide ones and
            diverge (measured: 3.3e7 nats below the best diagonal Gaussian, every point
            warned by the certificate); "eigen" and "auto" reach it (see `test_local.py`). On
            the quick MNIST FFG model (z = 50, 200 test digits from the encoder) "eigen" took
            1.9-2.2 times as long as "z" for the same q* (L[q*] -0.0005 +- 0.0019 nats apart);
            see the README for "auto". The full-rank step always works in q's whitened frame
            and ignores this.
        flow_start: where a flow's q* starts without `init`: "diagonal" (the diagonal
            Gaussian's q* as its base, identity coupling layers) or "full_rank" (the full-rank
            Gaussian's q*, made a coupling flow by `inference.flow_start.flow_from_gaussian`:
            it costs that q*'s Newton fit, about z_dim gradients per draw and step, and a
            float64 fit of a few milliseconds per datapoint). On a posterior narrow along
            oblique directions (x_dim 4 < z_dim 8, noise 1e-2) the flow's q* ended 19.4 +- 0.65
            nats below log p(x) from "diagonal" and within 1e-4 from "full_rank"
            (`test_flows.py`). On the quick MNIST Flow model (z = 50, 50 seeded test digits,
            the quick preset's Adam q* after each start, ELBOs on 2,000 common draws) q* from
            "full_rank" ended 0.014 +- 0.005 nats below q* from "diagonal" (79-103 s against
            105 s), and both below q* from the encoder's output (by 0.033 +- 0.005 and
            0.019 +- 0.004): so "diagonal" stays the default, and where an encoder exists its
            output is the better start.
        flow_floor: a flow's one-sided certificate (flows only; whatever the start): the
            full-rank Gaussian's q* (Newton, certified), made a coupling flow, is a member of
            the flow family, so the family's best lies at or above it. Where it beats q* on
            common random numbers (`select_samples` draws) by more than `certify_tol`, q* is
            provably short; with `certify_retries` >= 1 it goes on from the floor (one round
            at these settings), else it is warned. `LocalFit.floor_gap` records it. It costs
            the full-rank Newton fit (about z_dim gradients per draw and step). Measured: on a
            narrow correlated posterior (noise 1e-2, x_dim = z_dim = 4) the floor beat the
            default flow q* by 0.48-1.43 nats on 11 of 12 points (each 0.55-1.35 below log
            p(x), its rule saying converged); gone on from it, each ended 0.002-0.006 below.
            Passing it does not prove convergence: the flow may still lie below its family's
            best by more than the floor shows.
        second_start: where `init` is given (an encoder's output), fit q* a second time from
            `fit_local`'s own start (as with init=None: N(0, I) for the Gaussians, `flow_start`
            for a flow) and keep, per datapoint, whichever of the two ends higher on common
            random numbers (`select_samples` draws; a second fit that did not converge must
            lead a converged first one by more than `certify_tol`); `LocalFit.basin_gap`
            records by how much.
            Every certificate above is local: it says q* tops its basin, not that no other
            basin is higher, and an encoder can start q* in a minor mode of a multimodal
            posterior (`test_local.py`: started in a narrow bimodal posterior's minor mode,
            24-33% of the mass, the diagonal Gaussian's q* converged there, certified, 0.72-1.12
            nats below q* from N(0, I)). It doubles q*'s cost.
        random_starts: further starts whose means are draws from N(0, I) (the prior of a
            standard VAE's z, in the local latents' unconstrained space; each row's draw from
            the key and its index), their scales and a flow's coupling layers those of the
            family's standard start; each is fitted and the best per datapoint kept, as with
            `fit_local(starts=)`. Each costs one more q* fit.
    """

    method: str = "auto"
    num_samples: int = 4
    learning_rate: float | None = None
    block_size: int | None = None
    patience: int | None = None
    max_steps: int = 100_000
    min_improvement: float = 0.0
    lr_decay: float = 0.3
    num_decays: int = 3
    select_samples: int = 256
    final_samples: int = 1000
    batch_size: int = 100
    stl: bool = True
    monitor_samples: int | None = None
    polish_steps: int = 0
    polish_samples: int = 64
    polish_learning_rate: float = 3e-3
    certify_samples: int = 32
    certify_tol: float = 0.25
    certify_retries: int = 2
    newton_frame: str = "auto"
    flow_start: str = "diagonal"
    flow_floor: bool = True
    second_start: bool = False
    random_starts: int = 0

    def for_family(self, family: Family) -> QStarSettings:
        """Settings written for Adam, as `family` should run them, so that one settings object
        serves a table of several families (as `amortization_gap`'s does): method "auto" is
        resolved (Newton steps for the diagonal and full-rank Gaussians, Adam otherwise), as is
        `monitor_samples` (`monitor_for`), and where the method is Newton, `learning_rate`,
        `block_size`, `patience` and `num_samples` (Adam's here: a paper preset's patience of
        10 blocks of 100 Adam steps is not Newton's 4 blocks of 10 steps) are set back to
        Newton's own defaults and the (Adam) polishing stage is dropped."""
        method = _method_for(self.method, family)
        monitor = self.monitor_for(family)
        if method == "newton":
            return self._replace(
                method=method,
                learning_rate=None,
                block_size=None,
                patience=None,
                num_samples=QStarSettings().num_samples,
                monitor_samples=monitor,
                polish_steps=0,
            )
        return self._replace(method=method, monitor_samples=monitor)

    def monitor_for(self, family: Family) -> int:
        """The monitor's draws as `family` runs them (0: the per-step average; Newton's)."""
        if _method_for(self.method, family) == "newton":
            return 0
        if self.monitor_samples is not None:
            return self.monitor_samples
        return MONITOR_SAMPLES if isinstance(family, DiagonalGaussian | FullRankGaussian) else 0

    def step_and_block(self, family: Family | None = None) -> tuple[float, int]:
        """The step size and block length the method runs with (its defaults where None; a
        `max_steps` under one block shortens the block to it). Method "auto" depends on the
        family, and Adam's block on its stopping signal (`monitor_for`: the family's where
        `monitor_samples` is None): pass it (`family`), or call `for_family(family)` first."""
        default_rate, default_block, _ = self._defaults("step_and_block", family)
        rate = default_rate if self.learning_rate is None else self.learning_rate
        block = default_block if self.block_size is None else self.block_size
        cap = self.max_steps
        ints = all(isinstance(v, int | np.integer) for v in (block, cap))
        if ints and not isinstance(cap, bool) and cap >= 1:  # (fit_local refuses the others)
            block = min(block, int(cap))
        return rate, block

    def patience_for(self, family: Family | None = None) -> int:
        """The patience the method runs with: `patience`, or where None its stopping signal's
        default (`DEFAULTS`; the family is needed as for `step_and_block`)."""
        if self.patience is not None:
            return self.patience
        return self._defaults("patience_for", family)[2]

    def _defaults(self, where: str, family: Family | None) -> tuple[float, int, int]:
        """`DEFAULTS` of the method and, for Adam, its stopping signal."""
        method = self.method
        if method not in METHODS:
            raise ValueError(
                f"QStarSettings.{where}: method must be one of {METHODS}, got {method!r}."
            )
        if family is None and (
            method == "auto" or (method == "adam" and self.monitor_samples is None)
        ):
            raise ValueError(
                f'QStarSettings.{where}: method "{method}" depends on the family (Newton '
                "steps for the Gaussian families and Adam otherwise; Adam's blocks on its "
                f"stopping signal, the family's where monitor_samples is None); pass the "
                f"family, {where}(family), or resolve it first with for_family(family)."
            )
        if family is not None:
            method = _method_for(method, family)
        monitor = self.monitor_samples if family is None else self.monitor_for(family)
        if method == "adam" and isinstance(monitor, int | np.integer) and monitor > 0:
            method = "adam_monitor"  # (a monitor_samples of the wrong kind: fit_local refuses it)
        return DEFAULTS[method]


def _method_for(method: str, family: Family) -> str:
    """Method "auto" resolved for `family`: Newton for the Gaussian families, Adam otherwise."""
    if method != "auto":
        return method
    return "newton" if isinstance(family, DiagonalGaussian | FullRankGaussian) else "adam"


class LocalFit(NamedTuple):
    """Result of `fit_local`, one row per datapoint.

    Attributes:
        params: the fitted lambda_i (the best candidate, see the module docstring),
            `[N, num_params]`.
        elbo: L(lambda_i; x_i) estimated with `final_samples` fresh draws, `[N]` (None when
            `final_samples=0`).
        iwae: the IWAE-`final_samples` bound of log p(x_i) with q(z; lambda_i), `[N]` (or None).
        steps: optimizer steps each datapoint took (the polishing stage's included), `[N]`.
        converged: True where the datapoint stopped by the plateau rule after all step-size
            reductions and, for the Gaussian families, its certificate `newton_gap` is at most
            `certify_tol`, `[N]`. For a flow it says only that the rule stopped it and (with
            `QStarSettings.flow_floor`) that the full-rank floor does not beat it by more than
            `certify_tol`: how far q* lies below the family's best is otherwise unknown (see
            the module docstring), and the summary says "stopped by its rule".
        hit_max_steps: True where `max_steps` stopped it first, `[N]`.
        gain: nats the best block score (ELBO) rose during the last step-size stage, `[N]`
            (small at convergence).
        moved: False where the final comparison kept the start, `[N]`.
        num_samples: draws behind `elbo` and `iwae`.
        stopped_fraction: share of the optimizer's slot-steps spent on slots without a
            datapoint (the tail of the queue): the compute wasted on stopped datapoints.
        polished: True where the polishing stage's end was kept, `[N]` (None without that
            stage, `polish_steps=0`).
        newton_gap: the convergence certificate of a Gaussian q*, `[N]`: nats by which its
            ELBO lies below the best of its family by the Newton model (see
            `QStarSettings.certify_samples`; None for other families or with 0 draws).
        continued: True where the certificate sent the datapoint on for more rounds
            (`QStarSettings.certify_retries`), or, for a flow, on from the full-rank floor,
            `[N]` (None where not recorded).
        floor_gap: a flow's one-sided certificate (`QStarSettings.flow_floor`), `[N]`: nats by
            which the full-rank Gaussian's q* as a flow scores above q* on common random
            numbers (noise of a few hundredths; <= 0 where q* is at or above that floor, and
            exactly 0 where q* is the floor itself); None for the Gaussian families or
            without the check.
        basin_gap: with further starts (`fit_local(starts=)`, `QStarSettings.random_starts`,
            `QStarSettings.second_start`), the best of their L[q*] - L[q* from init] on common
            random numbers, `[N]` (positive where a further start ended higher; where one was
            kept, the other fields describe its fit); None without them.
        start: with further starts, which fit each datapoint kept, `[N]` ints: 0 the fit from
            init (or from the default start without init), j the fit from the j-th further
            start (`starts`, then the `random_starts` draws), the last the second start; None
            without them.
    """

    params: np.ndarray
    elbo: np.ndarray | None
    iwae: np.ndarray | None
    steps: np.ndarray
    converged: np.ndarray
    hit_max_steps: np.ndarray
    gain: np.ndarray
    moved: np.ndarray
    num_samples: int
    stopped_fraction: float
    polished: np.ndarray | None = None
    newton_gap: np.ndarray | None = None
    continued: np.ndarray | None = None
    floor_gap: np.ndarray | None = None
    basin_gap: np.ndarray | None = None
    start: np.ndarray | None = None

    def chosen(self, others: Sequence[LocalFit], start: np.ndarray, basin_gap: np.ndarray
               ) -> LocalFit:  # fmt: skip
        """Each datapoint's row from fit `start[i]` of `[self, *others]` (fits of the same data
        under the same settings, from different starts), with `basin_gap` and `start`
        recorded."""
        fits = [self, *others]
        start = np.asarray(start)

        def pick(f):
            rows = [getattr(fit, f) for fit in fits]
            if any(r is None for r in rows):
                return None
            rows = np.stack([np.asarray(r) for r in rows])  # [C, N, ...]
            return np.take_along_axis(
                rows, start.reshape((1, -1) + (1,) * (rows.ndim - 2)), axis=0
            )[0]

        rows = {
            f: pick(f)
            for f in self._fields
            if f not in ("num_samples", "stopped_fraction", "basin_gap", "start")
        }
        stopped = float(np.mean([fit.stopped_fraction for fit in fits]))  # equal work each
        return self._replace(**rows, stopped_fraction=stopped, basin_gap=basin_gap, start=start)

    def convergence(self) -> dict[str, Any]:
        """A summary of the convergence record for reports.

        Returns:
            `{"num_datapoints", "converged_fraction", "hit_max_steps", "steps_mean",
            "steps_max", "gain_mean", "gain_max", "moved_fraction", "stopped_fraction",
            "polished_fraction", "newton_gap_mean", "newton_gap_max", "certified",
            "floor_gap_max", "floor_above", "continued", "second_start_won", "other_start_kept",
            "basin_gap_max", "text"}` (`second_start_won`: points where a further start ended
            higher; `other_start_kept`: where one was kept),
            where text reads e.g. "q* converged for 99.7% of 1000 points; 3 hit max_steps;
            2,310 steps on average" (the certificate's entries None without one). Without a
            certificate (`certified` False: flows) `converged_fraction` is the share the rule
            stopped (and, with the floor check, the floor passed), and the text says so, not
            "converged".
        """
        n = int(self.steps.shape[0])
        out = {
            "num_datapoints": n,
            "converged_fraction": float(np.mean(self.converged)),
            "hit_max_steps": int(np.sum(self.hit_max_steps)),
            "steps_mean": float(np.mean(self.steps)),
            "steps_max": int(np.max(self.steps)),
            "gain_mean": float(np.mean(self.gain)),
            "gain_max": float(np.max(self.gain)),
            "moved_fraction": float(np.mean(self.moved)),
            "stopped_fraction": float(self.stopped_fraction),
            "polished_fraction": None if self.polished is None else float(np.mean(self.polished)),
            "newton_gap_mean": None,
            "newton_gap_max": None,
            "certified": self.newton_gap is not None,
            "floor_gap_max": None if self.floor_gap is None else float(np.max(self.floor_gap)),
            "floor_above": None if self.floor_gap is None else int(np.sum(self.floor_gap > 0)),
            "continued": None if self.continued is None else int(np.sum(self.continued)),
            "second_start_won": None if self.basin_gap is None else int(np.sum(self.basin_gap > 0)),
            "other_start_kept": None if self.start is None else int(np.sum(self.start > 0)),
            "basin_gap_max": None if self.basin_gap is None else float(np.max(self.basin_gap)),
        }
        if self.newton_gap is not None:
            out["newton_gap_mean"] = float(np.mean(self.newton_gap))
            out["newton_gap_max"] = float(np.max(self.newton_gap))
        verdict = (
            "converged for"
            if out["certified"]
            else "stopped by its rule (uncertified: how far it lies below the family's best "
            "is unknown; double the budget to check) for"
            if self.floor_gap is None
            else "stopped by its rule and not below the full-rank Gaussian floor (a one-sided "
            "check: how far it lies below the family's best is otherwise unknown; double the "
            "budget to check) for"
        )
        out["text"] = (
            f"q* {verdict} {100 * out['converged_fraction']:.1f}% of {n} points; "
            f"{out['hit_max_steps']} hit max_steps; {out['steps_mean']:,.0f} steps on "
            f"average (max {out['steps_max']:,}); last-stage gain {out['gain_mean']:.4f} nats "
            f"on average (max {out['gain_max']:.4f})"
        )
        if self.polished is not None:
            out["text"] += f"; polishing kept for {100 * out['polished_fraction']:.1f}%"
        if self.newton_gap is not None:
            out["text"] += (
                f"; below the family's best by {out['newton_gap_mean']:.4f} nats on average "
                f"(max {out['newton_gap_max']:.4f}; Newton-model certificate)"
            )
        if self.floor_gap is not None:
            out["text"] += (
                f"; the floor scored above q* on {out['floor_above']} points, by at most "
                f"{out['floor_gap_max']:.4f} nats"
            )
        if out["continued"]:
            out["text"] += (
                f"; {out['continued']} continued after their certificate"
                if self.floor_gap is None
                else f"; {out['continued']} continued from the floor"
            )
        if self.basin_gap is not None:
            out["text"] += (
                f"; fitted again from further starts, q* ended higher on "
                f"{out['second_start_won']} points (by at most {max(out['basin_gap_max'], 0):.4f}"
                " nats)"
                + ("" if self.start is None else f" and was kept on {out['other_start_kept']}")
            )
        return out


def _newton_one(
    model: Callable,
    family: Family,
    site: Site,
    num_samples: int,
    params: dict,
    x: jax.Array,
    lam: jax.Array,
    key: jax.Array,
    step: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One damped Newton / natural-gradient step of a Gaussian q for ONE datapoint, in z's frame
    (the optimizer runs the same parts batched, taking the Hessian again in its eigenbasis where
    a chunk needs it: `_in_eigen_frame`, `QStarSettings.newton_frame`).

    With S draws z_s = mu + L eps_s, g = mean_s grad log p(x, z_s) and
    H = mean_s hess log p(x, z_s) are unbiased estimates of the ELBO's gradient and Hessian in
    mu (Bonnet's and Price's theorems; the draws come in antithetic pairs). A = -H with its
    eigenvalues replaced by their absolute values, floored at `_MIN_CURVATURE` (saddle-free
    Newton, Dauphin et al. 2014: where a non-concave likelihood makes log p curve upward, the
    step still climbs, by g / |curvature|, rather than jumping by g / floor into another basin),
    gives, with step a in (0, 1]:

        precision  Lambda <- (1 - a) Lambda + a A       (full rank; its diagonal for the FFG)
        mean       mu     <- mu + a A^-1 g              (FFG: the full Newton step, for
                                                         correlated posteriors)
                   mu     <- mu + a Lambda^-1 g         (full rank, with the new Lambda)

    the fixed point of the Gaussian ELBO (Opper & Archambeau 2009; Khan & Lin's VON). On a
    linear-Gaussian model one step with a = 1 lands on the optimum up to the noise of g. The
    full-rank step computes all of it in q's whitened frame u = L^-1 (z - mu), where Lambda is
    I and A near q* is near I, so float32 holds posteriors of any condition number (see
    `_newton_moments`).

    Returns:
        `(new lambda [P], ELBO estimate at lambda)` (the entropy in closed form).
    """
    moments = _newton_moments(model, family, site, num_samples, params, x, lam, key)
    return _newton_update(family, lam, moments, step)


class _Moments(NamedTuple):
    """One datapoint's draws of log p and its derivatives, in the frame z = mu + R u that the
    Newton step takes them in (R: `rot`; q's whitened frame for the full-rank family, z's own
    frame or the eigenbasis of a first Hessian for the diagonal one)."""

    lp: jax.Array  # log p(x, z_s), [S]
    grads: jax.Array  # grad_u log p, [S, d]
    hess: jax.Array  # mean_s hess_u log p, symmetrized, [d, d]
    offsets: jax.Array  # the draws' displacement u_s from mu, [S, d]
    cov: jax.Array  # q's covariance in u, [d, d]
    rot: jax.Array  # R (identity but in the eigen frame; unused for the full-rank family)
    eig: tuple[jax.Array, jax.Array]  # eigenvalues [d] and eigenvectors [d, d] of -hess


def _with_moments(lp, grads, hess, offsets, cov, rot) -> _Moments:
    """The draws with the eigendecomposition of -hess, which the step's saddle-free curvature,
    the "auto" frame's condition test and the eigen frame's rotation all read."""
    return _Moments(lp, grads, hess, offsets, cov, rot, jnp.linalg.eigh(-hess))


def _newton_moments(model, family, site, num_samples, params, x, lam, key) -> _Moments:
    """The Newton step's draws of ONE datapoint: z's frame for the diagonal Gaussian, q's
    whitened frame for the full-rank one."""
    loc = family.mean(lam)
    z_dim = loc.shape[-1]
    eps = _antithetic(key, num_samples, z_dim, lam.dtype)
    log_p = _log_p(model, params, x, site)
    eye = jnp.eye(z_dim, dtype=lam.dtype)
    # The full-rank step works in q's whitened frame, z = mu + L u: there g_u = L^T g and
    # H_u = L^T H L (near -I close to q*) are computed by differentiating u -> log p(mu + L u)
    # itself. In float32 a dense H in z loses every eigenvalue below eps * |H|: on a posterior
    # of noise 1e-3 with x_dim 4 < z_dim 8 (condition number 3e7) the prior's eigenvalues 1
    # came out 0.6-1.5 and q* stayed 2.3 nats short of the exact posterior. The diagonal step
    # keeps z's frame (its precision is a diagonal), or takes H again in the first one's
    # eigenbasis where that frame loses precision (`_in_eigen_frame`).
    if isinstance(family, DiagonalGaussian):
        _, log_scale = family.split(lam)
        offsets = jnp.exp(log_scale) * eps
        lp, grads, hess = _moments(log_p, loc + offsets)
        return _with_moments(lp, grads, hess, offsets, jnp.diag(jnp.exp(2 * log_scale)), eye)
    _, frame = family.split(lam)
    lp, grads, hess = _moments(lambda u: log_p(loc + frame @ u), eps)
    return _with_moments(lp, grads, hess, eps, eye, eye)


def _in_eigen_frame(model, site, params, x, lam, first: _Moments) -> _Moments:
    """A diagonal Gaussian's draws again, in the eigenbasis R of their first Hessian (z's frame).

    A dense H in z's frame holds its small eigenvalues only to eps * |H| (noise 1e-3, x_dim 4 <
    z_dim 8: eigenvalues 1 against 1e6 came out anywhere in (0, 1.5), and each step overshot
    tenfold along them). Its eigenvectors separate the two clusters accurately (the gap is
    large), so H is taken again in their frame z = mu + R u, where each cluster's eigenvalues
    come out at their own scale. The same draws are used (rotated)."""
    loc = DiagonalGaussian().mean(lam)
    log_p = _log_p(model, params, x, site)
    rot = first.eig[1]
    offsets = first.offsets @ rot
    lp, grads, hess = _moments(lambda u: log_p(loc + rot @ u), offsets)
    return _with_moments(lp, grads, hess, offsets, rot.T @ first.cov @ rot, rot)


def _ill_conditioned(m: _Moments) -> jax.Array:
    """Whether float32 leaves the small eigenvalues of a Hessian in z's frame off by over 1% of
    themselves: its condition number (eigenvalues' absolute values, the smallest floored at
    `_MIN_CURVATURE`) above `EIGEN_FRAME_CONDITION`."""
    w = jnp.abs(m.eig[0])
    return jnp.max(w) > EIGEN_FRAME_CONDITION * jnp.maximum(jnp.min(w), _MIN_CURVATURE)


def _newton_update(family, lam, m: _Moments, step) -> tuple[jax.Array, jax.Array]:
    """The damped Newton step of `_newton_one` from its draws, and the ELBO estimate at lam."""
    loc = family.mean(lam)
    z_dim = loc.shape[-1]
    g = m.grads.mean(0)
    w, v = m.eig
    # |eigenvalues|: clipping negative ones at the floor made 1000-fold jumps along them; on the
    # quick MNIST FFG model (100 test digits, from the encoder) that left Newton's L[q*] 0.58 +-
    # 0.17 nats below Adam's (its 10 worst digits by 2.1-8.2 nats); with |w|, 0.09 +- 0.07 (one
    # digit by 6.8).
    curvature = (v * jnp.maximum(jnp.abs(w), _MIN_CURVATURE)) @ v.T
    # The ELBO signal of the plateau rule, with the quadratic term as a control variate:
    # exact on a quadratic log p (it only steers the stopping rule; nothing reported uses it).
    quad = 0.5 * jnp.einsum("si,ij,sj->s", m.offsets, m.hess, m.offsets)
    elbo = (jnp.mean(m.lp - quad) + 0.5 * jnp.sum(m.hess * m.cov)
            + family.distribution(lam).entropy())  # fmt: skip
    if isinstance(family, DiagonalGaussian):
        _, log_scale = family.split(lam)
        # back to z's frame from R's (R = I in z's frame: the products are exact)
        move = m.rot @ jnp.linalg.solve(curvature, g)
        diag = jnp.einsum("ik,kl,il->i", m.rot, curvature, m.rot)
        precision = (1 - step) * jnp.exp(-2 * log_scale) + step * diag
        new = jnp.concatenate([loc + step * move, -0.5 * jnp.log(precision)])
    else:
        # In the whitened frame q's precision is I: Lambda_u <- (1 - a) I + a A_u, and the new
        # scale is L K with K K^T = Lambda_u^-1, K lower-triangular: with J the exchange
        # matrix and R R^T = J Lambda_u J (Cholesky), K = J R^-T J.
        _, frame = family.split(lam)
        eye = jnp.eye(z_dim, dtype=lam.dtype)
        precision = (1 - step) * eye + step * curvature
        precision = 0.5 * (precision + precision.T)
        flipped = jnp.linalg.cholesky(precision[::-1, ::-1])
        k = jax.scipy.linalg.solve_triangular(flipped, eye, lower=True).T[::-1, ::-1]
        new = family.pack(loc + step * frame @ (k @ (k.T @ g)), frame @ k)
    new = jnp.where(jnp.all(jnp.isfinite(new)), new, lam)
    return new, jnp.where(jnp.isfinite(elbo), elbo, -jnp.inf)


def _antithetic(key, num_samples, z_dim, dtype):
    """S standard normal draws `[S, z_dim]` in antithetic pairs (eps, -eps): the first-order
    noise of a mean gradient cancels, so on a quadratic log p it is exact."""
    half = jax.random.normal(key, (-(-num_samples // 2), z_dim), dtype)
    return jnp.concatenate([half, -half])


def _scale_matrix(family, lam):
    """A Gaussian q's scale as a matrix `[z_dim, z_dim]`: diag(sigma) or the full-rank L."""
    if isinstance(family, DiagonalGaussian):
        return jnp.diag(jnp.exp(family.split(lam)[1]))
    return family.split(lam)[1]


def _log_p(model, params, x, site):
    """log p(x, z) of ONE datapoint as a function of its flat z."""
    return lambda z: log_joint_unconstrained(model, params, x[None], z[None], site)[0]


def _moments(f, points, chunk=None):
    """`(f [S], gradients [S, d], symmetrized mean Hessian [d, d])` of f at `points` [S, d];
    the Hessians `chunk` draws at a time (None: all S at once)."""
    lp, grads = jax.vmap(jax.value_and_grad(f))(points)
    if chunk is None:
        hess = jax.vmap(jax.hessian(f))(points).mean(0)
    else:
        hess = jax.lax.map(jax.hessian(f), points, batch_size=chunk).mean(0)
    return lp, grads, 0.5 * (hess + hess.T)


def _newton_gap_one(model, family, site, num_samples, params, x, lam, key):
    """ONE datapoint's certificate: how many nats a Gaussian q's ELBO lies below the best of
    its family, by the Newton model (a scalar).

    In q's whitened frame z = mu + L u, with S antithetic draws, g_u = mean grad_u log p and
    A_u = -mean hess_u log p (eigenvalues w, their absolute values): the gain of the Newton
    step on the mean, 1/2 g_u^T A_u^-1 g_u (less its expected noise, so an unbiased estimate:
    slightly negative at times), plus that of moving the covariance to A^-1,
    1/2 sum_j (w_j - 1 - log w_j) (full rank) or to 1 / diag(A),
    1/2 sum_i (A_u,ii - 1 - log A_u,ii) (diagonal). Exact on a linear-Gaussian model (log p
    quadratic: the terms are the mean's and the covariance's parts of
    L[best] - L[q]); zero at the optimum of the Gaussian ELBO of any model, where
    E_q grad log p = 0 and the precision equals E_q[-hess log p] (Bonnet's and Price's
    theorems); elsewhere the local quadratic model's estimate.
    """
    loc = family.mean(lam)
    eps = _antithetic(key, num_samples, loc.shape[-1], lam.dtype)
    frame = _scale_matrix(family, lam)
    log_p = _log_p(model, params, x, site)
    _, grads, hess = _moments(lambda u: log_p(loc + frame @ u), eps, CERTIFY_CHUNK)
    w, v = jnp.linalg.eigh(-hess)
    # (No floor at _MIN_CURVATURE here: a q too narrow along the posterior's long axis has
    # eigenvalues far below it, and their -log w is the gap; only float32's resolution.)
    w = jnp.maximum(jnp.abs(w), jnp.finfo(w.dtype).eps * jnp.max(jnp.abs(w)))
    # The mean's term without the noise of g: E[g^ B g^] = g B g + tr(B Cov g^), so the
    # pairs' spread (an antithetic pair is one independent draw) is subtracted.
    pairs = grads.reshape(2, -1, grads.shape[-1]).mean(0) @ v  # [K, d] in A's eigenbasis
    k = pairs.shape[0]
    g = pairs.mean(0)
    noise = jnp.sum(jnp.var(pairs, axis=0, ddof=1) / w) / k
    mean_gain = 0.5 * (jnp.sum(g**2 / w) - noise)
    if isinstance(family, DiagonalGaussian):
        w = jnp.maximum(jnp.abs(jnp.diag(-hess)), jnp.finfo(w.dtype).eps * jnp.max(w))
    gap = mean_gain + 0.5 * jnp.sum(w - 1 - jnp.log(w))
    return jnp.where(jnp.isfinite(gap), gap, jnp.inf)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _newton_gap_batch(model, family, site, num_samples, params, keys, x, lam):
    """`_newton_gap_one` for a chunk `[B]`."""
    return jax.vmap(
        lambda xi, ki, li: _newton_gap_one(model, family, site, num_samples, params, xi, li, ki)
    )(x, keys, lam)


def _adam(grad, m, v, t, lr):
    """One Adam step (ascent) from `grad` (non-finite entries read as 0): `(update, m, v)`;
    `t` is the step's number (from 1) and `lr` the step size, both broadcast against `grad`."""
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    m = ADAM_B1 * m + (1 - ADAM_B1) * grad
    v = ADAM_B2 * v + (1 - ADAM_B2) * grad**2
    t = t.astype(grad.dtype)
    m_hat, v_hat = m / (1 - ADAM_B1**t), v / (1 - ADAM_B2**t)
    return lr * m_hat / (jnp.sqrt(v_hat) + ADAM_EPS), m, v


class _Slots(NamedTuple):
    """The optimizer's state: B slots, each holding one datapoint (or none), and the outputs."""

    idx: jax.Array  # [B] datapoint in the slot; N when empty
    x: jax.Array  # [B, ...]
    lam: jax.Array  # [B, P] current iterate
    m: jax.Array  # [B, P] Adam's first moment
    v: jax.Array  # [B, P] Adam's second moment
    t: jax.Array  # [B] Adam steps since the datapoint was loaded
    lr: jax.Array  # [B] step size
    best: jax.Array  # [B] best block score (ELBO)
    stage_start: jax.Array  # [B] best block score when the current step-size stage began
    stale: jax.Array  # [B] blocks since the best improved
    decays: jax.Array  # [B] step-size reductions so far
    steps: jax.Array  # [B] Adam steps taken
    baseline: jax.Array  # [B] True during the block that evaluates the start
    next: jax.Array  # [] next datapoint to load
    busy: jax.Array  # [] slot-blocks that held a datapoint
    capacity: jax.Array  # [] slot-blocks run (blocks times the slots they ran on)
    tail_blocks: jax.Array  # [] blocks run with the queue empty
    out_lam: jax.Array  # [N, P]
    out_steps: jax.Array  # [N]
    out_converged: jax.Array  # [N]
    out_hit: jax.Array  # [N]
    out_gain: jax.Array  # [N]
    start_score: jax.Array  # [N] the monitor's score of each start (zeros without the monitor)


_PROGRESS: list[Any] = [None]  # the open progress bar, updated from inside the compiled loop


def _report_progress(done: jax.Array) -> None:
    bar = _PROGRESS[0]
    if bar is not None:
        bar.update(int(done) - bar.n)


def _fresh(
    slots: _Slots, rows: jax.Array, new_idx: jax.Array, x_all, init_all, lr0, start_all=None
) -> _Slots:
    """Loads datapoints `new_idx` into the slots where `rows` is True (N leaves a slot empty).
    With `start_all` (each datapoint's score at its start, `[N]`), that score is the first
    reference of the plateau rule; without it, a first block scores the start."""
    n = x_all.shape[0]
    src = jnp.minimum(new_idx, n - 1)
    col = rows[:, None]
    lam0 = init_all[src]
    x_rows = rows.reshape(-1, *([1] * (slots.x.ndim - 1)))
    start = jnp.full(rows.shape, -jnp.inf, lam0.dtype) if start_all is None else start_all[src]
    return slots._replace(
        idx=jnp.where(rows, new_idx, slots.idx),
        x=jnp.where(x_rows, x_all[src], slots.x),
        lam=jnp.where(col, lam0, slots.lam),
        m=jnp.where(col, 0.0, slots.m),
        v=jnp.where(col, 0.0, slots.v),
        t=jnp.where(rows, 0, slots.t),
        lr=jnp.where(rows, lr0, slots.lr),
        best=jnp.where(rows, start, slots.best),
        stage_start=jnp.where(rows, start, slots.stage_start),
        stale=jnp.where(rows, 0, slots.stale),
        decays=jnp.where(rows, 0, slots.decays),
        steps=jnp.where(rows, 0, slots.steps),
        baseline=jnp.where(rows, start_all is None, slots.baseline),
    )


_PER_SLOT = ("idx", "x", "lam", "m", "v", "t", "lr", "best", "stage_start", "stale", "decays",
             "steps", "baseline")  # fmt: skip
MIN_SLOTS = 4  # the loop shrinks its slots by halves while half of them would be at least this
SHRINK_SECONDS = 10.0  # ... where its tail (queue empty) ran this long to the first halving


def _shrunk(slots: _Slots, keep: np.ndarray) -> _Slots:
    """The state with only the slots `keep` (every busy slot among them): per-slot fields taken
    at those rows, the outputs and counters unchanged."""
    return slots._replace(**{name: getattr(slots, name)[keep] for name in _PER_SLOT})


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _initial_slots(
    model, family, site, monitor_samples, num_slots, params, x_all, init_all, key, learning_rate,
    indices=None,
):  # fmt: skip
    """`_optimize`'s first state: the first `num_slots` datapoints loaded and, with the
    monitor, every datapoint's start scored up front (no block is spent on it). `indices`:
    the datapoints' own indices, which key their draws, `[N]` (None: their positions)."""
    n, num_params = init_all.shape
    dtype = init_all.dtype
    start_all = None
    if monitor_samples:
        monitor = functools.partial(_monitor_score, model, family, site, monitor_samples, params,
                                    key)  # fmt: skip
        start_all = jax.lax.map(
            lambda a: monitor(*a), (x_all, init_all, _own_indices(indices, n)),
            batch_size=num_slots,
        )  # fmt: skip
    first_idx = jnp.minimum(jnp.arange(num_slots), n)
    src = jnp.minimum(first_idx, n - 1)
    zeros = jnp.zeros((num_slots, num_params), dtype)
    ints = jnp.zeros(num_slots, jnp.int32)
    init = _Slots(
        idx=first_idx,
        x=x_all[src],
        lam=zeros,
        m=zeros,
        v=zeros,
        t=ints,
        lr=jnp.zeros(num_slots, dtype),
        best=jnp.zeros(num_slots, dtype),
        stage_start=jnp.zeros(num_slots, dtype),
        stale=ints,
        decays=ints,
        steps=ints,
        baseline=jnp.zeros(num_slots, bool),
        next=jnp.minimum(jnp.int32(num_slots), n),
        busy=jnp.int32(0),
        capacity=jnp.int32(0),
        tail_blocks=jnp.int32(0),
        out_lam=jnp.array(init_all),
        out_steps=jnp.zeros(n, jnp.int32),
        out_converged=jnp.zeros(n, bool),
        out_hit=jnp.zeros(n, bool),
        out_gain=jnp.zeros(n, dtype),
        start_score=jnp.zeros(n, dtype) if start_all is None else start_all,
    )
    return _fresh(
        init, first_idx < n, first_idx, x_all=x_all, init_all=init_all, lr0=learning_rate,
        start_all=start_all,
    )  # fmt: skip


def _own_indices(indices: jax.Array | None, n: int) -> jax.Array:
    """The datapoints' own indices `[N]` (uint32), which key their draws: `indices`, or their
    positions where None."""
    return jnp.arange(n, dtype=jnp.uint32) if indices is None else indices.astype(jnp.uint32)


def _monitor_score(model, family, site, monitor_samples, params, key, x, lam, idx):
    """ONE datapoint's score: the ELBO of lam with its M draws, the same all run (from
    `fold_in(fold_in(key, 2**32 - 1), idx)`); -inf where not finite."""
    root = jax.random.fold_in(key, jnp.uint32(2**32 - 1))  # no datapoint's index
    score = local_elbo(
        model, params, x, lam, jax.random.fold_in(root, idx.astype(jnp.uint32)),
        family=family, num_samples=monitor_samples, site=site,
    )  # fmt: skip
    return jnp.where(jnp.isfinite(score), score, -jnp.inf)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9))
def _optimize(
    model: Callable,
    family: Family,
    site: Site,
    method: str,
    num_samples: int,
    block_size: int,
    monitor_samples: int,
    num_slots: int,
    report: bool,
    stl: bool,
    params: dict,
    x_all: jax.Array,
    init_all: jax.Array,
    key: jax.Array,
    learning_rate: jax.Array,
    patience: jax.Array,
    max_steps: jax.Array,
    min_improvement: jax.Array,
    lr_decay: jax.Array,
    num_decays: jax.Array,
    shrink_at: jax.Array | int = -1,
    state: _Slots | None = None,
    indices: jax.Array | None = None,
) -> _Slots:
    """Runs the blocks from `state` (None: `_initial_slots`) until every datapoint has
    finished, or until the queue is empty and at most `shrink_at` slots are busy (-1: never);
    returns the state. Datapoint i draws from `fold_in(key, indices[i])` (None: i)."""
    n = init_all.shape[0]
    if state is None:
        state = _initial_slots(
            model, family, site, monitor_samples, num_slots, params, x_all, init_all, key,
            learning_rate, indices,
        )  # fmt: skip
    own = _own_indices(indices, n)
    monitor = functools.partial(_monitor_score, model, family, site, monitor_samples, params, key)
    fresh = functools.partial(
        _fresh, x_all=x_all, init_all=init_all, lr0=learning_rate,
        start_all=state.start_score if monitor_samples else None,
    )  # fmt: skip

    def elbos(lam, x, keys):
        return jax.vmap(
            lambda xi, li, ki: local_elbo(
                model, params, xi, li, ki, family=family, num_samples=num_samples, site=site,
                stl=stl,
            )
        )(x, lam, keys)  # fmt: skip

    def newton_step(x, lam, keys, step, moving):
        """The slots' Newton steps; "newton_auto" takes every slot's Hessian again in its
        eigenbasis when one moving slot's is ill-conditioned in z's frame (a test outside
        vmap, so that the second Hessians cost nothing where none is needed)."""
        moments = jax.vmap(
            lambda xi, li, ki: _newton_moments(model, family, site, num_samples, params, xi,
                                               li, ki)
        )(x, lam, keys)  # fmt: skip
        if method != "newton" and isinstance(family, DiagonalGaussian):

            def again(m):
                return jax.vmap(
                    lambda xi, li, mi: _in_eigen_frame(model, site, params, xi, li, mi)
                )(x, lam, m)

            if method == "newton_eigen":
                moments = again(moments)
            else:
                needed = jnp.any(jax.vmap(_ill_conditioned)(moments) & moving)
                moments = jax.lax.cond(needed, again, lambda m: m, moments)
        return jax.vmap(functools.partial(_newton_update, family))(lam, moments, step)

    def block(s: _Slots) -> _Slots:
        valid = s.idx < n
        index = own[jnp.minimum(s.idx, n - 1)]  # (an empty slot draws as the last datapoint)
        base = datapoint_keys(key, index)
        moving = valid & ~s.baseline

        def step(carry, j):
            lam, m, v, t, lam_sum = carry
            keys = jax.vmap(jax.random.fold_in)(base, (s.steps + j).astype(jnp.uint32))
            if method.startswith("newton"):
                new, per_point = newton_step(s.x, lam, keys, s.lr, moving)
                lam = jnp.where(moving[:, None], new, lam)
                return (lam, m, v, t, lam_sum + lam), per_point

            # The datapoints' ELBOs are separable, so the gradient of their sum is each
            # datapoint's own gradient. With the monitor, the steps skip the values (and the
            # part of the likelihood's work only they need).
            if monitor_samples:
                grad = jax.grad(lambda lam: elbos(lam, s.x, keys).sum())(lam)
                per_point = None  # (the scan then stacks no values)
            else:
                per_point, vjp = jax.vjp(lambda lam: elbos(lam, s.x, keys), lam)
                (grad,) = vjp(jnp.ones_like(per_point))
            t_new = t + 1
            update, m_new, v_new = _adam(grad, m, v, t_new[:, None], s.lr[:, None])
            col = moving[:, None]
            lam = jnp.where(col, lam + update, lam)
            carry = (
                lam,
                jnp.where(col, m_new, m),
                jnp.where(col, v_new, v),
                jnp.where(moving, t_new, t),
                lam_sum + lam,
            )
            return carry, per_point

        (lam, m, v, t, lam_sum), per_step = jax.lax.scan(
            step, (s.lam, s.m, s.v, s.t, jnp.zeros_like(s.lam)), jnp.arange(block_size)
        )
        lam_avg = lam_sum / block_size
        if monitor_samples:
            score = jax.vmap(monitor)(s.x, lam_avg, index)
        else:
            score = jnp.where(jnp.isfinite(per_step), per_step, -jnp.inf).mean(0)

        # The baseline block (per-step signal only) scores the start, the first reference of
        # the plateau rule.
        first = valid & s.baseline
        best = jnp.where(first, score, s.best)
        stage_start = jnp.where(first, score, s.stage_start)
        improved = moving & (score > s.best + min_improvement)
        best = jnp.where(improved, score, best)
        stale = jnp.where(improved | first, 0, s.stale + moving)
        steps = s.steps + block_size * moving
        plateau = moving & (stale >= patience)
        decay = plateau & (s.decays < num_decays)
        converged = plateau & ~decay
        hit = moving & (steps + block_size > max_steps) & ~converged  # no room for a block
        done = converged | hit
        # A reduction restarts from the block's averaged iterate with the smaller step size.
        lam = jnp.where(decay[:, None], lam_avg, lam)
        s = s._replace(
            lam=lam,
            m=m,
            v=v,
            t=t,
            lr=jnp.where(decay, s.lr * lr_decay, s.lr),
            best=best,
            stage_start=jnp.where(decay, best, stage_start),
            stale=jnp.where(decay, 0, stale),
            decays=s.decays + decay,
            steps=steps,
            baseline=s.baseline & ~valid,
            busy=s.busy + valid.sum(),
            capacity=s.capacity + num_slots,
            tail_blocks=s.tail_blocks + (s.next >= n),
        )
        # Finished datapoints write their results (the last block's averaged iterate) and
        # hand their slots to waiting ones.
        target = jnp.where(done, s.idx, n)
        s = s._replace(
            out_lam=s.out_lam.at[target].set(lam_avg, mode="drop"),
            out_steps=s.out_steps.at[target].set(s.steps, mode="drop"),
            out_converged=s.out_converged.at[target].set(converged, mode="drop"),
            out_hit=s.out_hit.at[target].set(hit, mode="drop"),
            out_gain=s.out_gain.at[target].set(s.best - s.stage_start, mode="drop"),
        )
        new_idx = jnp.minimum(s.next + jnp.cumsum(done) - 1, n)
        s = fresh(s, done, new_idx)
        s = s._replace(next=jnp.minimum(s.next + done.sum(), n))
        if report:
            jax.debug.callback(_report_progress, s.next - (s.idx < n).sum())
        return s

    def running(s: _Slots) -> jax.Array:
        busy = (s.idx < n).sum()
        return (busy > 0) & ((s.next < n) | (busy > shrink_at))

    return jax.lax.while_loop(running, block, state)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _polish_batch(
    model, family, site, num_samples, num_steps, stl, params, keys, x, lam, learning_rate
):  # fmt: skip
    """The polishing stage for a chunk of datapoints: `num_steps` Adam steps at the fixed
    `learning_rate` from `lam` `[B, P]`, `num_samples` draws per step (step j of datapoint i
    draws from `fold_in(keys[i], j)`); returns the average of the last tenth of the iterates
    (at least one), `[B, P]`."""
    average_steps = max(num_steps // 10, 1)
    first_averaged = num_steps - average_steps

    def one(xi, ki, lam0):
        def elbo(lam, key):
            return local_elbo(
                model, params, xi, lam, key, family=family, num_samples=num_samples, site=site,
                stl=stl,
            )  # fmt: skip

        def step(carry, j):
            lam, m, v, tail = carry
            grad = jax.grad(elbo)(lam, jax.random.fold_in(ki, j.astype(jnp.uint32)))
            update, m, v = _adam(grad, m, v, j + 1, learning_rate)
            lam = lam + update
            return (lam, m, v, tail + jnp.where(j >= first_averaged, lam, 0.0)), None

        zeros = jnp.zeros_like(lam0)
        (_, _, _, tail), _ = jax.lax.scan(step, (lam0, zeros, zeros, zeros), jnp.arange(num_steps))
        return tail / average_steps

    return jax.vmap(one)(x, keys, lam)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _duel_batch(model, family, site, num_samples, params, keys, x, candidates):
    """ELBO estimates of C candidate lambdas per datapoint (`candidates` `[B, C, P]`) on common
    random numbers: `[B, C]`."""

    def one(xi, ki, lams):
        return jax.vmap(
            lambda lam: local_elbo(
                model, params, xi, lam, ki, family=family, num_samples=num_samples, site=site
            )
        )(lams)

    return jax.vmap(one)(x, keys, candidates)


def _duel_scores(
    model, family, site, settings, params, key, x, candidates, batch_size, indices
) -> np.ndarray:
    """ELBO estimates of each datapoint's candidates (`[N, C, P]`) on common random numbers
    (`settings.select_samples` draws, row i's from `key` and `indices[i]`), `[N, C]` float64,
    NaN read as -inf (an argmax would pick a NaN)."""
    duel = functools.partial(_duel_batch, model, family, site, int(settings.select_samples))
    scores = map_datapoints(duel, params, key, [x, candidates], batch_size=batch_size,
                            indices=indices)  # fmt: skip
    scores = np.asarray(scores, np.float64)
    return np.where(np.isnan(scores), -np.inf, scores)


def _check_starts(starts, n, num_params) -> list[jax.Array]:
    """`fit_local(starts=)` as a list of `[n, num_params]` float32 arrays, or a clear error."""
    if starts is None:
        return []
    if isinstance(starts, np.ndarray | jax.Array) or not isinstance(starts, Sequence):
        raise ValueError(
            "fit_local: starts must be a list of starting lambdas, each [N, num_params] (for one "
            "further start pass [lam], not lam)"
        )
    out = []
    for j, lam in enumerate(starts):
        lam = jnp.asarray(lam, jnp.float32)
        if lam.shape != (n, num_params):
            raise ValueError(
                f"fit_local: starts[{j}] has shape {tuple(lam.shape)}; each start must be "
                f"[{n}, {num_params}] (one row per datapoint, the family's parameters)"
            )
        check_finite("fit_local", f"starts[{j}]", lam)
        out.append(lam)
    return out


def _random_start(family, z_dim, key, indices, j) -> jax.Array:
    """`QStarSettings.random_starts`' j-th start, `[N, P]`: the family's standard start with
    its mean drawn from N(0, I), row i's from `fold_in(key_j, indices[i])`."""
    key_j = jax.random.fold_in(key, jnp.uint32(2**32 - 10_000 - j))  # apart from the fits' keys
    loc = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key_j, i), (z_dim,)))(indices)
    standard = family.split(jnp.broadcast_to(family.standard_params(z_dim),
                                             (loc.shape[0], family.num_params(z_dim))))  # fmt: skip
    if isinstance(family, DiagonalGaussian):
        return family.pack(loc, jnp.exp(standard[1]))
    return family.pack(loc, *standard[1:])


def _best_of_starts(model, params, x, key, settings, family, site, size, init, indices, extra,
                    second, progress) -> LocalFit:  # fmt: skip
    """q* fitted from init (None: the default start), from each of `extra` and, if `second`,
    from the default start, with keys independent of each other's (each row's draws still its
    index's); per datapoint the best on common random numbers (`select_samples` draws). A fit
    that did not converge replaces a converged first one only by more than certify_tol (a
    smaller lead can be the duel's noise). A flow's full-rank floor (`QStarSettings.flow_floor`)
    is fitted once, with the first fit's key (so the first fit is the one without further
    starts), and checks every fit."""
    fit = functools.partial(_fit_one, model, params, x, settings=settings, family=family,
                            site=site, size=size, indices=indices)  # fmt: skip
    floor = None
    if isinstance(family, AffineCouplingFlow) and settings.flow_floor:
        floor = _full_rank_start(model, params, x, indices, key, family, site, size, settings,
                                 progress, role="floor")  # fmt: skip
    label = progress if isinstance(progress, str) else "q*"
    first = fit(key, init, progress=progress, floor=floor)
    others = [
        fit(jax.random.fold_in(key, jnp.uint32(2**32 - 11 - j)), lam, floor=floor,
            progress=f"{label} (start {j + 2})" if progress else False)
        for j, lam in enumerate(extra)
    ]  # fmt: skip
    if second:
        others.append(
            fit(jax.random.fold_in(key, jnp.uint32(2**32 - 9)), None, floor=floor,
                progress=f"{label} (second start)" if progress else False)
        )  # fmt: skip
    stack = jnp.stack([jnp.asarray(f.params) for f in (first, *others)], axis=1)  # [N, C, P]
    duel_key = jax.random.fold_in(key, jnp.uint32(2**32 - 10))  # no datapoint's index
    scores = _duel_scores(model, family, site, settings, params, duel_key, x, stack,
                          min(settings.batch_size, x.shape[0]), indices)  # fmt: skip
    lead = np.stack(
        [np.where(f.converged | ~first.converged, 0.0, settings.certify_tol) for f in others], 1
    )
    ahead = scores[:, 1:] - scores[:, :1]
    basin_gap = np.where(np.isinf(scores).all(axis=1), 0.0, ahead.max(axis=1))
    eligible = np.where(ahead > lead, scores[:, 1:], -np.inf)
    start = np.where(eligible.max(axis=1) > -np.inf, 1 + eligible.argmax(axis=1), 0)
    return first.chosen(others, start, basin_gap)


def _diagonal_start(model, params, x, indices, key, family, site, z_dim, settings, progress):
    """A flow's start: the diagonal Gaussian's q* (Newton, from N(0, I)) as the flow's base
    N(mu, sigma^2), its coupling layers the identity (`standard_params`), `[N, P]`."""
    desc = f"{progress if isinstance(progress, str) else 'q*'} (diagonal start)"
    diagonal = fit_local(
        model, params, x, jax.random.fold_in(key, jnp.uint32(2**32 - 4)),
        family=DiagonalGaussian(), site=site, z_dim=z_dim, method="newton", final_samples=0,
        batch_size=settings.batch_size, newton_frame=settings.newton_frame, indices=indices,
        progress=desc if progress else False,
    )  # fmt: skip
    return family.with_base(*jnp.split(jnp.asarray(diagonal.params), 2, axis=-1))


def _full_rank_start(model, params, x, indices, key, family, site, z_dim, settings, progress,
                     role="start"):  # fmt: skip
    """A flow's start (or its floor, `QStarSettings.flow_floor`): the full-rank Gaussian's q*
    (Newton, from N(0, I), certified) made a coupling flow with the same distribution
    (`flow_start.flow_from_gaussian`), `[N, P]`."""
    desc = f"{progress if isinstance(progress, str) else 'q*'} (full-rank {role})"
    full = FullRankGaussian()
    gaussian = fit_local(
        model, params, x, jax.random.fold_in(key, jnp.uint32(2**32 - 6)), family=full,
        site=site, z_dim=z_dim, method="newton", final_samples=0,
        batch_size=settings.batch_size, indices=indices, progress=desc if progress else False,
    )  # fmt: skip
    loc, scale_tril = full.split(jnp.asarray(gaussian.params))
    lam, info = flow_from_gaussian(
        family, np.asarray(loc), np.asarray(scale_tril), return_info=True
    )
    off = ~(info["kl"] <= 0.01)
    if off.any():
        warnings.warn(
            f"fit_local: the full-rank {role}'s coupling flow is more than 0.01 nats (KL) from "
            f"the full-rank q* for {int(off.sum())} of {off.size} datapoints (up to "
            f"{float(np.nanmax(np.where(off, info['kl'], 0))):.3g}): those {role}s are farther "
            "from it (the optimizer and the final comparison still run)",
            stacklevel=3,
        )
    return lam


def _check_settings(*, learning_rate, min_improvement, lr_decay, final_samples, num_decays,
                    monitor_samples, polish_steps, polish_learning_rate, certify_samples,
                    certify_tol, certify_retries, random_starts, **positive_ints
                    ) -> None:  # fmt: skip
    """fit_local's settings, each named with its allowed range when it is outside it."""
    check_int("fit_local", 1, **positive_ints)
    check_int(
        "fit_local", 0, final_samples=final_samples, num_decays=num_decays,
        monitor_samples=monitor_samples, polish_steps=polish_steps,
        certify_samples=certify_samples, certify_retries=certify_retries,
        random_starts=random_starts,
    )  # fmt: skip
    check_float("fit_local", "certify_tol", certify_tol, low=0, low_open=True)
    check_float("fit_local", "learning_rate", learning_rate, low=0, low_open=True)
    check_float("fit_local", "polish_learning_rate", polish_learning_rate, low=0, low_open=True)
    check_float("fit_local", "min_improvement", min_improvement, low=0)
    check_float("fit_local", "lr_decay", lr_decay, low=0, high=1, low_open=True, high_open=True)


class _Round(NamedTuple):
    """One round of `fit_local`'s optimizer on its datapoints (see `_fit_round`)."""

    lam: np.ndarray  # the chosen lambda, [N, P]
    steps: np.ndarray
    converged: np.ndarray  # by the plateau rule
    hit: np.ndarray
    gain: np.ndarray
    moved: np.ndarray
    polished: np.ndarray | None
    newton_gap: np.ndarray | None
    continued: np.ndarray  # False in a first round
    busy: int  # slot-steps on datapoints, and all slot-steps
    capacity: int

    def merged(self, rows: np.ndarray, later: _Round, *, restart: bool = False) -> _Round:
        """This round with `rows` replaced by `later`, their continuation from where they
        stopped (steps add up, and the start a later round kept is this round's end) or, with
        `restart`, from elsewhere (a flow's floor: q* is then not this round's start)."""

        def put(mine, theirs):
            out = np.array(mine, copy=True)
            out[rows] = theirs
            return out

        polished = None
        if self.polished is not None:
            kept = later.polished if restart else self.polished[rows]
            polished = put(self.polished, np.where(later.moved, later.polished, kept))
        return _Round(
            lam=put(self.lam, later.lam),
            steps=put(self.steps, self.steps[rows] + later.steps),
            converged=put(self.converged, later.converged),
            hit=put(self.hit, self.hit[rows] | later.hit),
            gain=put(self.gain, later.gain),
            moved=put(self.moved, True if restart else self.moved[rows] | later.moved),
            polished=polished,
            newton_gap=None if self.newton_gap is None else put(self.newton_gap, later.newton_gap),
            continued=put(self.continued, True),
            busy=self.busy + later.busy,
            capacity=self.capacity + later.capacity,
        )


def _fit_round(
    model, family, site, method, settings, params, x, init, indices, fit_key, select_key,
    num_slots, *, gaussian, mesh, progress, **stage,
) -> _Round:  # fmt: skip
    """`fit_local`'s optimizer from `init` to its stopping rule (with `stage`'s settings where
    given: a continuation's patience, num_decays and num_samples), the polishing stage, the
    choice between start and end(s), and the certificate of the Gaussian families. `settings`
    has every number resolved for `method` (which names the Newton frame: "newton",
    "newton_eigen", "newton_auto"); every draw of x[i] is keyed by `indices[i]`."""
    settings = settings._replace(**stage)
    n = x.shape[0]
    if progress:
        _PROGRESS[0] = tqdm(total=n, desc=progress, unit="pt")
    try:
        optimize = functools.partial(
            _optimize, model, family, site, method, settings.num_samples, settings.block_size,
            settings.monitor_samples,
        )  # fmt: skip
        numbers = (
            jnp.float32(settings.learning_rate),
            jnp.int32(settings.patience),
            jnp.int32(settings.max_steps),
            jnp.float32(settings.min_improvement),
            jnp.float32(settings.lr_decay),
            jnp.int32(settings.num_decays),
        )
        # Once the queue is empty, the loop stops when half of its slots are empty. Where the
        # tail (the blocks since the queue emptied) has run for SHRINK_SECONDS, the slowest
        # datapoints are slow enough to pay for compiling smaller loops (a few seconds each):
        # the busy ones go on in half as many slots, and so on at every halving; a shorter
        # tail goes on in the same slots to the end (one compiled loop).
        final = _initial_slots(
            model, family, site, settings.monitor_samples, int(num_slots), params, x, init,
            fit_key, numbers[0], indices,
        )  # fmt: skip
        slots, shrink, busy = num_slots, None, np.ones(1, bool)
        while busy.any():
            half = slots // 2
            can = shrink is not False and half >= MIN_SLOTS
            can = can and (mesh is None or half % mesh.shape[DATA_AXIS] == 0)
            start, before = time.perf_counter(), int(final.tail_blocks)
            final = optimize(
                slots, bool(progress), bool(settings.stl), params, x, init, fit_key, *numbers,
                jnp.int32(half if can else -1), final, indices,
            )  # fmt: skip
            busy = np.asarray(final.idx) < n
            if busy.any():  # (stopped at half: the queue is empty)
                if shrink is None:  # decided once, at the first halving
                    blocks = max(int(final.capacity) // slots, 1)
                    tail = (int(final.tail_blocks) - before) / blocks
                    shrink = (time.perf_counter() - start) * tail >= SHRINK_SECONDS
                if shrink:
                    final = _shrunk(final, np.argsort(~busy, kind="stable")[:half])
                    slots = half
        final = jax.block_until_ready(final)
    finally:
        if _PROGRESS[0] is not None:
            _PROGRESS[0].update(n - _PROGRESS[0].n)
            _PROGRESS[0].close()
        _PROGRESS[0] = None
    candidates = [np.asarray(init), np.asarray(final.out_lam)]
    if settings.polish_steps:
        polish = functools.partial(
            _polish_batch, model, family, site, int(settings.polish_samples),
            int(settings.polish_steps), bool(settings.stl),
            learning_rate=jnp.float32(settings.polish_learning_rate),
        )  # fmt: skip
        polish_key = jax.random.fold_in(fit_key, jnp.uint32(2**32 - 2))  # no datapoint's index
        bar = f"{progress} (polishing)" if progress else False
        candidates.append(
            map_datapoints(polish, params, polish_key, [x, candidates[1]],
                           batch_size=num_slots, progress=bar, indices=indices)
        )  # fmt: skip
    # The start against the end(s), on common random numbers (independent of every other
    # draw): q* is never worse than where it started, beyond this comparison's small noise.
    candidates = np.stack(candidates, axis=1)  # [N, C, P]
    scores = _duel_scores(model, family, site, settings, params, select_key, x, candidates,
                          num_slots, indices)  # fmt: skip
    choice = np.argmax(scores, axis=1)  # ties keep the earlier candidate (the start first)
    lam = candidates[np.arange(n), choice]
    newton_gap = None
    if gaussian and settings.certify_samples:
        certify = functools.partial(
            _newton_gap_batch, model, family, site, int(settings.certify_samples)
        )
        newton_gap = map_datapoints(
            certify,
            params,
            jax.random.fold_in(fit_key, jnp.uint32(2**32 - 3)),  # no datapoint's index
            [x, lam],
            batch_size=num_slots,
            indices=indices,
        )
    return _Round(
        lam=lam,
        steps=np.asarray(final.out_steps) + settings.polish_steps,
        converged=np.asarray(final.out_converged),
        hit=np.asarray(final.out_hit),
        gain=np.asarray(final.out_gain),
        moved=choice > 0,
        polished=(choice == 2) if settings.polish_steps else None,
        newton_gap=None if newton_gap is None else np.asarray(newton_gap),
        continued=np.zeros(n, bool),
        busy=int(final.busy),
        capacity=int(final.capacity),
    )


def fit_local(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    key: jax.Array,
    settings: QStarSettings | None = None,
    *,
    family: Family | None = None,
    site: Site = "z",
    z_dim: int | None = None,
    init: np.ndarray | jax.Array | None = None,
    indices: np.ndarray | jax.Array | None = None,
    starts: Sequence[np.ndarray | jax.Array] | None = None,
    progress: bool | str = False,
    **overrides: Any,
) -> LocalFit:
    """Fits q(z_i; lambda_i) to each datapoint by maximizing its local ELBO (q*).

    See the module docstring for the optimizer (Adam with a per-datapoint reduce-on-plateau
    step size, averaged iterates, the start kept as a candidate) and the continuous batching.

    Args:
        model: NumPyro model with local latents in the data plate; its parameters stay fixed.
        params: model parameters theta (e.g. a trained decoder).
        x: observations, `[N, ...]`.
        key: PRNG key; row i draws from `fold_in(key, indices[i])` only (every stage: the
            steps, the monitor, the polishing, the choice, the certificate, its continuation and
            the final bounds), so its q* depends on neither batch_size, chunking, devices nor
            the other rows given.
        family: the variational family (diagonal Gaussian by default).
        site: the model's local latents (a site name or a `LocalLatents`).
        z_dim: latent size; needed when init is None (start from the standard normal) and
            site is a name (a `LocalLatents` knows its size).
        init: starting lambda `[N, num_params]` (e.g. an encoder's output, to refine it), or
            None: N(0, I) for the Gaussian families; for a flow, the diagonal Gaussian's q*
            (Newton steps, certified) as its base with identity coupling layers, so that the
            flow starts where a diagonal Gaussian ends. (From N(0, I) on a narrow correlated
            posterior, noise 1e-2, x_dim = z_dim = 4, the flow's q* ended 161 nats below the
            best diagonal Gaussian while its rule said converged; started there, 0.80 above.)
        indices: each row's index in its dataset, `[N]` distinct integers in [0, 2**31)
            (None: its position in x), so that fitting a subset `x[idx]` with `indices=idx`
            gives exactly those rows of the whole dataset's fit.
        starts: further starting lambdas, each `[N, num_params]` of this family (e.g. several
            draws from the prior as means, or another family's q* matched to this one); each is
            fitted as init is, and per datapoint the best of all fits on common random numbers
            (`select_samples` draws) is kept, as with `QStarSettings.second_start` (which adds
            `fit_local`'s own start to them); `LocalFit.basin_gap` and `LocalFit.start` record
            which won and by how much. Every certificate is local (q* tops its basin), so more
            starts are the only check that no other basin is higher. A flow's full-rank floor
            (`QStarSettings.flow_floor`) is fitted once and checks every start's fit.
        settings: the optimizer's settings (`QStarSettings`; None: its defaults).
        progress: show a progress bar over datapoints (a string gives its description).
        **overrides: fields of `QStarSettings` replacing those of `settings` (e.g.
            `learning_rate=1e-3`).

    Returns:
        `LocalFit` with the parameters, the convergence record and (unless final_samples=0) the
        final ELBO and IWAE of every datapoint.
    """
    key = check_key("fit_local", key)
    settings = resolve_settings("fit_local", QStarSettings, settings, overrides)
    given = init is not None
    method = settings.method
    num_samples, patience, max_steps = settings.num_samples, settings.patience, settings.max_steps
    min_improvement, lr_decay = settings.min_improvement, settings.lr_decay
    num_decays, select_samples = settings.num_decays, settings.select_samples
    final_samples, batch_size = settings.final_samples, settings.batch_size
    family = resolve_family("fit_local", family)
    gaussian = isinstance(family, DiagonalGaussian | FullRankGaussian)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    # a patience left None takes its stopping signal's default
    settings = settings._replace(patience=settings.patience_for(family))
    patience = settings.patience
    method = _method_for(method, family)
    if method == "newton" and not gaussian:
        raise ValueError(
            f"method='newton' needs a Gaussian family (diagonal or full_rank); family "
            f"{family.name!r} takes method='adam'"
        )
    learning_rate, block_size = settings.step_and_block(family)
    if not isinstance(settings.stl, bool | np.bool_):
        raise ValueError(f"fit_local: stl must be True or False, got {settings.stl!r}")
    _check_settings(
        num_samples=num_samples, block_size=block_size, patience=patience, max_steps=max_steps,
        select_samples=select_samples, batch_size=batch_size, final_samples=final_samples,
        learning_rate=learning_rate, min_improvement=min_improvement, lr_decay=lr_decay,
        num_decays=num_decays,
        monitor_samples=0 if settings.monitor_samples is None else settings.monitor_samples,
        polish_steps=settings.polish_steps, polish_samples=settings.polish_samples,
        polish_learning_rate=settings.polish_learning_rate,
        certify_samples=settings.certify_samples, certify_tol=settings.certify_tol,
        certify_retries=settings.certify_retries, random_starts=settings.random_starts,
    )  # fmt: skip
    if method == "newton" and not 0.0 < learning_rate <= 1.0:
        raise ValueError(f"the Newton step's learning_rate must be in (0, 1], got {learning_rate}")
    for flag in ("flow_floor", "second_start"):
        if not isinstance(getattr(settings, flag), bool | np.bool_):
            raise ValueError(
                f"fit_local: {flag} must be True or False, got {getattr(settings, flag)!r}"
            )
    if settings.flow_start not in ("diagonal", "full_rank"):
        raise ValueError(
            f"fit_local: flow_start must be 'diagonal' or 'full_rank'; got {settings.flow_start!r}"
        )
    if settings.newton_frame not in NEWTON_FRAMES:
        raise ValueError(
            f"fit_local: newton_frame must be one of {NEWTON_FRAMES}; got {settings.newton_frame!r}"
        )
    if method == "newton" and settings.polish_steps:
        raise ValueError(
            "fit_local: the polishing stage (polish_steps > 0) runs Adam; with method='newton' "
            "set polish_steps=0, or choose method='adam'"
        )
    x = check_data(model, params, x)
    size = check_site(model, params, x, site, "fit_local", z_dim)
    release_compiled_programs()
    n = x.shape[0]
    indices = check_indices("fit_local", indices, n)
    indices = jnp.asarray(np.arange(n) if indices is None else indices, jnp.uint32)
    if init is None:
        if latent_size(site, z_dim) is None:
            raise ValueError(
                "fit_local needs z_dim when init is None (pass z_dim=, or site= a LocalLatents "
                "from find_local_latents, or init= the starting parameters)"
            )
    else:
        init = jnp.asarray(init, jnp.float32)
        if init.ndim != 2 or init.shape[0] != n:
            raise ValueError(f"init must have shape [{n}, num_params]; got {init.shape}")
        if init.shape[1] != family.num_params(size):
            raise ValueError(
                f"fit_local: init has {init.shape[1]} parameters per datapoint, but the "
                f"{family.name} family over the model's {size} latent dimensions has "
                f"{family.num_params(size)}; pass parameters of this family (e.g. the encoder's "
                "output for it) or the family they belong to (family=)"
            )
        check_finite("fit_local", "init", init)
    extra = _check_starts(starts, n, family.num_params(size))
    extra += [_random_start(family, size, key, indices, j) for j in range(settings.random_starts)]
    if extra or (settings.second_start and given):
        return _best_of_starts(
            model, params, x, key, settings, family, site, size, init, indices, extra,
            settings.second_start and given, progress,
        )  # fmt: skip
    return _fit_one(model, params, x, key, init, settings=settings, family=family, site=site,
                    size=size, indices=indices, progress=progress)  # fmt: skip


def _fit_one(model, params, x, key, init, *, settings, family, site, size, indices, progress,
             floor=None) -> LocalFit:  # fmt: skip
    """`fit_local` from one start, its arguments checked: `init` `[N, P]` float32 or None (the
    family's default start), `indices` `[N]` uint32, `size` the latent size; `floor` a flow's
    full-rank floor `[N, P]` if already fitted (several starts share one), else None (fitted
    here where `settings.flow_floor` asks for it)."""
    method = _method_for(settings.method, family)
    num_samples, select_samples = settings.num_samples, settings.select_samples
    final_samples, batch_size = settings.final_samples, settings.batch_size
    learning_rate, block_size = settings.step_and_block(family)
    monitor_samples = settings.monitor_for(family)
    gaussian = isinstance(family, DiagonalGaussian | FullRankGaussian)
    flow = isinstance(family, AffineCouplingFlow)
    n = x.shape[0]
    if init is None:
        if flow and settings.flow_start == "full_rank":
            if floor is None:
                floor = _full_rank_start(model, params, x, indices, key, family, site, size,
                                         settings, progress)  # fmt: skip
            init = floor
        elif flow:
            init = _diagonal_start(model, params, x, indices, key, family, site, size,
                                   settings, progress)  # fmt: skip
        else:
            init = jnp.broadcast_to(family.standard_params(size), (n, family.num_params(size)))
    init = jnp.asarray(init, jnp.float32)
    fit_key, select_key, eval_key = jax.random.split(key, 3)
    num_slots = min(batch_size, n)
    mesh = active_mesh()
    if mesh is not None:
        check_divisible(num_slots, mesh)
        params, x, init, indices = replicate(mesh, (params, x, init, indices))
    desc = progress if isinstance(progress, str) else "q*"
    frame = settings.newton_frame if method == "newton" else "z"
    run = functools.partial(
        _fit_round, model, family, site, method if frame == "z" else f"newton_{frame}",
        settings._replace(
            num_samples=int(num_samples), learning_rate=float(learning_rate),
            block_size=int(block_size), monitor_samples=int(monitor_samples),
        ),
        params, gaussian=gaussian, mesh=mesh,
    )  # fmt: skip
    fit = run(x, init, indices, fit_key, select_key, num_slots,
              progress=desc if progress else False)  # fmt: skip
    # Continuation: a datapoint its rule stopped but its certificate does not pass goes on from
    # where it stopped, with twice the draws per step and the patience and one more step-size
    # stage, up to certify_retries times (its draws from this round's key and its own index).
    for retry in range(1, settings.certify_retries + 1):
        if fit.newton_gap is None:
            break
        again = np.flatnonzero(fit.converged & ~(fit.newton_gap <= settings.certify_tol))
        if not again.size:
            break
        rkey = jax.random.fold_in(fit_key, jnp.uint32(2**32 - 8 - retry))  # no datapoint's
        more = run(  # index
            x[again], fit.lam[again], indices[again], *jax.random.split(rkey),
            num_slots if mesh is not None else min(num_slots, again.size),  # (divisible)
            progress=f"{desc} (continuing {again.size} uncertified)" if progress else False,
            patience=settings.patience * 2**retry, num_decays=settings.num_decays + retry,
            num_samples=int(num_samples) * 2**retry,
        )  # fmt: skip
        fit = fit.merged(again, more)
    floor_gap = None
    if flow and settings.flow_floor:
        if floor is None:
            floor = _full_rank_start(model, params, x, indices, key, family, site, size,
                                     settings, progress, role="floor")  # fmt: skip
        floor = jnp.asarray(floor, jnp.float32)
        # The floor against q* on common random numbers (independent of every other draw).
        duel = functools.partial(_duel_batch, model, family, site, int(select_samples))
        duel_key = jax.random.fold_in(fit_key, jnp.uint32(2**32 - 5))  # no datapoint's index

        def above(rows):  # L[floor] - L[q*], [len(rows)]
            pair = jnp.stack([jnp.asarray(fit.lam[rows]), floor[rows]], axis=1)
            scores = map_datapoints(duel, params, duel_key, [x[rows], pair],
                                    batch_size=num_slots, indices=indices[rows])  # fmt: skip
            return scores[:, 1] - np.where(np.isnan(scores[:, 0]), -np.inf, scores[:, 0])

        floor_gap = above(np.arange(n))
        again = np.flatnonzero(floor_gap > settings.certify_tol)
        if again.size and settings.certify_retries:
            # One round from the floor: its choice keeps the floor where the round ends lower.
            more = run(
                x[again], floor[again], indices[again],
                *jax.random.split(jax.random.fold_in(fit_key, jnp.uint32(2**32 - 7))),
                num_slots if mesh is not None else min(num_slots, again.size),  # (divisible)
                progress=f"{desc} (continuing {again.size} below the floor)" if progress else False,
            )  # fmt: skip
            fit = fit.merged(again, more, restart=True)
            floor_gap[again] = above(again)
    lam, newton_gap = fit.lam, fit.newton_gap
    elbo = iwae = None
    if final_samples:
        elbo, iwae = map_datapoints(  # evaluate_bounds without its checks, made above
            functools.partial(
                bounds_batch,
                model,
                given_params_guide(family, site=site),
                int(final_samples),
                min(SAMPLE_CHUNK, int(final_samples)),
            ),
            params,
            eval_key,
            [x, lam],
            batch_size=num_slots,
            indices=indices,
        )
    converged = fit.converged
    if newton_gap is not None:
        uncertified = converged & ~(newton_gap <= settings.certify_tol)
        if uncertified.any():
            warnings.warn(
                f"fit_local: q* stopped by its rule but not converged for "
                f"{int(uncertified.sum())} of {n} datapoints (after certify_retries="
                f"{settings.certify_retries} continuations): their certificate puts them up to "
                f"{float(newton_gap[uncertified].max()):.3g} nats below the best "
                f"{family.name} Gaussian (certify_tol={settings.certify_tol:g}). "
                + ("Use method='newton', s" if method != "newton" else "S")
                + "tart nearer (init=), or raise patience or num_decays"
                + (
                    "; for a posterior narrow along some directions and wide along others, "
                    "newton_frame='eigen'"
                    if method == "newton"
                    and isinstance(family, DiagonalGaussian)
                    and settings.newton_frame != "eigen"
                    else ""
                )
                + ".",
                stacklevel=3,
            )
        converged = converged & ~uncertified
    if floor_gap is not None:
        below = floor_gap > settings.certify_tol
        if below.any():
            warnings.warn(
                f"fit_local: the flow's q* lies below its full-rank Gaussian floor by more than "
                f"certify_tol={settings.certify_tol:g} nats for {int(below.sum())} of {n} "
                f"datapoints (up to {float(floor_gap[below].max()):.3g}): it is short of its "
                "family's best there. "
                + ("Set certify_retries >= 1 to go on from the floor, or r" if not
                   settings.certify_retries else "R")
                + "aise patience, num_decays or polish_steps.",
                stacklevel=3,
            )  # fmt: skip
        converged = converged & ~below
    return LocalFit(
        params=lam,
        elbo=elbo,
        iwae=iwae,
        steps=fit.steps,
        converged=converged,
        hit_max_steps=fit.hit,
        gain=fit.gain,
        moved=fit.moved,
        num_samples=final_samples,
        stopped_fraction=1.0 - fit.busy / max(fit.capacity, 1),
        polished=fit.polished,
        newton_gap=newton_gap,
        continued=fit.continued,
        floor_gap=floor_gap,
    )
