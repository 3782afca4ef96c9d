"""Specification of softmax, log_softmax and logsumexp."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import jsoftmax
from jsoftmax import _softmax
from tests import reference
from tests.conftest import (
    TRANSFORMS,
    check_grads_order_two,
    core_schedules,
    lowered_for,
    saved_residuals,
)

inf, nan = np.inf, np.nan
FUNCS = {
    "softmax": (jsoftmax.softmax, reference.softmax),
    "log_softmax": (jsoftmax.log_softmax, reference.log_softmax),
    "logsumexp": (jsoftmax.logsumexp, reference.logsumexp),
}
ALL = pytest.mark.parametrize("name", list(FUNCS))
NORMALISERS = pytest.mark.parametrize("name", ["softmax", "log_softmax"])


def close(actual, expected, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- textbook values


@pytest.mark.parametrize("tx", TRANSFORMS)
def test_textbook_values(tx):
    close(tx(jsoftmax.softmax)(jnp.array([1.0, 2.0, 3.0])), [0.09003057, 0.24472847, 0.66524096])
    y = tx(jsoftmax.softmax)(jnp.array([5.0, 1.0, -2.0]))
    assert np.all(np.asarray(y) > 0)
    close(y.sum(), 1.0)
    close(tx(jsoftmax.log_softmax)(jnp.array([5.0, 1.0, -2.0])), np.log(np.asarray(y)), rtol=1e-5)
    close(tx(jsoftmax.logsumexp)(jnp.array([1.0, 2.0, 3.0])), np.log(np.exp([1, 2, 3]).sum()))


# ---------------------------------------------------------------- random references


@st.composite
def problems(draw):
    """A random array, an int or tuple axis (negative allowed) and maybe a mask."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * draw(st.sampled_from([0.1, 1.0, 30.0]))).astype(np.float32)
    axes = draw(
        st.lists(
            st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim, unique_by=lambda a: a % ndim
        )
    )
    axis = axes[0] if draw(st.booleans()) else tuple(axes)
    where = None
    if draw(st.booleans()):
        mask_shape = tuple(s if draw(st.booleans()) else 1 for s in shape)
        where = rng.random(mask_shape) < 0.7
    return x, axis, where


@ALL
@pytest.mark.parametrize("tx", TRANSFORMS)
@given(problem=problems())
def test_matches_float64_reference(name, tx, problem):
    x, axis, where = problem
    ours, ref = FUNCS[name]
    close(tx(functools.partial(ours, axis=axis))(x, where=where), ref(x, axis, where), atol=2e-6)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(problem=problems(), scale=st.floats(0.05, 20.0))
def test_temperature_equals_scaled_input(name, problem, scale):
    x, axis, where = problem
    ours, ref = FUNCS[name]
    close(ours(x, axis, where, temperature=scale), ref(x, axis, where, temperature=scale))
    close(
        ours(x, axis, where, temperature=scale), ours(x / np.float32(scale), axis, where), atol=1e-5
    )


def test_per_row_temperature():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    t = np.array([[0.5], [1.0], [4.0]], np.float32)
    close(jsoftmax.softmax(x, temperature=t), reference.softmax(x, temperature=t))
    close(
        jsoftmax.softmax(x, axis=0, temperature=t.T[:, :3].reshape(1, 3)[:, :1]),
        reference.softmax(x, 0, temperature=0.5),
    )


@ALL
def test_axis_equals_moveaxis(name):
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    ours, _ = FUNCS[name]
    moved = ours(np.moveaxis(x, 1, -1), axis=-1)
    direct = ours(x, axis=1)
    expect = moved if name == "logsumexp" else np.moveaxis(np.asarray(moved), -1, 1)
    close(direct, expect)


@ALL
def test_where_equals_slicing(name):
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    keep = np.array([True, False, True, True, False, True])
    ours, _ = FUNCS[name]
    masked = np.asarray(ours(x, where=keep))
    sliced = np.asarray(ours(x[:, keep]))
    close(masked if name == "logsumexp" else masked[:, keep], sliced)
    if name != "logsumexp":
        assert np.all(masked[:, ~keep] == (0.0 if name == "softmax" else -inf))


# ---------------------------------------------------------------- edges

FULLY_MASKED = {"softmax": 0.0, "log_softmax": -inf, "logsumexp": -inf}


