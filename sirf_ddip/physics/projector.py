"""Matched forward / back projector reproducing STIR's ``ProjMatrixByBinUsingRayTracing``.

What STIR's ray tracer does (UCL/STIR ``src/recon_buildblock/ProjMatrixByBinUsingRayTracing.cxx`` and
``RayTraceVoxelsOnCartesianGrid.cxx``), and what is reproduced here:

- A bin ``(segment, view, axial, tang)`` is traced along ``num_tangential_LORs`` parallel rays at
  ``s + (j - (n-1)/2) * ds / n`` with ``ds = get_sampling_in_s(bin) = (s(t+1) - s(t-1)) / 2``.
- The LOR is ``X = s cos(phi) + a sin(phi)``, ``Y = s sin(phi) - a cos(phi)``, ``Z = m + z0 - a tan(theta)``
  (X, Y relative to the scanner axis, image x/y index increasing with X/Y), clipped to the cylinder of radius
  ``fovrad = min(max_index, -min_index) * voxel_size`` (STIR's "restrict to cylindrical FOV"; rays with
  ``|s| > fovrad`` are empty).
- Siddon ray tracing starts at the *entry of the voxel containing the start point* and ends at the exit of the
  voxel containing the end point (the end voxels get their full chord), and stores 3-D lengths in mm divided by
  ``voxel_size.x * num_LORs`` ("pixel units").
- Axially, a bin covers a tube of ``sampling = get_axial_sampling(segment)`` mm around ``m``, with
  ``n = ceil(sampling / vz)`` rays: oblique segments trace the first ray at ``m - sampling/(2n) (n-1)`` and copy
  it ``n - 1`` times one plane up; direct segments (``tan(theta) == 0``) trace one ray (moved by ``-0.1 vz`` when
  it lies exactly between planes) and weight the planes by their overlap with the tube (``add_adjacent_z``).
- Image placement: ``Z`` (mm) is converted to the image plane index as
  ``(Z - origin_z) / vz + (nz - 1) / 2``: the image's axial index centre is at the scanner centre, shifted by the
  image origin's z (the Interfile ``first pixel offset (mm) [3]``).  Transaxially voxel ``[y, x]`` is at
  ``origin + index * voxel_size`` (first pixel offset) and the scanner axis is ``x = y = 0``.

Implementation: per segment pair a sparse CSR matrix with rows ``(view, tang)`` and columns
``(plane offset q, y, x)`` is built with vectorised numpy (no loop per ray).  The axial positions of a segment
are integer plane shifts of each other (``k = sampling / vz`` planes), so all axial positions are one sparse x
dense product against the "unfolded" image ``D[(q, yx), a] = x[q + a k, yx]``.  Segment ``-d`` is segment ``+d``
mirrored in z about the tube centre, so it reuses the matrix on the z-flipped image (columns stacked in the same
product).  The adjoint uses the stored transpose.  Matrices are cached per (geometry, grid, options).
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import GeometryMismatchError
from ..geometry.image import ImageGrid
from ..geometry.sinogram import SinogramGeometry
from ..utils.device import resolve_device
from .operator import LinearOperator

__all__ = ["Projector", "build_segment_matrix"]

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

_RAYS_PER_CHUNK = 6000


def _stir_round(x: np.ndarray) -> np.ndarray:
    """STIR's ``round``: half away from zero."""
    return np.where(x >= 0, np.floor(x + 0.5), -np.floor(-x + 0.5)).astype(np.int64)


@dataclass
class _SegMatrix:
    """Sparse matrix of one segment (or of a +/- segment pair through mirroring), on CPU (scipy)."""

    number: int  # the positive (or zero) segment number
    mat: sp.csr_matrix  # rows v * nt + t, cols (q - qmin) * nyx + yx
    qmin: int
    nq: int
    k: int  # planes per axial position
    num_axial: int
    zw: np.ndarray  # axial kernel: value = sum_j zw[j] x[q + j]
    mirror_shift: int | None  # delta for the mirrored (negative) segment, None if built separately / no pair


def _fov_radius(grid: ImageGrid) -> float:
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


