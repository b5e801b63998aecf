"""Benchmark of a large image found and refined tile by tile (issue 12, the 16,384² image).

A ``--size`` ² (default 16,384²) hexagonal lattice (spacing 15 px, sigma 2 px, 2000 counts per
column, background 10 % of the peak, Poisson noise; about 1.4 million columns at 16,384²) is
written to a ``.npy`` file strip by strip (never held whole). Then, each in a fresh process
(peak resident memory from ``getrusage``):

- **chunked**: ``atomds.open_image(path, chunks={"y": 4096, "x": 4096})``, ``find_atoms()``,
  ``refine()`` and the refined atom variables computed (the lazy correlation map is not);
- **separate**: the image's ``(size / 4096)²`` parts of 4096² each as an eager image of its own,
  ``find_atoms().refine()`` one after the other (the baseline);

and the atoms of one 4096² part (the one at the image's centre) are compared between the two
runs: every column of the part away from its border (two spacings) matched within 0.01 px.
Targets: peak RSS <= 4 GB, time <= 1.5x the separate parts.

Usage::

    nice python benchmarks/bench_large_image.py                 # 16,384², writes RESULTS.md
    python benchmarks/bench_large_image.py --size 8192 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PART = 4096
SPACING, SIGMA, DOSE, BACKGROUND = 15.0, 2.0, 2000.0, 0.1
MATCH_PX = 0.01


def write_image(path: Path, size: int, seed: int = 3) -> int:
    """The hexagonal lattice image, rendered in strips into a ``.npy`` memmap; returns the column count."""
    from atomds.core.samples.lattice import lattice_sites, lattice_vectors
    from atomds.core.samples.render import RENDER_REACH, render_columns

    rng = np.random.default_rng(seed)
    origin = rng.uniform(0.0, SPACING, 2)
    margin = RENDER_REACH * SIGMA + 2.0
    xy, _, _ = lattice_sites(lattice_vectors("hexagonal", SPACING, 0.0), (size, size), origin=origin, margin=margin)
    peak = DOSE / (2 * np.pi * SIGMA**2)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, size))
    strip = 2048
    for y0 in range(0, size, strip):
        h = min(strip, size - y0)
        sel = (xy[:, 1] > y0 - margin) & (xy[:, 1] < y0 + h + margin)
        expected = render_columns((h, size), xy[sel, 0], xy[sel, 1] - y0, DOSE, SIGMA) + BACKGROUND * peak
        mm[y0 : y0 + h] = np.random.default_rng([seed, y0]).poisson(expected).astype(np.float32)
    mm.flush()
    del mm
    inside = (xy[:, 0] >= -0.5) & (xy[:, 0] < size - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] < size - 0.5)
    return int(inside.sum())


def _centre_part(size: int) -> tuple[int, int]:
    k = size // PART
    return (k // 2) * PART, (k // 2) * PART


def child_chunked(path: str, out: str) -> None:
    import atomds

    t0 = time.perf_counter()
    ds = atomds.open_image(path, chunks={"y": PART, "x": PART})
    found = ds.lcx.find_atoms()
    t1 = time.perf_counter()
    refined = found.lcx.refine()
    names = ["atom_x", "atom_y", "x_err", "y_err", "fit_ok", "sublattice"]
    res = refined[names].compute()
    t2 = time.perf_counter()
    x, y = res.atom_x.values, res.atom_y.values
    p = json.loads(found.attrs["find_atoms_params"])
    np.savez(out, x=x, y=y, fit_ok=res.fit_ok.values)
    print(json.dumps(dict(seconds=t2 - t0, find_s=t1 - t0, refine_s=t2 - t1, n=int(x.size),
                          rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          fit_ok=float(np.mean(res.fit_ok.values)), tiles=p["tiled"]["n_tiles"],
                          halo=p["tiled"]["halo"], merged=p["tiled"]["merged"],
                          empty_tiles=p["tiled"]["empty_tiles"])))


def child_separate(path: str, out: str) -> None:
    import atomds

    mm = np.load(path, mmap_mode="r")
    size = mm.shape[0]
    cy, cx = _centre_part(size)
    n, t_total, keep = 0, 0.0, None
    for y0 in range(0, size, PART):
        for x0 in range(0, size, PART):
            part = np.array(mm[y0 : y0 + PART, x0 : x0 + PART])
            t0 = time.perf_counter()
            r = atomds.from_array(part).lcx.find_atoms().lcx.refine()
            t_total += time.perf_counter() - t0
            n += r.sizes["atom"]
            if (y0, x0) == (cy, cx):
                keep = (r.atom_x.values + x0, r.atom_y.values + y0)
    assert keep is not None
    np.savez(out, x=keep[0], y=keep[1])
    print(json.dumps(dict(seconds=t_total, n=n, rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def run_child(which: str, path: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", which, str(path), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(size: int, chunked: Path, separate: Path) -> dict:
    """Columns of the centre part away from its border: matched within MATCH_PX between the runs."""
    from scipy.spatial import cKDTree

    a, b = np.load(chunked), np.load(separate)
    cy, cx = _centre_part(size)
    m = 2 * SPACING
    xa, ya, xb, yb = a["x"], a["y"], b["x"], b["y"]

    def inner(x, y):
        return (x >= cx + m) & (x < cx + PART - m) & (y >= cy + m) & (y < cy + PART - m)

    pa = np.column_stack([xa, ya])[inner(xa, ya)]
    pb = np.column_stack([xb, yb])[inner(xb, yb)]
    d, _ = cKDTree(pb).query(pa)
    d2, _ = cKDTree(pa).query(pb)
    return dict(n_chunked=int(pa.shape[0]), n_separate=int(pb.shape[0]), max_px=float(d.max()),
                p99_px=float(np.quantile(d, 0.99)), beyond=int((d > MATCH_PX).sum()),
                unmatched=int((d > SPACING / 2).sum() + (d2 > SPACING / 2).sum()))


def section(size: int, n_true: int, ch: dict, sep: dict, cmp: dict, gen_s: float) -> str:
    ratio = ch["seconds"] / sep["seconds"]
    k = (size // PART) ** 2
    lines = [
        "## Large images, tile by tile",
        "",
        f"`nice python benchmarks/bench_large_image.py --size {size}` on {platform.machine()} with {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"{size:,} x {size:,} px hexagonal lattice, {n_true:,} columns (spacing {SPACING:g} px, sigma {SIGMA:g} px, "
        f"{DOSE:g} counts per column, background {BACKGROUND:.0%} of the peak, Poisson noise), float32 `.npy` "
        f"written strip by strip ({gen_s:.0f} s). Each run in a fresh process; peak RSS from `getrusage`.",
        "",
        "| run | s | columns | peak RSS MB | target |",
        "|---|---:|---:|---:|---|",
        f"| `open_image(path, chunks={{\"y\": {PART}, \"x\": {PART}}})`, `find_atoms()`, `refine()`, atom variables "
        f"computed | {ch['seconds']:.1f} (find {ch['find_s']:.1f}, refine {ch['refine_s']:.1f}) | {ch['n']:,} | "
        f"{ch['rss_mb']:.0f} | <= 4 GB: **{'met' if ch['rss_mb'] <= 4096 else 'not met'}** |",
        f"| the {k} parts of {PART}² as separate images, `find_atoms().lcx.refine()` each (baseline) | "
        f"{sep['seconds']:.1f} | {sep['n']:,} | {sep['rss_mb']:.0f} | |",
        f"| ratio chunked / separate | {ratio:.2f} | | | <= 1.5: **{'met' if ratio <= 1.5 else 'not met'}** |",
        "",
        f"Tiles: {ch['tiles']} ({PART}² chunks), halo {ch['halo']} px, {ch['merged']:,} halo reports merged away, "
        f"{ch['empty_tiles']} empty; fits converged {ch['fit_ok']:.2%}. Same atoms: the centre part's "
        f"{cmp['n_chunked']:,} columns away from its border (two spacings) against the separate run of that part "
        f"({cmp['n_separate']:,}): largest distance {cmp['max_px']:.4f} px (99th percentile {cmp['p99_px']:.4f}), "
        f"{cmp['beyond']} beyond {MATCH_PX} px, {cmp['unmatched']} unmatched: "
        f"**{'met' if cmp['beyond'] == 0 and cmp['unmatched'] == 0 else 'not met'}**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("WHICH", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        which, path, out = args.child
        (child_chunked if which == "chunked" else child_separate)(path, out)
        return 0
    if args.size % PART:
        ap.error(f"--size must be a multiple of {PART}")
    with tempfile.TemporaryDirectory(prefix="atomds-large-") as tmp:
        folder = Path(tmp)
        path = folder / "large.npy"
        t0 = time.perf_counter()
        n_true = write_image(path, args.size)
        gen_s = time.perf_counter() - t0
        print(f"image written: {n_true} columns, {gen_s:.0f} s", flush=True)
        sep = run_child("separate", path, folder / "separate.npz")
        print("separate:", sep, flush=True)
        ch = run_child("chunked", path, folder / "chunked.npz")
        print("chunked:", ch, flush=True)
        cmp = compare(args.size, folder / "chunked.npz", folder / "separate.npz")
        print("compare:", cmp, flush=True)
    text = section(args.size, n_true, ch, sep, cmp, gen_s)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        from bench_find_refine import write_section

        write_section(text, HERE / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