@ALL
@pytest.mark.parametrize("tx", TRANSFORMS)
def test_fully_masked_row_is_not_nan(name, tx):
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    where = jnp.array([[True, True, False], [False, False, False]])
    ours, ref = FUNCS[name]
    out = np.asarray(tx(ours)(x, where=where))
    assert np.all(out[1] == FULLY_MASKED[name])
    close(out[0], ref(x, where=where)[0])


@ALL
def test_all_neg_inf_row_equals_fully_masked(name):
    ours, _ = FUNCS[name]
    x = jnp.array([[-inf, -inf, -inf], [1.0, -inf, 2.0]])
    np.testing.assert_array_equal(ours(x)[0], FULLY_MASKED[name])
    np.testing.assert_array_equal(ours(x), ours(jnp.where(x > -inf, x, 0.0), where=x > -inf))


@ALL
def test_gradient_is_exactly_zero_through_masks(name):
    ours, _ = FUNCS[name]
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-inf, 1.0, -inf]])
    where = jnp.array([[True, False, True], [False, False, False], [True, True, True]])
    cot = jnp.arange(1.0, 10.0).reshape(3, 3)[:, : 1 if name == "logsumexp" else 3].squeeze()

    def loss(x, t):
        out = ours(x, where=where) if t is None else ours(x, where=where, temperature=t)
        finite = jnp.where(jnp.isfinite(out), out, 0.0)
        return jnp.sum(finite * cot)

    for t in (None, 2.0) if name != "logsumexp" else (None,):
        g = np.asarray(jax.grad(loss)(x, t))
        assert not np.isnan(g).any()
        assert np.all(g[0, 1] == 0) and np.all(g[1] == 0) and g[2, 0] == 0 and g[2, 2] == 0
        assert np.any(g[0] != 0)
    if name != "logsumexp":
        assert jax.grad(loss, argnums=1)(x, 2.0) != 0
        assert np.isfinite(jax.grad(loss, argnums=1)(x, 2.0))


@pytest.mark.parametrize("tx", TRANSFORMS)
def test_pos_inf_shares_the_mass(tx):
    x = jnp.array([[inf, 1.0, inf, -inf], [inf, 3e38, 0.0, 1.0]])
    np.testing.assert_array_equal(tx(jsoftmax.softmax)(x), [[0.5, 0, 0.5, 0], [1, 0, 0, 0]])
    lsm = np.asarray(tx(jsoftmax.log_softmax)(x))
    close(lsm[:, 0], [-np.log(2), 0.0])
    assert np.all(np.exp(lsm[0, [1, 3]]) == 0) and lsm[0, 3] == -inf
    np.testing.assert_array_equal(tx(jsoftmax.logsumexp)(x), [inf, inf])
    assert np.isnan(np.asarray(jax.nn.softmax(x))).all()  # what jsoftmax improves on


@ALL
@pytest.mark.parametrize("tx", TRANSFORMS)
def test_nan_poisons_its_row_only(name, tx):
    x = jnp.array([[1.0, nan, 2.0], [1.0, 2.0, 3.0], [inf, nan, 0.0], [-inf, nan, -inf]])
    ours, ref = FUNCS[name]
    out = np.asarray(tx(ours)(x))
    assert np.isnan(out[[0, 2, 3]]).all()
    close(out[1], ref(x[1]))
    masked = np.asarray(ours(x, where=~jnp.isnan(x)))
    assert not np.isnan(masked).any()  # a masked NaN is not in the row


