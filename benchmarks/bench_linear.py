"""The fused linear heads against the unfused JAX computation of the same maths.

Run: python benchmarks/bench_linear.py [--repeats N] [--heads H ...] [--chunks C ...]
     [--accum-dtypes A ...] [--shapes NxDxV ...] [--max-unfused-gib G]
For each head (cross-entropy, log-probabilities with entropy in a policy-gradient
loss, per token from ``linear_log_probs`` and fused in ``linear_log_probs_loss``,
distillation by forward KL and by the JSD) it times ``jax.value_and_grad``
over (hidden, weight) of a scalar loss, fused (``jsoftmax.linear_*``) and
unfused (``hidden @ weight``, then jsoftmax / jax.nn on the logits), interleaved
in one process, and prints median times, the median per-pair time ratio
(fused / unfused) and compiled temp memory. Sizes follow the backend found: on
CPU float32 with D=512; on a GPU or TPU bfloat16 language-model heads
(Gemma-2-2B, Llama-3-8B); ``--shapes`` keeps those named. ``--chunks`` adds
rows for explicit chunk sizes ("default" is the backend's), ``--accum-dtypes
bfloat16`` rows that sum the weight gradient in bfloat16 (``accum_dtype``;
"default": float32). The unfused computation is skipped where it
would need more than --max-unfused-gib.
"""

import argparse
import itertools

import jax
import jax.numpy as jnp
from _harness import compare, compiled, device

import jsoftmax

HEADS = ("cross_entropy", "log_probs", "log_probs_loss", "forward_kl", "jsd")


def policy_loss(log_p, entropy, advantage):
    """A policy-gradient loss with an entropy bonus, per token."""
    return -advantage * log_p - 0.01 * entropy


def sizes(gpu=None):
    """(N, D, V, dtype) for this backend (or, with ``gpu``, a GPU's)."""
    if not (jax.default_backend() != "cpu" if gpu is None else gpu):
        return [(4096, 512, 32000, jnp.float32), (1024, 512, 128000, jnp.float32)]
    return [
        (8192, 2304, 256000, jnp.bfloat16),  # Gemma-2-2B head
        (8192, 4096, 128256, jnp.bfloat16),  # Llama-3-8B head
        (32768, 2048, 128256, jnp.bfloat16),
    ]


def problem(n, d, v, dtype):
    keys = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(keys[0], (n, d), jnp.float32).astype(dtype)
    weight = (jax.random.normal(keys[1], (d, v), jnp.float32) / d**0.5).astype(dtype)
    labels = jax.random.randint(keys[2], (n,), 0, v)
    advantage = jax.random.normal(keys[3], (n,), jnp.float32)
    teacher = (jax.random.normal(keys[4], (d, v), jnp.float32) / d**0.5).astype(dtype)
    return hidden, weight, labels, advantage, teacher


