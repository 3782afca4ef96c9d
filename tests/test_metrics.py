import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax import _metrics
from tests import reference
from tests.conftest import TRANSFORMS
from tests.test_calibration import calibrated, probabilities

NEW = {
    "negative_log_likelihood": lambda p, y, w=None: reference.negative_log_likelihood(p, y, w),
    "smooth_calibration_error": lambda p, y, w=None: reference.smooth_calibration_error(p, y, w),
    "debiased_calibration_error": lambda p, y, w=None: reference.debiased_calibration_error(
        p, y, 15, "top-label", w
    ),
    "marginal": lambda p, y, w=None: reference.debiased_calibration_error(p, y, 15, "marginal", w),
}


def metric(name):
    if name == "marginal":
        return functools.partial(jsoftmax.debiased_calibration_error, mode="marginal")
    return getattr(jsoftmax, name)


# Every metric bootstrap accepts, with its float64 reference.
ALL = {
    **NEW,
    "expected_calibration_error": lambda p, y, w=None: reference.expected_calibration_error(
        p, y, 15, w
    ),
    "maximum_calibration_error": lambda p, y, w=None: reference.maximum_calibration_error(
        p, y, 15, w
    ),
    "adaptive_calibration_error": lambda p, y, w=None: reference.adaptive_calibration_error(
        p, y, 15, w
    ),
    "classwise_calibration_error": lambda p, y, w=None: reference.classwise_calibration_error(
        p, y, 15, w
    ),
    "brier_score": lambda p, y, w=None: reference.brier_score(p, y, w),
}


def call(name, probs, labels, where=None, tx=lambda f: f):
    return tx(lambda p, y, w: metric(name)(p, y, where=w))(probs, labels, where)


# ---------------------------------------------------------------- new metrics


@pytest.mark.parametrize("tx", TRANSFORMS)
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize(("n", "k", "scale"), [(400, 5, 3.0), (97, 3, 1.0), (3, 4, 2.0)])
def test_new_metric_equals_float64_reference(tx, name, n, k, scale):
    probs, labels = probabilities(n, k, seed=n + k, scale=scale)
    got = call(name, probs, labels, tx=tx)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, NEW[name](probs, labels), rtol=2e-5, atol=1e-6)


def test_nll_textbook_and_zero_probability():
    probs = np.array([[0.5, 0.5], [0.25, 0.75]], np.float32)
    np.testing.assert_allclose(
        jsoftmax.negative_log_likelihood(probs, [0, 1]), -(np.log(0.5) + np.log(0.75)) / 2
    )
    assert jsoftmax.negative_log_likelihood(np.array([[1.0, 0.0]], np.float32), [1]) == np.inf


@pytest.mark.parametrize("tx", TRANSFORMS)
def test_nll_of_log_probabilities(tx):
    """log_input=True reads log-probabilities: the same NLL, exact where exp underflows,
    and under bootstrap through functools.partial."""
    probs, labels = probabilities(300, 4, seed=3)
    nll = tx(lambda p, y: jsoftmax.negative_log_likelihood(p, y, log_input=True))
    np.testing.assert_allclose(
        nll(np.log(probs), labels), reference.negative_log_likelihood(probs, labels), rtol=1e-6
    )
    log_probs = np.array([[0.0, -120.0], [-np.inf, 0.0]], np.float32)  # exp(-120) is 0 in float32
    np.testing.assert_allclose(nll(log_probs, np.array([1, 1])), 60.0)
    assert jsoftmax.negative_log_likelihood(np.exp(log_probs), [1, 1]) == np.inf
    assert nll(log_probs, np.array([0, 0])) == np.inf  # a label of probability 0
    key = jax.random.key(0)
    from_log = jsoftmax.bootstrap(
        functools.partial(jsoftmax.negative_log_likelihood, log_input=True),
        np.log(probs),
        labels,
        key=key,
    )
    from_probs = jsoftmax.bootstrap(jsoftmax.negative_log_likelihood, probs, labels, key=key)
    np.testing.assert_allclose(from_log, from_probs, rtol=1e-5)


