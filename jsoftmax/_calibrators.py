r"""Calibrators beyond one temperature: fits that return a pytree, and :func:`calibrate`.

Every ``fit_*`` takes validation logits ``[N, K]``, integer labels ``[N]`` and
an optional row mask ``where`` (False rows are padding), runs under
``jax.jit`` and ``jax.vmap`` (stacked problems fit as one batched iteration)
and returns a calibrator: a ``NamedTuple`` of arrays, so it can be stacked,
saved and passed through transformations like any pytree.
:func:`calibrate` applies any of them to new logits and returns
log-probabilities.

The parametric calibrators (vector, matrix and Dirichlet scaling) minimise a
convex objective, the mean negative log-likelihood plus their penalty, by
L-BFGS (:func:`_minimize`) from the identity map (scaled down where the logits
spread past ``_START_SPREAD``; see :func:`_fit_affine`), until the gradient's largest
entry is below ``_GRADIENT_TOL`` times the objective's scale or no step
decreases it (the dtype's precision is reached). They run on standardised
features (the weights absorb the spread, the bias the mean), which changes the
problem's conditioning, not its optimum. A class whose logit is
``-inf`` stays impossible after calibration, and its input never enters a
product (it is read as the row's smallest finite logit). A row holding
``+inf`` is certain, as in :func:`jsoftmax.softmax` (its ``+inf`` classes
share the mass, the others are impossible), and no calibrator moves it; a
row with every class ``-inf`` predicts nothing and is padding, as the losses
count it. A NaN logit or a traced bad label in a kept row makes the
calibrator NaN, and so does an impossible label for the likelihood fits
(its NLL is infinite under every calibrator); padding rows never reach a fit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from jsoftmax import _checks, _cpu, _losses, _sharding
from jsoftmax._calibration import (
    _bin_index,
    _bounds,
    _certain,
    _fit_rows,
    _mean,
    _power_of_two_above,
    _rows,
    _scale,
)
from jsoftmax._calibration import _num_bins as _checked_num_bins

_MAX_ITERATIONS = 500
_HISTORY = 10
_HALVINGS = 50  # of a step, before the line search gives up: no step decreases the objective
_START_SPREAD = 16.0
# The affine fits on 4 times as many rows as the larger of these start on a sample of
# that many rows (_fit_affine), never fewer than 32 per parameter (a smaller sample
# may be separable: its optimum at infinity).
_SAMPLE_ROWS = 2**16
_SAMPLE_PER_PARAMETER = 32
# calibrate's per-row values that reverse mode keeps (jax.checkpoint_name).
_ROW = "jsoftmax_row"
_GRADIENT_TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float64): 1e-9}


class VectorScaling(NamedTuple):
    """``log_softmax(scale * logits + bias)``; :func:`fit_vector_scaling`'s result.

    Attributes:
      scale: ``[K]`` per-class scale.
      bias: ``[K]`` per-class bias.
    """

    scale: jax.Array
    bias: jax.Array


class MatrixScaling(NamedTuple):
    """``log_softmax(logits @ weight + bias)``; :func:`fit_matrix_scaling`'s result.

    Attributes:
      weight: ``[K, K]``.
      bias: ``[K]``.
    """

    weight: jax.Array
    bias: jax.Array


class DirichletCalibration(NamedTuple):
    """``log_softmax(log_softmax(logits) @ weight + bias)``; see :func:`fit_dirichlet_calibration`.

    Attributes:
      weight: ``[K, K]``.
      bias: ``[K]``.
    """

    weight: jax.Array
    bias: jax.Array


class EnsembleTemperature(NamedTuple):
    """A mixture of the tempered, raw and uniform predictions; see :func:`fit_ensemble_temperature`.

    Attributes:
      temperature: scalar ``T``.
      weights: ``[3]`` on the simplex: of ``softmax(logits / T)``, of
        ``softmax(logits)`` and of the uniform distribution (:func:`calibrate`
        mixes non-negative weights off it as their normalised ones, and gives
        NaN for a negative one or all zero).
    """

    temperature: jax.Array
    weights: jax.Array


class HistogramBinning(NamedTuple):
    """One-vs-rest histogram binning; see :func:`fit_histogram_binning`.

    Attributes:
      values: ``[K, M]``, the calibrated probability of class ``k`` for a
        predicted probability in bin ``m`` (the bins of
        :func:`jsoftmax.expected_calibration_error`).
    """

    values: jax.Array


class IsotonicCalibration(NamedTuple):
    """One-vs-rest isotonic regression; see :func:`fit_isotonic`.

    Attributes:
      thresholds: ``[K, N]``, each class's fitted predicted probabilities,
        sorted (the first ``count`` entries are fitted rows).
      values: ``[K, N]``, the non-decreasing fitted values at the thresholds.
      count: scalar, the number of fitted rows.
    """

    thresholds: jax.Array
    values: jax.Array
    count: jax.Array


Calibrator = (
    VectorScaling
    | MatrixScaling
    | DirichletCalibration
    | EnsembleTemperature
    | HistogramBinning
    | IsotonicCalibration
)


@_sharding.auto_axes(_sharding.sharded_like("logits"))
def calibrate(calibrator: Calibrator | ArrayLike, logits: ArrayLike) -> jax.Array:
    """Applies a fitted calibrator to logits and returns log-probabilities.

    Args:
      calibrator: the result of one of the ``fit_*`` functions
        (:func:`jsoftmax.fit_temperature`'s temperature too).
      logits: floating ``[..., K]`` (the uncalibrated model's).

    Returns:
      Calibrated log-probabilities ``[..., K]`` (float32, float64 for float64
      logits): ``jnp.exp`` of them sums to 1 over the last axis. A class with
      ``-inf`` logit keeps log-probability ``-inf``; the histogram and
      isotonic calibrators can also give ``-inf`` (a calibrated probability
      of 0) and, where every class maps to 0, the uniform distribution (as
      scikit-learn's ``CalibratedClassifierCV`` does).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (1000, 4))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> calibrator = jsoftmax.fit_vector_scaling(2.0 * logits, labels)
      >>> jsoftmax.calibrate(calibrator, 2.0 * logits).shape
      (1000, 4)
    """
    fname = "calibrate"
    logits = _checks.floating(fname, "logits", logits)
    if logits.ndim == 0:
        raise ValueError(f"{fname}: logits must have a class axis, got shape ()")
    dtype = _checks.compute_dtype(logits.dtype)
    if not isinstance(calibrator, Calibrator):
        calibrator = _temperature_scaling(fname, calibrator, logits.shape, dtype)
    calibrator = _as_arrays(fname, calibrator, dtype)
    _check_shapes(fname, calibrator, logits.shape)
    if logits.shape[-1] == 0:  # (no class has a log-probability)
        return jnp.zeros(logits.shape, dtype)
    flat = logits.reshape(-1, logits.shape[-1])
    return _apply(calibrator, flat).reshape(logits.shape)


def _temperature_scaling(fname, temperature, shape, dtype):
    """:func:`jsoftmax.fit_temperature`'s result as the calibrator it is: the ensemble of
    its scaled member alone, ``log_softmax(logits / T)``."""
    try:
        t = _checks.real(fname, "calibrator", temperature)
    except TypeError:
        t = None
    if t is None or t.ndim != 0:
        raise TypeError(
            f"{fname}: calibrator must be one of the fit_* functions' results (a scalar "
            f"temperature for fit_temperature), got {type(temperature).__name__}"
        )
    t = _checks.temperature(
        fname, temperature, shape, (len(shape) - 1,), dtype, name="calibrator (a temperature)"
    )
    return EnsembleTemperature(t, jnp.array([1.0, 0.0, 0.0], dtype))


def _as_arrays(fname, calibrator, dtype):
    """The calibrator with each field an array: floating in the logits' compute ``dtype``,
    or integer for the isotonic count (a hand-built one of lists, strings or complex
    numbers failed inside JAX)."""
    fields = []
    for field, value in zip(calibrator._fields, calibrator, strict=True):
        name = f"{type(calibrator).__name__}.{field}"
        if field == "count":
            value = _checks.array(fname, name, value)
            if not jnp.issubdtype(value.dtype, jnp.integer):
                raise TypeError(f"{fname}: {name} must be an integer, got dtype {value.dtype}")
        else:
            value = _checks.real(fname, name, value).astype(dtype)
        fields.append(value)
    return type(calibrator)(*fields)


def _check_shapes(fname, calibrator, shape):
    """Raises ``ValueError`` unless the calibrator's arrays have the shapes that logits of
    ``shape`` need (one calibrator: a stacked one applies under ``jax.vmap``)."""
    k = shape[-1]
    n = None  # any length, the same in every array that has it
    if isinstance(calibrator, VectorScaling):
        needs = ((k,), (k,))
    elif isinstance(calibrator, MatrixScaling | DirichletCalibration):
        needs = ((k, k), (k,))
    elif isinstance(calibrator, EnsembleTemperature):
        needs = ((), (3,))
    elif isinstance(calibrator, HistogramBinning):
        needs = ((k, n),)
    else:
        needs = ((k, n), (k, n), ())
    free = set()
    for field, need in zip(calibrator._fields, needs, strict=True):
        got = jnp.shape(getattr(calibrator, field))
        pairs = list(zip(got, need, strict=True)) if len(got) == len(need) else None
        free |= {g for g, w in pairs or () if w is None}
        if pairs is None or any(w not in (g, None) for g, w in pairs) or len(free) > 1:
            raise ValueError(
                f"{fname}: {type(calibrator).__name__}.{field} has shape {got} but logits "
                f"{shape} need {str(need).replace('None', 'n')}"
            )
    # What no fit returns, and calibrate would read as NaN or the identity.
    if isinstance(calibrator, HistogramBinning) and jnp.shape(calibrator.values)[-1] == 0:
        raise ValueError(
            f"{fname}: HistogramBinning.values has no bin, got shape {jnp.shape(calibrator.values)}"
        )
    if isinstance(calibrator, IsotonicCalibration) and not _checks.is_traced(calibrator.count):
        size = jnp.shape(calibrator.thresholds)[-1]
        if not 0 <= int(calibrator.count) <= size:
            raise ValueError(
                f"{fname}: IsotonicCalibration.count must be in [0, {size}] (the "
                f"thresholds' length), got {calibrator.count}"
            )


@jax.jit
@functools.partial(
    jax.checkpoint,
    prevent_cse=False,
    policy=jax.checkpoint_policies.save_only_these_names(_ROW),
)
def _apply(calibrator, logits):
    # Reverse mode keeps the logits as given and the per-row vectors named _ROW
    # (maxima, normalisers): the backward pass recomputes the rest elementwise.
    x, top = _certain(logits.astype(_checks.compute_dtype(logits.dtype)))
    top = checkpoint_name(top, _ROW)
    # No calibrator moves a certain row, nor gives a row without a possible class one:
    # that row is calibrated as zeros, whose gradient is not NaN, then set to -inf. (Not
    # from the max: on CPU it may drop a NaN, whose row must stay NaN.)
    empty = jnp.all(x == -jnp.inf, axis=-1, keepdims=True)
    x = jnp.where(empty, 0.0, x)
    possible = x != -jnp.inf
    log_q = _calibrated(calibrator, x, possible)
    log_q = jnp.where(top == jnp.inf, _log_softmax(x, possible), log_q)
    return jnp.where(empty, -jnp.inf, log_q)


def _calibrated(calibrator, x, possible):
    """The calibrator's log-probabilities of logits ``x`` (no ``+inf``) with some possible class."""
    if isinstance(calibrator, VectorScaling):
        return _log_softmax(calibrator.scale * _features(x) + calibrator.bias, possible)
    if isinstance(calibrator, MatrixScaling):
        return _log_softmax(_features(x) @ calibrator.weight + calibrator.bias, possible)
    if isinstance(calibrator, DirichletCalibration):
        log_p = _features(_log_softmax(x, possible))
        return _log_softmax(log_p @ calibrator.weight + calibrator.bias, possible)
    if isinstance(calibrator, EnsembleTemperature):
        t = calibrator.temperature
        members = (
            # (A temperature <= 0, never fitted, gives NaN as everywhere else.)
            _log_softmax(_scale(x, _checks.nan_unless(t > 0, t)), possible),
            _log_softmax(x, possible),
            -jnp.log(_possible_count(possible, x.dtype)),
        )
        # Weights off the simplex (a gradient step) mix as their normalised ones, divided
        # in logs (w / sum(w) would carry a weight of 0's derivative, which overflows
        # past float32, into the others'); a negative weight makes no mixture: NaN.
        w = calibrator.weights
        total = _checks.nan_unless(jnp.all(w >= 0), jnp.sum(w))
        return _log_mixture(w, members, possible) - jnp.log(total)
    p = jnp.exp(_log_softmax(x, possible))
    if isinstance(calibrator, HistogramBinning):
        index = _bin_index(p, calibrator.values.shape[-1])
        q = jnp.take_along_axis(calibrator.values, index.T, axis=1).T
    else:
        q = jax.vmap(_interpolate, (0, 0, None, 1), 1)(
            calibrator.thresholds, calibrator.values, calibrator.count, p
        )
    # An impossible class's bin or step may still be > 0; a NaN logit's row stays NaN.
    q = jnp.where(jnp.isnan(p), p, jnp.where(possible, q, 0.0))
    total = jnp.sum(q, axis=-1, keepdims=True)
    # (Not the log of a 0: its gradient would be NaN on a flat step of the isotonic fit.)
    log_q = jnp.where(q == 0, -jnp.inf, jnp.log(jnp.where(q == 0, 1.0, q)))
    log_q = log_q - jnp.log(jnp.where(total > 0, total, 1.0))
    return jnp.where(total == 0, jnp.log(_uniform(possible, x.dtype)), log_q)


def _log_mixture(weights, members, possible):
    """``log(sum_j weights[j] exp(members[j]))`` on the possible classes, ``-inf`` elsewhere.

    Shifted by the largest member of positive weight, so a probability below the
    dtype's smallest keeps its log (the mixture of probabilities would round it to 0).
    """
    top = functools.reduce(
        jnp.maximum, [jnp.where(weights[j] > 0, m, -jnp.inf) for j, m in enumerate(members)]
    )
    top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    # A member of weight 0 may lie far above: capped, its exp is finite and 0 * exp is 0.
    cap = jnp.log(jnp.finfo(top.dtype).max) - 1
    total = sum(weights[j] * jnp.exp(jnp.minimum(m - top, cap)) for j, m in enumerate(members))
    # (Not the log of an impossible class's 0: its gradient would be NaN.) A NaN logit's
    # row is NaN, its impossible classes too, as under the other calibrators.
    out = jnp.where(possible, top + jnp.log(jnp.where(possible, total, 1.0)), -jnp.inf)
    return jnp.where(jnp.isnan(total), jnp.nan, out)


def _possible_count(possible, dtype):
    """Each row's number of possible classes (``[..., 1]``; 1 for a row without one)."""
    return jnp.maximum(jnp.sum(possible, axis=-1, keepdims=True, dtype=dtype), 1)


def _uniform(possible, dtype):
    """The uniform distribution over each row's possible classes (0 for a row without one)."""
    return jnp.where(possible, 1 / _possible_count(possible, dtype), 0.0)


def _log_softmax(z, possible):
    """``log_softmax`` over the possible classes (``-inf`` elsewhere); a calibrated logit
    past the float range (``+inf``) makes its row certain, as in :func:`jsoftmax.softmax`.
    Shifted by the row's max before the sum (``z - logsumexp(z)`` rounds: 1e8 and 1e8
    gave 0 and 0)."""
    z, top = _certain(jnp.where(possible, z, -jnp.inf))
    m = checkpoint_name(lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0)), _ROW)
    shifted = z - m
    return shifted - checkpoint_name(jnp.log(jnp.sum(jnp.exp(shifted), -1, keepdims=True)), _ROW)


def _features(x):
    """``x`` with each ``-inf`` entry read as the row's smallest finite entry."""
    finite = jnp.isfinite(x)
    low = jnp.min(jnp.where(finite, x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x == -jnp.inf, jnp.where(jnp.isfinite(low), low, 0.0), x)


def _interpolate(thresholds, values, count, p):
    """scikit-learn's ``np.interp`` through the first ``count`` (sorted) points, clipped."""
    if thresholds.shape[0] == 0:  # fitted on no rows at all
        return p
    hi = jnp.minimum(jnp.searchsorted(thresholds, p, side="right"), count)
    lo = jnp.maximum(hi - 1, 0)
    x0, x1 = thresholds[lo], thresholds[jnp.minimum(hi, count - 1)]
    f0, f1 = values[lo], values[jnp.minimum(hi, count - 1)]
    inside = (hi > 0) & (hi < count)
    between = f0 + (p - x0) * (f1 - f0) / jnp.where(inside, x1 - x0, 1.0)
    clipped = jnp.where(hi == 0, values[0], f0)
    # Nothing was fitted: the calibrator is the identity.
    return jnp.where(count > 0, jnp.where(inside, between, clipped), p)


def _minimize(fun, x0, memory=None):
    """Minimises a smooth convex ``fun`` of a flat vector by L-BFGS from ``x0``.

    Backtracking (Armijo) line search; stops when the gradient's largest entry
    is below ``_GRADIENT_TOL``, when no step along the search direction
    decreases ``fun`` (its precision is reached), or after ``_MAX_ITERATIONS``.
    Returns the minimiser and the memory of curvature pairs, which a further
    minimisation of a similar function can start from.
    """
    dtype = x0.dtype
    value_and_grad = jax.value_and_grad(fun)
    tol = _GRADIENT_TOL[jnp.dtype(dtype)]

    def direction(g, s, y, rho, k):
        # The two-loop recursion over the stored pairs, newest first; empty slots have rho = 0.
        def newest_first(i, carry):
            q, alpha = carry
            j = (k - 1 - i) % _HISTORY
            a = rho[j] * jnp.dot(s[j], q)
            return q - a * y[j], alpha.at[j].set(a)

        q, alpha = lax.fori_loop(0, _HISTORY, newest_first, (g, jnp.zeros(_HISTORY, dtype)))
        newest = (k - 1) % _HISTORY
        yy = jnp.dot(y[newest], y[newest])
        first = jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.linalg.norm(g), jnp.finfo(dtype).tiny))
        gamma = jnp.where(rho[newest] > 0, 1.0 / jnp.maximum(rho[newest] * yy, 1e-30), first)

        def oldest_first(i, r):
            j = (k - _HISTORY + i) % _HISTORY
            return r + s[j] * (alpha[j] - rho[j] * jnp.dot(y[j], r))

        return -lax.fori_loop(0, _HISTORY, oldest_first, gamma * q)

    def line_search(x, f, g, d):
        slope = jnp.dot(g, d)

        # Armijo's condition, up to the rounding of f: near the optimum of a float32
        # objective, its changes are below that rounding while the gradient still
        # points the way (the approximate Wolfe condition of Hager and Zhang).
        slack = 2 * jnp.finfo(dtype).eps * jnp.abs(f)

        def shrinking(state):
            t, f_new, _, tries = state
            return (tries < _HALVINGS) & ~(f_new <= f + 1e-4 * t * slope + slack)

        def shrink(state):
            t, _, _, tries = state
            f_new, g_new = value_and_grad(x + 0.5 * t * d)
            return 0.5 * t, f_new, g_new, tries + 1

        f_new, g_new = value_and_grad(x + d)
        return lax.while_loop(shrinking, shrink, (jnp.ones((), dtype), f_new, g_new, 0))

    def running(state):
        i, _, _, _, g, _, _, _, stalled = state
        return (i < _MAX_ITERATIONS) & ~stalled & ~(jnp.max(jnp.abs(g)) <= tol)

    def step(state):
        i, k, x, f, g, s, y, rho, _ = state  # k: the number of pairs stored
        d = direction(g, s, y, rho, k)
        d = jnp.where(jnp.dot(g, d) < 0, d, -g)  # a lost descent direction restarts
        t, f_new, g_new, tries = line_search(x, f, g, d)
        decreased = tries < _HALVINGS  # (a step of 2**-50 that decreased counts as none)
        sk, yk = t * d, g_new - g
        sy = jnp.dot(sk, yk)
        keep = decreased & (sy > 0)
        slot = k % _HISTORY
        s = jnp.where(keep, s.at[slot].set(sk), s)
        y = jnp.where(keep, y.at[slot].set(yk), y)
        rho = jnp.where(keep, rho.at[slot].set(1.0 / jnp.where(keep, sy, 1.0)), rho)
        x, f, g = (
            jnp.where(decreased, new, old) for new, old in ((x + sk, x), (f_new, f), (g_new, g))
        )
        return i + 1, k + keep.astype(k.dtype), x, f, g, s, y, rho, ~decreased

    f0, g0 = value_and_grad(x0)
    if memory is None:
        history = jnp.zeros((_HISTORY, x0.size), dtype)
        memory = (0, history, history, jnp.zeros(_HISTORY, dtype))
    k, s, y, rho = memory
    _, k, x, _, _, s, y, rho, _ = lax.while_loop(
        running, step, (0, k, x0, f0, g0, s, y, rho, False)
    )
    return x, (k, s, y, rho)


