"""linear_log_probs and linear_distillation_loss against their unfused computations."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from tests.conftest import lowered_for
from tests.test_linear import (
    assert_same,
    fused,
    on_eight_cpu_devices,
    problem,
    unfused,
    value_and_grads,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def unfused_log_probs(hidden, weight, bias, labels, where=None, temperature=1.0, entropy=False):
    z = (hidden @ weight + (0 if bias is None else bias)) / temperature
    log_p = jax.nn.log_softmax(z)
    outputs = [jnp.take_along_axis(log_p, labels[..., None], -1)[..., 0]]
    if entropy:
        outputs.append(-jnp.sum(jnp.exp(log_p) * log_p, -1))
    if where is not None:
        outputs = [jnp.where(where, o, 0.0) for o in outputs]
    return tuple(outputs) if entropy else outputs[0]


def fused_log_probs(
    hidden, weight, bias, labels, where=None, temperature=1.0, entropy=False, **options
):
    return jsoftmax.linear_log_probs(
        hidden,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        where=where,
        return_entropy=entropy,
        **options,
    )


def grpo(log_p, entropy, old_log_p, advantage):
    """GRPO's clipped surrogate with an entropy bonus, per token."""
    ratio = jnp.exp(log_p - old_log_p)
    clipped = jnp.clip(ratio, 0.8, 1.2)
    return -jnp.minimum(ratio * advantage, clipped * advantage) - 0.01 * entropy


def grpo_without_entropy(log_p, old_log_p, advantage):
    return grpo(log_p, 0.0, old_log_p, advantage)


def unfused_log_probs_loss(h, w, b, labels, args, where, temperature, entropy, reduction):
    outputs = unfused_log_probs(h, w, b, labels, where, temperature, entropy)
    outputs = outputs if entropy else (outputs,)
    per_token = (grpo if entropy else grpo_without_entropy)(*outputs, *args)
    if where is not None:
        per_token = jnp.where(where, per_token, 0.0)
    if reduction == "none":
        return per_token
    count = per_token.size if where is None else np.sum(where)
    return jnp.sum(per_token) / (max(count, 1) if reduction == "mean" else 1)


def policy_args(labels, seed=4):
    rng = np.random.default_rng(seed)
    old = -3.0 + 0.3 * rng.standard_normal(labels.shape).astype(np.float32)
    return old, rng.standard_normal(labels.shape).astype(np.float32)


def unfused_distillation(
    s_h,
    s_w,
    s_b,
    t_h,
    t_w,
    t_b,
    where=None,
    temperature=1.0,
    divergence="forward_kl",
    beta=0.5,
    reduction="none",
):
    def logits(h, w, b):
        return (h @ w + (0 if b is None else b)) / temperature

    log_q, log_p = (
        jax.nn.log_softmax(logits(s_h, s_w, s_b)),
        jax.nn.log_softmax(logits(t_h, t_w, t_b)),
    )
    log_p = jax.lax.stop_gradient(log_p)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    if divergence == "forward_kl":
        loss = jnp.sum(p * (log_p - log_q), -1)
    elif divergence == "reverse_kl":
        loss = jnp.sum(q * (log_q - log_p), -1)
    else:
        log_m = jnp.log(beta * p + (1 - beta) * q)
        loss = beta * jnp.sum(p * (log_p - log_m), -1) + (1 - beta) * jnp.sum(
            q * (log_q - log_m), -1
        )
    loss = temperature**2 * loss
    counts = jnp.ones(loss.shape, bool) if where is None else where
    loss = jnp.where(counts, loss, 0.0)
    if reduction == "sum":
        return jnp.sum(loss)
    if reduction == "mean":
        return jnp.sum(loss) / jnp.maximum(jnp.sum(counts), 1)
    return loss


def fused_distillation(s_h, s_w, s_b, t_h, t_w, t_b, where=None, **options):
    return jsoftmax.linear_distillation_loss(
        s_h, s_w, t_h, t_w, student_bias=s_b, teacher_bias=t_b, where=where, **options
    )


def teacher(n, d, v, seed, dtype=np.float32, batch=None):
    """A teacher head with its own width ``d`` over the same vocabulary."""
    hidden, weight, bias, _, _ = problem(n, d, v, seed=seed + 100, dtype=dtype, batch=batch)
    return hidden, 1.5 * weight, bias


def vjp_all(f, primals, seed=3):
    """f's value and its pullback of random cotangents (one per output)."""
    value, pullback = jax.vjp(f, *primals)
    leaves, structure = jax.tree.flatten(value)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    cts = [
        np.asarray(jax.random.normal(k, v.shape, jnp.float32), v.dtype)  # the same in any dtype
        for k, v in zip(keys, leaves, strict=True)
    ]
    cts = jax.tree.unflatten(structure, cts)
    return value, pullback(cts)


# ---------------------------------------------------------------- linear_log_probs


