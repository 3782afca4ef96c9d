r"""Cross-entropy losses on dense and integer labels, built on the softmax family.

Both losses reduce through one kernel, :func:`_cross_entropy`, on the logits
``z`` of :func:`jsoftmax._softmax._logits` (upcast, soft-capped, masked to
``-inf``). Per row, with ``d = z - m`` (``m`` the row max clamped to be
finite, ``+inf`` entries at ``d = 0``), ``s = sum(exp(d))`` (so
``log p_k = d_k - log s``) and a target ``c`` over the classes,

.. math::
    \ell = \sum_k c_k (\log s - d_k) + \lambda\, \mathrm{lse}^2,
    \qquad c = (1 - \alpha)\, t + \tfrac{\alpha}{K} w \odot v,

where ``t`` is the primary target (``w_y`` on the label's class for integer
labels, ``w`` times the given probabilities for dense ones), ``v`` marks the
``K`` kept classes and ``w`` are the class weights (1 without them). ``c`` is
never built for integer labels: its two terms are a gather and a row sum.

A ``jax.custom_jvp`` owns the derivative, ``A p - B t - C w v`` per row,
written so that reverse mode keeps only the logits as the caller gave them,
the labels and per-row vectors: the gradient is recomputed from them in one
elementwise pass (the label's term a select on the class index), the plain
schedule XLA fuses on every backend.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _cpu, _sharding
from jsoftmax._checks import Axis
from jsoftmax._softmax import _capped_slope, _logits, _nonzero, _normalizer, _shifted

REDUCTIONS = ("none", "sum", "mean")


class _Rows(NamedTuple):
    """Per-row statistics of :func:`_logits` over the last axis (see the module docstring)."""

    m: jax.Array  # the shift: the row max, clamped to be finite
    log_s: jax.Array  # log sum(exp(z - m)): >= 0 (0 in a row without a kept class)
    has_class: jax.Array  # whether the row keeps a class (NaN rows do)
    t0: jax.Array  # sum of the primary target (w_y for integer labels)
    t_d: jax.Array  # sum of the primary target times z - m
    count: jax.Array | None  # smoothing: the number of kept classes,
    w_sum: jax.Array | None  # the sum of their weights
    w_d: jax.Array | None  # and the weighted sum of their z - m


class _Options(NamedTuple):
    """The static options of the loss kernel."""

    dense: bool
    smooth: bool
    with_z_loss: bool
    softcap: float | None


def _label_logit(x, where, labels, softcap):
    """:func:`_logits` at each row's label, gathered before any [..., K] work."""
    x_y = jnp.take_along_axis(x, labels[..., None], -1, mode="clip")
    if where is not None and where.shape[-1] > 1:
        where = jnp.take_along_axis(jnp.broadcast_to(where, x.shape), labels[..., None], -1)
    return _logits(x_y, where, softcap=softcap)


def _at_label(labels, value, z):
    """``[..., K]`` like ``z``: each row's ``value`` at its label's class, 0 elsewhere
    (nowhere for a label outside ``[0, K)``).

    Built elementwise from the class index, so that it fuses into the gradient's
    single pass. A gather of the tangent instead transposes to a scatter, which
    XLA's GPU backend runs on a float32 ``[N, K]`` buffer of its own (4 GiB and
    1.7x optax's time at bfloat16 [8192, 128256] on an H200).
    """
    classes = lax.broadcasted_iota(labels.dtype, z.shape, z.ndim - 1)
    return jnp.where(classes == labels[..., None], value[..., None], 0.0).astype(z.dtype)


