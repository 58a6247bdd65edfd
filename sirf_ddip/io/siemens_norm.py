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
        each other, a missing or short data file, non-finite or negative factors.
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
    if data.stat().st_size < pos:
        raise InputFileError(data, f"data file too short: {ncomp} components need {pos} bytes, found "
                             f"{data.stat().st_size} (header {hdr.path})", key="!name of data file")
    flat = np.fromfile(data, dtype=dt, count=pos // 4).astype(np.float32)
    parts = []
    for off, n in zip(offsets, sizes):
        parts.append(flat[off // 4: off // 4 + n])
    for i, p in enumerate(parts[:4], start=1):
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise InputFileError(data, f"component {i} ({_COMPONENTS[i - 1]}) has non-finite or negative values",
                                 key=f"data offset in bytes [{i}]")
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
