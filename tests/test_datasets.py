"""Tests of the bundled synthetic samples (atomds.datasets, atomds.core.samples)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xarray as xr
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

import atomds
from atomds import datasets
from atomds.core import samples
from atomds.errors import DimensionError, InvalidParameterError, MissingVariableError

SMALL = {
    "hexagonal": dict(shape=(128, 160)),
    "two_phase": dict(shape=(256, 256)),
    "perovskite": dict(shape=(128, 128)),
    "polar": dict(shape=(128, 128)),
    "nanoparticle": dict(shape=(192, 192)),
    "thick_particles": dict(shape=(192, 192), n_particles=2),
    "grain_boundary": dict(shape=(160, 160)),
    "particle": dict(shape=(192, 192)),
    "honeycomb": dict(shape=(128, 128)),
    "perovskite110": dict(shape=(128, 128)),
    "tmd": dict(shape=(192, 192)),
}


def _xy_px(ds: xr.Dataset) -> np.ndarray:
    ps = ds.attrs["pixel_size"]
    return np.stack([ds.true_x.values, ds.true_y.values], axis=1) / ps


def _voronoi_sums(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sum of the image over each column's Voronoi cell (pixels nearest to it)."""
    ny, nx = image.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    _, j = cKDTree(xy).query(np.stack([xx.ravel(), yy.ravel()], axis=1))
    return np.bincount(j, weights=image.ravel(), minlength=xy.shape[0])


def _interior(xy: np.ndarray, shape, margin: float) -> np.ndarray:
    ny, nx = shape
    return (xy[:, 0] > margin) & (xy[:, 0] < nx - 1 - margin) & (xy[:, 1] > margin) & (xy[:, 1] < ny - 1 - margin)


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("name", list(SMALL))
def test_layout_units_and_positions_inside(name):
    ds = datasets.load(name, **SMALL[name])
    assert ds.image.dims == ("y", "x") and ds.image.dtype == np.float32
    assert ds.attrs["units"] == "Å" and ds.attrs["pixel_size"] == pytest.approx(0.25)
    assert ds.attrs["sample"] == name
    params = json.loads(ds.attrs["sample_params"])
    assert params["seed"] == 0 and ds.attrs["sample_seed"] == 0
    for flat in ("sample_dose", "sample_sigma_px", "sample_spacing_px", "sample_background_level", "sample_read_noise"):
        assert isinstance(ds.attrs[flat], float)
    for v in ds.variables:
        assert "units" in ds[v].attrs and "long_name" in ds[v].attrs, v
    for v in ("true_x", "true_y", "true_label", "true_counts", "true_sigma", "true_dx", "true_dy"):
        assert ds[v].dims == ("true_atom",)
    assert ds.true_x.attrs["units"] == "Å" and ds.true_counts.attrs["units"] == "counts"
    # truth = exactly the columns whose centre lies inside the image area
    xy = _xy_px(ds)
    ny, nx = ds.image.shape
    assert np.all((xy[:, 0] >= -0.5) & (xy[:, 0] < nx - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] < ny - 0.5))
    assert ds.sizes["true_atom"] > 50
    # the x coordinate follows physical = pixel * pixel_size
    np.testing.assert_allclose(ds.x.values, np.arange(nx) * 0.25)
    # flag attributes name every label
    names = ds.true_label.attrs["flag_meanings"].split()
    assert set(np.unique(ds.true_label.values)) <= set(range(len(names)))


@pytest.mark.parametrize("name", list(SMALL))
def test_deterministic_under_seed(name):
    a = datasets.load(name, seed=3, **SMALL[name])
    b = datasets.load(name, seed=3, **SMALL[name])
    xr.testing.assert_identical(a, b)
    c = datasets.load(name, seed=4, **SMALL[name])
    assert not np.array_equal(a.image.values, c.image.values)
    assert a.sizes["true_atom"] != c.sizes["true_atom"] or not np.allclose(a.true_x.values, c.true_x.values)


def test_list_and_load():
    assert datasets.list_samples() == ["hexagonal", "two_phase", "perovskite", "polar", "nanoparticle", "stm",
                                       "thick_particles", "grain_boundary", "particle", "honeycomb", "perovskite110",
                                       "tmd"]
    ds = datasets.load("hexagonal", shape=64, dose=500.0)
    assert ds.image.shape == (64, 64) and ds.attrs["sample_dose"] == 500.0
    with pytest.raises(InvalidParameterError, match="unknown sample"):
        datasets.load("graphene")
    with pytest.raises(InvalidParameterError, match="hexagonal"):
        datasets.load("hexagonal", colour="red")


def test_netcdf_round_trip_and_schema(tmp_path):
    ds = datasets.polar(shape=96, vacuum=True)
    path = tmp_path / "polar.nc"
    atomds.to_netcdf(ds, path)
    xr.testing.assert_identical(atomds.open_dataset(path), ds)
    atomds.validate(ds)


@pytest.mark.parametrize("name, kw", [("thick_particles", dict(shape=128, n_particles=1)),
                                      ("grain_boundary", dict(shape=128, second="amorphous"))])
def test_local_contrast_samples_round_trip_and_validate(tmp_path, name, kw):
    ds = datasets.load(name, **kw)
    assert "true_vacuum" in ds and int(ds.true_vacuum.sum()) > 0
    path = tmp_path / f"{name}.nc"
    atomds.to_netcdf(ds, path)
    xr.testing.assert_identical(atomds.open_dataset(path), ds)
    atomds.validate(ds)


