"""Specification of the cross-entropy losses and smooth_labels."""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax
from jsoftmax import _cpu, _softmax
from tests import reference
from tests.conftest import (
    TRANSFORMS,
    check_grads_order_two,
    core_schedules,
    lowered_for,
    saved_residuals,
)

inf, nan = np.inf, np.nan
ce_int = jsoftmax.softmax_cross_entropy_with_integer_labels
ce_dense = jsoftmax.softmax_cross_entropy
N, K = 6, 5


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def data(seed=0, n=N, k=K):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, k)) * 2).astype(np.float32)
    labels = rng.integers(0, k, n).astype(np.int32)
    return logits, labels


def mask(seed=1, n=N, k=K):
    where = np.random.default_rng(seed).random((n, k)) < 0.75
    where[np.arange(n), data()[1][:n]] = True  # labels stay kept; row 2 fully masked
    where[2] = False
    return where


WEIGHTS = np.array([0.5, 1.0, 2.0, 1.5, 0.25], np.float32)
OPTIONS = [
    dict(
        zip(("alpha", "weights", "ignore_index", "z_loss", "softcap", "where"), combo, strict=True)
    )
    for combo in itertools.product(
        [0.0, 0.1, 1.0], [None, WEIGHTS], [None, 3], [0.0, 1e-3], [None, 2.0], [False, True]
    )
]


def option_id(o):
    return "-".join(f"{k}={'w' if k == 'weights' and v is not None else v}" for k, v in o.items())


def int_kwargs(o):
    return dict(
        where=mask() if o["where"] else None,
        label_smoothing=o["alpha"],
        class_weights=o["weights"],
        ignore_index=o["ignore_index"],
        z_loss=o["z_loss"],
        logit_softcap=o["softcap"],
    )


def ref_kwargs(o):
    """The options under the reference's own names, which OPTIONS uses."""
    return {**o, "where": mask() if o["where"] else None}


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
def test_integer_matches_pytorch_rules_in_float64(opts):
    logits, labels = data()
    for reduction in ("none", "sum", "mean"):
        ours = ce_int(logits, labels, **int_kwargs(opts), reduction=reduction)
        ref = reference.integer_cross_entropy(
            logits, labels, **ref_kwargs(opts), reduction=reduction
        )
        close(ours, ref)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_dense_matches_float64_reference(alpha, z_loss, masked, weighted):
    logits, _ = data()
    labels = np.random.default_rng(3).dirichlet(np.ones(K), N).astype(np.float32)
    where = mask() if masked else None
    if masked:
        labels = np.where(where, labels, 0.0)
    weights = np.random.default_rng(4).uniform(0.0, 3.0, K) if weighted else None
    for reduction in ("none", "sum", "mean"):
        kwargs = dict(label_smoothing=alpha, z_loss=z_loss, reduction=reduction)
        ours = ce_dense(logits, labels, where=where, class_weights=weights, **kwargs)
        ref = reference.dense_cross_entropy(
            logits, labels, where, alpha, z_loss, reduction, weights
        )
        close(ours, ref)


def test_dense_class_weights_as_pytorchs_weight_with_probability_targets():
    """One-hot rows weigh as the integer loss's ('none'); 'mean' divides by the rows, as
    PyTorch's probability targets do, not by the labels' weights; a class weighing 0
    prices its mass at 0 also on a masked class; the weights get no gradient."""
    logits, labels = data()
    weights = np.random.default_rng(4).uniform(0.5, 3.0, K).astype(np.float32)
    one_hot = jax.nn.one_hot(labels, K)
    for alpha in (0.0, 0.3):
        kwargs = dict(label_smoothing=alpha, class_weights=weights)
        close(ce_dense(logits, one_hot, **kwargs), ce_int(logits, labels, **kwargs))
        close(
            ce_dense(logits, one_hot, **kwargs, reduction="mean"),
            ce_int(logits, labels, **kwargs, reduction="sum") / N,
        )
    where = np.ones((N, K), bool)
    where[:, 0] = False
    zero = weights.copy()
    zero[0] = 0.0
    on_masked = jax.nn.one_hot(jnp.zeros(N, int), K)
    assert np.isinf(ce_dense(logits, on_masked, where=where, class_weights=weights)).all()
    np.testing.assert_array_equal(ce_dense(logits, on_masked, where=where, class_weights=zero), 0)
    grad = jax.grad(lambda w: ce_dense(logits, one_hot, class_weights=w, reduction="sum"))
    np.testing.assert_array_equal(grad(jnp.asarray(weights)), 0)


@pytest.mark.parametrize("k", [1000, 32000, 50257, 128256])
def test_row_sums_stay_accurate_at_vocabulary_sizes(k):
    """A uniform target at K classes (every term alike, the worst case for a sum taken
    one term at a time) and random rows, against float64, eager and jitted: XLA's CPU
    backend added the row sums of the losses up one at a time (1e-3 off at K=128256)."""
    rng = np.random.default_rng(k)
    x = (3 * rng.standard_normal((3, k))).astype(np.float32)
    x[0] = 0.0
    q = rng.uniform(size=(3, k))
    q[0] = 1.0
    q = (q / q.sum(-1, keepdims=True)).astype(np.float32)
    labels = rng.integers(0, k, 3)
    weights = rng.uniform(0.5, 2.0, k).astype(np.float32)
    integer = functools.partial(
        jsoftmax.softmax_cross_entropy_with_integer_labels, class_weights=weights
    )
    focal = functools.partial(jsoftmax.softmax_focal_loss, label_smoothing=0.5)
    cases = [
        (jsoftmax.softmax_cross_entropy, q, reference.dense_cross_entropy(x, q)),
        (
            functools.partial(integer, label_smoothing=1.0),
            labels,
            reference.integer_cross_entropy(x, labels, alpha=1.0, weights=weights),
        ),
        (focal, labels, reference.softmax_focal_loss(x, labels, alpha=0.5)),
    ]
    for loss, target, expected in cases:
        for run in (loss, jax.jit(loss)):
            np.testing.assert_allclose(run(x, target), expected, rtol=2e-6)


def test_textbook_value():
    # -log softmax([2, 1, 0])[0] = log(1 + e^-1 + e^-2)
    close(
        ce_int(jnp.array([[2.0, 1.0, 0.0]]), jnp.array([0])), [np.log(1 + np.exp(-1) + np.exp(-2))]
    )


# ---------------------------------------------------------------- optax and consistency


@pytest.mark.parametrize("axis", [-1, 0, 1, (1, 2), (2, 1)])
def test_equals_optax_where_optax_is_right(axis):
    # A tuple's class index runs over its axes in the order given, as optax flattens them.
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, 4, 5)).astype(np.float32)
    dense = rng.dirichlet(np.ones(4 * 5 if isinstance(axis, tuple) else logits.shape[axis]), 60)
    axes = (axis,) if isinstance(axis, int) else axis
    batch_shape = tuple(s for i, s in enumerate(logits.shape) if i not in np.array(axes) % 3)
    k = int(np.prod([logits.shape[a] for a in axes]))
    labels = rng.integers(0, k, batch_shape)
    close(
        ce_int(logits, labels, axis),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis),
    )
    if isinstance(axis, int):
        q = np.moveaxis(dense[: int(np.prod(batch_shape))].reshape(*batch_shape, k), -1, axis)
        close(ce_dense(logits, q, axis), optax.softmax_cross_entropy(logits, q, axis))
        close(jsoftmax.smooth_labels(q, 0.3, axis), optax.smooth_labels(q, 0.3, axis=axis))