@ALL
@pytest.mark.parametrize("shape", [(1000, 10), (8192, 10), (64, 1000), (4096, 1000)])
def test_nan_poisons_its_row_only_at_every_size(name, shape):
    """As above at sizes where XLA's CPU backend fuses min and max with YNNPACK, which may
    drop a NaN (jax 0.10: logsumexp gave such a row a finite value); the value alone and
    beside its gradient, which XLA fuses differently."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    clean = x.copy()
    x[2, 5] = nan
    x[3, [0, 7]] = [inf, nan]
    x[4, [0, 7]] = [-inf, nan]
    ours = FUNCS[name][0]

    def grad(x):
        return jax.grad(lambda x: jnp.sum(jnp.sin(ours(x))))(x)  # a cotangent that varies

    alone, both = jax.jit(ours), jax.jit(lambda x: (ours(x), grad(x)))  # compiled once each

    def outputs(x):
        return [np.asarray(a).reshape(shape[0], -1) for a in (alone(x), *both(x))]

    for out, clean_out in zip(outputs(x), outputs(clean), strict=True):
        assert np.isnan(out[2:5]).all()
        np.testing.assert_array_equal(
            np.delete(out, [2, 3, 4], 0), np.delete(clean_out, [2, 3, 4], 0)
        )


@ALL
def test_nan_gradient_stays_in_its_row(name):
    ours, _ = FUNCS[name]
    x = jnp.array([[1.0, nan, 2.0], [1.0, 2.0, 3.0]])
    g = np.asarray(
        jax.grad(lambda x: jnp.sum(ours(x)[..., 0] if name != "logsumexp" else ours(x)))(x)
    )
    assert np.isnan(g[0]).all() and np.isfinite(g[1]).all()


@ALL
def test_huge_finite_values(name):
    x = np.array([[1e30, 0.0, -1e30], [3e38, -3e38, 3e38], [-3e38, -3e38, 1.0]], np.float32)
    ours, ref = FUNCS[name]
    out = np.asarray(ours(x))
    assert not np.isnan(out).any()
    # shift in float64 first: at 3e38 a float64 ulp is larger than log(2)
    shift = 0.0 if name == "logsumexp" else np.max(x.astype(np.float64), -1, keepdims=True)
    # -6e38 rounds to -inf in float32, as it should
    with np.errstate(over="ignore"):
        close(out, ref(x - shift).astype(np.float32), rtol=1e-6)


# ---------------------------------------------------------------- dtypes


@ALL
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_is_one_rounding_of_float32(name, dtype):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 33)) * 4, dtype)
    ours, _ = FUNCS[name]
    out = ours(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, ours(x.astype(jnp.float32)).astype(dtype))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_over_65504_classes(dtype):
    k = 70_000
    x = jnp.zeros((2, k), dtype)
    close(jsoftmax.softmax(x).astype(jnp.float32).sum(-1), [1.0, 1.0], rtol=1e-2)
    assert np.all(np.asarray(jsoftmax.softmax(x), np.float32) > 0)
    lse = jsoftmax.logsumexp(x)
    close(lse.astype(jnp.float32), [np.log(k)] * 2, rtol=1e-2)
    g = jax.grad(lambda x: jsoftmax.logsumexp(x).astype(jnp.float32).sum())(x)
    assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all()
    g = jax.grad(lambda x: jsoftmax.log_softmax(x)[:, 0].astype(jnp.float32).sum())(x)
    assert np.isfinite(np.asarray(g, np.float32)).all()


@ALL
def test_float64_stays_float64(name, x64):
    x = np.random.default_rng(4).standard_normal((3, 5))
    ours, ref = FUNCS[name]
    out = ours(jnp.asarray(x, jnp.float64))
    assert out.dtype == jnp.float64
    close(out, ref(x), rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------- errors


@ALL
@pytest.mark.parametrize("x", [jnp.arange(3), jnp.array([True, False]), np.arange(3)])
def test_non_floating_logits_raise_type_error(name, x):
    with pytest.raises(TypeError, match="must be floating"):
        FUNCS[name][0](x)


@NORMALISERS
@pytest.mark.parametrize("t", [0.0, -1.0, nan, inf, np.array([[1.0], [0.0]])])
def test_bad_concrete_temperature_raises(name, t):
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        FUNCS[name][0](jnp.ones((2, 3)), temperature=t)
    # Positive and finite, but 0 or inf in the float32 it divides by.
    for t in (1e-50, 1e-40, 1e39):  # 1e-40: a subnormal, which XLA flushes to 0
        with pytest.raises(
            ValueError, match=rf"positive and finite in float32, got {re.escape(str(t))}$"
        ):
            FUNCS[name][0](jnp.ones((2, 3)), temperature=t)


@NORMALISERS
def test_a_quotient_that_overflows_is_constant_in_the_temperature(name):
    """x / T past float32's range is inf, and the row follows the +inf rule, which no
    temperature changes: the temperature's derivative is 0 there (it was -1e38)."""
    x = jnp.array([2e38, 3e38, 0.0])
    c = jnp.array([1.0, 2.0, 3.0])
    f = FUNCS[name][0]
    np.testing.assert_array_equal(jsoftmax.softmax(x, temperature=0.5), [0.5, 0.5, 0.0])
    grad = jax.grad(lambda t: jnp.sum(c * f(x, temperature=t)))(jnp.float32(0.5))
    assert grad == 0