@pytest.mark.parametrize("entropy", [False, True], ids=["log_probs", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
def test_log_probs_equal_the_unfused_values_and_gradients(entropy, temperature, masked):
    hidden, weight, bias, labels, where = problem(37, 16, 50, seed=int(10 * temperature))
    where = where if masked else None

    def call(f, **options):
        return lambda h, w, b, t: f(h, w, b, labels, where, t, entropy, **options)

    primals = (hidden, weight, bias, np.float32(temperature))
    ours = vjp_all(call(fused_log_probs, chunk_size=8), primals)
    theirs = vjp_all(call(unfused_log_probs), primals)
    assert_same(ours, theirs, rtol=5e-5, atol=5e-6)


def test_log_probs_leading_axes_jit_vmap_and_no_bias():
    hidden, weight, _, labels, where = problem(6, 8, 21, batch=(2, 3))
    f = jax.jit(
        lambda h, w: jsoftmax.linear_log_probs(
            h, w, labels, where=where, return_entropy=True, chunk_size=5
        )
    )
    assert [o.shape for o in f(hidden, weight)] == [(2, 3, 6)] * 2
    assert_same(
        f(hidden, weight), unfused_log_probs(hidden, weight, None, labels, where, entropy=True)
    )
    # vmap over a batch of heads (say, several policies scoring the same tokens)
    weights = np.stack([weight, 0.5 * weight, -weight])
    batched = jax.vmap(lambda w: jsoftmax.linear_log_probs(hidden, w, labels, chunk_size=4))
    want = [unfused_log_probs(hidden, w, None, labels) for w in weights]
    np.testing.assert_allclose(batched(weights), np.stack(want), rtol=2e-5, atol=2e-6)
    grads = jax.grad(lambda ws: jnp.sum(batched(ws) ** 2))(weights)
    want_grads = jax.grad(
        lambda ws: sum(jnp.sum(unfused_log_probs(hidden, w, None, labels) ** 2) for w in ws)
    )(weights)
    np.testing.assert_allclose(grads, want_grads, rtol=1e-4, atol=1e-5)


def test_log_probs_float64(x64):
    hidden, weight, bias, labels, where = problem(9, 4, 13, dtype=np.float64)
    primals = (hidden, weight, bias, np.float64(1.3))
    ours = vjp_all(lambda *a: fused_log_probs(*a[:3], labels, where, a[3], True), primals)
    theirs = vjp_all(lambda *a: unfused_log_probs(*a[:3], labels, where, a[3], True), primals)
    assert ours[0][0].dtype == jnp.float64
    assert_same(ours, theirs, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_log_probs_low_precision_in_float32_out(dtype):
    hidden, weight, bias, labels, _ = (
        a.astype(dtype) if a.dtype == np.float32 else a for a in problem(40, 32, 300)
    )
    (logp, entropy), grads = vjp_all(
        lambda h, w, b: fused_log_probs(h, w, b, labels, entropy=True), (hidden, weight, bias)
    )
    assert logp.dtype == entropy.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    upcast = [np.asarray(a, np.float32) for a in (hidden, weight, bias)]
    (want_logp, want_entropy), want_grads = vjp_all(
        lambda h, w, b: unfused_log_probs(h, w, b, labels, entropy=True), upcast
    )
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-2)


def test_log_probs_traced_out_of_range_label_makes_its_token_nan():
    hidden, weight, bias, labels, _ = problem(6, 4, 10)
    labels[2] = -1
    f = jax.jit(lambda y: jsoftmax.linear_log_probs(hidden, weight, y, return_entropy=True))
    for out in f(labels):
        out = np.asarray(out)
        assert np.isnan(out[2]) and np.isfinite(np.delete(out, 2)).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_stays_finite_where_the_temperature_squared_overflows(divergence):
    """Past sqrt(finfo.max) (1.8e19 in float32) ``T**2`` is inf while the divergence of
    the scaled logits is about 0: the loss is ``T * (T * kl)``, finite (inf * 0 was NaN)."""
    rng = np.random.default_rng(0)
    hidden, teacher = (rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2))
    weight = rng.standard_normal((4, 9)).astype(np.float32)

    def loss(h):
        return jsoftmax.linear_distillation_loss(
            h, weight, teacher, weight, temperature=1e20, divergence=divergence
        )

    value, grad = loss(hidden), jax.grad(lambda h: loss(h).sum())(hidden)
    assert np.isfinite(value).all() and np.isfinite(grad).all()


def test_heads_keep_huge_logits_under_a_temperature():
    """Logits near 2e10 (a tie) and spread near 1e9, divided by a temperature: the heads'
    values and gradients are the float64 limit. They shift before dividing: ``z / T - m``
    may compile to one fused multiply-add, which leaves the max's own term off by the
    rounding of ``z / T`` (it underflowed, and the log-probabilities came out inf). A
    row spanning +-3e38 (its bias) keeps its finite log-probabilities too."""
    rng = np.random.default_rng(5)
    hidden = np.concatenate([np.full((1, 2), 1e5), rng.standard_normal((7, 2)) * 3e4])
    weight = np.full((2, 8), 1e5) * np.concatenate([np.ones((2, 1)), 1 + rng.random((2, 7))], 1)
    hidden, weight = hidden.astype(np.float32), weight.astype(np.float32)
    labels = jnp.asarray(rng.integers(0, 8, 8))
    t = 3.0
    z = hidden.astype(np.float64) @ weight.astype(np.float64) / t
    log_p = z - np.max(z, 1, keepdims=True)
    log_p -= np.log(np.sum(np.exp(log_p), 1, keepdims=True))
    p = np.exp(log_p)
    scale = 2.0**-20 * np.max(np.abs(z), 1)
    (value, entropy), pullback = jax.vjp(
        lambda h: jsoftmax.linear_log_probs(h, weight, labels, temperature=t, return_entropy=True),
        hidden,
    )
    want = np.take_along_axis(log_p, np.asarray(labels)[:, None], 1)[:, 0]
    assert np.all(np.abs(np.asarray(value, np.float64) - want) <= scale + 1e-6)
    entropy_want = -np.sum(np.where(p > 0, p * log_p, 0.0), 1)
    assert np.all(np.abs(np.asarray(entropy, np.float64) - entropy_want) <= scale + 1e-6)
    (dh,) = pullback((jnp.ones(8), jnp.zeros(8)))
    onehot = np.arange(8) == np.asarray(labels)[:, None]
    np.testing.assert_allclose(dh, (onehot - p) @ weight.T.astype(np.float64) / t, rtol=1e-4)
    kl = jsoftmax.linear_distillation_loss(hidden, weight, hidden, weight, temperature=t)
    np.testing.assert_array_equal(kl, 0.0)
    bias = np.array([3e38, -3e38, 0.0, 1.0], np.float32)
    for t in (3.0, 4.0):
        log_p = jsoftmax.linear_log_probs(
            np.zeros((4, 2), np.float32),
            np.zeros((2, 4), np.float32),
            jnp.arange(4),
            bias=bias,
            temperature=t,
        )
        want = (bias.astype(np.float64) - np.float64(bias[0])) / t
        np.testing.assert_allclose(log_p, want, rtol=1e-6)
    # The smallest temperatures (below 2 finfo.tiny, half of them is subnormal: all NaN).
    logits = np.array([[1e-38, 0.0, -1e-38]], np.float32)
    for t in (1.5e-38, 1.1754944e-38):
        log_p, entropy = jsoftmax.linear_log_probs(
            np.ones((1, 1), np.float32), logits, jnp.arange(1), temperature=t, return_entropy=True
        )
        want = jsoftmax.log_softmax(logits, temperature=t)[0, 0]
        np.testing.assert_allclose(log_p, [want], rtol=1e-6)
        assert np.isfinite(entropy).all()


def test_log_probs_errors():
    hidden, weight, bias, labels, where = problem(6, 4, 10)
    f = jsoftmax.linear_log_probs
    with pytest.raises(TypeError, match="hidden must be floating"):
        f(labels[:, None], weight, labels)
    with pytest.raises(ValueError, match=r"hidden has shape \(6, 4\) and weight \(5, 10\)"):
        f(hidden, np.ones((5, 10), np.float32), labels)
    with pytest.raises(ValueError, match=r"bias has shape \(9,\) but weight \(4, 10\)"):
        f(hidden, weight, labels, bias=bias[:9])
    with pytest.raises(ValueError, match=r"label 10 at position \(1,\) is out of range"):
        f(hidden, weight, np.array([0, 10, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        f(hidden, weight, labels, temperature=0.0)
    # A flag is True or False (a truthy "no" returned the entropies too).
    for bad in ("no", np.array([True, False])):
        with pytest.raises(TypeError, match="return_entropy must be True or False"):
            f(hidden, weight, labels, return_entropy=bad)
    with pytest.raises(TypeError, match="return_entropy must be concrete"):
        jax.jit(lambda flag: f(hidden, weight, labels, return_entropy=flag))(True)
    assert len(f(hidden, weight, labels, return_entropy=jnp.array(True))) == 2
    with pytest.raises(TypeError, match="temperature must be a real number or array, got 'a'"):
        f(hidden, weight, labels, temperature="a")
    with pytest.raises(ValueError, match=r"temperature must be a scalar, got shape \(2,\)"):
        f(hidden, weight, labels, temperature=np.ones(2))
    with pytest.raises(ValueError, match=r"where has shape \(5,\)"):
        f(hidden, weight, labels, where=where[:5])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        f(hidden, weight, labels, chunk_size=0)
    # Checked before anything reads them, masked or not: int32 would wrap 2**32 to 0.
    wide = np.array(labels, np.int64)
    wide[1] = 2**32
    with pytest.raises(ValueError, match=r"label 4294967296 at position \(1,\)"):
        f(hidden, weight, wide, where=np.ones(6, bool))


def test_log_probs_padded_vocabulary_confident_rows_and_masked_padding_labels(x64):
    """A -inf bias (padded classes), low temperatures (confident rows) and -100 labels on
    masked tokens: the float64 computation of the same float32 inputs is the reference."""
    hidden, weight, bias, labels, where = problem(12, 8, 40, seed=7)
    bias[-5:] = -np.inf
    labels = np.where(where, labels % 35, -100)
    for temperature in (1.0, 0.05):

        def fused(h, w, b, t):
            return jsoftmax.linear_log_probs(
                h,
                w,
                labels,
                bias=b,
                temperature=t,
                where=where,
                return_entropy=True,
                chunk_size=5,
            )

        def reference(h, w, b, t):
            log_p = jsoftmax.log_softmax(h @ w + b, temperature=t)
            logp = jnp.take_along_axis(log_p, np.maximum(labels, 0)[:, None], -1)[:, 0]
            entropy = -jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * log_p, 0.0), -1)
            return jnp.where(where, logp, 0.0), jnp.where(where, entropy, 0.0)

        primals = (hidden, weight, bias, np.float32(temperature))
        ours = vjp_all(fused, primals)
        theirs = vjp_all(reference, [np.float64(a) for a in primals])
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, np.asarray(b, np.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", [-np.inf, -3e38])
def test_log_probs_of_a_label_on_a_padded_class_are_minus_inf_and_constant(padding):
    """A kept token whose label sits on a -inf class (or one whose z / T overflows to
    -inf: -3e38 at T = 0.7): log p = -inf whatever the other logits and the temperature,
    so no gradient, as jsoftmax.log_softmax gives (it gave the -inf class's bias and
    weights the label's gradient, and at -3e38 the temperature a finite one); its
    entropy's gradient is kept."""
    hidden, weight, bias, labels, _ = problem(12, 8, 40, seed=8)
    bias[-5:] = padding
    labels[::3] = 37

    def fused(h, w, b, t):
        return jsoftmax.linear_log_probs(
            h, w, labels, bias=b, temperature=t, return_entropy=True, chunk_size=5
        )

    def reference(h, w, b, t):
        log_p = jsoftmax.log_softmax(h @ w + b, temperature=t)
        entropy = -jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * log_p, 0.0), -1)
        return jnp.take_along_axis(log_p, labels[:, None], -1)[:, 0], entropy

    primals = (hidden, weight, bias, np.float32(0.7))
    ours = vjp_all(fused, primals)
    theirs = vjp_all(reference, [np.float64(a) for a in primals])
    assert np.all(ours[0][0][::3] == -np.inf)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, np.asarray(b, np.float32), rtol=1e-4, atol=1e-5)


