"""How many memory mappings a process keeps for JAX's compiled programs, and what gives them back
(`amortjax.engine.release_compiled_programs`): `fit_local` on a new model each round (a VAE
decoder with one more hidden unit each time, 20 random binary rows of 30 pixels, 200 steps), the
process's mappings counted after each fit (with the fitted model deleted and garbage collected),
then after amortjax's own compiled programs are dropped (`engine.library_programs`, what a
release tries first, with a jitted function of the caller's kept alive beside them), then after
`jax.clear_caches()`. Linux caps a process's mappings (`vm.max_map_count`); at the
cap the next compilation aborts the process. Writes `bench/results/memory_maps.json` and prints
one line per round.

    python tools/memory_maps.py [ROUNDS]
"""

import gc
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp

from amortjax.engine import library_programs, memory_maps
from amortjax.inference.local import fit_local
from amortjax.models import vae_model
from amortjax.nets import MLP
from bench.common import RESULTS_DIR, machine_info
from bench.local_optimizer import decoder_params


def main(rounds: int = 4) -> dict:
    if memory_maps() is None:
        sys.exit("needs Linux's /proc (/proc/self/maps, /proc/sys/vm/max_map_count)")
    x = (np.random.default_rng(0).random((20, 30)) < 0.5).astype(np.float32)
    start, cap = memory_maps()
    out = {"machine": machine_info(), "max_map_count": cap, "start": start, "after_fit": []}
    print(f"start: {start} mappings (cap {cap})", flush=True)
    mine = jax.jit(lambda v: jnp.cos(v) * 3.0)  # the caller's own program
    mine(jnp.ones(2)).block_until_ready()
    for i in range(rounds):
        hidden = 8 + i  # a new model, new shapes: new programs
        model = vae_model(MLP((hidden,), 30, "elu"), z_dim=4)
        params = decoder_params(model, x=x[:2], x_dim=30, hidden=hidden, z_dim=4, seed=0)
        fit_local(model, params, x, jax.random.key(i), z_dim=4, max_steps=200, final_samples=10)
        del model, params
        gc.collect()
        out["after_fit"].append(memory_maps()[0])
        print(f"after fit {i + 1} (hidden {hidden}): {out['after_fit'][-1]} mappings", flush=True)
    jitted, factories = library_programs()
    for f in jitted:
        f.clear_cache()
    for factory in factories:
        factory.cache_clear()
    gc.collect()
    out["after_library_programs"] = memory_maps()[0]
    out["callers_program_kept"] = mine._cache_size() == 1
    print(f"after dropping amortjax's programs: {out['after_library_programs']} "
          f"(the caller's kept: {out['callers_program_kept']})", flush=True)  # fmt: skip
    jax.clear_caches()
    gc.collect()
    out["after_clear_caches"] = memory_maps()[0]
    grown = out["after_fit"][-1] - start
    out["library_share"] = (out["after_fit"][-1] - out["after_library_programs"]) / grown
    steps = np.diff([start, *out["after_fit"]])
    out["per_fit_mean"] = float(np.mean(steps))
    print(f"after jax.clear_caches(): {out['after_clear_caches']}; {steps.mean():.0f} per fit")
    path = RESULTS_DIR / "memory_maps.json"
    path.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
