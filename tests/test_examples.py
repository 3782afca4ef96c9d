"""The examples in examples/ (users' code: optax, flax nnx, equinox, shard_map) run and check
themselves; each prints "ok". The doctest blocks of the README and the docs' front page hold."""

import doctest
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script):
    pytest.importorskip({"flax_nnx": "flax", "equinox_model": "equinox"}.get(script.stem, "optax"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # shard_map_step multiplies CPU devices
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert " ok" in result.stdout


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_doctest_blocks_of_the_pages_hold(page):
    blocks = re.findall(r"```python\n(>>> .*?)```", (ROOT / page).read_text(), re.S)
    assert blocks, page
    for i, block in enumerate(blocks):
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        runner.run(doctest.DocTestParser().get_doctest(block, {}, f"{page}[{i}]", page, 0))
        assert runner.summarize(verbose=False).failed == 0, (page, i)
