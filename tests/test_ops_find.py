"""xarray layer of preprocessing and atom finding: units, dims, laziness, one compute, replacement."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
from _dask_utils import raise_if_dask_computes

import atomds
from atomds import datasets
from atomds.core import synth
from atomds.errors import DimensionError, InvalidParameterError, MissingVariableError, NoAtomsFoundError
from atomds.ops import find as ofind
from atomds.ops import preprocess as opre


@pytest.fixture(scope="module")
def perov():
    return datasets.perovskite(shape=(192, 192), seed=2)


@pytest.fixture(scope="module")
def found(perov):
    return ofind.find_atoms(perov)


def test_find_atoms_variables_units_and_recall(perov, found):
    ps = perov.attrs["pixel_size"]
    for name in ("seed_x", "seed_y", "atom_x", "atom_y", "atom_score", "atom_area", "sublattice"):
        assert found[name].dims == ("atom",)
        assert "units" in found[name].attrs and "long_name" in found[name].attrs
    assert found["atom_x"].attrs["units"] == perov.attrs["units"] == "Å"
    np.testing.assert_array_equal(found["atom_x"].values, found["seed_x"].values)
    assert found["correlation"].dims == ("y", "x")
    np.testing.assert_array_equal(found["correlation"]["x"].values, perov["x"].values)
    assert found["atom_score"].max() <= 1.0
    # physical units: the positions match the truth given in Å
    sc = datasets.score_positions(found, found["atom_x"], found["atom_y"])
    assert sc["recall_by_label"][0] >= 0.995 and sc["recall_by_label"][1] >= 0.995
    assert sc["false_positive_rate"] <= 0.002
    # both sublattices labelled with the default call
    it, jf = datasets.match_positions(
        np.c_[perov.true_x, perov.true_y] / ps, np.c_[found.atom_x, found.atom_y] / ps, sc["max_distance_px"]
    )
    assert np.mean(found["sublattice"].values[jf] == perov["true_label"].values[it]) >= 0.995
    params = json.loads(found.attrs["find_atoms_params"])
    assert params["units"] == "Å" and params["spacing"] == pytest.approx(params["spacing_px"] * ps)
    assert -1 < params["threshold"] < 1 and params["n_sublattices"] == 2
    atomds.validate(found.drop_vars([v for v in found.variables if "true_atom" in found[v].dims]))


def test_find_atoms_replaces_previous_atoms(perov, found):
    stale = found.assign(neighbor_index=(("atom", "neighbor"), np.zeros((found.sizes["atom"], 3), dtype=np.int64)))
    stale = stale.assign(cluster=("atom", np.zeros(found.sizes["atom"], dtype=np.int64)))
    again = ofind.find_atoms(stale, sublattices=None)
    assert "neighbor_index" not in again and "cluster" not in again and "neighbor" not in again.dims
    assert again.sizes["atom"] == found.sizes["atom"]
    assert int(again["sublattice"].max()) == 0
    assert "true_x" in again  # other variables are kept


def test_find_atoms_computes_a_dask_image_once(perov, found):
    lazy = perov.chunk({"y": 64, "x": 96})
    with raise_if_dask_computes(max_computes=1) as sched:
        out = ofind.find_atoms(lazy)
    assert sched.total_computes == 1
    np.testing.assert_allclose(out["atom_x"].values, found["atom_x"].values)


def test_templates_in_physical_units(perov, found):
    a = found.where(found.sublattice == 0, drop=True)
    b = found.where(found.sublattice == 1, drop=True)
    pa = (float(a.atom_x[10]), float(a.atom_y[10]))
    pb = (float(b.atom_x[10]), float(b.atom_y[10]))
    out = ofind.find_atoms(perov, template=[pa, pb])
    sc = datasets.score_positions(out, out["atom_x"], out["atom_y"])
    assert min(sc["recall_by_label"].values()) >= 0.995
    assert json.loads(out.attrs["find_atoms_params"])["sublattice_mode"] == "templates"
    cm = ofind.correlation_map(perov, template=pa)
    assert isinstance(cm, xr.DataArray) and cm.dims == ("y", "x") and cm.attrs["units"] == "1"
    # the correlation at the template's own atom is close to 1
    j = int(round(pa[0] / perov.attrs["pixel_size"]))
    i = int(round(pa[1] / perov.attrs["pixel_size"]))
    assert float(cm[i - 1 : i + 2, j - 1 : j + 2].max()) > 0.8
    with pytest.raises(InvalidParameterError):
        ofind.find_atoms(perov, template=[])


def test_accessor_forwards(perov):
    out = perov.lcx.find_atoms(threshold=0.4)
    assert json.loads(out.attrs["find_atoms_params"])["threshold"] == 0.4
    assert out.sizes["atom"] >= perov.sizes["true_atom"]


def test_find_atoms_errors(perov):
    with pytest.raises(InvalidParameterError, match="threshold"):
        ofind.find_atoms(perov, threshold=2.0)
    with pytest.raises(InvalidParameterError, match="smaller than the image"):
        ofind.find_atoms(perov, template=np.random.default_rng(0).random((300, 300)))
    with pytest.raises(NoAtomsFoundError, match="0.999"):
        ofind.find_atoms(perov, threshold=0.999)
    with pytest.raises(InvalidParameterError, match="sigma"):
        ofind.find_atoms(perov, sigma=-1.0)


@pytest.mark.parametrize(
    ("func", "kw"),
    [
        (opre.denoise, {"sigma": 0.3}),
        (opre.denoise, {"method": "median", "size": 0.75}),
        (opre.denoise, {"method": "nlmeans", "noise": 8.0, "patch_size": 1.25, "patch_distance": 1.5}),
        (opre.normalize, {}),
        (opre.subtract_background, {"scale": 5.0}),
        (opre.subtract_background, {"method": "plane"}),
        (opre.subtract_background, {"method": "polynomial", "order": 2}),
    ],
)
def test_preprocess_stays_lazy_and_matches_eager(perov, func, kw):
    eager = func(perov, **kw)
    with raise_if_dask_computes(max_computes=0):
        lazy = func(perov.chunk({"y": 64, "x": 80}), **kw)
    assert lazy["image"].chunks is not None
    np.testing.assert_allclose(lazy["image"].values, eager["image"].values, rtol=1e-5, atol=1e-4)
    assert eager["image"].dtype == np.float32 and eager["image"].attrs == perov["image"].attrs
    step = func.__name__
    assert f"{step}_params" in eager.attrs and f"{step}_params" not in perov.attrs
    assert not np.array_equal(eager["image"].values, perov["image"].values)


def test_preprocess_defaults_are_estimated(perov):
    out = opre.denoise(perov)
    p = json.loads(out.attrs["denoise_params"])
    # half the column width (sigma = 2 px = 0.5 Å here)
    assert p["sigma"] == pytest.approx(0.25, rel=0.15) and p["units"] == "Å"
    with pytest.raises(InvalidParameterError):
        opre.denoise(perov, method="bilateral")
    with pytest.raises(InvalidParameterError):
        opre.subtract_background(perov, scale=0.0)


def test_align_frames(rng):
    n = 10
    true = np.cumsum(rng.normal(0.0, 0.8, (n, 2)), axis=0)
    true -= true[0]
    smp = datasets.hexagonal(shape=(208, 208), dose=2000.0, seed=4)
    ps = smp.attrs["pixel_size"]
    x0, y0 = smp["true_x"].values / ps - 40, smp["true_y"].values / ps - 40
    frames = [synth.add_noise(synth.render_columns((128, 128), x0 + dx, y0 + dy, 300.0, 2.0) + 3.0, seed=k)
              for k, (dy, dx) in enumerate(true)]
    ds = atomds.from_array(np.asarray(frames), pixel_size=ps, units="Å")
    out = opre.align_frames(ds)
    assert out["image"].dims == ("y", "x") and out["image"].dtype == np.float32
    assert out["shift_x"].dims == ("frame",) and out["shift_x"].attrs["units"] == "Å"
    err = np.hypot(out["shift_x"].values / ps - true[:, 1], out["shift_y"].values / ps - true[:, 0])
    assert np.sqrt(np.mean(err**2)) < 0.05
    assert "align_frames_params" in out.attrs
    # the aligned image can be analysed directly
    found = ofind.find_atoms(out)
    assert found.sizes["atom"] > 90
    with pytest.raises(MissingVariableError):
        opre.align_frames(smp)
    with pytest.raises(DimensionError):
        ofind.find_atoms(ds)


def test_pure_noise_image_reports_no_atoms():
    noise = np.random.default_rng(3).normal(100.0, 5.0, size=(128, 128))
    ds = atomds.from_array(noise, pixel_size=0.2, units="Å")
    with pytest.raises(NoAtomsFoundError, match="no atoms found"):
        ds.lcx.find_atoms()


@pytest.mark.parametrize("kind", ["second_pass_skipped", "second_pass_failed"])
def test_a_dropped_second_pass_is_recorded_and_warned_once(perov, monkeypatch, kind):
    # the per-class second pass used to be dropped without a trace; now the first pass is kept,
    # the fallback recorded in find_atoms_params["fallbacks"] and a FallbackWarning issued once
    from atomds import params as P
    from atomds.core.find import api

    if kind == "second_pass_skipped":  # no template could be built for every class
        monkeypatch.setattr(api, "class_templates", lambda *args, **kw: [])
    else:  # the per-class search finds nothing
        real = api.find_atoms

        def second_pass_fails(image, **kw):
            if kw.get("refine_templates") is False:
                raise NoAtomsFoundError("no atoms found")
            return real(image, **kw)

        monkeypatch.setattr(api, "find_atoms", second_pass_fails)
    monkeypatch.setattr(P, "_WARNED", set())
    with pytest.warns(P.FallbackWarning, match="first pass"):
        out = ofind.find_atoms(perov)
    p = P.step_params(out, "find_atoms")
    assert set(p["fallbacks"]) == {kind}
    assert p["n_sublattices"] == 2 and "first_pass" not in p
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.FallbackWarning)  # once per kind: the second time only records
        again = ofind.find_atoms(perov)
    assert kind in P.step_params(again, "find_atoms")["fallbacks"]


def test_contrast_auto_is_the_default_and_refine_follows_it():
    from atomds.core import samples
    from atomds.params import step_params

    s = samples.hexagonal_sample(shape=(160, 160), dose=3000.0, seed=8)
    ds = datasets.to_dataset(samples.dark_sample(s, seed=2))
    out = ds.lcx.find_atoms().lcx.refine()
    assert step_params(out, "find_atoms")["contrast"] == "dark"
    assert step_params(out, "find_atoms")["contrast_auto"]["decided"] is True
    assert step_params(out, "refine")["contrast"] == "dark"
    sc = datasets.score_positions(out, out["atom_x"].values, out["atom_y"].values)
    assert sc["recall"] >= 0.99 and sc["false_positive_rate"] == 0 and sc["rmse_px"] < 0.3  # dips fitted as dips
    from atomds.pipeline import AnalysisParams

    assert AnalysisParams().contrast == "auto"
