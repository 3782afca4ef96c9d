import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax

REDUCTIONS = ("none", "sum", "mean")
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"logit_softcap": 3.0},
    {"ignore_index": -100},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "logit_softcap": 5.0, "ignore_index": 7},
]


def problem(n, d, v, seed=0, dtype=np.float32, batch=None):
    rng = np.random.default_rng(seed)
    shape = (n,) if batch is None else (*batch, n)
    hidden = rng.standard_normal((*shape, d)).astype(dtype)
    weight = (rng.standard_normal((d, v)) / np.sqrt(d) * 2).astype(dtype)
    bias = (0.5 * rng.standard_normal(v)).astype(dtype)
    labels = rng.integers(0, v, shape).astype(np.int32)
    where = rng.random(shape) < 0.8
    return hidden, weight, bias, labels, where


def unfused(hidden, weight, bias, labels, where=None, **options):
    logits = hidden @ weight + (0 if bias is None else bias)
    if where is not None:
        where = where[..., None]
    return jsoftmax.softmax_cross_entropy_with_integer_labels(
        logits, labels, where=where, **options
    )


def fused(hidden, weight, bias, labels, where=None, **options):
    return jsoftmax.linear_softmax_cross_entropy(
        hidden, weight, labels, bias=bias, where=where, **options
    )


def value_and_grads(loss, hidden, weight, bias, labels, where, **options):
    """The loss and its gradients w.r.t. hidden, weight and bias (a random cotangent)."""
    value, pullback = jax.vjp(
        lambda h, w, b: loss(h, w, b, labels, where, **options), hidden, weight, bias
    )
    cotangent = np.asarray(jax.random.normal(jax.random.key(3), value.shape), value.dtype)
    return value, pullback(cotangent)


def assert_same(ours, theirs, rtol=2e-5, atol=2e-6):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_equals_the_unfused_loss_for_every_option(options, reduction):
    hidden, weight, bias, labels, where = problem(37, 16, 50, seed=len(options))
    if "ignore_index" in options:
        labels[::5] = options["ignore_index"]
    options = {**options, "reduction": reduction}
    ours = value_and_grads(fused, hidden, weight, bias, labels, where, chunk_size=8, **options)
    theirs = value_and_grads(unfused, hidden, weight, bias, labels, where, **options)
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    ("n", "v", "chunk_size"),
    [(1, 3, None), (5, 7, 1), (64, 33, 16), (50, 200, 7), (20, 11, 1000), (130, 64, None)],
)
def test_any_token_count_vocabulary_and_chunk_size(n, v, chunk_size):
    hidden, weight, bias, labels, where = problem(n, 8, v, seed=n + v)
    for reduction in ("none", "mean"):
        ours = value_and_grads(
            fused, hidden, weight, bias, labels, where, chunk_size=chunk_size, reduction=reduction
        )
        theirs = value_and_grads(unfused, hidden, weight, bias, labels, where, reduction=reduction)
        assert_same(ours, theirs)


def test_leading_axes_jit_and_no_bias():
    hidden, weight, _, labels, where = problem(6, 8, 21, batch=(2, 3))
    loss = jax.jit(
        lambda h, w: jsoftmax.linear_softmax_cross_entropy(h, w, labels, where=where, chunk_size=5)
    )
    assert loss(hidden, weight).shape == (2, 3, 6)
    np.testing.assert_allclose(
        loss(hidden, weight), unfused(hidden, weight, None, labels, where), rtol=2e-5, atol=1e-6
    )
    grad = jax.jit(jax.grad(lambda h, w: jnp.sum(loss(h, w) ** 2), argnums=(0, 1)))
    reference = jax.grad(
        lambda h, w: jnp.sum(unfused(h, w, None, labels, where) ** 2), argnums=(0, 1)
    )
    assert_same(grad(hidden, weight), reference(hidden, weight), rtol=1e-4, atol=1e-5)