def test_vocabulary_slices_under_a_named_vmap_get_their_own_gradients():
    """axis_name may name a jax.vmap (or pmap) axis: the gradient taken inside is each
    slice's part of the unsharded one (a check_vma=False rescaling once doubled it)."""
    hidden, weight, _, labels, _ = problem(6, 4, 10, seed=2)

    def head(w, axis_name=None):
        return jsoftmax.linear_softmax_cross_entropy(
            hidden, w, labels, reduction="sum", axis_name=axis_name
        )

    full = jax.grad(head)(weight)
    slices = jnp.stack(jnp.split(weight, 2, axis=1))
    got = jax.vmap(jax.grad(functools.partial(head, axis_name="v")), axis_name="v")(slices)
    np.testing.assert_allclose(jnp.concatenate(list(got), axis=1), full, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- linear_log_probs_loss


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("entropy", [False, True], ids=["log_probs", "entropy"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
def test_log_probs_loss_equals_the_unfused_values_and_gradients(reduction, entropy, masked):
    hidden, weight, bias, labels, where = problem(37, 16, 50, seed=7)
    where = where if masked else None
    args = policy_args(labels)

    def ours(h, w, b, t):
        loss = grpo if entropy else grpo_without_entropy
        return jsoftmax.linear_log_probs_loss(
            h, w, labels, loss, args, bias=b, temperature=t, where=where,
            with_entropy=entropy, reduction=reduction, chunk_size=8,
        )  # fmt: skip

    def theirs(h, w, b, t):
        return unfused_log_probs_loss(h, w, b, labels, args, where, t, entropy, reduction)

    primals = (hidden, weight, bias, np.float32(0.7))
    assert_same(vjp_all(ours, primals), vjp_all(theirs, primals), rtol=5e-5, atol=5e-6)


def test_log_probs_loss_leading_axes_jit_low_precision_and_traced_bad_label():
    hidden, weight, bias, labels, where = problem(6, 8, 21, batch=(2, 3))
    args = policy_args(labels)

    def loss(h, w, y, reduction="none"):
        return jsoftmax.linear_log_probs_loss(
            h, w, y, grpo, args, with_entropy=True, where=where, reduction=reduction,
            chunk_size=5,
        )  # fmt: skip

    got = jax.jit(loss)(hidden, weight, labels)
    assert got.shape == (2, 3, 6)
    assert_same(
        got, unfused_log_probs_loss(hidden, weight, None, labels, args, where, 1.0, True, "none")
    )
    low = [a.astype(jnp.bfloat16) for a in (hidden, weight)]
    value, grads = jax.value_and_grad(lambda h, w: loss(h, w, labels, "mean"), (0, 1))(*low)
    assert value.dtype == jnp.float32 and [g.dtype for g in grads] == [jnp.bfloat16] * 2
    bad = labels.copy()
    bad[0, 1, 2] = 21
    got = np.asarray(jax.jit(loss)(hidden, weight, bad))
    assert np.isnan(got[0, 1, 2]) == bool(where[0, 1, 2])
    assert np.isfinite(np.delete(got.reshape(-1), 8)).all()


def test_log_probs_loss_scalar_arguments_other_dtypes_float64_and_one_compile(x64):
    hidden, weight, bias, labels, where = problem(20, 8, 30, seed=2, dtype=np.float64)
    args = [a.astype(np.float64) for a in policy_args(labels)]

    def clipped(log_p, old, advantage, eps):  # eps: a scalar, broadcast to the tokens
        ratio = jnp.exp(log_p - old)
        return -jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - eps, 1 + eps) * advantage)

    def ours(h, w, b):
        return jsoftmax.linear_log_probs_loss(
            h, w, labels, clipped, (*args, 0.2), bias=b, where=where, chunk_size=6
        )

    def theirs(h, w, b):
        return unfused_log_probs_loss(h, w, b, labels, args, where, 1.0, False, "mean")

    primals = (hidden, weight, bias)
    got = vjp_all(ours, primals)
    assert got[0].dtype == jnp.float64
    assert_same(got, vjp_all(theirs, primals), rtol=1e-12, atol=1e-13)
    # A loss in another dtype than the log-probabilities is taken as it comes.
    lowp = jsoftmax.linear_log_probs_loss(
        hidden, weight, labels, lambda *a: clipped(*a).astype(jnp.float32), (*args, 0.2),
        bias=bias, where=where, chunk_size=6,
    )  # fmt: skip
    np.testing.assert_allclose(lowp, got[0], rtol=1e-6)
    # The same token_loss compiles once.
    from jsoftmax._linear import _call

    ours(hidden, weight, bias)
    before = _call._cache_size()
    ours(hidden, weight, 0.5 * bias)
    assert _call._cache_size() == before


def test_log_probs_loss_takes_a_token_loss_by_identity():
    """A callable dataclass (unhashable, or equal by value) is static by identity."""

    @dataclasses.dataclass
    class Policy:
        weight: float = 1.0

        def __call__(self, log_p, advantage):
            return -self.weight * advantage * log_p

    hidden, weight, bias, labels, where = problem(6, 4, 10)
    advantage = np.linspace(-1, 1, 6).astype(np.float32)
    got = jsoftmax.linear_log_probs_loss(hidden, weight, labels, Policy(), (advantage,))
    want = jnp.mean(-advantage * fused_log_probs(hidden, weight, None, labels))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_log_probs_loss_errors():
    hidden, weight, _, labels, _ = problem(6, 4, 10)
    args = policy_args(labels)
    loss = jsoftmax.linear_log_probs_loss
    with pytest.raises(TypeError, match="token_loss must be callable"):
        loss(hidden, weight, labels, None, args)
    with pytest.raises(TypeError, match="with_entropy must be True or False"):
        loss(hidden, weight, labels, grpo_without_entropy, args, with_entropy="yes")
    with pytest.raises(ValueError, match=r"token_args\[1\] has shape \(5,\), which does not"):
        loss(hidden, weight, labels, grpo_without_entropy, (args[0], args[1][:5]))
    with pytest.raises(TypeError, match="token_args must be a tuple of arrays"):
        loss(hidden, weight, labels, grpo_without_entropy, args[0])
    with pytest.raises(ValueError, match="token_loss must be elementwise"):
        loss(hidden, weight, labels, lambda log_p, old, a: jnp.mean(log_p), args)
    with pytest.raises(TypeError, match=r"token_args\[0\] must be floating"):
        loss(hidden, weight, labels, grpo_without_entropy, (labels, args[1]))
    for bad in (None, "0.5", [1.0, [2.0]]):  # JAX's own errors named no argument
        with pytest.raises(TypeError, match=r"token_args\[1\] must be an array"):
            loss(hidden, weight, labels, grpo_without_entropy, (args[0], bad))

    def scaled(log_p, old, advantage, scale):
        return scale * grpo_without_entropy(log_p, old, advantage)

    # An integer scalar is a number as 0.2 is (it raised "must be floating"); arrays must float.
    for two in (2, np.int64(2)):
        np.testing.assert_array_equal(
            loss(hidden, weight, labels, scaled, (*args, two)),
            loss(hidden, weight, labels, scaled, (*args, 2.0)),
        )
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss(hidden, weight, labels, grpo_without_entropy, args, reduction="max")
    with pytest.raises(ValueError, match="out of range"):
        loss(hidden, weight, labels + 10, grpo_without_entropy, args)


# ---------------------------------------------------------------- linear_distillation_loss


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_equals_the_unfused_loss(divergence, reduction, temperature):
    s_h, s_w, s_b, _, where = problem(37, 16, 50, seed=2)
    t_h, t_w, t_b = teacher(37, 24, 50, seed=2)  # a wider teacher
    options = {
        "divergence": divergence,
        "reduction": reduction,
        "temperature": temperature,
        "beta": 0.3,
    }

    def call(f, **more):
        return lambda h, w, b: f(h, w, b, t_h, t_w, t_b, where, **options, **more)

    ours = vjp_all(call(fused_distillation, chunk_size=8), (s_h, s_w, s_b))
    theirs = vjp_all(call(unfused_distillation), (s_h, s_w, s_b))
    assert_same(ours, theirs, rtol=5e-5, atol=5e-6)


def test_distillation_teacher_is_a_constant_and_no_biases():
    s_h, s_w, _, _, _ = problem(10, 8, 30, seed=4)
    t_h, t_w, _ = teacher(10, 8, 30, seed=4)
    grads = jax.grad(
        lambda *a: jsoftmax.linear_distillation_loss(*a, reduction="mean"), argnums=(0, 1, 2, 3)
    )(s_h, s_w, t_h, t_w)
    assert np.any(grads[0]) and np.any(grads[1])
    assert not np.any(grads[2]) and not np.any(grads[3])
    got = jsoftmax.linear_distillation_loss(s_h, s_w, t_h, t_w, divergence="jsd")
    want = unfused_distillation(s_h, s_w, None, t_h, t_w, None, divergence="jsd")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_distillation_of_a_model_by_itself_is_zero():
    s_h, s_w, s_b, _, _ = problem(12, 8, 30, seed=5)
    for divergence in DIVERGENCES:
        loss = jsoftmax.linear_distillation_loss(
            s_h,
            s_w,
            s_h,
            s_w,
            student_bias=s_b,
            teacher_bias=s_b,
            divergence=divergence,
            temperature=3.0,
        )
        np.testing.assert_allclose(loss, 0.0, atol=1e-5)


def test_distillation_leading_axes_jit_vmap_float64_and_empty_mean(x64):
    s_h, s_w, s_b, _, where = problem(5, 4, 13, dtype=np.float64, batch=(2,))
    t_h, t_w, t_b = teacher(5, 6, 13, seed=0, dtype=np.float64, batch=(2,))
    f = jax.jit(
        lambda h: fused_distillation(
            h, s_w, s_b, t_h, t_w, t_b, where, chunk_size=3, divergence="reverse_kl"
        )
    )
    got = f(s_h)
    assert got.shape == (2, 5) and got.dtype == jnp.float64
    want = unfused_distillation(s_h, s_w, s_b, t_h, t_w, t_b, where, divergence="reverse_kl")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    per_batch = jax.vmap(
        lambda h, th, m: fused_distillation(h, s_w, s_b, th, t_w, t_b, m, reduction="mean")
    )
    want = [
        unfused_distillation(s_h[i], s_w, s_b, t_h[i], t_w, t_b, where[i], reduction="mean")
        for i in range(2)
    ]
    np.testing.assert_allclose(per_batch(s_h, t_h, where), want, rtol=1e-12)
    empty = np.zeros((2, 5), bool)
    value, grads = vjp_all(
        lambda h, w: fused_distillation(h, w, s_b, t_h, t_w, t_b, empty, reduction="mean"),
        (s_h, s_w),
    )
    assert value == 0.0 and not any(np.any(g) for g in grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_distillation_low_precision_in_float32_out(dtype):
    s_h, s_w, s_b, _, _ = (
        a.astype(dtype) if a.dtype == np.float32 else a for a in problem(40, 32, 300)
    )
    t_h, t_w, t_b = (a.astype(dtype) for a in teacher(40, 16, 300, seed=1))
    value, grads = vjp_all(
        lambda h, w, b: fused_distillation(h, w, b, t_h, t_w, t_b, reduction="mean"),
        (s_h, s_w, s_b),
    )
    assert value.dtype == jnp.float32 and [g.dtype for g in grads] == [dtype] * 3
    up = [np.asarray(a, np.float32) for a in (s_h, s_w, s_b, t_h, t_w, t_b)]
    want, want_grads = vjp_all(
        lambda h, w, b: unfused_distillation(h, w, b, *up[3:], reduction="mean"), up[:3]
    )
    np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-3)


def test_distillation_padded_vocabulary_and_confident_teacher():
    """-inf biases on padded classes (both heads) and a teacher whose probabilities underflow:
    finite, and equal to the divergence over the real classes."""
    s_h, s_w, s_b, _, _ = problem(10, 8, 30, seed=8)
    t_h, t_w, t_b = teacher(10, 6, 30, seed=8)
    t_w = 40 * t_w  # a confident teacher: most of its probabilities are exactly 0
    s_b[-4:] = t_b[-4:] = -np.inf
    for divergence in DIVERGENCES:

        def fused(h, w, b, d=divergence):
            return fused_distillation(h, w, b, t_h, t_w, t_b, divergence=d, temperature=1.5)

        def reference(h, w, b, d=divergence):
            return unfused_distillation(
                h, w[:, :-4], b[:-4], t_h, t_w[:, :-4], t_b[:-4], divergence=d, temperature=1.5
            )

        ours = vjp_all(fused, (s_h, s_w, s_b))
        theirs = vjp_all(reference, (s_h, s_w, s_b))
        assert all(np.isfinite(a).all() for a in jax.tree.leaves(ours))
        _, (_, d_w, d_b) = ours
        assert not np.any(d_w[:, -4:]) and not np.any(d_b[-4:])  # the padded classes
        # The losses reach 1e3 and the gradients 1e2: to the rounding of their sums, whose
        # order a GPU changes (an entry near 1 was 1.4e-4 off on an H200).
        assert_same(ours, theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "case", ["empty student", "empty teacher", "both empty", "-inf student class", "+inf student"]
)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_at_infinite_logits_is_the_unfused_limit(divergence, case):
    """Every logit -inf (a -inf bias everywhere): probabilities 0 and log-probabilities -inf
    as jsoftmax's softmax gives them, terms weighted by 0 dropped (the forward KL gave 0 with
    a NaN gradient when both were empty, the JSD NaN). A -inf student class takes no
    gradient, as through jsoftmax.log_softmax; a +inf one at T < 1 leaves the finite
    classes' gradient (their shifted logits overflow to -inf there, yet they are not -inf
    logits)."""
    s_h, s_w, s_b, _, _ = problem(6, 8, 12, seed=9)
    t_h, t_w, t_b = teacher(6, 8, 12, seed=9)
    temperature = 0.5 if case == "+inf student" else 1.5
    if case in ("empty student", "both empty"):
        s_b = np.full_like(s_b, -np.inf)
    if case in ("empty teacher", "both empty"):
        t_b = np.full_like(t_b, -np.inf)
    if case == "-inf student class":
        s_b[2] = -np.inf
    if case == "+inf student":
        s_b[2] = np.inf

    def unfused(h, w):
        log_q = jsoftmax.log_softmax((h @ w + s_b) / temperature)
        log_p = jsoftmax.log_softmax((t_h @ t_w + t_b) / temperature)
        q, p = jnp.exp(log_q), jnp.exp(log_p)

        def kl(a, log_a, log_b):
            return jnp.sum(jnp.where(a > 0, a * (log_a - log_b), 0.0), -1)

        if divergence == "forward_kl":
            return temperature**2 * kl(p, log_p, log_q)
        if divergence == "reverse_kl":
            return temperature**2 * kl(q, log_q, log_p)
        log_m = jnp.logaddexp(jnp.log(0.3) + log_p, jnp.log(0.7) + log_q)
        return temperature**2 * (0.3 * kl(p, log_p, log_m) + 0.7 * kl(q, log_q, log_m))

    def fused(h, w):
        return fused_distillation(
            h, w, s_b, t_h, t_w, t_b, divergence=divergence, temperature=temperature, beta=0.3
        )

    ours, theirs = vjp_all(fused, (s_h, s_w)), vjp_all(unfused, (s_h, s_w))
    if case == "-inf student class":
        assert not np.any(ours[1][1][:, 2])  # no gradient reaches the -inf class
    if case == "+inf student":  # values differ by design: -finfo.max / T stands for -inf
        ours, theirs = ours[1], theirs[1]
    if case == "-inf student class" and divergence == "forward_kl":
        # The loss is +inf; the finite classes get Q - P (unfused: Q S - P, S < 1).
        assert np.all(np.asarray(ours[0]) == np.inf)
        ours, theirs = ours[0], theirs[0]
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)
    if case == "both empty":
        assert not np.any(ours[0]) and not any(np.any(g) for g in ours[1])


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_nan_logit_poisons_its_token(divergence, side):
    # The reverse KL weighs by the student's probabilities, which dropped a NaN (loss 0).
    s_h, s_w, s_b, _, _ = problem(6, 8, 12, seed=9)
    t_h, t_w, t_b = teacher(6, 8, 12, seed=9)
    (s_h if side == "student" else t_h)[1, 0] = np.nan

    def loss(h):
        return fused_distillation(h, s_w, s_b, t_h, t_w, t_b, divergence=divergence)

    value, grad = loss(s_h), jax.grad(lambda h: jnp.sum(loss(h)))(s_h)
    assert np.isnan(value[1]) and np.isfinite(np.delete(value, 1)).all()
    assert np.isnan(grad[1]).all() and np.isfinite(np.delete(grad, 1, axis=0)).all()


