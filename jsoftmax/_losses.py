r"""Cross-entropy losses on dense and integer labels, built on the softmax family.

Both losses reduce through one kernel, :func:`_cross_entropy`. Per row, with
``d = z - m`` (``m`` the row max clamped to be finite, ``+inf`` entries at
``d = 0``), ``s = sum(exp(d))`` (so ``log p_k = d_k - log s``) and a target
``c`` over the classes,

.. math::
    \ell = \sum_k c_k (\log s - d_k) + \lambda\, \mathrm{lse}^2,
    \qquad c = (1 - \alpha)\, t + \tfrac{\alpha}{K} w \odot v,

where ``t`` is the primary target (``w_y`` on the label's class for integer
labels, the given probabilities for dense ones), ``v`` marks the ``K`` kept
classes and ``w`` are the class weights (1 without them). ``c`` is never built
for integer labels: its two terms are a gather and a row sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks
from jsoftmax._checks import Axis
from jsoftmax._softmax import _row_stats, _shifted

REDUCTIONS = ("none", "sum", "mean")


def _row_terms(z, target, weights, dense, smooth, softcap):
    """The per-row sums the loss and its derivative need: ``m``, ``s`` and the target's.

    ``has_class`` marks rows with a kept class (``s > 0``; NaN rows too), and ``s``
    comes back raised to at least 1, its value in every such row (an all ``-inf``
    row has ``m = -finfo.max`` and ``s = 0``). NaN propagates through ``max``.
    """
    cap = functools.partial(_capped, softcap=softcap)
    m, _, s = _row_stats(z, cap)
    has_class, s = s != 0, jnp.maximum(s, 1.0)
    if dense:

        def masked_sums(z, target):
            # 0 * -inf counts 0: probability on a masked class is caught by the -inf.
            d = _row_stats(z)[1]
            return _row_sums([target, jnp.where(target == 0, 0.0, target * d)])

        sums = (jnp.sum(target, -1), jnp.sum(target * _fresh_shifted(z, m), -1))
        t0, t_d = _unless_masked(sums, masked_sums, z, target)
    else:
        t0 = jnp.ones(z.shape[:-1], z.dtype) if weights is None else weights[target]
        z_y = cap(jnp.take_along_axis(z, target[..., None], -1, mode="clip")[..., 0])
        t_d = t0 * (jnp.minimum(z_y, jnp.finfo(z.dtype).max) - m)
    if not smooth:
        return m, s, has_class, t0, t_d, None, None, None

    # Per row: the kept classes' count, weight sum and weighted sum of d.
    w = 1.0 if weights is None else weights
    count = jnp.full(z.shape[:-1], z.shape[-1], z.dtype)
    w_sum = count if weights is None else jnp.broadcast_to(jnp.sum(weights), count.shape)

    def kept_sums(z):
        d = _row_stats(z, cap)[1]
        kept = z != -jnp.inf
        terms = [kept.astype(z.dtype), jnp.where(kept, w * d, 0.0)]
        if weights is None:
            count, w_d = _row_sums(terms)
            return count, count, w_d
        count, w_d, w_sum = _row_sums([*terms, jnp.where(kept, weights, 0.0)])
        return count, w_sum, w_d

    w_d = jnp.sum(w * _fresh_shifted(z, m, softcap), -1)
    count, w_sum, w_d = _unless_masked((count, w_sum, w_d), kept_sums, z)
    return m, s, has_class, t0, t_d, count, w_sum, w_d


def _fresh_shifted(z, m, softcap=None):
    """:func:`_shifted` anew, behind a barrier, for a reduction with a second [..., K] operand.

    XLA's CPU backend writes ``d`` out ([..., K] temp memory and a pass) when it
    is shared between ``s``'s pass and such a reduction (target or weights).
    """
    z, m, top = lax.optimization_barrier((z, m, jnp.array(-0.0, z.dtype)))
    return _shifted(_capped(z, softcap), m, top)


def _capped(z, softcap):
    """``softcap * tanh(z / softcap)`` (``-inf`` stays), anew for each pass; ``z`` without a cap.

    Behind a barrier, with its constants: shared between passes, XLA's CPU
    backend writes the capped logits out (and the constants' [..., K]
    broadcasts). ``-inf`` is kept by arithmetic, not a select, which would
    split the pass's fusion.
    """
    if softcap is None:
        return z
    z, *constants = lax.optimization_barrier(
        (z, *(jnp.array(v, z.dtype) for v in (softcap, jnp.finfo(z.dtype).max, 0.0)))
    )
    # Their tangents are zeros out of the barrier, and -inf / c's would be NaN.
    c, big, zero = lax.stop_gradient(constants)
    return c * jnp.tanh(z / c) + jnp.minimum(z + big, zero)


def _unless_masked(sums, exact, z, *operands):
    """The tuple ``sums``, or ``exact(z, *operands)`` when a row's last sum is not finite.

    The sums take no select (XLA's CPU backend writes a select's [..., K]
    input out); a ``-inf`` logit (masked class) makes them NaN or ``-inf``,
    and only then does ``exact`` run its second, selecting pass. NaN rows take
    it too; rows never mix. ``exact`` recomputes ``d``: passed in, it would be
    written out too.
    """
    return lax.cond(
        jnp.all(jnp.isfinite(sums[-1])),
        lambda z, *_: sums,
        exact,
        z,
        *operands,
    )


@jax.custom_jvp
def _row_sums(terms):
    """Sums of several [..., K] terms over the last axis in one pass, none written out.

    A variadic reduction is one loop fusion on XLA's CPU backend, where single
    sums of selects each write their [..., K] input out first.
    """

    def add(a, b):
        return tuple(map(jnp.add, a, b))

    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    return lax.reduce(tuple(terms), zeros, add, (terms[0].ndim - 1,))


@_row_sums.defjvp
def _row_sums_jvp(primals, tangents):
    # JAX's own rule for a variadic reduction fails on symbolic zero tangents.
    (terms,), (t_terms,) = primals, tangents
    return _row_sums(terms), tuple(jnp.sum(t, -1) for t in t_terms)


def _kept(z):
    """1 where ``z > -inf``, 0 where ``z`` is ``-inf`` (NaN for NaN), without a select.

    Every finite ``z / 4`` lies far more than 1 above ``-finfo.max / 4``, so the
    clip saturates at 1 there. In the gradient's [..., K] pass a compare and
    select cost XLA's CPU backend ~15% more time; this, ~1%.
    """
    big = jnp.finfo(z.dtype).max
    return jnp.clip(z * 0.25 + big * (0.25 + 2.0**-22), 0.0, 1.0)


def _lse(m, s):
    """logsumexp from :func:`_row_terms`; finite (-finfo.max) for a fully masked row."""
    return m + jnp.log(s)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8))
def _cross_entropy(z, target, weights, alpha, z_loss, dense, smooth, with_z_loss, softcap):
    """Per-row loss over the last axis, and whether the row has a kept class.

    With ``softcap``, the loss of :func:`_capped` logits, capped pass by pass.
    """
    m, s, has_class, t0, t_d, count, w_sum, w_d = _row_terms(
        z, target, weights, dense, smooth, softcap
    )
    log_s = jnp.log(s)
    loss = t0 * log_s - t_d
    if smooth:
        uniform = (w_sum * log_s - w_d) / jnp.maximum(count, 1.0)
        loss = jnp.where(alpha == 1, 0.0, (1 - alpha) * loss) + alpha * uniform
    if with_z_loss:
        loss = loss + z_loss * _lse(m, s) ** 2
    return jnp.where(has_class, loss, 0.0), has_class


@_cross_entropy.defjvp
def _cross_entropy_jvp(dense, smooth, with_z_loss, softcap, primals, tangents):
    z, target, weights, alpha, z_loss = primals
    t_z, t_target = tangents[0], tangents[1]
    options = dense, smooth, with_z_loss, softcap
    loss, kept = _cross_entropy(z, target, weights, alpha, z_loss, *options)
    m, s, _, t0, _, count, w_sum, _ = _row_terms(z, target, weights, dense, smooth, softcap)
    top = -0.0
    if smooth or dense:
        # exp(z - m) recomputed here, not shared with the forward pass: shared,
        # XLA writes it out as well as the gradient (one more pass and buffer);
        # for plain integer labels sharing is faster: it becomes the gradient.
        # Its own barrier, not _fresh_shifted's: that one XLA merges with the
        # forward pass's (weighted smoothing ran 1.3x slower).
        z, m, s, top = lax.optimization_barrier((z, m, s, jnp.array(top, z.dtype)))
    d = _shifted(_capped(z, softcap), m, top)
    if softcap is not None:
        t_z = t_z * (1 - jnp.tanh(z / softcap) ** 2)
    # d loss / d z_k = A p_k - B t_k - C w_k v_k, with row coefficients A, B, C
    # (0 for rows without a kept class).
    b = jnp.where(kept, 1 - alpha if smooth else 1.0, 0.0)
    a = b * t0
    if smooth:
        c = jnp.where(kept, alpha / jnp.maximum(count, 1.0), 0.0)
        a = a + c * w_sum
    if with_z_loss:
        a = a + jnp.where(kept, 2 * z_loss * _lse(m, s), 0.0)
    out = jnp.sum(jnp.exp(d) * t_z, -1) * (a / s)
    if dense:
        out = out - b * jnp.sum(target * t_z, -1)
        log_s = jnp.log(s)[..., None]
        # Labels on masked classes are outside the support: no gradient there.
        out = out + b * jnp.sum(jnp.where(z != -jnp.inf, log_s - d, 0.0) * t_target, -1)
    else:
        t_y = jnp.take_along_axis(t_z, target[..., None], -1, mode="clip")[..., 0]
        out = out - b * t0 * t_y
    if smooth:
        w = 1.0 if weights is None else weights
        out = out - c * jnp.sum(_kept(z) * w * t_z, -1)
    return (loss, kept), (out, np.zeros(kept.shape, jax.dtypes.float0))


def _reduce(loss, counts, weight, reduction):
    """Applies ``reduction``; "mean" divides by ``sum(weight)`` over counting rows, or 0."""
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    denominator = jnp.sum(jnp.where(counts, weight, 0.0))
    return total / jnp.where(denominator == 0, 1.0, denominator)


def _check_reduction(fname, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fname}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_softcap(fname, logit_softcap):
    if logit_softcap is not None and not float(logit_softcap) > 0:  # static: a Python number
        raise ValueError(f"{fname}: logit_softcap must be in (0.0, inf), got {logit_softcap}")


def _hyper(fname, name, value, low, high=np.inf):
    """A scalar hyperparameter: range-checked when concrete, NaN when traced and out of range."""
    value = jnp.asarray(value)
    if value.ndim:
        raise ValueError(f"{fname}: {name} must be a scalar, got shape {value.shape}")
    inside = (value >= low) & (value <= high)
    if not _checks.is_traced(value) and not bool(inside):
        bounds = f"[{low}, {high}{']' if high < np.inf else ')'}"
        raise ValueError(f"{fname}: {name} must be in {bounds}, got {float(value)}")
    return jnp.where(inside, value, jnp.nan)


def _is_zero(value) -> bool:
    """True when ``value`` is a concrete 0: the term it scales can be skipped."""
    return not _checks.is_traced(value) and float(np.asarray(value)) == 0.0


def _class_last(fname, logits, axis, where):
    """Moves the class axes to the end and flattens them (one class axis), as optax does."""
    logits = _checks.floating(fname, "logits", logits)
    axes = _checks.axes(fname, axis, logits.shape)
    where = _checks.mask(fname, where, logits.shape)
    batch = tuple(a for a in range(logits.ndim) if a not in axes)

    def flat(x):
        x = jnp.transpose(x, batch + axes)
        return x.reshape(x.shape[: len(batch)] + (-1,))

    return flat(logits), (None if where is None else flat(where)), axes, flat


def _options(fname, reduction, label_smoothing, z_loss):
    """Validates the options both losses share; returns them with their static on-flags."""
    _check_reduction(fname, reduction)
    alpha = _hyper(fname, "label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss_ = _hyper(fname, "z_loss", z_loss, 0.0)
    return alpha, z_loss_, not _is_zero(label_smoothing), not _is_zero(z_loss)


def _prepared(z, where):
    """Upcasts and masks logits (the soft-cap comes later, in :func:`_cross_entropy`)."""
    z = z.astype(_checks.compute_dtype(z.dtype))
    return z if where is None else jnp.where(where, z, -jnp.inf)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Cross-entropy between logits and probability labels (drop-in for optax's).

    .. math::
        \ell_i = -\sum_k q_{ik} \log \mathrm{softmax}(x_i)_k + \lambda\,
        \mathrm{logsumexp}(x_i)^2, \qquad
        q_i = (1 - \alpha)\, \mathrm{labels}_i + \alpha / K_i

    where the uniform part is spread over the ``K_i`` classes of row ``i`` that
    are kept (not masked by ``where``, logit not ``-inf``).

    Args:
      logits: floating ``[..., K]`` (the class axes are ``axis``).
      labels: floating, ``logits``' shape: probabilities (rows summing to 1).
      axis: the class axis or axes.
      where: boolean mask broadcastable to ``logits``; ``[..., 1]`` masks rows.
      label_smoothing: ``alpha`` in [0, 1].
      z_loss: ``lambda >= 0``, the weight of PaLM's auxiliary ``logsumexp**2``.
      reduction: "none" (per row), "sum", or "mean" over the rows that count
        (not fully masked), as PyTorch's probability targets do.

    Returns:
      float32 (float64 for float64 logits): per row for "none", else a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
      >>> jsoftmax.softmax_cross_entropy(logits, labels)
      Array([0.40760595, 1.0986123 ], dtype=float32)

    Note:
      Probability on a masked class, or one whose logit is ``-inf``, costs
      ``+inf`` (``-log 0``); zero probability there costs nothing. A fully
      masked row costs 0 with zero gradient and does not count in "mean"; if
      no row counts, "mean" is 0 (PyTorch gives NaN). The gradient with
      respect to ``labels`` is ``-log_softmax`` on kept classes and 0 on
      masked ones.

    References:
      Müller et al., `When does label smoothing help?
      <https://arxiv.org/abs/1906.02629>`_, 2019.
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss).
    """
    fname = "softmax_cross_entropy"
    logits_arr = _checks.floating(fname, "logits", logits)
    labels = _checks.floating(fname, "labels", labels)
    if labels.shape != logits_arr.shape:
        raise ValueError(
            f"{fname}: labels has shape {labels.shape} but logits {logits_arr.shape}; "
            "dense labels must match the logits"
        )
    z, where, _, flat = _class_last(fname, logits_arr, axis, where)
    options = _options(fname, reduction, label_smoothing, z_loss)
    return _dense_loss(z, flat(labels), where, *options, reduction)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _dense_loss(z, labels, where, alpha, z_loss, smooth, with_z_loss, reduction):
    z = _prepared(z, where)
    alpha, z_loss = lax.stop_gradient(alpha), lax.stop_gradient(z_loss)
    labels = labels.astype(z.dtype)
    loss, counts = _cross_entropy(z, labels, None, alpha, z_loss, True, smooth, with_z_loss, None)
    return _reduce(loss, counts, 1.0, reduction)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Cross-entropy with integer labels, PyTorch's options, no one-hot.

    Per row, with ``lp = log_softmax(x)``, label ``y``, class weights ``w``
    (all 1 by default) and the ``K`` kept classes (not masked, logit not
    ``-inf``):

    .. math::
        \ell = -(1 - \alpha)\, w_y\, lp_y - \frac{\alpha}{K} \sum_{k\ \mathrm{kept}} w_k\, lp_k
        + \lambda\, \mathrm{logsumexp}(x)^2

    computed in closed form from the logsumexp, the label's logit and a row
    sum, never from a dense target. "mean" divides the sum of the rows' losses
    by the sum of ``w_y`` over the rows that count (not ignored, not fully
    masked): ``torch.nn.functional.cross_entropy(weight=, ignore_index=,
    label_smoothing=, reduction=)`` exactly, and optax's numbers without options.

    Args:
      logits: floating ``[..., K]`` (the class axes are ``axis``; a tuple is
        flattened row-major, as optax does).
      labels: integers, ``logits``' shape without ``axis``.
      axis: the class axis or axes.
      where: boolean mask broadcastable to ``logits``; ``[..., 1]`` masks rows.
      label_smoothing: ``alpha`` in [0, 1].
      class_weights: ``[K]`` non-negative weights ``w`` (not differentiated).
      ignore_index: a label value whose rows cost 0 and do not count.
      z_loss: ``lambda >= 0`` (PaLM's auxiliary loss).
      logit_softcap: ``c > 0`` replaces logits by ``c * tanh(logits / c)``
        first (Gemma 2); ``-inf`` logits stay masked.
      reduction: "none", "sum" or "mean".

    Returns:
      float32 (float64 for float64 logits): per row for "none", else a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2]))
      Array([0.40760595, 1.0986123 ], dtype=float32)
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean")
      Array(0.40760595, dtype=float32)

    Note:
      A label whose class is masked or has logit ``-inf`` costs ``+inf``. A
      fully masked row or an ignored label costs exactly 0 with zero gradient;
      if no row counts, "mean" is 0 with zero gradient (PyTorch gives NaN).
      Labels out of range (other than ``ignore_index``) raise ``ValueError``
      when concrete; traced ones make that row's loss and gradient NaN. Under
      ``jax.jit`` an out-of-range traced hyperparameter (``label_smoothing``,
      ``z_loss``) gives NaN.

    References:
      Müller et al., `When does label smoothing help?
      <https://arxiv.org/abs/1906.02629>`_, 2019.
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss).
      Gemma Team, `Gemma 2 <https://arxiv.org/abs/2408.00118>`_, 2024 (soft-capping).
    """
    fname = "softmax_cross_entropy_with_integer_labels"
    z, where, axes, _ = _class_last(fname, logits, axis, where)
    labels = _checks.integer_labels(
        fname,
        labels,
        z.shape[:-1],
        z.shape[-1],
        f"logits {z.shape[:-1]} + classes with axis={axes}",
        ignore_index,
    )
    num_classes = z.shape[-1]
    if class_weights is not None:
        class_weights = _checks.floating(fname, "class_weights", class_weights)
        if class_weights.shape != (num_classes,):
            raise ValueError(
                f"{fname}: class_weights has shape {class_weights.shape} but the logits "
                f"have {num_classes} classes; it needs ({num_classes},)"
            )
    _check_softcap(fname, logit_softcap)
    alpha, z_loss_, smooth, with_z_loss = _options(fname, reduction, label_smoothing, z_loss)
    return _integer_loss(
        z,
        labels,
        where,
        class_weights,
        alpha,
        z_loss_,
        smooth,
        with_z_loss,
        ignore_index,
        logit_softcap,
        reduction,
    )


@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9, 10))
def _integer_loss(
    z, labels, where, weights, alpha, z_loss, smooth, with_z_loss, ignore, softcap, reduction
):
    z = _prepared(z, where)
    alpha, z_loss = lax.stop_gradient(alpha), lax.stop_gradient(z_loss)
    if weights is not None:
        weights = lax.stop_gradient(weights.astype(z.dtype))
    ignored = (labels == ignore) if ignore is not None else jnp.zeros(labels.shape, bool)
    bad = ((labels < 0) | (labels >= z.shape[-1])) & ~ignored
    safe_labels = jnp.where(ignored | bad, 0, labels)
    options = False, smooth, with_z_loss, softcap
    loss, kept = _cross_entropy(z, safe_labels, weights, alpha, z_loss, *options)
    counts = kept & ~ignored
    loss = jnp.where(counts, loss, 0.0)
    loss = loss * jnp.where(bad, jnp.nan, 1.0)  # NaN with a NaN gradient, this row only
    weight = 1.0 if weights is None else weights[safe_labels]
    return _reduce(loss, counts, weight, reduction)


def smooth_labels(
    labels: ArrayLike, alpha: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None
) -> jax.Array:
    r"""Label smoothing: ``(1 - alpha) * labels + alpha / K`` over the kept classes.

    Args:
      labels: floating probabilities ``[..., K]``.
      alpha: in [0, 1].
      axis: the class axis or axes.
      where: boolean mask broadcastable to ``labels``: the uniform part is
        spread over the ``K`` kept classes only; masked ones keep
        ``(1 - alpha) * labels``.

    Returns:
      An array of ``labels``' shape and dtype. Without ``where``, optax's
      ``smooth_labels``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.smooth_labels(jnp.array([0.0, 1.0, 0.0, 0.0]), 0.2)
      Array([0.05, 0.85, 0.05, 0.05], dtype=float32)
    """
    fname = "smooth_labels"
    labels = _checks.floating(fname, "labels", labels)
    axes = _checks.axes(fname, axis, labels.shape)
    where = _checks.mask(fname, where, labels.shape)
    alpha = _hyper(fname, "alpha", alpha, 0.0, 1.0).astype(labels.dtype)
    if where is None:
        return (1 - alpha) * labels + alpha / np.prod([labels.shape[a] for a in axes])
    count = jnp.sum(where, axes, keepdims=True)
    uniform = jnp.where(where, alpha / jnp.maximum(count, 1), 0.0)
    return ((1 - alpha) * labels + uniform).astype(labels.dtype)
