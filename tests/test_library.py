"""Structure–property libraries (atomds.library): layout, exact round trips, library-wide learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

import atomds
from atomds import library
from atomds.errors import InvalidParameterError, MissingStepError, SchemaValidationError
from atomds.params import step_params

ANG = np.arange(6) * np.pi / 3


def _image(seed: int, n: int, frac_small: float, *, ny: int = 24, k: int = 6, extra: bool = True) -> xr.Dataset:
    """An image Dataset with atoms whose neighbourhoods come from two phases (bond 3 Å or 4 Å)."""
    rng = np.random.default_rng(seed)
    ds = atomds.from_array(rng.random((ny, 30)), pixel_size=0.25, units="Å", source=f"sample_{seed}.tif")
    phase = (rng.random(n) < frac_small).astype(np.int64)
    ang = np.arange(k) * 2 * np.pi / k
    r = np.where(phase[:, None] == 1, 3.0, 4.0) + 0.05 * rng.normal(size=(n, k))
    u = {"units": "Å"}
    ds = ds.assign(
        atom_x=("atom", rng.random(n) * 7, {**u, "long_name": "atom centre x"}),
        atom_y=("atom", rng.random(n) * 5, {**u, "long_name": "atom centre y"}),
        fit_ok=("atom", rng.random(n) > 0.1, {"units": "1", "long_name": "fit converged"}),
        is_edge=("atom", rng.random(n) < 0.1, {"units": "1", "long_name": "near the border"}),
        neighbor_dx=(("atom", "neighbor"), r * np.cos(ang), {**u, "long_name": "dx"}),
        neighbor_dy=(("atom", "neighbor"), r * np.sin(ang), {**u, "long_name": "dy"}),
        neighbor_index=(("atom", "neighbor"), rng.integers(0, n, size=(n, k)), {"units": "1", "long_name": "index"}),
        true_phase=("atom", phase, {"units": "1", "long_name": "true phase"}),
    )
    ds = ds.assign_coords(neighbor=("neighbor", np.arange(k), {"units": "1", "long_name": "neighbour rank"}))
    if extra:
        ds["pca_components"] = xr.DataArray(rng.random((3, 2 * k)), dims=("component", "feature"), attrs={"units": "1", "long_name": "pc"})
        ds.attrs["find_atoms_params"] = '{"threshold": 0.5}'
    return ds


@pytest.fixture
def images():
    return [_image(1, 60, 0.2), _image(2, 45, 0.5, ny=20), _image(3, 70, 0.8)]


# ------------------------------------------------------------------------------- layout and round trips


def test_layout_is_a_cf_ragged_datatree(images):
    tree = library.from_datasets(images)
    assert isinstance(tree, xr.DataTree)
    assert library.ids(tree) == ["sample_1", "sample_2", "sample_3"]
    at = library.atoms(tree)
    np.testing.assert_array_equal(at["atom_count"].values, [60, 45, 70])
    assert at.sizes["atom"] == 175
    assert at["atom_count"].attrs["sample_dimension"] == "atom"
    np.testing.assert_array_equal(at["image_index"].values, np.repeat([0, 1, 2], [60, 45, 70]))
    # the image coordinate is shared by the root and /atoms
    assert list(at["image"].values) == library.ids(tree)
    np.testing.assert_array_equal(at["atom_x"].values[60:105], images[1]["atom_x"].values)
    # per-image grids stay per image; the image is stored as `pixels`
    assert tree["images/sample_2"]["pixels"].shape == (20, 30)
    assert "atom_x" not in tree["images/sample_2"].to_dataset(inherit=False)
    assert set(tree["status"].values) == {"ok"}
    library.validate(tree)


def test_image_gives_back_each_dataset_exactly(images):
    tree = library.from_datasets(images)
    for i, ds in enumerate(images):
        xr.testing.assert_identical(library.image(tree, library.ids(tree)[i]), ds)
        xr.testing.assert_identical(library.image(tree, i), ds)
    with pytest.raises(KeyError):
        library.image(tree, "nope")


def test_images_whose_variables_are_named_differently_make_a_valid_library(images, tmp_path):
    # a crop of a few columns keeps its sublattice classes from finding, a larger image has them
    # taken again from the fitted peaks: the long names differ. The library used the attributes the
    # images share, had no long_name for 'sublattice' and failed its layout check (the batch was lost)
    a, b = images[0].copy(), images[1].copy()
    a["atom_x"] = a["atom_x"].assign_attrs(long_name="atom centre x, found")
    b["atom_x"] = b["atom_x"].assign_attrs(long_name="atom centre x, refined")
    tree = library.from_datasets([a, b])
    library.validate(tree)
    assert tree["atoms"]["atom_x"].attrs["long_name"] == "atom centre x, found"
    xr.testing.assert_identical(library.image(tree, 1), b)
    out = library.to_netcdf(tree, tmp_path / "lib.nc")
    xr.testing.assert_identical(library.image(atomds.open_library(out), 1), b)
    # a per-atom variable in other units in each image (intensities of differently scaled images)
    # is no shared variable: each image keeps its own
    a["level"] = a["atom_x"].assign_attrs(units="counts", long_name="level")
    b["level"] = b["atom_x"].assign_attrs(units="e", long_name="level")
    tree = library.from_datasets([a, b])
    library.validate(tree)
    assert "level" not in tree["atoms"]
    for i, ds in enumerate((a, b)):
        xr.testing.assert_identical(library.image(tree, i), ds)


def test_netcdf_round_trip_is_exact(images, tmp_path):
    tree = library.from_datasets(images, properties={"temperature": [300.0, 350.0, 400.0], "batch": ["a", "b", "a"]})
    path = library.to_netcdf(tree, tmp_path / "lib.nc")
    back = atomds.open_library(path)
    xr.testing.assert_identical(back, tree)
    xr.testing.assert_identical(library.image(back, "sample_3"), images[2])
    lazy = atomds.open_library(path, chunks={})
    xr.testing.assert_identical(lazy, tree)
    lazy.close()


def test_variables_that_differ_between_images_stay_per_image(images):
    odd = _image(4, 30, 0.5, k=4)  # 4 neighbours instead of 6
    tree = library.from_datasets([*images, odd])
    at = library.atoms(tree)
    assert "neighbor_dx" not in at and "atom_x" in at and "fit_ok" in at
    assert tree["images/sample_4"]["neighbor_dx"].shape == (30, 4)
    xr.testing.assert_identical(library.image(tree, "sample_4"), odd)
    xr.testing.assert_identical(library.image(tree, "sample_1"), images[0])


def test_images_with_other_classes_dtypes_and_attrs_share_atoms(images, tmp_path):
    """Sublattice counts (array flag_values), dtypes and attributes that differ keep the variable in /atoms."""
    mixed = []
    for n_cls, (ds, dtype) in enumerate(zip(images, (np.int64, np.int32, np.int16)), start=1):
        lab = (np.arange(ds.sizes["atom"]) % n_cls).astype(dtype)
        attrs = {"units": "1", "long_name": "sublattice", "flag_values": np.arange(n_cls, dtype=dtype),
                 "flag_meanings": " ".join(f"s{i}" for i in range(n_cls))}
        mixed.append(ds.assign(sublattice=("atom", lab, attrs)))
    mixed[2] = mixed[2].assign(atom_x=mixed[2]["atom_x"].astype(np.float32).assign_attrs(note="float32 image"))
    tree = library.from_datasets(mixed)
    at = library.atoms(tree)
    assert at["sublattice"].dtype == np.int64 and at["atom_x"].dtype == np.float64
    assert at["sublattice"].attrs == {"units": "1", "long_name": "sublattice"}
    np.testing.assert_array_equal(at["sublattice"].values[-70:], np.arange(70) % 3)
    back = library.open_library(library.to_netcdf(tree, tmp_path / "mixed.nc"))
    for i, ds in enumerate(mixed):
        xr.testing.assert_identical(library.image(tree, i), ds)
        xr.testing.assert_identical(library.image(back, i), ds)


def test_failed_images_are_recorded(images, tmp_path):
    tree = library.from_datasets(
        {"a": images[0], "bad": None, "c": images[2]}, errors={"bad": "NoAtomsFoundError: no atoms"}
    )
    assert list(tree["status"].values) == ["ok", "failed", "ok"]
    assert tree["error"].values[1] == "NoAtomsFoundError: no atoms" and tree["error"].values[0] == ""
    assert list(library.atoms(tree)["atom_count"].values) == [60, 0, 70]
    assert "bad" not in tree["images"].children
    with pytest.raises(InvalidParameterError, match="no atoms"):
        library.image(tree, "bad")
    back = library.open_library(library.to_netcdf(tree, tmp_path / "f.nc"))
    xr.testing.assert_identical(back, tree)


def test_all_failed_library_is_valid(tmp_path):
    tree = library.from_datasets([None, None], ids=["x", "y"])
    library.validate(tree)
    assert library.atoms(tree).sizes["atom"] == 0
    xr.testing.assert_identical(library.open_library(library.to_netcdf(tree, tmp_path / "e.nc")), tree)


def test_images_without_atoms_round_trip():
    plain = atomds.from_array(np.random.default_rng(0).random((10, 12)), pixel_size=0.5, units="Å")
    with_atoms = _image(5, 20, 0.5, extra=False)
    tree = library.from_datasets([plain, with_atoms], ids=["plain", "atoms"])
    xr.testing.assert_identical(library.image(tree, "plain"), plain)
    xr.testing.assert_identical(library.image(tree, "atoms"), with_atoms)


def test_make_ids_unique_and_safe():
    assert library.make_ids(["a/img.tif", "b/img.tif", "c/img 1.dm4", "img-2.npy"]) == ["img", "img-2", "img_1", "img-2-2"]
    assert library.make_ids(["a/img.tif", "b/img.tif"]) == library.make_ids(["a/img.tif", "b/img.tif"])
    with pytest.raises(InvalidParameterError, match="unique"):
        library.from_datasets([_image(1, 5, 0.5), _image(2, 5, 0.5)], ids=["same", "same"])


def test_mixed_length_units_are_refused(images):
    px = atomds.from_array(np.random.default_rng(0).random((10, 12)))
    with pytest.raises(InvalidParameterError, match="units"):
        library.from_datasets([images[0], px])


def test_inputs_not_modified(images):
    before = [d.copy(deep=True) for d in images]
    tree = library.from_datasets(images)
    library.learn(tree, n_clusters=2)
    for b, d in zip(before, images, strict=True):
        xr.testing.assert_identical(b, d)


# ------------------------------------------------------------------------------- properties


def test_properties_from_csv_by_file_name(images, tmp_path):
    csv = tmp_path / "props.csv"
    csv.write_text("file,composition,temperature,note\nsample_3.tif,0.8,400,hot\nsample_1.tif,0.2,300,\n", encoding="utf-8")
    tree = library.from_datasets(images, properties=csv)
    np.testing.assert_allclose(tree["composition"].values, [0.2, np.nan, 0.8])
    assert tree["temperature"].dtype == np.float64  # a missing value
    assert list(tree["note"].values) == ["", "", "hot"]
    with pytest.warns(UserWarning, match="not in the library"):
        library.from_datasets(images, properties={"sample_9": {"composition": 0.1}})
    replaced = library.set_properties(tree, {"sample_2": {"composition": 0.5}})
    np.testing.assert_allclose(replaced["composition"].values, [np.nan, 0.5, np.nan])
    assert "temperature" not in replaced and "temperature" in tree


def test_bad_properties_are_clear_errors(images, tmp_path):
    with pytest.raises(InvalidParameterError, match="one value per image"):
        library.from_datasets(images, properties={"t": [1, 2]})
    with pytest.raises(InvalidParameterError, match="reserved"):
        library.from_datasets(images, properties={"status": [1, 2, 3]})
    with pytest.raises(atomds.errors.FileMissingError):
        library.from_datasets(images, properties=tmp_path / "missing.csv")


# ------------------------------------------------------------------------------- validation and writing


def test_validate_lists_problems(images):
    tree = library.from_datasets(images)
    broken = tree.copy()
    at = broken["atoms"].to_dataset(inherit=False)
    at["atom_count"] = at["atom_count"] + 1
    broken["atoms"].dataset = at
    with pytest.raises(SchemaValidationError, match="atom_count sums"):
        library.validate(broken)
    assert library.problems(xr.Dataset()) == ["expected an xarray.DataTree, got Dataset"]


def test_write_is_atomic(images, tmp_path, monkeypatch):
    path = tmp_path / "lib.nc"
    tree = library.from_datasets(images)
    library.to_netcdf(tree, path)
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(xr.DataTree, "to_netcdf", boom)
    with pytest.raises(OSError, match="disk full"):
        library.to_netcdf(library.from_datasets(images[:1]), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lib.nc"]


# ------------------------------------------------------------------------------- learning


def test_library_wide_learning_shares_labels_across_images(images, tmp_path):
    tree = library.from_datasets(images, properties={"composition": [0.2, 0.5, 0.8]})
    K = library.suggest_k(tree)
    assert K == 2
    learned = library.learn(tree)
    at = library.atoms(learned)
    used = ~at["is_edge"].values
    lab = at["cluster"].values
    assert (lab[~used] == -1).all() and (lab[used] >= 0).all()
    # one label per phase, the same in every image
    for phase in (0, 1):
        assert len(np.unique(lab[used & (at["true_phase"].values == phase)])) == 1
    assert len(np.unique(lab[used])) == 2
    # per-image summaries follow the composition of each image
    small = int(np.unique(lab[used & (at["true_phase"].values == 1)])[0])
    frac = learned["cluster_fraction"].sel(cluster_id=small).values
    truth = [np.mean(d["true_phase"].values[~d["is_edge"].values]) for d in images]
    np.testing.assert_allclose(frac, truth)
    np.testing.assert_allclose(learned["cluster_fraction"].sum("cluster_id"), 1.0)
    r = library.property_correlation(learned)
    assert r.sel(summary=f"cluster_fraction[{small}]", property="composition") > 0.95
    assert r.attrs["n_images"] == 3
    # modes and loadings: the breathing mode separates the phases
    assert at["pca_loadings"].dims == ("atom", "component")
    assert np.isnan(at["pca_loadings"].values[~used]).all()
    assert float(at["pca_explained_variance_ratio"][0]) > 0.9
    assert learned["mean_loading"].dims == ("image", "component")
    # the per-image PCA of the inputs is replaced by the library-wide one
    assert "pca_components" not in learned["images/sample_1"].to_dataset(inherit=False)
    one = library.image(learned, "sample_2")
    np.testing.assert_array_equal(one["cluster"].values, lab[60:105])
    assert one["pca_components"].shape == at["pca_components"].shape
    # learned libraries round-trip too
    back = library.open_library(library.to_netcdf(learned, tmp_path / "learned.nc"))
    xr.testing.assert_identical(back, learned)
    # and learning again is deterministic
    xr.testing.assert_identical(library.learn(tree), learned)


def test_learning_needs_neighbourhoods():
    plain = _image(1, 10, 0.5).drop_vars(["neighbor_dx", "neighbor_dy"])
    tree = library.from_datasets([plain])
    with pytest.raises(MissingStepError, match="neighborhoods"):
        library.kmeans(tree, 2)
    with pytest.raises(MissingStepError, match="learn"):
        library.property_correlation(tree)


# ------------------------------------------------------------------------------- spectra


def test_attach_spectra_to_a_library(tmp_path):
    from atomds import datasets, spectra

    dss, cubes, truths = [], {}, None
    for i, radius in enumerate((0.2, 0.35)):
        s = datasets.two_phase(shape=(160, 160), grain_radius=radius, seed=i)
        cube, truths = datasets.spectrum_image(s, return_truth=True, seed=10 + i)
        u = s.attrs["units"]
        d = s.assign(
            atom_x=("atom", s["true_x"].values, {"units": u, "long_name": "x"}),
            atom_y=("atom", s["true_y"].values, {"units": u, "long_name": "y"}),
            cluster=("atom", s["true_label"].values.astype(np.int64), {"units": "1", "long_name": "label"}),
        ).drop_dims("true_atom")
        dss.append(d)
        cubes[f"s{i}"] = cube
    tree = library.from_datasets(dss, ids=["s0", "s1"])
    with_spec = library.attach_spectra(tree, {"s1": cubes["s1"], "s0": cubes["s0"]})
    at = library.atoms(with_spec)
    assert at["spectrum"].dims == ("atom", "energy")
    # the same as attaching image by image
    for i, iid in enumerate(("s0", "s1")):
        one = spectra.attach_spectra(dss[i], cubes[iid])
        got = library.image(with_spec, iid)
        np.testing.assert_array_equal(got["spectrum"].values, one["spectrum"].values)
        np.testing.assert_array_equal(got["spectrum_image"].values, cubes[iid].values)
    # cluster-mean spectra over the whole library match the generator's
    means = spectra.cluster_mean_spectra(at)
    for lab in (0, 1):
        n = int(means["atom_count"].sel(cluster=lab))
        se = means["std_spectrum"].sel(cluster=lab).values / np.sqrt(n)
        z = (means["mean_spectrum"].sel(cluster=lab).values - truths["true_spectrum"].sel(label=lab).values) / se
        assert np.mean(z**2) < 2.0
    back = library.open_library(library.to_netcdf(with_spec, tmp_path / "spec.nc"))
    xr.testing.assert_identical(back, with_spec)
    # only one image with a cube: the other gets NaN spectra
    half = library.attach_spectra(tree, {"s1": cubes["s1"]})
    n0 = int(library.atoms(half)["atom_count"].values[0])
    assert np.isnan(library.atoms(half)["spectrum"].values[:n0]).all()
    assert "spectrum_image" not in half["images/s0"].to_dataset(inherit=False)
    with pytest.raises(KeyError):
        library.attach_spectra(tree, {"nope": cubes["s0"]})


def test_images_in_other_orientations_share_one_frame():
    """Each image's neighbour vectors are turned by its reference angle before library-wide PCA."""
    a = _image(11, 80, 0.5, extra=False)
    theta = 0.7
    c, s = np.cos(theta), np.sin(theta)
    b = a.copy()
    # the same neighbourhoods in an image rotated by theta (display convention: angle = atan2(dy, dx))
    b["neighbor_dx"] = (c * a["neighbor_dx"] - s * a["neighbor_dy"]).assign_attrs(a["neighbor_dx"].attrs)
    b["neighbor_dy"] = (s * a["neighbor_dx"] + c * a["neighbor_dy"]).assign_attrs(a["neighbor_dy"].attrs)
    a.attrs["neighborhoods_params"] = '{"ref_angle_used": 0.0}'
    b.attrs["neighborhoods_params"] = f'{{"ref_angle_used": {theta}}}'
    tree = library.from_datasets([a, b], ids=["a", "b"])
    D = library.descriptor(tree).values
    np.testing.assert_allclose(D[80:], D[:80], atol=1e-12)
    learned = library.learn(tree, n_clusters=2)
    np.testing.assert_allclose(learned["reference_angle"].values, [0.0, theta])
    at = library.atoms(learned)
    np.testing.assert_array_equal(at["cluster"].values[80:], at["cluster"].values[:80])
    np.testing.assert_allclose(learned["mean_loading"].sel(image="a"), learned["mean_loading"].sel(image="b"), atol=1e-9)
    # without the turn, the rotated image would look like another structure
    b.attrs["neighborhoods_params"] = '{"ref_angle_used": 0.0}'
    plain = library.descriptor(library.from_datasets([a, b], ids=["a", "b"])).values
    assert not np.allclose(plain[80:], plain[:80], atol=0.1)


