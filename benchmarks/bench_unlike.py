"""Images unlike atomds's samples: rendered here, with code that shares nothing with :mod:`atomds.core.samples`.

Run:  nice python benchmarks/bench_unlike.py [--seeds 1 2] [--no-write]

Every rule of the finder was written against atomds's own samples; these images were not seen
while writing it. They follow the classes of issue 10 with other lattices, sizes and artefacts,
and each is run once through ``atomds.from_array(image, ...).lcx.find_atoms()`` with defaults:

- ``au_on_carbon``: an fcc [110]-like centred rectangular particle (columns 13.9 and 16 px apart,
  width 2.6 px) of 2-40 atoms per column (a sphere's chord) on amorphous carbon (a correlated
  random texture), with a smooth thickness signal ten times the column contrast that falls to
  zero at the rim, 1024^2 px; ``au_big`` the same at 2048^2 px with a larger particle.
  Reported: recall of the particle's columns (those 10 px inside its rim), finds on the carbon
  (beyond 10 px outside the rim) and the other unmatched finds.
- ``stm``: an STM height map in metres (adatoms 0.6 A high on a hexagonal lattice of 18 px, a
  corner hole on every 4 x 4 cell, 3 % vacancies, a tilt, scan-line offsets of 0.4 A sd, a
  3.1 A step, no calibration); ``stm_small``: adatoms 9 px apart, line offsets of 1 A sd,
  three steps, twice the noise. Reported: recall, finds matching no adatom, finds in corner holes.
- ``abf``: an annular-bright-field perovskite [001] (A, B and two O columns as absorptive dips
  of 100 / 70 / 35 / 35 %, a 15 % gradient), 768^2 px, no contrast hint: the contrast decided and
  the recall of each of the four sublattices.
- ``mos2``: a MoS2-like honeycomb (Mo 900 counts, S2 55 % of it, width 2.6 px, 0.127 A/px) with
  a vacuum hole and a patch of bright contamination, 1024^2 px: recall per site, finds in the
  hole, and the adjusted Rand index of ``sublattice`` against the site (with the
  mislabelled columns under the contamination counted apart).
- ``glitches``: a square lattice with six spoiled scan lines (three dead, three three times too
  bright), 512^2 px: recall, finds matching no column, the rows found spoiled, and the scatter of
  the refined y positions over their errors.
- ``wedge``: a crystal wedge on vacuum whose columns rise from 300 to 3,300 counts over 384 px,
  with a diffuse background rising with them: recall (and of the two thinnest periods), finds in
  the vacuum.
- ``two_grains``: two grains of one hexagonal lattice 17 degrees apart along a straight sharp
  boundary, 768^2 px, through ``atomds.analyze``: the number of regions (one phase).
- ``line_noise``: a hexagonal lattice (15 px, width 2.2 px, 2000 counts) whose slow-scan lines
  (rows) are each offset by a random amount of sd 0.1 of a column's peak, 512^2 px;
  ``line_noise_aligned`` the same with rows of columns along the scan. find_atoms then refine:
  finds matching no column, recall, and the scatter of the refined positions over their errors.
- ``interstitials``: four images of a square lattice (16 px, width 2.3 px, 2500 counts, 4 %
  vacancies, a random angle) with 12 interstitials at cell centres of 0.7 of a column's counts,
  512^2 px: interstitials found in each.
- ``hits``: a hexagonal lattice (14 px, width 2 px, 1500 counts) with 52 hits of 2 x 2 and 3 x 1
  pixels at twenty times its brightest pixel (cosmic rays on a CCD), 512^2 px: recall, finds
  matching no column, the column width read.
- ``zero_padding``: a hexagonal lattice (14 px, width 2 px, 1500 counts) padded with zeros on the left
  30 and the top 20 px, as a drift-corrected sum is where no frame reached, 512^2 px,
  ``atomds.analyze``: finds in the padding (and those matching no column: columns centred in the
  padding and cut by its edge are found, as at the image's border), finds matching no column within
  6 px of it, regions.
- ``afterglow``: the hexagonal lattice of ``hits`` (14 px, width 2 px, 1500 counts) recorded by a
  detector with afterglow: each pixel keeps 0.4 of the one before it along the fast scan (x), so
  the noise of neighbouring pixels is correlated; ``frame_sum``: the same lattice as the sum of ten
  frames, each shifted by up to 3 px and interpolated (bilinear) back, as a drift-corrected sum
  is; ``smoothed``: the same lattice filtered by a Gaussian of 0.7 px, as images are often
  smoothed before they are shared. find_atoms then refine: recall, finds matching no column, and the scatter of the refined
  positions (less their mean offset: the afterglow moves every column) over their errors, with
  the error factors refine measured.
- ``probe_tails``: a perovskite [001] (A 16 px apart, 60,000 counts, B at 0.6 of it) whose columns have a
  probe's long tails (a Moffat profile of beta 2.5, full width at half maximum 4.2 px) instead of a
  Gaussian's, 512^2 px; ``probe_tails_dense``: a square lattice 10 px apart of such columns at
  40,000 counts. find_atoms then refine: recall per sublattice, finds matching no column (what fits
  of Gaussians leave of the tails piles up between neighbours).
- ``scan_drift``: a square lattice (15 px) under slow-scan drift (x shifted by 5 % of y and by a
  6 px sinusoid of 400 rows: local shear -4 to +14 %), 640^2 px, ``atomds.analyze``: regions.

Positions are matched one to one within a third of the nearest-column distance. The "Images
unlike the samples" section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

import atomds
from atomds.core.samples.scoring import match_positions

sys.path.insert(0, str(Path(__file__).parent))
from bench_find_refine import write_section  # noqa: E402

SECTION = "## Images unlike the samples"
RESULTS = Path(__file__).with_name("RESULTS.md")
CASES = ("au_on_carbon", "au_big", "stm", "stm_small", "abf", "mos2", "glitches", "wedge", "two_grains",
         "line_noise", "line_noise_aligned", "interstitials", "scan_drift", "hits", "zero_padding", "afterglow",
         "frame_sum", "smoothed", "probe_tails", "probe_tails_dense")


# ----------------------------------------------------------------------------------------------
# rendering (independent of atomds.core.samples)


def render(shape, x, y, counts, sigma) -> np.ndarray:
    """Point-sampled 2-D Gaussians of integrated ``counts`` and width ``sigma`` (px) at ``(x, y)``."""
    img = np.zeros(shape)
    ny, nx = shape
    sig = np.broadcast_to(np.asarray(sigma, float), x.shape)
    cnt = np.broadcast_to(np.asarray(counts, float), x.shape)
    h = int(np.ceil(5 * sig.max()))
    for xi, yi, s, c in zip(x, y, sig, cnt):
        x0, x1 = max(int(xi) - h, 0), min(int(xi) + h + 1, nx)
        y0, y1 = max(int(yi) - h, 0), min(int(yi) + h + 1, ny)
        if x0 < x1 and y0 < y1:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            img[y0:y1, x0:x1] += c / (2 * np.pi * s * s) * np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * s * s))
    return img


def lattice(shape, a1, a2, basis) -> tuple[np.ndarray, np.ndarray]:
    """Sites (n, 2) of the lattice ``a1, a2`` with ``basis`` covering ``shape`` (and 3 px beyond), and their basis index."""
    n = int(2 * max(shape) / min(np.hypot(*a1), np.hypot(*a2))) + 2
    ii, jj = np.meshgrid(np.arange(-n, n), np.arange(-n, n))
    pts = [ii.ravel()[:, None] * np.asarray(a1) + jj.ravel()[:, None] * np.asarray(a2) + np.asarray(b) for b in basis]
    p = np.vstack(pts)
    lab = np.repeat(np.arange(len(basis)), ii.size)
    m = (p[:, 0] > -3) & (p[:, 0] < shape[1] + 2) & (p[:, 1] > -3) & (p[:, 1] < shape[0] + 2)
    return p[m], lab[m]


def rot(v, angle) -> tuple[float, float]:
    c, s = np.cos(angle), np.sin(angle)
    return (c * v[0] - s * v[1], s * v[0] + c * v[1])


def matched(tx, ty, fx, fy, radius) -> tuple[np.ndarray, np.ndarray]:
    return match_positions(np.column_stack([tx, ty]), np.column_stack([fx, fy]), radius)


# ----------------------------------------------------------------------------------------------
# cases: each returns a row of the table (dict)


def au_on_carbon(seed: int, big: bool) -> dict:
    rng = np.random.default_rng(seed)
    shape, (cx, cy, radius) = ((2048, 2048), (1000, 1050, 640)) if big else ((1024, 1024), (520, 500, 300))
    a, sigma, ang = 16.0, 2.6, rng.uniform(0, np.pi)
    p, _ = lattice(shape, rot((a, 0), ang), rot((0, a * np.sqrt(2)), ang), [(0, 0), rot((a / 2, a * np.sqrt(2) / 2), ang)])
    r = np.hypot(p[:, 0] - cx, p[:, 1] - cy)
    inside = r < radius
    x, y = p[inside, 0], p[inside, 1]
    atoms = np.ceil(2 + 38 * np.sqrt(np.clip(1 - (r[inside] / radius) ** 2, 0, 1)))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    rr = np.hypot(xx - cx, yy - cy)
    peak40 = 400.0 * 40 / (2 * np.pi * sigma**2)
    thickness = 10 * peak40 * np.sqrt(np.clip(1 - (rr / radius) ** 2, 0, 1))
    carbon = 40 + 12 * ndi.gaussian_filter(rng.normal(size=shape), 2.5) / 0.11
    image = rng.poisson(np.clip(render(shape, x, y, 400.0 * atoms, sigma) + thickness + carbon, 0, None)).astype(np.float32)
    t0 = time.perf_counter()
    f = atomds.from_array(image, pixel_size=0.075, units="Å").lcx.find_atoms()
    sec = time.perf_counter() - t0
    fx, fy = f["atom_x"].values / 0.075, f["atom_y"].values / 0.075
    it, jf = matched(x, y, fx, fy, a / np.sqrt(2) / 3)
    inner = np.flatnonzero(np.hypot(x - cx, y - cy) < radius - 10)
    unmatched = np.setdiff1d(np.arange(fx.size), jf)
    ru = np.hypot(fx[unmatched] - cx, fy[unmatched] - cy) - radius
    return {"case": "au_big" if big else "au_on_carbon", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec,
            "truth": f"{inner.size} columns", "recall": f"{100 * np.isin(inner, it).mean():.1f} %",
            "extra": f"{int((ru > 10).sum())} on the carbon; {int(((ru >= -10) & (ru <= 10)).sum())} within 10 px of "
                     f"the rim, {int((ru < -10).sum())} inside"}


def stm(seed: int, small: bool) -> dict:
    rng = np.random.default_rng(seed)
    shape, a = ((400, 520), 9.0) if small else ((512, 512), 18.0)
    line_sd, n_steps, noise_sd = (1.0e-10, 3, 0.08e-10) if small else (0.4e-10, 1, 0.04e-10)
    ang = rng.uniform(0, np.pi / 3)
    a1, a2 = rot((a, 0), ang), rot((a / 2, a * np.sqrt(3) / 2), ang)
    p, _ = lattice(shape, a1, a2, [(0, 0)])
    cell = np.rint(np.linalg.solve(np.array([a1, a2]).T, p.T)).astype(int)
    hole = (np.mod(cell[0], 4) == 0) & (np.mod(cell[1], 4) == 0)
    keep = ~hole & (rng.uniform(size=len(p)) >= 0.03)
    x, y = p[keep, 0], p[keep, 1]
    sa = 2.8 * a / 18.0
    height = render(shape, x, y, 2 * np.pi * sa**2 * 0.6e-10, sa)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for hx, hy in p[hole]:
        height -= 0.5e-10 * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (4.0 * a / 18) ** 2))
    height += sum((xx * np.cos(0.3 + 0.2 * k) + yy * np.sin(0.3 + 0.2 * k) > 150 + 120 * k) * 3.1e-10 for k in range(n_steps))
    height += 2e-12 * xx + 1e-12 * yy + rng.normal(0, line_sd, shape[0])[:, None] + rng.normal(0, noise_sd, shape)
    t0 = time.perf_counter()
    f = atomds.from_array(height, kind="height").lcx.find_atoms()
    sec = time.perf_counter() - t0
    fx, fy = f["atom_x"].values, f["atom_y"].values
    it, jf = matched(x, y, fx, fy, a / 3)
    inner = np.flatnonzero((x > 10) & (x < shape[1] - 10) & (y > 10) & (y < shape[0] - 10))
    fin = np.flatnonzero((fx > 10) & (fx < shape[1] - 10) & (fy > 10) & (fy < shape[0] - 10))
    extra = np.setdiff1d(fin, jf)
    in_holes = int((np.min(np.hypot(fx[fin, None] - p[hole, 0], fy[fin, None] - p[hole, 1]), axis=1) < a / 3).sum())
    return {"case": "stm_small" if small else "stm", "seed": seed, "px": f"{shape[0]}x{shape[1]}", "seconds": sec,
            "truth": f"{inner.size} adatoms", "recall": f"{100 * np.isin(inner, it).mean():.1f} %",
            "extra": f"{extra.size} of {fin.size} finds match no adatom; {in_holes} in corner holes"}


def abf(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shape, a, ang = (768, 768), 20.0, rng.uniform(0, np.pi / 2)
    p, lab = lattice(shape, rot((a, 0), ang), rot((0, a), ang),
                     [(0, 0), rot((a / 2, a / 2), ang), rot((a / 2, 0), ang), rot((0, a / 2), ang)])
    depth = np.array([1.0, 0.7, 0.35, 0.35])[lab]
    dip = render(shape, p[:, 0], p[:, 1], depth * 2 * np.pi * 2.4**2, np.array([2.4, 2.4, 2.0, 2.0])[lab])
    image = rng.poisson(np.clip(600 * (1.0 + 0.15 * np.linspace(0, 1, shape[1])[None, :] - 0.5 * dip), 1, None))
    t0 = time.perf_counter()
    f = atomds.from_array(image.astype(np.float32), pixel_size=0.1, units="Å").lcx.find_atoms()
    sec = time.perf_counter() - t0
    fx, fy = f["atom_x"].values / 0.1, f["atom_y"].values / 0.1
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / 2 / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 8) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 8)
    rec = [100 * np.isin(np.flatnonzero(inner & (lab == k)), it).mean() for k in range(4)]
    fin = np.flatnonzero((fx > 8) & (fx < shape[1] - 8) & (fy > 8) & (fy < shape[0] - 8))
    contrast = json.loads(f.attrs["find_atoms_params"]).get("contrast")
    return {"case": "abf", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec, "truth": f"{int(inner.sum())} columns",
            "recall": "A {:.1f}, B {:.1f}, O {:.1f} / {:.1f} %".format(*rec),
            "extra": f"contrast decided: {contrast}; {np.setdiff1d(fin, jf).size} finds match no column"}


def mos2(seed: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(seed)
    shape, a, ang = (1024, 1024), 25.0, rng.uniform(0, np.pi / 3)
    a1, a2 = rot((a, 0), ang), rot((a / 2, a * np.sqrt(3) / 2), ang)
    p, lab = lattice(shape, a1, a2, [(0, 0), ((a1[0] + a2[0]) / 3, (a1[1] + a2[1]) / 3)])
    hole_c, hole_r, dirt_c, dirt_r = (300, 700), 110, (800, 200), 150
    keep = np.hypot(p[:, 0] - hole_c[0], p[:, 1] - hole_c[1]) > hole_r + 10
    p, lab = p[keep], lab[keep]
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dirt = 25 * ndi.gaussian_filter((rng.uniform(size=shape) < 0.002).astype(float), 6) / 0.0044
    dirt *= np.hypot(xx - dirt_c[0], yy - dirt_c[1]) < dirt_r
    expected = render(shape, p[:, 0], p[:, 1], np.where(lab == 0, 1.0, 0.55) * 900, 2.6) + 6 + dirt
    expected[np.hypot(xx - hole_c[0], yy - hole_c[1]) < hole_r] = 3
    image = rng.poisson(expected).astype(np.float32)
    t0 = time.perf_counter()
    f = atomds.from_array(image, pixel_size=0.127, units="Å").lcx.find_atoms()
    sec = time.perf_counter() - t0
    fx, fy = f["atom_x"].values / 0.127, f["atom_y"].values / 0.127
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / np.sqrt(3) / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 8) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 8)
    inner &= np.hypot(p[:, 0] - dirt_c[0], p[:, 1] - dirt_c[1]) > dirt_r + 10
    rec = [100 * np.isin(np.flatnonzero(inner & (lab == k)), it).mean() for k in range(2)]
    sub = f["sublattice"].values[jf]
    clean = np.hypot(p[it, 0] - dirt_c[0], p[it, 1] - dirt_c[1]) > dirt_r + 50
    in_hole = int((np.hypot(fx - hole_c[0], fy - hole_c[1]) < hole_r - 10).sum())
    return {"case": "mos2", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec,
            "truth": f"{int(inner.sum())} columns off the contamination",
            "recall": "Mo {:.1f}, S2 {:.1f} %".format(*rec),
            "extra": f"{in_hole} in the hole; sublattice ARI {adjusted_rand_score(lab[it], sub):.3f} "
                     f"({adjusted_rand_score(lab[it][clean], sub[clean]):.3f} beyond 50 px of the contamination)"}


def glitches(seed: int) -> dict:
    """A square lattice (16 px, width 2.5 px, 2500 counts) with six spoiled scan lines: three dead
    (zero) and three three times too bright, 512^2 px; find_atoms then refine."""
    rng = np.random.default_rng(seed)
    shape, a, ang = (512, 512), 16.0, rng.uniform(0, np.pi / 2)
    p, _ = lattice(shape, rot((a, 0), ang), rot((0, a), ang), [(0, 0)])
    image = rng.poisson(render(shape, p[:, 0], p[:, 1], 2500.0, 2.5) + 30).astype(np.float32)
    rows = rng.choice(np.arange(1, shape[0]), 6, replace=False)
    image[rows[:3]] = 0
    image[rows[3:]] = image[rows[3:] - 1] * 3
    t0 = time.perf_counter()
    f = atomds.from_array(image, pixel_size=0.1, units="Å").lcx.find_atoms()
    sec = time.perf_counter() - t0
    r = f.lcx.refine()
    fx, fy = r["atom_x"].values / 0.1, r["atom_y"].values / 0.1
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 8) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 8)
    fin = np.flatnonzero((fx > 8) & (fx < shape[1] - 8) & (fy > 8) & (fy < shape[0] - 8))
    ok = inner[it] & np.isfinite(r["y_err"].values[jf])
    z = (fy[jf] - p[it, 1])[ok] / (r["y_err"].values[jf][ok] / 0.1)
    lines = json.loads(f.attrs["find_atoms_params"]).get("bad_lines", {})
    return {"case": "glitches", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec,
            "truth": f"{int(inner.sum())} columns, rows {sorted(int(v) for v in rows)} spoiled",
            "recall": f"{100 * np.isin(np.flatnonzero(inner), it).mean():.1f} %",
            "extra": f"{np.setdiff1d(fin, jf).size} finds match no column; bad rows found {lines.get('rows')}; "
                     f"refined y: sd(error / y_err) {np.std(z):.2f}"}


def wedge(seed: int) -> dict:
    """A crystal wedge on vacuum (hexagonal, 14 px, width 2 px): columns of 300 counts at its edge
    rising to 3,300 over 384 px, with a diffuse background rising with the thickness, 512 x 640 px."""
    rng = np.random.default_rng(seed)
    shape, a, ang = (512, 640), 14.0, rng.uniform(0, np.pi)
    p, _ = lattice(shape, rot((a, 0), ang), rot((a / 2, a * np.sqrt(3) / 2), ang), [(0, 0)])
    p = p[p[:, 0] > 256]
    t = (p[:, 0] - 256) / 384
    xx = np.arange(shape[1])[None, :]
    expected = render(shape, p[:, 0], p[:, 1], 300 + 3000 * t, 2.0) + 10 + 300 * np.clip((xx - 256) / 384, 0, None)
    image = rng.poisson(expected).astype(np.float32)
    t0 = time.perf_counter()
    f = atomds.from_array(image, pixel_size=0.1, units="Å").lcx.find_atoms()
    sec = time.perf_counter() - t0
    fx, fy = f["atom_x"].values / 0.1, f["atom_y"].values / 0.1
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    inner = (p[:, 0] < shape[1] - 9) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 9)
    edge = inner & (p[:, 0] < 256 + 2 * a)
    un = np.setdiff1d(np.arange(fx.size), jf)
    return {"case": "wedge", "seed": seed, "px": f"{shape[0]}x{shape[1]}", "seconds": sec,
            "truth": f"{int(inner.sum())} columns", "recall": f"{100 * np.isin(np.flatnonzero(inner), it).mean():.1f} % "
            f"({100 * np.isin(np.flatnonzero(edge), it).mean():.1f} % of the two thinnest periods)",
            "extra": f"{un.size} finds match no column, {int((fx[un] < 250).sum())} in the vacuum"}


def two_grains(seed: int) -> dict:
    """Two grains of one hexagonal lattice (13 px, width 2.2 px, 1200 counts), the second rotated by
    17 degrees, meeting along a straight sharp boundary, 768^2 px: ``atomds.analyze``, regions."""
    rng = np.random.default_rng(seed)
    shape, a, sig = (768, 768), 13.0, 2.2
    ang = rng.uniform(0, np.pi)
    p1, _ = lattice(shape, rot((a, 0), ang), rot((a / 2, a * np.sqrt(3) / 2), ang), [(0, 0)])
    b = ang + np.deg2rad(17)
    p2, _ = lattice(shape, rot((a, 0), b), rot((a / 2, a * np.sqrt(3) / 2), b), [(3.1, 1.7)])
    p1 = p1[p1[:, 0] + 0.3 * p1[:, 1] < 450]
    p2 = p2[p2[:, 0] + 0.3 * p2[:, 1] >= 450 + 0.5 * a]
    p = np.vstack([p1, p2])
    image = rng.poisson(render(shape, p[:, 0], p[:, 1], 1200.0, sig) + 15).astype(np.float32)
    t0 = time.perf_counter()
    out = atomds.analyze(atomds.from_array(image, pixel_size=0.1, units="Å"))
    sec = time.perf_counter() - t0
    fx, fy = out["atom_x"].values / 0.1, out["atom_y"].values / 0.1
    it, _ = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 8) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 8)
    n_reg = int(out.sizes.get("region_id", 0))
    return {"case": "two_grains", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec,
            "truth": f"{int(inner.sum())} columns, one phase", "recall": f"{100 * np.isin(np.flatnonzero(inner), it).mean():.1f} %",
            "extra": f"{n_reg} region{'s' if n_reg != 1 else ''} (phases); time is atomds.analyze's"}


def _find_refine_scores(image, p, a, ps=0.1) -> tuple[dict, dict]:
    """find_atoms then refine of ``image``; recall, unmatched finds and sd(error / error) against ``p``."""
    out = atomds.from_array(image, pixel_size=ps, units="Å").lcx.find_atoms().lcx.refine()
    fx, fy = out["atom_x"].values / ps, out["atom_y"].values / ps
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    ny, nx = image.shape
    inner = (p[:, 0] > 8) & (p[:, 0] < nx - 9) & (p[:, 1] > 8) & (p[:, 1] < ny - 9)
    fin = np.flatnonzero((fx > 8) & (fx < nx - 9) & (fy > 8) & (fy < ny - 9))
    ok = inner[it] & np.isfinite(out["x_err"].values[jf]) & np.isfinite(out["y_err"].values[jf])
    zx = (fx[jf] - p[it, 0])[ok] / (out["x_err"].values[jf][ok] / ps)
    zy = (fy[jf] - p[it, 1])[ok] / (out["y_err"].values[jf][ok] / ps)
    return out, {"recall": 100 * np.isin(np.flatnonzero(inner), it).mean(), "n_inner": int(inner.sum()),
                 "extra": np.setdiff1d(fin, jf).size, "zx": float(np.std(zx)), "zy": float(np.std(zy))}


def line_noise(seed: int, aligned: bool) -> dict:
    """Every scan line (row) offset by its own random amount, sd 0.1 of a column's peak height."""
    rng = np.random.default_rng(seed)
    shape, a, sig = (512, 512), 15.0, 2.2
    ang = 0.0 if aligned else rng.uniform(0.1, np.pi / 3 - 0.1)
    p, _ = lattice(shape, rot((a, 0), ang), rot((a / 2, a * np.sqrt(3) / 2), ang), [(0, 0)])
    peak = 2000.0 / (2 * np.pi * sig**2)
    image = rng.poisson(render(shape, p[:, 0], p[:, 1], 2000.0, sig) + 20).astype(np.float32)
    image = (image + (0.1 * peak * rng.normal(size=shape[0]))[:, None]).astype(np.float32)
    t0 = time.perf_counter()
    out, sc = _find_refine_scores(image, p, a)
    sec = time.perf_counter() - t0
    ln = json.loads(out.attrs["find_atoms_params"]).get("line_noise", {})
    return {"case": "line_noise_aligned" if aligned else "line_noise", "seed": seed, "px": f"{shape[0]}^2",
            "seconds": sec, "truth": f"{sc['n_inner']} columns", "recall": f"{sc['recall']:.1f} %",
            "extra": f"{sc['extra']} finds match no column; line noise ratio {ln.get('ratio')} (taken off: "
                     f"{ln.get('applied')}); refined sd(error / error) x {sc['zx']:.2f}, y {sc['zy']:.2f}; "
                     "time is find + refine"}


