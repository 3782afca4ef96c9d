"""Sphinx configuration: MyST pages, autodoc of the public API, notebooks with stored outputs.

Sphinx rather than mkdocs because jsoftmax's docstrings are reStructuredText (``.. math::``
blocks, ``:func:`` roles), which autodoc and napoleon render as written; myst-nb renders the
notebooks, as optax's site does. Build strictly: ``sphinx-build -W --keep-going docs docs/_build``.
"""

import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # document the tree being built

import jsoftmax  # noqa: E402

# The notebooks live in notebooks/ (where the suite executes them); the site renders a copy,
# with the outputs and figures stored in them.
(HERE / "notebooks").mkdir(exist_ok=True)
for notebook in (HERE.parent / "notebooks").glob("*.ipynb"):
    shutil.copy(notebook, HERE / "notebooks" / notebook.name)

project = "jsoftmax"
release = version = jsoftmax.__version__
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build"]
nb_execution_mode = "off"  # the suite executes the notebooks; the site shows their outputs
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
autodoc_typehints = "none"  # names and defaults only: the Args sections give the types
autodoc_member_order = "bysource"
napoleon_google_docstring = True
# A broken reference fails the build (-n); jax's own types have no inventory offline.
nitpicky = True
nitpick_ignore = [("py:class", "jax.jaxlib._jax.Array"), ("py:class", "jax.Array")]
html_theme = "furo"
html_title = f"jsoftmax {version}"
