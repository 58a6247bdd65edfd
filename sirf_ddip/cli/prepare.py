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

Outputs are written atomically: each file is written under a temporary name in the output folder and moved
into place (data file before header), so an interrupted run never leaves a half-written or replaced file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..io.template import DATA_HELP, TEMPLATE_HELP, read_template_geometry

__all__ = ["register", "listmode_to_prompts_and_randoms", "write_projdata_atomic"]

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
def _atomic_move_group(tmpdir: Path, names: list[str], dest: Path) -> None:
    for n in names:  # data files first, then headers, so a header never points to a partial data file
        os.replace(tmpdir / n, dest / n)


def write_projdata_atomic(path: str | os.PathLike, projdata, overwrite: bool = False) -> Path:
    """:func:`sirf_ddip.io.write_projdata` through a temporary folder next to ``path``, then ``os.replace``.

    Raises
    ------
    OutputExistsError
        If ``path`` or its data file exists and ``overwrite`` is False.
    """
    from ..io import write_projdata
    from ..utils.provenance import check_output

    path = Path(path)
    data = path.with_suffix(".s")
    check_output(path, overwrite)
    check_output(data, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.tmp", dir=path.parent))
    try:
        write_projdata(tmp / path.name, projdata, overwrite=True)
        _atomic_move_group(tmp, [data.name, path.name], path.parent)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return path


def _umask_mode(path: str) -> None:
    """Give a mkstemp file (0600) the mode an ordinary open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _record(path: Path, command: str, params: dict[str, Any], timing: dict[str, float], overwrite: bool) -> Path:
    from ..utils.provenance import _jsonable, check_output, versions

    check_output(path, overwrite)
    rec = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": ["sirf-ddip", *sys.argv[1:]],
           "subcommand": command, "config": _jsonable(params), "timing_s": timing, "versions": versions()}
    _write_text_atomic(path, json.dumps(rec, indent=2, default=str))
    return path


def _stem(p: Path) -> str:
    return p.name[:-len(p.suffix)] if p.suffix else p.name


def _check_hs(out: Path, overwrite: bool) -> Path:
    """Check an output ``.hs`` (suffix; it, its ``.s`` and its run record absent unless ``overwrite``) before any
    work is done; returns the run-record path."""
    from ..errors import InputFileError
    from ..utils.provenance import check_output

    if out.suffix.lower() != ".hs":
        raise InputFileError(out, "output projection data must end in .hs")
    record = out.parent / f"{_stem(out)}_run_record.json"
    for p in (out, out.with_suffix(".s"), record):
        check_output(p, overwrite)
    return record


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
                   help=f"scatter sinogram (counts, same geometry; {DATA_HELP}); none if absent")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-png", action="store_true", help="do not write prepare.png")
    p.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
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

    norm = read_ecat8_norm(norm_path)
    comps = NormComponents.from_names(off)
    return ecat8_efficiencies(norm, geometry, comps, stir_mashing=not plain_mashing), norm, comps


def _attenuation(args, geometry, progress_desc="attenuation"):
    from ..io import read_image
    from ..io.mumap import read_mu_map
    from ..physics.attenuation import attenuation_factors
    from ..utils.progress import progress

    mu = read_mu_map(args.mu, units=args.mu_units)
    grid = read_image(args.image_template).grid if args.image_template else None
    bar = progress(total=None, desc=progress_desc)
    try:
        def tick(done, total):
            bar.total = total
            bar.update(1)

        att = attenuation_factors(mu, geometry, grid=grid, device=args.device, progress=tick)
    finally:
        bar.close()
    return att, mu


def run_norm(args) -> int:
    import numpy as np

    from ..data import ProjData

    out = Path(args.out)
    record = _check_hs(out, args.overwrite)
    t0 = time.perf_counter()
    geom = read_template_geometry(args.template)
    eff, norm, comps = _efficiencies(args.norm, geom, args.no, args.plain_mashing)
    t1 = time.perf_counter()
    write_projdata_atomic(out, ProjData(eff, geom), overwrite=args.overwrite)
    _record(record, "norm",
            {"norm": args.norm, "template": args.template, "out": str(out), "components": comps.__dict__,
             "stir_mashing": not args.plain_mashing, "scanner": norm.scanner.name, "norm_version": norm.version,
             "geometry": geom.describe(), "zero_fraction": float(np.mean(eff == 0))},
            {"compute": t1 - t0, "total": time.perf_counter() - t0}, args.overwrite)
    print(f"wrote {out} (efficiencies {float(eff.min()):.4g}..{float(eff.max()):.4g}, "
          f"{100 * float(np.mean(eff == 0)):.1f} % of bins in detector gaps)", file=sys.stderr)
    return 0


def run_attenuation(args) -> int:
    out = Path(args.out)
    record = _check_hs(out, args.overwrite)  # fail before the long computation
    t0 = time.perf_counter()
    geom = read_template_geometry(args.template)
    att, mu = _attenuation(args, geom)
    t1 = time.perf_counter()
    write_projdata_atomic(out, att, overwrite=args.overwrite)
    _record(record, "attenuation",
            {"mu": args.mu, "mu_units": args.mu_units, "mu_max_cm-1": float(mu.array.max()),
             "template": args.template, "out": str(out), "geometry": geom.describe(), **att.meta},
            {"compute": t1 - t0, "total": time.perf_counter() - t0}, args.overwrite)
    print(f"wrote {out} (attenuation factors {float(att.array.min()):.4g}..{float(att.array.max()):.4g})",
          file=sys.stderr)
    return 0


def _same_geometry(pd, geom, what: str, path: str) -> None:
    from ..errors import GeometryMismatchError

    if not pd.geometry.matches(geom):
        raise GeometryMismatchError(f"{what} {path} [{pd.geometry.describe()}] does not match the prompts' geometry "
                                    f"[{geom.describe()}]")


def additive_term(background, mult):
    """``background / mult`` where ``mult > 0``, else 0 (detector gaps: no counts are expected there)."""
    import numpy as np

    out = np.zeros_like(mult, dtype=np.float32)
    np.divide(background, mult, out=out, where=mult > 0)
    return out


def run_prepare(args) -> int:
    import numpy as np

    from ..data import ProjData
    from ..errors import ConfigError, DataValueError
    from ..io import read_projdata
    from ..utils.provenance import check_output

    outdir = Path(args.out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    names = ["prompts.hs", "mult_factors.hs", "additive_term.hs"]
    if args.listmode and not args.randoms:
        names.append("randoms.hs")
    for n in names:
        check_output(outdir / n, args.overwrite)
        check_output(outdir / n.replace(".hs", ".s"), args.overwrite)
    check_output(outdir / "prepare_record.json", args.overwrite)
    if not args.no_png:
        check_output(outdir / "prepare.png", args.overwrite)
    t0 = time.perf_counter()
    notes: list[str] = []
    randoms = None
    if args.listmode:
        if not args.template:
            raise ConfigError("--listmode needs --template T.hs (the sinogram geometry to histogram into)")
        geom = read_template_geometry(args.template)
        prompts, randoms = listmode_to_prompts_and_randoms(args.listmode, geom, args.start, args.end)
        randoms_src = f"estimated from the delayeds of {args.listmode}"
    else:
        if args.start is not None or args.end is not None:
            raise ConfigError("--start/--end apply to --listmode only")
        prompts = read_projdata(args.prompts)
        geom = prompts.geometry
        if args.template:
            tg = read_template_geometry(args.template)
            if not tg.matches(geom):
                from ..errors import GeometryMismatchError

                raise GeometryMismatchError(f"template {args.template} [{tg.describe()}] does not match the prompts "
                                            f"{args.prompts} [{geom.describe()}]")
        randoms_src = None
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
    else:
        notes.append("NO SCATTER estimate was given: additive_term = randoms / mult_factors only "
                     "(scatter is not corrected; give --scatter SC.hs)")
    for what, pd, src in (("prompts", prompts, args.prompts or args.listmode), ("randoms", randoms, randoms_src),
                          ("scatter", scatter, args.scatter)):
        if pd is not None and (not np.all(np.isfinite(pd.array)) or float(pd.array.min()) < 0):
            raise DataValueError(f"{src}: {what} have NaN/Inf or negative values")
    t1 = time.perf_counter()
    eff, norm, comps = _efficiencies(args.norm, geom)
    t2 = time.perf_counter()
    att, mu = _attenuation(args, geom)
    att_meta = dict(att.meta)
    t3 = time.perf_counter()
    k = _figure_sinogram(geom)
    eff_k, att_k = eff[k].copy(), att.array[k].copy()  # for the figure; the full arrays are freed below
    mult = eff.astype(np.float32, copy=False)
    mult *= att.array  # mult = efficiencies x attenuation, in place (memory: a full mMR span-11 array is 290 MB)
    del eff, att
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
    write_projdata_atomic(outdir / "prompts.hs", ProjData(prompts.array.astype(np.float32), geom), args.overwrite)
    write_projdata_atomic(outdir / "mult_factors.hs", ProjData(mult, geom), args.overwrite)
    write_projdata_atomic(outdir / "additive_term.hs", ProjData(add, geom), args.overwrite)
    if "randoms.hs" in names:
        write_projdata_atomic(outdir / "randoms.hs", ProjData(randoms.array.astype(np.float32), geom), args.overwrite)
    png = None
    if not args.no_png:
        png = outdir / "prepare.png"
        check_output(png, args.overwrite)
        _figure(png, geom, k, prompts.array[k], eff_k, att_k, mult[k], add[k], notes)
    params = {
        "prompts": args.prompts, "listmode": args.listmode, "start_s": args.start, "end_s": args.end,
        "template": args.template, "norm": args.norm, "norm_scanner": norm.scanner.name,
        "norm_version": norm.version, "norm_components": comps.__dict__, "mu": args.mu, "mu_units": args.mu_units,
        "mu_max_cm-1": float(mu.array.max()), "image_template": args.image_template, "randoms": randoms_src,
        "attenuation": att_meta,
        "scatter": args.scatter, "outputs": [str(outdir / n) for n in names] + ([str(png)] if png else []),
        "geometry": geom.describe(), "notes": notes,
        "totals": {"prompts": float(prompts.array.sum()),
                   "randoms": float(randoms.array.sum()) if randoms is not None else None,
                   "scatter": float(scatter.array.sum()) if scatter is not None else None},
        "conventions": "expected counts = mult_factors * (A x + additive_term); mult_factors = norm efficiencies x "
                       "attenuation factors; additive_term = (randoms + scatter) / mult_factors, 0 where mult = 0",
    }
    _record(outdir / "prepare_record.json", "prepare", params,
            {"inputs": t1 - t0, "norm": t2 - t1, "attenuation": t3 - t2, "total": time.perf_counter() - t0},
            args.overwrite)
    for n in notes:
        print(f"sirf-ddip prepare: {n}", file=sys.stderr)
    print(f"wrote {', '.join(names)} to {outdir}", file=sys.stderr)
    return 0


def _figure_sinogram(geom) -> int:
    """The sinogram shown in the PNG: the central one of segment 0."""
    s0 = geom.segment_slice(0)
    return s0.start + (s0.stop - s0.start) // 2


def _figure(png: Path, geom, k: int, prompts, eff, att, mult, add, notes: list[str]) -> None:
    """Sinogram ``k`` (views x tangential) of each quantity, and tangential profiles (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("prompts", prompts), ("norm efficiencies", eff), ("attenuation factors", att),
              ("mult_factors", mult), ("additive_term", add)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, a) in zip(axes.flat, panels):
        im = ax.imshow(np.asarray(a), aspect="auto", cmap="gray" if title != "additive_term" else "magma")
        ax.set_title(f"{title} (sinogram {k}, segment 0)")
        ax.set_xlabel("tangential")
        ax.set_ylabel("view")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes.flat[5]
    v = geom.num_views // 2
    for title, a in panels[1:]:
        prof = np.asarray(a[v], dtype=float)
        ax.plot(prof / max(prof.max(), 1e-30), label=title)
    ax.set_title(f"profiles (view {v}, normalised to max)")
    ax.legend(fontsize=7)
    fig.suptitle("sirf-ddip prepare" + ("\n" + "\n".join(notes) if notes else ""), fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".prepare.", suffix=".png", dir=png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        _umask_mode(tmp)
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
