"""What an NVIDIA GPU would compile, on a machine without one.

Run (a separate venv: the CUDA wheels are large and make CUDA jax's default):
    python -m venv /tmp/cuda && . /tmp/cuda/bin/activate
    pip install "jax[cuda13]==0.10.2" optax && pip install -e .  # (this machine's jax)
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python benchmarks/aot_gpu.py [losses|softmax|linear] \
        [--gpu h100]

XLA compiles for a GPU described by a target configuration alone (the CUDA
plugin's deviceless compile: ``jax.experimental.topologies``), the same
optimisation passes that run on the device. For each case of bench_losses.py
(and a few options together) and bench_softmax.py at the GPU sizes,
jsoftmax against optax or jax.nn, this
prints the compiled temp memory (the figure the benchmarks print on a GPU) and
an estimate of the memory traffic: the bytes each kernel of the optimised
program reads and writes, summed; the softmax family and the losses are bound
by it. No time is measured: a GPU's clock decides that, this shows whether the
program has the shape of the reference (no [N, K] buffer, no extra pass).
``linear`` compiles bench_linear.py's GPU heads (chunks of 2048 tokens, the GPU
default; the deviceless compile runs on a CPU backend, whose default differs)
with each ``accum_dtype`` and prints their temps against the unfused
computation's: matmul-bound, so no traffic.

On the H200 the device tool lends (jax 0.11.2), the temps matched the
measured ones to 0.1 MiB, and the traffic ratios the measured time ratios to
within 0.1 in the softmax family's large cases (softmax forward+backward at
bfloat16 [8192, 128256]: 1.50x predicted, 1.44x measured). The estimate counts
a gather or scatter as reading its whole operand, so it overstates optax's
integer loss (0.72x predicted for jsoftmax, 1.01x measured).
"""

import argparse
import functools
import os
import re

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # compile only, even next to a GPU

import bench_linear
import bench_losses
import bench_softmax
import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

import jsoftmax

# XLA's GpuTargetConfig for the devices the benchmarks ran on; the cost model
# reads bandwidth and memory size (the H200's and H100's fusions differ).
GPUS = {
    "h200": ("NVIDIA H200", 4_800_000_000_000, 150_754_820_096),
    "h100": ("NVIDIA H100 80GB HBM3", 3_352_320_000_000, 84_929_347_584),
}
TARGET = """
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 13 }}
device_description_str: "{name}"
"""
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}
BYTES.update(f64=8, s64=8, u64=8)
KERNELS = ("fusion", "custom-call", "reduce", "scatter", "gather", "dot", "copy", "sort")


