"""An optax training step whose loss is jsoftmax's: a linear classifier on synthetic data."""

import jax
import jax.numpy as jnp
import optax

import jsoftmax


def loss_fn(params, x, y):
    logits = x @ params["w"] + params["b"]
    return jsoftmax.softmax_cross_entropy_with_integer_labels(
        logits, y, label_smoothing=0.1, reduction="mean"
    )


optimizer = optax.adam(1e-2)


@jax.jit
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


kx, kw = jax.random.split(jax.random.key(0))
x = jax.random.normal(kx, (512, 16))
y = jnp.argmax(x @ jax.random.normal(kw, (16, 5)), axis=-1)
params = {"w": jnp.zeros((16, 5)), "b": jnp.zeros(5)}
opt_state = optimizer.init(params)
losses = []
for _ in range(200):
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(float(loss))
assert losses[-1] < 0.5 * losses[0], losses
print(f"optax step ok: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
