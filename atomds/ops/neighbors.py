"""Neighbourhoods of atoms on a Dataset: neighbour tables, edge flags, descriptors, and 2-D
histograms of neighbour vectors.

The maths is in :mod:`atomds.core.neighbors`; this module converts between the Dataset's
physical units and the core's pixels, names dims and attrs, and keeps the work lazy over chunks
of ``atom`` when the atom positions are Dask-backed (the k-d tree needs every position: it is
built once, inside the graph, from all of them, and each chunk of centre atoms queries it).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..core import neighbors as cn
from ..core.maps import vector_histogram
from ..errors import InvalidParameterError, MissingStepError
from ..params import record_params
from ._common import annotate, is_dask, length_units, pixel_size, require_vars

__all__ = ["neighborhoods", "neighbor_histogram", "DESCRIPTORS", "DERIVED_DIMS", "DERIVED_VARS"]

#: Descriptors :func:`neighborhoods` can build.
DESCRIPTORS = ("xy", "distance", "angle", "phase")

#: Dims of results derived from a neighbourhood table (dropped when neighbourhoods are rebuilt).
DERIVED_DIMS = ("neighbor", "feature", "cluster_id", "component", "ica_component", "merge", "k", "region_id")
#: Per-atom results derived from a neighbourhood table (dropped when neighbourhoods are rebuilt).
DERIVED_VARS = (
    "is_edge",
    "neighbor_count",
    "neighborhood_rotation",
    "cluster",
    "cluster_distance",
    "linkage_leaf",
    "region",
)


def _atom_positions(ds: xr.Dataset, step: str) -> tuple[xr.DataArray, xr.DataArray]:
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    require_vars(
        ds,
        ["atom_x", "atom_y"],
        step=step,
        hint="ds.lcx.find_atoms() (or ds.lcx.with_atoms(x, y) for positions known from elsewhere)",
    )
    ax, ay = ds["atom_x"], ds["atom_y"]
    if ax.dims != ("atom",) or ay.dims != ("atom",):
        raise InvalidParameterError(f"atom_x and atom_y must have dims ('atom',), got {ax.dims} and {ay.dims}")
    return ax, ay


def _image_shape(ds: xr.Dataset):
    if "y" in ds.sizes and "x" in ds.sizes:
        return (int(ds.sizes["y"]), int(ds.sizes["x"]))
    return None


def _clear_derived(ds: xr.Dataset) -> xr.Dataset:
    names = [n for n, v in ds.variables.items() if set(v.dims) & set(DERIVED_DIMS)]
    names += [n for n in DERIVED_VARS if n in ds.variables]
    return ds.drop_vars(sorted({str(n) for n in names}))


def _prepare(x, y, *, ps, k, radius, sort, ref_angle, descriptor, need_auto, surface=True):
    """Global, per-image quantities (the tree and the spacing), computed once from all atoms."""
    xp = np.asarray(x, dtype=float) / ps
    yp = np.asarray(y, dtype=float) / ps
    tree = cn.build_tree(xp, yp)
    n_valid = len(tree[1])
    if n_valid < 2:
        raise InvalidParameterError(f"neighbourhoods need at least 2 atoms with finite positions, got {n_valid}")
    cn.check_k(k, n_valid)
    if descriptor == "phase" and n_valid <= max(cn.PHASE_NEIGHBORS, cn.MATCH_CANDIDATES, cn.MATCH_TARGETS):
        raise InvalidParameterError(
            f"the 'phase' descriptor needs more than {max(cn.PHASE_NEIGHBORS, cn.MATCH_CANDIDATES, cn.MATCH_TARGETS)} "
            f"atoms, got {n_valid}"
        )
    spacing = cn.nearest_spacing(xp, yp)
    ref = ref_angle
    if need_auto:
        _, dx, dy, _, _ = cn.query_neighbors(xp, yp, k=k, radius=None if radius is None else radius / ps, tree=tree)
        ref = cn.auto_reference_angle(dx, dy)
    surf = cn.surface_flags(xp, yp, tree=tree) if surface else np.zeros(xp.size, dtype=bool)
    return {"x": xp, "y": yp, "tree": tree, "spacing": spacing, "ref_angle": float(ref), "surface": surf}


def _block(prep, centers, *, k, radius_px, sort, rotate, descriptor, exclude_edge, shape, margin):
    """Everything per centre atom, packed in one float array (so a chunk is computed once)."""
    xp, yp, tree = prep["x"], prep["y"], prep["tree"]
    idx, dx, dy, dist, count = cn.query_neighbors(xp, yp, k=k, radius=radius_px, centers=centers, tree=tree)
    order, dx, dy, dist, ang, rot = cn.order_neighbors(dx, dy, sort=sort, ref_angle=prep["ref_angle"], rotate=rotate)
    idx = np.take_along_axis(idx, order, 1)
    cx, cy = xp[centers], yp[centers]
    if radius_px is not None:
        reach = np.full(len(idx), radius_px)
    else:
        reach = np.nanmax(np.where(np.isfinite(dist), dist, -np.inf), axis=1) if dist.size else np.zeros(len(idx))
        reach = np.where(count > 0, reach, np.nan)
    if descriptor == "phase":
        D, preach = cn.phase_features(xp, yp, spacing=prep["spacing"], centers=centers, tree=tree)
        reach = np.fmax(reach, preach)
        reach = np.where(np.isfinite(preach), reach, np.nan)
    elif descriptor == "xy":
        D = cn.descriptor_xy(dx, dy)
    elif descriptor == "distance":
        D = cn.descriptor_distance(dist)
    else:
        D = cn.descriptor_angle(ang)
    edge = cn.edge_flags(cx, cy, reach, shape=shape, margin=margin * prep["spacing"]) | prep["surface"][centers]
    if exclude_edge:
        D = np.where(edge[:, None], np.nan, D)
    return np.concatenate(
        [idx.astype(float), dx, dy, dist, ang, count[:, None].astype(float), edge[:, None].astype(float), rot[:, None], D],
        axis=1,
    )


def _check_arguments(ds: xr.Dataset, *, k, radius, sort, descriptor, ref_angle, edge_margin, smooth, smooth_by):
    """Validate :func:`neighborhoods`' arguments; return the per-atom kinds for ``smooth`` (or None)."""
    if sort not in ("distance", "angle"):
        raise InvalidParameterError(f"sort must be 'distance' or 'angle', got {sort!r}")
    if descriptor not in DESCRIPTORS:
        raise InvalidParameterError(f"descriptor must be one of {DESCRIPTORS}, got {descriptor!r}")
    need_auto = isinstance(ref_angle, str)
    if need_auto and ref_angle != "auto":
        raise InvalidParameterError(f"ref_angle must be a number (radians) or 'auto', got {ref_angle!r}")
    if not need_auto and not np.isfinite(float(ref_angle)):
        raise InvalidParameterError(f"ref_angle must be finite, got {ref_angle!r}")
    if radius is not None and not (np.isfinite(float(radius)) and float(radius) > 0):
        raise InvalidParameterError(f"radius must be a positive length, got {radius!r}")
    if k is None and radius is None:
        raise InvalidParameterError("give k (number of neighbours) or a radius")
    if k is not None and (int(k) != k or k < 1):
        raise InvalidParameterError(f"k must be a positive integer, got {k!r}")
    if not edge_margin >= 0:
        raise InvalidParameterError(f"edge_margin must be >= 0, got {edge_margin!r}")
    if int(smooth) != smooth or smooth < 0:
        raise InvalidParameterError(f"smooth must be a non-negative integer, got {smooth!r}")
    kinds = None
    if smooth:
        if smooth_by not in ds.variables:
            raise MissingStepError(
                f"neighborhoods(smooth={smooth}) averages over atoms of the same kind, given by {smooth_by!r}, which "
                "the Dataset does not have: use smooth_by='sublattice' after find_atoms labels sublattices, or "
                "smooth_by='cluster' after a first kmeans()."
            )
        if ds[smooth_by].dims != ("atom",):
            raise InvalidParameterError(f"smooth_by={smooth_by!r} must be a per-atom label (dim 'atom'), got {ds[smooth_by].dims}")
        kinds = ds[smooth_by].data
    return kinds


