"""Bad scan lines: whole rows (or columns) of pixels that a scan glitch spoiled (pure NumPy).

A beam-blanking or detector glitch, a tip change in STM, or a flyback error leaves a line of
pixels far darker or brighter than the lines on either side, along the whole scan line. Left in
the image, such a line is a ridge (or a trench) that the template correlation breaks into
"columns": six spoiled lines in a 512^2 image of 1,000 columns gave 200-300 false atoms and
fits pulled by up to 3 standard errors.

A line is a candidate when its mean differs from the lines on *both* sides in the same direction (the
largest difference to the 1, 2 or 3 lines above, and to the 1, 2 or 3 below, so that runs of up to
three spoiled lines are seen) by an outlying amount: the smaller of the two differences is an
outlier among those of all the lines (robust z-score of at least :data:`LINE_Z`). A lattice
modulates that statistic from line to line by a few of its robust standard deviations; a step,
an interface or a vacuum edge that runs exactly along a line differs from the lines on one side
only. A candidate is bad when the excess lies along its length (:func:`_confirmed`): a row of
bright columns along part of a line raises its mean, not its median. Lengths in pixels.

Line noise (:func:`remove_row_offsets`): every slow-scan line (row) offset by its own amount, the
streaks that probe-current and detector fluctuations leave. Offsets of 0.1 of a column's peak
height gave 298 false atoms on a 512^2 image of 1,100 columns, and at 0.05 the refined y positions
scattered 1.7 times their errors. They are seen in the spectrum of the row means' differences:
white, where the columns' means stay at the pixel noise (:func:`line_noise_ratio`); and removed as
the part of the row means that is neither the lattice (its periodic rows along the scan), nor a
step, nor slow (a background).

Limits: the first and last three lines are not judged (a dark frame or the edge of a crystal looks
the same from one side); a run of four or more spoiled lines is not seen; a line spoiled over half
of its length or more is taken out whole; a bright line-shaped feature exactly along a scan line
(a Fresnel fringe at an edge aligned with the scan) is taken for a spoiled line.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidParameterError

__all__ = ["LINE_Z", "bad_lines", "fill_lines", "lines_record", "lines_from_record", "LINE_NOISE_RATIO",
           "line_means", "line_noise_ratio", "row_offsets", "remove_row_offsets"]

#: A line is bad when its statistic is this many robust standard deviations from the lines' median.
LINE_Z = 12.0
#: Runs of up to this many spoiled lines are seen.
LINE_RUN = 3
#: The robust spread of the statistic is at least this share of the 5-95 % range of the line means: a
#: line of spoiled pixels stands out of the lines around by more than the lattice's rows do.
LINE_MODULATION = 0.05
#: A candidate line is bad only where the median over its length of its difference to the good lines
#: beside it is at least this share of the mean statistic: the excess lies along the line.
LINE_ALONG = 0.5
#: An image of fewer lines (or shorter ones) is not judged.
MIN_LINES = 16


def _two_sided(mu: np.ndarray, run: int = LINE_RUN) -> np.ndarray:
    """Per line: the smaller of its differences to the nearest line above and below that are not
    part of its run (up to ``run`` lines of the same excess), when both have the same sign (with
    that sign), else 0."""
    n = mu.size
    pad = np.r_[np.full(run, np.nan), mu, np.full(run, np.nan)]
    out = np.zeros(n)
    for a in range(run):  # the line is the (a+1)-th of a run of b+1 lines
        for b in range(a, run):
            up = mu - pad[run - a - 1 : run - a - 1 + n]  # the line just above the run
            dn = mu - pad[run + (b - a) + 1 : run + (b - a) + 1 + n]  # just below it
            inner = np.zeros(n)  # the run's lines must look alike: each within the run's excess
            for k in range(-a, b - a + 1):
                if k:
                    inner = np.maximum(inner, np.abs(mu - pad[run + k : run + k + n]))
            up, dn = np.where(np.isfinite(up), up, dn), np.where(np.isfinite(dn), dn, up)
            same = (np.sign(up) == np.sign(dn)) & np.isfinite(up)
            val = np.where(same, np.sign(up) * np.maximum(np.minimum(np.abs(up), np.abs(dn)) - inner, 0.0), 0.0)
            take = np.abs(val) > np.abs(out)
            out[take] = val[take]
    return out


def _bad(mu: np.ndarray, length: int, pix: float, z: float) -> tuple[np.ndarray, np.ndarray]:
    """The candidate bad lines from their means ``mu`` (lines of ``length`` pixels, pixel noise
    ``pix``), and the statistic."""
    out = np.zeros(mu.size, dtype=bool)
    ok = np.isfinite(mu)
    if ok.sum() < MIN_LINES or length < MIN_LINES:
        return out, np.zeros(mu.size)
    m = _two_sided(np.where(ok, mu, np.nanmedian(mu[ok])))
    # the statistic is 0 on every line that is no extremum of its neighbours: on a lattice aligned
    # with the scan most lines, and a spread over all of them collapses; the extrema are judged
    # against the extrema
    # (and by size: on a lattice of period three along the lines, a third of them are minima and two
    # thirds pairs of maxima, all of one size)
    ref = ok & (m != 0)
    if ref.sum() < MIN_LINES:
        ref = ok
    a = np.abs(m)
    med = float(np.median(a[ref]))
    mad = 1.4826 * float(np.median(np.abs(a[ref] - med)))
    # floors under the spread: a line mean's own noise on a flat image, and the lines' own
    # modulation (a lattice's rows)
    lo, hi = np.percentile(mu[ok], [5, 95])
    scale = max(mad, np.sqrt(2.0) * pix / np.sqrt(length), LINE_MODULATION * float(hi - lo), 1e-300)
    out[ok] = a[ok] - med >= z * scale
    out &= m != 0
    # the first and last lines have lines on one side only, and nothing tells a spoiled one from
    # the edge of the crystal or a dark frame there: they are not judged
    out[:LINE_RUN] = False
    out[-LINE_RUN:] = False
    return out, m


def _confirmed(lines: np.ndarray, bad: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The candidate ``bad`` lines (rows of ``lines``) whose excess lies along their length: the median
    over the line of its difference to the nearest good line above and below has the sign of the
    mean statistic ``m`` and at least ``LINE_ALONG`` of its size. A row of bright columns along a
    part of a line moves the line's mean, not its median."""
    out = bad.copy()
    n = bad.size
    for r in np.flatnonzero(bad):
        r0, r1 = r, r
        while r0 > 0 and bad[r0 - 1]:
            r0 -= 1
        while r1 < n - 1 and bad[r1 + 1]:
            r1 += 1
        line = np.asarray(lines[r], dtype=np.float64)
        ex = []
        for start, step in ((r0 - 1, -1), (r1 + 1, 1)):  # the nearest line on each side with values
            o = start
            while 0 <= o < n and not np.isfinite(np.asarray(lines[o], dtype=np.float64)).any():
                o += step
            if 0 <= o < n:
                diff = line - np.asarray(lines[o], dtype=np.float64)
                diff = diff[~np.isnan(diff)]
                ex.append(float(np.median(diff)) if diff.size else float("nan"))
        out[r] = bool(ex) and all(np.isfinite(e) and np.sign(e) == np.sign(m[r]) and abs(e) >= LINE_ALONG * abs(m[r])
                                  for e in ex)
    return out