@NORMALISERS
@pytest.mark.parametrize(
    "x, t",
    [
        ([1e38, 0.0], 0.5),
        ([3e38, 0.0], 0.9),
        ([1e38, 1e38 - 1e32, 0.0], 0.5),
        ([-2e38, 2e38, 1e38], 1.0),  # t - mean overflows where p is 0
    ],
)
def test_forward_and_reverse_temperature_derivatives_agree_at_huge_logits(name, x, t):
    """x / T finite but x / T**2 past the float range: forward mode formed -x / T**2 per
    entry and subtracted its row mean (inf - inf: NaN rows); reverse mode was right."""
    f = functools.partial(FUNCS[name][0], jnp.array(x))
    forward = jax.jacfwd(lambda t: f(temperature=t))(jnp.float32(t))
    reverse = jax.jacrev(lambda t: f(temperature=t))(jnp.float32(t))
    assert not np.isnan(forward).any()
    np.testing.assert_allclose(forward, reverse, rtol=1e-6)


@NORMALISERS
def test_temperature_shape_must_keep_reduced_axes_size_one(name):
    with pytest.raises(ValueError, match=r"temperature has shape \(2, 3\)"):
        FUNCS[name][0](jnp.ones((2, 3)), temperature=jnp.ones((2, 3)))


@NORMALISERS
def test_traced_bad_temperature_gives_nan_rows(name):
    f = jax.jit(lambda x, t: FUNCS[name][0](x, temperature=t))
    out = np.asarray(f(jnp.ones((4, 2)), jnp.array([[1.0], [0.0], [-2.0], [1e-40]])))
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()  # 1e-40: a subnormal


@NORMALISERS
def test_traced_bad_temperature_gives_nan_gradients(name):
    """Under eager grad the temperature is traced (no ValueError): its rows are NaN and so
    is its gradient in both modes (reverse mode gave 0, which stalls an optimiser of T)."""
    x = jnp.arange(6.0).reshape(2, 3)

    def f(t):
        return jnp.sum(FUNCS[name][0](x, temperature=t) * x)

    for bad in (-1.0, 0.0, np.inf, np.nan):
        t = jnp.array([[0.5], [bad]])
        reverse, forward = jax.grad(f)(t), jax.jacfwd(f)(t)
        assert np.isfinite(reverse[0]).all() and np.isnan(reverse[1]).all()
        assert np.isnan(forward[1]).all()  # (row 0's too: JAX's forward mode sums NaN * 0)


@NORMALISERS
def test_concrete_bad_temperature_raises_under_jit(name):
    """A constant inside a jitted function is concrete (jnp.asarray of it is a tracer)."""
    for bad in (-1.0, np.float32(0), 1e-50, [[1.0], [-1.0]]):
        with pytest.raises(ValueError, match="temperature must be positive and finite"):
            jax.jit(lambda x, t=bad: FUNCS[name][0](x, temperature=t))(jnp.ones((2, 3)))


def test_temperature_as_a_list_of_traced_rows():
    x = jnp.arange(6.0).reshape(2, 3)
    got = jax.jit(lambda a, b: jsoftmax.softmax(x, temperature=[[a], [b]]))(0.5, 2.0)
    close(got, reference.softmax(np.asarray(x, np.float64) / [[0.5], [2.0]]))


@ALL
@pytest.mark.parametrize("axis", [2, -3, (0, 2)])
def test_axis_out_of_range(name, axis):
    with pytest.raises(ValueError, match=r"out of range for an array of shape \(2, 3\)"):
        FUNCS[name][0](jnp.ones((2, 3)), axis=axis)


@ALL
def test_where_must_broadcast(name):
    with pytest.raises(ValueError, match=r"where has shape \(3, 2\).*\(2, 3\)"):
        FUNCS[name][0](jnp.ones((2, 3)), where=jnp.ones((3, 2), bool))
    with pytest.raises(TypeError, match="boolean"):
        FUNCS[name][0](jnp.ones((2, 3)), where=jnp.ones((2, 3)))


# ---------------------------------------------------------------- derivatives


def _wrapped(name, axis, where, with_t):
    ours = FUNCS[name][0]
    if with_t:
        return jax.jit(lambda x, t: ours(x, axis, where, temperature=t))
    return jax.jit(lambda x: ours(x, axis, where))