def _trace_segment_reference(geom: SinogramGeometry, grid: ImageGrid, segment: int, views: np.ndarray,
                   num_lors: int, restrict_fov: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray, np.ndarray]:
    """Ray-trace one segment for axial position 0 and the given views (direct 3-D Siddon; reference version
    of the faster :func:`_trace_2d` + :func:`_segment_elements`, kept for testing).

    Returns ``(row, plane, yx, weight, zw)``: element arrays (row = local_view * nt + t; plane = image plane of
    the traced ray for axial position 0, may lie outside the image; duplicates not yet summed) and the axial
    kernel ``zw``: the bin's value is ``sum_e weight_e sum_j zw[j] x[plane_e + j, yx_e]`` (STIR's extra
    axial rays / adjacent planes, identical for every element of a segment).
    """
    if not restrict_fov:
        raise NotImplementedError("only STIR's default 'restrict to cylindrical FOV' is implemented")
    nz, ny, nx = grid.shape
    vz, vy, vx = grid.voxel_size
    oz, oy, ox = grid.origin
    seg = geom.segment(segment)
    nt = geom.num_tangential
    s_t = geom.s()
    ds_t = geom.sampling_in_s()
    tan_t = np.asarray(geom.tantheta(segment, s_t), dtype=np.float64) * np.ones(nt)
    direct = abs(seg.average_ring_diff) < 1e-4
    S = seg.axial_sampling_mm
    n_ax = int(math.ceil(S / vz - 1e-3))
    c = (nz - 1) / 2.0
    m0 = seg.m_mm[0]
    z_first = -S / (2 * n_ax) * (n_ax - 1)
    zc = (m0 + z_first - oz) / vz + c  # image plane (index units) of the first ray at a = 0, axial pos 0
    fovrad = _fov_radius(grid)
    phi = geom.phi()[views]
    cphi, sphi = np.cos(phi), np.sin(phi)

    # rays: (view, t, j)
    jj = np.arange(num_lors) - (num_lors - 1) / 2.0
    s_ray = s_t[:, None] + jj[None, :] * (ds_t[:, None] / num_lors)  # (nt, nL)
    ok = np.abs(s_ray) < fovrad  # |s| == fovrad gives an empty ray in STIR
    t_idx, j_idx = np.nonzero(ok)
    s_sel = s_ray[t_idx, j_idx]
    tan_sel = tan_t[t_idx]
    A_sel = np.sqrt(fovrad ** 2 - s_sel ** 2)
    nv = len(views)
    # all (view, ray) combinations
    V = np.repeat(np.arange(nv), t_idx.size)
    T = np.tile(t_idx, nv)
    Sr = np.tile(s_sel, nv)
    TT = np.tile(tan_sel, nv)
    AA = np.tile(A_sel, nv)
    CP = cphi[V]
    SP = sphi[V]

    # z handling for direct segments (add_adjacent_z)
    if direct:
        zfirst = zc
        if abs((zfirst % 1.0) - 0.5) < 0.001:
            zfirst -= 0.1
        p0 = int(_stir_round(np.asarray([zfirst]))[0])
        left = (m0 - S / 2.0) / vz
        right_rel = S / vz
        zf = p0 - c + oz / vz - left
        planes, pweights = [], []
        j = 0
        while True:
            w = min(right_rel, zf + j + 0.5) - max(0.0, zf + j - 0.5)
            if j > 0 and w <= 1e-4:
                break
            if w > 1e-4:
                planes.append(p0 + j)
                pweights.append(w)
            j += 1
            if j > 1000:
                raise RuntimeError("add_adjacent_z did not terminate")
        planes = np.asarray(planes, dtype=np.int64)
        pweights = np.asarray(pweights, dtype=np.float64)

    rows_out, q_out, yx_out, w_out = [], [], [], []
    nrays = V.size
    bx = np.arange(nx + 1) - 0.5
    by = np.arange(ny + 1) - 0.5
    tmax = float(np.max(np.abs(tan_t))) if not direct else 0.0
    kz = int(math.ceil(2 * fovrad * tmax / vz)) + 3 if not direct else 0
    norm = 1.0 / (vx * n_ax * num_lors)
    for c0 in range(0, nrays, _RAYS_PER_CHUNK):
        sl = slice(c0, min(nrays, c0 + _RAYS_PER_CHUNK))
        s_, tn, A, cp, spp = Sr[sl], TT[sl], AA[sl], CP[sl], SP[sl]
        L = 2 * A
        # start point (a = +A) in index coordinates, and rates per unit w = A - a (mm)
        xs = (s_ * cp + A * spp - ox) / vx
        ys = (s_ * spp - A * cp - oy) / vy
        rx = -spp / vx
        ry = cp / vy
        if direct:
            zs = np.full_like(xs, 0.0)
            rz = np.zeros_like(xs)
        else:
            zs = zc - A * tn / vz
            rz = tn / vz
        coords = [(xs, rx), (ys, ry)] + ([(zs, rz)] if not direct else [])
        W0 = np.full_like(xs, -np.inf)
        W1 = np.full_like(xs, np.inf)
        for (c_s, r) in coords:
            par = np.abs(r * L) <= 1e-4
            rr = np.where(par, 1.0, r)
            sg = np.where(rr >= 0, 1.0, -1.0)
            c_e = c_s + r * L
            w_in = (_stir_round(c_s) - sg * 0.5 - c_s) / rr
            w_outv = (_stir_round(c_e) + sg * 0.5 - c_s) / rr
            W0 = np.where(par, W0, np.maximum(W0, w_in))
            W1 = np.where(par, W1, np.minimum(W1, w_outv))
        # crossings with grid planes
        with np.errstate(divide="ignore", invalid="ignore"):
            rxs = np.where(np.abs(rx * L) <= 1e-4, np.nan, rx)
            rys = np.where(np.abs(ry * L) <= 1e-4, np.nan, ry)
            wx = (bx[None, :] - xs[:, None]) / rxs[:, None]
            wy = (by[None, :] - ys[:, None]) / rys[:, None]
            parts = [W0[:, None], wx, wy]
            if not direct:
                zlo = np.floor(np.minimum(zs, zs + rz * L)) - 1.5
                bz = zlo[:, None] + np.arange(kz + 3)[None, :]
                rzs = np.where(np.abs(rz * L) <= 1e-4, np.nan, rz)
                parts.append((bz - zs[:, None]) / rzs[:, None])
            parts.append(W1[:, None])
            w = np.concatenate(parts, axis=1)
        w = np.where(np.isnan(w), W1[:, None], w)
        w = np.clip(w, W0[:, None], W1[:, None])
        w.sort(axis=1)
        seglen = np.diff(w, axis=1)
        mid = 0.5 * (w[:, 1:] + w[:, :-1])
        keep = seglen > 1e-7
        ri, ci = np.nonzero(keep)
        wm = mid[ri, ci]
        ln = seglen[ri, ci]
        ix = _stir_round(xs[ri] + rx[ri] * wm)
        iy = _stir_round(ys[ri] + ry[ri] * wm)
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        ri, wm, ln, ix, iy = ri[inside], wm[inside], ln[inside], ix[inside], iy[inside]
        gi = ri + c0  # global ray index
        tt = T[gi]
        row = V[gi] * nt + tt
        val = ln * np.sqrt(1.0 + TT[gi] ** 2) * norm
        yx = iy * nx + ix
        if direct:
            q = np.full(ri.size, p0, dtype=np.int64)
        else:
            q = _stir_round(zs[ri] + rz[ri] * wm)
        rows_out.append(row)
        q_out.append(q)
        yx_out.append(yx)
        w_out.append(val)
    if direct:
        zw = np.zeros(int(planes.max() - p0) + 1)
        zw[planes - p0] = pweights
    else:
        zw = np.ones(n_ax)
    if not rows_out:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, np.zeros(0), zw
    return (np.concatenate(rows_out), np.concatenate(q_out), np.concatenate(yx_out), np.concatenate(w_out), zw)


