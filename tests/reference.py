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


def _capped_rows(logits, where, softcap, weights):
    """float64 logits (soft-capped), the kept entries (masked or -inf ones are not) and weights."""
    x = np.asarray(logits, np.float64)
    kept = x != -np.inf if where is None else np.asarray(where) & (x != -np.inf)
    kept = np.broadcast_to(kept, x.shape)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    w = np.ones(x.shape[1]) if weights is None else np.asarray(weights, np.float64)
    return x, kept, w


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
    x, kept, w = _capped_rows(logits, where, softcap, weights)
    n, k = x.shape
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


def dense_cross_entropy(
    logits, labels, where=None, alpha=0.0, z_loss=0.0, reduction="none", weights=None
):
    """-sum(w * q * log_softmax) with q smoothed over the kept classes, in float64 (PyTorch's
    probability targets with ``weight``: "mean" divides by the rows)."""
    x, kept, w = _capped_rows(logits, where, None, weights)
    q = np.asarray(labels, np.float64)
    losses, rows = np.zeros(x.shape[0]), 0
    for i in range(x.shape[0]):
        if not kept[i].any():
            continue
        row = np.where(kept[i], x[i], -np.inf)
        lse = special.logsumexp(row)
        qi = (1 - alpha) * q[i] + np.where(kept[i], alpha / kept[i].sum(), 0.0)
        with np.errstate(invalid="ignore"):
            terms = np.where((qi == 0) | (w == 0), 0.0, -w * qi * (row - lse))
        losses[i] = terms.sum() + z_loss * lse**2
        rows += 1
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / rows if rows else 0.0


def bin_edges(num_bins):
    """Calibration bin edges m / M rounded once to float32, as jsoftmax documents."""
    return np.array([np.float32(m) / np.float32(num_bins) for m in range(num_bins + 1)], np.float64)


def equal_width_bins(values, num_bins):
    """0-based bin of each value: (e_{m-1}, e_m], 0 in the first, clamped to [0, 1]."""
    edges = bin_edges(num_bins)
    out = np.empty(len(values), int)
    for i, v in enumerate(values):
        m = 0
        while m < num_bins - 1 and v > edges[m + 1]:
            m += 1
        out[i] = m
    return out


def _gap_sum(bins, hits, values, num_bins):
    """sum over bins of |sum(hit - value)| and the largest per-bin |acc - conf|."""
    total, largest = 0.0, 0.0
    for m in range(num_bins):
        members = bins == m
        if members.any():
            gap = np.sum(hits[members]) - np.sum(values[members])
            total += abs(gap)
            largest = max(largest, abs(gap) / members.sum())
    return total, largest


def _top1(probs, labels, where):
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    if where is not None:
        probs, labels = probs[np.asarray(where)], labels[np.asarray(where)]
    return np.max(probs, axis=1), (np.argmax(probs, axis=1) == labels).astype(np.float64)


def expected_calibration_error(probs, labels, num_bins, where=None):
    c, hit = _top1(probs, labels, where)
    return _gap_sum(equal_width_bins(c, num_bins), hit, c, num_bins)[0] / max(len(c), 1)


def maximum_calibration_error(probs, labels, num_bins, where=None):
    c, hit = _top1(probs, labels, where)
    return _gap_sum(equal_width_bins(c, num_bins), hit, c, num_bins)[1]


