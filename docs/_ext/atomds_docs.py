"""Sphinx extension of the atomds documentation: pages generated from the package at build time.

Directives
----------
``atomds-toplevel``
    The names of the ``atomds`` namespace (``atomds.__all__``), each linked to its home module.
``atomds-accessor CLASS``
    The forwarding methods of an accessor class (``ds.lcx``, ``ds.lcx.plot``), each linked to the
    function it forwards to.
``atomds-schemas``
    One table per dataset layout in ``atomds/schemas/*.yaml`` (variables, dims, dtypes, required).
``atomds-variables``
    The variables of an analysed sample with their dims, dtype, ``units`` and ``long_name``.
``atomds-cli``
    ``atomds --help`` and the help of every subcommand, captured by running the command line.
``atomds-gallery``
    The report's figures (:func:`atomds.report.report_figures`) of an analysed sample, drawn when
    the builder starts into ``docs/_generated/gallery`` (ignored by git).

Everything is computed offline from the installed package; nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: Sample drawn for the gallery and the variables table (a bundled generator of ``atomds.datasets``).
SAMPLE = "two_phase"
#: Folder under the source dir that receives generated files (listed in .gitignore).
GENERATED = "_generated"
#: Width of the captured command-line help, in characters.
HELP_COLUMNS = 100
#: Seconds one ``atomds ... --help`` may take before the build fails.
HELP_TIMEOUT_S = 120


# ---------------------------------------------------------------- helpers


def _summary(obj: Any) -> str:
    """First paragraph of an object's docstring, on one line (empty when it has none)."""
    doc = inspect.getdoc(obj) or ""
    first = " ".join(line.strip() for line in doc.strip().split("\n\n", 1)[0].splitlines())
    module = getattr(obj, "__module__", None) if not inspect.ismodule(obj) else obj.__name__
    if module:  # a bare :func:`name` means the object's own module, wherever the summary is shown
        first = re.sub(r":(\w+):`~?(\w+)`", lambda m: f":{m[1]}:`~{_qualify(module, m[2])}`", first)
    return first


def _qualify(module: str, name: str) -> str:
    """The documented full name of ``name`` as seen from ``module``."""
    target = getattr(importlib.import_module(module), name, None)
    if inspect.isfunction(target) or inspect.isclass(target):
        return _home(target)
    return f"{module}.{name}"


def _home(obj: Any) -> str:
    """Fully qualified name under which the API reference documents a function or class.

    That is the outermost package below ``atomds`` that lists it in ``__all__`` (autosummary
    documents a package's ``__all__``), else the module that defines it.
    """
    module, name, qualname = obj.__module__, obj.__name__, obj.__qualname__
    parts = module.split(".")
    for i in range(2, len(parts)):
        package = importlib.import_module(".".join(parts[:i]))
        if name in getattr(package, "__all__", ()) and getattr(package, name, None) is obj:
            return f"{package.__name__}.{qualname}"
    return f"{module}.{qualname}"


def _role(obj: Any) -> str:
    if inspect.isclass(obj):
        return "exc" if issubclass(obj, BaseException) else "class"
    return "func"


def _cell(text: str) -> str:
    """A list-table cell: one line, never empty."""
    text = " ".join(str(text).split())
    return text if text else "\\-"


def _plain(text: str) -> str:
    """Text shown as is: reST inline markup characters escaped (``|F|`` is no substitution)."""
    return re.sub(r"([\\*`|_])", r"\\\1", str(text))


def _list_table(header: list[str], rows: list[list[str]], *, widths: str = "auto") -> str:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {_cell(row[0])}")
        lines.extend(f"     - {_cell(value)}" for value in row[1:])
    return "\n".join(lines) + "\n"


@functools.cache
def analysed_sample() -> Any:
    """``atomds.analyze`` of the bundled sample :data:`SAMPLE` (computed once per build)."""
    import atomds

    return atomds.analyze(getattr(atomds.datasets, SAMPLE)())


# ---------------------------------------------------------------- directives


class TopLevel(SphinxDirective):
    """Table of ``atomds.__all__``: name, where it lives, summary."""

    def run(self) -> list[nodes.Node]:
        import atomds

        rows = []
        for name in atomds.__all__:
            obj = getattr(atomds, name)
            if inspect.ismodule(obj):
                rows.append([f"``atomds.{name}``", f":mod:`{obj.__name__}`", _summary(obj)])
            elif inspect.isfunction(obj) or inspect.isclass(obj):
                rows.append([f"``atomds.{name}``", f":{_role(obj)}:`{_home(obj)}`", _summary(obj)])
            else:
                rows.append([f"``atomds.{name}``", f"``{obj!r}``", ""])
        return self.parse_text_to_nodes(_list_table(["name", "defined in", "summary"], rows, widths="20 30 50"))


class Accessor(SphinxDirective):
    """Table of an accessor's public methods and the functions they forward to."""

    required_arguments = 1  # the accessor class, e.g. atomds.accessor.LcxAccessor
    optional_arguments = 1  # the prefix shown, e.g. ds.lcx

    def _target(self, cls: type, name: str) -> Any | None:
        """The function ``cls.<name>`` forwards to, or None for a non-forwarding member."""
        member = getattr(cls, name)
        if inspect.isfunction(member) and not member.__qualname__.startswith(cls.__name__ + "."):
            return member  # a forwarding descriptor hands out the target itself
        if inspect.isfunction(member):  # a hand-written wrapper: the module function of the same name
            module = importlib.import_module(cls.__module__)
            target = getattr(module, name, None)
            return target if inspect.isfunction(target) else None
        return None

    def run(self) -> list[nodes.Node]:
        module_name, _, class_name = self.arguments[0].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        prefix = self.arguments[1] if len(self.arguments) > 1 else "ds.lcx"
        rows = []
        for name in vars(cls):
            if name.startswith("_"):
                continue
            target = self._target(cls, name)
            if target is None:
                continue
            rows.append([f"``{prefix}.{name}()``", f":func:`{_home(target)}`", _summary(target)])
        if not rows:
            raise self.error(f"{self.arguments[0]} has no forwarding methods")
        return self.parse_text_to_nodes(_list_table(["method", "forwards to", "summary"], rows, widths="22 33 45"))


