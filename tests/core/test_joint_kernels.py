"""The compiled assembly of the joint model's normal equations against the Jacobian written out, and the
free block of a damped step against scipy's indexing."""

import numpy as np
import scipy.sparse as sp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from atomds.core.refine.joint_kernels import free_block
from atomds.core.refine.joint_model import (
    K_COL,
    background_grid,
    column_patches,
    group_map,
    model_and_width_derivative,
    neighbour_slots,
    normal_equations,
    pixel_set,
)


def _explicit(p, ps, grid, half, wt, r):
    """``J^T W J`` and ``J^T W r`` from the Jacobian written out densely."""
    flat, _, jac = column_patches(p, half, ps.shape)
    pos, hit = ps.locate(flat)
    hit &= flat >= 0
    n = p.shape[0]
    dense = np.zeros((ps.size, K_COL * n + 1))
    for i in range(n):
        for k in range(K_COL):
            np.add.at(dense[:, K_COL * i + k], pos[i][hit[i]], jac[i][..., k][hit[i]])
        np.add.at(dense[:, K_COL * n], pos[i][hit[i]], jac[i][..., 3][hit[i]])
    full = np.hstack([dense, grid.weights.toarray()])
    return full.T @ (wt[:, None] * full), full.T @ (wt * r)


def _group(p, shape, radius, pitch, half, valid=None):
    """A group's pixels (discs of ``radius`` around the columns ``p``), background grid, map and width derivative."""
    ps = pixel_set(shape, p[:, 0], p[:, 1], radius, np.ones(shape, bool) if valid is None else valid)
    grid = background_grid(ps, pitch)
    gm = group_map(ps, grid)
    return ps, grid, gm, model_and_width_derivative(gm, p, half)


def test_joint_normal_equations_match_the_explicit_jacobian():
    rng = np.random.default_rng(3)
    p = np.array([[20.3, 21.1, 5000.0, 3.0], [27.6, 20.4, 900.0, 3.0], [23.9, 27.2, 2500.0, 3.0]])
    half = 15
    ps, grid, gm, (cols, ds) = _group(p, (48, 48), 9.0, 12.0, half)
    wt = rng.uniform(0.5, 2.0, ps.size)
    r = rng.normal(0.0, 1.0, ps.size)
    h, g = normal_equations(gm, grid, p, half, wt, r, ds)
    flat, val, _ = column_patches(p, half, ps.shape)
    pos, hit = ps.locate(flat)
    hit &= flat >= 0
    np.testing.assert_allclose(cols, np.bincount(pos[hit], weights=val[hit], minlength=ps.size), rtol=1e-10)
    want_h, want_g = _explicit(p, ps, grid, half, wt, r)
    scale = np.sqrt(np.outer(np.diag(want_h), np.diag(want_h)))
    np.testing.assert_allclose(sp.csc_matrix(h).toarray() / scale, want_h / scale, atol=1e-6)
    np.testing.assert_allclose(g, want_g, rtol=1e-9, atol=1e-9 * np.abs(g).max())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 14), pitch=st.floats(5.0, 30.0))
@example(seed=106, n=10, pitch=5.0)  # columns 7.3 widths apart, patches overlapping diagonally, were not coupled
def test_assembled_normal_matrix_is_the_explicit_one_symmetric_and_sorted(seed, n, pitch):
    rng = np.random.default_rng(seed)
    shape = (40, 52)
    sigma = rng.uniform(1.2, 2.5)
    p = np.column_stack([rng.uniform(3, 49, n), rng.uniform(3, 37, n), rng.uniform(100, 5000, n), np.full(n, sigma)])
    valid = rng.random(shape) > 0.05  # some pixels missing
    ps = pixel_set(shape, p[:, 0], p[:, 1], rng.uniform(4.0, 9.0), valid)
    grid = background_grid(ps, pitch)
    gm = group_map(ps, grid)
    half = 8
    _, ds = model_and_width_derivative(gm, p, half)
    wt = rng.uniform(0.2, 3.0, ps.size)
    r = rng.normal(size=ps.size)
    h, g = normal_equations(gm, grid, p, half, wt, r, ds, neighbour_slots(p, half))
    want_h, want_g = _explicit(p, ps, grid, half, wt, r)
    dense = h.toarray()
    # pairs beyond COUPLING_SIGMAS widths, and pixels beyond PAIR_REACH of a pair, are left out by
    # design: a few 1e-6 of the columns' own information at most
    scale = np.sqrt(np.outer(np.diag(want_h), np.diag(want_h)))
    np.testing.assert_allclose(dense / scale, want_h / scale, atol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-9, atol=1e-9 * np.abs(want_g).max())
    # exactly symmetric (its CSC arrays are read as rows), indices sorted, no duplicates
    assert np.array_equal(dense, dense.T)
    for a in range(h.shape[0]):
        idx = h.indices[h.indptr[a]:h.indptr[a + 1]]
        assert np.all(np.diff(idx) > 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30), density=st.floats(0.05, 0.6))
