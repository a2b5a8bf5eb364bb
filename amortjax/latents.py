"""The local latent sites of a NumPyro model, found by tracing it, as one unconstrained vector.

Every variational family in amortjax is a density over one flat real vector per datapoint,
u_i `[D]`. A model's local latents are any number of sample sites inside the data plate, each
with its own shape and support (a real vector, a positive rate, a probability, a simplex...).
`LocalLatents` is the map between the two:

    u_i = (u_i^(1), ..., u_i^(S))        (site s takes size(s) entries, in trace order)
    z_i^(s) = T_s(u_i^(s)),              T_s = biject_to(support of site s)

so that for a family q(u; lambda) the implied density of the constrained latents is

    log q(z_i) = log q(u_i) - sum_s log |det dT_s/du (u_i^(s))|,

and the density of u_i under the model is log p(x_i, T(u_i)) + log |det dT/du (u_i)|. The
guides sample u under an auxiliary site and hand each model site its value through a `Delta`
carrying the log-Jacobian (the way NumPyro's own autoguides do it), and the evaluators that work
in u-space directly (AIS, the local optimizer through the guides) use `log_joint_unconstrained`.

A site name (a `str`) stays accepted wherever a `LocalLatents` is: it means one real-valued
vector site per datapoint, `[batch, D]`, with the identity map; that is a VAE's "z".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from amortjax.models import DATA_PLATE
from amortjax.traces import NESTED_PLATE_FIX, explained_model_errors, log_joint

AUX_SITE = "_local_latent"
"""Name of the guides' auxiliary site holding the flat unconstrained vector u `[batch, D]`."""


@dataclasses.dataclass(frozen=True)
class LatentSite:
    """One local latent site: its name, the shape of one datapoint's value, and its support.

    Attributes:
        name: the model's sample site.
        shape: the value's shape for one datapoint (the data plate's axis removed), e.g. `(Q,)`.
        support: the site's support (a NumPyro constraint); compared by its repr, so that
            equal layouts hash alike and compiled functions that take one as a static argument
            compile once.
        unconstrained_shape: the shape of u^(s) for one datapoint (differs from `shape` for
            supports such as the simplex, whose bijection drops a dimension).
        support_key: `repr(support)`, set from it (what equality and hashing compare).
    """

    name: str
    shape: tuple[int, ...]
    support: constraints.Constraint = dataclasses.field(compare=False, hash=False)
    unconstrained_shape: tuple[int, ...]
    support_key: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "support_key", repr(self.support))

    @property
    def size(self) -> int:
        """Number of entries of u this site takes."""
        return math.prod(self.unconstrained_shape)

    @property
    def transform(self) -> dist.transforms.Transform:
        """T: unconstrained reals -> the support."""
        return biject_to(self.support)

    @property
    def is_real(self) -> bool:
        """The support is all of R^shape (the bijection is the identity)."""
        transform = self.transform
        while isinstance(transform, dist.transforms.IndependentTransform):
            transform = transform.base_transform
        return isinstance(transform, dist.transforms.IdentityTransform)


