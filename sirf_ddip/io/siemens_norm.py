"""Siemens ECAT8 component-based normalisation files (``.n.hdr`` + ``.n``), as the Biograph mMR writes them.

Layout (what STIR's ``InterfileNormHeaderSiemens`` (``src/IO/InterfileHeaderSiemens.cxx``) parses and
``BinNormalisationFromECAT8::read_norm_data`` (``src/recon_buildblock/BinNormalisationFromECAT8.cxx``) reads):
float32 little endian, components at ``data offset in bytes [i]``, in this order:

1. geometric effects, ``%matrix size [1] := {bins, planes}`` (planes = ``2 * rings - 1``, indexed by
   ``ring1 + ring2``);
2. crystal interference, ``{crystals per block, bins}``;
3. crystal efficiencies, ``{detectors per ring, rings}``;
4. axial effects, ``{number of span-``\\ ``%axial compression`` sinograms}`` (Siemens sinogram order:
   segments ``0, -1, +1, -2, +2, ...``);
5. - 8. dead-time parameters and additional axial effects (read, kept; STIR does not use them).

The first array index is the slowest: geometric factors are ``[plane, bin]``, crystal interference
``[bin, crystal in block]``, efficiencies ``[ring, crystal]``.

Validation: the header must be a Siemens ``normalization`` header (``%SMS-MI header name space``), of a
known ECAT8 software version (``%SMS-MI version number`` 3.x, the layout STIR reads), from a scanner we know
(``!originating system``, Siemens' model number ``2008`` for the mMR), with component sizes and offsets that
agree with that scanner and with each other, and a data file of the right size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError, UnsupportedDataError
from ..geometry.scanner import Scanner, get_scanner
from ..geometry.sinogram import span_segments
from ..utils.leniency import lenient
from .header import InterfileHeader

__all__ = ["ECAT8Norm", "read_ecat8_norm", "SUPPORTED_NORM_VERSIONS"]

#: Major ``%SMS-MI version number`` values whose ECAT8 norm layout is the one read here (mMR VB20P/VE11P: 3.x).
SUPPORTED_NORM_VERSIONS = ("3",)

#: Siemens model numbers (``!originating system``) -> our scanner preset (STIR ``stir_ecat_common.cxx``
#: ``find_scanner_from_ECAT_system_type``; the mMR is 2008).
_SIEMENS_SYSTEMS = {"2008": "Siemens mMR"}

_COMPONENTS = ("geometric effects", "crystal interference", "crystal efficiencies", "axial effects")


@dataclass
class ECAT8Norm:
    """The components of an ECAT8 normalisation file (raw values as stored, float32).

    Attributes
    ----------
    scanner : Scanner
    geometric : ndarray, shape (2 * rings - 1, bins)
        Geometric effects per ``ring1 + ring2`` plane and tangential bin (bin ``j`` is tangential position
        ``j - bins // 2``).
    interference : ndarray, shape (bins, crystals per block)
        Crystal interference per tangential bin and position of the view in the block.
    efficiencies : ndarray, shape (rings, detectors per ring)
        Crystal efficiencies as stored (before STIR's mMR one-crystal shift and gaps).
    axial : ndarray, shape (n_sinograms,)
        Axial effects per Siemens span-``axial_compression`` sinogram.
    axial_compression, max_ring_diff : int
        The span and maximum ring difference of the axial-effects sinograms.
    extra : dict
        The other components by name (dead-time parameters, additional axial effects).
    header : InterfileHeader
    version : str
        ``%SMS-MI version number``.
    """

    scanner: Scanner
    geometric: np.ndarray
    interference: np.ndarray
    efficiencies: np.ndarray
    axial: np.ndarray
    axial_compression: int
    max_ring_diff: int
    header: InterfileHeader
    version: str
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.header.path


def _scanner_of(hdr: InterfileHeader) -> Scanner:
    system = (hdr.get("originating system") or "").strip()
    if not system:
        raise InputFileError(hdr.path, "required key missing (the Siemens model number, e.g. 2008 for the mMR)",
                             key="!originating system")
    name = _SIEMENS_SYSTEMS.get("".join(system.split()))
    if name is None:
        try:
            sc = get_scanner(system)
        except KeyError:
            sc = None
        if sc is None or sc.name not in _SIEMENS_SYSTEMS.values():
            raise UnsupportedDataError(hdr.path, f"normalisation of scanner {system!r} is not supported "
                                       f"(supported: {', '.join(f'{v} ({k})' for k, v in _SIEMENS_SYSTEMS.items())})",
                                       key="!originating system")
        return sc
    return get_scanner(name)


#: The components are relative factors near 1 (the mMR's: 0.6-2.1); a component whose typical (median positive)
#: value is outside this range is not an ECAT8 norm component (another layout, byte order or a corrupt file).
COMPONENT_SCALE_RANGE = (1e-3, 1e3)

#: Largest ratio of a component's maximum to its median positive value, and (axial effects, a divisor) of its
#: median to its minimum: beyond it one bin's efficiency would be off by orders of magnitude (mMR: below 2).
COMPONENT_SPREAD_MAX = 1e3


def _check_component(data: Path, i: int, p: np.ndarray) -> None:
    """Values of component ``i`` (1-4) that give finite efficiencies of the right order, else a named error.

    STIR multiplies components 1-3 and divides by component 4 (``get_uncalibrated_bin_efficiency``): a zero axial
    effect gives STIR an infinite efficiency, an all-zero component all-zero (or NaN) efficiencies, a tiny one
    efficiencies of 1e30. STIR checks none of this; we refuse, naming the component.
    """
    name, key = _COMPONENTS[i - 1], f"data offset in bytes [{i}]"
    what = f"component {i} ({name})"
    n_bad = int(np.count_nonzero(~np.isfinite(p)))
    if n_bad:
        raise InputFileError(data, f"{what} has {n_bad} NaN/Inf value(s) of {p.size}", key=key)
    if np.any(p < 0):
        raise InputFileError(data, f"{what} has {int(np.count_nonzero(p < 0))} negative value(s) (minimum "
                             f"{float(p.min()):.4g})", key=key)
    pos = p[p > 0]
    if pos.size == 0:
        raise InputFileError(data, f"{what} is all zero: every efficiency would be "
                             f"{'infinite' if i == 4 else 'zero'}", key=key)
    med = float(np.median(pos))
    lo, hi = COMPONENT_SCALE_RANGE
    if not lo <= med <= hi:
        raise InputFileError(data, f"{what} has a median value of {med:.4g}, outside {lo:g}..{hi:g}: ECAT8 norm "
                             "components are relative factors near 1 (another byte order or a corrupt file?)", key=key)
    if float(p.max()) > COMPONENT_SPREAD_MAX * med:
        raise InputFileError(data, f"{what} has a value of {float(p.max()):.4g} at index {int(np.argmax(p))}, more "
                             f"than {COMPONENT_SPREAD_MAX:g} x its median {med:.4g}", key=key)
    if i == 4:  # the divisor: a zero or tiny axial effect makes its sinogram's efficiencies infinite or huge
        k = int(np.argmin(p))
        if float(p[k]) == 0.0:
            raise InputFileError(data, f"{what} is 0 for {int(np.count_nonzero(p == 0))} of {p.size} sinograms (first: "
                                 f"{k}); STIR divides by it, which would give infinite efficiencies", key=key)
        if float(p[k]) * COMPONENT_SPREAD_MAX < med:
            raise InputFileError(data, f"{what} is {float(p[k]):.4g} for sinogram {k}, less than 1/"
                                 f"{COMPONENT_SPREAD_MAX:g} of its median {med:.4g}; STIR divides by it, which would "
                                 f"make that sinogram's efficiencies {med / float(p[k]):.3g} x too large", key=key)


def _sizes(hdr: InterfileHeader, i: int) -> list[int]:
    key = f"%matrix size [{i}]"
    v = hdr.get_int_list(key)
    if v is None:
        raise InputFileError(hdr.path, "required key missing", key=key)
    return v


def read_ecat8_norm(path: str | os.PathLike) -> ECAT8Norm:
    """Read and validate an ECAT8 normalisation (``.n.hdr``; its ``!name of data file`` is the ``.n``).

    Raises
    ------
    InputFileError
        Not a Siemens normalisation header, missing keys, sizes/offsets inconsistent with the scanner or with
        each other, a missing or short data file, non-finite or negative factors, a component 1-4 that is all zero
        or far from 1, a zero axial effect (see :func:`_check_component`); in strict mode also a data file longer
        than the components or NaN/Inf in components 5-8 (otherwise warned about, as STIR ignores them).
    UnsupportedDataError
        Another scanner or ECAT8 software version than the ones whose layout we know.
    """
    hdr = InterfileHeader.read(path)
    space = " ".join((hdr.get("%sms-mi header name space") or "").lower().split())
    if space != "normalization header":
        raise InputFileError(hdr.path, f"not a Siemens normalisation header (name space {space!r}, expected "
                             "'normalization header')", key="%SMS-MI header name space")
    version = (hdr.get("%sms-mi version number") or "").strip()
    if not version:
        raise InputFileError(hdr.path, "required key missing", key="%SMS-MI version number")
    if version.split(".")[0] not in SUPPORTED_NORM_VERSIONS:
        raise UnsupportedDataError(hdr.path, f"ECAT8 normalisation software version {version!r} is not supported "
                                   f"(layout known for versions {', '.join(v + '.x' for v in SUPPORTED_NORM_VERSIONS)})",
                                   key="%SMS-MI version number")
    scanner = _scanner_of(hdr)
    nrings, ndet = scanner.num_rings, scanner.detectors_per_ring
    nbins = scanner.max_num_non_arc_corrected_bins
    ncry = int(scanner.extra.get("num_transaxial_crystals_per_block", 0))
    hdr_rings = hdr.get_int("number of rings")
    if hdr_rings is not None and hdr_rings != nrings:
        raise InputFileError(hdr.path, f"{hdr_rings} rings, but the {scanner.name} has {nrings}",
                             key="number of rings")
    ncomp = hdr.get_int("%number of normalization components", required=True)
    if ncomp < 4:
        raise InputFileError(hdr.path, f"{ncomp} components; an ECAT8 norm has at least 4 ({', '.join(_COMPONENTS)})",
                             key="%number of normalization components")
    for i, name in enumerate(_COMPONENTS, start=1):
        got = " ".join((hdr.get(f"%normalization component [{i}]") or "").lower().split())
        if got != name:
            raise InputFileError(hdr.path, f"component {i} is {got!r}, expected {name!r}",
                                 key=f"%normalization component [{i}]")
    span = hdr.get_int("%axial compression", required=True)
    mrd = hdr.get_int("%maximum ring difference", required=True)
    try:
        n_axial_sinos = sum(n for (_, _, n) in span_segments(nrings, span, mrd))
    except ValueError as exc:
        raise InputFileError(hdr.path, str(exc), key="%axial compression") from None
    expected = {1: [nbins, 2 * nrings - 1], 2: [ncry, nbins], 3: [ndet, nrings], 4: [n_axial_sinos]}
    for i, want in expected.items():
        got = _sizes(hdr, i)
        if got != want:
            raise InputFileError(hdr.path, f"component {i} ({_COMPONENTS[i - 1]}) has size {got}, the {scanner.name} "
                                 f"(span {span}, max ring difference {mrd}) needs {want}: a norm of another "
                                 "scanner or software version?", key=f"%matrix size [{i}]")
    sizes = [int(np.prod(_sizes(hdr, i))) for i in range(1, ncomp + 1)]
    offsets = []
    for i in range(1, ncomp + 1):
        off = hdr.get_int(f"data offset in bytes [{i}]")
        if off is None:
            raise InputFileError(hdr.path, "required key missing", key=f"data offset in bytes [{i}]")
        offsets.append(off)
    pos = 0
    for i, (off, n) in enumerate(zip(offsets, sizes), start=1):
        if off != pos:
            raise InputFileError(hdr.path, f"component {i} starts at byte {off}, but the components before it end at "
                                 f"byte {pos} (STIR requires contiguous components)", key=f"data offset in bytes [{i}]")
        pos += 4 * n
    fmt = " ".join((hdr.get("number format") or "float").lower().split())
    nbytes = hdr.get_int("number of bytes per pixel", 4)
    if fmt not in ("float", "short float") or nbytes != 4:
        raise UnsupportedDataError(hdr.path, f"number format {fmt!r} with {nbytes} bytes; ECAT8 norms are 4-byte "
                                   "floats", key="number format")
    order = " ".join((hdr.get("image data byte order") or hdr.get("imagedata byte order")
                      or "LITTLEENDIAN").upper().split())
    dt = np.dtype("<f4" if order in ("LITTLEENDIAN", "LITTLE ENDIAN") else ">f4")
    name = "".join((hdr.get("name of data file") or "").split())  # mMR headers may end lines in \r\r
    if not name:
        raise InputFileError(hdr.path, "required key missing", key="!name of data file")
    data = Path(name) if Path(name).is_absolute() else hdr.path.parent / name
    if not data.is_file():
        raise InputFileError(hdr.path, f"data file {str(data)!r} not found", key="!name of data file")
    found = data.stat().st_size
    if found < pos:
        raise InputFileError(data, f"data file too short: {ncomp} components need {pos} bytes, found "
                             f"{found} (header {hdr.path})", key="!name of data file")
    if found > pos:  # STIR reads each component at its offset and never looks past the fourth
        lenient(data, f"data file longer than its header describes: its {ncomp} components end at byte {pos}, the "
                f"file has {found} bytes ({found - pos} trailing bytes, header {hdr.path}); they are ignored, as "
                "STIR does", key="!name of data file",
                refusal=f"data file longer than its header describes: {ncomp} components need exactly {pos} bytes, "
                        f"found {found} (header {hdr.path})")
    flat = np.fromfile(data, dtype=dt, count=pos // 4).astype(np.float32)
    parts = []
    for off, n in zip(offsets, sizes):
        parts.append(flat[off // 4: off // 4 + n])
    for i, p in enumerate(parts[:4], start=1):
        _check_component(data, i, p)
    for i in range(5, ncomp + 1):
        bad = int(np.count_nonzero(~np.isfinite(parts[i - 1])))
        if bad:
            label = " ".join((hdr.get(f"%normalization component [{i}]") or f"component {i}").split())
            lenient(data, f"component {i} ({label}) has {bad} NaN/Inf value(s) of {parts[i - 1].size}; STIR does "
                    "not use this component for ECAT8 efficiencies, nor do we", key=f"data offset in bytes [{i}]",
                    refusal=f"component {i} ({label}) has {bad} NaN/Inf value(s) of {parts[i - 1].size}")
    geometric = parts[0].reshape(2 * nrings - 1, nbins)
    interference = parts[1].reshape(nbins, ncry)
    efficiencies = parts[2].reshape(nrings, ndet)
    axial = parts[3].copy()
    extra = {}
    for i in range(5, ncomp + 1):
        label = " ".join((hdr.get(f"%normalization component [{i}]") or f"component {i}").split())
        extra[label] = parts[i - 1].copy()
    return ECAT8Norm(scanner, geometric.copy(), interference.copy(), efficiencies.copy(), axial, span, mrd,
                     hdr, version, extra)
