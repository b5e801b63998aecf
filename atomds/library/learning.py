"""Library-wide learning: one k-means and one PCA over the neighbourhoods of every atom of every image.

:func:`learn` (or :func:`suggest_k`, :func:`kmeans`, :func:`pca`) fits on all atoms together, so
labels and modes mean the same in every image, and adds per-image summaries (:func:`summarize`)
ready to correlate with the per-image properties (:func:`property_correlation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xarray as xr

from ..errors import DimensionError, InvalidParameterError, MissingStepError
from ..params import record_params, step_params
from .layout import SUMMARIES, atoms_node, ids

__all__ = [
    "descriptor",
    "linkage",
    "suggest_k",
    "kmeans",
    "pca",
    "summarize",
    "learn",
    "property_correlation",
]


def _reference_angles(tree: xr.DataTree) -> np.ndarray:
    """Per image, the reference direction its neighbours were ordered from (``ref_angle_used`` or
    ``ref_angle`` of ``neighborhoods_params``; 0 where unknown or not a number), radians.

    Raises
    ------
    ValueError
        When an image's ``neighborhoods_params`` is not a JSON object (unreadable, not read as empty).
    """
    out = np.zeros(len(ids(tree)))
    images = tree.children.get("images")
    for i, iid in enumerate(ids(tree)):
        if images is None or iid not in images.children:
            continue
        p = step_params(images.children[iid], "neighborhoods", default={}) or {}
        ref = p.get("ref_angle_used", p.get("ref_angle", 0.0))
        try:
            value = float(ref) if ref is not None else 0.0
        except (TypeError, ValueError):
            value = 0.0
        out[i] = value if np.isfinite(value) else 0.0
    return out


def descriptor(tree: xr.DataTree, *, kind: str = "xy") -> xr.DataArray:
    """A neighbourhood descriptor of every atom of the library, comparable across images.

    Parameters
    ----------
    tree : xarray.DataTree
        A library whose images ran ``neighborhoods`` (and, for ``kind="phase"``, the batch's
        ``phases`` stage).
    kind : {"xy", "phase"}
        ``"xy"``: the neighbour vectors (dx0, dy0, dx1, dy1, ...; length units) of the per-image
        ``descriptor`` (or made from ``neighbor_dx``/``neighbor_dy``), each image's turned by its
        reference direction (``neighborhoods_params`` ``ref_angle_used``, stored at the root as
        ``reference_angle(image)`` by :func:`pca`) so that every image's reference bond lies
        along +x: images of one structure in different orientations then share modes. ``"phase"``:
        the rotation-invariant phase descriptor ``phase_descriptor(atom, phase_feature)``.

    Returns
    -------
    xarray.DataArray
        ``(atom, feature)``; NaN rows (edge atoms, incomplete neighbourhoods) are left out of
        every fit.
    """
    from ..core import neighbors as cn

    at = atoms_node(tree)
    if kind == "phase":
        if "phase_descriptor" not in at.variables:
            raise MissingStepError(
                "the library has no 'phase_descriptor': run the 'phases' step on every image "
                "(atomds.batch(..., steps=(..., 'phases', ...))) or use kind='xy'."
            )
        D = at["phase_descriptor"]
        return D.rename({"phase_feature": "feature"}).rename("descriptor")
    if kind != "xy":
        raise InvalidParameterError(f"kind must be 'xy' or 'phase', got {kind!r}.")
    units = str(at.attrs.get("units", "px"))
    stored = at.variables.get("descriptor")
    if stored is not None and "feature" in at.coords and [str(f) for f in at["feature"].values][:2] == ["dx0", "dy0"]:
        names = [str(f) for f in at["feature"].values]
        units = at["descriptor"].attrs.get("units", units)
        if _is_lazy(at["descriptor"]):
            # out of core: each chunk of atoms is turned as it is read
            return _turned_lazily(at, _reference_angles(tree), names, units)
        X = np.array(at["descriptor"].values, dtype=float)
    elif {"neighbor_dx", "neighbor_dy"} <= set(at.variables):
        X = cn.descriptor_xy(at["neighbor_dx"].values, at["neighbor_dy"].values)
        bad = ~np.isfinite(X).all(axis=1)
        if "neighbor_index" in at.variables:
            bad |= (np.asarray(at["neighbor_index"].values) < 0).any(axis=1)
        if "is_edge" in at.variables:
            bad |= np.asarray(at["is_edge"].values, dtype=bool)
        X[bad] = np.nan
        names = cn.feature_names("xy", int(at.sizes["neighbor"]))
    else:
        raise MissingStepError(
            "library-wide learning needs the neighbour vectors of every image in /atoms: run the "
            "'neighborhoods' step on every image with the same k (atomds.batch(..., steps=(..., "
            "'neighborhoods'))) or ds.lcx.neighborhoods(descriptor='xy'))."
        )
    theta = _reference_angles(tree)[np.asarray(at["image_index"].values, dtype=np.int64)]
    c, s_ = np.cos(theta)[:, None], np.sin(theta)[:, None]
    dx, dy = X[:, 0::2], X[:, 1::2]
    X = np.empty_like(X)
    X[:, 0::2] = c * dx + s_ * dy
    X[:, 1::2] = -s_ * dx + c * dy
    return xr.DataArray(
        X,
        dims=("atom", "feature"),
        coords={"feature": ("feature", np.array(names, dtype=str))},
        attrs={"units": units, "long_name": "neighbour vectors, each image turned by its reference angle"},
        name="descriptor",
    )


def _is_lazy(v: xr.DataArray | xr.Variable) -> bool:
    """Is the variable Dask-backed (a library opened lazily: learning streams over its chunks)?"""
    return getattr(v, "chunks", None) is not None


def _turn_block(x: np.ndarray, idx: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Neighbour vectors (dx0, dy0, ...) of a chunk of atoms turned by their image's angle."""
    x = np.asarray(x, dtype=float)
    t = theta[np.asarray(idx, dtype=np.int64).ravel()]
    c, s_ = np.cos(t)[:, None], np.sin(t)[:, None]
    out = np.empty_like(x)
    out[:, 0::2] = c * x[:, 0::2] + s_ * x[:, 1::2]
    out[:, 1::2] = -s_ * x[:, 0::2] + c * x[:, 1::2]
    return out


