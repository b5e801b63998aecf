"""Figure helpers: new figures and axes, legends, panels, axis labels, and what a figure needs.

Layout only: no analysis here. Figures are :class:`matplotlib.figure.Figure` objects made without
pyplot (nothing kept in pyplot's global state); matplotlib is imported on first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError, MissingStepError
from ..params import FallbackWarning, step_params

__all__ = [
    "length_units",
    "pixel_size_of",
    "recorded_params",
    "new_figure",
    "figure_axes",
    "root_figure",
    "require",
    "place_legend",
    "panel_axes",
    "label_lengths",
]


def length_units(ds: xr.Dataset) -> str:
    """The Dataset's length units (``ds.attrs["units"]``, ``"px"`` when not calibrated)."""
    return str(ds.attrs.get("units", "px"))


def pixel_size_of(ds: xr.Dataset) -> float:
    """The pixel size of the image in its length units."""
    from ..ops._common import pixel_size

    return pixel_size(ds)



def recorded_params(ds: xr.Dataset, step: str) -> dict[str, Any]:
    """The parameters recorded by ``step`` (:func:`atomds.params.step_params`); ``{}`` when it has not run.

    Unreadable parameters do not stop a figure: it is drawn without what they would add (a
    threshold line, size bounds), and a :class:`~atomds.params.FallbackWarning` says so.
    """
    try:
        return step_params(ds, step, default={}) or {}
    except ValueError as exc:
        warnings.warn(f"{exc}; the figure is drawn without it", FallbackWarning, stacklevel=3)
        return {}


_FIGURE_CLASS = None


def new_figure(**kwargs):
    """A new :class:`matplotlib.figure.Figure` (not registered with pyplot) that Jupyter shows as a PNG.

    IPython shows plain Figure objects as PNG only once pyplot's inline backend has been loaded;
    these figures carry their own ``_repr_png_`` so that a figure returned by a cell is always
    drawn.
    """
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        import io

        from matplotlib.figure import Figure

        class AtomdsFigure(Figure):
            """A matplotlib Figure that renders itself as PNG in Jupyter."""

            def _repr_png_(self):
                buf = io.BytesIO()
                self.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
                return buf.getvalue()

        _FIGURE_CLASS = AtomdsFigure
    return _FIGURE_CLASS(**kwargs)


def figure_axes(ax, *, figsize: tuple[float, float]):
    """Return ``(fig, ax)``: a new constrained-layout figure with one axes, or ``ax``'s figure."""
    if ax is None:
        fig = new_figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return root_figure(ax), ax


def root_figure(ax):
    """The figure that holds ``ax`` (the top-level one, for axes in a subfigure)."""
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10
        return ax.figure


def require(ds: xr.Dataset, names: str | Sequence[str], *, what: str, hint: str) -> None:
    """Raise :class:`~atomds.errors.MissingStepError` naming ``hint`` when a variable in ``names`` is missing."""
    if isinstance(names, str):
        names = [names]
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise MissingStepError(
            f"the {what} figure needs {', '.join(repr(m) for m in missing)}, which the Dataset does not have: "
            f"call {hint} first."
        )


def place_legend(fig, ax, own: bool, *, handles=None, **kwargs):
    """A legend beside the axes: outside the axes in a figure made here, inside a given axes."""
    kw = dict(fontsize="small", frameon=False, **kwargs)
    if handles is not None:
        kw["handles"] = handles
    if own:
        if handles is None:
            h, labels = ax.get_legend_handles_labels()
            kw.update(handles=h, labels=labels)
        return fig.legend(loc="outside right upper", **kw)
    return ax.legend(loc="best", **{**kw, "frameon": True})


def panel_axes(ax, n: int, *, ncols: int, size: tuple[float, float]):
    """``n`` axes: new ones on a grid, or the ones given."""
    if ax is None:
        ncols = max(1, min(int(ncols), n))
        nrows = int(np.ceil(n / ncols))
        fig = new_figure(figsize=(size[0] * ncols, size[1] * nrows + 0.3), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for extra in axes[n:]:
            extra.set_visible(False)
        return list(axes[:n]), fig
    axes = list(np.atleast_1d(np.asarray(ax, dtype=object)).ravel())
    if len(axes) < n:
        raise InvalidParameterError(f"{n} panels need {n} axes, got {len(axes)}.")
    return axes[:n], root_figure(axes[0])


def label_lengths(ds: xr.Dataset, ax, *, xname: str = "x", yname: str = "y") -> None:
    """Axis labels ``x (unit)`` and ``y (unit)`` in the Dataset's length units."""
    u = length_units(ds)
    ax.set_xlabel(f"{xname} ({u})")
    ax.set_ylabel(f"{yname} ({u})")
