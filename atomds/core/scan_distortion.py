"""Slow-scan distortion measured from the atoms: the shift each scan line was recorded with.

A STEM or STM image is scanned line by line: x along a line (fast), y from line to line (slow).
Drift, mains pick-up and the settling of the scan coils move the probe between lines, so that
every line ``y`` of the image is displaced along it by its own ``f(y)`` against the specimen. In
the atoms this is a local deformation that depends on ``y`` alone: the deformation gradient of a
column's neighbourhood is ``F = [[1, f'(y)], [0, 1]]``, a shear along the scan lines. Everything
else that deforms a lattice (strain, rotation, a second phase) shows in ``F_xx`` or ``F_yx`` too,
or varies along ``x``.

So ``f'(y)`` is read from the local strain of every atom
(:func:`atomds.core.strain.local_strain`): ``H = F - I``, ``H_xy = exy - rotation``, as the median
over the atoms within one nearest-column distance of each line, among the atoms whose ``H_xx``
and ``H_yx`` are those of most of the image (within 3 standard deviations of their noise,
measured between nearest neighbours, of their most common value: a grain of another phase or
orientation is left out; the strain is measured a second time against those atoms, because the
median lattice of an image of two grains can be neither's). Integrated along ``y``, it gives the
shift of each atom's line; the shifts are measured again on the corrected positions for a few
rounds (:data:`ROUNDS`), because a median over a window of two rows of atoms flattens a wobble
of a few rows' period. Lines with too few such atoms get the profile interpolated between
measured ones and none beyond them (the shift stays that of the last measured line).

The profile is used only where it stands out of its noise and moves whole lines alike
(:func:`row_profile`): lines far apart (two nearest-column distances) are compared with the
scatter of medians taken over separate stretches of the same lines (eight, ordered along ``x``),
and at least :data:`MIN_CONSISTENT` of the lines must have stretches that agree within
:data:`CONSISTENT_SCATTER` standard errors of the atoms' noise (their trimmed means, less the
window's own trend in y: a window holds two rows of atoms sheared differently, and on a lattice
aligned with the rows a stretch can hold more of one than of the other). A real scan distortion moves a
whole line alike; noise does not stand out, and a grain or a second phase that fills part of
some lines (a sheared grain over 70 % of the width of half the lines, a film whose interface runs
25-60 degrees off the rows, as a cold review built) makes their stretches disagree. On an image
with no scan distortion the positions are left as they are.

This is what the phase statistics need (:func:`atomds.pipeline.phases`): a crystal scanned with a
wobble is one lattice whose rows are sheared by a few per cent in turn, and its neighbourhoods,
clustered as they are, form stripes along the scan lines that look like two phases.

Limits. The scan lines are the image's rows. A change of the line spacing (the stretch ``g'(y)``
across the lines that a varying drift along ``y`` gives) is not corrected: an epitaxial film on
a substrate, imaged as usual with the interface along the rows, differs from it in just that
(its ``c/a``), and would be made the substrate's phase. An interface along a scan line between
two phases related by a pure shear along it (as twin variants are), filling whole lines on each
side, is taken for the scan: the two are then one phase.

Lengths are in the unit of the positions. Pure NumPy; the xarray layer is
:func:`atomds.ops.physics.scan_distortion`.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .strain import local_strain

__all__ = ["ROUNDS", "MIN_SIGNIFICANCE", "CONSISTENT_SCATTER", "MIN_CONSISTENT", "row_profile", "scan_shifts"]

#: Rounds of measuring the profile and correcting the positions (each round measures what the
#: last left; a wobble of period eight rows of atoms keeps a third of its shear after one round).
ROUNDS = 3
#: The profile is used where the mean square of its lines' deviations, in units of their standard
#: errors, is at least this: about 1 for noise (Student's t with 7 degrees of freedom: 1.4; 0.76-2.4
#: on the unit tests' 12 noise-only lattices), 215-21,000 for the scan distortions of generated
#: images (shears of 1-8 %). Set on generated images only.
MIN_SIGNIFICANCE = 25.0
#: A line's stretches agree where the scatter of their 25 %-trimmed means is at most this many of
#: their standard errors from the atoms' noise (measured between nearest neighbours; on the unit
#: tests' hexagonal, square and honeycomb lattices, noise alone: a median of 0.94-1.2 and a 90th
#: percentile of 1.4-1.7; with wobbles of 1-1.2 px over 70-180 lines, 0.16-0.36 and 0.24-0.51, where
#: the gradient between rows raises the noise measured). Set on generated lattices only ...
CONSISTENT_SCATTER = 3.0
#: ... and the profile is used only where this share of the lines agree.
MIN_CONSISTENT = 0.8
#: Efficiency of a 25 %-trimmed mean against the mean (normal noise).
_TRIM_EFFICIENCY = 0.83
#: Where this share of the atoms agrees with the image's median lattice, it is theirs (no second
#: measurement against them).
_ONE_LATTICE = 0.9
#: The stretches of each line whose medians give the line's standard error.
_STRETCHES = 8
#: Fewest atoms in a stretch of a line (a line with fewer is not judged).
_MIN_PER_STRETCH = 3


def _noise_scale(v: np.ndarray, fin: np.ndarray, nearest: np.ndarray) -> float:
    """Robust standard deviation of one atom's value, from the differences between nearest neighbours
    (a grain or a field that varies slowly cancels there; shared bonds make it an underestimate)."""
    ok = fin & (nearest >= 0)
    ok[ok] &= fin[nearest[ok]]
    if ok.sum() < 2:
        return float("nan")
    d = v[ok] - v[nearest[ok]]
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def _dominant(v: np.ndarray, fin: np.ndarray, nearest: np.ndarray, among=None) -> np.ndarray:
    """Atoms whose value is within 3 noise standard deviations (:func:`_noise_scale`) of the most
    common value (of the atoms ``among``, default all): the lattice of most of the image, not a mean
    of grains (two grains misoriented by 12 degrees have rotations +-0.1 against their median
    lattice, and a spread-based rule keeps both)."""
    s = _noise_scale(v, fin, nearest)
    if not fin.any() or not np.isfinite(s):
        return fin
    s = max(s, 1e-6)
    vals = v[fin & among] if among is not None and (fin & among).any() else v[fin]
    lo, hi = np.percentile(vals, [0.5, 99.5])
    nb = int(min(max((hi - lo) / s, 1), 4000))
    counts, edges = np.histogram(vals, bins=nb, range=(lo, hi + 1e-12))
    counts = np.convolve(counts, np.ones(3), mode="same")
    m = 0.5 * (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1])
    for _ in range(3):
        near = np.abs(vals - m) <= 3.0 * s
        if not near.any():
            break
        m = float(np.median(vals[near]))
    return fin & (np.abs(v - m) <= 3.0 * s)


def row_profile(x, y, values, spacing: float, *, use=None, noise: float | None = None) -> dict:
    """The median of ``values`` along each line ``y``, smooth, and how far it stands out of noise.

    Parameters
    ----------
    x, y : array (n,)
        Positions of the atoms.
    values : array (n,)
        One value per atom (NaN: none), such as the local shear ``H_xy``.
    spacing : float
        Nearest-column distance: the profile is sampled every half of it, each sample the median
        over the atoms within one ``spacing`` of the line.
    use : bool array (n,), optional
        Atoms that may enter (default: all with finite values).
    noise : float, optional
        Standard deviation of one atom's value from noise: a line's stretches then agree where
        their scatter is at most :data:`CONSISTENT_SCATTER` standard errors (else: times that of
        the quietest quarter of the lines).

    Returns
    -------
    dict
        ``grid`` (lines, increasing ``y``), ``profile`` (median minus the image's median, NaN-free:
        lines with too few atoms are interpolated between measured ones and zero beyond them),
        ``significance`` (mean square of the deviations of lines two ``spacing`` apart in units of
        their standard errors; NaN where fewer than four lines could be judged), ``lines`` (how
        many were judged), ``scatter`` (of each judged line's stretches) and ``consistent`` (the
        share of the judged lines whose stretches agree).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(v)
    if use is not None:
        ok &= np.asarray(use, dtype=bool).ravel()
    out: dict = {"grid": np.zeros(0), "profile": np.zeros(0), "significance": float("nan"), "lines": 0,
                 "scatter": np.zeros(0), "consistent": float("nan")}
    if ok.sum() < 2 * _STRETCHES * _MIN_PER_STRETCH or not (np.isfinite(spacing) and spacing > 0):
        return out
    xs, ys, vs = x[ok], y[ok], v[ok]
    order = np.argsort(ys, kind="stable")
    xs, ys, vs = xs[order], ys[order], vs[order]
    center = float(np.median(vs))
    grid = np.arange(ys[0], ys[-1] + 0.5 * spacing, 0.5 * spacing)
    lo = np.searchsorted(ys, grid - spacing)
    hi = np.searchsorted(ys, grid + spacing)
    prof = np.full(grid.size, np.nan)
    for b in np.flatnonzero(hi - lo >= _STRETCHES * _MIN_PER_STRETCH):
        prof[b] = np.median(vs[lo[b]:hi[b]]) - center
    good = np.isfinite(prof)
    if good.sum() < 2:
        return out
    # between measured lines the profile is interpolated; beyond them it is zero (no shear is
    # invented where none was measured: the shift stays what it was at the last measured line)
    prof = np.interp(grid, grid[good], prof[good], left=0.0, right=0.0)
    # significance: lines two spacings apart (windows that share no atom), each against the scatter
    # of the medians of its stretches along x
    z2, scatter = [], []
    for k in range(0, grid.size, 4):
        sl = slice(lo[k], hi[k])
        if hi[k] - lo[k] < _STRETCHES * _MIN_PER_STRETCH:
            continue
        by_x = np.argsort(xs[sl], kind="stable")
        parts = np.array_split(vs[sl][by_x], _STRETCHES)
        med = np.array([np.median(p) for p in parts])
        se = float(np.std(med, ddof=1)) / np.sqrt(_STRETCHES)
        if se > 0:
            z2.append(((float(np.median(vs[sl])) - center) / se) ** 2)
        # the stretches' trimmed means, less the window's own trend in y (a window holds two rows
        # of atoms sheared differently, and a stretch of a lattice aligned with the rows can hold
        # more of one than of the other), in units of their standard error from the atoms' noise
        # where it is known
        yy = ys[sl] - grid[k]
        dv = vs[sl] - _slope(yy, vs[sl]) * yy
        sd = float(np.std([_trimmed_mean(p) for p in np.array_split(dv[by_x], _STRETCHES)], ddof=1))
        if noise is not None and noise > 0:
            sd /= noise / np.sqrt(_TRIM_EFFICIENCY * min(len(p) for p in parts))
        scatter.append(sd)
    out.update(grid=grid, profile=prof, lines=len(z2),
               significance=float(np.mean(z2)) if len(z2) >= 4 else float("nan"),
               consistent=_consistent_share(np.asarray(scatter), noise is not None and noise > 0),
               scatter=np.asarray(scatter))
    return out


