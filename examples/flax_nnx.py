"""A flax nnx module whose loss is jsoftmax's, trained with nnx.Optimizer."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jsoftmax


class Classifier(nnx.Module):
    def __init__(self, features, classes, rngs):
        self.hidden = nnx.Linear(features, 64, rngs=rngs)
        self.out = nnx.Linear(64, classes, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def loss_fn(model, x, y, keep):
    # `keep` masks padded rows out of the mean; z-loss keeps the logits' scale in check.
    return jsoftmax.softmax_cross_entropy_with_integer_labels(
        model(x), y, where=keep, z_loss=1e-4, reduction="mean"
    )


@nnx.jit
def train_step(model, optimizer, x, y, keep):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y, keep)
    optimizer.update(model, grads)
    return loss


kx, kw = jax.random.split(jax.random.key(0))
x = jax.random.normal(kx, (256, 8))
y = jnp.argmax(x @ jax.random.normal(kw, (8, 4)), axis=-1)
keep = jnp.arange(256) < 240  # the last 16 rows are padding, which may hold anything
x, y = jnp.where(keep[:, None], x, 1e30), jnp.where(keep, y, -1)
model = Classifier(8, 4, nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
losses = [float(train_step(model, optimizer, x, y, keep)) for _ in range(100)]
assert losses[-1] < 0.5 * losses[0], losses
print(f"flax nnx ok: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