def _interstitial_image(seed: int):
    rng = np.random.default_rng(seed)
    shape, a, sig, ang = (512, 512), 16.0, 2.3, rng.uniform(0, np.pi / 2)
    p, _ = lattice(shape, rot((a, 0), ang), rot((0, a), ang), [(0, 0)])
    p = p[rng.random(len(p)) > 0.04]
    inner = p[(p[:, 0] > 60) & (p[:, 0] < 450) & (p[:, 1] > 60) & (p[:, 1] < 450)]
    inter = inner[rng.choice(len(inner), 12, replace=False)] + np.array(rot((a / 2, a / 2), ang))
    image = render(shape, p[:, 0], p[:, 1], 2500.0, sig) + render(shape, inter[:, 0], inter[:, 1], 1750.0, sig) + 20
    return rng.poisson(image).astype(np.float32), p, inter, a


def interstitials(seed: int) -> dict:
    """Four images (seeds 4 seed .. 4 seed + 3) of a square lattice at a random angle with 4 % vacancies
    and 12 interstitials at cell centres (0.7 of a column's counts): interstitials found in each."""
    found, recall, extra, sec, n_cols = [], [], 0, 0.0, 0
    for k in range(4 * seed, 4 * seed + 4):
        image, p, inter, a = _interstitial_image(k)
        t0 = time.perf_counter()
        f = atomds.from_array(image, pixel_size=0.1, units="Å").lcx.find_atoms()
        sec += time.perf_counter() - t0
        fx, fy = f["atom_x"].values / 0.1, f["atom_y"].values / 0.1
        truth = np.vstack([p, inter])
        it, jf = matched(truth[:, 0], truth[:, 1], fx, fy, a / 3)
        found.append(int(np.isin(len(p) + np.arange(12), it).sum()))
        ok = (truth[:, 0] > 8) & (truth[:, 0] < 503) & (truth[:, 1] > 8) & (truth[:, 1] < 503)
        fin = np.flatnonzero((fx > 8) & (fx < 503) & (fy > 8) & (fy < 503))
        recall.append(100 * np.isin(np.flatnonzero(ok), it).mean())
        extra += np.setdiff1d(fin, jf).size
        n_cols += int(ok.sum())
    return {"case": "interstitials", "seed": seed, "px": "4 x 512^2", "seconds": sec,
            "truth": f"{n_cols} columns, 4 x 12 interstitials", "recall": f"{min(recall):.1f} % (lowest)",
            "extra": f"{', '.join(map(str, found))} of 12 interstitials found; {extra} finds match no column"}