def _schema_files() -> list[Path]:
    folder = importlib.resources.files("atomds") / "schemas"
    return sorted(Path(str(folder)).glob("*.yaml"))


def _header_comment(path: Path) -> str:
    """The leading ``#`` comment lines of a YAML file, as one paragraph (`name` shown as code)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return re.sub(r"`([^`]+)`", r"``\1``", " ".join(lines))


class Schemas(SphinxDirective):
    """One section per layout in ``atomds/schemas``: its comment and a table of its variables."""

    def run(self) -> list[nodes.Node]:
        parts = []
        for path in _schema_files():
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
            title = f"``{path.name}`` ({spec.get('name', path.stem)})"
            rows = []
            for kind in ("coords", "data_vars"):
                for name, var in (spec.get(kind) or {}).items():
                    var = var or {}
                    dims = ", ".join("*any*" if d is None else str(d) for d in var.get("dims") or [])
                    rows.append([
                        f"``{name}``",
                        "coordinate" if kind == "coords" else "variable",
                        f"``({dims})``" if dims else "",
                        _plain(var.get("dtype") or "any"),
                        "yes" if var.get("required", True) else "no",
                        "yes" if var.get("nullable", False) else "no",
                    ])
            parts.append(f"{title}\n{'~' * len(title)}\n\n{_header_comment(path)}\n\n")
            parts.append(_list_table(["name", "kind", "dims", "dtype", "required", "NaN allowed"], rows))
            parts.append("\n")
        return self.parse_text_to_nodes("".join(parts), allow_section_headings=True)


class Variables(SphinxDirective):
    """Every variable of the analysed sample: dims, dtype, units, long_name."""

    def run(self) -> list[nodes.Node]:
        ds = analysed_sample()
        rows = []
        for name in [*ds.coords, *ds.data_vars]:
            var = ds[name]
            dims = ", ".join(str(d) for d in var.dims)
            rows.append([f"``{name}``", f"``({dims})``", f"``{var.dtype}``", f"``{var.attrs['units']}``"
                         if "units" in var.attrs else "", _plain(var.attrs.get("long_name", ""))])
        table = _list_table(["name", "dims", "dtype", "units", "long_name"], rows, widths="20 20 10 10 40")
        return self.parse_text_to_nodes(table)


def _help(args: list[str]) -> str:
    """The output of ``atomds ARGS --help`` (run in a fresh interpreter, at a fixed width)."""
    env = {**os.environ, "COLUMNS": str(HELP_COLUMNS)}
    code = "import sys; from atomds.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True,
                          env=env, timeout=HELP_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"atomds {' '.join(args)} --help failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout.replace("usage: -c", "usage: atomds")


class Cli(SphinxDirective):
    """``atomds --help`` and each subcommand's help as literal blocks."""

    def run(self) -> list[nodes.Node]:
        main = _help([])
        match = re.search(r"\{([a-z0-9_,-]+)\}", main)
        subcommands = match.group(1).split(",") if match else []
        out: list[nodes.Node] = []
        for args in [[], *([s] for s in subcommands)]:
            title = " ".join(["atomds", *args, "--help"])
            section = nodes.section(ids=[nodes.make_id(title)], names=[nodes.fully_normalize_name(title)])
            section += nodes.title("", "", nodes.literal(text=title))
            section += nodes.literal_block(text=main if not args else _help(args), language="text")
            out.append(section)
        return out


def _gallery_dir(app: Sphinx) -> Path:
    return Path(app.srcdir) / GENERATED / "gallery"


def draw_gallery(app: Sphinx) -> None:
    """Draw the report's figures of the analysed sample into :func:`_gallery_dir` (builder-inited)."""
    from atomds.report import report_figures

    folder = _gallery_dir(app)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    records = report_figures(analysed_sample(), folder)
    (folder / "records.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    logger.info(f"atomds gallery: {sum('file' in r for r in records)} figures in {folder}")


class Gallery(SphinxDirective):
    """The drawn figures, grouped by the report's sections, each with its caption."""

    def run(self) -> list[nodes.Node]:
        folder = _gallery_dir(self.env.app)
        records = json.loads((folder / "records.json").read_text(encoding="utf-8"))
        parts, section = [], None
        for rec in records:
            if rec["section"] != section:
                section = rec["section"]
                parts.append(f"{section}\n{'-' * len(section)}\n\n")
            if "file" not in rec:
                parts.append(f"*{rec['title']}*: not drawn ({rec['skipped']}).\n\n")
                continue
            parts.append(f".. figure:: /{GENERATED}/gallery/{rec['file']}\n   :alt: {rec['title']}\n"
                         f"   :width: 90%\n\n   **{rec['title']}.** {rec['caption']}\n\n")
        self.env.note_dependency(str(folder / "records.json"))
        return self.parse_text_to_nodes("".join(parts), allow_section_headings=True)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("atomds-toplevel", TopLevel)
    app.add_directive("atomds-accessor", Accessor)
    app.add_directive("atomds-schemas", Schemas)
    app.add_directive("atomds-variables", Variables)
    app.add_directive("atomds-cli", Cli)
    app.add_directive("atomds-gallery", Gallery)
    app.connect("builder-inited", draw_gallery)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
