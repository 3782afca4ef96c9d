"""An equinox model trained with optax on jsoftmax's loss, then temperature-calibrated."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import jsoftmax

kx, kw, km = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(kx, (600, 8))
y = jnp.argmax(x @ jax.random.normal(kw, (8, 4)) + jax.random.gumbel(km, (600, 4)), axis=-1)
train, held_out = slice(0, 400), slice(400, None)

model = eqx.nn.MLP(8, 4, width_size=64, depth=2, key=jax.random.key(1))
optimizer = optax.adam(3e-3)
opt_state = optimizer.init(eqx.filter(model, eqx.is_array))


def loss_fn(model, x, y):
    return jsoftmax.softmax_cross_entropy_with_integer_labels(
        jax.vmap(model)(x), y, reduction="mean"
    )


@eqx.filter_jit
def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


for _ in range(300):
    model, opt_state, loss = train_step(model, opt_state, x[train], y[train])

# Overfitted on noisy labels, the model is overconfident: a temperature above 1 fixes its NLL.
logits = jax.vmap(model)(x[held_out])
t = jsoftmax.fit_temperature(logits, y[held_out])
nll = [
    jsoftmax.softmax_cross_entropy_with_integer_labels(
        jsoftmax.temperature_scale(logits, s), y[held_out], reduction="mean"
    )
    for s in (1.0, t)
]
assert loss < 0.05 and t > 1 and nll[1] < 0.9 * nll[0], (loss, t, nll)
print(f"equinox ok: train loss {float(loss):.3f}, T = {float(t):.2f},", end=" ")
print(f"held-out NLL {nll[0]:.3f} -> {nll[1]:.3f}")
