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


# TODO(issue 13, lead): docstring fixes for modules that are being moved into packages right now
# (core/find.py -> core/find/, plot.py -> plot/). They are applied here, to the text autodoc reads,
# only while the source still has the faulty text; move each into the docstring itself and delete
# the entry (an entry whose text no longer occurs does nothing).
#   1. atomds.core.find find_atoms (core/find/api.py), step 5: a bullet list needs a blank line before it
#      ("5. A blob is an atom when" + blank line + "   - its amplitude ...").
#   2. atomds.plot modes (plot/deformation.py): "|sum of shifts| / sum of |shifts|" reads as reST substitutions; quote it
#      as ``|sum of shifts| / sum of |shifts|``.
#   3. atomds.core.samples (package docstring), "Modules": the line of generator names continued on
#      an indented line is invalid reST; write the block as a simple table or a definition list.
#   4. atomds.core.find (core/find/__init__.py), the table of stages: ":mod:`.correlation`" and
#      ":mod:`.significance`" are wider than the first column (18 characters); widen that column to
#      20 and realign the rows (the patch below shows those two names as plain code meanwhile).
_DOCSTRING_TODO = {
    "5. A blob is an atom when\n   - its amplitude": "5. A blob is an atom when\n\n   - its amplitude",
    "(``mode_polarity``: |sum of shifts| / sum of |shifts|)": "(``mode_polarity``: ``|sum of shifts| / sum of |shifts|``)",
    "``frames``\n                  the generators": "``frames``: the generators",
    ":mod:`.correlation` zero-normalised": "``correlation``     zero-normalised",
    ":mod:`.significance` noise z-score": "``significance``    noise z-score",
}


def _apply_docstring_todo(app, what, name, obj, options, lines):
    text = "\n".join(lines)
    fixed = text
    for old, new in _DOCSTRING_TODO.items():
        fixed = fixed.replace(old, new)
    if fixed != text:
        lines[:] = fixed.split("\n")


def setup(app):
    app.connect("autodoc-process-docstring", _apply_docstring_todo, priority=400)  # before numpydoc (500)
