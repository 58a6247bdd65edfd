"""Scanner-export sub-commands: ``listmode`` (histogramming) and ``randoms`` (from delayeds).

- ``sirf-ddip listmode LM --template T.hs --out OUT.hs [--start S] [--end E] [--events prompts|delayeds|trues]``:
  STIR ``lm_to_projdata`` of a Siemens PETLINK listmode (``.l.hdr``) or a PETSIRD file onto the template's
  geometry; times in s from the scan start;
- ``sirf-ddip randoms LM.l.hdr --template T.hs --out R.hs [--start S] [--end E] [--iterations N]``: fan sums
  of the delayeds -> ML singles -> singles-product randoms (SIRF ``estimate_randoms``).

Both refuse to overwrite unless ``--overwrite``, write their output atomically and a
``<out stem>_run_record.json`` next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..io.template import TEMPLATE_HELP

__all__ = ["register"]


def _frame_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", required=True, metavar="T.hs",
                   help=f"projection-data template giving the geometry ({TEMPLATE_HELP})")
    p.add_argument("--out", required=True, metavar="OUT.hs", help="output projection data (.hs + .s)")
    p.add_argument("--start", type=float, default=None, metavar="S", help="frame start, s from the scan start")
    p.add_argument("--end", type=float, default=None, metavar="E", help="frame end, s from the scan start")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    """Add ``listmode`` and ``randoms`` to the ``sirf-ddip`` parser."""
    p = subparsers.add_parser("listmode", help="histogram listmode into a sinogram (STIR lm_to_projdata)",
                              description="Histogram a Siemens PETLINK 32-bit listmode (.l.hdr) or a PETSIRD "
                                          "listmode file into the geometry of a template, as STIR's "
                                          "lm_to_projdata does.")
    p.add_argument("listmode", metavar="LM", help="listmode header (.l.hdr) or PETSIRD file")
    _frame_args(p)
    p.add_argument("--events", choices=("prompts", "delayeds", "trues"), default="prompts",
                   help="prompts (default), delayeds, or trues = prompts - delayeds")
    p.set_defaults(func=run_listmode)

    p = subparsers.add_parser("randoms", help="randoms estimate from the delayeds (ML singles)",
                              description="Randoms from the delayed coincidences of a Siemens listmode: fan sums "
                                          "-> ML singles -> singles-product randoms, as SIRF's "
                                          "ListmodeToSinograms.estimate_randoms().")
    p.add_argument("listmode", metavar="LM.l.hdr", help="listmode header (.l.hdr)")
    _frame_args(p)
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="ML singles iterations (default 10, as SIRF)")
    p.set_defaults(func=run_randoms)


def _check_frame(args) -> None:
    from ..errors import ConfigError

    if args.start is not None and args.start < 0:
        raise ConfigError(f"--start must be >= 0 s, got {args.start}")
    if args.end is not None and args.end <= (args.start or 0.0):
        raise ConfigError(f"--end ({args.end} s) must be after --start ({args.start or 0.0} s)")


def _check_out(out: Path, overwrite: bool) -> None:
    from ..errors import InputFileError
    from ..utils.provenance import check_output

    if out.suffix.lower() != ".hs":
        raise InputFileError(out, "the output must be an Interfile projection-data header ending in .hs",
                             key="--out")
    for f in (out, out.with_suffix(".s"), out.parent / f"{out.stem}_run_record.json"):
        check_output(f, overwrite)


def _record(out: Path, command: str, params: dict, timing: dict, args) -> None:
    from ..utils.provenance import write_run_record

    argv = ["sirf-ddip", command] + [f"{k}={v}" for k, v in sorted(vars(args).items())
                                     if k not in ("func", "command")]
    write_run_record(out.parent, config={"command": command, **params}, seed=None, command=argv,
                     extra={"timing_s": timing}, name=f"{out.stem}_run_record")


def _is_siemens(path: str) -> bool:
    """An Interfile header (Siemens ``.l.hdr``) rather than a PETSIRD stream."""
    from ..errors import InputFileError

    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "listmode file not found")
    if p.suffix.lower() == ".l" and p.with_name(p.name + ".hdr").is_file():
        raise InputFileError(p, f"this is the listmode data file; give its header {p.name}.hdr")
    with open(p, "rb") as f:
        head = f.read(64).lstrip().upper().replace(b" ", b"")
    return head.startswith(b"!INTERFILE") or p.name.lower().endswith(".hdr")


def run_listmode(args) -> int:
    from ..io.template import read_template_geometry
    from ..physics.histogram import ListmodeHistogrammer

    _check_frame(args)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    t0 = time.perf_counter()
    geometry = read_template_geometry(args.template)
    show = False if args.no_progress else None
    if _is_siemens(args.listmode):
        from ..io.siemens_listmode import read_listmode_header

        header = read_listmode_header(args.listmode)
        hist = ListmodeHistogrammer(header, geometry, args.template).histogram(
            args.start, args.end, args.events, show_progress=show)
        fmt = "Siemens PETLINK 32-bit"
    else:
        from ..physics.histogram import histogram_petsird

        hist = histogram_petsird(args.listmode, geometry, args.start, args.end, args.events,
                                 template=args.template, show_progress=show)
        fmt = "PETSIRD"
    t1 = time.perf_counter()
    hist.write(out, overwrite=args.overwrite)
    params = {"listmode": args.listmode, "format": fmt, "template": args.template, "out": str(out),
              "start_s": args.start, "end_s": args.end, "events": args.events,
              "geometry": geometry.describe(), **hist.stats,
              "semantics": "STIR lm_to_projdata (no normalisation, integer counts)"}
    _record(out, "listmode", params, {"histogram": t1 - t0, "total": time.perf_counter() - t0}, args)
    print(f"wrote {out}: {hist.stats['counted']:,.0f} {args.events} counted "
          f"({hist.stats['records_in_frame']:,} records in the frame, {t1 - t0:.1f} s)", file=sys.stderr)
    return 0


def run_randoms(args) -> int:
    from ..errors import ConfigError
    from ..io.siemens_listmode import read_listmode_header
    from ..io.template import read_template_geometry
    from ..io.interfile import memory_to_file_order
    from ..physics.histogram import write_flat_projdata
    from ..physics.randoms import DEFAULT_ML_ITERATIONS, estimate_randoms

    _check_frame(args)
    iters = DEFAULT_ML_ITERATIONS if args.iterations is None else args.iterations
    if iters < 1:
        raise ConfigError(f"--iterations must be >= 1, got {iters}")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    t0 = time.perf_counter()
    geometry = read_template_geometry(args.template)
    header = read_listmode_header(args.listmode)
    randoms, fans, singles = estimate_randoms(header, geometry, args.start, args.end, num_iterations=iters,
                                              show_progress=False if args.no_progress else None)
    t1 = time.perf_counter()
    flat = memory_to_file_order(randoms.array, [s.number for s in geometry.segments],
                                [s.num_axial for s in geometry.segments], order="view")
    write_flat_projdata(out, flat, geometry, overwrite=args.overwrite)
    total = float(randoms.array.sum(dtype="float64"))
    params = {"listmode": args.listmode, "template": args.template, "out": str(out), "start_s": args.start,
              "end_s": args.end, "ml_iterations": iters, "geometry": geometry.describe(),
              "delayeds_in_fans": fans.num_events, "fan_max_ring_diff": fans.max_ring_diff,
              "fan_size": 2 * fans.half_fan_size + 1, "randoms_total": total,
              "method": "SIRF ListmodeToSinograms.estimate_randoms: fan sums of delayeds -> ML singles "
                        "(STIR iterate_efficiencies) -> singles-product randoms (multiply_crystal_factors)"}
    _record(out, "randoms", params, {"estimate": t1 - t0, "total": time.perf_counter() - t0}, args)
    print(f"wrote {out}: randoms total {total:,.1f} from {fans.num_events:,} delayeds ({t1 - t0:.1f} s)",
          file=sys.stderr)
    return 0
