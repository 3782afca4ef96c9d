import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from tests import reference
from tests.conftest import TRANSFORMS, lowered_for, saved_residuals

BINNED = {
    "expected_calibration_error": reference.expected_calibration_error,
    "maximum_calibration_error": reference.maximum_calibration_error,
    "adaptive_calibration_error": reference.adaptive_calibration_error,
    "classwise_calibration_error": reference.classwise_calibration_error,
}
METRICS = [*BINNED, "brier_score"]


def calibrated(n, k, seed, scale=2.0):
    """Logits of a perfectly calibrated model and labels drawn from its softmax."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((n, k))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(1)
    return logits.astype(np.float32), np.minimum(labels, k - 1).astype(np.int32)


def probabilities(n, k, seed, scale=3.0):
    logits, labels = calibrated(n, k, seed)
    return np.asarray(jax.nn.softmax(scale * logits)), labels


def call(name, probs, labels, num_bins=15, where=None, tx=lambda f: f):
    fn = getattr(jsoftmax, name)
    if name == "brier_score":
        return tx(lambda p, y, w: fn(p, y, where=w))(probs, labels, where)
    return tx(lambda p, y, w: fn(p, y, num_bins=num_bins, where=w))(probs, labels, where)


def expected(name, probs, labels, num_bins=15, where=None):
    if name == "brier_score":
        return reference.brier_score(probs, labels, where)
    return BINNED[name](probs, labels, num_bins, where)


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("tx", TRANSFORMS)
@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize(
    ("n", "k", "num_bins"), [(500, 10, 15), (97, 3, 7), (40, 2, 1), (5, 4, 10)]
)
def test_metric_equals_float64_reference(tx, name, n, k, num_bins):
    probs, labels = probabilities(n, k, seed=n + k)
    got = call(name, probs, labels, num_bins, tx=tx)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected(name, probs, labels, num_bins), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METRICS)
def test_where_equals_dropping_the_rows(name):
    probs, labels = probabilities(300, 6, seed=1)
    where = np.random.default_rng(2).random(300) < 0.6
    got = call(name, probs, labels, 10, where)
    np.testing.assert_allclose(got, expected(name, probs[where], labels[where], 10), rtol=1e-5)
    # Padding rows may hold anything, even NaN probabilities.
    padded = np.where(where[:, None], probs, np.nan).astype(np.float32)
    np.testing.assert_allclose(call(name, padded, labels, 10, where), got, rtol=1e-6)


@pytest.mark.parametrize("name", METRICS)
def test_no_kept_row_gives_zero(name):
    probs, labels = probabilities(8, 3, seed=0)
    assert call(name, probs, labels, 5, np.zeros(8, bool)) == 0.0
    assert call(name, probs[:0], labels[:0], 5) == 0.0


def test_textbook_values():
    # Confidences 0.9 (hit), 0.8 (miss), 0.7 (hit); 5 bins: 0.8 and 0.7 share (0.6, 0.8].
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], np.float32)
    labels = np.array([0, 1, 1])
    ece = jsoftmax.expected_calibration_error(probs, labels, num_bins=5)
    np.testing.assert_allclose(ece, (2 * abs(0.5 - 0.75) + abs(1 - 0.9)) / 3, rtol=1e-6)
    np.testing.assert_allclose(jsoftmax.maximum_calibration_error(probs, labels, num_bins=5), 0.25)
    brier = jsoftmax.brier_score(probs, labels)
    np.testing.assert_allclose(brier, (2 * 0.1**2 + 2 * 0.8**2 + 2 * 0.3**2) / 3, rtol=1e-6)


def test_brier_score_of_an_infinite_entry_is_infinite():
    # sum p**2 - 2 p_y + 1 read a label's +inf as inf - inf (a review found NaN).
    probs = np.array([[np.inf, 0.5], [0.5, 0.5]], np.float32)
    for labels in ([0, 0], [1, 0]):
        assert jsoftmax.brier_score(probs, np.array(labels)) == np.inf
    probs[0, 1] = np.nan
    assert np.isnan(jsoftmax.brier_score(probs, np.array([0, 0])))


@pytest.mark.parametrize("num_bins", [1, 2, 3, 4, 5000])
@pytest.mark.parametrize("entry", [np.inf, -np.inf])
def test_sorted_errors_of_an_infinite_entry_are_nan(num_bins, entry):
    """As documented: NaN in the adaptive, smooth and debiased errors. A review found
    the adaptive error inf where no bin started at the +inf row (only the total held
    it), and the debiased error finite where -inf sat alone in its bin."""
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.7, 0.3]], np.float32)
    probs[2] = [entry, 0.0] if entry > 0 else entry  # (the top label's confidence)
    labels = np.array([0, 1, 0, 0])
    for metric in (
        jsoftmax.adaptive_calibration_error,
        jsoftmax.debiased_calibration_error,
        functools.partial(jsoftmax.debiased_calibration_error, mode="marginal"),
    ):
        assert np.isnan(metric(probs, labels, num_bins=num_bins))
    assert np.isnan(jsoftmax.smooth_calibration_error(probs, labels))


@pytest.mark.parametrize("k", [10, 17, 20, 32, 36, 50, 100, 1000, 1009, 4096])
def test_top_label_is_jnp_argmax_and_its_entry_on_every_schedule(k):
    """The top label (jsoftmax._cpu.top, by blocks on CPU) is jnp.argmax's: the first
    maximum, NaN the largest; ties, NaN, infinities and leading axes, under jit and vmap,
    for every block size tried; and its value is the entry there."""
    rng = np.random.default_rng(k)
    p = rng.integers(0, 3, (6, 8, k)).astype(np.float32)  # many ties
    p[0, 0] = 0.0
    p[0, 1, ::5] = np.nan
    p[0, 2, -1] = np.nan
    p[0, 3, k // 2] = np.inf
    p[0, 4, [1, -1]] = np.inf
    p[0, 5, k - 3 :] = 9.0  # the maximum only in the last block
    p[0, 6] = -np.inf
    p[0, 7] = -1.0
    p[0, 7, [1, -1]] = -0.0, 0.0  # equal: the first is the maximum
    p[1, 0, [2, -2]] = np.copysign(np.nan, -1), np.inf  # a NaN with its sign bit set
    p[1, 1] = -1.0
    p[1, 1, [2, -2]] = 0.0, 1e-45  # a subnormal: 0 to XLA's CPU comparisons
    index = np.asarray(jnp.argmax(p, -1))
    value = np.take_along_axis(p, index[..., None], -1)[..., 0]

    def check(top):
        assert np.array_equal(top[0], value, equal_nan=True)
        assert np.array_equal(top[1], index)

    check(jax.jit(jsoftmax._cpu.top)(p))
    check(jax.vmap(jsoftmax._cpu.top)(p))
    size = jsoftmax._cpu._block_size(k)
    assert (size is None) == (k < 18 or 32 < k < 50 or k == 1009)  # 1009 is prime
    # The blocks themselves, also where jsoftmax._cpu.top leaves K to one reduction.
    for size in [*[d for d in range(2, k) if k % d == 0][:4], k]:
        check(jax.jit(jsoftmax._cpu._blocked_top, static_argnums=1)(p, size))
    # At a size where XLA's CPU max may drop a NaN: one after a +inf still ranks first.
    p = rng.random((4096, k), dtype=np.float32)
    for step, special in ((3, np.inf), (5, np.nan), (7, np.copysign(np.nan, -1))):
        rows = np.arange(0, len(p), step)
        p[rows, rng.integers(0, k, len(rows))] = special
    index = np.argmax(p, -1)  # NumPy's ranks NaN first too
    value = np.take_along_axis(p, index[..., None], -1)[..., 0]
    check(jax.jit(jsoftmax._cpu.top)(p))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_top_label_ranks_order_floats_as_argmax_does(dtype):
    """jsoftmax._cpu._ranks: increasing with the float, -0.0, 0.0 and the subnormals
    equal, every NaN (either sign) equal and above +inf."""
    with jax.enable_x64(dtype == "float64"):
        tiny = float(jnp.finfo(dtype).tiny)
        ordered = [-np.inf, -1e4, -1.0, -tiny, -tiny / 2, -0.0, 0.0, tiny / 2, tiny, 1.0]
        values = jnp.array(ordered + [1e4, np.inf, np.nan, np.copysign(np.nan, -1)], dtype)
        ranks = np.asarray(jax.jit(jsoftmax._cpu._ranks)(values)).tolist()
    assert ranks[:5] == sorted(set(ranks[:5])) and len(set(ranks[4:8])) == 1
    assert ranks[7:12] == sorted(set(ranks[7:12]))
    assert ranks[12] == ranks[13] > ranks[11]


def test_bin_edges_are_right_closed_and_zero_is_in_the_first_bin():
    # Confidences exactly on the float32 edges m / M belong to bin m, 0 to bin 1.
    edges = reference.bin_edges(5)
    conf = np.array([0.0, *edges[1:], 0.3], np.float32)
    probs = np.stack([conf, np.zeros_like(conf)], axis=1)
    diagram = jsoftmax.reliability_diagram(probs, np.zeros(len(conf), int), num_bins=5)
    np.testing.assert_array_equal(diagram.count, [2, 2, 1, 1, 1])
    np.testing.assert_array_equal(diagram.edges, edges.astype(np.float32))
    # Just above an edge moves to the next bin.
    above = np.nextafter(np.float32(edges[2]), np.float32(1))
    diagram = jsoftmax.reliability_diagram([[above, 0.0]], [0], num_bins=5)
    np.testing.assert_array_equal(diagram.count, [0, 0, 1, 0, 0])


def test_every_bin_rule_matches_the_reference_on_dense_edges():
    # Many confidences on and next to edges, for bin counts both sides of 32 (the counted
    # edges below it; XLA's product with a reciprocal missed the correctly rounded edge m / M
    # at 25, 29, 31, 49, 100 and more).
    counts = (3, 7, 10, 15, 20, 25, 29, 31, 32, 33, 49, 100)
    values = np.concatenate([reference.bin_edges(m) for m in counts])
    values = np.concatenate([values, np.nextafter(values, 2), np.nextafter(values, -1)])
    conf = np.clip(values, 0, 1).astype(np.float32)
    probs = np.stack([conf, np.zeros_like(conf)], axis=1)
    labels = (np.arange(len(conf)) % 2).astype(np.int32)
    for num_bins in counts:
        np.testing.assert_allclose(
            jsoftmax.expected_calibration_error(probs, labels, num_bins=num_bins),
            reference.expected_calibration_error(probs, labels, num_bins),
            rtol=1e-5,
        )
        edges = jsoftmax.reliability_diagram(probs, labels, num_bins=num_bins).edges
        np.testing.assert_array_equal(edges, reference.bin_edges(num_bins).astype(np.float32))


def test_mce_keeps_a_nan_at_many_bins_and_bin_accuracy_is_exact():
    # A NaN row at thousands of bins, where XLA's CPU max may drop it.
    nan_row = np.array([[np.nan, 0.5], [0.9, 0.1]], np.float32)
    assert np.isnan(jsoftmax.maximum_calibration_error(nan_row, [0, 0], num_bins=5000))
    # A bin's accuracy is its hits over its rows: exactly 1 for hits only.
    c = np.array([0.85, 0.79, 0.87], np.float32)
    diagram = jsoftmax.reliability_diagram(np.stack([c, 1 - c], 1), np.zeros(3, int), num_bins=1)
    np.testing.assert_array_equal(diagram.accuracy, [1.0])


def test_adaptive_bins_split_tied_confidences_by_their_mean_whatever_the_row_order():
    # Two hits and two misses at one confidence, two bins: stably sorted, the
    # order [hit, miss, hit, miss] would give 0 and [miss, miss, hit, hit] 0.5.
    probs = np.full((4, 2), 0.5, np.float32)
    labels = np.array([0, 1, 0, 1], np.int32)
    for order in ([0, 1, 2, 3], [1, 3, 0, 2], [0, 2, 1, 3]):
        got = jsoftmax.adaptive_calibration_error(probs[order], labels[order], num_bins=2)
        np.testing.assert_allclose(got, 0.0, atol=1e-7)
    # Three confidences shared by hits and misses, bin edges inside the groups.
    rng = np.random.default_rng(0)
    c = rng.choice([0.5, 0.7, 0.9], 23)
    probs = np.stack([c, 1 - c], axis=1).astype(np.float32)
    labels = (rng.random(23) < 0.3).astype(np.int32)
    want = reference.adaptive_calibration_error(probs, labels, 4)
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(23)
        got = jsoftmax.adaptive_calibration_error(probs[order], labels[order], num_bins=4)
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("nan_at", [0, 1])
def test_diagrams_of_a_nan_probability_are_nan(nan_at):
    """A kept row holding NaN: every mean is NaN, as the metrics are (it landed in bin 0
    and, its NaN class taken as the top one, made that bin's accuracy 1)."""
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]], np.float32)
    probs[3, nan_at] = np.nan
    labels = np.array([0, 1, 1, 0])
    diagram = jsoftmax.reliability_diagram(probs, labels, num_bins=5)
    assert np.isnan(diagram.confidence).all() and np.isnan(diagram.accuracy).all()
    # A NaN confidence is in no bin (it was counted in bin 0, as if it were 0).
    assert diagram.count.sum() == 3 and not diagram.count[0]
    smooth = jsoftmax.smooth_reliability_diagram(probs, labels)
    for field in (smooth.accuracy, smooth.density, smooth.bandwidth, smooth.calibration_error):
        assert np.isnan(field).all()
    padding = np.array([True, True, True, False])
    assert not np.isnan(jsoftmax.reliability_diagram(probs, labels, where=padding).count).any()
    smooth = jsoftmax.smooth_reliability_diagram(probs, labels, where=padding)
    assert not np.isnan(smooth.calibration_error)
    # An infinite probability: the smooth error is NaN, and so is every field (the
    # bandwidth read 2**-9, where its bisection had stopped against NaN).
    probs[3, nan_at] = np.inf
    smooth = jsoftmax.smooth_reliability_diagram(probs, labels)
    for field in (smooth.accuracy, smooth.density, smooth.bandwidth, smooth.calibration_error):
        assert np.isnan(field).all()


