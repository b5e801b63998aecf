"""Tests of atomds.core.neighbors: neighbour queries, ordering, edge flags, descriptors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

from atomds.core import neighbors as cn
from atomds.errors import InvalidParameterError


def hex_lattice(n=20, a=10.0, angle=0.0, origin=(5.0, 5.0), vacancy=None):
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    i, j = i.ravel(), j.ravel()
    keep = np.ones(i.size, bool)
    if vacancy == "sqrt3":
        keep = (i - j) % 3 != 0
    elif vacancy == "2x2":
        keep = ~((i % 2 == 0) & (j % 2 == 0))
    p = np.column_stack([i * a + j * a / 2, j * a * np.sqrt(3) / 2])[keep]
    c, s = np.cos(angle), np.sin(angle)
    p = p @ np.array([[c, -s], [s, c]]).T + origin
    return p[:, 0], p[:, 1]


def square_lattice(n=20, a=10.0, angle=0.0, origin=(5.0, 5.0)):
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    p = np.column_stack([i.ravel() * a, j.ravel() * a])
    c, s = np.cos(angle), np.sin(angle)
    p = p @ np.array([[c, -s], [s, c]]).T + origin
    return p[:, 0], p[:, 1]


def centre_mask(x, y, margin=35.0):
    cx, cy = np.median(x), np.median(y)
    return (np.abs(x - cx) < margin) & (np.abs(y - cy) < margin)


# ------------------------------------------------------------------------------------------
# query


def test_query_matches_brute_force(rng):
    x, y = rng.uniform(0, 100, (2, 300))
    idx, dx, dy, d, count = cn.query_neighbors(x, y, k=5)
    D = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(D, np.inf)
    ref = np.sort(D, axis=1)[:, :5]
    np.testing.assert_allclose(d, ref)
    np.testing.assert_allclose(np.hypot(dx, dy), d)
    np.testing.assert_allclose(dx, x[idx] - x[:, None])
    np.testing.assert_allclose(dy, y[idx] - y[:, None])
    assert (count == 5).all()
    assert not (idx == np.arange(300)[:, None]).any()  # never its own neighbour


def test_query_radius_pads_and_counts():
    x = np.array([0.0, 1.0, 2.0, 10.0])
    y = np.zeros(4)
    idx, dx, dy, d, count = cn.query_neighbors(x, y, k=3, radius=1.5)
    assert count.tolist() == [1, 2, 1, 0]
    assert idx[0].tolist() == [1, -1, -1]
    assert np.isnan(d[0, 1:]).all() and np.isnan(dx[3]).all()
    # k=None keeps as many as the fullest neighbourhood
    idx, *_ = cn.query_neighbors(x, y, k=None, radius=1.5)
    assert idx.shape == (4, 2)


def test_query_centers_subset_and_nan_positions():
    x, y = hex_lattice(6)
    x = x.copy()
    x[3] = np.nan
    full = cn.query_neighbors(x, y, k=4)
    sub = cn.query_neighbors(x, y, k=4, centers=slice(10, 20))
    for a, b in zip(full, sub):
        np.testing.assert_array_equal(a[10:20], b)
    assert not (full[0] == 3).any()  # the NaN atom is nobody's neighbour
    assert (full[0][3] == -1).all() and full[4][3] == 0


def test_k_too_large_is_a_clear_error():
    x, y = hex_lattice(2)
    with pytest.raises(InvalidParameterError, match="k=4.*only 4 atoms"):
        cn.query_neighbors(x, y, k=4)
    with pytest.raises(InvalidParameterError, match="positive integer"):
        cn.query_neighbors(x, y, k=0)


# ------------------------------------------------------------------------------------------
# ordering


def test_angle_order_is_clockwise_on_the_display():
    # neighbours right, up (y smaller: up on screen), left, down (y larger: down on screen)
    dx = np.array([[1.0, 0.0, -1.0, 0.0]])
    dy = np.array([[0.0, -1.0, 0.0, 1.0]])
    order, ox, oy, d, ang, rot = cn.order_neighbors(dx, dy, sort="angle", ref_angle=0.0)
    # clockwise on screen from "right": right -> down -> left -> up
    assert list(zip(ox[0], oy[0])) == [(1, 0), (0, 1), (-1, 0), (0, -1)]
    np.testing.assert_allclose(ang[0], [0, np.pi / 2, -np.pi, -np.pi / 2])
    # a reference pointing up starts with the upper neighbour
    _, ox, oy, *_ = cn.order_neighbors(dx, dy, sort="angle", ref_angle=-np.pi / 2)
    assert (ox[0, 0], oy[0, 0]) == (0, -1)
    assert (ox[0, 1], oy[0, 1]) == (1, 0)


def test_angle_order_starts_nearest_the_reference_even_counterclockwise():
    a = np.deg2rad([-10.0, 50.0, 170.0])
    order, ox, oy, d, ang, rot = cn.order_neighbors(np.cos(a)[None], np.sin(a)[None], sort="angle", ref_angle=0.0)
    np.testing.assert_allclose(np.rad2deg(ang[0]), [-10, 50, 170])


def test_distance_order_and_missing_last():
    dx = np.array([[3.0, np.nan, 1.0, 2.0]])
    dy = np.zeros((1, 4))
    order, ox, oy, d, ang, rot = cn.order_neighbors(dx, dy, sort="distance")
    np.testing.assert_allclose(d[0, :3], [1, 2, 3])
    assert np.isnan(d[0, 3]) and np.isnan(ang[0, 3])
    assert order[0].tolist() == [2, 3, 0, 1]


def test_rotate_puts_first_neighbour_on_reference(rng):
    x, y = hex_lattice(8, angle=0.3)
    _, dx, dy, _, _ = cn.query_neighbors(x, y, k=6)
    _, ox, oy, d, ang, rot = cn.order_neighbors(dx, dy, sort="angle", ref_angle=0.2, rotate=True)
    np.testing.assert_allclose(ang[:, 0], 0.2, atol=1e-12)
    np.testing.assert_allclose(np.hypot(ox, oy), d)  # lengths kept
    # rotated neighbourhoods of a rotated lattice equal those of the unrotated one
    x0, y0 = hex_lattice(8, angle=0.0)
    _, dx0, dy0, _, _ = cn.query_neighbors(x0, y0, k=6)
    _, ox0, oy0, *_ = cn.order_neighbors(dx0, dy0, sort="angle", ref_angle=0.2, rotate=True)
    inner = centre_mask(x, y, 20) & centre_mask(x0, y0, 20)
    np.testing.assert_allclose(ox[inner], ox0[inner], atol=1e-9)
    np.testing.assert_allclose(oy[inner], oy0[inner], atol=1e-9)


def test_auto_reference_angle_finds_a_bond_direction(rng):
    x, y = hex_lattice(12, angle=np.deg2rad(17))
    x = x + rng.normal(0, 0.2, x.size)
    y = y + rng.normal(0, 0.2, y.size)
    _, dx, dy, _, _ = cn.query_neighbors(x, y, k=6)
    ref = cn.auto_reference_angle(dx, dy)
    # bonds at 17 + 60 n degrees
    off = (np.rad2deg(ref) - 17 + 30) % 60 - 30
    assert abs(off) < 1.5


# ------------------------------------------------------------------------------------------
# edges


def test_edge_flags_from_reach_and_shape():
    x = np.array([5.0, 50.0, 95.0, 50.0])
    y = np.array([50.0, 50.0, 50.0, 3.0])
    e = cn.edge_flags(x, y, 10.0, shape=(100, 100))
    assert e.tolist() == [True, False, True, True]
    # margin widens the border band; NaN reach counts as edge
    # border distances are 5.5, 49.5, 4.5 (the image ends at 99.5) and 3.5
    reach = np.array([1.0, 1.0, 1.0, np.nan])
    assert cn.edge_flags(x, y, reach, shape=(100, 100), margin=4.0).tolist() == [False, False, True, True]
    # without a shape the atoms' bounding box is the border
    assert cn.edge_flags(x, y, 10.0).tolist() == [True, True, True, True]


def test_edge_atoms_are_exactly_those_whose_neighbours_are_cut(rng):
    """Inner (non-edge) atoms of a crop have the same neighbours as in the uncropped lattice."""
    x, y = hex_lattice(30, a=10.0, origin=(0, 0))
    x = x + rng.normal(0, 0.3, x.size)
    y = y + rng.normal(0, 0.3, y.size)
    shape = (120, 150)
    inside = (x >= -0.5) & (x < shape[1] - 0.5) & (y >= -0.5) & (y < shape[0] - 0.5)
    xi, yi = x[inside], y[inside]
    _, _, _, d, _ = cn.query_neighbors(xi, yi, k=6)
    edge = cn.edge_flags(xi, yi, d[:, -1], shape=shape)
    _, _, _, d_full, _ = cn.query_neighbors(x, y, k=6, centers=np.flatnonzero(inside))
    np.testing.assert_allclose(d[~edge], d_full[~edge])
    assert 0 < edge.sum() < 0.5 * edge.size


# ------------------------------------------------------------------------------------------
# descriptors


def test_descriptor_layouts():
    dx = np.array([[1.0, 2.0]])
    dy = np.array([[3.0, 4.0]])
    np.testing.assert_array_equal(cn.descriptor_xy(dx, dy), [[1, 3, 2, 4]])
    assert cn.feature_names("xy", 2) == ["dx0", "dy0", "dx1", "dy1"]
    assert cn.feature_names("distance", 3) == ["d0", "d1", "d2"]
    ang = np.deg2rad([[0.0, 90.0, 200.0]])
    np.testing.assert_allclose(np.rad2deg(cn.descriptor_angle(ang)), [[90, 110, 160]])
    with pytest.raises(InvalidParameterError, match="descriptor"):
        cn.feature_names("bogus", 3)


def _phase(x, y, **kw):
    s = cn.nearest_spacing(x, y)
    F, reach = cn.phase_features(x, y, spacing=s, **kw)
    return F, reach, s


@pytest.mark.parametrize(
    "kind, r_expected, psi4, psi6",
    [
        ("hex", [1, 1, 1, 1, 1, 1], 0.0, 1.0),
        ("square", [1, 1, 1, 1, np.sqrt(2), np.sqrt(2)], 1.0, 0.0),
        ("sqrt3", [1, 1, 1, np.sqrt(3), np.sqrt(3), np.sqrt(3)], 0.0, 1.0),
        ("2x2", [1, 1, 1, 1, np.sqrt(3), np.sqrt(3)], 0.5, 1.0),
    ],
)
def test_phase_features_of_ideal_lattices(kind, r_expected, psi4, psi6):
    if kind == "square":
        x, y = square_lattice(16)
    else:
        x, y = hex_lattice(16, vacancy=None if kind == "hex" else kind)
    F, reach, s = _phase(x, y)
    m = centre_mask(x, y, 40)
    names = cn.PHASE_FEATURES
    Fi = F[m]
    np.testing.assert_allclose(Fi[:, :6], np.broadcast_to(r_expected, (m.sum(), 6)), atol=1e-9)
    p4 = Fi[:, names.index("psi4")]
    p6 = Fi[:, names.index("psi6")]
    np.testing.assert_allclose(p4, psi4, atol=1e-9)
    np.testing.assert_allclose(p6, psi6, atol=1e-9)
    np.testing.assert_array_equal(Fi[:, names.index("disorder")], 0.0)  # a crystal of any structure


def test_phase_features_orientation_and_disorder(rng):
    names = cn.PHASE_FEATURES
    x0, y0 = hex_lattice(16)
    x1, y1 = hex_lattice(16, angle=np.deg2rad(20))
    F0, _, _ = _phase(x0, y0)
    F1, _, _ = _phase(x1, y1)
    m0, m1 = centre_mask(x0, y0, 40), centre_mask(x1, y1, 40)
    # rotated grains of one lattice are one phase: the descriptor does not see the orientation
    np.testing.assert_allclose(F1[m1].mean(axis=0), F0[m0].mean(axis=0), atol=1e-9)
    assert names.index("psi6") < names.index("disorder") == len(names) - 1
    # random points (no closer than 0.75 spacing): most of each neighbourhood has no repeat
    pts = rng.uniform(0, 200, (6000, 2))
    keep = np.ones(len(pts), bool)
    tree = cKDTree(pts)
    for i, j in sorted(tree.query_pairs(7.5)):
        if keep[i] and keep[j]:
            keep[j] = False
    xr_, yr_ = pts[keep].T
    Fr, _, _ = _phase(xr_, yr_)
    mr = centre_mask(xr_, yr_, 60)
    dis = Fr[mr, names.index("disorder")] / cn.DISORDER_WEIGHT
    assert np.median(dis) > 0.5
    # a jittered crystal (position error 3 % of the spacing) stays ordered
    xj, yj = x0 + rng.normal(0, 0.3, x0.size), y0 + rng.normal(0, 0.3, y0.size)
    Fj, _, _ = _phase(xj, yj)
    assert np.median(Fj[m0, names.index("disorder")]) == 0.0
    assert np.mean(Fj[m0, names.index("disorder")] / cn.DISORDER_WEIGHT) < 0.05


def test_phase_features_chunks_equal_whole():
    x, y = hex_lattice(12, vacancy="sqrt3")
    s = cn.nearest_spacing(x, y)
    tree = cn.build_tree(x, y)
    F, reach = cn.phase_features(x, y, spacing=s, tree=tree)
    parts = [cn.phase_features(x, y, spacing=s, tree=tree, centers=slice(a, a + 17)) for a in range(0, len(x), 17)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), F)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), reach)


def test_smooth_features_nan_aware():
    F = np.array([[1.0], [3.0], [np.nan], [5.0]])
    idx = np.array([[1, 2], [0, 3], [0, 1], [-1, -1]])
    out = cn.smooth_features(F, idx)
    np.testing.assert_allclose(out[:, 0], [2.0, 3.0, np.nan, 5.0])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=8, max_value=60),
    seed=st.integers(min_value=0, max_value=2**16),
    shift=st.floats(min_value=-50, max_value=50),
)
def test_neighbours_invariant_to_translation_and_order(n, seed, shift):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 100, (2, n))
    k = min(5, n - 1)
    idx, dx, dy, d, _ = cn.query_neighbors(x, y, k=k)
    perm = rng.permutation(n)
    idx2, dx2, dy2, d2, _ = cn.query_neighbors(x[perm] + shift, y[perm] - shift, k=k)
    np.testing.assert_allclose(d2, d[perm], rtol=1e-9, atol=1e-9)
    # the same neighbour vectors (as sets: exactly tied neighbours may come in either order)
    np.testing.assert_allclose(np.sort(dx2, axis=1), np.sort(dx[perm], axis=1), atol=1e-9)


def test_smooth_same_kind_median_keeps_walls_and_kinds(rng):
    # a row of atoms of two kinds alternating; kind 0 carries +1 left of x = 50 and -1 right
    x = np.arange(100.0)
    y = np.zeros(100)
    kind = np.arange(100) % 2
    F = np.where(kind == 0, np.where(x < 50, 1.0, -1.0), 5.0)[:, None] + rng.normal(0, 0.3, (100, 1))
    F[10] = np.nan
    out = cn.smooth_same_kind(F, x, y, kind, 4)
    k0 = (kind == 0) & np.isfinite(F[:, 0])
    assert np.all(np.sign(out[k0, 0]) == np.where(x[k0] < 50, 1, -1))  # the wall stays sharp
    assert np.abs(out[kind == 1, 0] - 5).max() < 1.0  # kinds never mixed
    assert np.isnan(out[10, 0])
    assert np.std(out[k0 & (x < 40), 0] - 1) < np.std(F[k0 & (x < 40), 0] - 1)
    part = cn.smooth_same_kind(F, x, y, kind, 4, centers=slice(20, 40))
    np.testing.assert_array_equal(part, out[20:40])


def test_surface_flags_find_free_surfaces_and_spare_the_inside():
    from atomds.core import samples

    a = samples.lattice_vectors("hexagonal", 10.0, angle=7.0)
    ij = np.stack(np.meshgrid(np.arange(-30, 31), np.arange(-30, 31), indexing="ij"), -1).reshape(-1, 2)
    xy = ij @ a
    # a particle of radius 120: the outermost atoms are on its surface
    r = np.hypot(xy[:, 0], xy[:, 1])
    disc = xy[r < 120]
    f = cn.surface_flags(disc[:, 0], disc[:, 1])
    rr = np.hypot(disc[:, 0], disc[:, 1])
    assert f[rr > 120 - 5].mean() >= 0.9  # the outer shell (within half a spacing)
    assert not f[rr < 120 - 25].any()  # nothing deeper than 2.5 spacings
    # a hole of radius 60 in the crystal: its rim
    holed = xy[(r >= 60) & (r < 250)]
    g = cn.surface_flags(holed[:, 0], holed[:, 1])
    rh = np.hypot(holed[:, 0], holed[:, 1])
    assert g[rh < 65].mean() >= 0.7  # a concave rim is caught less often (79 % here, 12 spacings across)
    assert not g[(rh > 85) & (rh < 200)].any()
    # random positions (an amorphous region) are seldom taken for a surface
    p = np.random.default_rng(0).uniform(0, 1000, (5000, 2))
    h = cn.surface_flags(p[:, 0], p[:, 1])
    inner = (p.min(1) > 100) & (p.max(1) < 900)
    assert h[inner].mean() < 0.02