def losses(head, options):
    """The fused and unfused scalar losses for ``head``, and their gradients in (hidden, weight).

    Each takes ``(h, w, labels, advantage, t_hidden, t_weight)``: arrays closed over would be
    constants of the program (the teacher's weight: 62 MiB at 512 x 32000, outside the temp
    memory; XLA folded the teacher's logits into one at small sizes).
    """
    if head == "cross_entropy":

        def fused(h, w, labels, *_):
            return jsoftmax.linear_softmax_cross_entropy(h, w, labels, reduction="mean", **options)

        def unfused(h, w, labels, *_):
            return jsoftmax.softmax_cross_entropy_with_integer_labels(
                h @ w, labels, reduction="mean"
            )

    elif head == "log_probs":  # per-token outputs, then the loss: cotangents per token

        def fused(h, w, labels, advantage, *_):
            logp, entropy = jsoftmax.linear_log_probs(h, w, labels, return_entropy=True, **options)
            return jnp.mean(policy_loss(logp, entropy, advantage))

    elif head == "log_probs_loss":  # the same loss fused with the head

        def fused(h, w, labels, advantage, *_):
            return jsoftmax.linear_log_probs_loss(
                h, w, labels, policy_loss, (advantage,), with_entropy=True, **options
            )

    if head in ("log_probs", "log_probs_loss"):

        def unfused(h, w, labels, advantage, *_):
            log_p = jax.nn.log_softmax((h @ w).astype(jnp.float32))
            logp = jnp.take_along_axis(log_p, labels[:, None], 1)[:, 0]
            entropy = -jnp.sum(jnp.exp(log_p) * log_p, -1)
            return jnp.mean(policy_loss(logp, entropy, advantage))

    elif head != "cross_entropy":
        divergence = head

        def fused(h, w, _labels, _advantage, t_hidden, t_weight):
            return jsoftmax.linear_distillation_loss(
                h,
                w,
                t_hidden,
                t_weight,
                temperature=2.0,
                divergence=divergence,
                reduction="mean",
                **options,
            )

        def unfused(h, w, _labels, _advantage, t_hidden, t_weight):
            log_q = jax.nn.log_softmax((h @ w).astype(jnp.float32) / 2)
            log_p = jax.nn.log_softmax((t_hidden @ t_weight).astype(jnp.float32) / 2)
            p, q = jnp.exp(log_p), jnp.exp(log_q)
            if divergence == "forward_kl":
                kl = jnp.sum(p * (log_p - log_q), -1)
            else:
                log_m = jnp.log(0.5 * p + 0.5 * q)
                kl = 0.5 * jnp.sum(p * (log_p - log_m), -1) + 0.5 * jnp.sum(q * (log_q - log_m), -1)
            return 4 * jnp.mean(kl)

    grad = jax.value_and_grad
    return grad(fused, argnums=(0, 1)), grad(unfused, argnums=(0, 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", nargs="*", default=HEADS, choices=HEADS)
    parser.add_argument("--chunks", nargs="*", default=["default"])
    parser.add_argument("--accum-dtypes", nargs="*", default=["default"])
    parser.add_argument("--shapes", nargs="*", help="NxDxV of sizes() to keep; default all")
    parser.add_argument("--max-unfused-gib", type=float, default=8.0)
    args = parser.parse_args()
    print(f"device: {device()}")
    print(
        "| head | N x D x V, dtype | chunk | fused ms | unfused ms | time ratio "
        "| fused temp MiB | unfused temp MiB | temp ratio |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for n, d, v, dtype in sizes():
        if args.shapes and f"{n}x{d}x{v}" not in args.shapes:
            continue
        hidden, weight, labels, advantage, t_weight = problem(n, d, v, dtype)
        for head in args.heads:
            # The unfused computation's [N, V] float32 arrays (more for distillation).
            need = (8 if head in ("forward_kl", "jsd") else 4) * n * v * 4 / 2**30
            for chunk, accum in itertools.product(args.chunks, args.accum_dtypes):
                options = {
                    "chunk_size": None if chunk == "default" else int(chunk),
                    "accum_dtype": None if accum == "default" else accum,
                }
                fused, unfused = losses(head, options)
                # The teacher of the distillation rows: the student's hidden states, its own head.
                arrays = (hidden, weight, labels, advantage, hidden, t_weight)
                sums = "" if accum == "default" else f", {accum} sums"
                label = f"| {head} | {n} x {d} x {v}, {jnp.dtype(dtype).name} | {chunk}{sums} "
                if need > args.max_unfused_gib:
                    _, mem = compiled(fused, *arrays)
                    print(f"{label}| | | unfused skipped | {mem / 2**20:.0f} | | |", flush=True)
                    continue
                try:
                    # (bfloat16 sums of the weight's gradient: bfloat16's precision)
                    rtol = 1e-3 if accum == "default" else 5e-2
                    r = compare(fused, unfused, arrays, args.repeats, rtol)
                except jax.errors.JaxRuntimeError as e:  # out of memory: say so, go on
                    print(f"{label}| failed: {str(e).splitlines()[0][:120]} |", flush=True)
                    continue
                print(
                    f"{label}| {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['time_ratio']:.2f}x "
                    f"| {r['ours_temp'] / 2**20:.0f} | {r['theirs_temp'] / 2**20:.0f} "
                    f"| {r['mem_ratio']:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
