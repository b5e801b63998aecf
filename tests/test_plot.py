"""Figures: every figure function renders a non-blank PNG whose axes carry units; interactive views build."""

import inspect
import io
import pydoc
import re
import subprocess
import sys

import numpy as np
import pytest

import atomds
from atomds.errors import InvalidParameterError, MissingStepError, MissingVariableError
from atomds.params import FallbackWarning

mpl = pytest.importorskip("matplotlib")
mpl.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

import atomds.plot as P  # noqa: E402

DPI = 60
UNIT = re.compile(r"\(([^()]+)\)\s*$")


# ------------------------------------------------------------------------------------------------
# datasets: a found-and-refined image, and a fully analysed one built on known positions
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def found():
    """A small perovskite-like image after find_atoms + refine (two sublattices)."""
    ds = atomds.datasets.perovskite(shape=128, seed=3)
    ds = ds.drop_dims("true_atom")
    return ds.lcx.find_atoms().lcx.refine()


@pytest.fixture(scope="module")
def analysed():
    """The two-phase sample with atoms at known positions, neighbourhoods, linkage, k-means and PCA."""
    ds = atomds.datasets.two_phase(shape=192, seed=1)
    x = ds["true_x"].values
    y = ds["true_y"].values
    ds = ds.drop_dims("true_atom")
    ds = ds.lcx.with_atoms(x, y)
    ds = ds.lcx.neighborhoods(k=6, sort="angle").lcx.linkage()
    ds = ds.lcx.kmeans(3).lcx.regions().lcx.pca()
    return ds


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def _png(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    buf.seek(0)
    with Image.open(buf) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("L"), dtype=float)


def _is_colorbar(ax) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _axes_pixels(fig, ax, gray: np.ndarray) -> np.ndarray:
    """The rendered pixels inside ``ax`` (a 3-px margin inside its frame), from the PNG at DPI."""
    scale = DPI / fig.dpi
    bb = ax.get_window_extent()
    h = gray.shape[0]
    x0, x1 = int(bb.x0 * scale) + 3, int(bb.x1 * scale) - 3
    y0, y1 = int(h - bb.y1 * scale) + 3, int(h - bb.y0 * scale) - 3
    return gray[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]


def check_figure(fig, *, length_unit: str | None = "Å", min_std: float = 6.0):
    """Non-blank (pixel variance inside every data axes) and units in every axis label."""
    assert isinstance(fig, Figure)
    gray = _png(fig)
    assert gray.std() > min_std, "the whole figure is blank"
    main = [a for a in fig.axes if a.get_visible() and not _is_colorbar(a)]
    assert main, "the figure has no axes"
    for ax in main:
        inside = _axes_pixels(fig, ax, gray)
        assert inside.size > 100
        assert inside.std() > min_std, f"axes {ax.get_title()!r} is blank (pixel std {inside.std():.2f})"
        for label in (ax.get_xlabel(), ax.get_ylabel()):
            assert UNIT.search(label), f"axis label {label!r} of {ax.get_title()!r} carries no unit"
    if length_unit is not None:
        labels = " ".join(a.get_xlabel() + a.get_ylabel() for a in main)
        assert f"({length_unit})" in labels or f"(1/{length_unit})" in labels
    for ax in fig.axes:
        if _is_colorbar(ax) and ax.get_visible():
            label = ax.get_ylabel() or ax.get_xlabel()
            assert UNIT.search(label), f"colour bar label {label!r} carries no unit"
    return gray


# ------------------------------------------------------------------------------------------------
# static figures
# ------------------------------------------------------------------------------------------------


def test_checker_rejects_blank_figure_and_missing_units():
    fig = Figure()
    ax = fig.add_subplot()
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    with pytest.raises(AssertionError, match="blank"):
        check_figure(fig)
    ax.imshow(np.random.default_rng(0).random((20, 20)))
    check_figure(fig)
    ax.set_ylabel("y")
    with pytest.raises(AssertionError, match="unit"):
        check_figure(fig)



