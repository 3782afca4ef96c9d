r"""Fused linear cross-entropy: ``hidden @ weight`` and the integer-label loss, chunked.

The ``[N, V]`` logits are never materialised: tokens are processed in chunks of
``chunk_size`` rows, and each chunk's logits exist only inside one step of a
``lax.scan``. Per chunk and row, with ``z = h W + b`` (soft-capped),
``lse = logsumexp(z)``, label ``y``, smoothing ``alpha`` and z-loss ``lambda``:

.. math::
    \ell = \mathrm{lse} - (1 - \alpha) z_y - \frac{\alpha}{V} \sum_k z_k
    + \lambda\, \mathrm{lse}^2, \qquad
    \frac{\partial \ell}{\partial z_k} = (1 + 2 \lambda\, \mathrm{lse})\, p_k
    - (1 - \alpha) [k = y] - \frac{\alpha}{V}.

A ``jax.custom_vjp`` owns the derivative. For "sum" and "mean" the cotangent
is one scalar, so the forward pass computes the gradients with respect to
``hidden``, ``weight`` and ``bias`` chunk by chunk (three matmuls a chunk, as
the unfused loss costs) and keeps only them; for "none" the backward pass
recomputes each chunk's logits from the saved inputs.

With ``axis_name``, ``weight`` and ``bias`` hold this device's slice of the
vocabulary inside ``jax.shard_map``: each shard reduces its slice and the
shards merge the row max (``pmax``), the sum of exponentials, the label's
logit and the sum of logits (``psum``), so every term is over the global
vocabulary; the gradient with respect to ``hidden`` is summed over the shards.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks
from jsoftmax._losses import _check_softcap, _options

# The default chunk: 256 tokens, or more while a chunk's [chunk_size, V] logits
# stay within 2**23 elements (32 MiB of float32). Each chunk also reads and
# writes the [D, V] weight gradient, so much smaller chunks cost time.
_CHUNK_TOKENS = 256
_CHUNK_ELEMENTS = 2**23


class _Config(NamedTuple):
    """The static options of one call."""

    smooth: bool
    with_z_loss: bool
    softcap: float | None
    chunk_size: int
    axis_name: str | None


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
    axis_name: str | None = None,
) -> jax.Array:
    r"""Cross-entropy of ``hidden @ weight + bias`` without materialising the logits.

    Equals :func:`jsoftmax.softmax_cross_entropy_with_integer_labels` of
    ``hidden @ weight + bias`` with the same options, in value and in the
    gradients with respect to ``hidden``, ``weight`` and ``bias``, while its
    memory grows with ``chunk_size * V`` instead of ``N * V``.

    Args:
      hidden: floating ``[..., D]``.
      weight: floating ``[D, V]`` (a flax ``Dense`` kernel's layout); with
        ``axis_name``, this device's ``[D, V / P]`` slice of the vocabulary.
      labels: integers ``[...]`` (global class ids, also when sharded).
      bias: floating ``[V]`` (or this device's ``[V / P]`` slice), or None.
      where: boolean ``[...]``; False tokens cost 0 and do not count.
      ignore_index: a label value whose tokens cost 0 and do not count.
      label_smoothing: ``alpha`` in [0, 1], spread over all ``V`` classes.
      z_loss: ``lambda >= 0``, adds ``lambda * logsumexp**2`` per token.
      logit_softcap: ``c > 0`` replaces the logits by ``c * tanh(logits / c)``.
      reduction: "none" (per token, ``labels``' shape), "sum", or "mean" (over
        the counting tokens; 0 when none counts).
      chunk_size: tokens per chunk (static); by default 256, or the largest
        power of two keeping a chunk's logits within 2**23 elements (32 MiB
        of float32) when that is more.
      axis_name: the mesh axis along which ``weight`` and ``bias`` are sharded
        by vocabulary, inside ``jax.shard_map``; None when not sharded.

    Returns:
      float32 (float64 for float64 inputs): per token for "none", else a
      scalar. Gradients come back in the inputs' dtypes; bfloat16 and float16
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
    hidden = _checks.floating(fname, "hidden", hidden)
    weight = _checks.floating(fname, "weight", weight)
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{fname}: hidden has shape {hidden.shape} and weight {weight.shape}; "
            "they need [..., D] and [D, V]"
        )
    vocab = weight.shape[1]
    if bias is not None:
        bias = _checks.floating(fname, "bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(
                f"{fname}: bias has shape {bias.shape} but weight {weight.shape} needs ({vocab},)"
            )
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    labels = _checks.integer_labels(
        fname, labels, hidden.shape[:-1], vocab * shards, f"hidden {hidden.shape}", ignore_index
    )
    where = _checks.mask(fname, where, labels.shape)
    _check_softcap(fname, logit_softcap)
    if chunk_size is None:
        chunk_size = 1 << (max(_CHUNK_TOKENS, _CHUNK_ELEMENTS // vocab).bit_length() - 1)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fname}: chunk_size must be an integer >= 1, got {chunk_size!r}")
    alpha, z_loss_, smooth, with_z_loss = _options(fname, reduction, label_smoothing, z_loss)
    tokens = max(1, labels.size)
    config = _Config(smooth, with_z_loss, logit_softcap, min(chunk_size, tokens), axis_name)
    return _linear_loss(
        hidden, weight, bias, labels, where, alpha, z_loss_, ignore_index, reduction, config
    )


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _linear_loss(hidden, weight, bias, labels, where, alpha, z_loss, ignore, reduction, config):
    shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    counts = jnp.ones(labels.shape, bool) if where is None else where.reshape(-1)
    if ignore is not None:
        counts = counts & (labels != ignore)
    hyper = (lax.stop_gradient(alpha), lax.stop_gradient(z_loss))
    if reduction == "none":
        return _rows(h, weight, bias, labels, counts, hyper, config).reshape(shape)
    dtype = _compute_dtype(h, weight)
    scale = 1 / jnp.maximum(jnp.sum(counts.astype(dtype)), 1) if reduction == "mean" else 1
    return _total(h, weight, bias, labels, counts, jnp.asarray(scale, dtype), hyper, config)


def _compute_dtype(h, weight):
    """float32 for float16/bfloat16/float32 inputs, float64 if either is float64."""
    return _checks.compute_dtype(jnp.result_type(h, weight))


def _chunk(h, weight, bias, labels, counts, scale, hyper, config, grads):
    """One chunk of tokens: per-row losses and, with ``grads``, the gradients they give.

    ``scale`` weighs each row's gradient (the loss's cotangent); rows that do
    not count cost 0 and contribute nothing. A label outside the global
    vocabulary makes its row's loss and gradient NaN.
    """
    alpha, z_loss = hyper
    dtype = _compute_dtype(h, weight)
    z = jnp.dot(h, weight, preferred_element_type=dtype)
    if bias is not None:
        z = z + bias.astype(dtype)
    if config.softcap is not None:
        z = config.softcap * jnp.tanh(z / config.softcap)
    local = weight.shape[1]
    shard, vocab = 0, local
    if config.axis_name is not None:
        shard = lax.axis_index(config.axis_name)
        vocab = local * lax.axis_size(config.axis_name)

    def merged(x, collective):
        return x if config.axis_name is None else collective(x, config.axis_name)

    m = merged(jnp.max(z, axis=1), lax.pmax)
    e = jnp.exp(z - m[:, None])
    s = merged(jnp.sum(e, axis=1), lax.psum)
    lse = m + jnp.log(s)
    index = labels - shard * local
    mine = (index >= 0) & (index < local)
    z_label = jnp.take_along_axis(z, jnp.clip(index, 0, local - 1)[:, None], axis=1)[:, 0]
    z_label = merged(jnp.where(mine, z_label, 0.0), lax.psum)
    loss = lse - (1 - alpha) * z_label
    if config.smooth:
        loss = loss - alpha / vocab * merged(jnp.sum(z, axis=1), lax.psum)
    if config.with_z_loss:
        loss = loss + z_loss * lse**2
    bad = jnp.where(counts & ((labels < 0) | (labels >= vocab)), jnp.nan, 1.0)
    loss = jnp.where(counts, loss, 0.0) * bad
    if not grads:
        return loss, None
    # d loss / d z, scaled per row; the label's one-hot is a compare, never stored.
    r = jnp.where(counts, scale, 0.0) * bad
    p_coef = (1 + 2 * z_loss * lse) * r / s if config.with_z_loss else r / s
    columns = lax.broadcasted_iota(jnp.int32, z.shape, 1)
    dz = p_coef[:, None] * e - jnp.where(columns == index[:, None], ((1 - alpha) * r)[:, None], 0.0)
    if config.smooth:
        dz = dz - (alpha / vocab * r)[:, None]
    if config.softcap is not None:
        dz = dz * (1 - (z / config.softcap) ** 2)
    dz_in = dz.astype(weight.dtype)
    dh = jnp.dot(dz_in, weight.T, preferred_element_type=dtype)
    dw = jnp.dot(h.T.astype(weight.dtype), dz_in, preferred_element_type=dtype)
    return loss, (dh, dw, None if bias is None else jnp.sum(dz, axis=0))


def _scan(h, weight, bias, labels, counts, scale, hyper, config, grads):
    """Runs :func:`_chunk` over the tokens; per-row losses and summed gradients."""
    n, size = h.shape[0], config.chunk_size
    steps = -(-n // size)

    def chunked(x):
        x = jnp.pad(x, [(0, steps * size - n)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(steps, size, *x.shape[1:])

    xs = tuple(map(chunked, (h, labels, counts, scale)))
    dtype = _compute_dtype(h, weight)

    def body(carry, x):
        h_c, labels_c, counts_c, scale_c = x
        loss, g = _chunk(h_c, weight, bias, labels_c, counts_c, scale_c, hyper, config, grads)
        if not grads:
            return carry, loss
        dh, *dwb = g
        return jax.tree.map(jnp.add, carry, tuple(dwb)), (loss, dh)

    if not grads:
        return lax.scan(body, (), xs)[1].reshape(-1)[:n], None
    # Under shard_map the sums vary along every mesh axis their terms vary along.
    inputs = jax.tree.leaves((h, weight, bias, labels, counts, scale))
    axes = frozenset().union(*map(_varying, inputs))
    init = jax.tree.map(lambda x: _vary(jnp.zeros(x.shape, dtype), axes), (weight, bias))
    (dw, db), (loss, dh) = lax.scan(body, init, xs)
    loss = loss.reshape(-1)[:n]
    dh = dh.reshape(-1, h.shape[1])[:n]
    if config.axis_name is not None:
        dh = lax.psum(dh, config.axis_name)  # each shard holds its slice's part
    return loss, (dh, dw, db)


def _types(*arrays):
    """Zero-size stand-ins carrying the arrays' dtypes and mesh-axis types, for residuals."""
    return jax.tree.map(lambda x: _vary(jnp.zeros((0,), x.dtype), _varying(x)), arrays)


def _cotangents(grads, primals, scale):
    """``scale * grads`` summed over the mesh axes its primal is replicated on, in its dtype."""
    return jax.tree.map(lambda g, x: _summed_like(scale * g, x).astype(x.dtype), grads, primals)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _total(h, weight, bias, labels, counts, scale, hyper, config):
    """``scale`` times the sum of the per-row losses (``1 / count`` for "mean")."""
    scales = jnp.broadcast_to(scale, labels.shape)
    return scale * jnp.sum(_scan(h, weight, bias, labels, counts, scales, hyper, config, False)[0])


def _total_fwd(h, weight, bias, labels, counts, scale, hyper, config):
    # The cotangent is one scalar: compute the gradients now (the mean's 1 / count
    # already folded in) and keep only them; the backward pass just scales them.
    scales = jnp.broadcast_to(scale, labels.shape)
    loss, grads = _scan(h, weight, bias, labels, counts, scales, hyper, config, True)
    return scale * jnp.sum(loss), (grads, _types(h, weight, bias))


def _total_bwd(config, saved, ct):
    grads, primals = saved
    return (*_cotangents(grads, primals, ct), None, None, None, (None, None))


_total.defvjp(_total_fwd, _total_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _rows(h, weight, bias, labels, counts, hyper, config):
    zeros = jnp.zeros(labels.shape, _compute_dtype(h, weight))
    return _scan(h, weight, bias, labels, counts, zeros, hyper, config, False)[0]


def _rows_fwd(h, weight, bias, labels, counts, hyper, config):
    loss = _rows(h, weight, bias, labels, counts, hyper, config)
    return loss, (h, weight, bias, labels, counts, hyper)


def _rows_bwd(config, saved, ct):
    # Per-row cotangents weigh each row: recompute each chunk's logits.
    h, weight, bias, labels, counts, hyper = saved
    _, grads = _scan(h, weight, bias, labels, counts, ct, hyper, config, True)
    return (*_cotangents(grads, (h, weight, bias), 1), None, None, (None, None))


_rows.defvjp(_rows_fwd, _rows_bwd)