@pytest.mark.parametrize("axis", [-1, 0, (0, 2)])
@pytest.mark.parametrize("square", [False, True])
def test_row_mask_of_the_loss_shape_masks_rows_as_in_optax(axis, square):
    # optax documents where of shape [batch] (it inserts the class axes); a batch as wide as
    # the classes must not be read as a class mask.
    rng = np.random.default_rng(6)
    shape = (5, 5, 3) if square else (4, 5, 3)
    logits = rng.standard_normal(shape).astype(np.float32)
    axes = (axis,) if isinstance(axis, int) else axis
    batch = tuple(s for i, s in enumerate(shape) if i not in np.array(axes) % 3)
    k = int(np.prod([shape[a] for a in axes]))
    labels = rng.integers(0, k, batch)
    rows = rng.random(batch) < 0.6
    full = np.expand_dims(rows, tuple(np.array(axes) % 3))
    for loss in (ce_int, jsoftmax.softmax_focal_loss):
        got = loss(logits, labels, axis, rows)
        close(got, loss(logits, labels, axis, full))
        assert np.all(np.asarray(got)[~rows] == 0) and np.all(np.asarray(got)[rows] > 0)
    close(
        ce_int(logits, labels, axis, rows),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis, rows),
    )
    if isinstance(axis, int):
        q = np.moveaxis(jax.nn.one_hot(labels, k), -1, axis)
        close(ce_dense(logits, q, axis, rows), optax.softmax_cross_entropy(logits, q, axis, rows))
    # Fewer axes still broadcast over the rows; a mask that fits neither rule names both.
    wide = np.broadcast_to(rows[-1], batch)
    close(ce_int(logits, labels, axis, rows[-1]), ce_int(logits, labels, axis, wide))
    with pytest.raises(
        ValueError, match=r"where has shape \(2,\): with fewer axes than logits .* masks rows"
    ):
        ce_int(logits, labels, axis, np.ones(2, bool))


def test_integer_and_boolean_dense_labels_are_probabilities_as_in_optax():
    logits, labels = data()
    for dtype in (np.int32, np.int8, bool):
        one_hot = np.asarray(jax.nn.one_hot(labels, K)).astype(dtype)
        close(ce_dense(logits, one_hot), optax.softmax_cross_entropy(logits, one_hot))
        close(
            ce_dense(logits, one_hot, label_smoothing=0.1),
            ce_int(logits, labels, label_smoothing=0.1),
        )
        # (optax's smooth_labels takes floating labels only.)
        close(jsoftmax.smooth_labels(one_hot, 0.2), optax.smooth_labels(one_hot * 1.0, 0.2))
    g = jax.grad(lambda x: ce_dense(x, one_hot.astype(np.int32), reduction="sum"))(logits)
    close(g, jax.grad(lambda x: ce_int(x, labels, reduction="sum"))(logits))


def test_smooth_labels_takes_alpha_per_row_as_in_optax():
    labels = jax.nn.one_hot(jnp.array([0, 2]), 3)
    alpha = jnp.array([[0.1], [0.2]])
    close(jsoftmax.smooth_labels(labels, alpha), optax.smooth_labels(labels, alpha))
    where = jnp.array([[True, True, False]])
    close(jsoftmax.smooth_labels(labels, alpha, where=where), [[0.95, 0.05, 0], [0.1, 0.1, 0.8]])
    close(jax.jit(jsoftmax.smooth_labels)(labels, jnp.array([[0.1], [1.5]]))[1], [nan] * 3)
    with pytest.raises(ValueError, match=r"alpha has shape \(3, 1\).*labels \(2, 3\)"):
        jsoftmax.smooth_labels(labels, jnp.ones((3, 1)) * 0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\], got 1.5"):
        jsoftmax.smooth_labels(labels, jnp.array([[0.1], [1.5]]))


def test_smooth_labels_spreads_alpha_over_more_classes_than_float16_counts():
    """float16 labels over 70,000 classes (past float16's largest integer, 65504): each
    class gets alpha / K (it got 0: K was inf in float16), with and without where."""
    labels = jnp.zeros((1, 70000), jnp.float16).at[0, 0].set(1)
    for where in (None, jnp.ones(70000, bool)):
        smoothed = jsoftmax.smooth_labels(labels, 0.1, where=where)
        assert smoothed.dtype == jnp.float16
        np.testing.assert_allclose(
            np.asarray(smoothed[0, :2], np.float64), [0.9, 0.1 / 70000], rtol=1e-3, atol=1e-7
        )


def test_axis_none_is_every_axis_as_in_optax_and_jax_nn():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    q = rng.dirichlet(np.ones(12)).reshape(3, 4)
    close(ce_dense(logits, q, axis=None), optax.softmax_cross_entropy(logits, q, axis=None))
    close(ce_int(logits, 7, axis=None), ce_int(logits.reshape(12), 7))
    close(jsoftmax.logsumexp(logits, axis=None), jax.nn.logsumexp(logits, axis=None))
    for axis in (1.0, True, (0, False)):  # (a bool passed for an int: axis=True read as 1)
        with pytest.raises(TypeError, match="axis must be an int, a tuple of ints or None"):
            ce_int(logits, 1, axis=axis)
    with pytest.raises(TypeError, match="softmax: axis must be an int"):
        jsoftmax.softmax(logits, axis=True)
    # A concrete JAX or NumPy integer scalar is an axis, as jax.nn takes it.
    for axis in (jnp.int32(0), (jnp.int32(0),), np.array(-2)):
        close(jsoftmax.logsumexp(logits, axis=axis), jax.nn.logsumexp(logits, axis=0))
        close(
            ce_dense(logits, q.reshape(3, 4), axis=axis), ce_dense(logits, q.reshape(3, 4), axis=0)
        )
        close(
            jsoftmax.smooth_labels(q.reshape(3, 4), 0.1, axis=axis),
            jsoftmax.smooth_labels(q.reshape(3, 4), 0.1, axis=0),
        )


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_integer_equals_one_hot(alpha, masked):
    logits, labels = data()
    where = mask() if masked else None
    one_hot = jax.nn.one_hot(labels, K)
    kwargs = dict(where=where, label_smoothing=alpha)
    close(ce_int(logits, labels, **kwargs), ce_dense(logits, one_hot, **kwargs))
    g_int = jax.grad(lambda x: ce_int(x, labels, **kwargs, reduction="mean"))(logits)
    g_dense = jax.grad(lambda x: ce_dense(x, one_hot, **kwargs, reduction="mean"))(logits)
    close(g_int, g_dense)


def test_smoothing_equals_optax_one_hot_route():
    logits, labels = data()
    route = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, K), 0.1))
    close(ce_int(logits, labels, label_smoothing=0.1), route)