@ALL
@pytest.mark.parametrize(("axis", "masked"), [(-1, False), (0, True), ((0, 2), True)])
def test_check_grads_order_two(name, axis, masked, x64):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 4, 2)))
    where = jnp.asarray(rng.random((3, 4, 2)) < 0.7).at[0].set(False) if masked else None
    if name == "logsumexp":
        # Second-order reverse mode takes f's output as a cotangent: keep it finite.
        f = _wrapped(name, axis, where, False)
        check_grads_order_two(lambda v: jnp.where(jnp.isfinite(f(v)), f(v), 0.0), (x,))
        return
    check_grads_order_two(_wrapped(name, axis, where, False), (x,))
    # one temperature per row: size 1 along the reduced axes
    t_shape = tuple(
        1 if i in np.atleast_1d(np.asarray(axis)) % 3 else s for i, s in enumerate(x.shape)
    )
    t = jnp.asarray(rng.uniform(0.5, 2.0, t_shape))
    check_grads_order_two(_wrapped(name, axis, where, True), (x, t))


@ALL
def test_check_grads_with_neg_inf_entries(name, x64):
    x = jnp.array([[1.0, -inf, 0.5], [-inf, -inf, -inf]])
    f = FUNCS[name][0]
    check_grads(lambda v: jnp.where(jnp.isfinite(f(v)), f(v), 0.0), (x,), order=2, modes=("rev",))


def _scaled_logsumexp(x, axis=-1, where=None, *, temperature):
    """logsumexp of ``x / temperature`` (keepdims): the kernel softmax and log_softmax
    share; the public logsumexp takes no temperature."""
    return _softmax._call("logsumexp", "logsumexp", x, axis, where, temperature)


SCALED = {
    "softmax": (jsoftmax.softmax, reference.softmax),
    "log_softmax": (jsoftmax.log_softmax, reference.log_softmax),
    "logsumexp": (
        _scaled_logsumexp,
        lambda x, where=None, temperature=1.0: reference.logsumexp(
            np.asarray(x, np.float64) / temperature, where=where, keepdims=True
        ),
    ),
}


@pytest.mark.parametrize("x", [[1.0, 1.0, 0.0], [0.0] * 4, [inf, inf, 1.0], [2.0, inf, 2.0]])
def test_second_derivatives_at_ties_and_pos_inf_are_the_softmax_jacobian(x, x64):
    """The Hessian of logsumexp (and minus log_softmax's) is ``diag(p) - p p^T``, also
    where entries tie with the row max or sit at +inf: the clamp at the shift takes its
    entry's tangent, not the max's (logsumexp's Hessian was off by 0.11 at [1, 1, 0],
    and 0 at +inf)."""
    x = jnp.asarray(x)
    p = jsoftmax.softmax(x)
    want = jnp.diag(p) - jnp.outer(p, p)
    close(jax.hessian(jsoftmax.logsumexp)(x), want, atol=1e-15)
    close(jax.jacfwd(jax.grad(jsoftmax.logsumexp))(x), want, atol=1e-15)
    close(jax.jacobian(jsoftmax.softmax)(x), want, atol=1e-15)
    for k in range(x.size):
        close(jax.hessian(lambda x, k=k: jsoftmax.log_softmax(x)[k])(x), -want, atol=1e-15)
    scaled = jsoftmax.softmax(x / 0.7)
    want = (jnp.diag(scaled) - jnp.outer(scaled, scaled)) / 0.49
    hessian = jax.hessian(lambda x: jsoftmax.log_softmax(x, temperature=0.7)[0])(x)
    close(hessian, -want, atol=1e-15)