@pytest.mark.parametrize(
    "fn, kw, match",
    [
        (datasets.hexagonal, dict(dose=0), "dose"),
        (datasets.hexagonal, dict(sigma=-1), "sigma"),
        (datasets.hexagonal, dict(shape=8), "shape"),
        (datasets.hexagonal, dict(spacing=3.0, sigma=2.0), "spacing"),
        (datasets.hexagonal, dict(pixel_size=0), "pixel_size"),
        (datasets.hexagonal, dict(read_noise=-1), "read_noise"),
        (datasets.two_phase, dict(vacancy_grain=True, vacancy_pattern="3x3"), "vacancy_pattern"),
        (datasets.two_phase, dict(grain_lattice="cubic"), "grain_lattice"),
        (datasets.two_phase, dict(boundary_occupancy=1.5), "boundary_occupancy"),
        (datasets.perovskite, dict(dim_ratio=0), "dim_ratio"),
        (datasets.polar, dict(displacement=-1), "displacement"),
        (datasets.polar, dict(displacement=5.0), "displacement"),
    ],
)
def test_bad_parameters(fn, kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        fn(**kw)


# ------------------------------------------------------------------------------------------ dose


def test_integrated_counts_match_dose_without_background():
    ds = datasets.hexagonal(shape=128, dose=1500.0, background=0.0, read_noise=0.0, seed=2)
    xy = _xy_px(ds)
    sums = _voronoi_sums(ds.image.values.astype(float), xy)
    inner = _interior(xy, ds.image.shape, 3 * 12.0)
    assert inner.sum() > 20
    # each cell gets its own column (~99 %) plus neighbours' tails (~1 %): the mean is the dose
    assert sums[inner].mean() == pytest.approx(1500.0, rel=0.01)
    # Poisson: the cell-to-cell spread is about sqrt(dose)
    assert sums[inner].std() == pytest.approx(math.sqrt(1500.0), rel=0.35)


@pytest.mark.parametrize("maker", [samples.hexagonal_sample, samples.perovskite_sample, samples.two_phase_sample])
def test_integrated_counts_above_background_match_truth(maker):
    s = maker(shape=(192, 192), seed=5)
    xy = np.stack([s.x, s.y], axis=1)
    sums = _voronoi_sums(s.image - s.background, xy)
    inner = _interior(xy, s.shape, 30.0)
    # background and read noise average out; each cell holds its own column's counts
    ratio = sums[inner].sum() / s.counts[inner].sum()
    assert ratio == pytest.approx(1.0, abs=0.02)
    # the background level is the stated fraction of a full column's peak
    assert s.background_level == pytest.approx(0.1 * s.params["dose"] / (2 * np.pi * s.params["sigma"] ** 2))
    assert s.background.mean() == pytest.approx(s.background_level * 1.15, rel=0.15)


def test_read_noise_is_gaussian_with_given_std():
    s = samples.hexagonal_sample(shape=128, read_noise=5.0, seed=1)
    resid = s.image - s.expected
    # Poisson variance = expected, read noise variance = 25
    assert np.var(resid - 0) == pytest.approx(np.mean(s.expected) + 25.0, rel=0.05)


# ------------------------------------------------------------------------------------------ hexagonal


def test_hexagonal_geometry():
    ds = datasets.hexagonal(shape=160, spacing=12.0, angle=17.0, seed=1)
    xy = _xy_px(ds)
    d, j = cKDTree(xy).query(xy, k=7)
    inner = _interior(xy, ds.image.shape, 14.0)
    np.testing.assert_allclose(d[inner, 1:], 12.0, atol=1e-9)  # six neighbours at the spacing
    v = xy[j[inner, 1]] - xy[inner]
    ang = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 60.0
    np.testing.assert_allclose(ang, 17.0, atol=1e-6)
    assert np.all(ds.true_label.values == 0)
    # area density of a hexagonal lattice: 2 / (sqrt(3) a^2)
    assert ds.sizes["true_atom"] == pytest.approx(160 * 160 * 2 / (math.sqrt(3) * 144), rel=0.03)


def test_hexagonal_jitter_is_the_displacement():
    ds = datasets.hexagonal(shape=128, jitter=0.3, seed=2)
    dx = ds.true_dx.values / 0.25
    assert np.std(dx) == pytest.approx(0.3, rel=0.2)
    ref = datasets.hexagonal(shape=128, jitter=0.0, seed=2)
    assert np.all(ref.true_dx.values == 0)


# ------------------------------------------------------------------------------------------ two-phase


def test_two_phase_regions_and_boundary_band():
    ds = datasets.two_phase()
    xy = _xy_px(ds)
    lab = ds.true_label.values
    a = 12.0
    counts = np.bincount(lab, minlength=3)
    assert counts[0] > 1000 and counts[1] > 300 and counts[2] > 80
    assert ds.true_label.attrs["flag_meanings"] == "matrix grain boundary"
    m, g, b = xy[lab == 0], xy[lab == 1], xy[lab == 2]
    # grain and matrix never touch: the band (2 spacings wide) lies between them
    assert cKDTree(m).query(g)[0].min() > 0.8 * 2.0 * a
    # every boundary column sits between the two: a grain and a matrix column within reach
    assert cKDTree(g).query(b)[0].max() < 3.5 * a
    assert cKDTree(m).query(b)[0].max() < 3.5 * a
    # the grain is one compact blob in the middle, surrounded by the band
    centre = g.mean(axis=0)
    assert np.hypot(*(centre - np.array([255.5, 255.5]))) < 30
    rg = np.hypot(*(g - centre).T)
    rb = np.hypot(*(b - centre).T)
    assert np.median(rb) > np.percentile(rg, 95)
    # no two columns closer than boundary_min_distance * spacing (they would merge)
    assert cKDTree(xy).query(xy, k=2)[0][:, 1].min() >= 0.75 * a - 1e-9
    # the band is disordered: its nearest-neighbour distances spread, the lattices' do not
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1]
    inner = _interior(xy, ds.image.shape, 2 * a)
    assert np.std(nn[(lab == 2) & inner]) > 0.05 * a
    np.testing.assert_allclose(nn[(lab == 0) & inner & (cKDTree(b).query(xy)[0] > 3 * a)], a, atol=1e-9)
    # the grain is a square lattice rotated by 20 degrees
    gi = np.flatnonzero(lab == 1)
    d, j = cKDTree(g).query(g, k=5)
    deep = rg < np.percentile(rg, 50)
    np.testing.assert_allclose(d[deep, 1:], a, atol=1e-9)
    v = g[j[deep, 1]] - g[deep]
    np.testing.assert_allclose(np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 90.0, 20.0, atol=1e-6)
    assert gi.size == counts[1]


