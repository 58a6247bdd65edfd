"""STIR's ray-tracing projection matrix: tracing, the per-segment matrix layout, and its on-disk cache.

What STIR's ray tracer does (UCL/STIR ``src/recon_buildblock/ProjMatrixByBinUsingRayTracing.cxx`` and
``RayTraceVoxelsOnCartesianGrid.cxx``), and what is reproduced here:

- A bin ``(segment, view, axial, tang)`` is traced along ``num_tangential_LORs`` parallel rays at
  ``s + (j - (n-1)/2) * ds / n`` with ``ds = get_sampling_in_s(bin) = (s(t+1) - s(t-1)) / 2``.
- The LOR is ``X = s cos(phi) + a sin(phi)``, ``Y = s sin(phi) - a cos(phi)``, ``Z = m + z0 - a tan(theta)``
  (X, Y relative to the scanner axis, image x/y index increasing with X/Y), clipped to the cylinder of radius
  ``fovrad = min(max_index, -min_index) * voxel_size`` (STIR's "restrict to cylindrical FOV"; rays with
  ``|s| >= fovrad`` are empty).
- Siddon ray tracing starts at the *entry of the voxel containing the start point* and ends at the exit of the
  voxel containing the end point (the end voxels get their full chord), and stores 3-D lengths in mm divided by
  ``voxel_size.x * num_LORs`` ("pixel units").
- Axially, a bin covers a tube of ``sampling = get_axial_sampling(segment)`` mm around ``m``, with
  ``n = ceil(sampling / vz)`` rays: oblique segments trace the first ray at ``m - sampling/(2n) (n-1)`` and copy
  it ``n - 1`` times one plane up; direct segments (``tan(theta) == 0``) trace one ray (moved by ``-0.1 vz`` when
  it lies exactly between planes) and weight the planes by their overlap with the tube (``add_adjacent_z``).
- Image placement: ``Z`` (mm) is converted to the image plane index as ``(Z - origin_z) / vz + (nz - 1) / 2``;
  transaxially voxel ``[y, x]`` is at ``origin + index * voxel_size`` and the scanner axis is ``x = y = 0``.

Layout (:class:`SystemMatrix`): the axial positions of a segment are integer plane shifts of each other
(``k = sampling / vz`` planes), so one matrix per segment, traced for axial position 0, serves them all.  Rows are
``view * num_tangential + tang``; each element stores ``c = yx * P + q + Z0``: the voxel column ``yx`` and the
traced plane ``q`` in a *plane-padded, transposed* image ``Xt[yx, p + Z0] = x[p, yx]`` with row length ``P``.
Axial position ``a`` of the bin then reads ``Xt.flat[c + a k]`` (the projection kernels in
:mod:`sirf_ddip.physics.projector`).  Segment ``-d`` is segment ``+d`` mirrored in z about the tube centre; it
reuses the matrix on the z-flipped image with an extra plane shift (``mirror_shift``).  Direct segments apply
their axial kernel ``zw`` to the image first.

The tracer runs one view per call in compiled code (numba, GIL released, views in parallel threads); matrices are
kept per process and, for large ones, on disk (:func:`matrix_cache_dir`, env ``SIRF_DDIP_CACHE``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from ..errors import GeometryMismatchError
from ..geometry.image import ImageGrid
from ..geometry.sinogram import SinogramGeometry

__all__ = ["SegmentPlan", "SystemMatrix", "build_system_matrix", "segment_constants", "fov_radius",
           "matrix_cache_dir", "check_grid"]

#: bump when the traced numbers or the layout change: old cache files are then never used
TRACER_VERSION = 2
#: matrices with more elements than this are cached on disk by default (smaller ones rebuild in < 1 s)
DISK_CACHE_MIN_ELEMENTS = 5_000_000


def stir_round(x: np.ndarray) -> np.ndarray:
    """STIR's ``round``: half away from zero."""
    return np.where(x >= 0, np.floor(x + 0.5), -np.floor(-x + 0.5)).astype(np.int64)