@ALL
@pytest.mark.parametrize("masked", [False, True])
def test_check_grads_order_two_in_temperature_beside_infinities(name, masked, x64):
    """Second derivatives in the temperature, and the mixed ones in x and the
    temperature, on rows holding +inf, -inf and masked entries (one row fully masked
    where ``masked``). The rule's own derivative took ``x / T``'s derivative in ``T`` at
    an infinite ``x`` (infinite), and a 0 times it made the row NaN. Differentiated in
    the finite entries of ``x``: an infinite one has no finite neighbours."""
    x = jnp.array(
        [
            [1.0, -inf, 3.0, 0.5],
            [inf, 1.0, -0.5, -inf],
            [-inf, inf, 2.0, inf],
            [0.5, -1.0, 2.0, 1.5],
            [-inf, 2.0, -inf, 0.5],
        ]
    )
    where = None
    if masked:
        where = jnp.array(
            [[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 0]], bool
        )
    finite = jnp.isfinite(x)
    t = jnp.array([[2.0], [0.7], [1.3], [0.9], [1.6]])
    f = SCALED[name][0]

    def scaled(v, t):
        y = f(jnp.where(finite, v, x), where=where, temperature=t)
        # -inf and +inf outputs as 0; so too log_softmax's finite entries in a +inf row,
        # finfo.max below it, where a finite difference rounds away.
        return jnp.where(jnp.abs(y) < 1e300, y, 0.0)

    check_grads_order_two(scaled, (jnp.where(finite, x, 0.0), t))


def test_a_masked_entrys_cotangent_reaches_no_second_derivative():
    """A masked or -inf entry's cotangent, even log_softmax's own -inf output fed back
    (as check_grads does), changes no derivative of the VJP in the temperature (it met
    d(v / T) / dT as inf * 0 once the division came after the select)."""
    x = jnp.array([[1.0, 2.0, -2.0, -inf]])
    where = jnp.array([[True, False, True, True]])

    def pulled(t, ct):
        return jax.vjp(lambda t: jsoftmax.log_softmax(x, where=where, temperature=t), t)[1](ct)[0]

    ct = jnp.array([[1.0, inf, 0.5, -inf]])
    want = jax.grad(pulled)(0.7, jnp.where(jnp.isfinite(ct), ct, 0.0))
    assert np.isfinite(want)
    assert jax.grad(pulled)(0.7, ct) == want


def _central(f, t, h=1e-3):
    """``f(t)``'s first and second derivatives by central differences (float64)."""
    return (f(t + h) - f(t - h)) / (2 * h), (f(t + h) - 2 * f(t) + f(t - h)) / h**2


@ALL
@pytest.mark.parametrize(
    ("row", "keep"),
    [
        ([1.0, -inf, 3.0], None),
        ([1.0, 5.0, 3.0], [True, False, True]),
        ([inf, 1.0], None),
        ([-inf, inf, 2.0, inf], None),
    ],
)
def test_second_derivatives_in_temperature_beside_infinities(name, row, keep, x64):
    """The second derivative in the temperature and the mixed one in x and the
    temperature, of the first entry that is not -inf, against the float64 reference's
    finite differences: -0.4147 for log_softmax's first entry of [1, -inf, 3] at T = 2
    (a -inf entry and a masked one alike), 0 for softmax's of [inf, 1] (constant). Both
    were NaN."""
    if name == "logsumexp" and inf in row:
        pytest.skip("logsumexp of a +inf row is +inf")
    ours, ref = SCALED[name]
    x, where = jnp.array(row), None if keep is None else jnp.array(keep)
    i = 0 if name == "logsumexp" else int(np.argmax(np.array(row) > -inf))  # not -inf

    def first(x, t):
        return ours(x, where=where, temperature=t)[i]

    t = 2.0
    hessian = jax.hessian(first, 1)(x, t)
    mixed = np.asarray(jax.jacfwd(jax.grad(first), 1)(x, t))
    x64_row = np.array(row)

    def reference_first(x, t):
        return ref(x, where=keep, temperature=t)[i]

    expected = _central(lambda t: reference_first(x64_row, t), t)[1]
    close(hessian, expected, rtol=1e-6, atol=1e-9)
    if name == "log_softmax" and keep is None and row[1] == -inf:
        close(hessian, -0.41468, rtol=1e-4)
    # The mixed derivatives in each finite, kept entry; 0 in -inf and masked ones
    # (constant). A +inf entry's gradient is the rule's, not a limit: finite here.
    for j, v in enumerate(row):
        if v == inf:
            assert np.isfinite(mixed[j]), mixed
            continue
        if v == -inf or (keep is not None and not keep[j]):
            assert mixed[j] == 0, mixed
            continue

        def along(t, j=j):
            return _central(
                lambda h: reference_first(x64_row + h * (np.arange(len(row)) == j), t), 0.0
            )[0]

        close(mixed[j], _central(along, t)[0], rtol=1e-5, atol=1e-8)


