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
STAGES = ("align", "find", "refine", "phases", "neighborhoods", "pca")

# dims of the phase-descriptor table that cannot sit beside the PCA descriptor in one Dataset
_PHASE_ONLY_DIMS = {"neighbor", "feature"}


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
        Neighbour order of the descriptor that PCA decomposes (phases use the rotation-invariant
        ``"phase"`` descriptor whatever the order).
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
        With atoms, fit results, the neighbour-vector table and its PCA modes, and the phase
        clustering: ``cluster`` (k-means on the ``"phase"`` descriptor, K from the dendrogram),
        ``region`` (clusters joined into phases and regions) and the merge tree.
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
    # phases: rotation-invariant "phase" descriptor -> K from the dendrogram -> k-means -> regions
    phases = ds.lcx.neighborhoods(k=k, descriptor="phase").lcx.linkage()
    K = n_clusters if n_clusters is not None else phases.lcx.suggest_k()
    phases = phases.lcx.kmeans(K).lcx.regions()
    done("phases")
    # distortions: neighbour vectors in angular order -> PCA modes and loadings
    ds = ds.lcx.neighborhoods(k=k, sort=sort, ref_angle="auto" if sort == "angle" else 0.0)
    done("neighborhoods")
    ds = ds.lcx.pca(n_components=n_components)
    done("pca")
    return _merge_phases(ds, phases)


def _merge_phases(ds: xr.Dataset, phases: xr.Dataset) -> xr.Dataset:
    """Carry the clustering results (cluster, region, dendrogram) of the phase table into ``ds``.

    Variables on the phase table's own ``neighbor``/``feature`` dims (its descriptor and cluster
    centres) are left out: ``ds`` holds the neighbour-vector table that PCA used.
    """
    carry = [
        name
        for name, var in phases.variables.items()
        if name not in ds.variables and not set(var.dims) & _PHASE_ONLY_DIMS
    ]
    out = ds.assign({name: phases[name] for name in carry if name in phases.data_vars})
    out = out.assign_coords({name: phases[name] for name in carry if name in phases.coords})
    for key, value in phases.attrs.items():
        if key.endswith("_params") and key not in ("neighborhoods_params",):
            out.attrs.setdefault(key, value)
    out.attrs["phase_neighborhoods_params"] = phases.attrs.get("neighborhoods_params", "{}")
    return out
