"""jsoftmax's cross-entropy losses against optax, forward+backward of the mean loss.

Run: python benchmarks/bench_losses.py [--repeats N]
Prints a markdown table: median times, the median of per-pair time ratios
(jsoftmax / optax, interleaved in one process) and compiled temp memory.
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from _harness import compare, device, table

import jsoftmax

N, K = 4096, 32000
CAP = 30.0  # Gemma 2's final-logit soft-cap


def value_and_grad(loss):
    return jax.value_and_grad(lambda x, y: jnp.mean(loss(x, y)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    repeats = parser.parse_args().repeats
    print(f"device: {device()}")
    logits = jax.random.normal(jax.random.key(0), (N, K), jnp.float32) * 3
    labels = jax.random.randint(jax.random.key(1), (N,), 0, K)
    dense = jax.nn.softmax(jax.random.normal(jax.random.key(2), (N, K)))

    def optax_smoothed(x, y):
        return optax.softmax_cross_entropy(x, optax.smooth_labels(jax.nn.one_hot(y, K), 0.1))

    cases = [
        (
            "integer labels, label_smoothing=0.1 (optax: one_hot -> smooth_labels -> CE)",
            lambda x, y: jsoftmax.softmax_cross_entropy_with_integer_labels(
                x, y, label_smoothing=0.1
            ),
            optax_smoothed,
            labels,
        ),
        (
            "integer labels",
            jsoftmax.softmax_cross_entropy_with_integer_labels,
            optax.softmax_cross_entropy_with_integer_labels,
            labels,
        ),
        ("dense labels", jsoftmax.softmax_cross_entropy, optax.softmax_cross_entropy, dense),
        (
            f"integer labels, logit_softcap={CAP} (optax: capped logits -> CE)",
            lambda x, y: jsoftmax.softmax_cross_entropy_with_integer_labels(
                x, y, logit_softcap=CAP
            ),
            lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
                CAP * jnp.tanh(x / CAP), y
            ),
            labels,
        ),
    ]
    rows = []
    for name, ours, theirs, y in cases:
        rows.append(
            (
                f"{name} [{N}, {K}]",
                compare(value_and_grad(ours), value_and_grad(theirs), (logits, y), repeats),
            )
        )
        print(
            rows[-1][0],
            f"{rows[-1][1]['time_ratio']:.2f}x time, {rows[-1][1]['mem_ratio']:.4f}x temp",
            flush=True,
        )
    print()
    print(table(rows, "optax"))
    # What any smoothed loss's value and gradient must do at least: exp of every
    # logit into a fresh gradient buffer, and two row sums (of exp, for the
    # logsumexp, and of the logits, for the uniform term). optax's plain
    # integer loss does all of it but the second sum.
    references = [
        (
            "optax's integer-label loss",
            value_and_grad(optax.softmax_cross_entropy_with_integer_labels),
        ),
        (
            "floor: jnp.exp into a fresh buffer and two row sums",
            lambda x, y: (jnp.exp(x), jnp.sum(jnp.exp(x), -1), jnp.sum(x, -1)),
        ),
    ]
    print()
    for name, fn in references:
        r = compare(fn, value_and_grad(optax_smoothed), (logits, labels), repeats)
        print(f"{name}: {r['time_ratio']:.2f}x of optax's one-hot route's time", flush=True)


if __name__ == "__main__":
    main()
