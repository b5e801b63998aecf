"""Columns the finder missed, found in the residual of the fitted model.

Beside a thick column a one-atom column is a few per cent of its neighbour's peak: below what a
finder that compares columns with their neighbours keeps, but plain in the residual
``image - model`` once every found column is fitted (jointly where they overlap). The residual
is matched-filtered with the column's Gaussian and divided by the filter's standard deviation
under the noise model, a z-score per pixel::

    z(p) = sum_q g(q - p) r(q) / sqrt(sum_q g(q - p)^2 var(q))

Local maxima of ``z`` above a false-alarm threshold (Bonferroni over the searched pixels), at
least half a nearest-neighbour distance from every fitted column and within
:data:`SEARCH_NN` nearest-neighbour distances of one (a missing column has fitted neighbours; the
vacuum beyond a particle is not searched), are candidates; they become columns when their joint
refit is significant and sits on a site of the lattice around them (:func:`significant_new`).
Positions in px.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import norm

from .._threads import n_threads
from .joint_model import column_patches, patch_half
from .noise import Noise

__all__ = [
    "missing_columns", "no_columns", "on_lattice_sites", "refine_and_complete", "significant_new", "model_image", "FALSE_ALARMS", "SEARCH_NN",
    "MIN_SEPARATION_NN", "MIN_INTENSITY_Z",
]

#: Expected number of noise peaks accepted per image (the Bonferroni budget of the threshold).
FALSE_ALARMS = 0.05
#: Pixels farther than this many nearest-neighbour distances from every fitted column are not searched.
SEARCH_NN = 1.5
#: A new column lies at least this many nearest-neighbour distances from every fitted column.
MIN_SEPARATION_NN = 0.5
#: The matched filter reaches this many widths.
FILTER_REACH = 3.0


def model_image(shape: tuple[int, int], fit: dict[str, np.ndarray], ok: np.ndarray) -> np.ndarray:
    """The fitted columns (``x``, ``y``, ``intensity``, ``sigma`` of ``fit`` where ``ok``) rendered on an image."""
    p = np.column_stack([fit["x"], fit["y"], fit["intensity"], fit["sigma"]])[ok]
    out = np.zeros(shape[0] * shape[1])
    if p.shape[0] == 0:
        return out.reshape(shape)
    flat, val, _ = column_patches(p, patch_half(float(np.max(p[:, 3]))), shape, derivatives=False)
    keep = flat >= 0
    out += np.bincount(flat[keep], weights=val[keep], minlength=out.size)
    return out.reshape(shape)


def _background_map(d: np.ndarray, i: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Inverse-distance mean of the nearest columns' backgrounds ``bg``, given each pixel's distances ``d``
    and indices ``i`` (k, px) of its nearest columns (:data:`BACKGROUND_COLUMNS`)."""
    w = 1.0 / np.maximum(d, 0.5)
    return (w * bg[i]).sum(axis=1) / w.sum(axis=1)


#: The background under a pixel is the inverse-distance mean of this many nearest columns' backgrounds.
BACKGROUND_COLUMNS = 4


