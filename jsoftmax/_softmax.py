r"""The softmax family: softmax, log_softmax and logsumexp.

Every function here reduces through :func:`_normalizer`, the one place that
owns the numerics: the max shift, masks, infinities, NaN and low precision.
Masked entries are replaced by ``-inf`` up front, so "masked" and "``-inf``"
are one case, not two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jsoftmax import _checks
from jsoftmax._checks import Axis


def _normalizer(z: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(d, m, s)``: ``z - m``, the row shift, and ``sum(exp(d))``.

    ``+inf`` is clamped to the largest finite value, so a row's ``+inf``
    entries share its mass and every finite entry gets ``exp(d) == 0``; the
    shift is clamped to be finite, so an all ``-inf`` row gives ``d = -inf``
    and ``s = 0``: callers divide by ``max(s, 1)``, which is ``s`` in every
    row that keeps an entry (``s >= 1`` there). NaN propagates through ``max``.
    Clamps rather than selects: XLA's CPU backend fuses this whole chain into
    one pass, as it does for ``jax.nn.softmax``, where a ``where`` would split it.
    """
    big = jnp.finfo(z.dtype).max
    z = jnp.minimum(z, big)
    m = jnp.maximum(jnp.max(z, axes, keepdims=True), -big)
    d = z - m
    s = jnp.sum(jnp.exp(d), axes, keepdims=True)
    return d, m, s


def _shifted(z: jax.Array, m: jax.Array, top: ArrayLike = -0.0) -> jax.Array:
    """``z - m[..., None]`` for a finite row max ``m``, ``+inf`` entries at ``top`` (0).

    :func:`_normalizer` clamps ``z`` before its max, which XLA's CPU backend
    fuses when all of it is one pass. Where the max and the sums are separate
    passes (the losses), it would write that clamped copy out ([..., K]), as
    it does the broadcast of a constant other passes share: hence ``-0.0``, not
    the ``0.0`` that starts every sum.
    """
    return jnp.minimum(z - m[..., None], top)


