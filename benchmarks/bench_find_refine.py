"""Benchmark of atom finding and Gaussian refinement against trackpy, scikit-image and Atomap.

Run:  nice python benchmarks/bench_find_refine.py [--quick] [--no-write] [--size 4096] [--no-atomap]

Precision (atomds.core.samples: hexagonal and perovskite lattices at several doses, integrated
counts per column): for each method the recall, the false-positive rate, the position RMSE (px,
2-D) and that RMSE divided by the Cramér-Rao bound, and the throughput in atoms per second.
The bound of each column is computed from the generator's noise-free image (Poisson + Gaussian
read noise, pixel-integrated Gaussian column with unknown position, counts, width and local
background; neighbours known), and the ratio is ``sqrt(mean(dx^2 + dy^2) / mean(crb_x^2 + crb_y^2))``
over the matched columns. Methods:

- ``atomds find+refine``: :func:`atomds.core.find.find_atoms` (when present) then
  :func:`atomds.core.refine.refine_gaussian`;
- ``atomds refine``: refinement alone, from the true positions plus 0.3 px Gaussian noise;
- ``trackpy``: ``trackpy.locate`` (diameter 2 ceil(2 sigma) + 1, separation 0.6 x spacing,
  percentile 10 so that dim columns pass, features with mass below a quarter of the median mass
  dropped);
- ``skimage``: ``skimage.feature.peak_local_max`` on the image smoothed by 1 px, min_distance
  0.4 x spacing, peaks lower than a quarter of the median peak height above the image's 5th
  percentile dropped, then the centre of mass in a disc of 0.4 x spacing
  (:func:`atomds.core.refine.center_of_mass`, vectorised);
- ``atomap``: ``get_atom_positions`` + ``refine_atom_positions_using_center_of_mass`` +
  ``refine_atom_positions_using_2d_gaussian`` on a subset of the atoms (its per-atom cost),
  when Atomap is installed.

Every method gets the generator's column width and spacing where it needs a size (atomds
estimates its own). Speed: a ``--size`` x ``--size`` hexagonal image (spacing 15 px, about 86 000
columns at 4096 px), each method timed in this process, best of ``--repeats`` (the machine is
shared, so the ratios to trackpy measured in the same run matter, not the seconds); peak memory
(maximum resident set size) of atomds find + refine measured in a fresh subprocess.

The "Finding and refinement" section of benchmarks/RESULTS.md is replaced with the tables (other
sections are left as they are).
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
import warnings
from pathlib import Path

import numpy as np

from atomds.core import crb as ccrb
from atomds.core import refine as cref
from atomds.core import samples

SECTION = "## Finding and refinement"
MARGIN = 8.0  # px: precision is scored on the columns this far inside the image

try:
    from atomds.core import find as cfind
except ImportError:  # atom finding not available yet: refinement from jittered true positions only
    cfind = None


# ----------------------------------------------------------------------------------------------
# methods: each takes (image, sigma, spacing) and returns (x, y) in px


def m_atomds(image, sigma, spacing):
    f = cfind.find_atoms(image)
    r = cref.refine_gaussian(image, f.x, f.y)
    return r["x"], r["y"]


def m_trackpy(image, sigma, spacing):
    import trackpy as tp

    tp.quiet()
    diameter = 2 * int(np.ceil(2 * sigma)) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = tp.locate(image, diameter, separation=max(3, round(0.6 * spacing)), percentile=10)
    mass = f["mass"].to_numpy()
    keep = mass > 0.25 * np.median(mass) if mass.size else np.zeros(0, bool)
    return f["x"].to_numpy()[keep], f["y"].to_numpy()[keep]


def m_skimage(image, sigma, spacing):
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max

    sm = gaussian_filter(np.asarray(image, float), 1.0)
    base = np.percentile(sm, 5)
    pk = peak_local_max(sm, min_distance=max(1, int(0.4 * spacing)), exclude_border=False)
    h = sm[pk[:, 0], pk[:, 1]] - base
    pk = pk[h > 0.25 * np.median(h)] if h.size else pk
    x, y = cref.center_of_mass(image, pk[:, 1].astype(float), pk[:, 0].astype(float), window=0.4 * spacing)
    return x, y


def atomap_subset(image, sigma, spacing, n_atoms, true_xy):
    """Atomap on the ``n_atoms`` found atoms nearest the image centre: positions and seconds per atom."""
    import logging

    logging.getLogger("atomap").setLevel(logging.ERROR)
    logging.getLogger("hyperspy").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import atomap.api as am
        import hyperspy.api as hs

        hs.set_log_level("ERROR")
        img = np.asarray(image, float)
        img = img - min(img.min(), 0.0)  # Atomap refuses negative pixels (read noise)
        sig = hs.signals.Signal2D(img)
        t0 = time.perf_counter()
        pos = np.asarray(am.get_atom_positions(sig, separation=max(2, int(0.4 * spacing))))
        t_find = time.perf_counter() - t0
        c = np.array(img.shape[::-1]) / 2.0
        order = np.argsort(np.hypot(pos[:, 0] - c[0], pos[:, 1] - c[1]))[:n_atoms]
        sub = am.Sublattice(pos[order], image=img)
        sub.find_nearest_neighbors()
        t0 = time.perf_counter()
        sub.refine_atom_positions_using_center_of_mass(show_progressbar=False)
        sub.refine_atom_positions_using_2d_gaussian(show_progressbar=False)
        t_fit = time.perf_counter() - t0
    return np.asarray(sub.x_position), np.asarray(sub.y_position), t_find / max(len(pos), 1), t_fit / len(order)


# ----------------------------------------------------------------------------------------------
# scoring


def _interior(x, y, shape, margin):
    ny, nx = shape
    return (x >= margin) & (x <= nx - 1 - margin) & (y >= margin) & (y <= ny - 1 - margin)


def score(sample, x, y, bounds, margin=MARGIN):
    """Recall, false positives, RMSE and RMSE/CRB over the columns at least ``margin`` px inside.

    All found positions are matched to all true ones (one-to-one, within a third of the nearest
    true spacing); recall counts the interior true columns, false positives the interior found
    positions left unmatched (trackpy drops features at the border, so the border is left out).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    txy = np.column_stack([sample.x, sample.y])
    fxy = np.column_stack([x, y])
    md = samples.default_max_distance(txy)
    i_t, i_f = samples.match_positions(txy, fxy, md)
    in_t = _interior(sample.x, sample.y, sample.shape, margin)
    in_f = _interior(x, y, sample.shape, margin)
    matched_f = np.zeros(fxy.shape[0], bool)
    matched_f[i_f] = True
    keep = in_t[i_t]
    i_t, i_f = i_t[keep], i_f[keep]
    err = txy[i_t] - fxy[i_f]
    return {
        "recall": i_t.size / max(int(in_t.sum()), 1),
        "false_positive_rate": float((in_f & ~matched_f).sum()) / max(int(in_f.sum()), 1),
        "rmse_px": float(np.sqrt((err**2).sum(axis=1).mean())) if i_t.size else float("nan"),
        "crb_ratio_by_label": (crb_ratios(err, bounds[0][i_t], bounds[1][i_t], sample.label[i_t])
                               if bounds is not None else {}),
    }


