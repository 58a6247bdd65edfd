"""Compiled (numba) kernels of the Siemens listmode histogrammer: decode, frame test, bin and accumulate.

One chunk of 32-bit PETLINK words (layout in :mod:`sirf_ddip.io.siemens_listmode`) is histogrammed by
:func:`bin_chunk` in two parallel phases, without a lock and without a second sinogram:

1. the chunk is cut into ``T`` consecutive segments, one per thread. Each thread decodes its words
   (event bit, prompt bit, span-1 offset -> sinogram ``z`` and (view, tangential) ``r`` -> target bin through
   the two lookup tables of :class:`~sirf_ddip.physics.histogram.ListmodeHistogrammer`), watches the time
   tags for the frame end (STIR ``LmToProjData::process_data``: stop at the first time tag ``t >= end``) and
   appends ``2 * bin + negative`` of each counted event to one of ``T`` lists chosen by the bin's range
   (``bucket = bin * T / size``). The decoding is branch-free except for tags and corrupt offsets, which
   keeps the CPU pipeline (and its outstanding memory loads) full;
2. thread ``b`` adds the lists of bucket ``b`` of every segment (up to the segment holding the frame end)
   to the sinogram: the threads write disjoint bin ranges, so the counts are exactly those of a serial loop.

:func:`find_time_tag` finds the frame start (the first time tag ``t >= start``) in parallel, and
:func:`last_time_tag` the last time tag of a chunk. Times are compared as ``t_ms / 1000.0 >= seconds`` in
float64, exactly as the numpy version did. Kernels are compiled on first use and cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["bin_chunk", "find_time_tag", "last_time_tag", "fan_sums_chunk", "reorder_segment"]

_OFFSET_MASK = np.uint32((1 << 30) - 1)
_TIME_MASK = np.uint32((1 << 29) - 1)


@njit(cache=True, nogil=True, parallel=True)
def find_time_tag(words, lo, hi, threshold_s, num_threads):  # pragma: no cover - compiled
    """Position of the first time tag in ``words[lo:hi]`` with ``t_ms / 1000 >= threshold_s`` (-1: none)."""
    n = hi - lo
    found = np.full(num_threads, -1, np.int64)
    for s in prange(num_threads):
        a = lo + n * s // num_threads
        b = lo + n * (s + 1) // num_threads
        for i in range(a, b):
            x = words[i]
            if (x >> 29) == 4 and (x & _TIME_MASK) / 1000.0 >= threshold_s:
                found[s] = i
                break
    for s in range(num_threads):
        if found[s] >= 0:
            return found[s]
    return -1


@njit(cache=True, nogil=True)
def last_time_tag(words, lo, hi):  # pragma: no cover - compiled
    """Time (ms) of the last time tag in ``words[lo:hi]`` (-1: none); scans backwards."""
    for i in range(hi - 1, lo - 1, -1):
        x = words[i]
        if (x >> 29) == 4:
            return np.int64(x & _TIME_MASK)
    return -1


@njit(cache=True, nogil=True, parallel=True)
def bin_chunk(words, lo, hi, end_s, lut_r, lut_z, sino_size, num_sinograms, size, use, neg, acc, buf,
              num_threads):  # pragma: no cover - compiled
    """Histogram the records ``words[lo:hi]`` (inside the frame from ``lo`` on) into ``acc``.

    Parameters
    ----------
    words : uint32 array
        Consecutive listmode records.
    end_s : float
        Frame end in seconds (``inf``: none): the first time tag with ``t >= end_s`` ends the frame.
    lut_r : int32 array
        ``2 * (view * T + i) + keep`` per (view, tangential) part ``r`` of an offset (``size`` when outside).
    lut_z : int32 array
        First bin of the target sinogram per ``2 * z + keep`` (``size`` when the ring pair is not stored).
    sino_size, num_sinograms : int
        Offsets per span-1 sinogram and number of span-1 sinograms of the listmode.
    size : int
        Bins of the target (``acc`` has at least ``size`` entries).
    use, neg : int64 arrays of 2
        Per prompt bit (0 delayed, 1 prompt): whether the event is counted, and whether it subtracts.
    acc : int32 array
        The accumulator (sinogram layout of :class:`~sirf_ddip.geometry.detectors.DetectorPairBinner`).
    buf : int32 array (num_threads, num_threads, capacity)
        Work lists; ``capacity > (hi - lo) / num_threads + 1``.

    Returns
    -------
    stop : int
        Position of the time tag that ends the frame, -1 if the frame goes on after ``hi``.
    first_tag_ms, last_tag_ms : int
        First and last time tag inside ``[lo, stop or hi)`` (-1: none).
    bad : int
        Counted-type events whose offset lies beyond the listmode's sinogram (corrupt data).
    """
    n = hi - lo
    cnt = np.zeros((num_threads, num_threads), np.int64)
    stop = np.full(num_threads, -1, np.int64)
    first = np.full(num_threads, -1, np.int64)
    last = np.full(num_threads, -1, np.int64)
    bad = np.zeros(num_threads, np.int64)
    inv = 1.0 / sino_size
    mult = (np.int64(num_threads) << 32) // size
    for s in prange(num_threads):
        a = lo + n * s // num_threads
        b = lo + n * (s + 1) // num_threads
        k = np.zeros(num_threads, np.int64)
        nbad = 0
        t_first = -1
        t_last = -1
        for i in range(a, b):
            x = words[i]
            if x >> 31:  # a tag
                if (x >> 29) == 4:
                    t = np.int64(x & _TIME_MASK)
                    if t / 1000.0 >= end_s:
                        stop[s] = i
                        break
                    if t_first < 0:
                        t_first = t
                    t_last = t
                continue
            p = np.int64(x >> 30)
            u = use[p]
            off = np.int64(x & _OFFSET_MASK)
            z = np.int64(off * inv)
            r = off - z * sino_size
            if r < 0:  # float rounding at a sinogram boundary (exactness guard)
                z -= 1
                r += sino_size
            elif r >= sino_size:
                z += 1
                r -= sino_size
            if z >= num_sinograms:  # corrupt offset: never binned
                nbad += u
                z = 0
                u = 0
            lr = np.int64(lut_r[r])
            f = np.int64(lut_z[2 * z + (lr & 1)]) + (lr >> 1)
            valid = u & np.int64(f < size)
            bk = (min(f, size - 1) * mult) >> 32
            kb = k[bk]
            buf[s, bk, kb] = np.int32(2 * f + neg[p])
            k[bk] = kb + valid
        for j in range(num_threads):
            cnt[s, j] = k[j]
        bad[s] = nbad
        first[s] = t_first
        last[s] = t_last
    # segments after the one holding the frame end are outside the frame
    nseg = num_threads
    for s in range(num_threads):
        if stop[s] >= 0:
            nseg = s + 1
            break
    for bk in prange(num_threads):
        for s in range(nseg):
            m = cnt[s, bk]
            for j in range(m):
                e = buf[s, bk, j]
                acc[e >> 1] += 1 - 2 * (e & 1)
    first_ms = -1
    last_ms = -1
    nb = 0
    for s in range(nseg):
        nb += bad[s]
        if first_ms < 0 and first[s] >= 0:
            first_ms = first[s]
        if last[s] >= 0:
            last_ms = last[s]
    return stop[nseg - 1], first_ms, last_ms, nb


@njit(cache=True, nogil=True)
def fan_sums_chunk(words, lo, hi, end_s, want_prompt, sino_size, num_sinograms, ring1, ring2, cry1, cry2,
                   num_detectors, max_ring_diff, half_fan, out):  # pragma: no cover - compiled
    """Fan sums (randoms) of the delayeds (``want_prompt = 0``) or prompts of ``words[lo:hi]``.

    Every event ``(ra, a) - (rb, b)`` with ``|ra - rb| <= max_ring_diff`` and ``b`` in the fan of ``a`` adds 1
    to ``out[ra, a]`` and ``out[rb, b]`` (see :mod:`sirf_ddip.physics.randoms`).

    Returns
    -------
    stop, first_tag_ms, last_tag_ms, bad, used
        As :func:`bin_chunk`, plus the number of events inside the fans.
    """
    nd = num_detectors
    inv = 1.0 / sino_size
    t_first = -1
    t_last = -1
    nbad = 0
    used = 0
    for i in range(lo, hi):
        x = words[i]
        if x >> 31:
            if (x >> 29) == 4:
                t = np.int64(x & _TIME_MASK)
                if t / 1000.0 >= end_s:
                    return i, t_first, t_last, nbad, used
                if t_first < 0:
                    t_first = t
                t_last = t
            continue
        if np.int64(x >> 30) != want_prompt:
            continue
        off = np.int64(x & _OFFSET_MASK)
        z = np.int64(off * inv)
        r = off - z * sino_size
        if r < 0:
            z -= 1
            r += sino_size
        elif r >= sino_size:
            z += 1
            r -= sino_size
        if z >= num_sinograms:
            nbad += 1
            continue
        ra = np.int64(ring1[z])
        rb = np.int64(ring2[z])
        a = np.int64(cry1[r])
        b = np.int64(cry2[r])
        diff = (a - b + 3 * nd // 2) % nd
        if abs(ra - rb) <= max_ring_diff and (diff <= half_fan or diff >= nd - half_fan):
            out[ra, a] += 1.0
            out[rb, b] += 1.0
            used += 1
    return -1, t_first, t_last, nbad, used


@njit(cache=True, nogil=True, parallel=True)
def reorder_segment(acc, pos, num_axial, num_views, num_tangential, scratch):  # pragma: no cover - compiled
    """In place: the int32 block ``acc[pos:pos + A*V*T]`` (axial, view, tangential) becomes float32 values
    in (view, axial, tangential) order, written through a float32 view of the same memory."""
    out = acc.view(np.float32)
    blk = num_views * num_tangential
    for a in prange(num_axial):
        for v in range(num_views):
            for t in range(num_tangential):
                scratch[(v * num_axial + a) * num_tangential + t] = np.float32(acc[pos + a * blk + v * num_tangential + t])
    m = num_axial * blk
    for i in prange(m):
        out[pos + i] = scratch[i]
