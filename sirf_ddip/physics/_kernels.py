"""Compiled CPU kernels (numba) applying a :class:`sirf_ddip.physics.raytrace.SystemMatrix` segment.

A segment's element ``e`` of row ``r = view * nt + tang`` has weight ``w[e]`` and index ``c[e]`` into the
flattened plane-padded transposed image; axial position ``a`` reads ``src[c[e] + off + a k]``.  Rows are
independent (forward: parallel over rows); the back projection gives each thread its own accumulator.  ``k == 1``
(every segment of the mMR templates) has its own kernels, whose inner loops run over contiguous memory and
vectorise.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

__all__ = ["forward_rows", "adjoint_rows", "num_threads", "set_threads"]


def num_threads() -> int:
    return int(numba.get_num_threads())


def set_threads(n: int) -> int:
    """Set numba's thread count (clipped to ``[1, NUMBA_NUM_THREADS]``); returns the previous one."""
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    return int(old)


def forward_rows(indptr, cols, vals, views, nt, src, srcm, off, offm, na, k, out, pos0, posm0, mirror):
    """``out[pos0 + a, i] = sum_e w_e src[c_e + off + a k]`` for local rows ``i`` (views ``views``) and, when
    ``mirror``, ``out[posm0 + na - 1 - a, i] = sum_e w_e srcm[c_e + offm + a k]`` (the z-mirrored segment)."""
    if k == 1:
        _forward_c(indptr, cols, vals, views, nt, src, srcm, off, offm, na, out, pos0, posm0, mirror)
    else:
        _forward_s(indptr, cols, vals, views, nt, src, srcm, off, offm, na, k, out, pos0, posm0, mirror)


def adjoint_rows(indptr, cols, vals, views, nt, Y, pos0, posm0, na, k, off, offm, dst, dstm, mirror, bounds):
    """Adjoint of :func:`forward_rows`: ``dst[ch, c_e + off + a k] += w_e Y[pos0 + a, i]`` (and the mirrored
    segment into ``dstm``), local rows ``bounds[ch] .. bounds[ch + 1]`` accumulated by chunk ``ch``."""
    if k == 1:
        _adjoint_c(indptr, cols, vals, views, nt, Y, pos0, posm0, na, off, offm, dst, dstm, mirror, bounds)
    else:
        _adjoint_s(indptr, cols, vals, views, nt, Y, pos0, posm0, na, k, off, offm, dst, dstm, mirror, bounds)


@numba.njit(parallel=True, nogil=True, cache=True)
def _forward_c(indptr, cols, vals, views, nt, src, srcm, off, offm, na, out, pos0, posm0, mirror):
    nr = views.size * nt
    for i in prange(nr):
        r = views[i // nt] * nt + (i % nt)
        acc = np.zeros(na, out.dtype)
        accm = np.zeros(na, out.dtype)
        for e in range(indptr[r], indptr[r + 1]):
            w = vals[e]
            b = cols[e] + off
            s1 = src[b:b + na]
            for a in range(na):
                acc[a] += w * s1[a]
            if mirror:
                bm = cols[e] + offm
                s2 = srcm[bm:bm + na]
                for a in range(na):
                    accm[a] += w * s2[a]
        for a in range(na):
            out[pos0 + a, i] = acc[a]
        if mirror:
            for a in range(na):
                out[posm0 + na - 1 - a, i] = accm[a]


@numba.njit(parallel=True, nogil=True, cache=True)
def _forward_s(indptr, cols, vals, views, nt, src, srcm, off, offm, na, k, out, pos0, posm0, mirror):
    nr = views.size * nt
    for i in prange(nr):
        r = views[i // nt] * nt + (i % nt)
        acc = np.zeros(na, out.dtype)
        accm = np.zeros(na, out.dtype)
        for e in range(indptr[r], indptr[r + 1]):
            w = vals[e]
            b = cols[e] + off
            for a in range(na):
                acc[a] += w * src[b + a * k]
            if mirror:
                bm = cols[e] + offm
                for a in range(na):
                    accm[a] += w * srcm[bm + a * k]
        for a in range(na):
            out[pos0 + a, i] = acc[a]
        if mirror:
            for a in range(na):
                out[posm0 + na - 1 - a, i] = accm[a]


@numba.njit(parallel=True, nogil=True, cache=True)
def _adjoint_c(indptr, cols, vals, views, nt, Y, pos0, posm0, na, off, offm, dst, dstm, mirror, bounds):
    nch = bounds.size - 1
    for ch in prange(nch):
        y = np.empty(na, Y.dtype)
        ym = np.empty(na, Y.dtype)
        d1 = dst[ch]
        d2 = dstm[ch] if mirror else dstm[0]  # (a dummy row when not mirrored)
        for i in range(bounds[ch], bounds[ch + 1]):
            r = views[i // nt] * nt + (i % nt)
            for a in range(na):
                y[a] = Y[pos0 + a, i]
            if mirror:
                for a in range(na):
                    ym[a] = Y[posm0 + na - 1 - a, i]
            for e in range(indptr[r], indptr[r + 1]):
                w = vals[e]
                b = cols[e] + off
                t1 = d1[b:b + na]
                for a in range(na):
                    t1[a] += w * y[a]
                if mirror:
                    bm = cols[e] + offm
                    t2 = d2[bm:bm + na]
                    for a in range(na):
                        t2[a] += w * ym[a]


@numba.njit(parallel=True, nogil=True, cache=True)
def _adjoint_s(indptr, cols, vals, views, nt, Y, pos0, posm0, na, k, off, offm, dst, dstm, mirror, bounds):
    nch = bounds.size - 1
    for ch in prange(nch):
        y = np.empty(na, Y.dtype)
        ym = np.empty(na, Y.dtype)
        for i in range(bounds[ch], bounds[ch + 1]):
            r = views[i // nt] * nt + (i % nt)
            for a in range(na):
                y[a] = Y[pos0 + a, i]
            if mirror:
                for a in range(na):
                    ym[a] = Y[posm0 + na - 1 - a, i]
            for e in range(indptr[r], indptr[r + 1]):
                w = vals[e]
                b = cols[e] + off
                for a in range(na):
                    dst[ch, b + a * k] += w * y[a]
                if mirror:
                    bm = cols[e] + offm
                    for a in range(na):
                        dstm[ch, bm + a * k] += w * ym[a]