@pytest.mark.parametrize("pattern, missing", [("sqrt3", 1 / 3), ("2x2", 1 / 4)])
def test_vacancy_grain_is_the_matrix_lattice_with_ordered_vacancies(pattern, missing):
    ds = datasets.two_phase(shape=320, vacancy_grain=True, vacancy_pattern=pattern, seed=1)
    xy = _xy_px(ds)
    lab = ds.true_label.values
    m, g = xy[lab == 0], xy[lab == 1]
    a = 12.0
    # lattice vectors from one matrix column and its neighbours
    dm = cKDTree(m).query(m, k=7)[0]
    i0 = np.flatnonzero(np.all(np.abs(dm[:, 1:] - a) < 1e-6, axis=1))[0]  # a column with six neighbours
    d, j = cKDTree(m).query(m[i0], k=7)
    vecs = m[j[1:]] - m[i0]
    a1 = vecs[np.argmin(np.arctan2(vecs[:, 1], vecs[:, 0]) % (2 * np.pi))]
    a2 = np.array([a1[0] * 0.5 - a1[1] * math.sqrt(3) / 2, a1[0] * math.sqrt(3) / 2 + a1[1] * 0.5])
    basis = np.stack([a1, a2], axis=1)
    frac = np.linalg.solve(basis, (g - m[i0]).T).T
    # same lattice, same registry: every grain column sits on a matrix lattice site
    np.testing.assert_allclose(frac, np.round(frac), atol=1e-6)
    # the density is reduced by the missing fraction: count sites in a disc deep inside the grain
    centre = g.mean(axis=0)
    r = np.hypot(*(xy[lab != 1] - centre).T).min() - a  # a disc that holds only grain sites
    n_grain = (np.hypot(*(g - centre).T) < r).sum()
    ij = np.round(np.linalg.solve(basis, (centre - m[i0]))).astype(int)
    ii, jj = np.meshgrid(np.arange(-30, 31) + ij[0], np.arange(-30, 31) + ij[1])
    sites = m[i0] + np.stack([ii.ravel(), jj.ravel()], axis=1) @ basis.T
    n_sites = (np.hypot(*(sites - centre).T) < r).sum()
    assert n_sites > 80
    assert n_grain / n_sites == pytest.approx(1 - missing, abs=0.04)
    # ordered: each present grain column keeps the same number of neighbours at the spacing
    dd = cKDTree(g).query(g, k=7)[0][:, 1:]
    deep = np.hypot(*(g - centre).T) < r
    n_at_a = (np.abs(dd[deep] - a) < 1e-6).sum(axis=1)
    assert np.all(n_at_a == (3 if pattern == "sqrt3" else 4))
    assert (lab == 2).sum() > 30


def test_two_phase_vacuum_hole_has_no_atoms():
    ds = datasets.two_phase(vacuum=True)
    plain = datasets.two_phase()
    assert "true_vacuum" in ds and ds.true_vacuum.dims == ("y", "x")
    mask = ds.true_vacuum.values.astype(bool)
    assert mask.sum() > 1000
    xy = np.round(_xy_px(ds)).astype(int).clip(0, 511)
    assert not mask[xy[:, 1], xy[:, 0]].any()
    assert ds.sizes["true_atom"] < plain.sizes["true_atom"]
    # the grain and band are untouched by the corner hole
    assert np.bincount(ds.true_label.values)[1:].tolist() == np.bincount(plain.true_label.values)[1:].tolist()
    # the hole's centre is dark: below the lowest specimen level between columns
    yy, xx = np.nonzero(mask)
    cy, cx = int(yy.mean()), int(xx.mean())
    centre = ds.image.values[cy - 5 : cy + 5, cx - 5 : cx + 5].mean()
    specimen = ds.image.values[~mask].mean()
    assert centre < 0.25 * specimen
    # amorphous rim: brighter and rougher than the centre, yet no atoms there
    r = np.hypot(xx - cx, yy - cy)
    rim = ds.image.values[yy[r > 0.7 * r.max()], xx[r > 0.7 * r.max()]]
    assert rim.mean() > centre + 3


