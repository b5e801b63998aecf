"""Learning on the neighbourhood descriptor of a Dataset: k-means / k-medians, K scan, the
hierarchical merge tree and the suggested K, regions (sites joined into phases), PCA and ICA
deformation modes with their polarity.

Fits are global: they read the whole descriptor (computing it when it is Dask-backed: one
compute per fit) and are eager. Their per-atom results - cluster labels, loadings - are
transforms of the descriptor with the fitted centres or modes, kept lazy over chunks of ``atom``
when the descriptor is Dask-backed. Edge atoms and any other NaN descriptor rows are left out of
every fit and get label -1 / NaN loadings.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..core import learn as cl
from ..core import regions as cregions
from ..core import splits as csplit
from ..core.neighbors import DISORDER_WEIGHT
from ..errors import InvalidParameterError, MissingStepError, TooFewAtomsError
from ..params import record_params, step_params
from ._common import annotate, is_dask

__all__ = ["kmeans", "kmeans_scan", "linkage", "suggest_k", "regions", "pca", "ica"]

_LINKAGE_VARS = ("linkage_left", "linkage_right", "linkage_height", "linkage_size", "linkage_leaf")


def _descriptor(ds: xr.Dataset, step: str) -> xr.DataArray:
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    if "descriptor" not in ds.variables:
        hint = "ds.lcx.neighborhoods()"
        if "atom_x" not in ds.variables:
            hint = "ds.lcx.find_atoms() (or ds.lcx.with_atoms(x, y)), then ds.lcx.neighborhoods()"
        raise MissingStepError(f"{step} needs the neighbourhood 'descriptor', which the Dataset does not have: call {hint} first.")
    D = ds["descriptor"]
    if D.dims != ("atom", "feature"):
        raise InvalidParameterError(f"'descriptor' must have dims ('atom', 'feature'), got {D.dims}")
    return D


def _valid_rows(X: np.ndarray, step: str) -> np.ndarray:
    ok = np.isfinite(X).all(axis=1)
    if not ok.any():
        raise TooFewAtomsError(
            f"{step}: every descriptor row is NaN (all {len(X)} atoms are edge atoms or lack neighbours); "
            "use a larger image, fewer neighbours (k), or neighborhoods(exclude_edge=False)"
        )
    return ok


def _values(D: xr.DataArray) -> np.ndarray:
    return np.asarray(D.values, dtype=float)


def _feature_coord(ds: xr.Dataset):
    return ds["feature"] if "feature" in ds.coords else None


def _coord(dim: str, values, long_name: str, units: str = "1") -> xr.DataArray:
    """An index coordinate with its ``units`` and ``long_name``."""
    return annotate(xr.DataArray(np.asarray(values), dims=(dim,)), units, long_name)


def _drop(ds: xr.Dataset, names) -> xr.Dataset:
    return ds.drop_vars([n for n in names if n in ds.variables])


def _per_atom(D: xr.DataArray, func, *, dtype, extra: int | None = None):
    """Apply ``func`` (rows -> rows) to the descriptor: a NumPy result or a lazy Dask one."""
    if is_dask(D):
        import dask.array as da

        Xd = D.data.rechunk({1: -1})
        if extra is None:
            return da.map_blocks(lambda b: func(b), Xd, dtype=dtype, drop_axis=1, meta=np.empty((0,), dtype))
        return da.map_blocks(lambda b: func(b), Xd, dtype=dtype, chunks=(Xd.chunks[0], (extra,)), meta=np.empty((0, 0), dtype))
    return func(_values(D))


def _projection(mean: np.ndarray, rows: np.ndarray):
    """A block function: each finite descriptor row less ``mean``, projected on ``rows`` (NaN rows stay NaN)."""

    def project(b: np.ndarray) -> np.ndarray:
        o = np.isfinite(b).all(axis=1)
        out = np.full((len(b), rows.shape[0]), np.nan)
        out[o] = (b[o] - mean) @ rows.T
        return out

    return project


def kmeans(ds: xr.Dataset, K: int, *, centroid: str = "mean", n_init: int = 10, seed: int = 0) -> xr.Dataset:
    """Cluster the neighbourhoods: k-means (mean centroids) or k-medians (median centroids).

    Atoms are assigned to the nearest centre by squared Euclidean distance between descriptors;
    with ``centroid="median"`` each centre is the component-wise median of its atoms (robust to
    outlying neighbourhoods, as in the paper). Edge atoms (NaN descriptor rows) are not
    clustered. Cluster 0 is the most populated.

    Parameters
    ----------
    ds : xarray.Dataset
        After :func:`atomds.ops.neighbors.neighborhoods`.
    K : int
        Number of clusters (at most the number of centre atoms). :func:`suggest_k` proposes one.
    centroid : {"mean", "median"}
    n_init : int
        Random k-means++ starts; the best is kept.
    seed : int
        Seed of the starts (results are reproducible).

    Returns
    -------
    xarray.Dataset
        With ``cluster(atom)`` (int64, -1 where not clustered; lazy when the descriptor is
        Dask-backed), ``cluster_center(cluster_id, feature)``, ``cluster_size(cluster_id)``; the
        inertia is recorded in the ``kmeans_params`` attribute.
    """
    D = _descriptor(ds, "kmeans()")
    X = _values(D)
    ok = _valid_rows(X, "kmeans()")
    if K is None or int(K) != K or K < 1:
        raise InvalidParameterError(f"K (number of clusters) must be a positive integer, got {K!r}")
    if K > ok.sum():
        raise InvalidParameterError(
            f"K={K} clusters were asked for but only {int(ok.sum())} atoms are centres (the other "
            f"{int((~ok).sum())} are edge atoms or lack neighbours); use K <= {int(ok.sum())}"
        )
    labels_ok, centers, inertia = cl.kmeans(X[ok], int(K), centroid=centroid, n_init=n_init, seed=seed)
    K = int(K)

    def _assign(b):
        return cl.assign(b, centers)[0]

    if is_dask(D):
        labels = _per_atom(D, _assign, dtype=np.int64)
    else:
        labels = np.full(len(X), -1, dtype=np.int64)
        labels[ok] = labels_ok
    size = np.bincount(labels_ok, minlength=K)
    out = _drop(ds, ["cluster", "cluster_center", "cluster_size", "cluster_id", "region", "region_of_cluster", "region_id"])
    funits = D.attrs.get("units", "1")
    out = out.assign(
        cluster=annotate(xr.DataArray(labels, dims=("atom",)), "1", "k-means cluster (-1: not clustered)"),
        cluster_center=annotate(
            xr.DataArray(centers, dims=("cluster_id", "feature")), funits, f"cluster centre ({centroid} of its atoms)"
        ),
        cluster_size=annotate(xr.DataArray(size, dims=("cluster_id",)), "1", "number of atoms in the cluster"),
    )
    out = out.assign_coords(cluster_id=_coord("cluster_id", np.arange(K), "k-means cluster id"))
    return record_params(
        out, "kmeans", dict(K=K, centroid=centroid, n_init=n_init, seed=seed, inertia=float(inertia), n_clustered=int(ok.sum()))
    )


def kmeans_scan(
    ds: xr.Dataset, k_range=range(2, 11), *, centroid: str = "mean", n_init: int = 4, seed: int = 0, silhouette_samples: int = 3000
) -> xr.Dataset:
    """Inertia and silhouette score of k-means for each K in ``k_range`` (the elbow plot).

    Returns
    -------
    xarray.Dataset
        With ``kmeans_inertia(k)`` (sum of squared distances to the centres, in squared feature
        units) and ``kmeans_silhouette(k)`` (in [-1, 1], higher = better separated; computed on a
        random subsample of at most ``silhouette_samples`` atoms), coordinate ``k``.
    """
    D = _descriptor(ds, "kmeans_scan()")
    X = _values(D)
    ok = _valid_rows(X, "kmeans_scan()")
    ks, inertia, sil = cl.kmeans_scan(X[ok], k_range, centroid=centroid, n_init=n_init, seed=seed, silhouette_samples=silhouette_samples)
    out = _drop(ds, ["kmeans_inertia", "kmeans_silhouette", "k"])
    funits = D.attrs.get("units", "1")
    out = out.assign(
        kmeans_inertia=annotate(xr.DataArray(inertia, dims=("k",)), f"({funits})^2", "k-means inertia"),
        kmeans_silhouette=annotate(xr.DataArray(sil, dims=("k",)), "1", "silhouette score"),
    )
    out = out.assign_coords(k=_coord("k", ks, "number of clusters K"))
    return record_params(out, "kmeans_scan", dict(k_range=list(ks), centroid=centroid, n_init=n_init, seed=seed))


def _linkage_arrays(X, ok, method, max_points, n_micro, seed):
    Z, leaf_ok = cl.ward_linkage(X[ok], method=method, max_points=max_points, n_micro=n_micro, seed=seed)
    leaf = np.full(len(X), -1, dtype=np.int64)
    leaf[ok] = leaf_ok
    return Z, leaf


def linkage(
    ds: xr.Dataset, method: str = "ward", *, max_points: int = 2000, n_micro: int = 256, seed: int = 0
) -> xr.Dataset:
    """The hierarchical merge tree of the neighbourhoods (the paper's dendrogram).

    Up to ``max_points`` centre atoms the tree is built over the atoms themselves (any SciPy
    linkage ``method``). For more atoms they are first grouped into ``n_micro`` k-means
    micro-clusters, and the tree is the exact size-weighted Ward tree of those: its top - the part
    that decides K - is that of all atoms, at a cost that does not grow with their number (100 000
    atoms take well under a second). ``linkage_leaf(atom)`` says which leaf each atom belongs to.

    Returns
    -------
    xarray.Dataset
        With, on dim ``merge`` (one row per merge, lowest first, as
        ``scipy.cluster.hierarchy.linkage``): ``linkage_left``, ``linkage_right`` (ids of the
        merged nodes: leaves are 0..L-1, node L + i is made by merge i), ``linkage_height``,
        ``linkage_size`` (atoms under the node); and ``linkage_leaf(atom)`` (-1 for edge atoms).
        ``scipy.cluster.hierarchy.dendrogram`` draws it from
        ``np.column_stack([left, right, height, size])``.
    """
    D = _descriptor(ds, "linkage()")
    X = _values(D)
    ok = _valid_rows(X, "linkage()")
    if ok.sum() < 2:
        raise TooFewAtomsError("linkage() needs at least 2 centre atoms")
    Z, leaf = _linkage_arrays(X, ok, method, max_points, n_micro, seed)
    split = _split_tests(X, ok, Z, leaf, range(1, 11), csplit.VALLEY_RATIO)[1] if ok.sum() >= 3 else {}
    out = _drop(ds, list(_LINKAGE_VARS) + ["merge"])
    out = out.assign(
        linkage_left=annotate(xr.DataArray(Z[:, 0].astype(np.int64), dims=("merge",)), "1", "first merged node"),
        linkage_right=annotate(xr.DataArray(Z[:, 1].astype(np.int64), dims=("merge",)), "1", "second merged node"),
        linkage_height=annotate(xr.DataArray(Z[:, 2], dims=("merge",)), D.attrs.get("units", "1"), f"merge height ({method})"),
        linkage_size=annotate(xr.DataArray(Z[:, 3].astype(np.int64), dims=("merge",)), "1", "atoms under the merged node"),
        linkage_leaf=annotate(xr.DataArray(leaf, dims=("atom",)), "1", "leaf of the merge tree holding the atom (-1: none)"),
    )
    return record_params(
        out, "linkage",
        dict(method=method, max_points=max_points, n_micro=n_micro, seed=seed, n_leaves=int(len(Z) + 1), **split),
    )


def _tree(ds: xr.Dataset) -> np.ndarray | None:
    names = ("linkage_left", "linkage_right", "linkage_height", "linkage_size")
    if not all(v in ds.variables for v in names):
        return None
    return np.column_stack([np.asarray(ds[v].values, float) for v in names])


def _split_tests(X, ok, Z, leaf, k_range, valley):
    K, tests = csplit.significant_splits(Z, X[ok], leaf[ok], k_range=k_range, valley=valley)
    return K, dict(suggested_k=int(K), k_range=[int(k) for k in k_range], valley_threshold=float(valley),
                   split_tests=tests, k_rule="valley")


def suggest_k(
    ds: xr.Dataset,
    *,
    k_range=range(1, 11),
    method: str = "valley",
    valley: float = csplit.VALLEY_RATIO,
    tolerance: float = 0.2,
) -> int:
    """The number of groups of neighbourhoods (phases and sites), 1 when there is no structure.

    ``method="valley"`` (default): the merge tree (:func:`linkage`) is split from the top only
    while a branch's two children are separate groups: the density of their atoms, projected on
    the line through the children's means, must dip between them to at most ``valley`` of the
    lower peak (:func:`atomds.core.splits.significant_splits`). A homogeneous crystal, whose tree
    only cuts the position noise in two, gives K = 1; children smaller than 1 % of the atoms are
    not split. :func:`linkage` records the tests (valley ratio of every branch examined, the
    threshold and the K they give) in ``linkage_params``.

    ``method="drop"``: the cut after the largest drop in merge height (on a log axis; of cuts
    within ``tolerance`` of the largest drop, the finest), the rule of version 0.1. It always finds
    at least 2 groups.

    Uses the tree of :func:`linkage` when it has run, else builds it (Ward) without storing it.
    :func:`regions` then joins clusters that are sites of one phase and dissolves interfaces.

    Returns
    -------
    int
    """
    if method not in ("valley", "drop"):
        raise InvalidParameterError(f"method must be 'valley' or 'drop', got {method!r}")
    Z = _tree(ds)
    if method == "valley":
        params = step_params(ds, "linkage", default={}) or {}
        if (Z is not None and params.get("k_rule") == "valley" and params.get("valley_threshold") == float(valley)
                and params.get("k_range") == [int(k) for k in k_range]):
            return int(params["suggested_k"])
    D = _descriptor(ds, "suggest_k()")
    X = _values(D)
    ok = _valid_rows(X, "suggest_k()")
    if ok.sum() < 3:
        raise TooFewAtomsError(f"suggest_k() needs at least 3 centre atoms, got {int(ok.sum())}")
    if Z is None or "linkage_leaf" not in ds.variables:
        Z, leaf = _linkage_arrays(X, ok, "ward", 2000, 256, 0)
    else:
        leaf = np.asarray(ds["linkage_leaf"].values, np.int64)
    if method == "drop":
        return csplit.suggest_k(Z, [k for k in k_range if k >= 2] or range(2, 3), tolerance=tolerance)
    return _split_tests(X, ok, Z, leaf, k_range, valley)[0]


#: A region whose atoms' median translational disorder (the phase descriptor's ``disorder``
#: feature, unweighted) reaches this is disordered material, a phase of its own.
DISORDERED_REGION = 0.4


def _disordered(ds: xr.Dataset, reg: np.ndarray, n_reg: int) -> np.ndarray | None:
    """Per region: is its median ``disorder`` at least :data:`DISORDERED_REGION`? (None without it.)"""
    if "descriptor" not in ds.variables or "feature" not in ds["descriptor"].dims or "feature" not in ds.coords:
        return None
    names = [str(f) for f in ds["feature"].values]
    if "disorder" not in names:
        return None
    d = np.asarray(ds["descriptor"].isel(feature=names.index("disorder")).values, float) / DISORDER_WEIGHT
    out = np.zeros(n_reg, dtype=bool)
    for r in range(n_reg):  # a handful of regions
        v = d[(reg == r) & np.isfinite(d)]
        out[r] = v.size > 0 and float(np.median(v)) >= DISORDERED_REGION
    return out


def regions(
    ds: xr.Dataset, *, by: str = "cluster", dissolve: bool = True, merge: bool = True, passes: int = 1, fill: bool = True
) -> xr.Dataset:
    """Phases and regions from clusters: drop interface clusters, join sites of one phase,
    smooth borders, and label every atom.

    1. ``dissolve`` (k-means clusters only): a cluster whose centre lies between the centres of
       two other clusters and whose atoms touch both - the atoms where two regions meet, grouped
       on their own when K is generous - is dissolved, each atom going to the nearer of the two
       (:func:`atomds.core.regions.dissolve_transitions`).
    2. ``merge``: clusters that are different sites of one phase (their atoms are each other's
       neighbours more often than their own) are joined (:func:`atomds.core.regions.merge_sites`),
       and so are clusters across whose contacts the descriptor changes only gradually, over more
       than two or three columns (:func:`atomds.core.regions.gradual_contacts`: one lattice under
       a strain gradient or a scan distortion), unless they meet only through the gaps of a
       disordered cluster between them; clusters of separate regions, which touch only along a
       border where the lattice changes, stay apart.
    3. ``dissolve``: a region that is a line rather than an area - an interface one column wide
       (antiphase or grain boundary) or scattered defect sites, with fewer than 42 % of its
       neighbour pairs inside it - is given to the regions around it
       (:func:`atomds.core.regions.dissolve_thin`), and so is a strip one or two columns wide with
       one region on both sides (an interface within one phase: antiphase, twin or grain boundary,
       :func:`atomds.core.regions.enclosed_strips`), in rounds until none is left (the rows on the
       two sides of a grain boundary can be a line and a strip). A band two or more columns wide
       between two regions stays a region, and so does a disordered region however narrow (median
       ``disorder`` feature at least :data:`DISORDERED_REGION`), with two exceptions: a strip
       enclosed by one region whose atoms mostly sit on that region's lattice (the columns along a
       grain boundary within one phase, :func:`atomds.core.regions.strips_on_lattice`), and
       scattered sites (fewer than :data:`atomds.core.regions.MIN_MATERIAL_CONTACT` of their
       neighbour pairs inside the region). Before that, a strip of disorder joins the disordered
       region it shares most of its border with (:func:`atomds.core.regions.join_touching`: a band
       split along its length by k-means); two disordered areas with interiors stay apart.
    4. ``passes`` rounds of a plurality vote of each atom with its neighbours
       (:func:`atomds.core.regions.vote_labels`) remove isolated misassignments on borders; the
       atoms of a disordered region that sit on no site of a crystal's lattice
       (:func:`atomds.core.regions.off_the_crystal`) move only to another disordered region.
    5. ``fill``: atoms without a cluster (edge atoms) take the region of their nearest labelled
       atom, so that every atom has one.

    This step reads all labels, neighbour indices and the descriptor (it computes them when they
    are Dask-backed) and is eager.

    Returns
    -------
    xarray.Dataset
        With ``region(atom)`` (int64; -1 only for unlabelled atoms when ``fill=False``),
        ``region_of_cluster(cluster_id)`` (the region each cluster joined; -1 for a dissolved
        transition cluster) and coordinate ``region_id``; regions are numbered by decreasing size.
    """
    if by not in ds.variables:
        hint = "ds.lcx.kmeans(K)" if by == "cluster" else f"the step that makes {by!r}"
        raise MissingStepError(f"regions() needs the labels {by!r}: call {hint} first.")
    if "neighbor_index" not in ds.variables:
        raise MissingStepError("regions() needs 'neighbor_index': call ds.lcx.neighborhoods() first.")
    lab = np.asarray(ds[by].values).astype(np.int64)
    idx = np.asarray(ds["neighbor_index"].values).astype(np.int64)
    if lab.ndim != 1 or len(lab) != idx.shape[0]:
        raise InvalidParameterError(f"{by!r} must be one integer label per atom")
    id_dim = "cluster_id" if by == "cluster" else f"{by}_id"
    L = int(ds.sizes[id_dim]) if id_dim in ds.sizes else int(lab.max(initial=-1)) + 1
    dissolved: list[int] = []
    if dissolve and by == "cluster" and "cluster_center" in ds.variables and "descriptor" in ds.variables:
        lab, dissolved = cregions.dissolve_transitions(
            np.asarray(ds["descriptor"].values, float), lab, np.asarray(ds["cluster_center"].values, float), idx
        )
    if merge and L:
        alive = np.setdiff1d(np.arange(L), dissolved)
        compact = np.full(L, -1, dtype=np.int64)
        compact[alive] = np.arange(alive.size)
        sub = np.where(lab >= 0, compact[np.maximum(lab, 0)], -1)
        desc = np.asarray(ds["descriptor"].values, float) if "descriptor" in ds.variables else None
        m = cregions.merge_sites(sub, idx, alive.size, descriptor=desc if desc is not None and desc.ndim == 2 else None,
                                 disordered=_disordered(ds, sub, alive.size))
        mapping = np.full(L, -1, dtype=np.int64)
        mapping[alive] = m
    else:
        mapping = np.arange(L, dtype=np.int64)
        mapping[dissolved] = -1
    reg = np.where(lab >= 0, mapping[np.maximum(lab, 0)], -1)
    thin: list[int] = []
    held = open_to = None  # atoms of disordered regions off the crystals' lattice, and the labels they may take
    n_joined = 0
    if dissolve and mapping.max(initial=-1) >= 1:
        # interfaces one column wide and scattered defect sites are lines, not phases; a disordered
        # region (amorphous material) is kept however narrow
        n_reg = int(mapping.max()) + 1
        keep = _disordered(ds, reg, n_reg)
        if keep is not None and keep.any():
            keep &= ~cregions.strips_on_lattice(ds["atom_x"].values, ds["atom_y"].values, reg, idx, n_reg)
            # a disordered band split along its length is one band of material
            joined = cregions.join_touching(reg, idx, keep, n_reg)
            n_joined = int(np.count_nonzero(joined != np.arange(n_reg)))
            reg = np.where(reg >= 0, joined[np.maximum(reg, 0)], -1)
            mapping = np.where(mapping >= 0, joined[np.maximum(mapping, 0)], -1)
            # scattered sites are no material, however disordered their neighbourhoods
            keep &= ~cregions.thin_clusters(reg, idx, n_reg, min_internal=cregions.MIN_MATERIAL_CONTACT)
        reg, thin = cregions.dissolve_thin(reg, idx, n_reg, keep=keep)
        mapping = np.where(np.isin(mapping, thin), -1, mapping)
        if keep is not None and keep.any():
            held = cregions.off_the_crystal(ds["atom_x"].values, ds["atom_y"].values, reg, keep)
            open_to = keep
    if passes:
        reg = cregions.vote_labels(reg, idx, passes=int(passes), fixed=held, open_to=open_to)
    if fill:
        reg = cregions.fill_labels(np.asarray(ds["atom_x"].values, float), np.asarray(ds["atom_y"].values, float), reg)
    # number regions by decreasing size
    used = np.unique(reg[reg >= 0])
    sizes = np.array([(reg == r).sum() for r in used])
    order = used[np.argsort(-sizes, kind="stable")]
    remap = np.full(int(max(L, reg.max(initial=-1) + 1)), -1, dtype=np.int64)
    remap[order] = np.arange(order.size)
    reg = np.where(reg >= 0, remap[np.maximum(reg, 0)], -1)
    mapping = np.where(mapping >= 0, remap[np.maximum(mapping, 0)], -1)
    R = int(order.size)
    out = _drop(ds, ["region", "region_of_cluster", "region_id"])
    out = out.assign(
        region=annotate(xr.DataArray(reg, dims=("atom",)), "1", "region (phase) of the atom"),
        region_of_cluster=annotate(
            xr.DataArray(mapping, dims=(id_dim,)), "1", "region that each cluster joined (-1: dissolved transition cluster)"
        ),
    )
    out = out.assign_coords(region_id=_coord("region_id", np.arange(R), "region id"))
    return record_params(
        out, "regions",
        dict(by=by, dissolve=bool(dissolve), merge=bool(merge), passes=int(passes), fill=bool(fill), n_regions=R,
             dissolved=[int(d) for d in dissolved], thin_dissolved=[int(t) for t in thin],
             min_internal_contact=cregions.MIN_INTERNAL_CONTACT, disordered_joined=n_joined,
             held_off_the_crystal=0 if held is None else int(np.count_nonzero(held))),
    )


def _polarity(ds: xr.Dataset, comps: np.ndarray):
    names = [str(f) for f in np.asarray(ds["feature"].values)] if "feature" in ds.coords else []
    is_xy = bool(names) and len(names) % 2 == 0 and all(
        n == f"d{c}{j}" for j in range(len(names) // 2) for c, n in zip(("x", "y"), names[2 * j : 2 * j + 2])
    )
    if not is_xy:
        nan = np.full(len(comps), np.nan)
        return nan, np.zeros(len(comps), bool)
    pol = cl.mode_polarity(comps)
    return pol, pol > cl.polar_threshold(len(names) // 2)


def pca(ds: xr.Dataset, n_components: int | None = None, *, exclude_outliers: bool = False) -> xr.Dataset:
    """Principal components of the neighbourhoods: deformation modes of the mean neighbourhood.

    Each descriptor row is the mean neighbourhood ``pca_mean`` plus a sum of modes
    ``pca_components`` weighted by the atom's ``pca_loadings``. With the "xy" descriptor each
    mode is a set of neighbour shifts; its ``mode_polarity`` = ``|sum of the shifts|`` / sum of
    their lengths is 1 for a uniform shift of the whole neighbourhood (the centre atom displaced
    the other way: a polar distortion) and 0 for shifts that cancel (breathing, shear, rotation);
    ``mode_is_polar`` is polarity > (1 + 1/sqrt(k)) / 2 for k neighbours, halfway between a
    pure shift (1) and shifts in random directions (about 1/sqrt(k)): 0.70 for six neighbours
    (:func:`atomds.core.learn.polar_threshold`).

    Edge atoms (NaN rows) are left out of the fit; their loadings are NaN. When the descriptor is
    Dask-backed the fit uses Dask's tall-and-skinny SVD (one compute) and the loadings stay lazy.

    Parameters
    ----------
    ds : xarray.Dataset
        After :func:`atomds.ops.neighbors.neighborhoods`.
    n_components : int, optional
        Modes kept (default all: min(number of centre atoms, number of features)).
    exclude_outliers : bool
        Fit the modes on the typical neighbourhoods only (:func:`atomds.core.learn.robust_inliers`):
        atypical ones - at defects, structural boundaries - can carry so much variance that they
        take over the first modes and mix into the distortion of the bulk. Every atom still gets
        loadings; ``pca_inlier(atom)`` says which atoms the fit used. With Dask-backed data this
        computes the descriptor for the fit (the loadings stay lazy).

    Returns
    -------
    xarray.Dataset
        With ``pca_mean(feature)``, ``pca_components(component, feature)`` (unit vectors, largest
        entry positive), ``pca_loadings(atom, component)``, ``pca_explained_variance(component)``
        (squared feature units), ``pca_explained_variance_ratio(component)``,
        ``mode_polarity(component)`` and ``mode_is_polar(component)`` (NaN / False unless the
        descriptor is "xy").
    """
    D = _descriptor(ds, "pca()")
    n_atoms, n_feat = D.shape
    inlier = None
    if exclude_outliers:
        X = _values(D)
        ok = _valid_rows(X, "pca()")
        if ok.sum() < 2:
            raise TooFewAtomsError(f"pca() needs at least 2 centre atoms, got {int(ok.sum())}")
        inl = cl.robust_inliers(X[ok])
        inlier = np.zeros(n_atoms, dtype=bool)
        inlier[np.flatnonzero(ok)[inl]] = True
        if inlier.sum() < 2:
            raise InvalidParameterError("pca(exclude_outliers=True): fewer than 2 typical neighbourhoods are left")
        mean, comps, _, var, ratio = cl.pca(X[inlier], n_components)
        c = comps.shape[0]
        total = float(np.var(X[inlier], axis=0, ddof=1).sum())

        loadings = _per_atom(D, _projection(mean, comps), dtype=float, extra=c)
    elif is_dask(D):
        import dask
        import dask.array as da

        X = D.data.rechunk({1: -1})
        okd = da.isfinite(X).all(axis=1)
        n_ok = okd.sum()
        mean = da.where(okd[:, None], X, 0.0).sum(axis=0) / n_ok
        Xc = da.where(okd[:, None], X - mean, 0.0)
        _, S, Vt = da.linalg.svd(Xc)
        mean, S, Vt, n_ok = dask.compute(mean, S, Vt, n_ok)
        n_ok = int(n_ok)
        if n_ok < 2:
            raise TooFewAtomsError(f"pca() needs at least 2 centre atoms, got {n_ok}")
        c = cl.check_components(n_components, n_ok, n_feat)
        sgn = cl.svd_flip_components(Vt)
        Vt = Vt * sgn[:, None]
        var = S**2 / (n_ok - 1)
        total = var.sum()
        ratio = var / total if total > 0 else np.zeros_like(var)
        comps, var, ratio = Vt[:c], var[:c], ratio[:c]

        loadings = _per_atom(D, _projection(mean, comps), dtype=float, extra=c)
    else:
        X = _values(D)
        ok = _valid_rows(X, "pca()")
        if ok.sum() < 2:
            raise TooFewAtomsError(f"pca() needs at least 2 centre atoms, got {int(ok.sum())}")
        mean, comps, load_ok, var, ratio = cl.pca(X[ok], n_components)
        c = comps.shape[0]
        loadings = np.full((n_atoms, c), np.nan)
        loadings[ok] = load_ok
        total = float(np.var(X[ok], axis=0, ddof=1).sum())
    pol, polar = _polarity(ds, comps)
    funits = D.attrs.get("units", "1")
    out = _drop(ds, ["pca_mean", "pca_components", "pca_loadings", "pca_explained_variance",
                     "pca_explained_variance_ratio", "mode_polarity", "mode_is_polar", "component"])
    out = out.assign(
        pca_mean=annotate(xr.DataArray(mean, dims=("feature",)), funits, "mean neighbourhood"),
        pca_components=annotate(xr.DataArray(comps, dims=("component", "feature")), "1", "PCA mode (unit vector)"),
        pca_loadings=annotate(xr.DataArray(loadings, dims=("atom", "component")), funits, "PCA loading (mode amplitude)"),
        pca_explained_variance=annotate(xr.DataArray(var, dims=("component",)), f"({funits})^2", "variance along the mode"),
        pca_explained_variance_ratio=annotate(xr.DataArray(ratio, dims=("component",)), "1", "fraction of the total variance"),
        mode_polarity=annotate(xr.DataArray(pol, dims=("component",)), "1", "|sum of neighbour shifts| / sum of |shifts|"),
        mode_is_polar=annotate(xr.DataArray(polar, dims=("component",)), "1", "mode_polarity above the polar threshold"),
    )
    out = _drop(out, ["pca_inlier"])
    if inlier is not None:
        out = out.assign(pca_inlier=annotate(xr.DataArray(inlier, dims=("atom",)), "1", "neighbourhood used in the PCA fit"))
    out = out.assign_coords(component=_coord("component", np.arange(len(comps)), "PCA mode number"))
    return record_params(
        out, "pca",
        dict(n_components=n_components, n_kept=int(len(comps)), total_variance=float(total),
             exclude_outliers=bool(exclude_outliers), n_fitted=None if inlier is None else int(inlier.sum())),
    )


def ica(ds: xr.Dataset, n_components: int, *, seed: int = 0, max_iter: int = 1000) -> xr.Dataset:
    """Independent components (scikit-learn FastICA) of the neighbourhoods.

    Like :func:`pca`, but the modes are statistically independent rather than orthogonal: they
    separate distortions that PCA mixes when their variances are similar. The fit reads the whole
    descriptor (computing it when Dask-backed); loadings stay lazy.

    Returns
    -------
    xarray.Dataset
        With ``ica_mean(feature)``, ``ica_components(ica_component, feature)`` (unit vectors,
        largest entry positive), ``ica_loadings(atom, ica_component)`` (NaN for edge atoms),
        ``ica_polarity(ica_component)`` and ``ica_is_polar(ica_component)`` (as for PCA).
    """
    D = _descriptor(ds, "ica()")
    X = _values(D)
    ok = _valid_rows(X, "ica()")
    mean, comps, unmix, _ = cl.ica(X[ok], n_components, seed=seed, max_iter=max_iter)
    c = comps.shape[0]

    loadings = _per_atom(D, _projection(mean, unmix), dtype=float, extra=c)
    pol, polar = _polarity(ds, comps)
    funits = D.attrs.get("units", "1")
    out = _drop(ds, ["ica_mean", "ica_components", "ica_loadings", "ica_polarity", "ica_is_polar", "ica_component"])
    out = out.assign(
        ica_mean=annotate(xr.DataArray(mean, dims=("feature",)), funits, "mean neighbourhood"),
        ica_components=annotate(xr.DataArray(comps, dims=("ica_component", "feature")), "1", "ICA mode (unit vector)"),
        ica_loadings=annotate(xr.DataArray(loadings, dims=("atom", "ica_component")), funits, "ICA loading"),
        ica_polarity=annotate(xr.DataArray(pol, dims=("ica_component",)), "1", "|sum of neighbour shifts| / sum of |shifts|"),
        ica_is_polar=annotate(xr.DataArray(polar, dims=("ica_component",)), "1", "polarity above the polar threshold"),
    )
    out = out.assign_coords(ica_component=_coord("ica_component", np.arange(c), "ICA mode number"))
    return record_params(out, "ica", dict(n_components=int(c), seed=seed))
