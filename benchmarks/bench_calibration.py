"""jsoftmax's calibration metrics and calibrator fits under jit against the libraries.

Run: python benchmarks/bench_calibration.py [--repeats N] [--fits-only] [--small] [--only A,B]
Prints markdown tables: median times and the median of per-pair time ratios
(jsoftmax / theirs, interleaved in one process) on 1,000,000 x 10 and
50,000 x 1,000 predictions, and the time of 1,000 bootstrap resamples of the
ECE over 100,000 x 10. ``--small`` runs only the first size, ``--only`` only
the rows whose name contains one of the comma-separated words.
Theirs: for each metric the libraries that compute it (netcal, torchmetrics,
scikit-learn, ``relplot.smECE``, ``calibration.get_calibration_error`` of
uncertainty-calibration) and a plain NumPy implementation (``bincount``,
``argsort``, a gather); for the fits
scikit-learn's ``IsotonicRegression`` per class, netcal's ``HistogramBinning``,
and SciPy's L-BFGS-B (vector, matrix and Dirichlet scaling on the same float64
objective, analytic gradient) and the Mix-n-Match recipe (SciPy's bounded
scalar minimiser, then SLSQP) for ensemble temperature scaling. A fit's note
gives its objective minus the reference's (negative: ours is lower).
"""

import argparse
import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from _harness import device, interleaved, median_ms
from scipy.special import log_softmax, softmax

import jsoftmax

SIZES = [(1_000_000, 10), (50_000, 1_000)]
M = 15


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
    n = len(labels)
    order = np.argsort(confidence, kind="stable")
    index = np.arange(n) * M // n
    return np.abs(_gaps(index, hit[order], confidence[order], M)[0]).sum() / n


def numpy_classwise(probs, labels):
    n, k = probs.shape
    hit = labels[:, None] == np.arange(k)
    index = (_equal_width(probs) + M * np.arange(k)).ravel()
    gap = _gaps(index, hit.ravel(), probs.ravel(), k * M)[0]
    return np.abs(gap).sum() / (n * k)


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


def netcal_metric(name):
    def theirs(probs, labels):
        import netcal.metrics

        return getattr(netcal.metrics, name)(M).measure(probs, labels)

    return theirs


def torchmetrics_calibration(norm):
    def theirs(probs, labels):
        import torch
        from torchmetrics.functional.classification import multiclass_calibration_error

        probs, labels = torch.from_numpy(probs), torch.from_numpy(labels)
        return multiclass_calibration_error(probs, labels, probs.shape[1], n_bins=M, norm=norm)

    return theirs


def plugin_equal_mass(probs, labels):
    import calibration

    return calibration.get_calibration_error(probs, labels, p=1, debias=False, mode="top-label")


def sklearn_brier(probs, labels):
    from sklearn.metrics import brier_score_loss

    return brier_score_loss(labels, probs, labels=np.arange(probs.shape[1]))


def sklearn_log_loss(probs, labels):
    from sklearn.metrics import log_loss

    return log_loss(labels, probs, labels=np.arange(probs.shape[1]))