# Every option of both losses, as (logits, integer labels, dense labels, class weights, mask).
LOSS_CASES = {
    "plain": lambda x, y, q, w, m: ce_int(x, y),
    "smoothing": lambda x, y, q, w, m: ce_int(x, y, label_smoothing=0.1),
    "class_weights": lambda x, y, q, w, m: ce_int(x, y, class_weights=w),
    "smoothing+class_weights": lambda x, y, q, w, m: ce_int(
        x, y, label_smoothing=0.1, class_weights=w
    ),
    "ignore_index": lambda x, y, q, w, m: ce_int(x, y, ignore_index=0),
    "z_loss": lambda x, y, q, w, m: ce_int(x, y, z_loss=1e-4),
    "logit_softcap": lambda x, y, q, w, m: ce_int(x, y, logit_softcap=30.0),
    "where": lambda x, y, q, w, m: ce_int(x, y, where=m),
    "row where": lambda x, y, q, w, m: ce_int(x, y, where=m[:, :1]),
    "every option": lambda x, y, q, w, m: ce_int(
        x,
        y,
        where=m,
        label_smoothing=0.1,
        class_weights=w,
        ignore_index=0,
        z_loss=1e-4,
        logit_softcap=30.0,
    ),
    "dense": lambda x, y, q, w, m: ce_dense(x, q),
    "dense+smoothing": lambda x, y, q, w, m: ce_dense(x, q, label_smoothing=0.1, z_loss=1e-4),
    "dense+where": lambda x, y, q, w, m: ce_dense(x, q, where=m),
    "dense+smoothing+class_weights": lambda x, y, q, w, m: ce_dense(
        x, q, label_smoothing=0.1, class_weights=w
    ),
}


def loss_inputs(dtype, n=16, k=384):
    rng = np.random.default_rng(9)
    return (
        jnp.asarray(rng.standard_normal((n, k)), dtype),
        jnp.asarray(rng.integers(0, k, n), jnp.int32),
        jnp.asarray(rng.dirichlet(np.ones(k), n), dtype),
        jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
        jnp.asarray(rng.random((n, k)) < 0.9),
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_backward_keeps_only_the_inputs_and_per_row_vectors(case, dtype):
    """Reverse mode keeps the logits as given (same dtype, no float32 copy), the labels and
    mask as given, and per-row vectors; the gradient is recomputed from them."""
    x, y, q, w, m = loss_inputs(dtype)
    n, k = x.shape
    residuals = saved_residuals(lambda x: jnp.mean(LOSS_CASES[case](x, y, q, w, m)), x)
    large = [r for r in residuals if np.prod(r[1]) >= n * k]
    assert large, "the logits are kept"
    for dtype_name, shape, origin in large:
        assert origin in ("from the argument x", "from a constant"), (dtype_name, shape, origin)
        assert dtype_name != "f32", (dtype_name, shape, origin)
    # The rest: per-row vectors (and the [K] class weights).
    assert all(np.prod(r[1]) <= max(n, k) for r in residuals if r not in large)


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_gradient_is_elementwise_without_a_scatter(case):
    """The label's term of the gradient is a select on the class index, fused into the one
    elementwise pass: a scatter runs on a float32 [N, K] buffer of its own on a GPU."""
    x, y, q, w, m = loss_inputs(jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.mean(LOSS_CASES[case](x, y, q, w, m)))
    assert "scatter" not in str(jax.make_jaxpr(grad)(x))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_accelerator_programs_hold_no_optimization_barrier(case, platform):
    x, y, q, w, m = loss_inputs(jnp.bfloat16)
    value_and_grad = jax.value_and_grad(lambda x: jnp.mean(LOSS_CASES[case](x, y, q, w, m)))
    assert "optimization_barrier" not in lowered_for(value_and_grad, platform, x)


def test_smooth_labels_with_mask():
    labels = jnp.array([[0.0, 1.0, 0.0, 0.0]])
    where = jnp.array([[True, True, False, True]])
    close(jsoftmax.smooth_labels(labels, 0.3, where=where), [[0.1, 0.8, 0.0, 0.1]])


# ---------------------------------------------------------------- edges


@pytest.mark.parametrize("tx", TRANSFORMS)
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_masked_rows_and_ignored_labels_cost_zero(tx, alpha):
    logits, labels = data()
    labels[4] = -100
    where = np.ones((N, 1), bool)
    where[1] = False
    f = tx(lambda x: ce_int(x, labels, where=where, ignore_index=-100, label_smoothing=alpha))
    loss = np.asarray(f(logits))
    assert loss[1] == 0 and loss[4] == 0 and np.all(loss[[0, 2, 3, 5]] > 0)
    g = np.asarray(jax.grad(lambda x: f(x).sum())(logits))
    assert np.all(g[[1, 4]] == 0) and np.all(np.isfinite(g))
    mean = ce_int(
        logits, labels, where=where, ignore_index=-100, label_smoothing=alpha, reduction="mean"
    )
    close(mean, loss[[0, 2, 3, 5]].mean())


@pytest.mark.parametrize("fn", ["int", "dense"])
def test_empty_mean_is_zero_with_zero_gradient(fn):
    logits, labels = data()
    where = np.zeros((N, 1), bool)
    if fn == "int":
        f = lambda x: ce_int(x, labels, where=where, reduction="mean")  # noqa: E731
    else:
        f = lambda x: ce_dense(x, jax.nn.one_hot(labels, K), where=where, reduction="mean")  # noqa: E731
    value, grad = jax.value_and_grad(f)(logits)
    assert value == 0 and np.all(np.asarray(grad) == 0)
    ignored = ce_int(logits, np.full(N, -1), ignore_index=-1, reduction="mean")
    assert ignored == 0


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("loss", [ce_int, jsoftmax.softmax_focal_loss])
def test_mean_over_rows_that_weigh_nothing_is_zero_with_zero_gradient(loss, alpha):
    """Rows count but their labels' class weights sum to 0: "mean" is 0 as when no row
    counts (it returned the smoothed sum; PyTorch: NaN). A traced bad label stays NaN."""
    logits, _ = data()
    # Class 0 weighs 0: also the class a bad label is read as, so the NaN row meets a
    # zero total weight.
    weights = np.where(np.arange(K) == 0, 0.0, 1.0).astype(np.float32)
    labels = np.zeros(N, np.int32)

    def f(x):
        return loss(x, labels, class_weights=weights, label_smoothing=alpha, reduction="mean")

    value, grad = jax.value_and_grad(f)(logits)
    assert value == 0 and np.all(np.asarray(grad) == 0)
    bad = jax.jit(lambda y: loss(logits, y, class_weights=weights, reduction="mean"))
    assert np.isnan(bad(np.r_[K, labels[1:]]))


def test_masked_label_class_costs_inf():
    logits = jnp.array([[1.0, 5.0, 3.0], [1.0, -inf, 3.0], [1.0, 2.0, 3.0]])
    where = jnp.array([[True, False, True], [True, True, True], [True, True, True]])
    labels = jnp.array([1, 1, 1])
    loss = np.asarray(ce_int(logits, labels, where=where))
    assert loss[0] == inf and loss[1] == inf and np.isfinite(loss[2])
    assert (
        np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=where))[0]
        < 0
    )
    dense = np.asarray(ce_dense(logits, jax.nn.one_hot(labels, 3), where=where))
    assert dense[0] == inf and dense[1] == inf
    smoothed = np.asarray(ce_int(logits, labels, where=where, label_smoothing=0.1))
    assert smoothed[0] == inf
    only_uniform = np.asarray(ce_int(logits, labels, where=where, label_smoothing=1.0))
    assert np.isfinite(only_uniform).all()
    # The gradient is the kept classes' logsumexp's; a class weight of 0 costs nothing.
    grad = jax.grad(lambda x: ce_int(x, labels, where=where)[:2].sum())(logits)
    close(grad[:2], jsoftmax.softmax(logits, where=where)[:2])
    weights = jnp.array([1.0, 0.0, 1.0])
    np.testing.assert_array_equal(ce_int(logits, labels, where=where, class_weights=weights), 0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("loss", [ce_int, jsoftmax.softmax_focal_loss])
def test_a_label_that_weighs_nothing_on_a_masked_class_costs_zero(loss, alpha):
    """Class weight 0 on a label whose class is masked or -inf (a pad token left out of
    the vocabulary): 0 * inf counts 0, as the dense loss counts zero mass there (it was
    NaN, and "mean" NaN for the batch)."""
    logits = jnp.array([[0.0, 1.0, 2.0], [0.5, 0.2, 0.1], [0.0, 1.0, -inf]])
    where = jnp.array([[True, True, False], [True, True, True], [True, True, True]])
    labels, weights = jnp.array([2, 0, 2]), jnp.array([1.0, 1.0, 0.0])
    kwargs = dict(where=where, class_weights=weights, label_smoothing=alpha)
    per_row = np.asarray(loss(logits, labels, **kwargs))
    full = np.asarray(loss(logits, labels, **(kwargs | {"class_weights": None})))
    assert np.isinf(full[[0, 2]]).all()  # unweighted, the masked label costs inf
    assert np.isfinite(per_row).all()
    if alpha == 0:
        assert per_row[0] == 0 and per_row[2] == 0 and per_row[1] == full[1]
    # Only 0 * inf goes: a NaN logit still makes its row NaN (the focal loss lost it).
    nan_row = jnp.array([[0.0, jnp.nan, 1.0]])
    assert np.isnan(loss(nan_row, labels[:1], class_weights=weights, label_smoothing=alpha))
    value, grad = jax.value_and_grad(lambda x: loss(x, labels, reduction="mean", **kwargs))(logits)
    assert np.isfinite(value) and np.isfinite(np.asarray(grad)[:, :2]).all()
    if loss is ce_int:
        dense = ce_dense(logits, weights[labels][:, None] * jax.nn.one_hot(labels, 3), where=where)
        uniform = ce_int(logits, labels, where=where, label_smoothing=1.0, class_weights=weights)
        close(per_row, (1 - alpha) * dense + alpha * uniform)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_neg_inf_logits_act_as_masked_in_value_and_gradient(alpha, weights):
    logits, labels = data()
    where = mask()
    kwargs = dict(label_smoothing=alpha, class_weights=weights, reduction="sum")
    # where= masks through a select, whose gradient is 0 on masked entries whatever
    # the loss's own; -inf logits reach the loss's gradient directly.
    value, g = jax.value_and_grad(lambda x: ce_int(x, labels, **kwargs))(
        np.where(where, logits, -inf)
    )
    masked_value, masked_g = jax.value_and_grad(lambda x: ce_int(x, labels, where=where, **kwargs))(
        logits
    )
    close(value, masked_value)
    close(g, masked_g)
    assert np.all(np.asarray(g)[~where] == 0)


def test_concrete_out_of_range_label_raises_with_position():
    logits, labels = data()
    labels[3] = K
    with pytest.raises(
        ValueError, match=rf"label {K} at position \(3,\) is out of range for {K} classes"
    ):
        ce_int(logits, labels)
    labels[3] = -1
    with pytest.raises(ValueError, match=r"label -1 at position \(3,\)"):
        ce_int(logits, labels)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int64])