def _turned_lazily(at: xr.Dataset, theta: np.ndarray, names: list[str], units: str) -> xr.DataArray:
    """The stored "xy" descriptor turned by each image's reference angle, as a Dask array."""
    import dask.array as da

    X = at["descriptor"].data.rechunk({1: -1})
    idx = da.asarray(at["image_index"].data).rechunk((X.chunks[0],))
    data = da.map_blocks(_turn_block, X, idx[:, None], theta=theta, dtype=float)
    return xr.DataArray(
        data, dims=("atom", "feature"), coords={"feature": ("feature", np.array(names, dtype=str))},
        attrs={"units": units, "long_name": "neighbour vectors, each image turned by its reference angle"},
        name="descriptor",
    )


def _learning_input(tree: xr.DataTree, kind: str) -> xr.Dataset:
    """A Dataset with ``descriptor(atom, feature)`` (and its coords), ready for the ops-layer learning."""
    D = descriptor(tree, kind=kind)
    return xr.Dataset({"descriptor": D}, attrs={"units": str(atoms_node(tree).attrs.get("units", "px"))})


def _default_kind(tree: xr.DataTree) -> str:
    return "phase" if "phase_descriptor" in atoms_node(tree).variables else "xy"


def _without_learned(tree: xr.DataTree, *, dims: Iterable[str], names: Iterable[str]) -> xr.DataTree:
    """Copy of ``tree`` with every variable using ``dims`` or named in ``names`` dropped from every node."""
    dim_set, name_set = set(dims), set(names)
    out = tree.copy()
    for node in out.subtree:
        ds = node.to_dataset(inherit=False)
        drop = {str(n) for n, v in ds.variables.items() if (set(v.dims) & dim_set) or n in name_set}
        if drop:
            node.dataset = ds.drop_vars(sorted(drop))
    return out


