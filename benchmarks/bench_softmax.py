"""jsoftmax's softmax, log_softmax and logsumexp against jax.nn, forward and forward+backward.

Run: python benchmarks/bench_softmax.py [--repeats N]
Sizes follow the backend found: float32 [4096, 32000], [524288, 10] and
[64, 128, 1024], and bfloat16 attention scores under a causal ``where``
([4, 8, 512, 512] on CPU); on a GPU or TPU also the language-model logits,
bfloat16 [8192, 128256], and attention at [8, 32, 2048, 2048]. Prints a
markdown table: median times, the median of per-pair time ratios (jsoftmax /
jax.nn, interleaved in one process) and compiled temp memory; on CPU, a floor.
"""

import argparse

import jax
import jax.numpy as jnp
from _harness import compare, device, table

import jsoftmax

PAIRS = [
    ("softmax", jsoftmax.softmax, jax.nn.softmax),
    ("log_softmax", jsoftmax.log_softmax, jax.nn.log_softmax),
    ("logsumexp", jsoftmax.logsumexp, lambda x, where=None: jax.nn.logsumexp(x, -1, where=where)),
]


def cases():
    """(shape, dtype, causal) for this backend."""
    out = [
        ((4096, 32000), jnp.float32, False),
        ((524288, 10), jnp.float32, False),
        ((64, 128, 1024), jnp.float32, False),
    ]
    if jax.default_backend() == "cpu":
        return [*out, ((4, 8, 512, 512), jnp.bfloat16, True)]
    return [((8192, 128256), jnp.bfloat16, False), *out, ((8, 32, 2048, 2048), jnp.bfloat16, True)]


def logits(shape, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(0), shape, jnp.float32) * 3).astype(dtype)


def masked(f):
    """``f(x, where)``: the mask an argument (closed over, jit compiles it in as a constant)."""
    return lambda x, where: f(x, where=where)


def forward_backward(f):
    """Of ``f(x, where)``: the value and the pullback of the cotangent ``g``."""

    def run(x, where, g):
        y, pullback = jax.vjp(lambda v: f(v, where), x)
        return y, pullback(g)[0]

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    repeats = parser.parse_args().repeats
    print(f"device: {device()}")
    rows = []
    for shape, dtype, causal in cases():
        x = logits(shape, dtype)
        where = jnp.tril(jnp.ones(shape[-2:], bool)) if causal else None
        label = f"{jnp.dtype(dtype).name} {list(shape)}" + (" causal where" if causal else "")
        for name, ours, theirs in PAIRS:
            ours_w, theirs_w = masked(ours), masked(theirs)
            out = jax.eval_shape(ours_w, x, where)
            g = jax.random.normal(jax.random.key(1), out.shape, dtype)
            rows.append((f"{name} fwd {label}", compare(ours_w, theirs_w, (x, where), repeats)))
            fb = forward_backward(ours_w), forward_backward(theirs_w)
            rows.append((f"{name} fwd+bwd {label}", compare(*fb, (x, where, g), repeats)))
            print("\n".join(table(rows[-2:], "jax.nn").splitlines()[-2:]), flush=True)
    print()
    print(table(rows, "jax.nn"))
    if jax.default_backend() == "cpu":
        # The floor: a softmax writes one exp per entry into a fresh output.
        floor = compare(jnp.exp, jax.nn.softmax, (logits((4096, 32000)),), repeats, rtol=None)
        print(
            f"\nfloor: jnp.exp alone (one exp per entry into a fresh output) takes "
            f"{floor['time_ratio']:.2f}x of jax.nn.softmax's time at [4096, 32000]"
        )


if __name__ == "__main__":
    main()
