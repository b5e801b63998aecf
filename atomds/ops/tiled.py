"""Finding and refinement of a large Dask-backed image tile by tile, in bounded memory.

An image opened with ``chunks`` (``open_image(path, chunks={"y": 4096, "x": 4096})``) larger
than one tile (:data:`atomds.core.tiles.MIN_TILE`) is never held or correlated as a whole:

- :func:`find_tiled`: the contrast and the scales (column width, nearest-column distance) are
  decided once, on a central probe of the image, and given to every tile; each tile (chunks
  merged to at least ``MIN_TILE`` px and split to at most ``MAX_TILE``, with a halo of
  ``HALO_SPACINGS`` spacings) is computed,
  searched by :func:`atomds.core.find.api.find_atoms` and released; it keeps the columns of its
  core (:func:`atomds.core.tiles.merge_tile_atoms`). Atoms come out grouped by tile. The
  sublattice labels of the tiles are kept when every tile found the same number of classes, else
  every column is classed again over the whole image. The correlation map is a lazy Dask array
  (the probe's template(s), computed chunk by chunk with an overlap of half a template) that
  computes only when asked.
- :func:`refine_tiled`: one lazy task per tile fits the atoms it owns on the tile's pixels with
  the halo (their neighbours in the halo fitted as far as needed), with the fit settings
  (width, noise model, window) estimated once on the central tile. Where ``find_atoms`` took a
  local background off (thickness contrast), each tile's fits run on its pixels less the
  background beyond its columns, as the eager refinement's do, and that background is added
  back to each column's ``background``.

Per-tile thresholds: each tile sets its own significance threshold as a separate image of its
size would (noise budget per tile), so the whole image is searched as its tiles would be one
by one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.find.api import FoundAtoms
from ..core.find.api import find_atoms as core_find_atoms
from ..core.find.blobs import local_reference
from ..core.find.classes import classify_columns
from ..core.find.correlation import correlation_map as core_correlation_map
from ..core.find.templates import is_point, template_from_point
from ..core.image import turn_over
from ..core.refine.background import sample_at
from ..core.scanlines import lines_record
from ..core.tiles import Tile, halo_px, merge_tile_atoms, owner, tile_grid
from ..errors import NoAtomsFoundError

__all__ = ["is_tiled", "find_tiled", "refine_tiled", "PROBE_SIZE"]

#: Side of the central probe on which the contrast and the scales are decided, px.
PROBE_SIZE = 2048

#: Probes tried, from the centre outwards, before the image is said to hold no columns.
MAX_PROBES = 9


def is_tiled(array, min_size: int | None = None) -> bool:
    """Whether a (Dask) image is processed tile by tile: Dask-backed and more than one tile."""
    chunks = getattr(array, "chunks", None)
    if chunks is None or not hasattr(array, "__dask_graph__") or array.ndim != 2:
        return False
    return len(tile_grid(array.shape, chunks, 0, min_size)) > 1


def _region(array, rows: slice, cols: slice) -> np.ndarray:
    """One region of a Dask image as float64 NumPy (computed now)."""
    return np.asarray(array[rows, cols].compute(), dtype=np.float64)


def _probe_windows(shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Candidate probes, ``PROBE_SIZE`` px square: the image's centre first, then centred on points
    of a coarse grid (a probe apart) in order of distance from the centre."""
    ny, nx = shape
    hy, hx = min(PROBE_SIZE, ny), min(PROBE_SIZE, nx)
    cy, cx = np.arange(hy / 2, ny, hy), np.arange(hx / 2, nx, hx)
    gy, gx = (g.ravel() for g in np.meshgrid(cy, cx, indexing="ij"))
    order = np.argsort(np.hypot(gy - ny / 2, gx - nx / 2), kind="stable")
    out = []
    for y, x in [(ny / 2, nx / 2), *zip(gy[order], gx[order], strict=True)]:
        y0 = int(np.clip(round(y - hy / 2), 0, ny - hy))
        x0 = int(np.clip(round(x - hx / 2), 0, nx - hx))
        win = (slice(y0, y0 + hy), slice(x0, x0 + hx))
        if win not in out:
            out.append(win)
    return out