def _rows(x, where, target, weights, options) -> _Rows:
    """The per-row sums the loss and its derivative need: the max, then one pass."""
    raw = _logits(x, where)
    top, m, s = _normalizer(raw, (-1,), options.softcap)
    z = _cpu.cap_for_row_sums(raw, options.softcap)
    d = _shifted(z, m)
    # Row sums of terms that need the shift m, and of terms that do not (the
    # target's mass, the kept classes and their weights).
    shifted, unshifted = [], []
    if options.dense:
        target = _dense_target(target, weights, z.dtype)
        # 0 * -inf counts 0: probability on a masked class is caught by the -inf.
        shifted.append(jnp.where(target == 0, 0.0, target * d))
        unshifted.append(target)
    if options.smooth:
        kept = raw != -jnp.inf
        w = 1.0 if weights is None else weights
        shifted.append(jnp.where(kept, w * d, 0.0))
        unshifted.append(kept.astype(z.dtype))
        if weights is not None:
            unshifted.append(jnp.where(kept, weights, 0.0))
    if shifted:
        shifted, unshifted = map(list, _cpu.row_sums(shifted, unshifted))
    if options.dense:
        t0, t_d = unshifted.pop(0), shifted.pop(0)
    else:
        t0 = jnp.ones(z.shape[:-1], z.dtype) if weights is None else weights[target]
        d_y = _shifted(_label_logit(x, where, target, options.softcap), m)[..., 0]
        t_d = jnp.where(t0 == 0, 0.0, t0 * d_y)  # a label weighing 0 on a masked class: 0
    count = w_sum = w_d = None
    if options.smooth:
        count, w_d = unshifted.pop(0), shifted.pop(0)
        w_sum = unshifted.pop(0) if weights is not None else count
    has_class = _cpu.has_class(top, s)[..., 0]
    return _Rows(m[..., 0], jnp.log(s[..., 0]), has_class, t0, t_d, count, w_sum, w_d)


def _dense_target(target, weights, dtype):
    """Dense labels (or their tangent) times the class weights: ``w * t`` prices each class."""
    target = target.astype(dtype)
    return target if weights is None else target * weights


def _lse(rows):
    """logsumexp per row; finite (-finfo.max) for a row without a kept class."""
    return rows.m + rows.log_s


def _loss(rows, alpha, z_loss, options):
    log_s = rows.log_s
    loss = rows.t0 * log_s - rows.t_d
    if options.smooth:
        uniform = (rows.w_sum * log_s - rows.w_d) / jnp.maximum(rows.count, 1.0)
        loss = _smoothed(loss, uniform, alpha)
    if options.with_z_loss:
        # Scaled before squared: lse**2 overflows from 1.8e19 in float32, z_loss * lse**2 later.
        lse = _lse(rows)
        loss = loss + jnp.where(z_loss == 0, 0.0, z_loss * lse * lse)
    return jnp.where(rows.has_class, loss, 0.0)


def _smoothed(label_term, uniform_term, alpha):
    """``(1 - alpha) label_term + alpha uniform_term``, where a weight of 0 drops its term
    (traced as concrete: ``0 * inf`` is NaN on a ``+inf`` row, or at a masked label)."""
    label_term = jnp.where(alpha == 1, 0.0, (1 - alpha) * label_term)
    return label_term + jnp.where(alpha == 0, 0.0, alpha * uniform_term)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _cross_entropy(x, where, target, weights, alpha, z_loss, options):
    """Per-row loss of :func:`_logits` ``(x, where, softcap)`` over the last axis,
    and whether the row keeps a class."""
    rows = _rows(x, where, target, weights, options)
    return _loss(rows, alpha, z_loss, options), rows.has_class