def test_hexagonal_vacuum():
    ds = datasets.hexagonal(shape=128, vacuum=True)
    mask = ds.true_vacuum.values.astype(bool)
    xy = np.round(_xy_px(ds)).astype(int).clip(0, 127)
    assert mask.any() and not mask[xy[:, 1], xy[:, 0]].any()


# ------------------------------------------------------------------------------------------ perovskite


def test_perovskite_sublattices():
    s = samples.perovskite_sample(shape=160, seed=3)
    a_, b_ = s.label == 0, s.label == 1
    assert abs(a_.sum() - b_.sum()) <= 25
    np.testing.assert_allclose(s.counts[b_] / s.counts[a_].mean(), 0.4)
    # B sits at the centre of four A columns
    d, _ = cKDTree(np.stack([s.x[a_], s.y[a_]], 1)).query(np.stack([s.x[b_], s.y[b_]], 1), k=4)
    inner = _interior(np.stack([s.x[b_], s.y[b_]], 1), s.shape, 17)
    np.testing.assert_allclose(d[inner], 16 / math.sqrt(2), atol=1e-9)
    # peak of B is 0.4 of A in the noise-free image (same sub-pixel phase on both sublattices)
    net = s.expected - s.background
    pa = net[np.round(s.y[a_]).astype(int), np.round(s.x[a_]).astype(int)].mean()
    pb = net[np.round(s.y[b_]).astype(int), np.round(s.x[b_]).astype(int)].mean()
    assert pb / pa == pytest.approx(0.4, rel=0.01)


def test_perovskite_wider_b_keeps_the_peak_ratio():
    s = samples.perovskite_sample(shape=96, sigma_b=2.5, dim_ratio=0.5, seed=1)
    b_ = s.label == 1
    peak = s.counts / (2 * np.pi * s.sigma**2)
    assert peak[b_].mean() / peak[~b_].mean() == pytest.approx(0.5)
    ds = datasets.perovskite(shape=96, sigma_b=2.5, seed=1)
    np.testing.assert_allclose(ds.true_sigma.values[ds.true_label.values == 1], 2.5 * 0.25)


# ------------------------------------------------------------------------------------------ polar


def _signed_side(ds):
    p = json.loads(ds.attrs["sample_params"])
    t = math.radians(p["boundary_angle"])
    normal = np.array([-math.sin(t), math.cos(t)])
    return (_xy_px(ds) - np.array(p["boundary_point_px"])) @ normal


def test_polar_displacement_flips_across_the_boundary():
    ds = datasets.polar()
    lab, dom = ds.true_label.values, ds.true_domain.values
    ps = ds.attrs["pixel_size"]
    u = np.array([0.0, 1.0])  # direction 90 degrees: +y
    along = (np.stack([ds.true_dx.values, ds.true_dy.values], 1) / ps) @ u
    b_ = lab == 1
    np.testing.assert_allclose(along[b_ & (dom == 0)], 1.2)
    np.testing.assert_allclose(along[b_ & (dom == 1)], -1.2)
    np.testing.assert_allclose(ds.true_dx.values, 0.0, atol=1e-12)
    assert np.all(along[~b_] == 0)
    # both domains are large, and separated by the straight boundary line
    assert 0.3 < dom.mean() < 0.7
    s = _signed_side(ds)
    # the side is decided on the ideal sites: displaced B may cross by less than the displacement
    assert np.all((s >= 1.3) <= (dom == 1)) and np.all((s < -1.3) <= (dom == 0))
    # the true positions include the displacement: B columns sit off the centre of their A cell
    xy = _xy_px(ds)
    ideal = xy - np.stack([ds.true_dx.values, ds.true_dy.values], 1) / ps
    d, _ = cKDTree(ideal[~b_]).query(ideal[b_], k=4)
    inner = _interior(ideal[b_], ds.image.shape, 17)
    np.testing.assert_allclose(d[inner], 16 / math.sqrt(2), atol=1e-9)


def test_polar_options():
    one = datasets.polar(shape=96, antiphase_boundary=False, displacement=0.6, direction=0.0)
    b_ = one.true_label.values == 1
    np.testing.assert_allclose(one.true_dx.values[b_], 0.6 * 0.25)
    assert np.all(one.true_domain.values == 0)
    soft = datasets.polar(shape=128, wall_width=8.0)
    dy = soft.true_dy.values[soft.true_label.values == 1] / 0.25
    assert np.all(np.abs(dy) <= 1.2 + 1e-9) and np.any(np.abs(dy) < 1.0)
    shifted = datasets.polar(shape=128, boundary_shift=0.5)
    xy = _xy_px(shifted)
    assert cKDTree(xy).query(xy, k=2)[0][:, 1].min() > 0.5 * 16 / math.sqrt(2)
    # the lattice of domain 1 is shifted by half a cell along the boundary: its A columns fall
    # between the extensions of domain 0's A rows
    a0 = xy[(shifted.true_label.values == 0) & (shifted.true_domain.values == 0)]
    a1 = xy[(shifted.true_label.values == 0) & (shifted.true_domain.values == 1)]
    frac0 = np.mod((a0 - a0[0]) / 16.0 + 0.25, 1.0) - 0.25
    frac1 = np.mod((a1 - a0[0]) / 16.0 + 0.25, 1.0) - 0.25
    assert np.allclose(frac0, 0, atol=1e-9)
    assert not np.allclose(frac1, 0, atol=1e-3)