def _unpack(packed, k: int, width: int, ps: float, descriptor: str):
    """The columns of the packed per-atom table (see :func:`_block`), lengths in image units."""

    def cols(a, b):
        return packed[:, a:b]

    index = cols(0, k).astype(np.int64)
    dx, dy = cols(k, 2 * k) * ps, cols(2 * k, 3 * k) * ps
    dist, ang = cols(3 * k, 4 * k) * ps, cols(4 * k, 5 * k)
    count = packed[:, 5 * k].astype(np.int64)
    edge = packed[:, 5 * k + 1].astype(bool)
    rot = packed[:, 5 * k + 2]
    D = cols(5 * k + 3, width)
    if descriptor in ("xy", "distance"):
        D = D * ps
    return index, dx, dy, dist, ang, count, edge, rot, D


def neighborhoods(
    ds: xr.Dataset,
    *,
    k: int | None = 6,
    radius: float | None = None,
    sort: str = "distance",
    ref_angle: float | str = 0.0,
    rotate: bool = False,
    exclude_edge: bool = True,
    descriptor: str = "xy",
    edge_margin: float = 0.25,
    smooth: int = 0,
    smooth_by: str = "sublattice",
    surface: bool = True,
) -> xr.Dataset:
    """Neighbourhood of every atom, edge flags and the descriptor that the learning steps use.

    A k-d tree over all atoms (``atom_x``, ``atom_y``) gives each atom's ``k`` nearest
    neighbours, or those within ``radius`` (at most ``k`` of them; missing slots padded with
    index -1 and NaN, the number found in ``neighbor_count``).

    Angles follow the image display orientation: ``y`` points down the screen, so angles grow
    **clockwise** on the displayed image; 0 points right (+x), pi/2 down (+y).

    Parameters
    ----------
    ds : xarray.Dataset
        With ``atom_x``, ``atom_y`` (dim ``atom``), in the Dataset's length units.
    k : int or None
        Number of neighbours (with ``radius``: the most kept per atom; None keeps as many as the
        fullest neighbourhood has, which computes the positions first when they are Dask-backed).
    radius : float, optional
        Keep only neighbours closer than this, in the Dataset's length units.
    sort : {"distance", "angle"}
        "distance": nearest first. "angle": the neighbour whose direction is nearest
        ``ref_angle`` first, then the others clockwise (as displayed), so that the same site of the
        same grain always lists its neighbours in the same order.
    ref_angle : float or "auto"
        Reference direction in radians (0 = +x, pi/2 = +y, down). "auto" takes the most common
        bond direction of the image, which keeps the first neighbour unambiguous (a reference
        halfway between two bonds lets it flip between them under noise).
    rotate : bool
        Turn each neighbourhood about its centre so that its first neighbour lies on the
        reference direction (the descriptor then ignores grain orientation). ``neighbor_dx``,
        ``neighbor_dy`` and ``neighbor_angle`` hold the turned vectors;
        ``neighborhood_rotation`` the angle turned (radians, clockwise).
    exclude_edge : bool
        Give edge atoms (``is_edge``) NaN descriptor rows, so that they are not clustered nor
        fitted (they remain neighbours of inner atoms).
    descriptor : {"xy", "distance", "angle", "phase"}
        Features of ``descriptor(atom, feature)``:

        - "xy": the neighbour vectors in the chosen order, ``dx0, dy0, dx1, dy1, ...`` (length
          units): the paper's descriptor, for sites and deformation modes (PCA);
        - "distance": neighbour distances ``d0, d1, ...`` in the chosen order (length units);
        - "angle": bond angles ``a0, a1, ...``: the clockwise angle from each neighbour to the
          next (radians; with ``sort="angle"`` the angular gaps, independent of orientation);
        - "phase": dimensionless features that describe the structure around an atom
          independently of which site of the unit cell it sits on, for phases, grains and
          disordered regions (see :func:`atomds.core.neighbors.phase_features`: the 6 nearest
          distances over the typical spacing, the magnitudes of the bond-orientational order
          parameters psi4 and psi6, and a translational disorder score). It ignores ``sort``/``rotate``.

        With a ``radius``, the rows of atoms with fewer than ``k`` neighbours hold NaN in the
        "xy", "distance" and "angle" descriptors (a fixed-length vector needs every slot); such
        atoms are left out of the fits like edge atoms.
    edge_margin : float
        Extra border allowance for edge flags, in units of the typical nearest-neighbour
        distance: an atom is an edge atom when its distance to the image border is below the reach
        of its neighbourhood (its farthest neighbour used, or ``radius``) plus this margin
        (columns within it of the border are easily missed or mislocated by atom finding).
        Without an image (no ``y``/``x`` dims) the bounding box of the atoms is the border.
    smooth : int
        For noisy positions: replace each atom's descriptor by the component-wise median over it
        and its ``smooth`` nearest atoms of the same kind (``smooth_by``), which divides the
        position noise by about ``sqrt(2 (smooth + 1) / pi)`` and keeps domain walls sharp
        (:func:`atomds.core.neighbors.smooth_same_kind`); 4 suits a square sublattice, 6 a
        hexagonal one. 0 (default): no smoothing.
    smooth_by : str
        Per-atom integer label that says which atoms are of the same kind: "sublattice" (from
        ``find_atoms``), or e.g. "cluster" from a k-means on an earlier neighbourhood. Atoms of
        other kinds are never mixed in (their neighbourhoods differ).
    surface : bool
        Atoms on a free surface of the specimen (the rim of a hole, the surface of a particle:
        one side of them is empty, see :func:`atomds.core.neighbors.surface_flags`) are edge
        atoms too. A concave rim is caught less often: about 80 % of the rim atoms of a hole
        twelve spacings across, a quarter of them for a hole six spacings across.

    Returns
    -------
    xarray.Dataset
        A copy of ``ds`` with ``neighbor_index``, ``neighbor_dx``, ``neighbor_dy``,
        ``neighbor_distance``, ``neighbor_angle`` (atom, neighbor), ``neighbor_count``,
        ``is_edge``, ``neighborhood_rotation`` (atom), ``descriptor`` (atom, feature) with a
        ``feature`` coordinate. Results of earlier neighbourhood and learning steps are dropped.
        Lazy (Dask) when ``atom_x`` is Dask-backed.

    Raises
    ------
    MissingStepError
        If the Dataset has no atoms yet.
    InvalidParameterError
        For k >= the number of atoms, a bad radius, sort, descriptor or reference.
    """
    ax, ay = _atom_positions(ds, "neighborhoods()")
    need_auto = isinstance(ref_angle, str)
    kinds = _check_arguments(ds, k=k, radius=radius, sort=sort, descriptor=descriptor, ref_angle=ref_angle,
                             edge_margin=edge_margin, smooth=smooth, smooth_by=smooth_by)
    n_atoms = int(ds.sizes["atom"])
    if k is not None and k >= n_atoms:
        raise InvalidParameterError(
            f"k={k} neighbours were asked for but the Dataset has only {n_atoms} atoms; use k <= {n_atoms - 1}"
        )
    ps = pixel_size(ds)
    units = length_units(ds)
    shape = _image_shape(ds)
    radius_px = None if radius is None else float(radius) / ps
    lazy = is_dask(ax) or is_dask(ay)

    if k is None:  # the neighbour dim must have a known size: count first
        xv = np.asarray(ax.values, float) / ps
        yv = np.asarray(ay.values, float) / ps
        idx = cn.query_neighbors(xv, yv, k=None, radius=radius_px)[0]
        k = idx.shape[1]
    k = int(k)
    kw = dict(
        k=k, radius_px=radius_px, sort=sort, rotate=bool(rotate), descriptor=descriptor,
        exclude_edge=bool(exclude_edge), shape=shape, margin=float(edge_margin),
    )
    n_feat = len(cn.feature_names(descriptor, k))
    width = 5 * k + 3 + n_feat
    pkw = dict(ps=ps, k=k, radius=None if radius is None else float(radius), sort=sort,
               ref_angle=0.0 if need_auto else float(ref_angle), descriptor=descriptor, need_auto=need_auto,
               surface=bool(surface))
    if lazy:
        import dask
        import dask.array as da

        xd = ax.data if is_dask(ax) else da.from_array(np.asarray(ax.values), chunks=-1)
        yd = ay.data if is_dask(ay) else da.from_array(np.asarray(ay.values), chunks=-1)
        yd = yd.rechunk(xd.chunks)
        prep = dask.delayed(_prepare, pure=True)(xd, yd, **pkw)

        def _chunk(xb, prep, block_info=None, **kw):
            lo, hi = block_info[0]["array-location"][0]
            return _block(prep, slice(lo, hi), **kw)

        packed = da.map_blocks(
            _chunk, xd, prep, dtype=float, chunks=(xd.chunks[0], (width,)), new_axis=1, meta=np.empty((0, 0)), **kw
        )
    else:
        prep = _prepare(ax.values, ay.values, **pkw)
        packed = _block(prep, slice(None), **kw)

    index, dx, dy, dist, ang, count, edge, rot, D = _unpack(packed, k, width, ps, descriptor)
    if smooth:
        if lazy:
            import dask
            import dask.array as da

            kd = kinds if hasattr(kinds, "dask") else np.asarray(kinds)

            def _smooth(block, full, kinds_all, prep, block_info=None):
                lo, hi = block_info[0]["array-location"][0]
                return cn.smooth_same_kind(full, prep["x"], prep["y"], kinds_all, int(smooth), centers=slice(lo, hi))

            full = dask.delayed(np.asarray, pure=True)(D)
            kall = dask.delayed(np.asarray, pure=True)(kd)
            D = da.map_blocks(_smooth, D, full, kall, prep, dtype=float, meta=np.empty((0, 0)))
        else:
            D = cn.smooth_same_kind(D, prep["x"], prep["y"], np.asarray(kinds), int(smooth))
    names = cn.feature_names(descriptor, k)
    feat_units = {"xy": units, "distance": units, "angle": "rad", "phase": "1"}[descriptor]

    def av(data, dims, unit, long_name):
        return annotate(xr.DataArray(data, dims=dims), unit, long_name)

    out = _clear_derived(ds)
    new = {
        "neighbor_index": av(index, ("atom", "neighbor"), "1", "index of the neighbour atom (-1: none)"),
        "neighbor_dx": av(dx, ("atom", "neighbor"), units, "neighbour vector, x component"),
        "neighbor_dy": av(dy, ("atom", "neighbor"), units, "neighbour vector, y component (down the image)"),
        "neighbor_distance": av(dist, ("atom", "neighbor"), units, "distance to the neighbour"),
        "neighbor_angle": av(ang, ("atom", "neighbor"), "rad", "direction of the neighbour, clockwise from +x as displayed"),
        "neighbor_count": av(count, ("atom",), "1", "number of neighbours found"),
        "is_edge": av(edge, ("atom",), "1",
                      "neighbourhood reaches past the image border or lies on a free surface (not a centre)"),
        "neighborhood_rotation": av(rot, ("atom",), "rad", "angle the neighbourhood was turned by (clockwise)"),
        "descriptor": av(D, ("atom", "feature"), feat_units, f"neighbourhood descriptor ({descriptor})"),
    }
    out = out.assign(new)
    out = out.assign_coords(
        feature=annotate(xr.DataArray(np.array(names, dtype=str), dims=("feature",)), "1", "descriptor feature name")
    )
    params = dict(
        k=k, radius=radius, sort=sort, ref_angle=ref_angle, rotate=bool(rotate), exclude_edge=bool(exclude_edge),
        descriptor=descriptor, edge_margin=float(edge_margin), surface=bool(surface), feature_units=feat_units,
        smooth=int(smooth), smooth_by=smooth_by if smooth else None,
    )
    if not lazy:
        params["ref_angle_used"] = prep["ref_angle"]
        params["spacing"] = prep["spacing"] * ps
    return record_params(out, "neighborhoods", params)


