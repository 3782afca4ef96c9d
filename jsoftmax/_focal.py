r"""The softmax focal loss on integer labels (Lin et al. 2017), with the
sample-dependent gamma of Mukhoti et al. 2020.

It shares the cross-entropy's logits ``z`` (``_logits``: upcast, soft-capped,
masked to ``-inf``), its integer-label rules and its reductions
(:mod:`jsoftmax._losses`). Per row, with ``q_k = log p_k = d_k - log s``
(``d = z - m`` and ``s`` as there), the focal term of a class is

.. math::
    f(q) = -(1 - e^q)^\gamma\, q, \qquad
    f'(q) = -(1 - e^q)^\gamma \Bigl(1 + \gamma\, \frac{q\, e^q}{e^q - 1}\Bigr),

and the loss is ``sum_k c_k f(q_k)`` with the cross-entropy's target
``c = (1 - alpha) w_y e_y + alpha / K w v``: a gather at the label and, with
label smoothing, a row sum over the kept classes (one more pass over the row,
as ``f`` needs ``log s``). ``1 - e^q`` is ``-expm1(q)``, exact given ``q``, and
``f'`` is written without the ``(1 - e^q)^(gamma - 1)`` that is
``0^(gamma - 1)`` at ``p = 1``. ``q`` itself is the cross-entropy's (and
PyTorch's), from the rounded ``log s``: off by about ``eps``, so that near
``p = 1`` the loss, ``~ (1 - p)^(gamma + 1)``, carries a relative error of
about ``(1 + gamma) eps / (1 - p)`` (float32: 4e-3 at ``gamma = 2`` and
``1 - p = 1e-4``, up to 1 within a few ulps of ``p = 1``), as the
cross-entropy's ``-q`` carries ``eps / (1 - p)``.

A ``jax.custom_jvp`` owns the derivative,

.. math::
    \frac{\partial \ell}{\partial z_j} = c_j f'(q_j) - p_j B, \qquad B = \sum_k c_k f'(q_k),

where ``B`` is a per-row vector from the forward pass: reverse mode keeps the
logits as the caller gave them, the labels and per-row vectors, and recomputes
the gradient in one elementwise pass (the label's term a select on the class
index), as the cross-entropy does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _cpu, _sharding
from jsoftmax._checks import Axis
from jsoftmax._losses import (
    _at_label,
    _check_reduction,
    _check_softcap,
    _hyper,
    _integer_inputs,
    _integer_loss,
    _is_zero,
    _label_logit,
    _per_label,
    _smoothed,
    _stopped_weights,
)
from jsoftmax._softmax import (
    _capped_slope,
    _logits,
    _nonzero,
    _normalizer,
    _shifted,
)

FLSD_53 = "flsd-53"


class _Rows(NamedTuple):
    """Per-row statistics of the logits over the last axis (see the module docstring)."""

    m: jax.Array  # the shift: the row max, clamped to be finite
    log_s: jax.Array  # log sum(exp(z - m))
    has_class: jax.Array  # whether the row keeps a class (NaN rows do)
    gamma: jax.Array  # the row's gamma (a scalar unless sample-dependent)
    q_y: jax.Array  # log p at the label
    w_y: jax.Array  # the label's class weight
    count: jax.Array | None  # smoothing: the number of kept classes,
    w_f: jax.Array | None  # sum of w_k f(q_k) over them
    w_slope: jax.Array | None  # and of w_k f'(q_k)


class _Options(NamedTuple):
    """The static options of the focal kernel."""

    smooth: bool
    flsd: bool  # gamma = 5 where p_y < 0.2, else 3 (Mukhoti et al.'s FLSD-53)
    softcap: float | None


def _pow(u, gamma):
    """``u ** gamma`` for ``u`` in [0, 1], ``0 ** 0 = 1``, with finite derivatives at ``u = 0``."""
    zero = u == 0
    return jnp.where(zero, jnp.where(gamma == 0, 1.0, 0.0), jnp.where(zero, 1.0, u) ** gamma)


def _focal_terms(q, gamma, spelling="expm1", finite=None):
    """``f(q)`` and ``f'(q)`` for ``q = log p <= 0``: ``+inf`` and ``-1`` at ``q = -inf``.

    Each edge (``q = -inf``, ``q = 0``) is selected before any operation that
    would divide by zero there, so higher derivatives stay finite too.
    ``spelling`` names how ``p`` and ``p - 1`` are computed (:data:`_SPELLINGS`);
    ``finite``, if given, is where ``q > -inf`` (NaN entries may be either).
    """
    if finite is None:
        finite = q != -jnp.inf  # NaN stays NaN
    q = jnp.where(finite, q, -1.0)
    exp_and_expm1 = _SPELLINGS[spelling]
    u_gamma = _pow(-exp_and_expm1(q)[1], gamma)
    inside = q < 0
    q_in = jnp.where(inside, q, -1.0)
    p_in, p_minus_1 = exp_and_expm1(q_in)
    ph = jnp.where(inside, q_in * p_in / p_minus_1, 1.0)  # q p / (p - 1)
    f = jnp.where(finite, u_gamma * jnp.abs(q), jnp.inf)  # -q, and +0 (not -0) at p = 1
    slope = jnp.where(finite, -u_gamma * (1 + gamma * ph), -1.0)
    return f, slope


def _by_halves(q):
    half = jnp.exp(q / 2)
    return half * half, jnp.expm1(q / 2) * (half + 1)


def _by_tanh(q):
    p = jnp.exp(q)
    return p, jnp.tanh(q / 2) * (p + 1)


# ``e^q`` and ``e^q - 1``, each exact near ``q = 0``, spelled three ways: with label
# smoothing, the forward pass's two row sums and the tangent each take their own on GPUs
# and TPUs (jsoftmax._cpu.focal_terms), against XLA's GPU fusion as of jax 0.10-0.11;
# benchmarks/aot_gpu.py's focal rows show whether a [N, K] buffer returns.
_SPELLINGS = {
    "expm1": lambda q: (jnp.exp(q), jnp.expm1(q)),
    "halves": _by_halves,  # e^q - 1 = (e^(q/2) - 1) (e^(q/2) + 1)
    "tanh": _by_tanh,  # e^q - 1 = tanh(q/2) (e^q + 1)
}


def _rows(x, where, labels, weights, gamma, options) -> _Rows:
    """The max, the normaliser, then (with label smoothing) one pass for the row sums."""
    raw = _logits(x, where)
    top, m, s = _normalizer(raw, (-1,), options.softcap)
    z = _cpu.cap_for_row_sums(raw, options.softcap)
    log_s = jnp.log(s)
    z_y = _label_logit(x, where, labels, options.softcap)
    q_y = (_shifted(z_y, m) - log_s)[..., 0]
    if options.flsd:
        gamma = lax.stop_gradient(jnp.where(jnp.exp(q_y) < 0.2, 5.0, 3.0).astype(z.dtype))
    w_y = jnp.ones(q_y.shape, z.dtype) if weights is None else weights[labels]
    count = w_f = w_slope = None
    if options.smooth:
        q = _shifted(z, m) - log_s
        kept = raw != -jnp.inf
        gamma_k = gamma[..., None] if options.flsd else gamma
        f = _focal_terms(q, gamma_k)[0]
        slope = _cpu.focal_terms(_focal_terms, q, gamma_k, "halves")[1]
        w = 1.0 if weights is None else weights
        (w_f, w_slope), (count,) = _cpu.row_sums(
            [jnp.where(kept, w * f, 0.0), jnp.where(kept, w * slope, 0.0)],
            [kept.astype(z.dtype)],
        )
    has_class = _cpu.has_class(top, s)[..., 0]
    return _Rows(m[..., 0], log_s[..., 0], has_class, gamma, q_y, w_y, count, w_f, w_slope)


def _coefficients(rows, alpha, options):
    """Per row: ``c_y`` (the label's part of the target) and, with smoothing, ``alpha / K``."""
    label = jnp.where(rows.has_class, 1 - alpha if options.smooth else 1.0, 0.0) * rows.w_y
    if not options.smooth:
        return label, None
    return label, jnp.where(rows.has_class, alpha / jnp.maximum(rows.count, 1.0), 0.0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _focal(x, where, labels, weights, alpha, gamma, options):
    """Per-row focal loss of the logits over the last axis, and whether the row keeps a class."""
    rows = _rows(x, where, labels, weights, gamma, options)
    return _loss(rows, alpha, options), rows.has_class


def _loss(rows, alpha, options):
    # A label weighing 0 costs 0, also on a masked class (0 * inf); a NaN row stays NaN.
    f = _focal_terms(rows.q_y, rows.gamma)[0]
    loss = jnp.where((rows.w_y == 0) & jnp.isinf(f), 0.0, rows.w_y * f)
    if options.smooth:
        loss = _smoothed(loss, rows.w_f / jnp.maximum(rows.count, 1.0), alpha)
    return jnp.where(rows.has_class, loss, 0.0)


@functools.partial(jax.checkpoint, static_argnums=(0,), prevent_cse=False)
def _focal_tangent(options, x, where, labels, weights, alpha, rows, t_x):
    """The loss's tangent, recomputed from ``x`` and the per-row statistics in one pass.

    Under ``jax.checkpoint``, reverse mode keeps only these arguments: the
    logits and labels as given and per-row vectors.
    """
    z, slope = _cpu.cap_and_slope(_logits(x, where), options.softcap)
    kept = z != -jnp.inf  # masked and -inf classes are constants: no gradient
    q = _shifted(z, rows.m[..., None]) - rows.log_s[..., None]
    label, uniform = _coefficients(rows, alpha, options)
    label = label * _focal_terms(rows.q_y, rows.gamma)[1]  # c_y f'(q_y)
    b = label if uniform is None else label + uniform * rows.w_slope  # sum_k c_k f'(q_k)
    g = -b[..., None] * jnp.exp(q)  # 0 on masked classes (b is finite)
    if uniform is not None:
        gamma = rows.gamma[..., None] if options.flsd else rows.gamma
        w = 1.0 if weights is None else weights
        # q > -inf, not kept: a finite logit far below a row's +inf has q = -inf too;
        # and not q != -inf, the forward pass's spelling, which XLA would share.
        slope_k = _cpu.focal_terms(_focal_terms, q, gamma, "tanh", q > -jnp.inf)[1]
        g = g + uniform[..., None] * w * slope_k
    if slope is not None:  # d cap(x) / dx
        g = g * slope
    if options.smooth or options.softcap is not None:
        g = jnp.where(kept, g, 0.0)
    z_y = _label_logit(x, where, labels, options.softcap)[..., 0]
    cap = 1.0 if options.softcap is None else _capped_slope(z_y, options.softcap)
    g = g + _at_label(labels, jnp.where(z_y == -jnp.inf, 0.0, label * cap), z)
    return jnp.sum(g * t_x.astype(z.dtype), -1)


def _focal_jvp(options, primals, tangents):
    x, where, labels, weights, alpha, gamma = primals
    (t_x,) = _nonzero(tangents[0])
    # The value through the rule itself, so that higher derivatives use it too.
    loss, has_class = _focal(x, where, labels, weights, alpha, gamma, options)
    if t_x is None:
        t_loss = jnp.zeros_like(loss)
    else:
        rows = _rows(x, where, labels, weights, gamma, options)
        t_loss = _focal_tangent(options, x, where, labels, weights, alpha, rows, t_x)
    return (loss, has_class), (t_loss, np.zeros(has_class.shape, jax.dtypes.float0))


_focal.defjvp(_focal_jvp, symbolic_zeros=True)


@_sharding.auto_axes(_sharding.sharded_like("logits", drop="axis"))
def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    gamma: ArrayLike | str = 2.0,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax focal loss with integer labels: cross-entropy down-weighting confident classes.

    Per row, with ``p = softmax(x)``, label ``y``, class weights ``w`` (all 1
    by default) and the ``K`` kept classes (not masked, logit not ``-inf``):

    .. math::
        \ell = \sum_k c_k\, (1 - p_k)^\gamma\, (-\log p_k), \qquad
        c = (1 - \alpha)\, w_y\, e_y + \frac{\alpha}{K}\, w \odot [k\ \mathrm{kept}],

    the target ``c`` of :func:`jsoftmax.softmax_cross_entropy_with_integer_labels`
    with the same options, never built densely: the label's term is a gather
    and the smoothing's a row sum. ``gamma=0`` is that cross-entropy (computed
    by its kernel); without smoothing, each row is PyTorch-style focal loss
    ``-w_y (1 - p_y)^gamma log p_y``.

    Args:
      logits: floating ``[..., K]`` (the class axes are ``axis``).
      labels: integers, ``logits``' shape without ``axis``.
      axis: the class axis or axes (a tuple flattened in the order given, as optax does;
        None: every axis).
      where: boolean mask broadcastable to ``logits``, or with fewer axes a row
        mask broadcastable to the loss's shape (optax's ``[batch]``).
      gamma: the focusing parameter ``gamma >= 0``: a number or a scalar array
        (which may be traced, e.g. a schedule; it is not differentiated), or
        ``"flsd-53"`` for Mukhoti et al.'s sample-dependent choice, per row
        ``gamma = 5`` where ``p_y < 0.2`` and ``3`` otherwise (constant in
        the derivative, as in their implementation).
      class_weights: ``[K]`` non-negative weights ``w`` (not differentiated).
      ignore_index: a label value whose rows cost 0 and do not count.
      label_smoothing: ``alpha`` in [0, 1].
      logit_softcap: ``c > 0`` replaces logits by ``c * tanh(logits / c)``
        first; ``-inf`` logits stay masked (at most ``sqrt(finfo.max)``, as in
        the cross-entropy).
      reduction: "none", "sum" or "mean" (the sum divided by the sum of ``w_y``
        over the rows that count, as the cross-entropy).

    Returns:
      The loss per row (``labels``' shape) for "none", else a scalar; float32
      (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> labels = jnp.array([0, 2])
      >>> jsoftmax.softmax_focal_loss(logits, labels).round(4)
      Array([0.0457, 0.4883], dtype=float32)
      >>> jsoftmax.softmax_focal_loss(logits, labels, gamma=0.0).round(4)
      Array([0.4076, 1.0986], dtype=float32)
      >>> # FLSD-53: p_y = 0.09 < 0.2 takes gamma = 5, p_y = 0.67 gamma = 3
      >>> jsoftmax.softmax_focal_loss(
      ...     jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), labels=jnp.array([2, 2]),
      ...     gamma="flsd-53").round(4)
      Array([1.5022, 0.0153], dtype=float32)

    Note:
      The edges are the cross-entropy's: a label whose class is masked or has
      logit ``-inf`` costs ``+inf``; a fully masked row or an ignored label
      costs 0 with zero gradient (a NaN logit in an ignored row still makes
      its gradient NaN), and if no row counts, "mean" is 0. Masked
      classes get zero gradient, also where ``p_y = 1`` (the factor
      ``(1 - p)^(gamma - 1)`` of the textbook derivative is never formed).
      Near ``p_y = 1`` the loss carries a relative error of about
      ``(1 + gamma) eps / (1 - p_y)`` (``log p_y`` from the rounded
      normaliser, as in the cross-entropy): within ``eps`` of 1 it is 0.
      Labels out of range (other than ``ignore_index``) raise ``ValueError``
      when concrete; traced ones make that row's loss and gradient NaN, and so
      does a traced negative ``gamma`` or ``label_smoothing`` outside [0, 1]
      (every row).

    References:
      Lin et al., `Focal Loss for Dense Object Detection
      <https://arxiv.org/abs/1708.02002>`_, 2017.
      Mukhoti et al., `Calibrating Deep Neural Networks using Focal Loss
      <https://arxiv.org/abs/2002.09437>`_, 2020 (FLSD-53).
    """
    fname = "softmax_focal_loss"
    z, labels, where, class_weights, ignore_index = _integer_inputs(
        fname, logits, labels, axis, where, class_weights, ignore_index
    )
    dtype = _checks.compute_dtype(z.dtype)
    logit_softcap = _check_softcap(fname, logit_softcap, dtype)
    _check_reduction(fname, reduction)
    alpha = _hyper(fname, "label_smoothing", label_smoothing, 0.0, 1.0).astype(dtype)
    smooth = not _is_zero(label_smoothing)
    if isinstance(gamma, str):
        if gamma.lower() != FLSD_53:
            raise ValueError(f"{fname}: gamma must be a number >= 0 or {FLSD_53!r}, got {gamma!r}")
        gamma_, flsd = jnp.zeros(()), True
    else:
        gamma_, flsd = _hyper(fname, "gamma", gamma, 0.0), False
        if _is_zero(gamma):  # the cross-entropy itself, from its own kernel
            return _integer_loss(
                z,
                labels,
                where,
                class_weights,
                alpha,
                jnp.zeros((), dtype),  # as the losses' z_loss: their compiled program
                smooth,
                False,
                ignore_index,
                logit_softcap,
                reduction,
            )
    return _focal_loss(
        z,
        labels,
        where,
        class_weights,
        alpha,
        gamma_,
        smooth,
        flsd,
        ignore_index,
        logit_softcap,
        reduction,
    )


@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9, 10))
def _focal_loss(x, labels, where, weights, alpha, gamma, smooth, flsd, ignore, softcap, reduction):
    dtype = _checks.compute_dtype(x.dtype)
    alpha = lax.stop_gradient(alpha)
    gamma = lax.stop_gradient(gamma.astype(dtype))
    weights = _stopped_weights(weights, x.dtype)
    options = _Options(smooth, flsd, softcap)

    def loss_of(safe_labels, weights):
        loss, kept = _focal(x, where, safe_labels, weights, alpha, gamma, options)
        # A traced bad gamma (NaN from _hyper) in every row: the kernel's selects at
        # p_y = 1 and at a -inf label drop it there (-0 and inf rows with NaN gradients).
        return loss * jnp.where(jnp.isnan(gamma), jnp.nan, 1.0).astype(loss.dtype), kept

    return _per_label(loss_of, labels, where, x.shape[-1], weights, smooth, ignore, reduction)