def test_probabilities_without_a_class_keep_no_row():
    """[N, 0] probabilities can only be padding: each metric is 0, as with no kept row
    (JAX's "argmax of an empty sequence" came first); a kept row's label is bad, so a traced
    one gives NaN (the top-label metrics gave 1, from the zero class standing in)."""
    probs, labels, where = np.zeros((2, 0), np.float32), np.zeros(2, np.int32), np.zeros(2, bool)
    for metric in (
        jsoftmax.expected_calibration_error,
        jsoftmax.maximum_calibration_error,
        jsoftmax.adaptive_calibration_error,
        jsoftmax.classwise_calibration_error,
        jsoftmax.brier_score,
        jsoftmax.smooth_calibration_error,
        jsoftmax.debiased_calibration_error,
        functools.partial(jsoftmax.debiased_calibration_error, mode="marginal"),
        jsoftmax.negative_log_likelihood,
    ):
        assert metric(probs, labels, where=where) == 0
        assert np.isnan(jax.jit(metric)(probs, labels))
    interval = jax.jit(
        lambda y: jsoftmax.bootstrap(
            jsoftmax.expected_calibration_error, probs, y, key=jax.random.key(0)
        )
    )(labels)
    assert np.isnan(interval).all()
    assert np.isnan(jax.jit(jsoftmax.reliability_diagram)(probs, labels).accuracy).all()
    diagram = jsoftmax.reliability_diagram(probs, labels, where=where)
    assert not diagram.count.any() and np.isnan(diagram.confidence).all()
    assert jsoftmax.smooth_reliability_diagram(probs, labels, where=where).calibration_error == 0


