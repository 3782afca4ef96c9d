"""jsoftmax's cross-entropy losses against optax, forward+backward of the mean loss.

Run: python benchmarks/bench_losses.py [--repeats N] [--cases a,b]
Every option against optax's route to the same numbers, at the sizes of the
backend found: float32 [4096, 32000] everywhere, and on a GPU or TPU also the
language-model case, bfloat16 [8192, 128256]. Prints a markdown table per
size: median times, the median of per-pair time ratios (jsoftmax / optax,
interleaved in one process) and compiled temp memory; on CPU, the floors.
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from _harness import compare, device, table

import jsoftmax

CAP = 30.0  # Gemma 2's final-logit soft-cap
ALPHA = 0.1
Z_LOSS = 1e-4
ce = jsoftmax.softmax_cross_entropy_with_integer_labels


def optax_smoothed(x, y):
    one_hot = jax.nn.one_hot(y, x.shape[-1])
    return optax.softmax_cross_entropy(x, optax.smooth_labels(one_hot, ALPHA))


# name: (jsoftmax, optax's route to the same per-row loss); arguments (logits,
# integer labels, dense labels, class weights, a vocabulary-padding mask [1, K]).
CASES = {
    "integer labels": (
        lambda x, y, q, w, m: ce(x, y),
        lambda x, y, q, w, m: optax.softmax_cross_entropy_with_integer_labels(x, y),
    ),
    f"label_smoothing={ALPHA} (optax: one_hot -> smooth_labels -> CE)": (
        lambda x, y, q, w, m: ce(x, y, label_smoothing=ALPHA),
        lambda x, y, q, w, m: optax_smoothed(x, y),
    ),
    "class_weights (optax: w[y] * CE)": (
        lambda x, y, q, w, m: ce(x, y, class_weights=w),
        lambda x, y, q, w, m: w[y] * optax.softmax_cross_entropy_with_integer_labels(x, y),
    ),
    "ignore_index=0 (optax: CE * (y != 0))": (
        lambda x, y, q, w, m: ce(x, y, ignore_index=0),
        lambda x, y, q, w, m: jnp.where(
            y == 0, 0.0, optax.softmax_cross_entropy_with_integer_labels(x, y)
        ),
    ),
    f"z_loss={Z_LOSS} (optax: CE + z * logsumexp**2)": (
        lambda x, y, q, w, m: ce(x, y, z_loss=Z_LOSS),
        lambda x, y, q, w, m: (
            optax.softmax_cross_entropy_with_integer_labels(x, y)
            + Z_LOSS * jax.nn.logsumexp(x, -1) ** 2
        ),
    ),
    f"logit_softcap={CAP} (optax: capped logits -> CE)": (
        lambda x, y, q, w, m: ce(x, y, logit_softcap=CAP),
        lambda x, y, q, w, m: optax.softmax_cross_entropy_with_integer_labels(
            CAP * jnp.tanh(x / CAP), y
        ),
    ),
    "where (padded vocabulary)": (
        lambda x, y, q, w, m: ce(x, y, where=m),
        lambda x, y, q, w, m: optax.softmax_cross_entropy_with_integer_labels(x, y, where=m),
    ),
    "dense labels": (
        lambda x, y, q, w, m: jsoftmax.softmax_cross_entropy(x, q),
        lambda x, y, q, w, m: optax.softmax_cross_entropy(x, q),
    ),
    f"dense labels, label_smoothing={ALPHA}": (
        lambda x, y, q, w, m: jsoftmax.softmax_cross_entropy(x, q, label_smoothing=ALPHA),
        lambda x, y, q, w, m: optax.softmax_cross_entropy(x, optax.smooth_labels(q, ALPHA)),
    ),
}


def sizes():
    """(N, K, dtype) for this backend: the language-model case only on an accelerator."""
    out = [(4096, 32000, jnp.float32)]
    if jax.default_backend() != "cpu":
        out.insert(0, (8192, 128256, jnp.bfloat16))
    return out


def inputs(n, k, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    logits = (jax.random.normal(keys[0], (n, k), jnp.float32) * 3).astype(dtype)
    labels = jax.random.randint(keys[1], (n,), 0, k - 128)  # none in the padding below
    dense = jax.nn.softmax(jax.random.normal(keys[2], (n, k))).astype(dtype)
    weights = jax.random.uniform(keys[3], (k,), jnp.float32, 0.5, 2.0)
    padding = (jnp.arange(k) < k - 128)[None, :]  # the last 128 classes are padding
    return logits, labels, dense, weights, padding


def value_and_grad(loss):
    """``jax.value_and_grad`` of the mean loss w.r.t. the logits, its first argument.

    The labels are arguments too, not closed over: jit would embed them in
    the program as constants (2 GiB for the dense bfloat16 labels).
    """
    return jax.value_and_grad(lambda x, *rest: jnp.mean(loss(x, *rest)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cases", default="", help="comma-separated prefixes of case names")
    args = parser.parse_args()
    chosen = [c for c in CASES if not args.cases or c.startswith(tuple(args.cases.split(",")))]
    print(f"device: {device()}")
    for n, k, dtype in sizes():
        data = inputs(n, k, dtype)
        rows = []
        for name in chosen:
            ours, theirs = (value_and_grad(f) for f in CASES[name])
            rows.append((name, compare(ours, theirs, data, args.repeats)))
            r = rows[-1][1]
            print(f"{name}: {r['time_ratio']:.2f}x time, {r['mem_ratio']:.3f}x temp", flush=True)
        print(f"\n{jnp.dtype(dtype).name} [{n}, {k}]\n")
        print(table(rows, "optax"), flush=True)
    if jax.default_backend() == "cpu":
        floors(args.repeats)


def floors(repeats):
    """What any loss's value and gradient must do, against optax's plain integer loss."""
    data = inputs(4096, 32000, jnp.float32)
    reference = value_and_grad(CASES["integer labels"][1])
    bare = (
        "exp of every logit into a fresh buffer and one row sum",
        lambda x, *rest: (jnp.exp(x), jnp.sum(jnp.exp(x), -1)),
    )
    r = compare(bare[1], reference, data, repeats, rtol=None)
    print(f"\nfloor: {bare[0]}: {r['time_ratio']:.2f}x of optax's integer loss's time")


if __name__ == "__main__":
    main()
