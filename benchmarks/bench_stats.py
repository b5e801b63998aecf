"""Benchmark of the statistics steps: speed at 100 000 atoms and accuracy on the bundled samples.

Run:  nice python benchmarks/bench_stats.py [--quick] [--no-write]

Speed: neighbourhoods (k = 6, angle order, "xy" descriptor) + k-means (K = 4, 10 starts) + PCA on
a 100 000-atom hexagonal lattice, each step the best of several repeats (the machine is shared:
the minimum is the least disturbed run), next to baselines measured in the same run on the same
data: scikit-learn's plain KMeans (10 starts on all atoms), a bare cKDTree build + query, and
scikit-learn's PCA. The phase descriptor, the dendrogram (linkage + suggest_k) and the lazy
(Dask) neighbourhoods are timed too.

Accuracy: atoms at the true column positions of atomds.datasets samples plus Gaussian position
noise (``crb``: 1.3 x the Cramér-Rao bound of a column, sqrt(sigma^2 + 1/12) / sqrt(counts) px,
about what a good Gaussian refinement reaches; ``3crb``: three times that). When atom finding is
available (``atomds.ops.find``), the same is done on the atoms it finds. Two-phase samples:
adjusted Rand index of ``regions`` against the generator's labels (matrix / grain / boundary),
with K chosen by ``suggest_k``. Polar sample: |r| between the loadings of the polar PCA mode on
the displaced (B) columns and their true displacement, at the default dose and displacement and at
a fifth of the dose with half the displacement.

The "Statistics" section of benchmarks/RESULTS.md is replaced with the tables (other sections are
left as they are).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

from atomds import datasets
from atomds.core import samples
from atomds.ops import learn
from atomds.ops.neighbors import neighborhoods

sys.path.insert(0, str(Path(__file__).parent))
from bench_find_refine import write_section  # noqa: E402  (one writer of RESULTS.md sections)

SECTION = "## Statistics"


def best_of(f, repeats):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return min(times), out


def lattice_dataset(n_target=100_000, spacing=12.0, noise=0.1, seed=0):
    """A hexagonal lattice of about ``n_target`` atoms (positions only), pixel size 0.25 Å."""
    L = int(np.sqrt(n_target * spacing**2 * np.sqrt(3) / 2))
    rng = np.random.default_rng(seed)
    xy, _, _ = samples.lattice_sites(samples.lattice_vectors("hexagonal", spacing, 7.0), (L, L))
    xy = xy + rng.normal(0, noise, xy.shape)
    ps = 0.25
    ds = xr.Dataset(coords={"y": np.arange(L) * ps, "x": np.arange(L) * ps}, attrs={"pixel_size": ps, "units": "Å"})
    return ds.assign(atom_x=("atom", xy[:, 0] * ps), atom_y=("atom", xy[:, 1] * ps))


def speed(repeats):
    from scipy.spatial import cKDTree
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    ds = lattice_dataset()
    n = ds.sizes["atom"]
    rows = []
    t_nb, nb = best_of(lambda: neighborhoods(ds, k=6, sort="angle"), repeats)
    t_km, km = best_of(lambda: learn.kmeans(nb, 4), repeats)
    t_pca, _ = best_of(lambda: learn.pca(km), repeats)
    t_all, _ = best_of(lambda: learn.pca(learn.kmeans(neighborhoods(ds, k=6, sort="angle"), 4)), repeats)
    X = nb["descriptor"].values
    X = X[np.isfinite(X).all(axis=1)]
    pos = np.column_stack([ds["atom_x"].values, ds["atom_y"].values])
    t_tree, _ = best_of(lambda: cKDTree(pos).query(pos, k=7, workers=-1), repeats)
    t_skkm, _ = best_of(lambda: KMeans(4, n_init=10, random_state=0).fit(X), repeats)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        t_skkm1, _ = best_of(lambda: KMeans(4, n_init=10, random_state=0).fit(X), repeats)
    t_skpca, _ = best_of(lambda: PCA().fit_transform(X), repeats)
    rows.append(("neighborhoods(k=6, sort='angle')", t_nb, "cKDTree build + query k=7", t_tree))
    rows.append(("kmeans(4) (10 starts)", t_km, "sklearn KMeans(4, n_init=10), default threads", t_skkm))
    rows.append(("kmeans(4) (10 starts)", t_km, "sklearn KMeans(4, n_init=10), 1 thread", t_skkm1))
    rows.append(("pca()", t_pca, "sklearn PCA().fit_transform", t_skpca))
    rows.append(("total: neighborhoods + kmeans + pca (one run)", t_all, "sum of the baselines (KMeans 1 thread)",
                 t_tree + t_skkm1 + t_skpca))
    extra = []
    t_ph, ph = best_of(lambda: neighborhoods(ds, descriptor="phase"), max(1, repeats // 2))
    extra.append(("neighborhoods(descriptor='phase')", t_ph))
    t_lk, _ = best_of(lambda: learn.suggest_k(ph), max(1, repeats // 2))
    extra.append(("suggest_k (micro-cluster Ward tree, phase descriptor)", t_lk))
    lazy = ds.assign(atom_x=ds["atom_x"].chunk(25_000), atom_y=ds["atom_y"].chunk(25_000))
    t_lazy, _ = best_of(lambda: neighborhoods(lazy, k=6, sort="angle").compute(), max(1, repeats // 2))
    extra.append(("neighborhoods on Dask (4 chunks), built + computed", t_lazy))
    return n, rows, extra


def noisy_atoms(ds, factor, seed):
    ps = float(ds.attrs["pixel_size"])
    sigma = float(ds.attrs["sample_sigma_px"])
    counts = ds["true_counts"].values
    noise = factor * 1.3 * np.sqrt(sigma**2 + 1 / 12) / np.sqrt(counts)
    rng = np.random.default_rng(seed)
    n = ds.sizes["true_atom"]
    x = ds["true_x"].values + rng.normal(0, 1, n) * noise * ps
    y = ds["true_y"].values + rng.normal(0, 1, n) * noise * ps
    return ds.assign(atom_x=("atom", x), atom_y=("atom", y)), np.arange(n)


def found_atoms(ds):
    """Atoms from atom finding + refinement, matched to the truth (None when unavailable).

    Uses ``ds.lcx.find_atoms().lcx.refine()``; while ``atomds.ops.find`` does not exist yet, the
    core finder (:func:`atomds.core.find.find_atoms`) with ``with_atoms`` + ``refine``.
    """
    ps = float(ds.attrs["pixel_size"])
    try:
        try:
            from atomds.ops import find  # noqa: F401

            out = ds.lcx.find_atoms().lcx.refine()
        except ImportError:
            from atomds.core import find as core_find
            from atomds.ops import refine as ops_refine

            fa = core_find.find_atoms(ds["image"].values)
            out = ops_refine.with_atoms(ds, np.asarray(fa.x) * ps, np.asarray(fa.y) * ps)
            if getattr(fa, "sublattice", None) is not None:
                out = out.assign(sublattice=("atom", np.asarray(fa.sublattice)))
            out = ops_refine.refine(out)
    except Exception as exc:  # the finder is another part of atomds: report, do not fail here
        print(f"  (atom finding unavailable: {type(exc).__name__}: {exc})", flush=True)
        return None
    true_xy = np.column_stack([ds["true_x"].values, ds["true_y"].values]) / ps
    found_xy = np.column_stack([out["atom_x"].values, out["atom_y"].values]) / ps
    it, jf = datasets.match_positions(true_xy, found_xy, 0.3 * float(ds.attrs["sample_spacing_px"]))
    truth_of_found = np.full(out.sizes["atom"], -1)
    truth_of_found[jf] = it
    return out, truth_of_found


TWO_PHASE = {
    "square grain": {},
    "rotated hexagonal grain": {"grain_lattice": "hexagonal"},
    "vacancy grain (sqrt3, honeycomb)": {"vacancy_grain": True},
    "vacancy grain (2x2, kagome)": {"vacancy_grain": True, "vacancy_pattern": "2x2"},
}


def two_phase_ari(atoms_ds, truth_index):
    from sklearn.metrics import adjusted_rand_score

    ds = neighborhoods(atoms_ds, descriptor="phase")
    K = learn.suggest_k(ds)
    ds = learn.regions(learn.kmeans(ds, K))
    keep = truth_index >= 0
    labels = atoms_ds["true_label"].values[truth_index[keep]]
    return adjusted_rand_score(labels, ds["region"].values[keep]), K, int(ds.sizes["region_id"])


def polar_r(atoms_ds, truth_index, smooth=0):
    ds = learn.pca(neighborhoods(atoms_ds, k=4, sort="angle", ref_angle="auto", smooth=smooth))
    polar = np.flatnonzero(ds["mode_is_polar"].values)
    if polar.size == 0:
        return float("nan"), -1
    c = int(polar[0])
    keep = truth_index >= 0
    ti = truth_index[keep]
    B = atoms_ds["true_label"].values[ti] == 1
    load = ds["pca_loadings"].values[keep, c][B]
    u = atoms_ds["true_dy"].values[ti][B]
    ok = np.isfinite(load)
    return abs(float(np.corrcoef(load[ok], u[ok])[0, 1])), c


def accuracy(seeds):
    rows = []
    for name, kw in TWO_PHASE.items():
        for seed in seeds:
            base = datasets.two_phase(seed=seed, **kw)
            for label, factor in (("crb", 1.0), ("3crb", 3.0)):
                a, ti = noisy_atoms(base, factor, seed + 100)
                ari, K, R = two_phase_ari(a, ti)
                rows.append(("two_phase", name, seed, label, ari, K, R))
            found = found_atoms(base)
            if found is not None:
                ari, K, R = two_phase_ari(*found)
                rows.append(("two_phase", name, seed, "found", ari, K, R))
    prow = []
    for dose, disp in ((4000.0, 1.2), (800.0, 0.6)):
        for seed in seeds:
            base = datasets.polar(dose=dose, displacement=disp, seed=seed)
            case = f"dose {dose:g}, displacement {disp:g} px"
            for label, factor in (("crb", 1.0), ("3crb", 3.0)):
                a, ti = noisy_atoms(base, factor, seed + 100)
                r, c = polar_r(a, ti)
                prow.append((case, seed, label, r, c))
                a = a.assign(sublattice=("atom", a["true_label"].values))
                r, c = polar_r(a, ti, smooth=4)
                prow.append((case, seed, label + ", smooth=4", r, c))
            found = found_atoms(base)
            if found is not None:
                r, c = polar_r(*found)
                prow.append((case, seed, "found", r, c))
                if "sublattice" in found[0]:
                    r, c = polar_r(*found, smooth=4)
                    prow.append((case, seed, "found, smooth=4", r, c))
    return rows, prow


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and seeds")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    repeats = 2 if args.quick else 5
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    lines = [SECTION, ""]
    lines.append(f"`nice python benchmarks/bench_stats.py` on {platform.machine()} with {os.cpu_count()} cores "
                 f"(shared with other work: best of {repeats} runs), Python {sys.version.split()[0]}, "
                 f"{time.strftime('%Y-%m-%d')}.")
    n, rows, extra = speed(repeats)
    lines += ["", f"### Speed, {n} atoms (hexagonal lattice)", "",
              "| atomds step | s | baseline (same run, same data) | s | ratio |", "|---|---:|---|---:|---:|"]
    for a, ta, b, tb in rows:
        lines.append(f"| {a} | {ta:.3f} | {b} | {tb:.3f} | {ta / tb:.2f} |")
    lines += ["", "| other steps | s |", "|---|---:|"]
    lines += [f"| {a} | {t:.3f} |" for a, t in extra]
    print("\n".join(lines), flush=True)
    tp, pr = accuracy(seeds)
    acc = ["", "### Two-phase samples: adjusted Rand index of `regions` (K from `suggest_k`)", "",
           "Pipeline: `neighborhoods(descriptor='phase')` -> `K = suggest_k()` -> `kmeans(K)` -> `regions()`; ARI over every "
           "atom (edge atoms take the region of their nearest clustered atom).", "",
           "| grain | positions | ARI per seed | min | K per seed | regions per seed |", "|---|---|---|---:|---|---|"]
    for name in TWO_PHASE:
        for label in ("crb", "3crb", "found"):
            sel = [r for r in tp if r[1] == name and r[3] == label]
            if not sel:
                continue
            aris = [r[4] for r in sel]
            acc.append(f"| {name} | {label} | {', '.join(f'{a:.3f}' for a in aris)} | {min(aris):.3f} | "
                       f"{', '.join(str(r[5]) for r in sel)} | {', '.join(str(r[6]) for r in sel)} |")
    acc += ["", "### Polar sample with antiphase boundary: |r| of the polar mode's loadings on the B columns", "",
            "Pipeline: `neighborhoods(k=4, sort='angle', ref_angle='auto')` -> `pca()`; first mode with `mode_is_polar`. "
            "`smooth=4`: `neighborhoods(..., smooth=4, smooth_by='sublattice')` (median over each column and its 4 nearest "
            "columns of its sublattice; the true sublattice for the noisy true positions, the finder's for found atoms).", "",
            "| sample | positions | abs(r) per seed | min | polar mode per seed |", "|---|---|---|---:|---|"]
    for case in dict.fromkeys(r[0] for r in pr):
        for label in ("crb", "crb, smooth=4", "3crb", "3crb, smooth=4", "found", "found, smooth=4"):
            sel = [r for r in pr if r[0] == case and r[2] == label]
            if not sel:
                continue
            rs = [r[3] for r in sel]
            acc.append(f"| {case} | {label} | {', '.join(f'{v:.3f}' for v in rs)} | {min(rs):.3f} | "
                       f"{', '.join(str(r[4]) for r in sel)} |")
    acc += ["", "Positions: `crb` = true positions + Gaussian noise of 1.3 x the Cramér-Rao bound of each column; "
            "`3crb` = three times that; `found` = atoms from `ds.lcx.find_atoms().lcx.refine()` (defaults), "
            "matched to the truth within 0.3 spacing (ARI and r over matched atoms)."]
    print("\n".join(acc), flush=True)
    if not args.no_write:
        write_section("\n".join(lines + acc), Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()
