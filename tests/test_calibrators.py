"""The calibrators: fits at their optimum (float64 SciPy and scikit-learn references), calibrate."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from scipy.special import log_softmax, softmax
from sklearn.isotonic import IsotonicRegression

import jsoftmax
from jsoftmax import _calibrators, _cpu
from tests.conftest import TRANSFORMS, core_schedules, lowered_for, saved_residuals


def miscalibrated(n, k, seed, scale=3.0, shift=0.5):
    """Logits overconfident by ``scale``, biased by ``shift`` on class 0; labels from the truth."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal((n, k))
    p = softmax(truth, axis=1)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(1).clip(0, k - 1)
    logits = scale * truth
    logits[:, 0] += shift
    return logits, labels.astype(np.int32)


def nll(z, labels):
    return -np.mean(log_softmax(z, axis=1)[np.arange(len(labels)), labels])


def objective(kind, logits, labels, params, l2=0.0, off_diagonal=0.0, intercept=0.0):
    """The float64 objective each affine fit minimises."""
    k = logits.shape[1]
    if kind == "vector":
        a, b = params[:k], params[k:]
        return nll(a * logits + b, labels)
    w, b = params[: k * k].reshape(k, k), params[k * k :]
    if kind == "matrix":
        return nll(logits @ w + b, labels) + l2 * (np.sum((w - np.eye(k)) ** 2) + np.sum(b**2))
    off = np.sum((w * (1 - np.eye(k))) ** 2) / (k * (k - 1))
    loss = nll(log_softmax(logits, axis=1) @ w + b, labels)
    return loss + off_diagonal * off + intercept * np.sum(b**2) / k


FITS = {
    "vector": (jsoftmax.fit_vector_scaling, {}),
    "matrix": (jsoftmax.fit_matrix_scaling, {"l2": 1e-3}),
    "dirichlet": (jsoftmax.fit_dirichlet_calibration, {"off_diagonal": 1e-2, "intercept": 1e-3}),
}


def flat(calibrator):
    return np.concatenate([np.ravel(a) for a in calibrator]).astype(np.float64)


@pytest.fixture(params=[False, True], ids=["all-rows", "sample-first"])
def sample_first(request, monkeypatch):
    """Runs the affine fits on all rows at once, or first on a sample of them, as they do on
    more than 2**18 rows (here on more than 128 rows per parameter); checks that the test's
    one fit made one L-BFGS run per stage."""
    runs = []
    minimize = _calibrators._minimize
    monkeypatch.setattr(_calibrators, "_minimize", lambda *a: runs.append(a) or minimize(*a))
    if request.param:
        monkeypatch.setattr(_calibrators, "_SAMPLE_ROWS", 0)
    jax.clear_caches()  # (the fits' traces read both)
    yield
    jax.clear_caches()
    assert len(runs) == 1 + request.param


def assert_at_the_optimum(kind, logits, labels, ours, **options):
    """``ours`` (flat) minimises the float64 objective as SciPy's L-BFGS-B does, to 1e-12."""
    f = functools.partial(objective, kind, logits, labels, **options)
    reference = scipy.optimize.minimize(
        f,
        _identity(kind, logits.shape[1]),
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
    )
    assert f(ours) <= reference.fun + 1e-12
    assert f(_identity(kind, logits.shape[1])) - f(ours) > 0.05  # the data are miscalibrated
    # The optimum's gradient is zero (central differences).
    gradient = scipy.optimize.approx_fprime(ours, f, 1e-7)
    assert np.max(np.abs(gradient)) < 1e-6


@pytest.mark.parametrize("kind", FITS)
def test_affine_fits_reach_the_optimum(kind, sample_first, x64):
    logits, labels = miscalibrated(3000, 4, seed=1)
    fit, options = FITS[kind]
    assert_at_the_optimum(kind, logits, labels, flat(fit(logits, labels, **options)), **options)


@pytest.mark.parametrize("kind", FITS)
def test_affine_fits_with_padding_and_rows_in_class_order_reach_the_optimum(
    kind, sample_first, x64
):
    """Padding rows among the sampled ones, rows sorted by class, also under vmap beside a
    problem without padding."""
    logits, labels = miscalibrated(3000, 4, seed=4)
    order = np.argsort(labels, kind="stable")
    logits, labels = logits[order], labels[order]
    fit, options = FITS[kind]
    where = np.arange(3000) % 3 != 0
    garbage = np.where(where[:, None], logits, 50.0)
    both = jax.vmap(lambda x, w: fit(x, labels, where=w, **options))(
        np.stack([logits, garbage]), np.stack([np.ones(3000, bool), where])
    )
    assert_at_the_optimum(kind, logits, labels, flat(jax.tree.map(lambda a: a[0], both)), **options)
    padded = flat(jax.tree.map(lambda a: a[1], both))
    assert_at_the_optimum(kind, logits[where], labels[where], padded, **options)


def _identity(kind, k):
    if kind == "vector":
        return np.concatenate([np.ones(k), np.zeros(k)])
    return np.concatenate([np.eye(k).ravel(), np.zeros(k)])


@pytest.mark.parametrize("kind", FITS)
def test_affine_fits_in_float32_are_near_the_float64_optimum(kind):
    logits, labels = miscalibrated(3000, 4, seed=2)
    fit, options = FITS[kind]
    f = functools.partial(objective, kind, logits, labels, **options)
    with jax.enable_x64(True):
        best = f(flat(fit(logits, labels, **options)))
    ours = fit(logits.astype(np.float32), labels, **options)
    assert all(a.dtype == jnp.float32 for a in ours)
    assert f(flat(ours)) - best < 1e-5


@pytest.mark.parametrize(
    "scale, offset, constant",
    [(1e4, 0, None), (1e19, 0, None), (1e-30, 0, None), (1, 1e3, None), (1, 1e6, None)]
    + [(1, 0, 1e4)],
)
@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_affine_fits_do_not_depend_on_the_logits_scale_or_offsets(kind, scale, offset, constant):
    # (a / s, b - a o) fits s x + o as (a, b) fits x. At 1e4, or with one class's logits
    # 1000 above the others, every row's float32 NLL was linear at the start and the search
    # stopped there (no curvature); at 1e19 the features' variance overflowed (NaN); at
    # 1e-30 matrix scaling's penalty term, 0 * inf, stalled it. A class whose logit is the
    # same in every row has a bias only (its spread, from the mean's rounding, was 1e-13).
    logits, labels = miscalibrated(60, 3, seed=4)
    if constant is not None:
        logits[:, 2] = constant
    fit = FITS[kind][0]
    f = functools.partial(objective, kind, logits, labels)
    best = scipy.optimize.minimize(
        f, _identity(kind, 3), method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12}
    ).fun
    shifted = logits.copy()
    shifted[:, 0] += offset
    for dtype in (np.float32, np.float64):
        with jax.enable_x64(dtype == np.float64):
            ours = fit((scale * shifted).astype(dtype), labels)
        assert objective(kind, scale * shifted, labels, flat(ours)) - best < 1e-4