def test_clusters_use_the_phase_descriptor_when_present():
    imgs = []
    for seed, frac in ((1, 0.2), (2, 0.7)):
        d = _image(seed, 60, frac, extra=False)
        ph = d["true_phase"].values
        rng = np.random.default_rng(seed)
        feats = np.column_stack([ph + 0.05 * rng.normal(size=ph.size), 1 - ph + 0.05 * rng.normal(size=ph.size)])
        d = d.assign_coords(phase_feature=["f0", "f1"]).assign(
            phase_descriptor=(("atom", "phase_feature"), feats, {"units": "1", "long_name": "phase descriptor"})
        )
        imgs.append(d)
    learned = library.learn(library.from_datasets(imgs), n_clusters=2)
    at = library.atoms(learned)
    assert json.loads(at.attrs["kmeans_params"])["descriptor"] == "phase"
    assert at["cluster_center"].dims == ("cluster_id", "phase_feature")
    lab, ph = at["cluster"].values, at["true_phase"].values
    # every atom is clustered (the phase descriptor has no NaN rows here) and by its phase
    assert (lab >= 0).all()
    assert len(np.unique(lab[ph == 1])) == 1 and len(np.unique(lab[ph == 0])) == 1
    assert "pca_components" in at and at["pca_components"].dims == ("component", "feature")


