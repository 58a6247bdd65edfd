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
event (``lut_z[z, keep] + lut_r[r]``) in a handful of numpy passes; counts are accumulated with
``torch.Tensor.scatter_add_`` into one int32 array (no per-chunk allocation), in the "sinogram" layout of
:mod:`sirf_ddip.geometry.detectors`, and re-ordered in place, segment by segment, to STIR's view-by-view file
order at the end. Memory: the accumulator (4 bytes per bin) plus one chunk of words.
"""

from __future__ import annotations

import math
import os
import threading
import time as _time
from collections import deque
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
           "write_flat_projdata"]

#: event selections, as STIR's ``store prompts`` / ``store delayeds`` pairs
EVENT_TYPES = ("prompts", "delayeds", "trues")

_TAG_TIME = 0b100  # top three bits of a time tag: bit 31 = 1, bits 29-30 = 0
_SUB_CHUNK = 1 << 20  # words per vectorised pass


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
        self.start = float(start) if start is not None else 0.0
        self.end = float(end) if end is not None else None
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"frame end {self.end} s must be after its start {self.start} s")
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
        arr = file_to_memory_order(self.data, numbers, axial, g.num_views, g.num_tangential, "view")
        return ProjData(arr, g, {"source": self.stats.get("listmode", ""), "events": self.events})

    def write(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write as STIR Interfile (``.hs`` + ``.s``, view by view), atomically; see :func:`write_flat_projdata`."""
        extra = {"number of time frames": "1",
                 "image relative start time (sec)[1]": _fmt(self.start_s),
                 "image duration (sec)[1]": _fmt((self.end_s if self.end_s is not None
                                                  else (self.stats.get("last_time_tag_s") or 0.0)) - self.start_s)}
        return write_flat_projdata(path, self.data, self.geometry, overwrite=overwrite, extra=extra)


def _fmt(v: float) -> str:
    return repr(float(v)) if float(v) != int(v) else str(int(v))


