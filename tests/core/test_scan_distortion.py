"""The slow-scan distortion read from the atoms (atomds.core.scan_distortion)."""

import numpy as np
import pytest

from atomds.core.scan_distortion import MIN_SIGNIFICANCE, row_profile, scan_shifts


def _lattice(kind: str, seed: int, spacing: float = 12.0, size: float = 600.0, noise: float = 0.05, angle: float = 17.0):
    """Positions (px) of a lattice filling a ``size`` square, rotated by ``angle`` degrees, with noise, and
    the sublattice of each (0 or 1 for a honeycomb)."""
    rng = np.random.default_rng(seed)
    n = np.arange(-80, 80)
    i, j = (a.ravel() for a in np.meshgrid(n, n))
    if kind == "square":
        p, sub = np.c_[i * spacing, j * spacing], np.zeros(i.size, int)
    else:
        a1, a2 = np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2])
        if kind == "honeycomb":
            a = spacing * np.sqrt(3)
            base = np.c_[i, j] @ np.vstack([a1, a2]) * a
            p = np.r_[base, base + a * (a1 + a2) / 3]
            sub = np.r_[np.zeros(i.size, int), np.ones(i.size, int)]
        else:
            p, sub = np.c_[i, j] @ np.vstack([a1, a2]) * spacing, np.zeros(i.size, int)
    t = np.deg2rad(angle)
    p = p @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    keep = (p >= 0).all(axis=1) & (p < size).all(axis=1)
    return p[keep] + rng.normal(0.0, noise, (keep.sum(), 2)), sub[keep]


def _wobble(y, shear=0.015, amplitude=1.2, period=180.0):
    return shear * y + amplitude * np.sin(2 * np.pi * y / period + 0.4)


def _detrended(v, y):
    """``v`` less its best straight line in ``y`` (a constant shear is the median lattice's own)."""
    A = np.c_[np.ones_like(y), y]
    return v - A @ np.linalg.lstsq(A, v, rcond=None)[0]


@pytest.mark.parametrize("kind", ["hexagonal", "square", "honeycomb"])
def test_a_scan_wobble_is_measured_from_the_atoms(kind):
    p, sub = _lattice(kind, seed=1)
    f = _wobble(p[:, 1])
    r = scan_shifts(p[:, 0] + f, p[:, 1], sublattice=sub)
    assert r["rounds"] >= 1 and r["significance"] > 100 * MIN_SIGNIFICANCE
    err = _detrended(r["shift_x"] - f, p[:, 1])
    # a wobble of 1.2 px: the line shifts are recovered to a tenth of it (the median over two rows of
    # atoms flattens the sinusoid a little, the rounds restore it)
    assert np.sqrt(np.mean(err**2)) < 0.1
    # the max shear of the sinusoid is 2 pi 1.2 / 180 = 4.2 %
    assert 0.03 < r["shear"] < 0.05


def test_a_stretch_across_the_lines_is_left_alone():
    """An epitaxial film whose c/a differs from its substrate's, interface along the rows: a step
    of the line spacing (H_yy) is no scan shear, and is not corrected."""
    p, _ = _lattice("square", seed=2, angle=0.0)
    y = np.where(p[:, 1] > 300, 300 + 1.04 * (p[:, 1] - 300), p[:, 1])
    r = scan_shifts(p[:, 0], y)
    assert r["rounds"] == 0 and np.all(r["shift_x"] == 0), r


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["hexagonal", "square", "honeycomb"])
def test_no_scan_distortion_moves_nothing(kind, seed):
    """Noise alone (t-like, about 1) stays far below the threshold: the positions are left as they are."""
    p, sub = _lattice(kind, seed=seed, noise=0.08 + 0.04 * seed)
    r = scan_shifts(p[:, 0], p[:, 1], sublattice=sub)
    assert r["rounds"] == 0 and np.all(r["shift_x"] == 0)
    assert r["significance"] < MIN_SIGNIFICANCE / 3