# ------------------------------------------------------------------------------- Zarr stores


@pytest.mark.parametrize("where", ["local", "memory"])
def test_zarr_library_round_trips_lazily(images, tmp_path, where):
    loc = str(tmp_path / "lib.zarr") if where == "local" else f"memory://{tmp_path.name}/lib.zarr"
    tree = library.from_datasets(images, properties={"temperature": [300.0, 350.0, 400.0]})
    library.to_zarr(tree, loc)
    back = atomds.open_library(loc)
    assert back["atoms"]["atom_x"].chunks is not None  # lazy (Dask-backed)
    xr.testing.assert_identical(back.load(), tree)
    for i, ds in enumerate(images):
        xr.testing.assert_identical(library.image(back, i).load(), ds)


def test_zarr_append_keeps_existing_data_and_gives_images_back(images, tmp_path):
    loc = tmp_path / "lib.zarr"
    first = library.learn(library.from_datasets(images[:2]), n_clusters=2)
    library.to_zarr(first, loc)
    files = [p for p in loc.rglob("*") if p.is_file() and "images" in p.parts]
    before = {p: p.stat().st_mtime_ns for p in files}
    odd = _image(4, 30, 0.5, k=4)  # another neighbour count: its neighbour vectors stay in its node
    assert library.append(loc, [images[2], odd]) == ["sample_3", "sample_4"]
    assert {p: p.stat().st_mtime_ns for p in files} == before
    back = atomds.open_library(loc)
    assert library.ids(back) == ["sample_1", "sample_2", "sample_3", "sample_4"]
    np.testing.assert_array_equal(back["atoms"]["atom_count"].values, [60, 45, 70, 30])
    assert "appended" in back.attrs["learning_stale"]
    learned_out = ["cluster", "cluster_center", "cluster_size", "cluster_id", "pca_mean", "pca_components",
                   "pca_loadings", "pca_explained_variance", "pca_explained_variance_ratio", "mode_polarity",
                   "mode_is_polar", "component", "feature"]
    for i, ds in enumerate([*images[:2], images[2], odd]):
        got = library.image(back, i).load().drop_vars(learned_out, errors="ignore")
        want = ds.drop_vars(["pca_components", "component"], errors="ignore")  # per-image modes give way
        xr.testing.assert_identical(got, want)
    assert (back["atoms"]["cluster"].values[105:] == -1).all()
    with pytest.raises(InvalidParameterError, match="already in the library"):
        library.append(loc, [images[0]])


