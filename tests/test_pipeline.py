"""The per-image job: one frozen parameters object, a registry of named stages, one set of CLI options."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import atomds
from atomds import pipeline
from atomds.errors import InvalidParameterError
from atomds.params import step_params
from atomds.pipeline import STAGES, AnalysisParams


def test_params_round_trip_through_json():
    p = AnalysisParams(k=4, sort="distance", n_clusters=3, model="elliptical", contrast="dark",
                       find_options={"threshold": 0.4})
    back = AnalysisParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p and hash(back) == hash(p)
    assert back.to_dict()["find_options"] == {"threshold": 0.4}
    with pytest.raises(AttributeError):
        p.k = 5  # frozen


@pytest.mark.parametrize(
    "bad, word",
    [({"k": 0}, "k"), ({"k": 2.5}, "k"), ({"sort": "size"}, "sort"), ({"model": "lorentz"}, "model"),
     ({"contrast": "grey"}, "contrast"), ({"n_clusters": 0}, "n_clusters"), ({"n_components": -1}, "n_components"),
     ({"phases": "maybe"}, "phases"), ({"find_options": {"contrast": "dark"}}, "contrast"),
     ({"find_options": {"template": object()}}, "JSON"), ({"kk": 6}, "unknown")],
)
def test_invalid_params_name_the_option(bad, word):
    with pytest.raises(InvalidParameterError, match=word):
        AnalysisParams.from_dict(bad)


def test_analyze_options_build_the_params_object():
    # contrast inside find_kwargs (as the CLI once passed it) is the contrast option
    p = pipeline.resolve_params(None, find_kwargs={"contrast": "dark", "threshold": 0.3}, k=5)
    assert p.contrast == "dark" and dict(p.find_options) == {"threshold": 0.3} and p.k == 5
    with pytest.raises(InvalidParameterError, match="twice"):
        pipeline.resolve_params(None, find_kwargs={"contrast": "dark"}, contrast="bright")
    with pytest.raises(InvalidParameterError, match="not both"):
        pipeline.resolve_params(AnalysisParams(), k=4)
    assert pipeline.resolve_params(AnalysisParams(k=4), k=6) == AnalysisParams(k=4)


def test_registry_runs_named_stages_in_order():
    assert set(pipeline.STAGE_FUNCTIONS) == set(STAGES)
    assert pipeline.check_stages("find,align") == ("align", "find")
    assert pipeline.check_stages("all") == STAGES
    with pytest.raises(InvalidParameterError, match="dance"):
        pipeline.check_stages(["find", "dance"])
    seen = []
    ds = atomds.datasets.hexagonal(shape=(96, 96), seed=1)
    out = pipeline.run_stages(ds, AnalysisParams(), ["find", "align"], on_stage=seen.append)
    assert seen == ["align", "find"] and "atom_x" in out
    recorded = step_params(out, "analyze")
    assert recorded == {"params": AnalysisParams().to_dict(), "stages": ["align", "find"]}


def _options(parser: argparse.ArgumentParser, command: str) -> dict[str, tuple]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: (tuple(a.option_strings), a.default, tuple(a.choices or ())) for a in sub._actions}


def test_analyze_and_batch_share_the_parameter_options():
    from atomds.cli import build_parser

    parser = build_parser()
    an, ba = _options(parser, "analyze"), _options(parser, "batch")
    fields = {"k", "sort", "n_clusters", "n_components", "model", "contrast"}
    assert fields <= set(an) and fields <= set(ba)
    assert {f: an[f] for f in fields} == {f: ba[f] for f in fields}
    assert an["contrast"][0] == ("--contrast",) and an["model"][0] == ("--model",)
    args = parser.parse_args(["batch", "x.npy", "-o", "l.nc", "--contrast", "dark", "-k", "4"])
    assert pipeline.params_from_args(args) == AnalysisParams(k=4, contrast="dark")


@pytest.mark.parametrize(
    "make, n_cage",
    [(lambda: atomds.datasets.hexagonal(shape=256, seed=4, angle=11.0), None),
     (lambda: atomds.datasets.polar(shape=256, seed=3), 4),
     # B moved towards one A neighbour on one side of the boundary, away from it on the other: no
     # rotation or mirror relates the two domains' neighbourhoods (one short and two long bonds
     # against two short and one long), which read as two phases until the phases stage took the
     # structure the domains share
     (lambda: atomds.datasets.honeycomb(shape=256, seed=2, angle=7.0), 3),
     # uniformly polar honeycomb: one bond 0.86 d, two 1.07 d, which read as a "cage" of one column
     (lambda: atomds.datasets.honeycomb(shape=256, seed=3, antiphase_boundary=False, direction=-90.0), 3)],
)
def test_analyze_says_one_phase_and_maps_strain_and_polarization(make, n_cage):
    """A single crystal (antiphase domains included) is one phase; strain maps always, polarisation
    when two sublattices form cages, each with errors."""
    out = atomds.analyze(make())
    assert out.sizes["region_id"] == 1 and (out["region"].values == 0).all()
    assert step_params(out, "linkage")["suggested_k"] >= 1
    ok = out["fit_ok"].values
    assert out["exx"].dims == ("atom",) and (out["exx_err"].values[ok] > 0).mean() > 0.5
    if n_cage:
        p = step_params(out, "polarization")
        assert p["n_cage"] == n_cage and "skipped" not in p
        polar = out["polarization_domain"].values >= 0
        assert polar.sum() > 0.3 * (out["sublattice"].values == p["displaced"]).sum()
        parent = step_params(out, "phase_parent")
        assert parent["moved"] > 0.3 * (out["sublattice"].values == p["displaced"]).sum(), parent
    else:
        assert "skipped" in step_params(out, "polarization") and "polarization_x" not in out
        assert step_params(out, "phase_parent")["moved"] == 0
    atomds.validate(out)


def test_phases_reuse_the_maps_polarization_with_the_same_result():
    """The phases stage takes the polarisation the maps stage computed instead of computing it again;
    without it (stages run alone) it computes the same."""
    from atomds.pipeline import _parent_structure, _polarization_of

    out = atomds.analyze(atomds.datasets.honeycomb(shape=192, seed=4))
    assert _polarization_of(out) is not None
    bare = out.drop_vars([v for v in out.variables if str(v).startswith("polarization_")])
    assert _polarization_of(bare) is None
    a, b = _parent_structure(out), _parent_structure(bare)
    assert step_params(a, "phase_parent")["moved"] > 0
    assert step_params(a, "phase_parent") == step_params(b, "phase_parent")
    np.testing.assert_array_equal(a["atom_x"].values, b["atom_x"].values)
    np.testing.assert_array_equal(a["atom_y"].values, b["atom_y"].values)


def test_a_crop_of_a_few_columns_is_analysed_with_its_statistics_skipped():
    # 14 columns in 48^2 px, all edge atoms of a 6-neighbour table: the atoms, their fits and strain
    # are kept, and PCA and the phases record why they did not run instead of failing the image
    from atomds.core import samples

    s = samples.hexagonal_sample(shape=(48, 48), dose=3000.0, spacing=14.0, seed=1)
    out = atomds.analyze(atomds.from_array(s.image, pixel_size=0.1, units="Å"))
    assert out.sizes["atom"] >= 9 and np.isfinite(out["x_err"].values).any()
    assert "centre atoms" in step_params(out, "pca")["skipped"]
    assert "edge atoms" in step_params(out, "kmeans")["skipped"]
    assert "k=N" in step_params(out, "kmeans")["hint"] and "-k N" in step_params(out, "pca")["hint"]
    # the phase table that was tried is recorded as on an image whose phases were told apart
    assert step_params(out, "phase_neighborhoods")["k"] == 6
    assert "region" not in out and "pca_components" not in out
    with pytest.raises(atomds.errors.TooFewAtomsError):
        out.lcx.pca()  # the accessor still says so
