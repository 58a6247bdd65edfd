"""Randoms from delayed coincidences: fan sums -> ML singles -> singles-product randoms, as STIR/SIRF do.

The method of SIRF's ``ListmodeToSinograms::estimate_randoms`` (SyneRBI/SIRF
``src/xSTIR/cSTIR/stir_x.cpp``: ``compute_fan_sums_``, ``compute_singles_``), built on STIR
(UCL/STIR ``src/buildblock/ML_norm.cxx``: ``iterate_efficiencies`` "without model", ``make_fan_sum_data``;
``src/utilities/find_ML_singles_from_delayed.cxx``; ``src/buildblock/multiply_crystal_factors.cxx``):

1. **fan sums** of the delayeds: every delayed event between detectors ``(ra, a)`` and ``(rb, b)`` with
   ``|ra - rb| <= max_ring_diff`` (60 for the mMR, whose listmode stores no more; ``num_rings - 1``
   otherwise) and ``b`` inside the fan of ``a`` (``(a - b + 3N/2) mod N <= h`` or ``>= N - h``,
   ``h = max non-arc-corrected bins // 2``) adds 1 to both detectors' fan sums;
2. **ML singles** ``e`` (10 iterations by default, as SIRF): start from ``sqrt(total / number of fan bins)``,
   then ``e[ra, a] = F[ra, a] / sum_{rb in band(ra)} sum_{b in fan(a)} e[rb, b]``, updated in place in
   ring-then-crystal order (Gauss-Seidel, exactly STIR's loop order), ``e = 0`` where ``F = 0``;
3. **randoms** in any geometry: each bin gets ``sum e[r1, c1] e[r2, c2]`` over all detector pairs it combines
   (ring pairs of its segment and axial position, uncompressed views of its mashed view).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..data import ProjData
from ..geometry.detectors import DetectorPairBinner, crystals_for_view_tangential
from ..geometry.sinogram import SinogramGeometry
from ..io.siemens_listmode import SiemensListmodeHeader, read_listmode_header

__all__ = ["FanSums", "fan_sums_from_listmode", "fan_sums_from_detector_pairs", "ml_singles_from_fan_sums",
           "randoms_from_singles", "estimate_randoms", "fan_parameters", "DEFAULT_ML_ITERATIONS"]

#: SIRF's ``ListmodeToSinograms`` default number of ML iterations
DEFAULT_ML_ITERATIONS = 10


@dataclass
class FanSums:
    """Fan sums ``values[ring, crystal]`` with the fan that was used."""

    values: np.ndarray
    max_ring_diff: int
    half_fan_size: int
    num_events: int


def fan_parameters(scanner) -> tuple[int, int]:
    """SIRF's ``(max_ring_diff, half_fan_size)`` for a scanner: 60 for the Siemens mMR (its listmode holds
    ring differences up to 60), else ``num_rings - 1``; the fan is the scanner's maximum number of
    non-arc-corrected bins, made odd."""
    mrd = 60 if scanner.name == "Siemens mMR" else scanner.num_rings - 1
    mrd = min(mrd, scanner.num_rings - 1)
    return mrd, scanner.max_num_non_arc_corrected_bins // 2


def fan_sums_from_detector_pairs(ring1: np.ndarray, c1: np.ndarray, ring2: np.ndarray, c2: np.ndarray,
                                 num_rings: int, num_detectors: int, max_ring_diff: int, half_fan_size: int,
                                 out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Add the events ``(ring1, c1) - (ring2, c2)`` inside the fans to ``out`` (``num_rings x num_detectors``);
    returns ``(out, number of events used)``."""
    n = int(num_detectors)
    if out is None:
        out = np.zeros((num_rings, n), dtype=np.float64)
    ring1 = np.asarray(ring1, dtype=np.int64)
    ring2 = np.asarray(ring2, dtype=np.int64)
    c1 = np.asarray(c1, dtype=np.int64)
    c2 = np.asarray(c2, dtype=np.int64)
    diff = (c1 - c2 + 3 * n // 2) % n
    ok = (np.abs(ring1 - ring2) <= max_ring_diff) & ((diff <= half_fan_size) | (diff >= n - half_fan_size))
    k = np.concatenate([ring1[ok] * n + c1[ok], ring2[ok] * n + c2[ok]])
    out += np.bincount(k, minlength=num_rings * n).reshape(num_rings, n)
    return out, int(np.count_nonzero(ok))


def fan_sums_from_listmode(header: SiemensListmodeHeader, start: float | None = None, end: float | None = None,
                           delayed: bool = True, show_progress: bool | None = None) -> FanSums:
    """Fan sums of the delayeds (or prompts) of the frame ``[start, end)`` of a Siemens listmode."""
    from ..errors import DataValueError
    from . import lm_kernels as K
    from .histogram import stream_frame  # same frame semantics and reading as the histogrammer

    sc = header.scanner
    mrd, half = fan_parameters(sc)
    rings1, rings2 = (np.ascontiguousarray(v, dtype=np.int32) for v in header.sinogram_rings())
    cr1, cr2 = (np.ascontiguousarray(v, dtype=np.int32) for v in header.view_tangential_crystals())
    out = np.zeros((sc.num_rings, sc.detectors_per_ring), dtype=np.float64)
    used = 0

    def process(words: np.ndarray, lo: int, end_s: float) -> tuple[int, int, int, int]:
        nonlocal used
        stop, first, last, bad, n = K.fan_sums_chunk(words, lo, words.size, end_s, 0 if delayed else 1,
                                                     header.sinogram_size, header.num_sinograms, rings1, rings2,
                                                     cr1, cr2, sc.detectors_per_ring, mrd, half, out,
                                                     header.tof_block_sinograms, header.num_tof_bins)
        used += int(n)
        return stop, first, last, bad

    sel = stream_frame(header, process, start, end, show_progress=show_progress)
    if sel.bad:
        raise DataValueError(f"{header.data_path}: {sel.bad} events have offsets beyond the span-1 sinogram "
                             f"described by {header.path} (corrupt listmode?)")
    return FanSums(out, mrd, half, used)


def _num_fan_bins(num_rings: int, num_detectors: int, max_ring_diff: int, half_fan_size: int) -> int:
    """SIRF ``compute_num_bins_``: detector pairs (ordered) inside the fans."""
    band = sum(min(ra + max_ring_diff, num_rings - 1) - max(ra - max_ring_diff, 0) + 1 for ra in range(num_rings))
    return band * num_detectors * (2 * half_fan_size + 1)


def ml_singles_from_fan_sums(fan_sums: FanSums | np.ndarray, max_ring_diff: int | None = None,
                             half_fan_size: int | None = None,
                             num_iterations: int = DEFAULT_ML_ITERATIONS) -> np.ndarray:
    """ML detector "singles" ``e[ring, crystal]`` whose fan products reproduce the fan sums (STIR's
    ``iterate_efficiencies`` without model, in place, ring-major then crystal order).

    The in-place update is kept exact with a sliding window: the fan of crystal ``a`` is
    ``a + N/2 - h .. a + N/2 + h`` (mod N), which never contains ``a`` itself, so each crystal's column sum
    changes only while it is outside the window being summed.
    """
    if isinstance(fan_sums, FanSums):
        F = fan_sums.values
        mrd = fan_sums.max_ring_diff if max_ring_diff is None else max_ring_diff
        h = fan_sums.half_fan_size if half_fan_size is None else half_fan_size
    else:
        F = np.asarray(fan_sums, dtype=np.float64)
        if max_ring_diff is None or half_fan_size is None:
            raise ValueError("max_ring_diff and half_fan_size are needed with a plain array of fan sums")
        mrd, h = max_ring_diff, half_fan_size
    nr, n = F.shape
    if not 0 < 2 * h + 1 < n or n % 2:
        raise ValueError(f"fan of {2 * h + 1} crystals does not fit {n} crystals per ring")
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    total = float(F.sum())
    nbins = _num_fan_bins(nr, n, mrd, h)
    eff = np.full((nr, n), np.sqrt(total / nbins) if nbins else 0.0, dtype=np.float64)
    lo_off = n // 2 - h
    for _ in range(num_iterations):
        for ra in range(nr):
            r0, r1 = max(ra - mrd, 0), min(ra + mrd, nr - 1)
            col = eff[r0:r1 + 1].sum(axis=0).tolist()
            row = eff[ra].tolist()
            frow = F[ra].tolist()
            # window of crystal 0: lo_off .. lo_off + 2h
            win = sum(col[(lo_off + j) % n] for j in range(2 * h + 1))
            for a in range(n):
                if a:
                    win += col[(a + lo_off + 2 * h) % n] - col[(a - 1 + lo_off) % n]
                new = 0.0 if frow[a] == 0 else frow[a] / win
                col[a] += new - row[a]
                row[a] = new
            eff[ra] = row
    return eff


def randoms_from_singles(singles: np.ndarray, geometry: SinogramGeometry) -> ProjData:
    """Singles-product randoms on ``geometry`` (STIR ``multiply_crystal_factors`` with factor 1)."""
    e = np.asarray(singles, dtype=np.float64)
    sc = geometry.scanner
    if e.shape != (sc.num_rings, sc.detectors_per_ring):
        raise ValueError(f"singles of shape {e.shape} do not fit the {sc.name} "
                         f"({sc.num_rings} x {sc.detectors_per_ring})")
    b = DetectorPairBinner(geometry)
    m = geometry.view_mashing
    v = np.arange(geometry.num_views * m)[:, None]
    t = (np.arange(geometry.num_tangential) + geometry.min_tangential_pos)[None, :]
    c1, c2 = crystals_for_view_tangential(v, t, sc.detectors_per_ring)
    E1 = e[:, c1].astype(np.float32)  # ring, uncompressed view, tangential (float32 products, as STIR)
    E2 = e[:, c2].astype(np.float32)
    out = np.zeros(geometry.shape, dtype=np.float32)
    acc = np.empty(c1.shape, dtype=np.float32)
    tmp = np.empty(c1.shape, dtype=np.float32)
    for s, pairs in enumerate(b.ring_pairs_of_sinograms("memory")):
        if not pairs:
            continue
        ra, rb = pairs[0]
        np.multiply(E1[ra], E2[rb], out=acc)
        for ra, rb in pairs[1:]:
            np.multiply(E1[ra], E2[rb], out=tmp)
            acc += tmp
        out[s] = acc.reshape(geometry.num_views, m, geometry.num_tangential).sum(axis=1)
    return ProjData(out, geometry, {"content": "randoms (ML singles from delayeds)"})


def estimate_randoms(listmode: str | os.PathLike | SiemensListmodeHeader, geometry: SinogramGeometry,
                     start: float | None = None, end: float | None = None,
                     num_iterations: int = DEFAULT_ML_ITERATIONS, show_progress: bool | None = None
                     ) -> tuple[ProjData, FanSums, np.ndarray]:
    """Randoms estimate for ``geometry`` from the delayeds of ``[start, end)``: (randoms, fan sums, singles)."""
    from .histogram import check_same_scanner

    header = listmode if isinstance(listmode, SiemensListmodeHeader) else read_listmode_header(listmode)
    check_same_scanner(header, geometry, "template")
    fans = fan_sums_from_listmode(header, start, end, delayed=True, show_progress=show_progress)
    singles = ml_singles_from_fan_sums(fans, num_iterations=num_iterations)
    return randoms_from_singles(singles, geometry), fans, singles
