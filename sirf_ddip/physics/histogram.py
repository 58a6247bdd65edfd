"""Listmode -> sinogram histogramming with STIR's ``lm_to_projdata`` semantics, vectorised and streaming.

What STIR does per event (UCL/STIR ``src/listmode_buildblock/LmToProjData.cxx``, ``process_data``;
``CListEventScannerWithDiscreteDetectors.inl``, ``get_bin``), done here for whole chunks at once:

1. the span-1 offset -> detector pair (``CListEventECAT8_32bit::get_detection_position``, see
   :mod:`sirf_ddip.io.siemens_listmode`);
2. detector pair -> bin of the template (``ProjDataInfoCylindricalNoArcCorr::get_bin_for_det_pos_pair``,
   see :mod:`sirf_ddip.geometry.detectors`); events whose ring difference is not in the template, or whose
   axial or tangential position is outside it, are dropped;
3. prompts add 1; delayeds add 1 when only delayeds are stored, -1 when prompts and delayeds are
   (``delayed_increment``), i.e. ``trues`` = prompts - delayeds;
4. time frame ``[start, end)`` in seconds from the scan start, decided by the time tags: before the frame,
   records are skipped until the first time tag with ``t >= start`` (none when ``start <= 0``); then events
   are counted until the first time tag with ``t >= end`` (never when ``end`` is not given, as STIR's
   ``end_time > 0.01`` test).

Because the target bin of a span-1 offset ``o = z * (V * T) + r`` depends on the sinogram ``z`` only through
its ring pair and on ``r`` only through the crystal pair, two small lookup tables give the flat bin of every
event (``lut_z[z, keep] + lut_r[r]``). Compiled kernels (:mod:`sirf_ddip.physics.lm_kernels`, numba) do the
work chunk by chunk: with 2 threads (the default) this thread decodes a chunk (branch-free: frame test, bin or
trash slot per word) while a helper thread adds the previous chunk into one int32 array in the "sinogram"
layout of :mod:`sirf_ddip.geometry.detectors`, and another reads the next chunk from the file; with more
threads, :func:`~sirf_ddip.physics.lm_kernels.bin_chunk` shares the work with private sinograms or split bin
ranges. The array is re-ordered in place, segment by segment, to STIR's view-by-view file order at the end.
Memory: the accumulator (4 bytes per bin) plus two chunks of words and two int32 work lists of a chunk.
"""

from __future__ import annotations

import math
import os
import time as _time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data import ProjData
from ..errors import GeometryMismatchError, InputFileError
from ..geometry.detectors import DetectorPairBinner
from ..geometry.sinogram import SinogramGeometry
from ..io.interfile import file_to_memory_order
from ..io.siemens_listmode import (TIME_MASK, SiemensListmodeHeader, iter_listmode_words,
                                   read_listmode_header)
from ..utils.progress import progress

__all__ = ["EVENT_TYPES", "FrameSelector", "ListmodeHistogrammer", "Histogram", "histogram_listmode",
           "check_same_scanner", "iter_frame_words", "histogram_petsird", "sinogram_to_file_order",
           "write_flat_projdata", "flat_projdata_header", "write_flat_data"]

#: event selections, as STIR's ``store prompts`` / ``store delayeds`` pairs
EVENT_TYPES = ("prompts", "delayeds", "trues")

_TAG_TIME = 0b100  # top three bits of a time tag: bit 31 = 1, bits 29-30 = 0


def check_same_scanner(header, geometry: SinogramGeometry, template: str | os.PathLike) -> None:
    """Refuse a template of another scanner than the listmode's (STIR's ``LmToProjData`` does too).

    ``header`` is anything with ``scanner`` and ``path`` attributes (a listmode header).

    Raises
    ------
    GeometryMismatchError
        Naming both files and the differing scanner parameter.
    """
    a, b = header.scanner, geometry.scanner
    checks = [("scanner", a.name, b.name), ("number of rings", a.num_rings, b.num_rings),
              ("detectors per ring", a.detectors_per_ring, b.detectors_per_ring)]
    for what, x, y in checks:
        if x != y:
            raise GeometryMismatchError(f"{header.path}: listmode is from {a.name} ({a.num_rings} rings, "
                                        f"{a.detectors_per_ring} detectors per ring) but template {template} is "
                                        f"for {b.name} ({b.num_rings} rings, {b.detectors_per_ring} detectors "
                                        f"per ring): {what} differs")
    for what, x, y in (("ring spacing (mm)", a.ring_spacing_mm, b.ring_spacing_mm),
                       ("effective radius (mm)", a.effective_radius_mm, b.effective_radius_mm)):
        if abs(x - y) > 0.05:
            raise GeometryMismatchError(f"{header.path}: {what} of the listmode's scanner {x} differs from "
                                        f"template {template}'s {y}")
    if geometry.num_tangential > a.max_num_non_arc_corrected_bins:
        raise GeometryMismatchError(f"template {template}: {geometry.num_tangential} tangential positions, more "
                                    f"than the {a.max_num_non_arc_corrected_bins} of the {a.name}")


