"""The per-datapoint engine: how N datapoints are cut into compiled calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.engine import even_chunk, map_datapoints


@pytest.mark.parametrize(
    ("n", "most", "multiple", "size"),
    [
        (10_000, 100, 1, 100),  # divides: unchanged
        (500, 400, 1, 250),  # two calls of 250, not 400 + a padded 100
        (40, 16, 1, 14),  # three calls: 42 rows of work, not 48
        (50, 400, 1, 50),  # one call, no padding
        (10, 8, 4, 8),  # two calls of 5, rounded up to the 4 devices
        (9, 8, 2, 6),
    ],
)
def test_even_chunk(n, most, multiple, size):
    assert even_chunk(n, most, multiple) == size
    calls = -(-n // size)
    assert size <= most and size % multiple == 0 and calls == -(-n // most)


def test_map_datapoints_calls_equal_chunks_and_keeps_every_row():
    sizes = []

    def batch_fn(params, keys, xb):
        sizes.append(xb.shape[0])
        return xb * params + jax.vmap(lambda k: jax.random.uniform(k))(keys)

    x = jnp.arange(500.0)
    out = map_datapoints(batch_fn, 2.0, jax.random.key(0), [x], batch_size=400)
    assert sizes == [250, 250]
    # each datapoint's key is its own, whatever the chunk
    again = map_datapoints(batch_fn, 2.0, jax.random.key(0), [x], batch_size=7)
    np.testing.assert_allclose(out, again, rtol=1e-6)
    assert out.shape == (500,)