def _hexagonal_1500(seed: int):
    """A 512^2 hexagonal lattice (14 px, width 2 px, 1500 counts on 15 per pixel) at a random angle:
    the generator (to draw more from), shape, spacing, width, sites and Poisson image."""
    rng = np.random.default_rng(seed)
    shape, a, sig = (512, 512), 14.0, 2.0
    ang = rng.uniform(0, np.pi)
    p, _ = lattice(shape, rot((a, 0), ang), rot((a / 2, a * np.sqrt(3) / 2), ang), [(0, 0)])
    image = rng.poisson(render(shape, p[:, 0], p[:, 1], 1500.0, sig) + 15).astype(np.float32)
    return rng, shape, a, sig, p, image


def hits(seed: int) -> dict:
    """A hexagonal lattice with 52 compact hits (2 x 2 and 3 x 1 pixels at 20 times the brightest pixel)."""
    rng, shape, a, sig, p, image = _hexagonal_1500(seed)
    hot = 20 * image.max()
    for k, (y, x) in enumerate(zip(rng.integers(2, 508, 52), rng.integers(2, 508, 52))):
        if k % 2:
            image[y : y + 2, x : x + 2] = hot
        else:
            image[y, x : x + 3] = hot
    t0 = time.perf_counter()
    f = atomds.from_array(image, pixel_size=0.1, units="Å").lcx.find_atoms()
    sec = time.perf_counter() - t0
    fx, fy = f["atom_x"].values / 0.1, f["atom_y"].values / 0.1
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 9) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 9)
    fin = np.flatnonzero((fx > 8) & (fx < shape[1] - 9) & (fy > 8) & (fy < shape[0] - 9))
    prm = json.loads(f.attrs["find_atoms_params"])
    return {"case": "hits", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec, "truth": f"{int(inner.sum())} columns",
            "recall": f"{100 * np.isin(np.flatnonzero(inner), it).mean():.1f} %",
            "extra": f"{np.setdiff1d(fin, jf).size} finds match no column; {prm.get('spikes')} spike pixels; width read "
                     f"{prm.get('sigma_px', float('nan')):.2f} px (true {sig})"}