def crb_ratios(err, bx, by, label):
    """sqrt(mean |error|^2 / mean(crb_x^2 + crb_y^2)) per label."""
    d2 = (err**2).sum(axis=1)
    out = {}
    for lab in np.unique(label):
        m = label == lab
        out[int(lab)] = float(np.sqrt(d2[m].mean() / (bx[m] ** 2 + by[m] ** 2).mean()))
    return out


def make_sample(kind, dose, size, seed):
    if kind == "hexagonal":
        return samples.hexagonal_sample(shape=(size, size), dose=dose, seed=seed)
    return samples.perovskite_sample(shape=(size, size), dose=dose, seed=seed)


def timed(f, repeats=1):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def fmt_ratio(d):
    return " / ".join(f"{v:.2f}" for _, v in sorted(d.items())) if d else "-"


def fmt_pct(v):
    return f"{100 * v:.2f}"


# ----------------------------------------------------------------------------------------------
# child process: peak memory of atomds find + refine


def _hwm_mb() -> float:
    """Peak resident set size of this process (VmHWM, MB; ru_maxrss survives exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(path: str, what: str) -> None:
    image = np.load(path)
    base = _hwm_mb()
    t = time.perf_counter()
    if what == "find+refine":
        f = cfind.find_atoms(image)
        x, y = f.x, f.y
    else:  # refine from the true positions (stored next to the image) + 0.3 px noise
        xy = np.load(path.replace(".npy", "_xy.npy"))
        rng = np.random.default_rng(0)
        ny, nx = image.shape
        x = np.clip(xy[0] + rng.normal(0, 0.3, xy.shape[1]), -0.5, nx - 0.5)
        y = np.clip(xy[1] + rng.normal(0, 0.3, xy.shape[1]), -0.5, ny - 0.5)
    r = cref.refine_gaussian(image, x, y)
    dt = time.perf_counter() - t
    peak = _hwm_mb()
    print(json.dumps({"seconds": dt, "peak_mb": peak, "base_mb": base, "n": int(r["x"].size)}))


def run_child(path: str, what: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", what, "--image", path]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        print(f"memory child failed: {exc}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------


def warm_up(have):
    """Compile trackpy's numba kernels (when numba is there) outside the timings."""
    if have["trackpy"]:
        s = samples.hexagonal_sample(shape=(64, 64), seed=0)
        m_trackpy(s.image, 2.0, 12.0)