@pytest.mark.parametrize("tx", TRANSFORMS)
def test_narrow_and_wide_label_types_read_the_same_classes(dtype, tx):
    # 300 classes do not fit an int8: the labels are compared as int32.
    k = 300
    logits = np.random.default_rng(0).standard_normal((4, k)).astype(np.float32)
    labels = np.array([3, 100, 127, 5])
    if np.iinfo(dtype).max >= k:
        labels[1] = k - 1
    want = ce_int(logits, labels.astype(np.int32), ignore_index=-100)
    got = tx(lambda x, y: ce_int(x, y, ignore_index=-100))(logits, labels.astype(dtype))
    np.testing.assert_array_equal(got, want)


def test_uint32_labels_past_int32_are_out_of_range_not_ignored():
    logits, labels = data()
    wide = labels.astype(np.uint32)
    wide[3] = 2**32 - 100  # as int32, ignore_index=-100
    loss = jax.jit(lambda y: ce_int(logits, y, ignore_index=-100))(wide)
    assert np.isnan(loss[3]) and np.isfinite(np.delete(loss, 3)).all()
    # Nor ignored where ignore_index is what a clip or a wrap reads (int32's max, -1).
    for ignore, label in ((2**31 - 1, 2**32 - 1), (2**31 - 1, 2**31), (-1, 2**32 - 1)):
        wide[3] = label
        for fn in (ce_int, jsoftmax.softmax_focal_loss):
            loss = jax.jit(lambda y, fn=fn, i=ignore: fn(logits, y, ignore_index=i))(wide)
            assert np.isnan(loss[3]) and np.isfinite(np.delete(loss, 3)).all(), (ignore, label)


def test_int64_labels_past_int32_are_out_of_range():
    _, labels = data()
    wide = labels.astype(np.int64)
    wide[3] = 2**32 + 1  # int32 would read class 1
    with pytest.raises(ValueError, match=r"label 4294967297 at position \(3,\)"):
        ce_int(data()[0], wide)
    # As a Python list too (JAX refused it with an OverflowError naming no argument).
    for fn in (ce_int, jsoftmax.softmax_focal_loss):
        with pytest.raises(ValueError, match=r"label 4294967297 at position \(3,\)"):
            fn(data()[0], wide.tolist())


@pytest.mark.parametrize("fn", ["int", "dense"])
def test_traced_zero_smoothing_and_z_loss_drop_their_terms(fn):
    # A +inf row with smoothing costs inf, without it 0; a traced 0 is no smoothing.
    logits = jnp.array([[inf, 1.0, 2.0], [1e20, 1.0, 2.0]])
    labels = jnp.array([0, 0])

    def loss(alpha, z):
        if fn == "int":
            return ce_int(logits, labels, label_smoothing=alpha, z_loss=z)
        return ce_dense(logits, jax.nn.one_hot(labels, 3), label_smoothing=alpha, z_loss=z)

    np.testing.assert_array_equal(jax.jit(loss)(0.0, 0.0), loss(0.0, 0.0))
    if fn == "int":  # the focal loss shares the smoothing rule
        focal = lambda a: jsoftmax.softmax_focal_loss(logits, labels, label_smoothing=a)  # noqa: E731
        np.testing.assert_array_equal(jax.jit(focal)(0.0), focal(0.0))