def _slope(t: np.ndarray, v: np.ndarray) -> float:
    """Least-squares slope of ``v`` against ``t`` (0 where ``t`` does not vary)."""
    t = t - t.mean()
    den = float(np.dot(t, t))
    return float(np.dot(t, v - v.mean()) / den) if den > 0 else 0.0


def _trimmed_mean(a: np.ndarray, cut: float = 0.25) -> float:
    """Mean of ``a`` without its lowest and highest ``cut`` (as ``scipy.stats.trim_mean``, without its
    per-call overhead: 0.35 ms, a quarter of a second over the lines of a 4096^2 image)."""
    a = np.sort(a)
    k = int(cut * a.size)
    return float(a[k:a.size - k].mean())


def _consistent_share(scatter: np.ndarray, absolute: bool = False) -> float:
    """Share of the lines whose stretches agree: their scatter at most :data:`CONSISTENT_SCATTER`
    times that of the quietest quarter of the lines (where a phase or grain fills part of some
    lines, their stretches disagree; a scan moves each line alike)."""
    if scatter.size < 4:
        return float("nan")
    ref = float(np.percentile(scatter, 25)) if not absolute else 1.0
    if ref <= 0:
        return float(np.mean(scatter <= 0))
    return float(np.mean(scatter <= CONSISTENT_SCATTER * ref))