def _with_atoms(tree: xr.DataTree, at: xr.Dataset, coords: Iterable[str]) -> xr.DataTree:
    """Put ``at`` in /atoms and its coordinates ``coords`` at the root (where the summaries use them)."""
    root = tree.to_dataset(inherit=False)
    root = root.assign_coords({c: at[c].variable for c in coords if c in at.coords})
    out = tree.copy()
    out.dataset = root
    out.children["atoms"].dataset = at
    return out


def _sample_rows(at: xr.Dataset, sample: int | None, seed: int) -> xr.Dataset:
    """``at`` reduced to a random subset of ``sample`` atoms with a usable descriptor (all when fewer)."""
    if sample is None:
        return at
    if int(sample) < 3:
        raise InvalidParameterError(f"sample must be at least 3 atoms (or None for all), got {sample!r}.")
    D = np.asarray(at["descriptor"].values)
    ok = np.flatnonzero(np.isfinite(D).all(axis=1))
    if ok.size <= int(sample):
        return at
    pick = np.sort(np.random.default_rng(seed).choice(ok, size=int(sample), replace=False))
    return at[["descriptor"]].isel(atom=pick)


def linkage(
    tree: xr.DataTree,
    *,
    kind: str | None = None,
    max_points: int = 2000,
    n_micro: int = 256,
    sample: int | None = 100_000,
    seed: int = 0,
) -> np.ndarray:
    """Ward merge tree (dendrogram) of the neighbourhoods of the library's atoms, all images together.

    :func:`atomds.ops.learn.linkage` on ``/atoms`` (exact up to ``max_points`` atoms, else the
    size-weighted Ward tree of ``n_micro`` k-means micro-clusters). With more than ``sample``
    usable atoms the tree is built on a random subset of that many (seeded): its top levels, which
    decide K, are those of all atoms up to sampling noise, at a cost that no longer grows with the
    library (``sample=None`` uses every atom). Returns the SciPy linkage matrix
    (``scipy.cluster.hierarchy.dendrogram`` draws it).
    """
    from ..ops import learn as ol

    at = _sample_rows(_learning_input(tree, kind or _default_kind(tree)), sample, seed)
    res = ol.linkage(at, max_points=max_points, n_micro=n_micro, seed=seed)
    return np.column_stack(
        [res[n].values.astype(float) for n in ("linkage_left", "linkage_right", "linkage_height", "linkage_size")]
    )


def suggest_k(
    tree: xr.DataTree,
    *,
    kind: str | None = None,
    k_range: Iterable[int] = range(1, 11),
    sample: int | None = 100_000,
    seed: int = 0,
) -> int:
    """Number of groups of neighbourhoods in the library, 1 when there is no structure.

    The library-wide merge tree (:func:`linkage`; for a library opened lazily, the size-weighted
    Ward tree of streamed k-means micro-clusters, :func:`atomds.library.outofcore.streamed_suggest_k`)
    is split from the top only while a branch's children are separate groups
    (:func:`atomds.core.splits.significant_splits`, as :func:`atomds.ops.learn.suggest_k`), tested
    on up to ``sample`` random atoms: a library of one phase gives 1.
    """
    from ..ops import learn as ol

    inp = _learning_input(tree, kind or _default_kind(tree))
    if _is_lazy(inp["descriptor"]):
        from . import outofcore as oc

        n = int(sample) if sample is not None else oc.SAMPLE_ROWS
        return int(oc.streamed_suggest_k(inp["descriptor"].data, k_range=k_range, seed=seed, sample=n)[0])
    return int(ol.suggest_k(_sample_rows(inp, sample, seed), k_range=k_range))