def fov_radius(grid: ImageGrid) -> float:
    """STIR's ``fovrad_in_mm``: min over x, y of ``min(max_index, -min_index) * voxel_size``.

    STIR indices run from ``-(n//2)`` to ``n - 1 - n//2``; in physical terms this is the largest number of
    whole voxels from the axis to the first / last voxel centre."""
    r = []
    for ax in (1, 2):
        n, v, o = grid.shape[ax], grid.voxel_size[ax], grid.origin[ax]
        first = o / v  # index coordinate of voxel 0 relative to the axis
        last = first + n - 1
        r.append(min(last, -first) * v)
    return float(min(r))


def check_grid(geometry: SinogramGeometry, grid: ImageGrid) -> None:
    """STIR's ray-tracing matrix needs whole planes per axial step and an origin on the plane lattice.

    Raises
    ------
    GeometryMismatchError
    """
    vz = grid.voxel_size[0]
    for sg in geometry.segments:
        r = sg.axial_sampling_mm / vz
        if abs(r - round(r)) > 1e-4 or round(r) < 1:
            raise GeometryMismatchError(
                f"image z voxel size {vz:.5g} mm must divide the axial sampling {sg.axial_sampling_mm:.5g} mm of "
                f"segment {sg.number} (as STIR's ray-tracing matrix requires)")
    zo = grid.origin[0] / vz
    if abs(zo - round(zo)) > 1e-3:
        raise GeometryMismatchError(f"image z origin {grid.origin[0]:.5g} mm must be a multiple of the plane "
                                    f"spacing {vz:.5g} mm (STIR requirement)")


def segment_constants(geom: SinogramGeometry, grid: ImageGrid, segment: int, num_lors: int):
    """Axial constants of a segment: ``(direct, n_ax, zc, p0, zw, norm)``.

    ``zc``: image plane (index units) of the first traced ray at ``a = 0`` for axial position 0; ``p0``: the
    traced plane of a direct segment; ``zw``: axial kernel (a bin's value is ``sum_j zw[j] x[q + j]``, STIR's
    extra axial rays / ``add_adjacent_z``); ``norm = 1 / (vx n_ax num_lors)``."""
    nz = grid.shape[0]
    vz, vx = grid.voxel_size[0], grid.voxel_size[2]
    oz = grid.origin[0]
    seg = geom.segment(segment)
    direct = abs(seg.average_ring_diff) < 1e-4
    S = seg.axial_sampling_mm
    n_ax = int(math.ceil(S / vz - 1e-3))
    c = (nz - 1) / 2.0
    m0 = seg.m_mm[0]
    zc = (m0 - S / (2 * n_ax) * (n_ax - 1) - oz) / vz + c
    norm = 1.0 / (vx * n_ax * num_lors)
    if not direct:
        return False, n_ax, zc, None, np.ones(n_ax), norm
    zfirst = zc
    if abs((zfirst % 1.0) - 0.5) < 0.001:  # never trace exactly between two planes (STIR: -0.1 voxel)
        zfirst -= 0.1
    p0 = int(stir_round(np.asarray([zfirst]))[0])
    left = (m0 - S / 2.0) / vz
    right_rel = S / vz
    zf = p0 - c + oz / vz - left
    zw = []
    j = 0
    while True:  # STIR's add_adjacent_z: planes from the traced one upwards, weighted by overlap with the tube
        w = min(right_rel, zf + j + 0.5) - max(0.0, zf + j - 0.5)
        if j > 0 and w <= 1e-4:
            break
        zw.append(w if w > 1e-4 else 0.0)
        j += 1
        if j > 1000:
            raise GeometryMismatchError(f"segment {segment}: STIR's add_adjacent_z did not terminate")
    return True, n_ax, zc, p0, np.asarray(zw), norm


# ---------------------------------------------------------------------- layout
@dataclass
class SegmentPlan:
    """How one traced segment (or a ``+d``/``-d`` pair) is applied.

    ``lo .. hi``: traced planes kept (those that reach the image for some axial position); ``k``: planes per
    axial position; ``mirror_shift``: plane shift of the mirrored segment ``-number`` on the z-flipped image
    (None: no partner, or built separately); ``zw``: axial kernel (direct segments; ``[1.]`` otherwise)."""

    number: int
    num_axial: int
    k: int
    lo: int
    hi: int
    zw: np.ndarray
    mirror_shift: int | None


