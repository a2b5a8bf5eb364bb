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