def test_traced_out_of_range_label_is_nan_in_its_row_only():
    logits, labels = data()
    labels[3] = K + 2

    def f(x, y):
        return ce_int(x, y)

    loss = np.asarray(jax.jit(f)(logits, labels))
    assert np.isnan(loss[3]) and np.isfinite(np.delete(loss, 3)).all()
    g = np.asarray(jax.jit(jax.grad(lambda x, y: f(x, y).sum()))(logits, labels))
    assert np.isnan(g[3]).all() and np.isfinite(np.delete(g, 3, 0)).all()
    mean = jax.jit(lambda x, y: ce_int(x, y, reduction="mean"))(logits, labels)
    assert np.isnan(mean)


@pytest.mark.parametrize("loss", ["ce", "focal"])
def test_a_traced_bad_class_weight_is_nan_in_its_class_rows(loss):
    """As a traced bad label: the rows of the class whose weight is negative, inf or NaN
    (a negative one gave a negative loss, and a "mean" of 0), every row with label
    smoothing (each reads every weight); an ignored or masked row of that class stays 0
    with a zero gradient (its NaN coefficient reached the gradient)."""
    fn = ce_int if loss == "ce" else jsoftmax.softmax_focal_loss
    logits, labels = data()
    labels[:] = [1, 1, 2, 2, 1, 1]
    where = np.arange(N) != 4
    labels[5] = -100  # ignored

    def f(x, w, **options):
        return fn(x, labels, where=where, class_weights=w, ignore_index=-100, **options)

    for bad in (-2.0, np.inf, np.nan):
        weights = WEIGHTS.copy()
        weights[1] = bad
        rows = jax.jit(f)(logits, weights)
        assert np.isnan(rows[:2]).all() and np.isfinite(rows[2:]).all()
        assert np.isnan(jax.jit(lambda x, w: f(x, w, reduction="mean"))(logits, weights))
        smoothed = jax.jit(lambda x, w: f(x, w, label_smoothing=0.1))(logits, weights)
        assert np.isnan(smoothed[:4]).all() and (smoothed[4:] == 0).all()
        # (The bad rows' gradient is NaN, as a bad label's: "NaN with a NaN gradient".)
        g = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w, reduction="sum"))))(logits, weights)
        assert np.isnan(g[:2]).all() and np.isfinite(g[2:]).all() and (g[4:] == 0).all()


@pytest.mark.parametrize("loss", ["ce", "focal"])
@pytest.mark.parametrize("mask", ["rows", "classes"])
def test_a_masked_row_may_hold_any_label(loss, mask):
    # Padding rows often hold -1 or -100: masked, their label is never read (optax's rule).
    fn = ce_int if loss == "ce" else jsoftmax.softmax_focal_loss
    logits, labels = data()
    padded = labels.copy()
    padded[[2, 5]] = [-1, K + 3]
    where = np.ones(N, bool)
    where[[2, 5]] = False
    if mask == "classes":
        where = np.broadcast_to(where[:, None], (N, K))

    def mean(x, y, w):
        return fn(x, y, where=w, reduction="mean")

    want = mean(logits, labels, where)
    for tx in (lambda f: f, jax.jit):  # a concrete mask, then a traced one
        close(tx(mean)(logits, padded, where), want)
        close(tx(jax.grad(mean))(logits, padded, where), jax.grad(mean)(logits, labels, where))
    # Unmasked, a row is no padding, even without a possible class: its bad label is NaN.
    logits[2] = -np.inf
    assert np.isnan(jax.jit(fn)(logits, padded)[2])


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("fn", ["int", "dense"])
def test_nan_logit_poisons_its_row_only(fn, alpha):
    logits, labels = data()
    logits[0, (labels[0] + 1) % K] = -inf  # a masked class in another row

    def loss_of(x):
        if fn == "int":
            return np.asarray(ce_int(x, labels, label_smoothing=alpha))
        return np.asarray(ce_dense(x, jax.nn.one_hot(labels, K), label_smoothing=alpha))

    clean = loss_of(logits)
    logits[2, 1] = nan
    loss = loss_of(logits)
    assert np.isnan(loss[2]) and np.isfinite(np.delete(loss, 2)).all()
    np.testing.assert_allclose(np.delete(loss, 2), np.delete(clean, 2), rtol=1e-6)


NAN_CASES = {
    **LOSS_CASES,
    "focal": lambda x, y, q, w, m: jsoftmax.softmax_focal_loss(x, y),
    "focal+smoothing": lambda x, y, q, w, m: jsoftmax.softmax_focal_loss(
        x, y, label_smoothing=0.1, gamma="flsd-53"
    ),
}


@pytest.mark.parametrize("shape", [(1000, 10), (8192, 10), (64, 1000), (4096, 1000)])
@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_logit_poisons_its_row_only_at_every_size(case, shape):
    """A NaN logit (beside +inf, or alone among -inf) makes its row's loss and gradient
    NaN and no other's, at sizes where XLA's CPU backend fuses min and max with YNNPACK,
    which may drop a NaN (jax 0.10: its row then got a finite loss, or 0)."""
    n, k = shape
    x, y, q, w, m = (np.array(a) for a in loss_inputs(jnp.float32, n, k))
    y[2:5] = 1  # neither ignored (ignore_index=0) nor the NaN's class
    m[:5] = True
    clean = x.copy()
    x[2, 5] = np.nan
    x[3, [0, 7]] = [np.inf, np.nan]
    x[4] = -np.inf  # a row that keeps only a NaN keeps a class
    x[4, 7] = np.nan

    def loss(x):
        return NAN_CASES[case](x, y, q, w, m)

    # The value alone and beside its gradient: XLA fuses each differently.
    value = jax.jit(loss)
    value_and_grad = jax.jit(lambda x: (loss(x), jax.grad(lambda x: loss(x).sum())(x)))

    def loss_and_grad(x):
        return (np.asarray(a) for a in (value(x), *value_and_grad(x)))

    loss, loss_beside_grad, grad = loss_and_grad(x)
    assert np.isnan(loss[2:5]).all() and np.isnan(loss_beside_grad[2:5]).all()
    assert np.isnan(grad[2:4]).all() and np.isnan(grad[4]).any()
    rows = np.r_[0:2, 5:n]
    clean = [a[rows] for a in loss_and_grad(clean)]
    np.testing.assert_allclose(loss[rows], clean[0], rtol=1e-6)
    np.testing.assert_allclose(loss_beside_grad[rows], clean[1], rtol=1e-6)
    np.testing.assert_allclose(grad[rows], clean[2], rtol=1e-5, atol=1e-7)