def adaptive_calibration_error(probs, labels, num_bins, where=None):
    """Equal-mass bins over the sorted confidences (Nixon et al. 2019), tied rows counting
    their mean accuracy."""
    c, hit = _top1(probs, labels, where)
    n = len(c)
    order = np.argsort(c, kind="stable")
    _, group = np.unique(c, return_inverse=True)
    hit = (np.bincount(group, hit) / np.bincount(group))[group]
    bins = np.empty(n, int)
    for rank in range(n):
        bins[rank] = max(m for m in range(num_bins) if -(-m * n // num_bins) <= rank)
    return _gap_sum(bins, hit[order], c[order], num_bins)[0] / max(n, 1)


def classwise_calibration_error(probs, labels, num_bins, where=None):
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    if where is not None:
        probs, labels = probs[np.asarray(where)], labels[np.asarray(where)]
    n, k = probs.shape
    per_class = [
        _gap_sum(
            equal_width_bins(probs[:, j], num_bins),
            (labels == j).astype(float),
            probs[:, j],
            num_bins,
        )[0]
        for j in range(k)
    ]
    return np.mean(per_class) / max(n, 1)


def brier_score(probs, labels, where=None):
    probs = np.asarray(probs, np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels)]
    per_row = np.sum((probs - onehot) ** 2, axis=1)
    if where is not None:
        per_row = per_row[np.asarray(where)]
    return per_row.mean() if per_row.size else 0.0


def fit_temperature(logits, labels, bounds=(0.01, 100.0)):
    """argmin over T in ``bounds`` of the float64 mean NLL: the root of its derivative in
    beta = 1 / T, ``mean(E_p[x] - x_y)``, which increases (the NLL is convex in beta), or the
    bound beyond which it lies."""
    from scipy import optimize

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)

    def slope(beta):
        p = special.softmax(beta * logits, axis=1)
        expected = np.sum(np.where(p > 0, p * logits, 0.0), axis=1)
        return np.mean(expected - logits[np.arange(len(logits)), labels])

    low, high = 1 / bounds[1], 1 / bounds[0]
    if slope(low) >= 0:
        return float(bounds[1])
    if slope(high) <= 0:
        return float(bounds[0])
    eps = np.finfo(np.float64).eps
    return float(1 / optimize.brentq(slope, low, high, xtol=eps * low, rtol=4 * eps))


def softmax_focal_loss(
    logits,
    labels,
    where=None,
    gamma=2.0,
    alpha=0.0,
    weights=None,
    ignore_index=None,
    softcap=None,
    reduction="none",
):
    """sum_k c_k (1 - p_k)**gamma (-log p_k) row by row in float64, c the cross-entropy's target.

    gamma="flsd-53" is Mukhoti et al.'s: 5 where p_y < 0.2, else 3. The rules for masks,
    ignored rows and "mean" are integer_cross_entropy's.
    """
    x, kept, w = _capped_rows(logits, where, softcap, weights)
    n, k = x.shape
    losses, denominator = np.zeros(n), 0.0
    for i in range(n):
        y = int(labels[i])
        if y == ignore_index or not kept[i].any():
            continue
        lp = np.where(kept[i], x[i] - special.logsumexp(x[i][kept[i]]), -np.inf)
        p = np.exp(lp)
        g = (5.0 if p[y] < 0.2 else 3.0) if gamma == "flsd-53" else float(gamma)
        with np.errstate(invalid="ignore"):
            focal = np.where(kept[i], -((1 - p) ** g) * lp, 0.0)
        target = 0.0 if alpha == 1 else (1 - alpha) * w[y] * (focal[y] if kept[i, y] else np.inf)
        uniform = alpha / kept[i].sum() * np.sum(w * focal)
        losses[i] = target + uniform
        denominator += w[y]
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / denominator if denominator else 0.0


def negative_log_likelihood(probs, labels, where=None):
    probs = np.asarray(probs, np.float64)
    with np.errstate(divide="ignore"):
        per_row = -np.log(probs[np.arange(len(probs)), np.asarray(labels)])
    if where is not None:
        per_row = per_row[np.asarray(where)]
    return per_row.mean() if per_row.size else 0.0


def _debiased_squared(values, outcomes, num_bins):
    """Kumar et al.'s debiased squared l2 error over np.array_split equal-mass bins."""
    n = len(values)
    if n == 0:
        return 0.0
    s = np.sort(values)
    parts = np.array_split(s, min(num_bins, n))
    edges = [
        (a[-1] + b[0]) / np.asarray(2, values.dtype) for a, b in zip(parts, parts[1:], strict=False)
    ]
    bins = np.array([sum(e < v for e in edges) for v in values])
    total = 0.0
    for b in range(len(parts)):
        members = bins == b
        count = members.sum()
        if count >= 2:
            q, y = values[members].astype(np.float64), outcomes[members]
            total += (
                count / n * ((q.mean() - y.mean()) ** 2 - y.mean() * (1 - y.mean()) / (count - 1))
            )
    return total