@dataclasses.dataclass(frozen=True)
class LocalLatents:
    """The layout of a model's local latents in one flat unconstrained vector per datapoint.

    Attributes:
        sites: the local latent sites, in the order the model samples them.
        global_sites: names of the model's latent sites outside the data plate (global latents,
            which a global guide covers; see `amortjax.guides.global_guide`).

    Use `find_local_latents` to build one from a model.
    """

    sites: tuple[LatentSite, ...]
    global_sites: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """D, the length of u per datapoint: the family's `z_dim`."""
        return sum(s.size for s in self.sites)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def is_single_vector(self) -> bool:
        """One real vector site `[batch, D]`: u is z itself and no auxiliary site is needed."""
        return len(self.sites) == 1 and self.sites[0].is_real and len(self.sites[0].shape) == 1

    def parts(self, u: jax.Array):
        """Yields `(site, value, log_det)` per site for u `[..., D]`: value `[..., *shape]` =
        T_s(u^(s)) and log_det `[...]` = log |det dT_s/du (u^(s))|."""
        offset = 0
        for s in self.sites:
            part = u[..., offset : offset + s.size].reshape(*u.shape[:-1], *s.unconstrained_shape)
            offset += s.size
            value = s.transform(part)
            ldj = s.transform.log_abs_det_jacobian(part, value)
            # sum over the entries of one datapoint (whatever event dims remain)
            yield s, value, jnp.reshape(ldj, (*u.shape[:-1], -1)).sum(-1)

    def unflatten(self, u: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        """Maps u `[..., D]` to the constrained site values and the log-Jacobian.

        Returns:
            `(values, log_det)`: `{name: [..., *shape]}` and `[...]` = log |det dT/du (u)|.
        """
        values, log_det = {}, jnp.zeros(u.shape[:-1], u.dtype)
        for s, value, ldj in self.parts(u):
            values[s.name], log_det = value, log_det + ldj
        return values, log_det

    def flatten(self, values: dict[str, jax.Array]) -> jax.Array:
        """Inverse of `unflatten`: constrained values `{name: [..., *shape]}` to u `[..., D]`."""
        parts = []
        for s in self.sites:
            part = s.transform.inv(jnp.asarray(values[s.name]))
            batch = part.shape[: part.ndim - len(s.unconstrained_shape)]
            parts.append(part.reshape(*batch, s.size))
        return jnp.concatenate(parts, axis=-1)


Site = str | LocalLatents
"""What every guide and evaluator accepts for "the model's local latents"."""


def latent_size(site: Site, default: int | None = None) -> int | None:
    """D for a layout; `default` (e.g. a given z_dim) for a plain site name."""
    return site.size if isinstance(site, LocalLatents) else default


def find_local_latents(model: Callable, x: jax.Array, params: dict | None = None, **kwargs):
    """Traces the model on one datapoint and lays out its local latent sites.

    Nothing is computed: the model runs under `jax.eval_shape`.

    Args:
        model: a NumPyro model `model(x, **kwargs)` with its local sites in the plate
            `DATA_PLATE` (the plate's axis must be the leftmost axis of each site's batch shape).
        x: a batch of observations `[batch, ...]` (only its first row is used).
        params: the model's parameters (optional: the model's own initial values otherwise).
        **kwargs: passed to the model.

    Returns:
        A `LocalLatents`.

    Raises:
        ValueError: if the model has no local latents, a local latent is discrete (enumerate
            it out of the model, or marginalize it by hand), or the data plate is not the
            leftmost batch axis of a site.
    """
    found: dict = {}

    def inspect(params, x):
        fn = handlers.substitute(model, data=params) if params else model
        # blocked: inside a guide, this run must not reach the inference handlers around it
        with handlers.block():
            trace = handlers.trace(handlers.seed(fn, jax.random.key(0))).get_trace(x, **kwargs)
        found["sites"] = [
            (name, site)
            for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        ]
        found["meta"] = [
            (
                name,
                site["fn"].support,
                tuple(site["value"].shape),
                site["fn"].event_dim,
                [f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE],
                site["fn"].is_discrete,
                [f.name for f in site["cond_indep_stack"] if f.name != DATA_PLATE],
            )
            for name, site in found["sites"]
        ]
        return 0

    x = x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)
    with explained_model_errors("find_local_latents"):
        jax.eval_shape(inspect, params or {}, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
    local, global_ = [], []
    for name, support, shape, event_dim, plate_dims, discrete, others in found["meta"]:
        if not plate_dims:
            global_.append(name)
            continue
        if others:
            raise ValueError(
                f"local latent site {name!r} lies in the plates {others} as well as the data "
                f"plate. {NESTED_PLATE_FIX}"
            )
        if discrete:
            raise ValueError(
                f"local latent site {name!r} is discrete ({support!r}): the families are "
                "densities over real vectors; enumerate or marginalize it out of the model"
            )
        batch_ndim = len(shape) - event_dim
        if plate_dims[0] != -batch_ndim or shape[0] != 1:
            raise ValueError(
                f"local latent site {name!r} has shape {shape} for one datapoint with the data "
                f"plate at batch dim {plate_dims[0]}: the data plate must be the leftmost batch "
                "axis of every local site"
            )
        one = jax.ShapeDtypeStruct(shape[1:], jnp.float32)
        unconstrained = jax.eval_shape(biject_to(support).inv, one).shape
        local.append(LatentSite(name, shape[1:], support, tuple(unconstrained)))
    if not local:
        raise ValueError(
            f"the model has no latent sample site inside the plate {DATA_PLATE!r} "
            f"(its latent sites: {[n for n, *_ in found['meta']]}): put each datapoint's "
            "latents and observations inside `with amortjax.models.data_plate(x, n_data):` "
            "(the plate amortjax batches over)"
        )
    return LocalLatents(tuple(local), tuple(global_))


def check_site(
    model: Callable,
    params: dict | None,
    x: jax.Array,
    site: Site,
    where: str,
    z_dim: int | None = None,
) -> int:
    """Refuses a `site=` that does not describe the model's local latents, before an evaluator
    fits or scores anything with it.

    A site name must be the model's only local latent and real-valued (it is used as is, with
    no bijection: a positive rate given by name would be scored at negative values, as NaN);
    and the model must have no global latents left (they must be fixed before evaluating). A
    given `z_dim` must be the size of the model's local latent vector.

    Returns:
        D, the size of the model's local latent vector per datapoint.

    Raises:
        ValueError: naming the sites involved and the fix.
    """
    layout = find_local_latents(model, x, params)
    if z_dim is not None and z_dim != layout.size:
        raise ValueError(
            f"{where}: z_dim={z_dim}, but the model's local latents {list(layout.names)} have "
            f"{layout.size} dimensions per datapoint; pass z_dim={layout.size} (or leave it out "
            "where site= is a LocalLatents)"
        )
    if layout.global_sites:
        raise ValueError(
            f"{where}: the model has latent sites outside the data plate "
            f"{list(layout.global_sites)} (global latents), which an evaluator cannot "
            "integrate over; fix them first: "
            "fixed = fix_globals(model, global_guide, params) (or with_fixed_params(model, "
            "values)), then evaluate `fixed`"
        )
    if not isinstance(site, str):
        return layout.size
    names = list(layout.names)
    fix = "pass site=find_local_latents(model, x), which lays out every local site"
    if site not in names:
        raise ValueError(
            f"{where}: the model has no local latent site {site!r} (its local latents: "
            f"{names}); {fix}"
        )
    if len(names) > 1:
        raise ValueError(
            f"{where}: site={site!r} names one of the model's local latents {names}; {fix}"
        )
    if not layout.sites[0].is_real:
        raise ValueError(
            f"{where}: site {site!r} has support {layout.sites[0].support}, but a site name "
            f"stands for a real vector used as is; {fix} (it maps the site to unconstrained "
            "space)"
        )
    if not layout.is_single_vector:
        raise ValueError(
            f"{where}: site {site!r} has shape {layout.sites[0].shape} per datapoint, but a "
            f"site name stands for one vector [batch, z_dim]; {fix} (it flattens the site)"
        )
    return layout.size


def resolve_site(site: Site | None, model: Callable | None, x: jax.Array) -> Site:
    """The local latents a guide covers: `site` when given; else those `find_local_latents`
    finds in `model` (traced once per model and datapoint shape); else the VAE's "z"."""
    if site is not None:
        return site
    if model is None:
        return "z"
    return _layout_for(model, tuple(x.shape[1:]), jnp.dtype(x.dtype).name)


@functools.lru_cache(maxsize=64)
def _layout_for(model: Callable, shape: tuple[int, ...], dtype: str) -> LocalLatents:
    return find_local_latents(model, jax.ShapeDtypeStruct((1, *shape), jnp.dtype(dtype)))


def sample_local(site: Site, q: dist.Distribution) -> None:
    """Inside a guide's data plate: draws the local latents from q over u `[batch, D]`.

    For a site name, or a layout that is one real vector site, the site is sampled from q
    directly. Otherwise u is sampled under the auxiliary site `AUX_SITE` and each model site
    gets T_s(u^(s)) through a `Delta` whose log-density is -log |det dT_s/du|, so the guide's
    trace scores log q(z_i) = log q(u_i) - log |det dT/du|.
    """
    if isinstance(site, str):
        numpyro.sample(site, q)
        return
    if site.is_single_vector:
        numpyro.sample(site.sites[0].name, q)
        return
    u = numpyro.sample(AUX_SITE, q, infer={"is_auxiliary": True})
    for s, value, log_det in site.parts(u):
        numpyro.sample(s.name, dist.Delta(value, log_density=-log_det, event_dim=len(s.shape)))


def site_values(site: Site, u: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """`(values, log_det)` of u `[..., D]` for a layout or a site name (identity map)."""
    if isinstance(site, str):
        return {site: u}, jnp.zeros(u.shape[:-1], u.dtype)
    return site.unflatten(u)


def log_joint_unconstrained(
    model: Callable, params: dict, x: jax.Array, u: jax.Array, site: Site, **model_kwargs
) -> jax.Array:
    """log p_theta(x_i, T(u_i)) + log |det dT/du (u_i)| for each datapoint: the model's density
    of the unconstrained vector u `[batch, D]`. Returns `[batch]`."""
    values, log_det = site_values(site, u)
    return log_joint(model, params, x, values, **model_kwargs) + log_det
