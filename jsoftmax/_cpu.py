"""Schedules for XLA's CPU backend, each chosen with ``jax.lax.platform_dependent``
where it measured faster there, or where jax 0.10's CPU backend (its YNNPACK
fusions) would drop a NaN that GPUs keep; GPUs and TPUs run the plain core. The
isotonic fit's (sorts and sequential chains) runs in NumPy and SciPy on the host.

Each computes what its core counterpart computes on a GPU, to rounding; the
tests compare the two on CPU, and check NaN at sizes that take YNNPACK's fusions. The
core is :mod:`jsoftmax._softmax`, imported as a module: it imports this one.
The losses reach these through the module too, and the focal loss passes its
own terms (:func:`focal_terms`), so that no import order matters.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax import _softmax


def cap_and_slope(z: jax.Array, softcap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """:func:`jsoftmax._softmax._cap_and_slope`; on CPU from the forward pass's ``tanh``.

    Sharing ``tanh`` with the forward pass, the tangent reads the capped logits
    that XLA's CPU backend writes out once (float32 ``[N, K]``): the
    soft-capped loss at float32 [4096, 32000] takes 0.8x optax's time on 2
    cores, against 1.17x with the core's ``tanh`` anew in the tangent (GPUs
    measured; TPUs, unmeasured, run the core too).
    """
    if softcap is None:
        return z, None
    return lax.platform_dependent(
        z,
        cpu=functools.partial(_shared_cap_and_slope, softcap=softcap),
        default=functools.partial(_softmax._cap_and_slope, softcap=softcap),
    )


def cap_for_row_sums(z: jax.Array, softcap: float | None) -> jax.Array:
    """The capped logits as the row sums after the max read them (label smoothing's):
    on CPU :func:`jsoftmax._softmax._cap`'s ``tanh``; elsewhere spelled with a sigmoid.

    XLA's CPU backend computes the one ``tanh`` once for the normaliser and
    these sums. XLA's GPU backend wrote a ``tanh`` that two reductions read
    out instead (a float32 ``[N, K]`` buffer: 4039 MiB for soft-capping with
    label smoothing at bfloat16 [8192, 128256]); spelled differently, each
    reduction evaluates its own (31 MiB). On GPUs each pass spells ``tanh``
    its own way: the normaliser ``tanh``, these sums a sigmoid, the tangent
    ``expm1`` (:func:`jsoftmax._softmax._cap_and_slope`).
    """
    if softcap is None:
        return z
    return lax.platform_dependent(
        z,
        cpu=functools.partial(_softmax._cap, softcap=softcap),
        default=functools.partial(_softmax._cap_by_sigmoid, softcap=softcap),
    )


def _shared_cap_and_slope(z, softcap):
    capped = _softmax._cap(z, softcap)
    return capped, _softmax._capped_slope(capped, softcap)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def clamped(z: jax.Array, m: jax.Array, bound: float | None = None) -> jax.Array:
    """``z`` clamped at its row's shift ``m``, keeping a NaN ``z``: on CPU
    ``minimum(m, z)``; elsewhere ``minimum(z, m)``, or ``minimum(z, bound)``
    where given (softmax's ``finfo.max``: the same value, ``m`` being the row
    max clamped there).

    jax 0.10's CPU backend fuses ``minimum`` and ``maximum`` with YNNPACK,
    whose minimum returns its second operand where one is NaN: with ``z``
    first, a NaN logit's row got a finite loss, and softmax put its mass on the
    NaN (from a few dozen rows up). XLA's GPU backend keeps NaN in either
    order, and fuses what it fused before: with ``z`` first, label smoothing's
    row sums go into the normaliser's pass (7.95 against 9.91 GiB moved at
    bfloat16 [8192, 128256]), and softmax forward+backward clamped at
    ``finfo.max`` holds 0.1 MiB of temp, against 4008 MiB at ``m`` (an H200,
    compiled without one).
    """
    return lax.platform_dependent(
        z,
        m,
        cpu=lambda z, m: jnp.minimum(m, z),
        default=lambda z, m: jnp.minimum(z, m if bound is None else bound),
    )


@clamped.defjvp
def _clamped_jvp(bound, primals, tangents):
    # The clamp moves with ``z``: ``z - m`` then has ``m``'s tangent in every entry of a
    # row, so that the softmax family's second derivatives are exact at ``+inf`` entries
    # and at ties with the max (a minimum's tangent is ``m``'s there, or half of each).
    out = clamped(*primals, bound)
    return out, jnp.broadcast_to(tangents[0], out.shape)


def at_least_one(s: jax.Array, m: jax.Array) -> jax.Array:
    """``maximum(s, 1)`` that keeps a NaN ``s``: on CPU ``maximum(m - m + 1, s)``.

    As in :func:`clamped`, YNNPACK's maximum returns its second operand where
    one is NaN, and XLA moves a constant operand second: the 1 is spelled from
    the row's finite shift ``m``, so that it stays first. A select keeps the
    NaN too, but YNNPACK fuses none: softmax took 2-5x jax.nn's time with one.
    """
    return lax.platform_dependent(
        s, m, cpu=lambda s, m: jnp.maximum(m - m + 1, s), default=lambda s, m: jnp.maximum(s, 1.0)
    )


def has_class(top: jax.Array, s: jax.Array) -> jax.Array:
    """Whether a row keeps a class, from :func:`jsoftmax._softmax._normalizer`'s max
    and ``s``: a max above ``-inf``; on CPU also a NaN ``s``.

    A NaN entry keeps a class (its row is NaN). XLA's GPU backend keeps the NaN
    in the max; jax 0.10's CPU backend may drop it there (YNNPACK), and a row of
    ``-inf`` and NaN got loss 0. Its NaN reaches ``s`` (:func:`clamped`). On
    GPUs the test of ``s`` changed what XLA fuses (class weights 7.89 -> 9.85
    GiB moved at bfloat16 [8192, 128256], compiled without one), so they test
    the max alone.
    """
    return lax.platform_dependent(
        top,
        s,
        cpu=lambda top, s: (top != -jnp.inf) | jnp.isnan(s),
        default=lambda top, s: top != -jnp.inf,
    )


def row_sums(shifted: list, unshifted: list) -> tuple[tuple, tuple]:
    """Sums over the last axis of ``[..., K]`` terms that need the row max (one pass
    after it) and of terms that do not.

    On CPU all of them in one variadic reduction, in blocks (:func:`_blocked_sums`):
    dense labels at float32 [4096, 32000] take 1.02-1.06x optax's time with
    12 MiB of temp, against 1.17x and 500 MiB with the sums apart. Elsewhere
    the terms without the max are sums of their own, and XLA's GPU backend
    holds fewer partial sums at once: 63 against 94 MiB of temp for dense
    labels with smoothing at bfloat16 [8192, 128256], 31 against 47 with
    either alone.
    """
    n = len(shifted)

    def together(shifted, unshifted):
        sums = _blocked_sums([*shifted, *unshifted])
        return tuple(sums[:n]), tuple(sums[n:])

    def apart(shifted, unshifted):
        return tuple(_softmax._row_sums(shifted)), tuple(jnp.sum(t, -1) for t in unshifted)

    return lax.platform_dependent(shifted, unshifted, cpu=together, default=apart)


def _blocked_sums(terms, block=128):
    """:func:`jsoftmax._softmax._row_sums` in blocks: the sums of each ``block`` terms,
    then of those sums in blocks, until one is left.

    XLA's CPU backend adds a reduction of several operands up one term at a
    time: a uniform target's loss came out 2e-4 off at K=32000, 1e-3 at
    128256. Summed in blocks of 128 it is within 2e-6 of float64 at every
    size (the error grows with the terms added one at a time: 128 per level),
    and no slower than in one run (dense labels with smoothing at float32
    [4096, 32000]: 0.78-0.80x optax's time, against 0.98x); the first level's
    sums take ``1 / 128`` of the terms' memory. Kahan's compensated sums were
    as accurate at 1.1-1.4x optax's time.
    """
    k = terms[0].shape[-1]
    while k > block:
        blocks = -(-k // block)
        pad = [(0, 0)] * (terms[0].ndim - 1) + [(0, blocks * block - k)]
        terms = _softmax._row_sums(
            [jnp.pad(t, pad).reshape(*t.shape[:-1], blocks, block) for t in terms]
        )
        k = blocks
    return _softmax._row_sums(list(terms))


def row_sum(terms: jax.Array) -> jax.Array:
    """``jnp.sum(terms, -1)``, for more work on the sums; on CPU, over more than 16
    terms a row, through a select that ends the reduction's fusion there.

    jax 0.10's CPU backend runs a YNNPACK row reduction whose result feeds
    elementwise work in the same fusion several times slower: ``1 / s`` after
    ``s = sum(exp((x - max) / t))`` over [50,000, 1,000] took 197 ms on 2 cores,
    against 21 ms through the select; a Brier score from the sums of
    ``e = exp((x - max) / t)`` and ``e * e`` 274 against 67 ms there, 97 against
    35 at [200,000, 100], 38 against 18 at [320,000, 31]. Over 16 or fewer
    terms XLA sums without YNNPACK, faster without the select (18 against 33 ms
    at [1,000,000, 10]). YNNPACK fuses no select, and a select of the sum
    itself changes nothing (``-0.0`` reads ``0.0``). GPUs and TPUs fuse the
    work after a reduction as they see fit.
    """
    s = jnp.sum(terms, -1)
    if terms.shape[-1] <= 16:
        return s
    return lax.platform_dependent(s, cpu=lambda s: jnp.where(s == 0, 0.0, s), default=lambda s: s)


def row_sums_apart(terms: Callable[..., tuple], *operands: jax.Array) -> tuple:
    """Sums over the last axis of the ``[..., K]`` terms that ``terms(*operands)``
    builds, as one reduction (:func:`jsoftmax._softmax._row_sums`); on CPU over more
    than 16 terms a row, each its own :func:`row_sum`, built anew from the operands.

    On 1 core, the mean and second moment of ``d`` under ``exp(beta d)`` (three
    sums): 9 ms as one reduction against 26-110 ms apart at [1,000,000, 10];
    204-291 against 270-302 ms at [50,000, 1,000] and 84-111 against 97-116 at
    [200,000, 100], where XLA's CPU backend runs a reduction of several operands
    one term at a time and the fit took 1.9-2.1 against 1.4-1.6 s with it. Terms
    sharing ``exp(beta d)`` had it written out once (200 MB at [50,000, 1,000]) and
    read by each sum: 160 ms on 1 core, against 111 with each sum behind a barrier
    on the operands and the sum before, which keeps its exponentials in its own
    fusion.
    """
    shapes = jax.eval_shape(terms, *operands)
    if shapes[0].shape[-1] <= 16:
        return _softmax._row_sums(terms(*operands))

    def apart(*operands):
        sums = []
        for j in range(len(shapes)):
            *built, _ = lax.optimization_barrier((*operands, sums[-1] if sums else 0))
            sums.append(row_sum(terms(*built)[j]))
        return tuple(sums)

    return lax.platform_dependent(
        *operands, cpu=apart, default=lambda *o: _softmax._row_sums(terms(*o))
    )


def family_max(z: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """softmax and log_softmax's shift (:func:`jsoftmax._softmax._clamped_max`); on CPU
    the row max clamped after it, as ``-maximum(-maximum(max, -big), -big)``.

    The core clamps ``+inf`` logits to ``finfo.max`` before the max, one more
    elementwise op in a pass that is compute-bound on CPU at few classes; here
    the max is clamped instead (the same value). XLA turns a ``minimum`` and a
    ``maximum`` by constants into one ``clamp``, which YNNPACK does not fuse
    (softmax ran as three loops); negated, the two stay in its loop.
    """
    return lax.platform_dependent(
        z,
        cpu=functools.partial(_cpu_max, axes=axes),
        default=lambda z: _softmax._clamped_max(z, axes),
    )


def _cpu_max(z, axes):
    big = jnp.finfo(z.dtype).max
    return -jnp.maximum(-jnp.maximum(jnp.max(z, axes, keepdims=True), -big), -big)


def softmax_probs(d: jax.Array, s: jax.Array) -> jax.Array:
    """softmax from the shifted logits ``d`` and ``s = sum(exp(d))``, for its tangent:
    ``exp(d - log s)``; on CPU ``exp(d) / s``.

    ``exp(d) / s`` is the expression of softmax's value, whose ``exp(d)`` the
    row sum reads too: XLA's CPU backend computes it once for all three, and
    softmax forward+backward at float32 [4096, 32000] takes 0.97x jax.nn's
    time, against 1.08x. XLA's GPU backend instead wrote that ``exp(d)`` out (a
    float32 ``[N, K]`` buffer: 4 GiB and 1.44x jax.nn's time at bfloat16
    [8192, 128256] on an H200).
    """
    return lax.platform_dependent(
        d,
        s,
        cpu=lambda d, s: jnp.exp(d) / s,
        default=lambda d, s: jnp.exp(_softmax._log_probs(d, s)),
    )


def focal_terms(terms, q, gamma, spelling, finite=None):
    """The focal terms ``terms(q, gamma, spelling, finite)`` (:func:`jsoftmax._focal._focal_terms`);
    on CPU as the forward pass spells them, ``terms(q, gamma)``.

    With label smoothing the focal loss sums ``f(q)`` and ``f'(q)`` over each
    row and its tangent needs ``f'(q)`` again. XLA's CPU backend computes the
    shared terms once: the focal loss with label smoothing at float32 [4096,
    32000] (value and gradient, 2 cores) takes 0.26-0.30x the time it takes
    with each pass spelling its own, which is compute-bound there. XLA's GPU
    backend wrote the shared terms out instead (float32 ``[N, K]`` buffers:
    8047 MiB at bfloat16 [8192, 128256], against 31 MiB spelled apart).
    """
    return lax.platform_dependent(
        q,
        gamma,
        finite,
        cpu=lambda q, gamma, finite: terms(q, gamma),
        default=lambda q, gamma, finite: terms(q, gamma, spelling, finite),
    )


def isotonic(keys: jax.Array, n: jax.Array, scale: jax.Array, core) -> tuple[jax.Array, jax.Array]:
    """``core(keys, n, scale)``: each class's isotonic thresholds and fitted values (times
    ``scale``, 1 or NaN) from its row of sort keys (twice a probability's bits plus the
    label) and the kept rows' count ``n``; on CPU, from 2,048 rows, by NumPy and SciPy on
    the host, a class per core.

    The core runs every class at once in parallel rounds: XLA's sort, scans
    marking scikit-learn's groups by pointer doubling, and pooling rounds of
    gathers and scatters over every block left (1.3 s at [10, 1,000,000] on 2
    cores with CPU schedules for the sort and the grouping, 7.8 s at [1,000,
    50,000]). Here each class is NumPy's sort, every row's successor from a
    merge of the rows with their thresholds, SciPy's breadth-first walk along
    the successors from the first row, and SciPy's sequential PAVA over the
    groups: 0.44 and 2.5-2.8 s there. Each class costs the host about
    half a millisecond more, which the core's rounds beat below 1,000-2,000
    rows (65 against 2,300 ms at [5,000, 20]). ``jax.export`` cannot
    serialise a host callback.
    """
    size = keys.shape[-1]
    if keys.dtype.itemsize < 4 or size < _HOST_FROM or size > np.iinfo(np.int32).max:
        return core(keys, n, scale)

    def host(keys, n, scale):
        # In 32-bit words: JAX hands a callback its arguments through ``device_put``
        # in the callback's thread, where x64 enabled by ``jax.enable_x64`` in the
        # caller's does not hold, and would cut 64-bit ones to 32 bits.
        words = lax.bitcast_convert_type(keys, jnp.int32)
        out = jax.ShapeDtypeStruct(words.shape, jnp.float32)
        thresholds, values = jax.pure_callback(
            _host_isotonic,
            (out, out),
            words,
            n.astype(jnp.int32),
            scale.astype(jnp.float32),  # NaN stays NaN
            vmap_method="sequential",
        )
        dtype = jnp.dtype(f"float{8 * keys.dtype.itemsize}")
        return lax.bitcast_convert_type(thresholds, dtype), lax.bitcast_convert_type(values, dtype)

    return lax.platform_dependent(keys, n, scale, cpu=host, default=core)


_HOST_FROM = 2**11


def _host_isotonic(words, n, scale):
    """:func:`isotonic` of int32 keys ``[K, N]``, or int64 ones as ``[K, N, 2]`` words."""
    words, n, scale = np.asarray(words), int(n), float(scale)
    keys = words.view(np.int64)[..., 0] if words.ndim == 3 else words
    dtype = np.dtype(f"float{8 * keys.dtype.itemsize}")
    thresholds, values = np.empty(keys.shape, dtype), np.empty(keys.shape, dtype)
    with concurrent.futures.ThreadPoolExecutor(_cores()) as pool:
        list(pool.map(functools.partial(_fit_class, n=n, scale=scale), keys, thresholds, values))
    return tuple(a.view(np.float32).reshape(words.shape) for a in (thresholds, values))


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _fit_class(key, thresholds, values, *, n, scale):
    """One class of :func:`isotonic` on the host, written into ``thresholds`` and ``values``
    (of the probabilities' dtype, these times ``scale``); the same numbers as the core's,
    to the pooling of blocks whose means tie in that dtype."""
    from scipy.optimize import isotonic_regression

    dtype, size = values.dtype, key.shape[0]
    key = np.sort(key)
    # The kept rows' probabilities (a kept row whose probabilities are NaN reads as
    # padding's key, just under 2, and is counted: its values are NaN anyway), then padding's.
    xs = (key >> 1).view(dtype)
    starts = _group_starts(xs[:n])
    if n < size:
        starts = np.append(starts, n)  # padding's group
    # Each group's kept rows and hits, from prefix sums.
    ends = np.append(starts, size)
    kept = np.minimum(ends, n)
    hits = np.zeros(n + 1, key.dtype)
    np.cumsum(key[:n] & 1, out=hits[1:])
    count = np.diff(kept)
    groups = np.count_nonzero(count)  # the groups of kept rows come first, padding's last
    blocks = np.append(
        isotonic_regression(
            (hits[kept[1 : groups + 1]] - hits[kept[:groups]]) / count[:groups],
            weights=count[:groups],
        ).blocks[:-1],
        np.arange(groups, starts.shape[0] + 1),  # padding's group alone
    )
    rows = kept[blocks]
    block_count = np.diff(rows)
    sums = (hits[rows[1:]] - hits[rows[:-1]]).astype(dtype)
    mean = np.where(block_count > 0, sums / np.maximum(block_count, 1).astype(dtype), np.inf)
    values[:] = np.repeat(mean * dtype.type(scale), np.diff(ends[blocks]))
    thresholds[:n] = np.repeat(xs[starts[:groups]], np.diff(kept[: groups + 1]))
    thresholds[n:] = np.inf


def _group_starts(xs):
    """scikit-learn's grouping of the sorted ``xs`` in [0, 2) (NumPy): the entries that open
    a group, in order.

    The first entry opens one, and so does ``next(j)`` of an opener ``j``, the
    first entry at least the dtype's resolution above it (as
    :func:`jsoftmax._calibrators._resolution_groups` reads it): the path from
    the first entry along ``next``, a graph's breadth-first order, less its
    end ``len(xs)`` (no entry).
    """
    import scipy.sparse
    import scipy.sparse.csgraph

    size = xs.shape[0]
    # SciPy's traversal reads float64 weights and int32 indices, converting others.
    graph = scipy.sparse.csr_array(
        (np.ones(size), _successors(xs), np.minimum(np.arange(size + 2, dtype=np.int32), size)),
        shape=(size + 1, size + 1),
    )
    return scipy.sparse.csgraph.breadth_first_order(graph, 0, return_predecessors=False)[:-1]


def _successors(xs):
    """``next(j)`` of each entry of the sorted ``xs`` in [0, 2) (NumPy, int32); their number
    for none.

    The least float ``t`` with ``t - x >= resolution`` (as the test rounds)
    is ``x + resolution`` rounded, or an ulp or so away. ``t`` grows with
    ``x``: the two sorted runs, each tagged in its last bit so that ``t``
    goes before an equal ``x``, merge in one pass of NumPy's timsort, and
    ``t``'s place in the merge is ``j + next(j)`` (12 ms for a million,
    against 31-37 ms for ``np.searchsorted``). Non-negative floats order as
    their bits, which below 4 fit twice over in the unsigned integers.
    """
    resolution = np.finfo(xs.dtype).resolution
    size, bits = xs.shape[0], f"i{xs.dtype.itemsize}"

    def step(t, ulps):  # the float ``ulps`` after each positive ``t``, as ``np.nextafter``
        return (t.view(bits) + ulps).view(t.dtype)  # (40x faster: libm's runs entry by entry)

    t = xs + resolution
    while np.any(down := (lower := step(t, -1)) - xs >= resolution):
        t = np.where(down, lower, t)
    while np.any(up := ~(t - xs >= resolution)):
        t = np.where(up, step(t, 1), t)
    merged = np.empty(2 * size, f"u{xs.dtype.itemsize}")
    np.left_shift(t.view(merged.dtype), 1, out=merged[:size])
    np.left_shift(xs.view(merged.dtype), 1, out=merged[size:])
    merged[size:] |= 1
    merged.sort(kind="stable")  # timsort, which finds the two runs
    return np.flatnonzero(merged & 1 == 0).astype(np.int32) - np.arange(size, dtype=np.int32)


def top(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The first maximum of each row of ``p`` and its index, ``jnp.argmax(p, axis=-1)``
    (NaN counts as the largest); on CPU, for 18 to 32 classes, the first of each row's
    largest :func:`_ranks`, and past that through blocks of 25 to 32 classes.

    XLA's CPU argmax, a reduction of two operands, runs one entry at a time in
    rows of 18 entries or more: 41-44 ms for 20,000,000 float32 entries in rows
    of 18 to 33 (3.5-7 ms in rows of 8 to 17) on 2 cores, and 109 ms at
    [50,000, 1,000], where the maximum alone takes 7-11 ms. XLA's CPU backend
    vectorises a maximum over up to 32 entries, and not past that: the first
    entry of a row's largest rank, a maximum and a minimum over the row, takes
    11-17 ms in rows of 19 to 32 (29 at 18; 56 at 33). Past 32, the maxima of
    the ranks of blocks of 25 to 32 entries, the argmax among those, and the
    same first largest rank inside the winning block take 8.5 ms at [50,000,
    1,000] (13.8 with XLA's argmax inside the block), 35 against 48 at
    [500,000, 100], 53 against 102 at [1,000,000, 50]. With XLA's argmax inside
    the block, on one core: 29.5 against 116 ms at [50,000, 1,000], 17 against
    127 at [12,000, 4096], 12 against 96 at [1,500, 32,000], 14 against 116 at
    [400, 128,256]; blocks of 33 to 50 took 190-250 ms, of 8 to 24 55-100.
    Where no block size divides ``K``, XLA's own, since slicing off a remainder
    costs a copy (most class and vocabulary counts have one: 100, 1,000,
    21,843, 32,000, 50,257, 128,256).
    """
    size = _block_size(p.shape[-1])
    if size is None:
        return _top(p)
    return lax.platform_dependent(p, cpu=functools.partial(_blocked_top, size=size), default=_top)


