"""Reading the geometry of STIR projection data from an Interfile header (``.hs``).

The geometry classes (:class:`~sirf_ddip.geometry.scanner.Scanner`,
:class:`~sirf_ddip.geometry.sinogram.SinogramGeometry`) know nothing of files; this module turns the keys of a
parsed header (:class:`~sirf_ddip.io.header.InterfileHeader`) into them, following STIR's
``InterfilePDFSHeader`` (``src/IO/InterfileHeader.cxx``) and ``Scanner::parameter_info`` key names.
"""

from __future__ import annotations

from typing import Any

from ..errors import GeometryError, InputFileError, UnsupportedDataError
from ..geometry.scanner import _INT_OPTIONAL, _OPTIONAL_KEYS, Scanner, get_scanner
from ..geometry.sinogram import SinogramGeometry
from ..utils.leniency import lenient
from .header import InterfileHeader

__all__ = ["scanner_from_header", "geometry_from_header"]


def scanner_from_header(hdr: InterfileHeader) -> Scanner:
    """Read the ``Scanner parameters :=`` block (and ``originating system``) of an Interfile header.

    Missing keys are taken from the preset of the same name when there is one (as STIR does);
    otherwise a missing key raises :class:`InputFileError` naming the file and the key.
    """
    name = hdr.get("scanner type") or hdr.get("originating system")
    geom = hdr.get("scanner geometry (blocksoncylindrical/cylindrical/generic)")
    if geom is not None and geom.strip().lower() not in ("", "cylindrical"):
        raise UnsupportedDataError(hdr.path, f"scanner geometry {geom!r} is not supported (only Cylindrical)",
                                   key="Scanner geometry (BlocksOnCylindrical/Cylindrical/Generic)")
    base: Scanner | None = None
    if name:
        try:
            base = get_scanner(name)
        except KeyError:
            base = None
    if name is None:
        name = "Unknown"

    def num(key: str, attr: str, scale: float = 1.0, integer: bool = False):
        v = hdr.get_int(key) if integer else hdr.get_float(key)
        if v is None:
            if base is None:
                raise InputFileError(hdr.path, f"scanner '{name}' is not a known preset and the key is missing",
                                     key=key)
            return getattr(base, attr)
        return v if integer else round(float(v) * scale, 6)

    inner = hdr.get_float("inner ring diameter (cm)")
    inner_r = round(inner * 5.0, 6) if inner is not None else None  # cm diameter -> mm radius
    if inner_r is None:
        if base is None:
            raise InputFileError(hdr.path, f"scanner '{name}' is not a known preset and the key is missing",
                                 key="Inner ring diameter (cm)")
        inner_r = base.inner_ring_radius_mm
    extra: dict[str, Any] = dict(base.extra) if base is not None else {}
    for attr, key in _OPTIONAL_KEYS.items():
        v = hdr.get_int(key) if attr in _INT_OPTIONAL else hdr.get_float(key)
        if v is not None:
            extra[attr] = v
    tof = _tof_scanner_keys(hdr, base)
    bin_mm = num("default bin size (cm)", "default_bin_size_mm", 10.0)
    if not bin_mm > 0:
        # STIR keeps the invalid value with a warning; where it needs it (VoxelsOnCartesianGrid(proj_data_info), the
        # image and scatter-point grids) it takes the central bin's tangential sampling instead, R_eff sin(pi / N)
        # for non-arc-corrected data (VoxelsOnCartesianGrid.cxx, construct_from_projdata_info)
        import math

        r_eff = inner_r + num("average depth of interaction (cm)", "average_doi_mm", 10.0)
        n_det = num("number of detectors per ring", "detectors_per_ring", integer=True)
        new = round(r_eff * math.sin(math.pi / n_det), 6) if r_eff > 0 and n_det > 0 else bin_mm
        lenient(hdr.path, f"'Default bin size (cm)' is {bin_mm / 10:g} (not set); using the central bin's "
                f"tangential sampling {new / 10:.6g} cm instead, as STIR does for image sizes", key="Default bin size (cm)")
        bin_mm = new
    try:
        return Scanner(
            name=name.strip(),
            num_rings=num("number of rings", "num_rings", integer=True),
            detectors_per_ring=num("number of detectors per ring", "detectors_per_ring", integer=True),
            inner_ring_radius_mm=inner_r,
            average_doi_mm=num("average depth of interaction (cm)", "average_doi_mm", 10.0),
            ring_spacing_mm=num("distance between rings (cm)", "ring_spacing_mm", 10.0),
            default_bin_size_mm=bin_mm,
            view_offset_deg=num("view offset (degrees)", "view_offset_deg"),
            max_num_non_arc_corrected_bins=num("maximum number of non-arc-corrected bins",
                                               "max_num_non_arc_corrected_bins", integer=True),
            default_num_arc_corrected_bins=(hdr.get_int("default number of arc-corrected bins")
                                            or (base.default_num_arc_corrected_bins if base else 0)),
            extra=extra,
            max_num_timing_poss=tof[0], size_timing_pos_ps=tof[1], timing_resolution_ps=tof[2],
        )
    except GeometryError as exc:
        raise InputFileError(hdr.path, str(exc), key="Scanner parameters") from None