def _mean_nll(z, possible, labels, where, n):
    """The mean over kept rows of ``-log_softmax(z)[label]``, impossible classes excluded:
    the cross-entropy's kernel (its gradient one fused pass; 15% faster than autodiff's)."""
    labels = jnp.where(where, labels, 0)  # (a padding row's label may be out of range)
    nll = _losses.softmax_cross_entropy_with_integer_labels(
        z, labels, where=possible & where[:, None], reduction="sum"
    )
    return nll / jnp.maximum(n, 1).astype(nll.dtype)


def _prepared(logits, labels, where, likelihood=False):
    """:func:`_fit_rows` of the logits in the compute dtype, with their possible classes.

    Padding rows read as zeros, so nothing in them reaches a fit.
    """
    x, where, n, nan_if_bad, certain = _fit_rows(
        logits.astype(_checks.compute_dtype(logits.dtype)), labels, where, likelihood
    )
    x = jnp.where(where[:, None], x, 0.0)
    return x, x != -jnp.inf, where, n, nan_if_bad, certain


@functools.partial(jax.jit, static_argnames=("kind",))
def _fit_affine(logits, labels, where, kind, penalties):
    """Vector, matrix or Dirichlet scaling: the penalised mean NLL minimised by L-BFGS."""
    x, possible, where, n, nan_if_bad, certain = _prepared(logits, labels, where, True)
    k = x.shape[1]
    if kind == "dirichlet":
        x = _log_softmax(x, possible)
    features = _features(x)
    eye = jnp.eye(k, dtype=x.dtype)

    def linear(w, f):
        return w * f if kind == "vector" else f @ w

    # L-BFGS runs on standardised features, ``z = ((f - mean) / spread) v + c``
    # with ``w = v / spread`` (by rows) and ``b = c - mean w``: the same problem,
    # far better conditioned (200,000 x 10: Dirichlet's log-probabilities 53-67
    # -> 15-16 evaluations, logits with per-class offsets up to 531 -> 32).
    # A certain row's likelihood is the same under every calibrator: it counts
    # in N, and nothing else of it enters.
    scored = where & ~certain
    m = jnp.sum(scored, dtype=n.dtype)
    # The moments in units of a power of two bounding each feature (no sum overflows at
    # 1e19; one bound for all read the others as 0 beside a class masked by finfo.min),
    # about a scored row's (a constant feature's variance is exactly 0, not the rounding
    # of its mean: 1e4 in float64 read as spread 1e-13 and stalled the fit).
    unit = _power_of_two_above(jnp.where(scored[:, None], features, 0.0), axis=0)
    ref = features[jnp.argmax(scored)] / unit if x.shape[0] else jnp.zeros(k, x.dtype)
    ref = jnp.where(m > 0, ref, 0.0)  # (no scored row: the fit is the identity)
    scaled = features / unit - ref
    scaled_mean = _mean(jnp.sum(jnp.where(scored[:, None], scaled, 0.0), axis=0), m)
    deviation = jnp.where(scored[:, None], (scaled - scaled_mean) ** 2, 0.0)
    spread = jnp.sqrt(_mean(jnp.sum(deviation, axis=0), m)) * unit
    standard = scaled - scaled_mean
    mean = (scaled_mean + ref) * unit
    # A feature that varies by at most an ulp of its mean (not at all, or by a finite
    # mask's rounding: finfo.min, or Dirichlet's log-probability of a class masked by
    # -1e8 in float32) is constant: its spread is its size, for the weight's scale (with
    # spread 1, w x + b cancelled such a mask in rounding and lost the fitted bias: mean
    # NLL 1.10, uniform, for 0.69). Beside a mask past sqrt(finfo.max) a penalty's pull
    # would leave its weights below the normal range (flushed to 0): they stay pinned.
    eps = jnp.finfo(x.dtype).eps
    constant = spread <= eps * jnp.abs(mean)
    far = jnp.sqrt(eps) * jnp.abs(mean) > spread
    pinned = constant & (jnp.abs(mean) > jnp.sqrt(jnp.finfo(x.dtype).max))
    spread = jnp.where(constant, jnp.maximum(jnp.abs(mean), 1.0), spread)
    # (XLA's CPU divides by the reciprocal, subnormal and flushed to 0 above 1 / tiny.)
    spread = jnp.minimum(spread, 1 / jnp.finfo(x.dtype).tiny)
    standard = jnp.where(constant, 0.0, standard * (unit / spread))
    by_row = spread if kind == "vector" else spread[:, None]
    # From the identity, with each feature's spread, and each class's offset below the
    # largest, cut to _START_SPREAD (without penalties the largest itself dropped: the
    # likelihood leaves a common intercept where it starts, and one of 1e4 kept the fitted
    # logits that large in float32, 7e-4 off in probability; a penalty prices it, from 0
    # at the identity): at the identity itself, logits of about 1000, or one
    # class's 1000 above the others, make every row's float32 NLL linear, and L-BFGS
    # found no curvature there (mean NLL 74 for 0.45). A feature whose mean is past
    # 1 / sqrt(eps) spreads (a class masked by -1e5 in float32, Dirichlet's -1e8 in
    # float64) starts with weight times mean cut so (the intercept penalty started at
    # the mask's square and the fit stopped far off: NLL 0.65 for 0.50), a constant one
    # at 1 / sqrt(eps) times that (the bias keeps its rounding). (Below their mean, a
    # mask's offset moved the others' biases to its third, and their rounding.)
    start_size = jnp.where(
        constant, jnp.sqrt(eps) * jnp.abs(mean), jnp.where(far, jnp.abs(mean), spread)
    )
    start = jnp.minimum(1.0, _START_SPREAD / start_size)
    start = start if kind == "vector" else eye * start[:, None]
    offset = linear(start, mean)
    centre = jnp.max(offset) if k else 0.0
    penalised = sum(penalties, 0.0) > 0
    offset = jnp.where(penalised, centre, 0.0) + jnp.clip(
        offset - centre, -_START_SPREAD, _START_SPREAD
    )
    v0 = start * by_row
    pinned = pinned if kind == "vector" else pinned[:, None]
    flat0, unflatten = ravel_pytree((v0, offset))

    def weight_and_bias(v, c):
        w = jnp.where(pinned, v0, v) / by_row
        return w, c - linear(w, mean)

    def objective(flat, rows):
        v, c = unflatten(flat)
        w, b = weight_and_bias(v, c)
        standard, possible, labels, scored, n = rows
        loss = _mean_nll(linear(v, standard) + c, possible, labels, scored, n)
        if kind == "matrix":
            loss = loss + _penalised(penalties[0], jnp.sum((w - eye) ** 2) + jnp.sum(b**2))
        elif kind == "dirichlet":
            off = jnp.sum((w * (1 - eye)) ** 2) / max(k * (k - 1), 1)
            loss = (
                loss + _penalised(penalties[0], off) + _penalised(penalties[1], jnp.sum(b**2) / k)
            )
        return loss

    # A traced bad penalty (NaN) stalls the search at the identity: the fit is NaN.
    nan_if_bad = nan_if_bad * jnp.where(jnp.isnan(sum(penalties, 0.0)), jnp.nan, 1.0)
    rows = (standard, possible, labels, scored, n)
    memory = None
    sample_rows = max(_SAMPLE_ROWS, _SAMPLE_PER_PARAMETER * flat0.size)
    if x.shape[0] >= 4 * sample_rows:
        # First on rows drawn at random: the mean NLL there has about the full one's
        # optimum and curvature, so the full fit starts near its optimum with L-BFGS's
        # memory of that curvature (1,000,000 x 10: 13-14 full evaluations -> 7). (A
        # fixed key: the fit is deterministic. A stride aliased with rows in class order,
        # 15 full evaluations -> 57.)
        drawn = jax.random.randint(jax.random.key(0), (sample_rows,), 0, x.shape[0], jnp.int32)
        sample = [a[drawn] for a in rows[:4]] + [jnp.sum(where[drawn], dtype=n.dtype)]
        flat0, memory = _minimize(functools.partial(objective, rows=sample), flat0)
    flat, _ = _minimize(functools.partial(objective, rows=rows), flat0, memory)
    w, b = weight_and_bias(*unflatten(flat))
    return w * nan_if_bad, b * nan_if_bad