def test_polar_low_dose_variant_keeps_geometry():
    hi = datasets.polar(shape=96)
    lo = datasets.polar(shape=96, dose=800.0, displacement=0.6)
    assert hi.sizes["true_atom"] == lo.sizes["true_atom"]
    np.testing.assert_allclose(lo.true_dy.values, 0.5 * hi.true_dy.values)
    assert lo.attrs["sample_background_level"] == pytest.approx(hi.attrs["sample_background_level"] / 5)


# ------------------------------------------------------------------------------------------ matching


def test_thinning_equals_sequential_greedy():
    rng = np.random.default_rng(4)
    pts = rng.uniform(0, 60, (400, 2))
    fixed = rng.uniform(0, 60, (5, 2))
    prio = rng.uniform(size=400)
    keep = samples.thin_points(pts, prio, 4.0, fixed=fixed)
    chosen: list[int] = []
    for i in np.argsort(-prio):
        if np.hypot(*(fixed - pts[i]).T).min() < 4.0:
            continue
        if all(np.hypot(*(pts[i] - pts[j])) >= 4.0 for j in chosen):
            chosen.append(i)
    assert sorted(chosen) == np.flatnonzero(keep).tolist()


def test_match_positions_equals_hungarian_when_unambiguous():
    rng = np.random.default_rng(0)
    t = samples.lattice_sites(samples.lattice_vectors("hexagonal", 10.0), (80, 80))[0]
    f = t + rng.normal(0, 1.0, t.shape)
    f = np.concatenate([f[rng.uniform(size=len(f)) < 0.9], rng.uniform(0, 80, (10, 2))])
    it, jf = samples.match_positions(t, f, 3.0)
    cost = np.hypot(t[:, None, 0] - f[None, :, 0], t[:, None, 1] - f[None, :, 1])
    big = np.where(cost <= 3.0, cost, 1e6)
    r, c = linear_sum_assignment(big)
    ok = big[r, c] < 1e6
    assert sorted(zip(r[ok], c[ok])) == sorted(zip(it, jf))
    assert len(set(jf)) == len(jf) and np.all(np.diff(it) > 0)


def test_match_positions_is_one_to_one_and_respects_max_distance():
    t = np.array([[0.0, 0.0], [10.0, 0.0]])
    f = np.array([[0.5, 0.0], [0.2, 0.0], [13.0, 0.0]])
    it, jf = samples.match_positions(t, f, 2.0)
    assert it.tolist() == [0] and jf.tolist() == [1]
    it, jf = samples.match_positions(t, np.zeros((0, 2)), 2.0)
    assert it.size == 0 and jf.size == 0
    with pytest.raises(InvalidParameterError, match="max_distance"):
        samples.match_positions(t, f, 0.0)


def test_score_positions():
    ds = datasets.perovskite(shape=128)
    x, y = ds.true_x.values, ds.true_y.values
    perfect = datasets.score_positions(ds, ds.true_x, ds.true_y)
    assert perfect["recall"] == 1.0 and perfect["false_positive_rate"] == 0.0 and perfect["rmse_px"] == 0.0
    assert perfect["n_true"] == perfect["n_found"] == ds.sizes["true_atom"]
    assert perfect["max_distance_px"] == pytest.approx(16 / math.sqrt(2) / 3)
    assert perfect["max_distance"] == pytest.approx(perfect["max_distance_px"] * 0.25)
    # shifted by 0.1 px, 10 % of B missing, 5 spurious positions in the middle
    lab = ds.true_label.values
    drop = (lab == 1) & (np.arange(lab.size) % 10 == 0)
    fx = np.concatenate([x[~drop] + 0.1 * 0.25, np.full(5, 16.0) + np.arange(5) * 0.5 * 16 * 0.25])
    fy = np.concatenate([y[~drop], np.full(5, 16.3)])
    sc = datasets.score_positions(ds, fx, fy)
    assert sc["rmse_px"] == pytest.approx(0.1)
    assert sc["recall"] == pytest.approx(1 - drop.sum() / lab.size)
    assert sc["recall_by_label"][0] == 1.0
    assert sc["recall_by_label"][1] == pytest.approx(1 - drop.sum() / (lab == 1).sum())
    expected_false = sum(
        cKDTree(np.stack([x, y], 1)).query([fx[-5 + k], fy[-5 + k]])[0] > sc["max_distance"] for k in range(5)
    )
    assert sc["n_false"] == expected_false > 0
    assert sc["false_positive_rate"] == pytest.approx(expected_false / len(fx))
    # an unmatched position at the border is not a false positive (its column may lie outside)
    edge = datasets.score_positions(ds, np.append(x, -0.1), np.append(y, 10.0))
    assert edge["n_false"] == 0 and edge["n_ignored"] == 1
    with pytest.raises(MissingVariableError):
        datasets.score_positions(ds[["image"]], x, y)
    with pytest.raises(DimensionError):
        datasets.score_positions(ds, x, y[:-1])


