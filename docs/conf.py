"""Sphinx configuration: these Markdown pages (MyST) and an API reference generated from the docstrings.

Build: ``pip install -e ".[docs]" && sphinx-build -W docs docs/_build/html`` (``.ci/run`` does, warnings as errors).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "cmml-monai"
author = "cmml-monai developers"
copyright = "cmml-monai developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings, as MONAI's
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

autosummary_generate = True
autosummary_imported_members = False
# each object documented once, on its own module's page (the packages re-export through __all__)
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# heavy or optional imports the reference does not need to execute
autodoc_mock_imports = ["onnx", "onnxruntime", "monailabel", "monai.deploy", "holoscan"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_heading_anchors = 3
# the task pages link to files of the repository (configs, tests, the model card), not to Sphinx documents
suppress_warnings = ["myst.xref_missing"]

html_theme = "alabaster"
html_title = "cmml-monai"