@pytest.mark.parametrize(
    "head", ["cross_entropy", "ignored", "log_probs", "log_probs_loss", *DIVERGENCES]
)
def test_a_token_that_does_not_count_gives_no_gradient_whatever_it_holds(head):
    # Token 2 does not count; its logits are all -inf (its hidden state overflows the
    # product) or, in distillation, its teacher's are NaN: a padding position's. Its
    # zero cotangent times those rows' NaN probabilities reached dW.
    h, w, b, y, _ = problem(6, 3, 10, seed=5)
    w[0] = -2.0 - np.abs(w[0])
    h[2] = [3e38, 0.0, 0.0]
    t_h, t_w, t_b = teacher(6, 4, 10, seed=5)
    t_h[2] = np.nan
    where = np.arange(6) != 2

    def total(h, w, b, rows):  # the tokens ``rows`` only
        y_, keep, t_h_ = y[rows], where[rows], t_h[rows]
        if head in ("cross_entropy", "ignored"):
            if head == "ignored":
                y_, keep = np.where(keep, y_, -100), None
            out = fused(h, w, b, y_, keep, ignore_index=-100, reduction="sum")
        elif head == "log_probs":
            out = fused_log_probs(h, w, b, y_, keep, entropy=True)[1]
        elif head == "log_probs_loss":
            args = tuple(a[rows] for a in policy_args(y))
            out = jsoftmax.linear_log_probs_loss(
                h, w, y_, grpo, args, bias=b, where=keep, with_entropy=True, reduction="sum"
            )
        else:
            out = fused_distillation(h, w, b, t_h_, t_w, t_b, keep, divergence=head)
        return jnp.sum(out)

    grads = jax.grad(total, argnums=(0, 1, 2))(h, w, b, np.arange(6))
    kept = jax.grad(total, argnums=(0, 1, 2))(h[where], w, b, np.flatnonzero(where))
    np.testing.assert_array_equal(grads[0][2], 0.0)
    assert_same(np.delete(grads[0], 2, axis=0), kept[0])
    assert_same(grads[1:], kept[1:])