@ALL
def test_transforms_compose(name):
    ours, _ = FUNCS[name]
    x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 5)), jnp.float32)

    def scalar(v):
        return jnp.sum(jnp.sin(ours(v)))

    g = jax.grad(scalar)(x)
    close(jax.jit(jax.grad(scalar))(x), g, rtol=1e-5)
    close(jax.jacfwd(scalar)(x), g, rtol=1e-5)
    close(jax.jacrev(scalar)(x), g, rtol=1e-5)
    h = jax.hessian(scalar)(x)
    assert h.shape == (4, 5, 4, 5) and np.isfinite(np.asarray(h)).all()
    close(h.reshape(20, 20), h.reshape(20, 20).T, atol=1e-5)


@ALL
def test_vmap_matches_python_loop(name):
    ours, _ = FUNCS[name]
    x = jnp.asarray(np.random.default_rng(7).standard_normal((6, 3, 5)), jnp.float32)
    where = jnp.asarray(np.random.default_rng(8).random((6, 3, 5)) < 0.6)
    batched = jax.vmap(lambda v, w: ours(v, where=w))(x, where)
    looped = jnp.stack([ours(v, where=w) for v, w in zip(x, where, strict=True)])
    # a backend may order a batched reduction differently: an ulp apart
    np.testing.assert_allclose(batched, looped, rtol=4e-7, atol=0)


@ALL
def test_second_jitted_call_does_not_retrace(name):
    traces = []

    @jax.jit
    def f(x, where):
        traces.append(1)
        return FUNCS[name][0](x, where=where)

    x = jnp.ones((3, 4))
    f(x, x > 0)
    f(x + 1, x < 0)
    assert len(traces) == 1


# ---------------------------------------------------------------- what the backward keeps


@ALL
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("options", ["plain", "where", "row where", "temperature"])
def test_backward_keeps_one_array_in_the_input_dtype(name, dtype, options):
    """As jax.nn: one [..., K] residual, in the input's dtype (x itself); a mask as given."""
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((16, 384)), dtype)
    where = jnp.asarray(rng.random((16, 384)) < 0.9)
    kwargs = {
        "plain": {},
        "where": {"where": where},
        "row where": {"where": where[:, :1]},
        "temperature": {"temperature": jnp.full((16, 1), 1.5)},
    }[options]
    if name == "logsumexp" and options == "temperature":
        pytest.skip("logsumexp takes no temperature")
    f = FUNCS[name][0]
    residuals = saved_residuals(lambda v: jnp.sum(f(v, **kwargs).astype(jnp.float32) ** 2), x)
    large = [r for r in residuals if np.prod(r[1]) >= x.size and r[0] != "bool"]
    # the last is the test's own square's: its input, the output in float32
    ours = [r for r in large if "from the argument" in r[2] or "jsoftmax" in r[2]]
    assert len(ours) == 1, residuals
    assert ours[0] == ({jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype], x.shape, ours[0][2])


@ALL
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_hold_no_optimization_barrier(name, platform):
    x = jnp.ones((8, 128), jnp.bfloat16)
    f = FUNCS[name][0]
    scaled = {} if name == "logsumexp" else {"temperature": 2.0}
    value_and_grad = jax.value_and_grad(lambda v: jnp.sum(f(v, where=v > 0, **scaled)))
    assert "optimization_barrier" not in lowered_for(value_and_grad, platform, x)


@ALL
def test_value_and_gradient_take_each_row_statistic_once(name):
    """One max and one sum of exponentials per row serve the value and the gradient
    (softmax and log_softmax add the sum against the cotangent): the statistics the
    tangent takes are the value's own expression, so XLA computes them once. A second,
    differently shaped copy cost logsumexp a pass over the logits (1.25x jax.nn's
    memory traffic on an H200). Compiled for the CPU: a GPU's fusions clone a reduce into
    each kernel that reads it (softmax's program holds 5 on an H200, at jax.nn's time)."""
    x = jax.device_put(jnp.ones((8, 128), jnp.bfloat16), jax.devices("cpu")[0])
    f = FUNCS[name][0]
    g = jnp.ones(jax.eval_shape(f, x).shape, x.dtype)

    def value_and_pullback(v, g):
        y, pullback = jax.vjp(f, v)
        return y, pullback(g)

    hlo = jax.jit(value_and_pullback).lower(x, g).compile().as_text()
    assert len(re.findall(r" reduce\(", hlo)) == (2 if name == "logsumexp" else 3)


