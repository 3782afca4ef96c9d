r"""Temperature scaling and calibration metrics.

Every metric takes probabilities ``[N, K]``, integer labels ``[N]`` and an
optional row mask ``where`` ``[N]`` (False rows are padding: they are not
binned and not counted in ``N``). Binned metrics share one rule for the bins:

.. math::
    B_m = \{i : e_{m-1} < c_i \le e_m\},\qquad e_m = m / M,\ m = 1..M,

with a confidence of exactly 0 in the first bin, the edges ``e_m`` rounded
once to the computation dtype (``float32(m) / float32(M)``) and confidences
outside [0, 1] clamped to the first or last bin. A bin's calibration gap is
``|sum_{i in B_m} (hit_i - c_i)| / N``, which is ``(n_m / N) * |acc_m - conf_m|``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _cpu, _select, _sharding, _softmax

_MAX_NEWTON_STEPS = 100


def temperature_scale(logits: ArrayLike, temperature: ArrayLike) -> jax.Array:
    """Divides logits by a temperature: ``logits / temperature``.

    Args:
      logits: floating ``[..., K]``.
      temperature: a positive scalar, or one per row (``[..., 1]``),
        validated as :func:`jsoftmax.softmax`'s.

    Returns:
      ``logits / temperature`` in ``logits``' dtype; infinite and NaN logits
      stay as they are, with gradient 0 (also in the temperature).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.temperature_scale(jnp.array([3.0, -1.5]), 1.5)
      Array([ 2., -1.], dtype=float32)

    Note:
      A concrete temperature that is not positive and finite raises
      ``ValueError``; under ``jax.jit`` it gives NaN rows.
    """
    fname = "temperature_scale"
    logits = _checks.floating(fname, "logits", logits)
    if logits.ndim == 0:
        raise ValueError(f"{fname}: logits must have a class axis, got shape ()")
    dtype = _checks.compute_dtype(logits.dtype)
    t = _checks.temperature(fname, temperature, logits.shape, (logits.ndim - 1,), dtype)
    return _scale_as_given(logits, t)


@functools.partial(jax.checkpoint, prevent_cse=False)
def _scale_as_given(x: jax.Array, temperature: jax.Array) -> jax.Array:
    """:func:`_scale` in ``x``'s dtype (computed in ``temperature``'s).

    Under ``jax.checkpoint``, reverse mode keeps only ``x`` as given and the
    temperature, and recomputes the quotient in its elementwise pass.
    """
    return _scale(x.astype(temperature.dtype), temperature).astype(x.dtype)


def _scale(x: jax.Array, temperature: jax.Array) -> jax.Array:
    """``x / temperature``, non-finite ``x`` passed through with no gradient.

    The plain quotient would give ``-inf * 0 = NaN`` in the temperature
    gradient of a masked or ``-inf`` logit; dividing a zeroed copy keeps the
    gradient exact while the value keeps its infinity (or NaN), constant in
    the logit and the temperature.
    """
    finite = jnp.isfinite(x)
    # (_divided: a quotient past the float range is constant in the temperature)
    quotient = _softmax._divided(jnp.where(finite, x, 0.0), temperature)
    scaled = jnp.where(finite, quotient, lax.stop_gradient(x))
    return _checks.nan_unless(~jnp.isnan(temperature), scaled)  # (padding rows too)


@_sharding.auto_axes()
def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    bounds: tuple[float, float] = (0.01, 100.0),
) -> jax.Array:
    r"""Fits the temperature that minimises the mean NLL of ``softmax(logits / T)``.

    .. math::
        T^\star = \arg\min_{T \in [T_{lo}, T_{hi}]} \frac{1}{N} \sum_i
        \big(\mathrm{logsumexp}(x_i / T) - x_{i y_i} / T\big)

    The NLL is convex in ``beta = 1 / T`` with derivative
    ``mean_i(E_p[x_i] - x_{i y_i})`` and second derivative ``mean_i Var_p[x_i]``,
    so a safeguarded Newton iteration on ``beta`` (Newton steps kept inside a
    bracket that shrinks every step, geometric bisection when Newton leaves it
    or stalls) converges to float precision in a fixed budget of steps. Each
    logit's gap below its row's max is first divided by a power of two bounding
    the gaps that a temperature in ``bounds`` can see, exactly, so that no value
    overflows and a class masked with ``finfo.min`` reads as one masked with
    ``-inf``.

    Args:
      logits: floating ``[N, K]``, the uncalibrated model's (validation) logits.
        ``-inf`` marks an impossible class.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding and ignored.
      bounds: ``(T_lo, T_hi)`` with ``T_lo < T_hi``, normal numbers of the
        compute dtype (float32: ``1.175e-38 <= T_lo``, ``T_hi <= 3.403e38``). When the optimum
        lies beyond a bound, that bound is returned.

    Returns:
      The scalar temperature ``T`` (float32, float64 for float64 logits);
      ``T < 1`` sharpens (underconfident models), ``T > 1`` softens.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (2000, 5))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> t = jsoftmax.fit_temperature(3.0 * logits, labels)  # overconfident by 3
      >>> bool(2.7 < t < 3.3)
      True

    Note:
      It works under ``jax.jit`` and ``jax.vmap`` (stacked problems run as one
      batched iteration). With no unmasked row (or only certain ones), or
      when the NLL does not depend on ``T`` (one class, or every kept row's
      logits equal), it returns 1 clipped to ``bounds``. A row with every logit ``-inf`` is
      padding; a row holding ``+inf`` is certain at every ``T`` (its ``+inf``
      classes share the mass), so it changes nothing unless its label is
      elsewhere. A row whose
      label is impossible (logit ``-inf``, or not ``+inf`` in a certain row)
      has infinite NLL at every ``T``: no optimum, NaN. NaN logits and traced
      out-of-range labels give NaN (a concrete one raises, also in a padding
      row of ``-inf``). The fit is a ``lax.while_loop``: ``jax.jvp`` of it
      works (along the logits ``T`` scales with them), ``jax.grad`` raises.

    References:
      Guo et al., `On Calibration of Modern Neural Networks
      <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
    """
    fname = "fit_temperature"
    logits, labels, where = _rows(fname, logits, labels, where, "logits")
    low, high = _bounds(fname, bounds, _checks.compute_dtype(logits.dtype))
    return _fit(logits, labels, where, low, high)


def _bounds(fname, bounds, dtype):
    try:
        low, high = bounds
    except (TypeError, ValueError):
        raise ValueError(f"{fname}: bounds must be a pair (low, high), got {bounds!r}") from None
    if _checks.is_traced(low) or _checks.is_traced(high):
        raise TypeError(f"{fname}: bounds must be concrete numbers, got a tracer")
    try:
        if any(isinstance(b, bool | np.bool_) for b in (low, high)):
            raise TypeError
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"{fname}: bounds must be numbers, got {bounds!r}") from None
    # Within the compute dtype's normal numbers: temperatures outside are 0 or inf there.
    # (Compared in that dtype: 3.4028235e38, float32's max as written, is past it in float64.)
    info = np.finfo(dtype)
    with np.errstate(over="ignore"):
        rounded = np.array([low, high]).astype(dtype)
    if not info.tiny <= rounded[0] < rounded[1] <= info.max:
        limits = f"{info.tiny!s} <= low < high <= {info.max!s}"
        raise ValueError(f"{fname}: bounds must satisfy {limits}, got {bounds!r}")
    return low, high


def _power_of_two_above(x: jax.Array, axis: int | None = None) -> jax.Array:
    """A power of two ``c`` about ``max |x|`` over the finite entries (1 if all are 0), or
    one along ``axis``: ``x / c`` is exact and within [-4, 4], and sums of it do not
    overflow."""
    amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), axis=axis, initial=0.0)
    # frexp and ldexp: XLA's exp2 of an integer is not exactly the power of two. At most
    # 2**(maxexp - 2): XLA's CPU divides by the reciprocal, subnormal (flushed to 0) above.
    exponent = jnp.minimum(jnp.frexp(amax)[1], jnp.finfo(x.dtype).maxexp - 2)
    return jnp.where(amax > 0, jnp.ldexp(jnp.ones_like(amax), exponent), 1.0)


@jax.jit
def _fit(logits, labels, where, low, high):
    dtype = _checks.compute_dtype(logits.dtype)
    x = logits.astype(dtype)
    # The rows as the fits read them, without the [N, K] mapped copy: on CPU each [N,
    # K] array written out costs more than a pass that reads one (~100 ms per 200 MB).
    # A certain row (+inf) has the same likelihood at every temperature: it adds nothing.
    top, x_label, kept, n, nan_if_bad, certain = _row_flags(x, labels, where, True)
    n = n.astype(dtype)
    bad = jnp.isnan(nan_if_bad)
    rows = kept & ~certain
    top = jnp.where(rows, top, 0.0)
    # The NLL reads each logit's gap below its row's max, scaled by a power of two
    # ``c`` about the largest gap that matters, so that ``beta * d`` and its moments
    # stay finite: the labels' and those of the logits a temperature in the bounds
    # keeps above exp(-128) (below it ``e`` is 0 in float32 and negligible in
    # float64). Not the logits themselves: a class masked with finfo.min (or rows
    # at 3e38) made ``c`` 2**127, and every other logit a flushed subnormal.
    half_gap = 0.5 * top[:, None] - 0.5 * x  # halves: no overflow
    # (Not -inf entries, impossible classes: their gap is inf, and 64 * high may be too.)
    seen = jnp.isfinite(half_gap) & (half_gap <= 64 * high)
    label = jnp.arange(x.shape[1], dtype=jnp.int32) == labels[:, None]
    c = _power_of_two_above(jnp.where(rows[:, None] & (seen | label), half_gap, 0.0))
    d = -2 * (half_gap / c)  # (x_k - max) / c: in [-2, 0] where seen, -inf if impossible
    d_label = -2 * ((0.5 * top - 0.5 * x_label) / c)
    # d where seen; past it, where p_k = 0 at every temperature in the bounds (exactly
    # in float32, below exp(-128) in float64), any finite value will do: a maximum, not
    # a select, so that on CPU it joins the row sums' fusions rather than a second
    # [N, K] array.
    floor = -jnp.minimum(128 * (high / c), jnp.finfo(dtype).max)

    def derivatives(beta):
        """First and second derivative of the mean NLL with respect to beta = c / T.

        From row sums of ``e = exp(beta d)``, ``e d`` and ``e d**2``: the mean and
        variance of ``d`` under ``p``, which needs no ``[N, K]`` softmax written
        out. ``d <= 0`` is 0 at the row's top class, so where ``p`` is peaked
        there the second moment is small and its variance loses little to
        cancellation (it only shapes Newton's steps: the root is ``g = 0``).
        """

        def terms(beta, d, floor):
            e = jnp.exp(beta * d)
            e_d = e * jnp.maximum(d, floor)  # (0, not NaN, where d = -inf)
            return e, e_d, e_d * jnp.maximum(d, floor)

        s, s1, s2 = _cpu.row_sums_apart(terms, beta, d, floor)
        mean = s1 / s
        var = jnp.maximum(s2 / s - mean**2, 0.0)
        g = jnp.sum(jnp.where(rows, mean - d_label, 0.0)) / n
        return g, jnp.sum(jnp.where(rows, var, 0.0)) / n

    # Fit beta = c / T, d's inverse temperature; the bounds move with it.
    # (Normal numbers: past them c / T overflows where the logits reach 1e38, or
    # flushes to 0 and exp(0 * -inf) is NaN.)
    finfo = jnp.finfo(dtype)
    beta_lo, beta_hi = (jnp.clip(c / bound, finfo.tiny, finfo.max) for bound in (high, low))
    tol = 8 * finfo.eps

    def step(state):
        # Numerical Recipes' rtsafe with geometric bisection: Newton unless it
        # leaves the bracket or its step exceeds half the step before last.
        # A Newton step within the tolerance ends the search: below x's
        # resolution it rounds to x, which sits on the bracket's edge and would
        # read as leaving it (1,000,000 x 10: 21 bisections back to that x). The
        # search ends at its last step, not evaluated there.
        i, x, a, b, dx, dx_before, _ = state
        g, h = derivatives(x)
        a, b = jnp.where(g < 0, x, a), jnp.where(g > 0, x, b)
        newton = x - g / h
        converged = jnp.abs(newton - x) <= tol * x
        bisect = ~((newton > a) & (newton < b)) | (jnp.abs(2 * g) > jnp.abs(dx_before * h))
        x_next = jnp.where(bisect & ~converged, jnp.sqrt(a * b), newton)
        done = converged | (jnp.abs(x_next - x) <= tol * x) | (g == 0)
        x_next = jnp.where(g == 0, x, x_next)
        return i + 1, x_next, a, b, x - x_next, dx, done

    def running(state):
        return (state[0] < _MAX_NEWTON_STEPS) & ~state[-1]

    width = beta_hi - beta_lo
    # (Bad input gives NaN: no evaluation.)
    start = (0, jnp.clip(c, beta_lo, beta_hi), beta_lo, beta_hi, width, width, bad)
    _, beta, a, b, *_ = lax.while_loop(running, step, start)

    def at_bound(bound, moved, sign):
        """g and h at a bound; where the bracket moved off it, g had ``sign`` in between,
        and (increasing: the NLL is convex) has it at the bound too."""
        known = jnp.array(sign, dtype), jnp.array(1, dtype)
        return lax.cond(moved, lambda: known, lambda: derivatives(bound))

    g_lo, h_lo = at_bound(beta_lo, (a > beta_lo) | bad, -1)
    g_hi, _ = at_bound(beta_hi, (b < beta_hi) | bad, 1)
    t = jnp.clip(c / beta, low, high)
    t = jnp.where(g_lo >= 0, high, jnp.where(g_hi <= 0, low, t))
    # Without a kept row that is not certain, or with a NLL flat in T (one class, or
    # every kept row's logits equal: no slope nor curvature even at the largest T), no T
    # is better.
    informative = jnp.any(rows) & ((g_lo != 0) | (h_lo > 0))
    t = jnp.where(informative, t, jnp.clip(1.0, low, high))
    return (t * nan_if_bad).astype(dtype)


def _rows(fname, values, labels, where, name):
    """Validates ``[N, K]`` floating values, ``[N]`` labels and a ``[N]`` row mask."""
    values = _checks.floating(fname, name, values)
    if values.ndim != 2:
        raise ValueError(f"{fname}: {name} must have shape [N, K], got {values.shape}")
    num_rows, num_classes = values.shape
    # A fit needs a class (its calibrator would apply to no input); a metric of padding is 0.
    if num_classes == 0 and name == "logits":
        raise ValueError(f"{fname}: {name} of shape {values.shape} has no class")
    where = _checks.mask(fname, where, (num_rows,))
    labels = _checks.integer_labels(
        fname, labels, (num_rows,), num_classes, f"{name} {values.shape}", kept=where
    )
    # In int32, as every index here (under x64, strict promotion mixes no int64 with them);
    # a traced label past int32 stays bad.
    if labels.dtype != jnp.int32:
        labels = jnp.where((labels >= 0) & (labels < num_classes), labels, -1).astype(jnp.int32)
    return values, labels, (jnp.ones(num_rows, bool) if where is None else where)


# The equal-mass bins' starts ``ceil(m N / M)`` take ``m (N mod M) < M**2`` in int32.
_MAX_BINS = math.isqrt(np.iinfo(np.int32).max)


def _num_bins(fname, num_bins):
    return _checks.static_int(fname, "num_bins", num_bins, 1, _MAX_BINS)


class _Metric(NamedTuple):
    """A metric as per-row statistics and a reduction over per-row integer weights.

    ``rows(probs, labels, where, *options)`` returns ``(statistics, flag)``:
    arrays computed once from ``[N, K]`` (padding rows zeroed) and a factor
    that is NaN when a kept label is out of range. ``reduce(statistics,
    weights, *options)`` gives the metric of the rows repeated ``weights[i]``
    times: ``where`` as 0/1 for the metric itself, resample counts for
    :func:`jsoftmax.bootstrap`. ``batched`` is False for a reduction whose
    branches (``lax.cond`` on data) would all run under ``jax.vmap``: its
    resamples are then reduced one at a time. ``prepare``, if any, turns the
    statistics into ones that are cheaper to reduce many times (it runs once
    before the resamples).
    """

    rows: Callable[..., tuple[Any, jax.Array]]
    reduce: Callable[..., jax.Array]
    batched: bool = True
    prepare: Callable[[Any], Any] | None = None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate(metric, options, probs, labels, where):
    statistics, flag = metric.rows(probs, labels, where, *options)
    return metric.reduce(statistics, where.astype(jnp.int32), *options) * flag


def _weighted(weights, values):
    """``weights * values`` that is 0 where a weight is 0, even for infinite or NaN values."""
    weights = weights.astype(values.dtype)
    return jnp.where(weights > 0, weights * values, 0.0)


def _edges(num_bins, dtype):
    """The bin edges ``m / M``, each correctly rounded: by NumPy, as constants (XLA computes
    a division by a constant as a product with its reciprocal, 0.20000002 for 3 / 15)."""
    dtype = np.dtype(dtype)
    return jnp.asarray(np.arange(num_bins + 1, dtype=dtype) / dtype.type(num_bins))


def _bin_index(c, num_bins):
    """The bin of each confidence under the module's edge rule."""
    edges = _edges(num_bins, c.dtype)
    if num_bins <= 32:
        # The inner edges below ``c``: XLA unrolls a sum of up to 32 comparisons and
        # vectorises it (0.5 against 2.8 ms at 1,000,000 confidences and 15 bins on
        # CPU), where the edges' gathers below run one entry at a time.
        return jnp.sum(c[..., None] > edges[1:-1], axis=-1, dtype=jnp.int32)
    m = jnp.asarray(num_bins, c.dtype)
    guess = jnp.clip(jnp.ceil(c * m), 1, num_bins).astype(jnp.int32) - 1
    # c * M may round across an edge: compare with the edges themselves.
    up, down = c > edges[guess + 1], (c <= edges[guess]) & (guess > 0)
    index = guess + up.astype(guess.dtype) - down.astype(guess.dtype)
    return jnp.clip(index, 0, num_bins - 1)


def _bin_sums(index, weights, *values, num_segments):
    """Per bin, ``sum(weights * v)`` for each of ``values`` (of one shape), in one scatter."""
    value = values[0]
    weights = jnp.broadcast_to(weights, value.shape)
    stats = jnp.stack([_weighted(weights, v) for v in values], axis=-1).reshape(-1, len(values))
    # A scatter-add accumulates sequentially (error ~ rows * eps in a bin); partial
    # sums over blocks of ~sqrt(rows) rows, added afterwards, keep it ~ sqrt(rows) * eps.
    # Fewer blocks where the bins are many: the partial sums stay within the input's size.
    rows = value.shape[0]
    most = max(1, max(value.size, 1 << 20) // max(num_segments, 1))
    block = max(1, math.isqrt(rows), -(-rows // most))
    blocks = -(-rows // block)
    row_block = (jnp.arange(rows, dtype=jnp.int32) // block).reshape(
        (rows,) + (1,) * (value.ndim - 1)
    )
    index = (index + num_segments * row_block).reshape(-1)
    sums = jax.ops.segment_sum(stats, index, num_segments * blocks, indices_are_sorted=False)
    return tuple(jnp.sum(sums.reshape(blocks, num_segments, len(values)), axis=0).T)


def _top1(probs, labels, where):
    """Top-1 confidence and whether it is right (0 in padding rows), and the bad-label flag."""
    dtype = _checks.compute_dtype(probs.dtype)
    p = probs.astype(dtype)
    flag = _count(p, labels, where)[1]
    if p.shape[1] == 0:  # no row is kept, or its label is bad (flagged): one zero class will do
        p = jnp.zeros((p.shape[0], 1), dtype)
    # The argmax's entry, not jnp.max, which XLA's CPU backend lets drop a NaN.
    confidence, top = _cpu.top(p)
    confidence = jnp.where(where, confidence, 0.0)
    hit = jnp.where(where, (top == labels).astype(dtype), 0.0)
    return confidence, hit, flag


def _poisoned(flag, confidence, poison=jnp.isnan):
    """``flag``, and NaN if a kept row's confidence is ``poison`` (padding rows' are 0,
    neither): a diagram's bins are all NaN then, as the metrics are, not only the bin
    it lands in."""
    return flag * jnp.where(jnp.any(poison(confidence)), jnp.nan, 1.0).astype(flag.dtype)


def _count(p, labels, where):
    """``N``, the number of kept rows (an integer, exact past 2**24), and a factor that is
    NaN when a kept label is bad."""
    bad = jnp.any(where & ((labels < 0) | (labels >= p.shape[1])))
    return jnp.sum(where, dtype=jnp.int32), jnp.where(bad, jnp.nan, 1.0).astype(p.dtype)


def _certain(x):
    """``x`` with each row holding ``+inf`` made certain, and each row's max.

    As in :func:`jsoftmax.softmax`, the ``+inf`` classes share the mass and the
    others are impossible: the row becomes 0 there and ``-inf`` elsewhere (NaN
    stays NaN), which no temperature changes. The max is ``+inf`` for those
    rows and ``-inf`` for a row without a possible class.
    """
    top = jnp.max(x, axis=-1, keepdims=True, initial=-jnp.inf)
    return jnp.where(top == jnp.inf, jnp.where(x == jnp.inf, 0.0, x - jnp.inf), x), top


def _row_flags(x, labels, where, likelihood):
    """Per row of ``x``: its max (``+inf`` for a certain row, ``-inf`` for one without a
    possible class), the label's logit, whether it is kept, ``N``, the bad-input factor
    and whether it is certain.

    A row with every class ``-inf`` predicts nothing and is padding, as the
    losses give it cost 0 and do not count it. The factor is NaN when a kept
    row has a bad label or a NaN logit and, for a ``likelihood`` fit, when a
    kept row's label is impossible (``-inf``, or not ``+inf`` in a certain row):
    its likelihood is then 0 under every calibrator, so the fit has no optimum.
    """
    top = jnp.max(x, axis=-1, initial=-jnp.inf)
    kept, certain = where & (top > -jnp.inf), top == jnp.inf
    n, nan_if_bad = _count(x, labels, kept)
    # (against ``where``: the max may drop a NaN on CPU, see _cpu.top)
    bad = jnp.any(where & jnp.any(jnp.isnan(x), axis=-1))
    x_label = jnp.take_along_axis(x, labels[:, None], axis=1, mode="clip")[:, 0]
    if likelihood:
        bad |= jnp.any(kept & ((x_label == -jnp.inf) | (certain & (x_label < jnp.inf))))
    return top, x_label, kept, n, jnp.where(bad, jnp.nan, nan_if_bad), certain


def _fit_rows(x, labels, where, likelihood):
    """The rows as every fit reads them: ``x`` (:func:`_certain`) and
    :func:`_row_flags`' ``where``, ``N``, bad-input factor and certain rows."""
    _, _, kept, n, nan_if_bad, certain = _row_flags(x, labels, where, likelihood)
    return _certain(x)[0], kept, n, nan_if_bad, certain


def _mean(total, n):
    """``total / n``, 0 when ``n`` is 0."""
    return jnp.where(n > 0, total / jnp.maximum(n, 1).astype(total.dtype), 0.0)


def _binned_rows(probs, labels, where, num_bins, kind):
    confidence, hit, flag = _top1(probs, labels, where)
    return (_bin_index(confidence, num_bins), confidence, hit), flag


def _binned_reduce(statistics, weights, num_bins, kind):
    index, confidence, hit = statistics
    if kind == "max":
        count, gap = _bin_sums(
            index, weights, jnp.ones_like(hit), hit - confidence, num_segments=num_bins
        )
        gaps = jnp.where(count > 0, jnp.abs(gap) / jnp.maximum(count, 1), 0.0)
        # XLA's CPU max may drop a NaN (from thousands of bins): the sum keeps it.
        return jnp.where(jnp.isnan(jnp.sum(gaps)), jnp.nan, jnp.max(gaps))
    (gap,) = _bin_sums(index, weights, hit - confidence, num_segments=num_bins)
    return _mean(jnp.sum(jnp.abs(gap)), jnp.sum(weights))


_BINNED = _Metric(_binned_rows, _binned_reduce)


def _adaptive_rows(probs, labels, where, num_bins):
    """Top-1 statistics, the confidences' sort keys, and no sorting order yet."""
    confidence, hit, flag = _top1(probs, labels, where)
    return (_select.ordered_key(confidence), confidence, hit, None), flag


def _with_order(statistics):
    """Statistics ``(key, ..., None)`` with the order that sorts ``key`` in place of None.

    One sort before :func:`jsoftmax.bootstrap`'s resamples, so that each finds
    its equal-mass bins by binary search rather than by radix selection.
    """
    key, *rest, _ = statistics
    return (key, *rest, jnp.argsort(key, axis=-1))


def _equal_mass_starts(n, num_bins):
    """``ceil(m n / M)`` for m = 0..M in int32 without overflow."""
    m = jnp.arange(num_bins + 1, dtype=jnp.int32)
    return m * (n // num_bins) + (m * (n % num_bins) + num_bins - 1) // num_bins


def _adaptive_reduce(statistics, weights, num_bins):
    key, confidence, hit, order = statistics
    if key.shape[0] == 0:
        return jnp.zeros((), confidence.dtype)
    n = jnp.sum(weights, dtype=jnp.int32)
    # S(r) = the sum of (hit - c) over the first r sorted rows, rows of equal
    # confidence counting their mean; a bin's gap is S(end) - S(start).
    starts = _equal_mass_starts(n, num_bins)
    ranks = jnp.clip(starts, 0, jnp.maximum(n - 1, 0))
    gap = hit - confidence
    _, ties, copies, below, equal = _select.select(key, weights, ranks, gap, order)
    partial = below + ties.astype(hit.dtype) * equal / jnp.maximum(copies, 1).astype(hit.dtype)
    total = jnp.sum(_weighted(weights, gap))
    partial = jnp.where(starts >= n, total, partial)
    error = _mean(jnp.sum(jnp.abs(jnp.diff(partial))), n.astype(hit.dtype))
    # An infinite confidence: NaN, as the sums over a sort give it (inf - inf), also
    # where it only reaches the total.
    return jnp.where(jnp.isfinite(total), error, jnp.nan)


_ADAPTIVE = _Metric(_adaptive_rows, _adaptive_reduce, prepare=_with_order)


@_sharding.auto_axes()
def expected_calibration_error(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15, where: ArrayLike | None = None
) -> jax.Array:
    r"""Expected calibration error (ECE) of the top-1 prediction, equal-width bins.

    .. math::
        \mathrm{ECE} = \sum_{m=1}^{M} \frac{n_m}{N}\, |\mathrm{acc}_m - \mathrm{conf}_m|

    with the confidence ``c_i = max_k p_ik``, a hit when ``argmax_k p_ik = y_i``,
    and bins ``(e_{m-1}, e_m]``, ``e_m = m / M`` (a confidence of exactly 0
    in the first bin; each edge rounded once to the compute dtype, ``float32(m) /
    float32(M)``, and confidences outside [0, 1] in the first or last bin).

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      num_bins: ``1 <= M <= 46340`` (static).
      where: boolean ``[N]``; False rows are padding.

    Returns:
      A scalar in [0, 1] (float32, float64 for float64 ``probs``); 0 when no
      row is kept; NaN for traced out-of-range labels or NaN probabilities.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
      >>> jsoftmax.expected_calibration_error(probs, jnp.array([0, 1, 1]), num_bins=5)
      Array(0.2, dtype=float32)

    References:
      Guo et al., `On Calibration of Modern Neural Networks
      <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
    """
    fname = "expected_calibration_error"
    probs, labels, where = _rows(fname, probs, labels, where, "probs")
    return _evaluate(_BINNED, (_num_bins(fname, num_bins), "sum"), probs, labels, where)


@_sharding.auto_axes()
def maximum_calibration_error(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15, where: ArrayLike | None = None
) -> jax.Array:
    r"""Maximum calibration error (MCE): the largest gap over non-empty bins.

    .. math::
        \mathrm{MCE} = \max_{m:\ n_m > 0} |\mathrm{acc}_m - \mathrm{conf}_m|

    with the bins of :func:`expected_calibration_error`.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      num_bins: ``1 <= M <= 46340`` (static).
      where: boolean ``[N]``; False rows are padding.

    Returns:
      A scalar in [0, 1]; 0 when no row is kept.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
      >>> jsoftmax.maximum_calibration_error(probs, jnp.array([0, 1, 1]), num_bins=5)
      Array(0.25, dtype=float32)
    """
    fname = "maximum_calibration_error"
    probs, labels, where = _rows(fname, probs, labels, where, "probs")
    return _evaluate(_BINNED, (_num_bins(fname, num_bins), "max"), probs, labels, where)


@_sharding.auto_axes()
def adaptive_calibration_error(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15, where: ArrayLike | None = None
) -> jax.Array:
    r"""Adaptive ECE: the ECE over equal-mass bins of the sorted confidences.

    The ``N`` kept rows are sorted by top-1 confidence and rank ``r``
    (0-based) goes to bin ``m`` (0-based) with
    ``ceil(m N / M) <= r < ceil((m + 1) N / M)``, so bin sizes differ by at
    most one; then ``sum_m (n_m / N) |acc_m - conf_m|``. Rows of equal
    confidence that a bin edge splits count with their mean accuracy on
    both sides, so the value does not depend on the order of the rows. No
    sort: the bin edges are found by radix selection, a few passes over
    the rows.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      num_bins: ``1 <= M <= 46340`` (static).
      where: boolean ``[N]``; False rows are padding.

    Returns:
      A scalar in [0, 1]; 0 when no row is kept.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
      >>> jsoftmax.adaptive_calibration_error(probs, jnp.array([0, 1, 1, 0]), num_bins=2)
      Array(0.35, dtype=float32)

    References:
      Nixon et al., `Measuring Calibration in Deep Learning
      <https://arxiv.org/abs/1904.01685>`_, CVPR Workshops 2019.
    """
    fname = "adaptive_calibration_error"
    probs, labels, where = _rows(fname, probs, labels, where, "probs")
    return _evaluate(_ADAPTIVE, (_num_bins(fname, num_bins),), probs, labels, where)


@_sharding.auto_axes()
def classwise_calibration_error(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15, where: ArrayLike | None = None
) -> jax.Array:
    r"""Classwise ECE (Nixon et al.'s static calibration error, SCE).

    .. math::
        \mathrm{SCE} = \frac{1}{K} \sum_{k=1}^{K} \sum_{m=1}^{M}
        \frac{n_{mk}}{N}\, |\mathrm{freq}_{mk} - \mathrm{conf}_{mk}|

    where bin ``m`` of class ``k`` holds the rows whose ``p_ik`` falls in the
    equal-width bin ``m`` (edges as in :func:`expected_calibration_error`),
    ``conf_mk`` is their mean ``p_ik`` and ``freq_mk`` the fraction with
    ``y_i = k``.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      num_bins: ``1 <= M <= 46340`` (static).
      where: boolean ``[N]``; False rows are padding.

    Returns:
      A scalar in [0, 1]; 0 when no row is kept.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
      >>> jsoftmax.classwise_calibration_error(probs, jnp.array([0, 1, 1]), num_bins=5).round(4)
      Array(0.3667, dtype=float32)

    References:
      Nixon et al., `Measuring Calibration in Deep Learning
      <https://arxiv.org/abs/1904.01685>`_, CVPR Workshops 2019.
    """
    fname = "classwise_calibration_error"
    probs, labels, where = _rows(fname, probs, labels, where, "probs")
    return _evaluate(_CLASSWISE, (_num_bins(fname, num_bins),), probs, labels, where)


def _classwise_rows(probs, labels, where, num_bins):
    dtype = _checks.compute_dtype(probs.dtype)
    p = jnp.where(where[:, None], probs.astype(dtype), 0.0)
    hit = (labels[:, None] == jnp.arange(p.shape[1], dtype=jnp.int32)).astype(dtype)
    return (_bin_index(p, num_bins), p, hit), _count(p, labels, where)[1]


def _classwise_reduce(statistics, weights, num_bins):
    index, p, hit = statistics
    num_classes = p.shape[1]
    index = index + num_bins * jnp.arange(num_classes, dtype=jnp.int32)
    (gap,) = _bin_sums(index, weights[:, None], hit - p, num_segments=num_bins * num_classes)
    return _mean(jnp.sum(jnp.abs(gap)) / num_classes, jnp.sum(weights))


_CLASSWISE = _Metric(_classwise_rows, _classwise_reduce)


@_sharding.auto_axes()
def brier_score(
    probs: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Brier score: the mean squared distance to the one-hot label.

    .. math::
        \mathrm{BS} = \frac{1}{N} \sum_i \sum_k (p_{ik} - [y_i = k])^2
        = \frac{1}{N} \sum_i \Big(\sum_k p_{ik}^2 - 2 p_{i y_i} + 1\Big)

    computed from the second form, without a one-hot.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding.

    Returns:
      A scalar in [0, 2]; 0 when no row is kept.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.brier_score(jnp.array([[0.75, 0.25], [0.5, 0.5]]), jnp.array([0, 1]))
      Array(0.3125, dtype=float32)
    """
    fname = "brier_score"
    probs, labels, where = _rows(fname, probs, labels, where, "probs")
    return _evaluate(_BRIER, (), probs, labels, where)


def _brier_rows(probs, labels, where):
    p = probs.astype(_checks.compute_dtype(probs.dtype))
    flag = _count(p, labels, where)[1]
    p = jnp.where(where[:, None], p, 0.0)  # a padding row's NaN reaches no gradient
    p_label = jnp.take_along_axis(p, labels[:, None], axis=1, mode="clip")[:, 0]
    # Absolute precision (~eps per row): a confident row's 1e-8 rounds away. Leaving the
    # label's p**2 out of the row sum keeps it, but took 3x the time on CPU.
    squares = jnp.sum(p * p, axis=1)
    # A label's p of +inf: (inf - 1)**2 is inf (or the row's NaN), not inf - inf.
    per_row = jnp.where(p_label == jnp.inf, squares, squares - 2 * p_label + 1)
    return jnp.where(where, per_row, 0.0), flag


def _per_row_mean(per_row, weights, *options):
    """The weighted mean of per-row values (the options shaped only the rows)."""
    return _mean(jnp.sum(_weighted(weights, per_row)), jnp.sum(weights).astype(per_row.dtype))


_BRIER = _Metric(_brier_rows, _per_row_mean)


class ReliabilityDiagram(NamedTuple):
    """Per-bin statistics of a reliability diagram (equal-width bins).

    Attributes:
      confidence: ``[M]`` mean top-1 confidence of each bin (NaN when empty).
      accuracy: ``[M]`` fraction of hits in each bin (NaN when empty).
      count: ``[M]`` number of (kept) rows in each bin.
      edges: ``[M + 1]`` bin edges ``m / M``.
    """

    confidence: jax.Array
    accuracy: jax.Array
    count: jax.Array
    edges: jax.Array


def reliability_diagram(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15, where: ArrayLike | None = None
) -> ReliabilityDiagram:
    """The per-bin statistics behind :func:`expected_calibration_error`.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      num_bins: ``1 <= M <= 46340`` (static).
      where: boolean ``[N]``; False rows are padding.

    Returns:
      A :class:`ReliabilityDiagram`; the mean of an empty bin is NaN (there is
      none), its count 0; a NaN probability in a kept row, or a traced bad
      label, makes every mean NaN (a row whose confidence is NaN is in no
      bin's count). ``sum(count * |accuracy - confidence|) / sum(count)``
      over non-empty bins is the ECE. Plot it with
      :func:`jsoftmax.plot.reliability_diagram`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
      >>> jsoftmax.reliability_diagram(probs, jnp.array([0, 1, 1]), num_bins=2).count
      Array([0., 3.], dtype=float32)
    """
    fname = "reliability_diagram"
    probs, labels, where = _rows(fname, probs, labels, where, "probs")
    return _diagram(probs, labels, where, _num_bins(fname, num_bins))


@_sharding.auto_axes()  # (here, where plot.reliability_diagram comes too)
@functools.partial(jax.jit, static_argnames=("num_bins",))
def _diagram(probs, labels, where, num_bins):
    (index, confidence, hit), flag = _binned_rows(probs, labels, where, num_bins, "sum")
    flag = _poisoned(flag, confidence)
    binned = where & ~jnp.isnan(confidence)  # (a NaN is in no bin; its index reads 0)
    count, total, hits = _bin_sums(
        index, binned.astype(jnp.int32), jnp.ones_like(hit), confidence, hit, num_segments=num_bins
    )
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan) * flag
    accuracy = jnp.where(count > 0, hits / jnp.maximum(count, 1), jnp.nan) * flag
    edges = _edges(num_bins, confidence.dtype)
    return ReliabilityDiagram(mean, accuracy, count, edges)