@jax.custom_jvp
def _top(p):
    """The reduction ``jnp.argmax`` runs, keeping the value as well as the index: the
    maximum comes with it, where a gather at the argmax would read ``p`` again."""

    def first_max(a, b):
        (a_value, a_index), (b_value, b_index) = a, b
        a_nan, b_nan = jnp.isnan(a_value), jnp.isnan(b_value)
        take = (b_value > a_value) | (b_nan & ~a_nan)
        same = (b_value == a_value) | (b_nan & a_nan)
        first = take | (same & (b_index < a_index))
        return jnp.where(take, b_value, a_value), jnp.where(first, b_index, a_index)

    index = lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1)
    init = (jnp.array(-jnp.inf, p.dtype), jnp.array(p.shape[-1], jnp.int32))
    return lax.reduce((p, index), init, first_max, (p.ndim - 1,))


@_top.defjvp
def _top_jvp(primals, tangents):
    # JAX's own rule for a variadic reduction fails on the index's float0 tangent.
    (p,), (dp,) = primals, tangents
    value, index = _top(p)
    d_value = jnp.take_along_axis(dp, index[..., None], -1)[..., 0]
    return (value, index), (d_value, np.zeros(index.shape, jax.dtypes.float0))


def _block_size(k):
    """``k`` from 18 to 32, else its largest divisor from 25 to 32, if it has one."""
    if 18 <= k <= 32:
        return k
    return max((d for d in range(25, 33) if k % d == 0), default=None)


