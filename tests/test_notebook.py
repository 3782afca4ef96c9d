import pathlib
import re

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "calibration.ipynb"


def test_calibration_notebook_runs_and_temperature_scaling_lowers_the_ece():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Its cells assert that scaling lowered the test ECE and the temperatures' sides of 1.
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    before, after = map(float, re.search(r"test ECE ([\d.]+)% -> ([\d.]+)%", printed).groups())
    assert after < before
