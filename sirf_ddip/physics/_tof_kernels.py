"""Compiled CPU kernels (numba) of the TOF projector: the non-TOF row kernels of :mod:`._kernels` with STIR's
TOF kernel evaluated per element (see :mod:`sirf_ddip.physics.tof`).

Element ``e`` of a row has non-TOF weight ``w[e]``, image index ``c[e]`` and TOF coordinate ``d[e]`` (mm); TOF
bin ``k`` gets ``w[e] W(d - centre_k)``, ``W`` being STIR's integrated Gaussian (``get_tof_value``, zero beyond
its cut-off), read from a table (as STIR's ``erf_interpolation``) by linear interpolation: ``table[j] =
W(-U + j h)`` with ``M`` samples per TOF bin width, so that every TOF bin of an element shares one interpolation
fraction (bin ``k`` reads ``pos - k M``, ``pos = (d - centre_0 + U) / h``).  Only the TOF bins within the
cut-off are visited; the table's error is below 1e-7 of the kernel's peak (:func:`sirf_ddip.physics.tof.kernel_table`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

__all__ = ["tof_forward_rows", "tof_adjoint_rows"]


@numba.njit(nogil=True, cache=True, inline="always")
def _bin_range(pos, M, J, ntof):
    """TOF bins ``k`` whose table position ``pos - k M`` lies in ``[0, J - 1)``."""
    k0 = int(math.ceil((pos - (J - 1)) / M))
    k1 = int(math.floor(pos / M))
    return max(0, k0), min(ntof - 1, k1)


@numba.njit(nogil=True, cache=True, inline="always")
def _table_window(d, c0, U, h, M, J, ntof):
    """``(k0, k1, j0, f)``: the TOF bins ``k0..k1`` an element at TOF coordinate ``d`` reaches, and its table
    position ``pos = j0 + f`` (bin ``k`` reads the table at ``j0 - k M`` with fraction ``f``)."""
    pos = (d - c0 + U) / h
    k0, k1 = _bin_range(pos, M, J, ntof)
    j0 = int(math.floor(pos))
    return k0, k1, j0, pos - j0


@numba.njit(nogil=True, cache=True, inline="always")
def _table_value(table, j, f):
    """The kernel table at ``j + f`` by linear interpolation."""
    return table[j] + f * (table[j + 1] - table[j])


@numba.njit(parallel=True, nogil=True, cache=True)
def tof_forward_rows(indptr, cols, vals, dcoord, table, c0, U, h, M, views, nt, src, srcm, off, offm, na, k, out,
                     pos0, posm0, mirror):
    """``out[b, pos0 + a, i] = sum_e w_e t_b(d_e) src[c_e + off + a k]`` (and the z-mirrored segment into
    ``posm0 + na - 1 - a`` from ``srcm``) for local rows ``i`` of the views ``views``."""
    nr = views.size * nt
    ntof = out.shape[0]
    J = table.size
    for i in prange(nr):
        r_ = views[i // nt] * nt + (i % nt)
        acc = np.zeros((ntof, na), out.dtype)
        accm = np.zeros((ntof, na), out.dtype)
        g = np.empty(na, out.dtype)
        gm = np.empty(na, out.dtype)
        for e in range(indptr[r_], indptr[r_ + 1]):
            w = vals[e]
            d = dcoord[e]
            b = cols[e] + off
            for a in range(na):
                g[a] = src[b + a * k]
            if mirror:
                bm = cols[e] + offm
                for a in range(na):
                    gm[a] = srcm[bm + a * k]
            k0, k1, j0, f = _table_window(d, c0, U, h, M, J, ntof)
            for kk in range(k0, k1 + 1):
                t = _table_value(table, j0 - kk * M, f)
                if t <= 0.0:
                    continue
                wt = w * t
                for a in range(na):
                    acc[kk, a] += wt * g[a]
                if mirror:
                    for a in range(na):
                        accm[kk, a] += wt * gm[a]
        for kk in range(ntof):
            for a in range(na):
                out[kk, pos0 + a, i] = acc[kk, a]
            if mirror:
                for a in range(na):
                    out[kk, posm0 + na - 1 - a, i] = accm[kk, a]


@numba.njit(parallel=True, nogil=True, cache=True)
def tof_adjoint_rows(indptr, cols, vals, dcoord, table, c0, U, h, M, views, nt, Y, pos0, posm0, na, k, off, offm,
                     dst, dstm, mirror, bounds):
    """Adjoint of :func:`tof_forward_rows`: ``dst[ch, c_e + off + a k] += w_e sum_b t_b(d_e) Y[b, pos0 + a, i]``
    (and the mirrored segment into ``dstm``), local rows ``bounds[ch] .. bounds[ch + 1]`` by chunk ``ch``."""
    nch = bounds.size - 1
    ntof = Y.shape[0]
    J = table.size
    for ch in prange(nch):
        y = np.empty((ntof, na), Y.dtype)
        ym = np.empty((ntof, na), Y.dtype)
        s = np.empty(na, Y.dtype)
        sm = np.empty(na, Y.dtype)
        for i in range(bounds[ch], bounds[ch + 1]):
            r_ = views[i // nt] * nt + (i % nt)
            for kk in range(ntof):
                for a in range(na):
                    y[kk, a] = Y[kk, pos0 + a, i]
                if mirror:
                    for a in range(na):
                        ym[kk, a] = Y[kk, posm0 + na - 1 - a, i]
            for e in range(indptr[r_], indptr[r_ + 1]):
                d = dcoord[e]
                for a in range(na):
                    s[a] = 0.0
                    sm[a] = 0.0
                k0, k1, j0, f = _table_window(d, c0, U, h, M, J, ntof)
                for kk in range(k0, k1 + 1):
                    t = _table_value(table, j0 - kk * M, f)
                    if t <= 0.0:
                        continue
                    for a in range(na):
                        s[a] += t * y[kk, a]
                    if mirror:
                        for a in range(na):
                            sm[a] += t * ym[kk, a]
                w = vals[e]
                b = cols[e] + off
                for a in range(na):
                    dst[ch, b + a * k] += w * s[a]
                if mirror:
                    bm = cols[e] + offm
                    for a in range(na):
                        dstm[ch, bm + a * k] += w * sm[a]