@pytest.mark.parametrize(
    "name, scaling",
    [
        *(
            (name, s)
            for name in ["softmax", "log_softmax"]
            for s in ["temperature", "per-row temperature"]
        ),
        *((name, "caller's multiply") for name in FUNCS),
    ],
)
@pytest.mark.parametrize("shape", [(3, 4), (1000, 10), (4096, 1000)])
def test_huge_logits_scaled_keep_their_limit(name, shape, scaling):
    """Finite logits near 2e10 and +-3e38, scaled by a temperature or by a multiply that
    XLA fuses from the caller's program: values and gradients are the float64 limit
    (a one-hot or uniform row; logsumexp the max plus a rounding), not 0 or -inf. XLA may
    compile ``x * (1 / T) - m`` to one fused multiply-add, which leaves the max's own
    exponent off by x's rounding (about 1e3 here, so its term underflows): softmax's
    clamp of the shift sits between them, and logsumexp takes the max where its row sum
    comes out 0 or inf."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2e10).astype(np.float32)
    x[0] = 2e10  # a tie across the row: uniform
    x[1, :2] = [3e38, -3e38]
    t = np.float32(3.0)
    f = FUNCS[name][0]
    if scaling == "caller's multiply":
        run = jax.jit(lambda v: f(v * (1 / t)))
    else:
        temperature = t if scaling == "temperature" else np.full((shape[0], 1), t)
        run = functools.partial(f, temperature=temperature)
    alone, (y, pullback) = run(x), jax.vjp(run, x)  # XLA compiles each differently
    g = np.cos(np.arange(y.size, dtype=np.float32)).reshape(y.shape)
    p = reference.softmax(x, temperature=t)
    # The chain rule through x / T, in float64: jsoftmax's gradients are p (g - sum p g) / T
    # for softmax, (g - p sum g) / T for log_softmax and p g / T for logsumexp.
    g64 = g.astype(np.float64)
    if name == "softmax":
        close(y, p)
        close(alone, p)
        grad = p * (g64 - np.sum(p * g64, -1, keepdims=True)) / t
    else:  # x / T - max / T rounds in float32: a few ulps of the logits' scale
        x64 = np.abs(x.astype(np.float64))
        scale = (x64 + np.max(x64, -1, keepdims=True)) / t
        expected = reference.log_softmax(x, temperature=t)
        if name == "logsumexp":
            expected, scale = reference.logsumexp(x / np.float64(t)), np.max(scale, -1)
        for value in (y, alone):
            assert np.all(
                np.abs(np.asarray(value, np.float64) - expected) <= 2.0**-21 * scale + 1e-6
            )
        if name == "log_softmax":
            grad = (g64 - p * np.sum(g64, -1, keepdims=True)) / t
        else:
            grad = p * g64[:, None] / t
    close(pullback(g)[0], grad, rtol=1e-5, atol=1e-6)


@NORMALISERS
def test_core_equals_the_cpu_schedules(name, x64):
    """What GPUs and TPUs run (the plain core) gives the CPU schedules' softmax and
    log_softmax values and gradients (jsoftmax._cpu's family_max, at_least_one,
    softmax_probs), at the edges too, and its derivatives check to order 2."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((4, 16)))
    x = x.at[0, 3].set(-np.inf).at[1, 2].set(np.inf).at[2, 5].set(np.nan)
    where = jnp.asarray(rng.random((4, 16)) < 0.8).at[3].set(False)
    f = FUNCS[name][0]

    def value_and_pullback(v):
        y, pullback = jax.vjp(lambda v: f(v, where=where), v)
        return y, pullback(jnp.cos(y))

    cpu = value_and_pullback(x)
    with core_schedules():
        core = value_and_pullback(x)
        finite = jnp.where(jnp.isfinite(x), x, 0.0)
        check_grads_order_two(lambda v: f(v, where=where), (finite,))
    for a, b in zip(core, cpu, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)


@ALL
def test_an_empty_class_axis_is_a_fully_masked_row(name):
    # As jax.nn: logsumexp over no class is -inf, softmax of no class is empty.
    x = jnp.ones((2, 0), jnp.bfloat16)
    got = getattr(jsoftmax, name)(x)
    want = jax.nn.logsumexp(x, axis=-1) if name == "logsumexp" else getattr(jax.nn, name)(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    np.testing.assert_array_equal(got, want)
