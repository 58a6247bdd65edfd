"""Data-preparation sub-commands: ``norm``, ``attenuation``, ``prepare`` (real scanner exports → PETRIC layout).

- ``sirf-ddip norm NORM.n.hdr --template T.hs --out EFF.hs``: detection efficiencies (1 / normalisation
  factors) from a Siemens ECAT8 component-based norm, STIR's default components
  (``BinNormalisationFromECAT8``: geometric, crystal interference, crystal efficiencies, axial effects; gaps
  at 0); ``--no COMPONENT`` switches one off.
- ``sirf-ddip attenuation MU.hv|MU.nii.gz|MU.v.hdr --template T.hs --out ATT.hs``: ``exp(-∫μ)`` (≤ 1) with
  the engine's ray-tracing projector (3 tangential LORs); ``--mu-units`` declares the μ-map's units (checked).
- ``sirf-ddip prepare --prompts P.hs | --listmode LM.l.hdr [--start S --end E] --norm N.n.hdr --mu MU
  [--randoms R.hs] [--scatter S.hs] --out-dir DIR``: writes the PETRIC layout ``prompts.hs``,
  ``mult_factors.hs`` (= norm efficiencies × attenuation factors), ``additive_term.hs``
  (= (randoms + scatter) / mult, 0 where mult is 0), plus ``randoms.hs`` when estimated, a
  ``prepare_record.json`` (provenance) and ``prepare.png`` (sinograms and factors). It says plainly when no
  scatter (or no randoms) estimate was given.

Every output (the ``.hs``, ``.s``, figure and run record) is checked before any input is read: no folder in
the way, none existing unless ``--overwrite``, none an input or an input's data file (``--out`` equal to
``--template``, ``prepare --randoms DIR/additive_term.hs --out-dir DIR``); a dangling link counts as existing.
The outputs of a command are then written as one set: all under temporary names in the output folder, renamed
into place only when all are complete (data files, headers, figure, record last), so that a failure (a full
disk) leaves the old set complete and no partial file. ``prepare`` creates its output folder only then.
Values: the norm's components are checked (:func:`sirf_ddip.io.siemens_norm.read_ecat8_norm`), the μ-map must
lie in the scanner's field of view (:func:`sirf_ddip.io.mumap.check_mu_in_fov`), and no NaN/Inf is ever
written. Where STIR goes on (trailing bytes of a ``.n``), so do we with a warning kept in the run record
(``warnings``); ``--strict`` refuses instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..io.template import DATA_HELP, TEMPLATE_HELP, read_template_geometry

__all__ = ["register", "listmode_to_prompts_and_randoms", "additive_term"]

_COMPONENT_NAMES = ("geometric", "crystal_interference", "detector_efficiencies", "axial_effects", "gaps")


# ------------------------------------------------------------------------------------------- listmode
def listmode_to_prompts_and_randoms(listmode: str | os.PathLike, geometry, start: float | None = None,
                                    end: float | None = None):
    """Prompts and the randoms estimate on ``geometry`` from a Siemens listmode file, frame ``[start, end)``.

    Prompts: :func:`sirf_ddip.physics.histogram.histogram_listmode` (STIR ``lm_to_projdata``); randoms:
    :func:`sirf_ddip.physics.randoms.estimate_randoms` (STIR's ML singles from the delayeds' fan sums, then
    singles-product randoms, as SIRF's ``ListmodeToSinograms.estimate_randoms``).

    Returns
    -------
    (ProjData, ProjData)
        Prompts and the randoms estimate on ``geometry``.
    """
    from ..physics.histogram import histogram_listmode
    from ..physics.randoms import estimate_randoms

    prompts = histogram_listmode(listmode, geometry, start=start, end=end, events="prompts").to_projdata()
    randoms, _, _ = estimate_randoms(listmode, geometry, start=start, end=end)
    return prompts, randoms


# ------------------------------------------------------------------------------------------- writing
def _umask_mode(path: str) -> None:
    """Give a mkstemp file (0600) the mode an ordinary open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _stem(p: Path) -> str:
    return p.name[:-len(p.suffix)] if p.suffix else p.name


def _input_files(*inputs: str | None) -> dict[Path, str]:
    """The input files (resolved) of a command and the Interfile data files their headers name, each mapped to
    how the user named it, so that no output can replace one of them."""
    from ..errors import SirfDdipError
    from ..io.header import InterfileHeader

    out: dict[Path, str] = {}
    for i in inputs:
        if not i:
            continue
        p = Path(i)
        out.setdefault(p.resolve(), i)
        if p.is_file() and p.suffix.lower() in (".hs", ".hv", ".hdr", ".h33"):
            try:
                d = InterfileHeader.read(p).data_file()
            except (SirfDdipError, OSError, ValueError):
                continue  # read again (and the error named) when the input is used
            out.setdefault(d.resolve(), f"{d} (the data file of {i})")
    return out


def _check_outputs(files: list[Path], overwrite: bool, inputs: dict[Path, str], option: str) -> None:
    """Every file the command writes can be written as a new file or (``--overwrite``) replace an old output:
    no folder or file in the way, none written twice, none an input (also through a link). Creates nothing."""
    from ..errors import OutputPathError
    from ..utils.provenance import check_output_path

    seen: dict[Path, Path] = {}
    for f in files:
        key = f.resolve()
        if key in seen:
            raise OutputPathError(f, f"written twice (also {seen[key]})", option)
        seen[key] = f
        if key in inputs:
            raise OutputPathError(f, f"is also an input ({inputs[key]}); choose another output name", option)
        check_output_path(f, overwrite, option)


def _record_text(command: str, params: dict[str, Any], timing: dict[str, float], warned: list[str]) -> str:
    from ..utils.provenance import _jsonable, versions

    rec = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": ["sirf-ddip", *sys.argv[1:]],
           "subcommand": command, "config": _jsonable(params), "warnings": list(warned), "timing_s": timing,
           "versions": versions()}
    return json.dumps(rec, indent=2, default=str)


