"""The ``atomds`` command line.

``atomds info FILE`` describes a file; ``atomds analyze [FILE] -o OUT.nc [--report DIR]`` runs the
whole job (on the bundled two-phase sample when FILE is omitted); ``atomds batch INPUTS... -o
LIBRARY.nc`` runs many images. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MESSAGE_MAX, one_line  # an error longer than MESSAGE_MAX characters is printed cut, saying so

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import add_params_arguments
    from .version import __version__

    p = argparse.ArgumentParser(prog="atomds", description="Local crystallography of atomically resolved images.")
    p.add_argument("--version", action="version", version=f"atomds {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print shape, dtype, calibration and a metadata summary of FILE")
    info.add_argument("file")
    info.add_argument("--pixel-size", type=float, default=None, help="override the calibration")
    info.add_argument("--units", default=None, help="units of --pixel-size (nm, Å, pm, px)")

    an = sub.add_parser("analyze", help="find, refine, neighbourhoods, clusters and PCA modes; write NetCDF")
    an.add_argument("file", nargs="?", default=None, help="image file (default: the bundled two-phase sample)")
    an.add_argument("-o", "--output", required=True, help="output NetCDF file")
    an.add_argument("--report", default=None, metavar="DIR", help="also write DIR/index.html with figures")
    an.add_argument("--pixel-size", type=float, default=None, help="override the calibration")
    an.add_argument("--units", default=None, help="units of --pixel-size (nm, Å, pm, px)")
    an.add_argument("--height-map", action="store_true",
                    help="the image is an STM/AFM height map (found from length units on its values otherwise): "
                    "flattened before finding")
    add_params_arguments(an)
    an.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    from .batch import add_batch_parser

    add_batch_parser(sub)
    return p


def _summarise_metadata(raw: str | None, limit: int = 12) -> list[str]:
    if not raw:
        return ["metadata: (none)"]
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return ["metadata: (unparseable)"]
    lines: list[str] = []

    def walk(obj: object, prefix: str = "") -> None:
        if len(lines) >= limit:
            return
        if isinstance(obj, dict):
            for key, val in obj.items():
                walk(val, f"{prefix}{key}.")
        elif not isinstance(obj, list):
            text = str(obj)
            lines.append(f"  {prefix[:-1]}: {text[:80]}")

    walk(meta)
    return ["metadata:"] + (lines or ["  (empty)"])


def _cmd_info(args) -> int:
    from .io import open_image

    ds = open_image(args.file, pixel_size=args.pixel_size, units=args.units)
    name = "image" if "image" in ds.data_vars else "frames"
    var = ds[name]
    print(f"file: {args.file}")
    print(f"variable: {name}{tuple(var.dims)}")
    print(f"shape: {tuple(int(s) for s in var.shape)}")
    print(f"dtype: {var.dtype}")
    print(f"pixel size: {ds.attrs['pixel_size']:g} {ds.attrs['units']}")
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    print(f"field of view: {nx * ds.attrs['pixel_size']:g} x {ny * ds.attrs['pixel_size']:g} {ds.attrs['units']}")
    print(f"intensity: min {float(var.min()):g}, max {float(var.max()):g}, mean {float(var.mean()):g}")
    for line in _summarise_metadata(ds.attrs.get("original_metadata")):
        print(line)
    return 0


def _cmd_analyze(args) -> int:
    from tqdm.auto import tqdm

    from .io import open_image, to_netcdf
    from .params import step_params
    from .pipeline import STAGES, params_from_args, run_stages
    from .schema import validate

    params = params_from_args(args)  # checked before any work
    if args.file is None:
        from .datasets import two_phase

        ds = two_phase()
        ds = ds.drop_dims("true_atom", errors="ignore")
        source = "bundled two-phase sample (atomds.datasets.two_phase)"
    else:
        ds = open_image(args.file, pixel_size=args.pixel_size, units=args.units,
                        kind="height" if args.height_map else None)
        source = args.file
    if ds.attrs.get("units") == "px":
        print("atomds: pixel size unknown: lengths are in px (give --pixel-size and --units to calibrate)")
    bar = tqdm(total=len(STAGES), desc="atomds analyze", unit="stage", disable=args.no_progress, file=sys.stderr)

    def on_stage(stage: str) -> None:
        bar.set_postfix_str(stage)
        bar.update(1)

    try:
        ds = run_stages(ds, params, STAGES, on_stage=on_stage)
    finally:
        bar.close()
    validate(ds)
    out = to_netcdf(ds, args.output)
    n_atoms = ds.sizes.get("atom", 0)
    n_clusters = int(ds["cluster"].max()) + 1 if "cluster" in ds else 0
    n_regions = int(ds["region"].max()) + 1 if "region" in ds else 0
    kmeans = step_params(ds, "kmeans") or {}
    if kmeans.get("skipped") and "region" not in ds:
        hint = f"; try {kmeans['hint']}" if kmeans.get("hint") else ""
        phases = f"phases not told apart ({kmeans['skipped']}{hint})"
    else:
        phases = (f"{n_regions} phase{'s' if n_regions != 1 else ''} (regions) from {n_clusters} "
                  f"cluster{'s' if n_clusters != 1 else ''}")
    print(f"analysed {source}: {n_atoms} atoms, {phases} -> {out}")
    if args.report:
        from .report import write_report

        index = write_report(ds, args.report, source=source)
        print(f"report: {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atomds`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import AtomdsError

    handlers = {"info": _cmd_info, "analyze": _cmd_analyze}
    if args.command == "batch":
        from .batch import run_batch_command as handler
    else:
        handler = handlers[args.command]
    try:
        return handler(args)
    except (AtomdsError, OSError, ValueError) as exc:
        if args.debug:
            raise
        # one line, all of it: a layout error lists its problems on the lines after its first
        message = one_line(str(exc), MESSAGE_MAX, hint="--debug for all") or type(exc).__name__
        print(f"atomds: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomds: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