def _penalised(strength, term):
    """``strength * term``, 0 at strength 0 even where the term overflows (``0 * inf``:
    matrix scaling's weights reach 1e30 for logits of 1e-30)."""
    return jnp.where(strength > 0, strength * term, 0.0)


def _penalty(fname, name, value):
    """A non-negative regularisation strength: checked when concrete, NaN when traced and bad."""
    value = _checks.real(fname, name, value)
    if value.ndim != 0:
        raise ValueError(f"{fname}: {name} must be a scalar, got shape {value.shape}")
    if not _checks.is_traced(value) and not (float(value) >= 0 and float(value) < float("inf")):
        raise ValueError(f"{fname}: {name} must be finite and >= 0, got {float(value)}")
    return jnp.where((value >= 0) & jnp.isfinite(value), value, jnp.nan)


@_sharding.auto_axes()
def fit_vector_scaling(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> VectorScaling:
    r"""Fits vector scaling: a per-class scale and bias of the logits (Guo et al. 2017).

    .. math::
        (a^\star, b^\star) = \arg\min_{a, b \in \mathbb{R}^K} \frac{1}{N} \sum_i
        -\log \mathrm{softmax}(a \odot x_i + b)_{y_i}

    a convex problem, solved by L-BFGS from ``a = 1, b = 0`` (the identity;
    scaled down where the logits spread past 16, where float32's NLL has no
    curvature) until the gradient's largest entry (in the scale and bias of the
    standardised logits) is below 1e-5 (1e-9 for float64) or the objective
    stops decreasing.

    Args:
      logits: floating ``[N, K]``, the uncalibrated model's validation logits;
        ``-inf`` marks an impossible class.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding and ignored.

    Returns:
      A :class:`VectorScaling` (float32, float64 for float64 logits), applied
      by :func:`calibrate`. Traced out-of-range labels give NaN parameters;
      on separable data the optimum is at infinity and the fit stops at its
      iteration limit.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (2000, 3))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> fitted = jsoftmax.fit_vector_scaling(3.0 * logits, labels)  # overconfident by 3
      >>> bool(jnp.all(jnp.abs(fitted.scale - 1 / 3) < 0.05))
      True

    References:
      Guo et al., `On Calibration of Modern Neural Networks
      <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
    """
    logits, labels, where = _rows("fit_vector_scaling", logits, labels, where, "logits")
    return VectorScaling(*_fit_affine(logits, labels, where, "vector", ()))


@_sharding.auto_axes()
def fit_matrix_scaling(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None, l2: float = 0.0
) -> MatrixScaling:
    r"""Fits matrix scaling: an affine map of the logits (Guo et al. 2017).

    .. math::
        (W^\star, b^\star) = \arg\min_{W, b} \frac{1}{N} \sum_i
        -\log \mathrm{softmax}(x_i W + b)_{y_i}
        + \lambda \big(\lVert W - I \rVert_F^2 + \lVert b \rVert^2\big)

    a convex problem, solved by L-BFGS from ``W = I, b = 0`` (the identity,
    which is also where a large ``l2`` pulls it; scaled down as vector
    scaling's start) to the tolerance of
    :func:`fit_vector_scaling`. With ``K^2 + K`` parameters it overfits small
    validation sets; ``l2`` or :func:`fit_dirichlet_calibration`'s ODIR
    penalty is the remedy.

    Args:
      logits: floating ``[N, K]``; ``-inf`` marks an impossible class.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding and ignored.
      l2: ``lambda >= 0``.

    Returns:
      A :class:`MatrixScaling`, applied by :func:`calibrate`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (2000, 3))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> jsoftmax.fit_matrix_scaling(2.0 * logits, labels, l2=1e-3).weight.shape
      (3, 3)

    References:
      Guo et al., `On Calibration of Modern Neural Networks
      <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
    """
    fname = "fit_matrix_scaling"
    logits, labels, where = _rows(fname, logits, labels, where, "logits")
    penalties = (_penalty(fname, "l2", l2),)
    return MatrixScaling(*_fit_affine(logits, labels, where, "matrix", penalties))


@_sharding.auto_axes()
def fit_dirichlet_calibration(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    off_diagonal: float = 0.0,
    intercept: float = 0.0,
) -> DirichletCalibration:
    r"""Fits Dirichlet calibration with ODIR regularisation (Kull et al. 2019).

    Matrix scaling of the log-probabilities ``l_i = log_softmax(x_i)``:

    .. math::
        \min_{W, b}\ \frac{1}{N} \sum_i -\log \mathrm{softmax}(l_i W + b)_{y_i}
        + \frac{\lambda}{K (K - 1)} \sum_{j \ne k} W_{jk}^2
        + \frac{\mu}{K} \sum_k b_k^2

    (Off-Diagonal and Intercept Regularisation), convex, solved by L-BFGS from
    ``W = I, b = 0`` (the identity, scaled down as vector scaling's start) to
    the tolerance of
    :func:`fit_vector_scaling`.

    Args:
      logits: floating ``[N, K]``; ``-inf`` marks an impossible class.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding and ignored.
      off_diagonal: ``lambda >= 0``.
      intercept: ``mu >= 0``.

    Returns:
      A :class:`DirichletCalibration`, applied by :func:`calibrate`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (2000, 3))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> fitted = jsoftmax.fit_dirichlet_calibration(2.0 * logits, labels, off_diagonal=1e-2)
      >>> jnp.diag(fitted.weight).round(1)
      Array([0.5, 0.6, 0.5], dtype=float32)

    References:
      Kull et al., `Beyond temperature scaling: Obtaining well-calibrated
      multi-class probabilities with Dirichlet calibration
      <https://arxiv.org/abs/1910.12656>`_, NeurIPS 2019.
    """
    fname = "fit_dirichlet_calibration"
    logits, labels, where = _rows(fname, logits, labels, where, "logits")
    penalties = (
        _penalty(fname, "off_diagonal", off_diagonal),
        _penalty(fname, "intercept", intercept),
    )
    return DirichletCalibration(*_fit_affine(logits, labels, where, "dirichlet", penalties))


@_sharding.auto_axes()
def fit_ensemble_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    bounds: tuple[float, float] = (0.01, 100.0),
) -> EnsembleTemperature:
    r"""Fits ensemble temperature scaling (Zhang, Kailkhura and Han 2020, "Mix-n-Match").

    .. math::
        q_i = w_1\, \mathrm{softmax}(x_i / T) + w_2\, \mathrm{softmax}(x_i) + w_3 / K,
        \qquad w \in \Delta^2

    fitted as the paper does, both steps on the Brier score
    ``BS = mean_i sum_k (q_ik - [y_i = k])^2``: first ``T`` minimising the
    Brier score of ``softmax(x / T)`` over ``bounds`` (a grid of 8
    log-spaced temperatures, then Brent's method around the best, to
    ``sqrt(eps)`` of ``log T``),
    then the weights minimising the Brier score of ``q`` on the simplex, a
    quadratic program solved exactly (each face's KKT system, the best
    feasible point). ``w = (1, 0, 0)`` is feasible, so the fitted Brier score
    is never above that of temperature scaling with the same ``T``. Where
    some logits are ``-inf``, the uniform member is uniform over the row's
    possible classes.

    Args:
      logits: floating ``[N, K]``; ``-inf`` marks an impossible class.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding and ignored.
      bounds: ``(T_lo, T_hi)``, as :func:`jsoftmax.fit_temperature`'s.

    Returns:
      An :class:`EnsembleTemperature`, applied by :func:`calibrate` to logits
      with any number of classes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jax.random.normal(jax.random.key(0), (2000, 5))
      >>> labels = jax.random.categorical(jax.random.key(1), logits)
      >>> fitted = jsoftmax.fit_ensemble_temperature(3.0 * logits, labels)
      >>> bool(2.5 < fitted.temperature < 3.5), float(fitted.weights.sum())
      (True, 1.0)

    References:
      Zhang, Kailkhura and Han, `Mix-n-Match: Ensemble and Compositional
      Methods for Uncertainty Calibration in Deep Learning
      <https://arxiv.org/abs/2003.07329>`_, ICML 2020.
    """
    fname = "fit_ensemble_temperature"
    logits, labels, where = _rows(fname, logits, labels, where, "logits")
    low, high = _bounds(fname, bounds, _checks.compute_dtype(logits.dtype))
    return EnsembleTemperature(*_fit_ensemble(logits, labels, where, low, high))