@functools.partial(jax.checkpoint, static_argnums=(0,), prevent_cse=False)
def _cross_entropy_tangent(options, x, where, target, weights, alpha, z_loss, rows, t_x, t_target):
    """The loss's tangent, recomputed from ``x`` and the per-row statistics in one pass.

    Under ``jax.checkpoint``, reverse mode keeps only these arguments: the
    logits and labels as given and per-row vectors; the backward pass is one
    elementwise pass writing the logits' gradient in their dtype.
    """
    z, slope = _cpu.cap_and_slope(_logits(x, where), options.softcap)
    d = _shifted(z, rows.m[..., None])
    kept = z != -jnp.inf  # masked and -inf classes are constants: no gradient
    # Without smoothing, soft-cap or dense labels, exp(d) is already 0 there.
    needs_kept = options.smooth or options.dense or options.softcap is not None
    # d loss / d z_k = A p_k - B t_k - C w_k [k kept], with row coefficients A, B, C
    # (0 for rows without a kept class).
    b = jnp.where(rows.has_class, 1 - alpha if options.smooth else 1.0, 0.0)
    a = b * rows.t0
    if options.smooth:
        c = jnp.where(rows.has_class, alpha / jnp.maximum(rows.count, 1.0), 0.0)
        a = a + c * rows.w_sum
    if options.with_z_loss:
        a = a + jnp.where(rows.has_class, 2 * z_loss * _lse(rows), 0.0)
    out = jnp.zeros(z.shape[:-1], z.dtype)
    if t_x is not None:
        g = (a * jnp.exp(-rows.log_s))[..., None] * jnp.exp(d)  # A p
        if options.dense:
            g = g - b[..., None] * _dense_target(target, weights, z.dtype)
        if options.smooth:
            g = g - c[..., None] * (1.0 if weights is None else weights)
        if slope is not None:  # d cap(x) / dx
            g = g * slope
        t = t_x.astype(z.dtype)
        if needs_kept:
            g = jnp.where(kept, g, 0.0)
        if not options.dense:  # - B t: the label's term
            z_y = _label_logit(x, where, target, options.softcap)[..., 0]
            cap = 1.0 if options.softcap is None else _capped_slope(z_y, options.softcap)
            g = g - _at_label(target, jnp.where(z_y == -jnp.inf, 0.0, b * rows.t0 * cap), z)
        out = out + jnp.sum(g * t, -1)
    if options.dense and t_target is not None:
        log_p = rows.log_s[..., None] - d
        t_target = _dense_target(t_target, weights, z.dtype)
        out = out + b * jnp.sum(jnp.where(kept, log_p, 0.0) * t_target, -1)
    return out


def _cross_entropy_jvp(options, primals, tangents):
    x, where, target, weights, alpha, z_loss = primals
    t_x, t_target = _nonzero(tangents[0], tangents[2])
    # The value through the rule itself, so that higher derivatives use it too.
    loss, has_class = _cross_entropy(x, where, target, weights, alpha, z_loss, options)
    rows = _rows(x, where, target, weights, options)
    if t_x is None and t_target is None:
        t_loss = jnp.zeros_like(loss)
    else:
        t_loss = _cross_entropy_tangent(
            options, x, where, target, weights, alpha, z_loss, rows, t_x, t_target
        )
    no_tangent = np.zeros(has_class.shape, jax.dtypes.float0)
    return (loss, has_class), (t_loss, no_tangent)


_cross_entropy.defjvp(_cross_entropy_jvp, symbolic_zeros=True)


def _reduce(loss, counts, weight, reduction):
    """Applies ``reduction``; "mean" divides by ``sum(weight)`` over counting rows (0 when
    that is 0)."""
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    # (In the loss's dtype: a sum of the Python float 1.0 is float64 under x64.)
    denominator = jnp.sum(jnp.where(counts, weight, 0.0), dtype=total.dtype)
    # Nothing counts, or what counts weighs 0: 0 with zero gradient (a NaN row stays NaN).
    empty = denominator == 0
    return jnp.where(empty, 0.0 * total, total / jnp.where(empty, 1.0, denominator))


def _check_reduction(fname, reduction):
    _checks.choice(fname, "reduction", reduction, REDUCTIONS)


