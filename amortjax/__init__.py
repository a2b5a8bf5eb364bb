"""amortjax: amortized, per-example and semi-amortized variational inference in JAX."""

__version__ = "0.1.0"