def render_moffat(shape, x, y, counts, fwhm, beta=2.5) -> np.ndarray:
    """Point-sampled Moffat profiles (``(1 + r^2 / alpha^2)^-beta``, a probe's long tails) of integrated ``counts``
    and full width at half maximum ``fwhm`` (px) at ``(x, y)``, cut 30 px out."""
    img = np.zeros(shape)
    ny, nx = shape
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    cnt = np.broadcast_to(np.asarray(counts, float), x.shape)
    for xi, yi, c in zip(x, y, cnt):
        x0, x1 = max(int(xi) - 30, 0), min(int(xi) + 31, nx)
        y0, y1 = max(int(yi) - 30, 0), min(int(yi) + 31, ny)
        if x0 < x1 and y0 < y1:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            r2 = (xx - xi) ** 2 + (yy - yi) ** 2
            img[y0:y1, x0:x1] += c * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
    return img


def probe_tails(seed: int, dense: bool) -> dict:
    """Columns with a probe's long tails (Moffat, beta 2.5, full width at half maximum 4.2 px) at high dose, 512^2
    px: a perovskite [001] (A 16 px apart, 60,000 counts; B at 0.6 of it) or, ``dense``, a square lattice 10 px
    apart at 40,000 counts. find_atoms then refine."""
    rng = np.random.default_rng(seed)
    shape, ang = (512, 512), rng.uniform(0, np.pi)
    if dense:
        a, counts = 10.0, 40000.0
        p, lab = lattice(shape, rot((a, 0), ang), rot((0, a), ang), [(0, 0)])
        share = np.ones(1)
    else:
        a, counts = 16.0, 60000.0
        p, lab = lattice(shape, rot((a, 0), ang), rot((0, a), ang), [(0, 0), rot((a / 2, a / 2), ang)])
        share = np.array([1.0, 0.6])
    image = rng.poisson(render_moffat(shape, p[:, 0], p[:, 1], counts * share[lab], 4.2) + 0.05 * counts / 20
                        ).astype(np.float32)
    t0 = time.perf_counter()
    out = atomds.from_array(image, pixel_size=0.1, units="Å").lcx.find_atoms().lcx.refine()
    sec = time.perf_counter() - t0
    fx, fy = out["atom_x"].values / 0.1, out["atom_y"].values / 0.1
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, (a if dense else a / np.sqrt(2)) / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 9) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 9)
    fin = np.flatnonzero((fx > 8) & (fx < shape[1] - 9) & (fy > 8) & (fy < shape[0] - 9))
    rec = ", ".join(f"{'AB'[k]} {100 * np.isin(np.flatnonzero(inner & (lab == k)), it).mean():.1f}"
                    for k in range(share.size))
    return {"case": "probe_tails_dense" if dense else "probe_tails", "seed": seed, "px": f"{shape[0]}^2",
            "seconds": sec, "truth": f"{int(inner.sum())} columns", "recall": f"{rec} %",
            "extra": f"{np.setdiff1d(fin, jf).size} finds match no column; time is find + refine"}


