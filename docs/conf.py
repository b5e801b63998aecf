"""Sphinx configuration of the atomds documentation.

Build (offline, warnings as errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API reference is generated from the docstrings (autodoc, autosummary, numpydoc); the data-model
tables, the command-line help and the figure gallery are generated at build time by the local
extension ``docs/_ext/atomds_docs.py`` (figures go to ``docs/_generated/``, which git ignores).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the gallery draws figures without a display
os.environ.setdefault("MPLBACKEND", "Agg")

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import atomds  # noqa: E402

project = "atomds"
author = "the atomds developers"
copyright = "the atomds developers"
version = release = atomds.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "atomds_docs",
]

# No network at build time: no intersphinx inventories are downloaded.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

templates_path = ["_templates"]
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# API reference: one page per module (summary tables, then every public member documented).
autosummary_generate = True
autosummary_imported_members = False
autosummary_ignore_module_all = False
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types (and the units)
autodoc_member_order = "bysource"

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = False
numpydoc_xref_param_type = False

html_theme = "furo"
html_title = f"atomds {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
