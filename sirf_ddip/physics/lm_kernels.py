"""Compiled (numba) kernels of the Siemens listmode histogrammer: decode, frame test, bin and accumulate.

One chunk of 32-bit PETLINK words (layout in :mod:`sirf_ddip.io.siemens_listmode`) is histogrammed in two
passes: :func:`decode_chunk` gives each word its bin (event bit, prompt bit, span-1 offset -> sinogram ``z``
and (view, tangential) ``r`` -> target bin through the two lookup tables of
:class:`~sirf_ddip.physics.histogram.ListmodeHistogrammer`; words not counted get a trash slot), branch-free
so that the CPU never mispredicts, and :func:`add_chunk` increments those bins, a tight loop with many cache
misses in flight (the cost is the random-access add into a sinogram of hundreds of MB). With two threads the
histogrammer runs the two passes as a pipeline (decode chunk k+1 while chunk k is added). :func:`bin_chunk`
does both passes for more threads, without a lock: the threads either histogram consecutive parts of the chunk
into private sinograms (added at the end by :func:`reorder_segment`), or all read the whole chunk and each adds
the events of its own ``1/T`` of the bins. Integer adds commute, so the counts are exactly those of a serial
loop.

The frame end (STIR ``LmToProjData::process_data``: the first time tag ``t >= end``) is found first by
:func:`find_time_tag`, so that the decoding kernels only see records inside the frame.

:func:`find_time_tag` finds the frame start (the first time tag ``t >= start``) and end in parallel, and
:func:`last_time_tag` the last time tag of a chunk. Times are compared as ``t_ms / 1000.0 >= seconds`` in
float64. :func:`fan_sums_chunk` does the fan sums of :mod:`sirf_ddip.physics.randoms`. Kernels are compiled
on first use and cached on disk (numba ``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["TRASH_SLOTS", "decode_chunk", "decode_chunk_tof",
           "add_chunk", "bin_chunk", "find_time_tag", "last_time_tag",
           "fan_sums_chunk", "reorder_segment"]

_OFFSET_MASK = np.uint32((1 << 30) - 1)
_TIME_MASK = np.uint32((1 << 29) - 1)
_BLOCK = 1 << 20  # words decoded before their adds (a 4 MB list per thread)
TRASH_SLOTS = _TRASH = 64  # trash slots per thread after the sinogram (adds of words a thread does not count)


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
def bin_chunk(words, lo, hi, lut_r, lut_z, sino_size, num_sinograms, size, use, neg, acc, private,
              num_threads):  # pragma: no cover - compiled
    """Histogram the records ``words[lo:hi]`` (all inside the frame) into ``acc``.

    Two ways to share the work between the ``num_threads`` threads without a lock, chosen by ``private``:

    - ``private`` (``acc`` has one row per thread): thread ``s`` histograms the ``s``-th part of the records
      into its own row; the rows are added at the end (:func:`reorder_segment`);
    - otherwise (``acc`` has one row): every thread reads every record and adds the events whose bin lies in
      its range ``[s * size // num_threads, (s + 1) * size // num_threads)`` (no second sinogram, the
      decoding is done ``num_threads`` times).

    Each thread works block by block (``_BLOCK`` words): a scan of the block's time tags, a branch-free
    decoding pass that writes each word's bin to a list (the lookup tables stay cached), the words it does
    not count pointing at its ``TRASH_SLOTS`` trash slots ``size + TRASH_SLOTS * s + i % TRASH_SLOTS`` of its
    row, then a tight loop of adds (no mispredictions, many cache misses in flight).

    Parameters
    ----------
    words : uint32 array
        Consecutive listmode records.
    lut_r : int32 array
        ``2 * (view * T + i) + keep`` per (view, tangential) part ``r`` of an offset (``size`` when outside).
    lut_z : int32 array
        First bin of the target sinogram per ``2 * z + keep`` (``size`` when the ring pair is not stored).
    sino_size, num_sinograms : int
        Offsets per span-1 sinogram and number of span-1 sinograms of the listmode.
    size : int
        Bins of the target; rows of ``acc`` have ``size + TRASH_SLOTS * num_threads`` entries.
    use, neg : int64 arrays of 2
        Per prompt bit (0 delayed, 1 prompt): whether the event is counted, and whether it subtracts.
    acc : 2-d int32 array
        The accumulator(s) (sinogram layout of :class:`~sirf_ddip.geometry.detectors.DetectorPairBinner`).
    private : bool
        See above.

    Returns
    -------
    first_tag_ms, last_tag_ms : int
        First and last time tag in ``words[lo:hi]`` (-1: none).
    bad : int
        Counted-type events whose offset lies beyond the listmode's sinogram (corrupt data).
    """
    res = np.zeros((num_threads, 3), np.int64)
    inv = 1.0 / sino_size
    signed = neg[0] != 0 or neg[1] != 0
    # per prompt bit: counted, subtracted (as scalars, so that the decoding loop has no table loads)
    u0, u1 = np.int64(use[0]), np.int64(use[1])
    n0, n1 = np.int64(neg[0]), np.int64(neg[1])
    n = hi - lo
    for s in prange(num_threads):
        if private:
            w_lo = lo + n * s // num_threads
            w_hi = lo + n * (s + 1) // num_threads
            b_lo = 0
            b_hi = size
            row = acc[s]
        else:
            w_lo = lo
            w_hi = hi
            b_lo = size * s // num_threads
            b_hi = size * (s + 1) // num_threads
            row = acc[0]
        trash = size + _TRASH * s
        work = np.empty(_BLOCK, np.int32)
        nbad = 0
        t_first = -1
        t_last = -1
        for a in range(w_lo, w_hi, _BLOCK):
            b = min(a + _BLOCK, w_hi)
            for i in range(a, b):  # time tags (rare)
                x = words[i]
                if (x >> 29) == 4:
                    t = np.int64(x & _TIME_MASK)
                    if t_first < 0:
                        t_first = t
                    t_last = t
            # pass 1, branch-free: the bin of each word; words that this thread does not count (tags, the
            # other event type, bins outside the template or outside its range) go to its trash slots
            for i in range(a, b):
                x = np.int64(words[i])
                p = (x >> 30) & 1
                u = (1 - (x >> 31)) * (p * u1 + (1 - p) * u0)  # tags (bit 31) are never counted
                off = x & 0x3FFFFFFF
                z = np.int64(off * inv)
                r = off - z * sino_size
                lt = np.int64(r < 0)  # float rounding at a sinogram boundary (exactness guard)
                z -= lt
                r += lt * sino_size
                out = np.int64(z >= num_sinograms)  # corrupt offset: never binned
                nbad += u * out
                z = z * (1 - out)
                lr = np.int64(lut_r[r])
                f = np.int64(lut_z[2 * z + (lr & 1)]) + (lr >> 1)
                mine = u * (1 - out) * np.int64(f >= b_lo) * np.int64(f < b_hi)
                tr = trash + (i & (_TRASH - 1))
                if signed:  # 2 * bin + (1 if subtracted); no compaction (a store address that depends on
                    e = 2 * f + p * n1 + (1 - p) * n0  # the previous words would stall the loop)
                    work[i - a] = np.int32(mine * e + (1 - mine) * 2 * tr)
                else:
                    work[i - a] = np.int32(mine * f + (1 - mine) * tr)
            # pass 2: add them (independent random accesses, many in flight; trash adds hit the L1 cache)
            if signed:
                for j in range(b - a):
                    e = work[j]
                    row[e >> 1] += 1 - 2 * (e & 1)
            else:
                for j in range(b - a):
                    row[work[j]] += 1
        res[s, 0] = t_first
        res[s, 1] = t_last
        res[s, 2] = nbad
    first_ms = -1
    last_ms = -1
    segs = num_threads if private else 1
    for s in range(segs):
        if first_ms < 0 and res[s, 0] >= 0:
            first_ms = res[s, 0]
        if res[s, 1] >= 0:
            last_ms = res[s, 1]
    nb = 0
    for s in range(num_threads):
        nb += res[s, 2]
    if not private:
        nb = res[0, 2]
    return first_ms, last_ms, nb


@njit(cache=True, nogil=True)
def fan_sums_chunk(words, lo, hi, end_s, want_prompt, sino_size, num_sinograms, ring1, ring2, cry1, cry2,
                   num_detectors, max_ring_diff, half_fan, out, block_sinograms,
                   num_tof):  # pragma: no cover - compiled
    """Fan sums (randoms) of the delayeds (``want_prompt = 0``) or prompts of ``words[lo:hi]``.

    Every event ``(ra, a) - (rb, b)`` with ``|ra - rb| <= max_ring_diff`` and ``b`` in the fan of ``a`` adds 1
    to ``out[ra, a]`` and ``out[rb, b]`` (see :mod:`sirf_ddip.physics.randoms`). TOF listmode: the sinogram of
    ``q = offset // sino_size`` is ``q % block_sinograms``, its TOF bin ``q // block_sinograms`` (summed over;
    ``>= num_tof`` is corrupt); non-TOF: ``block_sinograms = num_sinograms``, ``num_tof = 1``.

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
        s = z // block_sinograms
        z -= s * block_sinograms
        if z >= num_sinograms or s >= num_tof:
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
def reorder_segment(rows, pos, num_axial, num_views, num_tangential, scratch):  # pragma: no cover - compiled
    """The int32 block ``rows[:, pos:pos + A*V*T]`` (axial, view, tangential), summed over the rows (the
    threads' private sinograms), becomes float32 values in (view, axial, tangential) order, written in place
    through a float32 view of ``rows[0]`` (``scratch`` holds one block)."""
    out = rows[0].view(np.float32)
    blk = num_views * num_tangential
    nrow = rows.shape[0]
    for a in prange(num_axial):
        for v in range(num_views):
            for t in range(num_tangential):
                src = pos + a * blk + v * num_tangential + t
                c = rows[0, src]
                for k in range(1, nrow):
                    c += rows[k, src]
                scratch[(v * num_axial + a) * num_tangential + t] = np.float32(c)
    m = num_axial * blk
    for i in prange(m):
        out[pos + i] = scratch[i]