def test_distillation_errors():
    s_h, s_w, _, _, where = problem(6, 4, 10)
    t_h, t_w, _ = teacher(6, 5, 10, seed=0)
    f = jsoftmax.linear_distillation_loss
    with pytest.raises(TypeError, match="teacher_weight must be floating"):
        f(s_h, s_w, t_h, t_w.astype(int))
    with pytest.raises(ValueError, match=r"teacher_hidden has shape \(6, 5\) and teacher_weight"):
        f(s_h, s_w, t_h, s_w)
    with pytest.raises(ValueError, match="the same tokens"):
        f(s_h, s_w, t_h[:5], t_w)
    with pytest.raises(ValueError, match="the same vocabulary"):
        f(s_h, s_w, t_h, t_w[:, :9])
    for bad in ("kl", np.array("jsd")):
        with pytest.raises(ValueError, match="divergence must be one of"):
            f(s_h, s_w, t_h, t_w, divergence=bad)
    for beta in (0.0, 1.0, 0.999999999):  # the last is 1 in float32, the compute dtype
        with pytest.raises(ValueError, match=r"beta must be in \(0, 1\) for the jsd"):
            f(s_h, s_w, t_h, t_w, divergence="jsd", beta=beta)
    with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\]"):
        f(s_h, s_w, t_h, t_w, divergence="jsd", beta=2.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        f(s_h, s_w, t_h, t_w, temperature=-1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(s_h, s_w, t_h, t_w, reduction="max")
    with pytest.raises(ValueError, match=r"where has shape \(5,\)"):
        f(s_h, s_w, t_h, t_w, where=where[:5])


# ---------------------------------------------------------------- cross-entropy, padded


PADDED_OPTIONS = [
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "logit_softcap": 5.0, "ignore_index": 7},
]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("chunk_size", [3, 16])
@pytest.mark.parametrize(
    "options", PADDED_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_cross_entropy_smoothing_over_a_padded_vocabulary(options, chunk_size, reduction):
    """A -inf bias on padded classes: label smoothing spreads over the kept classes only,
    as the unfused loss does, in value and in the gradients (0 on the padded columns' bias),
    chunks that divide neither the tokens nor the vocabulary."""
    hidden, weight, bias, labels, where = problem(13, 8, 40, seed=11)
    bias[-5:] = -np.inf
    labels = labels % 35
    if "ignore_index" in options:
        labels[::4] = options["ignore_index"]
    options = {**options, "reduction": reduction}
    ours = value_and_grads(
        fused, hidden, weight, bias, labels, where, chunk_size=chunk_size, **options
    )
    theirs = value_and_grads(unfused, hidden, weight, bias, labels, where, **options)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(ours))
    assert_same(ours, theirs)
    assert (ours[1][2][-5:] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_cross_entropy_label_on_a_padded_class(alpha):
    """A label whose class has a -inf logit costs +inf (0 of it at alpha = 1, the uniform
    term alone); the gradients are the unfused ones, 0 on the padded columns' bias."""
    hidden, weight, bias, labels, _ = problem(6, 8, 12, seed=12)
    bias[-3:] = -np.inf
    labels[::2] = 10
    options = {"label_smoothing": alpha, "chunk_size": 4}
    ours = value_and_grads(fused, hidden, weight, bias, labels, None, **options)
    del options["chunk_size"]
    theirs = value_and_grads(unfused, hidden, weight, bias, labels, None, **options)
    assert_same(ours, theirs)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(ours[1]))
    assert (ours[1][2][-3:] == 0).all()


# ---------------------------------------------------------------- memory


def test_heads_never_materialise_the_logits():
    """Compiled temp memory: flat in the number of tokens, far below one [N, V] float32 array."""
    d, v, chunk = 32, 4096, 64

    def temp_bytes(n, divergence):
        hidden, weight, bias, labels, _ = problem(n, d, v)
        t_h, t_w, t_b = teacher(n, 16, v, seed=0)
        advantage = np.random.default_rng(0).standard_normal(n).astype(np.float32)

        def per_token_grpo(h, w):  # a policy-gradient loss with an entropy bonus
            logp, entropy = jsoftmax.linear_log_probs(
                h, w, labels, bias=bias, return_entropy=True, chunk_size=chunk
            )
            return -jnp.mean(advantage * logp) - 0.01 * jnp.mean(entropy)

        def distill(h, w):
            return jsoftmax.linear_distillation_loss(
                h,
                w,
                t_h,
                t_w,
                student_bias=bias,
                teacher_bias=t_b,
                divergence=divergence,
                reduction="mean",
                chunk_size=chunk,
            )

        def fused_grpo(h, w):  # a clipped GRPO loss, its gradients from the forward pass
            args = (np.zeros(n, np.float32), advantage)
            return jsoftmax.linear_log_probs_loss(
                h, w, labels, grpo, args, bias=bias, with_entropy=True, chunk_size=chunk
            )

        loss = {None: per_token_grpo, "policy": fused_grpo}.get(divergence, distill)
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, weight)
        return compiled.compile().memory_analysis().temp_size_in_bytes

    for divergence in (None, "policy", *DIVERGENCES):
        small, large = temp_bytes(1024, divergence), temp_bytes(2048, divergence)
        assert large <= 1.05 * small
        assert small < 0.5 * 1024 * v * 4


