"""The noise model of the weights: ``variance = gain * mu + offset`` (Poisson + Gaussian read noise).

``mu`` is the expected value of a pixel (column + neighbours + background), in image units;
``offset = read_noise**2 - gain * dark level``. :func:`parse_noise` reads what a user gives,
:func:`fit_variance` estimates the model from squared residuals binned by ``mu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InvalidParameterError

__all__ = ["Noise", "UNIFORM", "parse_noise", "fit_variance", "noise_times", "settings_times", "fit_times",
           "INTENSITY_KEYS", "pixel_variance"]


@dataclass(frozen=True)
class Noise:
    """variance = gain * mu + offset (offset = read_noise**2 - gain * dark level); uniform if gain is None.

    Attributes
    ----------
    gain : float or None
        Variance per unit of signal (image units); None for unweighted fits.
    offset : float
        Variance at zero signal (image units squared).
    floor : float
        Smallest variance used in the weights (image units squared).
    """

    gain: float | None
    offset: float
    floor: float

    @property
    def uniform(self) -> bool:
        """Unweighted fits (no gain)."""
        return self.gain is None

    def variance(self, mu: np.ndarray) -> np.ndarray:
        """Variance of pixels of expected value ``mu`` (never below ``floor``; ``offset`` when uniform)."""
        gain = 0.0 if self.gain is None else self.gain
        v = gain * mu + self.offset
        return np.maximum(v, self.floor)


#: Unweighted fits (every pixel the same variance).
UNIFORM = Noise(None, 1.0, 1.0)


def parse_noise(noise: Any) -> Noise | None:
    """The noise model a user gives: None -> estimate (returns None); "uniform" -> unweighted;
    (gain, read_noise) or a dict (``gain``, ``read_noise`` or ``variance_offset``, optional
    ``variance_floor``, as :func:`atomds.core.refine.estimate_fit_settings` returns) -> explicit.

    Raises
    ------
    InvalidParameterError
        For anything else, or a negative or non-finite gain.
    """
    if noise is None:
        return None
    if isinstance(noise, Noise):
        return noise
    if isinstance(noise, str):
        if noise == "uniform":
            return UNIFORM
        raise InvalidParameterError(
            f"noise must be None (estimate), 'uniform', (gain, read_noise) or a dict; got {noise!r}."
        )
    if isinstance(noise, dict):
        gain = float(noise.get("gain", 1.0))
        if "variance_offset" in noise:
            off = float(noise["variance_offset"])
        else:
            off = float(noise.get("read_noise", 0.0)) ** 2
        floor = float(noise.get("variance_floor", 0.0))
    else:
        try:
            gain, rn = (float(v) for v in noise)
        except (TypeError, ValueError):
            raise InvalidParameterError(
                f"noise must be None (estimate), 'uniform', (gain, read_noise) or a dict; got {noise!r}."
            ) from None
        off, floor = rn**2, 0.0
    if not (np.isfinite(gain) and gain >= 0 and np.isfinite(off)):
        raise InvalidParameterError(f"noise gain must be >= 0 and finite; got gain={gain}, offset={off}.")
    if floor <= 0:
        # one quantum of signal (gain * gain) plus the offset, at least a tiny positive number
        floor = max(gain * gain * 0.5 + off, 1e-3 * gain * gain, 1e-12 * abs(off), 1e-300)  # relative: any units
        if off > 0:
            floor = max(min(floor, off), 1e-300) if gain == 0 else floor
    return Noise(gain, off, floor)


def pixel_variance(image: np.ndarray) -> float:
    """Variance of the pixel noise, image units squared: the scale of an unweighted fit's chi-square.

    :func:`atomds.core.scales.pixel_noise_sd` squared (Immerkaer's high-pass of the central
    crop, robust, without non-finite pixels and clipped areas); an image without noise gets
    ``(1e-3 * spread of its values)**2`` (:func:`atomds.core.image.value_spread`). Multiplying the
    image by ``k`` multiplies it by ``k**2``.
    """
    from ..image import value_spread
    from ..scales import pixel_noise_sd

    sd = pixel_noise_sd(image)
    if sd > 0 and np.isfinite(sd):
        return sd * sd
    spread = value_spread(image)
    return (1e-3 * spread) ** 2 if spread > 0 else 1.0


def noise_times(nz: Noise | None, k: float) -> Noise | None:
    """The noise model of the image multiplied by ``k``: gain by ``k``, offset and floor by ``k**2``."""
    if nz is None or nz.gain is None:
        return nz
    return Noise(nz.gain * k, nz.offset * k * k, nz.floor * k * k)


#: The keys of a settings dict (:func:`atomds.core.refine.estimate_fit_settings`) in image units,
#: with the power of the intensity each carries.
_SETTINGS_POWERS = {"gain": 1, "read_noise": 1, "variance_offset": 2, "variance_floor": 2}

#: The keys of a fit's results (:func:`atomds.core.refine.refine_gaussian`) in image units.
INTENSITY_KEYS = ("amplitude", "intensity", "background", "intensity_err")


def settings_times(settings: dict[str, Any], k: float) -> dict[str, Any]:
    """The fit settings of the image multiplied by ``k`` (a new dict; lengths unchanged)."""
    out = dict(settings)
    for key, power in _SETTINGS_POWERS.items():
        if out.get(key) is not None:
            out[key] = float(out[key]) * k**power
    return out


def fit_times(res: dict[str, np.ndarray], k: float) -> dict[str, np.ndarray]:
    """The results of a fit of the image multiplied by ``k`` (in place; returns ``res``)."""
    for key in INTENSITY_KEYS:
        if key in res:
            res[key] = res[key] * k
    return res


def fit_variance(mu: np.ndarray, r2: np.ndarray, n_bins: int = 32) -> Noise:
    """Fit variance = gain * mu + offset to squared residuals binned by the model value.

    Parameters
    ----------
    mu : ndarray
        Expected value of each pixel (image units).
    r2 : ndarray
        Its squared residual, leverage-corrected (image units squared).
    n_bins : int
        At most this many bins of equal counts (at least 4, about 200 pixels each).

    Returns
    -------
    Noise
        Weighted least squares over the bins (weights ~ count / variance^2, iterated); a
        negative gain is set to 0; the floor is 5 % of the median binned variance.
    """
    good = np.isfinite(mu) & np.isfinite(r2)
    mu, r2 = mu[good], r2[good]
    if mu.size < 50:
        v = float(np.mean(r2)) if mu.size else 1.0
        v = v if v > 0 else 1.0
        return Noise(0.0, v, 0.05 * v)
    order = np.argsort(mu, kind="stable")
    mu, r2 = mu[order], r2[order]
    nb = int(min(n_bins, max(4, mu.size // 200)))
    edges = np.linspace(0, mu.size, nb + 1).astype(int)
    m_b = np.empty(nb)
    v_b = np.empty(nb)
    c_b = np.empty(nb)
    for b in range(nb):  # loop over a few bins, not atoms
        sl = slice(edges[b], edges[b + 1])
        rr = r2[sl]
        cut = 50.0 * np.median(rr) if rr.size else np.inf
        keep = rr <= cut if cut > 0 else np.ones(rr.size, bool)
        m_b[b] = mu[sl][keep].mean()
        v_b[b] = rr[keep].mean()
        c_b[b] = keep.sum()
    # weighted least squares, weights ~ n / var^2, iterated
    wts = c_b / np.maximum(v_b, 1e-300) ** 2
    gain, off = 0.0, float(np.average(v_b, weights=c_b))
    for _ in range(3):
        a = np.column_stack([m_b, np.ones(nb)]) * np.sqrt(wts)[:, None]
        sol, *_ = np.linalg.lstsq(a, v_b * np.sqrt(wts), rcond=None)
        gain, off = float(sol[0]), float(sol[1])
        if gain < 0:
            gain, off = 0.0, float(np.average(v_b, weights=c_b))
        pred = np.maximum(gain * m_b + off, 0.05 * np.median(v_b))
        wts = c_b / pred**2
    med = float(np.median(v_b))
    floor = max(0.05 * med, 1e-300)
    return Noise(gain, off, floor)
