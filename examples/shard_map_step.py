"""A training step with the vocabulary-sharded fused loss inside jax.shard_map (8 CPU devices)."""

import os

# Eight CPU devices, whatever else XLA_FLAGS holds and whatever accelerator the machine has.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402

jax.config.update("jax_platforms", "cpu")  # also on a GPU machine: the mesh is of CPU devices
mesh = jax.make_mesh((2, 4), ("data", "model"))  # tokens over "data", vocabulary over "model"
tokens, width, vocab = 64, 32, 1024
kh, kw, ky = jax.random.split(jax.random.key(0), 3)
hidden = jax.random.normal(kh, (tokens, width))
weight = jax.random.normal(kw, (width, vocab)) / width**0.5
labels = jax.random.randint(ky, (tokens,), 0, vocab)
unsharded, unsharded_grads = jax.value_and_grad(
    lambda h, w: jsoftmax.softmax_cross_entropy_with_integer_labels(
        h @ w, labels, label_smoothing=0.1, reduction="mean"
    ),
    argnums=(0, 1),
)(hidden, weight)
hidden, labels = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (hidden, labels))
weight = jax.device_put(weight, NamedSharding(mesh, P(None, "model")))


def local_loss(hidden, weight, labels):
    # This device's tokens against its slice of the vocabulary; exact over the whole vocabulary.
    total = jsoftmax.linear_softmax_cross_entropy(
        hidden, weight, labels, axis_name="model", label_smoothing=0.1, reduction="sum"
    )
    return jax.lax.psum(total, "data") / tokens


loss_fn = jax.shard_map(
    local_loss, mesh=mesh, in_specs=(P("data"), P(None, "model"), P("data")), out_specs=P()
)


value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
loss, grads = value_and_grad(hidden, weight, labels)
assert abs(loss - unsharded) < 1e-4 * abs(unsharded), (loss, unsharded)
for got, want in zip(grads, unsharded_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(abs(want).max()))

losses = []
for _ in range(20):
    loss, grads = value_and_grad(hidden, weight, labels)
    hidden, weight = hidden - 0.5 * grads[0], weight - 0.5 * grads[1]
    losses.append(float(loss))
assert losses[-1] < losses[0]
print(f"shard_map ok on {jax.device_count()} devices: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
