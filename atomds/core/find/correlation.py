"""Correlation of templates with the image: the zero-normalised cross-correlation map and its z-score.

The whole-image maps use real FFTs in float32 (the template's spectrum from a separable
decomposition) and running window sums of the image and its square (compiled with numba, rows
split between threads); near the border only the part of the window inside the image counts (a
masked correlation), so that columns at the edge correlate as well as interior ones. At a few
chosen pixels (the blobs' peaks) :func:`match_at` gives the same correlation and the template's
least-squares amplitude directly. Positions are in pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from numba import njit, types
from numba.extending import intrinsic
from scipy import ndimage as ndi

from .._threads import n_threads, run_all, run_chunks
from ..image import check_image
from .templates import check_template

try:  # a dependency of scikit-learn
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover
    _threadpool_limits = None

__all__ = [
    "CorrelationParts",
    "correlate",
    "best_correlation",
    "correlation_map",
    "local_maxima",
    "sampled_maxima",
    "tiled_correlation",
    "match_at",
    "amplitudes_at",
]


@dataclass
class CorrelationParts:
    """Correlation maps of one template with the image."""

    ncc: np.ndarray  # zero-normalised cross-correlation, float32 (ny, nx)
    zscore: np.ndarray  # matched-filter amplitude over its noise, float32 (ny, nx)


def _separable_spectra(kernel: np.ndarray, fy: int, fx: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D spectra of the separable terms of a small ``kernel`` zero-padded to (fy, fx).

    The kernel is split into separable terms (singular value decomposition, terms below 1e-7 of
    the largest dropped), so that its rfft2 is ``sum_j a[:, j] b[j, :]``: ``a`` (fy, r) and ``b``
    (r, fx // 2 + 1), complex64.
    """
    k = np.asarray(kernel, dtype=np.float64)
    u, sv, vt = np.linalg.svd(k, full_matrices=False)
    r = max(1, int(np.sum(sv > 1e-7 * sv[0]))) if sv[0] > 0 else 1
    a = sfft.fft(u[:, :r] * sv[:r], n=fy, axis=0).astype(np.complex64)  # (fy, r)
    b = sfft.rfft(vt[:r], n=fx, axis=1).astype(np.complex64)  # (r, fx // 2 + 1)
    return a, b


@intrinsic
def _fma32(typingctx, a, b, c):  # pragma: no cover - compiled
    """``a * b + c`` rounded once (float32 fused multiply-add, ``llvm.fma``: exact on every processor)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _cmul(x, y):  # pragma: no cover - compiled
    """complex64 product with fused multiply-adds, ``(fma(xr, yr, -xi yi), fma(xr, yi, xi yr))``: the
    operations of NumPy's SIMD complex multiplication on processors with FMA, so its numbers there."""
    xr, xi, yr, yi = x.real, x.imag, y.real, y.imag
    return np.complex64(complex(_fma32(xr, yr, -(xi * yi)), _fma32(xr, yi, xi * yr)))


