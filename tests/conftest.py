"""Shared fixtures: small linear-Gaussian models with exact answers.

Compiled functions go to a persistent cache in .pytest_cache shared by the test processes and
the experiments' subprocesses (set through the environment, which they inherit): a resumed run
or a second test of the same model loads its executables instead of compiling them again, about
12% off an end-to-end experiment test. Results are the same executables' results.
"""

import gc
import os
import warnings
from pathlib import Path

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # after the cache settings, which jax reads when imported
import pytest

from amortjax.models.linear_gaussian import make_linear_gaussian

jax.config.update("jax_enable_x64", False)
# Synchronous dispatch on the CPU (tests wait for every result anyway). It was the first guess
# at a hang with every thread idle in BlockUntilReady inside `fit_local`; the hang recurred with
# it, and gdb showed the cause: batched LAPACK kernels blocking every thread of XLA's CPU pool,
# which `import amortjax` now avoids (NPROC, see amortjax/__init__.py).
jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.fixture(autouse=True, scope="module")
def _release_executables(request):
    """Free every compiled executable after each test module.

    Each live XLA CPU executable holds several memory mappings of JIT code, and jax's caches
    keep them alive for the life of the process. One test process of `make test` accumulated
    65,219 mappings by its 160th test (measured in /proc/PID/maps), against Linux's default
    limit `vm.max_map_count` = 65,530; the next executable loaded or compiled then died with a
    segmentation fault inside XLA's CPU compiler. Clearing jax's caches between modules frees
    the executables no test still holds; the persistent compilation cache above reloads those a
    later module needs. A module that alone fills half the limit is warned about.
    """
    yield
    maps, limit = Path("/proc/self/maps"), Path("/proc/sys/vm/max_map_count")
    if maps.exists() and limit.exists():
        held, allowed = len(maps.read_text().splitlines()), int(limit.read_text())
        if held > allowed // 2:
            warnings.warn(
                f"{request.module.__name__} left this process holding {held:,} memory mappings of "
                f"the {allowed:,} Linux allows (vm.max_map_count); past it XLA segfaults. Split "
                "the module, or clear jax's caches inside it (jax.clear_caches()).",
                stacklevel=1,
            )
    jax.clear_caches()
    gc.collect()


# The longest tests (end-to-end experiments and notebooks, 40-130 s each on a cold CI run) go
# first, so that no worker starts one while the other is about to finish.
LONG_FIRST = ("test_runner.py", "test_notebooks.py", "test_readme_example.py",
              "test_worked_models.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: each file keeps its order (the same on every worker)


@pytest.fixture(scope="session")
def lg_correlated():
    """A factor-analysis model whose posterior is correlated (the diagonal family misses it)."""
    return make_linear_gaussian(jax.random.key(0), x_dim=8, z_dim=3, noise_scale=0.7)


@pytest.fixture(scope="session")
def lg_diagonal():
    """A PPCA model with orthogonal loadings: its exact posterior is a diagonal Gaussian."""
    return make_linear_gaussian(jax.random.key(1), x_dim=8, z_dim=3, diagonal_posterior=True)