# ------------------------------------------------------------------------------------------ spectra


def test_spectrum_image_per_label_means_match_truth():
    ds = datasets.two_phase(shape=256, vacuum=True, vacuum_radius=0.15)
    cube, truth = datasets.spectrum_image(ds, step=2, counts=20.0, seed=1, return_truth=True)
    assert cube.dims == ("y", "x", "energy") and cube.dtype == np.float32
    assert cube.energy.attrs["units"] == "eV" and cube.x.attrs["units"] == "Å"
    # co-registered: spectrum pixels sit on image pixel centres, on a grid coarser by `step`
    assert np.isin(cube.x.values, ds.x.values).all() and np.isin(cube.y.values, ds.y.values).all()
    np.testing.assert_allclose(np.diff(cube.x.values), 2 * 0.25)
    # partial coverage: the central 80 % by default
    assert cube.x.values[0] > 0 and cube.x.values[-1] < ds.x.values[-1]
    lab = truth.true_label.values
    assert set(np.unique(lab)) == {-1, 0, 1, 2}
    cubev = cube.values.astype(float)
    for k in truth.label.values:
        sel = lab == k
        mean = cubev[sel].mean(axis=0)
        expect = truth.true_spectrum.sel(label=k).values
        z = (mean - expect) / np.sqrt(expect / sel.sum())
        assert np.abs(z).max() < 5.5, (k, np.abs(z).max())
    # the phases are told apart: even a single pixel's spectrum separates them (chi-square distance)
    s = truth.true_spectrum.sel(label=[0, 1, 2]).values
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.sum((s[i] - s[j]) ** 2 / (s[i] + s[j])) > 10
    # vacuum pixels are in the hole
    assert (lab == -1).sum() > 20


def test_spectrum_image_extent_and_errors():
    ds = datasets.perovskite(shape=96)
    cube = datasets.spectrum_image(ds, extent=(2.0, 10.0, 4.0, 8.0), step=3, energy=np.linspace(440, 480, 41))
    assert cube.sizes["energy"] == 41
    assert cube.x.values[0] == pytest.approx(2.0) and cube.x.values[-1] <= 10.0
    assert cube.y.values[0] == pytest.approx(4.0) and cube.y.values[-1] <= 8.0
    assert cube.attrs["step_px"] == 3 and cube.attrs["pixel_size"] == pytest.approx(0.75)
    with pytest.raises(InvalidParameterError, match="extent"):
        datasets.spectrum_image(ds, extent=(100.0, 200.0, 0.0, 5.0))
    with pytest.raises(InvalidParameterError, match="energy"):
        datasets.spectrum_image(ds, energy=[500.0, 400.0])
    with pytest.raises(MissingVariableError):
        datasets.spectrum_image(ds[["image"]])


# ------------------------------------------------------------------------------------ frame stacks


def test_frames_layout_and_truth_in_units():
    ds = datasets.frames(n_frames=6, shape=(96, 112), pixel_size=0.2, seed=1)
    assert ds.frames.dims == ("frame", "y", "x") and ds.frames.shape == (6, 96, 112)
    assert ds.frames.dtype == np.float32 and "image" not in ds
    np.testing.assert_array_equal(ds.frame.values, np.arange(6))
    assert ds.attrs["units"] == "Å" and ds.attrs["pixel_size"] == pytest.approx(0.2)
    assert ds.attrs["sample"] == "frames" and ds.attrs["sample_lattice"] == "hexagonal"
    assert ds.attrs["sample_n_frames"] == 6 and ds.attrs["sample_dose"] == 2000.0
    assert ds.attrs["sample_dose_per_frame"] == pytest.approx(2000.0 / 6)
    for v in ds.variables:
        assert "units" in ds[v].attrs and "long_name" in ds[v].attrs, v
    for v in ("true_shift_x", "true_shift_y", "true_drift_x", "true_drift_y"):
        assert ds[v].dims == ("frame",) and ds[v].attrs["units"] == "Å"
        assert ds[v].values[0] == 0.0
    # truth in Å is the generator's truth in px times the pixel size
    st = samples.frame_stack_sample(n_frames=6, shape=(96, 112), seed=1)
    np.testing.assert_allclose(ds.true_shift_x.values, st.shift_x * 0.2)
    np.testing.assert_allclose(ds.true_shift_y.values, st.shift_y * 0.2)
    np.testing.assert_allclose(ds.true_x.values, st.reference.x * 0.2)
    np.testing.assert_array_equal(ds.frames.values, st.frames.astype(np.float32))
    # the drift is linear from frame 0 to (3, -2) px at the last frame; the jitter is the rest
    np.testing.assert_allclose(ds.true_drift_x.values / 0.2, np.linspace(0, 3.0, 6))
    np.testing.assert_allclose(ds.true_drift_y.values / 0.2, np.linspace(0, -2.0, 6))
    jit = np.concatenate([(ds.true_shift_x - ds.true_drift_x).values[1:], (ds.true_shift_y - ds.true_drift_y).values[1:]])
    assert 0.05 < np.std(jit / 0.2) < 1.0
    xy = _xy_px(ds)
    assert (xy >= -0.5).all() and (xy[:, 0] < 111.5).all() and (xy[:, 1] < 95.5).all()
    assert ds.true_counts.values == pytest.approx(2000.0 / 6)
    assert ds.attrs["sample_spacing_px"] == 12.0