@pytest.mark.parametrize("constant", [5.0, 1e3, -1e4])
def test_penalised_matrix_scaling_with_a_constant_class_is_at_its_optimum(constant):
    # The penalty's optimum moves the intercepts into the constant feature's weights
    # (pinned, they ended 1.5e-2 to 0.17 above it).
    two, labels = miscalibrated(500, 2, seed=5)
    logits = np.stack([two[:, 0], np.full(500, constant), two[:, 1]], axis=1)
    f = functools.partial(objective, "matrix", logits, 2 * labels, l2=1e-3)
    best = scipy.optimize.minimize(
        f, _identity("matrix", 3), method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12}
    ).fun
    for dtype, tolerance in ((np.float32, 3e-4), (np.float64, 1e-8)):
        with jax.enable_x64(dtype == np.float64):
            ours = jsoftmax.fit_matrix_scaling(logits.astype(dtype), 2 * labels, l2=1e-3)
        assert f(flat(ours)) - best < tolerance


@pytest.mark.parametrize("l2", [1.0, 1e-2])
def test_penalised_matrix_scaling_of_offset_logits_is_at_its_optimum(l2):
    """Every logit 50 above another model's: the penalty prices the common intercept, which
    the fit starts from the identity's (started at -50, it stopped 0.015 above it)."""
    logits, labels = miscalibrated(200, 5, seed=8)
    logits = logits + 50.0
    f = functools.partial(objective, "matrix", logits, labels, l2=l2)
    best = scipy.optimize.minimize(
        f, _identity("matrix", 5), method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12}
    ).fun
    with jax.enable_x64(True):
        ours = jsoftmax.fit_matrix_scaling(logits, labels, l2=l2)
    assert f(flat(ours)) - best < 1e-8


@pytest.mark.parametrize(
    "dtype, mask",
    [(np.float32, m) for m in (-1e5, -1e8, "min")] + [(np.float64, m) for m in (-1e8, "min")],
)
@pytest.mark.parametrize("penalised", [False, True], ids=["plain", "penalised"])
@pytest.mark.parametrize("kind", FITS)
def test_affine_fits_with_a_class_masked_by_a_large_finite_logit(kind, penalised, dtype, mask):
    # A class masked in every row by finfo.min was fitted through w x + b, which cancelled
    # the mask in float32 and lost the fitted bias (mean NLL 1.10, uniform, for 0.50
    # here); at -1e5 in float32 and -1e8 in float64 the penalties started at the mask's
    # square and the fit stopped far off (0.65-0.71). Now it fits as without that class:
    # to the tolerance, the same calibrated probabilities where its feature is constant
    # (the logit itself; Dirichlet's log-probability carries the log-normaliser, and
    # the penalties' normalisers count the classes), else the same NLL.
    fit, options = FITS[kind]
    options = options if penalised else {}
    two, labels = miscalibrated(500, 2, seed=5)
    mask = np.finfo(dtype).min if mask == "min" else mask
    three = np.stack([two[:, 0], np.full(500, mask), two[:, 1]], axis=1).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        want = np.asarray(
            jsoftmax.calibrate(fit(two.astype(dtype), labels, **options), two.astype(dtype))
        )
        got = np.asarray(jsoftmax.calibrate(fit(three, 2 * labels, **options), three))
    assert got.dtype == dtype
    rows = np.arange(500)
    assert abs(np.mean(got[rows, 2 * labels]) - np.mean(want[rows, labels])) < 1e-4
    if kind != "dirichlet" and not penalised:
        np.testing.assert_allclose(got[:, ::2], want, atol=1e-4)


@pytest.mark.parametrize("n", [500, 3000])  # isotonic: the XLA core, then the host's
@pytest.mark.parametrize("fit", [jsoftmax.fit_temperature, jsoftmax.fit_isotonic])
def test_temperature_and_isotonic_read_a_finfo_min_mask_as_minus_inf(fit, n):
    # docs/calibration.md: a class masked by finfo.min in half the rows (never their
    # label) has the probabilities of one masked by -inf; to the ensemble's uniform member and to
    # histogram binning a finite mask is a possible class, which they give mass.
    logits, labels = miscalibrated(n, 3, seed=7)
    half = np.arange(n) % 2 == 0
    labels = np.where(half & (labels == 1), 0, labels)
    calibrated = []
    for mask in (-np.inf, np.finfo(np.float32).min):
        x = logits.astype(np.float32)
        x[half, 1] = mask
        calibrated.append(np.exp(jsoftmax.calibrate(fit(x, labels), x)))
    np.testing.assert_allclose(*calibrated, rtol=1e-6)
    assert np.all(calibrated[1][half, 1] == 0)