def neighbor_histogram(
    ds: xr.Dataset,
    *,
    bins: int = 64,
    extent: float | tuple[float, float, float, float] | None = None,
    by: str | None = None,
    include_edge: bool = False,
) -> xr.DataArray:
    """2-D histogram of the neighbour vectors (the paper's Fig. 2e, f), overall or per cluster.

    With k = 50 neighbours it shows the pair-correlation function of the image; with 6, the
    near neighbourhood. Vectors of edge atoms are left out unless ``include_edge``.

    Parameters
    ----------
    ds : xarray.Dataset
        After :func:`neighborhoods`.
    bins : int or (int, int)
        Bins along x and y.
    extent : float or (xmin, xmax, ymin, ymax), optional
        Range in the Dataset's length units; a number r means (-r, r, -r, r); default the
        largest neighbour distance (times 1.05).
    by : None or str
        None: one histogram. "cluster" (or any per-atom integer label variable, e.g. "region",
        "sublattice"): one histogram per label value >= 0.

    Returns
    -------
    xarray.DataArray
        ``neighbor_histogram`` with dims (vy, vx), or (cluster_id, vy, vx) (the label's id dim)
        with ``by``; coords ``vx``, ``vy`` are bin centres in length units; values are counts.
    """
    if "neighbor_dx" not in ds.variables:
        raise MissingStepError("neighbor_histogram() needs the neighbour vectors: call ds.lcx.neighborhoods() first.")
    units = length_units(ds)
    dx = np.asarray(ds["neighbor_dx"].values, float)
    dy = np.asarray(ds["neighbor_dy"].values, float)
    keep = np.ones(dx.shape[0], bool)
    if not include_edge and "is_edge" in ds.variables:
        keep = ~np.asarray(ds["is_edge"].values, bool)
    dx, dy = dx[keep], dy[keep]
    if extent is None:
        d = np.hypot(dx, dy)
        m = float(np.nanmax(d)) if np.isfinite(d).any() else 1.0
        extent = 1.05 * m
    if by is None:
        h, xe, ye = vector_histogram(dx, dy, bins=bins, extent=extent)
        dims: tuple[str, ...] = ("vy", "vx")
        coords = {}
    else:
        if by not in ds.variables:
            hint = "ds.lcx.kmeans(K)" if by == "cluster" else f"the step that makes {by!r}"
            raise MissingStepError(f"neighbor_histogram(by={by!r}) needs {by!r}: call {hint} first.")
        lab = np.asarray(ds[by].values)
        if lab.ndim != 1 or ds[by].dims != ("atom",):
            raise InvalidParameterError(f"{by!r} must be a per-atom label (dim 'atom'), got dims {ds[by].dims}")
        lab = lab[keep].astype(np.int64)
        n_lab = int(lab.max(initial=-1)) + 1
        labs = np.broadcast_to(lab[:, None], dx.shape)
        h, xe, ye = vector_histogram(dx, dy, bins=bins, extent=extent, labels=labs, n_labels=n_lab)
        iddim = "cluster_id" if by == "cluster" else f"{by}_id"
        dims = (iddim, "vy", "vx")
        coords = {iddim: annotate(xr.DataArray(np.arange(n_lab), dims=(iddim,)), "1", f"{by} id")}
    coords["vx"] = annotate(xr.DataArray(0.5 * (xe[:-1] + xe[1:]), dims="vx"), units, "neighbour vector x")
    coords["vy"] = annotate(xr.DataArray(0.5 * (ye[:-1] + ye[1:]), dims="vy"), units, "neighbour vector y (down)")
    out = xr.DataArray(h, dims=dims, coords=coords, name="neighbor_histogram")
    return annotate(out, "1", "count of neighbour vectors")
