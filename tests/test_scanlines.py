"""Bad scan lines: whole rows or columns spoiled by a scan glitch are found, and nothing else is."""

from __future__ import annotations

import numpy as np
import pytest

from atomds.core.samples import hexagonal_sample
from atomds.core.scanlines import bad_lines, fill_lines
from atomds.errors import InvalidParameterError


def _lattice(shape=256, spacing=12.0, sigma=2.0, angle=0.0, seed=0):
    return hexagonal_sample(shape=(shape, shape), spacing=spacing, sigma=sigma, angle=angle, seed=seed).image.astype(float)


def test_spoiled_rows_and_columns_are_found():
    img = _lattice(angle=13.0, seed=1)
    img[40] = 0.0  # a dead line
    img[100] *= 3.0  # a line three times too bright
    img[[150, 151]] *= 0.2  # two lines in a row
    img[200:203] = 0.0  # three in a row: the middle one looks like its neighbours
    img[:, 77] += 5 * img.mean()  # a bright column
    rows, cols = bad_lines(img)
    assert np.flatnonzero(rows).tolist() == [40, 100, 150, 151, 200, 201, 202]
    assert np.flatnonzero(cols).tolist() == [77]
    # the first and last three lines are not judged (a dark frame, a crystal's edge)
    edge = _lattice(angle=13.0, seed=1)
    edge[1] = 0.0
    edge[:, -2] *= 3.0
    assert not bad_lines(edge)[0].any() and not bad_lines(edge)[1].any()


@pytest.mark.parametrize("case", ["aligned", "undersampled", "period3", "step", "vacuum", "border", "noise"])
def test_nothing_else_is_a_bad_line(case):
    rng = np.random.default_rng(3)
    if case == "aligned":  # rows of columns along the scan: the statistic swings from line to line
        img = _lattice(angle=0.0, seed=2)
    elif case == "undersampled":
        img = _lattice(spacing=4.5, sigma=0.9, seed=4)
    elif case == "period3":  # columns every 3 px along the rows, 6 px apart across: every line an extremum
        from atomds.core.samples.render import render_columns

        xs, ys = np.meshgrid(np.arange(1.5, 256, 3.0), np.arange(1.5, 256, 6.0))
        img = rng.poisson(render_columns((256, 256), xs.ravel(), ys.ravel(), 1000.0, 1.0) + 20).astype(float)
    elif case == "border":  # a dark frame of three pixels
        img = _lattice(seed=7)
        img[:3], img[-3:], img[:, :3], img[:, -3:] = 0.0, 0.0, 0.0, 0.0
    elif case == "step":  # an interface exactly along a row: one side ten times brighter
        img = _lattice(seed=5)
        img[128:] += 10 * img.mean()
    elif case == "vacuum":  # the lower half empty
        img = _lattice(seed=6)
        img[150:] = rng.poisson(2.0, img[150:].shape)
    else:
        img = rng.normal(100.0, 10.0, (200, 300))
    rows, cols = bad_lines(img)
    assert not rows.any() and not cols.any(), (np.flatnonzero(rows), np.flatnonzero(cols))


def test_fill_lines():
    img = np.arange(50.0)[:, None] * np.ones((50, 40))  # a ramp along y: interpolation is exact
    bad = np.zeros(50, bool)
    bad[[0, 10, 11, 30]] = True
    spoiled = img.copy()
    spoiled[bad] = -99.0
    out = fill_lines(spoiled, bad, np.zeros(40, bool))
    np.testing.assert_allclose(out[1:], img[1:])
    np.testing.assert_allclose(out[0], img[1])  # at the edge: the nearest good line
    nan = fill_lines(spoiled, bad, np.zeros(40, bool), fill="nan")
    assert np.isnan(nan[bad]).all() and not np.isnan(nan[~bad]).any()
    assert fill_lines(img, np.zeros(50, bool), np.zeros(40, bool)) is img  # nothing to do: no copy
    with pytest.raises(InvalidParameterError, match="fill"):
        fill_lines(img, bad, np.zeros(40, bool), fill="median")
    with pytest.raises(InvalidParameterError, match="2-D"):
        bad_lines(np.zeros(10))


