"""A first look at jsoftmax next to jax.nn: same numbers, no NaN at the edges."""

import jax
import jax.numpy as jnp

import jsoftmax

x = jnp.array([[1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf], [jnp.inf, 0.0, jnp.inf]])
print("devices:", jax.devices())
print("jax.nn.softmax:\n", jax.nn.softmax(x))
print("jsoftmax.softmax:\n", jsoftmax.softmax(x))

where = jnp.array([True, True, False])
print("masked log_softmax:", jsoftmax.log_softmax(x[0], where=where))
print("temperature 2:", jsoftmax.softmax(x[0], temperature=2.0))
grad_t = jax.grad(lambda t: jsoftmax.log_softmax(x[0], temperature=t)[2])(2.0)
print("d log_softmax / d temperature:", grad_t)
print("logsumexp of a fully masked row:", jsoftmax.logsumexp(x[0], where=~where.at[:].set(True)))

logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
labels = jnp.array([0, 2, -100])
loss = jsoftmax.softmax_cross_entropy_with_integer_labels(
    logits, labels, label_smoothing=0.1, ignore_index=-100, reduction="mean"
)
print("mean smoothed cross-entropy, one row ignored:", loss)
