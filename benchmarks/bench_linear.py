"""Fused linear cross-entropy against ``hidden @ weight`` then the integer-label loss.

Run: python benchmarks/bench_linear.py [--repeats N] [--sizes N:V ...] [--max-unfused-gib G]
Prints a markdown table for ``jax.value_and_grad`` of the mean loss over
(hidden, weight), D=512 float32: median times, the median of per-pair time
ratios (fused / unfused, interleaved in one process) and compiled temp memory.
The unfused loss is skipped where it would need more than --max-unfused-gib.
"""

import argparse

import jax
import jax.numpy as jnp
from _harness import compare, compiled, device

import jsoftmax

D = 512
SIZES = ["4096:32000", "4096:128000", "4096:256000", "16384:32000", "1024:256000"]


def losses(labels):
    def fused(h, w):
        return jsoftmax.linear_softmax_cross_entropy(h, w, labels, reduction="mean")

    def unfused(h, w):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(h @ w, labels, reduction="mean")

    def value_and_grad(loss):
        return jax.value_and_grad(loss, argnums=(0, 1))

    return value_and_grad(fused), value_and_grad(unfused)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="*", default=SIZES)
    parser.add_argument("--max-unfused-gib", type=float, default=8.0)
    args = parser.parse_args()
    print(f"device: {device()}")
    print(
        "| N x V (D=512) | fused ms | unfused ms | time ratio | fused temp MiB "
        "| unfused temp MiB | temp ratio |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for size in args.sizes:
        n, v = map(int, size.split(":"))
        keys = jax.random.split(jax.random.key(0), 3)
        hidden = jax.random.normal(keys[0], (n, D), jnp.float32)
        weight = jax.random.normal(keys[1], (D, v), jnp.float32) / D**0.5
        labels = jax.random.randint(keys[2], (n,), 0, v)
        fused, unfused = losses(labels)
        need = 3 * n * v * 4 / 2**30  # the unfused logits, their gradient, a temp
        if need > args.max_unfused_gib:
            _, mem = compiled(fused, hidden, weight)
            print(
                f"| {n} x {v} | | | unfused skipped (~{need:.0f} GiB) | {mem / 2**20:.1f} | | |",
                flush=True,
            )
            continue
        r = compare(fused, unfused, (hidden, weight), args.repeats)
        print(
            f"| {n} x {v} | {r['ours_ms']:.0f} | {r['theirs_ms']:.0f} | {r['time_ratio']:.2f}x "
            f"| {r['ours_temp'] / 2**20:.1f} | {r['theirs_temp'] / 2**20:.1f} "
            f"| {r['mem_ratio']:.3f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
