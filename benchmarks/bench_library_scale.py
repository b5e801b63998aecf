"""Benchmark of Zarr libraries at scale (issue 12, items 3 and 4).

1. Out-of-core learning: a Zarr library of ``--images`` synthetic images of ``--atoms`` atoms
   each (default 2 000 x 5 000 = 10 million atoms) is built from atom tables (no image analysis:
   three neighbourhood types with noise in the stored "xy" descriptor, 12 features, 8 % edge
   atoms), opened lazily and learned on (:func:`atomds.library.learn`: K from the library-wide
   dendrogram, k-means, PCA, per-image summaries) on a LocalCluster of 2 workers (one process and
   one thread each, 2 GiB limit). Reported: wall time of the learning (target <= 120 s), peak
   resident memory of each worker (target <= 2 GB), K, Lloyd passes; and on a sub-library that
   fits in memory, the agreement with the in-memory learning (ARI, PCA subspace angles).
2. Appends: 10, 20 and 40 images appended to copies of a 200-image library; the files of the
   200 images' groups keep their modification times; seconds per appended image.

Usage::

    python benchmarks/bench_library_scale.py                       # the full run
    python benchmarks/bench_library_scale.py --images 200          # 1 million atoms
    python benchmarks/bench_library_scale.py --skip-learn          # appends only

Prints a Markdown table and writes JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Neighbour shells of the three neighbourhood types (Å): 6 neighbours at these distances.
SHELLS = (3.0, 3.6, 4.2)
#: Fraction of each image's atoms of each type varies from image to image.
K_NEIGHBORS = 6
#: Position noise of the neighbour vectors (Å).
NOISE = 0.12


def atom_table(seed: int, n: int):
    """One image's Dataset: a tiny image, atom positions, edge flags and the stored "xy" descriptor."""

    import atomds

    rng = np.random.default_rng(seed)
    mix = rng.dirichlet(np.ones(len(SHELLS)))
    kind = rng.choice(len(SHELLS), size=n, p=mix)
    ang = np.arange(K_NEIGHBORS) * 2 * np.pi / K_NEIGHBORS
    r = np.asarray(SHELLS)[kind][:, None] + NOISE * rng.normal(size=(n, K_NEIGHBORS))
    X = np.empty((n, 2 * K_NEIGHBORS))
    X[:, 0::2], X[:, 1::2] = r * np.cos(ang), r * np.sin(ang)
    X += NOISE * rng.normal(size=X.shape)
    edge = rng.random(n) < 0.08
    X[edge] = np.nan
    ds = atomds.from_array(rng.random((16, 16)).astype(np.float32), pixel_size=0.25, units="Å", source=f"s{seed}.tif")
    u = {"units": "Å"}
    names = [f"d{c}{j}" for j in range(K_NEIGHBORS) for c in "xy"]
    return ds.assign(
        atom_x=("atom", rng.random(n) * 4, {**u, "long_name": "atom centre x"}),
        atom_y=("atom", rng.random(n) * 4, {**u, "long_name": "atom centre y"}),
        is_edge=("atom", edge, {"units": "1", "long_name": "near the border"}),
        descriptor=(("atom", "feature"), X, {**u, "long_name": "descriptor"}),
    ).assign_coords(feature=("feature", names, {"units": "1", "long_name": "feature"}))


