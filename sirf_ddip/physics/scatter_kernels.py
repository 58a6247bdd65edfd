"""Compiled (numba) line integrals of the single scatter simulation: every scatter point to every detector.

:func:`point_detector_integrals_cpu` is the CPU path of :func:`sirf_ddip.physics.scatter.point_detector_integrals`
(the torch tracer :func:`~sirf_ddip.physics.scatter.ray_integrals` stays the CUDA path). Both trace the same
Siddon rays with the same rules (STIR's ``RayTraceVoxelsOnCartesianGrid``, as documented in
:mod:`sirf_ddip.physics.scatter`): voxel index coordinates ``p = (x - centre) / v + (n - 1) / 2``; with
``full_start_voxel`` the trace starts where the ray enters the voxel holding the start point; the ray is clipped
to the image box; each piece between consecutive plane crossings adds ``value(voxel of its midpoint) x its
length (mm)``. The torch version sorts all crossings of a ray at once; this kernel walks them in order (one
voxel step at a time, as Siddon/Jacobs), so the work per ray is the number of voxels it crosses and no
intermediate arrays are made. Results agree to float64 rounding (tested).

Rays are independent: the (point, detector) pairs run in parallel threads (numba ``prange``); compiled on first
use and cached on disk (numba ``cache=True``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["point_detector_integrals_cpu"]

_FLAT = 1e-12
_BIG = 1e30


@njit(cache=True, nogil=True)
def _trace(img, vz, vy, vx, p0z, p0y, p0x, p1z, p1y, p1x, full_start_voxel):  # pragma: no cover - compiled
    nz, ny, nx = img.shape
    p0 = (p0z, p0y, p0x)
    d = (p1z - p0z, p1y - p0y, p1x - p0x)
    n = (nz, ny, nx)
    lo = 0.0
    hi = 1.0
    if full_start_voxel:
        lo = -_BIG
        for ax in range(3):
            if abs(d[ax]) >= _FLAT:
                c = math.floor(p0[ax] + 0.5)
                back = (c - 0.5 - p0[ax]) / d[ax] if d[ax] > 0 else (c + 0.5 - p0[ax]) / d[ax]
                if back > lo:
                    lo = back
    for ax in range(3):
        if abs(d[ax]) < _FLAT:
            if not (p0[ax] >= -0.5 and p0[ax] <= n[ax] - 0.5):
                return 0.0
        else:
            a0 = (-0.5 - p0[ax]) / d[ax]
            a1 = (n[ax] - 0.5 - p0[ax]) / d[ax]
            amin = min(a0, a1)
            amax = max(a0, a1)
            if amin > lo:
                lo = amin
            if amax < hi:
                hi = amax
    if not hi > lo:
        return 0.0
    length = math.sqrt((d[0] * vz) ** 2 + (d[1] * vy) ** 2 + (d[2] * vx) ** 2)
    if length == 0.0:
        return 0.0
    # next crossing per axis after alpha = lo (planes at k - 0.5)
    q = np.empty(3)
    na = np.empty(3)
    step = np.empty(3)
    for ax in range(3):
        if abs(d[ax]) < _FLAT:
            na[ax] = _BIG
            step[ax] = 0.0
            q[ax] = 0.0
        else:
            x = p0[ax] + lo * d[ax]
            if d[ax] > 0:
                q[ax] = math.floor(x + 0.5) + 0.5
                step[ax] = 1.0
            else:
                q[ax] = math.ceil(x - 0.5) - 0.5
                step[ax] = -1.0
            na[ax] = (q[ax] - p0[ax]) / d[ax]
            while na[ax] <= lo:              # rounding at the entry plane
                q[ax] += step[ax]
                na[ax] = (q[ax] - p0[ax]) / d[ax]
    a = lo
    acc = 0.0
    while a < hi:
        a_next = min(na[0], min(na[1], min(na[2], hi)))
        if a_next > a:
            mid = 0.5 * (a + a_next)
            iz = int(math.floor(p0[0] + mid * d[0] + 0.5))
            iy = int(math.floor(p0[1] + mid * d[1] + 0.5))
            ix = int(math.floor(p0[2] + mid * d[2] + 0.5))
            if 0 <= iz < nz and 0 <= iy < ny and 0 <= ix < nx:
                acc += img[iz, iy, ix] * (a_next - a)
            a = a_next
        for ax in range(3):
            if na[ax] <= a:
                q[ax] += step[ax]
                na[ax] = (q[ax] - p0[ax]) / d[ax]
    return acc * length


@njit(cache=True, nogil=True, parallel=True)
def _point_detector_kernel(img, vs, shape_half, points, detectors, centre, full_start_voxel,
                           out):  # pragma: no cover - compiled
    ns = points.shape[0]
    nd = detectors.shape[0]
    vz, vy, vx = vs[0], vs[1], vs[2]
    for r in prange(ns * nd):
        i = r // nd
        j = r - i * nd
        p0z = (points[i, 0] - centre[0]) / vz + shape_half[0]
        p0y = (points[i, 1] - centre[1]) / vy + shape_half[1]
        p0x = (points[i, 2] - centre[2]) / vx + shape_half[2]
        p1z = (detectors[j, 0] - centre[0]) / vz + shape_half[0]
        p1y = (detectors[j, 1] - centre[1]) / vy + shape_half[1]
        p1x = (detectors[j, 2] - centre[2]) / vx + shape_half[2]
        out[i, j] = _trace(img, vz, vy, vx, p0z, p0y, p0x, p1z, p1y, p1x, full_start_voxel)


def point_detector_integrals_cpu(image: np.ndarray, voxel_size, points_mm: np.ndarray, detectors_mm: np.ndarray,
                                 centre_mm=(0.0, 0.0, 0.0), full_start_voxel: bool = True) -> np.ndarray:
    """Line integrals (mm x value) of ``image`` (nz, ny, nx) from every point (n_points, 3) to every detector
    (n_det, 3), positions (z, y, x) mm in the scanner frame, the image's index centre at ``centre_mm``.

    Returns float64 ``(n_points, n_det)``.
    """
    img = np.ascontiguousarray(image, dtype=np.float64)
    vs = np.asarray(voxel_size, dtype=np.float64)
    half = (np.asarray(img.shape, dtype=np.float64) - 1.0) / 2.0
    pts = np.ascontiguousarray(points_mm, dtype=np.float64).reshape(-1, 3)
    det = np.ascontiguousarray(detectors_mm, dtype=np.float64).reshape(-1, 3)
    out = np.zeros((pts.shape[0], det.shape[0]), dtype=np.float64)
    if out.size:
        _point_detector_kernel(img, vs, half, pts, det, np.asarray(centre_mm, dtype=np.float64),
                               bool(full_start_voxel), out)
    return out


@njit(cache=True, nogil=True)
def _kn_total(e):  # pragma: no cover - compiled
    a = e / 511.0
    lg = math.log(1.0 + 2.0 * a)
    return 0.75 * 6.65e-25 * ((1.0 + a) / (a * a) * (2.0 * (1.0 + a) / (1.0 + 2.0 * a) - lg / a)
                              + lg / (2.0 * a) - (1.0 + 3.0 * a) / (1.0 + 2.0 * a) ** 2)


@njit(cache=True, nogil=True, parallel=True)
def _single_scatter_bins(act, att, r2, sp, mu_s, det, dA, dB, lower, upper, resolution, reference, cos_thr,
                         sig511, eps511, re2, volume, out):  # pragma: no cover - compiled
    ns = sp.shape[0]
    for k in prange(dA.shape[0]):
        a = dA[k]
        b = dB[k]
        Az, Ay, Ax = det[a, 0], det[a, 1], det[a, 2]
        Bz, By, Bx = det[b, 0], det[b, 1], det[b, 2]
        na = math.sqrt(Ay * Ay + Ax * Ax)            # |to_centre|: the detector's transaxial position, negated
        nb = math.sqrt(By * By + Bx * Bx)
        tot = 0.0
        for s in range(ns):
            Sz, Sy, Sx = sp[s, 0], sp[s, 1], sp[s, 2]
            uz, uy, ux = Az - Sz, Ay - Sy, Ax - Sx  # A - S
            vz, vy, vx = Bz - Sz, By - Sy, Bx - Sx  # B - S
            nu = math.sqrt(uz * uz + uy * uy + ux * ux)
            nv = math.sqrt(vz * vz + vy * vy + vx * vx)
            cos_t = -(uz * vz + uy * vy + ux * vx) / (nu * nv)
            if not cos_t >= cos_thr:
                continue
            e_new = 511.0 / (2.0 - cos_t)
            s2 = math.sqrt(2.0 * e_new * reference) * resolution / 2.35482
            eff = 0.5 * (math.erf((upper - e_new) / s2) - math.erf((lower - e_new) / s2))
            if not eff > 0:
                continue
            rel = _kn_total(e_new) / sig511 - 1.0
            eA = att[s, a]
            eB = att[s, b]
            ratio = (act[s, a] * eB ** rel / r2[s, b] + act[s, b] * eA ** rel / r2[s, a]) * eA * eB * mu_s[s] * eff
            # cos of (S - A) with -(0, Ay, Ax), and of (S - B) with -(0, By, Bx)
            cA = (uy * Ay + ux * Ax) / (nu * na)
            cB = (vy * By + vx * Bx) / (nv * nb)
            P = 1.0 / (2.0 - cos_t)
            kn = (re2 / 2.0) * P * (1.0 - P * (1.0 - cos_t * cos_t) + P * P)
            tot += ratio * cA * cB * kn
        dz, dy, dx = Bz - Az, By - Ay, Bx - Ax
        rab = math.sqrt(dz * dz + dy * dy + dx * dx)
        cbA = -(dy * Ay + dx * Ax) / (rab * na)      # cos(B - A, -(0, Ay, Ax))
        cbB = (dy * By + dx * Bx) / (rab * nb)       # cos(A - B, -(0, By, Bx))
        eta = eps511 * cbA * cbB * 2.0 * math.pi / (0.75 * rab * rab)
        out[k] = tot * volume / sig511 / eta


def single_scatter_bins_cpu(activity_integrals: np.ndarray, mu_integrals: np.ndarray, activity_voxel_x_mm: float,
                            positions: np.ndarray, mu_s: np.ndarray, volume_mm3: float, detectors: np.ndarray,
                            dA: np.ndarray, dB: np.ndarray, lower_kev: float, upper_kev: float, resolution: float,
                            reference_kev: float, cos_thr: float, sig511: float, eps511: float,
                            electron_radius_cm: float) -> np.ndarray:
    """The per-bin sums of :func:`sirf_ddip.physics.scatter.single_scatter_from_integrals` (same formulas, one bin
    per thread, no (points x bins) temporaries). Returns float64 ``(len(dA),)``."""
    sp = np.ascontiguousarray(positions, dtype=np.float64)
    det = np.ascontiguousarray(detectors, dtype=np.float64)
    r2 = ((det[None, :, :] - sp[:, None, :]) ** 2).sum(-1)
    act = np.minimum(1.0 / r2, math.pi / 2) * np.asarray(activity_integrals, dtype=np.float64) / activity_voxel_x_mm
    att = np.exp(-0.1 * np.asarray(mu_integrals, dtype=np.float64))
    out = np.zeros(len(dA), dtype=np.float64)
    _single_scatter_bins(np.ascontiguousarray(act), np.ascontiguousarray(att), np.ascontiguousarray(r2), sp,
                         np.ascontiguousarray(mu_s, dtype=np.float64), det, np.ascontiguousarray(dA, dtype=np.int64),
                         np.ascontiguousarray(dB, dtype=np.int64), float(lower_kev), float(upper_kev),
                         float(resolution), float(reference_kev), float(cos_thr), float(sig511), float(eps511),
                         float(electron_radius_cm) ** 2, float(volume_mm3), out)
    return out