def _point_templates(array, template, contrast: str, sigma: float, spacing: float):
    """Template specs for the tiles: an ``(x, y)`` point of the whole image becomes the array around it."""
    specs = template if isinstance(template, list) else [template]
    out = []
    for sp in specs:
        if sp is not None and is_point(sp):
            x, y = sp
            r = int(np.ceil(6 * spacing + 8 * sigma))
            ny, nx = array.shape
            y0, x0 = max(0, int(y) - r), max(0, int(x) - r)
            crop = turn_over(_region(array, slice(y0, min(ny, int(y) + r + 1)), slice(x0, min(nx, int(x) + r + 1))),
                             contrast)
            sp = template_from_point(crop, x - x0, y - y0, sigma=sigma, spacing=spacing)
        out.append(sp)
    return out if isinstance(template, list) else out[0]


_NONE_FOUND = FoundAtoms(x=np.zeros(0), y=np.zeros(0), score=np.zeros(0), area=np.zeros(0),
                         sublattice=np.zeros(0, np.int64), zscore=np.zeros(0), amplitude=np.zeros(0),
                         correlation=np.zeros((0, 0), np.float32))


def _blank(img: np.ndarray) -> bool:
    """A constant region (a blanked or padded part of the image) holds no columns."""
    finite = img[np.isfinite(img)]
    return bool(finite.size) and float(finite.min()) == float(finite.max())


def _probe(array, kw: dict[str, Any]) -> tuple[FoundAtoms, tuple[slice, slice], int]:
    """The probe's find: the contrast, scales and templates every tile shares; its window; probes tried.

    The centre of the image first; where it holds no columns (vacuum, a support), the next
    window outwards, up to :data:`MAX_PROBES`.
    """
    tmpl = kw["template"]
    specs = tmpl if isinstance(tmpl, list) else [tmpl]
    # a point names a column of the whole image: the probe builds its own template instead
    probe_t = [None if (sp is not None and is_point(sp)) else sp for sp in specs]
    probe_kw = dict(kw, template=probe_t if isinstance(tmpl, list) else probe_t[0])
    windows = _probe_windows(array.shape)[:MAX_PROBES]
    errors = []
    for k, win in enumerate(windows):
        where = f"[{win[0].start}:{win[0].stop}, {win[1].start}:{win[1].stop}]"
        img = _region(array, *win)
        if _blank(img):
            errors.append(f"{where}: constant")
            continue
        try:
            return core_find_atoms(img, **probe_kw), win, k + 1
        except NoAtomsFoundError as exc:
            errors.append(f"{where}: {exc}")
    raise NoAtomsFoundError(f"no atoms found in any of {len(windows)} probes of the image (each {PROBE_SIZE} px "
                            f"square, from its centre outwards): " + "; ".join(errors[:3]))


def _tile_find(array, tile: Tile, kw: dict[str, Any]) -> FoundAtoms | None:
    """The atoms of one tile's region (positions in the region); None for a blank region, an empty
    result where no column passed the tests."""
    img = _region(array, *tile.region)
    if _blank(img):
        return None
    try:
        return core_find_atoms(img, **kw)
    except NoAtomsFoundError:
        return _NONE_FOUND


def _relative(res: FoundAtoms, spacing: float) -> np.ndarray:
    """Amplitudes relative to the bright columns around each (scale-free across tiles)."""
    ref, glob = local_reference(res.x, res.y, res.amplitude, spacing)
    return res.amplitude / np.maximum(ref, 1e-12 * abs(glob) + 1e-300)