def build(location: Path, n_images: int, n_atoms: int, *, batch: int = 200, seed0: int = 0) -> float:
    """Write a Zarr library of ``n_images`` atom tables (in batches: to_zarr, then appends); seconds."""
    from atomds import library

    t0 = time.perf_counter()
    for start in range(0, n_images, batch):
        stop = min(n_images, start + batch)
        dss = [atom_table(seed0 + i, n_atoms) for i in range(start, stop)]
        ids = [f"img{seed0 + i:05d}" for i in range(start, stop)]
        if start == 0:
            library.to_zarr(library.from_datasets(dss, ids=ids), location)
        else:
            library.append(location, dss, ids=ids)
        print(f"  built {stop}/{n_images} images ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return time.perf_counter() - t0


def _worker_rss(client) -> dict[str, float]:
    def peak() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    return {str(k): float(v) for k, v in client.run(peak).items()}


def learn_at_scale(location: Path, *, n_workers: int = 2, memory_limit: str = "2GiB") -> dict:
    """Out-of-core learning of the library at ``location`` on a LocalCluster; timings and worker memory."""
    from distributed import Client, LocalCluster

    import atomds
    from atomds import library

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", memory_limit=memory_limit, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        rss0 = _worker_rss(client)
        t0 = time.perf_counter()
        tree = atomds.open_library(location, check=False)
        t_open = time.perf_counter() - t0
        t1 = time.perf_counter()
        learned = library.learn(tree)  # K from the library-wide dendrogram
        at = library.atoms(learned)
        K = int(at.sizes["cluster_id"])
        # the per-image summaries are computed in learn(); the labels' counts check the whole pass
        sizes = np.asarray(at["cluster_size"].values)
        frac = np.asarray(learned["cluster_fraction"].values)
        t_learn = time.perf_counter() - t1
        rss = _worker_rss(client)
        from atomds.params import step_params

        km = step_params(at, "kmeans")
        out = dict(
            n_atoms=int(at.sizes["atom"]), n_images=len(library.ids(tree)), open_s=t_open,
            learn_s=t_learn, K=int(K), lloyd_passes=km.get("lloyd_passes"), converged=km.get("converged"),
            cluster_sizes=[int(s) for s in sizes], worker_rss_start_mb=rss0, worker_peak_rss_mb=rss,
            fractions_finite=bool(np.isfinite(frac).all()),
            explained_variance_ratio=[float(v) for v in at["pca_explained_variance_ratio"].values[:3]],
        )
        tree.close()
    return out


def agreement(location: Path, n_images: int) -> dict:
    """On the first ``n_images`` (fit in memory): ARI and PCA angles of out-of-core vs in-memory learning."""
    from scipy.linalg import subspace_angles
    from sklearn.metrics import adjusted_rand_score

    import atomds
    from atomds import library

    sub = location.with_name("agreement.zarr")
    shutil.rmtree(sub, ignore_errors=True)
    dss = [atom_table(i, 5000) for i in range(n_images)]
    mem_tree = library.from_datasets(dss, ids=[f"img{i:05d}" for i in range(n_images)])
    library.to_zarr(mem_tree, sub)
    lazy = atomds.open_library(sub, check=False)
    t0 = time.perf_counter()
    mem = library.learn(mem_tree, n_components=4)
    t_mem = time.perf_counter() - t0
    t0 = time.perf_counter()
    ooc = library.learn(lazy, n_components=4)
    a_ooc = library.atoms(ooc)
    lab_o = np.asarray(a_ooc["cluster"].values)
    t_ooc = time.perf_counter() - t0
    a_mem = library.atoms(mem)
    lab_m = np.asarray(a_mem["cluster"].values)
    ok = lab_m >= 0
    ang = np.degrees(subspace_angles(a_mem["pca_components"].values.T, a_ooc["pca_components"].values.T))
    lazy.close()
    shutil.rmtree(sub, ignore_errors=True)
    return dict(n_atoms=int(lab_m.size), K_mem=int(a_mem.sizes["cluster_id"]), K_ooc=int(a_ooc.sizes["cluster_id"]),
                ari=float(adjusted_rand_score(lab_m[ok], lab_o[ok])), max_angle_deg=float(ang.max()),
                in_memory_s=t_mem, out_of_core_s=t_ooc)


def appends(folder: Path, *, base: int = 200, n_atoms: int = 5000, adds=(10, 20, 40)) -> list[dict]:
    """Append ``adds`` images to copies of a ``base``-image library: seconds and untouched files."""
    from atomds import library

    lib0 = folder / "base.zarr"
    build(lib0, base, n_atoms)
    rows = []
    for n in adds:
        loc = folder / f"append{n}.zarr"
        shutil.rmtree(loc, ignore_errors=True)
        shutil.copytree(lib0, loc)
        files = [p for p in (loc / "images").rglob("*") if p.is_file()]
        atoms_files = [p for p in (loc / "atoms").rglob("*") if p.is_file() and "c" in p.relative_to(loc / "atoms").parts]
        before = {p: p.stat().st_mtime_ns for p in files}
        before_atoms = {p: p.stat().st_mtime_ns for p in atoms_files}
        time.sleep(0.05)
        dss = [atom_table(10_000 + i, n_atoms) for i in range(n)]
        t0 = time.perf_counter()
        library.append(loc, dss, ids=[f"new{i:05d}" for i in range(n)])
        dt = time.perf_counter() - t0
        changed = sum(1 for p, m in before.items() if p.stat().st_mtime_ns != m)
        changed_atoms = sum(1 for p, m in before_atoms.items() if p.stat().st_mtime_ns != m)
        rows.append(dict(appended=n, seconds=dt, seconds_per_image=dt / n, image_files=len(files),
                         image_files_changed=changed, atoms_chunk_files=len(atoms_files),
                         atoms_chunk_files_rewritten=changed_atoms))
        shutil.rmtree(loc, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--atoms", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB")
    ap.add_argument("--agreement-images", type=int, default=40)
    ap.add_argument("--skip-learn", action="store_true")
    ap.add_argument("--skip-append", action="store_true")
    ap.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="atomds-libscale-"))
    folder.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version()}
    try:
        if not args.skip_learn:
            loc = folder / "big.zarr"
            if not loc.exists():
                res["build_s"] = build(loc, args.images, args.atoms)
            res["learn"] = learn_at_scale(loc, n_workers=args.workers, memory_limit=args.memory_limit)
            res["agreement"] = agreement(loc, args.agreement_images)
        if not args.skip_append:
            res["append"] = appends(folder)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if "learn" in res:
        L = res["learn"]
        print("\n| atoms | images | workers | open (s) | learn: K + k-means + PCA + summaries (s) | K | Lloyd passes | worker peak RSS (MB) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {L['n_atoms']:,} | {L['n_images']} | {args.workers} | {L['open_s']:.1f} | "
              f"{L['learn_s']:.1f} | {L['K']} | {L['lloyd_passes']} | "
              f"{', '.join(f'{v:.0f}' for v in L['worker_peak_rss_mb'].values())} |")
        A = res["agreement"]
        print(f"\nagreement on {A['n_atoms']:,} atoms: ARI {A['ari']:.4f}, PCA angles <= {A['max_angle_deg']:.2e} deg, "
              f"K {A['K_mem']} / {A['K_ooc']}")
    if "append" in res:
        print("\n| appended images | seconds | s / image | image files changed | /atoms chunk files rewritten |")
        print("| --- | --- | --- | --- | --- |")
        for r in res["append"]:
            print(f"| {r['appended']} | {r['seconds']:.2f} | {r['seconds_per_image']:.3f} | "
                  f"{r['image_files_changed']} of {r['image_files']} | {r['atoms_chunk_files_rewritten']} of {r['atoms_chunk_files']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