# Brent's method finds the minimum inside the bracket that the grid's best point and its
# neighbours make. 8 points found the global minimum of a dense scan on the same 269 of 270
# problems as 16 (two or three populations of logits scaled 0.01-100 apart make the score
# multimodal; 6 points missed 4 of 40), in 8 fewer evaluations.
_GRID = 8
_BRENT_STEPS = 60  # a cap only: sqrt(eps) of log T comes first
_GOLDEN = (3 - 5**0.5) / 2  # the golden section of a bracket, from its nearer end
# The supports of the simplex's faces: three vertices, three edges, the interior.
_FACES = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


@jax.jit
def _fit_ensemble(logits, labels, where, low, high):
    x, possible, where, n, nan_if_bad, _ = _prepared(logits, labels, where)
    rows = where.astype(x.dtype) / jnp.maximum(n, 1).astype(x.dtype)
    # Shifted by the row's max, so that its term is exactly 1 at every temperature
    # (x / T - max / T may become one fused multiply-add, off by x's rounding).
    top = jnp.max(x, axis=1)
    d = x - top[:, None]
    x_label = jnp.take_along_axis(x, labels[:, None], axis=1, mode="clip")[:, 0]
    d_label = x_label - top

    def inverse(t):
        # At least the smallest normal: 1 / T past 1 / tiny would flush to 0 on CPU, and
        # exp(-inf * 0) is NaN at an impossible class.
        return jnp.maximum(1 / t, jnp.finfo(x.dtype).tiny)

    def sums(a):
        # sum_k exp(a d_k) per row. With p = softmax(x / T) = exp(d / T) / s and q =
        # softmax(x), sum_k p_k q_k = sums(1 / T + 1) / (s s_q): every sum the Brier
        # scores need is one pass of exponentials, each its own on CPU (_cpu.row_sum;
        # a shared exp(d / T) squared took 78 against 51 ms an evaluation at 50,000 x
        # 1,000 on 2 cores).
        return _cpu.row_sum(jnp.exp(d * a))

    def member(a):
        """Per row of softmax(a x): its normaliser sums(a) and the label's probability."""
        s = sums(a)
        return s, jnp.exp(d_label * a) / s

    def brier(log_t):
        # Per row sum_k (p_k - [k = label])**2 = sum_k p_k**2 - 2 p_label + 1.
        a = inverse(jnp.exp(log_t))
        s, p_label = member(a)
        return jnp.sum(rows * (sums(2 * a) / s**2 - 2 * p_label + 1))

    # A grid brackets the best temperature; Brent's method narrows it: steps to
    # the vertex of the parabola through the three best points, golden sections
    # where those would step badly.
    grid = jnp.linspace(jnp.log(low), jnp.log(high), _GRID, dtype=x.dtype)
    scores = lax.map(brier, grid)
    best = jnp.argmin(scores)
    left, right = jnp.maximum(best - 1, 0), jnp.minimum(best + 1, _GRID - 1)
    neighbour = jnp.where(scores[left] <= scores[right], left, right)  # the better one
    other = jnp.where(neighbour == left, right, left)

    # Near its minimum the score changes by about (step)**2, so its rounding error
    # hides steps below sqrt(eps) of log T.
    tolerance = jnp.sqrt(jnp.finfo(x.dtype).eps)

    def least_step(x):
        return tolerance * (1 + jnp.abs(x)) / 4

    def narrowing(state):
        a, b, x, step = state[0], state[1], state[2], state[-1]
        small = least_step(x)
        return (jnp.abs(x - (a + b) / 2) > 2 * small - (b - a) / 2) & (step < _BRENT_STEPS)

    def brent(state):
        a, b, x, w, v, f_x, f_w, f_v, d, e, step = state
        middle, small = (a + b) / 2, least_step(x)
        r, q = (x - w) * (f_x - f_v), (x - v) * (f_x - f_w)
        p, q = (x - v) * q - (x - w) * r, 2 * (q - r)
        p, q = jnp.where(q > 0, -p, p), jnp.abs(q)
        # The vertex, if it lies inside the bracket and the step halves the one before last.
        inside = (q * (a - x) < p) & (p < q * (b - x))
        vertex = (jnp.abs(e) > small) & (jnp.abs(p) < jnp.abs(q * e / 2)) & inside
        to_vertex = p / jnp.where(vertex, q, 1.0)
        near_end = jnp.minimum(x + to_vertex - a, b - x - to_vertex) < 2 * small
        to_vertex = jnp.where(near_end, jnp.where(middle > x, small, -small), to_vertex)
        larger = jnp.where(x >= middle, a - x, b - x)
        d, e = jnp.where(vertex, to_vertex, _GOLDEN * larger), jnp.where(vertex, d, larger)
        u = x + jnp.where(jnp.abs(d) >= small, d, jnp.where(d > 0, small, -small))
        f_u = brier(u)
        better = f_u <= f_x
        # The bracket keeps the best point inside: it ends at x or u, whichever is worse.
        a = jnp.where(better, jnp.where(u >= x, x, a), jnp.where(u < x, u, a))
        b = jnp.where(better, jnp.where(u >= x, b, x), jnp.where(u < x, b, u))
        second = ~better & ((f_u <= f_w) | (w == x))
        third = ~better & ~second & ((f_u <= f_v) | (v == x) | (v == w))
        v, f_v = (
            jnp.where(better | second, old, jnp.where(third, new, keep))
            for old, new, keep in ((w, u, v), (f_w, f_u, f_v))
        )
        w, f_w = (
            jnp.where(better, old, jnp.where(second, new, keep))
            for old, new, keep in ((x, u, w), (f_x, f_u, f_w))
        )
        x, f_x = jnp.where(better, u, x), jnp.where(better, f_u, f_x)
        return a, b, x, w, v, f_x, f_w, f_v, d, e, step + 1

    a, b = grid[left], grid[right]
    state = (a, b, grid[best], grid[neighbour], grid[other])
    state += (scores[best], scores[neighbour], scores[other])
    state += (jnp.zeros((), x.dtype), b - a, 0)
    # (Clipped: at a bound, exp(log(bound)) may round past it.) A score flat in T (no
    # informative row) gives 1 clipped to the bounds, as fit_temperature does.
    t = jnp.exp(lax.while_loop(narrowing, brent, state)[2])
    t = jnp.clip(jnp.where(jnp.all(scores == scores[0]), 1.0, t), low, high)

    # The Brier score of q = sum_j w_j P_j is w' A w - 2 c' w + 1: a quadratic on the simplex.
    # The uniform member is 1 / m on each row's m possible classes: as every member sums
    # to 1 over them, its product with any member sums to 1 / m in a row.
    a = (inverse(t), 1.0)
    s, p_label = zip(*(member(a_i) for a_i in a), strict=True)
    pairs = ((0, 0), (0, 1), (1, 1))
    upper = {(i, j): jnp.sum(rows * sums(a[i] + a[j]) / (s[i] * s[j])) for i, j in pairs}
    row_over_m = rows / _possible_count(possible, x.dtype)[:, 0]
    with_uniform = jnp.sum(row_over_m)
    upper |= {(i, 2): with_uniform for i in range(3)}
    gram = jnp.array([[upper[min(i, j), max(i, j)] for j in range(3)] for i in range(3)])
    c = [jnp.sum(rows * p) for p in p_label]
    # (The label's logit, not d_label: x - max may overflow to -inf for a possible class.)
    c = jnp.array([*c, jnp.sum(jnp.where(x_label > -jnp.inf, row_over_m, 0.0))])

    def solve(face):
        on = face.astype(x.dtype)  # the members the face keeps
        kkt = jnp.block(
            [
                [2 * gram * (on[:, None] * on) + jnp.diag(1 - on), on[:, None]],
                [on[None, :], jnp.zeros((1, 1), x.dtype)],
            ]
        )
        w = jnp.linalg.solve(kkt, jnp.concatenate([2 * c * on, jnp.ones(1, x.dtype)]))[:3]
        feasible = jnp.all(jnp.isfinite(w)) & jnp.all(w >= 0)
        return jnp.where(feasible, w @ gram @ w - 2 * c @ w, jnp.inf), jnp.clip(w, 0, 1)

    scores, weights = jax.vmap(solve)(jnp.asarray(_FACES))
    w = weights[jnp.argmin(scores)]
    return t * nan_if_bad, w / jnp.sum(w) * nan_if_bad