def test_debiased_returns_the_l2_error_not_its_square():
    # Two bins of 4 rows each: confidences 0.9 all wrong, and 0.6 all right.
    probs = np.array([[0.6, 0.4]] * 4 + [[0.9, 0.1]] * 4, np.float32)
    labels = np.array([0] * 4 + [1] * 4)
    # Outcomes are constant in each bin, so the variance term is 0.
    expected = np.sqrt(0.5 * 0.4**2 + 0.5 * 0.9**2)
    got = jsoftmax.debiased_calibration_error(probs, labels, num_bins=2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_smooth_diagram_matches_the_error_and_the_reference_curve():
    probs, labels = probabilities(600, 4, seed=3, scale=2.0)
    diagram = jax.jit(lambda p, y: jsoftmax.smooth_reliability_diagram(p, y, num_points=50))(
        probs, labels
    )
    value, sigma = reference.smooth_calibration_error(probs, labels, return_bandwidth=True)
    np.testing.assert_allclose(diagram.calibration_error, value, rtol=2e-5)
    np.testing.assert_allclose(diagram.bandwidth, sigma)
    np.testing.assert_allclose(diagram.grid, np.linspace(0, 1, 50), atol=1e-7)
    accuracy = reference.smooth_accuracy(probs, labels, sigma, np.linspace(0, 1, 50))
    np.testing.assert_allclose(diagram.accuracy, accuracy, atol=1e-5)
    # The density of the confidences integrates to about 1 over [0, 1].
    np.testing.assert_allclose(np.trapezoid(diagram.density, diagram.grid), 1.0, atol=0.02)


@pytest.mark.parametrize(
    ("n", "k", "seed", "num_points"), [(4000, 2, 0, 200), (1000, 2, 2, 3000), (40000, 5, 4, 200)]
)
def test_smooth_curve_keeps_its_precision_where_there_are_no_rows(n, k, seed, num_points):
    # The curve divides by the density plus 1e-4: where no confidence is near, both sums are
    # tiny and must be computed to their own precision (an FFT's float32 rounding, relative
    # to the largest sum, gave accuracies from -2847 to 11 at 4000 x 2). 40000 x 5 is
    # calibrated finely enough for the small bandwidths' grid; 3000 points are more than the
    # 1001 of the base grid.
    logits, labels = calibrated(n, k, seed=seed)
    probs = jax.nn.softmax(logits)
    diagram = jsoftmax.smooth_reliability_diagram(probs, labels, num_points=num_points)
    assert (float(diagram.bandwidth) < 0.01) == (n == 40000)
    expected = reference.smooth_accuracy(probs, labels, float(diagram.bandwidth), diagram.grid)
    assert np.all((diagram.accuracy >= 0) & (diagram.accuracy <= 1))
    np.testing.assert_allclose(diagram.accuracy, expected, atol=1e-5)


def test_smooth_error_of_overconfidence_and_of_small_bandwidths():
    # A calibrated model's smECE (below 0.01) needs the finer grids of small bandwidths.
    logits, labels = calibrated(40000, 5, seed=4)
    value, sigma = reference.smooth_calibration_error(
        jax.nn.softmax(logits), labels, return_bandwidth=True
    )
    assert sigma < 0.01
    np.testing.assert_allclose(
        jsoftmax.smooth_calibration_error(jax.nn.softmax(logits), labels), value, rtol=1e-4
    )
    assert jsoftmax.smooth_calibration_error(jax.nn.softmax(3 * logits), labels) > 0.1


@pytest.mark.parametrize("name", NEW)
def test_where_equals_dropping_the_rows(name):
    probs, labels = probabilities(200, 4, seed=1)
    where = np.random.default_rng(2).random(200) < 0.6
    got = call(name, probs, labels, where)
    np.testing.assert_allclose(got, NEW[name](probs[where], labels[where]), rtol=2e-5, atol=1e-7)
    padded = np.where(where[:, None], probs, np.nan).astype(np.float32)
    np.testing.assert_allclose(call(name, padded, labels, where), got, rtol=1e-6)


@pytest.mark.parametrize("name", NEW)
def test_no_kept_row_gives_zero(name):
    probs, labels = probabilities(8, 3, seed=0)
    assert call(name, probs, labels, np.zeros(8, bool)) == 0.0
    assert call(name, probs[:0], labels[:0]) == 0.0


@pytest.mark.parametrize("name", NEW)
def test_vmap_equals_a_loop(name):
    probs = np.stack([probabilities(64, 4, seed=s)[0] for s in range(3)])
    labels = np.stack([probabilities(64, 4, seed=s)[1] for s in range(3)])
    where = np.random.default_rng(0).random((3, 64)) < 0.8
    got = jax.vmap(lambda p, y, w: call(name, p, y, w))(probs, labels, where)
    loop = [call(name, *a, w) for *a, w in zip(probs, labels, where, strict=True)]
    np.testing.assert_allclose(got, loop, rtol=1e-6)


@pytest.mark.parametrize("name", NEW)
def test_dtypes(name, x64):
    probs, labels = probabilities(50, 4, seed=5)
    assert call(name, probs.astype(jnp.bfloat16), labels).dtype == jnp.float32
    got = call(name, probs.astype(np.float64), labels)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, NEW[name](probs.astype(np.float64), labels), rtol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_nan_probabilities_and_traced_bad_labels_give_nan(name):
    probs, labels = probabilities(20, 3, seed=6)
    assert np.isnan(call(name, np.where(np.arange(20)[:, None] == 4, np.nan, probs), labels))
    bad = labels.copy()
    bad[7] = 3
    assert np.isnan(call(name, probs, bad, tx=jax.jit))
    # ... unless the bad row is padding, also when the labels are concrete (-1 pads them).
    where = np.arange(20) != 7
    bad[7] = -1
    for tx in (jax.jit, lambda f: f):
        np.testing.assert_allclose(
            call(name, probs, bad, where=where, tx=tx), call(name, probs, labels, where=where)
        )


@pytest.mark.parametrize("name", ALL)
def test_a_nan_row_alone_in_its_bin_gives_nan(name):
    # Four rows, 15 bins: the debiased errors leave out bins of one row, but not the NaN.
    probs, labels = probabilities(4, 3, seed=6)
    assert np.isnan(call(name, np.where(np.arange(4)[:, None] == 0, np.nan, probs), labels))


@pytest.mark.parametrize("name", ALL)
def test_padding_rows_have_zero_gradient(name):
    probs, labels = probabilities(30, 3, seed=7)
    probs = np.array(probs)
    probs[3], probs[4, 1] = 0.0, np.nan  # no probability at all, and a NaN
    where = ~np.isin(np.arange(30), [3, 4])
    grad = jax.grad(lambda p: metric(name)(p, labels, where=where))(probs)
    kept = jax.grad(lambda p: metric(name)(p, labels[where]))(probs[where])
    np.testing.assert_array_equal(grad[~where], 0.0)
    np.testing.assert_allclose(grad[where], kept, rtol=1e-5, atol=1e-7)


def test_debiased_error_clipped_to_zero_has_a_finite_gradient():
    # Near-calibrated predictions: the debiased estimate is clipped to 0, where sqrt's
    # derivative is infinite.
    logits = 0.3 * jax.random.normal(jax.random.key(0), (300, 4))
    labels = jax.random.categorical(jax.random.key(100), logits)

    def error(logits):
        return jsoftmax.debiased_calibration_error(jax.nn.softmax(logits), labels)

    assert error(logits) == 0.0
    assert np.all(np.isfinite(jax.grad(error)(logits)))
    assert np.isfinite(jax.jvp(error, (logits,), (jnp.ones_like(logits),))[1])


def test_int64_labels_are_range_checked_before_int32():
    probs, labels = probabilities(10, 3, seed=8)
    wide = np.array(labels, np.int64)
    wide[2] = 2**32  # int32 would read class 0
    with pytest.raises(ValueError, match="label 4294967296 at position"):
        jsoftmax.expected_calibration_error(probs, wide)


@pytest.mark.parametrize("shape", [(1000, 10), (640, 100), (64, 1000)])
@pytest.mark.parametrize("name", ALL)
def test_nan_probabilities_give_nan_at_every_size(name, shape):
    """A row of NaN probabilities but one finite entry, at sizes where XLA's CPU backend
    fuses its max with YNNPACK, which may drop the NaN (the top-label metrics gave a
    finite error at 100 classes and more, through the blocked argmax)."""
    n, k = shape
    probs, labels = (np.array(a) for a in probabilities(n, k, seed=6))
    probs[4, 1:] = np.nan
    labels[4] = 1
    assert np.isnan(call(name, probs, labels, tx=jax.jit))


@pytest.mark.parametrize("name", ALL)
def test_nan_away_from_the_label_poisons_every_metric_but_the_nll(name):
    # The NLL reads only the label's probability (one gather, not a read of every row).
    probs, labels = (np.array(a) for a in probabilities(50, 4, seed=6))
    probs[4, 0], labels[4] = np.nan, 1
    value = call(name, probs, labels)
    if name == "negative_log_likelihood":
        np.testing.assert_allclose(value, reference.negative_log_likelihood(probs, labels), 1e-6)
    else:
        assert np.isnan(value)
    where = np.ones(50, bool)
    where[4] = False
    assert np.isfinite(call(name, probs, labels, where=where))


@pytest.mark.parametrize("name", [*NEW, "smooth_reliability_diagram"])
def test_errors(name):
    fn = getattr(jsoftmax, name, None) or metric(name)
    probs, labels = probabilities(6, 3, seed=0)
    with pytest.raises(TypeError, match="probs must be floating"):
        fn(probs.round().astype(int), labels)
    with pytest.raises(TypeError, match="labels must be integers"):
        fn(probs, labels.astype(float))
    with pytest.raises(ValueError, match=r"probs must have shape \[N, K\], got \(6,\)"):
        fn(probs[:, 0], labels)
    with pytest.raises(
        ValueError, match=r"labels has shape \(5,\) but probs \(6, 3\) needs \(6,\)"
    ):
        fn(probs, labels[:5])
    with pytest.raises(ValueError, match=r"label 3 at position \(2,\) is out of range for 3"):
        fn(probs, np.array([0, 1, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"where has shape \(5,\)"):
        fn(probs, labels, where=np.ones(5, bool))


def test_option_errors():
    probs, labels = probabilities(6, 3, seed=0)
    with pytest.raises(
        ValueError, match=r"mode must be one of \('top-label', 'marginal'\), got 'top'"
    ):
        jsoftmax.debiased_calibration_error(probs, labels, mode="top")
    for bad in (np.array("marginal"), np.array(["marginal"])):  # (unhashable: JAX's error)
        with pytest.raises(
            ValueError, match=r"mode must be one of \('top-label', 'marginal'\), got arr"
        ):
            jsoftmax.debiased_calibration_error(probs, labels, mode=bad)
    # A concrete boolean scalar of any kind, as the other static options take.
    np.testing.assert_array_equal(
        jsoftmax.negative_log_likelihood(np.log(probs), labels, log_input=jnp.array(True)),
        jsoftmax.negative_log_likelihood(np.log(probs), labels, log_input=True),
    )
    with pytest.raises(ValueError, match=r"num_bins must be in \[1, 46340\], got 0"):
        jsoftmax.debiased_calibration_error(probs, labels, num_bins=0)
    with pytest.raises(ValueError, match="num_points must be >= 2, got 1"):
        jsoftmax.smooth_reliability_diagram(probs, labels, num_points=1)
    with pytest.raises(
        TypeError, match=r"log_input must be True or False \(it is static\), got 'yes'"
    ):
        jsoftmax.negative_log_likelihood(probs, labels, log_input="yes")
    with pytest.raises(TypeError, match=r"log_input must be True or False \(it is static\), got 1"):
        jsoftmax.bootstrap(
            functools.partial(jsoftmax.negative_log_likelihood, log_input=1),
            probs,
            labels,
            key=jax.random.key(0),
        )


# ---------------------------------------------------------------- bootstrap


def bootstrap(name, probs, labels, **kwargs):
    return jsoftmax.bootstrap(metric(name), probs, labels, **kwargs)


@pytest.mark.parametrize("name", ALL)
def test_bootstrap_estimate_is_the_metric_and_the_interval_holds_it(name):
    probs, labels = probabilities(300, 4, seed=7)
    resamples = 30 if name in ("smooth_calibration_error",) else 200
    estimate, low, high = bootstrap(
        name, probs, labels, key=jax.random.key(0), num_resamples=resamples
    )
    np.testing.assert_allclose(estimate, ALL[name](probs, labels), rtol=2e-5, atol=1e-7)
    assert low < estimate < high


@pytest.mark.parametrize("name", ALL)
def test_bootstrap_resample_equals_the_metric_on_the_resampled_rows(name):
    """One resample's value is the metric of the rows drawn, repeated as often as drawn."""
    probs, labels = probabilities(120, 4, seed=8)
    where = np.random.default_rng(3).random(120) < 0.7
    for seed in range(3):
        key = jax.random.key(seed)
        _, low, high = bootstrap(name, probs, labels, key=key, num_resamples=1, where=where)
        counts = np.asarray(_metrics._counts(jax.random.split(key, 1)[0], jnp.asarray(where)))
        assert counts.sum() == where.sum() and not counts[~where].any()
        rows = np.repeat(np.arange(120), counts)
        expected = ALL[name](probs[rows], labels[rows])
        np.testing.assert_allclose(low, expected, rtol=2e-5, atol=1e-7)
        assert low == high


def test_bootstrap_is_deterministic_for_a_key_and_works_under_jit():
    probs, labels = probabilities(500, 5, seed=9)
    ece = functools.partial(jsoftmax.expected_calibration_error, num_bins=10)
    run = jax.jit(lambda k: jsoftmax.bootstrap(ece, probs, labels, key=k, num_resamples=100))
    first, again = run(jax.random.key(1)), run(jax.random.key(1))
    # The same resamples; a GPU's float scatter-adds are unordered, so their sums may
    # differ in the last bit between runs (seen on an H200: 7e-8).
    np.testing.assert_allclose(first, again, rtol=1e-6)
    eager = jsoftmax.bootstrap(ece, probs, labels, key=jax.random.key(1), num_resamples=100)
    np.testing.assert_allclose(first, eager, rtol=1e-6)
    other = run(jax.random.key(2))
    assert other[0] == first[0] and (other[1] != first[1] or other[2] != first[2])
    np.testing.assert_allclose(
        first[0], jsoftmax.expected_calibration_error(probs, labels, num_bins=10)
    )


def test_bootstrap_interval_narrows_with_more_rows_and_level():
    small = probabilities(400, 5, seed=10)
    large = probabilities(6400, 5, seed=10)
    key = jax.random.key(0)
    _, lo_s, hi_s = jsoftmax.bootstrap(jsoftmax.brier_score, *small, key=key, num_resamples=300)
    _, lo_l, hi_l = jsoftmax.bootstrap(jsoftmax.brier_score, *large, key=key, num_resamples=300)
    assert 2.5 < (hi_s - lo_s) / (hi_l - lo_l) < 6  # about sqrt(16) = 4
    _, lo_90, hi_90 = jsoftmax.bootstrap(
        jsoftmax.brier_score, *small, key=key, num_resamples=300, level=0.5
    )
    assert lo_s < lo_90 < hi_90 < hi_s


def test_bootstrap_nan_and_bad_labels():
    probs, labels = probabilities(50, 3, seed=11)
    bad = labels.copy()
    bad[3] = 7
    out = jax.jit(
        lambda y: jsoftmax.bootstrap(jsoftmax.brier_score, probs, y, key=jax.random.key(0))
    )(bad)
    assert np.isnan(out).all()
    nan_row = np.where(np.arange(50)[:, None] == 5, np.nan, probs)
    out = jsoftmax.bootstrap(jsoftmax.brier_score, nan_row, labels, key=jax.random.key(0))
    assert np.isnan(out).all()
    where = np.arange(50) != 5
    out = jsoftmax.bootstrap(
        jsoftmax.brier_score, nan_row, labels, key=jax.random.key(0), where=where
    )
    assert np.isfinite(out).all()


@pytest.mark.parametrize("num_resamples, level", [(1000, 0.95), (1001, 0.95), (101, 0.9)])
def test_bootstrap_interval_reaches_inf_between_infinite_resamples(num_resamples, level):
    """A label of probability 0 makes the NLL of the resamples drawing it inf: the upper
    end is inf (jnp.quantile's a + f (b - a) gave inf - inf, NaN, at whole positions)."""
    probs, labels = (np.array(a) for a in probabilities(200, 3, seed=12))
    probs[0], labels[0] = [1.0, 0.0, 0.0], 1
    key = jax.random.key(0)
    nll = jsoftmax.negative_log_likelihood
    estimate, low, high = jsoftmax.bootstrap(
        nll, probs, labels, key=key, num_resamples=num_resamples, level=level
    )
    assert estimate == np.inf and np.isfinite(low) and high == np.inf
    # As np.quantile where it is defined.
    draw = jax.vmap(lambda k: _metrics._counts(k, jnp.ones(200, bool)))
    counts = np.asarray(draw(jax.random.split(key, num_resamples)))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_row = np.where(counts > 0, -np.log(probs[np.arange(200), labels]) * counts, 0.0)
    values = per_row.sum(1) / 200
    np.testing.assert_allclose(low, np.quantile(values, (1 - level) / 2), rtol=1e-5)


def test_bootstrap_interval_keeps_the_metrics_dtype_and_np_quantiles_ends(x64):
    probs, labels = probabilities(40, 3, seed=13)
    out = jsoftmax.bootstrap(
        jsoftmax.brier_score, probs.astype(np.float32), labels, key=jax.random.key(0)
    )
    assert all(v.dtype == jnp.float32 for v in out)  # (the ends were float64 under x64)
    # Quartiles as the limits of linear interpolation (np.quantile's b - a is NaN or
    # overflows at the first two).
    for values, want in [
        ([-np.inf, 0.0, 1.0], [-np.inf, 0.5]),
        ([-3e38, 3e38], [-1.5e38, 1.5e38]),
        ([1.0, np.inf, np.inf], [np.inf, np.inf]),
        ([2.0, 2.0], [2.0, 2.0]),
    ]:
        got = _metrics._interval(jnp.asarray(values, jnp.float32), 0.5)
        np.testing.assert_allclose(got, np.float32(want), rtol=1e-6)


@pytest.mark.parametrize(
    "metric",
    [
        jsoftmax.classwise_calibration_error,
        functools.partial(jsoftmax.debiased_calibration_error, mode="marginal"),
    ],
)
def test_bootstrap_of_per_class_metrics_batches_by_rows_times_classes(metric):
    """Their statistics are [N, K] per resample: batched by N alone, 1,000 resamples of
    10,000 x 100 took 6 GB (classwise) and 35 GB (marginal) of temporary memory."""
    spec, options = _metrics._plan(metric)
    shapes = [((10_000, 100), jnp.float32), ((10_000,), jnp.int32), ((10_000,), jnp.bool_)]
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    compiled = _metrics._bootstrap.lower(
        spec, options, 1000, 0.95, "percentile", *args, jax.random.key(0)
    ).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 600e6  # 0.07 and 0.41 GB now


def test_bootstrap_basic_interval_reflects_the_percentiles_about_the_estimate():
    """uncertainty-calibration's intervals, ``[2 m - Q_hi, 2 m - Q_lo]``. A resample adds
    sampling noise, which a calibration error reads as miscalibration: the percentile
    interval of a calibrated model's ECE lies above the population's 0 (its resamples
    are positive), the basic one mostly holds it."""
    ece = functools.partial(jsoftmax.expected_calibration_error, num_bins=10)
    holds_zero = 0
    for seed in range(10):
        logits, labels = calibrated(500, 4, seed)  # a calibrated model: population ECE 0
        probs = np.asarray(jax.nn.softmax(logits))
        ends = {}
        for interval in ("percentile", "basic"):
            estimate, *ends[interval] = jsoftmax.bootstrap(
                ece, probs, labels, key=jax.random.key(seed), num_resamples=200, interval=interval
            )
        np.testing.assert_allclose(
            ends["basic"], 2 * estimate - np.array(ends["percentile"])[::-1], atol=1e-7
        )
        holds_zero += int(ends["basic"][0] <= 0)
    assert holds_zero >= 6  # (8 of 10 on CPU)


def test_bootstrap_errors():
    probs, labels = probabilities(10, 3, seed=0)
    key = jax.random.key(0)
    for bad in (np.mean, lambda p, y: 0.0, jsoftmax.softmax):
        with pytest.raises(TypeError, match="metric must be one of jsoftmax's"):
            jsoftmax.bootstrap(bad, probs, labels, key=key)
    with pytest.raises(TypeError, match="keyword options only"):
        jsoftmax.bootstrap(functools.partial(jsoftmax.brier_score, probs), probs, labels, key=key)
    with pytest.raises(
        TypeError, match=r"bootstrap: brier_score has no option num_bins \(it takes none\)"
    ):
        jsoftmax.bootstrap(
            functools.partial(jsoftmax.brier_score, num_bins=3), probs, labels, key=key
        )
    with pytest.raises(
        ValueError, match=r"interval must be one of \('percentile', 'basic'\), got 'bca'"
    ):
        jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=key, interval="bca")
    with pytest.raises(ValueError, match="mode must be"):
        jsoftmax.bootstrap(
            functools.partial(jsoftmax.debiased_calibration_error, mode="x"), probs, labels, key=key
        )
    for level in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
            jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=key, level=level)
    for level in (True, "0.9", np.array([0.9])):
        with pytest.raises(TypeError, match=r"level must be a number \(it is static\)"):
            jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=key, level=level)
    for name in ("level", "num_resamples"):
        with pytest.raises(TypeError, match=f"{name} must be concrete"):
            jax.jit(
                lambda v, name=name: jsoftmax.bootstrap(
                    jsoftmax.brier_score, probs, labels, key=key, **{name: v}
                )
            )(5 if name == "num_resamples" else 0.9)
    for level in (np.float32(0.9), jnp.float32(0.9), jnp.array(0.9), jnp.bfloat16(0.9)):
        interval = jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=key, level=level)
        assert interval == jsoftmax.bootstrap(
            jsoftmax.brier_score, probs, labels, key=key, level=float(level)
        )
    raw = jax.random.key_data(key)
    for bad in (0, raw[:1], jax.random.split(key, 2), raw.astype(np.float32)):
        with pytest.raises(TypeError, match="bootstrap: key must be one jax.random key"):
            jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=bad)
    same = jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=raw, num_resamples=5)
    assert same == jsoftmax.bootstrap(
        jsoftmax.brier_score, probs, labels, key=jax.random.wrap_key_data(raw), num_resamples=5
    )
    five = jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=key, num_resamples=5)
    assert five == jsoftmax.bootstrap(
        jsoftmax.brier_score, probs, labels, key=key, num_resamples=jnp.int32(5)
    )
    with pytest.raises(ValueError, match="num_resamples must be >= 1, got 0"):
        jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=key, num_resamples=0)
    for num in (2.5, True, np.array([5]), "5"):
        with pytest.raises(TypeError, match="num_resamples must be an integer"):
            jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels, key=key, num_resamples=num)
    with pytest.raises(ValueError, match=r"labels has shape \(9,\) but probs \(10, 3\)"):
        jsoftmax.bootstrap(jsoftmax.brier_score, probs, labels[:9], key=key)