def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def find_tiled(array, *, template=None, threshold=None, min_area=None, max_area=None, sublattices="auto",
               sigma=None, spacing=None, z_min=None, min_contrast=0.25, lattice_check=True,
               contrast="auto", residual=True) -> tuple[FoundAtoms, Any]:
    """Find the columns of a large Dask-backed image tile by tile (see the module's description).

    Parameters are those of :func:`atomds.core.find.api.find_atoms` (px).

    Returns
    -------
    found : FoundAtoms
        Every column, grouped by tile; ``correlation`` is empty (see the second value);
        ``params`` as for one image (the probe's contrast and scales; thresholds as the median
        over the tiles) plus ``params["tiled"]``: the tile edges, halo, atoms per tile, the
        number of tiles without atoms, the per-tile threshold range and how the labels were set.
    correlation : dask.array.Array
        The lazy correlation map of the tiles' templates (the user's, else the probe's automatic
        one), float32, the image's shape.
    """
    kw = dict(template=template, threshold=threshold, min_area=min_area, max_area=max_area, sublattices=sublattices,
              sigma=sigma, spacing=spacing, z_min=z_min, min_contrast=min_contrast, lattice_check=lattice_check,
              contrast=contrast, residual=residual)
    probe, window, tried = _probe(array, kw)
    p = probe.params
    con, s, d = p["contrast"], float(p["sigma"]), float(p["spacing"])
    tile_t = _point_templates(array, template, con, s, d) if template is not None else None
    tile_kw = dict(kw, contrast=con, sigma=s, spacing=d, template=tile_t)
    # the templates the tiles use: the user's (points made arrays), else each tile's own like the probe's
    shown = probe.templates if tile_t is None else [np.asarray(t, float) for t in (tile_t if isinstance(tile_t, list)
                                                                                   else [tile_t])]
    halo = halo_px(d, s, tuple(max(t.shape) for t in shown))
    tiles = tile_grid(array.shape, array.chunks, halo)
    parts: list[tuple[int, FoundAtoms, np.ndarray]] = []
    per_tile: dict[str, list[float]] = {"threshold": [], "z_min": [], "n_sublattices": []}
    rejected: dict[str, int] = {}
    fallbacks: dict[str, str] = {}
    n_residual, spikes, failed, n_line_noise = 0, 0, 0, 0
    bad_rows: set[int] = set()
    bad_cols: set[int] = set()  # the spoiled scan lines each tile found, in the image's pixels
    for t in tiles:
        res = _tile_find(array, t, tile_kw)
        if res is not None and len(res) == 0:
            failed += 1  # searched, no column passed (vacuum, a support)
        if res is None or len(res) == 0:
            continue
        for kind, message in res.params.get("fallbacks", {}).items():
            fallbacks.setdefault(kind, f"{message} (tile {t.index})")
        spikes += int(res.params.get("spikes", 0))
        n_line_noise += int(bool((res.params.get("line_noise") or {}).get("applied")))
        lines = res.params.get("bad_lines") or {}
        bad_rows.update(int(r) + t.hy0 for r in lines.get("rows", ()))
        bad_cols.update(int(c) + t.hx0 for c in lines.get("columns", ()))
        res.x, res.y = res.x + t.hx0, res.y + t.hy0
        res.correlation = np.zeros((0, 0), np.float32)  # the tile's map is not kept (the lazy one is returned)
        parts.append((t.index, res, _relative(res, d)))
        for k in per_tile:
            per_tile[k].append(float(res.params[k]))
        for k, v in res.params.get("rejected", {}).items():
            rejected[k] = rejected.get(k, 0) + int(v)
        n_residual += int(res.params.get("residual", {}).get("n_atoms", 0))
    if not parts:
        raise NoAtomsFoundError(f"no atoms found in any of the {len(tiles)} tiles of the image (the probe found "
                                f"{len(probe)}); check the contrast and the threshold.")
    cat = {f: np.concatenate([getattr(r, f) for _, r, _ in parts])
           for f in ("x", "y", "score", "area", "sublattice", "zscore", "amplitude")}
    rel = np.concatenate([r for _, _, r in parts])
    reported_by = np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r, _ in parts])
    keep, tile_of = merge_tile_atoms(cat["x"], cat["y"], reported_by, tiles, 0.5 * d)
    cat = {k: v[keep] for k, v in cat.items()}
    labels, how = _labels(cat["sublattice"], rel[keep], [int(v) for v in per_tile["n_sublattices"]], sublattices)
    cat["sublattice"] = labels
    params = dict(p)
    params.pop("residual", None)
    params.pop("first_pass", None)
    params["spike_pixels"] = None  # the probe's, in its own pixels: not the image's
    params["line_noise"] = {"note": "decided tile by tile (each tile's rows), not gathered here",
                            "tiles_applied": n_line_noise}
    params.update(
        threshold=float(np.median(per_tile["threshold"])), z_min=float(np.median(per_tile["z_min"])),
        n_sublattices=int(labels.max()) + 1 if labels.size else 0, rejected=rejected, spikes=spikes,
        bad_lines=lines_record(np.isin(np.arange(array.shape[0]), sorted(bad_rows)),
                               np.isin(np.arange(array.shape[1]), sorted(bad_cols))),
        residual={"n_atoms": n_residual, "note": "summed over the tiles' regions, halos included"},
        min_area=min(r.params["min_area"] for _, r, _ in parts), max_area=max(r.params["max_area"] for _, r, _ in parts),
    )
    if template is not None:
        params["templates"] = ["point" if is_point(sp) else "array" for sp in (template if isinstance(template, list)
                                                                              else [template])]
        params["template_shape"] = [list(t.shape) for t in shown]
    if fallbacks:
        params["fallbacks"] = {**fallbacks, **params.get("fallbacks", {})}
    params["tiled"] = {
        "n_tiles": len(tiles), "edges_y": sorted({t.y0 for t in tiles} | {array.shape[0]}),
        "edges_x": sorted({t.x0 for t in tiles} | {array.shape[1]}), "halo": int(halo),
        "atoms_per_tile": np.bincount(tile_of, minlength=len(tiles)).tolist(),
        "empty_tiles": len(tiles) - len(parts), "tiles_without_columns": failed,
        "counts": "rejected, spikes and residual are summed over the tiles' regions, halos included",
        "probe": {"rows": [window[0].start, window[0].stop], "cols": [window[1].start, window[1].stop], "tried": tried},
        "threshold": _summary(per_tile["threshold"]), "z_min": _summary(per_tile["z_min"]), "labels": how,
        "merged": int(reported_by.size - keep.size),
    }
    found = FoundAtoms(x=cat["x"], y=cat["y"], score=cat["score"], area=cat["area"], sublattice=cat["sublattice"],
                       zscore=cat["zscore"], amplitude=cat["amplitude"], correlation=np.zeros((0, 0), np.float32),
                       templates=shown, params=params)
    return found, lazy_correlation(array, shown, con)