def _blocked_top(p, size):
    k = p.shape[-1]
    offset = 0
    if size < k:  # the block holding the first maximum
        blocks = p.reshape(*p.shape[:-1], k // size, size)
        block = jnp.argmax(jnp.max(_ranks(blocks), -1), -1).astype(jnp.int32)
        p = jnp.take_along_axis(blocks, block[..., None, None], -2)[..., 0, :]
        offset = block * size
    ranks = _ranks(p)
    first = lax.broadcasted_iota(jnp.int32, ranks.shape, ranks.ndim - 1)
    index = jnp.min(jnp.where(ranks == jnp.max(ranks, -1, keepdims=True), first, size), -1)
    return jnp.take_along_axis(p, index[..., None], -1)[..., 0], offset + index


def _ranks(p):
    """Integers ordered as ``p`` under XLA's CPU ``jnp.argmax``: equal where the floats
    compare equal (``-0.0``, ``0.0`` and the subnormals, which it reads as 0), every NaN
    one rank above ``+inf``.

    XLA's CPU max may drop a NaN (jax 0.10's YNNPACK fusions); a max of these
    ranks keeps it, in the same pass (10 ms at [50,000, 1,000] on 2 cores, as
    the max of the floats, where that max and a second pass marking the blocks
    that hold a NaN took 20). The sign and magnitude bits become a two's
    complement integer, ``-magnitude`` below 0.
    """
    itype = jnp.dtype(f"int{8 * p.dtype.itemsize}")
    bits = lax.bitcast_convert_type(p, itype)
    inf, tiny = (
        lax.bitcast_convert_type(jnp.array(v, p.dtype), itype)
        for v in (jnp.inf, jnp.finfo(p.dtype).tiny)
    )
    magnitude = bits & np.iinfo(itype).max
    magnitude = magnitude & -(magnitude >= tiny).astype(itype)  # a subnormal's is 0
    nan = (magnitude > inf).astype(itype)
    negative = (bits >> (8 * p.dtype.itemsize - 1)) & (nan - 1)  # -1 or 0; 0 for NaN
    return jnp.minimum((magnitude ^ negative) - negative, inf + 1)
