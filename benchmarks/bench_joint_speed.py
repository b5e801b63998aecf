"""Speed of refining images whose columns overlap (the joint fit), against a baseline checkout.

Run:  nice python benchmarks/bench_joint_speed.py [--baseline PATH] [--runs N] [--no-write]

Images (``atomds.datasets``): the TMD-like sample at 512^2 and 1024^2 (Mo and S2 columns 5 widths
apart, a hole, contamination), a honeycomb of 1024^2 with its dim sublattice at 0.3 of the bright
peak (4.6 widths apart), and the thick particles. Each is found once (``ds.lcx.find_atoms()``), then
``.lcx.refine()`` is timed through the accessor, ``--runs`` times (median kept), in a fresh process
per image. With ``--baseline PATH`` (a checkout of another commit, e.g. made by ``git worktree
add``) the same script runs there too, image by image, alternating with this tree, and the ratio
of the medians is reported with the largest difference of the refined positions over their
standard errors (the two should give the same fits).

The "Refinement of overlapping columns: speed" section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SECTION = "## Refinement of overlapping columns: speed"
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "tmd_512": ("tmd", {"shape": (512, 512), "seed": 6}),
    "tmd_1024": ("tmd", {"shape": (1024, 1024), "seed": 6}),
    "honeycomb_1024": ("honeycomb", {"shape": (1024, 1024), "dim_ratio": 0.3, "dose": 1500.0, "seed": 3}),
    "thick_particles": ("thick_particles", {"seed": 1}),
}


def child(case: str, runs: int, out: str) -> None:
    """Time ``refine`` on one image in this process; positions and errors saved to ``out`` (.npz)."""
    import warnings

    warnings.simplefilter("ignore")
    from atomds import datasets

    name, kw = CASES[case]
    ds = getattr(datasets, name)(**kw)
    found = ds.lcx.find_atoms()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = found.lcx.refine()
        times.append(time.perf_counter() - t0)
    np.savez(out, x=r["atom_x"].values, y=r["atom_y"].values, x_err=r["x_err"].values, y_err=r["y_err"].values,
             times=np.array(times), joint=float(np.mean(r["joint"].values)) if "joint" in r else np.nan)


def run_in(tree: Path, case: str, runs: int) -> dict:
    """Run :func:`child` in a fresh process on the code of ``tree``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.npz")
        env = dict(os.environ, PYTHONPATH=str(tree), MPLBACKEND="Agg")
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", case, "--runs", str(runs),
                        "--out", out], cwd=str(tree), env=env, check=True)
        with np.load(out) as f:
            return {k: f[k] for k in f.files}


def _commit(tree: Path) -> str:
    """The short commit of a checkout (with ``+`` where its tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="a checkout of another commit to compare with, image by image")
    p.add_argument("--runs", type=int, default=1, help="timed refinements per image (median kept)")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.runs, a.out)
        return
    here = Path(__file__).resolve().parents[1]
    commits = {"this tree": _commit(here)}
    if a.baseline:
        commits["baseline"] = _commit(Path(a.baseline).resolve())
    rows = []
    for case in a.cases:
        base = run_in(Path(a.baseline).resolve(), case, a.runs) if a.baseline else None
        new = run_in(here, case, a.runs)
        t_new = float(np.median(new["times"]))
        row = {"case": case, "n": int(new["x"].size), "joint": float(new["joint"]), "new": t_new}
        if base is not None:
            row["base"] = float(np.median(base["times"]))
            same = base["x"].shape == new["x"].shape
            if same:
                err = np.hypot(new["x_err"], new["y_err"]) / np.sqrt(2.0)
                d = np.hypot(new["x"] - base["x"], new["y"] - base["y"]) / err
                row["max_shift"] = float(np.nanmax(d))
            else:
                row["max_shift"] = float("nan")
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [SECTION, "",
             f"`nice python benchmarks/bench_joint_speed.py{' --baseline <worktree>' if a.baseline else ''}"
             f"{f' --runs {a.runs}' if a.runs != 1 else ''}` on {platform.machine()} ({os.cpu_count()} cores, shared), "
             f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. `ds.lcx.find_atoms()` once, then "
             "`.lcx.refine()` timed through the accessor (defaults: joint fit where columns overlap, residual "
             "search), a fresh process per image; the baseline and this tree alternate image by image. Commits: "
             + ", ".join(f"{k} {v}" for k, v in commits.items()) + ".", ""]
    if a.baseline:
        lines += ["| image | atoms | fitted jointly | baseline s | this tree s | ratio | largest shift / error |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['n']:,} | {r['joint']:.0%} | {r['base']:.1f} | {r['new']:.1f} | "
                         f"{r['new'] / r['base']:.2f} | {r['max_shift']:.1e} |")
    else:
        lines += ["| image | atoms | fitted jointly | refine s |", "|---|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['n']:,} | {r['joint']:.0%} | {r['new']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_find_refine import write_section

        write_section(text, Path(__file__).parent / "RESULTS.md")


if __name__ == "__main__":
    main()