def _labels(labels: np.ndarray, rel: np.ndarray, n_per_tile: list[int], sublattices) -> tuple[np.ndarray, str]:
    """Sublattice labels over the whole image: the tiles' own when they agree on the number of classes."""
    if sublattices != "auto" or len(set(n_per_tile)) <= 1:
        return labels.astype(np.int64), "per tile (every tile found the same classes)"
    return classify_columns(np.log(np.maximum(rel, 1e-6))[:, None]).astype(np.int64), (
        f"classed again over the whole image (the tiles found {min(n_per_tile)} to {max(n_per_tile)} classes)")


def _correlation_block(block: np.ndarray, templates: list[np.ndarray], contrast: str) -> np.ndarray:
    img = turn_over(np.asarray(block, dtype=np.float64), contrast)
    out = None
    for t in templates:
        c = core_correlation_map(img, t)
        out = c if out is None else np.maximum(out, c)
    return np.asarray(out, dtype=np.float32)


def lazy_correlation(array, templates: list[np.ndarray], contrast: str):
    """The correlation map of ``templates`` with a Dask image, lazy, chunk by chunk with an overlap of half a template."""
    import dask.array as da

    depth = max(max(t.shape) for t in templates) // 2 + 1  # dask rechunks where a chunk is thinner
    return da.map_overlap(_correlation_block, array, depth=depth, boundary="none", trim=True, dtype=np.float32,
                          templates=templates, contrast=contrast, meta=np.empty((0, 0), np.float32))