class FrameSelector:
    """Streaming time-frame selection with STIR ``LmToProjData`` semantics (see module doc).

    Parameters
    ----------
    start, end : float or None
        Frame in seconds from the scan start; ``None`` (or ``start <= 0``) starts at the first record,
        ``end=None`` reads to the end of the file.
    """

    def __init__(self, start: float | None = None, end: float | None = None):
        from ..errors import ConfigError

        self.start = float(start) if start is not None else 0.0
        self.end = float(end) if end is not None else None
        for name, v in (("start", self.start), ("end", self.end)):
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"frame {name} must be a finite number of seconds, got {v}")
        if self.end is not None and self.end <= self.start:
            raise ConfigError(f"frame end {self.end} s must be after its start {self.start} s")
        self.started = self.start <= 0.0  # STIR: ``while (current_time < start_time)`` with current_time = 0
        self.done = False
        self.first_tag_s: float | None = None  # first time tag inside the frame
        self.last_tag_s: float | None = None  # last time tag inside the frame
        self.last_tag_in_file_s: float | None = None

    def select(self, words: np.ndarray) -> np.ndarray:
        """The part of ``words`` (consecutive records) inside the frame (possibly empty)."""
        if self.done:
            return words[:0]
        tag_pos = np.flatnonzero((words >> 29) == _TAG_TIME)
        tag_s = (words[tag_pos] & TIME_MASK).astype(np.float64) / 1000.0
        if tag_s.size:
            self.last_tag_in_file_s = float(tag_s[-1])
        lo = 0
        if not self.started:
            k = np.flatnonzero(tag_s >= self.start)
            if k.size == 0:
                return words[:0]
            lo = int(tag_pos[k[0]]) + 1
            self.started = True
            self.first_tag_s = float(tag_s[k[0]])
            tag_pos, tag_s = tag_pos[k[0] + 1:], tag_s[k[0] + 1:]
        hi = words.size
        if self.end is not None and self.end > 0.01:
            k = np.flatnonzero(tag_s >= self.end)
            if k.size:
                hi = int(tag_pos[k[0]])
                self.done = True
                tag_s = tag_s[:k[0]]
        if tag_s.size:
            if self.first_tag_s is None:
                self.first_tag_s = float(tag_s[0])
            self.last_tag_s = float(tag_s[-1])
        return words[lo:hi]


def iter_frame_words(header: SiemensListmodeHeader, start: float | None = None, end: float | None = None,
                     chunk_words: int = 1 << 22, show_progress: bool | None = None,
                     selector: FrameSelector | None = None) -> Iterator[np.ndarray]:
    """Yield the records (uint32 words) inside the frame ``[start, end)``, chunk by chunk, with a progress bar
    over the file; stops reading once the frame has ended."""
    sel = selector or FrameSelector(start, end)
    bar = progress(total=header.num_words, desc=f"listmode {header.path.name}", unit="word", unit_scale=True,
                   enabled=show_progress)
    try:
        for words in iter_listmode_words(header, chunk_words):
            bar.update(words.size)
            part = sel.select(words)
            if part.size:
                yield part
            if sel.done:
                break
    finally:
        bar.close()