@pytest.mark.parametrize("head", ["cross_entropy", "log_probs", "forward_kl"])
def test_accum_dtype_sums_the_parameter_gradients_in_that_dtype(head):
    """bfloat16 sums round once per chunk: close to the float32 gradients, not the default's."""
    s_h, s_w, s_b, labels, where = (
        a.astype(jnp.bfloat16) if a.dtype == np.float32 else a for a in problem(40, 32, 300)
    )
    t_h, t_w, t_b = teacher(40, 16, 300, seed=1)
    cotangent = np.random.default_rng(2).standard_normal(40).astype(np.float32)

    def loss(h, w, b, **options):
        if head == "cross_entropy":
            return fused(h, w, b, labels, where, reduction="mean", **options)
        if head == "log_probs":  # per-token cotangents: the backward pass's scan
            return jnp.sum(cotangent * fused_log_probs(h, w, b, labels, where, **options))
        return fused_distillation(h, w, b, t_h, t_w, t_b, where=where, reduction="sum", **options)

    def grads(**options):
        return jax.grad(lambda *p: loss(*p, chunk_size=8, **options), argnums=(0, 1, 2))(
            s_h, s_w, s_b
        )

    default, summed = grads(), grads(accum_dtype="bfloat16")
    assert [g.dtype for g in summed] == [jnp.bfloat16] * 3
    up = [np.asarray(a, np.float32) for a in (s_h, s_w, s_b)]
    want = jax.grad(lambda *p: loss(*p, chunk_size=40), argnums=(0, 1, 2))(*up)
    for g, w in zip(summed, want, strict=True):  # rounding errors of the partial sums' size
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=2e-2 * np.abs(w).max())
    assert np.any(np.asarray(summed[1]) != np.asarray(default[1]))  # the option took effect


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_hold_no_optimization_barrier(platform):
    hidden, weight, bias, labels, _ = (
        a.astype(jnp.bfloat16) if a.dtype == np.float32 else a for a in problem(64, 16, 128)
    )
    t_h, t_w, _ = (a.astype(jnp.bfloat16) for a in teacher(64, 8, 128, seed=0))
    heads = [
        lambda h, w: jnp.sum(jsoftmax.linear_log_probs(h, w, labels, return_entropy=True)[1]),
        lambda h, w: jsoftmax.linear_softmax_cross_entropy(h, w, labels, reduction="mean"),
        *(
            lambda h, w, d=d: jsoftmax.linear_distillation_loss(
                h, w, t_h, t_w, divergence=d, reduction="mean"
            )
            for d in DIVERGENCES
        ),
    ]
    for head in heads:
        program = lowered_for(jax.value_and_grad(head, argnums=(0, 1)), platform, hidden, weight)
        assert "optimization_barrier" not in program


# ---------------------------------------------------------------- sharded

SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jsoftmax
from tests.test_linear import problem
from tests.test_linear_heads import DIVERGENCES, teacher, unfused_distillation, unfused_log_probs
from tests.test_linear_heads import grpo, policy_args, unfused_log_probs_loss, vjp_all

mesh = jax.make_mesh((2, 4), ("data", "model"))
hidden, weight, bias, labels, where = problem(12, 8, 40, seed=6)
t_h, t_w, t_b = teacher(12, 6, 40, seed=6)
data, model, rows = P("data"), P("model"), P(None, "model")