def missing_columns(
    image: np.ndarray, fit: dict[str, np.ndarray], *, noise: Noise, sigma: float, false_alarms: float = FALSE_ALARMS,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Positions (px) of columns missing from ``fit``, found in the residual of its model.

    Parameters
    ----------
    image : 2-D array
        The image the fit was made on (bright columns).
    fit : dict
        The result of :func:`atomds.core.refine.refine_gaussian` (isotropic model): ``x``, ``y``,
        ``intensity``, ``sigma``, ``background``, ``fit_ok``.
    noise : Noise
        Noise model of the image (:func:`atomds.core.refine.noise.parse_noise`).
    sigma : float
        Column width of the matched filter, px.
    false_alarms : float
        Expected number of noise peaks accepted in the searched area.
    exclude : array (k, 2), optional
        Positions (x, y; px) of candidates rejected before: nothing within
        :data:`MIN_SEPARATION_NN` nearest-neighbour distances of them is returned again.

    Returns
    -------
    x, y : ndarray
        The new columns, px (may be empty).
    info : dict
        ``z_threshold``, ``searched_pixels``, ``n_new``.
    """
    img = np.asarray(image, dtype=float)
    ok = np.asarray(fit["fit_ok"], bool) & np.isfinite(fit["intensity"]) & np.isfinite(fit["sigma"])
    x, y = np.asarray(fit["x"], float), np.asarray(fit["y"], float)
    empty = np.zeros(0)
    if ok.sum() < 2:
        return empty, empty, {"z_threshold": float("nan"), "searched_pixels": 0, "n_new": 0}
    tree = cKDTree(np.column_stack([x[ok], y[ok]]))
    nn = tree.query(np.column_stack([x[ok], y[ok]]), k=2)[0][:, 1]
    nn_med = float(np.median(nn))
    ny, nx = img.shape
    rows, cols = np.mgrid[0:ny, 0:nx]
    # each pixel's nearest columns, once: the nearest decides the searched area, all set the background
    k = min(BACKGROUND_COLUMNS, int(ok.sum()))
    d, near = tree.query(np.column_stack([cols.ravel(), rows.ravel()]), k=k, workers=n_threads())
    d, near = d.reshape(-1, k), near.reshape(-1, k)
    area = (d[:, 0] < SEARCH_NN * nn_med).reshape(img.shape) & np.isfinite(img)
    bg_vals = np.where(np.isfinite(fit["background"]), fit["background"], np.nanmedian(fit["background"][ok]))
    bg = np.zeros(img.shape)
    inside = area.ravel()
    bg[area] = _background_map(d[inside], near[inside], bg_vals[ok])
    mu = model_image(img.shape, fit, ok) + bg
    resid = np.where(area, img - mu, 0.0)
    var = np.where(area, noise.variance(mu), 0.0)
    h = int(math.ceil(FILTER_REACH * sigma))
    t = np.arange(-h, h + 1, dtype=float)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    num = ndimage.correlate1d(ndimage.correlate1d(resid, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    den = ndimage.correlate1d(ndimage.correlate1d(var, g * g, axis=0, mode="constant"), g * g, axis=1, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(area & (den > 0), num / np.sqrt(den), 0.0)
    n_pix = int(area.sum())
    z_min = float(norm.isf(false_alarms / max(n_pix, 1)))
    peak = (z == ndimage.maximum_filter(z, size=2 * max(int(round(sigma)), 1) + 1)) & (z > z_min)
    py, px = np.nonzero(peak)
    far = tree.query(np.column_stack([px, py]))[0] >= MIN_SEPARATION_NN * nn_med if px.size else np.zeros(0, bool)
    if exclude is not None and len(exclude) and px.size:
        far &= cKDTree(np.asarray(exclude, float)).query(np.column_stack([px, py]))[0] >= MIN_SEPARATION_NN * nn_med
    px, py, zz = px[far], py[far], z[py[far], px[far]]
    # strongest first; a candidate closer than the separation to a stronger one is the same column
    order = np.argsort(-zz)
    keep: list[int] = []
    for i in order:  # loop over the few candidates, not over atoms
        if all(math.hypot(px[i] - px[j], py[i] - py[j]) >= MIN_SEPARATION_NN * nn_med for j in keep):
            keep.append(int(i))
    kx, ky = px[keep].astype(float), py[keep].astype(float)
    return kx, ky, {"z_threshold": z_min, "searched_pixels": n_pix, "n_new": int(kx.size)}


#: Rounds of search and refit at most (a column found in one round changes its neighbours' fits).
MAX_ROUNDS = 3
#: An added column stays only if its fitted intensity exceeds this many of its standard errors: a
#: real column beside a thick one is tens of errors strong, a misfit of the thick column's
#: shoulder or of the background is not.
MIN_INTENSITY_Z = 5.0


def significant_new(fit: dict[str, np.ndarray], n_old: int, *, min_z: float = MIN_INTENSITY_Z,
                    shape: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """Which of the atoms ``n_old:`` of ``fit`` (columns added from the residual) are real columns, and how
    many the lattice test alone rejected.

    Real: the fit converged, its intensity exceeds ``min_z`` of its standard error, its refined
    centre lies at least :data:`MIN_SEPARATION_NN` median nearest-neighbour distances from every
    other fitted column (a second Gaussian on one column's shoulder is no column) and, with the
    image's ``shape``, on a site of the lattice (:func:`on_lattice_sites`: a blob of amorphous
    contamination or support is as significant as a thin column, but sits anywhere).
    """
    x, y = np.asarray(fit["x"], float), np.asarray(fit["y"], float)
    ok = np.asarray(fit["fit_ok"], bool) & np.isfinite(x) & np.isfinite(y)
    new = np.arange(n_old, x.size)
    if new.size == 0:
        return np.zeros(0, bool), 0
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.asarray(fit["intensity"], float)[new] / np.asarray(fit["intensity_err"], float)[new]
    good = ok[new] & np.isfinite(z) & (z > min_z)
    idx = np.flatnonzero(ok)
    if idx.size < 2:
        return good, 0
    tree = cKDTree(np.column_stack([x[idx], y[idx]]))
    nn_med = float(np.median(tree.query(tree.data, k=2)[0][:, 1]))
    d, j = tree.query(np.column_stack([np.nan_to_num(x[new]), np.nan_to_num(y[new])]), k=2)
    other = np.where(idx[j[:, 0]] == new, d[:, 1], d[:, 0])  # nearest column other than itself
    good &= other >= MIN_SEPARATION_NN * nn_med
    if shape is None or not good.any():
        return good, 0
    on = on_lattice_sites(fit, n_old, new[good], nn_med, shape)
    good[good] = on
    return good, int(np.count_nonzero(~on))


def on_lattice_sites(fit: dict[str, np.ndarray], n_old: int, rows: np.ndarray, spacing: float,
                     shape: tuple[int, int], *, rows_support: bool = True, no_lattice: bool = True) -> np.ndarray:
    """Whether the added columns ``rows`` of ``fit`` sit on sites of the lattice of the fitted columns around them.

    A site: columns lie at ``p + T`` for at least ``SITE_MATCHES`` of the local lattice's
    translations ``T`` (:func:`atomds.core.find.residual.translation_sites`), within ``SITE_TOL``
    spacings or ``SITE_POSITION_SD`` of the column's position error (at most ``SITE_TOL_MAX``
    spacings). The translations are those of the given columns (the first ``n_old``) within
    :data:`LOCAL_LATTICE_NN` spacings of the column (cells of :data:`LOCAL_CELL_NN` spacings share
    them), so that each grain of a polycrystal, or each particle, has its own; the anchors are the
    given columns and the added ones in ``rows`` (a whole sublattice the finder missed supports
    itself). A thin column beside thick ones sits on a site of their lattice; a blob of amorphous
    contamination on top of a crystal sits anywhere, and passes only where it falls within the
    tolerance of a site (about a tenth of random points on a honeycomb). Where the columns around
    show no lattice (fewer than ``MIN_LATTICE_ANCHORS``, or no offset shared by most of them: a
    grain boundary, an amorphous region), the column passes (``no_lattice``: the answer there).
    With ``rows_support`` False the columns in ``rows`` are judged by the given ones alone (seeds in
    doubt at every equivalent place, a honeycomb's hexagon centres, would vouch for each other).
    """
    from ..find.constants import SITE_POSITION_SD, SITE_TOL, SITE_TOL_MAX
    from ..find.residual import lattice_translations, translation_supported

    x, y = np.asarray(fit["x"], float), np.asarray(fit["y"], float)
    rows = np.asarray(rows, dtype=np.int64)
    out = np.full(rows.size, bool(no_lattice))
    ok = np.asarray(fit["fit_ok"], bool) & np.isfinite(x) & np.isfinite(y)
    old = np.flatnonzero(ok[:n_old])
    if rows.size == 0 or old.size == 0 or not spacing > 0:
        return out
    err = np.hypot(np.asarray(fit.get("x_err", np.zeros(x.size)), float)[rows],
                   np.asarray(fit.get("y_err", np.zeros(x.size)), float)[rows]) / math.sqrt(2.0)
    tol = np.clip(SITE_POSITION_SD * np.nan_to_num(err, nan=0.0) / spacing, SITE_TOL, SITE_TOL_MAX)
    anchors = np.r_[old, rows[ok[rows]]] if rows_support else old
    ax, ay = x[anchors], y[anchors]
    old_tree = cKDTree(np.column_stack([x[old], y[old]]))
    cell = LOCAL_CELL_NN * spacing
    key = np.floor(np.column_stack([np.nan_to_num(x[rows]), np.nan_to_num(y[rows])]) / cell).astype(np.int64)
    for k in np.unique(key, axis=0):  # a loop over cells holding candidates, not over atoms
        here = np.flatnonzero((key == k).all(axis=1))
        centre = (k + 0.5) * cell
        near = old[old_tree.query_ball_point(centre, LOCAL_LATTICE_NN * spacing + 0.71 * cell)]
        t = lattice_translations(x[near], y[near], spacing)
        if t.shape[0] == 0:
            continue
        out[here] = translation_supported(ax, ay, x[rows[here]], y[rows[here]], spacing, tol=tol[here],
                                          translations=t, shape=shape)
    return out


#: The lattice an added column must sit on is that of the given columns within this many spacings of it
#: (a grain of a polycrystal, a particle, has its own translations)...
LOCAL_LATTICE_NN = 6.0
#: ... taken once for the candidates in each cell of this many spacings
LOCAL_CELL_NN = 3.0


#: Within ``RESIDUAL_REACH`` column widths of the image's border (the reach of the tails of the
#: columns centred outside it, as they are modelled) a seed on a site of the lattice around it is on
#: no column only below this many standard errors (:func:`no_columns`): there a column has fewer pixels,
#: shares its group with half-columns along the edge and sits on the model of the columns outside,
#: and its intensity is known less well. On a perovskite [001]
#: with O columns at 0.2 of A's counts (12 px cell, width 1.8 px, 4,000 counts) the O columns
#: within 3.6 px of the border had a median z of 6.1-6.2 (13.3-13.4 inside) and 5-8 of 38-40 fell
#: below 5, the seeds on no column there below 1.5 (two images).
BORDER_INTENSITY_Z = 3.0


def no_columns(fit: dict[str, np.ndarray], n: int, *, min_z: float = MIN_INTENSITY_Z,
               shape: tuple[int, int] | None = None, sigma: float | None = None) -> np.ndarray:
    """Which of the first ``n`` atoms of ``fit`` are seeds on no column: fitted jointly with their overlapping
    neighbours, their intensity is below ``min_z`` of its standard error. Where ``shape`` (the
    image's) and ``sigma`` (the column width, px) are given, a seed within ``RESIDUAL_REACH``
    widths of the border is kept from ``BORDER_INTENSITY_Z`` standard errors where it sits on a site
    of the lattice of the seeds not in doubt around it (:func:`on_lattice_sites`, by them alone;
    none where they show no lattice): at 3-5 standard errors a seed between columns there was kept
    too (a honeycomb's border, B at 0.35 of A: a speck of a tenth of the median peak, 4.4 px from
    any column, at 3.7).

    Where tails overlap, the sum of a few neighbours' tails can look like a column to a finder
    (a template with its surroundings matches between them); the joint fit gives that light back
    to the columns, and the seed keeps an intensity indistinguishable from zero. Only joint fits
    are judged (a single-column fit with its neighbours subtracted can leave a real column faint).
    """
    from ..find.constants import RESIDUAL_REACH
    from ..find.residual import within_of_border
    from .grid import nearest_neighbor_distance

    inten = np.asarray(fit["intensity"], float)[:n]
    err = np.asarray(fit["intensity_err"], float)[:n]
    joint = np.asarray(fit.get("joint", np.zeros(inten.size, bool)), bool)[:n]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = inten / err
    judged = joint & np.asarray(fit["fit_ok"], bool)[:n] & np.isfinite(z)
    dead = judged & (z < min_z)
    if shape is not None and sigma is not None and np.isfinite(sigma) and sigma > 0:
        x, y = np.asarray(fit["x"], float)[:n], np.asarray(fit["y"], float)[:n]
        doubt = np.flatnonzero(dead & (z >= BORDER_INTENSITY_Z)
                               & within_of_border(x, y, shape, RESIDUAL_REACH * float(sigma)))
        live = np.flatnonzero(~dead)
        if doubt.size and live.size >= 2:
            # the lattice is that of the seeds not in doubt: the seeds on no column at every equivalent
            # place (a honeycomb's hexagon centres, a dumbbell's midpoints) would vouch for each other
            # along the border; and no lattice around, no seed kept (specks beside an amorphous patch)
            keys = ("x", "y", "fit_ok", "x_err", "y_err")
            sub = {k: np.r_[np.asarray(fit[k])[:n][live], np.asarray(fit[k])[:n][doubt]] for k in keys if k in fit}
            nn = nearest_neighbor_distance(x[live], y[live])
            nn = nn[np.isfinite(nn)]
            if nn.size:
                on = on_lattice_sites(sub, live.size, np.arange(live.size, live.size + doubt.size),
                                      float(np.median(nn)), shape, rows_support=False, no_lattice=False)
                dead[doubt[on]] = False
    return dead


def refine_and_complete(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, *, settings: dict, max_rounds: int = MAX_ROUNDS,
    min_z: float = MIN_INTENSITY_Z, **kw,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict]:
    """Refine, drop seeds on no column, look for missing columns in the residual, add the real ones and refine again.

    The first round drops the given atoms that the first fit leaves without a significant
    intensity (:func:`no_columns`; later rounds drop none); each round searches the residual (:func:`missing_columns`),
    refits with the candidates and keeps those that :func:`significant_new` accepts (refitting
    once more without the others, which are not searched again); up to ``max_rounds`` rounds,
    until a round neither drops nor finds anything. The rounds refit only the neighbourhood of
    each change (:func:`refit_near`); where anything changed, the final columns are fitted once
    more as a whole.

    Parameters
    ----------
    image : 2-D array
        Bright-column image (turned over and despiked as :func:`atomds.core.refine.refine_gaussian`
        expects, with ``despike=False`` in ``kw`` when it is).
    x, y : arrays (n,)
        Starting positions, px.
    settings : dict
        :func:`atomds.core.refine.estimate_fit_settings` of the image (width and noise model).
    max_rounds : int
        Searches at most.
    min_z : float
        Least intensity of an added column, and of a given atom fitted jointly, in its standard errors.
    **kw
        Passed to :func:`atomds.core.refine.refine_gaussian` (isotropic model).

    Returns
    -------
    fit : dict
        The refinement of the ``n + n_new`` atoms (the given ones first), with ``no_column``
        (bool): the given atoms dropped as seeds on no column (their other values NaN,
        ``fit_ok`` False; the caller removes them).
    new_x, new_y : ndarray (n_new,)
        The starting positions of the added columns, px.
    info : dict
        ``rounds`` (searches run), ``n_new``, ``n_rejected`` (candidates refitted and dropped;
        ``n_off_lattice`` of them significant but off the sites of the lattice around them),
        ``n_no_column`` (given atoms dropped), ``z_threshold`` (of the residual search),
        ``min_intensity_z``.
    """
    from ..image import intensity_scale
    from .api import refine_gaussian
    from .noise import Noise, fit_times, noise_times, parse_noise, pixel_variance, settings_times

    k = intensity_scale(image)
    if k != 1.0:
        # far from order one: on image / k, results times k (see refine_gaussian); a noise model
        # in kw is in the image's units too
        if kw.get("noise") is not None:
            kw = {**kw, "noise": noise_times(parse_noise(kw["noise"]), 1.0 / k)}
        fit_k, new_x, new_y, info_k = refine_and_complete(np.asarray(image) / k, x, y,
                                                          settings=settings_times(settings, 1.0 / k),
                                                          max_rounds=max_rounds, min_z=min_z, **kw)
        return fit_times(fit_k, k), new_x, new_y, info_k
    nz = parse_noise(settings if settings.get("gain") is not None else "uniform")
    if nz is None:  # pragma: no cover - a dict always parses
        raise ValueError("settings hold no noise model")
    if nz.uniform:  # the search's z-scores need the pixels' variance in the image's units
        v = pixel_variance(image)
        nz = Noise(None, v, v)
    x0, y0 = np.asarray(x, float), np.asarray(y, float)
    n0 = x0.size
    alive = np.ones(n0, bool)  # given atoms still held as columns
    xs, ys = x0.copy(), y0.copy()  # the atoms fitted: the alive given ones, then the added ones
    fit = refine_gaussian(image, xs, ys, settings=settings, **kw)
    rejected = np.zeros((0, 2))
    info: dict = {"rounds": 0, "n_new": 0, "n_rejected": 0, "n_no_column": 0, "z_threshold": float("nan"),
                  "min_intensity_z": float(min_z), "n_off_lattice": 0}

    def refit(px, py, prev, changed):
        return refit_near(image, px, py, prev, changed, settings=settings, **kw)

    for rnd in range(int(max_rounds)):
        n_alive = int(alive.sum())
        dead = (no_columns(fit, n_alive, min_z=min_z, shape=np.shape(image), sigma=float(settings["sigma"]))
                if info["rounds"] == 0 else np.zeros(n_alive, bool))
        gone = np.column_stack([xs[:n_alive][dead], ys[:n_alive][dead]])
        if dead.any():
            idx = np.flatnonzero(alive)
            alive[idx[dead]] = False
            rejected = np.vstack([rejected, gone])
            live = np.r_[~dead, np.ones(xs.size - n_alive, bool)]
            xs, ys = xs[live], ys[live]
            fit = {k: np.asarray(v)[live] for k, v in fit.items()}
        cx, cy, found = missing_columns(image, fit, noise=nz, sigma=float(settings["sigma"]), exclude=rejected)
        info["rounds"] += 1
        info["z_threshold"] = found["z_threshold"]
        if cx.size == 0:  # (the final fit below covers a drop)
            break
        trial = refit(np.r_[xs, cx], np.r_[ys, cy], fit, np.vstack([gone, np.column_stack([cx, cy])]))
        keep, n_off = significant_new(trial, xs.size, min_z=min_z, shape=np.shape(image))
        info["n_off_lattice"] += n_off
        rejected = np.vstack([rejected, np.column_stack([cx[~keep], cy[~keep]])])
        if not keep.any():
            break
        rows = np.r_[np.arange(xs.size), xs.size + np.flatnonzero(keep)]
        xs, ys = np.r_[xs, cx[keep]], np.r_[ys, cy[keep]]
        kept = {k: np.asarray(v)[rows] for k, v in trial.items()}
        last = rnd == int(max_rounds) - 1  # (then the final fit below replaces any refit)
        fit = kept if keep.all() or last else refit(xs, ys, kept, np.column_stack([cx[~keep], cy[~keep]]))
    n_alive = int(alive.sum())
    if xs.size != n0 or not alive.all():
        # the rounds refitted each change's neighbourhood; the final columns are fitted as a whole
        # (the others were fitted beside the missing columns and without the dropped ones, which
        # moved the shared width of their group)
        fit = refine_gaussian(image, xs, ys, settings=settings, **kw)
    info["n_new"] = int(xs.size - n_alive)
    info["n_rejected"] = int(rejected.shape[0]) - int(n0 - n_alive)
    info["n_no_column"] = int(n0 - n_alive)
    return _with_dropped(fit, alive), xs[n_alive:], ys[n_alive:], info


#: After columns are added or dropped, the atoms within this many median nearest-neighbour
#: distances of them are fitted again (their neighbours' light moved); the others keep their fits.
REFIT_NN = 2.0
#: ... unless they are more than this share of the atoms: then all are fitted again.
REFIT_ALL_SHARE = 0.5


def refit_near(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, prev: dict[str, np.ndarray], changed: np.ndarray, *,
    settings: dict, **kw,
) -> dict[str, np.ndarray]:
    """The fit of the atoms ``x``, ``y`` (px) after columns were added or dropped at ``changed`` (k, 2; px).

    ``prev`` holds a fit of the first ``len(prev["x"])`` atoms, made before the change; the atoms
    within :data:`REFIT_NN` median nearest-neighbour distances of a change (and every atom beyond
    ``prev``) are fitted again (:func:`atomds.core.refine.refine_gaussian` on that ``subset``, their
    neighbours as far as needed), the others keep ``prev``: enough to judge the new columns, where a
    fit of every atom for each round of the search repeated the whole image's joint fit (4 of them
    on a 512 px lattice 3.9 widths apart; :func:`refine_and_complete` fits the final columns once as
    a whole). More than :data:`REFIT_ALL_SHARE` of the atoms: all are fitted again.
    """
    from .api import refine_gaussian
    from .grid import nearest_neighbor_distance

    x, y = np.asarray(x, float), np.asarray(y, float)
    n_prev = int(np.size(prev["x"]))
    changed = np.asarray(changed, float).reshape(-1, 2)
    if changed.shape[0] == 0 and n_prev == x.size:
        return prev
    nn = nearest_neighbor_distance(x, y)
    nn_med = float(np.median(nn[np.isfinite(nn)])) if np.isfinite(nn).any() else 0.0
    near = np.zeros(x.size, bool)
    near[n_prev:] = True
    if changed.shape[0] and nn_med > 0:
        d = cKDTree(changed).query(np.column_stack([x, y]), distance_upper_bound=REFIT_NN * nn_med)[0]
        near |= np.isfinite(d)
    if near.mean() > REFIT_ALL_SHARE:
        return refine_gaussian(image, x, y, settings=settings, **kw)
    part = refine_gaussian(image, x, y, settings=settings, subset=np.flatnonzero(near), **kw)
    out: dict[str, np.ndarray] = {}
    for k, v in part.items():
        old = np.asarray(prev[k])
        full = np.zeros((x.size,) + old.shape[1:], dtype=np.result_type(old.dtype, np.asarray(v).dtype))
        full[:n_prev] = old
        full[near] = v
        out[k] = full
    return out


def _with_dropped(fit: dict[str, np.ndarray], alive: np.ndarray) -> dict[str, np.ndarray]:
    """The fit of the alive given atoms and the added ones, spread over all given atoms then the added ones;
    ``no_column`` marks the dropped ones (NaN, ``fit_ok`` False, no iterations)."""
    n0, n_alive = alive.size, int(alive.sum())
    n_new = int(np.size(fit["x"])) - n_alive
    rows = np.r_[np.flatnonzero(alive), n0 + np.arange(n_new)]
    out: dict[str, np.ndarray] = {}
    for k, v in fit.items():
        v = np.asarray(v)
        if v.dtype == bool:
            full = np.zeros(n0 + n_new, bool)
        elif np.issubdtype(v.dtype, np.integer):
            full = np.zeros(n0 + n_new, v.dtype)
        else:
            full = np.full(n0 + n_new, np.nan)
        full[rows] = v
        out[k] = full
    out["no_column"] = np.r_[~alive, np.zeros(n_new, bool)]
    return out