def test_free_block_is_scipys_submatrix_plus_the_damping(seed, n, density):
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=density, random_state=rng, format="csr")
    a = a + a.T
    if rng.random() < 0.5:  # a diagonal left out of the pattern now and then
        a = a + sp.diags(rng.uniform(1, 2, n))
    a = sp.csr_matrix(a)
    a.sort_indices()
    free = rng.random(n) < 0.7
    damp = rng.uniform(0.1, 1.0, n)
    idx = np.flatnonzero(free)
    ptr, ind, val = free_block(a.indptr.astype(np.int64), a.indices.astype(np.int64), a.data.astype(float), free, damp)
    got = sp.csr_matrix((val, ind, ptr), shape=(idx.size, idx.size)).toarray()
    want = (a[idx][:, idx] + sp.diags(damp[idx])).toarray()
    np.testing.assert_array_equal(got, want)



def test_duplicate_background_weights_give_the_same_normal_matrix():
    rng = np.random.default_rng(4)
    p = np.array([[20.3, 21.1, 5000.0, 2.0], [27.6, 20.4, 900.0, 2.0]])
    ps = pixel_set((48, 48), p[:, 0], p[:, 1], 8.0, np.ones((48, 48), bool))
    grid = background_grid(ps, 6.0)
    w = grid.weights.tocoo()
    # each stored weight split into two halves: the same matrix, written with repeated entries
    rows, cols, vals = np.r_[w.row, w.row], np.r_[w.col, w.col], np.r_[w.data, w.data] / 2.0
    order = np.argsort(rows, kind="stable")
    ptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=w.shape[0]))]
    dup = sp.csr_matrix((vals[order], cols[order], ptr), shape=w.shape)
    assert dup.nnz == 2 * w.nnz  # the repeated entries are stored
    grid_dup = type(grid)(dup, grid.nodes_xy, grid.pitch)
    half = 8
    _, ds = model_and_width_derivative(group_map(ps, grid), p, half)
    wt, r = rng.uniform(0.5, 2.0, ps.size), rng.normal(size=ps.size)
    h, g = normal_equations(group_map(ps, grid), grid, p, half, wt, r, ds)
    h2, g2 = normal_equations(group_map(ps, grid_dup), grid_dup, p, half, wt, r, ds)
    np.testing.assert_allclose(h2.toarray(), h.toarray(), rtol=1e-12, atol=1e-12 * abs(h).max())
    np.testing.assert_allclose(g2, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())


def test_normal_equations_refuse_a_misordered_neighbour_table_and_a_map_of_another_grid():
    import pytest

    p = np.array([[10.0, 10.0, 1000.0, 2.0], [14.0, 10.0, 1000.0, 2.0], [12.0, 13.5, 1000.0, 2.0]])
    half = 8
    ps, grid, gm, (_, ds) = _group(p, (30, 30), 6.0, 8.0, half)
    wt, r = np.ones(ps.size), np.zeros(ps.size)
    good = neighbour_slots(p, half)
    assert good.shape[1] == 3  # all three coupled
    normal_equations(gm, grid, p, half, wt, r, ds, good)
    with pytest.raises(ValueError, match="neighbour_slots"):
        normal_equations(gm, grid, p, half, wt, r, ds, good[:, ::-1].copy())
    with pytest.raises(ValueError, match="group_map"):
        normal_equations(group_map(ps), grid, p, half, wt, r, ds, good)


