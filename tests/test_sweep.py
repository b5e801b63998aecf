"""The randomized robustness sweep (issue 10, item 9): the generator, and a small seeded sample of its space.

The second half runs ``ds.lcx.find_atoms().lcx.refine()`` with defaults on ten 256 px images whose
seeds are drawn from ``TEST_MASTER_SEED`` (not chosen; the first master seed tried, 731, drew one
image that takes 90 s in refinement and was passed over for CI time only; the full sweep is
``benchmarks/bench_sweep.py``), and asserts issue 10's targets where they apply. Assertions that
the code of today fails are marked ``xfail(strict=True)`` with the target they miss: when the
finding work makes one pass, the strict mark fails the suite and is to be removed.
"""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest
from scipy.spatial import cKDTree

import atomds
from atomds.core.crb import crb_gaussian
from atomds.core.samples.sweep import (
    SWEEP_LATTICES,
    SweepSample,
    draw_sweep_params,
    render_sweep,
    score_sweep,
    sweep_sample,
    sweep_seeds,
)
from atomds.errors import InvalidParameterError

TEST_MASTER_SEED = 732
N_CASES = 10
SHAPE = 256
SEEDS = sweep_seeds(TEST_MASTER_SEED, N_CASES)

# issue 10's targets
SNR_FLOOR = 8.0
RECALL_TARGET = 0.995
FP_TARGET = 0.002
CRB_TARGET = 1.2
ARI_TARGET = 0.95
MIN_COLUMNS = 10  # a species is judged on at least this many interior columns (20 for RMSE/CRB)
DISTINCT_RATIO = 0.6  # species whose peaks differ by this factor are issue 10's "dim species"


# ----------------------------------------------------------------------------------------------
# the generator


def test_draw_is_reproducible_and_recorded():
    p = draw_sweep_params(11)
    assert p == draw_sweep_params(11)
    assert json.loads(json.dumps(p)) == p  # every drawn parameter is recorded, JSON-serialisable
    a, b = sweep_sample(11, shape=64), sweep_sample(11, shape=64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.x, b.x)
    assert isinstance(a, SweepSample) and a.params["seed"] == 11
    assert not np.array_equal(a.image, sweep_sample(12, shape=64).image)


def test_space_is_covered():
    ps = [draw_sweep_params(s) for s in range(200)]
    assert {p["lattice"] for p in ps} == set(SWEEP_LATTICES)
    assert {p["n_species"] for p in ps} == {1, 2, 3}
    ratio = np.array([p["ratio"] for p in ps])
    dose = np.array([p["dose"] for p in ps])
    peaks = np.concatenate([p["peaks"][1:] for p in ps])
    assert 3.5 <= ratio.min() < 4.5 and 12 < ratio.max() <= 15.0
    assert 300 <= dose.min() < 500 and 12000 < dose.max() <= 20000
    assert 0.15 <= peaks.min() < 0.2 and peaks.max() <= 1.0
    for key in ("thickness", "hole"):
        assert 0.15 < np.mean([p[key] is not None for p in ps]) < 0.6
    for key in ("jitter", "hot_density"):
        assert 0.15 < np.mean([p[key] > 0 for p in ps]) < 0.6


@pytest.mark.parametrize("lattice", SWEEP_LATTICES)
def test_nearest_column_distance_is_the_drawn_spacing(lattice):
    for n_species in (1, 2, 3):
        try:
            p = draw_sweep_params(5, shape=96, lattice=lattice, n_species=n_species, jitter=0.0, hole=None)
        except InvalidParameterError:
            continue  # this lattice holds fewer species (or needs two)
        s = render_sweep(p)
        assert set(np.unique(s.label)) == set(range(n_species))
        xy = np.column_stack([s.x, s.y])
        d = cKDTree(xy).query(xy, k=2)[0][:, 1]
        assert d.min() == pytest.approx(p["spacing"], rel=1e-9)
        assert 3.5 <= p["spacing"] / p["sigma"] <= 15.0


