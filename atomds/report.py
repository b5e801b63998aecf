"""A self-contained HTML report of an analysed Dataset: ``DIR/index.html`` with PNG figures beside it.

The report is what ``atomds analyze ... --report DIR`` writes. It holds no script, no web font and
no link outside its folder, so it opens offline and can be zipped or mailed as it is.

Writing is atomic: a new folder is built beside ``DIR`` and renamed into place; when ``DIR``
already exists, each figure is replaced by rename and ``index.html`` is written last (through a
temporary file), so a reader never sees a half-written report.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import html
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import AtomdsError, InvalidParameterError
from .io import atomic_write
from .params import all_step_params, step_params

__all__ = ["write_report", "report_figures"]

_GENERATOR = "atomds report"
_FIGURE_NAME = re.compile(r"^[0-9]{2}_[a-z0-9_]+\.png$")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n_clusters(ds: xr.Dataset) -> int:
    if "cluster" not in ds.variables:
        return 0
    c = np.asarray(ds["cluster"].values)
    return int(np.unique(c[c >= 0]).size)


def _figure_specs(ds: xr.Dataset, *, max_components: int) -> list[tuple[str, str, str, Callable[[], Any]]]:
    """The figures of a report: (section, title, caption, maker) for whatever steps have run."""
    from . import plot

    specs: list[tuple[str, str, str, Callable[[], Any]]] = []
    has = ds.variables.__contains__
    if has("atom_x") or has("seed_x"):
        color = "sublattice" if has("sublattice") and np.unique(ds["sublattice"].values).size > 1 else None
        specs.append(("Atoms", "Atoms found", "Every atom over the image" + (", coloured by sublattice." if color else "."),
                      lambda: plot.atoms(ds, color=color)))
    if has("correlation") or "find_atoms_params" in ds.attrs:
        specs.append(("Atoms", "Template correlation", "Normalised cross-correlation of the template with the image; "
                      "the cyan contour is the threshold, the green dots the blob centroids (seeds).",
                      lambda: plot.correlation(ds)))
    if has("atom_area"):
        specs.append(("Atoms", "Blob sizes", "Areas of the thresholded correlation blobs kept as atoms, "
                      "with the size bounds that rejected artefacts.", lambda: plot.blob_sizes(ds)))
    if has("fit_ok"):
        specs.append(("Atoms", "Refinement", "Atoms whose Gaussian fit converged (green) and those that fell back "
                      "to the centre of mass (red).", lambda: plot.atoms(ds, color="fit_ok")))
    if has("exx"):
        specs.append(("Physical maps", "Strain and rotation", "Local strain e_xx, e_yy, e_xy (tensor shear) and "
                      "lattice rotation of each atom against the image's median lattice, from its neighbours of the "
                      "same sublattice; the titles give the median standard error propagated from the fitted "
                      "positions.", lambda: plot.strain_maps(ds)))
    if has("polarization_x"):
        specs.append(("Physical maps", "Polarisation", "Shift of each displaced column from the centre of its cage "
                      "of the other sublattice, arrows magnified, coloured by polar domain.",
                      lambda: plot.polarization(ds)))
    if has("cross_section"):
        specs.append(("Physical maps", "Cross-sections", "Histogram of the columns' scattering cross-sections (the "
                      "fitted columns' integrated intensities) with the Gaussian mixture whose number of components "
                      "the integrated classification likelihood chose, each labelled with its atom count.",
                      lambda: plot.cross_section_histogram(ds)))
    if has("atoms_in_column"):
        specs.append(("Physical maps", "Atoms per column", "Each pixel coloured by the atom count of its nearest "
                      "column (Voronoi cells).", lambda: plot.atom_count_map(ds)))
    if has("neighbor_dx"):
        specs.append(("Neighbourhoods", "Neighbour vectors", "2-D histogram of the vectors from each centre atom "
                      "to its neighbours.", lambda: plot.neighbor_histogram(ds)))
    if has("descriptor") and has("cluster"):
        specs.append(("Clusters", "Dendrogram", "Hierarchical (Ward) merge tree of the neighbourhood descriptors; "
                      "the dashed line cuts it into the suggested number of clusters.", lambda: plot.dendrogram(ds)))
    if has("cluster"):
        specs.append(("Clusters", "Cluster map", "Each pixel coloured by the cluster of its nearest atom "
                      "(Voronoi cells) over the image.", lambda: plot.cluster_map(ds)))
        specs.append(("Clusters", "Per-cluster view", "For each cluster: where its atoms are, the FFT of their "
                      "positions (sharp spots: a periodic sublattice; diffuse: a disordered region) and its "
                      "neighbour-vector histogram.", lambda: plot.cluster_panel(ds)))
    if has("region"):
        specs.append(("Clusters", "Region map", "Regions (phases) formed from the clusters: sites of one phase "
                      "joined, borders smoothed, edge atoms filled in.", lambda: plot.cluster_map(ds, by="region")))
        specs.append(("Clusters", "Per-region view", "For each region: its atoms, the FFT of their positions and "
                      "its neighbour-vector histogram.", lambda: plot.cluster_panel(ds, by="region")))
    if has("pca_explained_variance"):
        specs.append(("Distortion modes", "Scree", "Variance explained by each PCA mode; polar modes in red.",
                      lambda: plot.scree(ds)))
    if has("pca_components") and has("pca_mean"):
        specs.append(("Distortion modes", "Modes", "Each mode as arrows of deformation of the mean neighbourhood; "
                      "the red arrow is the equivalent shift of the centre atom.", lambda: plot.modes(ds)))
    if has("pca_loadings"):
        n = ds["pca_loadings"].sizes.get("component", 0)
        shown = list(range(min(max_components, n)))
        if "mode_is_polar" in ds.variables and "component" in ds["mode_is_polar"].dims:
            shown += [int(c) for c in np.flatnonzero(np.asarray(ds["mode_is_polar"].values, bool)) if c not in shown]
        for c in shown[: max_components + 3]:  # at most 3 polar modes beyond the first ones
            specs.append(("Distortion modes", f"Loading map, mode {c}", f"Loading of mode {c} at each atom "
                          "(Voronoi cells) over the image.", functools.partial(plot.loading_map, ds, component=c)))
    return specs


def report_figures(ds: xr.Dataset, folder: str | os.PathLike, *, dpi: int = 100, max_components: int = 3) -> list[dict]:
    """Write the report's figures as PNG files into ``folder``; return one record per figure.

    Each record has ``section``, ``title``, ``caption`` and either ``file`` (the PNG's name) or
    ``skipped`` (why the figure could not be drawn: a step that has not run).
    """
    folder = Path(folder)
    records = []
    for i, (section, title, caption, make) in enumerate(_figure_specs(ds, max_components=max_components)):
        slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
        name = f"{i:02d}_{slug}.png"
        rec = {"section": section, "title": title, "caption": caption}
        try:
            fig = make()
        except AtomdsError as exc:
            rec["skipped"] = str(exc)
        else:
            fig.savefig(folder / name, dpi=dpi, facecolor="white", bbox_inches="tight", pad_inches=0.08)
            del fig
            rec["file"] = name
        records.append(rec)
    return records


def _summary_rows(ds: xr.Dataset, source: str | None) -> list[tuple[str, str]]:
    from .version import __version__

    u = str(ds.attrs.get("units", "px"))
    ps = float(ds.attrs.get("pixel_size", 1.0))
    ny, nx = ds.sizes.get("y", 0), ds.sizes.get("x", 0)
    rows = []
    if source:
        rows.append(("source", str(source)))
    elif ds.attrs.get("source"):
        rows.append(("source", str(ds.attrs["source"])))
    if u == "px":
        rows.append(("image", f"{nx} × {ny} px; pixel size unknown: every length is in px"))
    else:
        rows.append(("image", f"{nx} × {ny} px, pixel size {ps:.4g} {u}, field of view {nx * ps:.4g} × {ny * ps:.4g} {u}"))
    if ds.attrs.get("image_kind") == "height":
        rows.append(("height map", "heights (STM/AFM), flattened before finding: see subtract_background_params"))
    n_atoms = ds.sizes.get("atom", 0)
    rows.append(("atoms", f"{n_atoms}"))
    if "sublattice" in ds.variables:
        sub = np.asarray(ds["sublattice"].values)
        parts = ", ".join(f"{int(s)}: {int((sub == s).sum())}" for s in np.unique(sub))
        rows.append(("sublattices", parts))
    if "fit_ok" in ds.variables and n_atoms:
        ok = int(np.asarray(ds["fit_ok"].values, bool).sum())
        rows.append(("Gaussian fits converged", f"{ok} of {n_atoms} ({100.0 * ok / n_atoms:.1f} %)"))
    if "is_edge" in ds.variables:
        centres = int((~np.asarray(ds["is_edge"].values, bool)).sum())
        rows.append(("neighbourhood centres (not at the edge)", f"{centres}"))
    if "neighbor" in ds.sizes:
        rows.append(("neighbours per atom", f"{ds.sizes['neighbor']}"))
    k = _n_clusters(ds)
    if "cluster" in ds.variables:
        c = np.asarray(ds["cluster"].values)
        sizes = ", ".join(f"{int(i)}: {int((c == i).sum())}" for i in np.unique(c[c >= 0]))
        rows.append(("clusters", f"{k} (atoms per cluster: {sizes})"))
    if "region" in ds.variables:
        r = np.asarray(ds["region"].values)
        sizes = ", ".join(f"{int(i)}: {int((r == i).sum())}" for i in np.unique(r[r >= 0]))
        rows.append(("regions (phases)", f"{int(np.unique(r[r >= 0]).size)} (atoms per region: {sizes})"))
    if "exx" in ds.variables:
        err = {n: float(np.nanmedian(np.asarray(ds[f"{n}_err"].values, float))) for n in ("exx", "eyy", "exy")}
        rows.append(("strain precision (median standard error per atom)",
                     ", ".join(f"{n} {100 * e:.2g} %" for n, e in err.items())))
    rec = step_params(ds, "scan_distortion") or {}
    if rec.get("corrected"):
        rows.append(("scan distortion (removed for the phases, kept in the strain maps)",
                     f"shear along the scan lines up to {100 * float(rec.get('shear', 0.0)):.2g} %, line shifts up to "
                     f"{float(rec.get('max_shift_x', 0.0)):.3g} {rec.get('units', '')}"))
    if "polarization_x" in ds.variables:
        px, py = np.asarray(ds["polarization_x"].values, float), np.asarray(ds["polarization_y"].values, float)
        mag = np.hypot(px, py)
        u = ds.attrs.get("units", "")
        dom = np.asarray(ds["polarization_domain"].values) if "polarization_domain" in ds.variables else None
        n_dom = int(np.unique(dom[dom >= 0]).size) if dom is not None else 0
        rows.append(("polarisation", f"median |p| {np.nanmedian(mag):.3g} {u} over {int(np.isfinite(mag).sum())} "
                     f"columns, {n_dom} domain(s)"))
    if "atoms_in_column" in ds.variables:
        n_at = np.asarray(ds["atoms_in_column"].values)
        known = n_at[n_at >= 0]
        if known.size:
            rows.append(("atom counts", f"{int(np.unique(known).size)} thicknesses, {int(known.min())} to "
                         f"{int(known.max())} atoms per column, {int(known.sum())} atoms in {known.size} columns"))
    if "pca_explained_variance" in ds.variables:
        from .plot.deformation import explained_percent as _explained_percent

        pct, of_what = _explained_percent(ds)
        first = ", ".join(f"{p:.1f} %" for p in pct[:5])
        rows.append(("PCA modes", f"{pct.size}; explained variance of the first {min(5, pct.size)} ({of_what}): {first}"))
        if "mode_is_polar" in ds.variables and "component" in ds["mode_is_polar"].dims:
            polar = np.flatnonzero(np.asarray(ds["mode_is_polar"].values, bool))
            rows.append(("polar modes", ", ".join(str(int(c)) for c in polar) or "none"))
    rows.append(("atomds version", str(ds.attrs.get("atomds_version", __version__))))
    return rows


def _short(value: Any) -> Any:
    """Floats rounded to 6 significant digits for display (nested lists and dicts too)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list):
        return [_short(v) for v in value]
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


