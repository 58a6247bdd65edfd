"""``sirf-ddip scatter simulate`` and ``sirf-ddip scatter estimate``: STIR's single scatter simulation and its
scatter estimation loop from the command line.

- ``sirf-ddip scatter simulate --activity ACT.hv --mu MU.hv --template T.hs --out S.hs``: the *unscaled* single
  scatter simulation of ``ACT`` in ``MU`` (cm⁻¹, units checked from the value range) on the template's geometry,
  as STIR's ``simulate_scatter`` with that template (STIR's output scale: see
  :mod:`sirf_ddip.physics.scatter`); ``--downsample`` first reduces the template to STIR's down-sampled scatter
  scanner (``downsample scanner := 1``). The energy window comes from the template's header.
- ``sirf-ddip scatter estimate --prompts P.hs --norm EFF.hs --mu MU.hv --randoms R.hs --out S.hs
  [--iterations N] [--export-iterations DIR]``: the scatter sinogram in prompt counts on the prompts' geometry
  (STIR's ``ScatterEstimation``), so that ``additive_term = (randoms + scatter) / mult_factors``; the attenuation
  factors are computed from the μ-map as ``sirf-ddip attenuation`` does; the energy window comes from the prompts'
  header (``--energy-window-from-scanner`` takes the scanner's default window instead, only when asked).

Each writes ``S.hs``/``S.s`` atomically and ``S_run_record.json`` (provenance); existing outputs are refused
unless ``--overwrite``. Bad input is a one-line error naming the file and the key (exit 2).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..io.template import DATA_HELP, TEMPLATE_HELP

__all__ = ["register", "run_simulate", "run_estimate", "check_scanner_matches_images"]


# ------------------------------------------------------------------------------------------- register
def register(subparsers) -> None:
    """Add ``scatter simulate`` and ``scatter estimate`` to the ``sirf-ddip`` parser."""
    from ..io.mumap import MU_UNITS

    p = subparsers.add_parser("scatter", help="single scatter simulation / scatter estimation (STIR's SSS)",
                              description="STIR's single scatter simulation (Watson's model) and its scatter "
                                          "estimation loop (ScatterEstimation).")
    sub = p.add_subparsers(dest="scatter_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("simulate", help="unscaled single scatter simulation on a template (STIR simulate_scatter)",
                       description="The unscaled single scatter simulation of an activity image in a μ-map (cm⁻¹) on "
                                   "the geometry of a template, as STIR's simulate_scatter.")
    s.add_argument("--activity", required=True, metavar="ACT.hv", help="activity image (any units; linear in it)")
    s.add_argument("--mu", required=True, metavar="MU.hv", help="μ-map (.hv, .nii/.nii.gz or Siemens .v.hdr)")
    s.add_argument("--mu-units", default="cm-1", choices=sorted(MU_UNITS),
                   help="units of the μ-map values (default cm-1, as STIR); checked against the value range")
    s.add_argument("--template", required=True, metavar="T.hs",
                   help=f"template sinogram: the geometry and energy window of the output ({TEMPLATE_HELP})")
    s.add_argument("--out", required=True, metavar="S.hs", help="output scatter sinogram (.hs)")
    s.add_argument("--downsample", action="store_true",
                   help="simulate on STIR's down-sampled scatter scanner of the template (STIR's "
                        "'downsample scanner := 1'); the output then has that geometry")
    s.add_argument("--attenuation-threshold", type=float, default=0.01, metavar="MU",
                   help="μ (cm⁻¹) from which a down-sampled voxel is a scatter point (STIR's default 0.01)")
    _add_window_args(s)
    s.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda, ...")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.set_defaults(func=run_simulate, command="scatter simulate")

    e = sub.add_parser("estimate", help="scatter estimate in prompt counts (STIR ScatterEstimation)",
                       description="STIR's scatter estimation: 2D OSEM, single scatter simulation on the down-sampled "
                                   "scanner, up-sampling and tail fit, iterated; the output is the scatter in prompt "
                                   "counts on the prompts' geometry.")
    e.add_argument("--prompts", required=True, metavar="P.hs", help=f"prompts sinogram ({DATA_HELP})")
    e.add_argument("--norm", required=True, metavar="EFF.hs",
                   help=f"detection efficiencies on the prompts' geometry (sirf-ddip norm; {DATA_HELP})")
    e.add_argument("--mu", required=True, metavar="MU.hv", help="μ-map (.hv, .nii/.nii.gz or Siemens .v.hdr)")
    e.add_argument("--mu-units", default="cm-1", choices=sorted(MU_UNITS),
                   help="units of the μ-map values (default cm-1, as STIR); checked against the value range")
    e.add_argument("--randoms", required=True, metavar="R.hs", help=f"randoms sinogram, counts ({DATA_HELP})")
    e.add_argument("--out", required=True, metavar="S.hs", help="output scatter sinogram (.hs, prompt counts)")
    e.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="scatter iterations (STIR's default 5)")
    e.add_argument("--export-iterations", default=None, metavar="DIR",
                   help="write each iteration's scatter estimate to DIR (scatter_estimate_<k>.hs)")
    _add_window_args(e)
    e.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda, ...")
    e.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    e.set_defaults(func=run_estimate, command="scatter estimate")


def _add_window_args(p) -> None:
    p.add_argument("--energy-window-from-scanner", action="store_true",
                   help="when the header has no energy window, use the scanner's default one (e.g. 430-610 keV "
                        "for the mMR); without it a missing window is an error")


# ------------------------------------------------------------------------------------------- checks
def energy_window_for(path: str, scanner_name: str, from_scanner: bool) -> tuple[tuple[float, float], str]:
    """The energy window of the data at ``path`` (its header), or the scanner's when the header has none and
    ``from_scanner``. Returns ``(window, source)``."""
    from ..io.energy_window import energy_window_from_header, scanner_energy_window

    window = energy_window_from_header(path, required=not from_scanner)
    if window is not None:
        return window, f"header of {path}"
    window = scanner_energy_window(scanner_name, path)
    print(f"sirf-ddip scatter: {path} has no energy window; using the default of {scanner_name} "
          f"({window[0]:g}-{window[1]:g} keV) as asked (--energy-window-from-scanner)", file=sys.stderr)
    return window, f"default of {scanner_name}"


def _canonical_scanner(name: str | None) -> str | None:
    from ..geometry.scanner import get_scanner

    if not name or name.strip().lower() in ("unknown", "userdefined", "user defined"):
        return None
    try:
        return get_scanner(name.strip()).name
    except KeyError:
        return None


def check_scanner_matches_images(template_path: str, geometry, images: dict[str, object], axial: bool = True) -> None:
    """Refuse a template of another scanner than the images': a scanner named in an image header
    (``originating system``) that is not the template's, or an object reaching outside the template's detector
    ring or axial field of view.

    Parameters
    ----------
    template_path : the template (named in the errors).
    geometry : its :class:`~sirf_ddip.geometry.sinogram.SinogramGeometry`.
    images : ``{path: Image}`` of the activity (first) and μ-map.
    axial : also refuse a first image (a reconstruction) longer than the scanner's axial field of view.

    Raises
    ------
    GeometryMismatchError
        Naming the template, its scanner, the image and what does not fit.
    """
    import numpy as np

    from ..errors import GeometryMismatchError
    from ..io.mumap import _scanner_coords

    sc = geometry.scanner
    tname = _canonical_scanner(sc.name)
    for path, img in images.items():
        iname = _canonical_scanner(img.meta.get("originating system"))
        if tname and iname and iname != tname:
            raise GeometryMismatchError(f"template {template_path} is of scanner {tname!r} but {path} says "
                                        f"'originating system := {iname}': a template of another scanner")
    radius = sc.effective_radius_mm
    half_length = sc.num_rings * sc.ring_spacing_mm / 2.0
    for path, img in images.items():
        arr = np.asarray(img.array)
        nz = arr > 0
        if not nz.any():
            continue
        z, y, x = (_scanner_coords(img.grid, a) for a in range(3))
        ky, kx = np.nonzero(nz.any(axis=0))
        r = float(np.hypot(y[ky] + np.sign(y[ky]) * img.grid.voxel_size[1] / 2,
                           x[kx] + np.sign(x[kx]) * img.grid.voxel_size[2] / 2).max())
        if r >= radius:
            raise GeometryMismatchError(f"{path} has values up to {r:.1f} mm from the scanner axis, outside the "
                                        f"detector ring ({radius:.1f} mm) of the scanner {sc.name!r} of template "
                                        f"{template_path}: a template of another scanner?")
    if not axial:
        return
    # a reconstruction (the activity) spans the scanner's axial field of view; a much longer one is another scanner's
    path, act = next(iter(images.items()))
    length = act.grid.shape[0] * act.grid.voxel_size[0]
    if length > 2 * half_length + 2 * sc.ring_spacing_mm + 1e-3:
        raise GeometryMismatchError(f"{path} is {length:.1f} mm long axially, more than the axial field of view "
                                    f"({2 * half_length:.1f} mm) of the scanner {sc.name!r} of template "
                                    f"{template_path}: a template of another scanner?")


def _read_mu(path: str, units: str):
    from ..io.mumap import read_mu_map

    return read_mu_map(path, units=units)


# ------------------------------------------------------------------------------------------- simulate
def run_simulate(args) -> int:
    """``sirf-ddip scatter simulate``."""
    from ..data import ProjData
    from ..errors import GeometryError, GeometryMismatchError, InputFileError
    from ..io import read_image
    from ..io.template import read_template_geometry
    from ..physics import scatter_simulation as ss
    from .prepare import _hs_outputs, _input_files, _record_text, _write_set

    out, record = _hs_outputs(Path(args.out), args.overwrite,  # fail before any work
                              _input_files(args.activity, args.mu, args.template))
    t0 = time.perf_counter()
    geom = read_template_geometry(args.template)
    activity = read_image(args.activity)
    mu = _read_mu(args.mu, args.mu_units)
    check_scanner_matches_images(args.template, geom, {args.activity: activity, args.mu: mu})
    window, window_src = energy_window_for(args.template, geom.scanner.name, args.energy_window_from_scanner)
    if not args.attenuation_threshold >= 0:
        raise InputFileError(args.template, f"--attenuation-threshold must be >= 0 cm⁻¹, got "
                             f"{args.attenuation_threshold}")
    template = ss.downsample_scanner(geom) if args.downsample else geom
    try:
        ss.energy_resolution_of(template.scanner)
    except GeometryError as exc:
        raise InputFileError(args.template, str(exc), key="Energy resolution") from None
    t1 = time.perf_counter()
    try:
        sim = ss.ScatterSimulator(mu, template, window, attenuation_threshold=args.attenuation_threshold,
                                  device=args.device)
    except GeometryError as exc:
        raise InputFileError(args.template, f"{exc} (give --downsample to simulate on STIR's down-sampled scatter "
                             "scanner of this template)") from None
    try:
        est = sim.simulate(activity)
    except GeometryMismatchError as exc:
        raise GeometryMismatchError(f"μ-map {args.mu} and activity {args.activity}: {exc}") from None
    t2 = time.perf_counter()
    out_pd = ProjData(est.array, template, {"energy_window_kev": window})
    total = float(est.array.sum(dtype="float64"))
    params = {"activity": args.activity, "mu": args.mu, "mu_units": args.mu_units,
              "mu_max_cm-1": float(mu.array.max()), "template": args.template, "out": str(out),
              "downsample": bool(args.downsample), "geometry": template.describe(),
              "energy_window_kev": list(window), "energy_window_source": window_src,
              "energy_resolution": sim.energy_resolution, "reference_energy_kev": sim.reference_energy_kev,
              "attenuation_threshold_cm-1": args.attenuation_threshold, "scatter_points": sim.num_scatter_points,
              "scatter_point_grid": sim.scatter_grid.describe(), "total": total,
              "units": "STIR's normalised single scatter estimate (unscaled; activity path lengths in voxels)"}
    text = _record_text("scatter simulate", params,
                        {"inputs": t1 - t0, "simulate": t2 - t1, "total": time.perf_counter() - t0}, [])
    _write_set({out: out_pd}, {record: text}, args.overwrite)
    print(f"wrote {out} ({sim.num_scatter_points} scatter points, total {total:.6g}, {t2 - t1:.1f} s)",
          file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- estimate
def check_input_values(path: str, array, what: str) -> None:
    """NaN/Inf or negative values in a sinogram the estimate reads are a :class:`DataValueError` naming the file."""
    import numpy as np

    from ..errors import DataValueError

    a = np.asarray(array)
    if not np.all(np.isfinite(a)):
        raise DataValueError(f"{path}: {what} have NaN or Inf values")
    if float(a.min()) < 0:
        raise DataValueError(f"{path}: {what} have negative values (minimum {float(a.min()):.4g})")


def estimate_for_data(prompts, mu, window, *, randoms=None, efficiencies=None, attenuation=None,
                      iterations: int | None = None, export: bool = False, device=None, mu_path: str = "μ-map",
                      log=None, mask=None):
    """STIR's scatter estimation of ``prompts`` (the library loop, :func:`sirf_ddip.recon.scatter_estimation.
    estimate_scatter`, with STIR's mMR settings), with the errors a user can act on named by file.

    Returns the :class:`~sirf_ddip.recon.scatter_estimation.ScatterEstimate`.

    Raises
    ------
    DataValueError
        No tail bins left by the mask (naming ``mu_path`` and the mask settings).
    """
    from ..errors import DataValueError, NoTailBinsError
    from ..recon.scatter_estimation import ScatterEstimationSettings, estimate_scatter

    settings = ScatterEstimationSettings()
    if iterations is not None:
        settings.num_iterations = int(iterations)

    def report(it, info):
        if log is not None:
            f = info["scale_factors"]
            log(f"scatter iteration {it}/{settings.num_iterations}: 2D total {info['total_2d']:.6g}, scale factors "
                f"{float(f.min()):.3g}..{float(f.max()):.3g}")

    mu = mu_covering_reconstruction(mu, prompts.geometry, settings.zoom, mu_path)
    if mask is None:
        mask = tail_mask_for(mu, prompts.geometry, mu_path, device)
    try:
        return estimate_scatter(prompts, mu, window, randoms=randoms, efficiencies=efficiencies,
                                attenuation=attenuation, settings=settings, return_iterations=export, mask=mask,
                                device=device, callback=report)
    except NoTailBinsError as exc:
        raise DataValueError(f"{mu_path}: {exc} (tail mask keys: ACF threshold {settings.acf_threshold}, safety "
                             f"margin {settings.safety_margin}, mask threshold {settings.mask_min_threshold} "
                             "cm⁻¹)") from None


def mu_covering_reconstruction(mu, geometry, zoom: float | None = None, mu_path: str = "μ-map"):
    """:func:`sirf_ddip.recon.scatter_estimation.mu_covering_reconstruction` (the μ-map zero-padded transaxially to
    the loop's activity image, refused when it does not span the axial field of view), its error naming the file.

    Raises
    ------
    InputFileError
        The μ-map does not span the axial field of view (naming ``mu_path`` and its ``matrix size [3]``).
    """
    from ..errors import ConfigError, InputFileError
    from ..recon import scatter_estimation as se

    try:
        return se.mu_covering_reconstruction(mu, geometry, se.ScatterEstimationSettings().zoom if zoom is None
                                             else zoom)
    except ConfigError as exc:
        raise InputFileError(mu_path, str(exc).replace("scatter estimation: ", "", 1),
                             key="matrix size [3]") from None


def tail_mask_for(mu, geometry, mu_path: str = "μ-map", device=None):
    """STIR's 2D tail mask (SSRB geometry of ``geometry``) from the μ-map, with STIR's mMR settings.

    Raises
    ------
    DataValueError
        The mask keeps no bin (the object fills the field of view), naming ``mu_path`` and the mask settings.
    """
    from ..errors import DataValueError
    from ..physics.ssrb import ssrb_geometry
    from ..recon.scatter_estimation import ScatterEstimationSettings, tail_mask_from_mu

    st = ScatterEstimationSettings()
    mu = mu_covering_reconstruction(mu, geometry, st.zoom, mu_path)
    mask = tail_mask_from_mu(mu, ssrb_geometry(geometry), st.mask_filter_fwhm_mm, st.mask_min_threshold,
                             st.acf_threshold, st.safety_margin, device=device)
    if not mask.any():
        raise DataValueError(f"{mu_path}: the scatter tail mask keeps no bin: the object fills the field of view "
                             f"(tail mask keys: ACF threshold {st.acf_threshold}, safety margin {st.safety_margin} "
                             f"bins, mask threshold {st.mask_min_threshold} cm⁻¹); no scatter scale can be fitted")
    return mask


def check_osem_subsets(geometry, path: str) -> None:
    """The loop's 2D OSEM uses STIR's mMR number of subsets (21); data whose views cannot be split into that many
    balanced subsets (STIR's OSMAPOSL refuses them) are an :class:`InputFileError` naming the views key."""
    from ..errors import ConfigError, InputFileError
    from ..recon import scatter_estimation as se

    st = se.ScatterEstimationSettings()
    try:
        se.check_osem_subsets(geometry, st.osem_num_subsets, st.zoom)
    except ConfigError as exc:
        raise InputFileError(path, f"the scatter estimation's OSEM ({st.osem_num_subsets} subsets, STIR's mMR "
                             f"settings) cannot split these {geometry.num_views} views into balanced subsets "
                             f"(STIR's OSMAPOSL refuses them); use --no-scatter or --scatter SC.hs",
                             key="matrix size [3]") from None


def scatter_summary(est) -> dict:
    """What a run record keeps of an estimate: per iteration the tail-fit factors per 2D sinogram (clipped and
    smoothed, and raw), the totals, and the tail mask's share of the bins."""
    import numpy as np

    mask = np.asarray(est.mask.array)
    return {"iterations": len(est.scale_factors),
            "scale_factors_per_sinogram": [np.round(np.asarray(f, dtype=float), 6).tolist() for f in est.scale_factors],
            "raw_scale_factors_per_sinogram": [None if f is None else np.round(np.asarray(f, dtype=float), 6).tolist()
                                               for f in est.raw_scale_factors],
            "tail_mask_fraction": float(mask.mean()), "scatter_total": float(est.scatter.array.sum(dtype=np.float64)),
            "unscaled_total": float(est.unscaled.meta.get("total", np.nan)) if est.unscaled is not None else None,
            "scatter_points": int(est.unscaled.meta.get("scatter_points", 0)) if est.unscaled is not None else None}


def _export_paths(folder: Path, n: int) -> list[Path]:
    return [folder / f"scatter_estimate_{k}.hs" for k in range(1, n + 1)]


def run_estimate(args) -> int:
    """``sirf-ddip scatter estimate``."""
    from ..data import ProjData
    from ..errors import ConfigError
    from ..io import read_projdata
    from .prepare import _attenuation, _check_outputs, _hs_outputs, _input_files, _record_text, _same_geometry
    from .prepare import _write_set

    if args.iterations is not None and args.iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {args.iterations}")
    inputs = _input_files(args.prompts, args.norm, args.mu, args.randoms)
    out, record = _hs_outputs(Path(args.out), args.overwrite, inputs)  # fail before any work
    n_it = args.iterations if args.iterations is not None else 5
    exports: list[Path] = []
    if args.export_iterations:
        from ..errors import OutputPathError

        folder = Path(args.export_iterations)
        if folder.exists() and not folder.is_dir():
            raise OutputPathError(folder, "is a file, not a folder", "--export-iterations")
        exports = _export_paths(folder, n_it)
        _check_outputs([f for p in exports for f in (p.with_suffix(".s"), p)], args.overwrite, inputs,
                       "--export-iterations")
    t0 = time.perf_counter()
    prompts = read_projdata(args.prompts)
    geom = prompts.geometry
    check_input_values(args.prompts, prompts.array, "prompts")
    window, window_src = energy_window_for(args.prompts, geom.scanner.name, args.energy_window_from_scanner)
    eff = read_projdata(args.norm)
    _same_geometry(eff, geom, "efficiencies", args.norm)
    check_input_values(args.norm, eff.array, "efficiencies")
    randoms = read_projdata(args.randoms)
    _same_geometry(randoms, geom, "randoms", args.randoms)
    check_input_values(args.randoms, randoms.array, "randoms")
    mu = _read_mu(args.mu, args.mu_units)
    check_scanner_matches_images(args.prompts, geom, {args.mu: mu}, axial=False)
    check_osem_subsets(geom, args.prompts)
    mask = tail_mask_for(mu, geom, args.mu, args.device)  # no tail bins: refused before the long work
    args.image_template = None
    t1 = time.perf_counter()
    att, _ = _attenuation(args, geom)
    t2 = time.perf_counter()

    def log(msg):
        print(f"sirf-ddip scatter estimate: {msg}", file=sys.stderr)

    est = estimate_for_data(prompts, mu, window, randoms=randoms, efficiencies=eff, attenuation=att,
                            iterations=n_it, export=bool(exports), device=args.device, mu_path=args.mu, log=log,
                            mask=mask)
    t3 = time.perf_counter()
    meta = {"energy_window_kev": window}
    outputs = {p: ProjData(it.array, geom, dict(meta)) for p, it in zip(exports, est.iterations)}
    outputs[out] = ProjData(est.scatter.array, geom, dict(meta))
    summary = scatter_summary(est)
    params = {"prompts": args.prompts, "norm": args.norm, "randoms": args.randoms, "mu": args.mu,
              "mu_units": args.mu_units, "out": str(out), "geometry": geom.describe(),
              "energy_window_kev": list(window), "energy_window_source": window_src,
              "exported": [str(p) for p in exports],
              "settings": "STIR's examples/Siemens-mMR scatter_estimation_par_files (ScatterEstimationSettings)",
              **summary,
              "conventions": "scatter in prompt counts on the prompts' geometry: additive_term = (randoms + scatter) "
                             "/ mult_factors"}
    text = _record_text("scatter estimate", params, {"inputs": t1 - t0, "attenuation": t2 - t1, "estimate": t3 - t2,
                                                     "total": time.perf_counter() - t0}, [])
    if exports:
        exports[0].parent.mkdir(parents=True, exist_ok=True)
    _write_set(outputs, {record: text}, args.overwrite)
    print(f"wrote {out} (scatter total {summary['scatter_total']:.6g} of {float(prompts.array.sum()):.6g} prompts, "
          f"{n_it} iterations, {t3 - t2:.1f} s)", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- prepare
def add_prepare_arguments(p) -> None:
    """``prepare``'s scatter options: estimated by default (it always has a μ-map)."""
    p.add_argument("--no-scatter", action="store_true",
                   help="do not estimate scatter (the additive term then holds the randoms only)")
    p.add_argument("--scatter-iterations", type=int, default=None, metavar="N",
                   help="scatter estimation iterations (STIR's default 5)")
    _add_window_args(p)


def prepare_energy_window(args, geometry) -> tuple[tuple[float, float] | None, str | None]:
    """The energy window ``prepare`` estimates the scatter in (prompts or listmode header, or the scanner's default
    when told), checked before the long work; with ``--scatter``/``--no-scatter`` the header's window if any (kept in
    ``prompts.hs``), else ``(None, None)``.

    Raises
    ------
    ConfigError
        ``--scatter`` with ``--no-scatter``, or ``--scatter-iterations`` < 1.
    InputFileError
        No energy window in the header (naming the key) and no ``--energy-window-from-scanner``.
    """
    from ..errors import ConfigError, InputFileError

    if args.scatter and args.no_scatter:
        raise ConfigError("--scatter SC.hs and --no-scatter exclude each other")
    if args.scatter_iterations is not None and args.scatter_iterations < 1:
        raise ConfigError(f"--scatter-iterations must be >= 1, got {args.scatter_iterations}")
    path = args.prompts or args.listmode
    if args.scatter or args.no_scatter:  # kept in prompts.hs when the header has one
        from ..io.energy_window import energy_window_from_header

        try:
            window = energy_window_from_header(path, required=False)
        except InputFileError:
            window = None
        return window, (f"header of {path}" if window else None)
    return energy_window_for(path, geometry.scanner.name, args.energy_window_from_scanner)


def prepare_scatter(args, prompts, randoms, efficiencies, attenuation, mu, window, window_src):
    """``prepare``'s scatter estimate (STIR's ScatterEstimation with the mMR settings) from the prompts, the randoms,
    the norm efficiencies and the attenuation factors already computed.

    Returns
    -------
    (ProjData, dict, dict) : the estimate (prompt counts, the prompts' geometry), its provenance (the tail-fit factors
        per sinogram and iteration, the tail mask's share, totals) and the small arrays :func:`draw_scatter_row`
        shows.
    """
    import numpy as np

    from ..physics.ssrb import ssrb, ssrb_geometry

    geom = prompts.geometry

    def log(msg):
        print(f"sirf-ddip prepare: {msg}", file=sys.stderr)

    t0 = time.perf_counter()
    check_osem_subsets(geom, args.prompts or args.template)
    est = estimate_for_data(prompts, mu, window, randoms=randoms, efficiencies=efficiencies, attenuation=attenuation,
                            iterations=args.scatter_iterations, device=args.device, mu_path=args.mu, log=log)
    record = {"source": "estimated (STIR's ScatterEstimation, examples/Siemens-mMR settings)",
              "energy_window_kev": list(window), "energy_window_source": window_src, **scatter_summary(est),
              "time_s": time.perf_counter() - t0}
    geo2 = ssrb_geometry(geom)
    c = geo2.num_sinograms // 2
    data2 = ssrb(np.asarray(prompts.array, np.float32), geom, out_geometry=geo2)[c]
    if randoms is not None:
        data2 = data2 - ssrb(np.asarray(randoms.array, np.float32), geom, out_geometry=geo2)[c]
    figure = {"mask": np.asarray(est.mask.array[c]), "data": data2, "fit": np.asarray(est.scatter_2d.array[c]),
              "sinogram_2d": c, "factors": [np.asarray(f) for f in est.scale_factors]}
    return est.scatter, record, figure


def draw_scatter_row(fig, axes, k: int, scatter_k, info: dict) -> None:
    """A row of ``prepare.png``: the scatter estimate (sinogram ``k``), the 2D tail mask, and the tail fit (a view's
    prompts − randoms, the fitted scatter, the mask) with the scale factor of every 2D sinogram per iteration."""
    import numpy as np

    a0, a1, a2 = axes
    im = a0.imshow(np.asarray(scatter_k), aspect="auto", cmap="magma")
    a0.set_title(f"scatter estimate (sinogram {k}, counts)")
    a0.set_xlabel("tangential")
    a0.set_ylabel("view")
    fig.colorbar(im, ax=a0, fraction=0.046)
    c = info["sinogram_2d"]
    a1.imshow(info["mask"], aspect="auto", cmap="gray", vmin=0, vmax=1)
    a1.set_title(f"tail mask (2D sinogram {c}; white: tails)")
    a1.set_xlabel("tangential")
    a1.set_ylabel("view")
    v = info["mask"].shape[0] // 2
    a2.plot(info["data"][v], lw=0.8, label="prompts - randoms (2D)")
    a2.plot(info["fit"][v], lw=1.2, label="fitted scatter (2D)")
    m = info["mask"][v] > 0
    if m.any():
        a2.plot(np.nonzero(m)[0], info["data"][v][m], ".", ms=2, label="tail bins")
    a2.set_title(f"tail fit, view {v}")
    a2.set_xlabel("tangential")
    a2.legend(fontsize=6, loc="upper left")
    inset = a2.inset_axes([0.62, 0.6, 0.36, 0.36])
    for i, f in enumerate(info["factors"], start=1):
        inset.plot(f, lw=0.8, label=f"it {i}")
    inset.set_title("scale factor per 2D sinogram", fontsize=6)
    inset.tick_params(labelsize=5)