def _kmeans_streamed(inp: xr.Dataset, K: int, *, n_init: int, seed: int, centroid: str) -> xr.Dataset:
    """:func:`atomds.ops.learn.kmeans`'s outputs from the streamed k-means (a Dask-backed descriptor)."""
    from . import outofcore as oc

    if centroid != "mean":
        raise InvalidParameterError(f"a library opened lazily is clustered with centroid='mean' only, got {centroid!r}.")
    D = inp["descriptor"]
    fit = oc.streamed_kmeans(D.data, K, n_init=n_init, seed=seed)
    K = len(fit.centers)
    out = xr.Dataset(
        {
            "cluster": (("atom",), oc.assign(D.data, fit.centers), {"units": "1", "long_name": "k-means cluster (-1: not clustered)"}),
            "cluster_center": (("cluster_id", "feature"), fit.centers, {"units": D.attrs.get("units", "1"), "long_name": "cluster centre"}),
            "cluster_size": (("cluster_id",), fit.sizes.astype(np.int64), {"units": "1", "long_name": "atoms in the cluster"}),
        },
        coords={"cluster_id": np.arange(K)},
    )
    params = dict(K=int(K), centroid=centroid, n_init=int(n_init), seed=int(seed), inertia=fit.inertia,
                  out_of_core=True, lloyd_passes=fit.n_passes, converged=fit.converged)
    return record_params(out, "kmeans", params)


def _pca_streamed(inp: xr.Dataset, n_components: int | None) -> xr.Dataset:
    """:func:`atomds.ops.learn.pca`'s outputs from the streamed covariance (a Dask-backed descriptor)."""
    from ..core import learn as cl
    from . import outofcore as oc

    D = inp["descriptor"]
    fit = oc.streamed_pca(D.data, n_components)
    c = len(fit.components)
    u = D.attrs.get("units", "1")
    pol = cl.mode_polarity(fit.components)
    k = D.sizes["feature"] // 2
    out = xr.Dataset(
        {
            "pca_mean": (("feature",), fit.mean, {"units": u, "long_name": "mean neighbourhood"}),
            "pca_components": (("component", "feature"), fit.components, {"units": "1", "long_name": "PCA mode (unit vector)"}),
            "pca_loadings": (("atom", "component"), oc.project(D.data, fit), {"units": u, "long_name": "PCA loading"}),
            "pca_explained_variance": (("component",), fit.explained_variance, {"units": f"{u}^2", "long_name": "explained variance"}),
            "pca_explained_variance_ratio": (("component",), fit.explained_variance_ratio, {"units": "1", "long_name": "explained variance ratio"}),
            "mode_polarity": (("component",), pol, {"units": "1", "long_name": "polarity of the mode"}),
            "mode_is_polar": (("component",), pol > cl.polar_threshold(k), {"units": "1", "long_name": "polar mode"}),
        },
        coords={"component": np.arange(c), "feature": D["feature"].values},
    )
    return record_params(out, "pca", dict(n_components=c, n_atoms=fit.n_rows, out_of_core=True))