@pytest.mark.parametrize("tx", TRANSFORMS)
@pytest.mark.parametrize("kind", FITS)
def test_calibrate_applies_the_affine_map(tx, kind):
    logits, labels = miscalibrated(500, 3, seed=3)
    fit, options = FITS[kind]
    fitted = tx(lambda x, y: fit(x, y, **options))(logits.astype(np.float32), labels)
    got = tx(jsoftmax.calibrate)(fitted, logits.astype(np.float32))
    w, b = (np.asarray(a, np.float64) for a in fitted)
    features = log_softmax(logits, axis=1) if kind == "dirichlet" else logits
    z = w * features + b if kind == "vector" else features @ w + b
    np.testing.assert_allclose(got, log_softmax(z, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fit",
    [
        jsoftmax.fit_vector_scaling,
        jsoftmax.fit_matrix_scaling,
        jsoftmax.fit_dirichlet_calibration,
        jsoftmax.fit_ensemble_temperature,
        jsoftmax.fit_histogram_binning,
        jsoftmax.fit_isotonic,
    ],
)
def test_fits_vmap_over_problems_and_ignore_masked_rows(fit):
    problems = [miscalibrated(300, 3, seed=s, scale=1.0 + s) for s in range(3)]
    logits = np.stack([x for x, _ in problems]).astype(np.float32)
    labels = np.stack([y for _, y in problems])
    batched = jax.jit(jax.vmap(fit))(logits, labels)
    predictions = jax.vmap(jsoftmax.calibrate)(batched, logits)
    # To the fits' tolerance: the ensemble's search stops within sqrt(eps) of log T, so
    # rounding that differs under vmap or with padding (on a GPU) moves its stop that far.
    atol = 3e-3
    for i in range(3):
        want = jsoftmax.calibrate(fit(logits[i], labels[i]), logits[i])
        np.testing.assert_allclose(predictions[i], want, atol=atol)
    # Padding rows (garbage logits and labels) change nothing. (Compared through the
    # predictions: a flat direction of the affine fits, W + u 1', leaves them unchanged.)
    where = np.arange(400) < 300
    padded_logits = np.concatenate([logits[0], 50 * np.ones((100, 3), np.float32)])
    padded_labels = np.concatenate([labels[0], np.zeros(100, np.int32)])
    masked = fit(padded_logits, padded_labels, where=where)
    np.testing.assert_allclose(jsoftmax.calibrate(masked, logits[0]), predictions[0], atol=atol)


def brier(p, labels):
    return np.mean(np.sum((p - np.eye(p.shape[1])[labels]) ** 2, axis=1))


# 40 classes: row sums through _cpu.row_sum's select; masked: impossible classes (labels
# on them too, a probability-0 event under every member) and padding rows.
@pytest.mark.parametrize("num_classes, masked", [(5, False), (40, False), (40, True)])
def test_ensemble_temperature_as_the_paper_fits_it(x64, num_classes, masked):
    logits, labels = miscalibrated(2000, num_classes, seed=4, scale=2.5)
    where = np.arange(2000) % 11 != 0 if masked else np.ones(2000, bool)
    if masked:
        logits[::7, 3] = -np.inf
    fitted = jsoftmax.fit_ensemble_temperature(logits, labels, where=where)
    logits, labels = logits[where], labels[where]
    t, w = float(fitted.temperature), np.asarray(fitted.weights)
    # T minimises the Brier score of softmax(x / T) (SciPy's bounded scalar minimiser) ...
    tempered = scipy.optimize.minimize_scalar(
        lambda t: brier(softmax(logits / t, axis=1), labels),
        bounds=(0.01, 100.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    np.testing.assert_allclose(t, tempered.x, rtol=1e-5)
    # ... the weights the Brier score of the mixture on the simplex (SLSQP, as the paper) ...
    possible = np.isfinite(logits)
    uniform = possible / possible.sum(1, keepdims=True)
    members = [softmax(logits / t, axis=1), softmax(logits, axis=1), uniform]

    def mixed(w):
        return brier(sum(wj * pj for wj, pj in zip(w, members, strict=True)), labels)

    slsqp = scipy.optimize.minimize(
        mixed,
        np.array([1.0, 0.0, 0.0]),
        method="SLSQP",
        bounds=[(0, 1)] * 3,
        constraints={"type": "eq", "fun": lambda w: np.sum(w) - 1},
        tol=1e-14,
    )
    assert mixed(w) <= slsqp.fun + 1e-12
    np.testing.assert_allclose(w, slsqp.x, atol=1e-5)
    # ... so its Brier score is never above temperature scaling's, at either temperature.
    got = np.exp(np.asarray(jsoftmax.calibrate(fitted, logits)))
    np.testing.assert_allclose(got, sum(wj * pj for wj, pj in zip(w, members, strict=True)))
    label_possible = possible[np.arange(len(labels)), labels]  # the NLL's rows
    nll_t = float(jsoftmax.fit_temperature(logits, labels, where=label_possible))
    assert brier(got, labels) <= brier(members[0], labels) + 1e-15
    assert brier(got, labels) <= brier(softmax(logits / nll_t, axis=1), labels)


@pytest.mark.parametrize("num_classes", [10, 16, 17, 1000])
def test_cpu_row_sums_are_the_sums(num_classes):
    terms = np.random.default_rng(0).standard_normal((300, num_classes)).astype(np.float32)
    terms[1, 2], terms[2, :] = np.nan, -0.0
    terms[3, 0], terms[4, :2] = np.inf, [np.inf, -np.inf]
    with np.errstate(invalid="ignore"):  # inf - inf
        want = np.sum(terms.astype(np.float64), axis=-1)
    for f in (jax.jit(_cpu.row_sum), jax.vmap(_cpu.row_sum)):
        np.testing.assert_allclose(f(terms), want, rtol=1e-5, atol=1e-5)

    def apart(terms):
        return _cpu.row_sums_apart(lambda t: (t, -2 * t), terms)

    for schedule in (contextlib.nullcontext, core_schedules):  # CPU's, and GPUs' and TPUs'
        with schedule():
            for f in (jax.jit(apart), jax.vmap(apart)):
                s, s2 = f(terms)
                # (XLA's CPU backend adds a reduction of two operands one term at a time.)
                np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(s2, -2 * want, rtol=1e-5, atol=2e-4)


def test_ensemble_temperature_at_the_edges_of_the_float_range():
    # An upper bound past 1 / tiny: 1 / T flushed to 0 made exp(-inf * 0) NaN weights.
    rng = np.random.default_rng(3)
    logits = 3 * rng.standard_normal((300, 5)).astype(np.float32)
    logits[::3, 1] = -np.inf
    labels = rng.integers(0, 5, 300)
    fitted = jsoftmax.fit_ensemble_temperature(logits, labels, bounds=(1.0, 1e38))
    assert np.all(np.isfinite(fitted.weights)) and np.isfinite(fitted.temperature)
    # x - max overflowing to -inf at a possible label: the uniform member still counts it.
    logits = np.full((4, 3), 2e38, np.float32)
    logits[:, 1] = -2e38
    labels = np.array([1, 1, 0, 2])
    fitted = jsoftmax.fit_ensemble_temperature(logits, labels)
    got = brier(np.exp(np.asarray(jsoftmax.calibrate(fitted, logits), np.float64)), labels)
    for vertex in np.eye(3, dtype=np.float32):
        member = jsoftmax.EnsembleTemperature(fitted.temperature, vertex)
        assert got <= brier(np.exp(np.asarray(jsoftmax.calibrate(member, logits))), labels) + 1e-6


def test_ensemble_temperature_is_the_global_minimum_of_a_two_population_score(x64):
    # Half the rows scaled by 0.05, half by 30: the Brier score has a local minimum near
    # T = 0.05 and its global one near T = 30 (a grid of 6 points finds the local one).
    rng = np.random.default_rng(7)
    truth = 2.6 * rng.standard_normal((1000, 20))
    labels = (rng.random((1000, 1)) > np.cumsum(softmax(truth, 1), 1)).sum(1).clip(0, 19)
    logits = truth * np.where(rng.random((1000, 1)) < 0.5, 0.05, 30.0)
    t = float(jsoftmax.fit_ensemble_temperature(logits, labels).temperature)
    scan = np.exp(np.linspace(np.log(0.01), np.log(100.0), 2000))
    best = min(brier(softmax(logits / s, 1), labels) for s in scan)
    assert brier(softmax(logits / t, 1), labels) <= best + 1e-12


def test_ensemble_temperature_in_float32_is_the_float64_one_to_its_precision():
    """Float32 stops narrowing at sqrt(eps) of log T, where its Brier score's rounding decides."""
    logits, labels = miscalibrated(2000, 5, seed=4, scale=2.5)
    t32 = jsoftmax.fit_ensemble_temperature(logits.astype(np.float32), labels).temperature
    with jax.enable_x64(True):
        t64 = jsoftmax.fit_ensemble_temperature(logits, labels).temperature
    assert t32.dtype == np.float32
    np.testing.assert_allclose(t32, t64, rtol=1e-3)
    # At a bound (pure noise wants T -> inf), T is the bound, not its log's rounding.
    noise = np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32) * 5
    labels = np.random.default_rng(1).integers(0, 4, 3000)
    assert jsoftmax.fit_ensemble_temperature(noise, labels).temperature == np.float32(100.0)


def test_ensemble_weights_reach_every_face_of_the_simplex(x64):
    """Calibrated logits keep the raw prediction; pure noise is best predicted as uniform."""
    logits, labels = miscalibrated(3000, 4, seed=5, scale=1.0, shift=0.0)
    w = np.asarray(jsoftmax.fit_ensemble_temperature(logits, labels).weights)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    noise = np.random.default_rng(0).standard_normal((3000, 4)) * 5
    w = np.asarray(jsoftmax.fit_ensemble_temperature(noise, labels).weights)
    assert w[2] > 0.9


def test_histogram_binning_equals_the_per_class_bin_frequencies(x64):
    logits, labels = miscalibrated(2000, 3, seed=6)
    num_bins = 10
    fitted = jsoftmax.fit_histogram_binning(logits, labels, num_bins=num_bins)
    p = softmax(logits, axis=1)
    bins = np.clip(np.ceil(p * num_bins).astype(int) - 1, 0, num_bins - 1)
    want = np.empty((3, num_bins))
    for k in range(3):
        for m in range(num_bins):
            rows = bins[:, k] == m
            want[k, m] = np.mean(labels[rows] == k) if rows.any() else (m + 0.5) / num_bins
    np.testing.assert_allclose(fitted.values, want, rtol=1e-12)
    q = want[np.arange(3), bins]
    got = np.exp(np.asarray(jsoftmax.calibrate(fitted, logits)))
    np.testing.assert_allclose(got, q / q.sum(1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("schedule", [contextlib.nullcontext, core_schedules], ids=["cpu", "core"])
@pytest.mark.parametrize("ties", [False, True])
def test_isotonic_equals_scikit_learn_per_class(ties, schedule, x64):
    logits, labels = miscalibrated(3000, 4, seed=7)
    if ties:  # many rows share a probability (bit for bit): scikit-learn pools them first
        logits = np.round(logits)
        logits -= logits.max(1, keepdims=True)
    with schedule():  # SciPy's PAVA and NumPy's sort on the host, or the core's rounds
        fitted = jsoftmax.fit_isotonic(logits, labels)
    p = softmax(logits, axis=1)
    fresh = softmax(miscalibrated(1000, 4, seed=8, scale=4.0)[0], axis=1)
    q = np.empty_like(fresh)
    for k in range(4):
        isotonic = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
        isotonic.fit(p[:, k], (labels == k).astype(np.float64))
        q[:, k] = isotonic.predict(fresh[:, k])
        # The fitted values at the training points, too.
        order = np.argsort(p[:, k], kind="stable")
        np.testing.assert_allclose(fitted.values[k], isotonic.predict(p[order, k]), atol=1e-12)
    got = np.exp(np.asarray(jsoftmax.calibrate(fitted, np.log(fresh))))
    total = q.sum(1, keepdims=True)
    want = np.where(total > 0, q / np.where(total > 0, total, 1), 0.25)
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
@pytest.mark.parametrize("rows", [2047, 2048])
def test_isotonic_runs_on_the_host_on_cpu_only_from_2048_rows(platform, rows):
    logits, labels = miscalibrated(rows, 3, seed=1)
    program = lowered_for(jsoftmax.fit_isotonic, platform, logits.astype(np.float32), labels)
    assert ("callback" in program) == (platform == "cpu" and rows == 2048)


@pytest.mark.parametrize("bad", ["label", "NaN logit"])
def test_isotonic_on_the_host_is_nan_for_bad_input(bad, x64):
    """A traced bad label, or a NaN logit in a kept row (its probabilities NaN, read as
    padding's key just under 2 but counted), gives NaN values, as the core does."""
    logits, labels = miscalibrated(2048, 3, seed=2)
    if bad == "label":
        labels = np.where(np.arange(2048) == 7, -1, labels)
    else:
        logits[7, 1] = np.nan
    fitted = jax.jit(jsoftmax.fit_isotonic)(logits, labels)
    assert np.all(np.isnan(fitted.values))
    with core_schedules():
        core = jax.jit(jsoftmax.fit_isotonic)(logits, labels)
    np.testing.assert_array_equal(fitted.thresholds, core.thresholds)


def host_groups(xs):
    def openers(row):  # with padding's group after the kept rows, as the fit adds it
        n = np.count_nonzero(np.isfinite(row))
        opens = np.arange(len(row)) == n
        opens[_cpu._group_starts(row[:n])] = True
        return opens

    return np.concatenate([openers(row) for row in np.asarray(xs)])


@pytest.mark.parametrize(
    "groups", [_calibrators._resolution_groups, host_groups], ids=["core", "cpu"]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_isotonic_groups_rows_as_scikit_learn_does(groups, dtype, x64):
    """Each class's sorted run is grouped by scikit-learn's sequential rule, run by run."""

    def sequential(xs):  # a row opens a group at least ``resolution`` above the last opener
        opens, last = np.zeros(len(xs), bool), -np.inf
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, no group
            for j, x in enumerate(xs):
                if j == 0 or x - last >= np.finfo(dtype).resolution:
                    opens[j], last = True, x
        return opens

    rng = np.random.default_rng(10)
    # Runs shorter and longer than the core's coarse brackets (32 entries).
    for size, k in [(1, 3), (7, 2), (100, 4), (257, 3), (5000, 2)]:
        # Ties, steps below the resolution and steps above it, so that
        # chains of openers cross whole stretches of rows; stretches of 200
        # rows with a hundredth of those steps put successors far away.
        step = rng.choice([0.0, 0.3, 0.7, 1.0, 3.0], (k, size))
        step *= np.repeat(rng.choice([0.01, 1.0], (k, size // 200 + 1)), 200, axis=1)[:, :size]
        xs = np.cumsum(np.finfo(dtype).resolution * step, axis=1).astype(dtype)
        xs[:, size - size // 10 :] = np.inf  # padding rows sort last as +inf
        xs[2:] = np.inf  # classes past the second keep no row
        got = groups(jnp.asarray(xs))
        want = np.concatenate([sequential(run) for run in xs])
        np.testing.assert_array_equal(got, want)
    if groups is host_groups:
        return
    # Batched, as a vmapped fit runs it: classes in another order.
    got = jax.vmap(groups)(jnp.asarray(np.stack([xs, xs[::-1]])))
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], np.concatenate([sequential(run) for run in xs[::-1]]))


def test_isotonic_interpolates_between_groups_as_scikit_learn_does():
    """Rows within the resolution of a group's first row interpolate from that first row."""
    rng = np.random.default_rng(13)
    resolution = np.finfo(np.float32).resolution
    p = np.sort(0.5 + resolution * np.cumsum(rng.choice([0.0, 0.4, 0.7, 1.5], 300)))
    p = p.astype(np.float32)
    hit = rng.random(300) < (p - 0.5) / (p[-1] - 0.5)
    n = jnp.asarray(300, jnp.int32)
    thresholds, values = _calibrators._isotonic(
        jnp.asarray(p)[None], jnp.asarray(hit)[None], True, n, jnp.ones(())
    )
    fresh = np.concatenate([p, rng.uniform(p[0] - 1e-6, p[-1] + 1e-6, 300).astype(np.float32)])
    got = _calibrators._interpolate(thresholds[0], values[0], n, jnp.asarray(fresh))
    isotonic = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, hit)
    np.testing.assert_allclose(got, isotonic.predict(fresh), atol=1e-6)


def test_isotonic_is_exact_past_two_to_the_24_rows_and_classes():
    """The core's classes run as one flat problem of ``N * K`` rows, counted exactly past 2**24
    (on CPU each class runs on its own, counted in int64)."""
    rng = np.random.default_rng(12)
    n = 5_600_001  # 3 n is odd and above 2**24: a float32 count rounds there
    z = rng.standard_normal(n).astype(np.float32)
    logits = np.stack([np.zeros_like(z), z, np.zeros_like(z)], axis=1)
    labels = rng.integers(0, 3, n).astype(np.int32)
    swapped = np.where(labels == 1, 1, 2 - labels)
    # Classes 0 and 2 have the same probabilities: swapping their labels swaps their fits.
    with core_schedules():
        last = jsoftmax.fit_isotonic(logits, labels).values[2]
        first = jsoftmax.fit_isotonic(logits, swapped).values[0]
    np.testing.assert_array_equal(last, first)
    # The rows are counted exactly past 2**24 too (a float32 sum stops at 2**24), in the
    # rows every fit reads (isotonic's count among them).
    rows = 2**24 + 1
    prepared = jax.jit(_calibrators._prepared)(
        np.zeros((rows, 1), np.float32), np.zeros(rows, np.int32), np.ones(rows, bool)
    )
    assert int(prepared[3]) == rows
    # Past int32 positions (without x64) it says so, before allocating anything.
    if not jax.config.jax_enable_x64:
        huge = (
            jax.ShapeDtypeStruct((2**16, 2**15), jnp.float32),
            jax.ShapeDtypeStruct((2**16,), int),
        )
        with pytest.raises(ValueError, match=r"fit_isotonic: logits \(65536, 32768\) hold more"):
            jax.eval_shape(jsoftmax.fit_isotonic, *huge)


def test_isotonic_and_histogram_edge_cases():
    logits = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], np.float32))
    labels = np.array([0, 1, 1])
    nothing = np.zeros(3, bool)
    # No kept row: isotonic is the identity, histogram binning the bin centres.
    identity = jsoftmax.calibrate(jsoftmax.fit_isotonic(logits, labels, where=nothing), logits)
    np.testing.assert_allclose(identity, logits, rtol=1e-6)
    empty = jsoftmax.fit_isotonic(np.zeros((0, 2), np.float32), np.zeros(0, np.int32))
    np.testing.assert_allclose(jsoftmax.calibrate(empty, logits), logits, rtol=1e-6)
    with pytest.raises(ValueError, match=r"fit_isotonic: logits of shape \(0, 0\) has no class"):
        jsoftmax.fit_isotonic(np.zeros((0, 0), np.float32), np.zeros(0, np.int32))
    centres = jsoftmax.fit_histogram_binning(logits, labels, num_bins=4, where=nothing).values
    np.testing.assert_allclose(centres, [[0.125, 0.375, 0.625, 0.875]] * 2)
    # A class impossible only in the new logits stays impossible (its bin's value is 0.5 > 0).
    fitted = jsoftmax.fit_histogram_binning(logits, labels, num_bins=2)
    got = jsoftmax.calibrate(fitted, np.array([[0.0, -np.inf]], np.float32))
    np.testing.assert_array_equal(got, [[0.0, -np.inf]])
    # Every class mapped to 0: the uniform distribution (scikit-learn's convention).
    zeros = jsoftmax.HistogramBinning(np.zeros((2, 4), np.float32))
    np.testing.assert_allclose(np.exp(jsoftmax.calibrate(zeros, logits)), np.full((3, 2), 0.5))


def test_isotonic_fit_refuses_differentiation_and_histogram_binning_is_constant():
    """The isotonic thresholds are the rows' probabilities, found through an integer sort
    key: differentiating the fit raises rather than give 0 (it did). Histogram binning's
    bin frequencies are constant in the logits almost everywhere: its derivative is 0."""
    logits, labels = miscalibrated(64, 3, seed=2)
    logits = logits.astype(np.float32)

    def calibrated(fit):
        return lambda s: jnp.sum(jsoftmax.calibrate(fit(s * logits, labels), logits))

    for transform in (jax.grad, jax.jacfwd):
        with pytest.raises(TypeError, match="fit_isotonic is not differentiable"):
            transform(calibrated(jsoftmax.fit_isotonic))(1.0)
    assert jax.grad(calibrated(jsoftmax.fit_histogram_binning))(1.0) == 0.0
    # calibrate itself is differentiable in the logits it maps
    fitted = jsoftmax.fit_isotonic(logits, labels)
    grad = jax.grad(lambda x: jnp.sum(jsoftmax.calibrate(fitted, x)[:, 0]))(logits)
    assert np.isfinite(grad).all() and np.any(grad != 0)


def test_ensemble_weights_off_the_simplex_are_renormalised_and_negative_ones_nan():
    """calibrate of an EnsembleTemperature whose weights a gradient step moved off the
    simplex: the mixture of their normalised weights (the rows summed to 2.48, and the NLL
    fell without limit as the weights grew); a negative weight makes no mixture: NaN."""
    logits, labels = miscalibrated(50, 4, seed=3)
    logits = logits.astype(np.float32)
    t = np.float32(2.0)
    on = jsoftmax.EnsembleTemperature(t, np.array([0.25, 0.25, 0.5], np.float32))
    off = jsoftmax.EnsembleTemperature(t, np.array([1.0, 1.0, 2.0], np.float32))
    np.testing.assert_allclose(
        jsoftmax.calibrate(off, logits), jsoftmax.calibrate(on, logits), rtol=1e-6
    )

    def nll(weights):
        log_q = jsoftmax.calibrate(jsoftmax.EnsembleTemperature(t, weights), logits)
        return -jnp.mean(jnp.take_along_axis(log_q, labels[:, None], 1))

    # scaling the weights changes nothing: the gradient is orthogonal to them
    grad = jax.grad(nll)(off.weights)
    assert abs(np.dot(grad, off.weights)) < 1e-5 * np.abs(grad).sum()
    bad = jsoftmax.EnsembleTemperature(t, np.array([0.5, -0.5, 1.0], np.float32))
    assert np.isnan(jsoftmax.calibrate(bad, logits)).all()
    assert np.isnan(jax.grad(nll)(bad.weights)).all()


@pytest.mark.parametrize("fit", [jsoftmax.fit_vector_scaling, jsoftmax.fit_matrix_scaling])
def test_affine_fits_ignore_a_large_offset_of_one_class(fit):
    """A per-class offset is absorbed by the bias: the same calibrated probabilities. The
    fit started with every class's intercept near the largest offset, which a shift of all
    classes leaves where it is: the fitted logits held 1e4 in float32 (7e-4 off)."""
    logits, labels = miscalibrated(400, 3, seed=9, scale=50.0)
    offset = np.array([1e4, 0.0, 0.0], np.float32)
    shifted = logits.astype(np.float32) + offset
    logits = shifted - offset  # (exact: the logits as rounded near 1e4)
    want = np.exp(jsoftmax.calibrate(fit(logits, labels), logits))
    got = np.exp(jsoftmax.calibrate(fit(shifted, labels), shifted))
    # (matrix scaling's products of the 1e4 carry 1e4 * eps each: 7e-5 in the probabilities)
    np.testing.assert_allclose(got, want, atol=1e-4 if fit is jsoftmax.fit_matrix_scaling else 2e-5)


ALL_FITS = [
    jsoftmax.fit_vector_scaling,
    jsoftmax.fit_matrix_scaling,
    jsoftmax.fit_dirichlet_calibration,
    jsoftmax.fit_ensemble_temperature,
    jsoftmax.fit_histogram_binning,
    jsoftmax.fit_isotonic,
]


@pytest.mark.parametrize("fit", ALL_FITS)
def test_impossible_classes_stay_impossible(fit):
    logits, labels = miscalibrated(400, 4, seed=9)
    logits = logits.astype(np.float32)
    logits[:, 3] = -np.inf
    labels = labels % 3
    fitted = fit(logits, labels)
    assert all(np.all(np.isfinite(a)) for a in fitted)
    got = np.asarray(jsoftmax.calibrate(fitted, logits))
    assert np.all(got[:, 3] == -np.inf)
    assert not np.any(np.isnan(got))
    np.testing.assert_allclose(np.exp(got).sum(1), 1, rtol=1e-5)


LIKELIHOOD_FITS = [jsoftmax.fit_temperature, *ALL_FITS[:3]]


def edge_data():
    return miscalibrated(300, 4, seed=13)


def same_fit(got, want, rtol):
    """Equal temperatures, or equal predictions (a constant added to every bias is free)."""
    if not isinstance(got, tuple):
        np.testing.assert_allclose(got, want, rtol=rtol)
        return
    logits, _ = edge_data()
    got, want = (jsoftmax.calibrate(c, logits.astype(c[0].dtype)) for c in (got, want))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("fit", [jsoftmax.fit_temperature, *ALL_FITS])
def test_a_row_with_every_class_impossible_is_padding(fit):
    # As the losses give it cost 0 and do not count it.
    logits, labels = edge_data()
    logits = logits.astype(np.float32)
    logits[5] = -np.inf
    same_fit(fit(logits, labels), fit(logits, labels, where=np.arange(300) != 5), rtol=0)


@pytest.mark.parametrize("fit", [f for f in ALL_FITS if f is not jsoftmax.fit_histogram_binning])
def test_a_fit_without_an_informative_row_leaves_predictions_alone(fit):
    """No kept row, only padding, no row at all or only certain rows: the identity (the
    ensemble returned T = 0.037, near one-hot predictions; the affine fits raised JAX's
    "argmax of an empty sequence" on no row), also under vmap beside a real problem."""
    logits, labels = edge_data()
    logits = logits.astype(np.float32)
    certain = logits.copy()
    certain[:, 0] = np.inf
    nothing = np.zeros(300, bool)
    identity = jsoftmax.log_softmax(logits)
    cases = [(logits, labels, nothing), (np.full_like(logits, -np.inf), labels, None)]
    cases.append((logits[:0], labels[:0], None))
    if fit is not jsoftmax.fit_isotonic:  # (whose data certain rows are, as p = 0 and 1)
        # Labelled on their +inf class: another label would be impossible.
        cases.append((certain, np.zeros_like(labels), None))
    for x, y, where in cases:
        got = jsoftmax.calibrate(fit(x, y, where=where), logits)
        np.testing.assert_allclose(got, identity, rtol=1e-5, atol=1e-5)
    both = jax.vmap(lambda w: fit(logits, labels, where=w))(np.stack([~nothing, nothing]))
    got = jsoftmax.calibrate(jax.tree.map(lambda a: a[1], both), logits)
    np.testing.assert_allclose(got, identity, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fit", "penalty"),
    [
        (jsoftmax.fit_matrix_scaling, "l2"),
        (jsoftmax.fit_dirichlet_calibration, "off_diagonal"),
        (jsoftmax.fit_dirichlet_calibration, "intercept"),
    ],
)
def test_a_traced_bad_penalty_makes_the_fit_nan(fit, penalty):
    """It stalled the search at the identity, which passed for a fit."""
    logits, labels = edge_data()
    fitted_with = jax.jit(lambda v: fit(logits, labels, **{penalty: v}))  # compiled once
    for bad in (-1.0, np.nan, np.inf):  # (a concrete inf raises)
        fitted = fitted_with(bad)
        assert np.all(np.isnan(flat(fitted)))


@pytest.mark.parametrize("fit", [jsoftmax.fit_temperature, *ALL_FITS])
def test_infinite_logits_make_a_row_certain(fit, x64):
    # A +inf logit: the +inf classes share the mass and the others are impossible,
    # at every temperature and under every calibrator (as in softmax). Its likelihood
    # is then a constant, so the likelihood fits' optimum is that of the data with the
    # row replaced by any other constant-likelihood row: one possible class, the label.
    logits, labels = edge_data()
    rows, hits = [(0.0, np.inf, 1.0, 2.0), (np.inf, np.inf, 0.0, 1.0)], [1, 0]
    certain, labels = logits.copy(), labels.copy()
    certain[:2], labels[:2] = rows, hits
    if fit in LIKELIHOOD_FITS:
        reference = np.where(np.arange(4) == np.array(hits)[:, None], 0.0, -np.inf)
        rtol = 1e-6
    else:
        # Probabilities [0, 1, 0, 0] and [0.5, 0.5, 0, 0] at every temperature.
        reference = np.where(np.isinf(rows), 0.0, -1e300)
        rtol = 1e-12
    replaced = certain.copy()
    replaced[:2] = reference
    same_fit(fit(certain, labels), fit(replaced, labels), rtol)
    if fit is jsoftmax.fit_temperature:  # certain rows alone: as no row at all
        assert fit(certain[:2], labels[:2]) == 1.0


@pytest.mark.parametrize("fit", [jsoftmax.fit_temperature, *ALL_FITS])
def test_a_label_on_an_impossible_class(fit, x64):
    # Probability 0 under every calibrator: the likelihood fits have no optimum (NaN);
    # the fits of probabilities count a probability-0 event that happened.
    logits, labels = edge_data()
    rows, hits = [(0.0, -np.inf, 1.0, 2.0), (0.0, np.inf, 1.0, 2.0)], [1, 0]
    impossible, labels = logits.copy(), labels.copy()
    impossible[:2], labels[:2] = rows, hits
    got = fit(impossible, labels)
    if fit in LIKELIHOOD_FITS:
        assert all(np.all(np.isnan(a)) for a in jax.tree.leaves(got))
        return
    replaced = impossible.copy()
    replaced[:2] = np.clip(rows, -1e300, 1e300)
    want = fit(replaced, labels)
    if fit is not jsoftmax.fit_ensemble_temperature:
        same_fit(got, want, rtol=1e-12)
        return
    # The same temperature; the uniform member differs (it spreads over the possible
    # classes), so the weights are checked as the best mixture of the members.
    np.testing.assert_allclose(got.temperature, want.temperature, rtol=1e-12)

    def score(weights):
        mixture = jsoftmax.EnsembleTemperature(got.temperature, np.asarray(weights))
        return brier(np.exp(np.asarray(jsoftmax.calibrate(mixture, impossible))), labels)

    for weights in [want.weights, (1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 0.25, 0.25)]:
        assert score(got.weights) <= score(weights) + 1e-15


@pytest.mark.parametrize("fit", ALL_FITS)
def test_calibrate_keeps_a_nan_row_nan_beside_infinities_at_every_size(fit):
    # At 1000 rows XLA's CPU max drops the NaN of [-inf, ..., NaN, ..., -inf]: the row
    # is not a row without a possible class.
    logits, labels = miscalibrated(1000, 8, seed=3)
    fitted = fit(logits.astype(np.float32), labels)
    x = logits.astype(np.float32)
    x[5] = -np.inf
    x[5, 3] = np.nan
    got = np.asarray(jsoftmax.calibrate(fitted, x))
    assert np.all(np.isnan(got[5]))
    assert np.all(np.isfinite(np.delete(got, 5, 0)) | (np.delete(got, 5, 0) == -np.inf))


def test_calibrate_past_the_float_range_follows_the_softmax():
    # scale * x, x @ W or x / T past float32's range is +inf: those classes share the
    # mass, as in jsoftmax.softmax (it was inf - inf = NaN). Large finite logits are
    # normalised shifted (1e8 and 1e8 gave 1 and 1).
    x = jnp.array([[3e38, 0.0, 0.0], [2e38, 1e38, 0.0], [3e38, 3e38, 1.0], [5e7, 5e7, 0.0]])
    want = jsoftmax.softmax(x, temperature=0.5)
    np.testing.assert_array_equal(want, [[1, 0, 0], [1, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0]])
    for calibrator in [
        jsoftmax.VectorScaling(jnp.full(3, 2.0), jnp.zeros(3)),
        jsoftmax.MatrixScaling(2 * jnp.eye(3), jnp.zeros(3)),
        jsoftmax.EnsembleTemperature(jnp.float32(0.5), jnp.array([1.0, 0.0, 0.0])),
    ]:
        np.testing.assert_array_equal(jnp.exp(jsoftmax.calibrate(calibrator, x)), want)
    mixture = jsoftmax.EnsembleTemperature(jnp.float32(0.5), jnp.array([0.6, 0.3, 0.1]))
    got = jnp.exp(jsoftmax.calibrate(mixture, x))
    np.testing.assert_allclose(got, 0.9 * want + 0.1 / 3, rtol=1e-6)


@pytest.mark.parametrize("fit", ALL_FITS)
def test_calibrate_keeps_the_edge_rows(fit):
    logits, labels = edge_data()
    fitted = fit(logits.astype(np.float32), labels)
    rows = [
        [-np.inf] * 4,
        [0.0, np.inf, 1.0, np.inf],
        [np.inf, -np.inf, 3.0, 1.0],
        [np.nan, np.inf, 0.0, 0.0],
        [np.nan, 0.0, 1.0, 2.0],
    ]
    got = np.asarray(jsoftmax.calibrate(fitted, np.array(rows, np.float32)))
    np.testing.assert_array_equal(got[0], [-np.inf] * 4)
    np.testing.assert_allclose(got[1], [-np.inf, -np.log(2), -np.inf, -np.log(2)], rtol=1e-6)
    np.testing.assert_array_equal(got[2], [0.0, -np.inf, -np.inf, -np.inf])
    assert np.all(np.isnan(got[3:]))


@pytest.mark.parametrize("fit", ALL_FITS)
def test_calibrate_at_the_edges_differentiates_without_nan(fit):
    logits, labels = edge_data()
    fitted = fit(logits.astype(np.float32), labels)
    rows = np.array([[1.0, 0.0, -np.inf, 2.0], [0.0, np.inf, 1.0, np.inf]], np.float32)

    def finite_sum(calibrator, x):
        out = jsoftmax.calibrate(calibrator, x)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0))

    by_calibrator, by_logits = jax.grad(finite_sum, (0, 1), allow_int=True)(fitted, rows)
    assert not np.any(np.isnan(by_logits))
    for leaf in jax.tree.leaves(by_calibrator):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert not np.any(np.isnan(leaf))


@pytest.mark.parametrize("fit", ALL_FITS)
def test_calibrate_keeps_the_logits_as_given_and_per_row_vectors(fit):
    logits, labels = miscalibrated(64, 8, seed=4)
    fitted = fit(logits.astype(np.float32), labels)
    x = jnp.asarray(logits, jnp.bfloat16)
    loss = lambda x: jnp.sum(jnp.exp(jsoftmax.calibrate(fitted, x)[:, 0]))  # noqa: E731
    # Beyond the calibrator's own arrays ("from a constant"): the logits and [64, 1] vectors.
    large = [r for r in saved_residuals(loss, x) if np.prod(r[1]) > 64 and "constant" not in r[2]]
    assert large == [("bf16", (64, 8), "from the argument x")]
    assert np.all(np.isfinite(jax.grad(loss)(x).astype(np.float32)))


@pytest.mark.parametrize("fit", ALL_FITS)
def test_a_padding_row_in_calibrate_changes_no_gradient(fit):
    logits, labels = edge_data()
    fitted = fit(logits.astype(np.float32), labels)
    rows = logits[:5].astype(np.float32)
    padded = np.concatenate([rows, np.full((1, 4), -np.inf, np.float32)])

    def loss(calibrator, x):
        return -jnp.sum(jsoftmax.calibrate(calibrator, x)[:5, 2])

    for got, want in zip(
        jax.tree.leaves(jax.grad(loss, allow_int=True)(fitted, padded)),
        jax.tree.leaves(jax.grad(loss, allow_int=True)(fitted, rows)),
        strict=True,
    ):
        if jnp.issubdtype(got.dtype, jnp.floating):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_ensemble_calibrate_keeps_probabilities_below_float32s_smallest(x64):
    # The mixture of probabilities rounds exp(-90) to 0 in float32; its log is exact.
    x = np.array([[180.0, 0.0, 0.0], [3.0, -200.0, 1.0]], np.float32)
    for weights in ([1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.5, 0.2, 0.3]):
        c = jsoftmax.EnsembleTemperature(jnp.float32(2.0), jnp.array(weights, jnp.float32))
        x64_ = x.astype(np.float64)
        members = [
            log_softmax(x64_ / 2, axis=1),
            log_softmax(x64_, axis=1),
            np.log(np.ones_like(x64_) / 3),
        ]
        want = scipy.special.logsumexp(
            np.stack(members), axis=0, b=np.array(weights)[:, None, None]
        )
        np.testing.assert_allclose(jsoftmax.calibrate(c, x), want, rtol=1e-6)
        by_c, by_x = jax.grad(lambda c, x: jnp.sum(jsoftmax.calibrate(c, x)[:, 1]), (0, 1))(c, x)
        assert np.all(np.isfinite(by_x))
        # By a weight of 0 it is exp(member - mixture): up to 1e39 here, past float32.
        assert np.all(np.isfinite(by_c.weights[np.array(weights) > 0]))


@pytest.mark.parametrize("fit", ALL_FITS)
def test_calibrate_keeps_float32_under_x64(fit, x64):
    logits, labels = edge_data()
    logits = logits.astype(np.float32)
    logits[:, 3] = -np.inf
    assert jsoftmax.calibrate(fit(logits, labels % 3), logits).dtype == np.float32
    # A float64 calibrator (fitted on float64 logits) too, under strict promotion (it
    # gave float64, and strict promotion raised).
    wide = fit(logits.astype(np.float64), labels % 3)
    with jax.numpy_dtype_promotion("strict"):
        assert jsoftmax.calibrate(wide, logits).dtype == np.float32


def test_calibrate_applies_a_fitted_temperature():
    """fit_temperature's result is a calibrator as the others are (calibrate refused it):
    log_softmax(logits / T), under jit and vmap; a bad temperature is named."""
    logits, labels = miscalibrated(400, 4, seed=3)
    t = jsoftmax.fit_temperature(logits, labels)
    want = jsoftmax.log_softmax(logits, temperature=t)
    np.testing.assert_allclose(jsoftmax.calibrate(t, logits), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jsoftmax.calibrate)(t, logits), want, rtol=1e-6, atol=1e-6)
    both = jax.vmap(jsoftmax.calibrate, (0, None))(jnp.stack([t, 2 * t]), logits)
    np.testing.assert_allclose(
        both[1], jsoftmax.log_softmax(logits, temperature=2 * t), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"calibrator \(a temperature\) must be .*, got -1.0$"):
        jsoftmax.calibrate(-1.0, logits)
    with pytest.raises(TypeError, match="calibrator must be one of the fit_"):
        jsoftmax.calibrate(np.ones(4), logits)