def test_pos_inf_logit():
    logits = jnp.array([[inf, 0.0, inf], [inf, 0.0, 1.0]])
    loss = np.asarray(ce_int(logits, jnp.array([0, 1])))
    close(loss[0], np.log(2))
    assert loss[1] > 1e30
    dense = np.asarray(ce_dense(logits, jax.nn.one_hot(jnp.array([0, 1]), 3)))
    close(dense[0], np.log(2))
    assert dense[1] > 1e30
    # As docs/losses.md has it: a finite label costs finfo.max - z_y (log_softmax's value)
    # with the limit's gradient p - onehot; smoothing over two finite classes overflows.
    big = float(jnp.finfo(jnp.float32).max)
    close(ce_int(logits[1:], jnp.array([2])), [big - 1.0])
    grad = jax.grad(lambda x: ce_int(x, jnp.array([1])).sum())(logits[1:])
    np.testing.assert_array_equal(grad, [[1.0, -1.0, 0.0]])
    assert ce_int(logits[1:], jnp.array([0]), label_smoothing=0.1) == inf


def test_z_loss_and_softcap_formulas():
    logits, labels = data()
    lse = jax.scipy.special.logsumexp(logits, -1)
    close(
        ce_int(logits, labels, z_loss=0.5) - ce_int(logits, labels),
        0.5 * lse**2,
        rtol=1e-5,
        atol=1e-5,
    )
    capped = 1.5 * np.tanh(logits / 1.5)
    close(ce_int(logits, labels, logit_softcap=1.5), ce_int(capped, labels))
    # lse = 1e20: z lse**2 = 1e36 is finite though lse**2 is not (it gave inf).
    huge = np.array([[1e20, 0.0, -1.0]], np.float32)
    for fn in (ce_int, ce_dense):
        target = [0] if fn is ce_int else np.eye(3, dtype=np.float32)[:1]
        close(fn(huge, target, z_loss=1e-4), [1e36], rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_softcap_keeps_neg_inf_masked_and_caps_pos_inf(alpha):
    logits, labels = data()
    rows = np.arange(N)
    logits[rows, (labels + 1) % K] = -inf
    logits[rows[:2], (labels[:2] + 2) % K] = inf

    def capped_first(x):
        return jnp.where(x == -inf, x, 1.5 * jnp.tanh(x / 1.5))

    def total(cap, x):
        return jnp.sum(ce_int(x, labels, label_smoothing=alpha, logit_softcap=cap))

    def total_capped_first(x):
        return total(None, capped_first(x))

    close(total(1.5, logits), total_capped_first(logits))
    grad = jax.grad(functools.partial(total, 1.5))(logits)
    close(grad, jax.grad(total_capped_first)(logits))
    assert np.all(grad[rows, (labels + 1) % K] == 0)
    assert np.all(grad[rows[:2], (labels[:2] + 2) % K] == 0)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_loss_is_float32_for_low_precision(dtype):
    logits, labels = data()
    x = jnp.asarray(logits, dtype)
    loss = ce_int(x, labels, label_smoothing=0.1)
    assert loss.dtype == jnp.float32
    close(loss, ce_int(x.astype(jnp.float32), labels, label_smoothing=0.1))
    assert ce_dense(x, jax.nn.one_hot(labels, K, dtype=dtype)).dtype == jnp.float32
    g = jax.grad(lambda v: ce_int(v, labels, reduction="sum"))(x)
    assert g.dtype == dtype


def test_float64_stays_float64(x64):
    logits, labels = data()
    loss = ce_int(
        jnp.asarray(logits, jnp.float64), labels, label_smoothing=0.1, class_weights=WEIGHTS
    )
    assert loss.dtype == jnp.float64
    ref = reference.integer_cross_entropy(logits, labels, alpha=0.1, weights=WEIGHTS)
    close(loss, ref, rtol=1e-6)


# ---------------------------------------------------------------- errors


def test_errors_name_the_argument():
    logits, labels = data()
    with pytest.raises(TypeError, match="logits must be floating"):
        ce_int(labels[:, None] * np.ones(K, np.int32), labels)
    with pytest.raises(TypeError, match="labels must be integers"):
        ce_int(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but logits \(6,\)"):
        ce_int(logits, labels[:5])
    with pytest.raises(ValueError, match=r"labels has shape \(6, 4\) but logits \(6, 5\)"):
        ce_dense(logits, np.ones((6, 4), np.float32))
    with pytest.raises(ValueError, match=r"class_weights has shape \(4,\).*needs \(5,\)"):
        ce_int(logits, labels, class_weights=np.ones(4, np.float32))
    for bad in (-1, np.inf, np.nan):
        weights = np.array([1, 1, bad, 1, 1], np.float32)
        with pytest.raises(ValueError, match=rf"class_weights must be in \[0.0, inf\), got {bad}"):
            ce_int(logits, labels, class_weights=weights)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\]"):
            ce_int(logits, labels, label_smoothing=alpha)
        with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\]"):
            jsoftmax.smooth_labels(logits, alpha)
    # One alpha per row: along the classes, the smoothed labels summed to 1/3 and 4/3.
    with pytest.raises(ValueError, match=r"alpha has shape \(5,\); it must have size 1 along"):
        jsoftmax.smooth_labels(logits, np.linspace(0, 1, K))
    close(jsoftmax.smooth_labels(logits, np.full((N, 1), 0.1)), jsoftmax.smooth_labels(logits, 0.1))
    for z_loss in (-1.0, np.inf):  # (inf gave NaN where the logsumexp is 0)
        with pytest.raises(ValueError, match=r"z_loss must be in \[0.0, inf\)"):
            ce_dense(logits, logits, z_loss=z_loss)
    for cap in (0.0, -2.0, np.inf):
        with pytest.raises(ValueError, match=r"logit_softcap must be in \(0.0, inf\)"):
            ce_int(logits, labels, logit_softcap=cap)
    # In the compute dtype: inf, a subnormal (flushed to 0), and so large that logits / c
    # flush to 0 (3e38 capped every logit of 1 to 3 to 0) were NaN or wrong.
    for cap in (1e39, 1e-40, 3e38):
        with pytest.raises(ValueError, match=r"logit_softcap must be in \[1.18e-38, 1.84e\+19\]"):
            ce_int(logits, labels, logit_softcap=cap)
    with pytest.raises(TypeError, match="logit_softcap must be a concrete number"):
        ce_int(logits, labels, logit_softcap=True)
    # The user's value in the message, not float64's reading of float32 (-0.10000000149).
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\], got -0.1$"):
        ce_int(logits, labels, label_smoothing=-0.1)
    # Static: any concrete number, never a traced one.
    np.testing.assert_array_equal(
        ce_int(logits, labels, logit_softcap=jnp.array(2.0)),
        ce_int(logits, labels, logit_softcap=2.0),
    )
    with pytest.raises(TypeError, match="logit_softcap must be a concrete number"):
        jax.jit(lambda c: ce_int(logits, labels, logit_softcap=c))(2.0)
    # (a NumPy string raised JAX's "Non-hashable static arguments")
    for bad in ("average", np.array("mean"), None):
        with pytest.raises(ValueError, match="reduction must be one of"):
            ce_int(logits, labels, reduction=bad)
    for ignore in (1.5, "a", np.array([1]), True):
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            ce_int(logits, labels, ignore_index=ignore)
    with pytest.raises(TypeError, match="ignore_index must be concrete"):
        jax.jit(lambda i: ce_int(logits, labels, ignore_index=i))(1)
    np.testing.assert_array_equal(
        ce_int(logits, labels, ignore_index=jnp.array(1)), ce_int(logits, labels, ignore_index=1)
    )
    for ignore in (2**32 - 1, np.int64(2**40), 2**70):  # int64 would wrap 2**40 onto class 0
        with pytest.raises(
            ValueError, match=r"ignore_index must be in \[-2147483648, 2147483647\]"
        ):
            ce_int(logits, labels, ignore_index=ignore)
    for loss, target in ((ce_int, np.zeros(N, np.int32)), (ce_dense, np.zeros((N, 0)))):
        with pytest.raises(ValueError, match=r"logits \(6, 0\) have no class along axis=-1"):
            loss(np.zeros((N, 0), np.float32), target)