def bad_lines(image, *, z: float = LINE_Z, means: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The rows and the columns of ``image`` spoiled along their whole length (see the module's text).

    Parameters
    ----------
    image : 2-D float array
        Intensities (NaN pixels, e.g. spikes already taken out, are left out of the line means).
    z : float
        Robust z-score from which a line is bad.
    means : (rows, cols), optional
        The means of the rows and of the columns of ``image`` (:func:`line_means`), when already taken.

    Returns
    -------
    rows, cols : bool ndarray (ny,), (nx,)
        True for a bad row (column). Images of fewer than :data:`MIN_LINES` lines are not judged.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise InvalidParameterError(f"bad_lines() needs a 2-D image, got {img.ndim}-D.")
    if not (np.isfinite(z) and z > 0):
        raise InvalidParameterError(f"z must be > 0, got {z!r}.")
    if not np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float64)
    ny, nx = img.shape
    rows, cols = _given_means(img, means)  # an all-NaN line has no mean: it is not judged
    # the pixel noise, from the differences of neighbouring pixels along a sample of rows
    d = np.diff(np.asarray(img[:: max(1, ny // 64), : 2048], dtype=np.float64), axis=1)
    d = d[np.isfinite(d)]
    pix = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0) if d.size else 0.0
    bad_r, m_r = _bad(rows, nx, pix, z)
    bad_c, m_c = _bad(cols, ny, pix, z)
    return _confirmed(img, bad_r, m_r), _confirmed(img.T, bad_c, m_c)


def fill_lines(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, fill: str = "interpolate") -> np.ndarray:
    """``image`` with its bad ``rows`` and ``cols`` filled: ``"interpolate"`` linearly between the nearest
    good lines on either side (the nearest one at the image's edge), or ``"nan"``. A float copy when
    there is anything to fill, else the image itself."""
    if fill not in ("interpolate", "nan"):
        raise InvalidParameterError(f"fill must be 'interpolate' or 'nan', got {fill!r}.")
    rows, cols = np.asarray(rows, dtype=bool), np.asarray(cols, dtype=bool)
    if not (rows.any() or cols.any()):
        return image
    out = np.array(image, dtype=np.float64 if not np.issubdtype(np.asarray(image).dtype, np.floating) else None)
    if fill == "nan":
        out[rows] = np.nan
        out[:, cols] = np.nan
        return out
    for axis, bad in ((0, rows), (1, cols)):
        if not bad.any() or bad.all():
            continue
        good = np.flatnonzero(~bad)
        idx = np.flatnonzero(bad)
        hi = np.searchsorted(good, idx)
        lo_i, hi_i = good[np.clip(hi - 1, 0, good.size - 1)], good[np.clip(hi, 0, good.size - 1)]
        span = np.where(hi_i != lo_i, hi_i - lo_i, 1)
        w = np.clip((idx - lo_i) / span, 0.0, 1.0)
        a, b = np.take(out, lo_i, axis=axis), np.take(out, hi_i, axis=axis)
        shape = [1, 1]
        shape[axis] = idx.size
        vals = a + (b - a) * w.reshape(shape)
        if axis == 0:
            out[idx] = vals
        else:
            out[:, idx] = vals
    return out


def lines_record(rows: np.ndarray, cols: np.ndarray, limit: int = 100) -> dict[str, list[int] | int]:
    """The bad lines for a step's params: ``rows`` and ``columns`` (indices, at most ``limit`` of each)
    and their numbers ``n_rows``, ``n_columns``."""
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    return {"rows": [int(i) for i in r[:limit]], "columns": [int(i) for i in c[:limit]], "n_rows": int(r.size),
            "n_columns": int(c.size)}


def lines_from_record(record, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The bad rows and columns (bool arrays of an image of ``shape``) that :func:`lines_record` wrote;
    None when the record is not complete (more lines than it lists) or names lines outside the image."""
    try:
        rows, cols = [int(i) for i in record["rows"]], [int(i) for i in record["columns"]]
        complete = int(record["n_rows"]) == len(rows) and int(record["n_columns"]) == len(cols)
    except (KeyError, TypeError, ValueError):
        return None
    ny, nx = shape
    if not complete or any(not 0 <= i < ny for i in rows) or any(not 0 <= i < nx for i in cols):
        return None
    r, c = np.zeros(ny, dtype=bool), np.zeros(nx, dtype=bool)
    r[rows], c[cols] = True, True
    return r, c


#: Rows carry line noise when their means vary at least this many times as much as the columns'
#: (:func:`line_noise_ratio`). Measured on 144 lattices without it (square, hexagonal, rectangular,
#: perovskite; 0, 17 and 45 degrees; widths 1-4 px; 300-2000 counts; 512^2, 192 x 320 and 96^2 px),
#: on the nine tiles of a 576 x 640 image and on images with vacuum, steps, a wedge, a particle and
#: a gradient along y: 0.68-1.54; with offsets of 0.05 of a column's peak: 1.7-26 (126 of 144 at
#: 2.5 or more), of 0.1: 2.5-49 (all).
LINE_NOISE_RATIO = 2.5
#: ... and when that variation is common to the whole width (:func:`line_consistency` at least this,
#: of 1 for a common variation and 1 / LINE_STRIPS for independent ones): a particle's rim seen
#: along the rows of a tile passed the ratio alone (6 of 888 tiles of thick particles, up to 3.4).
LINE_CONSISTENCY = 0.5
#: Strips across the rows for :func:`line_consistency`.
LINE_STRIPS = 4
#: Frequencies of the row means whose power is at least this many times the floor are structure
#: (the lattice's rows along the scan) and are kept.
LINE_STRUCTURE_POWER = 10.0
#: Variations of the row means slower than this (px) are kept: a local background follows them.
LINE_SLOW_PERIOD = 64.0
#: At most this many periodic components (the lattice's rows along the scan and their harmonics)
#: are fitted and kept, and at most as many steps.
LINE_MAX_TONES = 40
#: A difference of consecutive row means beyond this many robust sd is a step along the rows.
LINE_STEP_Z = 8.0


def _line_means(image: np.ndarray, axis: int) -> np.ndarray:
    """Means of the rows (``axis=1``) or columns (``axis=0``), non-finite pixels left out (none finite: NaN)."""
    img = np.asarray(image)
    m = img.mean(axis=axis, dtype=np.float64)
    bad = ~np.isfinite(m)
    if bad.any():  # lines with NaN pixels (spikes taken out, spoiled lines): their finite pixels
        part = np.compress(bad, img, axis=1 - axis)
        fin = np.isfinite(part)
        total = np.where(fin, part, 0.0).sum(axis=axis, dtype=np.float64)
        count = fin.sum(axis=axis)
        # an all-NaN line has no mean (NaN), without a warning (warnings filters are not thread-safe)
        m[bad] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return m


def line_means(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The means of the rows and of the columns of ``image`` (float64; non-finite pixels left out, a line with none
    finite NaN)."""
    return _line_means(image, 1), _line_means(image, 0)


def _given_means(img: np.ndarray, means) -> tuple[np.ndarray, np.ndarray]:
    """``means`` checked against the image's shape, or taken (:func:`line_means`) when None."""
    if means is None:
        return line_means(img)
    rows, cols = (np.asarray(m, dtype=np.float64) for m in means)
    if rows.shape != (img.shape[0],) or cols.shape != (img.shape[1],):
        raise InvalidParameterError(f"means must hold {img.shape[0]} row means and {img.shape[1]} column means, "
                                    f"got {rows.shape} and {cols.shape}.")
    return rows, cols


def line_noise_ratio(image, *, means: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """How much more the rows' means vary from row to row than the columns' do from column to column:
    about 1 without line noise.

    Each profile of line means is taken to its fast residual (:func:`row_offsets`: the lattice's
    periodic rows, steps and slow variations out), and the robust spread of its second
    differences (white noise stays, what varies smoothly over a few lines, such as a particle's
    rim, hardly does) scaled by the square root of the pixels each mean averages (a row mean of
    a wide image is the less noisy); the ratio of the two is returned. NaN for an image of fewer than :data:`MIN_LINES` lines either
    way. ``means``: the image's line means (:func:`line_means`), when already taken.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise InvalidParameterError(f"line_noise_ratio() needs a 2-D image, got {img.ndim}-D.")
    ny, nx = img.shape
    if ny < MIN_LINES or nx < MIN_LINES:
        return float("nan")
    # second differences: white line noise stays (times sqrt(6)), what varies smoothly over a few
    # lines (a particle's rim seen along the rows, a thickness profile) hardly does
    rows, cols = _given_means(img, means)
    rows = np.diff(_fast_residual(rows), 2)
    cols = np.diff(_fast_residual(cols), 2)
    sr = 1.4826 * float(np.median(np.abs(rows - np.median(rows)))) * np.sqrt(nx)
    sc = 1.4826 * float(np.median(np.abs(cols - np.median(cols)))) * np.sqrt(ny)
    if not (np.isfinite(sr) and np.isfinite(sc)) or sc <= 0:
        return float("nan")
    return float(sr / sc)


def line_consistency(image, strips: int = LINE_STRIPS) -> float:
    """How much of the rows' fast variation is common to the whole width (1) rather than to parts of it.

    The image is cut into ``strips`` strips across the rows; each strip's row means are taken to
    their fast residual (:func:`row_offsets`) and second differences. Line noise adds the same
    amount to every strip; a feature seen along the rows in part of the width (a particle's rim)
    does not. Returns ``var(mean over strips) / mean(var of each strip)`` (robust variances): 1
    for a common variation, ``1 / strips`` for independent ones. NaN for an image too small to cut.
    """
    img = np.asarray(image)
    ny, nx = img.shape
    w = nx // strips
    if ny < MIN_LINES or w < MIN_LINES:
        return float("nan")
    d = np.stack([np.diff(_fast_residual(_line_means(img[:, k * w : (k + 1) * w], 1)), 2) for k in range(strips)])

    def rvar(v):
        return (1.4826 * float(np.median(np.abs(v - np.median(v))))) ** 2

    each = float(np.mean([rvar(v) for v in d]))
    return rvar(d.mean(axis=0)) / each if each > 0 else float("nan")


def row_offsets(image) -> np.ndarray:
    """The offset of each row: the part of the row means that is neither the lattice nor slow.

    The lattice's rows along the scan make the row means periodic: the strongest frequency
    (refined between the Fourier bins) is fitted as a sinusoid over all the rows and taken out,
    repeatedly, while one stands at least :data:`LINE_STRUCTURE_POWER` times above the median
    power (at most :data:`LINE_MAX_TONES`; fitted at its own frequency, a peak takes its leakage
    into the neighbouring bins with it, where zeroing bins left it with the noise). Steps along the
    rows (a vacuum edge, a terrace: differences beyond :data:`LINE_STEP_Z` robust sd) are fitted
    too. What is left, less its variations slower than :data:`LINE_SLOW_PERIOD` rows (a
    background, which a local background follows), is the rows' offsets. Rows without a mean (all
    NaN) get 0.
    """
    return _fast_residual(_line_means(image, 1))


def _fast_residual(m: np.ndarray) -> np.ndarray:
    """:func:`row_offsets` of a profile of line means ``m`` (NaN: no mean, given 0)."""
    from scipy.optimize import minimize_scalar

    fin = np.isfinite(m)
    out = np.zeros(m.size)
    if np.count_nonzero(fin) < MIN_LINES:
        return out
    t = np.flatnonzero(fin)
    v = np.interp(np.arange(m.size), t, m[fin])
    n = v.size
    i = np.arange(n, dtype=np.float64)
    v = v - np.polyval(np.polyfit(i, v, 1), i)
    freq = np.fft.rfftfreq(n)
    fast = freq >= 1.0 / LINE_SLOW_PERIOD
    trend = np.c_[np.ones(n), i / n]

    def tone(f):
        return np.c_[np.cos(2.0 * np.pi * f * i), np.sin(2.0 * np.pi * f * i)]

    def left(f, r):  # the residual's sum of squares after a sinusoid of frequency f is fitted to r
        c, sn = np.cos(2.0 * np.pi * f * i), np.sin(2.0 * np.pi * f * i)
        g = np.array([[c @ c, c @ sn], [c @ sn, sn @ sn]])
        rhs = np.array([c @ r, sn @ r])
        try:
            coef = np.linalg.solve(g, rhs)
        except np.linalg.LinAlgError:
            return float(r @ r)
        return float(r @ r - coef @ rhs)

    # steps along the lines (a vacuum edge, a terrace) stand out of the differences: modelled as
    # steps first, they neither pass for tones nor leave ringing in the offsets
    d = np.diff(v)
    med = float(np.median(d))
    sd = 1.4826 * float(np.median(np.abs(d - med)))
    big = np.flatnonzero(np.abs(d - med) > LINE_STEP_Z * sd) if sd > 0 else np.zeros(0, dtype=np.int64)
    steps = np.sort(big[np.argsort(-np.abs(d[big] - med), kind="stable")][:LINE_MAX_TONES])  # the largest
    step_cols = [(i > k).astype(np.float64)[:, None] for k in steps]
    r, tones = v, []
    if step_cols:
        basis = np.column_stack(step_cols + [trend])
        coef, *_ = np.linalg.lstsq(basis, v, rcond=None)
        r = v - basis @ coef
    for _ in range(LINE_MAX_TONES):
        power = np.abs(np.fft.rfft(r)) ** 2
        # the floor of what is left: a strong tone's leakage raised the median it was judged by
        floor = float(np.median(power[1:])) if n > 2 else 0.0
        j = int(np.argmax(np.where(fast, power, -1.0)))
        if not fast[j] or power[j] < LINE_STRUCTURE_POWER * floor:
            break
        # its frequency between the bins: where a sinusoid fitted over all the lines leaves the least
        best = minimize_scalar(left, bounds=(freq[j] - 1.0 / n, freq[j] + 1.0 / n), args=(r,), method="bounded",
                               options={"xatol": 1e-3 / n})
        tones.append(float(best.x))
        coef, *_ = np.linalg.lstsq(tone(tones[-1]), r, rcond=None)
        r = r - tone(tones[-1]) @ coef
    cols = [tone(f) for f in tones] + step_cols
    if cols:  # all together (each tone's fit leaked a little into the others')
        basis = np.column_stack(cols + [trend])
        coef, *_ = np.linalg.lstsq(basis, v, rcond=None)
        r = v - basis @ coef
    # what is slower than LINE_SLOW_PERIOD is a background (a local background follows it)
    spec = np.fft.rfft(r)
    q = np.fft.irfft(np.where(fast, spec, 0.0), n=n)
    return np.where(fin, q, 0.0)


def remove_row_offsets(image, *, ratio: float | None = None, means: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, dict]:
    """``image`` less the offsets of its rows (:func:`row_offsets`) where they carry line noise.

    Parameters
    ----------
    image : 2-D array
        Intensities (NaN pixels are left out of the row means and stay NaN).
    ratio : float, optional
        :func:`line_noise_ratio` already measured by an earlier step that took line noise off this
        image (it is then taken off without looking again).
    means : (rows, cols), optional
        The image's line means (:func:`line_means`), when already taken.

    Returns
    -------
    image : ndarray
        A float copy less the offsets when the ratio reaches :data:`LINE_NOISE_RATIO` and the
        variation is common to the whole width (:func:`line_consistency` at least
        :data:`LINE_CONSISTENCY`), else the image itself.
    info : dict
        ``ratio`` (rounded), ``threshold``, ``applied`` and, when applied, ``rms`` (of the offsets
        removed, intensity units).
    """
    img = np.asarray(image)
    r = line_noise_ratio(img, means=means) if ratio is None else float(ratio)
    info: dict = {"ratio": round(r, 3) if np.isfinite(r) else None, "threshold": LINE_NOISE_RATIO, "applied": False}
    if not (np.isfinite(r) and r >= LINE_NOISE_RATIO):
        return img, info
    if ratio is None:
        c = line_consistency(img)
        info.update(consistency=round(c, 3) if np.isfinite(c) else None, consistency_threshold=LINE_CONSISTENCY)
        if not (np.isfinite(c) and c >= LINE_CONSISTENCY):
            return img, info
    off = row_offsets(img)
    out = np.array(img, dtype=np.float64 if not np.issubdtype(img.dtype, np.floating) else None)
    out -= off.astype(out.dtype)[:, None]
    info.update(applied=True, rms=float(np.sqrt(np.mean(off * off))))
    return out, info