def debiased_calibration_error(probs, labels, num_bins=15, mode="top-label", where=None):
    """Edges from the values in their own dtype (as the package does), sums in float64."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if where is not None:
        probs, labels = probs[np.asarray(where)], labels[np.asarray(where)]
    if mode == "top-label":
        hit = (np.argmax(probs, axis=1) == labels).astype(np.float64)
        squared = [_debiased_squared(np.max(probs, axis=1), hit, num_bins)]
    else:
        squared = [
            _debiased_squared(probs[:, k], (labels == k).astype(np.float64), num_bins)
            for k in range(probs.shape[1])
        ]
    return np.sqrt(np.mean(np.maximum(squared, 0.0)))


def _reflected_smooth(f, values, sigma, points):
    """Block-Nakkiran kernel smoothing as relplot discretises it, by direct sums in float64.

    Rows spread linearly onto G = max(2000, round(20 / sigma)) // 2 + 1 grid points;
    grid point j receives from every point g of the grid reflected at both ends
    (g -> -g, g -> 2 (G - 1) - g) the Gaussian density at (j - g + shift) / (G - 1),
    cut beyond half the grid (shift 1/2 when G is even, relplot's centring); the
    result is interpolated linearly at ``points``.
    """
    grid = max(2000, round(20 / sigma)) // 2 + 1
    last = grid - 1
    x = f * last
    left = np.clip(np.trunc(x), 0, last - 1).astype(int)
    frac = x - left
    spread = np.zeros((grid, values.shape[1]))
    np.add.at(spread, left, values * (1 - frac)[:, None])
    np.add.at(spread, left + 1, values * frac[:, None])
    source = np.arange(-last, 2 * last + 1)
    reflected = spread[
        np.where(source < 0, -source, np.where(source > last, 2 * last - source, source))
    ]
    # Grid point j sums source g with weight gauss(j - g + shift), |j - g + shift| <= last / 2.
    shift = 0.0 if grid % 2 else 0.5
    taps = np.arange(-(last // 2) - 1, last // 2 + 2)
    offsets = taps + shift
    kernel = np.exp(-((offsets / last) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel = np.where(np.abs(offsets) <= last / 2, kernel, 0.0)
    smoothed = np.zeros_like(spread)
    for tap, weight in zip(taps, kernel, strict=True):
        if weight:  # source g = j + tap sits at index j + tap + last of the reflected grid
            smoothed += weight * reflected[last + tap : last + tap + grid]
    inds = np.clip(np.trunc(points * last), 0, last - 1).astype(int)
    residual = (points - inds / last) * last
    return smoothed[inds] * (1 - residual)[:, None] + smoothed[inds + 1] * residual[:, None]


def smooth_ece_at(confidence, hit, sigma):
    mesh = np.linspace(0, 1, max(round(10 / sigma), 200))
    columns = np.stack([confidence - hit, np.ones_like(confidence)], axis=1)
    smoothed = _reflected_smooth(confidence, columns, sigma, mesh)
    density = smoothed[:, 1] + 1e-4
    return np.sum(np.abs(smoothed[:, 0] / density) * density) / np.sum(density)


def smooth_calibration_error(probs, labels, where=None, return_bandwidth=False):
    """smECE at relplot's fixed point: 10 halvings of [0, 1] keeping the failing end."""
    c, hit = _top1(probs, labels, where)

    def passes(sigma):
        return sigma < 1e-3 or sigma < smooth_ece_at(c, hit, sigma)

    sigma = 1.0
    if not passes(sigma):
        start, end = 1.0, 0.0
        for _ in range(10):
            mid = (start + end) / 2
            start, end = (start, mid) if passes(mid) else (mid, end)
        sigma = start
    value = smooth_ece_at(c, hit, sigma) if len(c) else 0.0
    return (value, sigma) if return_bandwidth else value


def smooth_accuracy(probs, labels, sigma, points):
    c, hit = _top1(probs, labels, None)
    columns = np.stack([hit, np.ones_like(c)], axis=1)
    smoothed = _reflected_smooth(c, columns, sigma, points)
    return smoothed[:, 0] / (smoothed[:, 1] + 1e-4)