# ---------------------------------------------------------------- derivatives and transforms


@pytest.mark.parametrize("x", [[1.0, 1.0, 0.0], [inf, inf, 1.0]], ids=["tie", "+inf"])
def test_second_derivatives_at_ties_and_pos_inf(x, x64):
    """The cross-entropy's Hessian is ``diag(p) - p p^T`` times the target's total, also where
    logits tie with the row max (it was off by 0.11) or sit at +inf (it was 0); the focal
    loss's equals plain JAX's at a tie."""
    x = jnp.asarray(x)
    p = jsoftmax.softmax(x)
    want = jnp.diag(p) - jnp.outer(p, p)
    # The target's total: 0.9 * 2 + 0.1 / 3 * (1 + 2 + 3) with the class weights.
    for f, total in (
        (lambda x: ce_int(x, 1), 1.0),
        (lambda x: ce_int(x, 1, label_smoothing=0.1, class_weights=jnp.arange(1.0, 4.0)), 2.0),
        (lambda x: ce_dense(x, jnp.array([0.2, 0.5, 0.3])), 1.0),
    ):
        close(jax.hessian(f)(x), total * want, atol=1e-14)
    if np.isfinite(x).all():

        def plain(x):
            log_p = jax.nn.log_softmax(x)[1]
            return -((1 - jnp.exp(log_p)) ** 2) * log_p

        focal = jax.hessian(lambda x: jsoftmax.softmax_focal_loss(x, 1))(x)
        close(focal, jax.hessian(plain)(x), atol=1e-14)


GRAD_OPTIONS = [
    dict(alpha=0.0, weights=None, ignore_index=None, z_loss=0.0, softcap=None, where=False),
    dict(alpha=0.1, weights=WEIGHTS, ignore_index=3, z_loss=1e-2, softcap=None, where=True),
    dict(alpha=0.3, weights=None, ignore_index=None, z_loss=0.0, softcap=3.0, where=True),
    dict(alpha=1.0, weights=WEIGHTS, ignore_index=None, z_loss=1e-2, softcap=2.0, where=False),
]


@pytest.mark.parametrize("opts", GRAD_OPTIONS, ids=option_id)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_integer_check_grads(opts, reduction, x64):
    logits, labels = data(n=4, k=K)
    kwargs = int_kwargs(opts)
    if kwargs["where"] is not None:
        kwargs["where"] = kwargs["where"][:4]
    f = jax.jit(lambda x: ce_int(x, labels, **kwargs, reduction=reduction))
    check_grads_order_two(f, (jnp.asarray(logits, jnp.float64),))


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_dense_check_grads_logits_and_labels(alpha, x64):
    logits, _ = data(n=4)
    labels = jnp.asarray(np.random.default_rng(5).dirichlet(np.ones(K), 4))
    weights = np.random.default_rng(4).uniform(0.5, 3.0, K)
    kwargs = dict(label_smoothing=alpha, z_loss=1e-2, class_weights=weights, reduction="mean")
    f = jax.jit(lambda x, q: ce_dense(x, q, **kwargs))
    check_grads_order_two(f, (jnp.asarray(logits, jnp.float64), labels))
    # with a mask, labels must be 0 on masked classes (else the loss is +inf)
    where = mask()[:4]
    masked = jnp.where(where, labels, 0.0)
    g = jax.jit(lambda x: ce_dense(x, masked, where=where, **kwargs))
    check_grads_order_two(g, (jnp.asarray(logits, jnp.float64),))


def test_vmap_matches_loop():
    logits, labels = data()
    batched = jax.vmap(lambda x, y: ce_int(x, y, label_smoothing=0.1))(logits, labels)
    looped = [
        ce_int(x[None], y[None], label_smoothing=0.1)[0]
        for x, y in zip(logits, labels, strict=True)
    ]
    close(batched, looped, rtol=1e-6)


def test_optax_training_step_lowers_the_loss():
    rng = np.random.default_rng(6)
    features = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    labels = jnp.argmax(features @ jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), -1)
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    optimizer = optax.adam(0.1)
    state = optimizer.init(params)

    def loss_fn(p):
        logits = features @ p["w"] + p["b"]
        return ce_int(logits, labels, label_smoothing=0.1, z_loss=1e-4, reduction="mean")

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    first = loss_fn(params)
    for _ in range(20):
        params, state, _ = step(params, state)
    assert loss_fn(params) < 0.8 * first


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_equals_pytorch_when_installed(reduction):
    """The rules the float64 reference encodes, checked against PyTorch itself (if installed)."""
    torch = pytest.importorskip("torch")
    logits, labels = data(n=8)
    labels[3] = -100
    probs = np.random.default_rng(7).dirichlet(np.ones(K), 8).astype(np.float32)
    for alpha, weights in itertools.product([0.0, 0.1, 1.0], [None, WEIGHTS]):
        theirs = torch.nn.functional.cross_entropy(
            torch.tensor(logits),
            torch.tensor(labels, dtype=torch.long),
            weight=None if weights is None else torch.tensor(weights),
            ignore_index=-100,
            label_smoothing=alpha,
            reduction=reduction,
        )
        ours = ce_int(
            logits,
            labels,
            label_smoothing=alpha,
            class_weights=weights,
            ignore_index=-100,
            reduction=reduction,
        )
        close(ours, theirs.numpy())
        theirs = torch.nn.functional.cross_entropy(
            torch.tensor(logits), torch.tensor(probs), label_smoothing=alpha, reduction=reduction
        )
        close(ce_dense(logits, probs, label_smoothing=alpha, reduction=reduction), theirs.numpy())