def placed(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

def check(ours, theirs, primals, specs):
    got = vjp_all(jax.jit(ours), [placed(x, s) for x, s in zip(primals, specs)])
    want = vjp_all(theirs, primals)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

# Per-token log-probabilities and entropies; the temperature's gradient too.
def local_log_probs(h, w, b, t, y, m):
    return jsoftmax.linear_log_probs(h, w, y, bias=b, temperature=t, where=m,
                                     return_entropy=True, chunk_size=4, axis_name="model")
sharded = jax.shard_map(local_log_probs, mesh=mesh,
                        in_specs=(data, rows, model, P(), data, data), out_specs=(data, data))
y, m = placed(labels, data), placed(where, data)
check(lambda h, w, b, t: sharded(h, w, b, t, y, m),
      lambda h, w, b, t: unfused_log_probs(h, w, b, labels, where, t, True),
      (hidden, weight, bias, np.float32(0.8)), (data, rows, model, P()))

# The fused policy loss, per token and as a global sum.
args = policy_args(labels)
for reduction in ("none", "sum"):
    def local_policy(h, w, b, t, y, m, old, advantage):
        loss = jsoftmax.linear_log_probs_loss(
            h, w, y, grpo, (old, advantage), bias=b, temperature=t, where=m,
            with_entropy=True, reduction=reduction, chunk_size=4, axis_name="model")
        return loss if reduction == "none" else jax.lax.psum(loss, "data")
    sharded = jax.shard_map(local_policy, mesh=mesh,
                            in_specs=(data, rows, model, P(), data, data, data, data),
                            out_specs=data if reduction == "none" else P())
    token_args = [placed(a, data) for a in args]
    check(lambda h, w, b, t: sharded(h, w, b, t, y, m, *token_args),
          lambda h, w, b, t: unfused_log_probs_loss(h, w, b, labels, args, where, t, True,
                                                    reduction),
          (hidden, weight, bias, np.float32(0.8)), (data, rows, model, P()))

# Without a mask: the token loss's cotangent varies over "data" as its values do (it failed).
def local_unmasked(h, w, b, t, y, old, advantage):
    loss = jsoftmax.linear_log_probs_loss(
        h, w, y, grpo, (old, advantage), bias=b, temperature=t, with_entropy=True,
        reduction="sum", chunk_size=4, axis_name="model")
    return jax.lax.psum(loss, "data")
sharded = jax.shard_map(local_unmasked, mesh=mesh,
                        in_specs=(data, rows, model, P(), data, data, data), out_specs=P())
check(lambda h, w, b, t: sharded(h, w, b, t, y, *token_args),
      lambda h, w, b, t: unfused_log_probs_loss(h, w, b, labels, args, None, t, True, "sum"),
      (hidden, weight, bias, np.float32(0.8)), (data, rows, model, P()))

# Distillation: every divergence, per token and as a global mean.
for divergence in DIVERGENCES:
    for reduction in ("none", "sum"):
        def local(h, w, b, th, tw, tb, m):
            loss = jsoftmax.linear_distillation_loss(
                h, w, th, tw, student_bias=b, teacher_bias=tb, where=m, temperature=1.5,
                divergence=divergence, beta=0.3, reduction=reduction, chunk_size=4,
                axis_name="model")
            return loss if reduction == "none" else jax.lax.psum(loss, "data")
        sharded = jax.shard_map(local, mesh=mesh,
                                in_specs=(data, rows, model, data, rows, model, data),
                                out_specs=data if reduction == "none" else P())
        teacher_args = placed(t_h, data), placed(t_w, rows), placed(t_b, model)
        check(lambda h, w, b: sharded(h, w, b, *teacher_args, m),
              lambda h, w, b: unfused_distillation(h, w, b, t_h, t_w, t_b, where, 1.5,
                                                   divergence, 0.3, reduction),
              (hidden, weight, bias), (data, rows, model))
# Cross-entropy over a padded vocabulary (the last shard all padding), smoothed.
from tests.test_linear import unfused
padded = bias.copy()
padded[-13:] = -np.inf
labels_kept = labels % 27
for options in ({"label_smoothing": 0.1}, {"label_smoothing": 0.2, "z_loss": 1e-3,
                                           "logit_softcap": 5.0}):
    for reduction in ("none", "sum"):
        def local_ce(h, w, b, y, m):
            loss = jsoftmax.linear_softmax_cross_entropy(
                h, w, y, bias=b, where=m, reduction=reduction, chunk_size=4,
                axis_name="model", **options)
            return loss if reduction == "none" else jax.lax.psum(loss, "data")
        sharded = jax.shard_map(local_ce, mesh=mesh, in_specs=(data, rows, model, data, data),
                                out_specs=data if reduction == "none" else P())
        y_kept = placed(labels_kept, data)
        check(lambda h, w, b: sharded(h, w, b, y_kept, m),
              lambda h, w, b: unfused(h, w, b, labels_kept, where, reduction=reduction,
                                      **options),
              (hidden, weight, padded), (data, rows, model))

# Second order (jax.jacrev of jax.grad): no derivative reaches the row max's pmax (it failed).
def local_sum(h, w, b, y, m):
    loss = jsoftmax.linear_softmax_cross_entropy(h, w, y, bias=b, where=m, reduction="sum",
                                                 chunk_size=4, axis_name="model")
    return jax.lax.psum(loss, "data")
sharded = jax.shard_map(local_sum, mesh=mesh, in_specs=(data, rows, model, data, data),
                        out_specs=P())
w_b = placed(weight, rows), placed(bias, model)
got = jax.jit(jax.jacrev(jax.grad(lambda h: sharded(h, *w_b, y, m))))(placed(hidden, data))
want = jax.jacrev(jax.grad(lambda h: unfused(h, weight, bias, labels, where, reduction="sum")))
np.testing.assert_allclose(got, want(hidden), rtol=1e-4, atol=1e-5)
print("sharded ok")
"""


def test_vocab_sharded_heads_on_a_2x4_cpu_mesh_equal_the_unsharded_ones():
    on_eight_cpu_devices(SHARDED)


@pytest.mark.parametrize(("n", "v"), [(1000, 10), (64, 1000)])
def test_a_nan_hidden_state_poisons_its_token_only_at_every_size(n, v):
    """A NaN in one token's hidden state makes that token's loss, log-probability,
    entropy and distillation NaN and no other's, and one NaN logit beside finite ones
    its row's, at sizes where XLA's CPU backend fuses its max with YNNPACK, which may
    drop a NaN (the heads shift by the row max and clamp nothing, so the NaN reaches
    the row sum)."""
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((n, 8)).astype(np.float32)
    weight = rng.standard_normal((8, v)).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)
    hidden[3, 2] = np.nan
    outputs = [
        jsoftmax.linear_softmax_cross_entropy(hidden, weight, labels, reduction="none"),
        *jsoftmax.linear_log_probs(hidden, weight, labels, return_entropy=True),
        jsoftmax.linear_distillation_loss(hidden, weight, np.nan_to_num(hidden), weight),
        jax.grad(lambda h: jsoftmax.linear_softmax_cross_entropy(h, weight, labels).sum())(hidden),
    ]
    for out in map(np.asarray, outputs):
        assert np.isnan(out[3]).all()
        assert np.isfinite(np.delete(out, 3, 0)).all()
    # One NaN logit in every row (a NaN bias entry), beside finite ones.
    bias = np.zeros(v, np.float32)
    bias[v // 2] = np.nan
    hidden[3, 2] = 0.0
    loss = jsoftmax.linear_softmax_cross_entropy(hidden, weight, labels, bias=bias)
    log_p, entropy = jsoftmax.linear_log_probs(
        hidden, weight, labels, bias=bias, return_entropy=True
    )
    assert np.isnan(loss).all() and np.isnan(log_p).all() and np.isnan(entropy).all()


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}], ids=["plain", "smoothing"])
def test_heads_at_plus_inf_and_far_offset_logits_equal_the_unfused_ones(options):
    """A ``+inf`` bias shares its row's mass, as in the unfused losses (the heads gave
    NaN: ``inf - inf``), and logits far from 0 lose no precision (the cross-entropy
    subtracted the label's logit from the unshifted logsumexp)."""
    hidden, weight, _, _, where = problem(6, 4, 5, seed=8)
    labels = jnp.array([2, 0, 2, 4, 1, 3])
    for bias in (
        np.array([0.0, 1.0, np.inf, -1.0, np.inf], np.float32),
        np.array([1e6, 1e6 - 1, 1e6 - 2.5, 1e6, 1e6 + 3], np.float32),
    ):
        ours = value_and_grads(fused, hidden, weight, bias, labels, where, **options)
        theirs = value_and_grads(unfused, hidden, weight, bias, labels, where, **options)
        assert_same(ours, theirs, rtol=1e-5, atol=1e-5)
        z = hidden @ weight + bias
        log_p = jnp.take_along_axis(jsoftmax.log_softmax(z), labels[:, None], 1)[:, 0]
        entropy = -jnp.sum(jsoftmax.softmax(z) * jnp.maximum(jsoftmax.log_softmax(z), -1e30), 1)
        got = fused_log_probs(hidden, weight, bias, labels, entropy=True)
        np.testing.assert_allclose(got, (log_p, entropy), rtol=1e-5, atol=1e-5)
        if np.isinf(bias).any():  # (far from 0, float32 log_softmax(z / T) is less exact)
            _assert_temperature_gradient_is_the_unfused_one(hidden, weight, bias, labels)


def _assert_temperature_gradient_is_the_unfused_one(hidden, weight, bias, labels):
    """Of the finite ``x_k = z_k / T`` only, also in a row holding +inf (it was +-3e38)."""
    z = hidden @ weight + bias

    def fused(t):
        return jnp.sum(fused_log_probs(hidden, weight, bias, labels, None, t))

    def unfused(t):
        log_p = jsoftmax.log_softmax(z, temperature=t)
        return jnp.sum(jnp.take_along_axis(log_p, labels[:, None], 1))

    for t in (0.5, 2.0):
        np.testing.assert_allclose(jax.grad(fused)(t), jax.grad(unfused)(t), rtol=1e-5)


def test_float32_hidden_states_with_a_bfloat16_head_get_a_float32_gradient():
    """The hidden states' gradient is the float32 product of the logits' gradient and the
    (upcast) weight, as unfused: rounding that gradient to bfloat16 erred by 1.5e-3."""
    hidden, weight, bias, labels, where = problem(32, 16, 200, seed=6)
    weight = weight.astype(jnp.bfloat16)
    upcast = np.asarray(weight, np.float32)
    for loss in (
        lambda h, w: fused(h, w, None, labels, where, reduction="mean"),
        lambda h, w: jnp.sum(fused_log_probs(h, w, None, labels, where)),
    ):
        dh = jax.grad(loss)(hidden, weight)
        want = jax.grad(loss)(hidden, upcast)
        assert dh.dtype == jnp.float32
        np.testing.assert_allclose(dh, want, rtol=1e-5, atol=1e-6)
    # The weight's gradient is rounded to bfloat16 once, as unfused (the hidden states and
    # the logits' gradient were rounded first: here a row of it came out 0).
    h = np.array([[1 + 2**-9, 1.0], [-1.0, 1.0]], np.float32)
    w = np.array([[0.0] * 4, [0.5, -0.25, 0.125, 1.0]], np.float32).astype(jnp.bfloat16)
    y = np.array([1, 1])
    dw = jax.grad(lambda w: fused(h, w, None, y, None, reduction="sum", chunk_size=2))(w)
    want = jax.grad(lambda w: unfused(h, w, None, y, None, reduction="sum"))(w)
    np.testing.assert_array_equal(dw, want)


def test_a_float64_temperature_with_float32_inputs_computes_in_float32(x64):
    """The temperature takes the inputs' compute dtype, as in log_softmax (a float64 one
    made float64 values and a scan carry of the wrong dtype in the gradient)."""
    hidden, weight, bias, labels, where = problem(6, 4, 10, seed=2)
    t = np.float64(0.7)

    def loss(h, t):
        return jnp.sum(fused_log_probs(h, weight, bias, labels, where, t, entropy=True)[1])

    def loss_unfused(h, t):
        return jnp.sum(unfused_log_probs(h, weight, bias, labels, where, t, entropy=True)[1])

    value, grads = jax.value_and_grad(loss, (0, 1))(hidden, t)
    assert value.dtype == jnp.float32 and grads[0].dtype == jnp.float32
    want, want_grads = jax.value_and_grad(loss_unfused, (0, 1))(hidden, np.float32(t))
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grads[0], want_grads[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], want_grads[1], rtol=1e-4)
    for divergence in DIVERGENCES:
        kl = jsoftmax.linear_distillation_loss(
            hidden, weight, 2 * hidden, weight, temperature=t, divergence=divergence
        )
        assert kl.dtype == jnp.float32