def _row_stats(z: jax.Array, each=lambda z: z) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_normalizer` over the last axis for callers that only reduce ``d``.

    Returns ``(m, d, s)`` without keepdims: the row max clamped to be finite,
    :func:`_shifted` logits, and ``sum(exp(d))`` (0 for an all ``-inf`` row),
    of ``each(z)``, which is computed anew for each of the two passes.
    """
    big = jnp.finfo(z.dtype).max
    m = jnp.clip(jnp.max(each(z), -1), -big, big)
    d = _shifted(each(z), m)
    return m, d, jnp.sum(jnp.exp(d), -1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(z: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    d, _, s = _normalizer(z, axes)
    return jnp.exp(d) / jnp.maximum(s, 1.0)


@_softmax.defjvp
def _softmax_jvp(axes, primals, tangents):
    (z,), (t,) = primals, tangents
    y = _softmax(z, axes)
    return y, y * (t - jnp.sum(y * t, axes, keepdims=True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _log_softmax(z: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    d, _, s = _normalizer(z, axes)
    return d - jnp.log(jnp.maximum(s, 1.0))


@_log_softmax.defjvp
def _log_softmax_jvp(axes, primals, tangents):
    (z,), (t,) = primals, tangents
    out = _log_softmax(z, axes)
    # No select for -inf outputs: it would double the backward's cost. Masked
    # entries are refilled by the caller; an unmasked -inf input's gradient
    # is exactly 0 whenever the loss is finite.
    return out, t - jnp.sum(jnp.exp(out) * t, axes, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _logsumexp(z: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``logsumexp`` with keepdims; an infinite row max is the answer itself."""
    _, m, s = _normalizer(z, axes)
    top = jnp.max(z, axes, keepdims=True)
    return jnp.where(jnp.isinf(top), top, m + jnp.log(s))


@_logsumexp.defjvp
def _logsumexp_jvp(axes, primals, tangents):
    (z,), (t,) = primals, tangents
    return _logsumexp(z, axes), jnp.sum(_softmax(z, axes) * t, axes, keepdims=True)


def _scale(x: jax.Array, temperature: jax.Array) -> jax.Array:
    """``x / temperature`` whose temperature gradient ignores non-finite ``x``.

    The plain quotient would give ``-inf * 0 = NaN`` in the temperature
    gradient of a masked or ``-inf`` logit; dividing a zeroed copy keeps the
    gradient exact while the value keeps its infinity (or NaN).
    """
    finite = jnp.isfinite(x)
    return jnp.where(finite, jnp.where(finite, x, 0.0) / temperature, x)


@functools.partial(jax.jit, static_argnames=("kernel", "axes", "refill"))
def _apply(kernel, x, where, temperature, axes, refill):
    """Upcasts, scales by the temperature, masks, reduces with ``kernel``, casts back.

    With ``refill``, masked outputs are set to ``-inf`` again, so that their
    forward-mode tangent is 0 too (the kernel's jvp leaves that to the mask).
    """
    z = x.astype(_checks.compute_dtype(x.dtype))
    if temperature is not None:
        z = _scale(z, temperature.astype(z.dtype))
    if where is not None:
        z = jnp.where(where, z, -jnp.inf)
    out = kernel(z, axes)
    if refill and where is not None:
        out = jnp.where(where, out, -jnp.inf)
    return out.astype(x.dtype)


def _call(kernel, fname, x, axis, where, temperature=None, refill=False):
    """Validates the arguments at trace time, then runs ``kernel`` under one jit."""
    x = _checks.floating(fname, "x (the logits)", x)
    axes = _checks.axes(fname, axis, x.shape)
    where = _checks.mask(fname, where, x.shape)
    if temperature is not None:
        temperature = _checks.temperature(fname, temperature, x.shape, axes)
    return _apply(kernel, x, where, temperature, axes, refill)


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
      axis: the axis or axes to normalise over (negative allowed).
      where: boolean mask broadcastable to ``x``; True keeps an entry.
      temperature: positive scalar, or an array broadcastable to ``x`` with
        size 1 along ``axis`` (one temperature per row). Differentiable.

    Returns:
      An array of ``x``'s shape and dtype, summing to 1 over ``axis`` (0 in a
      fully masked row).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.softmax(jnp.array([1.0, 2.0, 3.0]))
      Array([0.09003057, 0.24472848, 0.66524094], dtype=float32)
      >>> jsoftmax.softmax(jnp.array([-jnp.inf, -jnp.inf]))  # jax.nn: NaN
      Array([0., 0.], dtype=float32)
      >>> jsoftmax.softmax(jnp.array([jnp.inf, 0.0, jnp.inf]))  # jax.nn: NaN
      Array([0.5, 0. , 0.5], dtype=float32)

    Note:
      Masked and ``-inf`` entries give 0, and a row with nothing left gives all
      0, never NaN, with zero gradients. ``+inf`` entries share the row's mass
      equally (the limit). NaN in a kept entry makes its row NaN and no other.
      float16 and bfloat16 are computed in float32 and rounded once. Under
      ``jax.jit`` a non-positive or non-finite temperature cannot raise: the
      rows it scales come out NaN.
    """
    return _call(_softmax, "softmax", x, axis, where, temperature)


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
      axis: the axis or axes to normalise over (negative allowed).
      where: boolean mask broadcastable to ``x``; True keeps an entry.
      temperature: positive scalar, or an array broadcastable to ``x`` with
        size 1 along ``axis``. Differentiable.

    Returns:
      An array of ``x``'s shape and dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.log_softmax(jnp.array([1.0, 2.0, 3.0]))
      Array([-2.407606  , -1.4076059 , -0.40760595], dtype=float32)
      >>> jsoftmax.log_softmax(jnp.array([0.0, 0.0]), where=jnp.array([True, False]))
      Array([  0., -inf], dtype=float32)

    Note:
      Masked and ``-inf`` entries give ``-inf`` with zero gradient; a fully
      masked row gives all ``-inf``, never NaN. In a row holding ``+inf``, the
      ``+inf`` entries give ``-log(count)`` and a finite entry ``v`` gives
      ``v - finfo.max`` (at most ``-2e31`` in float32: its ``exp`` is exactly
      0, as in the limit). Dtypes and temperature as in :func:`softmax`.
    """
    return _call(_log_softmax, "log_softmax", x, axis, where, temperature, refill=True)


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
      axis: the axis or axes to reduce (negative allowed).
      where: boolean mask broadcastable to ``x``; True keeps an entry.
      keepdims: keep the reduced axes with size 1.

    Returns:
      ``x`` reduced over ``axis``, in ``x``'s dtype. Its gradient is
      :func:`softmax`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.logsumexp(jnp.array([1.0, 2.0, 3.0]))
      Array(3.407606, dtype=float32)
      >>> jsoftmax.logsumexp(jnp.array([1.0, 2.0]), where=jnp.array([False, False]))
      Array(-inf, dtype=float32)

    Note:
      A fully masked (or all ``-inf``) row gives ``-inf`` with zero gradient;
      a row holding ``+inf`` gives ``+inf``; NaN in a kept entry gives NaN.
      float16 and bfloat16 sum in float32, so more than 65504 classes do not
      overflow.
    """
    out = _call(_logsumexp, "logsumexp", x, axis, where)
    return out if keepdims else jnp.squeeze(out, _checks.axes("logsumexp", axis, out.shape))