@pytest.mark.parametrize("seed", range(3))
def test_strain_that_is_no_scan_is_left_alone(seed):
    """A strain field that varies along x, and a bump of strain in part of the lines (an inclusion):
    neither moves whole lines alike, so neither is taken for the scan."""
    p, _ = _lattice("hexagonal", seed=seed)
    x, y = p[:, 0].copy(), p[:, 1].copy()
    # a shear along the lines that varies along x (bending): u_x = 0.02 y sin(2 pi x / 300)
    r = scan_shifts(x + 0.02 * (y - 300) * np.sin(2 * np.pi * x / 300), y)
    assert r["rounds"] == 0, r
    # an inclusion: a Gaussian bump of displacement 1.5 px across 60 px, in a fifth of the width
    d = 1.5 * np.exp(-((x - 120) ** 2 + (y - 300) ** 2) / (2 * 60.0**2))
    r = scan_shifts(x + d * np.sign(y - 300), y)
    assert r["rounds"] == 0, r


def test_a_grain_of_another_orientation_neither_hides_nor_bends_the_scan():
    p, _ = _lattice("hexagonal", seed=3)
    q, _ = _lattice("hexagonal", seed=4, angle=41.0)
    grain = ((q - [380.0, 300.0]) ** 2).sum(axis=1) < 130.0**2
    matrix = ((p - [380.0, 300.0]) ** 2).sum(axis=1) >= 138.0**2
    pos = np.r_[p[matrix], q[grain]]
    f = _wobble(pos[:, 1], amplitude=1.0, period=200.0)
    r = scan_shifts(pos[:, 0] + f, pos[:, 1])
    assert r["rounds"] >= 1
    err = _detrended(r["shift_x"] - f, pos[:, 1])
    assert np.sqrt(np.mean(err**2)) < 0.12


def test_row_profile_of_too_few_atoms_is_empty():
    r = row_profile(np.arange(10.0), np.arange(10.0), np.zeros(10), 1.0)
    assert r["lines"] == 0 and np.isnan(r["significance"]) and r["grid"].size == 0
    r = scan_shifts([1.0, np.nan], [2.0, 3.0])
    assert r["rounds"] == 0 and r["shift_x"][0] == 0 and np.isnan(r["shift_x"][1])


@pytest.mark.parametrize("misorientation", [8.0, 12.0, 25.0])
def test_two_grains_of_one_lattice_are_no_scan(misorientation):
    """Two grains of a square lattice meeting along an inclined boundary, half the image each: the
    median lattice is neither's (at 8 degrees its bonds mix both), the grains' shares of each line
    change with y, and a rule that kept both grains read a profile from their mix (a spread-based
    one: significance 13,000 on a generated image at 12 degrees). One grain, measured against its
    own lattice, shows none. With a wobble, that grain's lines get it; the other grain's lines
    beyond them are not distorted further (the shift stays what it was)."""
    p, _ = _lattice("square", seed=5, angle=0.0)
    q, _ = _lattice("square", seed=6, angle=misorientation)
    side = lambda v: v[:, 0] * np.cos(0.7) + v[:, 1] * np.sin(0.7) < 420.0  # noqa: E731
    pos = np.r_[p[side(p)], q[~side(q)]]
    first = np.r_[np.ones(side(p).sum(), bool), np.zeros((~side(q)).sum(), bool)]
    r = scan_shifts(pos[:, 0], pos[:, 1])
    assert r["rounds"] == 0, r
    f = _wobble(pos[:, 1], amplitude=1.0, period=160.0)
    r = scan_shifts(pos[:, 0] + f, pos[:, 1])
    assert r["rounds"] >= 1
    rms = {g: np.sqrt(np.mean(_detrended(r["shift_x"][m] - f[m], pos[m, 1]) ** 2)) for g, m in
           (("first", first), ("second", ~first))}
    untouched = {g: np.sqrt(np.mean(_detrended(f[m], pos[m, 1]) ** 2)) for g, m in (("first", first), ("second", ~first))}
    assert min(rms.values()) < 0.2, rms  # of a 1 px wobble; its last lines hold too few atoms to measure
    assert all(rms[g] <= untouched[g] for g in rms), (rms, untouched)


