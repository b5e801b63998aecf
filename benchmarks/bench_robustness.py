"""Robustness of atom finding and refinement beyond the bundled samples' defaults.

Run:  nice python benchmarks/bench_robustness.py [--no-write]

Images rendered here with :mod:`atomds.core.synth` (pixel-integrated Gaussian columns, Poisson +
read noise): other lattices (rectangular, oblique, two-species, dumbbells), narrow and broad
columns, dense lattices down to 4 px, intensity gradients, dark columns, hot pixels, and a
particle on an amorphous support. For each: recall and false positives of the default
``find_atoms()`` (``contrast="dark"`` for the dark image), scored with
:func:`atomds.core.samples.score_positions` (unmatched finds within a match distance of the
border are columns centred just outside and are not counted), and the position RMSE after
``refine_gaussian`` over the matched columns. Two doses each.

The "Robustness" section of benchmarks/RESULTS.md is replaced with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from atomds.core import find, samples
from atomds.core.refine import refine_gaussian
from atomds.core.synth import add_noise, render_columns

sys.path.insert(0, str(Path(__file__).parent))
from bench_find_refine import write_section  # noqa: E402

SECTION = "## Robustness"
SHAPE = (256, 256)


def lattice(v1, v2, basis=((0.0, 0.0),)):
    xy, _, b = samples.lattice_sites(np.array([v1, v2], float), SHAPE, origin=(3.3, 4.1),
                                     basis=np.asarray(basis, float), margin=12.0)
    return xy, b


def render(xy, counts, sigma, *, sigma_y=None, background=2.0, seed=0):
    kw = {} if sigma_y is None else {"sigma_y": sigma_y}
    return add_noise(render_columns(SHAPE, xy[:, 0], xy[:, 1], counts, sigma, **kw) + background, read_noise=1.0,
                     seed=seed)


def hot(image, n=60, seed=0):
    r = np.random.default_rng(seed)
    out = image.copy()
    taken = np.zeros(image.shape, bool)
    k = 0
    while k < n:
        y, x = r.integers(0, image.shape[0]), r.integers(0, image.shape[1])
        if taken[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].any():
            continue
        taken[y, x] = True
        out[y, x] += 20.0 * image.max()
        k += 1
    return out


def cases(dose):
    hexv = ((12.0, 0.0), (6.0, 10.392))
    out = []
    xy, _ = lattice((10.0, 0.0), (0.0, 14.0))
    out.append(("rectangular 10 x 14 px, sigma 1.8", xy, lambda xy=xy: render(xy, dose, 1.8)))
    xy, _ = lattice((11.0, 0.0), (4.0, 9.5))
    out.append(("oblique 11 px / (4, 9.5), sigma 1.8", xy, lambda xy=xy: render(xy, dose, 1.8)))
    xy, b = lattice((16.0, 0.0), (0.0, 16.0), basis=((0, 0), (0.5, 0.5)))
    out.append(("two species (B at 25 %), sigma 2", xy, lambda xy=xy, b=b: render(xy, np.where(b == 0, dose, 0.25 * dose), 2.0)))
    xy, _ = lattice((20.0, 0.0), (0.0, 14.0), basis=((0, 0), (0.33, 0)))
    out.append(("dumbbells 6.6 px apart, sigma 1.5", xy, lambda xy=xy: render(xy, dose, 1.5)))
    for d, s in ((6.0, 1.4), (4.0, 1.0)):
        xy, _ = lattice((d, 0.0), (d / 2, d * 0.866))
        out.append((f"hexagonal {d:.0f} px, sigma {s}", xy, lambda xy=xy, s=s: render(xy, dose, s)))
    xy, _ = lattice(*hexv)
    out.append(("elliptical columns 2.4 x 1.6 px", xy, lambda xy=xy: render(xy, dose, 2.4, sigma_y=1.6)))
    out.append(("intensity gradient 1 -> 0.25", xy,
                lambda xy=xy: render(xy, dose * (0.25 + 0.75 * np.clip(xy[:, 0], 0, 255) / 255), 2.0)))
    out.append(("60 hot pixels at 20x the maximum", xy, lambda xy=xy: hot(render(xy, dose, 2.0))))
    out.append(("dark columns (contrast='dark')", xy,
                lambda xy=xy: render(xy, -dose, 2.0, background=3 * dose / (2 * np.pi * 4))))
    xy, _ = lattice((30.0, 0.0), (15.0, 25.98))
    out.append(("sparse 30 px, sigma 2.5", xy, lambda xy=xy: render(xy, dose, 2.5)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    lines = [SECTION, "",
             f"`nice python benchmarks/bench_robustness.py` on {platform.machine()} with {os.cpu_count()} cores, Python "
             f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}. {SHAPE[0]} x {SHAPE[1]} px images; default "
             "`find_atoms()` then `refine_gaussian()`; RMSE over the matched columns.", "",
             "| image | dose | columns | recall % | false pos. % | RMSE px |", "|---|---:|---:|---:|---:|---:|"]
    ny, nx = SHAPE
    for dose in (300.0, 2000.0):
        for name, xy, make in cases(dose):
            image = make()
            inside = (xy[:, 0] >= -0.5) & (xy[:, 0] < nx - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] < ny - 0.5)
            truth = xy[inside]
            contrast = "dark" if "dark" in name else "bright"
            f = find.find_atoms(image, contrast=contrast)
            sc = samples.score_positions(truth, np.c_[f.x, f.y], shape=SHAPE)
            r = refine_gaussian(image, f.x, f.y, contrast=contrast)
            it, jf = samples.match_positions(truth, np.c_[r["x"], r["y"]], sc["max_distance_px"])
            rmse = float(np.sqrt(np.mean(((truth[it] - np.c_[r["x"], r["y"]][jf]) ** 2).sum(1))))
            lines.append(f"| {name} | {dose:.0f} | {truth.shape[0]} | {100 * sc['recall']:.2f} | "
                         f"{100 * sc['false_positive_rate']:.2f} | {rmse:.3f} |")
            print(lines[-1], flush=True)
    lines += ["", "Particle on an amorphous support, holes and films: see \"Regions without a lattice\" above.", ""]
    if not args.no_write:
        write_section("\n".join(lines), Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()
