r"""Fused linear heads: cross-entropy, log-probabilities and distillation, chunked.

The ``[N, V]`` logits ``z = h W + b`` are never materialised: tokens are
processed in chunks of ``chunk_size`` rows, and each chunk's logits exist only
inside one step of a ``lax.scan`` (:func:`_scan`). Each public function is a
*head* (:func:`_cross_entropy_head`, :func:`_log_probs_head`,
:func:`_distillation_head`): from a chunk's logits it computes the per-token
values and, given their cotangents, the gradient with respect to the logits;
the core turns that into the gradients of ``hidden``, ``weight`` and ``bias``
(three matmuls a chunk, as the unfused computation costs). One
``jax.custom_vjp`` pattern serves every head: for "sum" and "mean" the
cotangent is one scalar, so the forward pass computes the gradients chunk by
chunk and keeps only them (:func:`_total`); for per-token outputs the backward
pass recomputes each chunk's logits from the saved inputs (:func:`_per_token`).
A per-token loss of a head's values (:func:`linear_log_probs_loss`) is applied
inside the chunk, where its VJP gives the head its cotangents
(:func:`_token_loss`).

With ``axis_name``, the weights and biases hold this device's slice of the
vocabulary inside ``jax.shard_map``: each shard reduces its slice and the
shards merge the row statistics in :func:`_merged` (``pmax`` of the max,
``psum`` of the sums), so every term is over the global vocabulary; the
gradient with respect to ``hidden`` is summed over the shards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jsoftmax import _checks, _cpu, _sharding
from jsoftmax._losses import (
    _at_label,
    _check_reduction,
    _check_softcap,
    _hyper,
    _options,
    _smoothed,
)
from jsoftmax._softmax import _cap, _capped_slope, _divided

# Default chunks, by backend: at most _CHUNK[backend][0] tokens, fewer while a
# chunk's [chunk_size, V] logits exceed _CHUNK[backend][1] elements. Each chunk
# reads and writes the [D, V] weight gradient, so small chunks cost time. CPU:
# at 4096 x 512 x 32000, chunks of 256, 512, 1024 and 2048 tokens took 1.19x,
# 1.05x, 0.99x and 1.06x the unfused loss's time. GPU/TPU: 2048 tokens was
# 1.03-1.08x the unfused loss's time in issue 13's H100 measurements at the
# Llama-3 and Gemma-2 heads, 1024 was 1.14-1.19x.
_CHUNK = {"cpu": (1024, 2**25)}
_ACCELERATOR_CHUNK = (2048, 2**29)


class _Config(NamedTuple):
    """The static options of one call: the head, its flags, the chunk and the mesh axis."""

    head: str
    chunk_size: int
    axis_name: str | tuple[str, ...] | None
    smooth: bool = False
    with_z_loss: bool = False
    softcap: float | None = None
    entropy: bool = False
    divergence: str = "forward_kl"
    accum_dtype: np.dtype | None = None
    token_loss: Callable | None = None  # of the head's per-token values and token_args


class _ByIdentity:
    """A callable in the static config, hashed and compared by its identity (a user's
    dataclass may define neither, or compare by value)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __hash__(self):
        return id(self.fn)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.fn is self.fn


class _Hyper(NamedTuple):
    """The heads' scalar hyperparameters (arrays; only ``temperature`` is ever differentiated)."""

    temperature: jax.Array | None
    alpha: ArrayLike | None = 0.0
    z_loss: ArrayLike | None = 0.0
    beta: ArrayLike | None = 0.5


# ---------------------------------------------------------------- the public heads


