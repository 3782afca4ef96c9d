"""A training step with the vocabulary-sharded fused loss inside jax.shard_map (8 CPU devices)."""

import os

# Eight CPU devices, whatever else XLA_FLAGS holds and whatever accelerator the machine has.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
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
unsharded = jsoftmax.softmax_cross_entropy_with_integer_labels(
    hidden @ weight, labels, label_smoothing=0.1, reduction="mean"
)
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


@jax.jit
def train_step(hidden, weight, labels):
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(hidden, weight, labels)
    return loss, hidden - 0.5 * grads[0], weight - 0.5 * grads[1]


losses = []
for _ in range(20):
    loss, hidden, weight = train_step(hidden, weight, labels)
    losses.append(float(loss))
assert abs(losses[0] - float(unsharded)) < 1e-4 * abs(float(unsharded)), (losses[0], unsharded)
assert losses[-1] < losses[0]
print(f"shard_map ok on {jax.device_count()} devices: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