def test_frames_deterministic_under_seed():
    a = datasets.frames(n_frames=4, shape=64, seed=3)
    b = datasets.frames(n_frames=4, shape=64, seed=3)
    xr.testing.assert_identical(a, b)
    c = datasets.frames(n_frames=4, shape=64, seed=4)
    assert not np.array_equal(a.frames.values, c.frames.values)
    assert not np.allclose(a.true_shift_x.values[1:], c.true_shift_x.values[1:])


def test_frames_are_the_specimen_moved_by_the_true_shift():
    """Sign convention and exactness: frame 0 moved by +shift_i is frame i (noise-free)."""
    from scipy import ndimage

    st = samples.frame_stack_sample(n_frames=5, shape=(96, 96), drift=(2.5, -1.5), jitter=0.4, seed=2)
    m = 12
    for i in range(1, 5):
        target = st.expected[i][m:-m, m:-m]
        moved = ndimage.shift(st.expected[0], (st.shift_y[i], st.shift_x[i]), order=3, mode="nearest")[m:-m, m:-m]
        wrong = ndimage.shift(st.expected[0], (-st.shift_y[i], -st.shift_x[i]), order=3, mode="nearest")[m:-m, m:-m]
        peak = target.max()
        assert np.abs(moved - target).max() < 0.005 * peak  # cubic-spline interpolation error only
        assert np.abs(wrong - target).max() > 0.1 * peak
    # the shifts are sub-pixel and not all equal
    assert np.ptp(st.shift_x) > 0.5 and np.any(np.abs(st.shift_x - np.round(st.shift_x)) > 0.1)


def test_frames_columns_entering_at_the_edges_are_rendered():
    """The specimen extends past the frame: the border is as bright as the interior in every frame."""
    st = samples.frame_stack_sample(n_frames=4, shape=(120, 120), drift=(6.0, 5.0), jitter=0.5, background=0.0, seed=4)
    for e in st.expected:
        border = np.concatenate([e[:12].ravel(), e[-12:].ravel(), e[:, :12].ravel(), e[:, -12:].ravel()])
        assert border.mean() == pytest.approx(e[30:90, 30:90].mean(), rel=0.06)


def test_frames_dose_is_split_over_the_frames():
    n = 10
    st = samples.frame_stack_sample(n_frames=n, shape=(128, 128), dose=1500.0, background=0.0, read_noise=0.0, seed=5)
    x0, y0 = st.reference.x, st.reference.y
    totals = []
    for i in range(n):
        xy = np.stack([x0 + st.shift_x[i], y0 + st.shift_y[i]], axis=1)
        sums = _voronoi_sums(st.frames[i], xy)
        inner = _interior(xy, (128, 128), 3 * 12.0)
        assert inner.sum() > 20
        totals.append(sums[inner].mean())
        # short dwell: each frame holds dose / n_frames per column, Poisson spread
        assert sums[inner].std() == pytest.approx(math.sqrt(150.0), rel=0.4)
    assert np.mean(totals) == pytest.approx(1500.0 / n, rel=0.01)
    assert np.sum(totals) == pytest.approx(1500.0, rel=0.01)


def test_frames_background_and_noise_per_frame():
    st = samples.frame_stack_sample(n_frames=8, shape=(96, 96), read_noise=2.0, seed=6)
    level = 0.1 * (2000.0 / 8) / (2 * np.pi * 4.0)
    assert st.reference.background_level == pytest.approx(level)
    assert st.reference.background.min() == pytest.approx(level, rel=0.05)
    # the noise is independent per frame: Poisson on the expected image plus read noise
    resid = st.frames - st.expected
    assert np.var(resid) == pytest.approx(np.mean(st.expected) + 4.0, rel=0.05)
    assert abs(np.corrcoef(resid[0].ravel(), resid[1].ravel())[0, 1]) < 0.05
    # the mean of the frames is the mean expected intensity
    assert st.frames.mean() == pytest.approx(st.expected.mean(), rel=0.02)


@pytest.mark.parametrize("lattice", ["two_phase", "perovskite", "polar"])
def test_frames_other_lattices(lattice):
    ds = datasets.frames(n_frames=3, shape=96, lattice=lattice, dose=3000.0, seed=1)
    assert ds.attrs["sample_lattice"] == lattice and ds.frames.shape == (3, 96, 96)
    labels = set(np.unique(ds.true_label.values))
    assert labels <= set(range(3)) and len(labels) >= 2
    assert ("true_domain" in ds) == (lattice == "polar")
    res = datasets.score_positions(ds, ds.true_x, ds.true_y)
    assert res["recall"] == 1.0 and res["n_false"] == 0


