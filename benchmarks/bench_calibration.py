"""jsoftmax's calibration metrics under jit against NumPy ``bincount`` implementations.

Run: python benchmarks/bench_calibration.py [--repeats N]
Prints a markdown table: median times and the median of per-pair time ratios
(jsoftmax / NumPy, interleaved in one process), 1,000,000 x 10 predictions.
"""

import argparse

import jax
import numpy as np
from _harness import device, interleaved

import jsoftmax

N, K, M = 1_000_000, 10, 15


def _gaps(index, hit, value, num_segments):
    """Per bin sum(hit - value) and count, by bincount."""
    gap = np.bincount(index, hit, num_segments) - np.bincount(index, value, num_segments)
    return gap, np.bincount(index, minlength=num_segments)


def _equal_width(values):
    return np.clip(np.ceil(values * M).astype(np.int64) - 1, 0, M - 1)


def _top1(probs, labels):
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)


def numpy_ece(probs, labels):
    confidence, hit = _top1(probs, labels)
    return np.abs(_gaps(_equal_width(confidence), hit, confidence, M)[0]).sum() / len(labels)


def numpy_mce(probs, labels):
    confidence, hit = _top1(probs, labels)
    gap, count = _gaps(_equal_width(confidence), hit, confidence, M)
    return np.max(np.abs(gap[count > 0]) / count[count > 0])


def numpy_adaptive(probs, labels):
    confidence, hit = _top1(probs, labels)
    order = np.argsort(confidence, kind="stable")
    index = np.arange(N) * M // N
    return np.abs(_gaps(index, hit[order], confidence[order], M)[0]).sum() / N


def numpy_classwise(probs, labels):
    hit = labels[:, None] == np.arange(K)
    index = (_equal_width(probs) + M * np.arange(K)).ravel()
    gap = _gaps(index, hit.ravel(), probs.ravel(), K * M)[0]
    return np.abs(gap).sum() / (N * K)


def numpy_brier(probs, labels):
    return np.mean(np.sum(probs**2, axis=1) - 2 * probs[np.arange(len(labels)), labels] + 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    repeats = parser.parse_args().repeats
    print(f"device: {device()}")
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(0), (N, K)))
    labels = jax.random.randint(jax.random.key(1), (N,), 0, K)
    probs_np, labels_np = np.asarray(probs), np.asarray(labels)
    cases = [
        ("expected_calibration_error", numpy_ece),
        ("maximum_calibration_error", numpy_mce),
        ("adaptive_calibration_error", numpy_adaptive),
        ("classwise_calibration_error", numpy_classwise),
        ("brier_score", numpy_brier),
    ]
    print(f"| metric [{N:,} x {K}] | jsoftmax jit ms | NumPy ms | time ratio |")
    print("|---|---:|---:|---:|")
    for name, theirs in cases:
        ours = jax.jit(getattr(jsoftmax, name))
        np.testing.assert_allclose(ours(probs, labels), theirs(probs_np, labels_np), rtol=1e-4)
        r = interleaved(
            lambda ours=ours: ours(probs, labels),
            lambda theirs=theirs: theirs(probs_np, labels_np),
            repeats,
        )
        print(f"| {name} | {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['time_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