def _write_set(projdata: dict[Path, Any], texts: dict[Path, str], overwrite: bool, figure=None) -> None:
    """Write every output as one set: all to temporary names in their folder, then renamed (data files, headers,
    the figure, the records last); on any failure nothing is renamed and the old outputs are unchanged.

    ``projdata`` maps each ``.hs`` to its ProjData; ``figure`` is ``(png_path, draw(tmp_path))`` or None.
    """
    import numpy as np

    from ..io.header import HEADER_ENCODING
    from ..io.interfile import projdata_file_contents
    from ..utils.atomic import atomic_paths

    data = [h.with_suffix(".s") for h in projdata]
    finals = data + list(projdata) + ([figure[0]] if figure else []) + list(texts)
    if overwrite:
        for f in finals:
            if f.exists():
                print(f"note: overwriting existing {f}", file=sys.stderr)
    with atomic_paths(*finals) as tmps:
        n = len(projdata)
        for (hs, pd), t_data, t_hdr in zip(projdata.items(), tmps[:n], tmps[n:2 * n]):
            flat, lines = projdata_file_contents(pd, hs.with_suffix(".s").name, hs)
            with open(t_data, "wb") as f:
                step = 1 << 24
                for i in range(0, flat.size, step):
                    f.write(np.ascontiguousarray(flat[i:i + step], dtype="<f4").tobytes())
            with open(t_hdr, "wb") as f:
                f.write(("\n".join(lines) + "\n").encode(HEADER_ENCODING))
            del flat
        k = 2 * n
        if figure:
            figure[1](tmps[k])
            _umask_mode(str(tmps[k]))
            k += 1
        for t, text in zip(tmps[k:], texts.values()):
            with open(t, "wb") as f:
                f.write(text.encode("utf-8"))


def _hs_outputs(out: Path, overwrite: bool, inputs: dict[Path, str]) -> tuple[Path, Path]:
    """Check an output ``.hs`` (suffix; it, its ``.s`` and its run record writable, absent unless ``overwrite``,
    none an input) before any work is done; returns ``(out, run record)``."""
    from ..errors import OutputPathError

    if out.suffix.lower() != ".hs":
        raise OutputPathError(out, "output projection data must end in .hs", "--out")
    record = out.parent / f"{_stem(out)}_run_record.json"
    _check_outputs([out.with_suffix(".s"), out, record], overwrite, inputs, "--out")
    return out, record


