"""Specification of softmax_focal_loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jsoftmax
from tests import reference
from tests.conftest import (
    TRANSFORMS,
    check_grads_order_two,
    core_schedules,
    lowered_for,
    saved_residuals,
)
from tests.test_losses import WEIGHTS, K, N, assert_core_equals_cpu, close, data, edge_inputs, mask

inf, nan = np.inf, np.nan
focal = jsoftmax.softmax_focal_loss
ce_int = jsoftmax.softmax_cross_entropy_with_integer_labels
# (where, class weights, ignore_index, softcap): none, each, all.
EXTRAS = {
    "plain": (False, None, None, None),
    "where": (True, None, None, None),
    "weights+ignore": (False, WEIGHTS, 3, None),
    "softcap": (False, None, None, 2.0),
    "all": (True, WEIGHTS, 3, 2.0),
}


def focal_kwargs(gamma, alpha, extras):
    where, weights, ignore, softcap = EXTRAS[extras]
    return dict(
        where=mask() if where else None,
        gamma=gamma,
        label_smoothing=alpha,
        class_weights=weights,
        ignore_index=ignore,
        logit_softcap=softcap,
    )


def ref_kwargs(gamma, alpha, extras):
    """:func:`focal_kwargs` under the reference's names."""
    kwargs = focal_kwargs(gamma, alpha, extras)
    renamed = {"label_smoothing": "alpha", "class_weights": "weights", "logit_softcap": "softcap"}
    return {renamed.get(name, name): value for name, value in kwargs.items()}


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("gamma", [0.5, 2.0, "flsd-53"])
def test_matches_float64_reference(gamma, alpha, extras):
    logits, labels = data()
    for reduction in ("none", "sum", "mean"):
        ours = focal(logits, labels, **focal_kwargs(gamma, alpha, extras), reduction=reduction)
        ref = reference.softmax_focal_loss(
            logits, labels, **ref_kwargs(gamma, alpha, extras), reduction=reduction
        )
        close(ours, ref)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.5, "flsd-53"])
def test_float64_is_tight(gamma, x64):
    logits, labels = data(n=12)
    where = np.random.default_rng(2).random((12, K)) < 0.8
    where[np.arange(12), labels] = True
    weights = WEIGHTS.astype(np.float64)
    for alpha in (0.0, 0.3):
        ours = focal(
            jnp.asarray(logits, jnp.float64),
            labels,
            where=where,
            gamma=gamma,
            label_smoothing=alpha,
            class_weights=weights,
        )
        assert ours.dtype == jnp.float64
        ref = reference.softmax_focal_loss(
            logits, labels, where, gamma=gamma, alpha=alpha, weights=weights
        )
        close(ours, ref, rtol=1e-12, atol=1e-14)


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    axis_seed=st.integers(0, 100),
    gamma=st.sampled_from([0.25, 1.0, 2.0, 3.7]),
    alpha=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_axis_matches_reference(shape, axis_seed, gamma, alpha, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * 3).astype(np.float32)
    axis = axis_seed % len(shape) - len(shape) * (axis_seed % 2)  # negative ones too
    moved = np.moveaxis(logits, axis, -1)
    labels = rng.integers(0, moved.shape[-1], moved.shape[:-1])
    ours = focal(logits, labels, axis, gamma=gamma, label_smoothing=alpha)
    assert ours.shape == labels.shape
    flat = moved.reshape(-1, moved.shape[-1])
    ref = reference.softmax_focal_loss(flat, labels.ravel(), gamma=gamma, alpha=alpha)
    close(ours, ref.reshape(labels.shape))


