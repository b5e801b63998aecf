"""Benchmark of overlapping columns and atom counting (issue 11, items 4-5).

Run:  nice python benchmarks/bench_counting.py [--quick] [--no-write] [--skip-speed]

Samples: ``atomds.datasets.particle`` (square lattice, 16 px spacing, columns of 1-15 atoms,
cross-section ``dose * n * (1 - 0.02 (n - 1))``, Poisson noise + read noise 1, smooth background 5 %
of a one-atom peak), "random" thickness (thin beside thick) and "dome" thickness (a sphere's chord;
thicknesses absent), plus an unlike sample: hexagonal lattice at 12 px spacing; and hexagonal lattices
that fill the frame (section 3b).

1. Joint fit precision: refinement (``refine_gaussian``, joint="auto") from the true positions
   jittered by 0.3 px, at column widths 0.14 / 0.22 / 0.28 / 0.30 of the spacing, 4000 counts per
   atom: position RMSE against the joint model's Cramér-Rao bound (``atomds.core.crb.crb_joint``
   at the true parameters), std(error / reported error), cross-section error RMS(error /
   sqrt(counts)) and RMS(error / CRB of N); time of the joint and of the independent fits
   (joint=False) on the same image.
2. Recall: through the public API (``find_atoms`` -> ``refine`` with ``find_missing="auto"``),
   columns matched within a third of the spacing, false columns, columns added from the residual;
   also from seeds that lack half of the one-atom columns (``with_atoms``).
3. Counting: the whole pipeline (``find_atoms().refine().cross_sections().count_atoms()``),
   fraction of ALL true columns counted exactly (a missed column counts as wrong), number of ICL
   components against the thicknesses present, at 1000 / 2000 / 4000 / 8000 counts per atom.
3b. A lattice filling the frame (3.6 and 4.0 widths apart, no vacuum): median counts / truth, width,
   z of the counts, position RMSE against the reported errors, through the public API.
4. Speed: ``strain`` + ``polarization`` + ``cross_sections`` against ``find_atoms`` on a 4096^2
   polar image (:func:`bench_physics.speed_rows`, the same measurement as the physical maps').

The "Overlapping columns and atom counting" section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import atomds
from atomds.core.crb import crb_joint
from atomds.core.refine import refine_gaussian
from atomds.core.samples.particle import particle_sample
from atomds.core.samples.scoring import match_positions

sys.path.insert(0, str(Path(__file__).parent))
from bench_find_refine import write_section  # noqa: E402  (one writer of RESULTS.md sections)

SECTION = "## Overlapping columns and atom counting"
#: Matching radius, fraction of the spacing.
MATCH_FRACTION = 1.0 / 3.0


def precision_rows(widths, seeds, shape):
    rows = []
    for width in widths:
        ex, cb, zs, dn, cn, t_joint, t_indep, bf, bk = [], [], [], [], [], [], [], [], []
        for seed in seeds:
            s = particle_sample(shape=shape, width=width, seed=seed)
            rng = np.random.default_rng(seed)
            x0, y0 = s.x + rng.normal(0, 0.3, s.n_atoms), s.y + rng.normal(0, 0.3, s.n_atoms)
            t0 = time.perf_counter()
            f = refine_gaussian(s.image, x0, y0)
            t_joint.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            refine_gaussian(s.image, x0, y0, joint=False)
            t_indep.append(time.perf_counter() - t0)
            cx, cy, cnn = crb_joint(s.image.shape, s.x, s.y, s.counts, float(s.sigma[0]), background=s.background,
                                    read_noise=1.0)
            # the N bound of a model that knew the width and the background (no fit can do better)
            cnk = crb_joint(s.image.shape, s.x, s.y, s.counts, float(s.sigma[0]), background=s.background,
                            read_noise=1.0, known=("width", "background"))[2]
            bf.append(cnn / np.sqrt(s.counts))
            bk.append(cnk / np.sqrt(s.counts))
            ex += [f["x"] - s.x, f["y"] - s.y]
            cb += [cx, cy]
            zs += [(f["x"] - s.x) / f["x_err"], (f["y"] - s.y) / f["y_err"]]
            dn.append((f["intensity"] - s.counts) / np.sqrt(s.counts))
            cn.append((f["intensity"] - s.counts) / cnn)
        e, c, z = np.concatenate(ex), np.concatenate(cb), np.concatenate(zs)
        rmse, crb = float(np.sqrt(np.mean(e**2))), float(np.sqrt(np.mean(c**2)))
        d, q = np.concatenate(dn), np.concatenate(cn)
        b_full, b_known = (float(np.sqrt(np.nanmean(np.concatenate(b) ** 2))) for b in (bf, bk))
        rows.append(f"| {width:.2f} | {f['joint'].mean():.2f} | {rmse:.4f} | {crb:.4f} | {rmse / crb:.2f} | "
                    f"{np.std(z):.2f} | {np.sqrt(np.mean(d**2)):.2f} | {np.sqrt(np.mean(q**2)):.2f} | "
                    f"{b_full:.2f} / {b_known:.2f} | "
                    f"{np.mean(d):+.2f} | {np.median(t_joint):.2f} | {np.median(t_indep):.2f} |")
    return rows


def _matched(true_xy, found_xy, spacing):
    it, jf = match_positions(true_xy, found_xy, MATCH_FRACTION * spacing)
    return it, jf


def recall_rows(cases, seeds, shape):
    rows = []
    for label, kw in cases:
        n_true = n_found = n_false = n_added = 0
        n_true_s = n_found_s = n_false_s = n_added_s = 0
        for seed in seeds:
            ds = atomds.datasets.particle(shape=shape, seed=seed, **kw)
            ps, sp = ds.attrs["pixel_size"], ds.attrs["sample_spacing_px"]
            t = np.column_stack([ds.true_x.values, ds.true_y.values]) / ps
            out = ds.lcx.find_atoms().lcx.refine()
            it, _ = _matched(t, np.column_stack([out.atom_x.values, out.atom_y.values]) / ps, sp)
            n_true += t.shape[0]
            n_found += it.size
            n_false += out.sizes["atom"] - it.size
            n_added += int(out.found_in_residual.sum()) if "found_in_residual" in out else 0
            # seeds lacking half of the one-atom columns
            rng = np.random.default_rng(seed)
            keep = (ds.true_label.values > 1) | (rng.random(t.shape[0]) < 0.5)
            o2 = ds.lcx.with_atoms(ds.true_x.values[keep], ds.true_y.values[keep]).lcx.refine()
            it2, _ = _matched(t, np.column_stack([o2.atom_x.values, o2.atom_y.values]) / ps, sp)
            n_true_s += t.shape[0]
            n_found_s += it2.size
            n_false_s += o2.sizes["atom"] - it2.size
            n_added_s += int(o2.found_in_residual.sum()) if "found_in_residual" in o2 else 0
        rows.append(f"| {label} | found | {n_true} | {100 * n_found / n_true:.2f} % | {n_false} | {n_added} |")
        rows.append(f"| {label} | seeds without half the 1-atom columns | {n_true_s} | "
                    f"{100 * n_found_s / n_true_s:.2f} % | {n_false_s} | {n_added_s} |")
    return rows


def counting_rows(cases, doses, seeds, shape):
    rows = []
    for label, kw in cases:
        for dose in doses:
            exact, total, ks, present, times = 0, 0, [], [], []
            for seed in seeds:
                ds = atomds.datasets.particle(shape=shape, dose=dose, seed=seed, **kw)
                ps, sp = ds.attrs["pixel_size"], ds.attrs["sample_spacing_px"]
                t0 = time.perf_counter()
                out = ds.lcx.find_atoms().lcx.refine().lcx.cross_sections().lcx.count_atoms()
                times.append(time.perf_counter() - t0)
                t = np.column_stack([ds.true_x.values, ds.true_y.values]) / ps
                it, jf = _matched(t, np.column_stack([out.atom_x.values, out.atom_y.values]) / ps, sp)
                got = np.full(t.shape[0], -1)
                got[it] = out.atoms_in_column.values[jf]
                exact += int(np.sum(got == ds.true_label.values))
                total += t.shape[0]
                ks.append(json.loads(out.attrs["count_atoms_params"])["n_components"])
                present.append(int(np.unique(ds.true_label.values).size))
            rows.append(f"| {label} | {dose:.0f} | {total} | {100 * exact / total:.1f} % | "
                        f"{', '.join(map(str, ks))} | {', '.join(map(str, present))} | {np.median(times):.1f} |")
    return rows


def filled_rows(cases, seeds, shape):
    """Counts and width where a lattice fills the frame (no vacuum fixes the background): through the
    public API, columns matched within a third of the spacing, those 20 px clear of the border and
    fitted (``fit_ok``)."""
    from atomds.core.samples import hexagonal_sample

    rows = []
    for spacing, dose in cases:
        for seed in seeds:
            s = hexagonal_sample(shape=(shape, shape), spacing=spacing, sigma=2.0, dose=dose, seed=seed)
            ds = atomds.from_array(s.image.astype(np.float32), pixel_size=0.1, units="Å")
            t0 = time.perf_counter()
            r = ds.lcx.find_atoms().lcx.refine()
            dt = time.perf_counter() - t0
            x, y = r.atom_x.values / 0.1, r.atom_y.values / 0.1
            it, ic = _matched(np.column_stack([s.x, s.y]), np.column_stack([x, y]), spacing)
            inner = (s.x[it] > 20) & (s.x[it] < shape - 20) & (s.y[it] > 20) & (s.y[it] < shape - 20)
            keep = inner & r.fit_ok.values[ic]
            a, b = it[keep], ic[keep]
            n, t = r.intensity.values[b], s.counts[a]
            z = (n - t) / r.intensity_err.values[b]
            err = np.hypot(x[b] - s.x[a], y[b] - s.y[a])
            rep = np.hypot(r.x_err.values[b], r.y_err.values[b]) / 0.1
            rows.append(f"| {spacing / 2.0:.1f} | {dose:.0f} | {seed} | {it.size / s.x.size:.3f} | {np.median(n / t):.3f} | "
                        f"{np.nanmedian(r.sigma.values[b]) / 0.1:.3f} | {np.median(z):.2f} | {np.std(z):.2f} | "
                        f"{np.sqrt(np.mean(err ** 2) / np.mean(rep ** 2)):.2f} | {dt:.1f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, small images")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--skip-speed", action="store_true", help="no 4096^2 speed run")
    p.add_argument("--size", type=int, default=4096, help="side of the speed image in px")
    a = p.parse_args(argv)
    seeds = [0] if a.quick else [0, 1]
    shape = 256 if a.quick else 384
    lines = [SECTION, "",
             f"`nice python benchmarks/bench_counting.py{' --quick' if a.quick else ''}` on {platform.machine()} with "
             f"{os.cpu_count()} cores (shared with other work), Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}. Particles {shape}^2 px, seeds {seeds}.", ""]
    lines += ["### Joint fit: precision against the joint Cramér-Rao bound (4000 counts per atom, random thickness)", "",
              "| width / spacing | fitted jointly | position RMSE (px) | joint CRB (px) | ratio | std(err / x_err) | "
              "RMS(N err / sqrt(counts)) | RMS(N err / CRB_N) | RMS(CRB_N / sqrt(counts)): this model / width and "
              "background known | mean N err / sqrt(counts) | joint fit (s) | "
              "independent fits (s) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += precision_rows([0.14, 0.22, 0.28, 0.30], seeds, shape)
    lines += ["", "The Poisson limit sqrt(counts) counts only a column's own shot noise. Where columns overlap, "
              "the bound of the counts N rises above it even for a model that knew the width and the background "
              "(`crb_joint(..., known=('width', 'background'))`): neighbours' counts share pixels. A fit that "
              "must estimate them is bounded by the first figure; RMS(N err / CRB_N) shows how close the joint fit "
              "comes to it."]
    rec_cases = [("square 16 px, width 0.28, random", dict(width=0.28)),
                 ("square 16 px, width 0.30, dome", dict(width=0.30, thickness="dome")),
                 ("hexagonal 12 px, width 0.25, random (unlike)", dict(width=0.25, lattice="hexagonal", spacing=12.0))]
    lines += ["", "### Recall of overlapping columns (public API, `find_missing='auto'`)", "",
              "| sample | seeds | true columns | recall | false columns | added from the residual |",
              "|---|---|---:|---:|---:|---:|"]
    lines += recall_rows(rec_cases, seeds, shape)
    cnt_cases = [("square, width 0.22, random", dict(width=0.22)),
                 ("square, width 0.22, dome", dict(width=0.22, thickness="dome")),
                 ("square, width 0.28, random", dict(width=0.28)),
                 ("hexagonal 12 px, width 0.25, dome (unlike)", dict(width=0.25, lattice="hexagonal", spacing=12.0,
                                                                      thickness="dome"))]
    fill_cases = [(7.2, 20000.0), (7.2, 2000.0), (8.0, 2000.0)]
    lines += ["", "### A lattice filling the frame: counts and width (public API, no vacuum)", "",
              f"`hexagonal_sample(shape=({400 if not a.quick else 200}, ...), sigma=2.0 px, background 10 % of the "
              "peak)`, `find_atoms().refine()`, the columns 20 px clear of the border. With no vacuum, the counts "
              "rest on the lattice's modulation alone, and the shared width carries their common error.", "",
              "| spacing / width | counts per column | seed | recall | counts / truth (median) | width (px, truth 2.0) | "
              "median z of counts | std z of counts | RMS position error / RMS reported | find + refine (s) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += filled_rows(fill_cases[:1] if a.quick else fill_cases, seeds, 200 if a.quick else 400)
    doses = [4000.0] if a.quick else [1000.0, 2000.0, 4000.0, 8000.0]
    lines += ["", "### Atom counting: all true columns counted exactly (a missed column is wrong)", "",
              "| sample | counts per atom | columns | exact | ICL components per seed | thicknesses present | "
              "pipeline (s) |", "|---|---:|---:|---:|---|---|---:|"]
    lines += counting_rows(cnt_cases, doses, seeds, shape)
    if not a.skip_speed:
        from bench_physics import speed_rows

        lines += ["", "### Speed: physical maps against finding (4096^2 polar image)", "",
                  "| image | finding | maps | ratio |", "|---|---|---|---:|"]
        lines += speed_rows(1024 if a.quick else a.size, 1 if a.quick else 2)
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        write_section(text, Path(__file__).parent / "RESULTS.md")


if __name__ == "__main__":
    main()