# ------------------------------------------------------------------------------------------- register
def register(subparsers) -> None:
    """Add ``norm``, ``attenuation`` and ``prepare`` to the ``sirf-ddip`` parser."""
    p = subparsers.add_parser("norm", help="detection efficiencies from a Siemens ECAT8 norm (.n.hdr)",
                              description="Detection efficiencies (1/normalisation factors) from a Siemens "
                                          "component-based normalisation (ECAT8 .n.hdr + .n) on the geometry "
                                          "of a template sinogram, as STIR's BinNormalisationFromECAT8 "
                                          "computes them (default components; detector gaps at 0).")
    p.add_argument("norm", metavar="NORM.n.hdr", help="Siemens normalisation header (its data file: .n)")
    p.add_argument("--template", required=True, metavar="T.hs", help=f"sinogram template ({TEMPLATE_HELP})")
    p.add_argument("--out", required=True, metavar="EFF.hs", help="output efficiencies (.hs)")
    p.add_argument("--no", action="append", default=[], choices=_COMPONENT_NAMES, metavar="COMPONENT",
                   help=f"switch a component off (repeatable): {', '.join(_COMPONENT_NAMES)}")
    p.add_argument("--plain-mashing", action="store_true",
                   help="weight mashed views equally (STIR weights the i-th mashed view by mash - i)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--strict", action="store_true",
                   help="refuse a norm that STIR reads with warnings (a data file longer than its components, "
                        "NaN/Inf in the unused components 5-8)")
    p.set_defaults(func=run_norm)

    p = subparsers.add_parser("attenuation", help="attenuation factors exp(-line integral of mu) from a mu-map",
                              description="Attenuation factors exp(-∫μ) (≤ 1) from a μ-map on the geometry of a "
                                          "template sinogram, with the engine's ray-tracing projector "
                                          "(STIR's BinNormalisationFromAttenuationImage).")
    _add_mu_args(p, positional=True)
    p.add_argument("--template", required=True, metavar="T.hs", help=f"sinogram template ({TEMPLATE_HELP})")
    p.add_argument("--out", required=True, metavar="ATT.hs", help="output attenuation factors (.hs)")
    p.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run_attenuation)

    p = subparsers.add_parser("prepare", help="prompts + norm + mu-map (+ randoms, scatter) -> PETRIC layout",
                              description="Prepare a study for reconstruction in the PETRIC layout: prompts.hs, "
                                          "mult_factors.hs (= norm efficiencies x attenuation factors) and "
                                          "additive_term.hs (= (randoms + scatter) / mult_factors).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="P.hs",
                     help=f"an existing prompts sinogram (defines the geometry; {DATA_HELP})")
    src.add_argument("--listmode", metavar="LM.l.hdr", help="a Siemens listmode file (needs --template)")
    p.add_argument("--template", metavar="T.hs",
                   help=f"sinogram template (required with --listmode; {TEMPLATE_HELP})")
    p.add_argument("--start", type=float, default=None, metavar="S", help="listmode frame start (s)")
    p.add_argument("--end", type=float, default=None, metavar="E", help="listmode frame end (s)")
    p.add_argument("--norm", required=True, metavar="NORM.n.hdr", help="Siemens ECAT8 normalisation")
    _add_mu_args(p, positional=False)
    p.add_argument("--randoms", metavar="R.hs", help="randoms sinogram (default with --listmode: estimated from "
                                                     f"the delayeds; {DATA_HELP})")
    p.add_argument("--scatter", metavar="SC.hs",
                   help=f"scatter sinogram (counts, same geometry; {DATA_HELP}); default: estimated from the "
                        "prompts, randoms, norm and μ-map (STIR's ScatterEstimation)")
    from .scatter import add_prepare_arguments

    add_prepare_arguments(p)  # --no-scatter, --scatter-iterations, --energy-window-from-scanner
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-png", action="store_true", help="do not write prepare.png")
    p.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (as one set)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a norm or listmode that STIR reads with warnings (a data file longer than its components, "
                        "NaN/Inf in the unused components 5-8)")
    p.set_defaults(func=run_prepare)