def zero_padding(seed: int) -> dict:
    """A hexagonal lattice padded with zeros on the left 30 and the top 20 px (a drift-corrected sum)."""
    rng, shape, a, sig, p, image = _hexagonal_1500(seed)
    image[:, :30] = 0
    image[:20] = 0
    t0 = time.perf_counter()
    out = atomds.analyze(atomds.from_array(image, pixel_size=0.1, units="Å"))
    sec = time.perf_counter() - t0
    fx, fy = out["atom_x"].values / 0.1, out["atom_y"].values / 0.1
    # every site, those centred in the padding too (a column cut by its edge is seen in part, as at a border)
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    un = np.setdiff1d(np.arange(fx.size), jf)
    inner = (p[:, 0] > 36) & (p[:, 1] > 26) & (p[:, 0] < 503) & (p[:, 1] < 503)
    in_pad = (fx < 30) | (fy < 20)
    pad = in_pad[un]
    edge = ~pad & ((fx[un] < 36) | (fy[un] < 26))
    n_reg = int(out.sizes.get("region_id", 0))
    return {"case": "zero_padding", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec,
            "truth": f"{int(inner.sum())} columns 6 px inside the data",
            "recall": f"{100 * np.isin(np.flatnonzero(inner), it).mean():.1f} %",
            "extra": f"{int(in_pad.sum())} finds in the padding ({int(pad.sum())} matching no column: of those centred "
                     f"there, cut by its edge, the others are), {int(edge.sum())} within 6 px of it matching no column, "
                     f"{un.size - int(pad.sum()) - int(edge.sum())} elsewhere; {n_reg} region{'s' if n_reg != 1 else ''}; "
                     "time is atomds.analyze's"}


