"""NumPyro guides, one module per inference regime.

- `amortized`: q(z_i | x_i) = q(z_i; f_phi(x_i)), an encoder's output (a VAE).
- `local`: free variational parameters per datapoint (per-example inference, the q* of Cremer et
  al. 2018), given (`given_params_guide`) or learned by SVI (`local_guide`).
- `semi_amortized`: the encoder's output refined by K steps (SA-VAE and its variants).
- `global_latents`: an autoguide for latents outside the data plate, run beside a local guide.

Every guide covers the model's latent sites inside the plate `amortjax.models.DATA_PLATE` and
works with plain `numpyro.infer.SVI` and any NumPyro ELBO.
"""

from amortjax.guides.amortized import amortized_guide, encode
from amortjax.guides.global_latents import fix_globals, global_guide
from amortjax.guides.local import LOCAL_PARAMS, given_params_guide, local_guide

__all__ = [
    "LOCAL_PARAMS",
    "amortized_guide",
    "encode",
    "fix_globals",
    "given_params_guide",
    "global_guide",
    "local_guide",
]