def test_import_atomds_does_not_import_plotting_libraries():
    code = (
        "import sys, atomds\n"
        "ds = atomds.from_array([[0.0, 1.0], [2.0, 3.0]])\n"
        "_ = ds.lcx\n"
        "bad = [m for m in ('matplotlib', 'holoviews', 'bokeh', 'hvplot') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("color", [None, "sublattice", "fit_ok", "amplitude"])
def test_atoms(found, color):
    fig = P.atoms(found, color=color)
    check_figure(fig)
    if color in ("sublattice", "fit_ok"):
        assert fig.legends or fig.axes[0].get_legend() is not None
    if color == "amplitude":
        assert any(_is_colorbar(a) for a in fig.axes)


def test_atoms_by_loading_component(analysed):
    fig = P.atoms(analysed, color="pca_loadings", component=1)
    check_figure(fig)
    cbar = [a for a in fig.axes if _is_colorbar(a)][0]
    assert "1" in cbar.get_ylabel()


def test_atoms_into_given_axes(found):
    fig = Figure()
    ax = fig.add_subplot()
    assert P.atoms(found, ax=ax) is fig
    check_figure(fig)


def test_accessor_forwards_every_figure(found, analysed):
    assert isinstance(found.lcx.plot.atoms(color="sublattice"), Figure)
    for name in P.__all__:
        if name == "PlotAccessor":
            continue
        assert callable(getattr(analysed.lcx.plot, name)), name


def test_plot_accessor_forwards_with_signatures_and_docstrings(analysed):
    """``ds.lcx.plot.<name>`` has the signature of ``atomds.plot.<name>`` without the Dataset, and its docstring."""
    from atomds.accessor import PlotAccessor

    names = [n for n in P.__all__ if n != "PlotAccessor"]
    forwarded = sorted(n for n in vars(PlotAccessor) if not n.startswith("_"))
    assert forwarded == sorted(names)
    for name in names:
        func, method = getattr(P, name), getattr(analysed.lcx.plot, name)
        params = list(inspect.signature(func).parameters.values())
        assert params[0].name == "ds"
        assert inspect.signature(method) == inspect.signature(func).replace(parameters=params[1:]), name
        assert method.__doc__ == func.__doc__ and func.__doc__
        assert method.__name__ == name
        text = pydoc.render_doc(method, renderer=pydoc.plaintext)  # what help() shows
        assert f"{name}(*, " in text  # the signature, without the Dataset
        assert func.__doc__.splitlines()[0] in text
        assert getattr(PlotAccessor, name) is func  # on the class: the function itself


def test_correlation(found):
    fig = P.correlation(found)
    check_figure(fig)
    assert "threshold" in fig.axes[0].get_title()


def test_blob_sizes(found):
    fig = P.blob_sizes(found)
    check_figure(fig, length_unit=None)
    ax = fig.axes[0]
    bounds = [line for line in ax.get_lines() if "area" in line.get_label()]
    assert bounds, "the size bounds recorded by find_atoms are not drawn"


def test_blob_sizes_tolerates_unreadable_params(found):
    ds = found.copy()
    ds.attrs["find_atoms_params"] = "{not json"
    with pytest.warns(FallbackWarning, match="find_atoms_params"):
        fig = P.blob_sizes(ds)
    check_figure(fig, length_unit=None)


def test_neighbor_histogram(analysed):
    check_figure(P.neighbor_histogram(analysed))


def test_neighbor_histogram_per_cluster(analysed):
    fig = P.neighbor_histogram(analysed, by="cluster")
    n = int(analysed["cluster"].max()) + 1
    assert len([a for a in fig.axes if a.get_visible()]) == n
    check_figure(fig)


def test_dendrogram_marks_suggested_k(analysed):
    fig = P.dendrogram(analysed)
    check_figure(fig, length_unit="Å")
    legend = fig.axes[0].get_legend()
    k = analysed.lcx.suggest_k()
    assert any(f"K = {k}" in t.get_text() for t in legend.get_texts())


def test_dendrogram_of_one_phase_says_k_1_without_a_warning():
    """One cluster draws no cut: the figure says K = 1 in text (an empty legend warned in every report)."""
    import warnings

    ph = atomds.datasets.hexagonal(shape=192, seed=2).lcx.find_atoms().lcx.neighborhoods(k=6, descriptor="phase")
    ph = ph.lcx.linkage()
    assert ph.lcx.suggest_k() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = P.dendrogram(ph)
    check_figure(fig, length_unit=None)  # the phase descriptor is dimensionless
    assert fig.axes[0].get_legend() is None
    assert any(t.get_text() == "suggested K = 1" for t in fig.axes[0].texts)


def test_dendrogram_of_micro_cluster_tree(analysed):
    """Above max_points the tree is built on micro-clusters: leaves hold several atoms."""
    ds = analysed.lcx.linkage(max_points=50, n_micro=40)
    assert ds["linkage_size"].values[-1] > ds.sizes["merge"] + 1
    fig = P.dendrogram(ds)
    check_figure(fig)
    labels = [int(t.get_text()) for t in fig.axes[0].get_xticklabels()]
    assert sum(labels) == int(ds["linkage_size"].values[-1])  # leaf labels count atoms


def test_dendrogram_computes_linkage_when_missing(analysed):
    ds = analysed.drop_vars([v for v in analysed.variables if v.startswith("linkage_")])
    check_figure(P.dendrogram(ds))


def test_cluster_map(analysed):
    fig = P.cluster_map(analysed)
    check_figure(fig)
    gray = _png(fig)
    rgb = _png_rgb(fig)
    # the clusters are drawn in colour over a grey image
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 5
    assert gray.shape == rgb.shape[:2]


def _png_rgb(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=float)


def test_region_map_and_panel(analysed):
    check_figure(P.cluster_map(analysed, by="region"))
    fig = P.cluster_panel(analysed, by="region", clusters=[0])
    assert "region 0" in fig.axes[0].get_title()
    check_figure(fig)


def test_cluster_panel_layout(analysed):
    fig = P.cluster_panel(analysed)
    n = int(analysed["cluster"].max()) + 1
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 3 * n
    check_figure(fig)
    fft_labels = [a.get_xlabel() for a in visible if a.get_xlabel().startswith("kx")]
    assert len(fft_labels) == n and all("1/Å" in t for t in fft_labels)
    assert all("periodicity" in a.get_title() for a in visible if a.get_xlabel().startswith("kx"))


def test_scree(analysed):
    fig = P.scree(analysed)
    check_figure(fig, length_unit=None)
    bars = fig.axes[0].patches
    assert len(bars) == analysed.sizes["component"]


def test_modes_titles_say_polar_or_not(analysed):
    fig = P.modes(analysed, components=[0, 1, 2])
    check_figure(fig)
    titles = [a.get_title() for a in fig.axes if a.get_visible()]
    assert len(titles) == 3
    flags = analysed["mode_is_polar"].values
    for c, t in enumerate(titles):
        assert ("non-polar" in t) == (not flags[c])
        assert "polar" in t


def test_modes_refuse_distance_descriptor(analysed):
    ds = analysed.lcx.neighborhoods(k=6, sort="distance", descriptor="distance").lcx.pca()
    with pytest.raises(InvalidParameterError, match="dx0"):
        P.modes(ds)


def test_ica_modes_and_loading_map(analysed):
    ds = analysed.lcx.ica(3)
    fig = P.modes(ds, method="ica")
    check_figure(fig)
    assert sum(a.get_visible() for a in fig.axes) == 3
    check_figure(P.loading_map(ds, method="ica", component=2))


def test_loading_map(analysed):
    fig = P.loading_map(analysed, component=1)
    check_figure(fig)
    assert "mode 1" in fig.axes[0].get_title()


def test_missing_steps_raise_clear_errors():
    ds = atomds.datasets.hexagonal(shape=64).drop_dims("true_atom")
    with pytest.raises(MissingStepError, match="find_atoms"):
        P.atoms(ds)
    with pytest.raises(MissingStepError, match="pca"):
        P.scree(ds)
    with pytest.raises(MissingStepError, match="kmeans"):
        P.cluster_map(ds)


def test_bad_colour_arguments(found, analysed):
    with pytest.raises(MissingVariableError, match="no_such"):
        P.atoms(found, color="no_such")
    with pytest.raises(InvalidParameterError, match="component"):
        P.atoms(analysed, color="pca_loadings", component=10_000)
    with pytest.raises(InvalidParameterError, match="component"):
        P.loading_map(analysed, component=-1)


def test_figures_leave_inputs_unchanged(analysed):
    before = analysed.copy(deep=True)
    P.cluster_map(analysed)
    P.loading_map(analysed, component=0)
    assert analysed.identical(before)


# ------------------------------------------------------------------------------------------------
# interactive views
# ------------------------------------------------------------------------------------------------


def _tooltips(model) -> set[str]:
    from bokeh.models import HoverTool

    names = set()
    for tool in model.select({"type": HoverTool}):
        tips = tool.tooltips
        if isinstance(tips, (list, tuple)):
            names.update(str(label) for label, _ in tips)
    return names


def test_interactive_atoms_renders_to_bokeh(analysed):
    hv = pytest.importorskip("holoviews")
    found = analysed.assign(amplitude=analysed["atom_x"] * 0 + 1.0)
    view = P.interactive_atoms(found)
    assert isinstance(view, hv.Overlay)
    model = hv.render(view, backend="bokeh")
    tips = " ".join(_tooltips(model))
    for word in ("x", "y", "amplitude", "cluster", "pca_loading_0"):
        assert word in tips, (word, tips)


def test_linked_loading_view_renders_to_bokeh(analysed):
    hv = pytest.importorskip("holoviews")
    from bokeh.models import BoxSelectTool

    view = P.linked_loading_view(analysed, component=1)
    assert isinstance(view, hv.Layout)
    model = hv.render(view, backend="bokeh")
    assert model.select({"type": BoxSelectTool}), "no selection tool in the linked view"
    assert "pca_loading_1" in " ".join(_tooltips(model))


def test_polarization_and_strain_figures():
    from test_physics import with_atoms

    ds = with_atoms(atomds.datasets.polar(shape=256, displacement=1.28, seed=1), 0.05)
    out = ds.lcx.polarization().lcx.strain()
    fig = out.lcx.plot.polarization()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ["domain 0", "domain 1"]
    assert len(out.lcx.plot.strain_maps().axes) >= 4
    with pytest.raises(MissingStepError, match="polarization"):
        ds.lcx.plot.polarization()
    with pytest.raises(InvalidParameterError, match="unknown strain maps"):
        out.lcx.plot.strain_maps(names=("ezz",))
