"""Compiled CPU kernels (numba) of the TOF projector: the non-TOF row kernels of :mod:`._kernels` with STIR's
TOF kernel evaluated per element (see :mod:`sirf_ddip.physics.tof`).

Element ``e`` of a row has non-TOF weight ``w[e]``, image index ``c[e]`` and TOF coordinate ``d[e]`` (mm); TOF
bin ``k`` gets ``w[e] * 0.5 (erf((hi_k - d) r) - erf((lo_k - d) r))`` with ``r = 1 / (sqrt(2) sigma)``, zero
when both scaled edge distances are beyond ``+-4`` on the same side (STIR's ``get_tof_value``).  Only the TOF
bins within that cut-off are visited.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

__all__ = ["tof_forward_rows", "tof_adjoint_rows"]

CUT = 4.0


@numba.njit(nogil=True, cache=True, inline="always")
def _bin_range(d, lo, hi, r):
    """First and last TOF bin whose kernel value can be non-zero for coordinate ``d`` (bins of equal width)."""
    ntof = lo.size
    w = hi[0] - lo[0]
    reach = CUT / r
    k0 = int(math.floor((d - reach - hi[0]) / w))
    k1 = int(math.floor((d + reach - lo[0]) / w)) + 1
    return max(0, k0), min(ntof - 1, k1)


@numba.njit(nogil=True, cache=True, inline="always")
def _tof_value(d, lo_k, hi_k, r):
    d1 = (lo_k - d) * r
    d2 = (hi_k - d) * r
    if (d1 >= CUT and d2 >= CUT) or (d1 <= -CUT and d2 <= -CUT):
        return 0.0
    return 0.5 * (math.erf(d2) - math.erf(d1))


@numba.njit(parallel=True, nogil=True, cache=True)
def tof_forward_rows(indptr, cols, vals, dcoord, lo, hi, r, views, nt, src, srcm, off, offm, na, k, out, pos0,
                     posm0, mirror):
    """``out[b, pos0 + a, i] = sum_e w_e t_b(d_e) src[c_e + off + a k]`` (and the z-mirrored segment into
    ``posm0 + na - 1 - a`` from ``srcm``) for local rows ``i`` of the views ``views``."""
    nr = views.size * nt
    ntof = lo.size
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
            k0, k1 = _bin_range(d, lo, hi, r)
            for kk in range(k0, k1 + 1):
                t = _tof_value(d, lo[kk], hi[kk], r)
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
def tof_adjoint_rows(indptr, cols, vals, dcoord, lo, hi, r, views, nt, Y, pos0, posm0, na, k, off, offm, dst, dstm,
                     mirror, bounds):
    """Adjoint of :func:`tof_forward_rows`: ``dst[ch, c_e + off + a k] += w_e sum_b t_b(d_e) Y[b, pos0 + a, i]``
    (and the mirrored segment into ``dstm``), local rows ``bounds[ch] .. bounds[ch + 1]`` by chunk ``ch``."""
    nch = bounds.size - 1
    ntof = lo.size
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
                k0, k1 = _bin_range(d, lo, hi, r)
                for kk in range(k0, k1 + 1):
                    t = _tof_value(d, lo[kk], hi[kk], r)
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