@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_softcap_tangent_schedules_agree(softcap):
    """The soft-cap's tangent on CPU (from the forward pass's tanh) and elsewhere (tanh
    anew, from expm1: XLA's GPU backend wrote a tanh that two passes read out as a float32
    [N, K] buffer) agree in the capped logits, the slope and their derivatives."""
    z = jnp.array([-jnp.inf, -1e4, -60, -3, -1e-3, 0, 1e-3, 3, 60, 1e4, jnp.inf, jnp.nan])
    cpu = functools.partial(_cpu._shared_cap_and_slope, softcap=softcap)
    core = functools.partial(_softmax._cap_and_slope, softcap=softcap)
    np.testing.assert_allclose(core(z)[0], cpu(z)[0], rtol=1e-6)
    # The slope, in [0, 1], to a few float32 ulps of 1 (-inf classes take no gradient).
    np.testing.assert_allclose(core(z)[1][1:], cpu(z)[1][1:], rtol=0, atol=1e-6)
    finite = z[1:-2]
    for i in range(2):  # the capped logits, the slope
        grads = [jax.vmap(jax.grad(lambda v, f=f, i=i: f(v)[i]))(finite) for f in (core, cpu)]
        np.testing.assert_allclose(*grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_softcap_tangent_on_accelerators_takes_tanh_anew(platform):
    x, y, q, w, m = loss_inputs(jnp.bfloat16)
    value_and_grad = jax.value_and_grad(
        lambda x: jnp.mean(LOSS_CASES["logit_softcap"](x, y, q, w, m))
    )
    assert "exponential_minus_one" in lowered_for(value_and_grad, platform, x)
    assert "exponential_minus_one" not in lowered_for(value_and_grad, "cpu", x)


SWITCHED = ["smoothing", "smoothing+class_weights", "logit_softcap", "every option"]
SWITCHED += ["dense", "dense+smoothing", "dense+where"]


def edge_inputs():
    """loss_inputs with edge rows: -inf and +inf logits, a NaN, a fully masked row and
    logits that saturate a soft-cap of 30."""
    x, y, q, w, m = loss_inputs(jnp.float32)
    x = x.at[0, :5].set(-jnp.inf).at[1, 3].set(jnp.inf).at[2, 7].set(jnp.nan)
    x = x.at[3].multiply(100.0)
    return x, y, q, w, m.at[4].set(False)


def assert_core_equals_cpu(loss, x):
    """``loss(x)`` (per row) and the gradient of its sum agree under the CPU schedules and
    under the plain core that GPUs and TPUs run."""

    def losses_and_grad(x):
        return loss(x), jax.grad(lambda x: jnp.sum(loss(x)))(x)

    cpu = losses_and_grad(x)
    with core_schedules():
        core = losses_and_grad(x)
    # A NaN logit's row is left out: the core run on CPU may drop the NaN (YNNPACK's
    # minimum, jsoftmax._cpu.clamped), which GPUs do not; which of its gradient entries
    # are NaN is not specified either (it varied with the program XLA compiled).
    rows = ~np.isnan(np.asarray(x)).any(-1)
    np.testing.assert_allclose(core[0][rows], cpu[0][rows], rtol=1e-6)
    core, cpu = (g[rows] for g in (core[1], cpu[1]))
    # float32 rounding: the slope 1 - tanh**2 to about 1e-7, sums in another order
    np.testing.assert_allclose(core, cpu, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", SWITCHED)
def test_core_equals_the_cpu_schedules(case):
    """What GPUs and TPUs run (the plain core) gives the CPU schedules' losses and
    gradients, at the edges too (the options that reach a switch in jsoftmax._cpu)."""
    x, y, q, w, m = edge_inputs()
    assert_core_equals_cpu(functools.partial(LOSS_CASES[case], y=y, q=q, w=w, m=m), x)


def test_core_schedules_reach_the_default_branches():
    x, y, q, w, m = loss_inputs(jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(LOSS_CASES["logit_softcap"](x, y, q, w, m)))
    assert "exponential_minus_one" not in lowered_for(grad, "cpu", x)
    with core_schedules():
        assert "exponential_minus_one" in lowered_for(grad, "cpu", x)


def test_core_check_grads_with_every_option(x64):
    logits, labels = data(n=4, k=K)
    q = jnp.asarray(np.random.default_rng(5).dirichlet(np.ones(K), 4))
    kwargs = {**int_kwargs(GRAD_OPTIONS[1]), "logit_softcap": 2.0}
    if kwargs["where"] is not None:
        kwargs["where"] = kwargs["where"][:4]
    with core_schedules():
        f = jax.jit(lambda x: ce_int(x, labels, **kwargs))
        check_grads_order_two(f, (jnp.asarray(logits, jnp.float64),))
        g = jax.jit(lambda x: ce_dense(x, q, label_smoothing=0.1, z_loss=1e-2))
        check_grads_order_two(g, (jnp.asarray(logits, jnp.float64),))


@pytest.mark.parametrize("value", [None, "0.1", True, 1j])
@pytest.mark.parametrize(
    "fn, name",
    [(ce_int, "label_smoothing"), (ce_int, "z_loss"), (jsoftmax.softmax_focal_loss, "gamma")],
)
def test_a_hyperparameter_that_is_not_a_number_raises_type_error_naming_it(fn, name, value):
    logits, labels = data()
    # gamma may be a string, "flsd-53": any other is a ValueError.
    error = ValueError if name == "gamma" and isinstance(value, str) else TypeError
    with pytest.raises(error, match=rf"{name} must be a (real )?number"):
        fn(logits, labels, **{name: value})


@pytest.mark.parametrize("value", [None, "abc", [[1.0, 2.0], [3.0]]])
def test_an_array_argument_that_is_not_an_array_raises_type_error_naming_it(value):
    """(JAX's own messages named neither the function nor the argument.)"""
    logits, labels = data()
    cases = {
        "softmax: x \\(the logits\\)": lambda: jsoftmax.softmax(value),
        "softmax: where": lambda: jsoftmax.softmax(logits, where=value),
        "labels": lambda: ce_int(logits, value),
        "softmax_cross_entropy: labels": lambda: ce_dense(logits, value),
        "expected_calibration_error: probs": (
            lambda: jsoftmax.expected_calibration_error(value, labels)
        ),
        "linear_softmax_cross_entropy: labels": (
            lambda: jsoftmax.linear_softmax_cross_entropy(logits, logits.T, value)
        ),
    }
    if value is None:  # (where=None is no mask)
        del cases["softmax: where"]
    for name, call in cases.items():
        with pytest.raises(
            TypeError, match=f"{name} must be an array, got {re.escape(repr(value)[:4])}"
        ):
            call()
    with pytest.raises(TypeError, match="logit_softcap must be a concrete number"):
        ce_int(logits, labels, logit_softcap="a")  # (a ValueError of float("a"))


def test_an_integer_past_int32_is_a_number():
    logits, labels = data()
    big = jsoftmax.softmax_focal_loss(logits, labels, gamma=2**40)
    np.testing.assert_array_equal(big, jsoftmax.softmax_focal_loss(logits, labels, gamma=2.0**40))
    for t in (2**40, np.int64(2**40)):  # (NumPy's wrapped to 0 without x64: NaN rows)
        hot = jsoftmax.softmax(logits, temperature=t)
        np.testing.assert_array_equal(hot, jsoftmax.softmax(logits, temperature=2.0**40))
    with pytest.raises(ValueError, match="temperature is past the float range"):
        jsoftmax.softmax(logits, temperature=10**400)