def _check_softcap(fname, logit_softcap, dtype):
    """The soft-cap as the static Python float it is, or None; in the compute ``dtype``
    normal (XLA flushes a subnormal to 0) and at most ``sqrt(finfo.max)``, so that
    ``logits / c`` flushes only logits below ``tiny * c`` (2e-19 in float32) to 0."""
    if logit_softcap is None:
        return None
    try:
        if isinstance(logit_softcap, bool | np.bool_):
            raise TypeError
        value = float(logit_softcap)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):  # ("a": ValueError)
        raise TypeError(
            f"{fname}: logit_softcap must be a concrete number (it is static), "
            f"got {type(logit_softcap).__name__}"
        ) from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{fname}: logit_softcap must be in (0.0, inf), got {logit_softcap}")
    info = jnp.finfo(dtype)
    low, high = float(info.tiny), math.sqrt(float(info.max))
    if not low <= value <= high:
        raise ValueError(
            f"{fname}: logit_softcap must be in [{low:.3g}, {high:.3g}] in {info.dtype}, "
            f"got {logit_softcap}"
        )
    return value


def _hyper(fname, name, value, low, high=np.inf, within=None):
    """A scalar hyperparameter (or one broadcastable to the shape of the array named in
    ``within``, a ``(name, shape)``): range-checked when concrete, NaN where traced and out of
    range."""
    value = _checks.real(fname, name, value)
    if within is None and value.ndim:
        raise ValueError(f"{fname}: {name} must be a scalar, got shape {value.shape}")
    if within is not None and not _checks.broadcasts_to(value.shape, within[1]):
        raise ValueError(
            f"{fname}: {name} has shape {value.shape}, which does not broadcast to "
            f"{within[0]} {within[1]}"
        )
    return _in_range(fname, name, value, low, high)


def _in_range(fname, name, value, low, high=np.inf):
    """``value`` range-checked (finite, in ``[low, high]``) when concrete, NaN where traced
    and out of range."""

    def inside(v, xp):
        return (v >= low) & (v <= high) & xp.isfinite(v)

    # (Checked in NumPy: jnp on a concrete array inside a trace gives a tracer.)
    concrete = None if _checks.is_traced(value) else np.asarray(value, np.float64)
    if concrete is not None and not np.all(inside(concrete, np)):
        bounds = f"[{low}, {high}{']' if high < np.inf else ')'}"
        bad = np.asarray(value)[~inside(concrete, np)].ravel()[0]  # (as given: -0.1, not float64's)
        raise ValueError(f"{fname}: {name} must be in {bounds}, got {bad!s}")
    return jnp.where(inside(value, jnp), value, jnp.nan)


def _is_zero(value) -> bool:
    """True when ``value`` is a concrete 0: the term it scales can be skipped."""
    return not _checks.is_traced(value) and float(np.asarray(value)) == 0.0


def _class_last(fname, logits, axis, where):
    """Moves the class axes to the end and flattens them (one class axis), as optax does.

    A mask with fewer axes than the logits masks rows: as in optax, the class axes are
    inserted into it. A mask of size 1 along the class axes stays a row mask ``[..., 1]``.
    """
    logits = _checks.floating(fname, "logits", logits)
    axes = _checks.axes(fname, axis, logits.shape, sort=False)
    if any(logits.shape[a] == 0 for a in axes):
        raise ValueError(f"{fname}: logits {logits.shape} have no class along axis={axis}")
    batch = tuple(a for a in range(logits.ndim) if a not in axes)
    if where is not None and np.ndim(where) < logits.ndim:
        rows = tuple(logits.shape[a] for a in batch)
        try:
            where = _checks.mask(fname, where, rows, full=False)
        except ValueError:
            raise ValueError(
                f"{fname}: where has shape {np.shape(where)}: with fewer axes than logits "
                f"{logits.shape} it masks rows, and must broadcast to the rows {rows}"
            ) from None
        where = jnp.expand_dims(jnp.asarray(where), sorted(axes))
    where = _checks.mask(fname, where, logits.shape, full=False)
    if where is not None and any(where.shape[a] != 1 for a in axes):
        where = jnp.broadcast_to(where, logits.shape)

    def flat(x):
        if axes == (x.ndim - 1,):
            return x
        x = jnp.transpose(x, batch + axes)
        return x.reshape(x.shape[: len(batch)] + (-1,))

    return flat(logits), (None if where is None else flat(where)), axes, flat