def test_vmap_over_heads_and_over_batches():
    hidden, weight, bias, labels, where = problem(10, 8, 21, batch=(3,))
    weights = np.stack([weight, 0.5 * weight, -weight])

    def fused_mean(h, w, y, m):
        return jsoftmax.linear_softmax_cross_entropy(
            h, w, y, bias=bias, where=m, reduction="mean", chunk_size=4, label_smoothing=0.1
        )

    def unfused_mean(h, w, y, m):
        return unfused(h, w, bias, y, m, reduction="mean", label_smoothing=0.1)

    for in_axes in [(None, 0, None, None), (0, None, 0, 0), (0, 0, 0, 0)]:
        batched = (hidden, weights, labels, where)
        args = [x if a == 0 else x[0] for x, a in zip(batched, in_axes, strict=True)]
        ours = jax.vmap(jax.value_and_grad(fused_mean, argnums=(0, 1)), in_axes)(*args)
        theirs = [
            jax.value_and_grad(unfused_mean, argnums=(0, 1))(
                *(x[i] if a == 0 else x for x, a in zip(args, in_axes, strict=True))
            )
            for i in range(3)
        ]
        assert_same(ours, jax.tree.map(lambda *t: np.stack(t), *theirs), rtol=1e-4, atol=1e-5)


def test_float64(x64):
    hidden, weight, bias, labels, where = problem(9, 4, 13, dtype=np.float64)
    ours = value_and_grads(fused, hidden, weight, bias, labels, where, reduction="mean")
    theirs = value_and_grads(unfused, hidden, weight, bias, labels, where, reduction="mean")
    assert ours[0].dtype == jnp.float64
    assert_same(ours, theirs, rtol=1e-12, atol=1e-13)


def test_mixed_input_dtypes_compute_in_the_widest(x64):
    """A float64 bias with float32 hidden states and weight: every chunk and accumulator in
    float64, gradients in each input's dtype."""
    hidden, weight, bias, labels, where = problem(9, 4, 13)
    bias = bias.astype(np.float64)
    for reduction in ("mean", "none"):
        ours = value_and_grads(
            fused, hidden, weight, bias, labels, where, reduction=reduction, chunk_size=4
        )
        theirs = value_and_grads(unfused, hidden, weight, bias, labels, where, reduction=reduction)
        assert ours[0].dtype == jnp.float64
        assert [g.dtype for g in ours[1]] == [jnp.float32, jnp.float32, jnp.float64]
        assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
    hidden, weight, bias, labels, where = (
        a.astype(dtype) if a.dtype == np.float32 else a for a in problem(40, 32, 300)
    )
    value, grads = value_and_grads(fused, hidden, weight, bias, labels, where, reduction="mean")
    assert value.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    # The float32 loss of the same (rounded) inputs.
    upcast = [np.asarray(a, np.float32) for a in (hidden, weight, bias)]
    want, want_grads = value_and_grads(unfused, *upcast, labels, where, reduction="mean")
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-3)


def test_never_materialises_the_logits():
    n, d, v = 1024, 32, 4096
    hidden, weight, bias, labels, where = problem(n, d, v)

    cotangent = np.random.default_rng(0).random(n).astype(np.float32)

    def temp_bytes(loss, reduction):
        def scalar(h, w):
            value = loss(h, w, bias, labels, where, reduction=reduction)
            return jnp.sum(value * cotangent) if reduction == "none" else value

        value_and_grad = jax.value_and_grad(scalar, argnums=(0, 1))
        compiled = jax.jit(value_and_grad).lower(hidden, weight).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = n * v * 4
    for reduction in ("mean", "none"):  # gradients in the forward pass / recomputed
        assert temp_bytes(unfused, reduction) >= logits_bytes
        ours = temp_bytes(lambda *a, **k: fused(*a, **k, chunk_size=64), reduction)
        assert ours < 0.25 * logits_bytes


def test_default_chunk_by_backend_and_vocabulary_never_by_token_count():
    from jsoftmax._linear import _default_chunk

    # CPU: 1024 tokens, fewer while a chunk's logits exceed 2**25 elements.
    assert [_default_chunk(v, "cpu") for v in (10, 32000, 128000, 256000)] == [1024, 1024, 256, 128]
    # GPU/TPU: 2048 tokens, fewer while a chunk's logits exceed 2**29 elements.
    for backend in ("gpu", "cuda", "tpu"):
        sizes = [_default_chunk(v, backend) for v in (1000, 128256, 256000, 10**6)]
        assert sizes == [2048, 2048, 2048, 512]


def cpu_temp_bytes(hidden, weight, labels, **options):
    """Compiled temp memory of the mean loss's value and gradients, for the CPU backend.

    On an H200 a float32 program's temp memory was 31 MB above the bfloat16
    one's, more than the buffers (likely the matmul library's workspace for
    float32, not yet confirmed), which hides an accumulator's size.
    """
    hidden, weight = jax.device_put((hidden, weight), jax.devices("cpu")[0])

    def loss(h, w):
        return jsoftmax.linear_softmax_cross_entropy(h, w, labels, reduction="mean", **options)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, weight).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_float32_weights_accumulate_their_gradient_in_place():
    """bfloat16 compute with float32 weights (flax's default param_dtype): no second float32
    [D, V] buffer beside the gradient, which bfloat16 weights need as their accumulator."""
    n, d, v = 512, 256, 8192
    hidden, weight, _, labels, _ = problem(n, d, v)
    hidden = hidden.astype(jnp.bfloat16)
    f32, bf16 = (
        cpu_temp_bytes(hidden, w, labels, chunk_size=128)
        for w in (weight, weight.astype(jnp.bfloat16))
    )
    assert f32 + d * v * 4 <= bf16