def test_frames_netcdf_round_trip(tmp_path):
    ds = datasets.frames(n_frames=3, shape=64, lattice="polar", lattice_params={"displacement": 1.0})
    path = tmp_path / "frames.nc"
    atomds.to_netcdf(ds, path)
    xr.testing.assert_identical(atomds.open_dataset(path), ds)
    assert json.loads(ds.attrs["sample_params"])["lattice_params"] == {"displacement": 1.0}
    np.testing.assert_allclose(np.abs(ds.true_dy.values[ds.true_label.values == 1]), 1.0 * 0.25)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_frames=1), "n_frames"),
        (dict(n_frames=2.5), "n_frames"),
        (dict(drift=3.0), "drift"),
        (dict(drift=(1.0, float("nan"))), "drift"),
        (dict(jitter=-0.1), "jitter"),
        (dict(dose=0), "dose"),
        (dict(lattice="cubic"), "lattice"),
        (dict(lattice_params={"vacuum": True}), "vacuum"),
        (dict(lattice_params={"dose": 5.0}), "lattice_params"),
        (dict(lattice_params={"colour": "red"}), "lattice_params"),
        (dict(pixel_size=-1), "pixel_size"),
    ],
)
def test_frames_bad_parameters(kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        datasets.frames(shape=64, **kw)


# ------------------------------------------------------------------------------------------ nanoparticle


def test_nanoparticle_columns_in_the_disc_and_support_everywhere():
    ds = datasets.nanoparticle(shape=256, radius=0.3, spacing=12.0, seed=3)
    xy = _xy_px(ds)
    vac = ds.true_vacuum.values.astype(bool)
    # every column lies in the particle, none in the area marked as having no lattice
    assert not vac[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)].any()
    r = np.hypot(*(xy - xy.mean(0)).T)
    assert r.max() < 0.3 * 256 + 1.0
    # the support film is there: outside the particle the image varies well beyond the noise
    clean = datasets.nanoparticle(shape=256, radius=0.3, spacing=12.0, support=0.0, seed=3)
    out = vac & (np.hypot(*(np.mgrid[0:256, 0:256] - 128.0)) > 0.3 * 256 + 10)
    assert ds.image.values[out].std() > 1.3 * clean.image.values[out].std()
    with pytest.raises(InvalidParameterError, match="radius"):
        datasets.nanoparticle(radius=0.0)
    with pytest.raises(InvalidParameterError, match="lattice"):
        datasets.nanoparticle(lattice="cubic")


@pytest.mark.parametrize("name", ["honeycomb", "perovskite110", "tmd"])
def test_species_samples_and_their_dark_counterparts(name):
    # several species with their labels; contrast="dark" is the ABF-like image of the same area
    bright = datasets.load(name, **SMALL[name])
    dark = datasets.load(name, contrast="dark", **SMALL[name])
    n_species = {"honeycomb": 2, "perovskite110": 3, "tmd": 2}[name]
    assert sorted(np.unique(bright.true_label.values)) == list(range(n_species))
    np.testing.assert_array_equal(bright.true_x.values, dark.true_x.values)
    xy = np.rint(_xy_px(bright)).astype(int)
    ny, nx = bright.image.shape
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < nx) & (xy[:, 1] >= 0) & (xy[:, 1] < ny)
    at_columns = dark.image.values[xy[inside, 1], xy[inside, 0]]
    assert np.median(at_columns) < np.median(dark.image.values)  # dips where the bright image has peaks
    with pytest.raises(InvalidParameterError, match="contrast"):
        datasets.load(name, contrast="grey", **SMALL[name])
    if name == "tmd":
        assert "true_vacuum" in bright and bool(bright.true_vacuum.any())


def test_scan_distorted_moves_the_image_and_its_truth_alike():
    """The scanned sample is the plain one with each row resampled: the columns sit where true_x says
    (a peak at every true column), and the truth moved by the rows' shifts."""
    plain = datasets.hexagonal(shape=256, seed=4)
    ds = datasets.scan_distorted("hexagonal", shape=256, seed=4, shear=0.0, amplitude=2.0, period=100.0, jitter=0.0)
    assert ds.sizes["true_atom"] > 100
    assert ds.attrs["sample_params"] and "scan" in json.loads(ds.attrs["sample_params"])
    ps = float(ds.attrs["pixel_size"])
    # same rows of truth, x moved by up to the amplitude
    it, jf = datasets.match_positions(np.c_[plain.true_x.values, plain.true_y.values],
                                      np.c_[ds.true_x.values, ds.true_y.values], 3 * ps)
    dx = (ds.true_x.values[jf] - plain.true_x.values[it]) / ps
    assert np.allclose(ds.true_y.values[jf], plain.true_y.values[it]) and 1.5 < np.abs(dx).max() <= 2.0
    # each true column is the brightest pixel within a pixel of itself in the noise-free sense: the
    # smoothed image peaks there
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(ds.image.values.astype(float), 1.5)
    ix, iy = np.rint(ds.true_x.values / ps).astype(int), np.rint(ds.true_y.values / ps).astype(int)
    inner = (ix > 3) & (iy > 3) & (ix < 252) & (iy < 252)
    local = np.array([img[y - 2:y + 3, x - 2:x + 3].argmax() for x, y in zip(ix[inner], iy[inner])])
    assert np.mean(np.abs(local // 5 - 2) + np.abs(local % 5 - 2) <= 1) > 0.95


def test_scan_distorted_refuses_what_it_cannot_scan():
    with pytest.raises(InvalidParameterError, match="unknown sample"):
        datasets.scan_distorted("nanoparticle")
    with pytest.raises(InvalidParameterError, match="scan_distorted"):
        datasets.scan_distorted("hexagonal", bogus=1)
    with pytest.raises(InvalidParameterError, match="period"):
        datasets.scan_distorted("hexagonal", shape=64, period=0.0)
