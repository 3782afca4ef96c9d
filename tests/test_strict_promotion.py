"""Every public function runs under ``jax.numpy_dtype_promotion("strict")``, as jax.nn does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax

LABELS = np.array([1, 2, 0, 1], np.int32)
KEY = jax.random.key(0)


def _probs(x):
    return jsoftmax.softmax(x).astype(x.dtype)


def _fitted(fit):
    return lambda x: jsoftmax.calibrate(fit(x, LABELS), x)


CASES = {
    "softmax": lambda x: jsoftmax.softmax(x, temperature=0.7, where=x > -1),
    "log_softmax": lambda x: jsoftmax.log_softmax(x, temperature=jnp.asarray(2.0, x.dtype)),
    "logsumexp": lambda x: jsoftmax.logsumexp(x, -1),
    "cross_entropy": lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(
        x, LABELS, label_smoothing=0.1, z_loss=1e-3, class_weights=jnp.ones(3), reduction="mean"
    ),
    "dense": lambda x: jsoftmax.softmax_cross_entropy(x, jax.nn.one_hot(LABELS, 3, dtype=x.dtype)),
    "focal": lambda x: jsoftmax.softmax_focal_loss(x, LABELS, gamma="flsd-53", reduction="sum"),
    "linear": lambda x: jsoftmax.linear_softmax_cross_entropy(x, x.T[:, :2], LABELS % 2),
    "linear_log_probs": lambda x: jsoftmax.linear_log_probs(
        x, x.T[:, :2], LABELS % 2, return_entropy=True, temperature=0.5
    ),
    "distillation": lambda x: jsoftmax.linear_distillation_loss(x, x.T, x, x.T, divergence="jsd"),
    "linear_accumulated": lambda x: jsoftmax.linear_softmax_cross_entropy(
        x, x.T[:, :2], LABELS % 2, accum_dtype=x.dtype, reduction="mean"
    ),
    "mixed_precision": lambda x: jsoftmax.linear_softmax_cross_entropy(
        x,
        x.T[:, :2].astype(jnp.float32),
        LABELS % 2,
        bias=jnp.zeros(2, jnp.float32),
        label_smoothing=0.1,
    ),
    "low_precision_options": lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(
        x, LABELS, label_smoothing=jnp.asarray(0.2, x.dtype), z_loss=jnp.asarray(1e-3, x.dtype)
    ),
    "float64_options": lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(
        x, LABELS, label_smoothing=np.float64(0.2), z_loss=np.float64(1e-3), reduction="mean"
    ),
    "float64_linear_options": lambda x: jsoftmax.linear_softmax_cross_entropy(
        x, x.T[:, :2], LABELS % 2, label_smoothing=np.float64(0.2), z_loss=np.float64(1e-3)
    ),
    "float64_focal_options": lambda x: jsoftmax.softmax_focal_loss(
        x, LABELS, label_smoothing=np.float64(0.2), reduction="mean"
    ),
    "low_precision_penalty": lambda x: jsoftmax.calibrate(
        jsoftmax.fit_matrix_scaling(x, LABELS, l2=jnp.asarray(1e-3, x.dtype)), x
    ),
    "smooth_labels": lambda x: jsoftmax.smooth_labels(_probs(x), 0.1),
    "temperature_scale": lambda x: jsoftmax.temperature_scale(x, 2.0),
    "fit_temperature": lambda x: jsoftmax.fit_temperature(x, LABELS),
    "vector": _fitted(jsoftmax.fit_vector_scaling),
    "matrix": _fitted(jsoftmax.fit_matrix_scaling),
    "dirichlet": _fitted(jsoftmax.fit_dirichlet_calibration),
    "ensemble": _fitted(jsoftmax.fit_ensemble_temperature),
    "histogram": _fitted(jsoftmax.fit_histogram_binning),
    "isotonic": _fitted(jsoftmax.fit_isotonic),
    "ece": lambda x: jsoftmax.expected_calibration_error(_probs(x), LABELS),
    "mce": lambda x: jsoftmax.maximum_calibration_error(_probs(x), LABELS),
    "adaptive": lambda x: jsoftmax.adaptive_calibration_error(_probs(x), LABELS),
    "classwise": lambda x: jsoftmax.classwise_calibration_error(_probs(x), LABELS),
    "brier": lambda x: jsoftmax.brier_score(_probs(x), LABELS),
    "nll": lambda x: jsoftmax.negative_log_likelihood(_probs(x), LABELS),
    "smooth_ece": lambda x: jsoftmax.smooth_calibration_error(_probs(x), LABELS),
    "debiased": lambda x: jsoftmax.debiased_calibration_error(_probs(x), LABELS, mode="marginal"),
    "diagram": lambda x: jsoftmax.reliability_diagram(_probs(x), LABELS),
    "smooth_diagram": lambda x: jsoftmax.smooth_reliability_diagram(_probs(x), LABELS),
    "bootstrap": lambda x: jsoftmax.bootstrap(
        jsoftmax.expected_calibration_error, _probs(x), LABELS, key=KEY, num_resamples=8
    ),
}
DIFFERENTIABLE = {
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "dense",
    "focal",
    "linear",
    "linear_log_probs",
    "distillation",
    "linear_accumulated",
    "temperature_scale",
    "mixed_precision",
    "low_precision_options",
    "float64_options",
}


X = [[1.0, 2.0, -2.0], [0.5, 0.1, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 1.0]]


@pytest.mark.parametrize("name", list(CASES))
def test_runs_under_strict_dtype_promotion(name):
    # bfloat16: cast to the float32 compute dtype, then the same code as float32.
    x = jnp.array(X, jnp.bfloat16)
    f = CASES[name]
    with jax.numpy_dtype_promotion("strict"):
        out = f(x)
        if name in DIFFERENTIABLE:
            jax.grad(lambda x: sum(jnp.sum(v.astype(jnp.float32)) for v in jax.tree.leaves(f(x))))(
                x
            )
    # The same numbers as under the default promotion.
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(f(x)), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("labels", [np.int32, np.int64])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_stays_float32_under_x64_and_strict_promotion(name, labels, x64, monkeypatch):
    """With 64-bit types on, float32 inputs give float32 outputs (a "mean" loss and a float64
    NumPy label smoothing were float64; int64 labels and jnp.arange's int64 indices raised
    under strict promotion)."""
    monkeypatch.setitem(globals(), "LABELS", LABELS.astype(labels))
    x = jnp.array(X, jnp.float32)
    with jax.numpy_dtype_promotion("strict"):
        out = CASES[name](x)
    for got in jax.tree.leaves(out):
        assert got.dtype != jnp.float64