# --------------------------------------------------------------------------------------------
# refinement
# --------------------------------------------------------------------------------------------
def refine_tiled(array, x: np.ndarray, y: np.ndarray, spacing: float, prepare_fn, settings_fn, block_fn,
                 n_fields: int, window: float | None = None, background_field: int | None = None):
    """Lazy per-tile refinement of the atoms at ``x``, ``y`` (px) on a Dask image.

    Parameters
    ----------
    array : dask.array.Array
        The image.
    x, y : ndarray
        Seeds, px, in the order of the result.
    spacing : float
        Nearest-column distance, px (sets the halo).
    prepare_fn : callable
        ``prepare_fn(region, x, y) -> (image, background)``: a tile's pixels as the fits read them
        (turned over for dark columns, spikes left out, a local background taken off), the
        refinement's own preparation, given the atoms in the tile's frame (px); ``background``
        is the background taken off (the tile's shape) or None.
    settings_fn : callable
        ``settings_fn(image, x, y) -> settings`` (the fit settings from a sample of atoms).
    block_fn : callable
        ``block_fn(image, x, y, settings, subset) -> (n_subset, n_fields)`` packed results, with
        ``x`` and ``y`` (px, in the frame of ``image``) in the first two columns.
    n_fields : int
        Columns of the packed results.
    window : float, optional
        A fit window given by the user, px: the halo reaches it and two spacings beyond (the
        neighbours subtracted in the window), at least ``HALO_SPACINGS`` spacings.
    background_field : int, optional
        The column of the packed results that holds each column's background: the background
        that ``prepare_fn`` took off is added to it, at the column's fitted position.

    Returns
    -------
    packed : dask.array.Array
        ``(n_atoms, n_fields)``, rows in the order of ``x``, chunked by tile.
    info : dict
        ``n_tiles``, ``halo`` (px) and ``atoms_per_tile``, for the step's parameters.
    """
    import dask
    import dask.array as da

    halo = max(halo_px(spacing, 0.0), 0 if window is None else int(np.ceil(window + 2.0 * spacing)))
    tiles = tile_grid(array.shape, array.chunks, halo)
    own = owner(x, y, tiles)
    order = np.argsort(own, kind="stable")
    counts = np.bincount(own, minlength=len(tiles))
    centre = tiles[int(owner(np.array([array.shape[1] / 2]), np.array([array.shape[0] / 2]), tiles)[0])]
    if counts[centre.index] == 0:
        centre = tiles[int(np.argmax(counts))]
    cx, cy, _ = _local_atoms(x, y, order, counts, centre)
    settings = dask.delayed(_tile_settings, pure=True)(array[centre.region], cx, cy, prepare_fn, settings_fn)
    blocks = []
    for t in tiles:
        if counts[t.index] == 0:
            continue
        lx, ly, n_own = _local_atoms(x, y, order, counts, t)
        task = dask.delayed(_tile_block, pure=True)(array[t.region], lx, ly, n_own, settings, prepare_fn, block_fn,
                                                    t.offset, background_field)
        blocks.append(da.from_delayed(task, shape=(n_own, n_fields), dtype=float))
    packed = da.concatenate(blocks, axis=0) if blocks else da.zeros((0, n_fields), chunks=(1, n_fields))
    info = {"n_tiles": len(tiles), "halo": int(halo), "atoms_per_tile": counts.tolist()}
    if np.array_equal(order, np.arange(order.size)):
        return packed, info
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return packed[inverse], info


def _local_atoms(x, y, order, counts, t: Tile) -> tuple[np.ndarray, np.ndarray, int]:
    """The atoms of tile ``t``'s region in its frame: its own first, then those of the halo."""
    lo = int(counts[: t.index].sum())
    mine = order[lo : lo + int(counts[t.index])]
    inside = (x >= t.hx0 - 0.5) & (x < t.hx1 - 0.5) & (y >= t.hy0 - 0.5) & (y < t.hy1 - 0.5)
    inside[mine] = False
    idx = np.r_[mine, np.flatnonzero(inside)]
    return x[idx] - t.hx0, y[idx] - t.hy0, int(mine.size)


def _tile_settings(region, x, y, prepare_fn, settings_fn):
    return settings_fn(prepare_fn(region, x, y)[0], x, y)


def _tile_block(region, x, y, n_own: int, settings, prepare_fn, block_fn, offset: tuple[int, int],
                background_field: int | None = None) -> np.ndarray:
    """The packed fits of a tile's own atoms; columns 0 and 1 (x, y) moved back to the image's frame, the
    background taken off in preparation added back to column ``background_field``."""
    img, bg = prepare_fn(region, x, y)
    out = np.array(block_fn(img, x, y, settings, slice(0, n_own)), dtype=float)
    if bg is not None and background_field is not None and out.shape[0]:
        out[:, background_field] += sample_at(bg, out[:, 0], out[:, 1])
    out[:, 0] += offset[1]
    out[:, 1] += offset[0]
    return out
