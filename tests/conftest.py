import jax
import pytest
from hypothesis import settings

settings.register_profile("jsoftmax", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("jsoftmax")


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
