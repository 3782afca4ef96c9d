"""Side-by-side timing: interleaved repeats after warm-up, median per-pair ratio."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def compiled(fn, *args):
    """``fn`` jitted and compiled for ``args``, and its temp memory in bytes."""
    exe = jax.jit(fn).lower(*args).compile()
    memory = exe.memory_analysis()
    return exe, (memory.temp_size_in_bytes if memory is not None else float("nan"))


def _seconds(run) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


def median_ms(run, repeats: int) -> float:
    """Median milliseconds of ``run()`` over ``repeats`` calls after one warm-up call."""
    _seconds(run)
    return 1e3 * float(np.median([_seconds(run) for _ in range(repeats)]))


def _pair(run_a, run_b, a_first: bool) -> tuple[float, float]:
    if a_first:
        return _seconds(run_a), _seconds(run_b)
    b = _seconds(run_b)
    return _seconds(run_a), b


def interleaved(run_a, run_b, repeats: int) -> dict:
    """Times two zero-argument callables as A B B A A B ... after warm-up; medians and ratio.

    Each side follows each side about equally often (exactly for an even
    ``repeats``): on CPU a call right after one that freed a large buffer runs
    up to 20% slower, which A B A B would charge to one side only.
    """
    for _ in range(2):  # warm-up
        _seconds(run_a), _seconds(run_b)
    a, b = np.array([_pair(run_a, run_b, i % 2 == 0) for i in range(repeats)]).T
    return {
        "ours_ms": 1e3 * np.median(a),
        "theirs_ms": 1e3 * np.median(b),
        "time_ratio": float(np.median(a / b)),
    }


def agree(out_a, out_b, rtol: float) -> None:
    """Raises unless two outputs agree leaf by leaf: the same structure, the same non-finite
    entries, and the finite ones within ``rtol`` of the leaf's largest on either side (5e-2
    if either side is a 16-bit float). Timing two different computations measures nothing."""
    if jax.tree.structure(out_a) != jax.tree.structure(out_b):
        raise AssertionError("the two sides return different structures")
    for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b), strict=True):
        low = any(jnp.issubdtype(v.dtype, jnp.floating) and v.dtype.itemsize < 4 for v in (a, b))
        tol = max(rtol, 5e-2) if low else rtol
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        finite = np.isfinite(b)
        scale = max(np.max(np.abs(v[np.isfinite(v)]), initial=0.0) for v in (a, b))
        if (
            a.shape != b.shape
            or not np.array_equal(np.isfinite(a), finite)
            or not np.array_equal(a[~finite], b[~finite], equal_nan=True)
            or not np.allclose(a[finite], b[finite], rtol=0, atol=tol * scale)
        ):
            raise AssertionError(f"the two sides differ: {a.ravel()[:4]} ... {b.ravel()[:4]} ...")


def compare(ours, theirs, args, repeats: int, rtol: float | None = 1e-3) -> dict:
    """Compiles two functions of the same args, checks that they agree to ``rtol`` (None: a
    floor, another computation), times them interleaved; adds temp memory."""
    exe_a, mem_a = compiled(ours, *args)
    exe_b, mem_b = compiled(theirs, *args)
    if rtol is not None:
        agree(exe_a(*args), exe_b(*args), rtol)
    return {
        **interleaved(lambda: exe_a(*args), lambda: exe_b(*args), repeats),
        "ours_temp": mem_a,
        "theirs_temp": mem_b,
        "mem_ratio": mem_a / mem_b if mem_b else float("nan"),
    }


def device() -> str:
    d = jax.devices()[0]
    return f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s), jax {jax.__version__}"


def table(rows: list[tuple[str, dict]], theirs: str) -> str:
    head = (
        f"| case | jsoftmax ms | {theirs} ms | time ratio | jsoftmax temp MiB "
        f"| {theirs} temp MiB |\n|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['time_ratio']:.2f}x "
            f"| {r['ours_temp'] / 2**20:.1f} | {r['theirs_temp'] / 2**20:.1f} |"
        )
    return "\n".join(lines)