def test_accum_dtype_of_the_weight_drops_the_float32_accumulator():
    """accum_dtype=bfloat16 sums a bfloat16 weight's gradient in itself. The CPU backend
    still writes each chunk's product in float32 (half the accumulator's bytes remain);
    a GPU compile (benchmarks/aot_gpu.py) holds none of it."""
    n, d, v = 512, 256, 8192
    hidden, weight, _, labels, _ = problem(n, d, v)
    hidden, weight = hidden.astype(jnp.bfloat16), weight.astype(jnp.bfloat16)
    exact, summed = (
        cpu_temp_bytes(hidden, weight, labels, chunk_size=128, accum_dtype=a)
        for a in (None, jnp.bfloat16)
    )
    assert summed + d * v * 2 <= exact


def test_empty_mean_is_zero_with_zero_gradients():
    hidden, weight, bias, labels, _ = problem(8, 4, 10)
    where = np.zeros(8, bool)
    value, grads = value_and_grads(fused, hidden, weight, bias, labels, where, reduction="mean")
    assert value == 0.0
    assert all(not np.any(g) for g in grads)


def test_a_hidden_size_of_zero_leaves_the_bias():
    _, _, bias, labels, where = problem(8, 0, 10)
    hidden, weight = np.zeros((2, 4, 0), np.float32), np.zeros((0, 10), np.float32)
    labels, where = labels.reshape(2, 4), where.reshape(2, 4)
    args = (hidden, weight, bias, labels, where)
    assert_same(value_and_grads(fused, *args), value_and_grads(unfused, *args))


def test_traced_out_of_range_label_makes_its_row_nan():
    hidden, weight, bias, labels, _ = problem(6, 4, 10)
    labels[2] = 10
    loss = jax.jit(lambda y: jsoftmax.linear_softmax_cross_entropy(hidden, weight, y, bias=bias))
    got = np.asarray(loss(labels))
    assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()
    labels[2] = 3
    np.testing.assert_allclose(np.delete(got, 2), np.delete(loss(labels), 2))


def test_a_masked_token_may_hold_any_label():
    """As in the unfused loss: padding tokens' labels (-100, V) are never read, concrete or
    traced (a concrete one raised)."""
    hidden, weight, bias, labels, where = problem(8, 4, 10)
    padded = labels.copy()
    padded[~where] = np.where(np.arange(8)[~where] % 2, -100, 10)
    assert not where.all()
    mean = functools.partial(fused, reduction="mean")
    want = value_and_grads(mean, hidden, weight, bias, labels, where)
    for tx in (lambda f: f, jax.jit):
        assert_same(value_and_grads(tx(mean), hidden, weight, bias, padded, where), want)


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}], ids=["plain", "smooth", "z"]
)
def test_a_finite_label_far_below_the_max_keeps_its_gradient(options):
    """The label's logit -3e38 lies finfo.max below the max 3e38: its shifted logit
    overflows to -inf, and was read as a -inf logit's (no gradient at the label)."""
    hidden = jnp.ones((1, 1), jnp.float32)
    weight = jnp.array([[3e38, -3e38, 0.0]], jnp.float32)
    labels = jnp.array([1])

    def fused(w):
        return jsoftmax.linear_softmax_cross_entropy(hidden, w, labels, reduction="sum", **options)

    def unfused(w):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(
            hidden @ w, labels, reduction="sum", **options
        )

    np.testing.assert_array_equal(jax.grad(fused)(weight), jax.grad(unfused)(weight))
    assert jax.grad(fused)(weight)[0, 1] < -0.9