def test_reliability_diagram_statistics_and_ece():
    probs, labels = probabilities(400, 5, seed=3)
    diagram = jax.jit(lambda p, y: jsoftmax.reliability_diagram(p, y, num_bins=10))(probs, labels)
    c, hit = reference._top1(probs, labels, None)
    bins = reference.equal_width_bins(c, 10)
    for m in range(10):
        members = bins == m
        assert diagram.count[m] == members.sum()
        if members.any():
            np.testing.assert_allclose(diagram.confidence[m], c[members].mean(), rtol=1e-5)
            np.testing.assert_allclose(diagram.accuracy[m], hit[members].mean(), atol=1e-6)
        else:
            assert np.isnan(diagram.confidence[m]) and np.isnan(diagram.accuracy[m])
    full = diagram.count > 0
    ece = np.sum(diagram.count[full] * np.abs(diagram.accuracy - diagram.confidence)[full]) / 400
    np.testing.assert_allclose(
        ece, jsoftmax.expected_calibration_error(probs, labels, num_bins=10), rtol=1e-5
    )


def test_perfectly_calibrated_predictions_score_near_zero_and_overconfident_ones_do_not():
    logits, labels = calibrated(20000, 5, seed=4)
    calibrated_ece = jsoftmax.expected_calibration_error(jax.nn.softmax(logits), labels)
    overconfident_ece = jsoftmax.expected_calibration_error(jax.nn.softmax(3 * logits), labels)
    assert calibrated_ece < 0.015 < 0.05 < overconfident_ece


