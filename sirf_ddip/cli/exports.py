"""Scanner-export sub-commands: ``listmode`` (histogramming) and ``randoms`` (from delayeds).

- ``sirf-ddip listmode LM --template T.hs --out OUT.hs [--start S] [--end E] [--events prompts|delayeds|trues]``:
  STIR ``lm_to_projdata`` of a Siemens PETLINK listmode (``.l.hdr``) or a PETSIRD file onto the template's
  geometry; times in s from the scan start;
- ``sirf-ddip randoms LM.l.hdr --template T.hs --out R.hs [--start S] [--end E] [--iterations N]``: fan sums
  of the delayeds -> ML singles -> singles-product randoms (SIRF ``estimate_randoms``).

Both check every output (``.hs``, ``.s`` and the ``<out stem>_run_record.json`` / ``_config.yaml`` next to it)
before reading any input, refuse to overwrite unless ``--overwrite``, and write the outputs as one set
(temporary names, renamed when all are complete). Where STIR goes on with an inconsistent listmode header (a
``%segment table`` or word count that does not describe the file, a key given twice), so do they, with one
warning per inconsistency naming the key and both values, kept in the run record (``warnings``); ``--strict``
refuses such input instead.
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
    p.add_argument("--strict", action="store_true",
                   help="refuse a listmode header that STIR reads with warnings (a segment table or word count "
                        "that does not describe the file, a key given twice with different values)")
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
    """The frame bounds are finite, ``0 <= start < end``, and the end is one STIR does not ignore."""
    import math

    from ..errors import ConfigError

    for opt, v in (("--start", args.start), ("--end", args.end)):
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{opt} must be a finite number of seconds from the scan start, got {v}")
    if args.start is not None and args.start < 0:
        raise ConfigError(f"--start must be >= 0 s, got {args.start}")
    if args.end is not None and args.end <= (args.start or 0.0):
        raise ConfigError(f"--end ({args.end} s) must be after --start ({args.start or 0.0} s)")
    if args.end is not None and args.end <= 0.01:
        raise ConfigError(f"--end {args.end} s: STIR's lm_to_projdata ignores a frame end of 0.01 s or less and "
                          "counts to the end of the data; give a later end, or leave --end out for the whole scan")


def _check_out(out: Path, args, inputs: list[str]) -> list[Path]:
    """Check every file the command writes before any input is read; returns them in writing order
    (``.s``, ``.hs``, the run record's config and JSON)."""
    from .engine import PROJ_SUFFIXES, _check_outputs, _run_record_files, check_out_suffix

    check_out_suffix(out, PROJ_SUFFIXES)
    _check_outputs([out], args.overwrite, inputs)
    json_path, yaml_path = _run_record_files(out)
    return [out.with_suffix(".s"), out, yaml_path, json_path]


def _write_set(files: list[Path], flat, geometry, frame_keys: dict | None, command: str, params: dict,
               timing: dict, args) -> None:
    """Write the projection data and the run record as one set: all to temporary names, then renamed."""
    from ..physics.histogram import flat_projdata_header, write_flat_data
    from ..utils.atomic import atomic_paths
    from ..utils.provenance import run_record_texts

    data, header, yaml_path, json_path = files
    params = dict(params)
    warned = params.pop("warnings", [])
    argv = ["sirf-ddip", command] + [f"{k}={v}" for k, v in sorted(vars(args).items())
                                     if k not in ("func", "command")]
    texts = run_record_texts(json_path.parent, config={"command": command, **params}, seed=None, command=argv,
                             extra={"timing_s": timing, "warnings": warned},
                             name=json_path.stem)
    if list(texts) != [yaml_path, json_path]:  # pragma: no cover - the names are checked before any work
        raise RuntimeError(f"run record files {list(texts)} are not the checked {[yaml_path, json_path]}")
    hdr_text = flat_projdata_header(header, geometry, frame_keys)
    for f in files:
        if f.exists() and args.overwrite:
            print(f"note: overwriting existing {f}", file=sys.stderr)
    with atomic_paths(*files) as (t_data, t_hdr, t_yaml, t_json):
        write_flat_data(t_data, flat, geometry)
        t_hdr.write_text(hdr_text, encoding="utf-8")
        t_yaml.write_text(texts[yaml_path], encoding="utf-8")
        t_json.write_text(texts[json_path], encoding="utf-8")


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
    from ..utils.leniency import collect_input_warnings, strict_inputs

    _check_frame(args)
    out = Path(args.out)
    files = _check_out(out, args, [args.template, args.listmode])
    t0 = time.perf_counter()
    show = False if args.no_progress else None
    with strict_inputs(args.strict), collect_input_warnings("sirf-ddip listmode") as warned:
        geometry = read_template_geometry(args.template)
        if _is_siemens(args.listmode):
            from ..io.siemens_listmode import read_listmode_header

            header = read_listmode_header(args.listmode)
            hist = ListmodeHistogrammer(header, geometry, args.template).histogram(
                args.start, args.end, args.events, show_progress=show)
            fmt = "Siemens PETLINK 32-bit" + (f" TOF ({header.num_tof_bins} TOF bins)" if header.is_tof else "")
        else:
            from ..physics.histogram import histogram_petsird

            hist = histogram_petsird(args.listmode, geometry, args.start, args.end, args.events,
                                     template=args.template, show_progress=show)
            fmt = "PETSIRD"
    t1 = time.perf_counter()
    params = {"listmode": args.listmode, "format": fmt, "template": args.template, "out": str(out),
              "start_s": args.start, "end_s": args.end, "events": args.events, "strict": args.strict,
              "frame_written_s": [hist.start_s, hist.start_s + hist.duration_s],
              "geometry": geometry.describe(), **hist.stats,
              "semantics": "STIR lm_to_projdata (no normalisation, integer counts)", "warnings": list(warned)}
    _write_set(files, hist.data, geometry, hist.frame_keys(), "listmode", params,
               {"histogram": t1 - t0, "total": time.perf_counter() - t0}, args)
    note = f", {len(warned)} warning(s), see the run record" if warned else ""
    print(f"wrote {out}: {hist.stats['counted']:,.0f} {args.events} counted "
          f"({hist.stats['records_in_frame']:,} records in the frame, {t1 - t0:.1f} s{note})", file=sys.stderr)
    lm_tof = int(hist.stats.get("listmode_tof_bins", 1) or 1)
    if lm_tof > 1 and not geometry.is_tof:  # what the user asked for (STIR does the same), but never silently
        print(f"sirf-ddip listmode: note: {args.listmode} has {lm_tof} TOF bins; the non-TOF template "
              f"{args.template} sums them (as STIR's lm_to_projdata); a TOF template keeps them", file=sys.stderr)
    return 0


def run_randoms(args) -> int:
    from ..errors import ConfigError, DataValueError
    from ..io.siemens_listmode import read_listmode_header
    from ..io.template import read_template_geometry
    from ..io.interfile import memory_to_file_order
    from ..physics.randoms import DEFAULT_ML_ITERATIONS, estimate_randoms
    from ..utils.leniency import collect_input_warnings, strict_inputs

    _check_frame(args)
    iters = DEFAULT_ML_ITERATIONS if args.iterations is None else args.iterations
    if iters < 1:
        raise ConfigError(f"--iterations must be >= 1, got {iters}")
    out = Path(args.out)
    files = _check_out(out, args, [args.template, args.listmode])
    t0 = time.perf_counter()
    with strict_inputs(args.strict), collect_input_warnings("sirf-ddip randoms") as warned:
        geometry = read_template_geometry(args.template)
        header = read_listmode_header(args.listmode)
        randoms, fans, singles = estimate_randoms(header, geometry, args.start, args.end, num_iterations=iters,
                                                  show_progress=False if args.no_progress else None)
    t1 = time.perf_counter()
    total = float(randoms.array.sum(dtype="float64"))
    if fans.num_events == 0 or not total > 0:
        raise DataValueError(f"{header.data_path}: no delayed coincidences inside the fans in the frame "
                             f"[{args.start or 0.0:g} s, {'end' if args.end is None else f'{args.end:g} s'}) of "
                             f"{header.path}: the randoms cannot be estimated from the delayeds (nothing written)")
    flat = memory_to_file_order(randoms.array, [s.number for s in geometry.segments],
                                [s.num_axial for s in geometry.segments], order="view")
    params = {"listmode": args.listmode, "template": args.template, "out": str(out), "start_s": args.start,
              "end_s": args.end, "ml_iterations": iters, "strict": args.strict, "geometry": geometry.describe(),
              "delayeds_in_fans": fans.num_events, "fan_max_ring_diff": fans.max_ring_diff,
              "fan_size": 2 * fans.half_fan_size + 1, "randoms_total": total,
              "method": "SIRF ListmodeToSinograms.estimate_randoms: fan sums of delayeds -> ML singles "
                        "(STIR iterate_efficiencies) -> singles-product randoms (multiply_crystal_factors)",
              "warnings": list(warned)}
    _write_set(files, flat, geometry, None, "randoms", params,
               {"estimate": t1 - t0, "total": time.perf_counter() - t0}, args)
    note = f", {len(warned)} warning(s), see the run record" if warned else ""
    print(f"wrote {out}: randoms total {total:,.1f} from {fans.num_events:,} delayeds ({t1 - t0:.1f} s{note})",
          file=sys.stderr)
    return 0