def test_find_and_refine_leave_spoiled_lines_out():
    import atomds
    from atomds.core.samples import score_positions
    from atomds.params import step_params

    s = hexagonal_sample(shape=(256, 256), spacing=14.0, angle=11.0, dose=2000.0, seed=3)
    img = s.image.astype(np.float32)
    img[[60, 61]] = 0.0
    img[130] *= 3.0
    img[:, 200] *= 3.0
    out = atomds.from_array(img, pixel_size=0.1, units="Å").lcx.find_atoms().lcx.refine()
    found, fitted = step_params(out, "find_atoms")["bad_lines"], step_params(out, "refine")["bad_lines"]
    assert found["rows"] == [60, 61, 130] and found["columns"] == [200] and fitted == found
    sc = score_positions(np.c_[s.x, s.y], np.c_[out["atom_x"].values, out["atom_y"].values] / 0.1, shape=s.shape)
    # spoiled lines left in: ridges and trenches broken into false columns, fits pulled off
    assert sc["recall"] >= 0.99 and sc["false_positive_rate"] <= 0.01, sc


def test_refine_reuses_what_find_atoms_found_on_the_same_image_only():
    import json

    import atomds
    from atomds.params import step_params

    s = hexagonal_sample(shape=(192, 192), spacing=14.0, angle=7.0, dose=2000.0, seed=4)
    img = s.image.astype(np.float32)
    img[50] = 0.0
    img[[20, 90, 150], [33, 101, 12]] = 40.0 * img.max()  # hot pixels
    found = atomds.from_array(img, pixel_size=0.1, units="Å").lcx.find_atoms()
    fp = step_params(found, "find_atoms")
    assert fp["spike_pixels"] == [[20, 33], [90, 101], [150, 12]] and fp["bad_lines"]["rows"] == [50]
    reused = found.lcx.refine()
    rp = step_params(reused, "refine")
    assert "spikes_and_lines_from" in rp and rp["spikes"] == 3 and rp["bad_lines"]["rows"] == [50]
    # the same fit when refine looks for them itself (no digest recorded)
    attrs = json.loads(found.attrs["find_atoms_params"])
    del attrs["image_digest"]
    own = found.assign_attrs(find_atoms_params=json.dumps(attrs)).lcx.refine()
    assert "spikes_and_lines_from" not in step_params(own, "refine") and step_params(own, "refine")["spikes"] == 3
    np.testing.assert_array_equal(own["atom_x"].values, reused["atom_x"].values)
    np.testing.assert_array_equal(own["x_err"].values, reused["x_err"].values)
    # an image changed after find_atoms: its own spikes are looked for (the new hot pixel too)
    changed = found.copy(deep=True)
    changed["image"].values[120, 60] = 40.0 * img.max()
    cp = step_params(changed.lcx.refine(), "refine")
    assert "spikes_and_lines_from" not in cp and cp["spikes"] == 4


def test_a_row_of_columns_along_a_line_is_not_a_bad_line():
    # twelve bright columns 3 px apart along row 64 of 128: the row's mean stands out, its median not
    from atomds.core.samples.render import render_columns

    xs = 40.0 + 3.0 * np.arange(12)
    img = np.random.default_rng(0).poisson(render_columns((128, 128), xs, np.full(12, 64.0), 4000.0, 2.0) + 5.0)
    rows, cols = bad_lines(img.astype(float))
    assert not rows.any() and not cols.any()


@pytest.mark.parametrize("angle", [0.0, 13.0, 30.0])
def test_line_noise_is_seen_and_taken_off_the_rows(angle):
    from atomds.core.scanlines import line_noise_ratio, remove_row_offsets

    s = hexagonal_sample(shape=(384, 384), spacing=14.0, angle=angle, dose=2000.0, seed=5)
    clean = s.image.astype(float)
    peak = 2000.0 / (2 * np.pi * s.params["sigma"] ** 2)
    off = 0.1 * peak * np.random.default_rng(1).normal(size=clean.shape[0])
    out, info = remove_row_offsets(clean + off[:, None])
    assert info["applied"] and info["ratio"] >= 2.5
    left = (out - clean).mean(axis=1)
    # what is left is the offsets' slow part (a local background follows it) and a little of the lattice's rows
    assert np.std(left - left.mean()) < 0.4 * np.std(off)
    assert line_noise_ratio(clean) < 2.0 and not remove_row_offsets(clean)[1]["applied"]
    # the line means taken once serve every step
    from atomds.core.scanlines import line_means

    noisy = clean + off[:, None]
    m = line_means(noisy)
    assert np.array_equal(m[0], noisy.mean(axis=1)) and np.array_equal(m[1], noisy.mean(axis=0))
    assert line_noise_ratio(noisy, means=m) == line_noise_ratio(noisy)
    assert np.array_equal(remove_row_offsets(noisy, means=m)[0], out)
    assert all(np.array_equal(a, b) for a, b in zip(bad_lines(noisy, means=m), bad_lines(noisy)))
    with pytest.raises(InvalidParameterError, match="row means"):
        line_noise_ratio(noisy, means=(m[1], m[0][:-1]))