def test_ensemble_uniform_member_spreads_over_the_possible_classes():
    # A useless model: Mix-n-Match gives the uniform member weight, which must not
    # reach an impossible class.
    rng = np.random.default_rng(14)
    logits = rng.standard_normal((2000, 4)).astype(np.float32)
    logits[:, 3] = -np.inf
    labels = rng.integers(0, 3, 2000)
    fitted = jsoftmax.fit_ensemble_temperature(logits, labels)
    assert fitted.weights[2] > 0.1
    got = np.asarray(jsoftmax.calibrate(fitted, logits))
    assert np.all(got[:, 3] == -np.inf)
    np.testing.assert_allclose(np.exp(got).sum(1), 1, rtol=1e-5)
    # Its Brier score is the one the fit minimised: no weight does better.
    score = brier(np.exp(got), labels)
    for w in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        other = jsoftmax.EnsembleTemperature(fitted.temperature, np.array(w, np.float32))
        assert score <= brier(np.exp(jsoftmax.calibrate(other, logits)), labels) + 1e-6


@pytest.mark.parametrize("fit", ALL_FITS)
def test_bad_labels(fit):
    logits, labels = miscalibrated(50, 3, seed=10)
    with pytest.raises(ValueError, match=f"{fit.__name__}: label 3 at position"):
        fit(logits, np.where(np.arange(50) == 7, 3, labels))
    fitted = jax.jit(fit)(logits.astype(np.float32), np.where(np.arange(50) == 7, -1, labels))
    assert any(np.all(np.isnan(a)) for a in fitted)