_STEP_TITLES = {
    "sample": "sample (parameters of the synthetic image's generator)",
    "analyze": "analyze (the options of the whole job: atomds.pipeline.AnalysisParams)",
}


def _params_html(ds: xr.Dataset) -> str:
    steps = list(all_step_params(ds))
    if not steps:
        return "<p>No step parameters are recorded in this Dataset.</p>"
    # analysis steps first, in the order they ran; the generator of a synthetic sample last
    steps = [s for s in steps if s[0] not in _STEP_TITLES] + [s for s in steps if s[0] in _STEP_TITLES]
    parts = []
    for step, params in steps:
        title = _STEP_TITLES.get(step, step)
        if isinstance(params, dict):
            body = "".join(
                f"<tr><th>{_esc(k)}</th><td><code>"
                f"{_esc(v if isinstance(v, str) else json.dumps(_short(v), ensure_ascii=False))}</code></td></tr>"
                for k, v in params.items()
            )
            parts.append(f"<h3 id='params-{_esc(step)}'>{_esc(title)}</h3><table class='params'>{body}</table>")
        else:
            parts.append(f"<h3 id='params-{_esc(step)}'>{_esc(title)}</h3><pre>{_esc(params)}</pre>")
    return "\n".join(parts)


#: Figures shown across the whole page width (the others two by two).
_WIDE = {"Per-cluster view", "Per-region view", "Modes"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1.5em; color: #222; background: #fff; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { text-align: left; padding: 0.25em 0.8em; border-bottom: 1px solid #eee; vertical-align: top; }
th { font-weight: 600; white-space: nowrap; }
table.params td code { white-space: pre-wrap; word-break: break-all; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em 2em; align-items: flex-start; }
figure { margin: 0.6em 0 1em 0; max-width: calc(50% - 1em); display: table; }
figure.wide { max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { display: table-caption; caption-side: bottom; color: #444; font-size: 0.92em; padding-top: 0.3em; }
table.params { min-width: 36em; }
.skipped { color: #a33; }
nav a { margin-right: 1em; }
"""


def _render_html(ds: xr.Dataset, records: list[dict], *, source: str | None, title: str) -> str:
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    summary = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _summary_rows(ds, source))
    sections: dict[str, list[str]] = {}
    for rec in records:
        if "file" in rec:
            cls = " class='wide'" if rec["title"] in _WIDE else ""
            body = (
                f"<figure{cls}><img src=\"{_esc(rec['file'])}\" alt=\"{_esc(rec['title'])}\">"
                f"<figcaption><b>{_esc(rec['title'])}.</b> {_esc(rec['caption'])}</figcaption></figure>"
            )
        else:
            body = f"<p class='skipped'><b>{_esc(rec['title'])}</b>: not drawn ({_esc(rec['skipped'])})</p>"
        sections.setdefault(rec["section"], []).append(body)
    anchors = {name: re.sub(r"[^a-z0-9]+", "-", name.lower()) for name in sections}
    nav = "".join(f"<a href='#{anchors[s]}'>{_esc(s)}</a>" for s in sections) + "<a href='#parameters'>Parameters</a>"
    body = "\n".join(
        f"<h2 id='{anchors[s]}'>{_esc(s)}</h2>\n<div class='figures'>\n" + "\n".join(items) + "\n</div>"
        for s, items in sections.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{_GENERATOR}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
<p class="sub">{_esc(source or ds.attrs.get('source', ''))} · generated {_esc(now)}</p>
<nav>{nav}</nav>
<h2 id="summary">Summary</h2>
<table>{summary}</table>
{body}
<h2 id="parameters">Parameters</h2>
<p>The parameters each step used (given or estimated from the image), as recorded in the Dataset.</p>
{_params_html(ds)}
</body>
</html>
"""


def _is_atomds_report(folder: Path) -> bool:
    index = folder / "index.html"
    if not index.is_file():
        return False
    with contextlib.suppress(OSError):
        with open(index, encoding="utf-8", errors="replace") as fh:
            return f'content="{_GENERATOR}"' in fh.read(2048)
    return False


def write_report(
    ds: xr.Dataset,
    report_dir: str | os.PathLike,
    *,
    source: str | None = None,
    title: str = "atomds report",
    dpi: int = 100,
    max_components: int = 3,
) -> Path:
    """Write an HTML report of ``ds`` to ``report_dir/index.html`` with the figures as PNG files beside it.

    The report shows the atoms, the finding diagnostics (correlation map, blob sizes), the fit
    quality, the neighbour-vector histogram, the dendrogram, cluster maps and per-cluster FFTs,
    the PCA scree, modes and loading maps - each for whatever steps have run - plus the numbers
    of atoms and clusters, the explained variance and every step's recorded parameters.

    Parameters
    ----------
    ds : xarray.Dataset
        An analysed Dataset (for example from :func:`atomds.analyze`).
    report_dir : path-like
        Folder of the report. Created (with its parent) if needed; an existing folder is updated in
        place: its figures are replaced and ``index.html`` is written last.
    source : str, optional
        Where the image came from, shown in the report (default: ``ds.attrs["source"]``).
    title : str
        Page title.
    dpi : int
        Resolution of the PNG figures.
    max_components : int
        Loading maps are drawn for the first ``max_components`` modes and every polar one.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.
    """
    if not isinstance(ds, xr.Dataset):
        raise InvalidParameterError(f"write_report needs an xarray.Dataset, got {type(ds).__name__}.")
    if not isinstance(dpi, (int, np.integer)) or not 20 <= int(dpi) <= 600:
        raise InvalidParameterError(f"dpi must be an integer from 20 to 600, got {dpi!r}.")
    target = Path(report_dir)
    if target.exists() and not target.is_dir():
        raise InvalidParameterError(f"the report folder {target} exists and is not a folder: choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        records = report_figures(ds, build, dpi=int(dpi), max_components=max_components)
        text = _render_html(ds, records, source=source, title=title)
        if not target.exists():
            (build / "index.html").write_text(text, encoding="utf-8")
            os.rename(build, target)
            return target / "index.html"
        stale = []
        if _is_atomds_report(target):
            keep = {rec["file"] for rec in records if "file" in rec}
            stale = [p for p in target.iterdir() if _FIGURE_NAME.match(p.name) and p.name not in keep]
        for rec in records:
            if "file" in rec:
                os.replace(build / rec["file"], target / rec["file"])
        with atomic_write(target / "index.html") as tmp:
            tmp.write_text(text, encoding="utf-8")
        for p in stale:
            with contextlib.suppress(OSError):
                p.unlink()
        return target / "index.html"
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
