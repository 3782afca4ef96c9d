import contextlib
import io
import os
import re
import types

import jax
import jax.ad_checkpoint
import pytest
from hypothesis import settings
from jax.test_util import check_grads

settings.register_profile("jsoftmax", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("jsoftmax")

# The suite compiles about 2,000 small programs, and LLVM's optimisation of their machine
# code is most of that time. Turning it off keeps XLA's graph (its HLO passes, whose
# rewrites could matter at the edges) and buffer assignment; results may differ in the last
# bit, where optimised code fuses multiply-adds. The notebooks, examples and subprocess
# tests run in processes of their own, optimised as users run them, and
# JSOFTMAX_OPTIMIZED_TESTS=1 runs the whole suite optimised.
if not os.environ.get("JSOFTMAX_OPTIMIZED_TESTS"):
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    """Float32 matmuls as exact on every backend: a GPU's default uses TF32 inputs."""
    with jax.default_matmul_precision("highest"):
        yield


def saved_residuals(f, *args) -> list[tuple[str, tuple[int, ...], str]]:
    """``(dtype, shape, origin)`` of what reverse mode of ``f`` keeps for its backward pass.

    Parsed from ``jax.ad_checkpoint.print_saved_residuals``; the origin says
    "from the argument ...", "from a constant" (a closed-over input) or
    "output of ..." (something computed).
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    out = []
    for line in printed.getvalue().splitlines():
        dtype, shape, origin = re.fullmatch(r"(\w+)\[([\d,]*)\] (.*)", line).groups()
        out.append((dtype, tuple(int(s) for s in shape.split(",") if s), origin))
    return out


@contextlib.contextmanager
def core_schedules():
    """Runs on CPU what GPUs and TPUs run: every switch in ``jsoftmax._cpu`` takes
    its default, the plain core (the caches go, so that nothing traced before returns)."""
    from jsoftmax import _cpu

    def default_only(*args, default, **per_platform):
        return default(*args)

    real = _cpu.lax
    jax.clear_caches()
    _cpu.lax = types.SimpleNamespace(**{**vars(real), "platform_dependent": default_only})
    try:
        yield
    finally:
        _cpu.lax = real
        jax.clear_caches()


def lowered_for(f, platform: str, *args) -> str:
    """The StableHLO that ``jax.jit(f)`` would compile on ``platform`` (no device needed)."""
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def check_grads_order_two(f, args):
    """``check_grads`` forward to order 1 and reverse to order 2.

    Both modes at order 2 also check the mixed orders, which compiles twice as
    many programs for rules that the reverse mode already differentiates twice.
    """
    check_grads(f, args, order=1, modes=("fwd",))
    check_grads(f, args, order=2, modes=("rev",))
