#!/usr/bin/env bash
# What a lent GPU should measure, in commands of at most 10 minutes:
#   bash benchmarks/run_on_gpu.sh SECONDS STEP...
# STEP: losses, softmax, linear (the benchmarks), notebooks (their code cells as
# scripts: the device image has no nbclient), suite (the tests, with the time
# left). Each step runs under a time limit and logs to $OUT (the device tool's)
# or ./gpu-out. Run from the repository root on a machine with jax for CUDA;
# nothing is installed: PYTHONPATH is the checkout.
set -uo pipefail
budget=${1:?seconds}
shift
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

step() {  # step NAME SECONDS COMMAND...: COMMAND under min(SECONDS, time left), logged
    local name=$1 limit=$(($2 < $(left) ? $2 : $(left)))
    shift 2
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped, no time left"; return; fi
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 40
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

notebook_as_script() {
    python3 - "$1" <<'EOF'
import json, sys, time
cells = json.load(open(sys.argv[1]))["cells"]
code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
start = time.perf_counter()
exec(compile(code, sys.argv[1], "exec"), {"__name__": "__main__"})
print(f"{sys.argv[1]}: code cells ran in {time.perf_counter() - start:.1f} s")
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax, optax; print("jax", jax.__version__, jax.devices(), "optax", optax.__version__)'
for name in "$@"; do
    case $name in
    losses) step losses 170 python3 benchmarks/bench_losses.py --repeats 7 ;;
    softmax) step softmax 120 python3 benchmarks/bench_softmax.py ;;
    # The fused policy loss and the bfloat16 sums first: the other heads were timed
    # on an H200 (docs/large_vocabularies.md).
    linear) step linear 300 python3 benchmarks/bench_linear.py --max-unfused-gib 64 \
        --heads log_probs_loss log_probs cross_entropy jsd --accum-dtypes default bfloat16 ;;
    notebooks)
        step notebooks 120 bash -c "$(declare -f notebook_as_script);
            notebook_as_script notebooks/calibration.ipynb &&
            notebook_as_script notebooks/language_model.ipynb"
        ;;
    suite)
        # Compiled as users compile (JSOFTMAX_OPTIMIZED_TESTS); twelve workers share the
        # GPU (no preallocation); -v prints each test's result as it ends.
        XLA_PYTHON_CLIENT_PREALLOCATE=false JSOFTMAX_OPTIMIZED_TESTS=1 step suite 600 \
            python3 -m pytest -v -n 12 -p no:benchmark -p no:cacheprovider --durations=10 \
            -o console_output_style=classic
        grep -E "(passed|failed).* in " "$out/suite.log"
        ;;
    *) echo "unknown step $name" ;;
    esac
done