def test_errors():
    hidden, weight, bias, labels, where = problem(6, 4, 10)
    loss = jsoftmax.linear_softmax_cross_entropy
    with pytest.raises(TypeError, match="hidden must be floating"):
        loss(labels[:, None], weight, labels)
    with pytest.raises(TypeError, match="weight must be floating"):
        loss(hidden, weight.astype(int), labels)
    with pytest.raises(ValueError, match=r"weight \(4, 0\) has no class \(V = 0\)"):
        loss(hidden, weight[:, :0], labels, where=np.zeros(6, bool))
    with pytest.raises(TypeError, match="labels must be integers"):
        loss(hidden, weight, labels.astype(float))
    with pytest.raises(ValueError, match=r"hidden has shape \(6, 4\) and weight \(5, 10\)"):
        loss(hidden, np.ones((5, 10), np.float32), labels)
    with pytest.raises(
        ValueError, match=r"bias has shape \(9,\) but weight \(4, 10\) needs \(10,\)"
    ):
        loss(hidden, weight, labels, bias=bias[:9])
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but hidden \(6, 4\) needs"):
        loss(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match=r"label 10 at position \(1,\) is out of range for 10"):
        loss(hidden, weight, np.array([0, 10, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"where has shape \(5,\)"):
        loss(hidden, weight, labels, where=where[:5])
    for chunk_size in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            loss(hidden, weight, labels, chunk_size=chunk_size)
    for chunk_size in (2.0, True):
        with pytest.raises(TypeError, match="chunk_size must be an integer"):
            loss(hidden, weight, labels, chunk_size=chunk_size)
    np.testing.assert_array_equal(
        loss(hidden, weight, labels, chunk_size=np.int64(2)),
        loss(hidden, weight, labels, chunk_size=2),
    )
    with pytest.raises(ValueError, match=r"logit_softcap must be in \(0.0, inf\)"):
        loss(hidden, weight, labels, logit_softcap=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss(hidden, weight, labels, reduction="max")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\]"):
        loss(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"z_loss must be in"):
        loss(hidden, weight, labels, z_loss=-1.0)
    for accum_dtype in (jnp.int32, "foo", "complex64"):
        with pytest.raises(TypeError, match="accum_dtype must be a floating dtype or None"):
            loss(hidden, weight, labels, accum_dtype=accum_dtype)


# ---------------------------------------------------------------- sharded


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import jsoftmax
from tests.test_linear import OPTIONS, REDUCTIONS, problem, unfused

assert jax.device_count() == 8
mesh = jax.make_mesh((2, 4), ("data", "model"))
hidden, weight, bias, labels, where = problem(12, 8, 40, seed=5)
# Every option per token, and the scalar reductions with none and with all of them.
cases = [(o, "none") for o in OPTIONS]
cases += [(o, r) for o in (OPTIONS[0], OPTIONS[-1]) for r in REDUCTIONS[1:]]
for options, reduction in cases:
    if "ignore_index" in options:
        labels = labels.copy()
        labels[::5] = options["ignore_index"]

    def local(h, w, b, y, m):
        loss = jsoftmax.linear_softmax_cross_entropy(
            h, w, y, bias=b, where=m, axis_name="model", chunk_size=4, reduction=reduction,
            **options)
        # A global sum over the data shards for the scalar reductions.
        return loss if reduction == "none" else jax.lax.psum(loss, "data")

    out = P("data") if reduction == "none" else P()
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data"), P(None, "model"), P("model"), P("data"), P("data")),
        out_specs=out)

    def reference(h, w, b):
        if reduction == "none":
            return unfused(h, w, b, labels, where, **options)
        per_half = [
            unfused(h[i:i + 6], w, b, labels[i:i + 6], where[i:i + 6], reduction=reduction,
                    **options)
            for i in (0, 6)
        ]
        return per_half[0] + per_half[1]

    def placed(x, spec):
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    y, m = placed(labels, P("data")), placed(where, P("data"))
    got = jax.jit(lambda h, w, b: sharded(h, w, b, y, m))
    args = placed(hidden, P("data")), placed(weight, P(None, "model")), placed(bias, P("model"))
    value, pullback = jax.vjp(got, *args)
    want, want_pullback = jax.vjp(reference, hidden, weight, bias)
    np.testing.assert_allclose(value, want, rtol=2e-5, atol=2e-6)
    ct = np.asarray(jax.random.normal(jax.random.key(1), want.shape), np.float32)
    for a, b in zip(pullback(ct), want_pullback(ct), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
print("sharded ok")
"""


def on_eight_cpu_devices(script):
    """Runs ``script`` in a fresh process with 8 CPU devices; asserts it printed "ok"."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",  # eight CPU devices, also where a GPU is present
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded ok" in result.stdout


def test_vocab_sharded_on_a_2x4_cpu_mesh_equals_the_unsharded_loss():
    on_eight_cpu_devices(SHARDED)