def _segment_constants(geom: SinogramGeometry, grid: ImageGrid, segment: int, num_lors: int):
    """Axial constants of a segment: (direct, n_ax, zc, p0, zw, norm)."""
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
    p0 = int(_stir_round(np.asarray([zfirst]))[0])
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
            raise RuntimeError("add_adjacent_z did not terminate")
    return True, n_ax, zc, p0, np.asarray(zw), norm


def _trace_2d(geom: SinogramGeometry, grid: ImageGrid, views: np.ndarray, num_lors: int, fovrad: float,
              dtype=np.float64) -> dict:
    """Transaxial Siddon tracing of every (view, tang, sub-ray) of ``views``.

    Returns ray arrays (``V`` local view, ``T`` tang index, ``A`` half length, ``xs, ys`` start point in index
    units, ``rx, ry`` index increments per mm of travel ``w``, ``W0, W1`` travel range of the 2-D start / stop
    voxels) and element arrays (``ray``, ``wa``, ``wb``, ``yx``): the travel interval of each voxel crossing.
    """
    nz, ny, nx = grid.shape
    vz, vy, vx = grid.voxel_size
    oz, oy, ox = grid.origin
    nt = geom.num_tangential
    s_t = geom.s()
    ds_t = geom.sampling_in_s()
    phi = geom.phi()[views]
    cphi, sphi = np.cos(phi), np.sin(phi)
    jj = np.arange(num_lors) - (num_lors - 1) / 2.0
    s_ray = s_t[:, None] + jj[None, :] * (ds_t[:, None] / num_lors)
    ok = np.abs(s_ray) < fovrad
    t_idx, j_idx = np.nonzero(ok)
    s_sel = s_ray[t_idx, j_idx]
    A_sel = np.sqrt(fovrad ** 2 - s_sel ** 2)
    nv = len(views)
    V = np.repeat(np.arange(nv), t_idx.size)
    T = np.tile(t_idx, nv)
    s_ = np.tile(s_sel, nv)
    A = np.tile(A_sel, nv)
    cp, spp = cphi[V], sphi[V]
    L = 2 * A
    xs = (s_ * cp + A * spp - ox) / vx
    ys = (s_ * spp - A * cp - oy) / vy
    rx = -spp / vx
    ry = cp / vy
    W0 = np.full_like(xs, -np.inf)
    W1 = np.full_like(xs, np.inf)
    for (c_s, r) in ((xs, rx), (ys, ry)):
        par = np.abs(r * L) <= 1e-4
        rr = np.where(par, 1.0, r)
        sg = np.where(rr >= 0, 1.0, -1.0)
        c_e = c_s + r * L
        W0 = np.where(par, W0, np.maximum(W0, (_stir_round(c_s) - sg * 0.5 - c_s) / rr))
        W1 = np.where(par, W1, np.minimum(W1, (_stir_round(c_e) + sg * 0.5 - c_s) / rr))
    bx = np.arange(nx + 1) - 0.5
    by = np.arange(ny + 1) - 0.5
    ray_l, wa_l, wb_l, yx_l = [], [], [], []
    for c0 in range(0, xs.size, _RAYS_PER_CHUNK):
        sl = slice(c0, min(xs.size, c0 + _RAYS_PER_CHUNK))
        x0, y0, ax_, ay_, w0, w1, Lc = xs[sl], ys[sl], rx[sl], ry[sl], W0[sl], W1[sl], L[sl]
        with np.errstate(divide="ignore", invalid="ignore"):
            rxs = np.where(np.abs(ax_ * Lc) <= 1e-4, np.nan, ax_)
            rys = np.where(np.abs(ay_ * Lc) <= 1e-4, np.nan, ay_)
            w = np.concatenate([w0[:, None], (bx[None, :] - x0[:, None]) / rxs[:, None],
                                (by[None, :] - y0[:, None]) / rys[:, None], w1[:, None]], axis=1)
        w = np.where(np.isnan(w), w1[:, None], w)
        np.clip(w, w0[:, None], w1[:, None], out=w)
        w.sort(axis=1)
        seglen = w[:, 1:] - w[:, :-1]
        ri, ci = np.nonzero(seglen > 1e-7)
        wa = w[ri, ci]
        wb = w[ri, ci + 1]
        wm = 0.5 * (wa + wb)
        ix = np.floor(x0[ri] + ax_[ri] * wm + 0.5).astype(np.int64)  # mid-points are never at .5 ties
        iy = np.floor(y0[ri] + ay_[ri] * wm + 0.5).astype(np.int64)
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        ray_l.append(ri[inside] + c0)
        wa_l.append(wa[inside])
        wb_l.append(wb[inside])
        yx_l.append(iy[inside] * nx + ix[inside])
    cat = (lambda l, d: np.concatenate(l) if l else np.zeros(0, d))
    return dict(V=V, T=T, A=A, W0=W0, W1=W1, ray=cat(ray_l, np.int64), wa=cat(wa_l, float),
                wb=cat(wb_l, float), yx=cat(yx_l, np.int64), nt=nt)


