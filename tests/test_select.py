"""The radix selection behind the equal-mass bins, against a sort in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsoftmax import _select


def expected(x, weights, ranks, values):
    """Per rank: the value there, copies before it and in all, sums below and among them."""
    order = np.argsort(x, kind="stable")
    xs = np.repeat(x[order], weights[order])
    vs = np.repeat(values[order], weights[order])
    rows = []
    for r in ranks:
        same = xs == xs[r]
        first = np.argmax(same)
        rows.append((xs[r], r - first, same.sum(), vs[:first].sum(), vs[same].sum()))
    return [np.array(column) for column in zip(*rows, strict=True)]


def draw(kind, dtype, seed):
    rng = np.random.default_rng(seed)
    n = 1500
    x = {
        "uniform": lambda: rng.random(n),
        "ties": lambda: np.round(rng.random(n) * 20) / 20,
        "signs and infinities": lambda: np.where(
            rng.random(n) < 0.05, -np.inf, rng.standard_normal(n)
        ),
        "few values": lambda: rng.choice([0.0, -0.5, 1e-30, 2.0, 0.5, np.inf], n),
    }[kind]().astype(dtype)
    weights = rng.integers(0, 3, n)
    weights[0] = 1
    ranks = np.sort(rng.integers(0, weights.sum(), 16))
    return x, weights, ranks, rng.standard_normal(n)


@pytest.mark.parametrize("kind", ["uniform", "ties", "signs and infinities", "few values"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("presorted", [False, True])
def test_select_equals_a_sort(kind, dtype, presorted, x64):
    for seed in range(4):
        x, weights, ranks, values = draw(kind, dtype, seed)
        key = _select.ordered_key(jnp.asarray(x))
        order = jnp.argsort(key) if presorted else None
        args = key, jnp.asarray(weights, jnp.int32), jnp.asarray(ranks, jnp.int32)
        found, *rest = jax.jit(_select.select)(*args, jnp.asarray(values), order)
        # Without values: the same entries, no sums.
        bare = jax.jit(_select.select)(*args, None, order)
        assert tuple(bare[3:]) == (None, None)
        for ours, full in zip(bare[:3], (found, *rest[:2]), strict=True):
            np.testing.assert_array_equal(ours, full)
        want = expected(x, weights, ranks, values)
        np.testing.assert_array_equal(_select.float_of_key(found, dtype), want[0])
        np.testing.assert_array_equal(rest[0], want[1])
        np.testing.assert_array_equal(rest[1], want[2])
        np.testing.assert_allclose(rest[2], want[3], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(rest[3], want[4], rtol=1e-9, atol=1e-9)


def test_ordered_key_sorts_as_the_floats_and_inverts():
    x = np.array([np.nan, np.inf, 1.5, 1e-38, 0.0, -1e-38, -2.0, -np.inf], np.float32)
    key = np.asarray(_select.ordered_key(jnp.asarray(x)))
    assert np.all(np.diff(key.astype(np.int64)) < 0)
    np.testing.assert_array_equal(_select.float_of_key(jnp.asarray(key), np.float32), x)
    # -0.0 is +0.0 (they tie), and a negative NaN (x86's inf - inf) sorts last too.
    signed = np.array([-0.0, -np.nan], np.float32)
    np.testing.assert_array_equal(_select.ordered_key(jnp.asarray(signed)), key[[4, 0]])