def _add_mu_args(p: argparse.ArgumentParser, positional: bool) -> None:
    from ..io.mumap import MU_UNITS

    if positional:
        p.add_argument("mu", metavar="MU", help="μ-map: .hv (STIR), .nii/.nii.gz, or Siemens .v.hdr")
    else:
        p.add_argument("--mu", required=True, metavar="MU", help="μ-map: .hv (STIR), .nii/.nii.gz, or Siemens .v.hdr")
    p.add_argument("--mu-units", default="cm-1", choices=sorted(MU_UNITS),
                   help="units of the μ-map values (default cm-1, as STIR); checked against the value range")
    p.add_argument("--image-template", default=None, metavar="IMG.hv",
                   help="resample the μ-map onto this image's grid first (default: the μ-map's own grid)")


# ------------------------------------------------------------------------------------------- pieces
def _efficiencies(norm_path: str, geometry, off=(), plain_mashing=False):
    from ..io.siemens_norm import read_ecat8_norm
    from ..physics.normalisation import NormComponents, ecat8_efficiencies
    from ..utils.checks import require_finite

    norm = read_ecat8_norm(norm_path)
    comps = NormComponents.from_names(off)
    eff = ecat8_efficiencies(norm, geometry, comps, stir_mashing=not plain_mashing)
    require_finite(eff, norm_path, "efficiencies computed from the norm components")  # the components are checked
    if not float(eff.max()) > 0:
        from ..errors import DataValueError

        raise DataValueError(f"{norm_path}: every efficiency on the template's bins is 0 (components "
                             f"{', '.join(k for k, v in comps.__dict__.items() if v)})")
    return eff, norm, comps


def _attenuation(args, geometry, progress_desc="attenuation"):
    from ..io import read_image
    from ..io.mumap import check_mu_in_fov, read_mu_map
    from ..physics.attenuation import attenuation_factors
    from ..utils.checks import require_finite
    from ..utils.progress import progress

    mu = read_mu_map(args.mu, units=args.mu_units)
    fov = check_mu_in_fov(mu, geometry.scanner, args.mu)
    grid = read_image(args.image_template).grid if args.image_template else None
    bar = progress(total=None, desc=progress_desc)
    try:
        def tick(done, total):
            bar.total = total
            bar.update(1)

        att = attenuation_factors(mu, geometry, grid=grid, device=args.device, progress=tick)
    finally:
        bar.close()
    require_finite(att.array, args.mu, "attenuation factors")
    att.meta["mu_fraction_in_fov"] = fov
    return att, mu


def run_norm(args) -> int:
    import numpy as np

    from ..data import ProjData
    from ..utils.leniency import collect_input_warnings, strict_inputs

    out, record = _hs_outputs(Path(args.out), args.overwrite, _input_files(args.template, args.norm))
    t0 = time.perf_counter()
    with strict_inputs(args.strict), collect_input_warnings("sirf-ddip norm") as warned:
        geom = read_template_geometry(args.template)
        eff, norm, comps = _efficiencies(args.norm, geom, args.no, args.plain_mashing)
    t1 = time.perf_counter()
    params = {"norm": args.norm, "template": args.template, "out": str(out), "components": comps.__dict__,
              "stir_mashing": not args.plain_mashing, "scanner": norm.scanner.name, "norm_version": norm.version,
              "strict": args.strict, "geometry": geom.describe(), "zero_fraction": float(np.mean(eff == 0))}
    text = _record_text("norm", params, {"compute": t1 - t0, "total": time.perf_counter() - t0}, warned)
    _write_set({out: ProjData(eff, geom)}, {record: text}, args.overwrite)
    note = f", {len(warned)} warning(s), see the run record" if warned else ""
    print(f"wrote {out} (efficiencies {float(eff.min()):.4g}..{float(eff.max()):.4g}, "
          f"{100 * float(np.mean(eff == 0)):.1f} % of bins in detector gaps{note})", file=sys.stderr)
    return 0