@njit(cache=True, nogil=True)
def _time_tag_span(words, lo, hi):  # pragma: no cover - compiled
    """``(first, last)`` time tag (ms) among ``words[lo:hi]``; ``(-1, -1)`` without one."""
    t_first = -1
    t_last = -1
    for i in range(lo, hi):
        x = words[i]
        if (x >> 29) == 4:
            t = np.int64(x & _TIME_MASK)
            if t_first < 0:
                t_first = t
            t_last = t
    return t_first, t_last


@njit(cache=True, nogil=True)
def decode_chunk(words, lo, hi, lut_r, lut_z, sino_size, num_sinograms, size, use, neg, work,
                 trash):  # pragma: no cover - compiled
    """The decoding pass of :func:`bin_chunk` alone, for ``words[lo:hi]`` (inside the frame): ``work[i - lo]``
    gets the bin of record ``i`` (``2 * bin + negative`` when ``neg`` has a 1), or a trash slot
    ``trash + i % TRASH_SLOTS`` when it is not counted. Returns ``(first_tag_ms, last_tag_ms, bad)``."""
    inv = 1.0 / sino_size
    signed = neg[0] != 0 or neg[1] != 0
    u0, u1 = np.int64(use[0]), np.int64(use[1])
    n0, n1 = np.int64(neg[0]), np.int64(neg[1])
    t_first, t_last = _time_tag_span(words, lo, hi)
    nbad = 0
    for i in range(lo, hi):
        x = np.int64(words[i])
        p = (x >> 30) & 1
        u = (1 - (x >> 31)) * (p * u1 + (1 - p) * u0)
        off = x & 0x3FFFFFFF
        z = np.int64(off * inv)
        r = off - z * sino_size
        lt = np.int64(r < 0)
        z -= lt
        r += lt * sino_size
        out = np.int64(z >= num_sinograms)
        nbad += u * out
        z = z * (1 - out)
        lr = np.int64(lut_r[r])
        f = np.int64(lut_z[2 * z + (lr & 1)]) + (lr >> 1)
        mine = u * (1 - out) * np.int64(f < size)
        tr = trash + (i & (_TRASH - 1))
        if signed:
            e = 2 * f + p * n1 + (1 - p) * n0
            work[i - lo] = np.int32(mine * e + (1 - mine) * 2 * tr)
        else:
            work[i - lo] = np.int32(mine * f + (1 - mine) * tr)
    return t_first, t_last, nbad