def test_tuple_axis_flattens_like_the_cross_entropy():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 20, 3)
    flat = logits.reshape(3, 20)
    close(focal(logits, labels, (1, 2)), focal(flat, labels), rtol=1e-6)
    close(focal(logits, labels, (1, 2), gamma=0.0), ce_int(logits, labels, (1, 2)), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_equals_pytorch_style_focal_loss(reduction):
    """The usual PyTorch recipe: -w_y (1 - pt)**gamma log pt, "mean" weighted as cross_entropy."""
    torch = pytest.importorskip("torch")
    logits, labels = data(n=8)
    labels[3] = -100
    for gamma, weights in [(2.0, None), (0.5, WEIGHTS), ("flsd-53", WEIGHTS)]:
        x = torch.tensor(logits, dtype=torch.float64)
        y = torch.tensor(labels, dtype=torch.long)
        keep = y != -100
        logpt = torch.log_softmax(x[keep], -1).gather(1, y[keep, None])[:, 0]
        pt = logpt.exp()
        if gamma == "flsd-53":
            g = torch.where(pt < 0.2, 5.0, 3.0).double()
        else:
            g = torch.full_like(pt, gamma)
        w = torch.ones_like(pt) if weights is None else torch.tensor(weights).double()[y[keep]]
        rows = -w * (1 - pt) ** g * logpt
        theirs = {"sum": rows.sum(), "mean": rows.sum() / w.sum()}.get(reduction)
        if theirs is None:
            theirs = torch.zeros(8, dtype=torch.float64).masked_scatter(keep, rows)
        ours = focal(
            logits,
            labels,
            gamma=gamma,
            class_weights=weights,
            ignore_index=-100,
            reduction=reduction,
        )
        close(ours, theirs.numpy())


# ---------------------------------------------------------------- gamma


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_gamma_zero_is_the_cross_entropy(alpha, extras):
    """Concrete 0 runs the cross-entropy's kernel: bitwise equal; traced 0 the focal one."""
    logits, labels = data()
    kwargs = focal_kwargs(0.0, alpha, extras)
    kwargs.pop("gamma")
    for reduction in ("none", "sum", "mean"):
        ce = ce_int(logits, labels, **kwargs, reduction=reduction)
        np.testing.assert_array_equal(
            focal(logits, labels, gamma=0, **kwargs, reduction=reduction), ce
        )
        traced = jax.jit(lambda x, g, r=reduction: focal(x, labels, gamma=g, **kwargs, reduction=r))
        close(traced(logits, 0.0), ce, rtol=1e-6)

    def total(fn, x, **kw):
        return jnp.sum(fn(x, labels, **kwargs, **kw) * np.arange(1.0, N + 1))

    g_ce = jax.grad(lambda x: total(ce_int, x))(logits)
    g_focal = jax.jit(jax.grad(lambda x, g: total(focal, x, gamma=g)))(logits, 0.0)
    close(g_focal, g_ce, rtol=1e-5, atol=1e-6)


def test_traced_gamma_zero_is_the_cross_entropy_in_float64(x64):
    logits, labels = data()
    x = jnp.asarray(logits, jnp.float64)
    kwargs = dict(where=mask(), label_smoothing=0.1, class_weights=WEIGHTS, logit_softcap=2.0)
    f = jax.jit(lambda x, g: focal(x, labels, gamma=g, **kwargs, reduction="sum"))
    ce = lambda x: ce_int(x, labels, **kwargs, reduction="sum")  # noqa: E731
    close(f(x, 0.0), ce(x), rtol=1e-13)
    close(jax.grad(f)(x, 0.0), jax.grad(ce)(x), rtol=1e-12, atol=1e-15)


def test_flsd53_is_gamma_5_below_p_02_and_3_above():
    # p_y = softmax(row)[0]: 1 / (1 + 4 e^-a) for [a, 0, 0, 0, 0]; 0.19 and 0.21 around 0.2.
    p = np.array([0.05, 0.19, 0.21, 0.5, 0.9])
    a = np.log(4 * p / (1 - p))
    logits = np.zeros((5, K), np.float32)
    logits[:, 0] = a
    labels = np.zeros(5, np.int32)
    gamma = np.where(p < 0.2, 5.0, 3.0)
    close(focal(logits, labels, gamma="flsd-53"), -((1 - p) ** gamma) * np.log(p))
    for alpha in (0.0, 0.2):
        kw = dict(label_smoothing=alpha)
        flsd = np.asarray(focal(logits, labels, gamma="FLSD-53", **kw))
        close(flsd[:2], focal(logits[:2], labels[:2], gamma=5.0, **kw), rtol=1e-6)
        close(flsd[2:], focal(logits[2:], labels[2:], gamma=3.0, **kw), rtol=1e-6)

        # gamma is a constant of each row in the derivative, as in Mukhoti et al.'s code
        def grad(x, y, gamma, kw=kw):
            return jax.jit(jax.grad(lambda x: focal(x, y, gamma=gamma, **kw).sum()))(x)

        fixed = np.concatenate(
            [grad(logits[:2], labels[:2], 5.0), grad(logits[2:], labels[2:], 3.0)]
        )
        close(grad(logits, labels, "flsd-53"), fixed, rtol=1e-5, atol=1e-7)


def test_traced_gamma_schedule_matches_concrete():
    logits, labels = data()
    f = jax.jit(lambda x, g: focal(x, labels, gamma=g, label_smoothing=0.1))
    for gamma in (0.5, 2.0, 4.0):
        close(f(logits, gamma), focal(logits, labels, gamma=gamma, label_smoothing=0.1), rtol=1e-6)
    assert f._cache_size() == 1
    assert np.isnan(np.asarray(f(logits, -1.0))).all()
    # Also where p_y = 1 and where the label is -inf: the kernel's selects there gave -0
    # and inf (NaN gradients), a bad schedule that a logged loss would not show.
    x = np.array([[100.0, 0.0, 0.0], [1.0, 2.0, 0.0], [1.0, -np.inf, 0.0]], np.float32)
    y = np.array([0, 1, 1])
    for alpha in (0.0, 0.1):
        for gamma in (-1.0, np.nan):
            f = jax.jit(lambda x, g, a=alpha: focal(x, y, gamma=g, label_smoothing=a))
            assert np.isnan(np.asarray(f(x, gamma))).all(), (alpha, gamma)
            grad = jax.grad(lambda x, f=f, g=gamma: f(x, g)[:2].sum())(x)
            assert np.isnan(np.asarray(grad[:2])).all()


def test_certain_row_costs_positive_zero():
    # As the cross-entropy's; -0 before (-(1 - p)**gamma * log p at log p = +0).
    certain = np.array([[100.0, 0.0, 0.0]], np.float32)
    for tx in (lambda f: f, jax.jit):
        loss = tx(lambda x: focal(x, np.array([0]), gamma=2.0))(certain)
        assert loss == 0 and not np.signbit(loss).any(), loss


def test_gamma_is_not_differentiated():
    logits, labels = data()
    assert jax.grad(lambda g: focal(logits, labels, gamma=g).sum())(2.0) == 0


# ---------------------------------------------------------------- edges


@pytest.mark.parametrize("tx", TRANSFORMS)
@pytest.mark.parametrize("gamma", [0.5, 2.0, "flsd-53"])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_masked_rows_and_ignored_labels_cost_zero(tx, gamma, alpha):
    logits, labels = data()
    labels[4] = -100
    where = np.ones((N, 1), bool)
    where[1] = False
    kwargs = dict(where=where, ignore_index=-100, gamma=gamma, label_smoothing=alpha)
    f = tx(lambda x: focal(x, labels, **kwargs))
    loss = np.asarray(f(logits))
    assert loss[1] == 0 and loss[4] == 0 and np.all(loss[[0, 2, 3, 5]] > 0)
    g = np.asarray(jax.grad(lambda x: f(x).sum())(logits))
    assert np.all(g[[1, 4]] == 0) and np.all(np.isfinite(g)) and np.all(g[[0, 2, 3, 5]] != 0)
    close(focal(logits, labels, **kwargs, reduction="mean"), loss[[0, 2, 3, 5]].mean())
    close(focal(logits, labels, **kwargs, reduction="sum"), loss.sum())


def test_empty_mean_is_zero_with_zero_gradient():
    logits, labels = data()
    where = np.zeros((N, 1), bool)
    value, grad = jax.value_and_grad(lambda x: focal(x, labels, where=where, reduction="mean"))(
        logits
    )
    assert value == 0 and np.all(np.asarray(grad) == 0)
    assert focal(logits, np.full(N, -1), ignore_index=-1, reduction="mean") == 0


@pytest.mark.parametrize("gamma", [0.5, 2.0, "flsd-53"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weights", [None, WEIGHTS], ids=["unweighted", "weighted"])
def test_neg_inf_logits_act_as_masked_in_value_and_gradient(gamma, alpha, weights):
    logits, labels = data()
    where = mask()
    kwargs = dict(gamma=gamma, label_smoothing=alpha, class_weights=weights, reduction="sum")
    value, g = jax.value_and_grad(lambda x: focal(x, labels, **kwargs))(
        np.where(where, logits, -inf)
    )
    masked_value, masked_g = jax.value_and_grad(lambda x: focal(x, labels, where=where, **kwargs))(
        logits
    )
    assert np.isfinite(value)
    close(value, masked_value)
    close(g, masked_g)
    g = np.asarray(g)
    assert np.all(g[~where] == 0) and np.all(np.isfinite(g))
    close(value, reference.softmax_focal_loss(logits, labels, where, gamma, alpha, weights).sum())


def test_masked_label_class_costs_inf():
    logits = jnp.array([[1.0, 5.0, 3.0], [1.0, -inf, 3.0], [1.0, 2.0, 3.0]])
    where = jnp.array([[True, False, True], [True, True, True], [True, True, True]])
    labels = jnp.array([1, 1, 1])
    for gamma in (0.5, 2.0, "flsd-53"):
        loss = np.asarray(focal(logits, labels, where=where, gamma=gamma))
        assert loss[0] == inf and loss[1] == inf and np.isfinite(loss[2])
        smoothed = np.asarray(focal(logits, labels, where=where, gamma=gamma, label_smoothing=0.1))
        assert smoothed[0] == inf
        only_uniform = focal(logits, labels, where=where, gamma=gamma, label_smoothing=1.0)
        assert np.isfinite(np.asarray(only_uniform)).all()


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_certain_rows_have_finite_zero_derivatives(gamma, alpha):
    """p_y = 1 (a single kept class, or a logit far above the rest): loss 0 without smoothing,
    and no 0 ** (gamma - 1) in the gradient or the Hessian."""
    logits = np.array([[100.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    where = np.array([[True] * 4, [True] * 4, [False, False, True, False]])
    labels = np.array([0, 3, 2])

    def total(x):
        return focal(x, labels, where=where, gamma=gamma, label_smoothing=alpha).sum()

    loss = np.asarray(focal(logits, labels, where=where, gamma=gamma, label_smoothing=alpha))
    if alpha == 0:
        assert loss[0] == 0 and loss[2] == 0
    grad = np.asarray(jax.jit(jax.grad(total))(logits))
    hessian = np.asarray(jax.jit(jax.hessian(total))(logits))
    assert np.isfinite(grad).all() and np.isfinite(hessian).all()
    assert np.all(grad[2] == 0) and np.all(hessian[2] == 0) and np.all(hessian[:, :, 2] == 0)
    assert np.abs(grad[0]).max() < 1e-30 if alpha == 0 else np.abs(grad[0]).max() > 0


def test_concrete_out_of_range_label_raises_with_position():
    logits, labels = data()
    labels[3] = K
    with pytest.raises(
        ValueError,
        match=rf"softmax_focal_loss: label {K} at position \(3,\) is out of range for {K} classes",
    ):
        focal(logits, labels)


@pytest.mark.parametrize("gamma", [2.0, "flsd-53"])
def test_traced_out_of_range_label_is_nan_in_its_row_only(gamma):
    logits, labels = data()
    labels[3] = -7

    def f(x, y):
        return focal(x, y, gamma=gamma, label_smoothing=0.1)

    loss = np.asarray(jax.jit(f)(logits, labels))
    assert np.isnan(loss[3]) and np.isfinite(np.delete(loss, 3)).all()
    g = np.asarray(jax.jit(jax.grad(lambda x, y: f(x, y).sum()))(logits, labels))
    assert np.isnan(g[3]).all() and np.isfinite(np.delete(g, 3, 0)).all()
    assert np.isnan(jax.jit(lambda x, y: focal(x, y, reduction="mean"))(logits, labels))


def test_nan_logit_poisons_its_row_only():
    logits, labels = data()
    clean = np.asarray(focal(logits, labels, label_smoothing=0.1))
    logits[2, 1] = nan
    loss = np.asarray(focal(logits, labels, label_smoothing=0.1))
    assert np.isnan(loss[2]) and np.isfinite(np.delete(loss, 2)).all()
    np.testing.assert_allclose(np.delete(loss, 2), np.delete(clean, 2), rtol=1e-6)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_computes_in_float32(dtype):
    logits, labels = data()
    x = jnp.asarray(logits, dtype)
    loss = focal(x, labels, label_smoothing=0.1)
    assert loss.dtype == jnp.float32
    close(loss, focal(x.astype(jnp.float32), labels, label_smoothing=0.1), rtol=1e-6)
    g = jax.grad(lambda v: focal(v, labels, label_smoothing=0.1, reduction="sum"))(x)
    assert g.dtype == dtype
    g32 = jax.grad(lambda v: focal(v, labels, label_smoothing=0.1, reduction="sum"))(
        x.astype(jnp.float32)
    )
    close(g.astype(jnp.float32), g32.astype(dtype).astype(jnp.float32))


# ---------------------------------------------------------------- errors


def test_errors_name_the_argument():
    logits, labels = data()
    with pytest.raises(TypeError, match="softmax_focal_loss: logits must be floating"):
        focal(labels[:, None] * np.ones(K, np.int32), labels)
    with pytest.raises(TypeError, match="labels must be integers"):
        focal(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but logits \(6,\)"):
        focal(logits, labels[:5])
    with pytest.raises(ValueError, match=r"class_weights has shape \(4,\).*needs \(5,\)"):
        focal(logits, labels, class_weights=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"where has shape \(6, 4\)"):
        focal(logits, labels, where=np.ones((6, 4), bool))
    for gamma in (-0.5, nan, np.inf):
        with pytest.raises(ValueError, match=r"softmax_focal_loss: gamma must be in \[0.0, inf\)"):
            focal(logits, labels, gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be a scalar"):
        focal(logits, labels, gamma=np.ones(N))
    with pytest.raises(ValueError, match=r"gamma must be a number >= 0 or 'flsd-53', got 'flsd'"):
        focal(logits, labels, gamma="flsd")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\]"):
        focal(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"logit_softcap must be in \(0.0, inf\)"):
        focal(logits, labels, logit_softcap=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        focal(logits, labels, reduction="average")


# ---------------------------------------------------------------- derivatives and transforms

# Each with one reduction: "mean" where ignored or masked rows change its denominator.
GRAD_CASES = {
    "gamma=2": (dict(gamma=2.0), "none"),
    "gamma=0.5+smoothing+weights": (
        dict(gamma=0.5, label_smoothing=0.2, class_weights=WEIGHTS),
        "mean",
    ),
    "gamma=1.5+where+ignore": (dict(gamma=1.5, where="mask", ignore_index=3), "mean"),
    "gamma=3.3+softcap+smoothing": (
        dict(gamma=3.3, logit_softcap=2.0, label_smoothing=0.1),
        "none",
    ),
    "flsd-53+everything": (
        dict(
            gamma="flsd-53",
            where="mask",
            label_smoothing=0.3,
            class_weights=WEIGHTS,
            logit_softcap=3.0,
        ),
        "mean",
    ),
    "gamma=0.75+alpha=1": (dict(gamma=0.75, label_smoothing=1.0, where="mask"), "none"),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_check_grads(case, x64):
    logits, labels = data(n=4)
    kwargs, reduction = GRAD_CASES[case]
    kwargs = dict(kwargs)
    if kwargs.get("where") == "mask":
        kwargs["where"] = mask()[:4]
    f = jax.jit(lambda x: focal(x, labels, **kwargs, reduction=reduction))
    check_grads_order_two(f, (jnp.asarray(logits, jnp.float64),))


@pytest.mark.parametrize("gamma", [0.5, "flsd-53"])
def test_second_derivatives_at_neg_inf_logits_are_the_masked_ones(gamma, x64):
    """check_grads cannot perturb -inf inputs; Hessian-vector products stand in for it."""
    logits, labels = data(n=4)
    where = np.ones((4, K), bool)
    where[np.arange(4), (labels + 1) % K] = False
    x = jnp.asarray(logits, jnp.float64)
    t = jnp.asarray(np.random.default_rng(8).standard_normal(x.shape))

    def hvp(x, where=None):
        def total(x):
            kwargs = dict(gamma=gamma, label_smoothing=0.1, where=where)
            return focal(x, labels, **kwargs, reduction="sum")

        forward = jax.jvp(jax.grad(total), (x,), (t,))[1]
        reverse = jax.grad(lambda x: jnp.vdot(jax.grad(total)(x), t))(x)
        return forward, reverse

    hvp = jax.jit(hvp)
    for ours, masked in zip(hvp(jnp.where(where, x, -inf)), hvp(x, where), strict=True):
        assert np.isfinite(ours).all() and np.all(ours[~where] == 0)
        close(ours, np.where(where, masked, 0.0), rtol=1e-12, atol=1e-15)


def test_gradient_equals_autodiff_of_the_formula(x64):
    """The hand-written derivative against jax.grad of the textbook expression."""
    logits, labels = data()
    weights = jnp.asarray(WEIGHTS, jnp.float64)

    def textbook(x, gamma, alpha):
        lp = jax.nn.log_softmax(x)
        terms = -((1 - jnp.exp(lp)) ** gamma) * lp
        c = (1 - alpha) * jax.nn.one_hot(labels, K) * weights[labels][:, None] + alpha / K * weights
        return jnp.sum(c * terms)

    x = jnp.asarray(logits, jnp.float64)

    def ours(x, gamma, alpha):
        kwargs = dict(gamma=gamma, label_smoothing=alpha, class_weights=weights)
        return focal(x, labels, **kwargs, reduction="sum")

    for gamma, alpha in [(2.0, 0.0), (0.5, 0.2), (3.7, 1.0)]:
        expected = jax.grad(textbook)(x, gamma, alpha)
        close(jax.grad(ours)(x, gamma, alpha), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gamma", [2.0, "flsd-53"])
def test_vmap_matches_loop(gamma):
    logits, labels = data()
    batched = jax.vmap(lambda x, y: focal(x, y, gamma=gamma, label_smoothing=0.1))(logits, labels)
    looped = [
        focal(x[None], y[None], gamma=gamma, label_smoothing=0.1)[0]
        for x, y in zip(logits, labels, strict=True)
    ]
    close(batched, looped, rtol=1e-6)


def test_jit_does_not_retrace():
    logits, labels = data()
    traces = []

    @jax.jit
    def f(x, y):
        traces.append(None)
        return focal(x, y, gamma="flsd-53", label_smoothing=0.1, reduction="mean")

    first = f(logits, labels)
    second = f(logits + 1.0, labels)
    assert len(traces) == 1
    close(first, second, rtol=1e-6)  # shift invariance


CASES = {
    "gamma=2": dict(gamma=2.0),
    "smoothing": dict(gamma=2.0, label_smoothing=0.1),
    "flsd-53+smoothing+weights": dict(gamma="flsd-53", label_smoothing=0.1, class_weights=True),
    "where": dict(gamma=0.5, where=True),
    "row where": dict(gamma=0.5, where="rows"),
    "everything": dict(
        gamma=1.5,
        where=True,
        label_smoothing=0.1,
        class_weights=True,
        ignore_index=0,
        logit_softcap=30.0,
    ),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_keeps_only_the_logits_and_per_row_vectors(case, dtype):
    """Reverse mode keeps the logits as given (same dtype, no upcast copy), the labels and mask
    as given, and per-row vectors: the gradient is recomputed from them."""
    rng = np.random.default_rng(9)
    n, k = 16, 384
    x = jnp.asarray(rng.standard_normal((n, k)), dtype)
    y = jnp.asarray(rng.integers(0, k, n), jnp.int32)
    kwargs = dict(CASES[case])
    if kwargs.get("where") is True:
        kwargs["where"] = jnp.asarray(rng.random((n, k)) < 0.9)
    elif kwargs.get("where") == "rows":
        kwargs["where"] = jnp.asarray(rng.random((n, 1)) < 0.9)
    if kwargs.get("class_weights"):
        kwargs["class_weights"] = jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32)

    def loss(x):
        return jnp.mean(focal(x, y, **kwargs))

    residuals = saved_residuals(loss, x)
    # The label's term is a select on the class index, not a scatter (a GPU runs a
    # scatter on a float32 [N, K] buffer of its own).
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(loss))(x))
    large = [r for r in residuals if np.prod(r[1]) >= n * k]
    # The logits once, as given; the caller's mask ("a constant") may be kept too.
    given = {"bfloat16": "bf16", "float32": "f32"}[x.dtype.name]
    assert [r for r in large if r[2] == "from the argument x"] == [
        (given, (n, k), "from the argument x")
    ]
    assert all(
        r[2] == "from a constant" and r[0] == "bool"
        for r in large
        if r[1:] != ((n, k), "from the argument x")
    )
    # The rest: per-row vectors (and the [K] class weights).
    assert all(np.prod(r[1]) <= max(n, k) for r in residuals if r not in large)


def test_optax_training_step_lowers_the_loss():
    optax = pytest.importorskip("optax")
    rng = np.random.default_rng(6)
    features = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    labels = jnp.argmax(features @ jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), -1)
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    optimizer = optax.adam(0.1)
    state = optimizer.init(params)

    def loss_fn(p):
        return focal(features @ p["w"] + p["b"], labels, gamma="flsd-53", reduction="mean")

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    first = loss_fn(params)
    for _ in range(20):
        params, state, _ = step(params, state)
    assert loss_fn(params) < 0.5 * first


@pytest.mark.parametrize("extras", ["smoothing", "flsd", "softcap", "all"])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_core_equals_the_cpu_schedules(alpha, extras):
    """What GPUs and TPUs run (the plain core, which spells the smoothing sums' and the
    tangent's focal terms apart) gives the CPU schedules' losses and gradients, at the
    edges too."""
    x, y, _, w, m = edge_inputs()
    kwargs = dict(gamma=2.0, label_smoothing=alpha)
    if extras == "flsd":
        kwargs.update(gamma="flsd-53")
    if extras in ("softcap", "all"):
        kwargs.update(logit_softcap=2.0)
    if extras == "all":
        kwargs.update(where=m, class_weights=w, ignore_index=3)
    assert_core_equals_cpu(lambda x: focal(x, y, **kwargs), x)


def test_core_equals_the_cpu_schedules_beside_infinite_and_huge_logits():
    """A finite logit far below a row's +inf (or huge) maximum has log p = -inf: the
    core's tangent treats it as the forward pass does (a finite gradient), not as kept."""
    x = np.array([[inf, -1e38, 0.0, 1.0], [3e38, -3e38, 0.0, 1.0], [2.0, -1.0, 0.0, 1.0]])
    y = np.array([0, 3, 1])
    loss = functools.partial(focal, labels=y, label_smoothing=0.1)
    assert_core_equals_cpu(loss, x.astype(np.float32))
    assert np.isfinite(jax.grad(lambda x: jnp.sum(loss(x)))(x.astype(np.float32))).all()


def test_core_spells_the_smoothing_sums_and_the_tangent_apart():
    """On CPU the smoothing sums and the tangent share the forward pass's focal terms;
    the core gives each its own (tanh in the tangent), which XLA's GPU backend does not
    write out."""
    x, y, _, _, _ = edge_inputs()
    grad = jax.grad(lambda x: jnp.sum(focal(x, y, label_smoothing=0.1)))
    assert "tanh" not in lowered_for(grad, "cpu", x)
    with core_schedules():
        assert "tanh" in lowered_for(grad, "cpu", x)