# One row a metric: (name, jsoftmax callable, references), a reference (library, callable,
# relative tolerance of their agreement); callables of (probs, labels), the references' as
# NumPy arrays with int64 labels. torchmetrics' bins are [e_{m-1}, e_m) with 1.0 alone in
# one, ours (e_{m-1}, e_m]; uncertainty-calibration's equal-mass cuts are np.array_split's:
# both differ from ours by a few rows' placement. scikit-learn's log_loss clips probabilities
# to at least eps (1.2e-7 in float32), the NLL at 1,000 classes by 7e-4 relative.
NEAR = 1e-3
METRICS = [
    (
        "expected_calibration_error",
        jsoftmax.expected_calibration_error,
        [
            ("NumPy bincount", numpy_ece, 1e-4),
            ("netcal ECE", netcal_metric("ECE"), 1e-4),
            ("torchmetrics", torchmetrics_calibration("l1"), NEAR),
        ],
    ),
    (
        "maximum_calibration_error",
        jsoftmax.maximum_calibration_error,
        [
            ("NumPy bincount", numpy_mce, 1e-4),
            ("netcal MCE", netcal_metric("MCE"), 1e-4),
            ("torchmetrics", torchmetrics_calibration("max"), NEAR),
        ],
    ),
    (
        "adaptive_calibration_error",
        jsoftmax.adaptive_calibration_error,
        [
            ("NumPy argsort", numpy_adaptive, 1e-4),
            ("uncertainty-calibration plug-in l1", plugin_equal_mass, NEAR),
        ],
    ),
    (
        "classwise_calibration_error",
        jsoftmax.classwise_calibration_error,
        [("NumPy bincount", numpy_classwise, 1e-4)],
    ),
    (
        "brier_score",
        jsoftmax.brier_score,
        [("NumPy", numpy_brier, 1e-4), ("scikit-learn", sklearn_brier, 1e-4)],
    ),
    (
        "negative_log_likelihood",
        jsoftmax.negative_log_likelihood,
        [("NumPy", numpy_nll, 1e-4), ("scikit-learn log_loss", sklearn_log_loss, NEAR)],
    ),
    (
        "smooth_calibration_error",
        jsoftmax.smooth_calibration_error,
        [("relplot", relplot_smooth, 1e-4)],
    ),
    (
        "debiased_calibration_error",
        jsoftmax.debiased_calibration_error,
        [("uncertainty-calibration", debiased("top-label"), 1e-4)],
    ),
    (
        "debiased_calibration_error marginal",
        functools.partial(jsoftmax.debiased_calibration_error, mode="marginal"),
        [("uncertainty-calibration", debiased("marginal"), 1e-4)],
    ),
]


def sklearn_isotonic(logits, labels):
    from sklearn.isotonic import IsotonicRegression

    probs = softmax(logits, axis=1)
    return [
        IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(probs[:, k], labels == k)
        for k in range(logits.shape[1])
    ]


def netcal_temperature(logits, labels):
    """netcal's temperature scaling (PyTorch, on the log of the probabilities): its ``T``."""
    from netcal.scaling import TemperatureScaling

    fitted = TemperatureScaling().fit(softmax(logits, axis=1), np.array(labels))
    return 1 / float(fitted.temperature[0])  # (netcal's "temperature" multiplies the logits)


def netcal_histogram(logits, labels):
    from netcal.binning import HistogramBinning

    return HistogramBinning(bins=M).fit(softmax(logits, axis=1), labels)


def _mean_nll(z, labels):
    """Mean NLL of softmax(z) and its gradient with respect to z."""
    log_p = log_softmax(z, axis=1)
    grad = np.exp(log_p)
    grad[np.arange(len(labels)), labels] -= 1
    return -np.mean(log_p[np.arange(len(labels)), labels]), grad / len(labels)


def affine_objective(kind, logits, labels, options):
    """The float64 objective a fit of ``kind`` minimises, with its gradient, and the start."""
    k = logits.shape[1]
    features = log_softmax(logits, axis=1) if kind == "dirichlet" else logits
    if kind == "vector":

        def f(params):
            a, b = params[:k], params[k:]
            value, g = _mean_nll(a * features + b, labels)
            return value, np.concatenate([np.sum(g * features, axis=0), np.sum(g, axis=0)])

        return f, np.concatenate([np.ones(k), np.zeros(k)])
    off = 1 - np.eye(k)

    def f(params):
        w, b = params[: k * k].reshape(k, k), params[k * k :]
        value, g = _mean_nll(features @ w + b, labels)
        gw, gb = features.T @ g, np.sum(g, axis=0)
        if kind == "matrix":
            l2 = options.get("l2", 0.0)
            value += l2 * (np.sum((w - np.eye(k)) ** 2) + np.sum(b**2))
            gw, gb = gw + 2 * l2 * (w - np.eye(k)), gb + 2 * l2 * b
        else:
            lam, mu = options.get("off_diagonal", 0.0), options.get("intercept", 0.0)
            value += lam * np.sum((w * off) ** 2) / (k * (k - 1)) + mu * np.sum(b**2) / k
            gw, gb = gw + 2 * lam * w * off / (k * (k - 1)), gb + 2 * mu * b / k
        return value, np.concatenate([gw.ravel(), gb])

    return f, np.concatenate([np.eye(k).ravel(), np.zeros(k)])


def scipy_affine(kind, options):
    def theirs(logits, labels):
        f, x0 = affine_objective(kind, logits, labels, options)
        return scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B").x

    return theirs


