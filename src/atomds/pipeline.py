"""The whole per-image job, shared by ``atomds analyze`` and the batch layer.

:func:`analyze` chains the accessor steps (align frames -> find -> refine -> neighbourhoods ->
K from the dendrogram -> k-means -> PCA) with every parameter estimated from the image unless
given, and reports progress per stage through an optional callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import xarray as xr

__all__ = ["analyze", "STAGES"]

#: Names of the stages :func:`analyze` runs, in order.
STAGES = ("align", "find", "refine", "neighborhoods", "clusters", "pca")


def analyze(
    ds: xr.Dataset,
    *,
    k: int = 6,
    sort: str = "angle",
    n_clusters: int | None = None,
    n_components: int | None = None,
    model: str = "gaussian",
    find_kwargs: dict[str, Any] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> xr.Dataset:
    """Run the local-crystallography pipeline on one image Dataset.

    Parameters
    ----------
    ds : xarray.Dataset
        An atomds image Dataset (``image(y, x)``, or ``frames(frame, y, x)``, which are aligned
        and summed first).
    k : int
        Neighbours per atom.
    sort : {"angle", "distance"}
        Neighbour order in the descriptor.
    n_clusters : int, optional
        Number of k-means clusters; chosen from the dendrogram (:func:`suggest_k`) when None.
    n_components : int, optional
        PCA components kept (all when None).
    model : {"gaussian", "elliptical"}
        Column model of the refinement.
    find_kwargs : dict, optional
        Extra arguments of ``find_atoms`` (template, threshold, ...).
    on_stage : callable, optional
        Called with each stage name of :data:`STAGES` when it finishes.

    Returns
    -------
    xarray.Dataset
        With atoms, fit results, neighbourhoods, ``cluster`` and PCA variables.
    """
    done = on_stage or (lambda stage: None)
    if "image" not in ds.data_vars and "frames" in ds.data_vars:
        from .ops.preprocess import align_frames

        ds = align_frames(ds)
    done("align")
    ds = ds.lcx.find_atoms(**(find_kwargs or {}))
    done("find")
    ds = ds.lcx.refine(model=model)
    done("refine")
    ds = ds.lcx.neighborhoods(k=k, sort=sort)
    done("neighborhoods")
    K = n_clusters if n_clusters is not None else ds.lcx.suggest_k()
    ds = ds.lcx.kmeans(K)
    done("clusters")
    ds = ds.lcx.pca(n_components=n_components)
    done("pca")
    return ds