def run_attenuation(args) -> int:
    from ..utils.leniency import collect_input_warnings

    out, record = _hs_outputs(Path(args.out), args.overwrite,  # fail before the long computation
                              _input_files(args.template, args.mu, args.image_template))
    t0 = time.perf_counter()
    with collect_input_warnings("sirf-ddip attenuation") as warned:
        geom = read_template_geometry(args.template)
        att, mu = _attenuation(args, geom)
    t1 = time.perf_counter()
    params = {"mu": args.mu, "mu_units": args.mu_units, "mu_max_cm-1": float(mu.array.max()),
              "template": args.template, "out": str(out), "geometry": geom.describe(), **att.meta}
    text = _record_text("attenuation", params, {"compute": t1 - t0, "total": time.perf_counter() - t0}, warned)
    _write_set({out: att}, {record: text}, args.overwrite)
    note = f", {len(warned)} warning(s), see the run record" if warned else ""
    print(f"wrote {out} (attenuation factors {float(att.array.min()):.4g}..{float(att.array.max()):.4g}{note})",
          file=sys.stderr)
    return 0


def _same_geometry(pd, geom, what: str, path: str) -> None:
    from ..errors import GeometryMismatchError

    if not pd.geometry.matches(geom):
        g = pd.geometry
        tof = ""
        if g.tof_mash_factor != geom.tof_mash_factor:  # TOF data and non-TOF, or other TOF bins: never summed
            tof = f" [key 'TOF mashing factor']: {g.tof_summary()}, the prompts {geom.tof_summary()};"
        raise GeometryMismatchError(f"{what} {path}{tof} [{g.describe()}] does not match the prompts' geometry "
                                    f"[{geom.describe()}]")


def additive_term(background, mult):
    """``background / mult`` where ``mult > 0``, else 0 (detector gaps: no counts are expected there).

    Computed in float64; a quotient beyond float32 (a background over a vanishing factor) is a
    :class:`~sirf_ddip.errors.DataValueError`, never an Inf.
    """
    import numpy as np

    out = np.zeros(np.shape(mult), dtype=np.float64)
    np.divide(np.asarray(background, dtype=np.float64), np.asarray(mult, dtype=np.float64), out=out,
              where=np.asarray(mult) > 0)
    big = float(out.max()) if out.size else 0.0
    if not big < float(np.finfo(np.float32).max):
        from ..errors import DataValueError

        k = np.unravel_index(int(np.argmax(out)), out.shape)
        raise DataValueError(f"additive term (randoms + scatter) / mult_factors is {big:.4g} at bin "
                             f"{[int(i) for i in k]} (mult_factors {float(np.asarray(mult)[k]):.4g}): beyond float32")
    return out.astype(np.float32)


def _check_prepare_args(args) -> None:
    """Argument errors, before anything is read or created."""
    from ..errors import ConfigError

    if args.listmode and not args.template:
        raise ConfigError("--listmode needs --template T.hs (the sinogram geometry to histogram into)")
    if not args.listmode and (args.start is not None or args.end is not None):
        raise ConfigError("--start/--end apply to --listmode only")
    if args.listmode:
        from .exports import _check_frame

        _check_frame(args)


