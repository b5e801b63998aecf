"""The fit settings of an image from a sample of atoms: mean column width, spread of widths, noise model, window.

See :func:`atomds.core.refine.estimate_fit_settings` for the method. Lengths in px, intensities in
image units.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .constants import FINAL_REACH, NOISE_PASS_TOL
from .models import Isotropic, get_model
from .noise import UNIFORM, Noise, fit_variance
from .passes import NeighborModels, first_pass, later_pass
from .plan import Plan, info_radius, sample_indices

__all__ = ["estimate_settings", "width_population", "settings_dict"]


def estimate_settings(
    img: np.ndarray, plan: Plan, sigma: float | None, nz: Noise | None, max_atoms: int, max_noise_atoms: int,
    max_iter: int, model: str = "gaussian",
) -> dict[str, Any]:
    """Estimate the fit settings (:func:`settings_dict`) on ``img`` (float32) and set ``plan``'s width.

    A given ``sigma`` (px) or noise model ``nz`` is kept; the noise model is estimated from the
    residuals of ``model`` (:func:`.noise.fit_variance`), the window from the information in a
    bright column (:func:`.plan.info_radius`).
    """
    sample = sample_indices(plan.x.size, max_atoms)
    p1, ok1, _, err1 = first_pass(img, plan, sample, max_iter, want_errors=True)
    mu, tau = width_population(np.where(ok1, p1[:, 3], np.nan), err1)
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
    return settings_dict(sig, tau, radius, nz)


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


def settings_dict(sig: float, tau: float, radius: float, nz: Noise) -> dict[str, Any]:
    """The settings as :func:`atomds.core.refine.estimate_fit_settings` returns them (see there)."""
    out: dict[str, Any] = {"sigma": sig, "sigma_spread": tau, "window_radius": radius}
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