def test_species_peaks_and_sizes():
    p = draw_sweep_params(3, shape=128, lattice="perovskite_001", n_species=3, thickness=None)
    s = render_sweep(p)
    peak = s.counts / (2 * math.pi * s.sigma**2)
    for k in range(3):
        assert np.allclose(peak[s.label == k] / (p["dose"] / (2 * math.pi * p["sigma"] ** 2)), p["peaks"][k])
    assert p["peaks"][0] == 1.0 and p["peaks"] == sorted(p["peaks"], reverse=True)


def test_truth_has_no_column_in_the_hole_and_bounds_per_column():
    p = draw_sweep_params(4, shape=160, hole=[[0.5, 0.5], 0.2], jitter=0.0)
    s = render_sweep(p)
    assert s.vacuum_mask is not None and s.vacuum_mask.any()
    iy, ix = np.rint(s.y).astype(int).clip(0, 159), np.rint(s.x).astype(int).clip(0, 159)
    assert not s.vacuum_mask[iy, ix].any()
    i = np.argsort(s.snr)[[0, s.n_atoms // 2, -1]]
    exact = crb_gaussian(s.counts[i], s.sigma[i], s.local_background[i], read_noise=p["read_noise"])
    np.testing.assert_allclose(s.crb[i], exact, rtol=0.03)  # 2 % grid, 2 x 2 instead of 4 x 4 offsets
    np.testing.assert_allclose(s.snr, s.counts / np.sqrt(s.counts + s.local_background * 4 * np.pi * s.sigma**2))


def test_fixing_a_parameter_keeps_the_other_draws():
    a, b = draw_sweep_params(9), draw_sweep_params(9, lattice="dumbbell", n_species=2)
    assert b["lattice"] == "dumbbell"
    for key in ("dose", "angle", "background", "gradient", "jitter", "hole", "pixel_size"):
        assert a[key] == b[key]


@pytest.mark.parametrize(
    "kw, match",
    [({"colour": 1}, "unknown sweep parameters"), ({"lattice": "cubic"}, "unknown sweep lattice"),
     ({"lattice": "honeycomb", "n_species": 3}, "holds 1-2 species"), ({"n_species": 2, "peaks": [1.0]}, "peaks")],
)
def test_bad_parameters_are_named(kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        draw_sweep_params(1, **kw)


def test_score_sweep_counts_what_it_says():
    s = sweep_sample(21, shape=128, lattice="honeycomb", n_species=2, hole=[[0.5, 0.5], 0.2], jitter=0.0)
    perfect = score_sweep(s, s.x, s.y)
    assert perfect["recall"] == [1.0, 1.0] and perfect["n_false"] == 0 and perfect["crb_ratio"] == [0.0, 0.0]
    keep = s.label == 0
    cx, cy = 0.5 * 127, 0.5 * 127
    half = score_sweep(s, np.append(s.x[keep], cx), np.append(s.y[keep], cy))
    assert half["recall"] == [1.0, 0.0] and half["n_false"] == 1 and half["in_hole"] == 1
    shifted = score_sweep(s, s.x + 2 * s.crb, s.y)
    assert shifted["crb_ratio"][0] == pytest.approx(math.sqrt(2.0), rel=1e-6)
    assert "z_sd" not in shifted
    # error bars: x off by 2 of its stated errors at every column (y exact): std over both axes 1
    both = score_sweep(s, s.x + 2 * s.crb * np.where(np.arange(s.n_atoms) % 2, 1, -1), s.y,
                       x_err=s.crb, y_err=s.crb)
    assert both["z_sd"][0] == pytest.approx(math.sqrt(2.0), rel=0.02)
    with pytest.raises(InvalidParameterError, match="x_err"):
        score_sweep(s, s.x, s.y, x_err=s.crb[:3], y_err=s.crb)


# ----------------------------------------------------------------------------------------------
# a seeded sample of the space through the public API


@functools.cache
def _run(seed: int) -> tuple[SweepSample, dict, float | None]:
    from sklearn.metrics import adjusted_rand_score

    from atomds.core.samples import match_positions

    s = sweep_sample(seed, shape=SHAPE)
    ps = s.params["pixel_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = atomds.from_array(s.image, pixel_size=ps, units="Å").lcx.find_atoms().lcx.refine()
    x, y = r["atom_x"].to_numpy() / ps, r["atom_y"].to_numpy() / ps
    i_t, i_f = match_positions(np.column_stack([s.x, s.y]), np.column_stack([x, y]), s.params["spacing"] / 3)
    ari = float(adjusted_rand_score(s.label[i_t], r["sublattice"].to_numpy()[i_f])) if i_t.size > 1 else None
    return s, score_sweep(s, x, y), ari


def _cases(check: str, known: dict[int, str], where=lambda p: True):
    """The seeds whose drawn parameters satisfy ``where``, with today's misses of ``check`` marked xfail."""
    out = []
    for seed in SEEDS:
        if not where(draw_sweep_params(seed, shape=SHAPE)):
            continue
        marks = [pytest.mark.xfail(strict=True, reason=f"issue 10 target: {known[seed]}")] if seed in known else []
        out.append(pytest.param(seed, id=str(seed), marks=marks))
    return out


# today's misses (commit e2767c1), each with the issue-10 target it misses
RECALL_MISSES: dict[int, str] = {}  # 427599958 (dumbbells, 60 % species) found since the border residual columns
FP_MISSES: dict[int, str] = {}  # 2095179747 (scan jitter's shoulders) passes since the joint test of hugging maxima
CRB_MISSES: dict[int, str] = {}
# 427599958 (dumbbells, peaks 1 / 0.60; ARI 0.21) labelled right since refine classes the fitted columns
ARI_MISSES: dict[int, str] = {}


@pytest.mark.parametrize("seed", _cases("recall", RECALL_MISSES))
def test_recall_per_species_where_snr_at_least_8(seed):
    s, sc, _ = _run(seed)
    for k in range(sc["n_species"]):
        if sc["snr"][k] >= SNR_FLOOR and sc["n_true"][k] >= MIN_COLUMNS:
            assert sc["recall"][k] >= RECALL_TARGET, (k, sc, s.params)


@pytest.mark.parametrize("seed", _cases("false positives", FP_MISSES))
def test_false_positives(seed):
    s, sc, _ = _run(seed)
    assert sc["false_positive_rate"] <= FP_TARGET, (sc, s.params)


@pytest.mark.parametrize("seed", _cases("holes", {}, where=lambda p: p["hole"] is not None))
def test_no_atoms_in_holes(seed):
    s, sc, _ = _run(seed)
    assert sc["in_hole"] == 0, (sc, s.params)


@pytest.mark.parametrize("seed", _cases("precision", CRB_MISSES, where=lambda p: p["jitter"] == 0))
def test_rmse_within_the_bound(seed):
    """RMSE/CRB <= 1.2 per species (isolated-column bound); scan jitter moves columns beyond the bound's model."""
    s, sc, _ = _run(seed)
    for k in range(sc["n_species"]):
        if sc["snr"][k] >= SNR_FLOOR and sc["n_precision"][k] >= 2 * MIN_COLUMNS:
            assert sc["crb_ratio"][k] <= CRB_TARGET, (k, sc, s.params)


def _distinct(p) -> bool:
    pk = p["peaks"]
    return p["n_species"] > 1 and all(b <= DISTINCT_RATIO * a for a, b in zip(pk[:-1], pk[1:]))


@pytest.mark.parametrize("seed", _cases("sublattice", ARI_MISSES, where=_distinct))
def test_sublattice_labels_the_species(seed):
    s, sc, ari = _run(seed)
    assert ari is not None and ari >= ARI_TARGET, (ari, s.params)


def test_dense_lattice_positions_reach_their_bound_with_the_measured_width():
    """Sweep image 1137372705 (drawn by the benchmark's master seed): hexagonal, 4.1 widths apart,
    dose 409, thickness, hot pixels, jitter and a hole. The first pass read the width 20 % narrow
    and the positions came out at 1.83 times their bound; with the width of a joint fit, 1.08."""
    s = sweep_sample(1137372705)
    ps = float(s.params["pixel_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = atomds.from_array(s.image, pixel_size=ps, units="Å").lcx.find_atoms().lcx.refine()
    sc = score_sweep(s, r["atom_x"].values / ps, r["atom_y"].values / ps)
    assert sc["recall"][0] >= RECALL_TARGET and sc["crb_ratio"][0] <= CRB_TARGET