@_sharding.auto_axes()
def fit_histogram_binning(
    logits: ArrayLike, labels: ArrayLike, *, num_bins: int = 15, where: ArrayLike | None = None
) -> HistogramBinning:
    r"""Fits one-vs-rest histogram binning (Zadrozny and Elkan 2001; Guo et al. 2017).

    For each class ``k``, the softmax probabilities ``p_ik`` are binned into
    ``M`` equal-width bins (the bins of
    :func:`jsoftmax.expected_calibration_error`) and each bin predicts the
    frequency of class ``k`` among its rows:

    .. math::
        \theta_{km} = \frac{\sum_{i: p_{ik} \in B_m} [y_i = k]}{|\{i : p_{ik} \in B_m\}|},
        \qquad q_{ik} = \frac{\theta_{k, m(p_{ik})}}{\sum_j \theta_{j, m(p_{ij})}}

    An empty bin predicts its centre ``(m - 1/2) / M``. :func:`calibrate`
    renormalises over the classes (uniform where every class gets 0).

    Args:
      logits: floating ``[N, K]``; ``-inf`` marks an impossible class.
      labels: integers ``[N]`` in ``[0, K)``.
      num_bins: ``1 <= M <= 46340`` (static).
      where: boolean ``[N]``; False rows are padding and ignored.

    Returns:
      A :class:`HistogramBinning`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]))
      >>> jsoftmax.fit_histogram_binning(logits, jnp.array([0, 1, 1]), num_bins=2).values
      Array([[0. , 0.5],
             [0.5, 1. ]], dtype=float32)

    References:
      Zadrozny and Elkan, `Obtaining calibrated probability estimates from
      decision trees and naive Bayesian classifiers
      <https://dl.acm.org/doi/10.5555/645530.655813>`_, ICML 2001.
    """
    fname = "fit_histogram_binning"
    logits, labels, where = _rows(fname, logits, labels, where, "logits")
    return HistogramBinning(
        _fit_histogram(logits, labels, where, _checked_num_bins(fname, num_bins))
    )


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _fit_histogram(logits, labels, where, num_bins):
    x, possible, where, _, nan_if_bad, _ = _prepared(logits, labels, where)
    k = x.shape[1]
    p = jnp.exp(_log_softmax(x, possible))
    index = _bin_index(p, num_bins) + num_bins * jnp.arange(k, dtype=jnp.int32)
    # Counted in int32, exact at any N: each kept row in K bins, its hit in its label's
    # (a bad label's row makes the fit NaN, through nan_if_bad). That bin from the
    # label's probability: gathered from the bins, XLA's CPU backend computed them twice
    # (1.3x the fit's time at 1,000,000 x 10).
    kept = where.astype(jnp.int32)
    segments = num_bins * k
    count = jax.ops.segment_sum(
        jnp.broadcast_to(kept[:, None], p.shape).reshape(-1), index.reshape(-1), segments
    )
    label = jnp.clip(labels, 0, k - 1)
    p_label = jnp.take_along_axis(p, label[:, None], 1)[:, 0]
    hits = jax.ops.segment_sum(kept, _bin_index(p_label, num_bins) + num_bins * label, segments)
    centres = (jnp.arange(num_bins, dtype=x.dtype) + 0.5) / num_bins
    frequency = hits.astype(x.dtype) / jnp.maximum(count, 1).astype(x.dtype)
    values = jnp.where(count > 0, frequency, jnp.tile(centres, k))
    return values.reshape(k, num_bins) * nan_if_bad