def _mixture(t, w, logits):
    return (
        w[0] * softmax(logits / t, axis=1) + w[1] * softmax(logits, axis=1) + w[2] / logits.shape[1]
    )


def mix_n_match(logits, labels):
    """The paper's recipe: T by SciPy's bounded minimiser of the Brier score, weights by SLSQP."""
    t = scipy.optimize.minimize_scalar(
        lambda t: numpy_brier(softmax(logits / t, axis=1), labels),
        bounds=(0.05, 20.0),
        method="bounded",
    ).x
    w = scipy.optimize.minimize(
        lambda w: numpy_brier(_mixture(t, w, logits), labels),
        np.array([1.0, 0.0, 0.0]),
        method="SLSQP",
        bounds=[(0, 1)] * 3,
        constraints={"type": "eq", "fun": lambda w: np.sum(w) - 1},
    ).x
    return t, w


def affine_gap(kind, options):
    """Our objective minus SciPy's, both in float64."""

    def gap(ours, theirs, logits, labels):
        f = affine_objective(kind, logits, labels, options)[0]
        flat = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in ours])
        return f"objective {f(flat)[0] - f(theirs)[0]:+.1e}"

    return gap


def temperature_gap(ours, theirs, logits, labels):
    """Our mean NLL minus theirs, in float64."""
    gap = _mean_nll(logits / float(ours), labels)[0] - _mean_nll(logits / theirs, labels)[0]
    return f"NLL {gap:+.1e}"


def ensemble_gap(ours, theirs, logits, labels):
    mine = _mixture(float(ours.temperature), np.asarray(ours.weights, np.float64), logits)
    return (
        f"Brier {numpy_brier(mine, labels) - numpy_brier(_mixture(*theirs, logits), labels):+.1e}"
    )


# One row a fit: (name, jsoftmax fit, the reference fit, how close they are or None,
# whether it runs at K = 1,000), fits of (logits, labels).
MATRIX = {"l2": 1e-4}
DIRICHLET = {"off_diagonal": 1e-3, "intercept": 1e-3}
FITS = [
    (
        "fit_temperature (netcal TemperatureScaling)",
        jsoftmax.fit_temperature,
        netcal_temperature,
        temperature_gap,
        True,
    ),
    (
        "fit_vector_scaling (SciPy L-BFGS-B)",
        jsoftmax.fit_vector_scaling,
        scipy_affine("vector", {}),
        affine_gap("vector", {}),
        True,
    ),
    (
        "fit_matrix_scaling, l2=1e-4 (SciPy L-BFGS-B)",
        functools.partial(jsoftmax.fit_matrix_scaling, **MATRIX),
        scipy_affine("matrix", MATRIX),
        affine_gap("matrix", MATRIX),
        False,
    ),
    (
        "fit_dirichlet_calibration, ODIR 1e-3 (SciPy L-BFGS-B)",
        functools.partial(jsoftmax.fit_dirichlet_calibration, **DIRICHLET),
        scipy_affine("dirichlet", DIRICHLET),
        affine_gap("dirichlet", DIRICHLET),
        False,
    ),
    (
        "fit_ensemble_temperature (Mix-n-Match recipe)",
        jsoftmax.fit_ensemble_temperature,
        mix_n_match,
        ensemble_gap,
        True,
    ),
    ("fit_isotonic (scikit-learn, per class)", jsoftmax.fit_isotonic, sklearn_isotonic, None, True),
    (
        "fit_histogram_binning (netcal)",
        functools.partial(jsoftmax.fit_histogram_binning, num_bins=M),
        netcal_histogram,
        None,
        True,
    ),
]


def bootstrap_seconds(num_rows=100_000, num_classes=10, num_resamples=1000, repeats=5):
    """Median seconds of ``num_resamples`` bootstrap resamples of the ECE, jitted."""
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(0), (num_rows, num_classes)))
    labels = jax.random.randint(jax.random.key(1), (num_rows,), 0, num_classes)
    run = jax.jit(
        lambda p, y, key: jsoftmax.bootstrap(
            jsoftmax.expected_calibration_error, p, y, key=key, num_resamples=num_resamples
        )
    )
    keys = iter(jax.random.split(jax.random.key(2), repeats + 1))
    return median_ms(lambda: run(probs, labels, next(keys)), repeats) / 1e3


