"""Siemens PETLINK 32-bit listmode (``.l.hdr`` + ``.l``, as the Biograph mMR writes it).

Follows STIR's ``CListModeDataECAT8_32bit`` / ``CListRecordECAT8_32bit`` (UCL/STIR
``src/listmode_buildblock/CListRecordECAT8_32bit.cxx``, ``src/include/stir/listmode/CListRecordECAT8_32bit.h``)
and its header parser ``InterfileListmodeHeaderSiemens`` (``src/IO/InterfileHeaderSiemens.cxx``):

- the data file is a stream of 32-bit little-endian words (``!data offset in bytes`` skipped);
- bit 31 = 0: a coincidence event; bit 30 = 1 prompt, 0 delayed; bits 0-29 the offset into the span-1
  sinogram the header describes, ordered (sinogram, view, tangential), sinograms by segment in the ECAT
  sequence ``0, -1, +1, -2, +2, ...`` (``ecat::find_segment_sequence``), axial positions ascending; the
  tangential index runs from ``-(n // 2)``;
- bit 31 = 1 and bits 29-30 = 0: a time tag, bits 0-28 the time in ms since the scan start; bit 31 = 1 with
  other bits 29-30: other tags (dead time, gating, ...), ignored as STIR does.

TOF listmode (``%number of TOF time bins`` > 1; STIR 6.4, ``CListEventECAT8_32bit::get_detection_position``):
the offset holds the Siemens TOF bin slowest, ``offset = ((s * N + z) * V + v) * T + i`` with ``N`` the number of
span-1 sinograms of the scanner's *uncompressed* data (all ring differences: ``num_rings ** 2``, whatever
``%maximum ring difference`` says; STIR's ``get_num_non_tof_sinograms`` of its uncompressed ``ProjDataInfo``);
Siemens TOF bin ``s`` is STIR's ``timing_pos_num`` ``0, +1, -1, +2, -2, ...`` (``ecat::find_timing_poss_sequence``,
:func:`siemens_timing_pos_sequence`), the sign relative to the listmode bin's detector order (STIR's
``get_det_pos_pair_for_bin`` swaps the detectors of a negative bin): an event histogrammed into a bin whose detector 1
is the listmode bin's detector 2 gets the opposite sign (``get_bin_for_det_pair``). The TOF bins are those of the
scanner with ``%TOF mashing factor`` (STIR's default when the key is absent: 8 for the Vision 600, else 1).

Only the uncompressed (span-1) 32-bit format is supported (as STIR's class); the header is checked for it
and the data file for its length, so that bad input fails with a message naming the file and the key. Where
STIR goes on (a ``%segment table``, ``%total listmode word counts`` or ``%number of TOF time bins`` that does not
describe the file), we go on as STIR does with a warning naming the key and both values (see
:func:`read_listmode_header`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputFileError, UnsupportedDataError
from ..geometry.detectors import crystals_for_view_tangential
from ..geometry.scanner import Scanner, get_scanner
from ..utils.leniency import is_strict, lenient, strict_inputs
from .header import InterfileHeader

__all__ = ["SiemensListmodeHeader", "read_listmode_header", "iter_listmode_words", "ecat_segment_sequence",
           "siemens_timing_pos_sequence", "file_time_span", "EVENT_TAG_BIT", "PROMPT_BIT", "OFFSET_MASK",
           "TIME_MASK"]

#: word layout (STIR ``CListEventDataECAT8_32bit`` / ``CListTimeDataECAT8_32bit``, little-endian bit fields)
EVENT_TAG_BIT = 31
PROMPT_BIT = 30
OFFSET_MASK = (1 << 30) - 1
TIME_MASK = (1 << 29) - 1


def ecat_segment_sequence(max_segment: int) -> list[int]:
    """ECAT/Siemens segment order ``0, -1, +1, -2, +2, ...`` (STIR ``ecat::find_segment_sequence``)."""
    seq = [0]
    for k in range(1, max_segment + 1):
        seq += [-k, k]
    return seq


def siemens_timing_pos_sequence(num_tof_bins: int) -> np.ndarray:
    """STIR ``timing_pos_num`` of each Siemens TOF bin ``0, 1, 2, ...``: ``0, +1, -1, +2, -2, ...``.

    STIR 6.4 ``ecat::find_timing_poss_sequence`` (``src/IO/stir_ecat_common.cxx``; its comment says
    ``0, -1, +1``, the code and the commit "reverse TOF bin order for Siemens files", checked on Vision 600 data,
    give ``0, +1, -1``).
    """
    half = int(num_tof_bins) // 2
    seq = [0]
    for k in range(1, half + 1):
        seq += [k, -k]
    return np.asarray(seq, dtype=np.int64)


@dataclass(frozen=True)
class SiemensListmodeHeader:
    """What the histogrammer needs from a PETLINK ``.l.hdr``.

    Attributes
    ----------
    path, data_path : Path
        Header and data file.
    scanner : Scanner
        The preset named by ``!originating system`` (STIR refuses unknown scanners too).
    num_views, num_tangential : int
        ``%number of views`` and ``%number of projections`` of the span-1 sinogram the offsets index.
    max_ring_diff : int
        ``%maximum ring difference``.
    segment_table : tuple of int
        Axial positions per segment in the ECAT order (``%segment table``).
    data_offset : int
        Bytes before the first word.
    num_words : int
        Words in the data file (from its size).
    duration_s : float or None
        ``image duration (sec)``.
    """

    path: Path
    data_path: Path
    scanner: Scanner
    num_views: int
    num_tangential: int
    max_ring_diff: int
    segment_table: tuple
    data_offset: int
    num_words: int
    duration_s: float | None = None
    header_word_count: int | None = None
    extra: dict = field(default_factory=dict, compare=False)
    num_tof_bins: int = 1
    tof_mash_factor: int = 0

    @property
    def is_tof(self) -> bool:
        """True for TOF listmode (the offsets carry a Siemens TOF bin)."""
        return self.tof_mash_factor > 0

    @property
    def tof_block_sinograms(self) -> int:
        """Span-1 sinograms per TOF bin of the offset space: STIR's ``get_num_non_tof_sinograms`` of the
        scanner's uncompressed data (``num_rings ** 2``) for TOF listmode; the header's sinograms otherwise (an
        offset beyond them is corrupt)."""
        return self.scanner.num_rings ** 2 if self.is_tof else self.num_sinograms

    def timing_pos_sequence(self) -> np.ndarray:
        """STIR ``timing_pos_num`` of each Siemens TOF bin of the file (``[0]`` for non-TOF listmode)."""
        return siemens_timing_pos_sequence(self.num_tof_bins if self.is_tof else 1)

    def describe_offsets(self) -> str:
        """The offset space, for messages."""
        text = f"span-1 sinogram of {self.num_sinograms} x {self.sinogram_size} bins"
        if self.is_tof:
            text += f" in each of {self.num_tof_bins} TOF bins (TOF bin stride {self.tof_block_sinograms} sinograms)"
        return text

    @property
    def segment_sequence(self) -> list[int]:
        """Segment (= ring difference ``ring2 - ring1``) of each block of sinograms, in file order."""
        return ecat_segment_sequence(self.max_ring_diff)

    @property
    def num_sinograms(self) -> int:
        return int(sum(self.segment_table))

    @property
    def sinogram_size(self) -> int:
        """Offsets per sinogram (views x tangential positions)."""
        return self.num_views * self.num_tangential

    def sinogram_rings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ring1, ring2)`` of each span-1 sinogram of the offset space, in file order.

        For ring difference ``d = ring2 - ring1`` the axial position ``a`` holds ``ring1 = a + (|d| - d) / 2``
        (STIR ``get_ring_pair_for_segment_axial_pos_num`` for span 1).
        """
        r1, r2 = [], []
        for d, n in zip(self.segment_sequence, self.segment_table):
            a = np.arange(n)
            r1.append(a + (abs(d) - d) // 2)
            r2.append(a + (abs(d) + d) // 2)
        return np.concatenate(r1), np.concatenate(r2)

    def view_tangential_crystals(self) -> tuple[np.ndarray, np.ndarray]:
        """Crystals ``(c1, c2)`` of each (view, tangential index) of a sinogram, flat ``view * n_tang + i``."""
        v = np.repeat(np.arange(self.num_views), self.num_tangential)
        t = np.tile(np.arange(self.num_tangential) - self.num_tangential // 2, self.num_views)
        return crystals_for_view_tangential(v, t, self.scanner.detectors_per_ring)

    def decode_offsets(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Detector pairs ``(ring1, crystal1, ring2, crystal2)`` of event offsets (all must be valid)."""
        off = np.asarray(offsets, dtype=np.int64)
        q = off // self.sinogram_size
        r = off - q * self.sinogram_size
        z = q % self.tof_block_sinograms
        rings1, rings2 = self.sinogram_rings()
        c1, c2 = self.view_tangential_crystals()
        return rings1[z], c1[r], rings2[z], c2[r]

    def decode_timing_pos(self, offsets: np.ndarray) -> np.ndarray:
        """STIR ``timing_pos_num`` of event offsets relative to the detector order of :meth:`decode_offsets`
        (all must be valid; 0 for non-TOF listmode)."""
        off = np.asarray(offsets, dtype=np.int64)
        s = off // (self.sinogram_size * self.tof_block_sinograms)
        return self.timing_pos_sequence()[s] if self.is_tof else np.zeros_like(off)


def _find_data_file(hdr: InterfileHeader) -> Path:
    name = hdr.require("name of data file").strip()
    p = Path(name)
    cand = [p if p.is_absolute() else hdr.path.parent / p]
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base != name:  # Siemens consoles write Windows paths: try the file next to the header
        cand.append(hdr.path.parent / base)
    for c in cand:
        if c.is_file():
            return c
    raise InputFileError(hdr.path, f"listmode data file {str(cand[0])!r} not found", key="name of data file")


def read_listmode_header(path: str | os.PathLike, strict: bool | None = None) -> SiemensListmodeHeader:
    """Parse and check a Siemens PETLINK listmode header (``.l.hdr``).

    Where STIR is lenient, so is this (an :class:`~sirf_ddip.errors.InputFileWarning` names the key and both
    values; ``strict=True``, or :func:`~sirf_ddip.utils.leniency.strict_inputs`, refuses instead):

    - the offsets are decoded with the scanner's span-1 layout for ``%maximum ring difference`` whatever the
      ``%segment table`` says (real mMR headers carry the 11-entry span-11 table there; STIR's
      ``CListEventECAT8_32bit`` never reads it);
    - the data file is read to its end whatever ``%total listmode word counts`` says (STIR ignores that key; a
      header of the whole acquisition with a cut file is common); a shorter file's warning gives the time span
      its time tags cover.

    Raises
    ------
    InputFileError
        Missing keys, an unknown scanner, ``%number of segments`` other than the table's length (STIR refuses it
        too), a missing or empty data file, a data file that is not a whole number of words (truncated ``.l``);
        in strict mode also the inconsistencies above and header keys given twice with different values.
    UnsupportedDataError
        Compressed listmode, an event word size other than 32 bits, axial compression other than 1 (STIR's
        ``CListEventECAT8_32bit`` refuses it as well); TOF listmode of a scanner without TOF parameters, with an
        even number of TOF bins, or with a ``%TOF mashing factor`` other than 1 (STIR 6.4 hands the mashed TOF
        index on as an unmashed one, ``CListEventScannerWithDiscreteDetectors`` building its uncompressed
        ``ProjDataInfo`` with TOF mashing 1, so its TOF bins would be wrong).

    TOF listmode (see the module doc) is lenient too: a ``%number of TOF time bins`` other than the scanner's
    with ``%TOF mashing factor`` is warned about (STIR decodes with the scanner's), and so is a TOF offset space
    larger than the 30 bits of an event word can address (TOF bins past it cannot occur); a missing
    ``%TOF mashing factor`` takes STIR's default with a warning.
    """
    with strict_inputs(is_strict(strict)):  # keys given twice: the last wins (STIR), with a warning
        hdr = InterfileHeader.read(path)
    fmt = (hdr.get("data format") or "").strip().lower()
    if fmt and fmt != "coincidencelist":
        raise UnsupportedDataError(hdr.path, f"data format {hdr.get('data format')!r} is not listmode "
                                   "(expected CoincidenceList)", key="data format")
    system = (hdr.get("originating system") or "").strip()
    if not system:
        raise InputFileError(hdr.path, "required key missing (the scanner)", key="!originating system")
    try:
        scanner = get_scanner(system)
    except KeyError as exc:
        raise UnsupportedDataError(hdr.path, f"unknown scanner {system!r}: {exc.args[0]}",
                                   key="!originating system") from None
    bits = hdr.get_int("%lm event and tag words format (bits)", 32)
    if bits != 32:
        raise UnsupportedDataError(hdr.path, f"{bits}-bit listmode words are not supported (only the 32-bit "
                                   "PETLINK format of the mMR)", key="%LM event and tag words format (bits)")
    ntof = hdr.get_int("%number of tof time bins", 1)
    if ntof is not None and ntof < 0:
        raise InputFileError(hdr.path, f"negative number of TOF bins {ntof}", key="%number of TOF time bins")
    comp = (hdr.get("%compression") or "").strip().lower()
    compressor = (hdr.get("%compressor version") or "").strip()
    if comp not in ("", "off", "none", "0") or compressor:
        raise UnsupportedDataError(hdr.path, "compressed listmode is not supported; decompress it with the "
                                   "vendor tools first", key="%compression" if comp else "%compressor version")
    span = hdr.get_int("%axial compression", required=True)
    if span != 1:
        raise UnsupportedDataError(hdr.path, f"axial compression {span}: only uncompressed (span-1) listmode "
                                   "offsets are supported (as in STIR)", key="%axial compression")
    num_rings = hdr.get_int("number of rings")
    if num_rings is not None and num_rings != scanner.num_rings:
        raise InputFileError(hdr.path, f"{num_rings} rings, but the {scanner.name} has {scanner.num_rings}",
                             key="number of rings")
    mrd = hdr.get_int("%maximum ring difference", required=True)
    if not 0 <= mrd <= scanner.num_rings - 1:
        raise InputFileError(hdr.path, f"maximum ring difference {mrd} outside 0..{scanner.num_rings - 1}",
                             key="%maximum ring difference")
    nviews = hdr.get_int("%number of views", required=True)
    ntang = hdr.get_int("%number of projections", required=True)
    if nviews != scanner.detectors_per_ring // 2:
        raise InputFileError(hdr.path, f"{nviews} views, but the {scanner.name} has "
                             f"{scanner.detectors_per_ring // 2} (listmode offsets are never view-mashed)",
                             key="%number of views")
    if ntang != scanner.max_num_non_arc_corrected_bins:
        # STIR decodes offsets with the scanner's uncompressed sinogram (CListEventECAT8_32bit uses
        # get_uncompressed_proj_data_info_sptr()), so any other value would be decoded wrongly
        raise InputFileError(hdr.path, f"{ntang} projections, but the {scanner.name}'s listmode sinogram has "
                             f"{scanner.max_num_non_arc_corrected_bins}", key="%number of projections")
    nseg = hdr.get_int("%number of segments")
    table = hdr.get_int_list("%segment table", required=True)
    expected = [scanner.num_rings - abs(d) for d in ecat_segment_sequence(mrd)]
    if nseg is not None and nseg != len(table):  # STIR refuses this too (InterfileRawDataHeaderSiemens)
        raise InputFileError(hdr.path, f"'%number of segments' is {nseg} but the segment table has {len(table)} "
                             "entries", key="%segment table")
    if list(table) != expected:
        # STIR decodes the offsets with the scanner's span-1 sinogram of this maximum ring difference and does not
        # read the table (CListEventECAT8_32bit); real mMR headers carry the span-11 table here
        lenient(hdr.path, f"the segment table {_short(table)} ({len(table)} segments) is not the span-1 layout of "
                f"the {scanner.name} with maximum ring difference {mrd} ({_short(expected)}, {len(expected)} "
                "segments); decoding with the scanner's span-1 layout, as STIR does", key="%segment table",
                refusal=f"segment table does not describe a span-1 sinogram with maximum ring difference {mrd} "
                        f"(expected {expected[:5]}...)", strict=strict)
    offset = hdr.get_int("data offset in bytes", 0) or 0
    if offset < 0:
        raise InputFileError(hdr.path, f"negative data offset {offset}", key="!data offset in bytes")
    data_path = _find_data_file(hdr)
    nbytes = data_path.stat().st_size - offset
    words_hdr = hdr.get_int("%total listmode word counts")
    if nbytes < 0 or nbytes % 4:
        raise InputFileError(data_path, f"listmode file is truncated: {nbytes} bytes after the offset is not a whole "
                             f"number of 32-bit words (header {hdr.path})", key="%total listmode word counts")
    nwords = nbytes // 4
    if nwords == 0:
        raise InputFileError(data_path, f"listmode file holds no events or time tags (0 words after the offset of "
                             f"{offset} bytes; header {hdr.path})", key="name of data file")
    if words_hdr is not None and nwords != words_hdr:
        _word_count_differs(hdr.path, data_path, offset, nwords, words_hdr, strict)
    num_tof, mash = 1, 0
    if ntof is not None and ntof > 1:
        num_tof, mash = _tof_layout(hdr, scanner, ntof, nviews * ntang, strict)
    return SiemensListmodeHeader(
        path=hdr.path, data_path=data_path, scanner=scanner, num_views=nviews, num_tangential=ntang,
        max_ring_diff=mrd, segment_table=tuple(expected), data_offset=offset, num_words=int(nwords),
        duration_s=hdr.get_float("image duration (sec)"), header_word_count=words_hdr,
        extra={"time_sync": hdr.get("%time_sync"), "study_time": hdr.get("%study time (hh:mm:ss gmt+00:00)")},
        num_tof_bins=num_tof, tof_mash_factor=mash)


#: STIR's default ``%TOF mashing factor`` where the header has none (``InterfileRawDataHeaderSiemens``)
_STIR_DEFAULT_TOF_MASH = {"Siemens Vision 600": 8}
#: bits of the offset field of an event word
OFFSET_BITS = 30


def _tof_layout(hdr: InterfileHeader, scanner: Scanner, ntof: int, sinogram_size: int,
                strict: bool | None) -> tuple[int, int]:
    """TOF bins and TOF mashing factor of a TOF listmode header (STIR 6.4 semantics, see
    :func:`read_listmode_header`)."""
    key_n, key_m = "%number of TOF time bins", "%TOF mashing factor"
    if not scanner.is_tof_ready:
        raise UnsupportedDataError(hdr.path, f"{ntof} TOF bins, but the {scanner.name} has no TOF parameters "
                                   "(STIR's scanner table): TOF listmode of a non-TOF scanner", key=key_n)
    mash = hdr.get_int("%tof mashing factor")
    if mash is None:
        mash = _STIR_DEFAULT_TOF_MASH.get(scanner.name, 1)
        lenient(hdr.path, f"not set; using STIR's default {mash} for the {scanner.name}", key=key_m,
                refusal=f"missing in a TOF listmode header (STIR would use {mash})", strict=strict)
    nmax = scanner.max_num_timing_poss
    if mash < 1 or mash > nmax or nmax % mash:
        raise InputFileError(hdr.path, f"TOF mashing factor {mash} must divide the {nmax} unmashed TOF bins of the "
                             f"{scanner.name} (STIR refuses it too)", key=key_m)
    if mash != 1:
        raise UnsupportedDataError(hdr.path, f"TOF mashing factor {mash}: STIR 6.4 decodes the TOF index of mashed "
                                   "32-bit listmode as an unmashed one (its uncompressed ProjDataInfo has TOF mashing "
                                   "1), so the TOF bins would be wrong; only unmashed TOF listmode is supported",
                                   key=key_m)
    num = nmax // mash
    if num % 2 == 0:
        raise UnsupportedDataError(hdr.path, f"{num} TOF bins (even) for the {scanner.name} with TOF mashing factor "
                                   f"{mash}: STIR 6.4 needs an odd number (a central TOF bin)", key=key_m)
    if ntof != num:
        lenient(hdr.path, f"{ntof} TOF bins, but the {scanner.name} with TOF mashing factor {mash} has {num}; "
                f"decoding the offsets with {num} TOF bins, as STIR does (it takes them from the scanner)",
                key=key_n, refusal=f"{ntof} TOF bins, but the {scanner.name} with TOF mashing factor {mash} has "
                                   f"{num}", strict=strict)
    block = sinogram_size * scanner.num_rings ** 2
    reach = -(-(1 << OFFSET_BITS) // block)
    if reach < num:
        lenient(hdr.path, f"the {OFFSET_BITS}-bit event offsets reach only the first {reach} of the {num} Siemens "
                f"TOF bins ({block} span-1 bins each): the other TOF bins cannot occur in this file; reading it as "
                "STIR does", key=key_n, refusal=f"{num} TOF bins of {block} span-1 bins cannot be addressed by "
                f"{OFFSET_BITS}-bit event offsets (only {reach} can)", strict=strict)
    return num, mash


def _short(values: list[int]) -> str:
    v = list(values)
    return "{" + ",".join(map(str, v[:5])) + (",...}" if len(v) > 5 else "}")


def _word_count_differs(header_path: Path, data_path: Path, offset: int, nwords: int, words_hdr: int,
                        strict: bool | None) -> None:
    """STIR ignores ``%total listmode word counts`` and reads the file to its end: warn (or refuse if strict)."""
    key = "%total listmode word counts"
    if nwords < words_hdr:
        span = file_time_span(data_path, offset, nwords)
        covers = ("it holds no time tags" if span is None else
                  f"its time tags cover {span[0]:g} s to {span[1]:g} s from the scan start")
        lenient(data_path, f"listmode file is shorter than its header says: {nwords} words, header {header_path} "
                f"says {words_hdr}; reading the {nwords} words to the end of the file, as STIR does ({covers})",
                key=key, refusal=f"listmode file is truncated: {nwords} words, header says {words_hdr} "
                                 f"(header {header_path})", strict=strict)
    else:
        lenient(data_path, f"listmode file is longer than its header says: {nwords} words, header {header_path} "
                f"says {words_hdr}; reading all {nwords} words to the end of the file, as STIR does", key=key,
                refusal=f"listmode file has {nwords} words, more than the {words_hdr} its header {header_path} "
                        "says", strict=strict)


def file_time_span(data_path: str | os.PathLike, offset: int, nwords: int,
                   probe_words: int = 1 << 20) -> tuple[float, float] | None:
    """First and last time tag (s from the scan start) of a listmode data file, or None if it has none.

    Reads at most ``probe_words`` words from each end, then scans inwards (bounded memory).
    """
    dt = np.dtype("<u4")
    with open(data_path, "rb") as f:
        first = None
        pos = 0
        while pos < nwords and first is None:
            f.seek(offset + 4 * pos)
            w = np.fromfile(f, dtype=dt, count=min(probe_words, nwords - pos))
            if w.size == 0:
                break
            k = np.flatnonzero((w >> 29) == 0b100)
            if k.size:
                first = int(w[k[0]] & TIME_MASK) / 1000.0
            pos += w.size
        if first is None:
            return None
        end = nwords
        while end > 0:
            lo = max(0, end - probe_words)
            f.seek(offset + 4 * lo)
            w = np.fromfile(f, dtype=dt, count=end - lo)
            k = np.flatnonzero((w >> 29) == 0b100)
            if k.size:
                return first, int(w[k[-1]] & TIME_MASK) / 1000.0
            end = lo
    return first, first


def iter_listmode_words(header: SiemensListmodeHeader, chunk_words: int = 1 << 22,
                        start_word: int = 0) -> Iterator[np.ndarray]:
    """Yield the data file's words as ``uint32`` arrays of at most ``chunk_words`` (bounded memory).

    Raises
    ------
    InputFileError
        If the file shrinks while being read.
    """
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be positive, got {chunk_words}")
    dt = np.dtype("<u4")
    pos = int(start_word)
    with open(header.data_path, "rb") as f:
        f.seek(header.data_offset + 4 * pos)
        while pos < header.num_words:
            n = min(chunk_words, header.num_words - pos)
            buf = np.fromfile(f, dtype=dt, count=n)
            if buf.size != n:
                raise InputFileError(header.data_path, f"listmode file ended after {pos + buf.size} words, "
                                     f"expected {header.num_words}", key="%total listmode word counts")
            pos += n
            yield buf if buf.dtype.isnative else buf.astype(np.uint32)