#: STIR's TOF scanner keys and their aliases (``InterfilePDFSHeader``), in the order of ``Scanner``'s fields
_TOF_KEYS = (("Maximum number of (unmashed) TOF time bins", ("number of tof time bins",), "max_num_timing_poss", 0),
             ("Size of unmashed TOF time bins (ps)", ("size of timing bin (ps)",), "size_timing_pos_ps", 0.001),
             ("TOF timing resolution (ps)", ("timing resolution (ps)",), "timing_resolution_ps", 0.01))


def _tof_scanner_keys(hdr: InterfileHeader, base: Scanner | None) -> tuple[int, float, float]:
    """The scanner's TOF keys: the header's, else the preset's; a header value that differs from the preset
    is used with a warning naming the key and both values (as STIR's ``InterfileHeader.cxx``)."""
    out = []
    for key, aliases, attr, tol in _TOF_KEYS:
        raw = None
        for k in (key,) + aliases:
            raw = hdr.get_int(k) if attr == "max_num_timing_poss" else hdr.get_float(k)
            if raw is not None:
                break
        preset = getattr(base, attr) if base is not None else 0
        if raw is None or raw < 0:
            out.append(preset)
            continue
        if base is not None and base.is_tof_ready and abs(raw - preset) > tol:
            lenient(hdr.path, f"{raw:g} in the header but {preset:g} for STIR's {base.name}; using the header's "
                    "value (as STIR)", key=key)
        out.append(raw)
    return int(out[0]), float(out[1]), float(out[2])


def _check_tof(hdr: InterfileHeader, scanner: Scanner, ntof: int, tof_mash: int) -> None:
    """TOF data need a TOF-ready scanner and a mashing factor that divides its unmashed TOF bins."""
    if not scanner.is_tof_ready:
        raise InputFileError(hdr.path, f"TOF data ({ntof} TOF bins) but scanner '{scanner.name}' has no TOF "
                             "parameters (Maximum number of (unmashed) TOF time bins, Size of unmashed TOF time "
                             "bins (ps), TOF timing resolution (ps))",
                             key="Maximum number of (unmashed) TOF time bins")
    n = scanner.max_num_timing_poss
    if tof_mash > n or n % tof_mash:
        raise InputFileError(hdr.path, f"TOF mashing factor {tof_mash} does not divide the scanner's {n} unmashed "
                             f"TOF bins (STIR would silently drop {n % tof_mash if tof_mash <= n else n} of them)",
                             key="TOF mashing factor")


