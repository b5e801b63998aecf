"""Benchmark of many-image batches and library-wide learning (issue 6).

1. Throughput of :func:`atomds.batch.run_batch` on N synthetic 1024 x 1024 images (~5 000 atoms
   each) with a LocalCluster of 1 worker and of 2 workers (one process and one thread each):
   images per second and their ratio (target >= 1.7x), and the peak resident memory of each
   worker process (target <= 1 GB).
2. Library-wide k-means (K from the dendrogram) + PCA over 1 000 000 atoms (target <= 20 s):
   200 "images" of 5 000 atoms whose descriptors are synthesised (three neighbourhood types with
   noise) are assembled with :func:`atomds.library.from_datasets`, then :func:`atomds.library.learn`
   is timed.

Usage::

    python benchmarks/bench_batch.py --quick          # 4 images, then the 1M-atom learning
    python benchmarks/bench_batch.py --n-images 40    # more images
    python benchmarks/bench_batch.py --skip-batch     # learning only
    python benchmarks/bench_batch.py --scale 200      # one full 200-image run on 2 workers

Prints a Markdown table and writes JSON with ``--json PATH``. Timings depend on the machine and
its load: report ratios measured in the same run.
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


def make_images(folder: Path, n: int, *, size: int = 1024, spacing: float = 15.0) -> list[Path]:
    from atomds import datasets

    paths = []
    for i in range(n):
        ds = datasets.hexagonal(shape=(size, size), spacing=spacing, seed=100 + i)
        p = folder / f"image_{i:03d}.npy"
        np.save(p, ds["image"].values)
        paths.append(p)
    return paths


def run_throughput(paths: list[Path], n_workers: int, work: Path, steps) -> dict:
    from distributed import Client, LocalCluster

    from atomds import batch as B

    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0", memory_limit="4GiB", silence_logs=logging.ERROR,
    )
    try:
        with Client(cluster) as client:
            # warm the workers (imports) so that the timing is the images' work only
            client.run(lambda: __import__("atomds.pipeline") and __import__("atomds.ops.refine") and None)
            shutil.rmtree(work, ignore_errors=True)
            t0 = time.perf_counter()
            res = B.run_batch(paths, steps=steps, client=client, work_dir=work, learn=False, progress=False)
            wall = time.perf_counter() - t0
    finally:
        cluster.close()
    recs = res.records
    ok = [r for r in recs if r["status"] == "ok"]
    return {
        "workers": n_workers,
        "images": len(paths),
        "failed": len(recs) - len(ok),
        "wall_s": wall,
        "images_per_s": len(paths) / wall,
        "atoms_per_image": float(np.mean([r["n_atoms"] for r in ok])) if ok else 0.0,
        "task_s_mean": float(np.mean([r["seconds"] for r in recs])),
        "task_cpu_s_mean": float(np.mean([r["cpu_seconds"] for r in recs])),
        # share of the workers' time spent inside tasks (1 = no scheduling or assembly idle time)
        "worker_busy": float(sum(r["seconds"] for r in recs) / (n_workers * wall)),
        # CPU time the tasks got per second of their wall time (< 1: the cores were shared)
        "cpu_share": float(sum(r["cpu_seconds"] for r in recs) / sum(r["seconds"] for r in recs)),
        "peak_rss_mb_max": float(max(r["peak_rss_mb"] for r in recs)),
        "errors": sorted({r["error"] for r in recs if r["status"] != "ok"})[:3],
    }


def run_scale(paths: list[Path], n_workers: int, folder: Path) -> dict:
    """The whole ``atomds batch`` path at scale: tasks, assembly, library-wide learning, atomic write."""
    import resource

    from atomds import batch as B
    from atomds import library

    out_file = folder / "library.nc"
    t0 = time.perf_counter()
    res = B.run_batch(paths, n_workers=n_workers, output=out_file, memory_limit="2GiB", progress=False)
    wall = time.perf_counter() - t0
    recs = res.records
    tasks_end = wall  # the tasks' share is estimated from their summed wall time
    tree = res.library
    info = {
        "workers": n_workers,
        "images": len(paths),
        "failed": len(res.failed),
        "atoms": int(library.atoms(tree).sizes["atom"]),
        "K": int(tree.sizes.get("cluster_id", 0)),
        "wall_s": wall,
        "images_per_s": len(paths) / wall,
        "task_s_sum": float(sum(r["seconds"] for r in recs)),
        "assembly_learn_write_s_est": float(tasks_end - sum(r["seconds"] for r in recs) / n_workers),
        "peak_rss_mb_worker_max": float(max(r["peak_rss_mb"] for r in recs)),
        "peak_rss_mb_client": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "library_mb": out_file.stat().st_size / 2**20,
    }
    tree.close()
    return info


def synthetic_library(n_images: int = 200, atoms_per_image: int = 5000, k: int = 6, seed: int = 0):
    """A library whose /atoms descriptor mixes three neighbourhood types (no images needed)."""
    import xarray as xr

    import atomds
    from atomds import library
    from atomds.core import neighbors as cn

    rng = np.random.default_rng(seed)
    ang = np.arange(k) * 2 * np.pi / k
    types = np.array([[4.0] * k, [3.6] * k, [4.0, 3.6] * (k // 2)])
    names = cn.feature_names("xy", k)
    dss = []
    tiny = atomds.from_array(np.arange(16.0).reshape(4, 4), pixel_size=0.25, units="Å")
    for _i in range(n_images):
        frac = rng.dirichlet([2, 2, 2])
        t = rng.choice(3, size=atoms_per_image, p=frac)
        r = types[t] + 0.08 * rng.normal(size=(atoms_per_image, k))
        X = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=2).reshape(atoms_per_image, -1)
        X[rng.random(atoms_per_image) < 0.03] = np.nan  # edge atoms
        xy = rng.random((atoms_per_image, 2)) * 250
        ds = tiny.assign(
            atom_x=("atom", xy[:, 0], {"units": "Å", "long_name": "x"}),
            atom_y=("atom", xy[:, 1], {"units": "Å", "long_name": "y"}),
            descriptor=(("atom", "feature"), X, {"units": "Å", "long_name": "neighbourhood descriptor (xy)"}),
        ).assign_coords(feature=("feature", np.array(names, dtype=str)))
        dss.append(ds)
    props = {"composition": list(rng.random(n_images))}
    t0 = time.perf_counter()
    tree = library.from_datasets(dss, ids=[f"img{i:03d}" for i in range(n_images)], properties=props)
    build = time.perf_counter() - t0
    del xr
    return tree, build


def run_learning(n_images: int, atoms_per_image: int) -> dict:
    from atomds import library

    tree, build = synthetic_library(n_images, atoms_per_image)
    n_atoms = int(library.atoms(tree).sizes["atom"])
    t0 = time.perf_counter()
    K = library.suggest_k(tree)
    t1 = time.perf_counter()
    learned = library.learn(tree, n_clusters=K)
    t2 = time.perf_counter()
    learned_auto = library.learn(tree)  # K chosen inside, as atomds batch does
    t3 = time.perf_counter()
    frac = learned["cluster_fraction"].values
    return {
        "atoms": n_atoms,
        "build_s": build,
        "suggest_k_s": t1 - t0,
        "K": K,
        "kmeans_pca_s": t2 - t1,
        "learn_auto_s": t3 - t2,
        "fractions_sum_to_1": bool(np.allclose(np.nansum(frac, axis=1), 1.0)),
        "same_labels": bool(np.array_equal(learned["atoms"]["cluster"].values, learned_auto["atoms"]["cluster"].values)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 images (throughput) and the 1M-atom learning")
    p.add_argument("--n-images", type=int, default=None, help="images per throughput run (default 16; 4 with --quick)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--skip-batch", action="store_true")
    p.add_argument("--skip-learn", action="store_true")
    p.add_argument("--learn-atoms", type=int, default=1_000_000, help="atoms of the learning benchmark")
    p.add_argument("--scale", type=int, default=None, metavar="N",
                   help="instead: one full run (tasks, assembly, learning, write) of N images on 2 workers")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    n = args.n_images or (4 if args.quick else 16)
    from atomds import batch as B

    out: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
    }
    out["load_before"] = [round(v, 2) for v in os.getloadavg()]
    if args.scale:
        tmp = Path(tempfile.mkdtemp(prefix="atomds-scale-"))
        try:
            t0 = time.perf_counter()
            paths = make_images(tmp, args.scale, size=args.size)
            out["make_images_s"] = time.perf_counter() - t0
            out["scale"] = run_scale(paths, 2, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out["load_after"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(out, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
        return 0
    if not args.skip_batch:
        tmp = Path(tempfile.mkdtemp(prefix="atomds-bench-"))
        try:
            t0 = time.perf_counter()
            paths = make_images(tmp, n, size=args.size)
            out["make_images_s"] = time.perf_counter() - t0
            runs = [run_throughput(paths, w, tmp / f"parts{w}", B.DEFAULT_STEPS) for w in (1, 2)]
            out["batch"] = runs
            out["speedup_2_vs_1"] = runs[1]["images_per_s"] / runs[0]["images_per_s"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out["load_after"] = [round(v, 2) for v in os.getloadavg()]
    if not args.skip_learn:
        out["learn"] = run_learning(200, max(1, args.learn_atoms // 200))

    print(f"machine: {out['machine']}")
    if "batch" in out:
        print("\n| workers | images | failed | wall (s) | images/s | atoms/image | task wall (s) | task CPU (s) "
              "| workers busy | CPU share | peak RSS/worker (MB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in out["batch"]:
            print(f"| {r['workers']} | {r['images']} | {r['failed']} | {r['wall_s']:.1f} | {r['images_per_s']:.3f} | "
                  f"{r['atoms_per_image']:.0f} | {r['task_s_mean']:.1f} | {r['task_cpu_s_mean']:.1f} | "
                  f"{r['worker_busy']:.2f} | {r['cpu_share']:.2f} | {r['peak_rss_mb_max']:.0f} |")
        print(f"load average before/after: {out['load_before']} / {out['load_after']}")
        print(f"\nthroughput 2 workers / 1 worker: {out['speedup_2_vs_1']:.2f}x (target >= 1.7x)")
        for r in out["batch"]:
            if r["errors"]:
                print(f"errors ({r['workers']} workers): {r['errors']}")
    if "learn" in out:
        L = out["learn"]
        print(f"\nlibrary-wide learning over {L['atoms']} atoms: build {L['build_s']:.1f} s, suggest_k {L['suggest_k_s']:.1f} s "
              f"(K={L['K']}), k-means + PCA {L['kmeans_pca_s']:.1f} s, learn with K chosen inside {L['learn_auto_s']:.1f} s "
              f"(target <= 20 s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
