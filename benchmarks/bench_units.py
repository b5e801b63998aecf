"""The same images in other intensity units: counts, a current in A, [0, 1], 1e9.

Run:  nice python benchmarks/bench_units.py [--no-write]

A microscope writes counts, a DigitalMicrograph export may be scaled to [0, 1] or to electrons
per second, an STM current channel is in A (1e-10), a summed stack of 16-bit frames reaches
1e9. The atoms are the same; so should the table be. Each sample (:mod:`atomds.core.samples`,
256^2 px; the particles 512^2) is multiplied by each factor (or min-max scaled to [0, 1]) and run through
``atomds.from_array(image).lcx.find_atoms().lcx.refine()`` with defaults. Reported: atoms
found, recall and false positives (:func:`atomds.core.samples.score_positions`, finds at the
border not counted), the median fitted width (px), the position RMSE (px) and
std(error / reported standard error) over the matched columns whose fit converged, and
whether the run raised.

The "Intensity units" section of benchmarks/RESULTS.md is replaced with the table.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import atomds
from atomds.core import samples

sys.path.insert(0, str(Path(__file__).parent))
from bench_find_refine import write_section  # noqa: E402

SECTION = "## Intensity units"
RESULTS = Path(__file__).with_name("RESULTS.md")

#: (label, factor); None is a min-max scaling to [0, 1].
UNITS = [("counts", 1.0), ("x 1e-10 (A)", 1e-10), ("[0, 1]", None), ("x 2^-8", 2.0**-8), ("x 1e3", 1e3),
         ("x 1e9", 1e9)]


def cases() -> dict:
    """The samples: two lattices, a dim sublattice and a particle with a thickness profile."""
    return {
        "hexagonal 12 px, 2000 counts": samples.hexagonal_sample(shape=(256, 256), spacing=12.0, dose=2000, seed=1),
        "hexagonal 8 px, 1000 counts": samples.hexagonal_sample(shape=(256, 256), spacing=8.0, dose=1000, seed=4),
        "honeycomb, B at 50 %, 2000 counts": samples.honeycomb_sample(shape=(256, 256), spacing=10.0, dose=2000,
                                                                       seed=3),
        "thick particles (seed 1)": samples.thick_particles_sample(seed=1),
    }


def run_case(s, factor) -> dict:
    img = np.asarray(s.image, dtype=np.float64)
    if factor is None:
        img = (img - img.min()) / (img.max() - img.min())
    else:
        img = img * factor
    out: dict = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = atomds.from_array(img).lcx.find_atoms().lcx.refine()
    except Exception as exc:  # noqa: BLE001 - a failure is a result here
        return {"error": type(exc).__name__}
    x, y = r["atom_x"].to_numpy(), r["atom_y"].to_numpy()
    true = np.column_stack([s.x, s.y])
    sc = samples.score_positions(true, np.column_stack([x, y]), shape=img.shape)
    from scipy.spatial import cKDTree

    d, i = cKDTree(true).query(np.column_stack([x, y]))
    ok = r["fit_ok"].to_numpy() & (d <= sc["max_distance_px"])
    ex, ey = x[ok] - true[i[ok], 0], y[ok] - true[i[ok], 1]
    z = np.r_[ex / r["x_err"].to_numpy()[ok], ey / r["y_err"].to_numpy()[ok]]
    out.update(n=int(r.sizes["atom"]), recall=100.0 * sc["recall"], false=int(sc["n_false"]),
               sigma=float(np.nanmedian(r["sigma"].to_numpy())), rmse=float(np.sqrt(np.mean(np.r_[ex, ey] ** 2))),
               z=float(np.std(z)), ok=float(np.mean(r["fit_ok"].to_numpy())))
    return out


def table() -> str:
    lines = [
        "| sample | units | atoms | recall % | false | fits converged % | width (px) | RMSE (px) | std(err / x_err) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in cases().items():
        for label, factor in UNITS:
            t0 = time.perf_counter()
            r = run_case(s, factor)
            print(f"{name} {label}: {r} ({time.perf_counter() - t0:.1f} s)", flush=True)
            if "error" in r:
                lines.append(f"| {name} | {label} | {r['error']} | | | | | | |")
                continue
            lines.append(f"| {name} | {label} | {r['n']} | {r['recall']:.2f} | {r['false']} | {100 * r['ok']:.1f} | "
                         f"{r['sigma']:.3f} | {r['rmse']:.4f} | {r['z']:.3f} |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    body = table()
    text = (f"{SECTION}\n\n`nice python benchmarks/bench_units.py` on {platform.machine()}, Python "
            f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}, commit {_commit()}. The same image in other "
            "units, through `ds.lcx.find_atoms().lcx.refine()` with defaults (pixel size not given). Widths and "
            "errors in px; recall and false positives against the truth.\n\n" + body + "\n")
    print(text)
    if not args.no_write:
        write_section(text, RESULTS)


if __name__ == "__main__":
    main()