@dataclass
class Histogram:
    """A histogrammed frame: ``data`` flat float32 in STIR's file order (segments ascending, view, axial
    position, tangential position) on ``geometry``, plus what was counted."""

    data: np.ndarray
    geometry: SinogramGeometry
    events: str
    start_s: float
    end_s: float | None
    stats: dict = field(default_factory=dict)

    def to_projdata(self) -> ProjData:
        """The histogram as :class:`ProjData` (memory order; a copy)."""
        g = self.geometry
        numbers = [s.number for s in g.segments]
        axial = [s.num_axial for s in g.segments]
        if getattr(g, "is_tof", False):  # one file-order block per TOF bin
            blk = g.num_sinograms * g.num_views * g.num_tangential
            arr = np.stack([file_to_memory_order(self.data[i * blk:(i + 1) * blk], numbers, axial, g.num_views,
                                                 g.num_tangential, "view") for i in range(g.num_tof_bins)])
        else:
            arr = file_to_memory_order(self.data, numbers, axial, g.num_views, g.num_tangential, "view")
        return ProjData(arr, g, {"source": self.stats.get("listmode", ""), "events": self.events})

    def write(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write as STIR Interfile (``.hs`` + ``.s``, view by view), atomically; see :func:`write_flat_projdata`."""
        return write_flat_projdata(path, self.data, self.geometry, overwrite=overwrite, extra=self.frame_keys())

    @property
    def duration_s(self) -> float:
        """Frame duration: to the frame end the data reach, else to the last time tag read (0 without tags)."""
        end = self.end_s if self.end_s is not None else (self.stats.get("last_time_tag_s") or self.start_s)
        return max(0.0, float(end) - self.start_s)

    def frame_keys(self) -> dict[str, str]:
        """The Interfile time-frame keys of the histogram's header."""
        return {"number of time frames": "1", "image relative start time (sec)[1]": _fmt(self.start_s),
                "image duration (sec)[1]": _fmt(self.duration_s)}


def _fmt(v: float) -> str:
    return repr(float(v)) if float(v) != int(v) else str(int(v))


def write_flat_projdata(path: str | os.PathLike, flat: np.ndarray, geometry: SinogramGeometry,
                        overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write float32 projection data already in STIR's view-by-view file order (``.hs`` + ``.s``).

    Both files are written under temporary names in the output folder and then renamed (``os.replace``),
    data file first (:func:`~sirf_ddip.utils.atomic.atomic_paths`), so a failure never leaves a half-written or
    overwritten output.

    Raises
    ------
    OutputExistsError
        If either file exists and ``overwrite`` is False.
    OutputWriteError
        If writing fails (disk full, file-size limit); the previous files are unchanged.
    """
    from ..utils.atomic import atomic_paths
    from ..utils.provenance import check_output

    path = Path(path)
    if path.suffix.lower() != ".hs":
        raise InputFileError(path, "an Interfile projection-data header must end in .hs")
    data_path = path.with_suffix(".s")
    check_output(path, overwrite)
    check_output(data_path, overwrite)
    text = flat_projdata_header(path, geometry, extra)
    with atomic_paths(data_path, path) as (tmp_data, tmp_hdr):
        write_flat_data(tmp_data, flat, geometry)
        tmp_hdr.write_text(text, encoding="utf-8")
    return path


def flat_projdata_header(path: str | os.PathLike, geometry: SinogramGeometry, extra: dict | None = None) -> str:
    """Text of the ``.hs`` header of :func:`write_flat_projdata` (its data file: ``path`` with suffix ``.s``)."""
    lines = geometry.header_lines(data_file=Path(path).with_suffix(".s").name, storage="view", extra=extra)
    return "\n".join(lines) + "\n"


def write_flat_data(file: str | os.PathLike, flat: np.ndarray, geometry: SinogramGeometry) -> None:
    """Write the ``.s`` data of :func:`write_flat_projdata` (little-endian float32) to ``file``, in blocks."""
    flat = np.asarray(flat)
    size = (geometry.num_sinograms * geometry.num_views * geometry.num_tangential
            * getattr(geometry, "num_tof_bins", 1))
    if flat.size != size:
        raise ValueError(f"{flat.size} values for a geometry of {size} bins")
    with open(file, "wb") as f:
        step = 1 << 24
        for i in range(0, size, step):
            f.write(np.ascontiguousarray(flat[i:i + step], dtype="<f4").tobytes())


def tof_lookup(header: SiemensListmodeHeader, geometry: SinogramGeometry, block_size: int,
               template: str | os.PathLike = "template") -> np.ndarray:
    """First bin of the target TOF block of each ``(Siemens TOF bin s, keep)``, flat ``2 * s + keep`` (int32).

    STIR 6.4: the listmode bin's ``timing_pos_num`` is ``k = (0, +1, -1, +2, ...)[s]`` relative to its detector
    order (:func:`~sirf_ddip.io.siemens_listmode.siemens_timing_pos_sequence`); ``get_bin_for_det_pair`` of the
    target keeps ``k`` where the target bin has the same detector 1 (``keep = 1``) and gives ``-k`` where the
    detectors swap; the unmashed position ``k`` goes into the mashed TOF bin ``round(k / f)`` (``f`` the
    target's TOF mashing factor; odd, as the number of TOF bins is). A non-TOF target: all 0 (the TOF bins are
    summed).

    Raises
    ------
    GeometryMismatchError
        If the target's scanner has other TOF bins than the listmode's.
    """
    seq = header.timing_pos_sequence()
    lut = np.zeros((seq.size, 2), dtype=np.int64)
    if getattr(geometry, "is_tof", False):
        a, b = header.scanner, geometry.scanner
        if (a.max_num_timing_poss != b.max_num_timing_poss
                or abs(a.size_timing_pos_ps - b.size_timing_pos_ps) > 1e-3 * a.size_timing_pos_ps):
            raise GeometryMismatchError(
                f"{header.path}: the listmode's {a.name} has {a.max_num_timing_poss} TOF bins of "
                f"{a.size_timing_pos_ps:g} ps but template {template} has {b.max_num_timing_poss} of "
                f"{b.size_timing_pos_ps:g} ps")
        f = int(geometry.tof_mash_factor)
        k = np.stack([-seq, seq], axis=1)  # keep = 0: detectors swap
        half = (a.max_num_timing_poss - 1) // 2
        idx = (k + half) // f  # = round(k / f) + num_tof_bins // 2 for odd f
        lut = idx * block_size
    return np.ascontiguousarray(lut.reshape(-1), dtype=np.int32)


class ListmodeHistogrammer:
    """Histogram a Siemens PETLINK listmode into a sinogram geometry of its scanner.

    Parameters
    ----------
    header : SiemensListmodeHeader
    geometry : SinogramGeometry
        Target geometry (span 1, span 11, fewer segments, view mashing, fewer tangential positions).
    template : str, optional
        Name of the template, for error messages.

    TOF listmode (:attr:`SiemensListmodeHeader.is_tof`) goes into a TOF geometry of the same scanner with any TOF
    mashing (STIR's ``get_bin_for_det_pos_pair``: the TOF bin of the event's timing position, sign flipped where
    the target bin's detector order is the reverse of the listmode bin's, see :func:`tof_lookup`), or into a
    non-TOF geometry, which sums the TOF bins (STIR: a non-TOF template ignores the timing position).

    Raises
    ------
    GeometryMismatchError
        If the geometry is for another scanner, is TOF while the listmode is not (never a silent collapse), or has
        other TOF bins than the listmode's scanner.
    """

    def __init__(self, header: SiemensListmodeHeader, geometry: SinogramGeometry, template: str = "template"):
        check_same_scanner(header, geometry, template)
        if getattr(geometry, "is_tof", False) and not header.is_tof:
            raise GeometryMismatchError(f"template {template} is TOF ({geometry.num_tof_bins} TOF bins) but listmode "
                                        f"{header.path} has no TOF information (%number of TOF time bins := 1): "
                                        "use a non-TOF template")
        self.header = header
        self.geometry = geometry
        self.binner = DetectorPairBinner(geometry)
        b = self.binner
        self.size = b.size
        if 4 * self.size > (1 << 31) - 8:
            raise ValueError(f"geometry of {self.size} bins is too large for the int32 lookup tables")
        sino_stride = b.num_views * b.num_tangential
        # transaxial table over the offset's (view, tangential) part: 2 * (view * T + i) + keep
        c1, c2 = header.view_tangential_crystals()
        vt, keep = b.view_tangential_index(c1, c2)
        self._lut_r = (np.where(vt >= 0, vt, self.size) * 2 + keep).astype(np.int32)
        # axial table over (z, keep): flat index of the first bin of the target sinogram (``size``: not stored)
        rings1, rings2 = header.sinogram_rings()
        base = np.empty((header.num_sinograms, 2), dtype=np.int32)
        for k in (0, 1):  # keep = 0: rings swap
            ra, rb = (rings1, rings2) if k else (rings2, rings1)
            sg = b.ring_pair_sinogram[ra, rb]
            base[:, k] = np.where(sg >= 0, sg.astype(np.int64) * sino_stride, self.size)
        self._lut_z = base.reshape(-1)  # [z * 2 + keep]
        self.num_tof_bins = int(geometry.num_tof_bins) if getattr(geometry, "is_tof", False) else 1
        self.total = self.size * self.num_tof_bins
        if 4 * self.total > (1 << 31) - 8:
            raise ValueError(f"geometry of {self.total} bins is too large for the int32 lookup tables")
        self._lut_t = tof_lookup(header, geometry, self.size, template) if header.is_tof else None

    def histogram(self, start: float | None = None, end: float | None = None, events: str = "prompts",
                  chunk_words: int = 1 << 21, show_progress: bool | None = None,
                  threads: int | None = None) -> Histogram:
        """Histogram the frame ``[start, end)`` (s from the scan start) of ``events`` (prompts, delayeds or
        trues = prompts - delayeds) with ``threads`` threads (default: as many of :func:`default_threads` as
        have private sinograms within ``PRIVATE_SINOGRAM_BYTES``, at least 2), reading
        ``chunk_words`` words at a time (memory: the int32 sinogram(s), two chunks of words and two int32
        work lists of a chunk).

        Raises
        ------
        DataValueError
            If event offsets lie outside the listmode's sinogram (a corrupt file).
        """
        from ..errors import DataValueError
        from . import lm_kernels as K

        if events not in EVENT_TYPES:
            raise ValueError(f"events must be one of {EVENT_TYPES}, got {events!r}")
        if threads is None:  # as many threads as have a private sinogram (at least 2), at most numba's
            fit = 1 + PRIVATE_SINOGRAM_BYTES // (4 * self.size)
            nt = default_threads(min(default_threads(), max(2, fit)))
        else:
            nt = default_threads(threads)
        tof = self._lut_t is not None
        if tof:  # TOF listmode: the decode/add pipeline (decode_chunk_tof), at most 2 threads
            nt = min(nt, 2)
        # per prompt bit (0 delayed, 1 prompt): counted?, subtracted? (STIR ``delayed_increment``)
        use = np.array({"prompts": (0, 1), "delayeds": (1, 0), "trues": (1, 1)}[events], dtype=np.int64)
        neg = np.array((1, 0) if events == "trues" else (0, 0), dtype=np.int64)
        row = self.total + K.TRASH_SLOTS * nt  # + the threads' trash slots (see bin_chunk)
        # 1 or 2 threads: decode here while a helper thread adds the previous chunk into one sinogram; more:
        # bin_chunk's private sinograms (memory permitting) or split bin ranges
        pipeline = nt <= 2
        private = not pipeline and 4 * row * (nt - 1) <= PRIVATE_SINOGRAM_BYTES
        rows = nt if private else 1
        acc = zeros_int32(rows * row).reshape(rows, row)
        h = self.header
        signed = events == "trues"
        work = [np.empty(chunk_words, dtype=np.int32) for _ in range(2 if pipeline else 0)]
        pool = ThreadPoolExecutor(max_workers=1) if nt == 2 else None
        pending: list = []
        nchunk = 0

        def process(words: np.ndarray, lo: int, end_s: float) -> tuple[int, int, int, int]:
            nonlocal nchunk
            stop = int(K.find_time_tag(words, lo, words.size, end_s, nt)) if end_s < math.inf else -1
            hi = stop if stop >= 0 else words.size
            if not pipeline:
                first, last, bad = K.bin_chunk(words, lo, hi, self._lut_r, self._lut_z, h.sinogram_size,
                                               h.num_sinograms, self.size, use, neg, acc, private, nt)
                return stop, first, last, bad
            wk = work[nchunk % 2]
            nchunk += 1
            if tof:
                first, last, bad = K.decode_chunk_tof(words, lo, hi, self._lut_r, self._lut_z, self._lut_t,
                                                      h.sinogram_size, h.tof_block_sinograms, h.num_sinograms,
                                                      h.num_tof_bins, self.size, use, neg, wk, self.total)
            else:
                first, last, bad = K.decode_chunk(words, lo, hi, self._lut_r, self._lut_z, h.sinogram_size,
                                                  h.num_sinograms, self.size, use, neg, wk, self.size)
            while pending:  # the add of the previous chunk (which used the other work list)
                pending.pop().result()
            if pool is None:
                K.add_chunk(acc[0], wk, hi - lo, signed)
            else:
                pending.append(pool.submit(K.add_chunk, acc[0], wk, hi - lo, signed))
            return stop, first, last, bad

        t0, c0 = _time.perf_counter(), _time.process_time()
        try:
            sel = stream_frame(h, process, start, end, chunk_words, show_progress, nt)
            while pending:
                pending.pop().result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        elapsed, cpu = _time.perf_counter() - t0, _time.process_time() - c0
        if sel.bad:
            raise DataValueError(f"{h.data_path}: {sel.bad} events have offsets beyond the "
                                 f"{h.describe_offsets()} described by {h.path} (corrupt listmode?)")
        if self.num_tof_bins > 1:  # each TOF bin's block to file order, in place (one row: the pipeline)
            blocks = acc[0, :self.total].reshape(self.num_tof_bins, self.size)
            non_tof = self.geometry.non_tof()
            for blk in blocks:
                sinogram_to_file_order(blk, non_tof)
            data = acc[0, :self.total].view(np.float32)
        else:
            data = sinogram_to_file_order(acc, self.geometry)  # adds the threads' sinograms on the way
        if rows > 1:
            _release_after_first_row(acc)
        if not data.any():
            import warnings

            from ..errors import InputFileWarning

            warnings.warn(InputFileWarning(h.data_path, f"the frame holds no {events} ({sel.records:,} records in "
                                           "it): the sinogram is all zero"), stacklevel=2)
        stats = {"listmode": str(h.path), "records_in_frame": int(sel.records), "threads": nt,
                 "listmode_tof_bins": h.num_tof_bins if h.is_tof else 1, "tof_bins": self.num_tof_bins,
                 "private_sinograms": rows,
                 "counted": float(data.sum(dtype=np.float64)), "seconds": elapsed, "cpu_seconds": cpu,
                 "first_time_tag_s": sel.first_tag_s, "last_time_tag_s": sel.last_tag_s,
                 "last_time_tag_in_file_s": sel.last_tag_read_s, "frame_end_reached_s": sel.end_s}
        return Histogram(data, self.geometry, events, float(start or 0.0), sel.end_s, stats)


#: extra memory allowed for the threads' private sinograms (beyond it, threads split the bins instead)
PRIVATE_SINOGRAM_BYTES = 1 << 30


def _release_after_first_row(acc: np.ndarray) -> None:
    """Give the pages of ``acc[1:]`` (an array from :func:`zeros_int32`) back to the system."""
    import mmap

    base = acc
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if base is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = -(-acc[0].nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    if start < len(base):
        try:
            base.madvise(mmap.MADV_DONTNEED, start, len(base) - start)
        except (OSError, ValueError):
            pass


def zeros_int32(n: int) -> np.ndarray:
    """A zeroed int32 array on anonymous memory advised for transparent huge pages (where the system allows
    it, ``madvise``): random adds into a sinogram of hundreds of MB then miss the TLB far less often."""
    import mmap

    if n <= 0:
        return np.zeros(max(n, 0), dtype=np.int32)
    try:
        m = mmap.mmap(-1, 4 * n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # no anonymous mmap (e.g. Windows): plain memory
        return np.zeros(n, dtype=np.int32)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(m, dtype=np.int32)  # anonymous pages are zero; the array keeps the map alive


def default_threads(threads: int | None = None) -> int:
    """Threads of the compiled kernels: ``threads``, else numba's thread count (``NUMBA_NUM_THREADS``,
    default the number of cores)."""
    import numba

    n = int(threads) if threads is not None else int(numba.get_num_threads())
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return n


#: time between two time tags of the mMR listmode (``%timing tagwords interval (msec)``), in s: a frame end
#: less than this after the last time tag is the end of the file, not a frame the file does not reach
TAG_INTERVAL_S = 0.001


@dataclass
class FrameProgress:
    """What :func:`stream_frame` saw of the frame: records inside it, time tags, corrupt events, and the frame
    end that the data reach (``end_s``: the requested end, or None when the file ends before it)."""

    records: int = 0
    bad: int = 0
    first_tag_s: float | None = None
    last_tag_s: float | None = None
    last_tag_read_s: float | None = None
    started: bool = False
    end_s: float | None = None


def stream_frame(header: SiemensListmodeHeader, process, start: float | None = None, end: float | None = None,
                 chunk_words: int = 1 << 21, show_progress: bool | None = None,
                 threads: int = 1) -> FrameProgress:
    """Stream the records of the frame ``[start, end)`` through ``process`` with bounded memory.

    The data file is read in chunks of ``chunk_words`` into two reused buffers, the next chunk being read
    (by a helper thread) while ``process(words, lo, end_s)`` handles the current one: ``words[lo:]`` are in
    the frame from its start on; ``process`` stops at the first time tag ``t >= end_s`` (``inf``: never) and
    returns ``(stop position or -1, first and last time tag in ms or -1, corrupt events)``. The frame rule is
    STIR's ``LmToProjData`` (module doc): records are skipped up to and including the first time tag
    ``t >= start`` (none when ``start <= 0``); a frame end ``<= 0.01`` s is ignored (``end_time > 0.01``).

    Raises
    ------
    ValueError
        If ``end <= start``.
    InputFileError
        If the data file ends before the header's word count.
    """
    from . import lm_kernels as K

    sel = FrameSelector(start, end)  # validates the frame
    end_s = sel.end if sel.end is not None and sel.end > 0.01 else math.inf
    started = sel.started
    out = FrameProgress()
    nwords = header.num_words
    chunk = max(1, min(int(chunk_words), nwords))
    bufs = (np.empty(chunk, dtype=np.uint32), np.empty(chunk, dtype=np.uint32))
    swap = not np.dtype("<u4").isnative

    def read(f, buf: np.ndarray, pos: int) -> int:
        n = min(chunk, nwords - pos)
        if n <= 0:
            return 0
        mv = memoryview(buf).cast("B")[:4 * n]
        got = 0
        while got < 4 * n:
            k = f.readinto(mv[got:])
            if not k:
                raise InputFileError(header.data_path, f"listmode file ended after {pos + got // 4} words, "
                                     f"expected {nwords}", key="%total listmode word counts")
            got += k
        if swap:
            buf[:n].byteswap(inplace=True)
        return n

    def tag_s(ms: int) -> float | None:
        return None if ms < 0 else ms / 1000.0

    bar = progress(total=nwords, desc=f"listmode {header.path.name}", unit="word", unit_scale=True,
                   enabled=show_progress)
    try:
        with open(header.data_path, "rb") as f, ThreadPoolExecutor(max_workers=1) as pool:
            f.seek(header.data_offset)
            pos = 0
            cur = 0
            fut = pool.submit(read, f, bufs[0], 0)
            while True:
                n = fut.result()
                if n == 0:
                    break
                words = bufs[cur][:n]
                pos += n
                cur = 1 - cur
                fut = pool.submit(read, f, bufs[cur], pos)
                bar.update(n)
                lo = 0
                if not started:
                    k = int(K.find_time_tag(words, 0, n, sel.start, threads))
                    if k < 0:
                        last = int(K.last_time_tag(words, 0, n))
                        if last >= 0:
                            out.last_tag_read_s = tag_s(last)
                        continue
                    started = True
                    lo = k + 1
                    out.first_tag_s = out.last_tag_s = out.last_tag_read_s = tag_s(int(words[k] & TIME_MASK))
                stop, first_ms, last_ms, bad = (int(v) for v in process(words, lo, end_s))
                out.bad += bad
                out.records += (stop if stop >= 0 else n) - lo
                if first_ms >= 0:
                    if out.first_tag_s is None:
                        out.first_tag_s = tag_s(first_ms)
                    out.last_tag_s = out.last_tag_read_s = tag_s(last_ms)
                if stop >= 0:
                    out.last_tag_read_s = tag_s(int(words[stop] & TIME_MASK))
                    out.end_s = sel.end
                    break
            fut.cancel()
    finally:
        bar.close()
    out.started = started
    _check_frame_coverage(header, sel, out)
    return out


def _check_frame_coverage(header: SiemensListmodeHeader, sel: FrameSelector, out: FrameProgress) -> None:
    """Refuse a frame that starts after the data; warn when the data end before the frame or have no time tags.

    Raises
    ------
    ConfigError
        If no time tag of the file is at or after the frame start (the frame holds nothing).
    """
    import warnings

    from ..errors import ConfigError, InputFileWarning

    last = out.last_tag_read_s
    if not out.started:
        where = f"its last time tag is at {last:g} s" if last is not None else "it has no time tags"
        raise ConfigError(f"frame start {sel.start:g} s is after the end of listmode {header.data_path} ({where}): "
                          "the frame holds no events")
    if out.first_tag_s is None and last is None:
        warnings.warn(InputFileWarning(header.data_path, f"no time tags: all {out.records:,} records were counted "
                                       "but the time they cover is unknown (frame duration written as 0)"),
                      stacklevel=3)
    if sel.end is not None and sel.end > 0.01 and out.end_s is None:
        if last is not None and sel.end <= last + TAG_INTERVAL_S + 1e-9:
            out.end_s = sel.end  # the frame ends with the file
        elif last is not None:
            warnings.warn(InputFileWarning(header.data_path, f"frame end {sel.end:g} s is after the end of the data "
                                           f"(last time tag {last:g} s): the frame is {sel.start:g} s to {last:g} s"),
                          stacklevel=3)
    if sel.end is not None and sel.end <= 0.01:
        warnings.warn(f"frame end {sel.end:g} s <= 0.01 s is ignored, as in STIR's lm_to_projdata: the frame runs "
                      "to the end of the data", RuntimeWarning, stacklevel=3)


def sinogram_to_file_order(acc: np.ndarray, geometry: SinogramGeometry) -> np.ndarray:
    """Reorder an int32 accumulator in the "sinogram" layout (segments ascending, axial, view, tangential;
    possibly with trailing trash bins) to float32 view-by-view file order, in place (one segment of scratch).

    ``acc`` may be 2-d (one row per thread's private sinogram): the rows are added on the way and the result
    is written over the first row. Returns the float32 view of ``acc[..., :size]`` (of the first row).
    """
    from .lm_kernels import reorder_segment

    g = geometry
    nv, nt = g.num_views, g.num_tangential
    size = g.num_sinograms * nv * nt
    rows = acc.reshape(1, -1) if acc.ndim == 1 else acc
    if rows.dtype != np.int32:
        raise ValueError(f"accumulator must be int32, got {rows.dtype}")
    if not rows.flags.c_contiguous or rows.shape[1] < size:
        raise ValueError(f"accumulator must be contiguous with at least {size} bins per row")
    scratch = np.empty(max(sg.num_axial for sg in g.segments) * nv * nt, dtype=np.float32)
    pos = 0
    for sg in g.segments:
        reorder_segment(rows, pos, sg.num_axial, nv, nt, scratch)
        pos += sg.num_axial * nv * nt
    return rows[0, :size].view(np.float32)


def histogram_petsird(path: str | os.PathLike, geometry: SinogramGeometry, start: float | None = None,
                      end: float | None = None, events: str = "prompts", template: str = "template",
                      show_progress: bool | None = None, module_type: int = 0) -> Histogram:
    """Histogram a PETSIRD listmode whose scanner is a cylinder of detectors (see
    :mod:`sirf_ddip.io.petsird_listmode`) onto ``geometry``, with the same binning as the Siemens listmode.

    Time blocks are in the frame when ``start <= block start < end`` (ms from the scan start); energy bins
    are summed over, and so are the TOF indices unless ``geometry`` is TOF: then each event goes to the TOF bin
    of its emission point's signed position ``d`` along the LOR (STIR: ``d > 0`` towards the bin's detector 1,
    so the position flips where the event's detector order is the reverse of STIR's), with the geometry's TOF
    mashing (:func:`sirf_ddip.io.petsird_listmode.petsird_tof_positions`).
    """
    import torch

    from ..io.petsird_listmode import PetsirdCylinder, iter_petsird_events, read_petsird_header

    if events not in EVENT_TYPES:
        raise ValueError(f"events must be one of {EVENT_TYPES}, got {events!r}")
    path = Path(path)
    info = read_petsird_header(path).scanner
    cyl = PetsirdCylinder.from_scanner_information(info, path, module_type)
    a, b = cyl.scanner, geometry.scanner
    if (a.num_rings, a.detectors_per_ring) != (b.num_rings, b.detectors_per_ring):
        raise GeometryMismatchError(f"{path}: PETSIRD scanner {a.name!r} has {a.num_rings} rings x "
                                    f"{a.detectors_per_ring} crystals, template {template} is for {b.name} "
                                    f"({b.num_rings} x {b.detectors_per_ring})")
    binner = DetectorPairBinner(geometry)
    size = binner.size
    tof = bool(getattr(geometry, "is_tof", False))
    if tof:
        from ..io.petsird_listmode import petsird_tof_positions
        upos = petsird_tof_positions(info, geometry.scanner, path, module_type)
        half_unmashed = (geometry.scanner.max_num_timing_poss - 1) // 2
    total = size * (geometry.num_tof_bins if tof else 1)
    acc = torch.zeros(total + 1, dtype=torch.int32)
    lo_ms = 1000.0 * (start or 0.0)
    hi_ms = 1000.0 * end if end is not None else math.inf
    pending: list[tuple[np.ndarray, int]] = []
    npend = 0
    try:  # the file's own TOF bins (1: non-TOF), for the record and the note that a non-TOF template sums them
        file_tof_bins = max(int(np.asarray(info.tof_bin_edges[module_type][module_type].edges).size) - 1, 1)
    except (AttributeError, IndexError, TypeError):
        file_tof_bins = 1
    stats = {"listmode": str(path), "format": "PETSIRD", "time_blocks_in_frame": 0, "records_in_frame": 0,
             "listmode_tof_bins": file_tof_bins, "tof_bins_summed": (not tof) and file_tof_bins > 1,
             "first_time_tag_s": None, "last_time_tag_s": None, "last_block_stop_s": None}

    def flush():
        nonlocal npend
        for flat, w in pending:
            idx = torch.from_numpy(np.where(flat >= 0, flat, total))
            acc.scatter_add_(0, idx, torch.full((flat.size,), w, dtype=torch.int32))
        pending.clear()
        npend = 0

    bar = progress(desc=f"PETSIRD {path.name}", unit="block", enabled=show_progress)
    try:
        for blk in iter_petsird_events(path, (module_type, module_type)):
            bar.update(1)
            if not lo_ms <= blk.start_ms < hi_ms:
                if blk.start_ms >= hi_ms:
                    break
                continue
            stats["time_blocks_in_frame"] += 1
            stats["last_block_stop_s"] = blk.stop_ms / 1000.0
            if stats["first_time_tag_s"] is None:
                stats["first_time_tag_s"] = blk.start_ms / 1000.0
            stats["last_time_tag_s"] = blk.start_ms / 1000.0
            for arr, tix, w, use in ((blk.prompts, blk.prompt_tof, 1, events in ("prompts", "trues")),
                                     (blk.delayeds, blk.delayed_tof, -1 if events == "trues" else 1,
                                      events in ("delayeds", "trues"))):
                stats["records_in_frame"] += int(arr.shape[0])
                if not use or arr.shape[0] == 0:
                    continue
                r1, c1 = cyl.detectors(arr[:, 0])
                r2, c2 = cyl.detectors(arr[:, 1])
                flat = binner.bin_index(r1, c1, r2, c2, order="sinogram")
                if tof:
                    if tix.size and (tix.min() < 0 or tix.max() >= upos.size):
                        raise InputFileError(path, f"TOF index outside the file's {upos.size} TOF bins",
                                             key="tof_idx")
                    _, keep = binner.view_tangential_index(c1, c2)
                    u = np.where(keep, upos[tix], -upos[tix])  # towards STIR's detector 1 of the bin
                    k = (u + half_unmashed) // geometry.tof_mash_factor
                    flat = np.where(flat >= 0, k * size + flat, -1)
                pending.append((flat, w))
                npend += arr.shape[0]
            if npend > (1 << 22):
                flush()
        flush()
    finally:
        bar.close()
    if tof:  # each TOF bin's block from "sinogram" to file order
        blocks = acc.numpy()[:total].reshape(geometry.num_tof_bins, size)
        nt = geometry.non_tof()
        data = np.concatenate([sinogram_to_file_order(np.ascontiguousarray(b), nt).copy() for b in blocks])
    else:
        data = sinogram_to_file_order(acc.numpy(), geometry)
    stats["counted"] = float(data.sum(dtype=np.float64))
    _check_petsird_frame(path, start, end, stats, bool(data.any()), events)
    stop = stats["last_block_stop_s"]  # the frame ends at its end, or at the end of the data
    return Histogram(data, geometry, events, float(start or 0.0), stop if end is None else min(end, stop), stats)


def _check_petsird_frame(path: Path, start, end, stats: dict, nonzero: bool, events: str) -> None:
    """The PETSIRD frame rules of :func:`_check_frame_coverage`: refuse a frame with no time block, warn when
    the data end before the frame end or nothing was counted."""
    import warnings

    from ..errors import ConfigError, InputFileWarning

    if stats["time_blocks_in_frame"] == 0:
        raise ConfigError(f"frame [{start or 0.0:g} s, {'end' if end is None else f'{end:g} s'}) holds no time "
                          f"block of PETSIRD file {path}: nothing to count")
    stop = stats["last_block_stop_s"]
    if end is not None and end > stop + 1e-9:
        warnings.warn(InputFileWarning(path, f"frame end {end:g} s is after the end of the data (the last time "
                                       f"block in the frame ends at {stop:g} s): the frame is {start or 0.0:g} s "
                                       f"to {stop:g} s"), stacklevel=3)
    if not nonzero:
        warnings.warn(InputFileWarning(path, f"the frame holds no {events}: the sinogram is all zero"), stacklevel=3)


def histogram_listmode(listmode: str | os.PathLike, geometry: SinogramGeometry, start: float | None = None,
                       end: float | None = None, events: str = "prompts", template: str = "template",
                       show_progress: bool | None = None) -> Histogram:
    """Read ``listmode`` (``.l.hdr``) and histogram ``events`` of ``[start, end)`` onto ``geometry``."""
    header = read_listmode_header(listmode)
    return ListmodeHistogrammer(header, geometry, template).histogram(start, end, events,
                                                                     show_progress=show_progress)
