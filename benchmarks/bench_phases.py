"""Benchmark: does ``atomds.analyze`` say "one phase" when there is one, and keep real phases apart?

Run:  nice python benchmarks/bench_phases.py [--n 60] [--workers 2] [--no-write]

Single-phase sweep: ``--n`` images drawn from a recorded master seed (not chosen): kind (hexagonal
lattice; perovskite A + B; polar perovskite with antiphase domains), dose (500-16 000 counts per
column, log-uniform), rotation (0-90 degrees), size (512 px, with one in five at 1024 px and one in
ten at 2048 px), column width (1.6-2.6 px) and sample seed; then ``--n // 4`` polar honeycombs
(``atomds.datasets.honeycomb``: dim B at 30-70 % of A's peak moved 5-8 % of the period towards one
A neighbour on one side of an antiphase boundary at a drawn angle and away from it on the other,
which no rotation or mirror relates; 512 or 1024 px), and ``--n // 6`` pairs of grains of one
lattice (``atomds.datasets.grain_boundary`` with ``second`` the same lattice, hexagonal or square,
misoriented by 10-45 degrees, meeting along a sharp boundary at a drawn angle; 512 px), each group
drawn after the ones before so that their draws stay as they were; then ``--n // 4`` single crystals
(hexagonal, perovskite, polar or honeycomb) recorded with a slow-scan distortion
(``atomds.datasets.scan_distorted``: drift shear +-3 %, a wobble of 0-1.5 px with a period of
100-600 lines, line jitter 0-0.3 px). Each is analysed with the defaults
(``atomds.analyze``, pixel size given), and the number of regions (phases) is reported: the target
is 1 on every image.

Two-phase images (``atomds.datasets.two_phase``: a hexagonal matrix, a rotated grain of another
lattice (square; honeycomb or kagome: the matrix with an ordered third or quarter of its sites empty;
or the matrix's own lattice rotated, which is the matrix's phase: its labels are merged), a disordered
band between them of width 2-4 spacings), drawn the same way, the last ``max(3, n_two // 2)`` of them
recorded with a scan distortion drawn as above: adjusted Rand index of ``region``
against the true phases (target >= 0.9) and F1 of the best region against the band's atoms (target
>= 0.8).

The "Phases: one when there is one" section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MASTER_SEED = 20261205
HERE = Path(__file__).resolve().parent


def draw_cases(n: int, master: int = MASTER_SEED) -> list[dict]:
    """The drawn single-phase and two-phase cases (parameters only)."""
    rng = np.random.default_rng(master)
    cases = []
    for i in range(n):
        u = rng.uniform()
        size = 2048 if u < 0.1 else (1024 if u < 0.3 else 512)
        cases.append(dict(
            group="single", kind=str(rng.choice(["hexagonal", "perovskite", "polar"])),
            dose=float(np.exp(rng.uniform(np.log(500), np.log(16000)))), angle=float(rng.uniform(0, 90)),
            shape=size, sigma=float(rng.uniform(1.6, 2.6)), seed=int(rng.integers(2**31)), index=i,
        ))
    n_two = max(6, n // 6)
    for i in range(n_two):
        cases.append(dict(
            group="two_phase", kind="two_phase", dose=float(np.exp(rng.uniform(np.log(1000), np.log(8000)))),
            angle=float(rng.uniform(0, 60)), boundary_width=float(rng.choice([2.0, 3.0, 4.0])),
            grain=str(rng.choice(["square", "hexagonal", "sqrt3", "2x2"])), seed=int(rng.integers(2**31)), index=i,
        ))
    for i in range(n // 4):
        cases.append(dict(
            group="single", kind="honeycomb", dose=float(np.exp(rng.uniform(np.log(500), np.log(16000)))),
            angle=float(rng.uniform(0, 90)), shape=1024 if rng.uniform() < 0.2 else 512,
            sigma=float(rng.uniform(1.6, 2.6)), dim_ratio=float(rng.uniform(0.3, 0.7)),
            displacement=float(rng.uniform(0.05, 0.08)), boundary_angle=float(rng.uniform(0, 180)),
            seed=int(rng.integers(2**31)), index=n + n_two + i,
        ))
    for i in range(n // 6):
        cases.append(dict(
            group="single", kind="grains", dose=float(np.exp(rng.uniform(np.log(500), np.log(16000)))),
            angle=float(rng.uniform(0, 180)), shape=512, sigma=float(rng.uniform(1.6, 2.6)),
            lattice=str(rng.choice(["hexagonal", "square"])), misorientation=float(rng.uniform(10, 45)),
            seed=int(rng.integers(2**31)), index=n + n_two + n // 4 + i,
        ))
    start = n + n_two + n // 4 + n // 6
    for i in range(n // 4):  # single crystals recorded with a slow-scan distortion
        cases.append(dict(
            group="single", kind="scanned", lattice=str(rng.choice(["hexagonal", "perovskite", "polar", "honeycomb"])),
            dose=float(np.exp(rng.uniform(np.log(500), np.log(16000)))), angle=float(rng.uniform(0, 90)),
            shape=1024 if rng.uniform() < 0.2 else 512, sigma=float(rng.uniform(1.6, 2.6)), **_scan_draw(rng),
            seed=int(rng.integers(2**31)), index=start + i,
        ))
    for i in range(max(3, n_two // 2)):  # two-phase images so recorded
        cases.append(dict(
            group="two_phase", kind="two_phase", dose=float(np.exp(rng.uniform(np.log(1000), np.log(8000)))),
            angle=float(rng.uniform(0, 60)), boundary_width=float(rng.choice([2.0, 3.0, 4.0])),
            grain=str(rng.choice(["square", "hexagonal", "sqrt3", "2x2"])), **_scan_draw(rng),
            seed=int(rng.integers(2**31)), index=start + n // 4 + i,
        ))
    return cases


def _scan_draw(rng) -> dict:
    """A slow-scan distortion: drift shear +-3 %, a wobble of 0-1.5 px with a period of 100-600
    lines, line jitter 0-0.3 px (:func:`atomds.datasets.scan_distorted`)."""
    return dict(shear=float(rng.uniform(-0.03, 0.03)), amplitude=float(rng.uniform(0.0, 1.5)),
                period=float(rng.uniform(100, 600)), phase=float(rng.uniform(0, 2 * np.pi)),
                jitter=float(rng.uniform(0.0, 0.3)))


_SCAN_KEYS = ("shear", "amplitude", "period", "phase", "jitter")


def run_case(case: dict) -> dict:
    """Make the image, analyse it with the defaults, score it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import atomds
    from atomds.core.samples import match_positions

    kw = {k: case[k] for k in ("dose", "angle", "seed")}
    if case["kind"] == "grains":  # two grains of one lattice along a sharp boundary at a drawn angle
        kw = dict(dose=case["dose"], seed=case["seed"], shape=case["shape"], sigma=case["sigma"], lattice=case["lattice"],
                  second=case["lattice"], misorientation=case["misorientation"], boundary_angle=case["angle"],
                  boundary_width=0.0)
        make = atomds.datasets.grain_boundary
    elif case["kind"] == "scanned":
        kw.update(shape=case["shape"], sigma=case["sigma"], **{k: case[k] for k in _SCAN_KEYS})
        make = functools.partial(atomds.datasets.scan_distorted, case["lattice"])
    elif case["group"] == "single":
        kw.update(shape=case["shape"], sigma=case["sigma"])
        if case["kind"] == "honeycomb":
            kw.update({k: case[k] for k in ("dim_ratio", "displacement", "boundary_angle")})
        make = {"hexagonal": atomds.datasets.hexagonal, "perovskite": atomds.datasets.perovskite,
                "polar": atomds.datasets.polar, "honeycomb": atomds.datasets.honeycomb}[case["kind"]]
    else:
        kw["boundary_width"] = case["boundary_width"]
        if case["grain"] in ("square", "hexagonal"):
            kw["grain_lattice"] = case["grain"]
        else:  # the matrix lattice with an ordered third (honeycomb) or quarter (kagome) of its sites empty
            kw.update(vacancy_grain=True, vacancy_pattern=case["grain"])
        make = atomds.datasets.two_phase
        if "shear" in case:
            kw.update({k: case[k] for k in _SCAN_KEYS})
            make = functools.partial(atomds.datasets.scan_distorted, "two_phase")
    ds = make(**kw)
    t0 = time.perf_counter()
    try:
        out = atomds.analyze(ds)
    except Exception as exc:  # a failure is a result of the benchmark, reported with its case
        return {**case, "error": f"{type(exc).__name__}: {exc}"}
    res = {**case, "seconds": time.perf_counter() - t0, "atoms": int(out.sizes["atom"]),
           "regions": int(out.sizes.get("region_id", 0)), "clusters": int(out.sizes.get("cluster_id", 0))}
    if case["group"] == "two_phase":
        from sklearn.metrics import adjusted_rand_score

        ps = float(ds.attrs["pixel_size"])
        it, jf = match_positions(np.column_stack([ds["true_x"].values, ds["true_y"].values]),
                                 np.column_stack([out["atom_x"].values, out["atom_y"].values]), 3.0 * ps)
        truth, reg = ds["true_label"].values[it], out["region"].values[jf]
        if case["grain"] == "hexagonal":  # a rotated grain of the matrix's own lattice is the matrix's phase
            truth = np.where(truth == 1, 0, truth)
        band = truth == 2
        f1 = max(2 * (band & (reg == r)).sum() / (band.sum() + (reg == r).sum()) for r in np.unique(reg))
        res.update(ari=float(adjusted_rand_score(truth, reg)), band_f1=float(f1))
    return res