def _options(fname, reduction, label_smoothing, z_loss, dtype):
    """Validates the options both losses share; returns them in the compute ``dtype`` (a
    float64 one promoted float32 losses) with their static on-flags."""
    _check_reduction(fname, reduction)
    alpha = _hyper(fname, "label_smoothing", label_smoothing, 0.0, 1.0).astype(dtype)
    z_loss_ = _hyper(fname, "z_loss", z_loss, 0.0).astype(dtype)
    return alpha, z_loss_, not _is_zero(label_smoothing), not _is_zero(z_loss)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: ArrayLike = 0.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Cross-entropy between logits and probability labels (drop-in for optax's).

    .. math::
        \ell_i = -\sum_k w_k q_{ik} \log \mathrm{softmax}(x_i)_k + \lambda\,
        \mathrm{logsumexp}(x_i)^2, \qquad
        q_i = (1 - \alpha)\, \mathrm{labels}_i + \alpha / K_i

    where the uniform part is spread over the ``K_i`` classes of row ``i`` that
    are kept (not masked by ``where``, logit not ``-inf``).

    Args:
      logits: floating ``[..., K]`` (the class axes are ``axis``).
      labels: ``logits``' shape: probabilities (rows summing to 1); integer or
        boolean (one-hot) labels are cast to ``logits``' dtype.
      axis: the class axis or axes (a tuple flattened in the order given, as optax does;
        None: every axis).
      where: boolean mask of ``logits``' rank, broadcastable to it; with fewer
        axes a row mask broadcastable to the loss's shape (optax's ``[batch]``),
        also where it would broadcast over the classes (``[K]``: use ``[1, K]``).
      label_smoothing: ``alpha`` in [0, 1].
      class_weights: ``[K]`` non-negative weights ``w`` (all 1 by default; not
        differentiated), PyTorch's ``weight`` with probability targets.
      z_loss: ``lambda >= 0``, the weight of PaLM's auxiliary ``logsumexp**2``.
      reduction: "none" (per row), "sum", or "mean" over the rows that count
        (not fully masked; not weighted), as PyTorch's probability targets do.

    Returns:
      The loss per row for "none", else a scalar; float32 (float64 for
      float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
      >>> jsoftmax.softmax_cross_entropy(logits, labels).round(4)
      Array([0.4076, 1.0986], dtype=float32)

    Note:
      Probability on a masked class, or one whose logit is ``-inf``, costs
      ``+inf`` (``-log 0``) unless its class weighs 0; zero probability there
      costs nothing. A fully
      masked row costs 0 with zero gradient and does not count in "mean"; if
      no row counts, "mean" is 0 (PyTorch gives NaN). The gradient with
      respect to ``labels`` is ``-log_softmax`` on kept classes and 0 on
      masked ones, a convention where the limit is ``+inf``: the logits'
      gradient counts a masked class's mass, as the loss does, so the mixed
      second derivatives there (``jax.hessian`` over both) are not symmetric.

    References:
      Müller et al., `When does label smoothing help?
      <https://arxiv.org/abs/1906.02629>`_, 2019.
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss).
    """
    fname = "softmax_cross_entropy"
    logits_arr = _checks.floating(fname, "logits", logits)
    labels = _checks.probabilities(fname, "labels", labels, logits_arr.dtype)
    if labels.shape != logits_arr.shape:
        raise ValueError(
            f"{fname}: labels has shape {labels.shape} but logits {logits_arr.shape}; "
            "dense labels must match the logits"
        )
    z, where, _, flat = _class_last(fname, logits_arr, axis, where)
    class_weights = _class_weights(fname, class_weights, z.shape[-1])
    options = _options(fname, reduction, label_smoothing, z_loss, _checks.compute_dtype(z.dtype))
    return _dense_loss(z, flat(labels), where, class_weights, *options, reduction)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _dense_loss(x, labels, where, weights, alpha, z_loss, smooth, with_z_loss, reduction):
    alpha, z_loss = lax.stop_gradient(alpha), lax.stop_gradient(z_loss)
    weights = _stopped_weights(weights, x.dtype)
    options = _Options(True, smooth, with_z_loss, None)
    loss, counts = _cross_entropy(x, where, labels, weights, alpha, z_loss, options)
    return _reduce(loss, counts, 1.0, reduction)


@_sharding.auto_axes(_sharding.sharded_like("logits", drop="axis"))
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
      logits: floating ``[..., K]`` (the class axes are ``axis``).
      labels: integers, ``logits``' shape without ``axis``.
      axis: the class axis or axes (a tuple flattened in the order given, as optax does;
        None: every axis).
      where: boolean mask of ``logits``' rank, broadcastable to it; with fewer
        axes a row mask broadcastable to the loss's shape (optax's ``[batch]``),
        also where it would broadcast over the classes (``[K]``: use ``[1, K]``).
      label_smoothing: ``alpha`` in [0, 1].
      class_weights: ``[K]`` non-negative weights ``w`` (not differentiated).
      ignore_index: a label value whose rows cost 0 and do not count.
      z_loss: ``lambda >= 0`` (PaLM's auxiliary loss).
      logit_softcap: ``c > 0`` replaces logits by ``c * tanh(logits / c)``
        first (Gemma 2); ``-inf`` logits stay masked. At most ``sqrt(finfo.max)``
        of the compute dtype (1.8e19 in float32), past which ``logits / c`` flushes to 0.
      reduction: "none", "sum" or "mean".

    Returns:
      The loss per row for "none", else a scalar; float32 (float64 for
      float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])).round(4)
      Array([0.4076, 1.0986], dtype=float32)
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean").round(4)
      Array(0.4076, dtype=float32)

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
    z, labels, where, class_weights, ignore_index = _integer_inputs(
        fname, logits, labels, axis, where, class_weights, ignore_index
    )
    dtype = _checks.compute_dtype(z.dtype)
    logit_softcap = _check_softcap(fname, logit_softcap, dtype)
    alpha, z_loss_, smooth, with_z_loss = _options(fname, reduction, label_smoothing, z_loss, dtype)
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
    x, labels, where, weights, alpha, z_loss, smooth, with_z_loss, ignore, softcap, reduction
):
    alpha, z_loss = lax.stop_gradient(alpha), lax.stop_gradient(z_loss)
    weights = _stopped_weights(weights, x.dtype)
    options = _Options(False, smooth, with_z_loss, softcap)

    def loss_of(safe_labels, weights):
        return _cross_entropy(x, where, safe_labels, weights, alpha, z_loss, options)

    return _per_label(loss_of, labels, where, x.shape[-1], weights, smooth, ignore, reduction)


def _integer_inputs(fname, logits, labels, axis, where, class_weights, ignore_index):
    """Validates an integer-label loss's data: returns the logits with one class axis last,
    the labels, the mask, the class weights (see :func:`_class_last`) and ignore_index."""
    z, where, axes, _ = _class_last(fname, logits, axis, where)
    ignore_index = _checks.ignore_index(fname, ignore_index)
    # A masked row is padding: its label is not checked (reduced on the device, a full
    # mask is not copied out).
    rows = None if where is None else jnp.broadcast_to(jnp.any(where, -1), z.shape[:-1])
    labels = _checks.integer_labels(
        fname,
        labels,
        z.shape[:-1],
        z.shape[-1],
        f"logits {z.shape[:-1]} + classes with axis={axes}",
        ignore_index,
        kept=rows,
    )
    return z, labels, where, _class_weights(fname, class_weights, z.shape[-1]), ignore_index


def _class_weights(fname, class_weights, num_classes):
    """Validates ``[K]`` non-negative class weights (None: none); a traced bad weight is NaN,
    and so are the rows that read it."""
    if class_weights is None:
        return None
    class_weights = _checks.floating(fname, "class_weights", class_weights)
    if class_weights.shape != (num_classes,):
        raise ValueError(
            f"{fname}: class_weights has shape {class_weights.shape} but the logits "
            f"have {num_classes} classes; it needs ({num_classes},)"
        )
    return _in_range(fname, "class_weights", class_weights, 0.0)


def _stopped_weights(weights, dtype):
    """Class weights in the compute dtype of logits of ``dtype``, not differentiated."""
    if weights is None:
        return None
    return lax.stop_gradient(weights.astype(_checks.compute_dtype(dtype)))


def _per_label(loss_of, labels, where, num_classes, weights, smooth, ignore, reduction):
    """An integer-label loss's rules around its kernel ``loss_of(safe_labels, weights) ->
    (loss, kept)``.

    Ignored rows cost 0 and do not count, out-of-range (traced) labels make
    their row NaN unless ``where`` masks the whole row (padding), and "mean"
    divides by the counting rows' ``w_y``. So does a traced bad class weight
    (NaN from :func:`_integer_inputs`) in the rows that read it: its class's
    rows, every row with label smoothing. The kernel gets it as 0: a NaN there
    reached the gradient through padding and ignored rows.
    """
    ignored = (labels == ignore) if ignore is not None else jnp.zeros(labels.shape, bool)
    bad = ((labels < 0) | (labels >= num_classes)) & ~ignored
    safe_labels = jnp.where(ignored | bad, 0, labels)
    if weights is not None:
        unusable = jnp.isnan(weights)
        weights = jnp.where(unusable, 0.0, weights)
        read = jnp.any(unusable) if smooth else unusable[safe_labels]
        bad = bad | (read & ~ignored)
    if where is not None:
        bad = bad & jnp.any(where, -1)
    loss, kept = loss_of(safe_labels, weights)
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
      labels: probabilities ``[..., K]`` (integer or boolean ones become floats).
      alpha: in [0, 1], a scalar or broadcastable to ``labels`` (per row).
      axis: the class axis or axes (None: every axis).
      where: boolean mask broadcastable to ``labels``: the uniform part is
        spread over the ``K`` kept classes only; masked ones keep
        ``(1 - alpha) * labels``.

    Returns:
      An array of ``labels``' shape and dtype (JAX's default float for
      integer or boolean labels). Without ``where``, optax's ``smooth_labels``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.smooth_labels(jnp.array([0.0, 1.0, 0.0, 0.0]), 0.2)
      Array([0.05, 0.85, 0.05, 0.05], dtype=float32)
    """
    fname = "smooth_labels"
    labels = _checks.probabilities(fname, "labels", labels)
    axes = _checks.axes(fname, axis, labels.shape)
    where = _checks.mask(fname, where, labels.shape)
    # In float32 for float16 labels too: there K from 65520 classes is inf, and alpha / K 0.
    dtype = _checks.compute_dtype(labels.dtype)
    alpha = _hyper(fname, "alpha", alpha, 0.0, 1.0, ("labels", labels.shape)).astype(dtype)
    per_row = (1,) * (labels.ndim - alpha.ndim) + alpha.shape
    if any(per_row[a] != 1 for a in axes):  # (the smoothed labels would not sum to 1)
        raise ValueError(
            f"{fname}: alpha has shape {alpha.shape}; it must have size 1 along the class "
            f"axes {axes} of labels {labels.shape} (one alpha per row)"
        )
    if where is None:
        uniform = alpha / math.prod(labels.shape[a] for a in axes)
    else:
        count = jnp.sum(where, axes, keepdims=True)
        uniform = jnp.where(where, alpha / jnp.maximum(count, 1).astype(dtype), 0.0)
    return ((1 - alpha) * labels.astype(dtype) + uniform).astype(labels.dtype)