def kmeans(
    tree: xr.DataTree,
    n_clusters: int | None = None,
    *,
    kind: str | None = None,
    centroid: str = "mean",
    n_init: int = 4,
    seed: int = 0,
    k_range: Iterable[int] = range(1, 11),
) -> xr.DataTree:
    """k-means on the neighbourhoods of all atoms of the library together.

    :func:`atomds.ops.learn.kmeans` on the library's :func:`descriptor`: one fit over every
    image, so a label means the same neighbourhood in every image.

    Parameters
    ----------
    tree : xarray.DataTree
        A library with neighbourhoods.
    n_clusters : int, optional
        K; chosen from the library-wide dendrogram (:func:`suggest_k`) when None.
    kind : {"phase", "xy"}, optional
        Descriptor (:func:`descriptor`); default "phase" (rotation-invariant: phases, grains,
        disorder) when the images ran the ``phases`` stage, else "xy".
    centroid : {"mean", "median"}
        k-means or k-medians.
    n_init, seed
        Starts and seed of the fit (results are reproducible).
    k_range
        Candidate K for :func:`suggest_k`.

    Returns
    -------
    xarray.DataTree
        A new library: ``cluster(atom)`` (-1 for edge atoms; cluster 0 the most populated),
        ``cluster_center(cluster_id, feature)`` (``phase_feature`` for the phase descriptor) and
        ``cluster_size(cluster_id)`` in ``/atoms``; the per-image summaries at the root
        (:func:`summarize`). Per-image clustering results of the inputs are dropped.
    """
    from ..ops import learn as ol

    kind = kind or _default_kind(tree)
    inp = _learning_input(tree, kind)
    K = int(n_clusters) if n_clusters is not None else suggest_k(tree, kind=kind, k_range=k_range, seed=seed)
    fitted = _kmeans_streamed(inp, K, n_init=n_init, seed=seed, centroid=centroid) if _is_lazy(inp["descriptor"]) \
        else ol.kmeans(inp, K, centroid=centroid, n_init=n_init, seed=seed)
    base = _without_learned(
        tree,
        dims=("cluster_id", "region_id", "merge"),
        names=("cluster", "cluster_center", "cluster_size", "cluster_distance", "region", "linkage_leaf", "clustered_count"),
    )
    at = base.children["atoms"].to_dataset(inherit=False)
    center = fitted["cluster_center"]
    if kind == "phase":
        center = center.rename({"feature": "phase_feature"}).drop_vars("phase_feature", errors="ignore")
    elif "feature" in at.coords:
        center = center.drop_vars("feature", errors="ignore")
    at = at.assign(cluster=fitted["cluster"], cluster_center=center, cluster_size=fitted["cluster_size"])
    at = at.assign_coords(cluster_id=fitted["cluster_id"])
    params = step_params(fitted, "kmeans", default={}) or {}
    params.update(suggested=n_clusters is None, descriptor=kind)
    at = record_params(at, "kmeans", params)
    return summarize(_with_atoms(base, at, ["cluster_id"]))


def pca(tree: xr.DataTree, n_components: int | None = None) -> xr.DataTree:
    """PCA (deformation modes) of the neighbour vectors of all atoms of the library together.

    :func:`atomds.ops.learn.pca` on the library's "xy" :func:`descriptor` (each image turned by
    its reference angle, so that the modes are shared by images in different orientations).

    Returns
    -------
    xarray.DataTree
        A new library with ``pca_mean(feature)``, ``pca_components(component, feature)`` (in that
        common frame), ``pca_loadings(atom, component)`` (NaN for edge atoms),
        ``pca_explained_variance``, ``pca_explained_variance_ratio``, ``mode_polarity`` and
        ``mode_is_polar`` (component) in ``/atoms``; at the root the per-image mean loadings
        (:func:`summarize`) and ``reference_angle(image)``, the turn applied to each image.
        Per-image PCA results of the inputs are dropped.
    """
    from ..ops import learn as ol

    inp = _learning_input(tree, "xy")
    fitted = _pca_streamed(inp, n_components) if _is_lazy(inp["descriptor"]) else ol.pca(inp, n_components)
    base = _without_learned(
        tree,
        dims=("component",),
        names=("pca_mean", "pca_components", "pca_loadings", "pca_explained_variance", "pca_explained_variance_ratio",
               "mode_polarity", "mode_is_polar", "reference_angle"),
    )
    at = base.children["atoms"].to_dataset(inherit=False)
    names = ["pca_mean", "pca_components", "pca_loadings", "pca_explained_variance", "pca_explained_variance_ratio",
             "mode_polarity", "mode_is_polar"]
    res = fitted[[n for n in names if n in fitted.data_vars]]
    if "feature" in at.coords:
        res = res.drop_vars("feature", errors="ignore")
    elif "feature" in res.coords:
        at = at.assign_coords(feature=res["feature"])
        res = res.drop_vars("feature")
    at = at.assign(res.data_vars).assign_coords(component=fitted["component"])
    at.attrs["pca_params"] = fitted.attrs.get("pca_params", "{}")
    out = _with_atoms(base, at, ["component"])
    root = out.to_dataset(inherit=False)
    root["reference_angle"] = xr.DataArray(
        _reference_angles(tree), dims=("image",),
        attrs={"units": "rad", "long_name": "turn applied to the image's neighbour vectors before the library-wide PCA"},
    )
    out.dataset = root
    return summarize(out)


