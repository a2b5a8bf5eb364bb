"""Global latents beside local ones: a NumPyro autoguide over the sites outside the data plate.

A model such as an item-response model has global latents (each question's discrimination and
difficulty, shared by all people) beside the local ones (each person's trait). The local guides
of amortjax cover the sites inside the data plate; `global_guide` covers the others with
NumPyro's `AutoNormal` (a mean-field Gaussian in unconstrained space), and every local guide
takes it as `global_guide=`: the combined guide draws the global latents first, then the local
ones (given them, where the local guide runs the model, as the semi-amortized refinement does).

For evaluation, `fix_globals` turns the model into one with the global latents fixed at the
global guide's median and hidden, so that the per-datapoint evaluators (ELBO, IWAE, q*, AIS)
see a model with local latents only.
"""

from __future__ import annotations

from collections.abc import Callable

from numpyro import handlers
from numpyro.infer.autoguide import AutoNormal

from amortjax.models import DATA_PLATE, with_fixed_params


def _not_global_latent(msg: dict) -> bool:
    """True for everything but the latent sample sites outside the data plate."""
    if msg["type"] == "plate":
        return msg["name"] == DATA_PLATE
    if msg["type"] != "sample" or msg["is_observed"]:
        return True
    return any(frame.name == DATA_PLATE for frame in msg["cond_indep_stack"])


def global_guide(model: Callable, *, init_scale: float = 0.1, prefix: str = "global") -> AutoNormal:
    """`AutoNormal` over the model's global latent sites (those outside the data plate).

    The autoguide sees a copy of the model in which the local latents, the observations, the
    data plate and the model's parameters are hidden, so it makes variational parameters
    (`"<site>_<prefix>_loc"` and `"<site>_<prefix>_scale"`) for the global latents only.

    Args:
        model: a NumPyro model `model(x, **kwargs)` with local sites in the data plate.
        init_scale: initial scale of each global latent's Gaussian in unconstrained space.
        prefix: prefix of the autoguide's parameter names.

    Returns:
        An `AutoNormal` guide `guide(x, **kwargs)` that returns the drawn global values `{name:
        value}`; pass it to a local guide as `global_guide=`.
    """
    # The seed inside the block serves the hidden sites when the autoguide traces the model.
    hidden = handlers.block(handlers.seed(model, rng_seed=0), hide_fn=_not_global_latent)
    return AutoNormal(hidden, init_scale=init_scale, prefix=prefix)


def draw_globals(guide: Callable | None, x, n_data: int | None) -> dict:
    """Runs a global guide (if any) inside a local guide; returns the drawn global values."""
    if guide is None:
        return {}
    return guide(x, n_data=n_data)


def fix_globals(model: Callable, guide: AutoNormal, params: dict) -> Callable:
    """The model with its global latents fixed at the global guide's median (a point estimate
    of the learned global structure) and hidden from any inference around it.

    Args:
        model: the NumPyro model.
        guide: its trained `global_guide`.
        params: the trained parameters (e.g. `Trainer.params(state)`).

    Returns:
        A model with local latents only, for the per-datapoint evaluators.
    """
    return with_fixed_params(model, guide.median(params))
