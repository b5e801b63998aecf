"""Spikes: hot and dead pixels, cosmic-ray and X-ray hits (pure NumPy + a numba kernel).

A spike is one pixel far above (or below) all eight of its neighbours, by much more than the
noise and much more than an atomic column's own peak stands above its neighbours; or two
adjacent pixels (side by side or diagonal) that both stand so far above (below) the ring of
pixels around the pair. A column is at least a few pixels wide, so its brightest pixel (or its
two brightest, where its centre falls between them) exceeds the pixels around by a fraction of
their spread; a spike exceeds them by many times it. A spike left in the image takes over the
estimates of scale (the clearest "peaks" are spikes, one pixel wide) and pulls every fit it
falls in: two hot pixels side by side on a column held its fit at a width of 0.84 px for 2.7,
26 standard errors off.

Hits of a few pixels (:func:`hit_mask`): a compact group of up to :data:`HIT_MAX_PIXELS`
pixels far brighter than the image's columns, whose edge falls to the background within one
pixel (a column's light falls off over its width). 52 such hits of 3 and 4 pixels in a 512^2
image of 1,400 columns set the column width at 0.73 px and left 18 % of the columns found.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from scipy import ndimage as ndi

from ..errors import InvalidParameterError
from ._threads import run_chunks
from .image import as_float, check_image
from .scales import estimate_noise, noise_model

__all__ = ["spike_mask", "remove_spikes", "spike_record", "SPIKES_RECORDED", "hit_mask"]

#: A spike exceeds all its neighbours by this many noise standard deviations ...
SPIKE_SIGMAS = 8.0
#: ... and exceeds the median of its 3 x 3 neighbourhood by this many times the spread of the
#: neighbourhood (median minus the lowest neighbour): a column of width 0.7 px passes, a spike not
#: (at 0.6 px a few columns in ten thousand lose their peak pixel; narrower ones are undersampled).
SPIKE_CONTRAST = 6.0
#: At most this many spikes are listed by :func:`spike_record` (a step's params stay small; with
#: more, a later step finds them again).
SPIKES_RECORDED = 1000
#: A hit's pixels stand at least this many times as far above the image's median as its 99.5th
#: percentile does (the brightest columns' peaks)...
HIT_FACTOR = 3.0
#: ... in a group of at most this many pixels (8-connected) ...
HIT_MAX_PIXELS = 8
#: ... whose ring of neighbours stands at most this share of the group's lowest pixel above the
#: background around: a column of width 0.6-0.8 px centred on a pixel corner makes a group of
#: four whose ring stands at 0.13-0.22 of them ...
HIT_EDGE = 0.05
#: ... judged only where the group stands at least this many noise sd above the background, so
#: that the ring's noise (a few sd) cannot pass a column's tail for a hit's edge.
HIT_MIN_SD = 80.0


@njit(cache=True, error_model="numpy")
def _sd(a, b, level):  # pragma: no cover - compiled
    """The noise standard deviation at ``level`` (``variance = a + b * I``, floored)."""
    return np.sqrt(max(a + b * max(level, 0.0), 1e-30))


@njit(cache=True, error_model="numpy")
def _test(img, i, j, a, b, k, c, buf):  # pragma: no cover - compiled
    """Whether pixel (i, j) is a spike, with the neighbours that lie in the image: 1 a spike, 2 one
    that may be one of a pair (it stands the margin above (below) all neighbours but one: see
    :func:`_test_pair`), 0 neither."""
    ny, nx = img.shape
    v = img[i, j]
    if not np.isfinite(v):
        return 0
    hi = -np.inf
    hi2 = -np.inf
    lo = np.inf
    lo2 = np.inf
    n = 0
    for di in range(-1, 2):
        for dj in range(-1, 2):
            ii = i + di
            jj = j + dj
            if ii < 0 or ii >= ny or jj < 0 or jj >= nx:
                continue
            w = img[ii, jj]
            if not np.isfinite(w):
                return 0
            buf[n] = w
            n += 1
            if di == 0 and dj == 0:
                continue
            if w > hi:
                hi2 = hi
                hi = w
            elif w > hi2:
                hi2 = w
            if w < lo:
                lo2 = lo
                lo = w
            elif w < lo2:
                lo2 = w
    if n < 4:
        return 0
    # the noise where it is largest: at the highest neighbour for a high spike, at the lowest
    # for a low one
    sd_hi = _sd(a, b, hi)
    sd_lo = _sd(a, b, lo)
    up = v - hi > k * sd_hi
    down = lo - v > k * sd_lo
    if not (up or down):
        pair_up = v - hi2 > k * _sd(a, b, hi2)
        pair_down = lo2 - v > k * _sd(a, b, lo2)
        return 2 if (pair_up or pair_down) else 0
    if n == 9:
        # the neighbourhood's spread less its linear gradient (the least-squares plane through the
        # eight neighbours, which leaves the centre's level as it is): on the flank of a broad column
        # the gradient alone spreads the neighbours by much of the column's peak, and a hot pixel
        # there stood far above every neighbour but within SPIKE_CONTRAST of that spread (4 of 63 in
        # sweep image 1811243250, each pulling its column's fit 8-14 standard errors); a narrow
        # column's peak keeps its spread, which is its curvature, not a gradient
        gx = (buf[2] + buf[5] + buf[8] - buf[0] - buf[3] - buf[6]) / 6.0
        gy = (buf[6] + buf[7] + buf[8] - buf[0] - buf[1] - buf[2]) / 6.0
        hi = -np.inf
        lo = np.inf
        for q in range(9):
            buf[q] -= gx * (q % 3 - 1) + gy * (q // 3 - 1)
            if q != 4:
                hi = max(hi, buf[q])
                lo = min(lo, buf[q])
    srt = np.sort(buf[:n])
    med = srt[n // 2]
    if up and v - med > c * (med - lo):
        return 1
    if down and med - v > c * (hi - med):
        return 1
    return 2  # far above (below) every neighbour but not beyond their spread: its partner may raise it


#: A column's light falls off outwards from its two brightest pixels: the ring's highest pixel
#: stands above the pixel beyond it (one step farther from the pair) by a sizeable part of the
#: pair's height above the ring (about 0.3 of it for a column of width 0.6 px centred between
#: them, 1.0 for 1 px). Around a pair of spikes it does not (on a flat background by no more than
#: the noise, on the flank of a broad column not at all where the flank rises outwards): a pair
#: is one of spikes only where that fall is at most this share of the pair's height above the
#: ring (and the noise). (The whole next ring out holds the neighbouring columns of a dense
#: lattice: against its highest pixel, columns cut by the border passed for pairs.)
PAIR_FALLOFF = 0.1


@njit(cache=True, error_model="numpy")
def _test_pair(img, i, j, a, b, k, c, ring):  # pragma: no cover - compiled
    """Whether pixel (i, j) is one of a pair of spikes: with its highest (lowest) neighbour, both
    stand more than ``k`` noise standard deviations above (below) every pixel of the ring around
    the pair and more than ``c`` times the ring's spread beyond its median (as :func:`_test`),
    and the ring's highest pixel does not stand above the pixel beyond it (:data:`PAIR_FALLOFF`),
    as the pixels around a narrow column's two brightest do."""
    ny, nx = img.shape
    v = img[i, j]
    if not np.isfinite(v) or i < 1 or j < 1 or i >= ny - 1 or j >= nx - 1:
        return False
    for sign in (1.0, -1.0):
        # the partner: the neighbour farthest in the direction of the spike
        best = -np.inf
        pi = -1
        pj = -1
        for di in range(-1, 2):
            for dj in range(-1, 2):
                ii = i + di
                jj = j + dj
                if (di == 0 and dj == 0) or ii < 0 or ii >= ny or jj < 0 or jj >= nx:
                    continue
                w = sign * img[ii, jj]
                if not np.isfinite(w):
                    return False
                if w > best:
                    best = w
                    pi = ii
                    pj = jj
        if pi < 1 or pj < 1 or pi >= ny - 1 or pj >= nx - 1:
            # pairs are judged by the whole ring around them: on the outermost rows and columns a
            # column cut by the border looks like one (its light falls off into the image)
            continue
        inner = min(sign * v, best)  # the weaker of the pair
        n = 0
        top = -np.inf
        ti = -1
        tj = -1
        for ii in range(min(i, pi) - 1, max(i, pi) + 2):
            for jj in range(min(j, pj) - 1, max(j, pj) + 2):
                if ii < 0 or ii >= ny or jj < 0 or jj >= nx or (ii == i and jj == j) or (ii == pi and jj == pj):
                    continue
                # the ring: pixels next to either of the pair
                if abs(ii - i) > 1 or abs(jj - j) > 1:
                    if abs(ii - pi) > 1 or abs(jj - pj) > 1:
                        continue
                w = sign * img[ii, jj]
                if not np.isfinite(w):
                    return False
                ring[n] = w
                n += 1
                if w > top:
                    top = w
                    ti = ii
                    tj = jj
        if n < 6:
            continue
        sd = _sd(a, b, sign * top)  # the noise at the ring's extreme pixel
        if inner - top <= k * sd:
            continue
        srt = np.sort(ring[:n])
        med = srt[n // 2]
        if not inner - med > c * (med - srt[0]):
            continue
        # the pixel beyond the ring's highest, one step farther from the pair (from the nearer
        # of the two): the two brightest pixels of an undersampled column pass the tests above at
        # high dose, but the light of its ring falls off outwards, that of a pair's ring does not
        qi, qj = (i, j) if max(abs(ti - i), abs(tj - j)) <= 1 else (pi, pj)
        bi, bj = ti + (ti - qi), tj + (tj - qj)
        if bi < 0 or bi >= ny or bj < 0 or bj >= nx or not np.isfinite(img[bi, bj]):
            continue
        # (the ring's highest pixel is the highest of ten or more: it stands above a pixel of the
        # same level by about two noise standard deviations)
        if top - sign * img[bi, bj] <= PAIR_FALLOFF * (inner - top) + 2.0 * sd:
            return True
    return False


@njit(cache=True, nogil=True, error_model="numpy")
def _k_spikes(r0, r1, img, a, b, k, c, out):  # pragma: no cover - compiled
    ny, nx = img.shape
    buf = np.empty(9, dtype=np.float64)
    ring = np.empty(16, dtype=np.float64)
    gap0 = k * np.sqrt(max(a, 1e-30))  # the smallest margin a spike can have
    flag = np.zeros(nx, dtype=np.bool_)
    for i in range(max(r0, 1), min(r1, ny - 1)):
        row = img[i]
        # a first sweep without branches (vectorised): a spike stands the smallest margin above
        # (below) one of its two neighbours along the row at least; almost every pixel fails
        for j in range(1, nx - 1):
            v = row[j]
            wl = row[j - 1]
            wr = row[j + 1]
            flag[j] = (v - wl > gap0) | (v - wr > gap0) | (wl - v > gap0) | (wr - v > gap0)
        for j in range(1, nx - 1):
            if not flag[j]:
                continue
            v = img[i, j]
            # a spike stands the smallest margin above (below) at least three of its four nearest
            # neighbours (all four for a single spike, three for one of a pair)
            wl = img[i, j - 1]
            wr = img[i, j + 1]
            ul = v - wl > gap0
            ur = v - wr > gap0
            dl = wl - v > gap0
            dr = wr - v > gap0
            if not ((ul and ur) or (dl and dr)):
                wu = img[i - 1, j]
                wd = img[i + 1, j]
                if not (((ul or ur) and v - wu > gap0 and v - wd > gap0)
                        or ((dl or dr) and wu - v > gap0 and wd - v > gap0)):
                    continue
            t = _test(img, i, j, a, b, k, c, buf)
            if t == 1 or (t == 2 and _test_pair(img, i, j, a, b, k, c, ring)):
                out[i, j] = True


@njit(cache=True, error_model="numpy")
def _k_spikes_border(img, a, b, k, c, out):  # pragma: no cover - compiled
    """The test of :func:`_k_spikes` on the outermost rows and columns, with the neighbours there are."""
    ny, nx = img.shape
    buf = np.empty(9, dtype=np.float64)
    for i in range(ny):
        step = 1 if (i == 0 or i == ny - 1) else max(nx - 1, 1)
        for j in range(0, nx, step):
            if _test(img, i, j, a, b, k, c, buf) == 1:
                out[i, j] = True


def _spike_input(image) -> np.ndarray:
    """``image`` as it is when it is already a 2-D floating-point array (no scan, no copy: its NaN
    pixels are never spikes and stay as they are), else checked by :func:`check_image`."""
    arr = np.asarray(image)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
        return arr
    return check_image(arr)


def spike_mask(image, *, noise: tuple[float, float] | None = None, sigmas: float = SPIKE_SIGMAS,
               contrast: float = SPIKE_CONTRAST) -> np.ndarray:
    """Pixels that are spikes of one or two pixels (hot or dead pixels, particle hits), and the pixels of
    compact hits of up to :data:`HIT_MAX_PIXELS` pixels, bright or dark (:func:`hit_mask`; ``sigmas``
    and ``contrast`` do not apply to those).

    A pixel is a spike when it lies more than ``sigmas`` noise standard deviations above the
    largest (or below the smallest) of its eight neighbours, and more than ``contrast`` times the
    spread of its 3 x 3 neighbourhood (median minus smallest, or largest minus median) away from
    the median. Two adjacent pixels (side by side or diagonal) are both spikes when the weaker of
    them passes the same two tests against the ring of the pixels next to either of them, and
    the ring's highest pixel stands no higher above the pixel beyond it than the noise and a
    tenth of the pair's height above the ring (:data:`PAIR_FALLOFF`): around a narrow column's
    two brightest pixels the light falls off outwards. The noise standard deviation (at the highest neighbour
    for a high spike, at the lowest for a low one) comes from ``noise`` (``variance = a + b * I``; estimated with
    :func:`~atomds.core.scales.noise_model` when None), with ``a`` at least a quarter of the
    image's overall noise variance (:func:`~atomds.core.scales.estimate_noise`). On the
    outermost rows and columns the neighbours inside the image are used. One compiled pass over
    the image, on a pool of threads.

    Parameters
    ----------
    image : 2-D array
        A floating-point image is used as it is (NaN pixels are never spikes, nor are their
        neighbours judged against them); any other is checked with
        :func:`~atomds.core.image.check_image` first.
    noise : (a, b), optional
        Noise model: variance ``a + b * intensity`` (intensity units squared and intensity units).
    sigmas, contrast : float
        The two thresholds above.

    Returns
    -------
    bool array, the image's shape

    Raises
    ------
    InvalidImageError
        The noise has to be estimated and the estimation crop holds NaN or is constant.
    """
    if not (np.isfinite(sigmas) and sigmas > 0 and np.isfinite(contrast) and contrast > 0):
        raise InvalidParameterError(f"sigmas and contrast must be positive, got {sigmas!r}, {contrast!r}.")
    return _spike_mask(_spike_input(image), noise, sigmas, contrast)


def _spike_mask(img: np.ndarray, noise, sigmas: float = SPIKE_SIGMAS, contrast: float = SPIKE_CONTRAST) -> np.ndarray:
    """:func:`spike_mask` of a float image."""
    a, b = noise_model(img) if noise is None else (float(noise[0]), float(noise[1]))
    # a floor under the noise: a fitted model can put the read noise at zero, and then a pixel
    # at the bottom of the shot noise would pass as a dead pixel
    a = max(a, (0.5 * estimate_noise(img)) ** 2)
    out = np.zeros(img.shape, dtype=bool)
    data = np.ascontiguousarray(as_float(img))
    run_chunks(_k_spikes, img.shape[0], data, float(a), float(b), float(sigmas), float(contrast), out,
               min_chunk=64, chunks_per_thread=4, max_threads=8)
    _k_spikes_border(data, float(a), float(b), float(sigmas), float(contrast), out)
    # hits both ways: a cosmic ray is dark in an ABF image turned over (turned over, the intensities
    # are negative: the ring gets the model's floor ``a``, at least a quarter of the overall noise)
    out |= _hit_mask(data, (a, b), 1.0)
    out |= _hit_mask(data, (a, 0.0), -1.0)
    return out


def hit_mask(image, noise: tuple[float, float] | None = None) -> np.ndarray:
    """Pixels of compact hits: groups of up to :data:`HIT_MAX_PIXELS` pixels far brighter than the columns.

    Candidates stand more than :data:`HIT_FACTOR` times as far above the image's median as its
    99.5th percentile (from a sample of at most 250,000 pixels); a connected group of them is a
    hit when its lowest pixel stands at least :data:`HIT_MIN_SD` noise sd above the median of the
    pixels beyond (within three pixels) and the ring of pixels around it no more than
    :data:`HIT_EDGE` of that: a column, however bright (a heavy atom on a light support), falls
    off over its width. Bright hits only (:func:`spike_mask` also looks at the image turned over).

    Parameters
    ----------
    image : 2-D float array (NaN pixels are never hits)
    noise : (a, b), optional
        Noise model ``variance = a + b * intensity``; without it every group is judged by its ring.

    Returns
    -------
    bool array, the image's shape
    """
    return _hit_mask(np.asarray(image), noise, 1.0)


def _hit_mask(img: np.ndarray, noise: tuple[float, float] | None, sign: float) -> np.ndarray:
    """:func:`hit_mask` of ``sign * img`` (-1: dark hits), without a negated copy of the image."""
    ny, nx = img.shape
    out = np.zeros(img.shape, dtype=bool)
    step = max(1, int(np.sqrt(img.size / 250_000)))
    sample = img[::step, ::step]
    sample = sign * sample[np.isfinite(sample)].astype(np.float64)
    if sample.size == 0:
        return out
    med, hi = float(np.median(sample)), float(np.percentile(sample, 99.5))
    if not hi > med:
        return out
    level = med + HIT_FACTOR * (hi - med)
    with np.errstate(invalid="ignore"):
        # -img > level is img < -level (a sign flip is exact)
        cand = img > level if sign > 0 else img < -level
    if not cand.any():
        return out
    lab, _ = ndi.label(cand, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(lab.ravel())
    ring3 = np.ones((3, 3), dtype=bool)
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None or sizes[k] > HIT_MAX_PIXELS:
            continue
        y0, y1 = max(sl[0].start - 3, 0), min(sl[0].stop + 3, ny)
        x0, x1 = max(sl[1].start - 3, 0), min(sl[1].stop + 3, nx)
        box = sign * img[y0:y1, x0:x1].astype(np.float64)
        comp = lab[y0:y1, x0:x1] == k
        grown = ndi.binary_dilation(comp, ring3)
        beyond = box[~grown & np.isfinite(box)]
        ring = box[grown & ~comp]
        if beyond.size == 0 or not np.isfinite(ring).all():
            continue
        bg = float(np.median(beyond))
        low = float(box[comp].min()) - bg
        sd = 0.0 if noise is None else float(np.sqrt(max(noise[0] + noise[1] * max(bg, 0.0), 0.0)))
        if low > 0 and low >= HIT_MIN_SD * sd and float(ring.max()) - bg <= HIT_EDGE * low:
            out[y0:y1, x0:x1] |= comp
    return out


def remove_spikes(image, *, noise: tuple[float, float] | None = None, fill: str = "median"):
    """The image with its spikes replaced, and their mask.

    Parameters
    ----------
    image : 2-D array
        A floating-point image is used as it is, without another scan or copy (NaN pixels are
        allowed and stay NaN); any other is checked with :func:`~atomds.core.image.check_image`.
    noise : (a, b), optional
        Noise model (see :func:`spike_mask`).
    fill : {"median", "nan"}
        Replace each spike by the median of its eight neighbours, or by NaN (pixels that fits
        leave out).

    Returns
    -------
    cleaned : ndarray
        A float copy when there are spikes; the (float) input itself otherwise.
    mask : bool ndarray

    Raises
    ------
    InvalidParameterError
        ``fill`` is neither "median" nor "nan".
    InvalidImageError
        The noise has to be estimated and the estimation crop holds NaN or is constant.
    """
    if fill not in ("median", "nan"):
        raise InvalidParameterError(f"fill must be 'median' or 'nan', got {fill!r}.")
    img = _spike_input(image)
    mask = _spike_mask(img, noise)
    if not mask.any():
        return img, mask
    out = as_float(img).copy()
    iy, ix = np.nonzero(mask)
    if fill == "nan":
        out[iy, ix] = np.nan
        return out, mask
    # median of the eight neighbours (spikes among them excluded where possible)
    ny, nx = img.shape
    offs = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj]
    yy = np.stack([iy + di for di, _ in offs], axis=1)
    xx = np.stack([ix + dj for _, dj in offs], axis=1)
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
    nb = img[yy, xx].astype(np.float64)
    nb = np.where(inside & ~mask[yy, xx], nb, np.nan)
    fillv = np.nanmedian(np.where(np.isnan(nb).all(axis=1, keepdims=True), 0.0, nb), axis=1)
    out[iy, ix] = fillv
    return out, mask


def _remove_spikes(img: np.ndarray, noise=None, fill: str = "median"):
    """Old private spelling of :func:`remove_spikes`, kept only until ``core/refine`` calls the public one."""
    return remove_spikes(img, noise=noise, fill=fill)


def spike_record(mask: np.ndarray, limit: int = SPIKES_RECORDED) -> list[list[int]] | None:
    """The spikes of ``mask`` as ``[[row, column], ...]`` for a step's params; None when there are more than ``limit``."""
    n = int(np.count_nonzero(mask))  # counted first: listing the pixels of a large mask costs more
    if n > limit:
        return None
    if n == 0:
        return []
    iy, ix = np.nonzero(mask)
    return [[int(a), int(b)] for a, b in zip(iy, ix)]