def _segment_elements(tr: dict, geom: SinogramGeometry, grid: ImageGrid, segment: int, num_lors: int):
    """Elements ``(row, q, yx, weight)`` and axial kernel ``zw`` of one segment from a 2-D tracing: the 3-D start
    / stop voxels clip the ends, and each 2-D crossing is split at the z plane boundaries (exact 3-D Siddon)."""
    direct, n_ax, zc, p0, zw, norm = _segment_constants(geom, grid, segment, num_lors)
    vz = grid.voxel_size[0]
    ray, wa, wb, yx = tr["ray"], tr["wa"], tr["wb"], tr["yx"]
    T = tr["T"]
    rows_ray = tr["V"] * tr["nt"] + T
    if direct:
        return rows_ray[ray], np.full(ray.size, p0, dtype=np.int64), yx, (wb - wa) * norm, zw
    tan_t = np.asarray(geom.tantheta(segment, geom.s()), dtype=np.float64)
    tau = tan_t[T]
    A = tr["A"]
    zs = zc - A * tau / vz
    rz = tau / vz
    L = 2 * A
    par = np.abs(rz * L) <= 1e-4
    rr = np.where(par, 1.0, rz)
    sg = np.where(rr >= 0, 1.0, -1.0)
    ze = zs + rz * L
    W0 = np.where(par, tr["W0"], np.maximum(tr["W0"], (_stir_round(zs) - sg * 0.5 - zs) / rr))
    W1 = np.where(par, tr["W1"], np.minimum(tr["W1"], (_stir_round(ze) + sg * 0.5 - zs) / rr))
    wa = np.maximum(wa, W0[ray])
    wb = np.minimum(wb, W1[ray])
    keep = wb - wa > 1e-7
    ray, wa, wb, yx = ray[keep], wa[keep], wb[keep], yx[keep]
    zs_e, rz_e = zs[ray], rz[ray]
    za = zs_e + rz_e * wa
    zb = zs_e + rz_e * wb
    pa_z = np.floor(za + 0.5)
    pb_z = np.floor(zb + 0.5)
    nb = np.abs(pb_z - pa_z).astype(np.int64)
    nb[par[ray]] = 0
    scale = np.sqrt(1.0 + tau ** 2) * norm
    rows_e = rows_ray[ray]
    # elements inside one plane (the vast majority)
    one = nb == 0
    R = [rows_e[one]]
    Q = [pa_z[one].astype(np.int64)]
    YX = [yx[one]]
    W = [(wb[one] - wa[one]) * scale[ray[one]]]
    # elements crossing plane boundaries: split at the crossings (ordered along the travel direction)
    idx = np.nonzero(~one)[0]
    if idx.size:
        K = int(nb[idx].max())
        zsi, rzi, wai, wbi = zs_e[idx], rz_e[idx], wa[idx], wb[idx]
        step = np.where(rzi > 0, 1.0, -1.0)
        j = np.arange(1, K + 1)[None, :]
        bnd = pa_z[idx][:, None] + step[:, None] * (j - 0.5)  # boundaries in travel order
        wbnd = (bnd - zsi[:, None]) / rzi[:, None]
        wbnd = np.where(j <= nb[idx][:, None], wbnd, wbi[:, None])
        np.clip(wbnd, wai[:, None], wbi[:, None], out=wbnd)
        pts = np.concatenate([wai[:, None], wbnd, wbi[:, None]], axis=1)
        seglen = pts[:, 1:] - pts[:, :-1]
        ei, ci = np.nonzero(seglen > 1e-7)
        pa, pb = pts[ei, ci], pts[ei, ci + 1]
        ge = idx[ei]
        mid = 0.5 * (pa + pb)
        R.append(rows_e[ge])
        Q.append(np.floor(zs_e[ge] + rz_e[ge] * mid + 0.5).astype(np.int64))
        YX.append(yx[ge])
        W.append((pb - pa) * scale[ray[ge]])
    return np.concatenate(R), np.concatenate(Q), np.concatenate(YX), np.concatenate(W), zw


