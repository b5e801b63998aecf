"""Tests of atomds.core.strain and atomds.core.polarization on point lattices with known truth."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atomds.core import polarization as cpol
from atomds.core import strain as cs
from atomds.errors import InvalidParameterError


def lattice(kind="hexagonal", n=24, a=14.0, angle=0.3):
    if kind == "hexagonal":
        v = np.array([[a, 0.0], [a / 2, a * np.sqrt(3) / 2]])
    else:
        v = np.array([[a, 0.0], [0.0, a]])
    c, s = np.cos(angle), np.sin(angle)
    v = v @ np.array([[c, s], [-s, c]])
    i, j = np.meshgrid(np.arange(n), np.arange(n))
    return np.column_stack([i.ravel(), j.ravel()]) @ v


@settings(max_examples=25, deadline=None)
@given(
    exx=st.floats(-0.03, 0.03), eyy=st.floats(-0.03, 0.03), exy=st.floats(-0.03, 0.03), rot=st.floats(-0.03, 0.03),
    kind=st.sampled_from(["hexagonal", "square"]),
)
def test_homogeneous_strain_is_recovered_against_an_unstrained_reference(exx, eyy, exy, rot, kind):
    xy = lattice(kind)
    ref = xy[:, 0] < np.median(xy[:, 0])  # unstrained left half is the reference
    F = np.eye(2) + np.array([[exx, exy - rot], [exy + rot, eyy]])
    strained = np.where(ref[:, None], xy, xy @ F.T)
    out = cs.local_strain(strained[:, 0], strained[:, 1], reference=ref, centers=~ref)
    inner = ~ref & (out["n_bonds"] >= (6 if kind == "hexagonal" else 4))
    inner &= strained[:, 0] > np.percentile(strained[:, 0], 60)  # bonds inside the strained half only
    for name, value in (("exx", exx), ("eyy", eyy), ("exy", exy), ("lattice_rotation", rot)):
        np.testing.assert_allclose(out[name][inner], value, atol=1e-9)
    assert np.isnan(out["exx"][ref]).all()  # not a centre


@pytest.mark.parametrize("radius", [None, 2.05 * 14.0])
def test_strain_errors_are_calibrated(radius):
    rng = np.random.default_rng(0)
    xy = lattice(n=40)
    sig = rng.uniform(0.03, 0.12, len(xy))  # every atom its own error
    noisy = xy + rng.normal(0, 1, xy.shape) * sig[:, None]
    out = cs.local_strain(noisy[:, 0], noisy[:, 1], sig, sig, radius=radius)
    full = out["n_bonds"] >= (6 if radius is None else 18)
    for name in ("exx", "eyy", "exy"):
        z = out[name][full] / out[f"{name}_err"][full]
        assert 0.9 < z.std() < 1.1, (name, z.std())
    z = (out["lattice_rotation"][full] - np.median(out["lattice_rotation"][full])) / out["lattice_rotation_err"][full]
    assert 0.9 < z.std() < 1.1


def test_a_larger_radius_trades_resolution_for_precision():
    rng = np.random.default_rng(1)
    xy = lattice(n=30)
    noisy = xy + rng.normal(0, 0.05, xy.shape)
    e = np.full(len(xy), 0.05)
    first = cs.local_strain(noisy[:, 0], noisy[:, 1], e, e)
    wide = cs.local_strain(noisy[:, 0], noisy[:, 1], e, e, radius=2.05 * 14.0)
    inner = wide["n_bonds"] >= 18
    assert np.median(wide["n_bonds"][inner]) == 18 and np.median(first["n_bonds"][inner]) == 6
    ratio = np.median(wide["exx_err"][inner]) / np.median(first["exx_err"][inner])
    assert 0.2 < ratio < 0.5
    assert np.std(wide["exx"][inner]) < 0.5 * np.std(first["exx"][inner])


def test_strain_reference_bonds_and_bad_input():
    xy = lattice("square", n=10)
    refs = cs.reference_bonds(*(xy[1:] - xy[:-1]).T)
    assert len(refs) >= 1
    with pytest.raises(InvalidParameterError, match="reference selects no atom"):
        cs.local_strain(xy[:, 0], xy[:, 1], reference=np.zeros(len(xy), bool))
    with pytest.raises(InvalidParameterError, match="radius"):
        cs.local_strain(xy[:, 0], xy[:, 1], radius=-1.0)
    with pytest.raises(InvalidParameterError, match="same length"):
        cs.local_strain(xy[:, 0], xy[:-1, 1])


def perovskite_points(n=20, a=16.0, shift=1.2, rng=None, noise=0.0):
    a_sites = lattice("square", n=n, a=a, angle=0.0)
    b_sites = a_sites + a / 2
    side = np.where(b_sites[:, 0] + 0.3 * b_sites[:, 1] < np.median(b_sites[:, 0] + 0.3 * b_sites[:, 1]), 1.0, -1.0)
    true = np.column_stack([np.zeros(len(b_sites)), shift * side])  # antiphase domains along y
    xy = np.concatenate([a_sites, b_sites + true])
    lab = np.repeat([0, 1], len(a_sites))
    err = np.full(len(xy), noise)
    if rng is not None and noise > 0:
        xy = xy + rng.normal(0, noise, xy.shape)
    return xy, lab, np.concatenate([np.zeros_like(true), true]), err


def test_polarization_recovers_the_shift_with_calibrated_errors():
    rng = np.random.default_rng(3)
    xy, lab, true, err = perovskite_points(n=30, rng=rng, noise=0.08)
    out = cpol.polarization(xy[:, 0], xy[:, 1], err, err, lab)
    assert (out["displaced"], out["reference"], out["n_cage"]) == (1, 0, 4)
    b = (lab == 1) & np.isfinite(out["polarization_y"])
    assert b.sum() > 0.8 * (lab == 1).sum()
    assert np.isnan(out["polarization_y"][lab == 0]).all()
    r = np.corrcoef(out["polarization_y"][b], true[b, 1])[0, 1]
    assert r > 0.99
    z = (out["polarization_y"][b] - true[b, 1]) / out["polarization_y_err"][b]
    assert 0.85 < z.std() < 1.15
    dom, dirs = cpol.polar_domains(out["polarization_x"], out["polarization_y"], out["polarization_x_err"],
                                   out["polarization_y_err"])
    assert len(dirs) == 2 and abs(abs(np.degrees(dirs[0])) - 90) < 6
    truth_dom = (true[b, 1] > 0).astype(int)
    agree = (dom[b] == truth_dom).mean()
    assert max(agree, 1 - agree) > 0.99


def test_polarization_edges_and_errors():
    xy, lab, _, _ = perovskite_points(n=8)
    out = cpol.polarization(xy[:, 0], xy[:, 1], None, None, lab)
    # B columns on the outer row have an open cage (no A beyond the border): NaN, not a wrong shift
    outer = (lab == 1) & (xy[:, 0] > xy[:, 0].max() - 1)
    assert np.isnan(out["polarization_x"][outer]).all()
    with pytest.raises(InvalidParameterError, match="two sublattices"):
        cpol.polarization(xy[:, 0], xy[:, 1], None, None, np.zeros(len(xy), int))
    with pytest.raises(InvalidParameterError, match="has no column"):
        cpol.polarization(xy[:, 0], xy[:, 1], None, None, lab, displaced=5)


def polar_honeycomb(shift, *, n=22, d=9.0, err=0.05, seed=0):
    """A honeycomb: A (label 0) and B (label 1) d apart, B moved by ``shift(x, y)`` (a (m, 2) array)."""
    rng = np.random.default_rng(seed)
    a = d * np.sqrt(3.0)
    cells = lattice("hexagonal", n=n, a=a, angle=0.0)
    A = cells
    B = cells + np.array([0.0, d])  # B's nearest A lies at -90 deg
    B = B + shift(B)
    xy = np.vstack([A, B])
    lab = np.repeat([0, 1], len(cells))
    noisy = xy + rng.normal(0.0, err, xy.shape)
    return noisy, lab, np.full(len(xy), err), B


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_uniformly_polar_honeycomb_has_cages_of_three(sign):
    """B moved 0.14 d towards (or away from) one A neighbour: the bond lengths split by a factor
    of 1.22-1.24, which must not be read as the end of the cage."""
    xy, lab, err, _ = polar_honeycomb(lambda b: np.tile([0.0, -sign * 0.14 * 9.0], (len(b), 1)))
    out = cpol.polarization(xy[:, 0], xy[:, 1], err, err, lab)
    assert (out["displaced"], out["reference"], out["n_cage"]) == (1, 0, 3)
    py = out["polarization_y"][lab == 1]
    np.testing.assert_allclose(np.nanmedian(py), -sign * 0.14 * 9.0, atol=0.02)


def test_parent_positions_move_a_polar_sublattice_with_domains_to_its_cage_centres():
    shift = 0.14 * 9.0
    apb = lambda b: np.column_stack([np.zeros(len(b)), np.where(b[:, 0] < np.median(b[:, 0]), shift, -shift)])  # noqa: E731
    xy, lab, err, B = polar_honeycomb(apb)
    x, y, info = cpol.parent_positions(xy[:, 0], xy[:, 1], err, err, lab)
    assert info["domains"] == 2 and info["median_z"] > 10 and info["moved"] > 0.8 * (lab == 1).sum()
    moved = np.isfinite(x) & (np.hypot(x - xy[:, 0], y - xy[:, 1]) > 0)
    assert (lab[moved] == 1).all()
    # each moved B sits at its cage centre: the undisplaced site, within the noise of four positions
    ideal = B.copy()
    ideal[:, 1] -= np.where(B[:, 0] < np.median(B[:, 0]), shift, -shift)
    m = moved[lab == 1]
    dist = np.hypot(x[lab == 1][m] - ideal[m, 0], y[lab == 1][m] - ideal[m, 1])
    assert np.median(dist) < 0.1
    # one domain: moved alike (an image of the phase without a domain wall gets the same structure)
    xy, lab, err, _ = polar_honeycomb(lambda b: np.tile([0.0, shift], (len(b), 1)), seed=1)
    x, y, info = cpol.parent_positions(xy[:, 0], xy[:, 1], err, err, lab)
    assert info["domains"] == 1 and info["moved"] > 0.8 * (lab == 1).sum()
    # no polarisation: nothing moves
    xy, lab, err, _ = polar_honeycomb(lambda b: np.zeros_like(b), seed=1)
    x, y, info = cpol.parent_positions(xy[:, 0], xy[:, 1], err, err, lab)
    assert info["median_z"] < 2 and info["moved"] == 0
    assert np.array_equal(x, xy[:, 0]) and np.array_equal(y, xy[:, 1])
    # without errors nothing is decided
    xy, lab, err, _ = polar_honeycomb(apb)
    assert cpol.parent_positions(xy[:, 0], xy[:, 1], None, None, lab)[2]["moved"] == 0


def test_parent_positions_leave_cages_of_two_and_mostly_open_cages_alone():
    """Only a polar sublattice in closed cages of three or more is moved: on a two-phase image a
    second class of columns made "cages" of two, 15 % of them closed, pointing five ways."""
    rng = np.random.default_rng(3)
    d, delta = 5.0, 0.6
    i, j = np.meshgrid(np.arange(20), np.arange(14))
    A = np.column_stack([2 * d * i.ravel(), 3 * d * j.ravel()])
    B = A + np.array([d, 0.0])
    B[:, 1] += np.where(B[:, 0] < np.median(B[:, 0]), delta, -delta)  # two domains
    xy = np.vstack([A, B]) + rng.normal(0, 0.05, (2 * len(A), 2))
    lab = np.repeat([0, 1], len(A))
    err = np.full(len(xy), 0.05)
    pol = cpol.polarization(xy[:, 0], xy[:, 1], err, err, lab, displaced=1, reference=0)
    assert pol["n_cage"] == 2 and np.nanmedian(np.abs(pol["polarization_y"])) > 0.5
    x, y, info = cpol.parent_positions(xy[:, 0], xy[:, 1], err, err, lab)
    assert info["n_cage"] == 2 and info["moved"] == 0 and np.array_equal(x, xy[:, 0])
    # the honeycomb whose domains are moved, with 70 % of its B columns not usable
    shift = 0.14 * 9.0
    xy, lab, err, B = polar_honeycomb(
        lambda b: np.column_stack([np.zeros(len(b)), np.where(b[:, 0] < np.median(b[:, 0]), shift, -shift)]))
    usable = np.ones(len(xy), bool)
    usable[np.flatnonzero(lab == 1)[rng.random((lab == 1).sum()) < 0.7]] = False
    assert cpol.parent_positions(xy[:, 0], xy[:, 1], err, err, lab)[2]["moved"] > 0
    info = cpol.parent_positions(xy[:, 0], xy[:, 1], err, err, lab, usable=usable)[2]
    assert info["closed"] < cpol.POLAR_MIN_CLOSED and info["moved"] == 0


@pytest.mark.parametrize("aspect", [2.0, 2.7, 3.0])
def test_cages_end_at_the_first_shell_on_elongated_cells(aspect):
    """B at the centres of a rectangular A lattice of b/a up to 3: a cage of four. (Taking the
    largest jump read eight at b/a >= 2.6, where the jump after the 8th neighbour is the larger.)"""
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(30), np.arange(12))
    A = np.column_stack([5.0 * i.ravel(), 5.0 * aspect * j.ravel()])
    B = A + np.array([2.5, 2.5 * aspect])
    from scipy.spatial import cKDTree

    d, _ = cKDTree(A + rng.normal(0, 0.02, A.shape)).query(B + rng.normal(0, 0.02, B.shape), k=9)
    assert cpol.cage_size(d) == 4


def test_an_ordered_minority_sublattice_keeps_its_cage_and_nothing_moves():
    """B in every other cell centre of a square A lattice (2 x 2 order): B in cages of four A,
    not the majority A "displaced" in cages of B, and nothing moved for the phases."""
    rng = np.random.default_rng(1)
    i, j = np.meshgrid(np.arange(22), np.arange(22))
    A = np.column_stack([5.0 * i.ravel(), 5.0 * j.ravel()])
    B = A[((i.ravel() % 2) == 0) & ((j.ravel() % 2) == 0)] + 2.5
    xy = np.vstack([A, B]) + rng.normal(0, 0.03, (len(A) + len(B), 2))
    lab = np.repeat([0, 1], [len(A), len(B)])
    err = np.full(len(xy), 0.03)
    pol = cpol.polarization(xy[:, 0], xy[:, 1], err, err, lab)
    assert (pol["displaced"], pol["n_cage"]) == (1, 4) and pol["median_offset"] < 0.1
    assert cpol.parent_positions(xy[:, 0], xy[:, 1], err, err, lab)[2]["moved"] == 0


def test_a_dumbbell_partner_is_a_bond_not_a_cage():
    """Dumbbells (B 1.5 px beside each A on a 5 px square lattice): a cage of one, no polarisation."""
    i, j = np.meshgrid(np.arange(20), np.arange(20))
    A = np.column_stack([5.0 * i.ravel(), 5.0 * j.ravel()])
    from scipy.spatial import cKDTree

    d, _ = cKDTree(A).query(A + np.array([1.5, 0.0]), k=9)
    assert cpol.cage_size(d) == 1


def test_strain_of_a_rectangular_sublattice_reaches_its_second_direction():
    """A perovskite seen along [110]: each sublattice is rectangular (a by a sqrt 2), and a first shell
    of 1.2 a holds bonds of one direction only, which fit no deformation gradient (8 of 1,086 atoms
    got a strain). The shell reaches the second direction; a strain of 1 % along y is read."""
    from atomds.core.strain import local_strain

    a = 10.0
    i, j = (v.ravel() for v in np.meshgrid(np.arange(30), np.arange(22)))
    base = np.c_[i * a, j * a * np.sqrt(2)]
    pos = np.r_[base, base + [a / 2, a * np.sqrt(2) / 2], base + [0.0, a * np.sqrt(2) / 2]]
    sub = np.repeat([0, 1, 2], len(base))
    rng = np.random.default_rng(0)
    pos = pos + rng.normal(0, 0.02, pos.shape)
    y = pos[:, 1] * np.where(pos[:, 1] > 150, 1.01, 1.0) + np.where(pos[:, 1] > 150, -1.5, 0.0)
    r = local_strain(pos[:, 0], y, sublattice=sub)
    inner = (pos[:, 0] > 2 * a) & (pos[:, 0] < 27 * a) & (np.abs(pos[:, 1] - 150) > 3 * a) & (pos[:, 1] > 2 * a) & (pos[:, 1] < 28 * a)
    assert np.isfinite(r["exx"][inner]).all()
    d = np.median(r["eyy"][inner & (pos[:, 1] > 150)]) - np.median(r["eyy"][inner & (pos[:, 1] < 150)])
    assert abs(d - 0.01) < 0.001