def _prepare_outputs(args) -> tuple[Path, list[str], list[Path]]:
    """The output folder, the ``.hs`` names and every file ``prepare`` writes, checked before any work: the
    folder is not a file, no output exists unless ``--overwrite``, none is an input."""
    from ..errors import OutputPathError

    outdir = Path(args.out_dir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputPathError(outdir, "is a file, not a folder", "--out-dir")
    blocker = next((p for p in outdir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputPathError(outdir, f"cannot be created: {blocker} is a file, not a folder", "--out-dir")
    names = ["prompts.hs", "mult_factors.hs", "additive_term.hs"]
    if args.listmode and not args.randoms:
        names.append("randoms.hs")
    files = [outdir / n.replace(".hs", ".s") for n in names] + [outdir / n for n in names]
    if not args.no_png:
        files.append(outdir / "prepare.png")
    files.append(outdir / "prepare_record.json")
    inputs = _input_files(args.prompts, args.listmode, args.template, args.norm, args.mu, args.image_template,
                          args.randoms, args.scatter)
    _check_outputs(files, args.overwrite, inputs, "--out-dir")
    return outdir, names, files


def run_prepare(args) -> int:
    import numpy as np

    from ..data import ProjData
    from ..errors import DataValueError
    from ..io import read_projdata
    from ..utils.checks import require_finite
    from ..utils.leniency import collect_input_warnings, strict_inputs

    _check_prepare_args(args)
    outdir, names, _ = _prepare_outputs(args)
    t0 = time.perf_counter()
    notes: list[str] = []
    randoms = None
    with strict_inputs(args.strict), collect_input_warnings("sirf-ddip prepare") as warned:
        if args.listmode:
            geom = read_template_geometry(args.template)
            prompts, randoms = listmode_to_prompts_and_randoms(args.listmode, geom, args.start, args.end)
            randoms_src = f"estimated from the delayeds of {args.listmode}"
        else:
            prompts = read_projdata(args.prompts)
            geom = prompts.geometry
            if args.template:
                tg = read_template_geometry(args.template)
                if not tg.matches(geom):
                    from ..errors import GeometryMismatchError

                    raise GeometryMismatchError(f"template {args.template} [{tg.describe()}] does not match the "
                                                f"prompts {args.prompts} [{geom.describe()}]")
            randoms_src = None
        from .scatter import prepare_energy_window, prepare_scatter

        window, window_src = prepare_energy_window(args, geom)  # before the long work
        if window is not None:
            prompts.meta["energy_window_kev"] = window
        if args.randoms:
            randoms = read_projdata(args.randoms)
            _same_geometry(randoms, geom, "randoms", args.randoms)
            randoms_src = args.randoms
        if randoms is None:
            notes.append("NO RANDOMS estimate was given: the additive term has no randoms")
        scatter = None
        if args.scatter:
            scatter = read_projdata(args.scatter)
            _same_geometry(scatter, geom, "scatter", args.scatter)
        elif args.no_scatter:
            notes.append("NO SCATTER estimate was given (--no-scatter): additive_term = randoms / mult_factors only "
                         "(scatter is not corrected)")
        for what, pd, src in (("prompts", prompts, args.prompts or args.listmode), ("randoms", randoms, randoms_src),
                              ("scatter", scatter, args.scatter)):
            if pd is not None and (not np.all(np.isfinite(pd.array)) or float(pd.array.min()) < 0):
                raise DataValueError(f"{src}: {what} have NaN/Inf or negative values")
        t1 = time.perf_counter()
        eff, norm, comps = _efficiencies(args.norm, geom)
        t2 = time.perf_counter()
        att, mu = _attenuation(args, geom)
        scatter_rec, scatter_fig = args.scatter, None
        if scatter is None and not args.no_scatter:
            scatter, scatter_rec, scatter_fig = prepare_scatter(args, prompts, randoms, eff, att, mu, window,
                                                                window_src)
    att_meta = dict(att.meta)
    t3 = time.perf_counter()
    k = _figure_sinogram(geom)
    eff_k, att_k = eff[k].copy(), att.array[k].copy()  # for the figure; the full arrays are freed below
    mult = eff.astype(np.float32, copy=False)
    mult *= att.array  # mult = efficiencies x attenuation, in place (memory: a full mMR span-11 array is 290 MB)
    del eff, att
    require_finite(mult, f"{args.norm} x {args.mu}", "mult_factors")
    background = np.zeros(geom.shape, dtype=np.float32)
    if randoms is not None:
        background += randoms.array
    if scatter is not None:
        background += scatter.array
    add = additive_term(background, mult)
    lost = float(background[mult == 0].sum())
    del background
    if lost > 0:
        notes.append(f"{lost:.6g} background counts fall in bins with mult_factors = 0 (detector gaps); "
                     "their additive term is set to 0")
    outputs = {outdir / "prompts.hs": ProjData(prompts.array.astype(np.float32), geom,
                                               {k: v for k, v in prompts.meta.items() if k == "energy_window_kev"}),
               outdir / "mult_factors.hs": ProjData(mult, geom), outdir / "additive_term.hs": ProjData(add, geom)}
    if "randoms.hs" in names:
        outputs[outdir / "randoms.hs"] = ProjData(randoms.array.astype(np.float32), geom)
    png = None if args.no_png else outdir / "prepare.png"
    params = {
        "prompts": args.prompts, "listmode": args.listmode, "start_s": args.start, "end_s": args.end,
        "template": args.template, "norm": args.norm, "norm_scanner": norm.scanner.name,
        "norm_version": norm.version, "norm_components": comps.__dict__, "mu": args.mu, "mu_units": args.mu_units,
        "mu_max_cm-1": float(mu.array.max()), "image_template": args.image_template, "randoms": randoms_src,
        "attenuation": att_meta, "strict": args.strict,
        "scatter": scatter_rec, "outputs": [str(outdir / n) for n in names] + ([str(png)] if png else []),
        "geometry": geom.describe(), "notes": notes,
        "totals": {"prompts": float(prompts.array.sum()),
                   "randoms": float(randoms.array.sum()) if randoms is not None else None,
                   "scatter": float(scatter.array.sum()) if scatter is not None else None},
        "conventions": "expected counts = mult_factors * (A x + additive_term); mult_factors = norm efficiencies x "
                       "attenuation factors; additive_term = (randoms + scatter) / mult_factors, 0 where mult = 0",
    }
    text = _record_text("prepare", params, {"inputs": t1 - t0, "norm": t2 - t1, "attenuation": t3 - t2,
                                            "total": time.perf_counter() - t0}, warned)
    figure = None
    if png is not None:
        scatter_k = None if scatter_fig is None else scatter.array[k]
        figure = (png, lambda tmp: _figure(tmp, geom, k, prompts.array[k], eff_k, att_k, mult[k], add[k], notes,
                                           scatter_k, scatter_fig))
    _write_set(outputs, {outdir / "prepare_record.json": text}, args.overwrite, figure)
    for n in notes:
        print(f"sirf-ddip prepare: {n}", file=sys.stderr)
    print(f"wrote {', '.join(names)} to {outdir}", file=sys.stderr)
    return 0


def _figure_sinogram(geom) -> int:
    """The sinogram shown in the PNG: the central one of segment 0."""
    s0 = geom.segment_slice(0)
    return s0.start + (s0.stop - s0.start) // 2


def _figure(png: Path, geom, k: int, prompts, eff, att, mult, add, notes: list[str], scatter_k=None,
            scatter_fig=None) -> None:
    """Sinogram ``k`` (views x tangential) of each quantity, and tangential profiles, written to ``png``; with a
    scatter estimate a third row (:func:`sirf_ddip.cli.scatter.draw_scatter_row`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("prompts", prompts), ("norm efficiencies", eff), ("attenuation factors", att),
              ("mult_factors", mult), ("additive_term", add)]
    rows = 2 if scatter_fig is None else 3
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.5 * rows))
    for ax, (title, a) in zip(axes.flat, panels):
        im = ax.imshow(np.asarray(a), aspect="auto", cmap="gray" if title != "additive_term" else "magma")
        ax.set_title(f"{title} (sinogram {k}, segment 0)")
        ax.set_xlabel("tangential")
        ax.set_ylabel("view")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if scatter_fig is not None:
        from .scatter import draw_scatter_row

        draw_scatter_row(fig, axes[2], k, scatter_k, scatter_fig)
    ax = axes.flat[5]
    v = geom.num_views // 2
    for title, a in panels[1:]:
        prof = np.asarray(a[v], dtype=float)
        ax.plot(prof / max(prof.max(), 1e-30), label=title)
    ax.set_title(f"profiles (view {v}, normalised to max)")
    ax.legend(fontsize=7)
    fig.suptitle("sirf-ddip prepare" + ("\n" + "\n".join(notes) if notes else ""), fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(png, dpi=80, format="png")  # png: a temporary name of the output set (see _write_set)
    finally:
        plt.close(fig)