def summarize(tree: xr.DataTree) -> xr.DataTree:
    """Per-image summaries of the library-wide learning, as root variables along ``image``.

    ``cluster_fraction(image, cluster_id)``: fraction of each image's clustered atoms in each
    cluster; ``clustered_count(image)``: atoms clustered per image; ``mean_loading(image,
    component)`` and ``std_loading(image, component)``: mean and spread of the PCA loadings
    over each image's atoms. NaN for images without usable atoms. Computed without a per-image
    loop (group sums over the ragged ``atom`` dim).
    """
    from scipy import sparse

    from . import outofcore as oc

    at = atoms_node(tree)
    n_img = len(ids(tree))
    idx = at["image_index"].data if _is_lazy(at["image_index"]) else np.asarray(at["image_index"].values, dtype=np.int64)
    out = tree.copy()
    root = out.to_dataset(inherit=False)
    root = root.drop_vars([n for n in SUMMARIES if n in root.variables and n != "reference_angle"])
    if "cluster" in at.variables and "cluster_id" in root.coords:
        K = root.sizes["cluster_id"]
        if _is_lazy(at["cluster"]):
            counts = oc.per_image_counts(at["image_index"].data, at["cluster"].data, n_img, K)
        else:
            lab = np.asarray(at["cluster"].values, dtype=np.int64)
            ok = lab >= 0
            counts = np.zeros((n_img, K))
            np.add.at(counts, (idx[ok], lab[ok]), 1.0)
        tot = counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = counts / tot[:, None]
        root["cluster_fraction"] = xr.DataArray(
            frac, dims=("image", "cluster_id"), attrs={"units": "1", "long_name": "fraction of the image's clustered atoms in each cluster"}
        )
        root["clustered_count"] = xr.DataArray(
            tot.astype(np.int64), dims=("image",), attrs={"units": "1", "long_name": "atoms clustered in the image"}
        )
    if "pca_loadings" in at.variables and "component" in root.coords:
        if _is_lazy(at["pca_loadings"]):
            n2, s1, s2 = oc.per_image_moments(at["image_index"].data, at["pca_loadings"].data, n_img)
        else:
            L = np.asarray(at["pca_loadings"].values, dtype=float)
            ok = np.isfinite(L).all(axis=1)
            ind = sparse.csr_matrix((np.ones(int(ok.sum())), (idx[ok], np.flatnonzero(ok))), shape=(n_img, L.shape[0]))
            Lz = np.where(ok[:, None], L, 0.0)
            n2, s1, s2 = np.asarray(ind.sum(axis=1)), np.asarray(ind @ Lz), np.asarray(ind @ Lz**2)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s1 / n2
            var = s2 / n2 - mean**2
        u = at["pca_loadings"].attrs.get("units", "")
        root["mean_loading"] = xr.DataArray(
            mean, dims=("image", "component"), attrs={"units": u, "long_name": "mean PCA loading over the image's atoms"}
        )
        root["std_loading"] = xr.DataArray(
            np.sqrt(np.clip(var, 0, None)), dims=("image", "component"),
            attrs={"units": u, "long_name": "standard deviation of the PCA loadings over the image's atoms"},
        )
    out.dataset = root
    return out