@njit(cache=True, nogil=True, error_model="numpy")
def _k_kernel_spectrum(a, b):  # pragma: no cover - compiled
    """``sum_j a[:, j] b[j]`` (fy, nk), complex64: the spectrum of a kernel from its separable terms
    (:func:`_separable_spectra`), each element's terms added in order in complex64 with fused
    multiply-adds (never by a BLAS product, whose result depends on its thread count)."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.complex64)
    for i in range(a.shape[0]):
        row = out[i]
        for k in range(b.shape[1]):
            row[k] = _cmul(a[i, 0], b[0, k])
        for j in range(1, a.shape[1]):
            for k in range(b.shape[1]):
                row[k] += _cmul(a[i, j], b[j, k])
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _k_times(kern, spec, out):  # pragma: no cover - compiled
    """``out = kern * spec`` element by element (complex64, :func:`_cmul`; ``out`` may be ``spec``)."""
    fy, nk = spec.shape
    for i in range(fy):
        kr = kern[i]
        sp = spec[i]
        row = out[i]
        for k in range(nk):
            row[k] = _cmul(kr[k], sp[k])


def _window_stats(t: np.ndarray, ny: int, nx: int, rows: np.ndarray, cols: np.ndarray):
    """Per-position sums of the template over the part of its window inside the image.

    For output pixels ``(rows[k], cols[k])`` (the template centre), returns ``n_in``,
    ``sum_in t`` and ``sum_in t^2`` over the template pixels that fall inside the image.
    """
    th, tw = t.shape
    hy, hx = th // 2, tw // 2
    a = np.maximum(0, hy - rows)  # first template row inside
    b = np.minimum(th - 1, hy + (ny - 1 - rows))  # last
    c = np.maximum(0, hx - cols)
    d = np.minimum(tw - 1, hx + (nx - 1 - cols))

    def box(arr):
        cs = np.zeros((th + 1, tw + 1))
        cs[1:, 1:] = arr.cumsum(0).cumsum(1)
        return cs[b + 1, d + 1] - cs[a, d + 1] - cs[b + 1, c] + cs[a, c]

    return box(np.ones_like(t)), box(t), box(t * t)


# ----------------------------------------------------------------------------------------------
# compiled passes (numba) for :func:`correlate`: the window sums of the image and its square by
# running sums (float64, instead of two full-size FFT filterings), and the NCC / z-score maps in
# one pass each fusing several numpy passes (same float32 operations in the same order); the rows
# are split between a few threads (the kernels release the GIL).


def _row_threads(kernel, n: int, *args) -> None:
    """Run ``kernel(start, stop, *args)`` over rows ``range(n)`` in chunks on a pool of threads."""
    run_chunks(kernel, n, *args, min_chunk=64, chunks_per_thread=4, max_threads=8)


@njit(cache=True, nogil=True, error_model="numpy")
def _k_ncc(r0, r1, num, var, s1, floor, tnorm, use_z, zb, za, zfloor, ncc, z):  # pragma: no cover
    """ncc = num / (sqrt(max(var, floor)) tnorm) clipped to [-1, 1]; z = num / (sqrt(max(s1 zb + za, zfloor)) tnorm).

    Branch-free inner loops over a row (selects, not jumps), which the compiler turns into SIMD
    instructions: the same IEEE square roots and divisions, several pixels at a time.
    """
    one = np.float32(1.0)
    nx = num.shape[1]
    for i in range(r0, r1):
        nr = num[i]
        vr = var[i]
        out = ncc[i]
        for j in range(nx):
            v = vr[j]
            v = floor if floor > v else v  # (NaN stays NaN, as max() keeps it)
            c = nr[j] / (np.sqrt(v) * tnorm)
            c = one if c > one else c
            out[j] = -one if c < -one else c
        if use_z:
            sr = s1[i]
            zr = z[i]
            for j in range(nx):
                lm = sr[j] * zb + za
                lm = zfloor if zfloor > lm else lm
                zr[j] = nr[j] / (np.sqrt(lm) * tnorm)


@njit(cache=True, nogil=True, error_model="numpy")
def _k_boxstats(r0, r1, img, mean, th, tw, s1, var, smax):  # pragma: no cover - compiled
    """Window sums of ``img - mean`` (zero outside the image) and ``n`` times the local variance.

    For output rows r0:r1, the (th, tw) window with its centre (th // 2, tw // 2) on the pixel:
    ``s1 = sum (p - mean)``, ``var = sum (p - mean)^2 - s1^2 / n`` (float64 sums, stored float32);
    the largest ``sum (p - mean)^2`` of these rows goes to ``smax[r0]``. The sums down each
    column of the window's rows are kept running (a row entering added, the row leaving taken off:
    loops over whole rows, which the compiler runs several pixels at a time), and the sums across
    are differences of their prefix sums along the row (one running sum per output row, where a
    running window sum along every image row took two dependent steps per pixel: 0.15 s against
    0.09 s on one thread at 4096^2).
    """
    ny, nx = img.shape
    hy = th // 2
    hx = tw // 2
    n = float(th * tw)
    c1 = np.zeros(nx)
    c2 = np.zeros(nx)
    p1 = np.zeros(nx + 1)
    p2 = np.zeros(nx + 1)
    lo = np.empty(nx, dtype=np.int64)  # each output column's window, clipped to the image
    hi = np.empty(nx, dtype=np.int64)
    for j in range(nx):
        lo[j] = max(j - hx, 0)
        hi[j] = min(j - hx + tw, nx)
    for r in range(max(0, r0 - hy), min(ny, r0 - hy + th)):
        for j in range(nx):
            d = np.float64(img[r, j]) - mean
            c1[j] += d
            c2[j] += d * d
    top = 0.0
    for i in range(r0, r1):
        if i > r0:
            r = i - hy + th - 1  # the row entering
            if r < ny:
                for j in range(nx):
                    d = np.float64(img[r, j]) - mean
                    c1[j] += d
                    c2[j] += d * d
            q = i - hy - 1  # the row leaving
            if q >= 0:
                for j in range(nx):
                    d = np.float64(img[q, j]) - mean
                    c1[j] -= d
                    c2[j] -= d * d
        a = 0.0
        b = 0.0
        for j in range(nx):
            a += c1[j]
            b += c2[j]
            p1[j + 1] = a
            p2[j + 1] = b
        for j in range(nx):
            a1 = p1[hi[j]] - p1[lo[j]]
            s1[i, j] = a1
            var[i, j] = p2[hi[j]] - p2[lo[j]] - a1 * a1 / n
        for j in range(nx):
            a2 = p2[hi[j]] - p2[lo[j]]
            top = a2 if a2 > top else top
    smax[r0] = top


@dataclass
class _Stats:
    """Window sums shared by every template of one shape (zero outside the image)."""

    s1: np.ndarray  # sum of (image - mean) over the in-image window, float32
    var: np.ndarray  # n * local variance over the window (interior definition), float32
    floor: np.float32  # smallest local variance trusted (float32 round-off of the FFT)


def correlate(image: np.ndarray, templates: list[np.ndarray], noise: tuple[float, float] | None,
               workers: int | None = None) -> list[CorrelationParts]:
    """Zero-normalised cross-correlation of each template with ``image`` (same-size maps).

    The centre of template ``t`` (index ``t.shape // 2``) sits on each pixel. Near the border
    only the part of the window inside the image counts (a masked correlation: local means,
    variances and the template's own mean and norm are taken over that part), so columns at
    the edge correlate as well as interior ones. When ``noise`` = (a, b) is given, also the
    z-score of the template amplitude, ``sum (p - mean p)(t - mean t) / (|t - mean t| sqrt(a + b
    mean p))``.
    """
    ny, nx = image.shape
    mean = float(np.mean(image, dtype=np.float64))
    img32 = np.ascontiguousarray(image, dtype=np.float32)
    tzs = [t - t.mean() for t in templates]
    nums = tiled_correlation(img32, np.float32(mean), tzs, workers=workers)
    out = []
    cache: dict[tuple[int, int], _Stats] = {}
    for t, tz, num in zip(templates, tzs, nums):
        th, tw = t.shape
        n = np.float32(th * tw)
        if (th, tw) not in cache:
            # window sums of (p - mean) and (p - mean)^2 by running sums (separable box)
            s1 = np.empty((ny, nx), dtype=np.float32)
            var = np.empty((ny, nx), dtype=np.float32)
            smax = np.zeros(ny)
            _row_threads(_k_boxstats, ny, img32, np.float32(mean), th, tw, s1, var, smax)
            # float32 FFT round-off of the correlation is ~1e-6 of the largest local energy:
            # flatter windows are flat
            floor = np.float32(1e-5 * max(float(np.float32(smax.max())), 1e-30))
            cache[(th, tw)] = _Stats(s1, var, floor)
        st = cache[(th, tw)]
        tnorm = np.float32(np.sqrt(np.sum(tz * tz)))
        ncc = np.empty((ny, nx), dtype=np.float32)
        if noise is not None:
            a, b = noise
            z = np.empty((ny, nx), dtype=np.float32)
            zb, za, zfloor = np.float32(b / float(n)), np.float32(a + b * mean), np.float32(1e-12 + 1e-6 * a)
        else:
            z = np.zeros((0, 0), dtype=np.float32)
            zb = za = zfloor = np.float32(0.0)
        _row_threads(_k_ncc, ny, num, st.var, st.s1, np.float32(st.floor), tnorm, noise is not None,
                     zb, za, zfloor, ncc, z if noise is not None else ncc)
        _fix_border(ncc, z, num, st, t, mean, noise, th // 2, tw // 2)
        out.append(CorrelationParts(ncc, z))
    return out


#: Output rows and columns of one tile of :func:`tiled_correlation` (before the halo; the tile's
#: transform is the next fast length of this and the halo, cut back so the transform stays fast).
CORRELATION_TILE = 1024


def tiled_correlation(image: np.ndarray, mean: np.float32, kernels: list[np.ndarray],
                      workers: int | None = None, tile: int = CORRELATION_TILE) -> list[np.ndarray]:
    """``sum_ab k[a, b] (I - mean)[i + a - kh // 2, j + b - kw // 2]`` for each kernel ``k``, zero outside the image.

    Same-size float32 maps (the kernel's centre ``shape // 2`` on each pixel), by real FFTs of
    overlapping tiles (overlap-save: each tile's transform holds its output block and a halo of
    the largest kernel's half-size, so no wrap-around reaches the block). The kernel's spectrum
    comes from its separable terms (:func:`_k_kernel_spectrum`). Tiles run on ``workers`` threads
    (all by default, at most :func:`~atomds.core._threads.n_threads`), each transform on one, so the
    numbers do not depend on the thread count;
    an image that fits one tile (``tile`` px a side, before the halo) is transformed whole, with
    the FFT's own threads.
    """
    ny, nx = image.shape
    hy = max(k.shape[0] for k in kernels) // 2
    hx = max(k.shape[1] for k in kernels) // 2
    threads = n_threads() if workers is None or workers < 1 else min(int(workers), n_threads())
    fy = sfft.next_fast_len(min(ny, tile) + 2 * hy, real=True)
    fx = sfft.next_fast_len(min(nx, tile) + 2 * hx, real=True)
    by, bx = fy - 2 * hy, fx - 2 * hx  # output block of one tile
    blocks = [(i0, j0) for i0 in range(0, ny, by) for j0 in range(0, nx, bx)]
    # each kernel's spectrum once (the tiles share it)
    spectra = [_k_kernel_spectrum(np.conj(a), np.conj(b)) for a, b in (_separable_spectra(k, fy, fx) for k in kernels)]
    offsets = [(hy - k.shape[0] // 2, hx - k.shape[1] // 2) for k in kernels]
    out = [np.empty((ny, nx), dtype=np.float32) for _ in kernels]

    def block(i0: int, j0: int, fft_workers: int) -> None:
        i1, j1 = min(i0 + by, ny), min(j0 + bx, nx)
        pad = np.zeros((fy, fx), dtype=np.float32)
        # image rows i0 - hy ..., columns j0 - hx ... at the tile's origin (zero outside the image)
        r0, r1 = max(i0 - hy, 0), min(i1 + hy, ny)
        c0, c1 = max(j0 - hx, 0), min(j1 + hx, nx)
        dst = pad[r0 - (i0 - hy) : r1 - (i0 - hy), c0 - (j0 - hx) : c1 - (j0 - hx)]
        np.subtract(image[r0:r1, c0:c1], mean, out=dst)
        spec = sfft.rfft2(pad, workers=fft_workers)
        buf = spec if len(kernels) == 1 else np.empty_like(spec)
        for kern, (oy, ox), num in zip(spectra, offsets, out):
            _k_times(kern, spec, buf)
            full = sfft.irfft2(buf, s=(fy, fx), workers=fft_workers, overwrite_x=True)
            num[i0:i1, j0:j1] = full[oy : oy + i1 - i0, ox : ox + j1 - j0]

    if len(blocks) == 1:
        block(blocks[0][0], blocks[0][1], threads)
    else:
        run_all([(block, (i0, j0, 1)) for i0, j0 in blocks], threads)
    return out


def _fix_border(ncc, z, num, st: _Stats, t, mean, noise, hy, hx):
    """Recompute the masked correlation (and z-score) in the strips where the window leaves the image."""
    ny, nx = ncc.shape
    strips = [(slice(0, min(hy, ny)), slice(0, nx)), (slice(max(ny - hy, 0), ny), slice(0, nx)),
              (slice(0, ny), slice(0, min(hx, nx))), (slice(0, ny), slice(max(nx - hx, 0), nx))]
    tbar = float(t.mean())
    for sy, sx in strips:
        rows, cols = np.mgrid[sy, sx]
        if rows.size == 0:
            continue
        n_in, t_in, t2_in = _window_stats(t, ny, nx, rows.ravel(), cols.ravel())
        n_in, t_in, t2_in = (v.reshape(rows.shape) for v in (n_in, t_in, t2_in))
        s1 = st.s1[sy, sx].astype(np.float64)
        # num was computed with the zero-mean template: add back the part of its mean inside
        nm = num[sy, sx].astype(np.float64) + s1 * (tbar - t_in / n_in)
        # s2 from the stored interior variance: var = s2 - s1^2 / n  =>  s2 = var + s1^2 / n
        n_full = float(t.size)
        s2 = st.var[sy, sx].astype(np.float64) + s1 * s1 / n_full
        vp = np.maximum(s2 - s1 * s1 / n_in, float(st.floor))
        vt = np.maximum(t2_in - t_in * t_in / n_in, 1e-300)
        ncc[sy, sx] = np.clip((nm / np.sqrt(vp * vt)).astype(np.float32), -1.0, 1.0)
        if noise is not None and z.size:
            a, b = noise
            lm = s1 / n_in + mean
            sd = np.sqrt(np.maximum(a + b * lm, 1e-12 + 1e-6 * a))
            z[sy, sx] = (nm / (np.sqrt(vt) * sd)).astype(np.float32)


def correlation_map(image, template) -> np.ndarray:
    """Zero-normalised cross-correlation of ``template`` with ``image``, values in [-1, 1].

    ``C(p) = sum (I - mean I)(t - mean t) / (|I - mean I| |t - mean t|)`` over the template
    window centred on pixel ``p`` (the template's centre is ``shape // 2``); the image is
    reflected beyond its edges. Computed with float32 real FFTs and box sums (the local mean and
    variance), never pixel by pixel. Where the image is flat to within float32 round-off the
    correlation is 0.

    Returns
    -------
    ndarray of float32, same shape as ``image``
    """
    img = check_image(image)
    t = check_template(template, img.shape)
    return correlate(img, [t], None)[0].ncc


def local_maxima(c: np.ndarray, idx: np.ndarray, nx: int) -> np.ndarray:
    """Which of the flat indices ``idx`` are 3x3 local maxima of ``c`` (ties: the first in raster order).

    Neighbours outside the image do not count. Strict comparison with the neighbours before
    the pixel in raster order and non-strict with those after, so a plateau gives one maximum.
    """
    c2 = np.ascontiguousarray(c).reshape(-1, nx)
    is_max = np.empty(idx.size, dtype=bool)
    _k_local_max(c2, np.ascontiguousarray(idx, dtype=np.int64), is_max)
    return is_max


@njit(cache=True, nogil=True, error_model="numpy")
def _k_is_max(c, i, j):  # pragma: no cover - compiled
    """Whether ``c[i, j]`` is a 3x3 local maximum: strictly above the neighbours before it in raster order,
    at least as high as those after (neighbours outside the image taken as -inf)."""
    ny, nx = c.shape
    v = c[i, j]
    for dy in range(-1, 2):
        yy = i + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-1, 2):
            xx = j + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= nx:
                continue
            u = c[yy, xx]
            if dy < 0 or (dy == 0 and dx < 0):
                if not (v > u):
                    return False
            elif not (v >= u):
                return False
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _k_local_max(c, idx, is_max):  # pragma: no cover - compiled
    """:func:`local_maxima` (neighbours outside the image taken as -inf)."""
    nx = c.shape[1]
    for k in range(idx.size):
        y = idx[k] // nx
        is_max[k] = _k_is_max(c, y, idx[k] - y * nx)


@njit(cache=True, nogil=True, error_model="numpy")
def _k_row_counts(r0, r1, c, thr, counts):  # pragma: no cover - compiled
    """Pixels above ``thr`` in each row r0:r1."""
    for i in range(r0, r1):
        n = 0
        for j in range(c.shape[1]):
            if c[i, j] > thr:
                n += 1
        counts[i] = n


def rows_above(c: np.ndarray, thr) -> np.ndarray:
    """``offsets[i]``: the pixels above ``thr`` before row ``i`` in raster order (``offsets[-1]`` all of them)."""
    ny = c.shape[0]
    counts = np.zeros(ny, np.int64)
    run_chunks(_k_row_counts, ny, c, thr, counts, min_chunk=64, chunks_per_thread=4, max_threads=8)
    offsets = np.zeros(ny + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def sampled_maxima(c: np.ndarray, thr: float, n_sample: int) -> np.ndarray:
    """Flat indices of the local maxima among a regular sample of the pixels above ``thr``.

    The same as ``idx = np.flatnonzero(c > thr)``, thinned to ``idx[::idx.size // n_sample]`` when it
    holds more than ``n_sample`` pixels, then :func:`local_maxima` of those: rows counted and tested on
    threads, without the full list of indices.
    """
    c = np.ascontiguousarray(c)
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float64)
    t = c.dtype.type(thr)
    offsets = rows_above(c, t)
    n = int(offsets[-1])
    step = n // n_sample if n > n_sample else 1
    out = np.full(-(-n // step), -1, np.int64)
    run_chunks(_k_sampled_max, c.shape[0], c, t, offsets, step, out, min_chunk=64, chunks_per_thread=4,
               max_threads=8)
    return out[out >= 0]


@njit(cache=True, nogil=True, error_model="numpy")
def _k_sampled_max(r0, r1, c, thr, offsets, step, out):  # pragma: no cover - compiled
    """For rows r0:r1: each pixel above ``thr`` whose rank among them is a multiple of ``step`` goes to
    ``out[rank // step]`` when it is a local maximum."""
    nx = c.shape[1]
    for i in range(r0, r1):
        k = offsets[i]
        nxt = -(-k // step) * step  # the next rank sampled
        for j in range(nx):
            if c[i, j] > thr:
                if k == nxt:
                    if _k_is_max(c, i, j):
                        out[k // step] = i * nx + j
                    nxt += step
                k += 1


def match_at(img: np.ndarray, py: np.ndarray, px: np.ndarray, templates, *, chunk: int = 16384):
    """Masked correlation and least-squares amplitude of templates centred on pixels (py, px).

    ``templates`` is one 2-D template or a sequence of templates of one shape. Only the part of
    the window inside the image counts. Returns ``(ncc, amplitude)``, each (n,) for one template
    or (n, k) for k: the zero-normalised correlation and the slope ``a`` of ``patch ~ a t + b``.
    """
    one = np.ndim(templates) == 2
    ts = np.asarray([templates] if one else list(templates), dtype=np.float64)
    k, th, tw = ts.shape
    ny, nx = img.shape
    hy, hx = th // 2, tw // 2
    ncc = np.empty((py.size, k))
    amp = np.empty((py.size, k))
    inner = (py >= hy) & (py < ny - hy) & (px >= hx) & (px < nx - hx)
    # windows entirely inside: sums over each window in compiled code (threads over the points)
    tz = ts.reshape(k, -1) - ts.reshape(k, -1).mean(1, keepdims=True)
    tz2 = (tz * tz).sum(1)
    idx_in = np.flatnonzero(inner)
    if idx_in.size:
        img32 = np.ascontiguousarray(img, dtype=np.float32)
        tzc = np.ascontiguousarray(tz.reshape(k, th, tw))
        oy_in = np.ascontiguousarray(py[idx_in] - hy, dtype=np.int64)
        ox_in = np.ascontiguousarray(px[idx_in] - hx, dtype=np.int64)
        n_in, a_in = np.empty((idx_in.size, k)), np.empty((idx_in.size, k))
        run_chunks(_k_match, idx_in.size, img32, oy_in, ox_in, tzc, tz2, n_in, a_in, min_chunk=1024,
                   chunks_per_thread=4, max_threads=8)
        ncc[idx_in], amp[idx_in] = n_in, a_in
    # windows that leave the image: masked sums
    oy = np.arange(th) - hy
    ox = np.arange(tw) - hx
    tf = ts.reshape(k, -1).T  # (N, k)
    idx_out = np.flatnonzero(~inner)
    for s0 in range(0, idx_out.size, chunk):
        sel = idx_out[s0 : s0 + chunk]
        yy = py[sel, None, None] + oy[None, :, None]
        xx = px[sel, None, None] + ox[None, None, :]
        m = ((yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)).reshape(sel.size, -1)
        pv = img[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)].reshape(sel.size, -1).astype(np.float64)
        pv = np.where(m, pv - pv.mean(1, keepdims=True), 0.0)  # an offset does not change the result
        mf = m.astype(np.float64)
        n = mf.sum(1)
        sp = pv.sum(1)
        st = mf @ tf
        st2 = mf @ (tf * tf)
        vp = (pv * pv).sum(1) - sp * sp / n
        cov = pv @ tf - st * (sp / n)[:, None]
        vt = np.maximum(st2 - st * st / n[:, None], 1e-300)
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc[sel] = np.where(vp[:, None] > 0, cov / np.sqrt(vt * np.maximum(vp, 1e-300)[:, None]), 0.0)
        amp[sel] = cov / vt
    if one:
        return ncc[:, 0], amp[:, 0]
    return ncc, amp


@njit(cache=True, nogil=True, error_model="numpy")
def _k_match(s0, s1, img, oy, ox, tz, tz2, ncc, amp):  # pragma: no cover - compiled
    """:func:`match_at` for windows inside the image: points s0:s1 with windows from (oy, ox), zero-mean
    templates ``tz`` (k, th, tw) with squared norms ``tz2``; float64 sums over float32 pixels."""
    k, th, tw = tz.shape
    n = float(th * tw)
    for q in range(s0, s1):
        y0 = oy[q]
        x0 = ox[q]
        sp = 0.0
        spp = 0.0
        for i in range(th):
            for j in range(tw):
                v = np.float64(img[y0 + i, x0 + j])
                sp += v
                spp += v * v
        vp = spp - sp * sp / n
        for m0 in range(0, k, 2):  # two templates per sweep of the window
            m1 = min(m0 + 1, k - 1)
            c0 = 0.0
            c1 = 0.0
            for i in range(th):
                for j in range(tw):
                    v = np.float64(img[y0 + i, x0 + j])
                    c0 += v * tz[m0, i, j]
                    c1 += v * tz[m1, i, j]
            for m, c in ((m0, c0), (m1, c1)):
                ncc[q, m] = c / np.sqrt(tz2[m] * vp) if vp > 0 else 0.0
                amp[q, m] = c / max(tz2[m], 1e-300)


def best_correlation(img: np.ndarray, templates: list[np.ndarray], noise: tuple[float, float],
                     workers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Correlation and z-score maps, the maximum over the templates (step 3 of ``find_atoms``).

    Returns
    -------
    ncc, z : float32 arrays, the image's shape
        At each pixel, the correlation of the best-correlated template, and that template's z-score.
    which : int8 array or None
        The index of that template; None with one template.
    """
    parts = correlate(img, templates, noise, workers=workers)
    ncc, z = parts[0].ncc, parts[0].zscore
    which = None
    if len(parts) > 1:
        which = np.zeros(ncc.shape, dtype=np.int8)
        for k, p in enumerate(parts[1:], start=1):
            better = p.ncc > ncc
            which[better] = k
            np.copyto(ncc, p.ncc, where=better)
            np.copyto(z, p.zscore, where=better)
    return ncc, z, which


def amplitudes_at(img: np.ndarray, templates: list[np.ndarray], which_t: np.ndarray, peak: np.ndarray,
                  sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Template amplitude and correlation with the blurred template at the blobs' peak pixels.

    Parameters
    ----------
    img : 2-D float array
    templates : list of arrays
    which_t : int array (n,)
        The template of each blob.
    peak : int array (n,)
        Flat index of each blob's peak pixel.
    sigma : float
        Column width, px: the width of the blur.

    Returns
    -------
    amplitude : ndarray (n,)
        The least-squares slope of ``patch ~ a t + b`` times the template's own standard deviation:
        intensity units, comparable between templates.
    broad : ndarray (n,)
        Correlation with the template blurred by ``sigma`` (a shape measure, see ``find_atoms``).
    """
    py, px = np.divmod(peak, img.shape[1])
    amp = np.empty(peak.size)
    broad = np.empty(peak.size)
    with _blas_single_thread():
        for k, t in enumerate(templates):
            sel = np.flatnonzero(which_t == k)
            if sel.size:
                c2, a2 = match_at(img, py[sel], px[sel], [t, ndi.gaussian_filter(t, sigma, mode="nearest")])
                # amplitude in intensity units: the slope times the template's own spread, so that
                # amplitudes measured with different templates compare
                amp[sel], broad[sel] = a2[:, 0] * float(np.std(t)), c2[:, 1]
    return amp, broad


@contextmanager
def _blas_single_thread() -> Iterator[None]:
    """BLAS on one thread: the patch products of :func:`match_at` are thin (k templates) and bound by
    memory, and idle BLAS threads keep spinning afterwards on the cores the compiled stages need."""
    if _threadpool_limits is None:  # pragma: no cover
        yield
    else:
        with _threadpool_limits(limits=1, user_api="blas"):
            yield