def test_resample_counts_draw_only_kept_rows_uniformly():
    where = jnp.asarray(np.arange(1000) % 4 != 0)
    counts = jax.vmap(lambda k: _metrics._counts(k, where))(
        jax.random.split(jax.random.key(0), 400)
    )
    counts = np.asarray(counts)
    assert (counts.sum(1) == 750).all() and not counts[:, ~np.asarray(where)].any()
    # Each kept row is drawn Binomial(750, 1/750) times: mean 1, variance ~1.
    kept = counts[:, np.asarray(where)]
    assert abs(kept.mean() - 1) < 1e-9 and 0.9 < kept.var() < 1.1
    assert abs(kept.mean(0).std() - np.sqrt(1 / 400)) < 0.01


def test_high_product_is_exact():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, 10000, dtype=np.uint64)
    b = rng.integers(0, 2**32, 10000, dtype=np.uint64)
    got = _metrics._high_product(jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32))
    np.testing.assert_array_equal(np.asarray(got, np.uint64), (a * b) >> np.uint64(32))


# ---------------------------------------------------------------- plot


def test_plot_smooth_diagram_draws_the_curve_inside_its_band():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    probs, labels = probabilities(400, 5, seed=13)
    top, bottom, right_top, _ = jsoftmax.plot.smooth_reliability_diagram(
        probs, labels, key=jax.random.key(0), num_points=60, num_resamples=40
    )
    diagram = jsoftmax.smooth_reliability_diagram(probs, labels, num_points=60)
    curve = top.lines[0].get_xydata()
    np.testing.assert_allclose(curve[:, 1], diagram.accuracy, rtol=1e-6)
    band = top.collections[0].get_paths()[0].vertices
    # fill_between's outline: the low ends then the high ends, per grid point.
    low = np.interp(curve[:, 0], *band[1:61].T)
    high = np.interp(curve[:, 0], *band[62:122][::-1].T)
    assert (low <= curve[:, 1] + 1e-6).all() and (curve[:, 1] <= high + 1e-6).all()
    assert (high - low).max() > 0.01
    assert right_top.get_title() == "binned" and len(right_top.patches) > 0
    np.testing.assert_allclose(
        bottom.collections[0].get_paths()[0].vertices[:, 1].max(),
        np.max(diagram.density),
        rtol=1e-6,
    )
    matplotlib.pyplot.close("all")


def test_plot_smooth_diagram_checks_every_argument_before_drawing():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot  # (the checks come first: the plot would not import it)

    probs, labels = probabilities(40, 3, seed=13)
    bad = [dict(num_bins=0), dict(num_points=1), dict(level=2.0), dict(key=0)]
    for kwargs in bad:
        with pytest.raises((ValueError, TypeError), match=r"^plot\.smooth_reliability_diagram: "):
            jsoftmax.plot.smooth_reliability_diagram(
                probs, labels, **{"key": jax.random.key(0), **kwargs}
            )
    assert not matplotlib.pyplot.get_fignums()


@pytest.mark.parametrize(
    "metric", [jsoftmax.adaptive_calibration_error, jsoftmax.debiased_calibration_error]
)
def test_equal_mass_bins_up_to_the_largest_count_on_few_rows(metric, x64):
    # Past one bin per row each row is its own bin. A histogram per bin edge took GBs
    # at 46,340 bins (float64 ran out of memory): so many edges are found by a sort.
    probs, labels = probabilities(40, 3, seed=2)
    np.testing.assert_allclose(
        metric(probs, labels, num_bins=46_340), metric(probs, labels, num_bins=40), rtol=1e-12
    )
