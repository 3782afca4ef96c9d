r"""Smooth and debiased calibration errors, the NLL, and bootstrap intervals for every metric.

Each metric is per-row statistics computed once from ``[N, K]`` and a
reduction over per-row integer weights (``_calibration._Metric``): the
metric itself reduces with ``where`` as 0/1 weights, :func:`bootstrap`
with the resample counts of the rows, so that a resample never copies the
``[N, K]`` matrix.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _calibration as _cal
from jsoftmax import _checks, _select, _sharding

# relplot's smECE: bisection from 1 over 10 halvings, so the smallest bandwidth
# it can evaluate is 2**-10; below 0.001 the fixed-point test always passes.
_STEPS = 10
_SMALLEST = 0.001
_EPS = 1e-4  # added to the smoothed density before dividing, as relplot does
# Its grid has max(2000, round(20 / sigma)) // 2 + 1 points and its mesh
# max(round(10 / sigma), 200): at most these many at sigma = 2**-10, and for
# every sigma above about 0.01 the base grid and at most 1001 mesh points.
_GRID = max(2000, round(20 * 2**_STEPS)) // 2 + 1
_MESH = max(round(10 * 2**_STEPS), 200)
_BASE_GRID = 2000 // 2 + 1
_BASE_MESH = 1024
# The direct smoothing builds this many rows of its matrix at a time.
_POINTS_CHUNK = 256
# Resamples are reduced in batches of about this many row weights.
_BATCH_ELEMENTS = 1 << 22


# ---------------------------------------------------------------- NLL


def _nll_rows(probs, labels, where, log_input):
    p = probs.astype(_checks.compute_dtype(probs.dtype))
    p_label = jnp.take_along_axis(p, labels[:, None], axis=1, mode="clip")[:, 0]
    # A padding row's value is never read, nor is its gradient NaN (log 0, a NaN).
    p_label = jnp.where(where, p_label, 0.0 if log_input else 1.0)
    log_p = p_label if log_input else jnp.log(p_label)
    return -log_p, _cal._count(p, labels, where)[1]


_NLL = _cal._Metric(_nll_rows, _cal._per_row_mean)


@_sharding.auto_axes()
def negative_log_likelihood(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    log_input: bool = False,
) -> jax.Array:
    r"""Mean negative log-likelihood of the labels under the predicted probabilities.

    .. math::
        \mathrm{NLL} = -\frac{1}{N} \sum_i \log p_{i y_i}

    Args:
      probs: floating ``[N, K]`` predicted probabilities, or with ``log_input``
        their logarithms.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding.
      log_input: ``probs`` holds log-probabilities, as :func:`jsoftmax.calibrate`
        and :func:`jsoftmax.log_softmax` return them: the NLL is then exact where
        ``exp`` would round a tiny probability to 0 (float32 below ``1.2e-38``,
        the smallest normal number: XLA flushes subnormals; an infinite NLL).

    Returns:
      A scalar (float32, float64 for float64 ``probs``); 0 when no row is
      kept, ``inf`` when a kept row gives its label probability 0 (log-probability
      ``-inf``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> probs = jnp.array([[0.5, 0.5], [0.25, 0.75]])
      >>> jsoftmax.negative_log_likelihood(probs, jnp.array([0, 1])).round(4)
      Array(0.4904, dtype=float32)
      >>> log_probs = jnp.array([[0.0, -120.0]])  # exp(-120.0) is 0 in float32
      >>> jsoftmax.negative_log_likelihood(log_probs, jnp.array([1]), log_input=True)
      Array(120., dtype=float32)

    Note:
      Only the label's probability is read (one gather): a NaN elsewhere in a
      kept row leaves the NLL finite, unlike the other metrics.
      From logits, :func:`jsoftmax.softmax_cross_entropy_with_integer_labels`
      is as accurate; from calibrated log-probabilities, ``log_input=True``
      (with :func:`jsoftmax.bootstrap`, through ``functools.partial``).
    """
    fname = "negative_log_likelihood"
    probs, labels, where = _cal._rows(fname, probs, labels, where, "probs")
    return _cal._evaluate(
        _NLL, (_checks.flag(fname, "log_input", log_input),), probs, labels, where
    )


def _nll_plan(log_input=False):
    return _NLL, (_checks.flag("negative_log_likelihood", "log_input", log_input),)


# ---------------------------------------------------------------- debiased


_MODES = ("top-label", "marginal")


def _mode(fname, mode):
    return _checks.choice(fname, "mode", mode, _MODES)


def _debiased_rows(probs, labels, where, num_bins, mode):
    """Per problem (the top label, or each class): values' sort keys, values and outcomes."""
    if mode == "top-label":
        confidence, hit, flag = _cal._top1(probs, labels, where)
        values, outcomes = confidence[None], hit[None]
    else:
        dtype = _checks.compute_dtype(probs.dtype)
        p = jnp.where(where[:, None], probs.astype(dtype), 0.0)
        onehot = (labels[:, None] == jnp.arange(p.shape[1], dtype=jnp.int32)) & where[:, None]
        values, outcomes, flag = p.T, onehot.T.astype(dtype), _cal._count(p, labels, where)[1]
    return (_select.ordered_key(values), values, outcomes, None), flag


def _debiased_squared(key, values, outcomes, order, weights, num_bins):
    """Kumar et al.'s debiased squared error of one problem over its equal-mass bins."""
    n = jnp.sum(weights, dtype=jnp.int32)
    # np.array_split of the n sorted values into B = min(M, n) parts; an edge is
    # the midpoint of the values either side of a split.
    if num_bins == 1:  # one bin, no edge to select
        index = jnp.zeros(values.shape, jnp.int32)
    else:
        parts = jnp.maximum(jnp.minimum(num_bins, n), 1)
        j = jnp.arange(1, num_bins, dtype=jnp.int32)
        starts = j * (n // parts) + jnp.minimum(j, n % parts)
        last = jnp.maximum(n - 1, 0)
        ranks = jnp.clip(jnp.stack([starts - 1, starts], axis=1).reshape(-1), 0, last)
        found = _select.select(key, weights, ranks, order=order)[0]
        below, above = _select.float_of_key(found, values.dtype).reshape(-1, 2).T
        edges = jnp.where(j < parts, (below + above) / 2, jnp.inf)
        index = jnp.searchsorted(edges, values, side="left", method="compare_all")
    count, gap, total = _cal._bin_sums(
        index, weights, jnp.ones_like(values), outcomes - values, values, num_segments=num_bins
    )
    size = jnp.maximum(count, 1)
    frequency = (gap + total) / size
    error = (gap / size) ** 2 - frequency * (1 - frequency) / jnp.maximum(count - 1, 1)
    squared = _cal._mean(jnp.sum(jnp.where(count >= 2, count * error, 0.0)), n.astype(values.dtype))
    # A NaN or infinite value counts even in a bin of one row, which the sum above
    # leaves out (-inf sits alone in its bin: its edge with the next is -inf).
    return jnp.where(jnp.isfinite(jnp.sum(total)), squared, jnp.nan)


def _debiased_reduce(statistics, weights, num_bins, mode):
    key, values, outcomes, order = statistics
    if 0 in key.shape[:2]:  # no row, or (marginal) no class
        return jnp.zeros((), values.dtype)
    squared = jax.vmap(_debiased_squared, in_axes=(0, 0, 0, 0, None, None))(
        key, values, outcomes, order, weights, num_bins
    )
    mean = jnp.mean(jnp.maximum(squared, 0.0))
    # (Not sqrt's derivative at 0, infinite: a clipped estimate is common when calibrated.)
    return jnp.where(mean > 0, jnp.sqrt(jnp.where(mean > 0, mean, 1.0)), mean)


_DEBIASED = _cal._Metric(_debiased_rows, _debiased_reduce, prepare=_cal._with_order)


@_sharding.auto_axes()
def debiased_calibration_error(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = 15,
    mode: str = "top-label",
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Debiased l2 calibration error over equal-mass bins (Kumar, Liang and Ma 2019).

    For one problem, values ``q_i`` (the top-1 confidence with outcome "the
    prediction is right", or in ``"marginal"`` mode ``p_ik`` with outcome
    ``y_i = k``) are split into ``B = min(M, N)`` equal-mass bins: the sorted
    values are cut as ``np.array_split`` cuts them and each edge is the
    midpoint of the two values either side of a cut, in their dtype as
    uncertainty-calibration computes it; bin ``b`` holds ``e_{b-1} < q <= e_b``
    (so where the two are adjacent floats, float32 0.99999994 and 1.0, the
    midpoint may round onto the upper one, whose rows then join the bin below,
    as in that package; float64 input under ``jax_enable_x64`` keeps the cut).
    float16 and bfloat16 probabilities are computed in float32, midpoints
    included, where that package rounds them in float16 and may move a cut
    (about 1e-4 relative on float16 softmax outputs). Then

    .. math::
        \widehat{\mathrm{CE}}^2 = \sum_{b:\ n_b \ge 2} \frac{n_b}{N}
        \Big[(\bar q_b - \bar y_b)^2 - \frac{\bar y_b (1 - \bar y_b)}{n_b - 1}\Big],
        \qquad \mathrm{CE} = \sqrt{\max(\widehat{\mathrm{CE}}^2, 0)}

    removes the plug-in estimate's bias ``Var(y) / n_b`` bin by bin. In
    ``"marginal"`` mode each class has its own bins and the result is
    ``sqrt(mean_k max(CE_k^2, 0))``.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      num_bins: ``1 <= M <= 46340`` (static).
      mode: ``"top-label"`` or ``"marginal"`` (static).
      where: boolean ``[N]``; False rows are padding.

    Returns:
      The l2 error (the square root, not its square), a scalar in [0, 1];
      0 when no row is kept. It equals
      ``calibration.get_calibration_error(probs, labels, p=2, debias=True,
      mode=mode)`` of the ``uncertainty-calibration`` package for continuous
      probabilities (for inputs with few distinct values that package switches
      to one bin per value; a subnormal probability, below 1.2e-38 in float32,
      is 0 to XLA, which flushes it, and bins with the zeros).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (4000, 5))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> calibrated = jsoftmax.debiased_calibration_error(jax.nn.softmax(logits), labels)
      >>> overconfident = jsoftmax.debiased_calibration_error(jax.nn.softmax(3 * logits), labels)
      >>> bool(calibrated < 0.03 < overconfident)
      True

    References:
      Kumar, Liang and Ma, `Verified Uncertainty Calibration
      <https://arxiv.org/abs/1909.10155>`_, NeurIPS 2019.
    """
    fname = "debiased_calibration_error"
    options = (_cal._num_bins(fname, num_bins), _mode(fname, mode))
    probs, labels, where = _cal._rows(fname, probs, labels, where, "probs")
    return _cal._evaluate(_DEBIASED, options, probs, labels, where)


# ---------------------------------------------------------------- smooth


def _sizes(sigma):
    """relplot's grid size and mesh size for a bandwidth."""
    grid = jnp.maximum(2000, jnp.round(20 / sigma)).astype(jnp.int32) // 2 + 1
    return grid, jnp.maximum(jnp.round(10 / sigma), 200).astype(jnp.int32)


def _on_grid(f, columns, sigma, use, base=None):
    """``use(spread, coarse)`` with the rows' spread on the grid of ``sigma``.

    A callback because the two grids' arrays differ in shape: what reads them
    runs inside the ``lax.cond``.

    Bandwidths above ~0.01 share relplot's base grid (``coarse``); ``base`` is
    the spread there if already computed.
    """
    grid, _ = _sizes(sigma)
    return lax.cond(
        grid == _BASE_GRID,
        lambda: use(_spread(f, columns, grid, _BASE_GRID) if base is None else base, True),
        lambda: use(_spread(f, columns, grid, _GRID), False),
    )


def _spread(f, columns, grid, capacity):
    """Each row's ``columns`` spread linearly onto the 2 grid points around ``f``.

    Returns ``[capacity, C]``, zero beyond the grid's ``G <= capacity`` points.
    """
    last = (grid - 1).astype(columns.dtype)
    x = f * last
    left = jnp.clip(jnp.trunc(x), 0, last - 1)
    frac = x - left
    left = jnp.where(jnp.isfinite(left), left, 0).astype(jnp.int32)
    spread = jnp.concatenate([columns * (1 - frac)[:, None], columns * frac[:, None]])
    return jax.ops.segment_sum(spread, jnp.concatenate([left, left + 1]), capacity)


def _convolved(values, sigma, points):
    """relplot's reflected Gaussian smoothing of each column of the rows' spread ``values``
    (on the grid of ``sigma``) at ``points``.

    The grid of G points is reflected at 0 and 1 and convolved with the Gaussian
    sampled at G points of [-1/2, 1/2] (unnormalised by the grid step, cut beyond
    1/2), then interpolated linearly at ``points``; by FFT.
    """
    dtype = values.dtype
    capacity = values.shape[0]
    grid, _ = _sizes(sigma)
    # The reflected signal has 3 G - 2 points; a circular convolution that long is exact
    # there. Most bandwidths have the base grid, whose FFT is 8x shorter than the finest's.
    fft = 1 << math.ceil(math.log2(3 * capacity - 2))
    # Reflected without repeating the end points, as [flip(v)[:-1], v, flip(v)[1:]].
    e = jnp.arange(fft, dtype=jnp.int32) - (grid - 1)
    g = jnp.abs(e)
    g = jnp.where(g > grid - 1, 2 * (grid - 1) - g, g)
    extended = jnp.where((e < 2 * grid - 1)[:, None], values[jnp.clip(g, 0, capacity - 1)], 0.0)
    kernel = _kernel(jnp.arange(fft, dtype=jnp.int32), grid, sigma).astype(dtype)
    spectrum = jnp.fft.rfft(extended, axis=0) * jnp.fft.rfft(kernel)[:, None]
    full = jnp.fft.irfft(spectrum, n=fft, axis=0).astype(dtype)
    # np.convolve(extended, kernel, "valid")[G // 2 : G // 2 + G]
    return _interpolated(lambda i: full[grid // 2 + grid - 1 + i], grid, points)


def _convolved_directly(values, sigma, points):
    """:func:`_convolved` by direct sums: exact to each value's own precision.

    The FFT's rounding is relative to the largest smoothed value; a curve that divides
    by the density plus 1e-4 magnifies it where no row is near (accuracies of -2847 came
    out in float32). Smoothed grid point ``i`` is ``sum_m kernel[m] v[r(G // 2 + i - m)]``
    (``r`` the reflection at both ends): grid point ``j`` receives from ``m`` with
    ``G // 2 + i - m`` one of ``j``, ``-j`` and ``2 (G - 1) - j`` (``values`` is 0 beyond
    the G points). Rows of that matrix are built and multiplied ``_POINTS_CHUNK`` at a time,
    for the two grid points around each of ``points`` or, when fewer, for every point of
    ``values`` (memory and time bounded by its length, whatever the number of points).
    """
    grid, _ = _sizes(sigma)
    capacity = values.shape[0]
    j = jnp.arange(capacity, dtype=jnp.int32)

    def row(i):
        taps = _kernel(grid // 2 + i - j, grid, sigma)
        taps = taps + jnp.where(j > 0, _kernel(grid // 2 + i + j, grid, sigma), 0.0)
        mirrored = _kernel(grid // 2 + i - 2 * (grid - 1) + j, grid, sigma)
        return taps + jnp.where(j < grid - 1, mirrored, 0.0)

    def at(i):
        return jnp.matmul(row(i).astype(values.dtype), values, precision=lax.Precision.HIGHEST)

    def smoothed(i):
        if i.shape[0] < capacity:
            return lax.map(at, i, batch_size=_POINTS_CHUNK)
        return lax.map(at, j, batch_size=_POINTS_CHUNK)[i]

    return _interpolated(smoothed, grid, points)


def _kernel(m, grid, sigma):
    """relplot's Gaussian taps: the density at ``m / (G - 1) - 1/2`` for ``0 <= m < G``,
    else 0."""
    last = (grid - 1).astype(sigma.dtype)
    taps = jnp.exp(-((m.astype(last.dtype) / last - 0.5) ** 2) / (2 * sigma**2)) / (
        float(np.sqrt(2 * np.pi)) * sigma  # (a NumPy float64 is no weak type)
    )
    return jnp.where((m >= 0) & (m < grid), taps, 0.0)


def _interpolated(smoothed, grid, points):
    """``smoothed(i)`` (the smoothed grid's points ``i``) interpolated linearly at ``points``."""
    last = (grid - 1).astype(points.dtype)
    inds = jnp.clip(jnp.trunc(points * last), 0, last - 1).astype(jnp.int32)
    residual = (points - inds.astype(last.dtype) / last) * last
    lo, hi = jnp.split(smoothed(jnp.concatenate([inds, inds + 1])), 2)
    return lo * (1 - residual)[:, None] + hi * residual[:, None]


def _smece_at(f, columns, sigma, base):
    """relplot's smECE_sigma of the rows' ``columns`` (see :func:`_smece_columns`).

    ``base`` is their spread on the base grid, computed once for every bandwidth that has it.
    """

    def use(spread, coarse):
        return _smece_on(spread, sigma, _BASE_MESH if coarse else _MESH)

    return _on_grid(f, columns, sigma, use, base)


def _smece_on(values, sigma, capacity):
    """smECE_sigma from the spread ``values``, on a mesh of at most ``capacity`` points."""
    _, mesh = _sizes(sigma)
    e = jnp.arange(capacity, dtype=jnp.int32)
    # (In the values' dtype: int32 / int32 is float32 even under x64.)
    points = jnp.minimum(e.astype(values.dtype) / jnp.maximum(mesh - 1, 1).astype(values.dtype), 1)
    smoothed = _convolved(values, sigma, points)
    inside = e < mesh
    density = smoothed[:, 1] + _EPS
    ratio = smoothed[:, 0] / density
    total = jnp.sum(jnp.where(inside, jnp.abs(ratio) * density, 0.0))
    return total / jnp.sum(jnp.where(inside, density, 0.0))


def _smece_columns(residual, weights):
    w = weights.astype(residual.dtype)
    return jnp.stack([_cal._weighted(w, residual), w], axis=1)


def _bandwidth(f, residual, weights):
    """relplot's fixed point: 10 bisection steps on sigma < smECE_sigma, and smECE there."""
    dtype = residual.dtype

    def passes(sigma, value):
        return (sigma < _SMALLEST) | (sigma < value)

    one = jnp.ones((), dtype)
    columns = _smece_columns(residual, weights)
    base = _spread(f, columns, jnp.int32(_BASE_GRID), _BASE_GRID)
    at_one = _smece_at(f, columns, one, base)

    def step(_, state):
        start, end, value = state
        mid = (start + end) / 2
        at_mid = _smece_at(f, columns, mid, base)
        ok = passes(mid, at_mid)
        return jnp.where(ok, start, mid), jnp.where(ok, mid, end), jnp.where(ok, value, at_mid)

    start, _, value = lax.fori_loop(0, _STEPS, step, (one, jnp.zeros((), dtype), at_one))
    done = passes(one, at_one)
    return jnp.where(done, one, start), jnp.where(done, at_one, value)


def _smooth_rows(probs, labels, where):
    confidence, hit, flag = _cal._top1(probs, labels, where)
    return (confidence, hit), flag


def _smooth_reduce(statistics, weights):
    confidence, hit = statistics
    return _bandwidth(confidence, confidence - hit, weights)[1]


_SMOOTH = _cal._Metric(_smooth_rows, _smooth_reduce, batched=False)


@_sharding.auto_axes()
def smooth_calibration_error(
    probs: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Smooth ECE of the top-1 confidence (Błasiok and Nakkiran 2023).

    With the confidence ``c_i = max_k p_ik``, the residual ``r_i = c_i - hit_i``
    and a Gaussian kernel ``K_sigma`` reflected at 0 and 1,

    .. math::
        \hat r_\sigma(t) = \frac{\sum_i K_\sigma(t, c_i)\, r_i}{\sum_i K_\sigma(t, c_i)},
        \qquad
        \mathrm{smECE}_\sigma = \int_0^1 |\hat r_\sigma(t)|\, \hat\delta_\sigma(t)\, dt,

    where ``\hat\delta_\sigma`` is the kernel density of the confidences, and
    the reported error is ``smECE_sigma*`` at the fixed point
    ``smECE_sigma* = sigma*``, found by bisection. It is computed as
    ``relplot.smECE`` computes it: 10 bisection steps on
    ``sigma < smECE_sigma`` from ``[0, 1]`` keeping the upper end, the rows
    spread linearly onto a grid of ``max(2000, round(20 / sigma)) // 2 + 1``
    points, the kernel cut at distance 1/2, ``1e-4`` added to the smoothed
    density, and the integral a mean over ``max(round(10 / sigma), 200)``
    points of [0, 1].

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding.

    Returns:
      A scalar in [0, 1] (float32, float64 for float64 ``probs``); 0 when no
      row is kept. :func:`smooth_reliability_diagram` gives the bandwidth and
      the smoothed curve.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (4000, 5))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> calibrated = jsoftmax.smooth_calibration_error(jax.nn.softmax(logits), labels)
      >>> overconfident = jsoftmax.smooth_calibration_error(jax.nn.softmax(3 * logits), labels)
      >>> bool(calibrated < 0.03 < overconfident)
      True

    Note:
      Every bisection step convolves a grid of up to 10,241 points by FFT,
      so it costs ``11 * (N + 32768 log 32768)`` operations whatever ``N``.

    References:
      Błasiok and Nakkiran, `Smooth ECE: Principled Reliability Diagrams via
      Kernel Smoothing <https://arxiv.org/abs/2309.12236>`_, ICLR 2024.
    """
    fname = "smooth_calibration_error"
    probs, labels, where = _cal._rows(fname, probs, labels, where, "probs")
    return _cal._evaluate(_SMOOTH, (), probs, labels, where)


class SmoothReliabilityDiagram(NamedTuple):
    """A kernel-smoothed reliability diagram (see :func:`smooth_reliability_diagram`).

    Attributes:
      grid: ``[P]`` points ``t`` of [0, 1] where the curve is evaluated.
      accuracy: ``[P]`` smoothed accuracy ``E[hit | c = t]``.
      density: ``[P]`` kernel density of the confidences.
      bandwidth: the kernel's ``sigma*``.
      calibration_error: the smooth ECE at ``sigma*``.
    """

    grid: jax.Array
    accuracy: jax.Array
    density: jax.Array
    bandwidth: jax.Array
    calibration_error: jax.Array


def _num_points(fname, num_points):
    return _checks.static_int(fname, "num_points", num_points, 2)


def _curve(confidence, hit, weights, sigma, num_points):
    """Smoothed accuracy (relplot's kernel regression) and density at ``num_points`` points."""
    dtype = hit.dtype
    grid = jnp.linspace(0, 1, num_points, dtype=dtype)
    w = weights.astype(dtype)
    columns = jnp.stack([_cal._weighted(w, hit), w / jnp.maximum(jnp.sum(w), 1)], axis=1)
    columns = jnp.concatenate([columns, w[:, None]], axis=1)
    smoothed = _on_grid(
        confidence, columns, sigma, lambda spread, _: _convolved_directly(spread, sigma, grid)
    )
    accuracy = smoothed[:, 0] / (smoothed[:, 2] + _EPS)
    return grid, accuracy, smoothed[:, 1]


@functools.partial(jax.jit, static_argnames=("num_points",))
def _smooth_diagram(probs, labels, where, num_points):
    (confidence, hit), flag = _smooth_rows(probs, labels, where)
    # An infinite confidence too: the smooth error is NaN, not infinite as binned.
    flag = _cal._poisoned(flag, confidence, lambda c: ~jnp.isfinite(c))
    weights = where.astype(jnp.int32)
    sigma, error = _bandwidth(confidence, confidence - hit, weights)
    grid, accuracy, density = _curve(confidence, hit, weights, sigma, num_points)
    return SmoothReliabilityDiagram(
        grid, accuracy * flag, density * flag, sigma * flag, error * flag
    )


@_sharding.auto_axes()
def smooth_reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    num_points: int = 200,
) -> SmoothReliabilityDiagram:
    r"""The kernel-smoothed reliability curve behind :func:`smooth_calibration_error`.

    .. math::
        \widehat{\mathrm{acc}}(t) = \frac{\sum_i K_{\sigma^\star}(t, c_i)\, \mathrm{hit}_i}
        {\sum_i K_{\sigma^\star}(t, c_i) + 10^{-4}}

    with the reflected Gaussian kernel and bandwidth of the smooth ECE: the fit
    on all the rows of ``relplot.prepare_rel_diagram``, which relplot draws
    with ``plot_confidence_band=False`` (by default it draws the mean of its
    bootstrap fits).

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding.
      num_points: ``P >= 2`` evenly spaced points of [0, 1] (static).

    Returns:
      A :class:`SmoothReliabilityDiagram` (all NaN but the grid for a NaN or
      infinite probability in a kept row or a traced bad label). Plot it with
      :func:`jsoftmax.plot.smooth_reliability_diagram`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
      >>> diagram = jsoftmax.smooth_reliability_diagram(probs, jnp.array([0, 1, 1, 0]))
      >>> diagram.grid.shape, diagram.accuracy.shape
      ((200,), (200,))

    References:
      Błasiok and Nakkiran, `Smooth ECE: Principled Reliability Diagrams via
      Kernel Smoothing <https://arxiv.org/abs/2309.12236>`_, ICLR 2024.
    """
    fname = "smooth_reliability_diagram"
    num_points = _num_points(fname, num_points)
    probs, labels, where = _cal._rows(fname, probs, labels, where, "probs")
    return _smooth_diagram(probs, labels, where, num_points)


# ---------------------------------------------------------------- bootstrap


def _binned_plan(fname, kind):
    def plan(num_bins=15):
        return _cal._BINNED, (_cal._num_bins(fname, num_bins), kind)

    return plan


def _plain_plan(metric):
    def plan():
        return metric, ()

    return plan


def _debiased_plan(num_bins=15, mode="top-label"):
    fname = "debiased_calibration_error"
    return _DEBIASED, (_cal._num_bins(fname, num_bins), _mode(fname, mode))


def _sorted_plan(fname, metric):
    def plan(num_bins=15):
        return metric, (_cal._num_bins(fname, num_bins),)

    return plan


_PLANS: dict[Callable[..., Any], Callable[..., tuple[_cal._Metric, tuple]]] = {
    _cal.expected_calibration_error: _binned_plan("expected_calibration_error", "sum"),
    _cal.maximum_calibration_error: _binned_plan("maximum_calibration_error", "max"),
    _cal.adaptive_calibration_error: _sorted_plan("adaptive_calibration_error", _cal._ADAPTIVE),
    _cal.classwise_calibration_error: _sorted_plan("classwise_calibration_error", _cal._CLASSWISE),
    _cal.brier_score: _plain_plan(_cal._BRIER),
    negative_log_likelihood: _nll_plan,
    smooth_calibration_error: _plain_plan(_SMOOTH),
    debiased_calibration_error: _debiased_plan,
}


def _plan(metric):
    function, options = metric, {}
    if isinstance(metric, functools.partial):
        if metric.args:
            raise TypeError(
                f"bootstrap: metric may fix keyword options only, got positional {metric.args!r}"
            )
        function, options = metric.func, dict(metric.keywords)
    plan = next((p for f, p in _PLANS.items() if f is function), None)
    if plan is None:
        names = ", ".join(f.__name__ for f in _PLANS)
        raise TypeError(f"bootstrap: metric must be one of jsoftmax's {names}; got {metric!r}")
    if "where" in options:
        raise TypeError("bootstrap: pass where to bootstrap, not to the metric")
    known = set(inspect.signature(function).parameters) - {"probs", "labels", "where"}
    if unknown := sorted(set(options) - known):
        raise TypeError(
            f"bootstrap: {function.__name__} has no option {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(known)) or 'none'})"
        )
    return plan(**options)


def _high_product(a, b):
    """``(a * b) >> 32`` of uint32 arrays, from 16-bit halves."""
    a_hi, a_lo, b_hi, b_lo = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    cross, other = a_hi * b_lo, a_lo * b_hi
    carry = ((cross & 0xFFFF) + (other & 0xFFFF) + ((a_lo * b_lo) >> 16)) >> 16
    return a_hi * b_hi + (cross >> 16) + (other >> 16) + carry


def _counts(key, where):
    """How often each row is drawn when ``n`` rows are drawn with replacement among the kept.

    A draw maps one random 32-bit word ``u`` to ``floor(u n / 2**32)``: every
    row's chance is ``1/n`` within ``1 / 2**32`` (``jax.random.randint`` spends
    two words on each draw, which doubles the cost of a resample).
    """
    num_rows = where.shape[0]
    n = jnp.sum(where, dtype=jnp.int32)
    kept = jnp.nonzero(where, size=num_rows, fill_value=0)[0]
    words = jax.random.bits(key, (num_rows,), jnp.uint32)
    draws = _high_product(words, n.astype(jnp.uint32)).astype(jnp.int32)
    drawn = (jnp.arange(num_rows, dtype=jnp.int32) < n).astype(jnp.int32)
    return jnp.zeros(num_rows, jnp.int32).at[kept[draws]].add(drawn)


def _over_resamples(fn, key, where, num_resamples, width=1, batched=True):
    """``fn(counts)`` for each resample, batched to bound memory (``width``: the statistics'
    entries per row, ``K`` for the per-class metrics), or one at a time."""
    keys = jax.random.split(key, num_resamples)
    batch = max(1, min(num_resamples, _BATCH_ELEMENTS // max(where.shape[0] * width, 1)))
    batch = batch if batched else None
    return lax.map(lambda k: fn(_counts(k, where)), keys, batch_size=batch)


def _interval(values, level):
    """The percentiles of ``values`` (over the first axis) at the level's two ends, linearly
    interpolated as ``jnp.quantile``'s, but ``a`` where the position is whole or both
    neighbours are ``a`` (its interpolation was ``inf - inf``, NaN, between infinite
    resamples); NaN if any resample is."""
    ordered = jnp.sort(values, axis=0)
    position = np.array([(1 - level) / 2, (1 + level) / 2]) * (values.shape[0] - 1)
    below = np.floor(position).astype(int)
    whole = jnp.asarray((position == below).reshape((2,) + (1,) * (values.ndim - 1)))
    fraction = jnp.asarray(position - below, values.dtype).reshape(whole.shape)
    a, b = ordered[below], ordered[np.minimum(below + 1, values.shape[0] - 1)]
    # (1 - f) a + f b: no b - a, which overflows or is NaN beside an infinity.
    quantiles = jnp.where(whole | (a == b), a, (1 - fraction) * a + fraction * b)
    return jnp.where(jnp.any(jnp.isnan(values), axis=0), jnp.nan, quantiles)


_INTERVALS = ("percentile", "basic")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _bootstrap(metric, options, num_resamples, level, interval, probs, labels, where, key):
    statistics, flag = metric.rows(probs, labels, where, *options)
    estimate = metric.reduce(statistics, where.astype(jnp.int32), *options)
    if metric.prepare is not None:
        statistics = metric.prepare(statistics)
    values = _over_resamples(
        lambda counts: metric.reduce(statistics, counts, *options),
        key,
        where,
        num_resamples,
        max(x.size // max(where.shape[0], 1) for x in jax.tree.leaves(statistics)),
        metric.batched,
    )
    low, high = _interval(values, level)
    if interval == "basic":  # (m - (Q - m): inf only where m is, NaN where both are)
        low, high = estimate - (high - estimate), estimate - (low - estimate)
    return estimate * flag, low * flag, high * flag


def _resamples(fname, num_resamples, level):
    """The static ``num_resamples`` and ``level`` as Python numbers (concrete NumPy or JAX
    scalars too)."""
    num_resamples = _checks.static_int(fname, "num_resamples", num_resamples, 1)
    kinds = (jnp.integer, jnp.floating)
    if not 0 < float(_checks.static_scalar(fname, "level", level, "a number", *kinds)) < 1:
        raise ValueError(f"{fname}: level must be in (0, 1), got {level!r}")
    return num_resamples, float(level)


@_sharding.auto_axes()
def bootstrap(
    metric: Callable[..., jax.Array],
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    key: ArrayLike,
    num_resamples: int = 1000,
    level: float = 0.95,
    where: ArrayLike | None = None,
    interval: str = "percentile",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""A metric and its bootstrap interval over resamples of the rows.

    Each resample draws ``N`` rows with replacement among the ``N`` kept rows;
    with the metric ``m`` of the rows and ``m_r`` of resample ``r``, and
    ``Q_lo, Q_hi`` the quantiles of ``m_1, ..., m_R`` at ``(1 - level) / 2`` and
    ``(1 + level) / 2`` (linearly interpolated, as ``jnp.quantile``'s), the
    interval is

    .. math::
        [Q_{lo},\ Q_{hi}] \ \text{("percentile")} \qquad \text{or} \qquad
        [2m - Q_{hi},\ 2m - Q_{lo}] \ \text{("basic")}.

    A resample is the number of times each row is drawn: the metric's per-row
    statistics are computed once and reduced with those counts as weights,
    never copying the ``[N, K]`` probabilities.

    Which interval: a resample adds sampling noise, which a calibration
    error reads as miscalibration, so the resamples' errors lie above the
    rows' (of calibrated models at 200-2000 rows x 4 classes, the percentile
    interval's midpoint was 1.3-1.4x the ECE and smooth ECE, 2.2-3.3x the
    debiased error). The basic interval reflects that shift about the
    estimate, as the ``uncertainty-calibration`` package of Kumar et al.
    reports its intervals; its low end may be negative, and it holds the
    estimate exactly when the percentile interval does. The percentile
    interval suits metrics without that bias (the Brier score, the NLL).

    Args:
      metric: one of :func:`jsoftmax.expected_calibration_error`,
        :func:`jsoftmax.maximum_calibration_error`,
        :func:`jsoftmax.adaptive_calibration_error`,
        :func:`jsoftmax.classwise_calibration_error`,
        :func:`jsoftmax.brier_score`, :func:`jsoftmax.negative_log_likelihood`,
        :func:`jsoftmax.smooth_calibration_error` or
        :func:`jsoftmax.debiased_calibration_error`, or a ``functools.partial``
        of one fixing its keyword options (``num_bins``, ``mode``, ``log_input``).
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]`` in ``[0, K)``.
      key: a ``jax.random`` key; the same key gives the same interval.
      num_resamples: ``R >= 1`` (static).
      level: the interval's coverage in (0, 1) (static).
      where: boolean ``[N]``; False rows are padding and never drawn.
      interval: "percentile" or "basic" (static), as above.

    Returns:
      ``(estimate, low, high)``: the metric on the kept rows and the
      interval's ends, scalars of the metric's dtype. The ends are NaN when
      a resample is NaN (and a basic end where the estimate and a quantile
      are both infinite); all three are NaN for traced out-of-range labels.

    Examples:
      >>> import functools, jax
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (2000, 5))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> ece = functools.partial(jsoftmax.expected_calibration_error, num_bins=10)
      >>> estimate, low, high = jsoftmax.bootstrap(
      ...     ece, jax.nn.softmax(3 * logits), labels, key=jax.random.key(2), num_resamples=200
      ... )
      >>> bool(low < estimate < high)
      True

    Note:
      It works under ``jax.jit`` with a traced key. The resamples are reduced
      in batches of ``max(1, 2**22 // N)`` (``2**22 // (N K)`` for the
      per-class metrics); the smooth ECE repeats its
      bisection for every resample, so it costs far more than the binned
      metrics.

    References:
      Efron and Tibshirani, *An Introduction to the Bootstrap*, Chapman & Hall,
      1993, chapter 13 (percentile intervals); Davison and Hinkley, *Bootstrap
      Methods and their Application*, Cambridge University Press, 1997,
      section 5.2 (basic intervals); Kumar, Liang and Ma, `Verified Uncertainty
      Calibration <https://arxiv.org/abs/1909.10155>`_, NeurIPS 2019.
    """
    fname = "bootstrap"
    spec, options = _plan(metric)
    num_resamples, level = _resamples(fname, num_resamples, level)
    interval = _checks.choice(fname, "interval", interval, _INTERVALS)
    probs, labels, where = _cal._rows(fname, probs, labels, where, "probs")
    key = _checks.random_key(fname, key)
    return _bootstrap(spec, options, num_resamples, level, interval, probs, labels, where, key)


@_sharding.auto_axes()  # (plot.smooth_reliability_diagram)
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _smooth_band(num_resamples, level, num_points, probs, labels, where, key):
    """A smoothed diagram and the percentile band of its curve at the same bandwidth."""
    diagram = _smooth_diagram(probs, labels, where, num_points)
    (confidence, hit), _ = _smooth_rows(probs, labels, where)

    def curve(counts):
        return _curve(confidence, hit, counts, diagram.bandwidth, num_points)[1]

    low, high = _interval(_over_resamples(curve, key, where, num_resamples), level)
    return diagram, low, high
