"""The fit settings of an image from a sample of atoms: mean column width, spread of widths, noise model, window.

See :func:`atomds.core.refine.estimate_fit_settings` for the method. Lengths in px, intensities in
image units.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ..scales import correlation_suspected, pixel_correlation_hint
from .constants import FINAL_REACH, MIN_SIGMA, NOISE_PASS_TOL, PRIOR_MIN_REL, SIGMA_MAX_FACTOR, SIGMA_MAX_FLOOR
from .correlation import PARAMETERS, error_factors, estimator_rows, residual_correlation
from .joint import EDGE_SIGMAS, inside_band, overlapping, patch_bound, solve_group
from .joint_model import column_patches, patch_half
from .models import Isotropic, get_model
from .noise import UNIFORM, Noise, fit_variance
from .passes import NeighborModels, first_pass, later_pass, physical
from .plan import Plan, auto_refits, info_radius, sample_indices
from .residual import model_image

__all__ = ["estimate_settings", "width_population", "overlap_width", "overlap_explained", "overlap_judging_width",
           "settings_dict", "noise_correlation", "pixel_like"]


def estimate_settings(
    img: np.ndarray, plan: Plan, sigma: float | None, nz: Noise | None, max_atoms: int, max_noise_atoms: int,
    max_iter: int, model: str = "gaussian", correlation: bool = True,
) -> dict[str, Any]:
    """Estimate the fit settings (:func:`settings_dict`) on ``img`` (float32) and set ``plan``'s width and window.

    With ``correlation``, also how the noise's correlation between pixels widens the errors
    (``"noise_correlation"``, :func:`noise_correlation`, read where the pixel hint suspects it).

    A given ``sigma`` (px) or noise model ``nz`` is kept; the noise model is estimated from the
    residuals of ``model`` (:func:`.noise.fit_variance`), the window from the information in a
    bright column (:func:`.plan.info_radius`).
    """
    sample = sample_indices(plan.x.size, max_atoms)
    joint_rejected: float | None = None
    p1, ok1, _, err1 = first_pass(img, plan, sample, max_iter, want_errors=True)
    widths = np.where(ok1, p1[:, 3], np.nan)
    mu, tau = width_population(widths, err1)
    first = float(sigma) if sigma is not None else mu
    if sigma is None and np.isfinite(widths).any():
        # the check takes the larger of the weighted mean and the median: narrow fits report
        # smaller errors, so the weighted mean is the more biased of the two where columns overlap
        start = max(mu, float(np.nanmedian(widths)))
        measured = overlap_width(img, plan, start, max_iter)
        joint = None if measured is None else measured[0]
        # taken where it differs by more than the width prior's least spread: within it the passes'
        # prior is as good, and the noise model, estimated under that prior, is left as it was
        # (a width between two species' widths 11 % apart moved it on one sweep image); and only
        # where overlap can explain the change (:func:`overlap_explained`), or where the first pass
        # run on the joint fit's own model reads the patch's columns as narrow as on the image
        # (within ``FIRST_PASS_REPRODUCED``): a dim column beside a bright one has its neighbour's tail
        # across its first window, which the rule for equal neighbours does not foresee (the dim rows
        # of a three-species hexagonal lattice 3.8 widths apart read 1.1 px for 2.1)
        if measured is not None and not (overlap_explained(measured[0], start, _median_nn(plan))
                                         or abs(measured[1] - 1.0) <= FIRST_PASS_REPRODUCED):
            joint_rejected = joint
        elif joint is not None and abs(joint / mu - 1.0) > PRIOR_MIN_REL:
            mu = joint
    sig = float(sigma) if sigma is not None else mu
    plan.set(sig)
    if nz is None:
        nz = _estimate_noise(img, plan, sample, p1, ok1, max_noise_atoms, max_iter, model)
    good = ok1 & np.isfinite(p1).all(axis=1)
    if good.any():
        counts = float(np.percentile(p1[good, 2], 90))
        bg = float(np.median(p1[good, 4]))
        radius = info_radius(counts, sig, bg, nz)
    else:
        radius = FINAL_REACH * sig + 0.5
    out = settings_dict(sig, tau, radius, nz, first)
    plan.set(sig, radius)
    # the residuals are read where a cheap look at the pixels suspects their noise is correlated
    if correlation:
        hint = pixel_correlation_hint(img)
        corr = noise_correlation(img, plan, nz, max_iter) if correlation_suspected(hint) else None
        out["noise_correlation"] = {"hint": list(hint), "read": corr is not None, **(corr or _uncorrelated())}
    if joint_rejected is not None:
        out["sigma_joint_rejected"] = float(joint_rejected)
    return out


#: Where the nearest-neighbour distance is below this many first-pass widths, the width is measured
#: again by a joint fit (:func:`overlap_width`): the first pass fits each column on its own
#: constant background in a window of half that distance, and the neighbours' tails make its
#: width narrow: 20 % at 3.6 widths, 7 % at 4.5 and 2 % at 5.5 (hexagonal and square lattices,
#: 900-20,000 counts), and at low dose the weighted mean of the widths a further 20 % (narrow fits
#: report smaller errors; 0.9 px for columns of 2.0 px in one sweep image, whose positions then
#: came out at 2.3 times their Cramér-Rao bound). The check reads the distance in the larger of
#: the weighted mean and the median first-pass width; the median is within 2 % at 5.5 widths and
#: 8 % at 4.5, so a correction beyond the 10 % that :func:`estimate_settings` asks for needs
#: columns closer than about 4.5 widths, which read as at most about 5.
OVERLAP_CHECK_SIGMAS = 5.5
#: How many times the first pass's expected narrowing (``exp(-q^2 / 8)`` at ``q`` nearest-neighbour
#: distances per width, beyond the width prior's least spread) a joint width may exceed the first
#: pass's by (:func:`overlap_explained`).
OVERLAP_BIAS_MARGIN = 4.0
#: Columns of the patch whose joint fit measures the width.
WIDTH_PATCH_ATOMS = 128  # 256 gave the same widths (within 2 %) in twice the time
#: Iterations of the patch's joint fit at least.
WIDTH_PATCH_ITER = 50


#: A joint width is the columns' where the first pass, run on the joint fit's own model of the patch,
#: reads the patch's columns (median width) within this fraction of what it reads on the image.
FIRST_PASS_REPRODUCED = 0.1


def overlap_width(img: np.ndarray, plan: Plan, sig: float, max_iter: int) -> tuple[float, float] | None:
    """The shared column width (px) of a joint fit of a patch of columns, where columns may overlap.

    None where the median nearest-neighbour distance is at least :data:`OVERLAP_CHECK_SIGMAS`
    times ``sig`` (px, the first pass's width), where the patch is too small for its border band
    (a row or two of columns, fewer than 8 columns clear of the band, or an atom table spread so
    thinly that the patch's box holds more than four times its columns) or where the joint fit
    fails. The patch is the :data:`WIDTH_PATCH_ATOMS` columns nearest the atom closest to the
    middle of the atoms, cut out of the image; every atom in the cut-out is fitted
    (:func:`.joint.solve_group`, unweighted, from its first-pass position and intensity) and
    pixels within :data:`~.joint.EDGE_SIGMAS` widths of its border, which hold light of columns
    outside, are left out (the columns centred there are held where they start: ``hold_band``,
    as this width's acceptance rule was measured). Where the width comes out wider than it started, the fit is repeated
    from it, with the border band that width asks for.

    Returns the width and, as a check of it, the median first-pass width of the patch's columns
    clear of its band on the joint fit's model (its columns rendered, no noise) over the same on
    the image: about 1 where the joint width is the columns' and their first-pass widths are
    narrowed by overlap alone, more where the joint fit took up what is not a column (steps,
    support) or one width was shared by species of different widths.
    """
    if np.count_nonzero(np.isfinite(plan.nn)) < 8 or not (sig > 0):
        return None
    nn_med = _median_nn(plan)
    if nn_med >= OVERLAP_CHECK_SIGMAS * sig:
        return None
    x, y = plan.x, plan.y
    mid = int(np.argmin((x - np.median(x)) ** 2 + (y - np.median(y)) ** 2))
    k = min(WIDTH_PATCH_ATOMS, x.size)
    core = np.argpartition((x - x[mid]) ** 2 + (y - y[mid]) ** 2, k - 1)[:k]
    ny, nx = img.shape
    x0, y0 = max(int(np.floor(x[core].min())) - 1, 0), max(int(np.floor(y[core].min())) - 1, 0)
    x1, y1 = min(int(np.ceil(x[core].max())) + 2, nx), min(int(np.ceil(y[core].max())) + 2, ny)
    inside = np.flatnonzero((x >= x0) & (x <= x1 - 1) & (y >= y0) & (y <= y1 - 1))
    if inside.size > 4 * k:
        return None
    p, ok, _, _ = first_pass(img, plan, inside, max_iter)
    good = ok & np.isfinite(p).all(axis=1) & (p[:, 2] > 0)
    if np.count_nonzero(good) < 8:
        return None
    # first-pass positions where the fit is good: the band's columns are held where they start
    p0 = np.column_stack([np.where(good, p[:, 0], x[inside]) - x0, np.where(good, p[:, 1], y[inside]) - y0,
                          p[:, 2], p[:, 3]])
    p0[~good, 2] = float(np.median(p[good, 2]))
    crop = img[y0:y1, x0:x1]
    valid = np.isfinite(crop)
    sigma_max = max(SIGMA_MAX_FACTOR * sig, SIGMA_MAX_FLOOR)
    width = float(sig)
    for _ in range(2):
        edge = EDGE_SIGMAS * width
        clear = inside_band(p0[:, 0], p0[:, 1], crop.shape, edge)
        if np.count_nonzero(clear) < 8:
            return None
        res = solve_group(
            crop, valid, p0, np.zeros((0, 4)), nn_median=nn_med, noise=plan.weighted(UNIFORM, img),
            radius=FINAL_REACH * width + 0.5,
            prior=(width, 0.0), sigma_max=sigma_max, max_move=plan.max_move[inside],
            half=patch_bound((width, 0.0), sigma_max), max_iter=max(max_iter, WIDTH_PATCH_ITER), tol=1e-3,
            refit_noise=False, edge=edge, hold_band=True,
        )
        new = float(res["p"][0, 3])
        if not (np.isfinite(new) and MIN_SIGMA < new < 0.99 * sigma_max) or np.mean(res["ok"][clear]) < 0.5:
            return None
        grew = new > 1.05 * width
        width = new
        if not grew:
            break
    return width, _first_pass_reproduced(crop, res["p"], p, good & clear, plan, max_iter)


def _first_pass_reproduced(crop: np.ndarray, fitted: np.ndarray, first: np.ndarray, use: np.ndarray, plan: Plan,
                           max_iter: int) -> float:
    """Median first-pass width on the model of the joint fit ``fitted`` (n, 4: x, y, N, width, px in ``crop``) over
    that on the image (``first``, the first pass's fits of the same columns), over the columns ``use``."""
    real = np.isfinite(fitted).all(axis=1) & (fitted[:, 2] > 0)
    fin = use & real
    if np.count_nonzero(fin) < 8:
        return float("nan")
    # every column of the patch rendered (those in its band are the others' neighbours)
    model = model_image(crop.shape, dict(zip(("x", "y", "intensity", "sigma"), fitted.T, strict=True)), real)
    sub = Plan(model, np.where(real, fitted[:, 0], first[:, 0]), np.where(real, fitted[:, 1], first[:, 1]),
               plan.window, True, plan.compiled)
    pm, okm, _, _ = first_pass(model, sub, np.flatnonzero(fin), max_iter)
    both = okm & np.isfinite(pm[:, 3]) & np.isfinite(first[fin, 3])
    if np.count_nonzero(both) < 8:
        return float("nan")
    return float(np.median(pm[both, 3]) / np.median(first[fin][both, 3]))


def _median_nn(plan: Plan) -> float:
    fin = np.isfinite(plan.nn)
    return float(np.median(plan.nn[fin])) if fin.any() else float("nan")


def overlap_explained(joint: float, first: float, nn: float) -> bool:
    """Whether a joint fit's width ``joint`` is one that overlap can explain, against the first pass's ``first``.

    The first pass fits each column alone, and its neighbours' tails make it narrow by about the
    tail's height at half their distance, ``exp(-q^2 / 8)`` for a distance of ``q`` widths (20 %
    measured at 3.6 widths, 7 % at 4.5, 2 % at 5.5). A joint width wider than the first pass's by
    more than the width prior's least spread and :data:`OVERLAP_BIAS_MARGIN` times that is not the
    columns' width: the patch's Gaussians took up what is not a column, the steps, holes and
    second layer of a surface (an STM topograph of adatoms 5.4 widths apart came out 1.3-3 times
    too wide) or support under a particle. Narrower joint widths are always explained.

    Parameters
    ----------
    joint, first : float
        Widths, px.
    nn : float
        Median nearest-neighbour distance, px (NaN: explained).
    """
    if not (np.isfinite(nn) and first > 0):
        return True
    q = nn / first
    return bool(joint <= first * (1.0 + PRIOR_MIN_REL + OVERLAP_BIAS_MARGIN * math.exp(-q * q / 8.0)))


#: The correlation of the noise is measured on the residuals of this many columns nearest the
#: middle of the atoms (of those, the typical columns apart from their neighbours) (400 columns of a lattice 14 px apart: 60,000 px, each lag's correlation to
#: about 0.004, the error factors to about 1 %).
CORRELATION_ATOMS = 400
#: The factors are applied where the position's differs from 1 by at least this much: on images of
#: independent pixels they came out at 0.96-1.06 (the estimate's scatter and the approximations of
#: its fits' share), on correlated noise at 1.3-1.5 (afterglow of 0.4, a sum of interpolated frames)
#: and above 2 (a Gaussian filter of 0.7 px).
CORRELATION_MIN_EFFECT = 0.1
#: Fewer typical columns than this (apart from their neighbours, among the :data:`CORRELATION_ATOMS`)
#: measure nothing: 27 columns of a MoS2-like crystal (the rest overlapping) read 0.3 at every lag.
CORRELATION_MIN_COLUMNS = 100
#: Neighbours of at least this fraction of the median intensity decide whether a column is apart.
NEIGHBOUR_INTENSITY = 0.25
#: ... and where the correlation between neighbouring pixels (along x or y) is at least this: a
#: detector's afterglow, interpolation and smoothing correlate the next pixel most (0.3-0.6 measured),
#: while a misfit that is smooth under the columns (broad blobs of contamination over a MoS2-like
#: crystal) reads about the same small value at every lag (0.06-0.09), which is no noise of the pixels.
CORRELATION_MIN_NEAREST = 0.15
#: ... and where it falls from 1 to 2 px along that axis to at most this fraction: the kernels of an
#: afterglow (0.4), of interpolation and of smoothing (0.2 at 0.7 px, 0.6 at 1.2 px) are short, while
#: a misfit along whole scan lines (scan jitter shifting each line of a column) reads about the same
#: at 1 and 2 px (0.7-1.0 on two images of the sweep, whose errors it would have widened 1.1-1.4 times).
CORRELATION_MAX_DECAY = 0.65
#: ... and where no neighbour of a pixel (the 8 around it) correlates below this: smoothing, afterglow
#: and interpolation by non-negative weights correlate every pair of pixels positively (their
#: kernels' autocorrelation), while the misfit of narrow columns under scan jitter read -0.11 to
#: -0.23 across the lines of four sweep images (and 0.47-0.51 along them).
CORRELATION_MIN_NEIGHBOUR = -0.06
#: Typical columns, around which the correlation is read: intensity within these multiples of the
#: median ...
TYPICAL_INTENSITY = (0.5, 2.0)
#: ... and width within this fraction of the image's.
TYPICAL_WIDTH = 0.3


def noise_correlation(img: np.ndarray, plan: Plan, nz: Noise, max_iter: int) -> dict[str, Any] | None:
    """How much the correlation of the pixel noise enlarges each fitted parameter's error
    (:mod:`.correlation`), from the residuals of :data:`CORRELATION_ATOMS` columns near the middle.

    The columns are fitted as the passes fit them (first pass, then the final window with the
    neighbours' models subtracted, weighted by ``nz``); their model and background (each pixel's
    from the nearest columns' fits) are taken off the image around them, and the residual,
    standardised by the noise model, gives the correlation between pixels up to
    :data:`~.correlation.MAX_LAG` px apart. ``plan`` must be set (:meth:`.plan.Plan.set`).

    Returns
    -------
    dict or None
        ``{"factors": {"x": ..., "y": ..., "intensity": ..., "sigma": ..., "background": ...},
        "measured": {...}, "applied": bool, "rho": [[...]], "pixels": n}``: the factors multiply
        the errors of independent pixels; they are those ``measured`` where the position's differs
        from 1 by :data:`CORRELATION_MIN_EFFECT` or more and the correlation looks like that of
        pixels (:func:`pixel_like`; ``applied``), else 1.
        ``rho[dy + L][dx + L]`` is the correlation between pixels ``(dx, dy)`` apart. None where
        too few typical columns fit (fewer than :data:`CORRELATION_MIN_COLUMNS`), and
        for unweighted fits (``nz`` uniform).
    """
    x, y = plan.x, plan.y
    n = x.size
    if n < CORRELATION_MIN_COLUMNS or plan.sigma is None or nz.uniform:
        # unweighted fits ("uniform") take their errors from the squared residuals (a sandwich
        # estimator) and have no noise model to standardise the residuals by
        return None
    sigma = float(plan.sigma)
    mid = int(np.argmin((x - np.median(x)) ** 2 + (y - np.median(y)) ** 2))
    k = min(CORRELATION_ATOMS, n)
    core = np.sort(np.argpartition((x - x[mid]) ** 2 + (y - y[mid]) ** 2, k - 1)[:k])
    pool = plan.expand(core) if plan.neighbor_subtraction else core
    iso = Isotropic()
    radius = plan.final_radius()
    p1, ok1, _, _ = first_pass(img, plan, pool, max_iter)
    if plan.neighbor_subtraction:
        # the neighbours' models as the passes leave them, as the fits of refine subtract them
        for _ in range(auto_refits(plan.nn, sigma) - 1):
            start = p1.copy()
            again = ~ok1
            start[again, 0], start[again, 1] = x[pool[again]], y[pool[again]]
            nb_pool = NeighborModels(plan, pool, pool, iso, p1, ok1)
            p1, _, _, _, _, _ = later_pass(img, plan, pool, iso, start, again, nb_pool, nz, max_iter, NOISE_PASS_TOL)
            ok1 = physical(iso, p1, x[pool], y[pool], plan.max_move[pool], radius[pool])
    pos = np.searchsorted(pool, core)
    start = p1[pos].copy()
    reinit = ~ok1[pos]
    start[reinit, 0], start[reinit, 1] = x[core[reinit]], y[core[reinit]]
    nb = NeighborModels(plan, core, pool, iso, p1, ok1) if plan.neighbor_subtraction else None
    p, _, _, _, _, _ = later_pass(img, plan, core, iso, start, reinit, nb, nz, max_iter, NOISE_PASS_TOL)
    ok = physical(iso, p, x[core], y[core], plan.max_move[core], radius[core])
    if np.count_nonzero(ok) < CORRELATION_MIN_COLUMNS:
        return None
    # the residuals are read around typical columns only: the fit of a faint blob, or of a column
    # much wider or narrower than the rest, takes up the noise differently (false finds on an
    # image with afterglow doubled the factors)
    typical = ok.copy()
    n_mid = float(np.median(p[ok, 2]))
    typical[ok] = ((p[ok, 2] >= TYPICAL_INTENSITY[0] * n_mid) & (p[ok, 2] <= TYPICAL_INTENSITY[1] * n_mid)
                   & (np.abs(p[ok, 3] / sigma - 1.0) <= TYPICAL_WIDTH))
    # and apart from their neighbours: where tails overlap, one column at a time is not the model
    # (each column's misfit differs with its neighbours', and reads as correlated noise: 3 times
    # too large errors on a particle of columns 3.6 widths apart)
    # (neighbours of a quarter of the median intensity or more: faint false finds beside columns, on
    # an image with afterglow, left too few columns apart)
    allp = np.where(ok1[:, None], p1, np.nan)
    allp[pos] = np.where(ok[:, None], p, np.nan)
    fit_ok = np.isfinite(allp).all(axis=1) & (allp[:, 2] > 0)
    real = fit_ok & (allp[:, 2] >= NEIGHBOUR_INTENSITY * n_mid)
    if np.count_nonzero(real) < 2:
        return None
    nn = cKDTree(allp[real, :2]).query(np.column_stack([x[core], y[core]]), k=2)[0][:, 1]
    typical &= ~overlapping(nn, sigma)
    if np.count_nonzero(typical) < CORRELATION_MIN_COLUMNS:
        return None
    pc = p[typical]
    reach = float(np.max(radius[core[typical]]))
    ny, nx = img.shape
    x0, y0 = max(int(np.floor(pc[:, 0].min() - reach)), 0), max(int(np.floor(pc[:, 1].min() - reach)), 0)
    x1, y1 = min(int(np.ceil(pc[:, 0].max() + reach)) + 1, nx), min(int(np.ceil(pc[:, 1].max() + reach)) + 1, ny)
    box = np.asarray(img[y0:y1, x0:x1], dtype=np.float64)
    # each pixel within a typical core column's window whose nearest fitted column it is
    h = int(np.ceil(reach))
    g = np.arange(-h, h + 1)
    oy, ox = (v.ravel() for v in np.meshgrid(g, g, indexing="ij"))
    disc = oy * oy + ox * ox <= reach * reach
    pr = (np.rint(pc[:, 1] - y0).astype(np.int64)[:, None] + oy[disc]).ravel()
    pcol = (np.rint(pc[:, 0] - x0).astype(np.int64)[:, None] + ox[disc]).ravel()
    inb = (pr >= 0) & (pr < box.shape[0]) & (pcol >= 0) & (pcol < box.shape[1])
    flat = np.unique(pr[inb] * box.shape[1] + pcol[inb])
    rows, cols = np.divmod(flat, box.shape[1])
    d, near = cKDTree(np.column_stack([allp[fit_ok, 0] - x0, allp[fit_ok, 1] - y0])).query(
        np.column_stack([cols, rows]))
    slot = np.full(n, -1, dtype=np.int64)  # atom -> its row in pc
    slot[core[typical]] = np.arange(pc.shape[0])
    who = slot[pool[fit_ok][near]]
    win = np.where(who >= 0, radius[core[typical]][np.maximum(who, 0)], -1.0)
    owner = np.full(box.shape, -1, dtype=np.int64)
    owner.ravel()[flat] = np.where(d <= win, who, -1)
    mask = (owner >= 0) & np.isfinite(box)
    if np.count_nonzero(mask) < 200:
        return None
    # the model each fit saw: its own column over the neighbours' pass models it subtracted
    first = {"x": p1[:, 0] - x0, "y": p1[:, 1] - y0, "intensity": p1[:, 2], "sigma": p1[:, 3]}
    if plan.neighbor_subtraction:
        model = model_image(box.shape, first, ok1 & np.isfinite(p1).all(axis=1) & (p1[:, 2] > 0))
    else:  # each fit saw its own column alone
        model = np.zeros(box.shape)
    own = core[typical]
    p_first = p1[pos][typical]
    had_first = (ok1[pos] & np.isfinite(p1[pos]).all(axis=1) & (p1[pos, 2] > 0))[typical]
    if not plan.neighbor_subtraction:
        had_first = np.zeros(own.size, dtype=bool)
    for params, sign, use in ((pc, 1.0, np.ones(own.size, dtype=bool)), (p_first, -1.0, had_first)):
        if not use.any():
            continue
        q = np.column_stack([params[:, 0] - x0, params[:, 1] - y0, params[:, 2], params[:, 3]])
        q = np.where(use[:, None], q, q[use][0])  # unused rows (failed first passes) are masked below
        flat, val, _ = column_patches(q, patch_half(float(np.max(q[use, 3]))), box.shape, derivatives=False)
        mine = (flat >= 0) & use[:, None, None]
        mine[mine] = owner.ravel()[flat[mine]] == np.nonzero(mine)[0]
        model.ravel()[flat[mine]] += sign * val[mine]
    # each pixel's background is its own column's, as that column's fit took it
    bg = np.where(mask, pc[np.maximum(owner, 0), 4], 0.0)
    mu = model + bg
    u = np.where(mask, (np.nan_to_num(box) - mu) / np.sqrt(nz.variance(mu)), 0.0)
    inten = pc[:, 2]
    weight = np.sqrt(np.clip(inten / float(np.median(inten)), 0.01, None))
    r_med = float(np.median(radius[core[typical]]))
    n_med, b_med = float(np.median(inten)), float(np.median(pc[:, 4]))

    def variance(g, one):  # a typical column's pixel variance (g: its profile of unit intensity)
        return nz.variance(n_med * g + b_med * one)

    rho, used = residual_correlation(u, mask, pc[:, 0] - x0, pc[:, 1] - y0, weight, sigma=sigma,
                                     radius=r_med, variance=variance)
    if used == 0:
        return None
    f = error_factors(rho, estimator_rows(sigma, r_med))
    applied = bool(np.max(np.abs(f[:2] - 1.0)) >= CORRELATION_MIN_EFFECT and pixel_like(rho))
    return {"factors": {name: float(v) if applied else 1.0 for name, v in zip(PARAMETERS, f)},
            "measured": {name: round(float(v), 4) for name, v in zip(PARAMETERS, f)}, "applied": applied,
            "rho": np.round(rho, 4).tolist(), "pixels": used}


def _uncorrelated() -> dict[str, Any]:
    """The record of noise that is not read or not correlated: factors of 1 (a new dict each time)."""
    return {"factors": dict.fromkeys(PARAMETERS, 1.0), "applied": False}


def pixel_like(rho: np.ndarray) -> bool:
    """Whether a measured correlation ``rho`` (:func:`.correlation.residual_correlation`) looks like noise
    correlated between pixels: at least :data:`CORRELATION_MIN_NEAREST` between neighbours along x or y,
    falling to at most :data:`CORRELATION_MAX_DECAY` of that at 2 px along the same axis, and no
    neighbour (the 8 around a pixel) below :data:`CORRELATION_MIN_NEIGHBOUR`."""
    c = rho.shape[0] // 2
    along_x = rho[c, c + 1] >= rho[c + 1, c]
    r1 = rho[c, c + 1] if along_x else rho[c + 1, c]
    r2 = rho[c, c + 2] if along_x else rho[c + 2, c]
    nearest = rho[c - 1 : c + 2, c - 1 : c + 2]
    return bool(r1 >= CORRELATION_MIN_NEAREST and r2 <= CORRELATION_MAX_DECAY * r1
                and nearest.min() >= CORRELATION_MIN_NEIGHBOUR)


def _estimate_noise(img, plan: Plan, sample, p1, ok1, max_noise_atoms: int, max_iter: int, model: str) -> Noise:
    """The noise model from the leverage-corrected residuals of an unweighted pass over a sub-sample."""
    sub = sample[sample_indices(sample.size, max_noise_atoms)]
    iso = Isotropic()
    mdl = get_model(model)  # residuals of the model that will be fitted
    if plan.neighbor_subtraction:
        pool = plan.expand(sub)
        pp, okp, _, _ = first_pass(img, plan, pool, max_iter)
        nbprev: NeighborModels | None = NeighborModels(plan, sub, pool, iso, pp, okp)
    else:
        pool, pp, okp, nbprev = sample, p1, ok1, None
    pos = np.searchsorted(pool, sub)
    ok_s = okp[pos]
    start = pp[pos] if mdl.k == 5 else mdl.from_isotropic(pp[pos])
    _, _, _, _, _, res = later_pass(img, plan, sub, mdl, start, ~ok_s, nbprev, UNIFORM, max_iter, NOISE_PASS_TOL, True)
    mus = [m_[ok_s[own]] for m_, _, own in res]
    r2s = [r2[ok_s[own]] for _, r2, own in res]
    return fit_variance(np.concatenate(mus), np.concatenate(r2s))


def width_population(sig: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    """Mean width and true spread of widths between atoms (px) from noisy per-atom estimates.

    Random-effects (DerSimonian-Laird) estimate: the observed scatter of the widths minus what
    their standard errors explain is the spread between atoms, ``tau``.
    """
    good = np.isfinite(sig) & np.isfinite(err) & (err > 0)
    s, e = sig[good], err[good]
    if s.size < 3:
        fin = sig[np.isfinite(sig)]
        return (float(np.median(fin)) if fin.size else 1.5), 0.0
    med = float(np.median(s))
    mad = 1.4826 * float(np.median(np.abs(s - med)))
    keep = np.abs(s - med) <= 5.0 * np.sqrt(mad * mad + e * e)
    s, v = s[keep], e[keep] ** 2
    wf = 1.0 / v
    mu_fe = float(np.sum(wf * s) / np.sum(wf))
    q = float(np.sum(wf * (s - mu_fe) ** 2))
    denom = float(np.sum(wf) - np.sum(wf * wf) / np.sum(wf))
    tau2 = max(0.0, (q - (s.size - 1)) / denom) if denom > 0 else 0.0
    wr = 1.0 / (v + tau2)
    return float(np.sum(wr * s) / np.sum(wr)), float(math.sqrt(tau2))


def overlap_judging_width(settings: dict[str, Any]) -> float:
    """The first pass's width (px), which decides where columns overlap for ``find_missing="auto"`` and,
    with the width the fits use where that is wider, which columns are fitted jointly: the first
    pass's (``sigma_first_pass``), as :data:`~.joint.JOINT_NN_SIGMAS` was set; ``sigma`` for
    settings without it (given by hand, or from before it was recorded)."""
    return float(settings.get("sigma_first_pass", settings["sigma"]))


def settings_dict(sig: float, tau: float, radius: float, nz: Noise, first: float | None = None) -> dict[str, Any]:
    """The settings as :func:`atomds.core.refine.estimate_fit_settings` returns them (see there)."""
    out: dict[str, Any] = {"sigma": sig, "sigma_spread": tau, "window_radius": radius,
                           "sigma_first_pass": sig if first is None else float(first)}
    if nz.gain is None:
        out.update(gain=None, read_noise=None, variance_offset=None, variance_floor=None)
    else:
        out.update(
            gain=float(nz.gain),
            read_noise=float(math.sqrt(max(nz.offset, 0.0))),
            variance_offset=float(nz.offset),
            variance_floor=float(nz.floor),
        )
    return out