@pytest.mark.parametrize("head", ["log_probs", "entropy", "log_probs_loss", *DIVERGENCES])
def test_second_derivatives_over_a_padded_vocabulary_are_the_unpadded_ones(head, x64):
    """A -inf bias (a padded vocabulary) is constant in everything: the second derivatives
    in the temperature and the hidden states were NaN (the infinite T-derivative of
    -inf / T times exp(-inf) = 0; reverse KL's and the JSD's terms at a class that
    neither model can take)."""
    rng = np.random.default_rng(0)
    n, d, v, pad = 6, 4, 7, 2
    h, w, b = rng.normal(size=(n, d)), rng.normal(size=(d, v + pad)), rng.normal(size=v + pad)
    b[v:] = -np.inf
    labels, cotangent = rng.integers(0, v, n), rng.normal(size=n)
    t_h, t_w = rng.normal(size=(n, 3)), rng.normal(size=(3, v + pad))

    def loss(hidden, temperature, classes):
        options = dict(temperature=temperature, chunk_size=4)
        w_, b_, t_w_ = w[:, :classes], b[:classes], t_w[:, :classes]
        if head in DIVERGENCES:
            out = jsoftmax.linear_distillation_loss(
                hidden, w_, t_h, t_w_, student_bias=b_, teacher_bias=b_, divergence=head, **options
            )
        elif head == "log_probs_loss":
            out = jsoftmax.linear_log_probs_loss(
                hidden, w_, labels, grpo_without_entropy, policy_args(labels), bias=b_, **options
            )
        else:
            out = jsoftmax.linear_log_probs(
                hidden, w_, labels, bias=b_, return_entropy=head == "entropy", **options
            )
        return jnp.sum(sum(out) * cotangent if head == "entropy" else out * cotangent)

    for argnums in (0, 1):
        second = jax.jacrev(jax.grad(loss, argnums), argnums)
        padded, unpadded = (second(h, 0.8, classes) for classes in (v + pad, v))
        np.testing.assert_allclose(padded, unpadded, rtol=1e-9, atol=1e-12)


def test_axis_name_is_a_mesh_axis_or_a_tuple_of_them():
    hidden, weight, _, labels, _ = problem(6, 4, 10)
    t_h, t_w, _ = teacher(6, 5, 10, seed=0)
    heads = {
        "linear_softmax_cross_entropy": lambda **k: jsoftmax.linear_softmax_cross_entropy(
            hidden, weight, labels, **k
        ),
        "linear_log_probs": lambda **k: jsoftmax.linear_log_probs(hidden, weight, labels, **k),
        "linear_log_probs_loss": lambda **k: jsoftmax.linear_log_probs_loss(
            hidden, weight, labels, lambda lp: -lp, **k
        ),
        "linear_distillation_loss": lambda **k: jsoftmax.linear_distillation_loss(
            hidden, weight, t_h, t_w, **k
        ),
    }
    for name, head in heads.items():
        for bad in (0, ("model", 1), (), ["model", None]):
            with pytest.raises(TypeError, match=f"{name}: axis_name must be a mesh axis's name"):
                head(axis_name=bad)
        # a list is a tuple, as in jax.lax.psum (it was refused as unhashable); outside
        # shard_map the axis is unbound
        with pytest.raises(NameError, match="unbound axis name"):
            head(axis_name=["data", "model"])