def scan_drift(seed: int) -> dict:
    """A square lattice under slow-scan drift: x shifted by 5 % of y and a 6 px sinusoid of 400 rows."""
    rng = np.random.default_rng(seed)
    shape, a, sig = (640, 640), 15.0, 2.2
    p, _ = lattice(shape, (a, 0), (0, a), [(0, 0)])
    p = np.c_[p[:, 0] + 0.05 * p[:, 1] + 6 * np.sin(2 * np.pi * p[:, 1] / 400 + rng.uniform(0, 2 * np.pi)), p[:, 1]]
    image = rng.poisson(render(shape, p[:, 0], p[:, 1], 2000.0, sig) + 20).astype(np.float32)
    t0 = time.perf_counter()
    out = atomds.analyze(atomds.from_array(image, pixel_size=0.1, units="Å"))
    sec = time.perf_counter() - t0
    n_reg = int(out.sizes.get("region_id", 0))
    fx, fy = out["atom_x"].values / 0.1, out["atom_y"].values / 0.1
    it, _ = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 8) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 8)
    return {"case": "scan_drift", "seed": seed, "px": f"{shape[0]}^2", "seconds": sec,
            "truth": f"{int(inner.sum())} columns, one phase", "recall": f"{100 * np.isin(np.flatnonzero(inner), it).mean():.1f} %",
            "extra": f"{n_reg} region{'s' if n_reg != 1 else ''} (phases); time is atomds.analyze's"}