@pytest.mark.parametrize("name", METRICS)
def test_vmap_equals_a_loop(name):
    probs = np.stack([probabilities(64, 4, seed=s)[0] for s in range(3)])
    labels = np.stack([probabilities(64, 4, seed=s)[1] for s in range(3)])
    where = np.random.default_rng(0).random((3, 64)) < 0.8
    got = jax.vmap(lambda p, y, w: call(name, p, y, 6, w))(probs, labels, where)
    np.testing.assert_allclose(  # to an ulp: a GPU may order a batched reduction otherwise
        got, [call(name, *a, 6, w) for *a, w in zip(probs, labels, where, strict=True)], rtol=1e-6
    )


@pytest.mark.parametrize("name", METRICS)
def test_dtypes(name, x64):
    probs, labels = probabilities(50, 4, seed=5)
    assert call(name, probs.astype(np.float16), labels).dtype == jnp.float32
    assert call(name, probs.astype(jnp.bfloat16), labels).dtype == jnp.float32
    got = call(name, probs.astype(np.float64), labels)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected(name, probs, labels), rtol=1e-12)


@pytest.mark.parametrize("name", METRICS)
def test_errors(name):
    probs, labels = probabilities(6, 3, seed=0)
    with pytest.raises(TypeError, match="probs must be floating"):
        call(name, probs.round().astype(int), labels)
    with pytest.raises(TypeError, match="labels must be integers"):
        call(name, probs, labels.astype(float))
    # Python integers past int64: NumPy's float64, or an error naming them (JAX's
    # OverflowError named nothing; the error read float32, JAX's conversion).
    with pytest.raises(TypeError, match="labels must be integers, got dtype float64"):
        call(name, probs, [2**63, *labels[1:]])
    with pytest.raises(ValueError, match=f"^{name}: labels holds an integer past int64"):
        call(name, probs, [2**70, *labels[1:]])
    with pytest.raises(ValueError, match=r"probs must have shape \[N, K\], got \(6,\)"):
        call(name, probs[:, 0], labels)
    with pytest.raises(
        ValueError, match=r"labels has shape \(5,\) but probs \(6, 3\) needs \(6,\)"
    ):
        call(name, probs, labels[:5])
    with pytest.raises(ValueError, match=r"label 3 at position \(2,\) is out of range for 3"):
        call(name, probs, np.array([0, 1, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"where has shape \(5,\)"):
        call(name, probs, labels, where=np.ones(5, bool))
    if name != "brier_score":
        # Past 46340 the equal-mass bins' int32 arithmetic overflowed (silently).
        for num_bins in (0, -1, 46341, 2**70):
            with pytest.raises(ValueError, match=r"num_bins must be in \[1, 46340\], got"):
                call(name, probs, labels, num_bins)
        for num_bins in (2.5, True, "15", np.array([15])):
            with pytest.raises(TypeError, match=r"num_bins must be an integer \(it is static\)"):
                call(name, probs, labels, num_bins)


def test_metrics_do_not_retrace():
    probs, labels = probabilities(30, 3, seed=0)
    jsoftmax.expected_calibration_error(probs, labels)
    before = jsoftmax._calibration._evaluate._cache_size()
    jsoftmax.expected_calibration_error(probs + 1e-3, labels)
    assert jsoftmax._calibration._evaluate._cache_size() == before


# ---------------------------------------------------------------- temperature


@pytest.mark.parametrize("tx", TRANSFORMS)
@pytest.mark.parametrize("factor", [3.0, 0.6, 1.0, 12.0])
def test_fit_temperature_recovers_the_miscalibration(tx, factor):
    logits, labels = calibrated(4000, 10, seed=7)
    t = tx(jsoftmax.fit_temperature)(factor * logits, labels)
    assert t.dtype == jnp.float32
    assert abs(t / factor - 1) < 0.1
    optimum = reference.fit_temperature(factor * logits, labels)
    np.testing.assert_allclose(t, optimum, rtol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_fit_temperature_is_the_optimum_on_awkward_data(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(1, 300), rng.integers(2, 30)
    logits = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-2, 2)).astype(np.float32)
    labels = rng.integers(0, k, n)
    t = jsoftmax.fit_temperature(logits, labels, bounds=(1e-3, 1e3))
    np.testing.assert_allclose(t, reference.fit_temperature(logits, labels, (1e-3, 1e3)), rtol=1e-4)


@pytest.mark.parametrize("n", [100, 4000])
def test_fit_temperature_is_the_float64_optimum_to_float32_precision(n):
    """The search stops at Newton's last step: one below the resolution of 1 / T rounds
    to the bracket's edge, which once read as leaving the bracket (up to 26 evaluations
    then, over 2 float32 epsilons off the float64 optimum on 12 of these 24 problems, up to
    7.9; now 0.62 at most)."""
    for seed in range(6):
        logits, labels = calibrated(n, 10, seed, scale=1.0)
        for factor in (0.6, 3.0):
            t = jsoftmax.fit_temperature(factor * logits, labels)
            optimum = reference.fit_temperature(factor * logits, labels)
            assert abs(t - optimum) <= 2 * np.finfo(np.float32).eps * optimum, (seed, factor)


def test_fit_temperature_in_float64(x64):
    logits, labels = calibrated(1000, 5, seed=8)
    t = jsoftmax.fit_temperature(2.5 * logits.astype(np.float64), labels)
    assert t.dtype == jnp.float64
    np.testing.assert_allclose(t, reference.fit_temperature(2.5 * logits, labels), rtol=1e-7)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU buffers")
@pytest.mark.parametrize("shape", [(2000, 1000), (4000, 300)])
def test_fit_temperature_writes_out_one_logits_sized_array_on_cpu(shape):
    """On CPU each [N, K] array written out costs more than a pass that reads one (~100
    ms per 200 MB): the fit keeps one, the scaled gaps (five before, 1 GB at [50,000,
    1,000]: a mapped copy of the logits, their gaps, a select for the scale, the
    exponentials of each evaluation and the gaps zeroed past the bounds)."""
    from jsoftmax import _calibration

    logits, labels, where = (
        jnp.zeros(shape),
        jnp.zeros(shape[0], jnp.int32),
        jnp.ones(shape[0], bool),
    )
    compiled = _calibration._fit.lower(logits, labels, where, 0.01, 100.0).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 1.1 * logits.nbytes


def test_fit_temperature_returns_the_bound_beyond_it():
    logits, labels = calibrated(1000, 5, seed=9)
    assert jsoftmax.fit_temperature(3 * logits, labels, bounds=(0.1, 2.0)) == 2.0
    assert jsoftmax.fit_temperature(0.2 * logits, labels, bounds=(0.5, 10.0)) == 0.5
    # A perfect, separable classifier wants T -> 0; a useless one T -> inf.
    assert jsoftmax.fit_temperature(np.eye(4, dtype=np.float32), np.arange(4)) == 0.01
    assert jsoftmax.fit_temperature(np.eye(4, dtype=np.float32), [1, 2, 3, 0]) == 100.0
    # Gaps of 1e38 against small bounds: 1 / T times the scale overflowed, and the
    # lower bound came back for an NLL of 2e38 / T (found by a review).
    wide = np.array([[1e38, -1e38]], np.float32)
    assert jsoftmax.fit_temperature(wide, [1], bounds=(0.01, 0.1)) == np.float32(0.1)
    assert jsoftmax.fit_temperature(wide / 20, [1], bounds=(0.001, 0.01)) == np.float32(0.01)
    # ... and flushed to 0 against huge bounds: exp(0 * -inf) made a flat NLL informative.
    flat = np.array([[0.0, 0.0, -np.inf], [1.0, 1.0, 1.0]], np.float32)
    for bounds in ((0.5, 3e38), (1.2e-38, 3.4e38)):
        assert jsoftmax.fit_temperature(flat, [0, 2], bounds=bounds) == 1.0


def test_fit_temperature_scales_with_the_logits_and_never_overflows():
    logits, labels = calibrated(500, 4, seed=10)
    base = jsoftmax.fit_temperature(2 * logits, labels)
    for scale in (1e-30, 1e30, 1e36):
        bounds = (1e-3 * scale, min(1e3 * scale, 3e38))  # (float32's largest is 3.4e38)
        t = jsoftmax.fit_temperature(scale * 2 * logits, labels, bounds=bounds)
        assert np.isfinite(t)
        np.testing.assert_allclose(t / scale, base, rtol=1e-5)
    extreme = np.array([[3e38, -3e38], [-3e38, 3e38]], np.float32)
    # Right with margin 6e38: the NLL is exp(-6e38 / T) ~ 0 at every T in the bounds.
    assert 0.01 <= jsoftmax.fit_temperature(extreme, [0, 1]) <= 100.0
    assert jsoftmax.fit_temperature(extreme, [0, 0]) == 100.0


def test_fit_temperature_bounds_follow_the_compute_dtype(x64):
    """float64 logits take float64 bounds (past float32's 3.4e38)."""
    logits, labels = calibrated(300, 4, seed=3)
    logits = logits.astype(np.float64)
    base = jsoftmax.fit_temperature(logits, labels)
    t = jsoftmax.fit_temperature(1e36 * logits, labels, bounds=(1e33, 1e39))
    np.testing.assert_allclose(t / 1e36, base, rtol=1e-6)


def test_adaptive_ece_ties_minus_and_plus_zero():
    """-0.0 and +0.0 are one confidence: rows split by an edge count their mean."""
    probs = np.array([[-0.0, -0.0], [0.0, 0.0], [0.0, 0.0], [0.9, 0.1]], np.float32)
    labels = np.array([0, 1, 1, 1])
    want = jsoftmax.adaptive_calibration_error(np.abs(probs), labels, num_bins=2)
    np.testing.assert_allclose(want, 0.308333, rtol=1e-5)
    assert jsoftmax.adaptive_calibration_error(probs, labels, num_bins=2) == want


def test_fit_temperature_where_and_impossible_classes():
    logits, labels = calibrated(600, 5, seed=11)
    where = np.random.default_rng(0).random(600) < 0.5
    garbage = np.where(where[:, None], 2 * logits, np.nan)
    garbage[~where, 0] = 1e30  # nor do huge logits there
    np.testing.assert_allclose(
        jsoftmax.fit_temperature(garbage, labels, where=where),
        jsoftmax.fit_temperature(2 * logits[where], labels[where]),
        rtol=1e-5,
    )
    # A -inf class has probability 0 at every temperature: like a missing column.
    padded = np.concatenate([2 * logits, np.full((600, 2), -np.inf, np.float32)], axis=1)
    np.testing.assert_allclose(
        jsoftmax.fit_temperature(padded, labels),
        jsoftmax.fit_temperature(2 * logits, labels),
        rtol=1e-5,
    )
    # A class masked with finfo.min, or a row of equal 3e38 logits (no slope at any T), is
    # the same problem: the scale came from the logits, 2**127, and flushed the others to 0.
    masked = padded.copy()
    masked[:, -2:] = np.finfo(np.float32).min
    flat = np.concatenate([2 * logits, np.full((1, 5), 3e38, np.float32)])
    for problem, y in ((masked, labels), (flat, np.append(labels, 0))):
        np.testing.assert_allclose(
            jsoftmax.fit_temperature(problem, y),
            jsoftmax.fit_temperature(2 * logits, labels),
            rtol=1e-5,
        )
    assert jsoftmax.fit_temperature(logits, labels, where=np.zeros(600, bool)) == 1.0
    assert jsoftmax.fit_temperature(logits, labels, where=np.zeros(600, bool), bounds=(2, 3)) == 2


def test_fit_temperature_of_a_flat_nll_is_one():
    # One class, or equal logits in every row: every T has the same NLL (it gave the bound).
    labels = np.zeros(3, np.int32)
    for logits in (np.ones((3, 1), np.float32), np.zeros((3, 4), np.float32)):
        assert jsoftmax.fit_temperature(logits, labels) == 1.0
        assert jsoftmax.fit_temperature(logits, labels, bounds=(2.0, 5.0)) == 2.0
    with pytest.raises(ValueError, match="fit_temperature: bounds must be numbers"):
        jsoftmax.fit_temperature(np.ones((3, 2), np.float32), labels, bounds=("a", "b"))


def test_fit_temperature_vmaps_over_stacked_problems():
    problems = [calibrated(300, 6, seed=s) for s in range(4)]
    factors = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    logits = np.stack([f * z for f, (z, _) in zip(factors, problems, strict=True)])
    labels = np.stack([y for _, y in problems])
    got = jax.jit(jax.vmap(jsoftmax.fit_temperature))(logits, labels)
    np.testing.assert_allclose(
        got,
        [jsoftmax.fit_temperature(z, y) for z, y in zip(logits, labels, strict=True)],
        rtol=1e-5,
    )


def test_fit_temperature_lowers_the_nll():
    logits, labels = calibrated(2000, 10, seed=12)
    t = jsoftmax.fit_temperature(3 * logits, labels)
    loss = jsoftmax.softmax_cross_entropy_with_integer_labels
    before = loss(3 * logits, labels, reduction="mean")
    after = loss(jsoftmax.temperature_scale(3 * logits, t), labels, reduction="mean")
    assert after < before - 0.1


def test_fit_temperature_errors():
    logits, labels = calibrated(10, 3, seed=0)
    # Outside float32's normal numbers a temperature is 0 or inf there (1e39 gave T = inf).
    for bounds in [(0, 1), (2, 1), (1, np.inf), (-1, 1), (np.nan, 1), (0.01, 1e39), (1e-40, 1)]:
        with pytest.raises(ValueError, match=r"bounds must satisfy 1.1754944e-38 <= low < high"):
            jsoftmax.fit_temperature(logits, labels, bounds=bounds)
    # float32's own limits as usually written (they read as past themselves), and no bool
    assert jsoftmax.fit_temperature(logits, labels, bounds=(1.17549435e-38, 3.4028235e38)) > 0
    with pytest.raises(ValueError, match="bounds must be numbers"):
        jsoftmax.fit_temperature(logits, labels, bounds=(True, 2.0))
    with pytest.raises(ValueError, match="bounds must be a pair"):
        jsoftmax.fit_temperature(logits, labels, bounds=1.0)
    with pytest.raises(TypeError, match="logits must be floating"):
        jsoftmax.fit_temperature(labels[:, None], labels)
    with pytest.raises(ValueError, match=r"labels has shape \(9,\) but logits \(10, 3\)"):
        jsoftmax.fit_temperature(logits, labels[:9])
    with pytest.raises(ValueError, match=r"label -1 at position \(0,\)"):
        jsoftmax.fit_temperature(logits, np.full(10, -1))
    assert np.isnan(jax.jit(jsoftmax.fit_temperature)(logits, np.full(10, 3)))
    poisoned = np.where(np.arange(10)[:, None] == 4, np.nan, logits)
    assert np.isnan(jsoftmax.fit_temperature(poisoned, labels))
    where = np.arange(10) != 4
    assert jsoftmax.fit_temperature(poisoned, labels, where=where) == jsoftmax.fit_temperature(
        logits, labels, where=where
    )


@pytest.mark.parametrize("tx", TRANSFORMS)
def test_temperature_scale(tx):
    logits = np.array([[3.0, -np.inf, 1.5], [2.0, 4.0, -1.0]], np.float32)
    np.testing.assert_array_equal(tx(jsoftmax.temperature_scale)(logits, 1.5), logits / 1.5)
    per_row = np.array([[2.0], [0.5]], np.float32)
    np.testing.assert_array_equal(tx(jsoftmax.temperature_scale)(logits, per_row), logits / per_row)
    assert jsoftmax.temperature_scale(logits.astype(jnp.bfloat16), 2.0).dtype == jnp.bfloat16
    # d/dT of sum(softmax(x / T) * x) is finite although one logit is -inf.
    grad = jax.grad(
        lambda t: jnp.sum(
            jnp.where(jnp.isfinite(logits), logits, 0)
            * jsoftmax.softmax(jsoftmax.temperature_scale(logits, t))
        )
    )(1.5)
    assert np.isfinite(grad)
    np.testing.assert_array_equal(
        jax.grad(lambda t: jsoftmax.temperature_scale(logits, t)[0, 1])(1.5), 0.0
    )
    # An infinite or NaN logit stays as it is whatever the logit near it: gradient 0 (it
    # was 1, neither 0 nor 1 / T).
    row = np.array([[3.0, -np.inf, np.inf, np.nan]], np.float32)
    _, pullback = jax.vjp(jsoftmax.temperature_scale, row, np.float32(0.5))
    d_logits, d_temperature = pullback(np.ones_like(row))
    np.testing.assert_array_equal(d_logits, [[2.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(d_temperature, -12.0)
    # x / T past the float range is constant in T, as softmax(..., temperature=) takes it
    # (the derivative was -inf, and -1e37 through the softmax where its value is 1).
    big = np.array([3e38, 2.9e38, 0.0], np.float32)
    np.testing.assert_array_equal(
        jax.grad(lambda t: jsoftmax.temperature_scale(big, t)[0])(0.5), 0.0
    )
    scaled = jax.grad(lambda t: jsoftmax.softmax(jsoftmax.temperature_scale(big, t))[0])(0.5)
    np.testing.assert_array_equal(scaled, 0.0)
    np.testing.assert_array_equal(
        scaled, jax.grad(lambda t: jsoftmax.softmax(big, temperature=t)[0])(0.5)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("per_row", [False, True])
def test_temperature_scale_backward_keeps_the_logits_as_given(dtype, per_row):
    """Reverse mode keeps the logits themselves and the temperature, nothing computed:
    it kept three float32 copies and a mask, 13 bytes an entry for bfloat16 logits."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 384)), dtype)
    t = jnp.full((16, 1) if per_row else (), 1.5)
    weights = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)  # (kept: a constant)

    def loss(x, t):
        return jnp.sum(jsoftmax.temperature_scale(x, t).astype(jnp.float32) * weights)

    residuals = saved_residuals(loss, x, t)
    large = [r for r in residuals if np.prod(r[1]) >= x.size]
    ours = [r for r in large if "from a constant" not in r[2]]
    assert [r[:2] for r in ours] == [({jnp.bfloat16: "bf16", jnp.float32: "f32"}[dtype], x.shape)]
    assert all(np.prod(r[1]) <= 16 for r in residuals if r not in large), residuals
    # the backward's recomputation is not fenced off (no optimization barrier on a GPU)
    assert "optimization_barrier" not in lowered_for(jax.grad(loss, (0, 1)), "cuda", x, t)


def test_temperature_scale_errors():
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        jsoftmax.temperature_scale(np.ones((2, 3), np.float32), 0.0)
    with pytest.raises(ValueError, match="temperature has shape"):
        jsoftmax.temperature_scale(np.ones((2, 3), np.float32), np.ones(3))
    with pytest.raises(TypeError, match="logits must be floating"):
        jsoftmax.temperature_scale(np.ones((2, 3), int), 2.0)
    # Also rows of infinities (a padding row of -inf passed through and read as fine).
    rows = np.array([[1.0, 2.0], [-np.inf, -np.inf], [np.inf, 1.0]], np.float32)
    for t in (-1.0, 0.0, np.inf, np.nan):
        assert np.isnan(jax.jit(jsoftmax.temperature_scale)(rows, t)).all()
        # ... and its gradient (it was 0: a stalled optimiser of T), also through calibrate
        assert np.isnan(jax.grad(lambda t: jsoftmax.temperature_scale(rows, t)[0, 0])(t))
        assert np.isnan(jax.grad(lambda t: jsoftmax.calibrate(t, rows[:1])[0, 0])(t))
    # A NumPy integer array past int32 is a number (it wrapped to T = 2).
    np.testing.assert_array_equal(
        jsoftmax.temperature_scale(rows, np.array(2**32 + 2)), rows / np.float32(2**32 + 2)
    )


# ---------------------------------------------------------------- plot


def test_plot_draws_accuracy_gaps_and_counts():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    probs, labels = probabilities(300, 5, seed=13)
    top, bottom = jsoftmax.plot.reliability_diagram(probs, labels, num_bins=10, title="model")
    diagram = jsoftmax.reliability_diagram(probs, labels, num_bins=10)
    full = np.asarray(diagram.count) > 0
    heights = [patch.get_height() for patch in top.patches]
    np.testing.assert_allclose(heights[: full.sum()], np.asarray(diagram.accuracy)[full], rtol=1e-6)
    np.testing.assert_allclose(
        heights[full.sum() :], np.asarray(diagram.confidence - diagram.accuracy)[full], rtol=1e-6
    )
    assert [p.get_height() for p in bottom.patches] == list(np.asarray(diagram.count))
    assert top.get_title() == "model"
    # Axes of one's own: plt.subplots' array will do; anything else is named.
    for bad in (dict(num_bins=0), dict(where=np.ones(3, bool)), dict(labels=labels + 10)):
        # (the errors named reliability_diagram, the statistics, not the plot)
        with pytest.raises(ValueError, match=r"^plot\.reliability_diagram: "):
            jsoftmax.plot.reliability_diagram(probs, **{"labels": labels, **bad})
    _, given = matplotlib.pyplot.subplots(2, 1)
    assert jsoftmax.plot.reliability_diagram(probs, labels, axes=given) == tuple(given)
    for bad in ((1, 2), given[0], given[:1]):
        with pytest.raises(TypeError, match="reliability_diagram: axes must be 2 matplotlib"):
            jsoftmax.plot.reliability_diagram(probs, labels, axes=bad)
    with pytest.raises(TypeError, match="smooth_reliability_diagram: axes must be 4"):
        jsoftmax.plot.smooth_reliability_diagram(probs, labels, key=jax.random.key(0), axes=given)
    # A 2 x 2 grid by columns, as the default figure: smooth on the left, binned on the right.
    _, grid = matplotlib.pyplot.subplots(2, 2)
    drawn = jsoftmax.plot.smooth_reliability_diagram(
        probs, labels, key=jax.random.key(0), num_resamples=8, axes=grid
    )
    assert drawn == (grid[0, 0], grid[1, 0], grid[0, 1], grid[1, 1])
    # The band's level as given (0.975 read "98% band").
    drawn = jsoftmax.plot.smooth_reliability_diagram(
        probs, labels, key=jax.random.key(0), num_resamples=8, level=0.975
    )
    assert "97.5% band" in [t.get_text() for t in drawn[0].get_legend().get_texts()]
    matplotlib.pyplot.close("all")


def test_plot_checks_its_arguments_first_and_names_the_extra(monkeypatch):
    """Without matplotlib the error says how to get it; bad arguments are named before
    matplotlib is imported or the bootstrap runs."""
    pytest.importorskip("matplotlib")
    probs, labels = probabilities(40, 3, seed=2)
    key = jax.random.key(0)
    monkeypatch.setattr(jsoftmax._metrics, "_smooth_band", None)  # (not called)
    with pytest.raises(TypeError, match="axes must be 4"):
        jsoftmax.plot.smooth_reliability_diagram(probs, labels, key=key, axes=(1, 2))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    for draw in (
        lambda: jsoftmax.plot.reliability_diagram(probs, labels),
        lambda: jsoftmax.plot.smooth_reliability_diagram(probs, labels, key=key, axes=(1, 2)),
    ):
        with pytest.raises(ImportError, match=r"jsoftmax\[notebook\]"):
            draw()
    with pytest.raises(ValueError, match="num_bins"):
        jsoftmax.plot.reliability_diagram(probs, labels, num_bins=0)


def test_importing_jsoftmax_does_not_import_matplotlib():
    code = "import sys, jsoftmax; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_many_bins_keep_their_partial_sums_within_the_input():
    """At 1,000,000 rows and 46,340 bins (the most: past it the equal-mass starts overflow
    int32, which the errors test rejects) the per-bin partial sums took 556 MB of temp."""
    shapes = (
        jax.ShapeDtypeStruct((1_000_000, 10), jnp.float32),
        jax.ShapeDtypeStruct((1_000_000,), jnp.int32),
    )
    ece = functools.partial(jsoftmax.expected_calibration_error, num_bins=46340)
    compiled = jax.jit(ece).lower(*shapes).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2**20