def precision_tables(args, lines):
    doses = [250.0, 4000.0] if args.quick else [250.0, 1000.0, 4000.0, 16000.0]
    size = 256 if args.quick else 512
    have = {"trackpy": _has("trackpy"), "skimage": True, "atomap": _has("atomap") and not args.no_atomap}
    warm_up(have)
    lines += [
        f"### Precision ({size} x {size} px, sigma 2 px; hexagonal spacing 12 px; perovskite A-A 16 px, "
        "B at 40 % of A's peak)",
        "",
        "RMSE/CRB: per sublattice (A / B for the perovskite). atoms/s: found atoms per second of "
        "finding + refinement (refinement alone for `atomds refine`; the Gaussian step alone for Atomap).",
        "",
        f"Scored on the columns at least {MARGIN:.0f} px inside the image (trackpy drops border features).",
        "",
        "| sample | dose | method | recall % | false pos. % | RMSE px | RMSE/CRB | atoms/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for kind in ("hexagonal", "perovskite"):
        for dose in doses:
            s = make_sample(kind, dose, size, seed=3)
            bounds = ccrb.crb_from_expected(s.expected, s.x, s.y, s.counts, s.sigma, read_noise=s.params["read_noise"])
            sig, spacing = float(s.params["sigma"]), float(s.params["spacing"])
            if kind == "perovskite":
                spacing = spacing / np.sqrt(2.0)
            methods = []
            if cfind is not None:
                methods.append(("atomds find+refine", lambda s=s, sig=sig, spacing=spacing: m_atomds(s.image, sig, spacing)))
            rng = np.random.default_rng(1)
            x0 = np.clip(s.x + rng.normal(0, 0.3, s.x.size), -0.5, size - 0.5)
            y0 = np.clip(s.y + rng.normal(0, 0.3, s.y.size), -0.5, size - 0.5)

            def refine_only(s=s, x0=x0, y0=y0):
                r = cref.refine_gaussian(s.image, x0, y0)
                return r["x"], r["y"]

            methods.append(("atomds refine (truth + 0.3 px)", refine_only))
            if have["trackpy"]:
                methods.append(("trackpy.locate", lambda s=s, sig=sig, spacing=spacing: m_trackpy(s.image, sig, spacing)))
            methods.append(("skimage peaks + CoM", lambda s=s, sig=sig, spacing=spacing: m_skimage(s.image, sig, spacing)))
            for name, f in methods:
                dt, (x, y) = timed(f)
                sc = score(s, x, y, bounds)
                lines.append(
                    f"| {kind} | {dose:.0f} | {name} | {fmt_pct(sc['recall'])} | {fmt_pct(sc['false_positive_rate'])} "
                    f"| {sc['rmse_px']:.4f} | {fmt_ratio(sc['crb_ratio_by_label'])} | {len(x) / dt:,.0f} |"
                )
                print(lines[-1], flush=True)
            if have["atomap"]:
                n_sub = 40 if args.quick else 120
                try:
                    ax, ay, _, t_atom = atomap_subset(s.image, sig, spacing, n_sub, None)
                    txy = np.column_stack([s.x, s.y])
                    axy = np.column_stack([ax, ay])
                    i_t, i_f = samples.match_positions(txy, axy, 0.3 * spacing)
                    d2 = ((txy[i_t] - axy[i_f]) ** 2).sum(axis=1)
                    rat = crb_ratios(txy[i_t] - axy[i_f], bounds[0][i_t], bounds[1][i_t], s.label[i_t])
                    lines.append(
                        f"| {kind} | {dose:.0f} | atomap ({len(ax)} central atoms) | - | - | {np.sqrt(d2.mean()):.4f} "
                        f"| {fmt_ratio(rat)} | {1.0 / t_atom:,.0f} |"
                    )
                    print(lines[-1], flush=True)
                except Exception as exc:  # noqa: BLE001 - an optional baseline must not stop the benchmark
                    print(f"atomap failed: {exc!r}", file=sys.stderr)
    lines.append("")
    return have


def _in_hole(sample, x, y) -> int:
    """Found positions matching no true column that lie in the sample's hole (vacuum or film)."""
    txy = np.column_stack([sample.x, sample.y])
    fxy = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    _, i_f = samples.match_positions(txy, fxy, samples.default_max_distance(txy))
    un = np.setdiff1d(np.arange(fxy.shape[0]), i_f)
    iy = np.clip(np.round(fxy[un, 1]).astype(int), 0, sample.shape[0] - 1)
    ix = np.clip(np.round(fxy[un, 0]).astype(int), 0, sample.shape[1] - 1)
    return int(sample.vacuum_mask[iy, ix].sum())


def lattice_table(args, lines, have):
    """Atoms found where there is no lattice: a vacuum hole ringed by amorphous blobs, a wide film."""
    quick = args.quick
    doses = [250.0, 1000.0] if quick else [250.0, 500.0, 1000.0, 4000.0]
    cases = [
        ("hexagonal 256 px, hole r 0.15", 2 if quick else 8,
         lambda d, k: samples.hexagonal_sample(dose=d, vacuum=True, seed=k)),
        ("two-phase 512 px, hole r 0.11", 1 if quick else 4,
         lambda d, k: samples.two_phase_sample(dose=d, vacuum=True, seed=k)),
        ("hexagonal 512 px, film r 0.4 (rim 8 spacings wide)", 1 if quick else 2,
         lambda d, k: samples.hexagonal_sample(shape=(512, 512), dose=d, vacuum=True, vacuum_radius=0.4,
                                               vacuum_center=(0.5, 0.5), seed=k)),
        ("nanoparticle 512 px on amorphous support (hexagonal)", 1 if quick else 2,
         lambda d, k: samples.nanoparticle_sample(dose=d, seed=k)),
        ("nanoparticle 512 px on amorphous support (square)", 1 if quick else 2,
         lambda d, k: samples.nanoparticle_sample(dose=d, lattice="square", seed=k)),
    ]
    lines += [
        "### Regions without a lattice",
        "",
        "Samples with a vacuum hole ringed by dim, broad amorphous blobs (0.55-1 of the hole radius, 3 per "
        "spacing^2, 10-35 % of a column's counts, 1.5-2.5x its width), and a crystalline particle (radius 0.3 "
        "of the image) on an amorphous film of such blobs (5-25 % of a column's counts) covering the whole image "
        "(`atomds.datasets.nanoparticle`). `in hole`: found positions that match no column and lie in the hole "
        "or outside the particle, summed over the seeds (0 .. n-1). atomds with its default "
        "`find_atoms()` and with `lattice_check=False`; trackpy and scikit-image as in the precision table.",
        "",
        "| sample | dose | seeds | atomds in hole | atomds min recall % | atomds max false pos. % "
        "| lattice_check=False in hole | trackpy in hole | skimage in hole |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n_seeds, make in cases:
        for dose in doses:
            tot = {"on": 0, "off": 0, "tp": 0, "sk": 0}
            rec, fp = 1.0, 0.0
            for k in range(n_seeds):
                s = make(dose, k)
                sig, spacing = float(s.params["sigma"]), float(s.params["spacing"])
                f = cfind.find_atoms(s.image)
                tot["on"] += _in_hole(s, f.x, f.y)
                sc = score(s, f.x, f.y, None)
                rec, fp = min(rec, sc["recall"]), max(fp, sc["false_positive_rate"])
                g = cfind.find_atoms(s.image, lattice_check=False)
                tot["off"] += _in_hole(s, g.x, g.y)
                if have["trackpy"]:
                    tot["tp"] += _in_hole(s, *m_trackpy(s.image, sig, spacing))
                tot["sk"] += _in_hole(s, *m_skimage(s.image, sig, spacing))
            tp = str(tot["tp"]) if have["trackpy"] else "-"
            lines.append(f"| {name} | {dose:.0f} | {n_seeds} | {tot['on']} | {fmt_pct(rec)} | {fmt_pct(fp)} "
                         f"| {tot['off']} | {tp} | {tot['sk']} |")
            print(lines[-1], flush=True)
    lines.append("")


def speed_table(args, lines, have):
    size = 1024 if args.quick else args.size
    s = samples.hexagonal_sample(shape=(size, size), dose=2000.0, spacing=15.0, seed=7)
    image = s.image.astype(np.float32)
    n_true = s.x.size
    sig, spacing = 2.0, 15.0
    lines += [
        f"### Speed: {size} x {size} px, {n_true:,} columns (hexagonal, spacing 15 px, sigma 2 px, dose 2000)",
        "",
        f"Best of {args.repeats} in one process; ratio = seconds / trackpy.locate's seconds in this run.",
        "",
        "| step | s | atoms | atoms/s | ratio to trackpy.locate |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = []
    t_tp = None
    if have["trackpy"]:
        t_tp, (x, y) = timed(lambda: m_trackpy(image, sig, spacing), args.repeats)
        rows.append(("trackpy.locate (centroids, no fit)", t_tp, len(x)))
    rng = np.random.default_rng(0)
    x0 = np.clip(s.x + rng.normal(0, 0.3, n_true), -0.5, size - 0.5)
    y0 = np.clip(s.y + rng.normal(0, 0.3, n_true), -0.5, size - 0.5)
    if cfind is not None:
        t_f, f = timed(lambda: cfind.find_atoms(image), args.repeats)
        rows.append(("atomds find_atoms", t_f, len(f)))
        t_r, r = timed(lambda: cref.refine_gaussian(image, f.x, f.y), args.repeats)
        rows.append(("atomds refine_gaussian (from found seeds)", t_r, r["x"].size))
        rows.append(("atomds find + refine", t_f + t_r, r["x"].size))
    t_r0, r0 = timed(lambda: cref.refine_gaussian(image, x0, y0), args.repeats)
    rows.append(("atomds refine_gaussian (truth + 0.3 px)", t_r0, r0["x"].size))
    t_sk, (x, y) = timed(lambda: m_skimage(image, sig, spacing), 1)
    rows.append(("skimage peak_local_max + CoM", t_sk, len(x)))
    atomap_rate = None
    if have["atomap"]:
        try:
            _, _, _, t_atom = atomap_subset(image, sig, spacing, 30 if args.quick else 100, None)
            atomap_rate = 1.0 / t_atom
            rows.append(("Atomap 2-D Gaussian refinement (per atom, extrapolated)", t_atom * n_true, n_true))
        except Exception as exc:  # noqa: BLE001
            print(f"atomap failed: {exc!r}", file=sys.stderr)
    for name, t, n in rows:
        ratio = f"{t / t_tp:.2f}" if t_tp else "-"
        lines.append(f"| {name} | {t:.2f} | {n:,} | {n / t:,.0f} | {ratio} |")
        print(lines[-1], flush=True)
    lines.append("")
    if atomap_rate is not None:
        lines.append(
            f"Refinement throughput: atomds {r0['x'].size / t_r0:,.0f} atoms/s vs Atomap {atomap_rate:,.0f} atoms/s "
            f"= {r0['x'].size / t_r0 / atomap_rate:,.0f}x."
        )
        lines.append("")
    # peak memory in fresh processes
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.npy")
        np.save(path, image)
        np.save(path.replace(".npy", "_xy.npy"), np.stack([s.x, s.y]))
        mem = []
        if cfind is not None:
            mem.append(("atomds find + refine", run_child(path, "find+refine")))
        mem.append(("atomds refine (truth + 0.3 px)", run_child(path, "refine")))
    lines += ["| fresh process | s | peak RSS MB | RSS after imports + image MB |", "|---|---:|---:|---:|"]
    for name, m in mem:
        if m:
            lines.append(f"| {name} | {m['seconds']:.2f} | {m['peak_mb']:.0f} | {m['base_mb']:.0f} |")
            print(lines[-1], flush=True)
    lines.append("")


API_SECTION = "## Finding and refinement through the public API"


def m_trackpy_api(image, spacing):
    """``trackpy.locate`` as the issue times it: diameter ~0.8 and separation 0.6 of the nearest-column distance."""
    import trackpy as tp

    tp.quiet()
    diameter = 2 * int(round(0.4 * spacing)) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.locate(image, diameter, separation=0.6 * spacing)


def api_speed_section(args) -> str:
    """Median of interleaved runs of ``ds.lcx.find_atoms().lcx.refine()`` and ``trackpy.locate``; cold ``atomds analyze``."""
    import atomds
    from atomds.params import step_params

    size = 1024 if args.quick else args.size
    s = samples.hexagonal_sample(shape=(size, size), dose=2000.0, spacing=15.0, seed=7)
    image = s.image.astype(np.float32)
    ds = atomds.from_array(image, pixel_size=0.25, units="Å")
    out = ds.lcx.find_atoms().lcx.refine()  # warm-up: numba compiles, FFT plans
    m_trackpy_api(image, 15.0)
    t_a, t_t = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = ds.lcx.find_atoms().lcx.refine()
        t1 = time.perf_counter()
        f = m_trackpy_api(image, 15.0)
        t2 = time.perf_counter()
        t_a.append(t1 - t0)
        t_t.append(t2 - t1)
        print(f"run: atomds {t1 - t0:.2f} s, trackpy {t2 - t1:.2f} s", flush=True)
    p = step_params(out, "find_atoms")
    sc = samples.score_positions(np.c_[s.x, s.y], np.c_[out.atom_x.values, out.atom_y.values] / 0.25, shape=s.shape)
    med_a, med_t = float(np.median(t_a)), float(np.median(t_t))
    lines = [
        API_SECTION, "",
        f"`nice python benchmarks/bench_find_refine.py --api-speed` on {platform.machine()} with {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"{size} x {size} px hexagonal lattice, {s.x.size:,} columns (spacing 15 px, sigma 2 px, dose 2000); "
        f"`ds.lcx.find_atoms().lcx.refine()` (defaults: contrast auto, residual passes) against "
        f"`trackpy.locate(image, {2 * int(round(0.4 * 15.0)) + 1}, separation=9)` in the same process, "
        f"median of {args.runs} interleaved runs after one warm-up run of each.",
        "",
        "| method | median s | runs s | found | ratio to trackpy |",
        "|---|---:|---|---:|---:|",
        f"| atomds find_atoms + refine (accessor) | {med_a:.2f} | {', '.join(f'{t:.2f}' for t in t_a)} | "
        f"{out.sizes['atom']:,} | {med_a / med_t:.2f} |",
        f"| trackpy.locate | {med_t:.2f} | {', '.join(f'{t:.2f}' for t in t_t)} | {len(f):,} | 1.00 |",
        "",
        f"atomds: recall {sc['recall'] * 100:.2f} %, false positives {sc['false_positive_rate'] * 100:.2f} %; contrast "
        f"decided {p.get('contrast')} (skewness {p.get('contrast_auto', {}).get('skewness')}); residual passes "
        f"{p.get('residual')}.",
        "",
    ]
    if not args.no_cold:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "image.npy")
            np.save(path, image)
            cmd = [str(Path(sys.executable).with_name("atomds")), "analyze", path, "-o", os.path.join(tmp, "out.nc"),
                   "--pixel-size", "0.25", "--units", "Å", "--no-progress"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            cold = time.perf_counter() - t0
        status = "ok" if done.returncode == 0 else f"failed ({done.stderr.strip().splitlines()[-1:]})"
        lines += [f"Cold `atomds analyze image.npy -o out.nc --pixel-size 0.25 --units Å` on this image in a fresh process "
                  f"(imports, numba compilation, every stage): {cold:.1f} s ({status}).", ""]
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def _has(mod):
    try:
        __import__(mod)
        return True
    except Exception:  # noqa: BLE001
        return False


def write_section(text: str, path: Path) -> None:
    """Replace the section of ``path`` whose heading is the first line of ``text`` (append it if new)."""
    section = text.splitlines()[0]
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        nxt = old.find("\n## ", start + len(section))
        tail = "" if nxt < 0 else old[nxt:]
        new = old[:start] + text.rstrip("\n") + "\n" + tail
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".RESULTS.", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small images, two doses (CI size)")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--size", type=int, default=4096, help="side of the speed image in px")
    p.add_argument("--repeats", type=int, default=2, help="repeats of each timed step (best is kept)")
    p.add_argument("--no-atomap", action="store_true", help="skip Atomap even when installed")
    p.add_argument("--skip-speed", action="store_true", help="precision tables only")
    p.add_argument("--api-speed", action="store_true",
                   help="only the public-API speed section (interleaved runs against trackpy, cold analyze)")
    p.add_argument("--runs", type=int, default=5, help="interleaved runs of the public-API speed section")
    p.add_argument("--no-cold", action="store_true", help="skip the cold `atomds analyze` run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.image, args.child)
        return
    if args.api_speed:
        text = api_speed_section(args)
        if not args.no_write and not args.quick:
            write_section(text, Path(__file__).with_name("RESULTS.md"))
        return
    lines = [SECTION, ""]
    lines.append(
        f"`nice python benchmarks/bench_find_refine.py{' --quick' if args.quick else ''}` on {platform.machine()} "
        f"with {os.cpu_count()} cores shared with other work, Python {sys.version.split()[0]}, "
        f"{time.strftime('%Y-%m-%d')}. Atom finding: {'atomds.core.find' if cfind else 'not available (refinement only)'}."
    )
    lines.append("")
    have = precision_tables(args, lines)
    if cfind is not None:
        lattice_table(args, lines, have)
    if not args.skip_speed:
        speed_table(args, lines, have)
    text = "\n".join(lines)
    if not args.no_write:
        write_section(text, Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()
