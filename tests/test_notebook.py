import pathlib
import re

import pytest

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def execute(name):
    """Runs a notebook top to bottom (its cells assert what it claims); returns what it printed."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    return "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )


def test_calibration_notebook_runs_and_temperature_scaling_lowers_the_ece():
    # Its cells assert that scaling lowered the test ECE and the temperatures' sides of 1.
    printed = execute("calibration.ipynb")
    before, after = map(float, re.search(r"test ECE ([\d.]+)% -> ([\d.]+)%", printed).groups())
    assert after < before


def test_language_model_notebook_trains_with_the_fused_loss_and_its_temperature_lowers_the_nll():
    # Its last cell asserts that the fitted temperature lowered the held-out NLL.
    printed = execute("language_model.ipynb")
    before, after = map(float, re.search(r"held-out NLL ([\d.]+) -> ([\d.]+)", printed).groups())
    assert after < before
