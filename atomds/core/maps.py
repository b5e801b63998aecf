"""Per-atom values on the image grid, per-cluster FFTs with a periodicity score, and 2-D
histograms of neighbour vectors.

Pure NumPy/SciPy. Positions are in pixels (``x`` = column index, ``y`` = row index, pixel
centres at integer coordinates).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from atomds.errors import InvalidParameterError

__all__ = [
    "nearest_grid",
    "render_points",
    "points_fft",
    "periodicity_score",
    "vector_histogram",
]


def nearest_grid(x, y, values, shape, *, max_distance: float | None = None, rows=None, fill=np.nan) -> np.ndarray:
    """Paint per-atom values on the image grid: each pixel takes the value of its nearest atom.

    The result shows the Voronoi cells of the atoms. Atoms with a non-finite position are
    ignored; atoms with a NaN value paint NaN.

    Parameters
    ----------
    x, y : array (n,)
        Atom positions in pixels.
    values : array (n,)
        Value of each atom (any numeric dtype; the output is float64).
    shape : (ny, nx)
        Image shape.
    max_distance : float, optional
        Pixels farther than this (pixels) from every atom get ``fill`` (e.g. vacuum, or outside
        the atoms' area).
    rows : slice, optional
        Only these image rows (for chunked computation); the output then has their height.
    fill : float
        Value of pixels beyond ``max_distance`` or when there are no atoms.

    Returns
    -------
    ndarray of float64, shape (rows, nx)
    """
    ny, nx = int(shape[0]), int(shape[1])
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    v = np.asarray(values, dtype=float).ravel()
    if not (x.size == y.size == v.size):
        raise InvalidParameterError(f"x, y and values must have the same length, got {x.size}, {y.size}, {v.size}")
    r = np.arange(ny)[rows] if rows is not None else np.arange(ny)
    out = np.full((r.size, nx), fill, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any() or r.size == 0:
        return out
    tree = cKDTree(np.column_stack([x[ok], y[ok]]))
    vv = v[ok]
    cols = np.arange(nx, dtype=float)
    step = max(1, 2_000_000 // max(nx, 1))
    ub = np.inf if max_distance is None else np.nextafter(float(max_distance), np.inf)  # inclusive
    for s in range(0, r.size, step):
        rr = r[s : s + step].astype(float)
        q = np.column_stack([np.tile(cols, rr.size), np.repeat(rr, nx)])
        d, i = tree.query(q, k=1, distance_upper_bound=ub, workers=-1)
        hit = np.isfinite(d)
        block = np.full(q.shape[0], fill, dtype=float)
        block[hit] = vv[i[hit]]
        out[s : s + rr.size] = block.reshape(rr.size, nx)
    return out


def render_points(x, y, shape, *, weights=None) -> np.ndarray:
    """Points as unit masses on the pixel grid, split bilinearly between the 4 nearest pixels.

    Keeps sub-pixel positions (a point at x = 3.25 puts 0.75 on pixel 3 and 0.25 on pixel 4).
    """
    ny, nx = int(shape[0]), int(shape[1])
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(w)
    x, y, w = x[ok], y[ok], w[ok]
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    img = np.zeros(ny * nx)
    for dy_, wy in ((0, 1 - fy), (1, fy)):
        for dx_, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx_, y0 + dy_
            inside = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
            np.add.at(img, yi[inside] * nx + xi[inside], (w * wx * wy)[inside])
    return img.reshape(ny, nx)


def points_fft(x, y, shape) -> np.ndarray:
    """Magnitude of the 2-D FFT of points rendered on the image grid (zero frequency at the centre).

    The rendered points minus their (windowed) mean density are multiplied by a Hann window (no
    leakage from the image edges), then Fourier transformed. Frequencies follow ``numpy.fft.fftshift`` of
    ``numpy.fft.fftfreq(n)`` in cycles per pixel.
    """
    img = render_points(x, y, shape)
    ny, nx = img.shape
    win = np.outer(np.hanning(ny), np.hanning(nx))
    level = (img * win).sum() / max(win.sum(), 1e-300)  # windowed mean: the zero frequency is 0
    img = (img - level) * win
    return np.abs(np.fft.fftshift(np.fft.fft2(img)))


def periodicity_score(magnitude, *, spacing: float, fraction: float = 0.01) -> float:
    """How much of a point pattern's Fourier power lies in sharp peaks (0 = none, 1 = all).

    Power ``|F|^2`` is taken in the annulus of spatial frequencies between ``1 / (4 spacing)`` (below:
    the shape of the region the points fill, and the zero frequency) and ``1.5 / spacing``
    (above: higher harmonics only; the first-order peaks of a lattice with nearest-neighbour
    distance ``spacing`` lie at 1 / spacing to 1.15 / spacing, those of its superstructures lower).
    The score is the share of that power in the brightest ``fraction`` of the annulus pixels. A
    periodic sublattice puts most of its power into Bragg peaks (score near 1); disordered points
    spread it as speckle, whose brightest 1 % of pixels hold about 0.01 * (1 + ln 100) = 0.056 of
    it (exponentially distributed power). Bragg peaks broaden as the area that a cluster fills
    shrinks, so a periodic cluster of a few hundred atoms in a small or fragmented area scores
    lower (0.25 - 0.4) than one filling a large area (0.6 - 0.95): compare clusters of one image
    against the disordered level, about 0.05.

    Parameters
    ----------
    magnitude : ndarray (ny, nx)
        Output of :func:`points_fft` (zero frequency at the centre).
    spacing : float
        Typical nearest-neighbour distance in pixels.
    fraction : float
        Share of the annulus pixels counted as peaks.
    """
    mag = np.asarray(magnitude, dtype=float)
    ny, nx = mag.shape
    fy = np.fft.fftshift(np.fft.fftfreq(ny))
    fx = np.fft.fftshift(np.fft.fftfreq(nx))
    k = np.hypot(fy[:, None], fx[None, :])
    ring = (k >= 0.25 / spacing) & (k <= 1.5 / spacing)
    p = mag[ring] ** 2
    tot = p.sum()
    if p.size == 0 or tot <= 0:
        return 0.0
    n = max(1, int(round(fraction * p.size)))
    top = np.partition(p, p.size - n)[p.size - n :]
    return float(top.sum() / tot)


def vector_histogram(dx, dy, *, bins, extent, labels=None, n_labels=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D histogram of neighbour vectors, overall or per label.

    Parameters
    ----------
    dx, dy : array (...)
        Neighbour vectors (any shape; NaN entries are skipped).
    bins : int or (int, int)
        Number of bins along x and y (``(bins_x, bins_y)``).
    extent : float or (xmin, xmax, ymin, ymax)
        Histogram range; a single number ``r`` means ``(-r, r, -r, r)``.
    labels : array of int, optional
        Label of each vector (same shape as dx); negative labels are skipped.
    n_labels : int, optional
        Number of labels (default ``labels.max() + 1``).

    Returns
    -------
    counts : ndarray, shape (ny_bins, nx_bins), or (n_labels, ny_bins, nx_bins) with labels
    xedges, yedges : ndarray
    """
    dx = np.asarray(dx, dtype=float).ravel()
    dy = np.asarray(dy, dtype=float).ravel()
    if np.ndim(bins) == 0:
        bx = by = int(bins)
    else:
        bx, by = (int(b) for b in bins)
    if bx < 1 or by < 1:
        raise InvalidParameterError(f"bins must be positive, got {bins!r}")
    if np.ndim(extent) == 0:
        e = float(extent)
        if not e > 0:
            raise InvalidParameterError(f"extent must be positive, got {extent!r}")
        extent = (-e, e, -e, e)
    x0, x1, y0, y1 = (float(v) for v in extent)
    if not (x1 > x0 and y1 > y0):
        raise InvalidParameterError(f"extent must be (xmin, xmax, ymin, ymax) with min < max, got {extent!r}")
    xe = np.linspace(x0, x1, bx + 1)
    ye = np.linspace(y0, y1, by + 1)
    ok = np.isfinite(dx) & np.isfinite(dy)
    if labels is None:
        h, _, _ = np.histogram2d(dy[ok], dx[ok], bins=(ye, xe))
        return h, xe, ye
    lab = np.asarray(labels).ravel()
    if lab.size != dx.size:
        raise InvalidParameterError(f"labels must have one entry per vector ({dx.size}), got {lab.size}")
    ok &= lab >= 0
    L = int(n_labels) if n_labels is not None else int(lab[ok].max(initial=-1)) + 1
    le = np.arange(L + 1) - 0.5
    h, _ = np.histogramdd(np.column_stack([lab[ok], dy[ok], dx[ok]]), bins=(le, ye, xe))
    return h, xe, ye
