"""Benchmark of the physical maps: strain and polarisation against truth and the Cramér-Rao bound, and speed.

Run:  nice python benchmarks/bench_physics.py [--quick] [--no-write]

Strain: a hexagonal lattice (spacing 14 px, sigma 2.3 px, background 10 % of the peak, 2000 counts per
column, 512 px) carrying a known smooth displacement field (strain amplitude 1 %, wavelength 36
spacings, all of exx, eyy, exy and a rotation), analysed through the public API
(``ds.lcx.find_atoms().lcx.refine().lcx.strain()``). The reference is the same ``local_strain`` on
the true positions plus Gaussian noise at the Cramér-Rao bound (``atomds.core.crb.crb_gaussian``):
what a least-squares fit to positions at the bound gives. Reported per component: RMSE against the
true strain (rotation: against the truth less its median, as the reference lattice is the image's
median), the ratio to the bound's RMSE, and std(error / reported error). With the first shell and
with ``radius`` of two spacings; several seeds.

Polarisation: ``atomds.datasets.polar`` (B columns shifted along y, antiphase boundary) with shifts of
8 % of the lattice period at 4000 counts and 5 % at a fifth of that dose: correlation and slope of
``polarization_y`` against the true shift, std(error / reported error), and the same correlation
for positions at the Cramér-Rao bound. The same on ``atomds.datasets.honeycomb`` (dim B in a cage of
three A, moved 8 % of the period at 2500 counts and 5 % at 500), whose two domains no rotation or
mirror relates.

Speed: on a 4096 x 4096 polar image of about 84 000 columns, ``strain`` + ``polarization`` (+
``cross_sections`` when available) against ``find_atoms`` on the same image, in the same run.

The "Physical maps" section of benchmarks/RESULTS.md is replaced.
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

import atomds
from atomds.core import strain as cstrain
from atomds.core.crb import crb_gaussian
from atomds.core.samples import add_noise, lattice_sites, lattice_vectors, match_positions, render_columns

HERE = Path(__file__).resolve().parent


def strained_hexagonal(*, shape=512, spacing=14.0, sigma=2.3, counts=2000.0, bg_frac=0.1, eps=0.01,
                       wavelength=36, seed=0):
    """Image and truth of a hexagonal lattice under a smooth strain field (lengths in px)."""
    rng = np.random.default_rng(seed)
    V = lattice_vectors("hexagonal", spacing, angle=float(rng.uniform(0, 60)))
    xy, _, _ = lattice_sites(V, (shape, shape), origin=rng.uniform(0, spacing, 2), margin=3 * spacing)
    k = 2 * np.pi / (wavelength * spacing)
    ph = rng.uniform(0, 2 * np.pi, 3)
    x0, y0 = xy[:, 0], xy[:, 1]
    ux = eps / k * np.sin(k * x0 + ph[0]) + 0.5 * eps / k * np.sin(k * y0 + ph[2])
    uy = eps / k * np.sin(k * y0 + ph[1]) + 0.5 * eps / k * np.sin(k * x0 + ph[2])
    hxx, hyy = eps * np.cos(k * x0 + ph[0]), eps * np.cos(k * y0 + ph[1])
    hxy, hyx = 0.5 * eps * np.cos(k * y0 + ph[2]), 0.5 * eps * np.cos(k * x0 + ph[2])
    x, y = x0 + ux, y0 + uy
    inside = (x > -0.5) & (x < shape - 0.5) & (y > -0.5) & (y < shape - 0.5)
    peak = counts / (2 * np.pi * sigma**2)
    img = add_noise(render_columns((shape, shape), x[inside], y[inside], counts, sigma) + bg_frac * peak, seed=rng)
    truth = dict(exx=hxx, eyy=hyy, exy=0.5 * (hxy + hyx), lattice_rotation=0.5 * (hyx - hxy))
    truth = {n: v[inside] for n, v in truth.items()}
    ds = xr.Dataset({"image": (("y", "x"), img.astype(np.float32))},
                    coords={"y": np.arange(shape, dtype=float), "x": np.arange(shape, dtype=float)},
                    attrs={"pixel_size": 1.0, "units": "px"})
    return ds, x[inside], y[inside], truth, float(crb_gaussian(counts, sigma, background=bg_frac * peak))


def strain_rows(seeds) -> list[str]:
    rows = []
    for radius_sp in (None, 2.05):
        acc = {n: [[], [], [], []] for n in cstrain.STRAIN_NAMES}  # err, err_crb, z, z_crb
        for seed in seeds:
            ds, tx, ty, truth, crb = strained_hexagonal(seed=seed)
            radius = None if radius_sp is None else radius_sp * 14.0
            out = ds.lcx.find_atoms().lcx.refine().lcx.strain(radius=radius)
            it, jf = match_positions(np.column_stack([tx, ty]),
                                     np.column_stack([out["atom_x"].values, out["atom_y"].values]), 3.0)
            rng = np.random.default_rng(seed + 1000)
            e = np.full(len(tx), crb)
            ref = cstrain.local_strain(tx + rng.normal(0, crb, len(tx)), ty + rng.normal(0, crb, len(tx)), e, e,
                                       radius=radius)
            for n in cstrain.STRAIN_NAMES:
                got, err = out[n].values[jf], out[f"{n}_err"].values[jf]
                tr = truth[n][it]
                ok = np.isfinite(got) & np.isfinite(ref[n][it])
                d, d0 = got[ok] - tr[ok], ref[n][it][ok] - tr[ok]
                if n == "lattice_rotation":  # the reference lattice's orientation is the median's
                    d, d0 = d - np.median(d), d0 - np.median(d0)
                acc[n][0].append(d)
                acc[n][1].append(d0)
                acc[n][2].append(d / err[ok])
                acc[n][3].append(d0 / ref[f"{n}_err"][it][ok])
        label = "first shell" if radius_sp is None else f"radius {radius_sp} spacings"
        for n in cstrain.STRAIN_NAMES:
            d, d0, z, z0 = (np.concatenate(a) for a in acc[n])
            rmse, rmse0 = np.sqrt(np.mean(d**2)), np.sqrt(np.mean(d0**2))
            unit, f = ("mrad", 1e3) if n == "lattice_rotation" else ("%", 1e2)
            rows.append(f"| {label} | {n} | {rmse * f:.3f} {unit} | {rmse0 * f:.3f} {unit} | {rmse / rmse0:.2f} | "
                        f"{z.std():.2f} | {z0.std():.2f} |")
    return rows


def polar_sample(kind: str, *, shape: int, dose: float, frac: float, seed: int):
    """A polar sample: perovskite B in its A cage (period 16 px), or honeycomb B between three A
    (period 16 px, B at half A's peak; moved towards one A on one side of the boundary, away from
    it on the other)."""
    if kind == "perovskite":
        return atomds.datasets.polar(shape=shape, dose=dose, displacement=frac * 16.0, seed=seed)
    return atomds.datasets.honeycomb(shape=shape, dose=dose, displacement=frac, seed=seed)


def polar_rows(seeds, shape) -> list[str]:
    rows = []
    for kind, dose, frac in (("perovskite", 4000.0, 0.08), ("perovskite", 800.0, 0.05),
                             ("honeycomb", 2500.0, 0.08), ("honeycomb", 500.0, 0.05)):
        r, slope, zs, r0 = [], [], [], []
        for seed in seeds:
            ds = polar_sample(kind, shape=shape, dose=dose, frac=frac, seed=seed)
            out = ds.lcx.find_atoms().lcx.refine().lcx.polarization()
            ps = float(ds.attrs["pixel_size"])
            it, jf = match_positions(np.column_stack([ds["true_x"].values, ds["true_y"].values]),
                                     np.column_stack([out["atom_x"].values, out["atom_y"].values]), 4 * ps)
            tdy, lab = ds["true_dy"].values[it], ds["true_label"].values[it]
            py, pe = out["polarization_y"].values[jf], out["polarization_y_err"].values[jf]
            m = np.isfinite(py) & (lab == 1)
            r.append(np.corrcoef(py[m], tdy[m])[0, 1])
            slope.append(np.polyfit(tdy[m], py[m], 1)[0])
            zs.append((py[m] - tdy[m]) / pe[m])
            # the same measure on positions at the Cramer-Rao bound (errors as reported per column)
            rng = np.random.default_rng(seed)
            sx = out["x_err"].values[jf]
            tx = ds["true_x"].values[it] + rng.normal(0, 1, len(it)) * sx
            ty = ds["true_y"].values[it] + rng.normal(0, 1, len(it)) * out["y_err"].values[jf]
            from atomds.core.polarization import polarization as cp

            ref = cp(tx, ty, sx, sx, ds["true_label"].values[it], displaced=1, reference=0)
            mm = np.isfinite(ref["polarization_y"]) & (lab == 1)
            r0.append(np.corrcoef(ref["polarization_y"][mm], tdy[mm])[0, 1])
        z = np.concatenate(zs)
        rows.append(f"| {kind} | {dose:.0f} | {100 * frac:.0f} % | {np.mean(r):.3f} | {np.mean(r0):.3f} | "
                    f"{np.mean(slope):.3f} | {z.std():.2f} | {len(seeds)} |")
    return rows


def speed_rows(shape: int, repeats: int) -> list[str]:
    ds = atomds.datasets.polar(shape=shape, spacing=20.0, seed=1)
    t_find, t_maps = [], []
    found = None
    for _ in range(repeats):  # interleaved: the machine is shared
        t0 = time.perf_counter()
        found = ds.lcx.find_atoms()
        t_find.append(time.perf_counter() - t0)
    refined = found.lcx.refine()
    has_cs = hasattr(refined.lcx, "cross_sections")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = refined.lcx.strain().lcx.polarization()
        if has_cs:
            out = out.lcx.cross_sections()
        t_maps.append(time.perf_counter() - t0)
    what = "strain + polarization" + (" + cross_sections" if has_cs else "")
    tf, tm = float(np.median(t_find)), float(np.median(t_maps))
    return [f"| {shape}^2, {refined.sizes['atom']} columns | find_atoms {tf:.2f} s | {what} {tm:.2f} s | "
            f"{tm / tf:.2f}x |"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, a 1024 px speed image")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    seeds = [0] if args.quick else [0, 1, 2]
    lines = ["## Physical maps", "",
             f"`nice python benchmarks/bench_physics.py{' --quick' if args.quick else ''}` on {platform.machine()} "
             f"({os.cpu_count()} cores), Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}; seeds "
             f"{seeds}.", "",
             "Strain (hexagonal, spacing 14 px, sigma 2.3 px, background 10 % of the peak, 2000 counts, 1 % "
             "strain field of wavelength 36 spacings); bound = the same fit to true positions plus noise at the "
             "Cramér-Rao bound:", "",
             "| neighbourhood | component | RMSE | RMSE at the bound | ratio | std(err / reported) | same at the bound |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += strain_rows(seeds)
    lines += ["", "Polarisation (antiphase boundary, B shifted along y; perovskite: B in its cage of four A, "
              "`datasets.polar`; honeycomb: B at half A's peak in its cage of three, `datasets.honeycomb`):", "",
              "| sample | dose | shift (of the period) | r | r at the bound | slope | std(err / reported) | seeds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += polar_rows(seeds, 384)
    lines += ["", "Speed (median of 3, same run):", "", "| image | find | maps | ratio |", "| --- | --- | --- | --- |"]
    lines += speed_rows(1024 if args.quick else 4096, 3)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        from bench_find_refine import write_section

        write_section(text, HERE / "RESULTS.md")


if __name__ == "__main__":
    main()