@_sharding.auto_axes()
def fit_isotonic(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> IsotonicCalibration:
    r"""Fits one-vs-rest isotonic regression on the softmax probabilities.

    For each class ``k``, the non-decreasing function ``g_k`` minimising
    ``sum_i (g_k(p_ik) - [y_i = k])^2`` over the kept rows (rows whose ``p_ik``
    are equal to within the dtype's resolution share a value), linearly
    interpolated between the groups' first points and clipped outside them:
    per class equal to scikit-learn's
    ``IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")``.
    :func:`calibrate` then renormalises ``g_k(p_k)`` over the classes (uniform
    where every class gets 0).

    On GPUs and TPUs (and on CPU below 2,048 rows) the pool-adjacent-violators
    algorithm runs in parallel rounds: each round pools every maximal run of
    adjacent blocks whose means do not increase (such blocks share a value in
    the solution), until none is left. On CPU from 2,048 rows each class is
    fitted on the host by NumPy and SciPy (sequential PAVA), a class per core,
    through ``jax.pure_callback``: it runs under ``jit`` and ``vmap`` as
    ever, but ``jax.export`` cannot serialise it there (export
    :func:`calibrate`, or the fit for GPUs and TPUs only).

    Args:
      logits: floating ``[N, K]``; ``-inf`` marks an impossible class.
      labels: integers ``[N]`` in ``[0, K)``.
      where: boolean ``[N]``; False rows are padding and ignored.

    Returns:
      An :class:`IsotonicCalibration` holding ``[K, N]`` sorted thresholds
      and values; with no kept row, the identity.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]))
      >>> jsoftmax.fit_isotonic(logits, jnp.array([0, 1, 1, 0])).values[0]
      Array([0. , 0.5, 0.5, 1. ], dtype=float32)

    References:
      Zadrozny and Elkan, `Transforming classifier scores into accurate
      multiclass probability estimates <https://doi.org/10.1145/775047.775151>`_,
      KDD 2002.
    """
    logits, labels, where = _rows("fit_isotonic", logits, labels, where, "logits")
    index = jax.dtypes.canonicalize_dtype(jnp.int64)
    if logits.size > jnp.iinfo(index).max:
        raise ValueError(
            f"fit_isotonic: logits {logits.shape} hold more rows times classes than {index} "
            "positions count; enable jax_enable_x64 or fit fewer rows or classes"
        )
    logits = _not_differentiable("fit_isotonic", logits)
    return IsotonicCalibration(*_fit_isotonic(logits, labels, where))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _not_differentiable(fname: str, x: jax.Array) -> jax.Array:
    """``x``, whose derivative raises: the isotonic thresholds are rows' probabilities
    reached through an integer sort key, along which JAX's derivative would be 0."""
    return x


@_not_differentiable.defjvp
def _not_differentiable_jvp(fname, primals, tangents):
    raise TypeError(
        f"{fname} is not differentiable (its derivative along the sort would read 0); "
        "differentiate calibrate in the logits it maps, with the fit held fixed"
    )


@jax.jit
def _fit_isotonic(logits, labels, where):
    x, possible, where, n, nan_if_bad, _ = _prepared(logits, labels, where)
    p = jnp.exp(_log_softmax(x, possible)).T
    hit = labels == jnp.arange(x.shape[1], dtype=jnp.int32)[:, None]
    thresholds, values = _isotonic(p, hit, where, n, nan_if_bad)
    return thresholds, values, n


def _isotonic(p, hit, where, n, scale):
    """Pool adjacent violators on each class (row) of ``p``: sorted thresholds and fitted
    values, these times ``scale`` (1 or NaN)."""
    # One integer sort key per row (a sort is several times faster on one
    # integer operand than on floats or several operands): a probability in
    # [0, 1] has a non-negative bit pattern below 2**(bits - 2), ordered as the
    # value, so twice it plus the label fits. Padding sorts last.
    bits = lax.bitcast_convert_type(p, jnp.dtype(f"int{8 * p.dtype.itemsize}"))
    key = jnp.where(
        where & ~jnp.isnan(p), 2 * bits + hit.astype(bits.dtype), jnp.iinfo(bits.dtype).max
    )
    scale = scale.astype(p.dtype)
    return _cpu.isotonic(key, n, scale, functools.partial(_pooled_classes, dtype=p.dtype))


def _pooled_classes(key, n, scale, dtype):
    """:func:`_isotonic` from each class's sort keys, the kept rows' count ``n``, ``scale``
    and ``p``'s dtype.

    The classes run as one flat problem of ``K * N`` rows whose every class
    opens a block of its own, so that the parallel rounds of every class share each pass.
    """
    k, size = key.shape
    index = _index_dtype(k * size)
    key = jnp.sort(key, axis=1)
    kept = jnp.arange(size, dtype=jnp.int32) < n
    xs = jnp.where(kept, lax.bitcast_convert_type(key >> 1, dtype), jnp.inf)
    total = k * size
    # The labels are 0/1 and every kept row weighs 1: block sums are
    # differences of exact integer prefix sums, the kept rows before flat
    # position ``f`` are ``(f // size) * n + min(f % size, n)``.
    hits = jnp.concatenate(
        [jnp.zeros(1, key.dtype), jnp.cumsum(jnp.where(kept, key & 1, 0).ravel())]
    )

    def means(bounds):
        """The mean of each block starting at ``bounds``; +inf for padding alone or past the end."""
        ends = jnp.append(bounds, total)
        before = (ends // size) * n + jnp.minimum(ends % size, n)
        weight = before[1:] - before[:-1]
        sums = (hits[ends[1:]] - hits[ends[:-1]]).astype(dtype)
        return jnp.where(weight > 0, sums / jnp.maximum(weight, 1).astype(dtype), jnp.inf)

    position = jnp.arange(total, dtype=index)
    opens = _resolution_groups(xs)
    group = jnp.cumsum(opens, dtype=index) - 1
    # The groups' first rows, front-packed and padded with ``total``.
    starts = _packed(position, opens, total)
    solution = _pooled(starts, jnp.sum(opens, dtype=index), size, means)
    block = jnp.cumsum(jnp.zeros(total + 1, bool).at[solution].set(True)[:total]) - 1
    # scikit-learn interpolates between the groups' first rows: each row's threshold.
    thresholds = xs.ravel()[starts[group]].reshape(k, size)
    return thresholds, (means(solution) * scale)[block].reshape(k, size)


def _packed(bounds, keep, fill):
    """The entries of ``bounds`` that ``keep`` marks, front-packed and padded with ``fill``."""
    slot = jnp.where(keep, jnp.cumsum(keep, dtype=bounds.dtype) - 1, bounds.shape[0])
    return jnp.full_like(bounds, fill).at[slot].set(bounds, mode="drop")


def _pooled(starts, count, size, means):
    """The first rows of the blocks that pooling adjacent violators leaves, front-packed.

    ``starts`` holds the groups' first rows (``count`` of them, then padding),
    in classes of ``size`` rows; ``means`` gives each block's mean from its
    first rows. Each round, every maximal run of blocks in a class whose means
    do not increase becomes one.
    """
    total = starts.shape[0]
    index = starts.dtype

    def pool(state):
        bounds, count, _ = state
        mean, block = means(bounds), jnp.arange(bounds.shape[0], dtype=index)
        # The blocks whose mean does not exceed the one before (in a class) pool into it.
        violated = (block < count) & (bounds % size != 0) & (jnp.roll(mean, 1) >= mean)
        keep = ~violated & (block < count)
        return _packed(bounds, keep, total), jnp.sum(keep, dtype=index), jnp.any(violated)

    # Once the blocks fit in a quarter of the array the rounds go on in a
    # smaller one, so the many late rounds of few blocks cost little.
    # ``pooled``: the last round pooled blocks, so another may; a stage whose
    # blocks already fit in the next one is skipped without a round.
    bounds, solution = starts, jnp.full(total, total, index)
    pooled, finished = jnp.asarray(total > 0), jnp.asarray(False)
    while True:
        smaller = bounds.shape[0] // 4
        last = smaller < 16
        limit = 0 if last else smaller
        bounds, count, pooled = lax.while_loop(
            lambda s, limit=limit: s[2] & (s[1] > limit), pool, (bounds, count, pooled)
        )
        done = ~finished & ~pooled
        solution = jnp.where(done, solution.at[: bounds.shape[0]].set(bounds), solution)
        finished = finished | done
        if last:
            return solution
        bounds = bounds[:smaller]


def _index_dtype(size):
    """int32 for positions below ``size``; int64 past int32 (with x64; JAX's int32 without)."""
    return jnp.int32 if size <= jnp.iinfo(jnp.int32).max else jnp.int64


def _resolution_groups(xs):
    """scikit-learn's grouping of each sorted row of ``xs``: the entries that open a group, flat.

    An entry opens a group when it is at least the dtype's resolution above
    the first entry of the group before it: a row's first entry opens one,
    and so does ``next(i)``, the first entry of the row that far above an
    opener ``i``. The openers are the chains ``start, next(start), ...``,
    marked by pointer doubling over the flattened rows.
    """
    k, size = xs.shape
    index = _index_dtype(k * size)
    first = jnp.broadcast_to(jnp.arange(size, dtype=index) == 0, xs.shape).ravel()
    end = jnp.broadcast_to(jnp.arange(1, k + 1, dtype=index)[:, None] * size, xs.shape).ravel()
    xs = xs.ravel()
    total = xs.shape[0]
    position = jnp.arange(total, dtype=index)
    # next(i) is monotone in i, so next of every 32nd entry brackets the rest.
    every = 32
    coarse = _first_far(xs, xs[::every], position[::every] + 1, end[::every], end[::every])
    coarse = jnp.append(coarse, total)
    low = jnp.maximum(coarse[position // every], position + 1)
    following = _first_far(xs, xs, low, jnp.minimum(coarse[position // every + 1], end), end)

    def double(state):
        opens, jump, _ = state
        marked = opens.at[jnp.where(opens, jump, total)].set(True)
        return marked, jump[jump], jnp.any(marked != opens)

    # Every entry at least the resolution above the one before opens a group, so
    # the chains from those are short. ``jump`` is next^(2^l), with ``total``
    # as its own successor; a round that marks nothing new marks nothing later.
    gap = xs - jnp.append(-jnp.inf, xs[:-1]) >= jnp.finfo(xs.dtype).resolution
    state = jnp.append(gap | first, False), jnp.append(following, total), True
    opens, _, _ = lax.while_loop(lambda state: state[2], double, state)
    return opens[:total]


def _first_far(xs, base, low, high, end):
    """The first row ``j`` in ``[low, high]`` with ``xs[j] - base >= resolution``; ``end`` for none.

    By bisection on the exact test (monotone in ``j``); the answer must lie in
    the bracket, and ``end`` stands for no row before it.
    """
    resolution = jnp.finfo(xs.dtype).resolution

    def bisect(bracket):
        low, high = bracket
        middle = low + (high - low) // 2  # (low + high) would overflow past 2**30 rows
        far = (middle < end) & (xs[jnp.minimum(middle, xs.shape[0] - 1)] - base >= resolution)
        return jnp.where(far, low, jnp.minimum(middle + 1, high)), jnp.where(far, middle, high)

    # (A loop, not unrolled: XLA would fuse each round's bracket into the next
    # round's gather and recompute every round before it there.)
    low, _ = lax.while_loop(lambda bracket: jnp.any(bracket[0] < bracket[1]), bisect, (low, high))
    return low