def geometry_from_header(hdr: InterfileHeader) -> SinogramGeometry:
    """Geometry of a STIR projection-data header (``InterfileHeader``).

    Raises
    ------
    UnsupportedDataError
        For arc-corrected data or non-cylindrical scanners.
    InputFileError
        For missing or inconsistent keys (the message names the file and the key).
    """
    path = hdr.path
    ndim = hdr.get_int("number of dimensions", required=True)
    labels = {}
    for k in range(1, ndim + 1):
        lab = hdr.get(f"matrix axis label [{k}]")
        if lab is None:
            raise InputFileError(path, "required key missing", key=f"matrix axis label [{k}]")
        labels[lab.strip().lower()] = k
    from .interfile import tof_axis_from_header

    ntof, tof_mash = tof_axis_from_header(hdr)
    if ndim == 5:
        labels.pop("timing positions", None)
    elif ndim != 4:
        raise InputFileError(path, f"expected 4 dimensions (segment, view, axial, tangential; 5 with TOF), got "
                             f"{ndim}", key="number of dimensions")
    need = ["segment", "view", "axial coordinate", "tangential coordinate"]
    for lab in need:
        if lab not in labels:
            raise InputFileError(path, f"no axis labelled '{lab}' (labels: {sorted(labels)})",
                                 key="matrix axis label [k]")
    if labels["segment"] != 4 or labels["tangential coordinate"] != 1:
        raise UnsupportedDataError(path, "axis order not supported: segment must be axis [4] and tangential "
                                   "coordinate axis [1]", key="matrix axis label [4]")
    storage = "view" if labels["view"] == 3 else "sinogram"
    ax_key = f"matrix size [{labels['axial coordinate']}]"
    num_axial = hdr.get_int_list(ax_key, required=True)
    nseg = hdr.get_int(f"matrix size [{labels['segment']}]", required=True)
    num_views = hdr.get_int(f"matrix size [{labels['view']}]", required=True)
    num_tang = hdr.get_int(f"matrix size [{labels['tangential coordinate']}]", required=True)
    mins = hdr.get_int_list("minimum ring difference per segment", required=True)
    maxs = hdr.get_int_list("maximum ring difference per segment", required=True)
    for key, lst in ((ax_key, num_axial), ("minimum ring difference per segment", mins),
                     ("maximum ring difference per segment", maxs)):
        if len(lst) != nseg:
            raise InputFileError(path, f"has {len(lst)} entries but there are {nseg} segments", key=key)
    corr = (hdr.get("applied corrections") or "").lower()
    if "arc correction" in corr or "arc-correction" in corr:
        raise UnsupportedDataError(path, "arc-corrected projection data are not supported (only STIR's "
                                   "non-arc-corrected cylindrical geometry)", key="applied corrections")
    scanner = scanner_from_header(hdr)
    for i, (a, b) in enumerate(zip(mins, maxs)):
        if a > b:  # STIR's ProjDataInfoCylindrical warns and swaps them
            lenient(path, f"segment {i - nseg // 2}: minimum ring difference {a} is larger than the maximum {b} "
                    "(key 'maximum ring difference per segment'); they are swapped, as STIR does",
                    key="minimum ring difference per segment",
                    refusal=f"segment {i - nseg // 2}: minimum ring difference {a} is larger than the maximum {b}")
            mins[i], maxs[i] = b, a
    try:
        geo = SinogramGeometry(scanner, num_views=num_views, num_tangential=num_tang,
                  segments=list(zip(mins, maxs, num_axial)), storage=storage)
    except ValueError as exc:
        raise InputFileError(path, str(exc), key="minimum/maximum ring difference per segment") from None
    if tof_mash:
        _check_tof(hdr, scanner, ntof, tof_mash)
        try:
            geo = geo.with_tof_mash_factor(tof_mash)
        except GeometryError as exc:
            raise InputFileError(path, str(exc), key="TOF mashing factor") from None
        if geo.num_tof_bins != ntof:
            raise InputFileError(path, f"{ntof} TOF bins in the data, but TOF mashing factor {tof_mash} of the "
                                 f"scanner's {scanner.max_num_timing_poss} unmashed TOF bins gives "
                                 f"{geo.num_tof_bins} (STIR refuses this)", key="!matrix size [5]")
    if scanner.detectors_per_ring % (2 * num_views) != 0:
        raise InputFileError(path, f"{num_views} views do not divide {scanner.detectors_per_ring}/2 "
                             "detectors (STIR needs an integer view mashing factor)",
                             key=f"matrix size [{labels['view']}]")
    return geo