def correlated_noise(seed: int, kind: str) -> dict:
    """Noise correlated between pixels: a detector's afterglow along x, a sum of interpolated frames, or smoothing."""
    rng = np.random.default_rng(seed)
    shape, a, sig = (512, 512), 14.0, 2.0
    ang = rng.uniform(0, np.pi)
    p, _ = lattice(shape, rot((a, 0), ang), rot((a / 2, a * np.sqrt(3) / 2), ang), [(0, 0)])
    clean = render(shape, p[:, 0], p[:, 1], 1500.0, sig) + 15
    if kind == "afterglow":
        image = rng.poisson(clean).astype(float)
        for i in range(1, shape[1]):
            image[:, i] = 0.6 * image[:, i] + 0.4 * image[:, i - 1]
    elif kind == "smoothed":
        image = ndi.gaussian_filter(rng.poisson(clean).astype(float), 0.7)
    else:
        image = np.zeros(shape)
        for _ in range(10):
            d = rng.uniform(-3, 3, 2)
            frame = rng.poisson(np.clip(ndi.shift(clean, d, order=3, mode="nearest"), 0, None) / 10).astype(float)
            image += ndi.shift(frame, -d, order=1, mode="nearest")
    t0 = time.perf_counter()
    out = atomds.from_array(image.astype(np.float32), pixel_size=0.1, units="Å").lcx.find_atoms().lcx.refine()
    sec = time.perf_counter() - t0
    fx, fy = out["atom_x"].values / 0.1, out["atom_y"].values / 0.1
    it, jf = matched(p[:, 0], p[:, 1], fx, fy, a / 3)
    inner = (p[:, 0] > 8) & (p[:, 0] < shape[1] - 9) & (p[:, 1] > 8) & (p[:, 1] < shape[0] - 9)
    fin = np.flatnonzero((fx > 8) & (fx < shape[1] - 9) & (fy > 8) & (fy < shape[0] - 9))
    keep = inner[it] & np.isfinite(out["x_err"].values[jf]) & np.isfinite(out["y_err"].values[jf])
    ex, ey = (fx[jf] - p[it, 0])[keep], (fy[jf] - p[it, 1])[keep]
    zx = (ex - np.median(ex)) / (out["x_err"].values[jf][keep] / 0.1)
    zy = (ey - np.median(ey)) / (out["y_err"].values[jf][keep] / 0.1)
    corr = json.loads(out.attrs["refine_params"]).get("estimated", {}).get("noise_correlation") or {}
    meas = corr.get("measured", {})
    return {"case": kind, "seed": seed, "px": f"{shape[0]}^2", "seconds": sec, "truth": f"{int(inner.sum())} columns",
            "recall": f"{100 * np.isin(np.flatnonzero(inner), it).mean():.1f} %",
            "extra": f"{np.setdiff1d(fin, jf).size} finds match no column; refined sd(error / error) x {np.std(zx):.2f}, "
                     f"y {np.std(zy):.2f}; error factors measured x {meas.get('x', float('nan')):.2f}, "
                     f"y {meas.get('y', float('nan')):.2f} (applied: {corr.get('applied')}); time is find + refine"}