def _integral(grid: np.ndarray, slope: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``int slope dy`` from the first line, at ``y`` (linear between lines, constant beyond)."""
    if grid.size < 2:
        return np.zeros_like(y)
    f = np.r_[0.0, np.cumsum(0.5 * (slope[1:] + slope[:-1]) * np.diff(grid))]
    out = np.interp(y, grid, f)
    return np.where(np.isfinite(y), out, np.nan)


def scan_shifts(x, y, x_err=None, y_err=None, *, sublattice=None, usable=None, rounds: int = ROUNDS,
                min_significance: float = MIN_SIGNIFICANCE) -> dict:
    """The displacement along x of each atom's scan line, measured from the atoms' local lattices.

    Parameters
    ----------
    x, y : array (n,)
        Atom positions (y across the scan lines).
    x_err, y_err : array (n,), optional
        Their standard errors (not needed; passed on to the strain fit).
    sublattice : int array (n,), optional
        Species/site labels: each atom's lattice is measured from its own sublattice.
    usable : bool array (n,), optional
        Atoms whose positions can be trusted (default all).
    rounds : int
        Rounds of measuring and correcting (:data:`ROUNDS`).
    min_significance : float
        The profile is used where its significance reaches this (:data:`MIN_SIGNIFICANCE`).

    Returns
    -------
    dict
        ``shift_x`` (n,): the displacement of each atom along x by the scan (subtract it to undo
        the distortion; zero where none was significant; NaN at NaN positions); ``shear``: the
        largest ``|f'(y)|`` (against the image's median) corrected in the first round;
        ``significance`` and ``consistent`` of the first round (NaN where too few lines could be
        judged); ``rounds`` used.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    sx = np.zeros(n)
    info: dict = {"shear": 0.0, "significance": float("nan"), "consistent": float("nan"), "rounds": 0}
    pos = np.column_stack([x, y])
    finite = np.isfinite(pos).all(axis=1)
    if usable is not None and np.asarray(usable, dtype=bool).ravel().size == n:
        finite = finite & np.asarray(usable, dtype=bool).ravel()
    if finite.sum() < 2 * _STRETCHES * _MIN_PER_STRETCH:  # fewer atoms than a profile needs
        return {"shift_x": np.where(np.isfinite(x), sx, np.nan), **info}
    # each atom's nearest neighbour (for the noise) and their median distance (the lines' spacing)
    nearest = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(np.isfinite(pos).all(axis=1))
    dist, j = cKDTree(pos[idx]).query(pos[idx], k=2)
    nearest[idx] = idx[j[:, 1]]
    spacing = float(np.median(dist[:, 1]))
    reference = None
    for r in range(int(rounds)):
        for _ in range(2 if reference is None else 1):
            s = local_strain(x - sx, y, x_err, y_err, sublattice=sublattice, usable=usable, reference=reference)
            hxy = s["exy"] - s["lattice_rotation"]
            hyx = s["exy"] + s["lattice_rotation"]
            fin = np.isfinite(hxy) & np.isfinite(s["exx"])
            # the reference's own atoms set the value (once measured against it, the mode can be
            # another grain's of about as many atoms)
            use = _dominant(s["exx"], fin, nearest, reference) & _dominant(hyx, fin, nearest, reference)
            if reference is None:
                # the image's median lattice can be none of its grains' (two grains misoriented by 8
                # degrees: bonds of both in one reference): measured again against the atoms that
                # agree, unless nearly all do
                reference = use if use.sum() >= 2 * _STRETCHES * _MIN_PER_STRETCH else np.ones(n, dtype=bool)
                if use.sum() >= _ONE_LATTICE * fin.sum():
                    break
        p = row_profile(x - sx, y, hxy, spacing, use=use, noise=_noise_scale(hxy, use, nearest))
        if r == 0:
            info["significance"], info["consistent"] = p["significance"], p["consistent"]
        if not (p["lines"] and p["significance"] >= min_significance and p["consistent"] >= MIN_CONSISTENT):
            break
        sx += _integral(p["grid"], p["profile"], y)
        if r == 0:
            info["shear"] = float(np.max(np.abs(p["profile"])))
        info["rounds"] = r + 1
    return {"shift_x": np.where(np.isfinite(x), sx, np.nan), **info}
