"""jsoftmax.softmax / log_softmax against jax.nn, forward and forward+backward.

Run: python benchmarks/bench_softmax.py [--repeats N]
Prints a markdown table: median times, the median of per-pair time ratios
(jsoftmax / jax.nn, measured interleaved in one process) and compiled temp memory.
"""

import argparse

import jax
import jax.numpy as jnp
from _harness import compare, device, table

import jsoftmax

SHAPES = [(4096, 32000), (524288, 10), (64, 128, 1024)]
PAIRS = [
    ("softmax", jsoftmax.softmax, jax.nn.softmax),
    ("log_softmax", jsoftmax.log_softmax, jax.nn.log_softmax),
]


def logits(shape):
    return jax.random.normal(jax.random.key(0), shape, jnp.float32) * 3


def forward_backward(f):
    def run(x, g):
        y, pullback = jax.vjp(f, x)
        return y, pullback(g)[0]

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    repeats = parser.parse_args().repeats
    print(f"device: {device()}")
    rows = []
    for shape in SHAPES:
        x = logits(shape)
        g = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        for name, ours, theirs in PAIRS:
            rows.append((f"{name} fwd {list(shape)}", compare(ours, theirs, (x,), repeats)))
            rows.append(
                (
                    f"{name} fwd+bwd {list(shape)}",
                    compare(forward_backward(ours), forward_backward(theirs), (x, g), repeats),
                )
            )
            print(table(rows[-2:], "jax.nn").splitlines()[-2:], flush=True)
    print()
    print(table(rows, "jax.nn"))
    # The floor: a softmax writes one exp per entry into a fresh output.
    floor = compare(jnp.exp, jax.nn.softmax, (logits(SHAPES[0]),), repeats)
    print(
        f"\nfloor: jnp.exp alone (one exp per entry into a fresh output) takes "
        f"{floor['time_ratio']:.2f}x of jax.nn.softmax's time at {list(SHAPES[0])}"
    )


if __name__ == "__main__":
    main()