def _build_matrices(geom: SinogramGeometry, grid: ImageGrid, segments: Sequence[int], num_lors: int = 3,
                    views: np.ndarray | None = None, keep_planes: dict | None = None, dtype=np.float32,
                    views_per_chunk: int = 12) -> dict:
    """``{segment: (csr, qmin, nq, zw)}`` for several segments, tracing the transaxial part once per view chunk.

    Rows are ``local_view * num_tangential + tang``, columns ``(q - qmin) * ny * nx + y * nx + x`` with ``q``
    the image plane of the traced ray for axial position 0 (axial position ``a`` uses ``q + a * k``).
    ``keep_planes[segment]``: list of ``(lo, hi)`` ranges of ``q`` to keep.
    """
    nz, ny, nx = grid.shape
    nyx = ny * nx
    nt = geom.num_tangential
    fovrad = _fov_radius(grid)
    all_views = np.arange(geom.num_views) if views is None else np.asarray(views, dtype=np.int64)
    keep_planes = keep_planes or {}
    # q ranges: from keep_planes, else a bound from the geometry (|z| travel over the FOV + kernel)
    lo_hi = {}
    for sgn in segments:
        kp = keep_planes.get(sgn)
        if kp:
            lo_hi[sgn] = (min(a for a, _ in kp), max(b for _, b in kp))
        else:
            _, n_ax, zc, _, zw0, _ = _segment_constants(geom, grid, sgn, num_lors)
            tmax = float(np.max(np.abs(np.asarray(geom.tantheta(sgn, geom.s()), dtype=float))))
            span = int(math.ceil(2 * fovrad * tmax / grid.voxel_size[0])) + 3
            lo_hi[sgn] = (int(math.floor(zc)) - span - 2, int(math.ceil(zc)) + span + 2)
    blocks: dict = {sgn: [] for sgn in segments}
    used: dict = {sgn: [None, None] for sgn in segments}
    zws: dict = {}
    for v0 in range(0, all_views.size, views_per_chunk):
        vchunk = all_views[v0:v0 + views_per_chunk]
        tr = _trace_2d(geom, grid, vchunk, num_lors, fovrad)
        for sgn in segments:
            row, q, yx, w, zw = _segment_elements(tr, geom, grid, sgn, num_lors)
            zws[sgn] = zw
            lo, hi = lo_hi[sgn]
            kp = keep_planes.get(sgn) or [(lo, hi)]
            keep = np.zeros(q.size, dtype=bool)
            for a, b in kp:
                keep |= (q >= a) & (q <= b)
            row, q, yx, w = row[keep], q[keep], yx[keep], w[keep]
            if q.size:
                u = used[sgn]
                u[0] = int(q.min()) if u[0] is None else min(u[0], int(q.min()))
                u[1] = int(q.max()) if u[1] is None else max(u[1], int(q.max()))
            m = sp.csr_matrix((w, (row, (q - lo) * nyx + yx)), shape=(len(vchunk) * nt, (hi - lo + 1) * nyx))
            m.sum_duplicates()
            blocks[sgn].append(m.astype(dtype))
    out = {}
    for sgn in segments:
        lo, hi = lo_hi[sgn]
        qmin, qmax = used[sgn]
        if qmin is None:
            qmin, qmax = lo, lo
        nq = qmax - qmin + 1
        m = sp.vstack(blocks[sgn], format="csr")
        indices = m.indices.astype(np.int64) - (qmin - lo) * nyx
        m = sp.csr_matrix((m.data, indices, m.indptr), shape=(m.shape[0], nq * nyx))
        out[sgn] = (m, qmin, nq, zws.get(sgn, np.ones(1)))
    return out


def build_segment_matrix(geom: SinogramGeometry, grid: ImageGrid, segment: int, num_lors: int = 3,
                         dtype=np.float32, keep_planes: Sequence[tuple[int, int]] | None = None,
                         views: np.ndarray | None = None) -> tuple[sp.csr_matrix, int, int, np.ndarray]:
    """Sparse matrix of one segment for axial position 0: ``(csr, qmin, nq, zw)`` (see :func:`_build_matrices`;
    ``zw`` is the axial kernel: a bin's value is ``sum_e w_e sum_j zw[j] x[q_e + j + a k, yx_e]``)."""
    res = _build_matrices(geom, grid, [segment], num_lors, views,
                          {segment: list(keep_planes)} if keep_planes else None, dtype)
    return res[segment]


# ---------------------------------------------------------------------- cache
_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _geom_key(geom: SinogramGeometry, grid: ImageGrid, num_lors: int) -> tuple:
    sc = geom.scanner
    return (sc.num_rings, sc.detectors_per_ring, round(sc.effective_radius_mm, 5), round(sc.ring_spacing_mm, 6),
            round(sc.view_offset_deg, 6), geom.num_views, geom.num_tangential,
            tuple((s.min_ring_diff, s.max_ring_diff, s.num_axial) for s in geom.segments),
            grid.shape, tuple(round(v, 6) for v in grid.voxel_size), tuple(round(o, 5) for o in grid.origin),
            num_lors)


