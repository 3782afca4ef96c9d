"""Order statistics of weighted rows without sorting them: radix selection.

Equal-mass bins need a few entries of the sorted rows, not the whole order.
XLA's sort is slow on a CPU (about 450 ms for an argsort of a million
floats), while a histogram of 11 bits of each key is a pass over the rows:
three such passes find any number of float32 order statistics, and the same
histograms give the sum of a value over the rows below each of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIGIT_BITS = 11
_LARGEST_HISTOGRAMS = 1 << 22  # entries


def ordered_key(x: jax.Array) -> jax.Array:
    """An unsigned integer per float that sorts as the floats do (-inf first, NaN last).

    ``-0.0`` is ``+0.0`` (equal confidences tie) and every NaN the positive one (x86
    makes negative ones, whose bits would sort first).
    """
    bits = lax.bitcast_convert_type(x, _unsigned(x.dtype))
    top = jnp.asarray(1, bits.dtype) << (bits.dtype.itemsize * 8 - 1)
    # On the bits: XLA compares a subnormal as 0, which must keep its own key.
    bits = jnp.where(jnp.isnan(x), bits & ~top, jnp.where(bits == top, 0, bits))
    return jnp.where(bits & top, ~bits, bits | top)


def float_of_key(key: jax.Array, dtype) -> jax.Array:
    """The inverse of :func:`ordered_key`."""
    top = jnp.asarray(1, key.dtype) << (key.dtype.itemsize * 8 - 1)
    return lax.bitcast_convert_type(jnp.where(key & top, key ^ top, ~key), dtype)


def _unsigned(dtype):
    return {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(dtype).itemsize]


def _digits(key):
    """``(low, width)`` of each digit of the keys, most significant first."""
    bits = key.dtype.itemsize * 8
    count = -(-bits // _DIGIT_BITS)
    lows = [max(bits - _DIGIT_BITS * (j + 1), 0) for j in range(count)]
    return [(low, bits - _DIGIT_BITS * j - low) for j, low in enumerate(lows)]


def select(key, weights, ranks, values=None, order=None):
    """The entries at ``ranks`` of the rows sorted by ``key``, row i repeated ``weights[i]`` times.

    Args:
      key: unsigned ``[N]`` (see :func:`ordered_key`), ``N >= 1``.
      weights: int32 ``[N]``, >= 0; ``n = sum(weights)``.
      ranks: int32 ``[T]``, nondecreasing, in ``[0, n)``.
      values: optional floating ``[N]``; without it the sums are not computed.
      order: optional ``[N]`` permutation that sorts ``key``. With it the
        entries are found by binary search in the sorted rows: cheaper when
        one set of rows is reweighted many times (the sort is paid once).

    Returns:
      ``(key, ties, copies, below, equal)`` per rank: the entry's key, how many
      copies of that key come before the rank and how many there are in all,
      and the sums of ``weights * values`` over the rows with a smaller key and
      over those with that key (None without ``values``).
    """
    if values is not None:
        values = jnp.where(weights > 0, weights.astype(values.dtype) * values, 0.0)
    num_targets = ranks.shape[0]
    if order is None and num_targets << _DIGIT_BITS > max(key.shape[0], _LARGEST_HISTOGRAMS):
        # A histogram per target outgrows the rows (46,340 bins: GBs): sort them instead.
        order = jnp.argsort(key)
    if order is not None:
        values = None if values is None else values[order]
        return _in_sorted(key[order], weights[order], ranks, values)
    # Rows whose digits so far equal those of target t's entry are in group t's
    # histogram, t the first target with those digits (targets are in key order).
    group = jnp.zeros(num_targets, jnp.int32)
    slot = jnp.zeros(key.shape, jnp.int32)
    remaining = ranks
    below = None
    found = jnp.zeros(num_targets, key.dtype)
    digits = _digits(key)
    for j, (low, width) in enumerate(digits):
        size = 1 << width
        index = slot * size + ((key >> low) & (size - 1)).astype(jnp.int32)
        # Rows of no group have an index past the end: dropped.
        counts = _histogram(index, weights, group, size)
        cumulative = jnp.cumsum(counts, axis=1)
        chosen = jnp.sum(cumulative <= remaining[:, None], axis=1, dtype=jnp.int32)
        chosen = jnp.minimum(chosen, size - 1)
        at = functools.partial(jnp.take_along_axis, indices=chosen[:, None], axis=1)
        remaining = remaining - (at(cumulative) - at(counts))[:, 0]
        if values is not None:
            sums = _histogram(index, values, group, size)
            lower = jnp.sum(
                jnp.where(jnp.arange(size, dtype=jnp.int32) < chosen[:, None], sums, 0), axis=1
            )
            below = lower if below is None else below + lower
        found = found | (chosen.astype(key.dtype) << low)
        if j + 1 < len(digits):
            combined = group * size + chosen  # nondecreasing over the targets
            group = jnp.searchsorted(combined, combined, side="left").astype(jnp.int32)
            position = jnp.searchsorted(combined, index, side="left").astype(jnp.int32)
            same = combined[jnp.minimum(position, num_targets - 1)] == index
            slot = jnp.where(same & (position < num_targets), position, num_targets)
    equal = None if values is None else at(sums)[:, 0]  # the last digit's
    return found, remaining, at(counts)[:, 0], below, equal


def _histogram(index, amounts, group, size):
    """``[T, size]``: the sums of ``amounts`` by index, the row of each target's group.

    An index past the end (a row of no group) is dropped.
    """
    hist = jnp.zeros(group.shape[0] * size, amounts.dtype).at[index].add(amounts, mode="drop")
    return hist.reshape(group.shape[0], size)[group]


def _in_sorted(key, weights, ranks, values):
    """:func:`select` of rows sorted by key, ``values`` (if any) already weighted."""
    counts = jnp.cumsum(weights)

    def before(prefix, i):  # the prefix sum over rows [0, i)
        return jnp.where(i > 0, prefix[jnp.maximum(i - 1, 0)], 0)

    row = jnp.minimum(jnp.searchsorted(counts, ranks, side="right"), key.shape[0] - 1)
    found = key[row]
    first, end = (jnp.searchsorted(key, found, side=side) for side in ("left", "right"))
    start = before(counts, first)
    below = equal = None
    if values is not None:
        sums = jnp.cumsum(values)
        below = before(sums, first)
        equal = before(sums, end) - below
    return found, ranks - start, before(counts, end) - start, below, equal