def report(results: list[dict], args) -> str:
    single = [r for r in results if r["group"] == "single"]
    two = [r for r in results if r["group"] == "two_phase"]
    lines = ["## Phases: one when there is one", ""]
    lines.append(f"`nice python benchmarks/bench_phases.py --n {args.n} --workers {args.workers}` on "
                 f"{platform.machine()} ({os.cpu_count()} cores), Python {sys.version.split()[0]}, "
                 f"{time.strftime('%Y-%m-%d')}. Master seed {MASTER_SEED}; every case's seed is listed below.")
    lines.append("")
    ok = [r for r in single if "error" not in r]
    one = sum(r["regions"] == 1 for r in ok)
    lines.append(f"**Single-phase images: {one} of {len(single)} analysed as 1 phase** "
                 f"({len(single) - len(ok)} failed to analyse).")
    lines.append("")
    lines.append("| kind | images | 1 phase | clusters (median, max) | sizes |")
    lines.append("| --- | --- | --- | --- | --- |")
    for kind in ("hexagonal", "perovskite", "polar", "honeycomb", "grains", "scanned"):
        rs = [r for r in ok if r["kind"] == kind]
        if not rs:
            continue
        cl = [r["clusters"] for r in rs]
        sizes = sorted({r["shape"] for r in rs})
        lines.append(f"| {kind} | {len(rs)} | {sum(r['regions'] == 1 for r in rs)} | {int(np.median(cl))}, "
                     f"{max(cl)} | {', '.join(map(str, sizes))} |")
    bad = [r for r in single if "error" in r or r["regions"] != 1]
    if bad:
        lines += ["", "Images not analysed as one phase:", ""]
        for r in bad:
            what = r.get("error") or f"{r['regions']} regions"
            kind = f"{r['kind']} ({r['lattice']}, {_scan_text(r)})" if r["kind"] == "scanned" else r["kind"]
            lines.append(f"- {kind} {r['shape']} px, dose {r['dose']:.0f}, angle {r['angle']:.1f}, "
                         f"sigma {r['sigma']:.2f}, seed {r['seed']}: {what}")
    lines += ["", "Two-phase images (matrix, rotated grain, disordered band):", "",
              "| band width (spacings) | grain | dose | scan | seed | regions | ARI | band F1 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in two:
        head = (f"| {r['boundary_width']:.0f} | {r['grain']} | {r['dose']:.0f} | "
                f"{_scan_text(r) if 'shear' in r else '-'} | {r['seed']} | ")
        if "error" in r:
            lines.append(head + f"error: {r['error']} | | |")
        else:
            lines.append(head + f"{r['regions']} | {r['ari']:.3f} | {r['band_f1']:.2f} |")
    good = [r for r in two if "error" not in r]
    if good:
        lines.append("")
        lines.append(f"ARI >= 0.9 on {sum(r['ari'] >= 0.9 for r in good)} of {len(two)}; band F1 >= 0.8 on "
                     f"{sum(r['band_f1'] >= 0.8 for r in good)} of {len(two)} (min ARI "
                     f"{min(r['ari'] for r in good):.3f}, min F1 {min(r['band_f1'] for r in good):.2f}).")
    lines += ["", "Single-phase seeds (kind, size, seed): " + "; ".join(
        f"{r['kind']} {r['shape']} {r['seed']}" for r in single), ""]
    return "\n".join(lines)


def _scan_text(r: dict) -> str:
    slope = abs(r["shear"]) + 2 * np.pi * r["amplitude"] / r["period"]
    return (f"shear {100 * r['shear']:+.1f} %, wobble {r['amplitude']:.2f} px / {r['period']:.0f} lines, jitter "
            f"{r['jitter']:.2f} px, max shear {100 * slope:.1f} %")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60, help="single-phase images (two-phase: n / 6, at least 6)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    cases = draw_cases(args.n)
    with ProcessPoolExecutor(args.workers) as ex:
        results = list(ex.map(run_case, cases))
    text = report(results, args)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        from bench_find_refine import write_section

        write_section(text, HERE / "RESULTS.md")


if __name__ == "__main__":
    main()
