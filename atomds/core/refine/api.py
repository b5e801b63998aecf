"""The public functions of the refinement: :func:`refine_gaussian`, :func:`estimate_fit_settings`,
:func:`center_of_mass`, :func:`nearest_neighbor_distance`, :func:`without_spikes`, :func:`check_engine`.

Positions in px (``x`` = column index, ``y`` = row index, pixel centres at integer coordinates);
intensities in image units. See :mod:`atomds.core.refine` for the method.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ...errors import DimensionError, InvalidImageError, InvalidParameterError
from ..image import as_float, constant_border, intensity_scale
from ..preprocess import turn_over
from ..scanlines import bad_lines, fill_lines, lines_from_record, lines_record, remove_row_offsets
from ..spikes import remove_spikes
from .batched import gather
from .constants import NOISE_ATOMS, PRIOR_MIN_REL, RING_FRACTION, SETTINGS_ATOMS
from .grid import nearest_neighbor_distance
from .joint import JOINT_MARGIN_NN, fit_joint, joint_reach, overlapping
from .linalg import invert_batched
from .models import MODELS, Elliptical, Isotropic, get_model
from .noise import UNIFORM, Noise, fit_times, noise_times, parse_noise, settings_times
from .passes import NeighborModels, first_pass, later_pass, physical
from .plan import Plan, auto_refits, chunk_size, first_radius
from .settings import estimate_settings, overlap_judging_width

try:  # a dependency of scikit-learn; BLAS threads only slow down the many tiny matrix products here
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover
    _threadpool_limits = None

__all__ = [
    "refine_gaussian",
    "center_of_mass",
    "estimate_fit_settings",
    "nearest_neighbor_distance",
    "without_spikes",
    "check_engine",
    "check_joint",
    "MODELS",
    "ENGINES",
]

#: Fit kernels :func:`refine_gaussian` can use (its ``engine`` parameter).
ENGINES = ("auto", "compiled", "numpy")


def refine_gaussian(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    model: str = "gaussian",
    window: float | np.ndarray | None = None,
    noise=None,
    sigma: float | None = None,
    max_iter: int = 30,
    neighbor_subtraction: bool = True,
    n_refits: int | None = None,
    tol: float = 1e-3,
    width_prior: bool | float = True,
    settings: dict | None = None,
    subset: np.ndarray | slice | None = None,
    despike: bool = True,
    contrast: str = "bright",
    engine: str = "auto",
    joint: bool | str = "auto",
    joint_width: str = "fitted",
) -> dict[str, np.ndarray]:
    """Fit a 2-D Gaussian to every atom at once (batched Levenberg-Marquardt).

    Parameters
    ----------
    image : 2-D array (ny, nx)
        Intensities; non-finite pixels are left out of the fits. Counts are best, but the noise
        model is estimated in any units, and the same image in other units gives the same fits
        (to rounding): one whose values spread outside :data:`~atomds.core.image.INTENSITY_BAND`
        (a current in A, values of 1e9) is fitted divided by a power of two
        (:func:`~atomds.core.image.intensity_scale`) and its results given back in its units,
        and unweighted fits weigh the width prior by the image's pixel noise variance.
    x, y : array of float, shape (n,)
        Starting positions (seeds) in pixels, of all atoms of the image (neighbours matter).
    model : {"gaussian", "elliptical"}
        Isotropic pixel-integrated Gaussian (``sigma``) or elliptical Gaussian
        (``sigma_major``, ``sigma_minor``, ``theta``), each on a local constant background.
    window : float or array (n,), optional
        Radius of the circular fit window in px. Default: half the nearest-neighbour distance
        in the first pass, then ``4 sigma + 0.5`` (at most 0.8 of the nearest-neighbour
        distance) once the neighbours' models are subtracted.
    noise : None, "uniform", (gain, read_noise) or dict
        Noise model of the weights, ``variance = gain * mu + read_noise**2`` in image units
        (``mu`` the expected value of a pixel). None estimates it from the residuals (see
        :func:`estimate_fit_settings`, whose dict is accepted here); "uniform" fits unweighted
        (the errors then come from the sandwich estimator with the squared residuals).
    sigma : float, optional
        Typical column width in px (sets the final window); estimated when None.
    max_iter : int
        Maximum Levenberg-Marquardt iterations per pass.
    neighbor_subtraction : bool
        Subtract the neighbours' fitted models from every patch and refit (``n_refits`` times).
        Without it the second pass refits each atom alone, weighted, in the first window.
    n_refits : int, optional
        Passes after the first one when ``neighbor_subtraction`` is on (>= 1). Default: 1 where
        columns are at least 6 sigma apart, 2 from 4.5 sigma, 3 from 3.5 sigma, 4 below (judged
        on the closest 1 % of the nearest-neighbour distances).
    tol : float
        Convergence threshold on the position and width steps, px.
    width_prior : bool or float
        A weak Gaussian prior on each column's width, centred on the mean width, with the spread
        of the widths between atoms estimated from the data (True), a given spread in px, or
        none (False). Its standard deviation is never below a tenth of the width. It only
        matters for faint columns, whose width the data hardly fix; it keeps their fits (and
        so their neighbours' subtraction) from wandering into wide, flat Gaussians.
    settings : dict, optional
        The output of :func:`estimate_fit_settings` (``sigma``, ``sigma_spread`` and the noise
        model), to skip the estimation or share it between calls; ``sigma`` and ``noise``
        given explicitly take precedence.
    subset : array of int, bool mask or slice, optional
        Fit and return only these atoms. Their neighbours are fitted as far as needed, so the
        result equals that of the full fit given the same ``noise`` and ``sigma``; where columns
        are fitted jointly, to within their noise: the group fitted jointly is the overlapping
        columns within :data:`~atomds.core.refine.api.LOCAL_MARGIN_NN` nearest-neighbour
        distances of these atoms, with its own shared width and background.
    despike : bool
        Leave spikes (hot and dead pixels, particle hits of a few pixels;
        :func:`atomds.core.spikes.spike_mask`) and scan lines spoiled along their length
        (:func:`atomds.core.scanlines.bad_lines`) out of the fits, as non-finite pixels are, and
        take line noise off the rows where it is seen
        (:func:`atomds.core.scanlines.remove_row_offsets`: ``background`` is then that of the
        corrected image).
    contrast : {"bright", "dark"}
        "dark" for columns darker than their surroundings (ABF, BF): the image is turned over
        (``max - image``), so ``amplitude``, ``intensity`` and ``background`` describe the
        turned-over image (the depth of each dip).
    engine : {"auto", "compiled", "numpy"}
        The fit kernel. "compiled" fits the isotropic model in compiled code (numba) on all
        cores; "numpy" fits every atom of a chunk at once in NumPy; "auto" takes the compiled
        kernel for the isotropic model and NumPy for the elliptical one (the only kernel that
        fits it). Both give the same numbers to float32 rounding, but for a fit that stops a step
        apart within ``tol`` (one column of 168 in a test). The pass that estimates the
        noise model always runs in NumPy (it needs the residuals).
    joint : {"auto", True, False}
        Fit overlapping columns jointly (:mod:`atomds.core.refine.joint`: all columns of a group
        and one smooth background in one model, the bias-free answer where tails overlap).
        "auto": the columns whose nearest neighbour is closer than
        :data:`~atomds.core.refine.joint.JOINT_NN_SIGMAS` (5) column widths (the first pass's
        width, or the width measured again by a joint fit of a patch where that is wider), after
        the passes (well-separated lattices are not touched); True: every column; False: none. Only with
        the isotropic model and ``neighbor_subtraction``.
    joint_width : {"fitted", "given"}
        The joint fit's shared column width: fitted with the columns ("fitted", the default), or
        held at the width of the passes (``sigma`` where given), "given": a test of whether a
        column is there (the finder's residual passes) needs no width of its own, and on a
        background the grid does not follow (the steep rim of a particle) a free width grew to
        twice the columns' and held the fit at its iteration limit.

    Returns
    -------
    dict of ndarray, each of shape (n_subset,)
        ``x``, ``y`` (px); ``amplitude`` (peak height above the background, image units);
        ``intensity`` (integrated intensity of the column above the background); ``sigma``, or
        ``sigma_major``, ``sigma_minor`` (px) and ``theta`` (rad, angle of the major axis from +x
        towards +y, in (-pi/2, pi/2]); ``background`` (per pixel); ``x_err``, ``y_err``
        (standard errors, px; widened where the noise is correlated between pixels, see
        :func:`atomds.core.refine.settings.noise_correlation`); ``fit_ok`` (bool); ``n_iter`` (LM iterations over all passes);
        ``window`` (final window radius, px); ``intensity_err`` (standard error of ``intensity``);
        ``joint`` (bool: fitted jointly with its neighbours). Where ``fit_ok`` is False the
        position is the centre of mass (the seed where that lies farther than
        :data:`COM_REACH_SIGMAS` column widths, at least :data:`COM_REACH_MIN` px, from it) and the
        other values are NaN.

    Raises
    ------
    DimensionError, InvalidImageError
        For an image that is not a 2-D array of real numbers.
    InvalidParameterError
        For positions outside the image or not finite, and parameters out of range (including
        ``engine="compiled"`` with the elliptical model).

    Notes
    -----
    All atoms are fitted together, in chunks of atoms that bound the working memory (about
    100 MB per chunk). Each pass starts from the previous pass's parameters; the weights of a
    pass use the previous pass's model (iteratively reweighted least squares), which is the
    Poisson (or Poisson + Gaussian) maximum-likelihood estimator at convergence.
    """
    img = _as_image(image)
    k = intensity_scale(img)
    if k != 1.0:
        # far from order one (currents in A, 1e9 counts): fitted on image / k, results times k
        res = refine_gaussian(
            img / k, x, y, model=model, window=window, noise=noise_times(parse_noise(noise), 1.0 / k), sigma=sigma,
            max_iter=max_iter, neighbor_subtraction=neighbor_subtraction, n_refits=n_refits, tol=tol,
            width_prior=width_prior, settings=None if settings is None else settings_times(settings, 1.0 / k),
            subset=subset, despike=despike,
            contrast=contrast, engine=engine, joint=joint, joint_width=joint_width,
        )
        return fit_times(res, k)
    x, y = _as_positions(x, y, img.shape)
    mdl = get_model(model)
    compiled = check_engine(engine, model)
    check_joint(joint, model)
    if joint_width not in JOINT_WIDTHS:
        raise InvalidParameterError(f"joint_width must be one of {JOINT_WIDTHS}; got {joint_width!r}.")
    _check_iterations(max_iter, n_refits, tol)
    _check_sigma(sigma)
    n_all = x.size
    sel = np.arange(n_all, dtype=np.int64)
    if subset is not None:
        try:
            sel = sel[subset]
        except IndexError as exc:
            raise InvalidParameterError(f"subset does not index the {n_all} atoms: {exc}") from None
        sel = np.unique(sel)
    if sel.size == 0:
        return _empty_result(mdl)
    st = dict(settings) if settings is not None else {}
    if sigma is not None:
        st["sigma"] = st["sigma_first_pass"] = float(sigma)  # a given width also decides the joint fit
    if noise is not None:
        nz = parse_noise(noise)
    elif "gain" in st:
        nz = UNIFORM if st["gain"] is None else parse_noise(st)
    else:
        nz = None
    _check_sigma(st.get("sigma"))
    img = turn_over(img, contrast)
    if despike:
        img = without_spikes(img)[0]
    with _blas_single_thread():
        plan = Plan(img, x, y, window, neighbor_subtraction, compiled)
        return _refine(img, plan, mdl, sel, st, nz, n_refits, max_iter, tol, width_prior, joint, noise is None,
                       joint_width == "given")


def without_spikes(image: np.ndarray, *, found: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``image`` with its single-pixel spikes and its spoiled scan lines (:func:`atomds.core.scanlines.bad_lines`)
    set to NaN (left out of every fit), and what was done.

    Parameters
    ----------
    image : 2-D array
        Intensities.
    found : dict, optional
        What an earlier step found on this very image (``find_atoms``'s params, as the same
        contrast turned it): ``spike_pixels`` (``[[row, column], ...]``) and ``bad_lines``
        (:func:`atomds.core.scanlines.lines_record`). When both are complete they are used and
        nothing is looked for again (``"reused": True`` in the info); the caller makes sure the
        image is the same (:func:`atomds.core.image.image_digest`).

    Returns
    -------
    image : ndarray
        A float copy with NaN at the spikes when there are any (:func:`atomds.core.spikes.remove_spikes`),
        and less the rows' offsets where it carries line noise
        (:func:`atomds.core.scanlines.remove_row_offsets`; decided as the finder did where ``found``
        is used), else the image itself.
    info : dict
        ``{"spikes": n, "bad_lines": {...}, "line_noise": {...}}`` (:func:`atomds.core.scanlines.lines_record`,
        :func:`~atomds.core.scanlines.remove_row_offsets`), or ``{"skipped": reason}`` when the image cannot be despiked (it holds
        NaN pixels, is constant or too small): the image is then returned unchanged, and the caller
        records the fallback.
    """
    known = _known_defects(found, np.shape(image))
    if known is not None:
        iy, ix, rows, cols = known
        out = np.asarray(image)
        if iy.size:
            out = as_float(out).copy()
            out[iy, ix] = np.nan
        info = {"spikes": int(iy.size), "bad_lines": lines_record(rows, cols), "reused": True}
        out = fill_lines(out, rows, cols, fill="nan")
        seen = (found or {}).get("line_noise") or {}
        if seen.get("applied") and seen.get("ratio") is not None:  # the finder saw line noise: taken off again
            out, info["line_noise"] = remove_row_offsets(out, ratio=float(seen["ratio"]))
        elif "applied" in seen:
            info["line_noise"] = seen
        else:
            out, info["line_noise"] = remove_row_offsets(out)
        return _without_padding(out, info)
    try:
        out, mask = remove_spikes(image, fill="nan")
    except InvalidImageError as exc:
        return image, {"skipped": str(exc)}
    rows, cols = bad_lines(out)
    out, line_noise = remove_row_offsets(fill_lines(out, rows, cols, fill="nan"))
    return _without_padding(out, {"spikes": int(mask.sum()), "bad_lines": lines_record(rows, cols),
                                  "line_noise": line_noise})


def _without_padding(image: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """``image`` with its constant border rows and columns (the padding of a drift-corrected sum,
    :func:`atomds.core.image.constant_border`) set to NaN, out of every fit; recorded as ``info["padding"]``."""
    t, b, l, r = constant_border(image)
    if not (t or b or l or r):
        return image, info
    out = as_float(np.asarray(image)).copy()
    ny, nx = out.shape
    out[:t] = np.nan
    out[ny - b :] = np.nan
    out[:, :l] = np.nan
    out[:, nx - r :] = np.nan
    info["padding"] = {"top": t, "bottom": b, "left": l, "right": r}
    return out, info


def _known_defects(found: dict[str, Any] | None, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Spike rows and columns and bad-line masks from ``found`` (see :func:`without_spikes`); None when incomplete."""
    if not found or found.get("spike_pixels") is None or len(shape) != 2:
        return None
    lines = lines_from_record(found.get("bad_lines"), shape)
    try:
        pix = np.asarray(found["spike_pixels"], dtype=np.int64).reshape(-1, 2)
    except (TypeError, ValueError):
        return None
    if lines is None or np.any(pix < 0) or np.any(pix >= np.asarray(shape)):
        return None
    return pix[:, 0], pix[:, 1], lines[0], lines[1]


def _refine(
    img, plan: Plan, mdl: Isotropic | Elliptical, sel, st, nz: Noise | None, n_refits, max_iter, tol, width_prior,
    joint: bool | str = False, noise_estimated: bool = True, width_held: bool = False,
):
    """Settings (estimated where not given), width prior and passes; the results of atoms ``sel``."""
    work = _fit_image(img)
    if nz is None or any(key not in st for key in ("sigma", "sigma_spread", "window_radius")):
        est = estimate_settings(work, plan, st.get("sigma"), nz, SETTINGS_ATOMS, NOISE_ATOMS, max_iter, mdl.name,
                                correlation="noise_correlation" not in st)
        st = {**est, **st}
        nz = nz if nz is not None else parse_noise(est)
    sigma = float(st["sigma"])
    plan.set(sigma, float(st["window_radius"]))
    if width_prior is not False:
        tau = float(st["sigma_spread"]) if width_prior is True else float(width_prior)
        if not (np.isfinite(tau) and tau >= 0):
            raise InvalidParameterError(f"width_prior must be True, False or a spread >= 0 in px; got {width_prior!r}.")
        # weakly informative: never narrower than a tenth of the width itself
        plan.prior = (sigma, 1.0 / (tau * tau + (PRIOR_MIN_REL * sigma) ** 2))
    if not plan.neighbor_subtraction:
        n_later = 1
    elif n_refits is None:
        n_later = auto_refits(plan.nn, sigma)
    else:
        n_later = int(n_refits)
    # which columns overlap is judged by the first pass's width, as JOINT_NN_SIGMAS was set, or by
    # the corrected width where the joint fit of a patch (overlap_width) made it wider: strong
    # overlap makes the first pass read columns the narrower the more they overlap (a honeycomb of
    # 2.0 px columns 5.8 px apart: 1.0-1.1 px, judged 5.4-5.7 widths apart, not fitted jointly; the
    # dim columns' positions then 1.3 times their joint fit's error, std(error / x_err) 1.20)
    members = _joint_members(plan, mdl, max(overlap_judging_width(st), float(st["sigma"])), joint)
    if members is None:
        p, ok, it, h, m = _passes(work, plan, mdl, sel, n_later, nz, max_iter, tol)
        return _correlated(_results(img, plan, mdl, sel, p, ok, it, h, m), st, nz)
    nn_median = float(np.median(plan.nn[np.isfinite(plan.nn)]))
    radius = float(st["window_radius"])
    members, need = _local_group(plan, sel, members, nn_median, joint_reach(radius, plan.prior, plan.sigma_max))
    # the joint fit starts from (and subtracts the others at) the passes' fits of the atoms it needs
    p_n, ok_n, it, h, m = _passes(work, plan, mdl, need, n_later, nz, max_iter, tol)
    p = np.full((plan.x.size, p_n.shape[1]), np.nan)
    ok = np.zeros(plan.x.size, bool)
    p[need], ok[need] = p_n, ok_n
    p = _joint_start(work, plan, p, ok, members, sigma)
    res = fit_joint(
        work, p, ok, members, nn_median=nn_median, noise=plan.weighted(UNIFORM if nz is None else nz, work),
        radius=radius, prior=plan.prior, sigma_max=plan.sigma_max,
        max_move=plan.max_move, max_iter=max(max_iter, JOINT_MIN_ITER), tol=tol,
        refit_noise=noise_estimated, fixed_width=width_held,
    )
    out = _results(img, plan, mdl, need, p[need], ok[need], it, h, m)
    _put_joint(out, np.searchsorted(need, members), res)
    return _correlated({k: v[np.searchsorted(need, sel)] for k, v in out.items()}, st, nz)


def _correlated(out: dict[str, np.ndarray], settings: dict[str, Any], nz: Noise | None) -> dict[str, np.ndarray]:
    """``out`` with its errors times the factors of the noise's correlation between pixels
    (``settings["noise_correlation"]``, :func:`.settings.noise_correlation`); as it is without them, and
    for unweighted fits (``nz`` uniform: their sandwich errors come from the residuals themselves)."""
    corr = settings.get("noise_correlation")
    if not corr or (nz is not None and nz.uniform):
        return out
    f = corr["factors"]
    out["x_err"] = out["x_err"] * float(f["x"])
    out["y_err"] = out["y_err"] * float(f["y"])
    out["intensity_err"] = out["intensity_err"] * float(f["intensity"])
    return out


#: A subset's joint group reaches this many nearest-neighbour distances beyond it: twice a tile's
#: margin (:data:`~.joint.JOINT_MARGIN_NN`), as its shared width and background rest on its own
#: columns (with a tile's margin, seven columns in the middle of a 190 px lattice 3.9 widths
#: apart had standard errors 30 % above the whole image's fit).
LOCAL_MARGIN_NN = 2.0 * JOINT_MARGIN_NN


def _local_group(
    plan: Plan, sel: np.ndarray, members: np.ndarray, nn_median: float, reach: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The joint fit's members and the atoms whose passes it needs, for the results of atoms ``sel``.

    For all atoms, all of them. For some (``subset``: a Dask chunk), the members within
    :data:`LOCAL_MARGIN_NN` nearest-neighbour distances of them and the
    atoms within ``reach`` px of those (the fixed neighbours whose light reaches the group's
    pixels); fitting every member for each chunk cost the whole image's joint fit per chunk.
    """
    n = plan.x.size
    if sel.size == n:
        return members, np.arange(n, dtype=np.int64)
    xy = np.column_stack([plan.x, plan.y])
    tree = cKDTree(xy[sel])
    near = tree.query(xy, distance_upper_bound=LOCAL_MARGIN_NN * nn_median + reach)[0]
    members = members[near[members] <= LOCAL_MARGIN_NN * nn_median]
    need = np.union1d(np.flatnonzero(np.isfinite(near)), sel)
    if members.size:
        near_m = cKDTree(xy[members]).query(xy[need], distance_upper_bound=reach)[0]
        need = np.union1d(need[np.isfinite(near_m)], sel)
    return members, need


#: Iterations of the joint Levenberg-Marquardt at least (its one damping serves many columns).
JOINT_MIN_ITER = 50


#: A member whose passes carried it to this fraction of the largest move allowed (``max_move``, a
#: quarter of the nearest-neighbour distance), a fit held at its bound rather than converged,
#: starts the joint fit at its seed (from the seeds throughout, a perovskite [110] of the sweep
#: lost precision: 1.19 -> 1.64 times the bound; from the passes throughout, a particle column
#: stayed 3.5 px off).
JOINT_START_MOVED = 0.9

#: A column whose passes failed enters the joint fit with at least this fraction of the median
#: intensity of the fitted columns (its own start is the peak above the background at its seed).
JOINT_START_MIN_REL = 0.01


def _joint_start(work: np.ndarray, plan: Plan, p: np.ndarray, ok: np.ndarray, members: np.ndarray, sigma: float) -> np.ndarray:
    """Starting values of the joint fit: the passes' fits, with the seed position for members the
    passes carried to their move limit (:data:`JOINT_START_MOVED`), and for members whose passes
    failed their seed position, the width ``sigma`` (px) and the peak above the median background
    times ``2 pi sigma^2``.

    Where columns overlap this much the passes (one column at a time) can carry a column several
    px away (at 3.3 widths apart, 22-94 of 650 columns beyond 1 px, whatever the refits), and the
    joint fit may move a column only ``max_move`` from its start.
    """
    out = p.copy()
    moved = np.hypot(p[members, 0] - plan.x[members], p[members, 1] - plan.y[members])
    far = members[~(moved <= JOINT_START_MOVED * plan.max_move[members])]
    out[far, 0], out[far, 1] = plan.x[far], plan.y[far]
    bad = members[~ok[members]]
    if bad.size == 0 or not ok.any():
        return out
    rows = np.clip(np.rint(plan.y[bad]).astype(np.int64), 0, work.shape[0] - 1)
    cols = np.clip(np.rint(plan.x[bad]).astype(np.int64), 0, work.shape[1] - 1)
    bg = float(np.nanmedian(p[ok, 4]))
    n_med = float(np.nanmedian(p[ok, 2]))
    peak = np.nan_to_num(work[rows, cols].astype(float) - bg, nan=0.0)
    out[bad, 0], out[bad, 1], out[bad, 3], out[bad, 4] = plan.x[bad], plan.y[bad], sigma, bg
    out[bad, 2] = np.maximum(peak * 2.0 * np.pi * sigma**2, JOINT_START_MIN_REL * n_med)
    return out


def _joint_members(plan: Plan, mdl: Isotropic | Elliptical, sigma: float, joint: bool | str) -> np.ndarray | None:
    """The atoms to fit jointly (None: no joint fit)."""
    if joint is False or mdl.k != 5 or not plan.neighbor_subtraction or plan.x.size < 2:
        return None
    if joint is True:
        return np.arange(plan.x.size, dtype=np.int64)
    members = np.flatnonzero(overlapping(plan.nn, sigma))
    return members if members.size else None


def _put_joint(out: dict[str, np.ndarray], members: np.ndarray, res: dict[str, np.ndarray]) -> None:
    """Write the joint fits ``res`` of atoms ``members`` into the results ``out`` (in place)."""
    good = res["ok"]
    i = members[good]
    p, var = res["p"][good], res["var"][good]
    out["x"][i], out["y"][i] = p[:, 0], p[:, 1]
    out["intensity"][i] = p[:, 2]
    out["sigma"][i] = p[:, 3]
    out["amplitude"][i] = p[:, 2] / (2.0 * np.pi * p[:, 3] ** 2)
    out["background"][i] = res["background"][good]
    out["x_err"][i], out["y_err"][i], out["intensity_err"][i] = (np.sqrt(var[:, k]) for k in range(3))
    out["fit_ok"][i] = True
    out["n_iter"][i] += res["n_iter"][good]
    out["joint"][i] = True


def _passes(work, plan: Plan, mdl: Isotropic | Elliptical, sel, n_later: int, nz, max_iter: int, tol: float):
    """The first pass and ``n_later`` later ones: parameters, flags, iterations, normal matrices, pixels of ``sel``."""
    x, y = plan.x, plan.y
    # atoms each pass needs: the final set, grown by one ring of neighbours per earlier pass
    sets = [sel]
    if plan.neighbor_subtraction:
        for _ in range(n_later):
            sets.append(plan.expand(sets[-1]))
    else:
        sets.append(sel)
    sets = sets[::-1]
    pool = sets[0]
    p_cur, ok_cur, it_cur, _ = first_pass(work, plan, pool, max_iter)
    cur: Isotropic | Elliptical = Isotropic()
    max_move = plan.max_move
    for idx in sets[1:]:
        pos = np.searchsorted(pool, idx)
        start = p_cur[pos].copy()
        reinit = ~ok_cur[pos]
        start[reinit, 0], start[reinit, 1] = x[idx[reinit]], y[idx[reinit]]
        if mdl.k != cur.k:
            start = mdl.from_isotropic(start)
        nbprev = NeighborModels(plan, idx, pool, cur, p_cur, ok_cur) if plan.neighbor_subtraction else None
        p_new, chi2, h, it_new, m, _ = later_pass(work, plan, idx, mdl, start, reinit, nbprev, nz, max_iter, tol)
        ok_cur = physical(mdl, p_new, x[idx], y[idx], max_move[idx], plan.final_radius()[idx])
        it_cur = it_cur[pos] + it_new
        p_cur, pool, cur = p_new, idx, mdl
    return p_cur, ok_cur, it_cur, h, m


#: A failed fit's position is its centre of mass where that lies within this many column widths of
#: the seed (at least ``COM_REACH_MIN`` px: seeds given at whole pixels), else the seed. On particles
#: whose thickness background is ten times the columns' contrast the centres of mass of failed fits
#: ran 3.6-5.7 px uphill from seeds 0.3 px from the truth (``datasets.thick_particles(seed=5)``).
COM_REACH_SIGMAS = 0.5
COM_REACH_MIN = 1.0


def _results(img, plan: Plan, mdl: Isotropic | Elliptical, sel, p, ok_fit, it, h, m) -> dict[str, np.ndarray]:
    """The output dict; failed fits fall back to the centre of mass (other values NaN)."""
    x, y = plan.x, plan.y
    cov = invert_batched(h)
    var_x, var_y = cov[:, 0, 0], cov[:, 1, 1]
    with np.errstate(invalid="ignore"):
        x_err, y_err = np.sqrt(var_x), np.sqrt(var_y)
    ok = ok_fit & np.isfinite(x_err) & np.isfinite(y_err) & (m > mdl.k)
    out = {"x": p[:, 0].copy(), "y": p[:, 1].copy()}
    out.update({key: np.array(v, dtype=float) for key, v in mdl.results(p, cov).items()})
    out["x_err"] = x_err
    out["y_err"] = y_err
    with np.errstate(invalid="ignore"):
        out["intensity_err"] = np.sqrt(cov[:, 2, 2])
    if not ok.all():
        bad = np.flatnonzero(~ok)
        sx, sy = x[sel[bad]], y[sel[bad]]
        cx, cy = center_of_mass(img, sx, sy, window=plan.r_first0[sel[bad]])
        # a centre of mass farther than half a column width from the seed was pulled by something
        # else (a thickness slope, a neighbour, a blob of the support): the seed is the better guess
        reach = max(COM_REACH_SIGMAS * float(plan.sigma or 0.0), COM_REACH_MIN)
        far = ~(np.hypot(cx - sx, cy - sy) <= reach)
        cx, cy = np.where(far, sx, cx), np.where(far, sy, cy)
        for key in out:
            out[key][bad] = np.nan
        out["x"][bad] = cx
        out["y"][bad] = cy
    out["fit_ok"] = ok
    out["n_iter"] = it.astype(np.int64)
    out["window"] = plan.final_radius()[sel].astype(float)
    out["joint"] = np.zeros(sel.size, dtype=bool)
    return out


def _empty_result(mdl: Isotropic | Elliptical) -> dict[str, np.ndarray]:
    keys = ["x", "y", "intensity", "amplitude", "background", "x_err", "y_err", "intensity_err", "window"]
    keys += ["sigma"] if mdl.k == 5 else ["sigma_major", "sigma_minor", "theta"]
    out = {k: np.zeros(0) for k in keys}
    out["fit_ok"] = np.zeros(0, dtype=bool)
    out["n_iter"] = np.zeros(0, dtype=np.int64)
    out["joint"] = np.zeros(0, dtype=bool)
    return out


# ----------------------------------------------------------------------------------------------
# checks of the inputs


def check_engine(engine: str, model: str = "gaussian") -> bool:
    """Check the ``engine`` of :func:`refine_gaussian` for ``model``; True where the isotropic passes run compiled.

    Raises
    ------
    InvalidParameterError
        For an engine not in :data:`ENGINES`, or ``"compiled"`` with a model other than ``"gaussian"``.
    """
    if engine not in ENGINES:
        raise InvalidParameterError(f"engine must be one of {ENGINES}; got {engine!r}.")
    if engine == "compiled" and model != "gaussian":
        raise InvalidParameterError(
            f"engine='compiled' fits the isotropic model only; use engine='auto' or 'numpy' for model={model!r}."
        )
    return engine != "numpy"


#: Values of :func:`refine_gaussian`'s ``joint_width``.
JOINT_WIDTHS = ("fitted", "given")

#: Values of :func:`refine_gaussian`'s ``joint``.
JOINT_OPTIONS = ("auto", True, False)


def check_joint(joint: bool | str, model: str = "gaussian") -> None:
    """Check ``joint`` of :func:`refine_gaussian`.

    Raises
    ------
    InvalidParameterError
        For a value not in ``("auto", True, False)``, or ``True`` with a model other than ``"gaussian"``.
    """
    if not any(joint is v or (isinstance(v, str) and joint == v) for v in JOINT_OPTIONS):
        raise InvalidParameterError(f"joint must be 'auto', True or False; got {joint!r}.")
    if joint is True and model != "gaussian":
        raise InvalidParameterError(f"joint=True fits the isotropic model only; got model={model!r}.")


def _check_iterations(max_iter, n_refits, tol) -> None:
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise InvalidParameterError(f"max_iter must be a positive integer; got {max_iter!r}.")
    if n_refits is not None and not (isinstance(n_refits, (int, np.integer)) and n_refits >= 1):
        raise InvalidParameterError(f"n_refits must be None (automatic) or an integer >= 1; got {n_refits!r}.")
    if not (np.isfinite(tol) and tol > 0):
        raise InvalidParameterError(f"tol must be positive; got {tol!r}.")


def _check_sigma(sigma) -> None:
    if sigma is not None and not (np.isfinite(sigma) and sigma > 0):
        raise InvalidParameterError(f"sigma must be a positive width in px; got {sigma!r}.")


def _as_image(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2:
        raise DimensionError(f"image must be 2-D (y, x); got an array of shape {img.shape}.")
    if img.size == 0:
        raise InvalidImageError("image is empty.")
    if not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)):
        raise InvalidImageError(f"image must hold real numbers; got dtype {img.dtype}.")
    return img


def _as_positions(x, y, shape) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise InvalidParameterError(f"x and y must have the same length; got {x.size} and {y.size}.")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        raise InvalidParameterError(
            f"{int(bad.sum())} atom position(s) are NaN or infinite (first at index {int(np.argmax(bad))}); "
            "drop them before refining."
        )
    ny, nx = shape
    out = (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    if out.any():
        i = int(np.argmax(out))
        raise InvalidParameterError(
            f"{int(out.sum())} atom position(s) lie outside the {ny} x {nx} px image (first: index {i} at "
            f"x={x[i]:.3g}, y={y[i]:.3g} px). Positions are in pixels (x = column, y = row); check the units."
        )
    return x, y


def _fit_image(img: np.ndarray) -> np.ndarray:
    """The image the fits read: C-ordered float32 (the precision of the patches), converted once."""
    return np.ascontiguousarray(img, dtype=np.float32)


@contextmanager
def _blas_single_thread() -> Iterator[None]:
    if _threadpool_limits is None:  # pragma: no cover
        yield
    else:
        with _threadpool_limits(limits=1, user_api="blas"):
            yield


def estimate_fit_settings(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    window: float | np.ndarray | None = None,
    sigma: float | None = None,
    noise=None,
    model: str = "gaussian",
    neighbor_subtraction: bool = True,
    max_atoms: int = SETTINGS_ATOMS,
    max_noise_atoms: int = NOISE_ATOMS,
    max_iter: int = 30,
    engine: str = "auto",
) -> dict[str, Any]:
    """Estimate the column width, the noise model and the fit window from a sample of atoms.

    1. A deterministic sample of at most ``max_atoms`` atoms (every k-th atom) is fitted
       unweighted in windows of half the nearest-neighbour distance. The mean width and the
       spread of the true widths between atoms come from a random-effects (DerSimonian-Laird)
       estimate that discounts the fit errors. Where the nearest-neighbour distance is below
       5.5 of those widths, the neighbours' tails may have made them narrow: the width is
       measured again by a joint fit of the 128 columns nearest the middle of the atoms, cut out
       of the image with a border band of 3.5 widths left out, and taken where it differs by
       more than 10 %.
    2. The noise model: up to ``max_noise_atoms`` of them are refitted with their neighbours'
       models subtracted; their squared residuals, each divided by ``1 - leverage`` of its pixel,
       binned by the expected value ``mu`` (column + neighbours + background), are fitted with
       ``variance = gain * mu + offset``.
    3. The final window is the radius that holds 99.5 % of the Fisher information on the
       position of a bright column (90th percentile of the fitted intensities) under that
       noise model (plus half a pixel).

    Parameters
    ----------
    image : 2-D array
        Intensities.
    x, y : arrays (n,)
        Positions of all atoms in pixels (the sample's neighbours are needed).
    window, sigma, noise, model, neighbor_subtraction, max_iter, engine
        As in :func:`refine_gaussian`; a given ``sigma`` or ``noise`` is returned unchanged. The
        noise model is estimated from the residuals of ``model``.
    max_atoms, max_noise_atoms : int
        Sizes of the samples.

    Returns
    -------
    dict
        ``sigma`` (mean column width, px), ``sigma_spread`` (spread of the true widths between
        atoms, px), ``window_radius`` (px), ``gain`` (variance per unit of signal, image units;
        None for ``noise="uniform"``), ``read_noise`` (square root of the positive part of the
        variance offset, image units), ``variance_offset`` and ``variance_floor`` (the smallest
        variance used in the weights), ``sigma_first_pass`` (the weighted mean width of step 1,
        px, which decides which columns are fitted jointly; ``sigma`` itself is measured again by
        a joint fit of a patch of columns where columns may overlap,
        :func:`atomds.core.refine.settings.overlap_width`).
    """
    img = _as_image(image)
    k = intensity_scale(img)
    if k != 1.0:
        st = estimate_fit_settings(
            img / k, x, y, window=window, sigma=sigma, noise=noise_times(parse_noise(noise), 1.0 / k), model=model,
            neighbor_subtraction=neighbor_subtraction, max_atoms=max_atoms, max_noise_atoms=max_noise_atoms,
            max_iter=max_iter, engine=engine,
        )
        return settings_times(st, k)
    x, y = _as_positions(x, y, img.shape)
    if x.size == 0:
        raise InvalidParameterError("no atoms: x and y are empty.")
    _check_sigma(sigma)
    nz = parse_noise(noise)
    mdl = get_model(model)
    compiled = check_engine(engine, model)
    with _blas_single_thread():
        plan = Plan(img, x, y, window, neighbor_subtraction, compiled)
        return estimate_settings(_fit_image(img), plan, sigma, nz, max_atoms, max_noise_atoms, max_iter, mdl.name)


def center_of_mass(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, *, window: float | np.ndarray | None = None, n_iter: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Background-subtracted centre of mass of every atom, vectorised over all atoms.

    Parameters
    ----------
    image : 2-D array
        Intensities (any units).
    x, y : array of float, shape (n,)
        Starting positions in pixels.
    window : float or array (n,), optional
        Radius of the circular window in pixels; default half the nearest-neighbour distance
        (capped at 0.75 of the median nearest-neighbour distance).
    n_iter : int
        Number of re-centring iterations (the window follows the updated centre).

    Returns
    -------
    x, y : ndarray of float64, shape (n,)
        Centres of mass in pixels. The background is the mean of the window's outer ring
        (outside 0.7 of its radius); only the positive excess counts. Atoms with no positive
        excess keep their starting position.
    """
    img = _as_image(image)
    x, y = _as_positions(x, y, img.shape)
    n = x.size
    if n == 0:
        return x.copy(), y.copy()
    r = first_radius(x, y, nearest_neighbor_distance(x, y) if window is None else None, window, img.shape)
    half = int(np.ceil(r.max() + 0.5))
    w = 2 * half + 1
    chunk = chunk_size(w, 5, 0)
    ox, oy = x.copy(), y.copy()
    for _ in range(max(int(n_iter), 1)):
        for c0 in range(0, n, chunk):
            sl = slice(c0, min(c0 + chunk, n))
            xc, yc = ox[sl], oy[sl]
            sx = np.rint(xc).astype(np.int64) - half
            sy = np.rint(yc).astype(np.int64) - half
            d, inside, rows, cols = gather(img, sx, sy, w)
            dx = cols[:, None, :] - xc[:, None, None]
            dy = rows[:, :, None] - yc[:, None, None]
            rr = r[sl][:, None, None]
            mask = inside & (dx * dx + dy * dy <= rr * rr)
            ring = mask & (dx * dx + dy * dy >= (RING_FRACTION * rr) ** 2)
            nring = ring.sum(axis=(1, 2))
            bg = np.where(ring, d, 0.0).sum(axis=(1, 2)) / np.maximum(nring, 1)
            bg = np.where(nring > 0, bg, np.where(mask, d, np.inf).min(axis=(1, 2)))
            s = np.where(mask, np.clip(d - bg[:, None, None], 0.0, None), 0.0)
            tot = s.sum(axis=(1, 2))
            with np.errstate(invalid="ignore", divide="ignore"):
                cx = (s * cols[:, None, :]).sum(axis=(1, 2)) / tot
                cy = (s * rows[:, :, None]).sum(axis=(1, 2)) / tot
            good = (tot > 0) & np.isfinite(cx) & np.isfinite(cy)
            ox[sl] = np.where(good, cx, xc)
            oy[sl] = np.where(good, cy, yc)
    return ox, oy