def run(case: str, seed: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if case.startswith("au"):
                return au_on_carbon(seed, case == "au_big")
            if case.startswith("stm"):
                return stm(seed, case == "stm_small")
            if case.startswith("line_noise"):
                return line_noise(seed, case == "line_noise_aligned")
            if case in ("afterglow", "frame_sum", "smoothed"):
                return correlated_noise(seed, case)
            if case.startswith("probe_tails"):
                return probe_tails(seed, case == "probe_tails_dense")
            return {"abf": abf, "mos2": mos2, "glitches": glitches, "wedge": wedge, "two_grains": two_grains,
                    "interstitials": interstitials, "scan_drift": scan_drift, "hits": hits,
                    "zero_padding": zero_padding}[case](seed)
        except Exception as exc:  # a failure is a result of the benchmark
            return {"case": case, "seed": seed, "px": "", "seconds": float("nan"), "truth": "",
                    "recall": "error", "extra": f"{type(exc).__name__}: {str(exc)[:160]}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    rows = []
    for case in args.cases:
        for seed in args.seeds:
            row = run(case, seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = [SECTION, "",
             f"`nice python benchmarks/bench_unlike.py --seeds {' '.join(map(str, args.seeds))}` on {platform.machine()}, "
             f"Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}. Images rendered by the script itself "
             "(no code of `atomds.core.samples`), `find_atoms()` with defaults; see the script's docstring for each case.",
             "", "| case | seed | size | truth | recall | other finds | find (s) |", "| --- | --- | --- | --- | --- | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['seed']} | {r['px']} | {r['truth']} | {r['recall']} | {r['extra']} | "
                     f"{r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text, RESULTS)


if __name__ == "__main__":
    main()