def compiler(gpu):
    name, bandwidth, memory = GPUS[gpu]
    target = TARGET.format(name=name, bandwidth=bandwidth, memory=memory)
    topology = topologies.get_topology_desc(platform="cuda", target_config=target, topology="1x1x1")
    mesh = topologies.make_mesh(topology, (1,), ("device",))
    sharding = NamedSharding(mesh, PartitionSpec())

    def compile(fn, *args):
        def spec(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

        return jax.jit(fn).lower(*jax.tree.map(spec, args)).compile()

    return compile


def nbytes(shape: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += BYTES.get(dtype, 0) * count
    return total


def traffic(hlo: str) -> tuple[int, int]:
    """Kernels of the optimised program's entry and the bytes they read and write."""
    entry = hlo[hlo.index("\nENTRY") :].split("\n}")[0]
    shapes, kernels, total = {}, 0, 0
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) (\S+?)\((.*?)\)", line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        shapes[name] = shape
        if op in KERNELS:
            kernels += 1
            reads = (shapes.get(o.strip().lstrip("%"), "") for o in operands.split(","))
            total += nbytes(shape) + sum(map(nbytes, reads))
    return kernels, total


def row(compile, name, ours, theirs, args):
    (ours_exe, theirs_exe) = (compile(f, *args) for f in (ours, theirs))
    temps = [e.memory_analysis().temp_size_in_bytes / 2**20 for e in (ours_exe, theirs_exe)]
    (k_ours, b_ours), (k_theirs, b_theirs) = (traffic(e.as_text()) for e in (ours_exe, theirs_exe))
    print(
        f"| {name} | {temps[0]:.1f} | {temps[1]:.1f} | {b_ours / 2**30:.2f} | "
        f"{b_theirs / 2**30:.2f} | {b_ours / b_theirs:.2f}x | {k_ours} | {k_theirs} |",
        flush=True,
    )


def header(theirs):
    print(
        f"| case | jsoftmax temp MiB | {theirs} temp MiB | jsoftmax GiB moved | {theirs} GiB "
        f"moved | traffic ratio | jsoftmax kernels | {theirs} kernels |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )


ce = bench_losses.ce
CAP, ALPHA = bench_losses.CAP, bench_losses.ALPHA
# Options together, compiled only: (jsoftmax, optax's nearest route).
COMBINATIONS = {
    f"logit_softcap={CAP}, label_smoothing={ALPHA}": (
        lambda x, y, q, w, m: ce(x, y, logit_softcap=CAP, label_smoothing=ALPHA),
        lambda x, y, q, w, m: bench_losses.optax_smoothed(CAP * jnp.tanh(x / CAP), y),
    ),
    "softmax_focal_loss (optax: the integer CE)": (
        lambda x, y, q, w, m: jsoftmax.softmax_focal_loss(x, y),
        bench_losses.CASES["integer labels"][1],
    ),
    f"softmax_focal_loss, label_smoothing={ALPHA} (optax: the smoothed CE)": (
        lambda x, y, q, w, m: jsoftmax.softmax_focal_loss(x, y, label_smoothing=ALPHA),
        lambda x, y, q, w, m: bench_losses.optax_smoothed(x, y),
    ),
}


def losses(compile):
    for n, k, dtype in [(8192, 128256, jnp.bfloat16), (4096, 32000, jnp.float32)]:
        print(f"\n{jnp.dtype(dtype).name} [{n}, {k}], value_and_grad of the mean loss\n")
        header("optax")
        args = jax.eval_shape(functools.partial(bench_losses.inputs, n, k, dtype))
        for name, (ours, theirs) in {**bench_losses.CASES, **COMBINATIONS}.items():
            vg = bench_losses.value_and_grad
            row(compile, name, vg(ours), vg(theirs), args)


def softmax(compile):
    cases = [
        ((8192, 128256), jnp.bfloat16, False),
        ((4096, 32000), jnp.float32, False),
        ((524288, 10), jnp.float32, False),
        ((64, 128, 1024), jnp.float32, False),
        ((8, 32, 2048, 2048), jnp.bfloat16, True),
    ]
    print()
    header("jax.nn")
    for shape, dtype, causal in cases:
        x = jax.ShapeDtypeStruct(shape, dtype)
        where = jax.ShapeDtypeStruct(shape[-2:], bool) if causal else None
        label = f"{jnp.dtype(dtype).name} {list(shape)}" + (" causal where" if causal else "")
        for name, ours, theirs in bench_softmax.PAIRS:
            ours, theirs = bench_softmax.masked(ours), bench_softmax.masked(theirs)
            g = jax.ShapeDtypeStruct(jax.eval_shape(ours, x, where).shape, dtype)
            row(compile, f"{name} fwd {label}", ours, theirs, (x, where))
            fb = bench_softmax.forward_backward
            row(compile, f"{name} fwd+bwd {label}", fb(ours), fb(theirs), (x, where, g))


def head_temp(compile, head, args, fused, accum=None):
    """Compiled temp MiB of bench_linear's fused (or unfused) value and gradients."""

    def fn(h, w, labels, advantage, t_weight):
        options = {"chunk_size": 2048, "accum_dtype": accum}
        pair = bench_linear.losses(head, options)
        return pair[0 if fused else 1](h, w, labels, advantage, h, t_weight)

    return compile(fn, *args).memory_analysis().temp_size_in_bytes / 2**20


def linear(compile):
    print("\n| head | N x D x V | accum_dtype | fused temp MiB | unfused temp MiB | temp ratio |")
    print("|---|---|---|---:|---:|---:|")
    heads = ("cross_entropy", "log_probs", "log_probs_loss", "forward_kl")
    for n, d, v, dtype in bench_linear.sizes(gpu=True):
        spec = jax.ShapeDtypeStruct
        args = (spec((n, d), dtype), spec((d, v), dtype), spec((n,), jnp.int32))
        args += (spec((n,), jnp.float32), spec((d, v), dtype))
        for head in heads:
            unfused = head_temp(compile, head, args, False)
            for accum in (None, "bfloat16"):
                fused = head_temp(compile, head, args, True, accum)
                print(
                    f"| {head} | {n} x {d} x {v} | {accum or 'default'} | {fused:.0f} "
                    f"| {unfused:.0f} | {fused / unfused:.2f}x |",
                    flush=True,
                )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="*", default=["losses", "softmax"])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    args = parser.parse_args()
    print(f"deviceless compile for {GPUS[args.gpu][0]}, jax {jax.__version__}")
    compile = compiler(args.gpu)
    for what in args.what:
        {"losses": losses, "softmax": softmax, "linear": linear}[what](compile)


if __name__ == "__main__":
    main()
