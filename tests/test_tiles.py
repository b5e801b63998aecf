"""Large images tile by tile: the tile layout, the merge at tile edges, and find/refine on a chunked image.

The end-to-end tests shrink :data:`atomds.core.tiles.MIN_TILE` so that a small image is cut into
tiles; the result must be the one of the same image held in memory (same columns within 0.01 px),
and no step may compute the whole image at once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

import atomds
from atomds.core import tiles as T
from atomds.core.find.contrast import _block_means
from atomds.core.image import beyond_image
from atomds.core.samples import hexagonal_sample, honeycomb_sample, thick_particles_sample
from atomds.ops import tiled
from atomds.params import step_params


@given(st.lists(st.integers(1, 9000), min_size=1, max_size=12), st.integers(1, 1000))
@settings(max_examples=60, deadline=None)
def test_tile_edges_cover_the_axis_on_chunk_boundaries(chunks, min_size):
    edges = T.tile_edges(chunks, min_size)
    bounds = set(np.cumsum([0, *chunks]).tolist())
    assert edges[0] == 0 and edges[-1] == sum(chunks)
    assert all(b > a for a, b in zip(edges, edges[1:], strict=False))
    assert all(b - a <= max(T.MAX_TILE, min_size) for a, b in zip(edges, edges[1:], strict=False))
    if sum(chunks) >= min_size and max(chunks) + 1.5 * min_size <= T.MAX_TILE:
        assert set(edges) <= bounds  # tiles never cut a chunk of a usual size (merged ones stay under MAX_TILE)
        assert all(b - a >= min_size / 2 for a, b in zip(edges, edges[1:], strict=False))
        assert all(b - a >= min_size for a, b in zip(edges[:-2], edges[1:-1], strict=False))


def test_a_large_chunk_is_split_into_tiles():
    assert T.tile_edges([16384]) == [0, 4096, 8192, 12288, 16384]
    assert T.tile_edges([10000, 10000]) == [0, 3333, 6667, 10000, 13333, 16667, 20000]


def test_tile_grid_halo_is_clipped_and_owner_partitions_positions():
    tiles = T.tile_grid((900, 900), ((400, 400, 100), (300, 300, 300)), halo=50, min_size=300)
    assert [(t.y0, t.y1) for t in tiles[::3]] == [(0, 400), (400, 900)]  # the last 100 rows join the tile before
    assert [(t.x0, t.x1) for t in tiles[:3]] == [(0, 300), (300, 600), (600, 900)]
    t = tiles[4]
    assert (t.hy0, t.hy1, t.hx0, t.hx1) == (350, 900, 250, 650)
    assert tiles[0].region == (slice(0, 450), slice(0, 350))
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-3, 903, 5000), rng.uniform(-3, 903, 5000)
    own = T.owner(x, y, tiles)
    for k, tt in enumerate(tiles):
        sel = own == k
        lo_x = -np.inf if tt.x0 == 0 else tt.x0 - 0.5
        hi_x = np.inf if tt.x1 == 900 else tt.x1 - 0.5
        lo_y = -np.inf if tt.y0 == 0 else tt.y0 - 0.5
        hi_y = np.inf if tt.y1 == 900 else tt.y1 - 0.5
        assert np.all((x[sel] >= lo_x) & (x[sel] < hi_x) & (y[sel] >= lo_y) & (y[sel] < hi_y))
    assert np.bincount(own, minlength=len(tiles)).sum() == x.size


def test_merge_keeps_one_copy_of_columns_at_tile_edges():
    tiles = T.tile_grid((100, 200), ((100,), (100, 100)), halo=20, min_size=50)
    # a column on the edge x = 99.5 reported on either side by the two tiles: one copy
    # a column just inside tile 1 (x = 99.6) that tile 1 missed, reported by tile 0 at 99.51: added
    # a column deep in tile 1's core reported only by tile 0's halo (tile 1 judged it no column): left out
    x = np.array([10.0, 99.49, 99.52, 99.51, 112.0, 150.0])
    y = np.array([50.0, 20.0, 20.0, 70.0, 40.0, 50.0])
    by = np.array([0, 0, 1, 0, 0, 1])
    keep, tile_of = T.merge_tile_atoms(x, y, by, tiles, radius=5.0)
    assert sorted(keep.tolist()) == [0, 1, 3, 5]
    assert tile_of.tolist() == sorted(tile_of.tolist())  # grouped by tile
    assert dict(zip(keep.tolist(), tile_of.tolist(), strict=True)) == {0: 0, 1: 0, 3: 1, 5: 1}


def test_block_means_of_any_shape():
    # regression: blocks that are not a whole number of samples crashed on a 2,074 px tile
    for n in (2074, 4216, 999, 4096):
        img = np.ones((n, n + 7))
        means, f = _block_means(img, 256)
        assert np.allclose(means, 1.0)
        assert means.shape == (n // f, (n + 7) // f)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(T, "MIN_TILE", 192)
    monkeypatch.setattr(tiled, "PROBE_SIZE", 256)


def _computed_regions(monkeypatch) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    real = tiled._region

    def region(array, rows, cols):
        out = real(array, rows, cols)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(tiled, "_region", region)
    return shapes


def _match(a, b) -> tuple[np.ndarray, np.ndarray]:
    pa = np.column_stack([a.atom_x.values, a.atom_y.values])
    pb = np.column_stack([b.atom_x.values, b.atom_y.values])
    return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]


def test_chunked_find_and_refine_equal_the_image_in_memory(small_tiles, monkeypatch):
    s = hexagonal_sample(shape=(576, 640), spacing=12.0, dose=3000, seed=5)
    eager = atomds.from_array(s.image).lcx.find_atoms().lcx.refine()
    regions = _computed_regions(monkeypatch)
    lazy = atomds.from_array(s.image, chunks=(192, 256)).lcx.find_atoms()
    p = step_params(lazy, "find_atoms")
    assert p["tiled"]["n_tiles"] == 9 and p["tiled"]["halo"] >= 4 * 12
    assert max(r[0] * r[1] for r in regions) < 0.5 * s.image.size  # never the whole image at once
    assert lazy["correlation"].chunks is not None  # the correlation map stays lazy
    refined = lazy.lcx.refine()
    assert refined["atom_x"].chunks is not None  # so does the refinement
    assert sum(refined["atom_x"].chunks[0]) == lazy.sizes["atom"]
    out = refined.compute()
    # eager refine drops the atoms fitted beyond the image (columns centred outside); lazy atoms keep them
    ps = float(out.attrs.get("pixel_size", 1.0))
    beyond = beyond_image(out.atom_x.values / ps, out.atom_y.values / ps, s.image.shape)
    n_beyond = json.loads(eager.attrs["refine_params"])["beyond_image"]
    assert n_beyond > 0 and abs(n_beyond - beyond.sum()) <= 2  # (the tiles have no model of the columns outside)
    out = out.isel(atom=np.flatnonzero(~beyond))
    d_ab, d_ba = _match(out, eager)
    assert abs(out.sizes["atom"] - eager.sizes["atom"]) <= 2
    # one to one (half a spacing), but for an atom fitted just inside the image's edge by one and just
    # beyond it by the other
    ny, nx = s.image.shape
    edge = []
    for d in (out, eager):
        x, y = d.atom_x.values / ps, d.atom_y.values / ps
        edge.append((x < 0.5) | (x > nx - 1.5) | (y < 0.5) | (y > ny - 1.5))  # within a pixel of the edge
    assert d_ab[~edge[0]].max() < 6.0 and d_ba[~edge[1]].max() < 6.0
    # away from the image's border (columns cut by it are fitted from a part of their pixels)
    x, y = out.atom_x.values, out.atom_y.values
    inner = (x > 18) & (x < 640 - 18) & (y > 18) & (y < 576 - 18)
    assert d_ab[inner].max() < 0.01
    assert out.fit_ok.values.all()
    _, i = cKDTree(np.column_stack([eager.atom_x.values, eager.atom_y.values])).query(np.column_stack([x, y]))
    np.testing.assert_allclose(out.x_err.values[inner], eager.x_err.values[i[inner]], rtol=0.05)  # same error bars
    # the lazy correlation map agrees with the eager one away from the tile edges
    corr = out["correlation"].values
    assert corr.shape == s.image.shape and np.isfinite(corr).all()
    assert np.corrcoef(corr.ravel(), eager["correlation"].values.ravel())[0, 1] > 0.99


def test_chunked_find_labels_two_species_over_the_whole_image(small_tiles):
    s = honeycomb_sample(shape=(512, 512), seed=2)
    eager = atomds.from_array(s.image).lcx.find_atoms()
    lazy = atomds.from_array(s.image, chunks=(256, 256)).lcx.find_atoms()
    assert step_params(lazy, "find_atoms")["tiled"]["n_tiles"] == 4
    assert lazy.sizes["atom"] == eager.sizes["atom"]
    # each found column carries the label of the same column in memory
    pe = np.column_stack([eager.atom_x.values, eager.atom_y.values])
    pl = np.column_stack([lazy.atom_x.values, lazy.atom_y.values])
    d, i = cKDTree(pe).query(pl)
    assert d.max() < 0.5
    assert np.mean(lazy.sublattice.values == eager.sublattice.values[i]) > 0.995


def test_chunked_find_with_a_blank_tile(small_tiles):
    s = hexagonal_sample(shape=(384, 384), spacing=12.0, dose=3000, seed=1)
    img = s.image.copy()
    img[:, 256:] = 0.0  # a blank (constant) region: one tile holds nothing
    lazy = atomds.from_array(img, chunks=(192, 128)).lcx.find_atoms()
    p = step_params(lazy, "find_atoms")["tiled"]
    assert p["n_tiles"] == 4 and p["atoms_per_tile"][1] == p["atoms_per_tile"][3] == 0  # the blank tiles
    assert np.all(lazy.atom_x.values < 256)
    true_in = (s.x < 256 - 6) & (s.x >= 0) & (s.y >= 0) & (s.y < 384)
    d, _ = cKDTree(np.column_stack([lazy.atom_x.values, lazy.atom_y.values])).query(
        np.column_stack([s.x[true_in], s.y[true_in]]))
    assert np.mean(d < 1.0) > 0.99


def test_one_tile_images_stay_on_the_eager_path():
    s = hexagonal_sample(shape=(256, 256), seed=0)
    ds = atomds.from_array(s.image, chunks=(128, 128))  # smaller than one tile: computed once, as before
    out = ds.lcx.find_atoms()
    assert "tiled" not in step_params(out, "find_atoms")


def test_labels_classed_again_when_tiles_disagree():
    rng = np.random.default_rng(0)
    rel = np.r_[rng.normal(1.0, 0.05, 400), rng.normal(0.4, 0.03, 400)]
    tile_labels = np.zeros(800, dtype=np.int64)  # a tile that saw one class only labelled all 0
    labels, how = tiled._labels(tile_labels, rel, [2, 1], "auto")
    assert "again" in how
    assert np.all(labels[:400] == 0) and np.all(labels[400:] == 1)
    same, how = tiled._labels(tile_labels, rel, [1, 1], "auto")
    assert same is not None and np.all(same == 0) and "per tile" in how


def test_probe_moves_out_of_a_blank_centre(small_tiles):
    s = hexagonal_sample(shape=(512, 512), spacing=12.0, dose=3000, seed=3)
    img = s.image.copy()
    img[128:384, 128:384] = np.median(img)  # the centre holds no columns (a flat support)
    lazy = atomds.from_array(img, chunks=(256, 256)).lcx.find_atoms()
    p = step_params(lazy, "find_atoms")["tiled"]
    assert p["probe"]["tried"] > 1
    x, y = lazy.atom_x.values, lazy.atom_y.values
    assert not np.any((x > 140) & (x < 372) & (y > 140) & (y < 372))  # nothing on the blank centre
    outside = ~((s.x > 122) & (s.x < 390) & (s.y > 122) & (s.y < 390)) & (s.x >= 0) & (s.x < 512) & (s.y >= 0) & (
        s.y < 512)
    d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([s.x[outside], s.y[outside]]))
    assert np.mean(d < 1.0) > 0.99


def test_no_columns_anywhere_says_so(small_tiles):
    rng = np.random.default_rng(0)
    img = rng.poisson(50.0, (512, 512)).astype(float)
    with pytest.raises(atomds.errors.NoAtomsFoundError, match="probes"):
        atomds.from_array(img, chunks=(256, 256)).lcx.find_atoms()


def test_template_point_of_the_whole_image(small_tiles):
    s = hexagonal_sample(shape=(512, 512), spacing=12.0, dose=3000, seed=4)
    inner = (s.x > 300) & (s.x < 400) & (s.y > 300) & (s.y < 400)
    point = (float(s.x[inner][0]), float(s.y[inner][0]))  # a column in a corner tile, far from the probe
    eager = atomds.from_array(s.image).lcx.find_atoms(template=point)
    lazy = atomds.from_array(s.image, chunks=(256, 256)).lcx.find_atoms(template=point)
    assert "tiled" in step_params(lazy, "find_atoms")
    d, _ = cKDTree(np.column_stack([eager.atom_x.values, eager.atom_y.values])).query(
        np.column_stack([lazy.atom_x.values, lazy.atom_y.values]))
    assert abs(lazy.sizes["atom"] - eager.sizes["atom"]) <= 2 and np.quantile(d, 0.99) < 0.2


def test_a_thin_remainder_chunk_and_the_recorded_tiling(small_tiles):
    s = hexagonal_sample(shape=(388, 388), spacing=12.0, dose=3000, seed=6)
    # chunks of 192 leave a 4 px remainder: it joins the tile before it, and the lazy correlation
    # map (overlap of half a template, wider than that chunk) still computes
    ds = atomds.from_array(s.image, chunks=(192, 192))
    assert ds["image"].chunks[0][-1] == 4
    found = ds.lcx.find_atoms()
    corr = found["correlation"].values
    eager = atomds.from_array(s.image).lcx.find_atoms()
    assert corr.shape == s.image.shape and np.isfinite(corr).all()
    assert np.corrcoef(corr.ravel(), eager["correlation"].values.ravel())[0, 1] > 0.99
    p = step_params(found, "find_atoms")
    assert p["tiled"]["n_tiles"] == 4 and "halos included" in p["tiled"]["counts"]
    refined = found.lcx.refine(window=30.0)  # a wide window: the halo reaches it and two spacings beyond
    rp = step_params(refined, "refine")["tiled"]
    assert rp["n_tiles"] == 4 and rp["halo"] >= 30 + 2 * 12 and sum(rp["atoms_per_tile"]) == found.sizes["atom"]
    point = (float(s.x[100]), float(s.y[100]))
    pt = atomds.from_array(s.image, chunks=(192, 192)).lcx.find_atoms(template=point)
    assert step_params(pt, "find_atoms")["templates"] == ["point"]


def test_tiles_are_fitted_less_the_local_background_as_the_image_in_memory(small_tiles):
    # particles whose thickness contrast find_atoms took off: each tile's fits run on its pixels
    # less the background beyond its columns, as the eager fits do (before: the thickness slope
    # stayed in the fits, 1.01 px from the truth against 0.49 px in memory)
    s = thick_particles_sample(shape=512, seed=3)
    eager = atomds.from_array(s.image).lcx.find_atoms().lcx.refine()
    assert step_params(eager, "refine")["local_background"]["subtracted"] is True
    out = atomds.from_array(s.image, chunks=(256, 256)).lcx.find_atoms().lcx.refine()
    assert step_params(out, "refine")["local_background"]["radius_px"] > 0
    out = out.compute()
    truth = cKDTree(np.column_stack([s.x, s.y]))
    d_ab, _ = _match(out, eager)
    inner = (out.atom_x.values > 20) & (out.atom_x.values < 492) & (out.atom_y.values > 20) & (out.atom_y.values < 492)
    inner &= out.fit_ok.values & (d_ab < 3.0)
    rms = [np.sqrt(np.mean(truth.query(np.column_stack([r.atom_x.values, r.atom_y.values])[m])[0] ** 2))
           for r, m in ((out, inner), (eager, np.ones(eager.sizes["atom"], bool)))]
    assert rms[0] < 1.1 * rms[1]
    assert np.median(d_ab[inner]) < 0.1
    # the background under each column is the fit's plus the one taken off
    j = cKDTree(np.column_stack([eager.atom_x.values, eager.atom_y.values])).query(
        np.column_stack([out.atom_x.values, out.atom_y.values])[inner])[1]
    bg_t, bg_e = out.background.values[inner], eager.background.values[j]
    assert abs(np.median(bg_t - bg_e)) < 0.02 * np.median(bg_e)