def learn(
    tree: xr.DataTree,
    *,
    n_clusters: int | None = None,
    n_components: int | None = None,
    kind: str | None = None,
    centroid: str = "mean",
    n_init: int = 4,
    seed: int = 0,
    k_range: Iterable[int] = range(1, 11),
) -> xr.DataTree:
    """Library-wide k-means (K from the dendrogram unless given) and PCA, plus per-image summaries.

    ``pca(kmeans(tree, n_clusters, ...), n_components)``; see :func:`kmeans`, :func:`pca` and
    :func:`summarize`. On a library opened lazily (Dask-backed ``/atoms``) every fit streams over
    chunks of atoms (:mod:`atomds.library.outofcore`); with a dask.distributed client the
    descriptor is kept in the workers' memory for the passes when it takes at most a quarter of it.
    """
    from . import outofcore as oc

    # a library opened lazily: its descriptor is read once (kept in the workers' memory when it fits)
    with oc.session():
        out = kmeans(tree, n_clusters, kind=kind, centroid=centroid, n_init=n_init, seed=seed, k_range=k_range)
        return pca(out, n_components)


def property_correlation(
    tree: xr.DataTree, *, summaries: Sequence[str] | None = None, properties: Sequence[str] | None = None
) -> xr.DataArray:
    """Pearson correlation, over the ok images, of per-image summaries with per-image properties.

    Parameters
    ----------
    tree : xarray.DataTree
        A library with properties and summaries at the root.
    summaries : sequence of str, optional
        Root variables along ``image`` (and optionally one more dim, each column being a
        summary); default ``cluster_fraction`` and ``mean_loading`` where present.
    properties : sequence of str, optional
        Numeric root variables along ``image``; default every numeric property.

    Returns
    -------
    xarray.DataArray
        ``(summary, property)``, with summary names like ``cluster_fraction[1]``; NaN where a
        column is constant over the images. Attribute ``n_images``: images used.
    """
    from ..core.spectra import pearson

    root = tree.to_dataset(inherit=False)
    if summaries is None:
        summaries = [n for n in ("cluster_fraction", "mean_loading") if n in root.data_vars]
        if not summaries:
            raise MissingStepError("the library has no summaries: run atomds.library.learn(tree) first.")
    if properties is None:
        properties = [
            str(n) for n, v in root.data_vars.items()
            if v.dims == ("image",) and v.dtype.kind in "biuf" and n not in SUMMARIES
        ]
    if not properties:
        raise InvalidParameterError("the library has no numeric per-image properties to correlate with.")
    ok = np.asarray(root["status"].values) == "ok"
    cols, names = [], []
    for s in summaries:
        v = root[s]
        if v.dims == ("image",):
            cols.append(np.asarray(v.values, dtype=float))
            names.append(s)
        elif len(v.dims) == 2 and v.dims[0] == "image":
            labels = root[v.dims[1]].values if v.dims[1] in root.coords else range(v.shape[1])
            for j, c in enumerate(labels):
                cols.append(np.asarray(v.values[:, j], dtype=float))
                names.append(f"{s}[{c}]")
        else:
            raise DimensionError(f"summary {s!r} must be along image (and at most one more dim), got {v.dims}.")
    A = np.column_stack(cols)[ok]
    B = np.column_stack([np.asarray(root[p].values, dtype=float) for p in properties])[ok]
    r, n = pearson(A, B)
    return xr.DataArray(
        r,
        dims=("summary", "property"),
        coords={"summary": np.array(names, dtype=object), "property": np.array(list(properties), dtype=object)},
        name="property_correlation",
        attrs={"units": "1", "long_name": "Pearson correlation over images", "n_images": int(n)},
    )
