"""The examples in examples/ (users' code: optax, flax nnx, equinox, shard_map) run and check
themselves; each prints "ok"."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script):
    pytest.importorskip({"flax_nnx": "flax", "equinox_model": "equinox"}.get(script.stem, "optax"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # shard_map_step multiplies CPU devices
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert " ok" in result.stdout
