"""Float64 NumPy references for every jsoftmax formula, written independently."""

import numpy as np
from scipy import special


def log_softmax(x, axis=-1, where=None, temperature=None):
    """log_softmax in float64 with jsoftmax's limits for masks and infinities."""
    x = np.asarray(x, np.float64)
    if temperature is not None:
        x = x / np.asarray(temperature, np.float64)
    if where is not None:
        x = np.where(where, x, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        top = np.max(x, axis=axis, keepdims=True) if x.size else x
        posinf = np.isposinf(top)
        # +inf limit: the row's +inf entries are the whole row.
        x = np.where(posinf, np.where(np.isposinf(x), 0.0, -np.inf), x)
        lse = special.logsumexp(x, axis=axis, keepdims=True)
        out = x - lse
    return np.where(np.isneginf(x), -np.inf, out)


def softmax(x, axis=-1, where=None, temperature=None):
    return np.exp(log_softmax(x, axis, where, temperature))


def logsumexp(x, axis=-1, where=None, keepdims=False):
    x = np.asarray(x, np.float64)
    if where is not None:
        x = np.where(where, x, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        return special.logsumexp(x, axis=axis, keepdims=keepdims)


def integer_cross_entropy(
    logits,
    labels,
    where=None,
    alpha=0.0,
    weights=None,
    ignore_index=None,
    z_loss=0.0,
    softcap=None,
    reduction="none",
):
    """PyTorch's cross_entropy(weight, ignore_index, label_smoothing) row by row, in float64.

    Extended as jsoftmax documents: masked (or -inf) classes leave the row and
    its uniform part, fully masked rows cost 0 and do not count, an empty
    "mean" is 0, z-loss adds z_loss * logsumexp**2.
    """
    x = np.asarray(logits, np.float64)
    n, k = x.shape
    kept = x != -np.inf if where is None else np.asarray(where) & (x != -np.inf)
    kept = np.broadcast_to(kept, x.shape)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    losses, denominator = np.zeros(n), 0.0
    for i in range(n):
        y = int(labels[i])
        if y == ignore_index or not kept[i].any():
            continue
        row = np.where(kept[i], x[i], -np.inf)
        lse = special.logsumexp(row)
        lp = row - lse
        target = 0.0 if alpha == 1 else -(1 - alpha) * w[y] * lp[y]
        uniform = -alpha / kept[i].sum() * np.sum(w[kept[i]] * lp[kept[i]])
        losses[i] = target + uniform + z_loss * lse**2
        denominator += w[y]
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / denominator if denominator else 0.0


def dense_cross_entropy(logits, labels, where=None, alpha=0.0, z_loss=0.0, reduction="none"):
    """-sum(q * log_softmax) with q smoothed over the kept classes, in float64."""
    x = np.asarray(logits, np.float64)
    q = np.asarray(labels, np.float64)
    kept = x != -np.inf if where is None else np.asarray(where) & (x != -np.inf)
    kept = np.broadcast_to(kept, x.shape)
    losses, rows = np.zeros(x.shape[0]), 0
    for i in range(x.shape[0]):
        if not kept[i].any():
            continue
        row = np.where(kept[i], x[i], -np.inf)
        lse = special.logsumexp(row)
        qi = (1 - alpha) * q[i] + np.where(kept[i], alpha / kept[i].sum(), 0.0)
        with np.errstate(invalid="ignore"):
            terms = np.where(qi == 0, 0.0, -qi * (row - lse))
        losses[i] = terms.sum() + z_loss * lse**2
        rows += 1
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / rows if rows else 0.0