def write_flat_projdata(path: str | os.PathLike, flat: np.ndarray, geometry: SinogramGeometry,
                        overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write float32 projection data already in STIR's view-by-view file order (``.hs`` + ``.s``).

    Both files are written under temporary names in the output folder and then renamed (``os.replace``),
    data file first, so a failure never leaves a half-written or overwritten output.

    Raises
    ------
    OutputExistsError
        If either file exists and ``overwrite`` is False.
    """
    from ..utils.provenance import check_output

    path = Path(path)
    if path.suffix.lower() != ".hs":
        raise InputFileError(path, "an Interfile projection-data header must end in .hs")
    data_path = path.with_suffix(".s")
    check_output(path, overwrite)
    check_output(data_path, overwrite)
    flat = np.asarray(flat)
    size = geometry.num_sinograms * geometry.num_views * geometry.num_tangential
    if flat.size != size:
        raise ValueError(f"{flat.size} values for a geometry of {size} bins")
    tag = f".tmp{os.getpid()}"
    tmp_data = data_path.with_name(data_path.name + tag)
    tmp_hdr = path.with_name(path.name + tag)
    lines = geometry.header_lines(data_file=data_path.name, storage="view", extra=extra)
    try:
        with open(tmp_data, "wb") as f:
            step = 1 << 24
            for i in range(0, size, step):
                np.ascontiguousarray(flat[i:i + step], dtype="<f4").tofile(f)
        tmp_hdr.write_text("\n".join(lines) + "\n")
        os.replace(tmp_data, data_path)
        os.replace(tmp_hdr, path)
    finally:
        for p in (tmp_data, tmp_hdr):
            if p.exists():
                p.unlink()
    return path


class ListmodeHistogrammer:
    """Histogram a Siemens PETLINK listmode into a sinogram geometry of its scanner.

    Parameters
    ----------
    header : SiemensListmodeHeader
    geometry : SinogramGeometry
        Target geometry (span 1, span 11, fewer segments, view mashing, fewer tangential positions).
    template : str, optional
        Name of the template, for error messages.

    Raises
    ------
    GeometryMismatchError
        If the geometry is for another scanner.
    """

    def __init__(self, header: SiemensListmodeHeader, geometry: SinogramGeometry, template: str = "template"):
        check_same_scanner(header, geometry, template)
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
        # axial table over (z, keep) for every 32-bit word: flat index of the first bin of the target
        # sinogram. Words are first transformed so that the selected events keep their top two bits at 0 (a
        # pure offset) while other events and tags get z >= 2^30 / S, which these rows send to the trash bin.
        rings1, rings2 = header.sinogram_rings()
        nz = header.num_sinograms
        S = header.sinogram_size
        self._zrows = ((1 << 32) - 1) // S + 1
        full_rows = (1 << 30) // S  # rows holding only 30-bit offsets (the last partial row is not checked)
        self._invalid_base = 3 * self.size  # offsets beyond the sinogram: flat index >= 3 * size
        base = np.full((self._zrows, 2), self.size, dtype=np.int64)
        base[nz:full_rows, :] = self._invalid_base
        for k in (0, 1):  # keep = 0: rings swap
            ra, rb = (rings1, rings2) if k else (rings2, rings1)
            s = b.ring_pair_sinogram[ra, rb]
            base[:nz, k] = np.where(s >= 0, s * sino_stride, self.size)
        self._lut_z = base.reshape(-1)  # [z * 2 + keep]
        self._tls = threading.local()  # per-thread work buffers of flat_indices

    @staticmethod
    def _select(words: np.ndarray, events: str) -> np.ndarray:
        """Words with bits 30-31 cleared for the selected events only (prompt bit 30 = 1, delayed 0, tags
        have bit 31 = 1)."""
        if events == "prompts":
            return words ^ np.uint32(1 << 30)
        if events == "delayeds":
            return words
        if events == "trues":
            return words & np.uint32(0xFFFFFFFF ^ (1 << 30))
        raise ValueError(f"events must be one of {EVENT_TYPES}, got {events!r}")

    def flat_indices(self, words: np.ndarray, events: str = "prompts") -> tuple[np.ndarray, int]:
        """Bin index per word (``size`` for words not counted) and the number of event offsets that lie
        beyond the listmode's sinogram (corrupt data).

        Every pass writes into per-thread work buffers (``out=``), so that blocks cost no page faults for
        temporaries; only the returned int64 index array is new.
        """
        n = words.size
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf[0].size < n:
            buf = (np.empty(n, np.uint32), np.empty(n, np.uint32), np.empty(n, np.uint32), np.empty(n, np.int32))
            self._tls.buf = buf
        x, z, r, lr = (b_[:n] for b_ in buf)
        S = np.uint32(self.header.sinogram_size)
        if events == "prompts":
            np.bitwise_xor(words, np.uint32(1 << 30), out=x)
        elif events == "delayeds":
            np.copyto(x, words)
        elif events == "trues":
            np.bitwise_and(words, np.uint32(0xFFFFFFFF ^ (1 << 30)), out=x)
        else:
            raise ValueError(f"events must be one of {EVENT_TYPES}, got {events!r}")
        np.floor_divide(x, S, out=z)
        np.multiply(z, S, out=r)
        np.subtract(x, r, out=r)
        np.take(self._lut_r, r, out=lr, mode="clip")  # always in range: r < S
        np.left_shift(z, np.uint32(1), out=z)
        np.bitwise_and(lr.view(np.uint32), np.uint32(1), out=x)  # keep bit
        np.bitwise_or(z, x, out=z)
        flat = np.take(self._lut_z, z, mode="clip")  # z * 2 + keep < 2 * zrows by construction
        np.right_shift(lr, 1, out=lr)
        np.add(flat, lr, out=flat)
        bad = 0
        if n and int(flat.max()) >= self._invalid_base:
            bad = int(np.count_nonzero(flat >= self._invalid_base))
        np.minimum(flat, self.size, out=flat)
        return flat, bad

    def histogram(self, start: float | None = None, end: float | None = None, events: str = "prompts",
                  chunk_words: int = 1 << 22, show_progress: bool | None = None,
                  threads: int | None = None) -> Histogram:
        """Histogram the frame ``[start, end)`` (s from the scan start) of ``events`` (prompts, delayeds or
        trues = prompts - delayeds); ``threads`` decoding threads (default: 2, or 1 on a 1-core machine).

        Raises
        ------
        DataValueError
            If event offsets lie outside the listmode's sinogram (a corrupt file).
        """
        import torch

        from ..errors import DataValueError

        self._select(words=np.zeros(0, np.uint32), events=events)  # validates ``events``
        acc = torch.zeros(self.size + 1, dtype=torch.int32)
        sign = torch.tensor([-1, 1, 0, 0], dtype=torch.int32) if events == "trues" else None
        ones = torch.ones(_SUB_CHUNK, dtype=torch.int32)
        sel = FrameSelector(start, end)
        nbad = 0
        nrec = 0

        def decode(w: np.ndarray) -> tuple:
            flat, bad = self.flat_indices(w, events)
            src = ones[:w.size] if sign is None else sign[torch.from_numpy((w >> np.uint32(30)).astype(np.int64))]
            return torch.from_numpy(flat), src, bad

        t0 = _time.perf_counter()
        # pipeline: ``workers`` threads decode the next blocks while this one accumulates (numpy and torch
        # release the GIL in these loops, so decoding and accumulation share the cores)
        workers = max(1, int(threads if threads is not None else min(2, os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()
            for words in iter_frame_words(self.header, chunk_words=chunk_words, show_progress=show_progress,
                                          selector=sel):
                nrec += words.size
                for i in range(0, words.size, _SUB_CHUNK):
                    pending.append(pool.submit(decode, words[i:i + _SUB_CHUNK]))
                    while len(pending) > workers:
                        idx, src, bad = pending.popleft().result()
                        nbad += bad
                        acc.scatter_add_(0, idx, src)
            while pending:
                idx, src, bad = pending.popleft().result()
                nbad += bad
                acc.scatter_add_(0, idx, src)
        elapsed = _time.perf_counter() - t0
        if nbad:
            raise DataValueError(f"{self.header.data_path}: {nbad} events have offsets beyond the span-1 sinogram "
                                 f"of {self.header.num_sinograms} x {self.header.sinogram_size} bins described by "
                                 f"{self.header.path} (corrupt listmode?)")
        data = sinogram_to_file_order(acc.numpy(), self.geometry)
        stats = {"listmode": str(self.header.path), "records_in_frame": int(nrec),
                 "counted": float(data.sum(dtype=np.float64)), "seconds": elapsed,
                 "first_time_tag_s": sel.first_tag_s, "last_time_tag_s": sel.last_tag_s,
                 "last_time_tag_in_file_s": sel.last_tag_in_file_s}
        return Histogram(data, self.geometry, events, float(start or 0.0), end, stats)

def sinogram_to_file_order(acc: np.ndarray, geometry: SinogramGeometry) -> np.ndarray:
    """Reorder an int32 accumulator in the "sinogram" layout (segments ascending, axial, view, tangential;
    possibly with a trailing trash bin) to float32 view-by-view file order, in place (one segment of scratch)."""
    g = geometry
    nv, nt = g.num_views, g.num_tangential
    size = g.num_sinograms * nv * nt
    a = acc[:size]
    if a.dtype != np.int32:
        raise ValueError(f"accumulator must be int32, got {a.dtype}")
    out = a.view(np.float32)
    pos = 0
    for sg in g.segments:
        n = sg.num_axial * nv * nt
        blk = a[pos:pos + n].reshape(sg.num_axial, nv, nt).transpose(1, 0, 2).astype(np.float32)
        out[pos:pos + n] = blk.reshape(-1)
        pos += n
    return out


def histogram_petsird(path: str | os.PathLike, geometry: SinogramGeometry, start: float | None = None,
                      end: float | None = None, events: str = "prompts", template: str = "template",
                      show_progress: bool | None = None, module_type: int = 0) -> Histogram:
    """Histogram a PETSIRD listmode whose scanner is a cylinder of detectors (see
    :mod:`sirf_ddip.io.petsird_listmode`) onto ``geometry``, with the same binning as the Siemens listmode.

    Time blocks are in the frame when ``start <= block start < end`` (ms from the scan start); TOF indices
    and energy bins are summed over.
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
    acc = torch.zeros(size + 1, dtype=torch.int32)
    lo_ms = 1000.0 * (start or 0.0)
    hi_ms = 1000.0 * end if end is not None else math.inf
    pending: list[tuple[np.ndarray, int]] = []
    npend = 0
    stats = {"listmode": str(path), "format": "PETSIRD", "time_blocks_in_frame": 0, "records_in_frame": 0,
             "tof_bins_summed": True, "first_time_tag_s": None, "last_time_tag_s": None}

    def flush():
        nonlocal npend
        for flat, w in pending:
            idx = torch.from_numpy(np.where(flat >= 0, flat, size))
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
            if stats["first_time_tag_s"] is None:
                stats["first_time_tag_s"] = blk.start_ms / 1000.0
            stats["last_time_tag_s"] = blk.start_ms / 1000.0
            for arr, w, use in ((blk.prompts, 1, events in ("prompts", "trues")),
                                (blk.delayeds, -1 if events == "trues" else 1, events in ("delayeds", "trues"))):
                stats["records_in_frame"] += int(arr.shape[0])
                if not use or arr.shape[0] == 0:
                    continue
                r1, c1 = cyl.detectors(arr[:, 0])
                r2, c2 = cyl.detectors(arr[:, 1])
                pending.append((binner.bin_index(r1, c1, r2, c2, order="sinogram"), w))
                npend += arr.shape[0]
            if npend > (1 << 22):
                flush()
        flush()
    finally:
        bar.close()
    data = sinogram_to_file_order(acc.numpy(), geometry)
    stats["counted"] = float(data.sum(dtype=np.float64))
    return Histogram(data, geometry, events, float(start or 0.0), end, stats)


def histogram_listmode(listmode: str | os.PathLike, geometry: SinogramGeometry, start: float | None = None,
                       end: float | None = None, events: str = "prompts", template: str = "template",
                       show_progress: bool | None = None) -> Histogram:
    """Read ``listmode`` (``.l.hdr``) and histogram ``events`` of ``[start, end)`` onto ``geometry``."""
    header = read_listmode_header(listmode)
    return ListmodeHistogrammer(header, geometry, template).histogram(start, end, events,
                                                                     show_progress=show_progress)
