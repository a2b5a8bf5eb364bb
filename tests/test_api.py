"""The public API: at most 40 names, each documented and named in the package docstring, and
what a user needs to bring their own model (the data plate, the layout, the per-example
optimizer, the regimes) among them."""

import inspect

import amortjax as aj


def test_the_public_api_is_small_and_documented():
    assert len(aj.__all__) <= 40, len(aj.__all__)
    assert sorted(aj.__all__) == sorted(set(aj.__all__))
    for name in aj.__all__:
        obj = getattr(aj, name)
        assert inspect.getdoc(obj), f"amortjax.{name} has no docstring"
        assert f"`{name}" in aj.__doc__, f"the package docstring does not name {name}"


def test_a_users_own_model_needs_nothing_outside_the_api():
    for name in ("data_plate", "find_local_latents", "make_local_optimizer", "Amortized",
                 "PerExample", "SemiAmortized", "QStarSettings", "RefineSettings"):  # fmt: skip
        assert name in aj.__all__, name


def test_importing_amortjax_gives_xla_a_cpu_pool_of_at_least_four_threads():
    """Below 4 cores, `import amortjax` sets NPROC=4 (the size of XLA's CPU thread pool) unless
    it is set: with a pool of 2 threads, two batched LAPACK kernels running at once each block
    a pool thread waiting for their own tasks, and the process hangs (see amortjax/__init__)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    code = "import os, amortjax; print(os.environ.get('NPROC'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    expected = "4" if (os.cpu_count() or 1) < 4 else "None"
    assert out.stdout.strip() == expected, out.stderr
    env["NPROC"] = "7"  # a value the user set is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "7", out.stderr