@_sharding.auto_axes(_sharding.sharded_like("hidden", drop=-1))
def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
    accum_dtype: DTypeLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Cross-entropy of ``hidden @ weight + bias`` without materialising the logits.

    Equals :func:`jsoftmax.softmax_cross_entropy_with_integer_labels` of
    ``hidden @ weight + bias`` with the same options, in value and in the
    gradients with respect to ``hidden``, ``weight`` and ``bias``, while its
    memory grows with ``chunk_size * V`` instead of ``N * V``; but for a token
    whose every logit is ``-inf``: NaN (unfused: 0).

    Args:
      hidden: floating ``[..., D]``.
      weight: floating ``[D, V]`` (a flax ``Dense`` kernel's layout); with
        ``axis_name``, this device's ``[D, V / P]`` slice of the vocabulary.
      labels: integers ``[...]`` (global class ids, also when sharded).
      bias: floating ``[V]`` (or this device's ``[V / P]`` slice), or None.
      where: boolean ``[...]``; False tokens cost 0 and do not count.
      ignore_index: a label value whose tokens cost 0 and do not count.
      label_smoothing: ``alpha`` in [0, 1], spread over each token's ``K`` kept
        classes, those whose logit is not ``-inf`` (a padded vocabulary's ``-inf``
        bias leaves its padding out), as the unfused loss spreads it.
      z_loss: ``lambda >= 0``, adds ``lambda * logsumexp**2`` per token.
      logit_softcap: ``c > 0`` replaces the logits by ``c * tanh(logits / c)``
        (at most ``sqrt(finfo.max)``, as in the cross-entropy).
      reduction: "none" (per token, ``labels``' shape), "sum", or "mean" (over
        the counting tokens; 0 when none counts).
      chunk_size: tokens per chunk (static). Memory is the float32 ``[D, V]``
        weight-gradient accumulator (the gradient itself for a float32
        weight, or with ``accum_dtype`` the weight's dtype) plus a few
        ``[chunk_size, V]`` float32 arrays (on CPU, where the matmul cannot
        add into the accumulator, also its ``[D, V]`` product when no dead
        chunk array holds it); smaller chunks cost time. By
        default, by backend and never by ``N``: on CPU 1024, on GPU and TPU
        2048, or the largest power of two keeping a chunk's logits within
        2**25 (CPU) or 2**29 elements when that is less.
      accum_dtype: the dtype in which the weight and bias gradients sum over
        the chunks. None: the compute dtype (float32, float64 for float64
        inputs), rounded to the weight's dtype once, as the unfused
        gradient is; a bfloat16 weight then needs a float32 ``[D, V]``
        buffer. The weight's dtype (``jnp.bfloat16``) adds each chunk's
        product into the gradient itself, as Liger Kernel and Cut
        Cross-Entropy do by default: no buffer, but one rounding per chunk.
      axis_name: the mesh axis (or a tuple of them) along which ``weight`` and
        ``bias`` are sharded by vocabulary, inside ``jax.shard_map``; None when
        not sharded.

    Returns:
      The loss per token for "none", else a scalar; float32 (float64 for
      float64 inputs). Gradients come back in the inputs' dtypes; bfloat16 and float16
      inputs are multiplied with float32 accumulation.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> hidden = jax.random.normal(jax.random.key(0), (6, 4))
      >>> weight = jax.random.normal(jax.random.key(1), (4, 10))
      >>> labels = jnp.array([0, 3, 9, 2, 2, 5])
      >>> fused = jsoftmax.linear_softmax_cross_entropy(
      ...     hidden, weight, labels, reduction="mean", chunk_size=4)
      >>> unfused = jsoftmax.softmax_cross_entropy_with_integer_labels(
      ...     hidden @ weight, labels, reduction="mean")
      >>> bool(jnp.allclose(fused, unfused))
      True

    Note:
      Sharded, the loss of each token is the same on every shard of
      ``axis_name``; "mean" and "sum" reduce over the tokens this device sees
      (shard over data and use "sum" with a ``psum`` for a global mean).
      Labels out of range raise ``ValueError`` when concrete; traced ones
      make that token's loss NaN (and so the gradients that sum over tokens).
    """
    fname = "linear_softmax_cross_entropy"
    hidden, weight, bias = _head_inputs(fname, "", hidden, weight, bias)
    axis_name = _axis(fname, axis_name)
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    where = _checks.mask(fname, where, hidden.shape[:-1])
    ignore_index = _checks.ignore_index(fname, ignore_index)
    labels = _checks.integer_labels(
        fname,
        labels,
        hidden.shape[:-1],
        weight.shape[1] * shards,
        f"hidden {hidden.shape}",
        ignore_index,
        kept=where,
    )
    size = _chunk_size(fname, chunk_size, weight.shape[1], labels.size)
    dtype = _compute_dtype(hidden, (weight, bias), None, None)
    logit_softcap = _check_softcap(fname, logit_softcap, dtype)
    alpha, z_loss_, smooth, with_z_loss = _options(fname, reduction, label_smoothing, z_loss, dtype)
    config = _Config(
        "cross_entropy",
        size,
        axis_name,
        accum_dtype=_accum_dtype(fname, accum_dtype),
        smooth=smooth,
        with_z_loss=with_z_loss,
        softcap=logit_softcap,
    )
    hyper = lax.stop_gradient(_Hyper(jnp.ones(()), alpha, z_loss_))
    out = _call(config, hidden, (weight, bias), None, labels, where, ignore_index, hyper, reduction)
    return out[0] if reduction == "none" else out


@_sharding.auto_axes(_sharding.sharded_like("hidden", drop=-1))
def linear_log_probs(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    accum_dtype: DTypeLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Each token's log-probability of its label (and entropy) without materialising the logits.

    With ``z = hidden @ weight + bias`` and temperature ``T``, per token

    .. math::
        \log p_y = z_y / T - \log \sum_k e^{z_k / T}, \qquad
        H = -\sum_k p_k \log p_k, \quad p = \mathrm{softmax}(z / T),

    equal to ``jsoftmax.log_softmax(z / T)`` at the label (and the entropy of
    ``softmax(z / T)``; but NaN for a token whose every logit is ``-inf``,
    where the unfused give ``-inf``) in value and in the gradients with respect to
    ``hidden``, ``weight``, ``bias`` and ``temperature``, for any per-token
    cotangent on either output (PPO and GRPO weigh each token's log-probability
    by its advantage; an entropy bonus differentiates the entropy).

    Args:
      hidden: floating ``[..., D]``.
      weight: floating ``[D, V]``; with ``axis_name``, this device's slice.
      labels: integers ``[...]`` (global class ids, also when sharded).
      bias: floating ``[V]`` (or this device's slice), or None.
      temperature: a positive scalar ``T``. Differentiable.
      where: boolean ``[...]``; False tokens give 0 and zero gradients (their
        labels are not read).
      return_entropy: also return each token's entropy.
      chunk_size: tokens per chunk (static); by default chosen by backend as
        in :func:`linear_softmax_cross_entropy`.
      accum_dtype: the dtype of the parameter gradients' sums over chunks, as
        in :func:`linear_softmax_cross_entropy`.
      axis_name: the mesh axis (or a tuple of them) along which ``weight`` and
        ``bias`` are sharded by vocabulary, inside ``jax.shard_map``; None when
        not sharded.

    Returns:
      The log-probabilities, ``labels``' shape, float32 (float64 for float64
      inputs); with ``return_entropy``, a tuple ``(log_probs, entropy)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> hidden = jax.random.normal(jax.random.key(0), (6, 4))
      >>> weight = jax.random.normal(jax.random.key(1), (4, 10))
      >>> labels = jnp.array([0, 3, 9, 2, 2, 5])
      >>> logp, entropy = jsoftmax.linear_log_probs(
      ...     hidden, weight, labels, temperature=0.7, return_entropy=True, chunk_size=4)
      >>> unfused = jsoftmax.log_softmax(hidden @ weight / 0.7)
      >>> bool(jnp.allclose(logp, jnp.take_along_axis(unfused, labels[:, None], 1)[:, 0]))
      True
      >>> bool(jnp.allclose(entropy, -jnp.sum(jnp.exp(unfused) * unfused, -1)))
      True

    Note:
      Labels out of range raise ``ValueError`` when concrete; traced ones make
      that token's outputs NaN. A traced non-positive temperature (under
      ``jax.jit`` or ``jax.grad``) cannot raise: every output and gradient
      comes out NaN.
    """
    config, hidden, params, labels, where, hyper = _log_probs_setup(
        "linear_log_probs", hidden, weight, labels, bias, temperature, where,
        return_entropy, chunk_size, accum_dtype, axis_name,
    )  # fmt: skip
    out = _call(config, hidden, params, None, labels, where, None, hyper, "none")
    return out if config.entropy else out[0]


@_sharding.auto_axes(_sharding.sharded_like("hidden", drop=-1))
def linear_log_probs_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    token_loss: Callable[..., jax.Array],
    token_args: tuple[ArrayLike, ...] = (),
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    with_entropy: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    accum_dtype: DTypeLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""A loss of each token's log-probability (and entropy), fused with the head.

    Per token, ``token_loss(log_p, *token_args)`` (with ``with_entropy``,
    ``token_loss(log_p, entropy, *token_args)``), ``log_p`` and ``entropy`` as
    :func:`linear_log_probs` gives them: a policy-gradient objective (PPO's or
    GRPO's clipped ratio against old log-probabilities, times advantages, an
    entropy bonus, a KL penalty against a reference model's log-probabilities).
    Equal to that function applied to :func:`linear_log_probs`' outputs, in
    value and in the gradients with respect to ``hidden``, ``weight``,
    ``bias`` and ``temperature``; but for "sum" and "mean" the gradients come
    out of the forward pass (the loss's derivative per token is known there),
    three matmuls a chunk against four for :func:`linear_log_probs` under a
    per-token cotangent.

    Args:
      hidden: floating ``[..., D]``.
      weight: floating ``[D, V]``; with ``axis_name``, this device's slice.
      labels: integers ``[...]`` (global class ids, also when sharded).
      token_loss: an elementwise function of per-token arrays: the
        log-probabilities (float32, float64 for float64 inputs), with
        ``with_entropy`` the entropies, then ``token_args``; one floating
        value per token. Static (hashed by identity): define it once (a
        module-level function), not as a new lambda per call, or each
        un-jitted call compiles anew and the cache keeps it. It must not
        close over traced values: pass those in ``token_args``.
      token_args: a tuple of floating arrays that broadcast to ``labels``'
        shape (a scalar too: a clip range or a KL coefficient), constants (no
        gradient flows to them): advantages, old or reference log-probabilities.
      bias: floating ``[V]`` (or this device's slice), or None.
      temperature: a positive scalar ``T``. Differentiable.
      where: boolean ``[...]``; False tokens cost 0 and do not count (their
        labels are not read).
      with_entropy: pass each token's entropy to ``token_loss``.
      reduction: "mean" (over the counting tokens; 0 when none counts), "sum",
        or "none" (per token, ``labels``' shape). "mean" by default, unlike
        the other heads: the fused gradient needs a scalar reduction (with
        "none" the per-token cotangents arrive in the backward pass, as for
        :func:`linear_log_probs`).
      chunk_size, accum_dtype, axis_name: as in
        :func:`linear_softmax_cross_entropy`.

    Returns:
      The loss per token for "none", else a scalar; float32 (float64 for
      float64 inputs).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> def grpo(log_p, old_log_p, advantage):  # the clipped surrogate
      ...     ratio = jnp.exp(log_p - old_log_p)
      ...     return -jnp.minimum(ratio * advantage, jnp.clip(ratio, 0.8, 1.2) * advantage)
      >>> hidden = jax.random.normal(jax.random.key(0), (6, 4))
      >>> weight = jax.random.normal(jax.random.key(1), (4, 10))
      >>> labels = jnp.array([0, 3, 9, 2, 2, 5])
      >>> old = jsoftmax.linear_log_probs(hidden, weight, labels) - 0.1
      >>> advantage = jnp.array([1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
      >>> loss = jsoftmax.linear_log_probs_loss(
      ...     hidden, weight, labels, grpo, (old, advantage), chunk_size=4)
      >>> log_p = jsoftmax.linear_log_probs(hidden, weight, labels)
      >>> bool(jnp.allclose(loss, jnp.mean(grpo(log_p, old, advantage))))
      True

    Note:
      Labels out of range raise ``ValueError`` when concrete; traced ones make
      that token's loss NaN (and so "sum" and "mean").
    """
    fname = "linear_log_probs_loss"
    if not callable(token_loss):
        raise TypeError(f"{fname}: token_loss must be callable, got {token_loss!r}")
    config, hidden, params, labels, where, hyper = _log_probs_setup(
        fname, hidden, weight, labels, bias, temperature, where,
        with_entropy, chunk_size, accum_dtype, axis_name, token_loss,
    )  # fmt: skip
    token_args = _token_args(fname, token_args, labels.shape)
    _check_reduction(fname, reduction)
    out = _call(config, hidden, params, None, labels, where, None, hyper, reduction, token_args)
    return out[0] if reduction == "none" else out


_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@_sharding.auto_axes(_sharding.sharded_like("student_hidden", drop=-1))
def linear_distillation_loss(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    *,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    divergence: str = "forward_kl",
    beta: ArrayLike = 0.5,
    where: ArrayLike | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
    accum_dtype: DTypeLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Knowledge distillation from two models' hidden states, without either logit matrix.

    With the teacher's logits ``t = teacher_hidden @ teacher_weight +
    teacher_bias``, the student's ``s`` likewise, ``P = softmax(t / T)`` and
    ``Q = softmax(s / T)``, per token:

    .. math::
        \text{forward\_kl: } T^2\, \mathrm{KL}(P \,\|\, Q), \qquad
        \text{reverse\_kl: } T^2\, \mathrm{KL}(Q \,\|\, P),

    .. math::
        \text{jsd: } T^2 \left(\beta\, \mathrm{KL}(P \,\|\, M)
        + (1 - \beta)\, \mathrm{KL}(Q \,\|\, M)\right), \quad
        M = \beta P + (1 - \beta) Q,

    Hinton et al.'s temperature-scaled loss (the ``T**2`` keeps gradient sizes
    comparable across temperatures) and the generalised Jensen-Shannon
    divergence of GKD and Liger Kernel's fused linear JSD. Chunked over
    tokens, so neither ``[N, V]`` logit matrix exists whole.

    Args:
      student_hidden: floating ``[..., D_s]``.
      student_weight: floating ``[D_s, V]``; with ``axis_name``, this device's slice.
      teacher_hidden: floating ``[..., D_t]``, the same leading shape.
      teacher_weight: floating ``[D_t, V]``: ``D_t`` may differ from ``D_s``,
        the vocabulary may not (and is sharded alike).
      student_bias, teacher_bias: floating ``[V]`` (or the slice), or None.
      temperature: a positive scalar ``T`` (a constant: not differentiated).
      divergence: "forward_kl", "reverse_kl" or "jsd".
      beta: the JSD's weight in (0, 1) (at 0 and 1 its formula is identically
        0: use "forward_kl" or "reverse_kl").
      where: boolean, the tokens' shape; False tokens cost 0 and do not count.
      reduction: "none" (per token), "sum", or "mean" (over the counting
        tokens; 0 when none counts).
      chunk_size: tokens per chunk (static); by default chosen by backend as
        in :func:`linear_softmax_cross_entropy`.
      accum_dtype: the dtype of the parameter gradients' sums over chunks, as
        in :func:`linear_softmax_cross_entropy`.
      axis_name: the mesh axis (or a tuple of them) along which both heads are
        sharded by vocabulary, inside ``jax.shard_map``; None when not sharded.

    Returns:
      The loss per token for "none", else a scalar; float32 (float64 for
      float64 inputs). Gradients flow to the student's hidden, weight and bias only:
      the teacher is a constant.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> keys = jax.random.split(jax.random.key(0), 4)
      >>> s_h, t_h = jax.random.normal(keys[0], (6, 4)), jax.random.normal(keys[1], (6, 8))
      >>> s_w, t_w = jax.random.normal(keys[2], (4, 10)), jax.random.normal(keys[3], (8, 10))
      >>> loss = jsoftmax.linear_distillation_loss(s_h, s_w, t_h, t_w, temperature=2.0)
      >>> p, log_q = jax.nn.softmax(t_h @ t_w / 2), jax.nn.log_softmax(s_h @ s_w / 2)
      >>> want = 4 * jnp.sum(p * (jnp.log(p) - log_q), -1)
      >>> bool(jnp.allclose(loss, want, rtol=1e-5))
      True
    """
    fname = "linear_distillation_loss"
    hidden, weight, bias = _head_inputs(
        fname, "student_", student_hidden, student_weight, student_bias
    )
    t_hidden, t_weight, t_bias = _head_inputs(
        fname, "teacher_", teacher_hidden, teacher_weight, teacher_bias
    )
    if t_hidden.shape[:-1] != hidden.shape[:-1] or t_weight.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{fname}: the teacher (hidden {t_hidden.shape}, weight {t_weight.shape}) and the "
            f"student (hidden {hidden.shape}, weight {weight.shape}) need the same tokens "
            "[...] and the same vocabulary V"
        )
    _checks.choice(fname, "divergence", divergence, _DIVERGENCES)
    _check_reduction(fname, reduction)
    tokens = hidden.shape[:-1]
    where = _checks.mask(fname, where, tokens)
    dtype = _compute_dtype(hidden, (weight, bias), (t_weight, t_bias), t_hidden)
    beta_ = _hyper(fname, "beta", beta, 0.0, 1.0).astype(dtype)
    if divergence == "jsd":  # 0 < beta < 1 as computed (0.999999999 is 1 in float32)
        if not _checks.is_traced(beta) and not 0 < np.asarray(beta, dtype) < 1:
            raise ValueError(f"{fname}: beta must be in (0, 1) for the jsd, got {beta}")
        beta_ = jnp.where((beta_ > 0) & (beta_ < 1), beta_, jnp.nan)
    hyper = lax.stop_gradient(_Hyper(_temperature(fname, temperature, dtype), beta=beta_))
    size = _chunk_size(fname, chunk_size, weight.shape[1], int(np.prod(tokens)))
    accum = _accum_dtype(fname, accum_dtype)
    axis_name = _axis(fname, axis_name)
    config = _Config("distillation", size, axis_name, divergence=divergence, accum_dtype=accum)
    teacher = (t_hidden, t_weight, t_bias)
    out = _call(config, hidden, (weight, bias), teacher, None, where, None, hyper, reduction)
    return out[0] if reduction == "none" else out


# ---------------------------------------------------------------- validation


def _head_inputs(fname, prefix, hidden, weight, bias):
    """Checks one head's ``hidden [..., D]``, ``weight [D, V]`` and ``bias [V]`` (or None)."""
    hidden = _checks.floating(fname, f"{prefix}hidden", hidden)
    weight = _checks.floating(fname, f"{prefix}weight", weight)
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{fname}: {prefix}hidden has shape {hidden.shape} and {prefix}weight "
            f"{weight.shape}; they need [..., D] and [D, V]"
        )
    if weight.shape[1] == 0:
        raise ValueError(f"{fname}: {prefix}weight {weight.shape} has no class (V = 0)")
    if bias is not None:
        bias = _checks.floating(fname, f"{prefix}bias", bias)
        if bias.shape != (weight.shape[1],):
            raise ValueError(
                f"{fname}: {prefix}bias has shape {bias.shape} but {prefix}weight "
                f"{weight.shape} needs ({weight.shape[1]},)"
            )
    return hidden, weight, bias


def _axis(fname, axis_name):
    """``axis_name`` checked: None, a mesh axis's name, or a tuple (or list) of them."""
    if axis_name is None or isinstance(axis_name, str):
        return axis_name
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else ()
    if not names or not all(isinstance(name, str) for name in names):
        raise TypeError(
            f"{fname}: axis_name must be a mesh axis's name or a tuple of them, got {axis_name!r}"
        )
    return names


def _log_probs_setup(
    fname, hidden, weight, labels, bias, temperature, where, entropy, chunk_size, accum_dtype,
    axis_name, token_loss=None,
):  # fmt: skip
    """The log-probability head's config, checked inputs and hyperparameters (a masked
    token's label becomes 0: it is not read)."""
    hidden, weight, bias = _head_inputs(fname, "", hidden, weight, bias)
    axis_name = _axis(fname, axis_name)
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    where = _checks.mask(fname, where, hidden.shape[:-1])
    labels = _checks.integer_labels(
        fname,
        labels,
        hidden.shape[:-1],
        weight.shape[1] * shards,
        f"hidden {hidden.shape}",
        kept=where,
    )
    if where is not None:
        labels = jnp.where(where, labels, 0)  # a masked token's label is not read
    config = _Config(
        "log_probs",
        _chunk_size(fname, chunk_size, weight.shape[1], labels.size),
        axis_name,
        entropy=_checks.flag(
            fname, "return_entropy" if token_loss is None else "with_entropy", entropy
        ),
        accum_dtype=_accum_dtype(fname, accum_dtype),
        token_loss=None if token_loss is None else _ByIdentity(token_loss),
    )
    dtype = _compute_dtype(hidden, (weight, bias), None, None)
    hyper = _Hyper(_temperature(fname, temperature, dtype))
    return config, hidden, (weight, bias), labels, where, hyper


def _token_args(fname, token_args, tokens):
    """``token_args``: floating arrays broadcast to the tokens' shape, held constant."""
    if not isinstance(token_args, (tuple, list)):
        raise TypeError(f"{fname}: token_args must be a tuple of arrays, got {type(token_args)}")
    checked = []
    for i, arg in enumerate(token_args):
        if isinstance(arg, int | np.integer) and not isinstance(arg, bool):  # a number, as 0.2
            arg = float(arg)
        arg = _checks.array(fname, f"token_args[{i}]", arg)
        if not jnp.issubdtype(arg.dtype, jnp.floating):
            raise TypeError(f"{fname}: token_args[{i}] must be floating, got {arg.dtype}")
        try:
            arg = jnp.broadcast_to(arg, tokens)
        except ValueError:
            raise ValueError(
                f"{fname}: token_args[{i}] has shape {arg.shape}, which does not broadcast "
                f"to the tokens' {tokens}"
            ) from None
        checked.append(lax.stop_gradient(arg))
    return tuple(checked)


def _temperature(fname, temperature, dtype):
    """A positive finite scalar temperature in the compute ``dtype`` (NaN when traced and
    not), as log_softmax takes its input's."""
    if np.ndim(temperature) != 0:
        raise ValueError(
            f"{fname}: temperature must be a scalar, got shape {np.shape(temperature)}"
        )
    return _checks.temperature(fname, temperature, (), (), dtype)


def _chunk_size(fname, chunk_size, vocab, tokens):
    """The static chunk: as given (checked), or the default for this backend and ``vocab``."""
    if chunk_size is None:
        chunk_size = _default_chunk(vocab, jax.default_backend())
    else:
        chunk_size = _checks.static_int(fname, "chunk_size", chunk_size, 1)
    return min(chunk_size, max(1, tokens))


def _accum_dtype(fname, accum_dtype):
    """None (the compute dtype) or the floating dtype in which parameter gradients sum."""
    if accum_dtype is None:
        return None
    try:
        dtype = jnp.dtype(accum_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fname}: accum_dtype must be a floating dtype or None, got {accum_dtype!r}"
        )
    return jax.dtypes.canonicalize_dtype(dtype)  # float64 is float32 without x64


def _default_chunk(vocab, backend):
    """A power of two, from the vocabulary (this shard's) and the backend, never from ``N``."""
    tokens, elements = _CHUNK.get(backend, _ACCELERATOR_CHUNK)
    return 1 << (max(1, min(tokens, elements // vocab)).bit_length() - 1)


# ---------------------------------------------------------------- the heads


def _merged(config, collective, x):
    """The one place where the shards' row statistics meet (over the vocabulary axis)."""
    return x if config.axis_name is None else collective(x, config.axis_name)


def _normalized(config, z, temperature=None):
    """Of ``x = z / T`` (``z`` where no temperature is given): the row max ``m`` of
    ``z`` (the shift before the division), the shifted logits ``d = (z - m) / T``
    (:func:`_shifted`), ``exp(d)``, its row sum ``s`` and whether the row holds ``+inf``.

    Over the global vocabulary (``m`` is the max over every shard): the row's
    logsumexp is ``m + log s`` and ``log softmax(x) = d - log s``, which keeps
    the precision of confident rows (no large ``x`` is subtracted from another).
    As in the softmax family, ``m`` is clamped to be finite and ``z`` at ``m``:
    ``+inf`` logits sit at ``d = 0`` and share the row's mass.
    Shifted before the division: ``z * (1 / T) - m`` may compile to one fused
    multiply-add, which leaves the max's own ``d`` off by the rounding of
    ``z / T``, and its ``exp`` underflowed for logits from about 2e9. Halved
    first (exactly), so that the shift of a row spanning ``+-finfo.max`` does
    not overflow where ``(z - m) / T`` is finite; doubled after dividing by
    ``T``, not halving ``T``, which a ``T`` below ``2 finfo.tiny`` would take
    to a subnormal that XLA flushes to 0.
    """
    big = jnp.finfo(z.dtype).max
    # (The max only shifts: no derivative, which ``pmax`` lacks, reaches it.)
    top = _merged(config, lax.pmax, lax.stop_gradient(jnp.max(z, axis=1)))
    m = jnp.clip(top, -big, big)
    d = _shifted(z, m[:, None], temperature)
    e = jnp.exp(d)
    return m, d, e, _merged(config, lax.psum, jnp.sum(e, axis=1)), top == jnp.inf


def _shifted(z, m, temperature):
    """``d`` of :func:`_normalized` for logits ``z`` of rows shifted by ``m``."""
    z = _cpu.clamped(z, m)
    if temperature is None:
        return z - m
    # (_divided: an infinite quotient, a -inf logit's, is constant in T; its derivative
    # -d / T, infinite, met exp(d) = 0 in the second derivatives: NaN)
    return 2 * _divided(0.5 * z - 0.5 * m, temperature)


def _weighted(w, a):
    """``w * a``, and 0 where ``w`` is 0 (the limit, also where ``a`` is infinite).

    A ``-inf`` logit (a masked class, say a padded vocabulary's ``-inf`` bias)
    has probability 0, and its log-probability times it contributes nothing.
    ``a`` is also selected before the product, whose derivative in ``w`` is ``a``:
    NaN in the second derivatives at a class neither model can take (``-inf + inf``).
    """
    positive = w > 0
    return jnp.where(positive, w * jnp.where(positive, a, 0.0), 0.0)


def _vocabulary(config, local):
    """This shard's first class id and the global vocabulary size."""
    if config.axis_name is None:
        return 0, local
    return lax.axis_index(config.axis_name) * local, local * lax.axis_size(config.axis_name)


def _label_terms(config, z, labels, counts):
    """The label's column on this shard, its logit (merged) and a NaN factor for bad labels."""
    local = z.shape[1]
    first, vocab = _vocabulary(config, local)
    index = labels - first
    mine = (index >= 0) & (index < local)
    z_label = jnp.take_along_axis(z, jnp.clip(index, 0, local - 1)[:, None], axis=1)[:, 0]
    z_label = _merged(config, lax.psum, jnp.where(mine, z_label, 0.0))
    bad = jnp.where(counts & ((labels < 0) | (labels >= vocab)), jnp.nan, 1.0)
    return index, z_label, bad


def _cross_entropy_head(config, z, t, labels, counts, hyper, cts):
    r"""``lse - (1 - alpha) z_y - alpha / K sum_{k kept} z_k + lambda lse**2`` per token,
    computed shifted as ``log s - (1 - alpha) d_y - alpha / K sum_{k kept} d_k + ...``, and
    ``d/dz = (1 + 2 lambda lse) p - (1 - alpha) [k = y] - alpha / K [k kept]`` (times the
    cap's slope), the ``K`` kept classes those whose logit is not ``-inf``.

    As :func:`jsoftmax.softmax_cross_entropy_with_integer_labels` counts them:
    a ``-inf`` logit (a padded vocabulary's ``-inf`` bias) takes no smoothing
    mass and no gradient, also at the label (whose loss is ``+inf``, and 0 of
    its term at ``alpha = 1``). Smoothing's two row sums, ``K`` and ``sum_{k
    kept} d_k``, read the chunk's logits in the pass that sums them (no matmul)
    and merge over the shards in one ``psum``.
    """
    del t
    alpha, z_loss = hyper.alpha, hyper.z_loss
    if config.softcap is not None:
        z = _cap(z, config.softcap)  # -inf stays -inf
    m, d, e, s, _ = _normalized(config, z)
    log_s = jnp.log(s)
    index, z_label, bad = _label_terms(config, z, labels, counts)
    d_label = _shifted(z_label, m, None)
    loss = log_s - d_label  # shifted: no logsumexp of large logits less one of them
    if config.smooth:
        kept = z != -jnp.inf
        count, d_sum = _merged(
            config,
            lax.psum,
            (jnp.sum(kept, axis=1, dtype=z.dtype), jnp.sum(jnp.where(kept, d, 0.0), axis=1)),
        )
        count = jnp.maximum(count, 1.0)
        uniform = alpha / count
        # As the unfused loss weighs them (a weight of 0 drops its term, also a -inf label's).
        loss = _smoothed(loss, log_s - d_sum / count, alpha)
    if config.with_z_loss:
        lse = m + log_s
        loss = loss + jnp.where(z_loss == 0, 0.0, z_loss * lse * lse)  # (lse**2 overflows first)
    loss = jnp.where(counts, loss, 0.0) * bad
    if cts is None:
        return (loss,), None, None
    r = cts[0] * bad
    p_coef = (1 + 2 * z_loss * lse) * r / s if config.with_z_loss else r / s
    # A -inf label takes no gradient; not read from d_label, which is -inf too where a
    # finite label lies finfo.max below the max (-3e38 against 3e38).
    label_coef = jnp.where(z_label == -jnp.inf, 0.0, (1 - alpha) * r)
    dz = p_coef[:, None] * e - _at_label(index, label_coef, z)
    if config.smooth:
        dz = dz - jnp.where(kept, (uniform * r)[:, None], 0.0)
    if config.softcap is not None:
        dz = dz * _capped_slope(z, config.softcap)
    return (loss,), _counted(counts, dz), None


def _log_probs_head(config, z, t, labels, counts, hyper, cts):
    r"""``log p_y = d_y - log s`` and ``H = log s - sum_k p_k d_k`` of ``x = z / T``
    (``d = x - m``); ``d/dx = g_1 ([k = y] - p) - g_2 p (d - sum_k p_k d_k)``,
    ``d/dz = d/dx / T`` and ``d/dT = -sum_k x_k d/dx_k / T = -sum_k d_k d/dx_k / T``
    (``d/dx`` sums to 0 over a row), the sum over the finite ``x_k``: an infinite one is
    constant in ``T``. In a row holding ``+inf`` the finite classes have ``p = 0`` and
    ``d_k`` is not ``x_k - m`` (``+inf`` sits at ``d = 0``): there it takes ``x_k``."""
    del t
    temperature = hyper.temperature
    m, d, e, s, certain = _normalized(config, z, temperature)
    log_s = jnp.log(s)
    index, z_label, bad = _label_terms(config, z, labels, counts)
    d_label = _shifted(z_label, m, temperature)
    outputs = [d_label - log_s]
    p = e / s[:, None]
    finite = jnp.where(d == -jnp.inf, 0.0, d)  # a -inf logit has p = 0: 0 * d counts as 0
    if config.entropy:
        mean = _merged(config, lax.psum, jnp.sum(p * finite, axis=1))  # sum_k p_k d_k
        outputs.append(log_s - mean)
    outputs = tuple(jnp.where(counts, o, 0.0) * bad for o in outputs)
    if cts is None:
        return outputs, None, None
    g = [c * bad for c in cts]
    # A label whose x = z / T is -inf (a -inf logit, or one whose quotient overflows) has
    # log p = -inf whatever the others: no gradient, as in log_softmax. (Not from
    # d_label, which is -inf too for a finite label in a +inf row at a small temperature.)
    g[0] = jnp.where(z_label / temperature == -jnp.inf, 0.0, g[0])
    dx = _at_label(index, g[0], d) - g[0][:, None] * p
    if config.entropy:
        dx = dx - g[1][:, None] * p * (finite - mean[:, None])
    dx = _counted(counts, dx)
    x = jnp.where(jnp.isfinite(z), z, 0.0) / temperature
    d_temperature = -jnp.sum(dx * jnp.where(certain[:, None], x, finite)) / temperature
    return outputs, dx / temperature, d_temperature


def _distillation_head(config, z, t, labels, counts, hyper, cts):
    r"""``T**2`` times the divergence between ``P = softmax(t / T)`` and ``Q = softmax(z / T)``.

    With ``x = z / T``: forward KL's ``d/dx = Q - P`` on the student's finite logits (0
    without a teacher class; where the student has ``-inf`` and the teacher mass, the loss
    is ``+inf`` and the unfused gradient ``Q S - P``, ``S`` the teacher's mass on the finite
    logits, which would cost a row sum); reverse KL's ``Q (log Q - log P - KL)``; the JSD's
    ``(1 - beta) Q (log Q - log M - KL(Q || M))``. Terms weighted by a zero probability are
    0, also against a ``-inf`` logit; a ``-inf`` logit takes no gradient, as in
    :func:`jsoftmax.log_softmax`. A NaN logit makes its token's loss and gradient NaN.
    """
    del labels
    temperature, beta = hyper.temperature, hyper.beta
    q, log_q, s_q = _distribution(config, z, temperature)
    p, log_p, s_p = _distribution(config, t, temperature)
    # The zero-weighted terms would drop a NaN probability: the row sums keep it.
    poison = jnp.where(jnp.isnan(s_q + s_p), jnp.nan, 1.0)

    def total(terms):
        return _merged(config, lax.psum, jnp.sum(terms, axis=1))

    if config.divergence == "forward_kl":
        kl = total(_weighted(p, log_p - log_q))
    elif config.divergence == "reverse_kl":
        kl = total(_weighted(q, log_q - log_p))
    else:
        # At a class neither model can take (weighted by p = q = 0 below) no
        # logaddexp(-inf, -inf): its derivative is NaN, which a zero cotangent keeps.
        neither = (log_p == -jnp.inf) & (log_q == -jnp.inf)
        terms = (jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
        log_m = jnp.logaddexp(*(jnp.where(neither, 0.0, term) for term in terms))
        kl_qm = total(_weighted(q, log_q - log_m))
        kl = beta * total(_weighted(p, log_p - log_m)) + (1 - beta) * kl_qm
    # (T * (T * kl): T**2 overflows past sqrt(finfo.max), where the divergence is about 0)
    loss = jnp.where(counts, temperature * (temperature * kl) * poison, 0.0)
    if cts is None:
        return (loss,), None, None
    r = cts[0] * temperature * poison  # T**2 from the loss, 1 / T from x
    if config.divergence == "forward_kl":
        # Q - P: 0 without a teacher class, and at a -inf logit (a constant).
        dx = jnp.where((z != -jnp.inf) & (s_p > 0)[:, None], q - p, 0.0)
    elif config.divergence == "reverse_kl":
        dx = _weighted(q, log_q - log_p - kl[:, None])
    else:
        dx = (1 - beta) * _weighted(q, log_q - log_m - kl_qm[:, None])
    return (loss,), _counted(counts, r[:, None] * dx), None


def _counted(counts, dz):
    """``dz`` with the rows of the tokens that do not count 0, whatever their cotangent and
    probabilities (NaN where every logit is ``-inf``, or a NaN teacher on padding)."""
    return jnp.where(counts[:, None], dz, 0.0)


def _distribution(config, z, temperature):
    """``softmax(z / T)``, its log and the row sum of :func:`_normalized`: a row without a
    class (every logit ``-inf``, sum 0) is 0 and ``-inf``, as :func:`jsoftmax.softmax` and
    :func:`jsoftmax.log_softmax` give it."""
    _, d, e, s, _ = _normalized(config, z, temperature)
    empty = (s == 0)[:, None]
    p = jnp.where(empty, 0.0, e / s[:, None])
    return p, jnp.where(empty, -jnp.inf, d - jnp.log(s)[:, None]), s


_HEADS = {
    "cross_entropy": _cross_entropy_head,
    "log_probs": _log_probs_head,
    "distillation": _distillation_head,
}


def _token_loss(config, head, counts, token_args, cts) -> tuple:
    """``config.token_loss`` of the head's per-token values, and the head's gradient under
    the cotangents that the loss's VJP gives them (``cts``: the loss's own)."""
    values = head(None)[0]
    out, pullback = jax.vjp(lambda *v: config.token_loss(*v, *token_args), *values)
    if out.shape != values[0].shape or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            "linear_log_probs_loss: token_loss must be elementwise, one floating value per "
            f"token: got {out.dtype}{list(out.shape)} for a chunk of {len(values[0])} tokens"
        )
    loss = jnp.where(counts, out.astype(values[0].dtype), 0.0)
    if cts is None:
        return (loss,), None, None
    # The head runs again under the cotangents: the same values, which XLA computes once.
    # (Varying as ``out`` does under shard_map: a replicated mask leaves it replicated.)
    ct = _vary(jnp.where(counts, cts[0], 0.0).astype(out.dtype), _varying(out))
    _, dz, d_temperature = head(pullback(ct))
    return (loss,), dz, d_temperature


# ---------------------------------------------------------------- the chunked core


def _compute_dtype(h, params, teacher, t_hidden):
    """One call's compute dtype, from every floating input: float32 for float16, bfloat16 and
    float32, float64 if any is float64 (the chunks and the scan's accumulators agree)."""
    leaves = jax.tree.leaves((h, params, teacher, t_hidden))
    return _checks.compute_dtype(_checks.promoted(*(x.dtype for x in leaves)))


def _sum_dtype(config, dtype):
    """The dtype of the parameter gradients' sums over chunks (``dtype``: the compute dtype)."""
    return dtype if config.accum_dtype is None else config.accum_dtype


def _project(h, weight, bias, dtype):
    """One chunk's logits ``h @ weight + bias`` in ``dtype`` (low precision accumulates in it)."""
    mixed = _checks.promoted(h.dtype, weight.dtype)  # (as jnp.dot would, strict or not)
    z = jnp.dot(h.astype(mixed), weight.astype(mixed), preferred_element_type=dtype)
    return z if bias is None else z + bias.astype(dtype)


def _chunk(config, h, params, teacher, rows, hyper, cts):
    """One chunk of tokens: the head's per-token values and, with ``cts``, the gradients.

    ``cts`` are the values' per-token cotangents; the gradients are those of
    ``sum(cts * values)`` with respect to ``h``, ``weight``, ``bias`` (summed
    over the chunk) and the temperature.
    """
    weight, bias = params
    t_hidden, labels, counts, token_args = rows
    dtype = _compute_dtype(h, params, teacher, t_hidden)
    z = _project(h, weight, bias, dtype)
    t = None if teacher is None else _project(t_hidden, teacher[0], teacher[1], dtype)
    head = functools.partial(_HEADS[config.head], config, z, t, labels, counts, hyper)
    if config.token_loss is None:
        values, dz, d_temperature = head(cts)
    else:
        values, dz, d_temperature = _token_loss(config, head, counts, token_args, cts)
    if cts is None:
        return values, None
    # In the product's dtype, as the logits were (a float32 ``h`` upcasts a bfloat16 head).
    mixed = _checks.promoted(h.dtype, weight.dtype)
    dz_in = dz.astype(mixed)
    dh = jnp.dot(dz_in, weight.T, preferred_element_type=dtype)
    sums = _sum_dtype(config, dtype)  # the matmul library rounds once into its output
    dw = jnp.dot(h.T.astype(mixed), dz_in, preferred_element_type=sums)
    db = None if bias is None else jnp.sum(dz, axis=0).astype(sums)
    if d_temperature is None:
        d_temperature = jnp.zeros((), dtype)
    return values, (dh, (dw, db), d_temperature)


def _scan(config, h, params, teacher, rows, hyper, cts):
    """Runs :func:`_chunk` over the tokens: per-token values and, with ``cts``, summed gradients.

    Parameter gradients are accumulated in the compute dtype (or
    ``config.accum_dtype``): for float32 weights the accumulator is the
    weight gradient itself, no second ``[D, V]`` buffer.
    """
    n, size = h.shape[0], config.chunk_size
    steps = -(-n // size)

    def chunked(x):
        x = jnp.pad(x, [(0, steps * size - n)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(steps, size, *x.shape[1:])

    xs = jax.tree.map(chunked, (h, rows, cts))

    def body(carry, x):
        h_c, rows_c, cts_c = x
        values, g = _chunk(config, h_c, params, teacher, rows_c, hyper, cts_c)
        if g is None:
            return carry, values
        dh, *sums = g
        return jax.tree.map(jnp.add, carry, tuple(sums)), (values, dh)

    def unchunked(x):
        return x.reshape(steps * size, *x.shape[2:])[:n]

    if cts is None:
        return jax.tree.map(unchunked, lax.scan(body, (), xs)[1]), None
    dtype = _compute_dtype(h, params, teacher, rows[0])
    # Under shard_map the sums vary along every mesh axis their terms vary along.
    inputs = jax.tree.leaves((h, params, teacher, rows, hyper, cts))
    axes = frozenset().union(*map(_varying, inputs))

    def zeros(x, dtype):
        return _vary(jnp.zeros(x.shape, dtype), axes)

    sums = _sum_dtype(config, dtype)
    init = (jax.tree.map(lambda x: zeros(x, sums), params), zeros(hyper[0], dtype))
    (d_params, d_temperature), (values, dh) = lax.scan(body, init, xs)
    values, dh = jax.tree.map(unchunked, (values, dh))
    if config.axis_name is not None:  # each shard holds its slice's part
        dh, d_temperature = lax.psum((dh, d_temperature), config.axis_name)
    return values, (dh, d_params, d_temperature)


@functools.partial(jax.jit, static_argnums=(0, 6, 8))
def _call(config, hidden, params, teacher, labels, where, ignore, hyper, reduction, token_args=()):
    """Flattens the tokens; the per-token values (a tuple) for "none", else their reduction."""
    shape = hidden.shape[:-1]
    tokens = math.prod(shape)  # (not -1, which a hidden size of 0 leaves undetermined)
    h = hidden.reshape(tokens, hidden.shape[-1])
    t_hidden = None
    if teacher is not None:
        t_hidden, *teacher = teacher
        t_hidden, teacher = t_hidden.reshape(tokens, t_hidden.shape[-1]), tuple(teacher)
    counts = jnp.ones(h.shape[:1], bool) if where is None else where.reshape(-1)
    if labels is not None:
        labels = labels.reshape(-1)
        if ignore is not None:
            counts = counts & (labels != ignore)
    token_args = tuple(a.reshape(-1) for a in token_args)
    rows = (t_hidden, labels, counts, token_args)
    if reduction == "none":
        values = _per_token(config, h, params, teacher, rows, hyper)
        return jax.tree.map(lambda v: v.reshape(shape), values)
    dtype = _compute_dtype(h, params, teacher, t_hidden)
    scale = 1 / jnp.maximum(jnp.sum(counts.astype(dtype)), 1) if reduction == "mean" else 1
    return _total(config, h, params, teacher, rows, hyper, jnp.asarray(scale, dtype))


def _types(*arrays):
    """Zero-size stand-ins carrying the arrays' dtypes and mesh-axis types, for residuals."""
    return jax.tree.map(lambda x: _vary(jnp.zeros((0,), x.dtype), _varying(x)), arrays)


def _cotangents(grads, primals, scale):
    """``scale * grads`` (``grads`` where ``scale`` is None) summed over the mesh axes its
    primal is replicated on, in its dtype.

    The product in the wider of the scale's dtype (the compute dtype) and the
    gradients' (summed in ``accum_dtype``), cast explicitly: strict promotion
    refuses to mix them.
    """

    def cotangent(g, x):
        if scale is not None:
            wide = max(scale.dtype, g.dtype, key=lambda dtype: dtype.itemsize)
            g = scale.astype(wide) * g.astype(wide)
        return _summed_like(g, x).astype(x.dtype)

    return jax.tree.map(cotangent, grads, primals)


def _varying(x):
    """The mesh axes along which ``x`` varies inside ``jax.shard_map`` (none outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: aval.vma
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _vary(x, axes):
    missing = tuple(sorted(axes - _varying(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _summed_like(gradient, primal):
    """Sums ``gradient`` over the mesh axes along which it varies but ``primal`` does not.

    That is the transpose of shard_map's implicit broadcast of a replicated
    input (a weight replicated over the data axis gets the sum of the shards'
    gradients), which autodiff would insert if it differentiated the loss.
    """
    extra = tuple(sorted(_varying(gradient) - _varying(primal)))
    return lax.psum(gradient, extra) if extra else gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _total(config, h, params, teacher, rows, hyper, scale):
    """``scale`` times the sum of the per-token values (``1 / count`` for "mean")."""
    return scale * jnp.sum(_scan(config, h, params, teacher, rows, hyper, None)[0][0])


def _total_fwd(config, h, params, teacher, rows, hyper, scale):
    # The cotangent is one scalar: compute the gradients now (the mean's 1 / count
    # already folded in) and keep only them; the backward pass just scales them.
    cts = (jnp.broadcast_to(scale, h.shape[:1]),)
    values, grads = _scan(config, h, params, teacher, rows, hyper, cts)
    return scale * jnp.sum(values[0]), (grads, _types(h, params, hyper.temperature))


def _total_bwd(config, saved, ct):
    grads, primals = saved
    return (*_gradients(grads, primals, ct), None)


_total.defvjp(_total_fwd, _total_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(config, h, params, teacher, rows, hyper):
    """The head's per-token values (a tuple)."""
    return _scan(config, h, params, teacher, rows, hyper, None)[0]


def _per_token_fwd(config, h, params, teacher, rows, hyper):
    values = _per_token(config, h, params, teacher, rows, hyper)
    return values, (h, params, teacher, rows, hyper)


def _per_token_bwd(config, saved, cts):
    # Per-token cotangents weigh each token: recompute each chunk's logits.
    h, params, teacher, rows, hyper = saved
    _, grads = _scan(config, h, params, teacher, rows, hyper, cts)
    return _gradients(grads, (h, params, hyper.temperature), None)


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def _gradients(grads, primals, scale):
    """The cotangents of (h, params, teacher, rows, hyper): the teacher and rows get none."""
    dh, d_params, d_temperature = _cotangents(grads, primals, scale)
    return dh, d_params, None, None, _Hyper(d_temperature, None, None, None)
