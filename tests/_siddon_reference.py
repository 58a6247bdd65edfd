"""Reference 3-D Siddon ray tracer of STIR's ``ProjMatrixByBinUsingRayTracing`` (tests only).

A direct, vectorised 3-D Siddon (every ray traced against x, y and z planes at once), independent of
:mod:`sirf_ddip.physics.raytrace` (which traces the transaxial part once per view and splits it at z planes in
compiled code); ``test_projector.py`` checks that both give the same matrix.  Conventions: see
``sirf_ddip/physics/raytrace.py`` and UCL/STIR ``src/recon_buildblock/ProjMatrixByBinUsingRayTracing.cxx``.
"""

from __future__ import annotations

import math

import numpy as np

from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.physics.raytrace import fov_radius, stir_round

RAYS_PER_CHUNK = 6000


def trace_segment_reference(geom: SinogramGeometry, grid: ImageGrid, segment: int, views: np.ndarray,
                   num_lors: int, restrict_fov: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray, np.ndarray]:
    """Ray-trace one segment for axial position 0 and the given views: a direct 3-D Siddon, written
    independently of the package's tracer (2-D once, then split at z planes) to test it.

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
    fovrad = fov_radius(grid)
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
        p0 = int(stir_round(np.asarray([zfirst]))[0])
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
    for c0 in range(0, nrays, RAYS_PER_CHUNK):
        sl = slice(c0, min(nrays, c0 + RAYS_PER_CHUNK))
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
            w_in = (stir_round(c_s) - sg * 0.5 - c_s) / rr
            w_outv = (stir_round(c_e) + sg * 0.5 - c_s) / rr
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
        ix = stir_round(xs[ri] + rx[ri] * wm)
        iy = stir_round(ys[ri] + ry[ri] * wm)
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
            q = stir_round(zs[ri] + rz[ri] * wm)
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