@pytest.mark.parametrize("fit", ALL_FITS)
def test_nan_logits_propagate_unless_masked(fit):
    logits, labels = miscalibrated(60, 3, seed=12)
    logits = logits.astype(np.float32)
    poisoned = logits.copy()
    poisoned[7, 1] = np.nan
    assert any(np.all(np.isnan(a)) for a in fit(poisoned, labels))
    where = np.arange(60) != 7
    got, want = fit(poisoned, labels, where=where), fit(logits, labels, where=where)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_input_messages():
    logits, labels = miscalibrated(50, 3, seed=11)
    with pytest.raises(ValueError, match=r"logits must have shape \[N, K\], got \(50,\)"):
        jsoftmax.fit_isotonic(logits[:, 0], labels)
    with pytest.raises(TypeError, match="logits must be floating"):
        jsoftmax.fit_vector_scaling(labels[:, None], labels)
    with pytest.raises(ValueError, match="l2 must be finite and >= 0"):
        jsoftmax.fit_matrix_scaling(logits, labels, l2=-1.0)
    with pytest.raises(ValueError, match="off_diagonal must be finite and >= 0"):
        jsoftmax.fit_dirichlet_calibration(logits, labels, off_diagonal=np.inf)
    with pytest.raises(ValueError, match=r"num_bins must be in \[1, 46340\], got 0"):
        jsoftmax.fit_histogram_binning(logits, labels, num_bins=0)
    with pytest.raises(ValueError, match="bounds must satisfy"):
        jsoftmax.fit_ensemble_temperature(logits, labels, bounds=(2.0, 1.0))
    fitted = jsoftmax.fit_vector_scaling(logits, labels)
    with pytest.raises(
        ValueError, match=r"VectorScaling.scale has shape \(3,\) but logits \(2, 4\) need \(4,\)"
    ):
        jsoftmax.calibrate(fitted, np.zeros((2, 4)))
    # A stacked calibrator (of jax.vmap over fits) applies under jax.vmap only: it broadcast.
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), fitted)
    with pytest.raises(ValueError, match=r"scale has shape \(2, 3\) but logits \(2, 3\) need"):
        jsoftmax.calibrate(stacked, logits[:2])
    isotonic = jax.tree.map(lambda a: jnp.stack([a, a]), jsoftmax.fit_isotonic(logits, labels))
    with pytest.raises(ValueError, match=r"IsotonicCalibration.thresholds has shape \(2, 3, 50\)"):
        jsoftmax.calibrate(isotonic, logits)
    with pytest.raises(TypeError, match="calibrator must be one of the fit_"):
        jsoftmax.calibrate((1.0, 2.0), logits)
    # A hand-built one: lists are arrays; strings, complex numbers, a float count are named.
    listed = jsoftmax.VectorScaling([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(
        jsoftmax.calibrate(listed, logits), log_softmax(logits, axis=1), rtol=1e-5, atol=1e-6
    )
    fitted_isotonic = jsoftmax.fit_isotonic(logits, labels)
    by_hand = jsoftmax.IsotonicCalibration(*fitted_isotonic[:2], int(fitted_isotonic.count))
    np.testing.assert_array_equal(
        jsoftmax.calibrate(by_hand, logits), jsoftmax.calibrate(fitted_isotonic, logits)
    )
    for bad, message in [
        (jsoftmax.VectorScaling("abc", "def"), "VectorScaling.scale must be a real number"),
        (jsoftmax.VectorScaling(np.ones(3, complex), np.zeros(3)), "scale must be a real"),
        (jsoftmax.MatrixScaling(np.eye(3) > 0, np.zeros(3)), "weight must be a real number"),
        (
            jsoftmax.IsotonicCalibration(np.zeros((3, 4)), np.zeros((3, 4)), 4.0),
            "count must be an integer",
        ),
    ]:
        with pytest.raises(TypeError, match=message):
            jsoftmax.calibrate(bad, logits)
    # ... and what no fit returns: it read as NaN rows or the identity (found by a review).
    for bad, message in [
        (jsoftmax.HistogramBinning(np.zeros((3, 0))), "HistogramBinning.values has no bin"),
        (
            jsoftmax.IsotonicCalibration(np.zeros((3, 4)), np.zeros((3, 4)), 5),
            r"IsotonicCalibration.count must be in \[0, 4\] \(the thresholds' length\), got 5",
        ),
        (jsoftmax.IsotonicCalibration(np.zeros((3, 4)), np.zeros((3, 4)), -1), "got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            jsoftmax.calibrate(bad, logits)
    # Leading axes are kept; the ensemble applies to any number of classes.
    ensemble = jsoftmax.fit_ensemble_temperature(logits, labels)
    assert jsoftmax.calibrate(ensemble, np.zeros((2, 5, 7))).shape == (2, 5, 7)
    assert jsoftmax.calibrate(fitted, np.zeros((2, 5, 3))).shape == (2, 5, 3)
    # Logits without a class have no log-probability (the ensemble raised ZeroDivisionError).
    for empty in (ensemble, jsoftmax.VectorScaling(jnp.ones(0), jnp.zeros(0))):
        out = jsoftmax.calibrate(empty, np.zeros((2, 5, 0), np.float32))
        assert out.shape == (2, 5, 0) and out.dtype == jnp.float32