@pytest.mark.parametrize("case", ["vacuum_half", "steps_along_rows", "gradient_along_y", "rows_along_the_scan"])
def test_structure_along_the_rows_is_not_line_noise(case):
    from atomds.core.scanlines import remove_row_offsets

    rng = np.random.default_rng(2)
    s = hexagonal_sample(shape=(384, 384), spacing=14.0, angle=0.0 if case == "rows_along_the_scan" else 9.0,
                         dose=2000.0, seed=6)
    img = s.expected.astype(float).copy() if hasattr(s, "expected") else s.image.astype(float)
    yy = np.arange(384)[:, None]
    if case == "vacuum_half":
        img = np.where(yy < 192, 3.0, img)
    elif case == "steps_along_rows":
        img = img + 200.0 * (yy > 100) + 200.0 * (yy > 290)
    elif case == "gradient_along_y":
        img = img + 2.0 * yy
    img = rng.poisson(np.clip(img, 0, None)).astype(float)
    out, info = remove_row_offsets(img)
    assert not info["applied"], info
    assert out is img


def test_find_and_refine_take_line_noise_off():
    import atomds
    from atomds.core.samples import score_positions
    from atomds.params import step_params

    s = hexagonal_sample(shape=(384, 384), spacing=14.0, angle=11.0, dose=2000.0, seed=7)
    peak = 2000.0 / (2 * np.pi * s.params["sigma"] ** 2)
    img = (s.image + 0.1 * peak * np.random.default_rng(3).normal(size=384)[:, None]).astype(np.float32)
    out = atomds.from_array(img, pixel_size=0.1, units="Å").lcx.find_atoms().lcx.refine()
    assert step_params(out, "find_atoms")["line_noise"]["applied"]
    assert step_params(out, "refine")["line_noise"]["applied"]
    x, y = out["atom_x"].values / 0.1, out["atom_y"].values / 0.1
    sc = score_positions(np.c_[s.x, s.y], np.c_[x, y], shape=s.shape)
    # left in, the streaks were broken into false columns (298 on a 512^2 image) and the fits'
    # y errors were 2.4 times too small
    assert sc["recall"] >= 0.99 and sc["false_positive_rate"] <= 0.002, sc
    from atomds.core.samples import match_positions

    i_t, i_f = match_positions(np.c_[s.x, s.y], np.c_[x, y], 3.0)
    inner = (s.x[i_t] > 10) & (s.x[i_t] < 374) & (s.y[i_t] > 10) & (s.y[i_t] < 374)
    zy = (y[i_f] - s.y[i_t])[inner] / (out["y_err"].values[i_f][inner] / 0.1)
    assert 0.8 < np.nanstd(zy) < 1.25


def test_refine_reuses_the_finders_results_on_an_integer_image():
    import atomds
    from atomds.params import step_params

    s = hexagonal_sample(shape=(160, 160), spacing=14.0, angle=7.0, dose=2000.0, seed=8)
    img = np.clip(s.image, 0, 65535).astype(np.uint16)
    out = atomds.from_array(img, pixel_size=0.1, units="Å").lcx.find_atoms().lcx.refine()
    assert "spikes_and_lines_from" in step_params(out, "refine")


def test_refine_leaves_the_padding_of_a_sum_out_of_its_fits():
    import atomds
    from atomds.params import step_params

    s = hexagonal_sample(shape=(192, 192), spacing=14.0, angle=9.0, dose=2000.0, seed=9)
    img = s.image.astype(np.float32)
    img[:, :25] = 0.0
    out = atomds.from_array(img, pixel_size=0.1, units="Å").lcx.find_atoms().lcx.refine()
    assert step_params(out, "find_atoms")["data_window"]["left"] == 25
    assert step_params(out, "refine")["padding"] == {"top": 0, "bottom": 0, "left": 25, "right": 0}