@njit(cache=True, nogil=True)
def add_chunk(acc, work, n, signed):  # pragma: no cover - compiled
    """The adding pass of :func:`bin_chunk` alone: ``acc[work[j]] += 1`` for ``j < n`` (signed: decode
    ``2 * bin + negative``)."""
    if signed:
        for j in range(n):
            e = work[j]
            acc[e >> 1] += 1 - 2 * (e & 1)
    else:
        for j in range(n):
            acc[work[j]] += 1


@njit(cache=True, nogil=True)
def decode_chunk_tof(words, lo, hi, lut_r, lut_z, lut_t, sino_size, block_sinograms, num_sinograms, num_tof,
                     size, use, neg, work, trash):  # pragma: no cover - compiled
    """:func:`decode_chunk` for TOF listmode: the offset is ``(s * block_sinograms + z) * sino_size + r`` with
    ``s`` the Siemens TOF bin (see :mod:`sirf_ddip.io.siemens_listmode`). ``lut_t[2 * s + keep]`` is the first
    bin of the target's TOF block of that event (``keep``: the target bin has the listmode bin's detector order;
    0 everywhere for a non-TOF target, which then sums the TOF bins); ``size`` is the bins of one TOF block (a
    bin ``>= size`` of the non-TOF tables is not stored). Offsets with ``z >= num_sinograms`` or
    ``s >= num_tof`` are corrupt (counted in ``bad``). Returns ``(first_tag_ms, last_tag_ms, bad)``."""
    signed = neg[0] != 0 or neg[1] != 0
    u0, u1 = np.int64(use[0]), np.int64(use[1])
    n0, n1 = np.int64(neg[0]), np.int64(neg[1])
    t_first, t_last = _time_tag_span(words, lo, hi)
    nbad = 0
    for i in range(lo, hi):
        x = np.int64(words[i])
        p = (x >> 30) & 1
        u = (1 - (x >> 31)) * (p * u1 + (1 - p) * u0)
        off = x & 0x3FFFFFFF
        q = off // sino_size
        r = off - q * sino_size
        s = q // block_sinograms
        z = q - s * block_sinograms
        out = np.int64(z >= num_sinograms) | np.int64(s >= num_tof)
        nbad += u * out
        z = z * (1 - out)
        s = s * (1 - out)
        lr = np.int64(lut_r[r])
        kp = lr & 1
        f = np.int64(lut_z[2 * z + kp]) + (lr >> 1)
        mine = u * (1 - out) * np.int64(f < size)
        f = f + np.int64(lut_t[2 * s + kp])
        tr = trash + (i & (_TRASH - 1))
        if signed:
            e = 2 * f + p * n1 + (1 - p) * n0
            work[i - lo] = np.int32(mine * e + (1 - mine) * 2 * tr)
        else:
            work[i - lo] = np.int32(mine * f + (1 - mine) * tr)
    return t_first, t_last, nbad