def _sheared_part(region, shear: float = 0.1, seed: int = 0, n: float = 384.0):
    """A hexagonal lattice (12 px) with the atoms inside ``region(x, y)`` replaced by those of the same
    lattice sheared by ``shear`` along x (a phase related to it by a pure shear along the rows)."""
    p, _ = _lattice("hexagonal", seed=seed, size=n, angle=0.0, noise=0.1)
    q, _ = _lattice("hexagonal", seed=seed + 1, size=n, angle=0.0, noise=0.1)
    q[:, 0] += shear * q[:, 1]
    q = q[(q[:, 0] >= 0) & (q[:, 0] < n)]
    return np.r_[p[~region(p[:, 0], p[:, 1])], q[region(q[:, 0], q[:, 1])]]


@pytest.mark.parametrize("name, region", [
    ("grain over 70 % of the width of the upper half", lambda x, y: (y > 192) & (x < 0.7 * 384)),
    ("round grain", lambda x, y: np.hypot(x - 192, y - 192) < 0.35 * 384),
    ("film whose interface runs 35 degrees off the rows", lambda x, y: y - 192 > np.tan(np.deg2rad(35)) * (x - 192)),
    ("film 45 degrees off the rows", lambda x, y: y - 192 > x - 192),
])
def test_a_phase_in_part_of_the_lines_is_no_scan(name, region):
    """A cold review's images: a second phase related to the first by a pure shear along the rows
    (it passes the H_xx, H_yx filter) filling part of many lines. Their stretches along x disagree,
    so the lines are not moved (they were, and the phases merged or the regions scrambled)."""
    pos = _sheared_part(region)
    r = scan_shifts(pos[:, 0], pos[:, 1])
    assert r["rounds"] == 0 and r["consistent"] < 0.8, (name, r["consistent"], r["significance"])


def test_a_phase_filling_whole_lines_is_taken_for_the_scan():
    """The stated limit: the same phase filling whole lines (a band along the rows) cannot be told
    from a scan that sheared those lines."""
    pos = _sheared_part(lambda x, y: (y > 130) & (y < 250))
    assert scan_shifts(pos[:, 0], pos[:, 1])["rounds"] >= 1


def test_scan_shifts_of_no_usable_atom_are_zero():
    p, _ = _lattice("hexagonal", seed=0)
    r = scan_shifts(p[:, 0], p[:, 1], usable=np.zeros(len(p), bool))
    assert r["rounds"] == 0 and np.all(r["shift_x"] == 0)


@pytest.mark.parametrize("noise", [0.02, 0.05, 0.3])
def test_a_wobble_on_a_square_lattice_along_the_rows_is_corrected_at_any_noise(noise):
    """A second review's case: on a square lattice aligned with the rows, each window holds two rows
    of atoms sheared differently and a stretch can hold more of one than of the other; with precise
    positions that looked like lines whose stretches disagree (consistent 0.38 at 0.02 px), and the
    wobble was left in. The stretches are compared without the window's trend in y."""
    rng = np.random.default_rng(1)
    i, j = (v.ravel() for v in np.meshgrid(np.arange(32), np.arange(32)))
    x, y = 16.0 * i + rng.normal(0, noise, i.size), 16.0 * j + rng.normal(0, noise, i.size)
    f = 1.5 * np.sin(2 * np.pi * y / 120.0) + 0.02 * y
    r = scan_shifts(x + f, y)
    assert r["rounds"] >= 1 and r["consistent"] >= 0.9, r
    assert np.sqrt(np.mean(_detrended(r["shift_x"] - f, y) ** 2)) < 0.15


@pytest.mark.parametrize("shape", [(7, 7), (6, 80)])
def test_scan_shifts_of_a_small_crop_are_zero(shape):
    """Too few lines or atoms to judge: no shift, and no error (a second review: KeyError)."""
    i, j = (v.ravel() for v in np.meshgrid(np.arange(shape[1]), np.arange(shape[0])))
    r = scan_shifts(12.0 * i + 6.0 * j, 10.4 * j)
    assert r["rounds"] == 0 and np.all(r["shift_x"] == 0)