def read_floor_ms(probs, repeats):
    """A jitted maximum over each row: one pass reading the probabilities, which every
    top-label metric (ours and the libraries') needs."""
    row_max = jax.jit(lambda p: jnp.max(p, axis=1))
    return median_ms(lambda: row_max(probs), repeats)


def sort_floor_ms(logits, repeats):
    """NumPy's sort of each class's probabilities, a class per core: what the isotonic
    fit (ours on the host, scikit-learn's) needs before anything else."""
    columns = np.ascontiguousarray(softmax(np.asarray(logits), axis=1).T)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return median_ms(lambda: list(pool.map(np.sort, columns)), repeats)


def data(n, k, seed):
    """Overconfident logits (3x the truth's) and labels drawn from the truth."""
    truth = jax.random.normal(jax.random.key(seed), (n, k))
    labels = jax.random.categorical(jax.random.key(seed + 1), truth)
    return 3 * truth, labels


def selected(rows, only):
    return [row for row in rows if not only or any(word in row[0] for word in only)]


def ratio(r):
    """Two decimals, or two significant digits below 0.1x."""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def metrics(n, k, repeats, only):
    logits, labels = data(n, k, 0)
    probs = jax.nn.softmax(logits)
    # NumPy's own (writable) copy, as a NumPy or PyTorch user has: on a read-only view of
    # JAX's buffer NumPy's argmax is 4x slower.
    probs_np, labels_np = np.array(probs), np.asarray(labels).astype(np.int64)
    print(f"| metric [{n:,} x {k:,}] | against | jsoftmax jit ms | theirs ms | time ratio |")
    print("|---|---|---:|---:|---:|")
    for name, ours, references in selected(METRICS, only):
        ours = jax.jit(ours)
        for library, theirs, rtol in references:
            np.testing.assert_allclose(
                ours(probs, labels), theirs(probs_np, labels_np), rtol=rtol, atol=1e-5
            )
            r = interleaved(
                lambda ours=ours: ours(probs, labels),
                lambda theirs=theirs: theirs(probs_np, labels_np),
                repeats,
            )
            times = f"{r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {ratio(r['time_ratio'])}"
            print(f"| {name} | {library} | {times} |")
    floor = read_floor_ms(probs, repeats)
    print(f"\nOne pass reading the probabilities (a jitted row max): {floor:.1f} ms\n")


def fits(n, k, repeats, only):
    logits, labels = data(n, k, 4)
    logits_np, labels_np = np.asarray(logits, np.float64), np.asarray(labels)
    print(f"| fit [{n:,} x {k:,}] | jsoftmax jit ms | theirs ms | time ratio | note |")
    print("|---|---:|---:|---:|---|")
    for name, ours, theirs, gap, large_k in selected(FITS, only):
        if k > 100 and not large_k:
            print(f"| {name} | | | | not run: {k * k + k:,} parameters |")
            continue
        ours = jax.jit(ours)
        note = (
            ""
            if gap is None
            else gap(ours(logits, labels), theirs(logits_np, labels_np), logits_np, labels_np)
        )
        r = interleaved(
            lambda ours=ours: ours(logits, labels),
            lambda theirs=theirs: theirs(logits_np, labels_np),
            repeats,
        )
        row = f"| {name} | {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {ratio(r['time_ratio'])}"
        print(f"{row} | {note} |")
    if selected([row for row in FITS if "isotonic" in row[0]], only):
        floor = sort_floor_ms(logits, repeats)
        print(f"\nNumPy's sort of each class, a class per core: {floor:.1f} ms")
    print()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fits-only", action="store_true")
    parser.add_argument("--small", action="store_true", help="only 1,000,000 x 10")
    parser.add_argument("--only", default="", help="comma-separated words of row names")
    args = parser.parse_args()
    only = [word for word in args.only.split(",") if word]
    print(f"device: {device()}\n")
    for n, k in SIZES[:1] if args.small else SIZES:
        if selected(FITS, only):
            fits(n, k, args.repeats, only)
        if not args.fits_only and selected(METRICS, only):
            metrics(n, k, args.repeats, only)
    if not args.fits_only and (not only or "bootstrap" in only):
        seconds = bootstrap_seconds(repeats=args.repeats)
        print(f"bootstrap, 1,000 resamples of the ECE over 100,000 x 10: {seconds:.2f} s")


if __name__ == "__main__":
    main()