class Projector(LinearOperator):
    """Geometric PET projector ``A`` (no factors) matching STIR's ray-tracing matrix.

    Parameters
    ----------
    geometry : SinogramGeometry
    grid : ImageGrid
    device : str or torch.device, optional
        Resolved with :func:`sirf_ddip.utils.device.resolve_device` (CUDA when available).
    dtype : torch.dtype
        float32 (default) or float64.
    num_tangential_lors : int
        STIR's "number of rays in tangential direction to trace for each bin" (3 in the reference data).
    use_mirror : bool
        Reuse segment ``+d`` for ``-d`` (exact up to rounding ties); False builds every segment.
    cache : bool
        Share matrices between projectors of the same geometry/grid in this process.
    cpu_threads : int or None
        On CPU, torch's thread count during a projection (restored afterwards). 1 (default) is fastest on a
        shared, oversubscribed machine (torch's small multi-threaded kernels stall there); None leaves it alone.
    max_operand_bytes : int
        Memory bound for the unfolded image operand of one sparse product; larger segments are processed in
        chunks of axial positions.

    Notes
    -----
    ``forward(x)`` maps ``x[z, y, x]`` to ``y[sinogram, view, tang]`` (STIR/SIRF memory order);
    ``adjoint`` is its exact transpose.  Arrays may be numpy or torch; the output is a torch tensor on
    ``device`` (use :meth:`forward_numpy` / :meth:`adjoint_numpy` for numpy in/out).
    """

    def __init__(self, geometry: SinogramGeometry, grid: ImageGrid, device=None, dtype: torch.dtype = torch.float32,
                 num_tangential_lors: int = 3, use_mirror: bool = True, cache: bool = True,
                 cpu_threads: int | None = 1, max_operand_bytes: int = 256 * 2 ** 20):
        self.geometry = geometry
        self.grid = grid
        self.device = resolve_device(device)
        self.dtype = dtype
        self.num_tangential_lors = int(num_tangential_lors)
        if self.num_tangential_lors < 1:
            raise ValueError("num_tangential_lors must be >= 1")
        self.use_mirror = bool(use_mirror)
        self.cpu_threads = cpu_threads
        self.max_operand_bytes = int(max_operand_bytes)
        self._check_grid()
        key = _geom_key(geometry, grid, self.num_tangential_lors) + (self.use_mirror,)
        self._key = key
        self._cpu_mats: dict[int, _SegMatrix] | None = None
        self._dev_ops: dict = {}
        self._use_cache = cache
        self.setup_seconds = 0.0

    # ------------------------------------------------------------------ checks
    def _check_grid(self):
        vz = self.grid.voxel_size[0]
        for sg in self.geometry.segments:
            r = sg.axial_sampling_mm / vz
            if abs(r - round(r)) > 1e-4 or round(r) < 1:
                raise GeometryMismatchError(
                    f"image z voxel size {vz:.5g} mm must divide the axial sampling {sg.axial_sampling_mm:.5g} mm of "
                    f"segment {sg.number} (as STIR's ray-tracing matrix requires)")
        zo = self.grid.origin[0] / vz
        if abs(zo - round(zo)) > 1e-3:
            raise GeometryMismatchError(f"image z origin {self.grid.origin[0]:.5g} mm must be a multiple of the plane "
                                        f"spacing {vz:.5g} mm (STIR requirement)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    in_shape = image_shape  # LinearOperator
    out_shape = data_shape  # LinearOperator

    # ------------------------------------------------------------------ building
    def _zc_tube(self, sg) -> float:
        nz = self.grid.shape[0]
        vz = self.grid.voxel_size[0]
        return (sg.m_mm[0] - self.grid.origin[0]) / vz + (nz - 1) / 2.0

    def _build_cpu(self, views: np.ndarray | None = None) -> dict[int, _SegMatrix]:
        """Segment matrices for all views (``views=None``) or only for ``views`` (rows in that order)."""
        if views is None and self._cpu_mats is not None:
            return self._cpu_mats
        import time
        t0 = time.perf_counter()
        ckey = self._key + ((None,) if views is None else (tuple(int(v) for v in views),))
        with _CACHE_LOCK:
            hit = _CACHE.get(ckey) if self._use_cache else None
        if hit is not None:
            if views is None:
                self._cpu_mats = hit
            return hit
        geom, grid = self.geometry, self.grid
        vz = grid.voxel_size[0]
        nz = grid.shape[0]
        numbers = [s.number for s in geom.segments]
        plan = {}  # segment -> (k, mirror shift or None)
        for sg in geom.segments:
            k = int(round(sg.axial_sampling_mm / vz))
            partner = -sg.number if (-sg.number in numbers and sg.number != 0) else None
            mirror_ok = False
            if self.use_mirror and partner is not None:
                other = geom.segment(partner)
                two_zc = 2 * self._zc_tube(sg)
                mirror_ok = (other.num_axial == sg.num_axial and other.min_ring_diff == -sg.max_ring_diff
                             and abs(two_zc - round(two_zc)) < 1e-6)
            if mirror_ok and sg.number < 0:
                continue  # handled by its positive partner
            mirror = None
            if mirror_ok:
                P = int(round(2 * self._zc_tube(sg))) + (sg.num_axial - 1) * k
                mirror = nz - 1 - P
            plan[sg.number] = (k, mirror)
        keep = {}
        for num, (k, mirror) in plan.items():
            sg = geom.segment(num)
            J = 8 + int(math.ceil(sg.axial_sampling_mm / vz))
            kp = [(-J - (sg.num_axial - 1) * k, nz - 1)]
            if mirror is not None:
                kp.append((-J - (sg.num_axial - 1) * k - mirror, nz - 1 - mirror))
            keep[num] = kp
        built = _build_matrices(geom, grid, list(plan), self.num_tangential_lors, views, keep,
                                np.float64 if self.dtype == torch.float64 else np.float32)
        mats: dict[int, _SegMatrix] = {}
        for num, (k, mirror) in plan.items():
            mat, qmin, nq, zw = built[num]
            mats[num] = _SegMatrix(num, mat, qmin, nq, k, geom.segment(num).num_axial, zw, mirror)
        self.setup_seconds = time.perf_counter() - t0
        if self._use_cache:
            with _CACHE_LOCK:
                _CACHE[ckey] = mats
        if views is None:
            self._cpu_mats = mats
        return mats

    def _views_for(self, subset, num_subsets) -> np.ndarray | None:
        if subset is None and num_subsets is None:
            return None
        if subset is None or num_subsets is None:
            raise ValueError("give both subset and num_subsets (or neither)")
        if int(num_subsets) == 1:
            return None
        return self.geometry.subset_views(int(num_subsets), int(subset), grid=self.grid)

    def _ops(self, subset=None, num_subsets=None):
        """Device operators for a view subset: list of (SegMatrix, A, AT)."""
        views = self._views_for(subset, num_subsets)
        key = None if views is None else (int(num_subsets), int(subset))
        if key in self._dev_ops:
            return self._dev_ops[key], views
        nt = self.geometry.num_tangential
        if views is None or self._cpu_mats is not None:
            mats = self._build_cpu()
            sel = views
        else:  # trace only the subset's views
            mats = self._build_cpu(views)
            sel = None
        ops = []
        for num, sm in mats.items():
            m = sm.mat
            if sel is not None:
                rows = (sel[:, None] * nt + np.arange(nt)[None, :]).ravel()
                m = m[rows]
            A = _to_torch_csr(m, self.device, self.dtype)
            AT = _to_torch_csr(m.T.tocsr(), self.device, self.dtype)
            ops.append((sm, A, AT))
        self._dev_ops[key] = ops
        return ops, views

    def set_up(self) -> float:
        """Build (or fetch from cache) the matrices; returns the build time in seconds."""
        import time
        t0 = time.perf_counter()
        self._ops()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ apply
    def _as_tensor(self, a, shape, what) -> torch.Tensor:
        t = torch.as_tensor(a)
        if tuple(t.shape) != tuple(shape):
            raise GeometryMismatchError(f"{what} shape {tuple(t.shape)} does not match expected {tuple(shape)}")
        return t.to(device=self.device, dtype=self.dtype)

    def forward(self, x, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A x`` for the views of ``subset`` (all views if None): ``[n_sino, n_views_in_subset, n_tang]``."""
        with _threads(self.device, self.cpu_threads):
            return self._forward(x, subset, num_subsets)

    def _a_chunk(self, sm: _SegMatrix) -> int:
        """Axial positions per chunk so that the unfolded operand stays under ``max_operand_bytes``."""
        ny, nx = self.grid.shape[1:]
        per = sm.nq * ny * nx * torch.finfo(self.dtype).bits // 8 * (2 if sm.mirror_shift is not None else 1)
        return max(1, min(sm.num_axial, int(self.max_operand_bytes // max(per, 1))))

    def _forward(self, x, subset, num_subsets) -> torch.Tensor:
        ops, views = self._ops(subset, num_subsets)
        X = self._as_tensor(x, self.grid.shape, "image")
        nz, ny, nx = self.grid.shape
        nyx = ny * nx
        Xf = X.reshape(nz, nyx)
        Xflip = torch.flip(Xf, dims=(0,))
        geom = self.geometry
        nvs = geom.num_views if views is None else len(views)
        nt = geom.num_tangential
        out = torch.zeros((geom.num_sinograms, nvs, nt), device=self.device, dtype=self.dtype)
        for sm, A, _ in ops:
            J = len(sm.zw) - 1
            na = sm.num_axial
            Xt = _zfilter(Xf, sm.zw)
            Xtf = _zfilter(Xflip, sm.zw) if sm.mirror_shift is not None else None
            pos0 = geom.segment_offset(sm.number)
            neg0 = geom.segment_offset(-sm.number) if sm.mirror_shift is not None else None
            step = self._a_chunk(sm)
            for a0 in range(0, na, step):
                a1 = min(na, a0 + step)
                nc = a1 - a0
                cols = [_unfold(Xt, sm.qmin + J + a0 * sm.k, sm.nq, sm.k, nc)]
                if Xtf is not None:
                    cols.append(_unfold(Xtf, sm.qmin + sm.mirror_shift + J + a0 * sm.k, sm.nq, sm.k, nc))
                D = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
                Y = torch.sparse.mm(A, D)  # (nvs*nt, nc or 2 nc)
                out[pos0 + a0:pos0 + a1] = Y[:, :nc].T.reshape(nc, nvs, nt)
                if Xtf is not None:  # mirrored segment: axial positions reversed
                    out[neg0 + na - a1:neg0 + na - a0] = Y[:, nc:].T.reshape(nc, nvs, nt).flip(0)
        return out

        apply = forward

    def adjoint(self, y, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A^T y`` (back projection) for data of the views of ``subset``; returns ``[z, y, x]``."""
        with _threads(self.device, self.cpu_threads):
            return self._adjoint(y, subset, num_subsets)

    def _adjoint(self, y, subset, num_subsets) -> torch.Tensor:
        ops, views = self._ops(subset, num_subsets)
        geom = self.geometry
        nvs = geom.num_views if views is None else len(views)
        nt = geom.num_tangential
        Y = self._as_tensor(y, (geom.num_sinograms, nvs, nt), "projection data")
        nz, ny, nx = self.grid.shape
        nyx = ny * nx
        acc = torch.zeros((nz, nyx), device=self.device, dtype=self.dtype)
        accf = torch.zeros((nz, nyx), device=self.device, dtype=self.dtype)
        for sm, _, AT in ops:
            na = sm.num_axial
            J = len(sm.zw) - 1
            mirror = sm.mirror_shift is not None
            pos0 = geom.segment_offset(sm.number)
            neg0 = geom.segment_offset(-sm.number) if mirror else None
            acc_t = torch.zeros((nz + J, nyx), device=self.device, dtype=self.dtype)
            accf_t = torch.zeros((nz + J, nyx), device=self.device, dtype=self.dtype) if mirror else None
            step = self._a_chunk(sm)
            for a0 in range(0, na, step):
                a1 = min(na, a0 + step)
                nc = a1 - a0
                cols = [Y[pos0 + a0:pos0 + a1].reshape(nc, nvs * nt).T]
                if mirror:
                    cols.append(Y[neg0 + na - a1:neg0 + na - a0].flip(0).reshape(nc, nvs * nt).T)
                Ycat = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0].contiguous()
                G = torch.sparse.mm(AT, Ycat)  # (nq*nyx, nc or 2 nc)
                _fold_add(acc_t, G[:, :nc], sm.qmin + J + a0 * sm.k, sm.nq, sm.k, nc)
                if mirror:
                    _fold_add(accf_t, G[:, nc:], sm.qmin + sm.mirror_shift + J + a0 * sm.k, sm.nq, sm.k, nc)
            _zfilter_adjoint_add(acc, acc_t, sm.zw)
            if mirror:
                _zfilter_adjoint_add(accf, accf_t, sm.zw)
        acc += torch.flip(accf, dims=(0,))
        return acc.reshape(nz, ny, nx)

    backward = adjoint

    def forward_numpy(self, x, subset=None, num_subsets=None) -> np.ndarray:
        return self.forward(x, subset, num_subsets).cpu().numpy()

    def adjoint_numpy(self, y, subset=None, num_subsets=None) -> np.ndarray:
        return self.adjoint(y, subset, num_subsets).cpu().numpy()

    # ------------------------------------------------------------------ checks / norms
    def adjointness_test(self, num_trials: int = 3, seed: int = 0, subset=None, num_subsets=None) -> float:
        """Max over trials of ``|<Ax, y> - <x, A^T y>| / max(|<Ax, y>|, tiny)`` for random non-negative x, y."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        worst = 0.0
        views = self._views_for(subset, num_subsets)
        nvs = self.geometry.num_views if views is None else len(views)
        for _ in range(num_trials):
            x = torch.rand(self.grid.shape, generator=g, dtype=torch.float64).to(self.dtype)
            y = torch.rand((self.geometry.num_sinograms, nvs, self.geometry.num_tangential), generator=g,
                           dtype=torch.float64).to(self.dtype)
            ax = self.forward(x, subset, num_subsets)
            aty = self.adjoint(y, subset, num_subsets)
            lhs = float(torch.sum(ax.double() * y.to(ax.device).double()))
            rhs = float(torch.sum(x.to(aty.device).double() * aty.double()))
            worst = max(worst, abs(lhs - rhs) / max(abs(lhs), 1e-30))
        return worst

    def norm(self, num_iter: int = 10, seed: int = 0) -> float:
        """Operator 2-norm ``||A||`` by power iteration on ``A^T A``."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.rand(self.grid.shape, generator=g, dtype=torch.float64).to(device=self.device, dtype=self.dtype)
        x /= torch.linalg.vector_norm(x)
        lam = 0.0
        for _ in range(max(1, int(num_iter))):
            z = self.adjoint(self.forward(x))
            lam = float(torch.linalg.vector_norm(z))
            if lam == 0:
                return 0.0
            x = z / lam
        return math.sqrt(lam)

    def nnz(self) -> int:
        return int(sum(sm.mat.nnz for sm in self._build_cpu().values()))


class _threads:
    """Temporarily set torch's CPU thread count (no-op on CUDA or when ``n`` is None)."""

    def __init__(self, device: torch.device, n: int | None):
        self.n = n if (n is not None and device.type == "cpu") else None
        self.old = None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            if self.old != self.n:
                torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.n is not None and self.old is not None and self.old != self.n:
            torch.set_num_threads(self.old)
        return False


def _to_torch_csr(m: sp.csr_matrix, device, dtype) -> torch.Tensor:
    idx_dtype = np.int32 if max(m.nnz, m.shape[1]) < 2 ** 31 - 1 else np.int64
    crow = torch.from_numpy(np.ascontiguousarray(m.indptr.astype(idx_dtype)))
    col = torch.from_numpy(np.ascontiguousarray(m.indices.astype(idx_dtype)))
    val = torch.from_numpy(np.ascontiguousarray(m.data)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR is beta" / invariant-check notices
        return torch.sparse_csr_tensor(crow, col, val, size=m.shape, check_invariants=False).to(device)


def _unfold(Xf: torch.Tensor, qmin: int, nq: int, k: int, na: int) -> torch.Tensor:
    """``D[(q, yx), a] = X[qmin + q + a k, yx]`` (zero outside the image) as a dense (nq*nyx, na) tensor."""
    nz, nyx = Xf.shape
    lo = qmin
    hi = qmin + nq - 1 + (na - 1) * k
    pl = max(0, -lo)
    pu = max(0, hi - (nz - 1))
    if pl or pu:
        Xp = torch.zeros((nz + pl + pu, nyx), device=Xf.device, dtype=Xf.dtype)
        Xp[pl:pl + nz] = Xf
    else:
        Xp = Xf.contiguous()
    view = Xp.as_strided((nq, nyx, na), (nyx, 1, k * nyx), (lo + pl) * nyx)
    return view.reshape(nq * nyx, na)


def _zfilter(Xf: torch.Tensor, zw: np.ndarray) -> torch.Tensor:
    """``Xt[i] = sum_j zw[j] X[i - J + j]`` for ``i = 0 .. nz + J - 1`` (plane ``i - J``), zero outside."""
    J = len(zw) - 1
    if J == 0 and zw[0] == 1.0:
        return Xf
    nz, nyx = Xf.shape
    Xp = torch.zeros((nz + 2 * J, nyx), device=Xf.device, dtype=Xf.dtype)
    Xp[J:J + nz] = Xf
    out = torch.zeros((nz + J, nyx), device=Xf.device, dtype=Xf.dtype)
    for j, w in enumerate(zw):
        if w != 0:
            out.add_(Xp[j:j + nz + J], alpha=float(w))
    return out


def _zfilter_adjoint_add(acc: torch.Tensor, acc_t: torch.Tensor, zw: np.ndarray) -> None:
    """Adjoint of :func:`_zfilter`: ``acc[p] += sum_j zw[j] acc_t[p - j + J]``."""
    J = len(zw) - 1
    nz = acc.shape[0]
    for j, w in enumerate(zw):
        if w != 0:
            acc.add_(acc_t[J - j:J - j + nz], alpha=float(w))


def _fold_add(acc: torch.Tensor, G: torch.Tensor, qmin: int, nq: int, k: int, na: int) -> None:
    """Adjoint of :func:`_unfold`: ``acc[qmin + q + a k] += G[(q, yx), a]`` (dropping planes outside)."""
    nz, nyx = acc.shape
    G3 = G.reshape(nq, nyx, na).permute(2, 0, 1).contiguous()  # (na, nq, nyx): contiguous slabs
    for a in range(na):
        lo = qmin + a * k
        q0 = max(0, -lo)
        q1 = min(nq, nz - lo)
        if q1 > q0:
            acc[lo + q0:lo + q1] += G3[a, q0:q1]
