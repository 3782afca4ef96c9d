r"""The softmax family: softmax, log_softmax and logsumexp.

Every function here, and the losses, reduce :func:`_logits` (upcast, scaled,
masked): the max shift, infinities, NaN and low precision are handled in
:func:`_row_max`, :func:`_shifted` and :func:`_normalizer` (the losses and
logsumexp) and :func:`_clamped` (softmax and log_softmax: the same limit,
written as jax.nn's chain). Masked entries become ``-inf``, so "masked" and
"``-inf``" are one case, not two. Derivatives are
written by hand (``jax.custom_jvp``) so that reverse mode keeps only the
input as given plus per-row vectors, and recomputes the rest in one pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jsoftmax import _checks, _cpu
from jsoftmax._checks import Axis


def _logits(x: jax.Array, where=None, temperature=None, softcap=None) -> jax.Array:
    """The logits every kernel reduces: ``x`` upcast, divided by ``temperature``,
    soft-capped and masked to ``-inf``. Computed anew wherever it is needed:
    XLA fuses it into each pass, and only ``x`` itself is ever kept.
    """
    z = x.astype(_checks.compute_dtype(x.dtype))
    if temperature is not None:
        z = _divided(z, temperature)
    z = _cap(z, softcap)
    return z if where is None else jnp.where(where, z, -jnp.inf)


@jax.custom_jvp
def _divided(z: jax.Array, temperature: jax.Array) -> jax.Array:
    """``z / temperature``, whose derivative in the temperature is 0 where the quotient
    is not finite."""
    return z / temperature


@_divided.defjvp
def _divided_jvp(primals, tangents):
    # d(z / T) / dT = -(z / T) / T, taken as 0 at an infinite z / T, whose limit is
    # constant in T. JAX's own, -z / T**2, is infinite there: the rules take no
    # derivative of _logits, but their own derivatives (second derivatives, the
    # mixed ones in x and T) do, and multiplied it by 0 (a max's or a clamp's
    # selection, exp(-inf)): NaN in the whole row. Only those differentiate this:
    # the value's own program is still the one division.
    (z, temperature), (t_z, t_temperature) = primals, tangents
    out = _divided(z, temperature)
    finite = jnp.where(jnp.isfinite(out), out, 0.0)
    return out, (t_z - finite * t_temperature) / temperature


def _cap(z: jax.Array, softcap: float | None) -> jax.Array:
    """Soft-capping, ``c * tanh(z / c)``, with ``-inf`` kept at ``-inf``; ``z`` without a cap."""
    return z if softcap is None else jnp.where(z == -jnp.inf, z, softcap * jnp.tanh(z / softcap))


def _cap_by_sigmoid(z: jax.Array, softcap: float) -> jax.Array:
    """:func:`_cap` spelled ``c * (2 sigmoid(2 z / c) - 1)``, for the row sums after the max
    (:func:`jsoftmax._cpu.cap_for_row_sums`)."""
    return jnp.where(z == -jnp.inf, z, softcap * (2 * jax.nn.sigmoid(2 * z / softcap) - 1))


def _capped_slope(capped: jax.Array, softcap: float) -> jax.Array:
    """The cap's slope ``1 - tanh(z / c)**2`` from the capped logits ``c * tanh(z / c)``
    (1 at ``-inf``, a masked class, which takes no gradient)."""
    return 1 - (jnp.where(capped == -jnp.inf, 0.0, capped) / softcap) ** 2


def _cap_and_slope(z: jax.Array, softcap: float) -> tuple[jax.Array, jax.Array]:
    """For a tangent pass: ``_cap(z, softcap)`` and its slope ``1 - tanh(z / c)**2``,
    as GPUs and TPUs run it (:func:`jsoftmax._cpu.cap_and_slope`).

    ``tanh(u)`` is written as ``-expm1(-2v) / (2 + expm1(-2v))``, ``v = |u|``,
    with u's sign: the same value to rounding, but not :func:`_cap`'s
    expression, so XLA evaluates it inside the tangent's own pass. Shared with
    the forward pass's ``tanh``, it was read by two passes, and XLA's GPU
    backend wrote it out (a float32 ``[N, K]`` buffer: 4 GiB at bfloat16
    [8192, 128256]). ``|u|`` as a select, whose derivative is 1 at ``u = 0``.
    """
    u = z / softcap
    positive = u >= 0
    e = jnp.expm1(-2 * jnp.where(positive, u, -u))
    t = -e / (2 + e)
    t = jnp.where(positive, t, -t)
    return jnp.where(z == -jnp.inf, z, softcap * t), 1 - t * t


def _row_max(z: jax.Array, axes: tuple[int, ...], softcap=None) -> tuple[jax.Array, jax.Array]:
    """The row max of ``_cap(z, softcap)`` (keepdims), and the shift ``m``: that max
    clamped to be finite.

    A row of ``-inf`` is shifted by ``-finfo.max``. A NaN entry makes the
    max NaN on GPUs; XLA's CPU backend may drop it here, and the row's NaN
    comes through :func:`_shifted` into the row sum instead. The cap
    increases, so it applies to the max of ``z``: then only the pass that
    sums evaluates ``tanh``, where two passes reading it made XLA's GPU
    backend write it out (a float32 ``[N, K]`` buffer). XLA's float32 ``tanh``
    is not monotone to the last bit (a few ulps near 7), so a capped entry
    may exceed ``m`` by as much; :func:`_shifted` clamps it at ``m``, a
    shift of a few ulps in that logit. The max and its clamp are taken before
    the kept axes return, so that every caller's row statistics are one
    expression that XLA computes once.
    """
    big = jnp.finfo(z.dtype).max
    top = _cap(jnp.max(z, axes), softcap)
    return jnp.expand_dims(top, axes), jnp.expand_dims(jnp.clip(top, -big, big), axes)


def _shifted(z: jax.Array, m: jax.Array) -> jax.Array:
    """``z - m`` with ``z`` clamped at ``m``: ``+inf`` entries sit at 0 and share a row's mass.

    Every finite entry of a row holding ``+inf`` lies ``finfo.max`` below it
    or further (``m`` is clamped there), so its ``exp`` is exactly 0: the limit.
    Clamped at the row's own ``m``, not at a constant, whose ``[..., K]``
    broadcast XLA's CPU backend would write out; at the max, ``z`` and ``m``
    have the same tangent, so the tie costs no derivative. A NaN entry stays
    NaN (:func:`jsoftmax._cpu.clamped`), so the row sum carries it where the
    row max dropped it (XLA's CPU backend may).
    """
    return _cpu.clamped(z, m) - m


def _normalizer(
    z: jax.Array, axes: tuple[int, ...], softcap=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row (keepdims) of ``_cap(z, softcap)``: the max, the shift ``m`` and
    ``s = sum(exp(z - m))``.

    ``s >= 1`` in every row that keeps an entry; a row of ``-inf`` (its max
    is ``-inf``) gets ``s = 1``, so no quotient or log needs a guard. A
    select, not ``maximum(s, 1)``: a derivative of ``maximum`` is halved at
    the tie ``s == 1`` (a row with one kept entry).
    """
    top, m = _row_max(z, axes, softcap)
    s = jnp.sum(jnp.exp(_shifted(_cap(z, softcap), m)), axes, keepdims=True)
    return top, m, jnp.where(s == 0, 1.0, s)


def _probs(z: jax.Array, m: jax.Array, s: jax.Array) -> jax.Array:
    """``softmax(z)`` from the row statistics: 0 for masked entries and empty rows."""
    return jnp.exp(_shifted(z, m)) / s


@jax.custom_jvp
def _row_sums(terms):
    """Sums of several ``[..., K]`` terms over the last axis, as one reduction: one pass."""

    def add(a, b):
        return tuple(map(jnp.add, a, b))

    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    return lax.reduce(tuple(terms), zeros, add, (terms[0].ndim - 1,))


@_row_sums.defjvp
def _row_sums_jvp(primals, tangents):
    # JAX's own rule for a variadic reduction fails on symbolic zero tangents.
    (terms,), (t_terms,) = primals, tangents
    return _row_sums(terms), tuple(jnp.sum(t, -1) for t in t_terms)


def _nonzero(*tangents):
    """A custom rule's tangents, with None for each symbolic zero (and absent input)."""
    return tuple(None if isinstance(t, SymbolicZero) else t for t in tangents)


def _clamped_shift(z: jax.Array, m: jax.Array) -> jax.Array:
    """:func:`_shifted` as jax.nn's chain on GPUs: ``+inf`` clamped to ``finfo.max``
    (the same value: ``m`` is the row max clamped there)."""
    return _cpu.clamped(z, m, float(jnp.finfo(z.dtype).max)) - m


def _clamped_max(z: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """softmax and log_softmax's shift ``m``: the row max (keepdims) clamped to be finite,
    as GPUs run it (:func:`jsoftmax._cpu.family_max`)."""
    big = jnp.finfo(z.dtype).max
    return jnp.maximum(jnp.max(jnp.minimum(z, big), axes, keepdims=True), -big)


def _clamped(z: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """softmax and log_softmax's statistics: the shift ``m`` and ``s`` (keepdims, ``s`` raw).

    jax.nn's chain with ``+inf`` clamped to ``finfo.max`` first
    (:func:`_clamped_shift`): XLA's CPU backend runs each value as a single
    fused pass, and the value and the tangent write the same expressions, so
    a compiler may share them between the forward and backward passes.
    """
    m = _cpu.family_max(z, axes)
    return m, jnp.sum(jnp.exp(_clamped_shift(z, m)), axes, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _family(kind, axes, x, where, temperature):
    """softmax, log_softmax or logsumexp (keepdims) of :func:`_logits`, in ``x``'s dtype."""
    z = _logits(x, where, temperature)
    if kind == "logsumexp":
        # The value alone needs no clamp: a row holding +inf is its max (_lse picks it),
        # and XLA's CPU backend took 1.5x jax.nn's time at K = 10 with one.
        top, m = _row_max(z, axes)
        return _lse(top, m, jnp.sum(jnp.exp(z - m), axes, keepdims=True)).astype(x.dtype)
    # max(s, 1) (_cpu.at_least_one), not a select, which splits XLA's CPU fusion:
    # the values are never differentiated (the rule is).
    m, s = _clamped(z, axes)
    d, s = _clamped_shift(z, m), _cpu.at_least_one(s, m)
    if kind == "softmax":
        return (jnp.exp(d) / s).astype(x.dtype)
    return _log_probs(d, s).astype(x.dtype)


def _lse(top, m, s):
    """logsumexp from the row max, the shift and ``s``: an infinite max is the answer
    itself, unless ``s`` is NaN (a NaN entry, which the max may drop on CPU); and ``m``
    where ``s`` is 0 or ``inf`` beside a finite max.

    ``s`` is at least the max's own term, 1; but unclamped (:func:`_family`), a
    multiply fused from the caller (``z = x * c``) and the shift may compile to one
    fused multiply-add, which leaves that term off by the rounding of ``z``: it
    underflows or overflows only where that rounding exceeds 87 (709 in float64),
    and so does a rounding of ``m``, within which ``m`` is the answer. A per-row
    bound on ``s`` instead cost logsumexp 1.3-2.7x jax.nn's time at K = 10 on CPU.
    """
    log_s = jnp.log(s)
    return jnp.where(jnp.isinf(top) & ~jnp.isnan(s), top, jnp.where(jnp.isinf(log_s), m, m + log_s))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _logsumexp_shared(axes, x, where, temperature):
    """logsumexp from :func:`_normalizer`'s clamped row sum, the one its tangent
    takes: under differentiation the value and the tangent share one pass."""
    top, m, s = _normalizer(_logits(x, where, temperature), axes)
    return _lse(top, m, s).astype(x.dtype)


def _row_stats(kind, axes, z):
    """The per-row shift and ``s`` that :func:`_family_tangent` takes (``s = 1`` when empty)."""
    if kind == "logsumexp":
        return _normalizer(z, axes)[1:]
    m, s = _clamped(z, axes)
    return m, jnp.where(s == 0, 1.0, s)


def _log_probs(d, s):
    """log_softmax from the shifted logits: the value, and in the tangent ``exp`` of it.

    One expression in both, so that a compiler may share it between the
    forward and backward passes rather than recompute or write out another.
    """
    return d - jnp.log(s)


@functools.partial(jax.checkpoint, static_argnums=(0, 1), prevent_cse=False)
def _family_tangent(kind, axes, x, where, temperature, m, s, t_x, t_temperature):
    """The tangent, recomputed from ``x`` and the row statistics in one pass.

    Under ``jax.checkpoint``, reverse mode keeps only these arguments (``x``
    as given, the mask, the temperature, two per-row vectors) and recomputes
    the rest in the backward pass's single elementwise pass.
    """
    z = _logits(x, where, temperature)
    d = _clamped_shift(z, m)
    if kind == "logsumexp":
        p = _probs(z, m, s)
    elif kind == "softmax":
        p = _cpu.softmax_probs(d, s)
    else:
        p = jnp.exp(_log_probs(d, s))
    t = jnp.zeros((), z.dtype) if t_x is None else t_x.astype(z.dtype)
    if t_temperature is not None:
        # d(x / T) / dT = -x / T**2; 0 where x / T is infinite (x, or a quotient that
        # overflowed: constant in T), and written so that no -inf * 0 reaches the
        # temperature's gradient. The last 1 / T comes after the row's mean is taken:
        # x / T**2 overflows where x / T does not (1e38 at T = 0.5), and inf - inf was
        # NaN in forward mode.
        t = t - jnp.where(jnp.isfinite(z), x, 0).astype(z.dtype) * (t_temperature / temperature)
    mean = jnp.sum(p * t, axes, keepdims=True)

    def per_temperature(v):  # (inside the selects, whose transposes then zero a masked
        # entry's cotangent before it meets d(v / T) / dT: inf * 0 in second derivatives)
        return v if temperature is None else v / temperature

    if kind == "softmax":  # (0 where p is: t - mean may overflow there, 2e38 + 2e38)
        out = jnp.where(p == 0, 0.0, per_temperature(p * (t - mean)))
    elif kind == "log_softmax":  # -inf entries are constant
        out = jnp.where(z == -jnp.inf, 0.0, per_temperature(t - mean))
    else:
        out = per_temperature(mean)
    return out.astype(x.dtype)


def _family_jvp(kind, axes, primals, tangents):
    x, where, temperature = primals
    t_x, _, t_temperature = _nonzero(*tangents)
    # The value through a rule itself, so that higher derivatives use it too.
    if kind == "logsumexp":
        out = _logsumexp_shared(axes, x, where, temperature)
    else:
        out = _family(kind, axes, x, where, temperature)
    if t_x is None and t_temperature is None:
        return out, jnp.zeros_like(out)
    m, s = _row_stats(kind, axes, _logits(x, where, temperature))
    t_out = _family_tangent(kind, axes, x, where, temperature, m, s, t_x, t_temperature)
    return out, jnp.broadcast_to(t_out, out.shape)


_family.defjvp(_family_jvp, symbolic_zeros=True)
_logsumexp_shared.defjvp(functools.partial(_family_jvp, "logsumexp"), symbolic_zeros=True)


def _call(kind, fname, x, axis, where, temperature=None):
    """Validates the arguments at trace time, then runs the kernel."""
    x = _checks.floating(fname, "x (the logits)", x)
    axes = _checks.axes(fname, axis, x.shape)
    where = _checks.mask(fname, where, x.shape, full=False)
    if temperature is not None:
        dtype = _checks.compute_dtype(x.dtype)
        temperature = _checks.temperature(fname, temperature, x.shape, axes, dtype)
    if any(x.shape[a] == 0 for a in axes):
        # No class at all: softmax's result is empty, logsumexp's a fully masked row's -inf.
        shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
        return jnp.full(shape if kind == "logsumexp" else x.shape, -jnp.inf, x.dtype)
    return _jitted(kind, axes, x, where, temperature)


_jitted = jax.jit(_family, static_argnums=(0, 1))


def softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax, exact for masks and infinities.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp(x_i / T)}{\sum_{j} \exp(x_j / T)}

    with the sum over the entries of the same row that are not masked.

    Args:
      x: floating logits, any shape ``[..., K, ...]``.
      axis: the axis or axes to normalise over (negative allowed; None: every axis).
      where: boolean mask broadcastable to ``x``; True keeps an entry.
      temperature: positive scalar, or an array broadcastable to ``x`` with
        size 1 along ``axis`` (one temperature per row). Differentiable.

    Returns:
      An array of ``x``'s shape and dtype, summing to 1 over ``axis`` (0 in a
      fully masked row, and in a row whose every ``x / temperature`` overflows
      to ``-inf``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.softmax(jnp.array([1.0, 2.0, 3.0])).round(4)  # backends differ in the last digit
      Array([0.09  , 0.2447, 0.6652], dtype=float32)
      >>> jsoftmax.softmax(jnp.array([-jnp.inf, -jnp.inf]))  # jax.nn: NaN
      Array([0., 0.], dtype=float32)
      >>> jsoftmax.softmax(jnp.array([jnp.inf, 0.0, jnp.inf]))  # jax.nn: NaN
      Array([0.5, 0. , 0.5], dtype=float32)

    Note:
      Masked and ``-inf`` entries give 0, and a row with nothing left gives all
      0, never NaN, with zero gradients. ``+inf`` entries share the row's mass
      equally (the limit). NaN in a kept entry makes its row NaN and no other.
      float16 and bfloat16 are computed in float32 and rounded once. A traced
      non-positive or non-finite temperature (under ``jax.jit`` or
      ``jax.grad``) cannot raise: the rows it scales come out NaN, and so does
      its gradient.
    """
    return _call("softmax", "softmax", x, axis, where, temperature)


def log_softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike | None = None,
) -> jax.Array:
    r"""Log-softmax, exact for masks and infinities.

    .. math::
        \mathrm{log\_softmax}(x)_i = x_i / T - \log \sum_{j} \exp(x_j / T)

    Args:
      x: floating logits, any shape ``[..., K, ...]``.
      axis: the axis or axes to normalise over (negative allowed; None: every axis).
      where: boolean mask broadcastable to ``x``; True keeps an entry.
      temperature: positive scalar, or an array broadcastable to ``x`` with
        size 1 along ``axis``. Differentiable.

    Returns:
      An array of ``x``'s shape and dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> [round(v, 4) for v in jsoftmax.log_softmax(jnp.array([1.0, 2.0, 3.0])).tolist()]
      [-2.4076, -1.4076, -0.4076]
      >>> jsoftmax.log_softmax(jnp.array([0.0, 0.0]), where=jnp.array([True, False]))
      Array([  0., -inf], dtype=float32)

    Note:
      Masked and ``-inf`` entries give ``-inf`` with zero gradient; a fully
      masked row gives all ``-inf``, never NaN. In a row holding ``+inf``, the
      ``+inf`` entries give ``-log(count)`` and a finite entry ``v`` gives
      ``v - finfo.max`` (at most ``-2e31`` in float32: its ``exp`` is exactly
      0, as in the limit). Dtypes and temperature as in :func:`softmax`.
    """
    return _call("log_softmax", "log_softmax", x, axis, where, temperature)


def logsumexp(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    keepdims: bool = False,
) -> jax.Array:
    r"""Log of the sum of exponentials, exact for masks and infinities.

    .. math::
        \mathrm{logsumexp}(x) = \log \sum_{j} \exp(x_j)

    Args:
      x: floating array.
      axis: the axis or axes to reduce (negative allowed; None: every axis).
      where: boolean mask broadcastable to ``x``; True keeps an entry.
      keepdims: keep the reduced axes with size 1.

    Returns:
      ``x`` reduced over ``axis``, in ``x``'s dtype. Its gradient is
      :func:`softmax`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.logsumexp(jnp.array([1.0, 2.0, 3.0])).round(4)
      Array(3.4076, dtype=float32)
      >>> jsoftmax.logsumexp(jnp.array([1.0, 2.0]), where=jnp.array([False, False]))
      Array(-inf, dtype=float32)

    Note:
      A fully masked (or all ``-inf``) row gives ``-inf`` with zero gradient;
      a row holding ``+inf`` gives ``+inf``; NaN in a kept entry gives NaN.
      float16 and bfloat16 sum in float32, so more than 65504 classes do not
      overflow.
    """
    out = _call("logsumexp", "logsumexp", x, axis, where)
    return out if keepdims else jnp.squeeze(out, _checks.axes("logsumexp", axis, out.shape))