def test_dense_inverse_diagonal_is_that_of_the_inverse():
    from atomds.core.refine.joint import _dense_inverse_diagonal

    rng = np.random.default_rng(2)
    a = rng.normal(size=(600, 600))  # more rows than one block of COV_BLOCK
    h = a @ a.T + 50.0 * np.eye(600)
    np.testing.assert_allclose(_dense_inverse_diagonal(sp.csc_matrix(h)), np.diag(np.linalg.inv(h)), rtol=1e-9)
    assert _dense_inverse_diagonal(sp.csc_matrix(-np.eye(5))) is None


def test_tiles_fitted_side_by_side_give_the_fits_of_one_at_a_time(monkeypatch):
    import atomds.core.refine.joint as joint
    from atomds.core import refine, samples
    from atomds.core.find import find_atoms

    s = samples.honeycomb_sample(shape=(128, 128), spacing=10.0, dose=2000, displacement=0.0, seed=3)
    image = s.image.astype(float)
    found = find_atoms(image)
    st = refine.estimate_fit_settings(image, found.x, found.y)
    monkeypatch.setattr(joint, "JOINT_TILE_ATOMS", 40)  # several tiles, pooled widths
    sizes = []
    run_all = joint.run_all

    def counting(calls, *a, **k):
        calls = list(calls)
        sizes.append(len(calls))
        return run_all(calls, *a, **k)

    monkeypatch.setattr(joint, "run_all", counting)
    side = refine.refine_gaussian(image, found.x, found.y, settings=st)
    assert max(sizes) > 2 and np.count_nonzero(side["joint"]) > 100

    def one_at_a_time(calls, threads=None):
        for fn, args in calls:
            fn(*args)

    monkeypatch.setattr(joint, "run_all", one_at_a_time)
    alone = refine.refine_gaussian(image, found.x, found.y, settings=st)
    for k in ("x", "y", "intensity", "x_err", "intensity_err", "sigma"):
        np.testing.assert_array_equal(np.asarray(side[k], float), np.asarray(alone[k], float))


def test_turned_pairs_are_the_triple_product_and_a_broken_pattern_falls_back():
    from atomds.core.refine.joint import _turned
    from atomds.core.refine.joint_kernels import rotate_pairs

    rng = np.random.default_rng(1)
    n = 12
    p = np.column_stack([rng.uniform(5, 45, n), rng.uniform(5, 35, n), rng.uniform(100, 3000, n), np.full(n, 2.0)])
    ps, grid, gm, (_, ds) = _group(p, (40, 50), 6.0, 10.0, 8)
    h, _ = normal_equations(gm, grid, p, 8, rng.uniform(0.5, 2, ps.size), rng.normal(size=ps.size), ds)
    cols = np.array([1, 4, 7])
    ang = rng.uniform(0, 2 * np.pi, cols.size)
    er = np.column_stack([np.cos(ang), np.sin(ang)])
    npar = h.shape[0]
    q = sp.identity(npar, format="lil")
    for k, c in enumerate(cols):
        i = K_COL * c
        q[i, i], q[i + 1, i], q[i, i + 1], q[i + 1, i + 1] = er[k, 0], er[k, 1], -er[k, 1], er[k, 0]
    q = sp.csr_matrix(q)
    want = (q.T @ h @ q).toarray()
    got = _turned(h, K_COL * cols, er, q)
    np.testing.assert_allclose(got.toarray(), want, rtol=0, atol=1e-12 * np.abs(want).max())
    # a pattern that holds y without x in some row cannot be turned in place: the product is used
    dense = h.toarray()
    s_idx = K_COL * n  # the shared width couples to every column
    dense[s_idx, K_COL * cols[0]] = dense[K_COL * cols[0], s_idx] = 0.0
    broken = sp.csr_matrix(dense)  # (the zeros are not stored)
    ok, _ = rotate_pairs(broken.indptr.astype(np.int64), broken.indices.astype(np.int64), broken.data,
                         (K_COL * cols).astype(np.int64), er)
    assert not ok
    np.testing.assert_allclose(_turned(broken, K_COL * cols, er, q).toarray(), (q.T @ broken @ q).toarray(),
                               rtol=0, atol=1e-12 * np.abs(want).max())
