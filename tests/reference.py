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
