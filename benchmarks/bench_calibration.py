"""jsoftmax's calibration metrics under jit against NumPy and the reference libraries.

Run: python benchmarks/bench_calibration.py [--repeats N]
Prints a markdown table: median times and the median of per-pair time ratios
(jsoftmax / theirs, interleaved in one process), 1,000,000 x 10 predictions,
and the time of 1,000 bootstrap resamples of the ECE over 100,000 x 10.
Theirs are NumPy ``bincount`` implementations, ``relplot.smECE`` and
``calibration.get_calibration_error`` (uncertainty-calibration); the fits run against
scikit-learn's ``IsotonicRegression`` per class and netcal's ``HistogramBinning``
(``--fits-only`` times only those).
"""

import argparse
import functools
import time

import jax
import numpy as np
from _harness import device, interleaved

import jsoftmax

N, K, M = 1_000_000, 10, 15


def _gaps(index, hit, value, num_segments):
    """Per bin sum(hit - value) and count, by bincount."""
    gap = np.bincount(index, hit, num_segments) - np.bincount(index, value, num_segments)
    return gap, np.bincount(index, minlength=num_segments)


def _equal_width(values):
    return np.clip(np.ceil(values * M).astype(np.int64) - 1, 0, M - 1)


def _top1(probs, labels):
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)


def numpy_ece(probs, labels):
    confidence, hit = _top1(probs, labels)
    return np.abs(_gaps(_equal_width(confidence), hit, confidence, M)[0]).sum() / len(labels)


def numpy_mce(probs, labels):
    confidence, hit = _top1(probs, labels)
    gap, count = _gaps(_equal_width(confidence), hit, confidence, M)
    return np.max(np.abs(gap[count > 0]) / count[count > 0])


def numpy_adaptive(probs, labels):
    confidence, hit = _top1(probs, labels)
    order = np.argsort(confidence, kind="stable")
    index = np.arange(N) * M // N
    return np.abs(_gaps(index, hit[order], confidence[order], M)[0]).sum() / N


def numpy_classwise(probs, labels):
    hit = labels[:, None] == np.arange(K)
    index = (_equal_width(probs) + M * np.arange(K)).ravel()
    gap = _gaps(index, hit.ravel(), probs.ravel(), K * M)[0]
    return np.abs(gap).sum() / (N * K)


def numpy_brier(probs, labels):
    return np.mean(np.sum(probs**2, axis=1) - 2 * probs[np.arange(len(labels)), labels] + 1)


def numpy_nll(probs, labels):
    return -np.mean(np.log(probs[np.arange(len(labels)), labels]))


def relplot_smooth(probs, labels):
    import relplot

    return relplot.smECE(*relplot.multiclass_logits_to_confidences(probs, labels, probs=True))


def debiased(mode):
    def theirs(probs, labels):
        import calibration

        return calibration.get_calibration_error(probs, labels, p=2, debias=True, mode=mode)

    return theirs


# One row a metric: (name, jsoftmax callable, reference callable), both of (probs, labels).
METRICS = [
    ("expected_calibration_error", jsoftmax.expected_calibration_error, numpy_ece),
    ("maximum_calibration_error", jsoftmax.maximum_calibration_error, numpy_mce),
    ("adaptive_calibration_error", jsoftmax.adaptive_calibration_error, numpy_adaptive),
    ("classwise_calibration_error", jsoftmax.classwise_calibration_error, numpy_classwise),
    ("brier_score", jsoftmax.brier_score, numpy_brier),
    ("negative_log_likelihood", jsoftmax.negative_log_likelihood, numpy_nll),
    ("smooth_calibration_error (relplot)", jsoftmax.smooth_calibration_error, relplot_smooth),
    (
        "debiased_calibration_error (uncertainty-calibration)",
        jsoftmax.debiased_calibration_error,
        debiased("top-label"),
    ),
    (
        "debiased_calibration_error marginal (uncertainty-calibration)",
        functools.partial(jsoftmax.debiased_calibration_error, mode="marginal"),
        debiased("marginal"),
    ),
]


def sklearn_isotonic(logits, labels):
    from scipy.special import softmax
    from sklearn.isotonic import IsotonicRegression

    probs = softmax(logits, axis=1)
    return [
        IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(probs[:, k], labels == k)
        for k in range(logits.shape[1])
    ]


def netcal_histogram(logits, labels):
    from netcal.binning import HistogramBinning
    from scipy.special import softmax

    return HistogramBinning(bins=M).fit(softmax(logits, axis=1), labels)


# One row a calibrator fit: (name, jsoftmax fit, the library's fit), both of (logits, labels).
FITS = [
    ("fit_isotonic (scikit-learn, per class)", jsoftmax.fit_isotonic, sklearn_isotonic),
    (
        "fit_histogram_binning (netcal)",
        functools.partial(jsoftmax.fit_histogram_binning, num_bins=M),
        netcal_histogram,
    ),
]


def bootstrap_seconds(num_rows=100_000, num_resamples=1000, repeats=3):
    """Median seconds of ``num_resamples`` bootstrap resamples of the ECE, jitted."""
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(0), (num_rows, K)))
    labels = jax.random.randint(jax.random.key(1), (num_rows,), 0, K)
    run = jax.jit(
        lambda p, y, key: jsoftmax.bootstrap(
            jsoftmax.expected_calibration_error, p, y, key=key, num_resamples=num_resamples
        )
    )
    jax.block_until_ready(run(probs, labels, jax.random.key(2)))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(probs, labels, jax.random.key(3 + i)))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--fits-only", action="store_true")
    args = parser.parse_args()
    repeats = args.repeats
    print(f"device: {device()}")
    fits(repeats)
    if args.fits_only:
        return
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(0), (N, K)))
    labels = jax.random.randint(jax.random.key(1), (N,), 0, K)
    probs_np, labels_np = np.asarray(probs), np.asarray(labels)
    print(f"| metric [{N:,} x {K}] | jsoftmax jit ms | theirs ms | time ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs in METRICS:
        ours = jax.jit(ours)
        np.testing.assert_allclose(
            ours(probs, labels), theirs(probs_np, labels_np), rtol=1e-4, atol=1e-5
        )
        r = interleaved(
            lambda ours=ours: ours(probs, labels),
            lambda theirs=theirs: theirs(probs_np, labels_np),
            repeats,
        )
        print(f"| {name} | {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['time_ratio']:.2f}x |")
    print(
        f"\nbootstrap, 1,000 resamples of the ECE over 100,000 x {K}: {bootstrap_seconds():.2f} s"
    )


def fits(repeats):
    logits = 3 * jax.random.normal(jax.random.key(4), (N, K))
    labels = jax.random.randint(jax.random.key(5), (N,), 0, K)
    logits_np, labels_np = np.asarray(logits, np.float64), np.asarray(labels)
    print(f"| fit [{N:,} x {K}] | jsoftmax jit ms | theirs ms | time ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs in FITS:
        ours = jax.jit(ours)
        r = interleaved(
            lambda ours=ours: ours(logits, labels),
            lambda theirs=theirs: theirs(logits_np, labels_np),
            repeats,
        )
        print(f"| {name} | {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['time_ratio']:.2f}x |")
    print()


if __name__ == "__main__":
    main()