@dataclass
class SystemMatrix:
    """Traced matrices of a (geometry, grid): per planned segment CSR arrays over rows ``view * nt + tang``.

    ``indptr[s]`` (int64, ``num_views * nt + 1``), ``cols[s]`` (int32, ``yx * P + q + Z0``), ``vals[s]``
    (float32 or float64).  ``P``/``Z0``: row length and plane offset of the padded, transposed image."""

    plans: list
    P: int
    Z0: int
    nyx: int
    num_tangential: int
    indptr: dict = field(default_factory=dict)
    cols: dict = field(default_factory=dict)
    vals: dict = field(default_factory=dict)
    setup_seconds: float = 0.0
    source: str = "traced"

    @property
    def nnz(self) -> int:
        return int(sum(v.size for v in self.vals.values()))

    @property
    def nbytes(self) -> int:
        return int(sum(self.indptr[s].nbytes + self.cols[s].nbytes + self.vals[s].nbytes for s in self.vals))

    def plane_range(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """``(q, yx)`` of every element of segment ``number`` (for the generic torch path and tests)."""
        c = self.cols[number].astype(np.int64)
        return c % self.P - self.Z0, c // self.P


def plan_segments(geometry: SinogramGeometry, grid: ImageGrid, num_lors: int, use_mirror: bool = True
                  ) -> tuple[list[SegmentPlan], int, int]:
    """The segments to trace, their kept plane ranges and the padded layout ``(plans, P, Z0)``."""
    check_grid(geometry, grid)
    vz = grid.voxel_size[0]
    nz = grid.shape[0]
    fovrad = fov_radius(grid)
    numbers = [s.number for s in geometry.segments]
    plans = []
    for sg in geometry.segments:
        k = int(round(sg.axial_sampling_mm / vz))
        direct, _, zc, p0, zw, _ = segment_constants(geometry, grid, sg.number, num_lors)
        partner = -sg.number if (-sg.number in numbers and sg.number != 0) else None
        mirror_ok = False
        two_zc = 2 * _zc_tube(geometry, grid, sg)
        if use_mirror and partner is not None:
            other = geometry.segment(partner)
            mirror_ok = (other.num_axial == sg.num_axial and other.min_ring_diff == -sg.max_ring_diff
                         and abs(two_zc - round(two_zc)) < 1e-6)
        if mirror_ok and sg.number < 0:
            continue  # handled by its positive partner
        ms = None
        if mirror_ok:
            ms = nz - 1 - (int(round(two_zc)) + (sg.num_axial - 1) * k)
        # planes that reach the image for some axial position (and for the mirrored partner)
        J = len(zw) - 1
        keep_lo, keep_hi = -J - (sg.num_axial - 1) * k, nz - 1
        if ms is not None:
            keep_lo, keep_hi = min(keep_lo, keep_lo - ms), max(keep_hi, keep_hi - ms)
        # planes the rays can reach at all: |z travel| over the FOV
        if direct:
            reach_lo = reach_hi = p0
        else:
            tmax = float(np.max(np.abs(np.asarray(geometry.tantheta(sg.number, geometry.s()), dtype=float))))
            span = int(math.ceil(fovrad * tmax / vz)) + 3
            reach_lo, reach_hi = int(math.floor(zc)) - span, int(math.ceil(zc)) + span
        lo, hi = max(keep_lo, reach_lo), min(keep_hi, reach_hi)
        if hi < lo:
            lo = hi = reach_lo
        plans.append(SegmentPlan(sg.number, sg.num_axial, k, lo, hi, np.asarray(zw, float), ms))
    # padded plane layout: every read q + (shift) + a k, q in [lo, hi], lands inside [0, P)
    reads_lo, reads_hi = [], []
    for p in plans:
        for sh in ([0] if p.mirror_shift is None else [0, p.mirror_shift]):
            reads_lo.append(p.lo + sh)
            reads_hi.append(p.hi + sh + (p.num_axial - 1) * p.k)
    Z0 = max(0, -min(reads_lo))
    P = max(Z0 + max(reads_hi) + 1, Z0 + nz)
    return plans, int(P), int(Z0)


def _zc_tube(geometry: SinogramGeometry, grid: ImageGrid, sg) -> float:
    nz = grid.shape[0]
    vz = grid.voxel_size[0]
    return (sg.m_mm[0] - grid.origin[0]) / vz + (nz - 1) / 2.0


# ---------------------------------------------------------------------- compiled tracer
@numba.njit(nogil=True, cache=True)
def srnd(x):  # STIR's round (half away from zero)
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


@numba.njit(nogil=True, cache=True)
def _hash_slot(tab_k, key):
    mask = tab_k.size - 1
    h = (key * 2654435761) & mask
    while tab_k[h] != -1 and tab_k[h] != key:
        h = (h + 1) & mask
    return h


@numba.njit(nogil=True, cache=True)
def _hash_add(tab_k, tab_s, hpos, keys, accv, nk, key, w):
    """Add ``w`` to the row entry ``key`` (new entries appended in first-touch order); returns the count."""
    h = _hash_slot(tab_k, key)
    if tab_k[h] == -1:
        tab_k[h] = key
        tab_s[h] = nk
        hpos[nk] = h
        keys[nk] = key
        accv[nk] = w
        return nk + 1
    accv[tab_s[h]] += w
    return nk


@numba.njit(nogil=True, cache=True)
def trace_view(cphi, sphi, s_t, ds_t, num_lors, fovrad, nx, ny, vx, vy, ox, oy, vz,
               direct, zc, p0, tan_t, norm, lo, hi, P, Z0, tab_k, tab_s, hpos, keys, accv):
    """Trace one view for every planned segment.

    Returns ``(counts[nseg, nt], cols, vals)`` with the deduplicated elements of row ``t`` of segment ``i``
    stored consecutively (segments outer, rows inner).  ``tab_k``/``tab_s``: open-addressing hash table (size a
    power of two >= 2 ``keys.size``, ``tab_k`` all -1); ``hpos``/``keys``/``accv``: per-row scratch; all per
    thread."""
    nt = s_t.size
    nseg = direct.size
    nyx = nx * ny
    # ---- 2-D Siddon of every ray of the view (start-voxel entry to stop-voxel exit, as STIR)
    maxc = nx + ny + 4
    nray_max = nt * num_lors
    r_t = np.empty(nray_max, np.int64)
    r_A = np.empty(nray_max)
    r_W0 = np.empty(nray_max)
    r_W1 = np.empty(nray_max)
    r_n0 = np.zeros(nray_max + 1, np.int64)
    cw_a = np.empty(nray_max * maxc)
    cw_b = np.empty(nray_max * maxc)
    c_yx = np.empty(nray_max * maxc, np.int64)
    ws = np.empty(maxc)
    xb = np.empty(nx + 1)
    yb = np.empty(ny + 1)
    nr = 0
    ncr = 0
    for t in range(nt):
        for j in range(num_lors):
            s = s_t[t] + (j - (num_lors - 1) / 2.0) * (ds_t[t] / num_lors)
            if not (abs(s) < fovrad):
                continue
            A = math.sqrt(fovrad ** 2 - s ** 2)
            L = 2 * A
            xs = (s * cphi + A * sphi - ox) / vx
            ys = (s * sphi - A * cphi - oy) / vy
            rx = -sphi / vx
            ry = cphi / vy
            W0 = -np.inf
            W1 = np.inf
            parx = abs(rx * L) <= 1e-4
            pary = abs(ry * L) <= 1e-4
            if not parx:
                sg = 1.0 if rx >= 0 else -1.0
                W0 = max(W0, (srnd(xs) - sg * 0.5 - xs) / rx)
                W1 = min(W1, (srnd(xs + rx * L) + sg * 0.5 - xs) / rx)
            if not pary:
                sg = 1.0 if ry >= 0 else -1.0
                W0 = max(W0, (srnd(ys) - sg * 0.5 - ys) / ry)
                W1 = min(W1, (srnd(ys + ry * L) + sg * 0.5 - ys) / ry)
            # plane crossings in increasing travel w (each family is monotonic): merge, clipped to [W0, W1]
            for i in range(nx + 1):
                ii = i if rx >= 0 else nx - i
                v = W1 if parx else ((ii - 0.5) - xs) / rx
                xb[i] = min(max(v, W0), W1)
            for i in range(ny + 1):
                ii = i if ry >= 0 else ny - i
                v = W1 if pary else ((ii - 0.5) - ys) / ry
                yb[i] = min(max(v, W0), W1)
            n = 0
            ws[n] = W0
            n += 1
            ia = 0
            ib = 0
            while ia <= nx or ib <= ny:
                if ib > ny or (ia <= nx and xb[ia] <= yb[ib]):
                    ws[n] = xb[ia]
                    ia += 1
                else:
                    ws[n] = yb[ib]
                    ib += 1
                n += 1
            ws[n] = W1
            n += 1
            r_t[nr] = t
            r_A[nr] = A
            r_W0[nr] = W0
            r_W1[nr] = W1
            for i in range(n - 1):
                wa = ws[i]
                wb = ws[i + 1]
                if not (wb - wa > 1e-7):
                    continue
                wm = 0.5 * (wa + wb)
                ix = int(math.floor(xs + rx * wm + 0.5))
                iy = int(math.floor(ys + ry * wm + 0.5))
                if ix < 0 or ix >= nx or iy < 0 or iy >= ny:
                    continue
                cw_a[ncr] = wa
                cw_b[ncr] = wb
                c_yx[ncr] = iy * nx + ix
                ncr += 1
            nr += 1
            r_n0[nr] = ncr
    # ---- per segment: clip to the 3-D start / stop voxels, split at z planes, sum duplicates per row
    counts = np.zeros((nseg, nt), np.int64)
    cap = ncr * 4 + 16
    out_c = np.empty(cap * nseg if nseg > 0 else 1, np.int32)
    out_v = np.empty(cap * nseg if nseg > 0 else 1)
    no = 0
    for si in range(nseg):
        lo_s = lo[si]
        hi_s = hi[si]
        ri = 0
        for t in range(nt):
            nk = 0
            while ri < nr and r_t[ri] == t:
                A = r_A[ri]
                tau = tan_t[si, t]
                if direct[si]:
                    q = p0[si]
                    if q >= lo_s and q <= hi_s:
                        for e in range(r_n0[ri], r_n0[ri + 1]):
                            key = (q - lo_s) * nyx + c_yx[e]
                            w = (cw_b[e] - cw_a[e]) * norm[si]
                            nk = _hash_add(tab_k, tab_s, hpos, keys, accv, nk, key, w)
                    ri += 1
                    continue
                zs = zc[si] - A * tau / vz
                rz = tau / vz
                L = 2 * A
                par = abs(rz * L) <= 1e-4
                W0 = r_W0[ri]
                W1 = r_W1[ri]
                if not par:
                    sg = 1.0 if rz >= 0 else -1.0
                    W0 = max(W0, (srnd(zs) - sg * 0.5 - zs) / rz)
                    W1 = min(W1, (srnd(zs + rz * L) + sg * 0.5 - zs) / rz)
                scale = math.sqrt(1.0 + tau ** 2) * norm[si]
                step = 1.0 if rz > 0 else -1.0
                for e in range(r_n0[ri], r_n0[ri + 1]):
                    wa = max(cw_a[e], W0)
                    wb = min(cw_b[e], W1)
                    if not (wb - wa > 1e-7):
                        continue
                    za = zs + rz * wa
                    zb = zs + rz * wb
                    pa_z = math.floor(za + 0.5)
                    pb_z = math.floor(zb + 0.5)
                    nb = 0 if par else int(abs(pb_z - pa_z))
                    yx = c_yx[e]
                    if nb == 0:
                        q = int(pa_z)
                        if q >= lo_s and q <= hi_s:
                            key = (q - lo_s) * nyx + yx
                            w = (wb - wa) * scale
                            nk = _hash_add(tab_k, tab_s, hpos, keys, accv, nk, key, w)
                        continue
                    prev = wa
                    for jj in range(1, nb + 2):
                        if jj <= nb:
                            bnd = pa_z + step * (jj - 0.5)
                            nxt = (bnd - zs) / rz
                            nxt = min(max(nxt, wa), wb)
                        else:
                            nxt = wb
                        if nxt - prev > 1e-7:
                            mid = 0.5 * (prev + nxt)
                            q = int(math.floor(zs + rz * mid + 0.5))
                            if q >= lo_s and q <= hi_s:
                                key = (q - lo_s) * nyx + yx
                                w = (nxt - prev) * scale
                                nk = _hash_add(tab_k, tab_s, hpos, keys, accv, nk, key, w)
                        prev = nxt
                ri += 1
            # emit the row
            for i in range(nk):
                key = keys[i]
                q = key // nyx + lo_s
                yx = key - (key // nyx) * nyx
                if no >= out_c.size:  # grow (rare: the bound above is generous)
                    nc = np.empty(out_c.size * 2, np.int32)
                    nc[:no] = out_c[:no]
                    out_c = nc
                    nv = np.empty(out_v.size * 2)
                    nv[:no] = out_v[:no]
                    out_v = nv
                out_c[no] = yx * P + q + Z0
                out_v[no] = accv[i]
                no += 1
            for i in range(nk):  # clear the hash table for the next row (every entry goes)
                tab_k[hpos[i]] = -1
            counts[si, t] = nk
    return counts, out_c[:no].copy(), out_v[:no].copy()




# ---------------------------------------------------------------------- building
def _trace_all(geometry: SinogramGeometry, grid: ImageGrid, plans: list, P: int, Z0: int, num_lors: int,
               views: np.ndarray, val_dtype, threads: int) -> SystemMatrix:
    nz, ny, nx = grid.shape
    vz, vy, vx = grid.voxel_size
    _, oy, ox = grid.origin
    nt = geometry.num_tangential
    s_t = np.ascontiguousarray(geometry.s(), dtype=np.float64)
    ds_t = np.ascontiguousarray(geometry.sampling_in_s(), dtype=np.float64)
    fovrad = fov_radius(grid)
    phi = geometry.phi()
    nseg = len(plans)
    direct = np.zeros(nseg, np.bool_)
    zc = np.zeros(nseg)
    p0 = np.zeros(nseg, np.int64)
    norm = np.zeros(nseg)
    tan_t = np.zeros((nseg, nt))
    lo = np.array([p.lo for p in plans], np.int64)
    hi = np.array([p.hi for p in plans], np.int64)
    for i, p in enumerate(plans):
        d, _, z, pp, _, nm = segment_constants(geometry, grid, p.number, num_lors)
        direct[i], zc[i], norm[i] = d, z, nm
        p0[i] = pp if pp is not None else 0
        tan_t[i] = np.asarray(geometry.tantheta(p.number, geometry.s()), dtype=np.float64) * np.ones(nt)
    if int(max(hi - lo + 1)) * nx * ny >= 2 ** 31 or P * nx * ny >= 2 ** 31:
        raise GeometryMismatchError(f"image {grid.shape} too large for 32-bit matrix indices")
    # bound on one row's elements before de-duplication: rays x 2-D crossings x z pieces per crossing
    tmax = float(np.max(np.abs(tan_t))) if tan_t.size else 0.0
    pieces = int(math.ceil(tmax / vz * math.hypot(vx, vy))) + 2
    row_cap = num_lors * (nx + ny + 4) * pieces + 64
    tab_size = 1 << int(math.ceil(math.log2(2 * row_cap)))
    fn = trace_view
    local = threading.local()

    def one(v):
        if not hasattr(local, "tab_k"):
            local.tab_k = np.full(tab_size, -1, np.int64)
            local.tab_s = np.zeros(tab_size, np.int32)
            local.hpos = np.empty(row_cap, np.int64)
            local.keys = np.empty(row_cap, np.int64)
            local.accv = np.empty(row_cap)
        counts, c, w = fn(math.cos(phi[v]), math.sin(phi[v]), s_t, ds_t, num_lors, fovrad, nx, ny, vx, vy, ox,
                          oy, vz, direct, zc, p0, tan_t, norm, lo, hi, P, Z0, local.tab_k, local.tab_s, local.hpos,
                          local.keys, local.accv)
        return counts, c, w.astype(val_dtype)

    per_seg_c: list[list] = [[] for _ in plans]
    per_seg_w: list[list] = [[] for _ in plans]
    per_seg_n: list[list] = [[] for _ in plans]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        for counts, c, w in ex.map(one, [int(v) for v in views]):
            ends = np.cumsum(counts.sum(1))
            starts = ends - counts.sum(1)
            for i in range(nseg):
                per_seg_c[i].append(c[starts[i]:ends[i]])
                per_seg_w[i].append(w[starts[i]:ends[i]])
                per_seg_n[i].append(counts[i])
            del c, w
    sm = SystemMatrix(plans=plans, P=P, Z0=Z0, nyx=nx * ny, num_tangential=nt)
    for i, p in enumerate(plans):
        n = np.concatenate(per_seg_n[i]) if per_seg_n[i] else np.zeros(0, np.int64)
        indptr = np.zeros(n.size + 1, np.int64)
        np.cumsum(n, out=indptr[1:])
        sm.indptr[p.number] = indptr
        sm.cols[p.number] = np.concatenate(per_seg_c[i]) if per_seg_c[i] else np.zeros(0, np.int32)
        per_seg_c[i] = []
        sm.vals[p.number] = np.concatenate(per_seg_w[i]) if per_seg_w[i] else np.zeros(0, val_dtype)
        per_seg_w[i] = []
    return sm


def build_system_matrix(geometry: SinogramGeometry, grid: ImageGrid, num_lors: int = 3, use_mirror: bool = True,
                        dtype=np.float32, views: np.ndarray | None = None, threads: int | None = None,
                        disk_cache: bool | None = None, cache_dir: str | Path | None = None) -> SystemMatrix:
    """Trace STIR's ray-tracing matrix for ``geometry`` and ``grid`` (all views, or only ``views``).

    Parameters
    ----------
    num_lors : int
        STIR's ``number of rays in tangential direction to trace for each bin``.
    use_mirror : bool
        Reuse segment ``+d`` for ``-d`` (exact up to rounding ties).
    dtype : numpy dtype
        Of the stored values (summed in float64 while tracing).
    views : array of int, optional
        Trace only these views (rows ``local_view * nt + tang``); never cached on disk.
    threads : int, optional
        Views traced in parallel (default: ``os.cpu_count()``).
    disk_cache : bool, optional
        Read / write the on-disk cache; None (default): only for matrices of more than
        :data:`DISK_CACHE_MIN_ELEMENTS` estimated elements.
    cache_dir : path, optional
        Default :func:`matrix_cache_dir`.
    """
    import time
    t0 = time.perf_counter()
    if int(num_lors) < 1:
        raise GeometryMismatchError("num_tangential_lors must be >= 1")
    plans, P, Z0 = plan_segments(geometry, grid, int(num_lors), use_mirror)
    dtype = np.dtype(dtype)
    all_views = views is None
    vlist = np.arange(geometry.num_views) if all_views else np.asarray(views, dtype=np.int64)
    if disk_cache is None:
        est = len(plans) * vlist.size * geometry.num_tangential * num_lors * 1.5 * max(grid.shape[1:])
        disk_cache = all_views and est > DISK_CACHE_MIN_ELEMENTS
    path = None
    if disk_cache and all_views:
        key = _cache_key(geometry, grid, int(num_lors), use_mirror, dtype, P, Z0)
        path = Path(cache_dir) if cache_dir is not None else matrix_cache_dir()
        path = path / f"sysmat-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
        sm = _load(path, key, plans, P, Z0, grid, geometry)
        if sm is not None:
            sm.setup_seconds = time.perf_counter() - t0
            return sm
    sm = _trace_all(geometry, grid, plans, P, Z0, int(num_lors), vlist, dtype,
                    threads if threads is not None else (os.cpu_count() or 1))
    _check_layout(sm)
    if path is not None:
        _save(path, key, sm)
    sm.setup_seconds = time.perf_counter() - t0
    return sm


def _check_layout(sm: SystemMatrix) -> None:
    """Every read ``c + shift + a k`` of every segment stays inside its row of the padded image (the compiled
    kernels do not check bounds).

    Raises
    ------
    GeometryMismatchError
        If the plan and the traced (or loaded) elements disagree."""
    for p in sm.plans:
        c = sm.cols[p.number]
        if c.size == 0:
            continue
        if int(c.min()) < 0 or int(c.max()) >= sm.nyx * sm.P:
            raise GeometryMismatchError(f"projection matrix of segment {p.number}: element index outside the image")
        zq = c % sm.P
        lo_q, hi_q = int(zq.min()) - sm.Z0, int(zq.max()) - sm.Z0
        del zq
        for sh in ([0] if p.mirror_shift is None else [0, p.mirror_shift]):
            if lo_q + sh + sm.Z0 < 0 or hi_q + sh + (p.num_axial - 1) * p.k + sm.Z0 >= sm.P:
                raise GeometryMismatchError(
                    f"projection matrix of segment {p.number}: planes {lo_q}..{hi_q} (shift {sh}) leave the padded "
                    f"image layout (P={sm.P}, Z0={sm.Z0}); the matrix is inconsistent with its plan")


# ---------------------------------------------------------------------- disk cache
def matrix_cache_dir() -> Path:
    """Folder of the on-disk matrix cache: ``$SIRF_DDIP_CACHE``, else ``$XDG_CACHE_HOME/sirf_ddip``, else
    ``~/.cache/sirf_ddip`` (never inside the package)."""
    env = os.environ.get("SIRF_DDIP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sirf_ddip"


def _cache_key(geometry, grid, num_lors, use_mirror, dtype, P, Z0) -> str:
    sc = geometry.scanner
    key = dict(version=TRACER_VERSION, rings=sc.num_rings, dets=sc.detectors_per_ring,
               radius=repr(float(sc.effective_radius_mm)), ring_spacing=repr(float(sc.ring_spacing_mm)),
               view_offset=repr(float(sc.view_offset_deg)), views=geometry.num_views, tang=geometry.num_tangential,
               phi0=repr(float(geometry.phi()[0])), s=hashlib.sha256(np.ascontiguousarray(geometry.s()).tobytes())
               .hexdigest()[:16], segments=[[s.number, s.min_ring_diff, s.max_ring_diff, s.num_axial,
                                             repr(float(s.axial_sampling_mm)), repr(float(s.m_mm[0]))]
                                            for s in geometry.segments],
               shape=list(grid.shape), voxel=[repr(float(v)) for v in grid.voxel_size],
               origin=[repr(float(o)) for o in grid.origin], num_lors=num_lors, mirror=bool(use_mirror),
               dtype=str(dtype), P=P, Z0=Z0)
    return json.dumps(key, sort_keys=True)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def _save(path: Path, key: str, sm: SystemMatrix) -> None:
    """Write atomically (temporary name in the same folder, then ``os.replace``); failures only warn."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for p in sm.plans:
            for what, d in (("indptr", sm.indptr), ("cols", sm.cols), ("vals", sm.vals)):
                arrays[f"{what}_{p.number}"] = d[p.number]
        meta = dict(key=key, crc={k: _crc(v) for k, v in arrays.items()})
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"projection matrix cache {path} not written: {e}", RuntimeWarning, stacklevel=3)


def _load(path: Path, key: str, plans, P, Z0, grid, geometry) -> SystemMatrix | None:
    """The cached matrix, or None (missing, stale or corrupt: a warning, and it is rebuilt and rewritten)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("key") != key:
                raise ValueError("key mismatch (stale file)")
            sm = SystemMatrix(plans=plans, P=P, Z0=Z0, nyx=grid.shape[1] * grid.shape[2],
                              num_tangential=geometry.num_tangential, source=str(path))
            nrows = geometry.num_views * geometry.num_tangential + 1
            for p in plans:
                for what, d in (("indptr", sm.indptr), ("cols", sm.cols), ("vals", sm.vals)):
                    name = f"{what}_{p.number}"
                    a = z[name]
                    if _crc(a) != meta["crc"][name]:
                        raise ValueError(f"checksum of {name} does not match")
                    d[p.number] = a
                if sm.indptr[p.number].size != nrows or sm.indptr[p.number][-1] != sm.cols[p.number].size:
                    raise ValueError("inconsistent array sizes")
            _check_layout(sm)
            return sm
    except Exception as e:  # corrupt zip, truncated file, wrong key: never trust it
        warnings.warn(f"ignoring projection matrix cache {path}: {e}; rebuilding", RuntimeWarning, stacklevel=3)
        return None
