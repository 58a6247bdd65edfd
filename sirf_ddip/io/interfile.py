"""STIR Interfile images (``.hv`` + ``.v``) and projection data (``.hs`` + ``.s``).

Reading follows STIR's Interfile dialect (``InterfileHeader.cxx``):

- number formats ``float`` / ``short float`` (4 bytes), ``long float`` (8 bytes), ``signed integer`` /
  ``unsigned integer`` (1, 2, 4 or 8 bytes), in either byte order (``imagedata byte order``; the
  Interfile default is big endian);
- ``data offset in bytes [1]`` (or ``data starting block``) and ``image scaling factor [1]``;
- images: ``matrix size [1..3]`` = x, y, z, ``scaling factor (mm/pixel) [i]`` and
  ``first pixel offset (mm) [i]`` (the centre of voxel ``[0, 0, 0]``);
- projection data: 4 dimensions ``segment, view, axial coordinate, tangential coordinate`` (view by view,
  STIR's default) or ``segment, axial coordinate, view, tangential coordinate`` (sinogram by sinogram),
  segments stored in ascending order, per-segment axial sizes ``{ 1,2,...}``.

In memory (see :mod:`sirf_ddip.data`), projection data are ``(n_sinograms, n_views, n_tangential)`` with
segments in STIR's sequence ``0, +1, -1, +2, -2, ...``. Only one time frame is supported. TOF data (STIR 6:
``number of dimensions := 5``, ``matrix axis label [5] := timing positions``, ``TOF mashing factor``) store one
complete non-TOF block per TOF bin, ``timing_pos_num`` ascending; in memory they are
``(n_tof, n_sinograms, n_views, n_tangential)``. Written files use STIR 6's key set and spelling (``!version of keys := STIR6.0``), are float32
little endian, view by view, so that STIR reads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ..data import Image, ProjData
from ..errors import GeometryError, GeometryMismatchError, InputFileError, UnsupportedDataError
from ..geometry.image import ImageGrid
from ..geometry.sinogram import SinogramGeometry
from ..utils.atomic import atomic_paths
from ..utils.provenance import check_output
from .header import HEADER_ENCODING, InterfileHeader

__all__ = ["read_image", "write_image", "read_projdata", "write_projdata", "read_header_and_array",
           "tof_axis_from_header",
           "segment_layout_from_header", "projdata_layout", "ProjDataLayout", "file_to_memory_order",
           "memory_to_file_order", "projdata_file_contents"]

# ----------------------------------------------------------------------------------------------- numbers

#: (Interfile number format, bytes per pixel) -> numpy kind
_FORMATS: dict[tuple[str, int], str] = {
    ("float", 4): "f4", ("short float", 4): "f4", ("float", 8): "f8", ("long float", 8): "f8",
    ("signed integer", 1): "i1", ("signed integer", 2): "i2", ("signed integer", 4): "i4",
    ("signed integer", 8): "i8",
    ("unsigned integer", 1): "u1", ("unsigned integer", 2): "u2", ("unsigned integer", 4): "u4",
    ("unsigned integer", 8): "u8",
}
_DEFAULT_BYTES = {"float": 4, "short float": 4, "long float": 8, "signed integer": 2, "unsigned integer": 2}


def _dtype(hdr: InterfileHeader) -> np.dtype:
    """numpy dtype (with byte order) of the data file described by ``hdr``."""
    fmt = " ".join((hdr.get("number format") or "float").lower().split())
    if fmt not in _DEFAULT_BYTES:
        raise InputFileError(hdr.path, f"unknown number format {fmt!r} (supported: "
                             f"{', '.join(sorted(_DEFAULT_BYTES))})", key="!number format")
    nbytes = hdr.get_int("number of bytes per pixel", _DEFAULT_BYTES[fmt])
    kind = _FORMATS.get((fmt, nbytes))
    if kind is None:
        raise InputFileError(hdr.path, f"unsupported number format {fmt!r} with {nbytes} bytes per pixel",
                             key="!number of bytes per pixel")
    order = " ".join((hdr.get("imagedata byte order") or "BIGENDIAN").upper().split())
    if order in ("LITTLEENDIAN", "LITTLE ENDIAN"):
        bo = "<"
    elif order in ("BIGENDIAN", "BIG ENDIAN"):
        bo = ">"
    else:
        raise InputFileError(hdr.path, f"unknown byte order {order!r} (LITTLEENDIAN or BIGENDIAN)",
                             key="imagedata byte order")
    return np.dtype(bo + kind)


def _check_single_frame(hdr: InterfileHeader) -> None:
    n = hdr.get_int("number of time frames", 1)
    if n != 1:
        raise UnsupportedDataError(hdr.path, f"{n} time frames; only single-frame data are supported "
                                   "(split the frames into separate files)", key="number of time frames")


def _data_offset(hdr: InterfileHeader) -> int:
    off = hdr.get_int("data offset in bytes [1]")
    if off is None:
        off = hdr.get_int("data offset in bytes")
    if off is None:
        block = hdr.get_int("data starting block")
        off = 2048 * block if block is not None else 0
    if off < 0:
        raise InputFileError(hdr.path, f"negative data offset {off}", key="data offset in bytes [1]")
    return off


def _scale_factor(hdr: InterfileHeader) -> float:
    for key in ("image scaling factor [1]", "image scaling factor"):
        v = hdr.get_float(key)
        if v is not None:
            if not (np.isfinite(v) and v != 0):
                raise InputFileError(hdr.path, f"image scaling factor must be a finite non-zero number, got {v!r}",
                                     key=key)
            return float(v)
    return 1.0


def _size_diagnosis(hdr: InterfileHeader, found: int, offset: int, count: int, itemsize: int,
                    dims: dict[str, int] | None) -> str:
    """Which header key would make the header describe a data file of ``found`` bytes (empty if none)."""
    hints = []
    payload = found - offset
    if payload > 0 and payload % count == 0 and payload // count in (1, 2, 4, 8) and payload // count != itemsize:
        hints.append(f"it holds {payload // count} bytes per value, not {itemsize} "
                     "(keys '!number format', '!number of bytes per pixel')")
    if payload > 0 and payload % itemsize == 0 and dims:
        n = payload // itemsize
        for key, v in dims.items():
            rest = count // v if v else 0
            if rest and n % rest == 0 and n // rest != v:
                hints.append(f"it would fit '{key} := {n // rest}' (header: {v})")
    return "; ".join(hints)


def _byte_order_symptoms(a: np.ndarray) -> tuple[float, float, int]:
    """(fraction of non-zero values that are absurd, p5..p95 spread of log10|v| in decades, non-zero count).

    Absurd: NaN, Inf, ``|v| < 1e-30`` or ``|v| > 1e30``. Sane PET numbers span a few decades; floats read with the
    wrong byte order take their exponent from a mantissa byte, so they spread over ~70 decades.
    """
    a = a[a != 0]
    if a.size == 0:
        return 0.0, 0.0, 0
    with np.errstate(all="ignore"):
        m = np.abs(a.astype(np.float64))
        absurd = ~np.isfinite(m) | (m < 1e-30) | (m > 1e30)
        ok = m[np.isfinite(m) & (m > 0)]
        spread = float(np.subtract(*np.percentile(np.log10(ok), [95, 5]))) if ok.size else 0.0
    return float(np.count_nonzero(absurd)) / a.size, spread, int(a.size)


def _check_byte_order(hdr: InterfileHeader, raw: np.ndarray) -> None:
    """Refuse float data whose values only make sense byte-swapped (the header's byte order is wrong).

    Wrong when the values as read are absurd (most of them, or spread over more than 20 decades) while the same
    bytes read in the other order are sane (under 1 % absurd, within 20 decades).
    """
    if raw.dtype.kind != "f" or raw.size == 0:
        return
    sample = raw if raw.size <= 1_000_000 else raw[:: raw.size // 1_000_000 + 1]
    bad, spread, n = _byte_order_symptoms(sample)
    if n == 0 or (bad <= 0.5 and spread <= 20):
        return
    bad_s, spread_s, _ = _byte_order_symptoms(sample.view(sample.dtype.newbyteorder()))  # same bytes, other order
    if bad_s <= 0.01 and spread_s <= 20:
        big = raw.dtype.byteorder == ">" or (raw.dtype.byteorder == "=" and not np.little_endian)
        said = hdr.get("imagedata byte order") or "BIGENDIAN (the Interfile default: key absent)"
        raise InputFileError(hdr.path, f"wrong byte order: read as {said} the values are absurd ({100 * bad:.0f} % "
                             f"outside 1e-30..1e30, spread over {spread:.0f} decades); read in the other order they "
                             f"are sane. Set 'imagedata byte order := {'LITTLEENDIAN' if big else 'BIGENDIAN'}'",
                             key="imagedata byte order")


def _read_raw(hdr: InterfileHeader, count: int, dims: dict[str, int] | None = None,
              exact: bool = True) -> np.ndarray:
    """Read ``count`` values from the data file, checking its size; returns float32 (scaled).

    Parameters
    ----------
    hdr : InterfileHeader
    count : int
        Number of values the header describes.
    dims : dict, optional
        Header key -> size of each factor of ``count`` (for a message that names the key that is off).
    exact : bool
        Require the data file to be exactly ``data offset + count x bytes per value`` long (STIR writes exactly
        that; a longer file means the header does not describe it). ``False`` for formats that allow trailing data.
    """
    dt = _dtype(hdr)
    path = hdr.data_file()
    if path.is_dir():
        raise InputFileError(hdr.path, f"data file {str(path)!r} is a folder", key="name of data file")
    if not path.is_file():
        raise InputFileError(hdr.path, f"data file {str(path)!r} not found", key="name of data file")
    offset = _data_offset(hdr)
    expected = offset + count * dt.itemsize
    found = path.stat().st_size
    if found < expected or (exact and found != expected):
        hint = _size_diagnosis(hdr, found, offset, count, dt.itemsize, dims)
        if found < expected:
            what = f"data file too short: expected at least {expected} bytes"
        else:
            what = f"data file longer than its header describes: expected exactly {expected} bytes"
        raise InputFileError(path, f"{what} ({count} values x {dt.itemsize} bytes + offset {offset}), found {found} "
                             f"bytes (header {hdr.path})" + (f"; {hint}" if hint else "; check the header's "
                             "matrix sizes and number format"), key="name of data file")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            arr = np.fromfile(f, dtype=dt, count=count)
    except OSError as exc:
        raise InputFileError(path, f"cannot read data file: {exc.strerror or exc}", key="name of data file") from None
    _check_byte_order(hdr, arr)
    scale = _scale_factor(hdr)
    out = arr.astype(np.float32) if dt.kind != "f" or dt.itemsize != 4 else arr.astype(np.float32, copy=False)
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    if scale != 1.0:
        out = (out.astype(np.float64) * scale).astype(np.float32)
    return out


def read_header_and_array(path: str | os.PathLike, count: int, exact: bool = True
                          ) -> tuple[InterfileHeader, np.ndarray]:
    """Low-level: the parsed header of ``path`` and ``count`` float32 values of its data file.

    ``exact=False`` accepts a data file longer than ``count`` values (formats with trailing data).
    """
    hdr = InterfileHeader.read(path)
    return hdr, _read_raw(hdr, count, exact=exact)


def _fmt(v: float) -> str:
    """A float written so that it reads back identically (shortest repr)."""
    v = float(v)
    if v == 0:
        return "0"
    return repr(v)


def _write_pair(data_path: Path, header_path: Path, array: np.ndarray, lines: list[str]) -> None:
    """Write the data file and its header atomically (temporary names, data renamed first, header last)."""
    with atomic_paths(data_path, header_path) as (tmp_data, tmp_header):
        with open(tmp_data, "wb") as f:
            f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
        with open(tmp_header, "wb") as f:
            f.write(("\n".join(lines) + "\n").encode(HEADER_ENCODING))


def _data_path_for(header_path: Path, suffix: str) -> Path:
    return header_path.with_suffix(suffix)


# ----------------------------------------------------------------------------------------------- images

def read_image(path: str | os.PathLike) -> Image:
    """Read a STIR Interfile image (``.hv``) into an :class:`Image` (float32, ``[z, y, x]``).

    Raises
    ------
    InputFileError
        Missing/short data file, missing matrix size, wrong number of dimensions, unknown number format.
    UnsupportedDataError
        More than one time frame.
    """
    hdr = InterfileHeader.read(path)
    ndim = hdr.get_int("number of dimensions", 3)
    if ndim != 3:
        raise InputFileError(hdr.path, f"an image must have 3 dimensions, header says {ndim}",
                             key="!number of dimensions")
    _check_single_frame(hdr)
    labels = [(hdr.get(f"matrix axis label [{i}]") or "").strip().lower() for i in (1, 2, 3)]
    for i, (lab, want) in enumerate(zip(labels, ("x", "y", "z")), start=1):
        if lab and lab != want:
            raise InputFileError(hdr.path, f"expected axis label {want!r}, got {lab!r} (image axes must be x, y, z)",
                                 key=f"matrix axis label [{i}]")
    sizes = []
    for i in (1, 2, 3):
        key = f"matrix size [{i}]"
        n = hdr.get_int(key, required=True)
        if n < 1:
            raise InputFileError(hdr.path, f"matrix size must be >= 1, got {n}", key=f"!{key}")
        sizes.append(n)
    nx, ny, nz = sizes
    vox = [hdr.get_float(f"scaling factor (mm/pixel) [{i}]", 1.0) for i in (1, 2, 3)]
    for i, v in zip((1, 2, 3), vox):
        if not (np.isfinite(v) and v > 0):
            raise InputFileError(hdr.path, f"voxel size must be a positive number of mm, got {v!r}",
                                 key=f"scaling factor (mm/pixel) [{i}]")
    offsets = [hdr.get_float(f"first pixel offset (mm) [{i}]") for i in (1, 2, 3)]
    for i, o in zip((1, 2, 3), offsets):
        if o is not None and not np.isfinite(o):
            raise InputFileError(hdr.path, f"first pixel offset must be a finite number of mm, got {o!r}",
                                 key=f"first pixel offset (mm) [{i}]")
    vx, vy, vz = vox
    if any(o is None for o in offsets):
        if any(o is not None for o in offsets):
            missing = [i for i, o in zip((1, 2, 3), offsets) if o is None][0]
            raise InputFileError(hdr.path, "first pixel offsets must be given for all 3 axes or none",
                                 key=f"first pixel offset (mm) [{missing}]")
        origin = None  # STIR default placement
    else:
        origin = (offsets[2], offsets[1], offsets[0])
    try:
        grid = ImageGrid((nz, ny, nx), (vz, vy, vx), origin)
    except GeometryError as exc:
        raise InputFileError(hdr.path, str(exc), key="matrix size / scaling factor (mm/pixel)") from None
    dims = {"!matrix size [1]": nx, "!matrix size [2]": ny, "!matrix size [3]": nz}
    arr = _read_raw(hdr, nx * ny * nz, dims).reshape(nz, ny, nx)
    meta = {"source": str(hdr.path)}
    for k in ("originating system", "patient name", "process status"):
        v = hdr.get(k)
        if v:
            meta[k] = v
    return Image(arr, grid, meta)


def write_image(path: str | os.PathLike, image: Image, overwrite: bool = False) -> Path:
    """Write ``image`` as STIR Interfile: ``path`` (``.hv``) and its data file (same stem, ``.v``).

    Data are float32 little endian, the header UTF-8. Both are written to temporary names and renamed into place
    when complete (a failure leaves any previous files intact). Refuses to overwrite either file unless
    ``overwrite``.
    """
    path = Path(path)
    if path.suffix.lower() != ".hv":
        raise InputFileError(path, "an Interfile image header must end in .hv")
    data_path = _data_path_for(path, ".v")
    check_output(path, overwrite)
    check_output(data_path, overwrite)
    arr = np.asarray(image.array, dtype=np.float32)
    g = image.grid
    nz, ny, nx = g.shape
    vz, vy, vx = g.voxel_size
    oz, oy, ox = g.origin
    lines = [
        "!INTERFILE  :=",
        "!imaging modality := PT",
        "!version of keys := STIR6.0",
        f"name of data file := {data_path.name}",
    ]
    if image.meta.get("originating system"):
        lines.append(f"originating system := {image.meta['originating system']}")
    lines += [
        "!GENERAL DATA :=",
        "!GENERAL IMAGE DATA :=",
        "!type of data := PET",
        "imagedata byte order := LITTLEENDIAN",
        "number of radionuclides := 1",
        "!PET STUDY (General) :=",
        "!PET data type := Image",
        "process status := Reconstructed",
        "!number format := float",
        "!number of bytes per pixel := 4",
        "number of dimensions := 3",
        "matrix axis label [1] := x",
        f"!matrix size [1] := {nx}",
        f"scaling factor (mm/pixel) [1] := {_fmt(vx)}",
        "matrix axis label [2] := y",
        f"!matrix size [2] := {ny}",
        f"scaling factor (mm/pixel) [2] := {_fmt(vy)}",
        "matrix axis label [3] := z",
        f"!matrix size [3] := {nz}",
        f"scaling factor (mm/pixel) [3] := {_fmt(vz)}",
        f"first pixel offset (mm) [1] := {_fmt(ox)}",
        f"first pixel offset (mm) [2] := {_fmt(oy)}",
        f"first pixel offset (mm) [3] := {_fmt(oz)}",
        "number of time frames := 1",
        "!END OF INTERFILE :=",
    ]
    _write_pair(data_path, path, arr.reshape(nz, ny, nx), lines)
    return path


# ----------------------------------------------------------------------------------------------- proj data

def tof_axis_from_header(hdr: InterfileHeader) -> tuple[int, int]:
    """``(number of TOF bins, TOF mashing factor)`` of a projection-data header: ``(1, 0)`` for 4-D
    (non-TOF) data; for 5-D data ``matrix axis label [5]`` must be ``timing positions`` and the mashing factor
    is ``TOF mashing factor`` (STIR's default 1).

    Raises
    ------
    InputFileError
        5-D data whose fifth axis is not ``timing positions``, or a missing / non-positive size or factor.
    """
    ndim = hdr.get_int("number of dimensions", 4) or 4
    if ndim <= 4:
        _warn_tof_mash_in_4d_header(hdr)
        return 1, 0
    if ndim != 5:
        raise InputFileError(hdr.path, f"projection data have 4 dimensions (5 with TOF), header says {ndim}",
                             key="!number of dimensions")
    lab = " ".join((hdr.get("matrix axis label [5]") or "").lower().split())
    if lab != "timing positions":
        raise InputFileError(hdr.path, f"5-D projection data need 'timing positions' as axis 5 (STIR), got "
                             f"{lab!r}", key="matrix axis label [5]")
    ntof = hdr.get_int("matrix size [5]", required=True)
    mash = hdr.get_int("tof mashing factor", None)
    if mash is None:
        mash = hdr.get_int("%tof mashing factor", 1)  # STIR's alias
    if ntof is None or ntof < 1:
        raise InputFileError(hdr.path, f"number of TOF bins must be >= 1, got {ntof}", key="!matrix size [5]")
    if mash is None or mash < 1:
        raise InputFileError(hdr.path, f"TOF data need a TOF mashing factor >= 1, got {mash}",
                             key="TOF mashing factor")
    return int(ntof), int(mash)


def _warn_tof_mash_in_4d_header(hdr: InterfileHeader) -> None:
    """A ``TOF mashing factor`` above 1 in a 4-D header: STIR 6.4 reads the data as non-TOF (``InterfileHeader.cxx``
    ``InterfilePDFSHeader::post_processing`` sets ``tof_mash_factor = 0`` for 4-D data); so do we, with a
    warning naming the key and both readings, never silently (``--strict`` refuses). Siemens' non-TOF ``.s.hdr``
    carry ``%TOF mashing factor := 1``, which is no inconsistency."""
    for key in ("TOF mashing factor", "%TOF mashing factor"):
        try:
            v = hdr.get_int(key)
        except InputFileError:
            v = None
        if v is not None and v > 1:
            from ..utils.leniency import lenient

            lenient(hdr.path, f"TOF mashing factor {v} in a 4-D header (no 'matrix axis label [5] := timing "
                    "positions'): read as non-TOF data, 1 TOF bin (as STIR 6.4); TOF data need 'number of "
                    "dimensions := 5'", key=key,
                    refusal=f"TOF mashing factor {v} in a 4-D header: TOF data need 'number of dimensions := 5' "
                    "and 'matrix axis label [5] := timing positions'; non-TOF data no TOF mashing factor (STIR "
                    "6.4 reads them as non-TOF)")
            return


def _is_tof(hdr: InterfileHeader) -> bool:
    """True if a 4-D header nevertheless claims TOF *data* (more than one TOF bin in a data key).

    Only data keys count: the ``Scanner parameters`` block of a TOF-capable scanner (mCT, Vision, Discovery
    690/MI) carries scanner properties such as ``Maximum number of (unmashed) TOF time bins := 55`` or
    ``Size of unmashed TOF time bins (ps)`` even for non-TOF sinograms, and must not make them TOF
    (STIR ``InterfileHeader.cxx`` reads those into the ``Scanner``, and the data's TOF-ness from the
    ``timing positions`` axis / ``%TOF mashing factor``).
    """
    if (hdr.get_int("number of dimensions", 4) or 4) > 4:
        return False  # 5-D: read as TOF data (tof_axis_from_header)
    for k in hdr.keys():
        if "tof" not in k or "maximum" in k or "unmashed" in k or "(ps)" in k or "resolution" in k:
            continue  # scanner properties, not data properties
        if "number of" in k and "bins" in k:
            try:
                v = hdr.get_int(k)
            except InputFileError:
                v = None
            if v is not None and v > 1:
                return True
    for i in range(1, 7):
        lab = (hdr.get(f"matrix axis label [{i}]") or "").lower()
        if "timing" in lab or "tof" in lab:
            return True
    return False


def segment_layout_from_header(hdr: InterfileHeader) -> tuple[list[int], list[int], str]:
    """Segments as stored in the file: (segment numbers, axial sizes, axis order).

    Segment numbers are ascending in the file (STIR); segment 0 is the one whose ring-difference range
    contains 0 (or the middle one). Axis order is ``"view"`` (``segment, view, axial, tangential``) or
    ``"sinogram"`` (``segment, axial, view, tangential``).
    """
    if _is_tof(hdr):
        raise UnsupportedDataError(hdr.path, "TOF bins in a 4-D header are not supported yet: TOF "
                                   "data need 'number of dimensions := 5' and 'matrix axis label [5] := timing "
                                   "positions' (STIR 6)", key="%number of TOF time bins")
    ndim = hdr.get_int("number of dimensions", required=True)
    if ndim == 5:
        tof_axis_from_header(hdr)  # checks axis 5
    elif ndim != 4:
        raise InputFileError(hdr.path, f"projection data must have 4 dimensions (segment, view/axial, "
                             f"axial/view, tangential; 5 with TOF), header says {ndim}", key="!number of dimensions")
    labels = {i: " ".join((hdr.get(f"matrix axis label [{i}]") or "").lower().split()) for i in (1, 2, 3, 4)}
    if labels[4] and labels[4] != "segment":
        raise InputFileError(hdr.path, f"axis 4 must be 'segment', got {labels[4]!r}", key="matrix axis label [4]")
    if labels[1] and labels[1] != "tangential coordinate":
        raise InputFileError(hdr.path, f"axis 1 must be 'tangential coordinate', got {labels[1]!r}",
                             key="matrix axis label [1]")
    if labels[3] == "view" and labels[2] in ("axial coordinate", ""):
        order, ax_dim = "view", 2
    elif labels[3] == "axial coordinate" and labels[2] == "view":
        order, ax_dim = "sinogram", 3
    elif not labels[3] and not labels[2]:
        order, ax_dim = "view", 2
    else:
        raise InputFileError(hdr.path, f"unsupported axis order: [3]={labels[3]!r}, [2]={labels[2]!r} (expected "
                             "view/axial coordinate or axial coordinate/view)", key="matrix axis label [3]")
    nseg = hdr.get_int("matrix size [4]", required=True)
    ax = hdr.get_int_list(f"matrix size [{ax_dim}]", required=True)
    if len(ax) == 1 and nseg > 1:
        ax = ax * nseg
    if len(ax) != nseg:
        raise InputFileError(hdr.path, f"{len(ax)} axial sizes for {nseg} segments", key=f"!matrix size [{ax_dim}]")
    mins = hdr.get_list("minimum ring difference per segment")
    maxs = hdr.get_list("maximum ring difference per segment")
    if mins is not None and maxs is not None and len(mins) == nseg and len(maxs) == nseg:
        centres = [(a + b) / 2 for a, b in zip(mins, maxs)]
        zero = next((i for i, (a, b) in enumerate(zip(mins, maxs)) if min(a, b) <= 0 <= max(a, b)),
                    int(np.argmin(np.abs(centres))))
        if any(c2 <= c1 for c1, c2 in zip(centres, centres[1:])):
            raise InputFileError(hdr.path, "segments must be stored in ascending ring difference",
                                 key="minimum ring difference per segment")
    else:
        if nseg % 2 == 0:
            raise InputFileError(hdr.path, f"cannot place segment 0 among {nseg} segments without ring differences",
                                 key="minimum ring difference per segment")
        zero = nseg // 2
    numbers = [i - zero for i in range(nseg)]
    return numbers, [int(a) for a in ax], order


def _memory_sequence(numbers: Sequence[int]) -> list[int]:
    """STIR's standard segment sequence ``0, +1, -1, +2, -2, ...`` restricted to ``numbers``."""
    present = set(numbers)
    out = []
    k = 0
    while len(out) < len(present):
        for s in ((0,) if k == 0 else (k, -k)):
            if s in present:
                out.append(s)
        k += 1
        if k > 10_000:  # pragma: no cover - guard
            raise ValueError(f"segment numbers {sorted(present)} are not contiguous")
    return out


def file_to_memory_order(flat: np.ndarray, numbers: Sequence[int], axial: Sequence[int], num_views: int,
                         num_tang: int, order: str) -> np.ndarray:
    """Convert a flat file array (segments ascending, ``order`` 'view' or 'sinogram') to ``(sino, view, tang)``."""
    blocks: dict[int, np.ndarray] = {}
    pos = 0
    for seg, nax in zip(numbers, axial):
        n = nax * num_views * num_tang
        chunk = flat[pos:pos + n]
        pos += n
        if order == "view":
            blocks[seg] = chunk.reshape(num_views, nax, num_tang).transpose(1, 0, 2)
        else:
            blocks[seg] = chunk.reshape(nax, num_views, num_tang)
    return np.ascontiguousarray(np.concatenate([blocks[s] for s in _memory_sequence(numbers)], axis=0))


def memory_to_file_order(array: np.ndarray, numbers: Sequence[int], axial: Sequence[int],
                         order: str = "view") -> np.ndarray:
    """Inverse of :func:`file_to_memory_order`: ``(sino, view, tang)`` -> flat file array (segments ascending)."""
    sizes = dict(zip(numbers, axial))
    starts: dict[int, int] = {}
    pos = 0
    for s in _memory_sequence(numbers):
        starts[s] = pos
        pos += sizes[s]
    if pos != array.shape[0]:
        raise ValueError(f"{array.shape[0]} sinograms in memory, segments need {pos}")
    parts = []
    for seg in sorted(numbers):
        blk = array[starts[seg]:starts[seg] + sizes[seg]]
        parts.append((blk.transpose(1, 0, 2) if order == "view" else blk).reshape(-1))
    return np.concatenate(parts)


def _geometry_from_header(hdr: InterfileHeader):
    from .sinogram_header import geometry_from_header

    return geometry_from_header(hdr)


def _check_ring_differences(hdr: InterfileHeader, geometry) -> None:
    """Each segment's ring differences must be possible on the header's scanner (``|r2 - r1| <= rings - 1``)."""
    rings = geometry.scanner.num_rings
    for seg in geometry.segments:
        a, b = seg.min_ring_diff, seg.max_ring_diff
        if max(abs(a), abs(b)) > rings - 1:
            key = "maximum ring difference per segment" if abs(b) >= abs(a) else "minimum ring difference per segment"
            raise InputFileError(hdr.path, f"segment {seg.number} holds ring differences {a}..{b}, impossible on a "
                                 f"scanner with {rings} ring(s) (|ring difference| <= {rings - 1}; key 'Number of "
                                 "rings' in the scanner block)", key=key)


def _check_axial_counts(hdr: InterfileHeader, geometry, order: str) -> None:
    """Each segment's axial positions must be the ones its ring differences give on the header's scanner.

    A segment holding ring differences ``a..b`` has one axial position per distinct ring sum ``r1 + r2`` of the
    ring pairs ``(r1, r2)``, ``r2 - r1`` in ``a..b``, both rings on the scanner (STIR's
    ``ProjDataInfoCylindrical``: ``m`` runs between the rings in steps of half the ring spacing).
    """
    rings = geometry.scanner.num_rings
    ax_key = "!matrix size [2]" if order == "view" else "!matrix size [3]"
    for seg in geometry.segments:
        a, b = seg.min_ring_diff, seg.max_ring_diff
        sums = {2 * r1 + d for d in range(a, b + 1) for r1 in range(rings) if 0 <= r1 + d < rings}
        if len(sums) != seg.num_axial:
            raise InputFileError(hdr.path, f"segment {seg.number} (ring differences {a}..{b}) has {seg.num_axial} "
                                 f"axial positions, but a scanner with {rings} rings gives {len(sums)} (check "
                                 f"'{ax_key}' and the scanner's 'Number of rings')", key=ax_key)


class ProjDataLayout(NamedTuple):
    """What a projection-data header says, before its data file is looked at (:func:`projdata_layout`)."""

    geometry: SinogramGeometry
    numbers: list[int]   # segment numbers, as stored in the file
    axial: list[int]     # axial positions of each segment
    num_views: int
    num_tang: int
    order: str           # "view" or "sinogram" (file axis order)


def projdata_layout(hdr: InterfileHeader) -> ProjDataLayout:
    """The geometry and file layout of a projection-data header; the data file is not opened.

    The one header check of projection data, shared by :func:`read_projdata` (which then reads the data) and
    :func:`sirf_ddip.io.template.read_template_geometry` (which does not).

    Ring differences impossible on the scanner are refused. A segment's axial size is not checked against its
    ring differences here: STIR reads such a template (``../shared``'s ``template_seg2.hs``, see
    ``tests/test_listmode.py``) and centres each segment's axial positions, as
    :class:`~sirf_ddip.geometry.sinogram.SinogramGeometry` does; :func:`read_projdata` adds that check for data.

    Raises
    ------
    InputFileError
        Wrong number of dimensions, missing matrix size, inconsistent segment keys, a ring difference impossible
        on the scanner, matrix sizes that do not match the geometry (the message names the key).
    UnsupportedDataError
        Arc-corrected data, more than one time frame.
    """
    _check_single_frame(hdr)
    numbers, axial, order = segment_layout_from_header(hdr)
    nview_key = "matrix size [3]" if order == "view" else "matrix size [2]"
    num_views = hdr.get_int(nview_key, required=True)
    num_tang = hdr.get_int("matrix size [1]", required=True)
    geometry = _geometry_from_header(hdr)
    _check_ring_differences(hdr, geometry)
    shape = (sum(axial), num_views, num_tang)
    if geometry.is_tof:
        shape = (geometry.num_tof_bins,) + shape
    if shape != tuple(geometry.shape):
        raise InputFileError(hdr.path, f"data shape {shape} (sinograms, views, tangential) does not match the "
                             f"geometry described by the header {tuple(geometry.shape)}", key="!matrix size [2]")
    return ProjDataLayout(geometry, list(numbers), list(axial), num_views, num_tang, order)


def read_projdata(path: str | os.PathLike) -> ProjData:
    """Read STIR Interfile projection data (``.hs``) into a :class:`ProjData` (float32, in-memory layout).

    The data file must be exactly as long as the header says (data read). For a header used only as a geometry
    template (data file empty or absent) use :func:`sirf_ddip.io.template.read_template_geometry`.

    Raises
    ------
    InputFileError
        Missing/short data file, wrong number of dimensions, missing matrix size, unknown number format.
    UnsupportedDataError
        TOF data, more than one time frame.
    """
    hdr = InterfileHeader.read(path)
    lay = projdata_layout(hdr)
    _check_axial_counts(hdr, lay.geometry, lay.order)
    block = sum(lay.axial) * lay.num_views * lay.num_tang
    ntof = lay.geometry.num_tof_bins
    nview_key = "matrix size [3]" if lay.order == "view" else "matrix size [2]"
    ax_key = "!matrix size [2]" if lay.order == "view" else "!matrix size [3]"
    dims = {"!matrix size [1] (tangential positions)": lay.num_tang,
            f"!{nview_key} (views)": lay.num_views,
            f"{ax_key} (axial positions, all segments)": sum(lay.axial)}
    if lay.geometry.is_tof:
        dims["!matrix size [5] (TOF bins)"] = ntof
    flat = _read_raw(hdr, block * ntof, dims)
    if lay.geometry.is_tof:  # one complete non-TOF block per TOF bin, timing_pos_num ascending
        arr = np.stack([file_to_memory_order(flat[i * block:(i + 1) * block], lay.numbers, lay.axial, lay.num_views,
                                             lay.num_tang, lay.order) for i in range(ntof)])
    else:
        arr = file_to_memory_order(flat, lay.numbers, lay.axial, lay.num_views, lay.num_tang, lay.order)
    meta = {"source": str(hdr.path), "file_axis_order": lay.order}
    window = _energy_window_or_none(hdr)
    if window is not None:
        meta["energy_window_kev"] = window
    return ProjData(arr, lay.geometry, meta)


def _energy_window_or_none(hdr: InterfileHeader):
    """The header's energy window (keV) when it has a valid one, else None (checked where it is needed)."""
    from .energy_window import energy_window_from_header

    try:
        return energy_window_from_header(hdr, required=False)
    except InputFileError:
        return None


def _segment_layout_of_geometry(geometry) -> tuple[list[int], list[int]]:
    """(segment numbers ascending, axial sizes) of a SinogramGeometry."""
    segs = geometry.segments
    nums, sizes = [], []
    for s in segs:
        num = getattr(s, "number", None)
        if num is None:
            num = getattr(s, "segment", None)
        if num is None:
            num = getattr(s, "segment_num")
        nax = getattr(s, "num_axial", None)
        if nax is None:
            nax = getattr(s, "num_axial_poss", None)
        if nax is None:
            nax = getattr(s, "num_axial_positions")
        nums.append(int(num))
        sizes.append(int(nax))
    pairs = sorted(zip(nums, sizes))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def write_projdata(path: str | os.PathLike, projdata: ProjData, overwrite: bool = False) -> Path:
    """Write ``projdata`` as STIR Interfile: ``path`` (``.hs``) and its data file (``.s``), view by view.

    The header is :meth:`SinogramGeometry.header_lines` (STIR 6 keys: matrix sizes, ring differences per
    segment, the scanner block), float32 little endian, so that STIR reads it. Refuses to overwrite unless ``overwrite``.
    """
    path = Path(path)
    if path.suffix.lower() != ".hs":
        raise InputFileError(path, "an Interfile projection-data header must end in .hs")
    data_path = _data_path_for(path, ".s")
    check_output(path, overwrite)
    check_output(data_path, overwrite)
    flat, lines = projdata_file_contents(projdata, data_path.name, path)
    _write_pair(data_path, path, flat, lines)
    return path


def projdata_file_contents(projdata: ProjData, data_name: str, path: str | os.PathLike = "<projdata>"
                           ) -> tuple[np.ndarray, list[str]]:
    """What :func:`write_projdata` writes: the data in file order (float32) and the header lines naming
    ``data_name`` as the data file, so that a command can write several outputs as one set
    (:func:`sirf_ddip.utils.atomic.atomic_paths`); ``path`` names the output in errors."""
    geometry = projdata.geometry
    arr = np.asarray(projdata.array, dtype=np.float32)
    if tuple(arr.shape) != tuple(geometry.shape):
        raise GeometryMismatchError(f"write_projdata {path}: array shape {arr.shape} != geometry shape "
                                    f"{tuple(geometry.shape)}")
    numbers, axial = _segment_layout_of_geometry(geometry)
    if getattr(geometry, "is_tof", False):
        flat = np.concatenate([memory_to_file_order(a, numbers, axial, order="view") for a in arr])
    else:
        flat = memory_to_file_order(arr, numbers, axial, order="view")
    extra = {"number of time frames": "1"}
    if projdata.meta.get("energy_window_kev") is not None:  # STIR's ExamInfo energy window, kept
        from .energy_window import energy_window_lines

        extra.update(energy_window_lines(projdata.meta["energy_window_kev"]))
    extra.update({"start vertical bed position (mm)": "0", "start horizontal bed position (mm)": "0"})
    lines = geometry.header_lines(data_file=data_name, storage="view", extra=extra)
    return flat, lines