def test_interrupted_zarr_append_is_rolled_back(images, tmp_path, monkeypatch):
    from atomds.library import zarrstore

    loc = tmp_path / "lib.zarr"
    tree = library.from_datasets(images[:2])
    library.to_zarr(tree, loc)
    real = xr.Dataset.to_zarr

    def dies_on_root(self, store, *args, **kwargs):
        if kwargs.get("group") is None and kwargs.get("append_dim") == "image":
            raise KeyboardInterrupt  # killed after the atoms were appended, before the root
        return real(self, store, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", dies_on_root)
    with pytest.raises(KeyboardInterrupt):
        zarrstore.append(loc, [images[2]])
    monkeypatch.setattr(xr.Dataset, "to_zarr", real)
    xr.testing.assert_identical(atomds.open_library(loc).load(), tree)
    library.append(loc, [images[2]])
    assert atomds.open_library(loc)["atoms"].sizes["atom"] == 175


# ------------------------------------------------------------------------------- out-of-core learning


def _with_descriptor(ds: xr.Dataset) -> xr.Dataset:
    """The image with its stored "xy" descriptor (dx0, dy0, ...; NaN for edge atoms), as neighborhoods() writes it."""
    k = ds.sizes["neighbor"]
    X = np.empty((ds.sizes["atom"], 2 * k))
    X[:, 0::2], X[:, 1::2] = ds["neighbor_dx"].values, ds["neighbor_dy"].values
    X[ds["is_edge"].values] = np.nan
    names = [f"d{c}{j}" for j in range(k) for c in "xy"]
    return ds.assign(descriptor=(("atom", "feature"), X, {"units": "Å", "long_name": "descriptor"})).assign_coords(
        feature=("feature", names, {"units": "1", "long_name": "feature"}))


@pytest.mark.parametrize("fractions", [(0.2, 0.5, 0.8, 0.3), (0.0, 0.0, 0.0, 0.0)])
def test_out_of_core_learning_matches_in_memory(fractions, tmp_path):
    """Learning on a Zarr library opened lazily streams over chunks of atoms and gives the in-memory results."""
    from scipy.linalg import subspace_angles
    from sklearn.metrics import adjusted_rand_score

    dss = [_with_descriptor(_image(10 + i, 1500, f, extra=False)) for i, f in enumerate(fractions)]
    tree = library.from_datasets(dss)
    library.to_zarr(tree, tmp_path / "lib.zarr")
    lazy = atomds.open_library(tmp_path / "lib.zarr", chunks={"atom": 1000})
    assert library.atoms(lazy)["descriptor"].chunks is not None
    K = library.suggest_k(tree)
    # one phase is one group; two phases are two, in memory and out of core alike
    assert K == (1 if max(fractions) == 0 else 2)
    assert library.suggest_k(lazy) == K
    mem = library.learn(tree, n_components=4)
    ooc = library.learn(lazy, n_components=4)
    a_mem, a_ooc = library.atoms(mem), library.atoms(ooc)
    assert a_ooc["cluster"].chunks is not None and a_ooc["pca_loadings"].chunks is not None  # transforms stay lazy
    assert library.ids(ooc) == library.ids(tree)
    lab_m, lab_o = a_mem["cluster"].values, a_ooc["cluster"].values
    np.testing.assert_array_equal(lab_m < 0, lab_o < 0)
    ok = lab_m >= 0
    if K > 1:
        assert adjusted_rand_score(lab_m[ok], lab_o[ok]) >= 0.99
    angles = np.degrees(subspace_angles(a_mem["pca_components"].values.T, a_ooc["pca_components"].values.T))
    assert angles.max() < 1.0
    np.testing.assert_allclose(a_ooc["pca_explained_variance"], a_mem["pca_explained_variance"], rtol=1e-6)
    np.testing.assert_allclose(ooc["cluster_fraction"], mem["cluster_fraction"], atol=0.01)
    np.testing.assert_allclose(np.abs(ooc["mean_loading"]), np.abs(mem["mean_loading"]), atol=1e-6)
    assert step_params(a_ooc, "kmeans")["out_of_core"] is True
    lazy.close()
