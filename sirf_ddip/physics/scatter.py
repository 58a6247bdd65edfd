"""Single scatter simulation (Watson's model) with STIR's conventions, vectorised in torch.

What STIR's ``ScatterSimulation`` / ``SingleScatterSimulation`` compute (UCL/STIR
``src/scatter_buildblock/ScatterSimulation.cxx``, ``SingleScatterSimulation.cxx``,
``scatter_detection_modelling.cxx``), reproduced here from the formulas, not the code:

For a detector pair (A, B) the normalised single scatter estimate is

    V_S / (sigma_KN(511) eta_AB) * sum_S [ I_A e_B^(sigma(E')/sigma(511) - 1) / r_SB^2
                                          + I_B e_A^(sigma(E')/sigma(511) - 1) / r_SA^2 ]
                                   * e_A e_B mu_S eps(E') cos(alpha_A) cos(alpha_B) dsigma_KN/dOmega(theta)

with ``I_A = min(pi/2, 1/r_SA^2) * int_S^A lambda`` (the activity path integral in units of the activity image's
x voxel size), ``e_A = exp(-int_S^A mu)`` (mu in cm^-1, lengths in cm), ``cos theta = -cos(A - S, B - S)``,
``E' = 511 / (2 - cos theta)``, ``eps`` the Gaussian energy-window efficiency whose FWHM scales with sqrt(E),
``alpha`` the angle between the leg and the detector's transaxial direction to the ring centre, and
``eta_AB = 2 pi cos(beta_A) cos(beta_B) / (0.75 r_AB^2)`` for the unscattered pair.  Pairs with ``cos theta`` below
STIR's ``max_cos_angle(lower, 2, resolution)`` give 0.

Line integrals are Siddon ray traces from the scatter point to the detector on the full images (voxel centres
at integer indices, images centred on the scanner), one tensor operation per chunk of (scatter point, detector)
rays.  Everything takes a ``device`` (CPU or CUDA), nothing is hard-coded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ELECTRON_RADIUS_CM", "klein_nishina_differential", "klein_nishina_total", "detection_efficiency",
           "max_cos_angle", "zoom_for_scatter_points", "ScatterPoints", "scatter_points_from_mu", "ray_integrals",
           "detector_positions", "detector_grid", "point_detector_integrals", "single_scatter",
           "single_scatter_from_integrals"]

#: classical electron radius (cm), STIR's value
ELECTRON_RADIUS_CM = 2.818e-13


def klein_nishina_differential(cos_theta, energy_kev: float = 511.0):
    """Klein-Nishina differential cross-section dsigma/dOmega (cm^2/sr) of a photon of ``energy_kev``."""
    P = 1.0 / (1.0 + (energy_kev / 511.0) * (1.0 - cos_theta))
    sin2 = 1.0 - cos_theta * cos_theta
    return (ELECTRON_RADIUS_CM ** 2 / 2.0) * P * (1.0 - P * sin2 + P * P)


def klein_nishina_total(energy_kev):
    """Klein-Nishina total cross-section (cm^2) of a photon of ``energy_kev`` (closed form, sigma_T = 6.65e-25)."""
    a = energy_kev / 511.0
    if isinstance(a, torch.Tensor):
        log = torch.log
    else:
        log = np.log
    lg = log(1.0 + 2.0 * a)
    sigma0 = 6.65e-25
    return 0.75 * sigma0 * ((1.0 + a) / (a * a) * (2.0 * (1.0 + a) / (1.0 + 2.0 * a) - lg / a)
                            + lg / (2.0 * a) - (1.0 + 3.0 * a) / (1.0 + 2.0 * a) ** 2)


def detection_efficiency(energy_kev, lower_kev: float, upper_kev: float, resolution: float,
                         reference_kev: float = 511.0):
    """Probability that a photon of ``energy_kev`` is detected in ``[lower, upper]`` (Gaussian response).

    The FWHM is ``resolution * sqrt(E * reference)`` (resolution given as a fraction at the reference energy).
    """
    if isinstance(energy_kev, torch.Tensor):
        erf, sqrt = torch.erf, torch.sqrt
    else:
        from scipy.special import erf
        sqrt = np.sqrt
    s2 = sqrt(2.0 * energy_kev * reference_kev) * resolution / 2.35482
    return 0.5 * (erf((upper_kev - energy_kev) / s2) - erf((lower_kev - energy_kev) / s2))


def max_cos_angle(lower_kev: float, approx: float, resolution: float) -> float:
    """STIR's cut-off: scatter with ``cos theta`` below this is ignored (``approx`` sigmas below ``lower``)."""
    q = (approx * resolution) ** 2
    ln2 = math.log(2.0)
    return 2.0 - (8176.0 * ln2) / (q * (511.0 + 16.0 * lower_kev * ln2 / q
                                        - math.sqrt(511.0) * math.sqrt(511.0 + 32.0 * lower_kev * ln2 / q)))


def _overlap_weights(n_in: int, v_in: float, n_out: int, v_out: float) -> np.ndarray:
    """(n_out, n_in) fraction of each output voxel covered by each input voxel (both centred on 0)."""
    ci = (np.arange(n_in) - (n_in - 1) / 2.0) * v_in
    co = (np.arange(n_out) - (n_out - 1) / 2.0) * v_out
    lo = np.maximum((ci - v_in / 2)[None, :], (co - v_out / 2)[:, None])
    hi = np.minimum((ci + v_in / 2)[None, :], (co + v_out / 2)[:, None])
    return np.clip(hi - lo, 0.0, None) / v_out


def zoom_for_scatter_points(mu: np.ndarray, voxel_size, shape_out, voxel_out) -> np.ndarray:
    """The down-sampled mu image STIR places scatter points in: each output voxel holds the mean of ``mu`` over
    its extent (STIR's ``zoom_image`` preserving values: overlap interpolation), both images centred.

    For the mMR scatter template STIR uses ``voxel_out = (62/7 vz, default bin size, default bin size)`` and
    ``shape_out = (num_rings, 17, 17)`` (``../shared/scatter/cylinder_mmr``); here both are given explicitly.
    """
    W = [_overlap_weights(n, v, m, w) for n, v, m, w in zip(np.shape(mu), voxel_size, shape_out, voxel_out)]
    return np.einsum("az,by,cx,zyx->abc", W[0], W[1], W[2], np.asarray(mu, dtype=np.float64))


@dataclass
class ScatterPoints:
    """Scatter points: positions (n, 3) as (z, y, x) mm from the scanner centre, their mu (cm^-1), voxel volume."""

    positions: np.ndarray
    mu: np.ndarray
    volume_mm3: float


def _centred_coords(shape, voxel_size):
    """Per axis (z, y, x), the mm coordinates of voxel centres of an image centred on the scanner."""
    return [(np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, voxel_size)]


def scatter_points_from_mu(mu_small: np.ndarray, voxel_size: tuple[float, float, float],
                           threshold: float = 0.01) -> ScatterPoints:
    """Every voxel of the (down-sampled) mu image with ``mu >= threshold`` is a scatter point at its centre.

    The image is centred on the scanner in all three directions (as STIR's scatter code does).
    """
    mu_small = np.asarray(mu_small, dtype=np.float64)
    cz, cy, cx = _centred_coords(mu_small.shape, voxel_size)
    idx = np.argwhere(mu_small >= threshold)
    pos = np.stack([cz[idx[:, 0]], cy[idx[:, 1]], cx[idx[:, 2]]], axis=1)
    return ScatterPoints(pos, mu_small[tuple(idx.T)], float(np.prod(voxel_size)))


def detector_positions(num_views: int, tangential: np.ndarray, num_detectors: int, radius_mm: float,
                       view_offset_rad: float = 0.0):
    """Crystal positions of a non-arc-corrected sinogram's (view, tangential) bins (STIR's detector pairs).

    Returns ``(xy, ia, ib)``: the transaxial positions (num_detectors, 2) as (y, x) mm of the crystals, and per
    (view, tangential) bin the crystals ``(c1, c2)`` of STIR's table
    (:func:`~sirf_ddip.geometry.detectors.crystals_for_view_tangential`).  Crystal ``c`` sits at the angle
    ``-pi/2 + 2 pi c / N + view offset``: the LOR of an even tangential position ``t`` of view ``phi`` then meets
    the ring at ``(s cos phi +- a sin phi, s sin phi -+ a cos phi)``, ``s = R sin(t pi / N)``; odd ``t`` bins
    join crystals half a crystal off the view's angle, as the real detector pairs do.
    """
    from ..geometry.detectors import crystals_for_view_tangential
    V, T = np.meshgrid(np.arange(num_views), np.asarray(tangential), indexing="ij")
    c1, c2 = crystals_for_view_tangential(V, T, num_detectors)
    psi = -math.pi / 2 + 2 * math.pi * np.arange(num_detectors) / num_detectors + view_offset_rad
    xy = np.stack([radius_mm * np.sin(psi), radius_mm * np.cos(psi)], axis=1)
    return xy, np.asarray(c1), np.asarray(c2)


def ray_integrals(images: torch.Tensor, voxel_size, start: torch.Tensor, stop: torch.Tensor,
                  chunk: int = 8192, full_start_voxel: bool = True) -> torch.Tensor:
    """Siddon line integrals (mm * value) of ``images`` (k, nz, ny, nx) from ``start`` to ``stop`` (n, 3) mm.

    Points are (z, y, x) mm from the scanner centre; images are centred on the scanner.  Returns (k, n).
    With ``full_start_voxel`` (STIR's ``RayTraceVoxelsOnCartesianGrid``) the trace starts where the ray enters
    the voxel holding ``start``, so that voxel gets its full chord.
    """
    k, nz, ny, nx = images.shape
    dev, dt = images.device, images.dtype
    shape = torch.tensor([nz, ny, nx], device=dev, dtype=dt)
    vs = torch.tensor(voxel_size, device=dev, dtype=dt)
    flat = images.reshape(k, -1)
    out = torch.empty(k, start.shape[0], device=dev, dtype=dt)
    planes = [torch.arange(n + 1, device=dev, dtype=dt) - 0.5 for n in (nz, ny, nx)]
    for c0 in range(0, start.shape[0], chunk):
        p0 = start[c0:c0 + chunk] / vs + (shape - 1) / 2   # voxel index coordinates
        p1 = stop[c0:c0 + chunk] / vs + (shape - 1) / 2
        d = p1 - p0
        lo, hi = torch.full_like(d[:, 0], 0.0), torch.full_like(d[:, 0], 1.0)
        if full_start_voxel:
            c = torch.floor(p0 + 0.5)
            sd = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
            back = torch.where(d > 0, (c - 0.5 - p0) / sd, (c + 0.5 - p0) / sd)
            back = torch.where(d.abs() < 1e-12, torch.full_like(back, -1e30), back)
            lo = back.max(dim=1).values
        alphas = []
        for ax in range(3):
            dd = d[:, ax:ax + 1]
            safe = torch.where(dd.abs() < 1e-12, torch.full_like(dd, 1e-12), dd)
            al = (planes[ax][None, :] - p0[:, ax:ax + 1]) / safe
            a_first, a_last = al[:, 0], al[:, -1]
            amin = torch.minimum(a_first, a_last)
            amax = torch.maximum(a_first, a_last)
            flat_ax = dd[:, 0].abs() < 1e-12
            inside = (p0[:, ax] >= -0.5) & (p0[:, ax] <= shape[ax] - 0.5)
            big = torch.full_like(amin, 1e30)
            amin = torch.where(flat_ax, torch.where(inside, -big, big), amin)
            amax = torch.where(flat_ax, torch.where(inside, big, -big), amax)
            lo, hi = torch.maximum(lo, amin), torch.minimum(hi, amax)
            alphas.append(torch.where(flat_ax[:, None], torch.zeros_like(al), al))
        al = torch.cat(alphas + [lo[:, None], hi[:, None]], dim=1)
        al = torch.minimum(torch.maximum(al, lo[:, None]), torch.maximum(hi, lo)[:, None])
        al, _ = torch.sort(al, dim=1)
        seg = al[:, 1:] - al[:, :-1]
        mid = 0.5 * (al[:, 1:] + al[:, :-1])
        pos = p0[:, None, :] + mid[:, :, None] * d[:, None, :]
        ii = torch.floor(pos + 0.5).long()
        ok = (seg > 0) & (ii >= 0).all(-1) & (ii[..., 0] < nz) & (ii[..., 1] < ny) & (ii[..., 2] < nx)
        lin = (ii[..., 0].clamp(0, nz - 1) * ny + ii[..., 1].clamp(0, ny - 1)) * nx + ii[..., 2].clamp(0, nx - 1)
        length = seg * torch.linalg.norm(d * vs, dim=1)[:, None] * ok
        vals = flat[:, lin.reshape(-1)].reshape(k, *lin.shape)
        out[:, c0:c0 + chunk] = (vals * length[None]).sum(-1)
    return out


def _cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(-1) / (torch.linalg.norm(u, dim=-1) * torch.linalg.norm(v, dim=-1))


def detector_grid(det_xy: np.ndarray, ring_z: np.ndarray) -> np.ndarray:
    """(nr * nd, 3) positions (z, y, x) mm of every detector, ring-major (index ``ring * nd + crystal``)."""
    nd, nr = len(det_xy), len(ring_z)
    return np.concatenate([np.repeat(np.asarray(ring_z, dtype=float), nd)[:, None],
                           np.tile(np.asarray(det_xy, dtype=float), (nr, 1))], axis=1)


def _use_numba(method: str, device: torch.device, caller: str) -> bool:
    """Whether ``method`` (``"auto"``, ``"numba"``, ``"torch"``) selects the compiled CPU kernel on ``device``."""
    if method not in ("auto", "numba", "torch"):
        raise ValueError(f"{caller}: method must be 'auto', 'numba' or 'torch', got {method!r}")
    return method == "numba" or (method == "auto" and device.type == "cpu")


def point_detector_integrals(image: np.ndarray, voxel_size, points: ScatterPoints, detectors: np.ndarray,
                             centre_mm=(0.0, 0.0, 0.0), device="cpu", dtype=torch.float64,
                             chunk: int = 8192, method: str = "auto") -> torch.Tensor:
    """Line integrals (mm * value) of ``image`` from every scatter point to every detector: (n_points, n_det).

    ``centre_mm`` is the image's index centre in the scanner frame (z, y, x); STIR caches exactly these (its
    ``cached_integral_over_activity`` / ``..._attenuation``), so the μ ones can be reused for a new activity.
    ``method``: ``"numba"`` (the compiled CPU kernel, :mod:`.scatter_kernels`), ``"torch"`` (:func:`ray_integrals`,
    any device) or ``"auto"`` (numba on a CPU device, torch elsewhere); they agree to float rounding.
    """
    dev = torch.device(device)
    if _use_numba(method, dev, "point_detector_integrals"):
        from .scatter_kernels import point_detector_integrals_cpu

        out = point_detector_integrals_cpu(image, voxel_size, points.positions, detectors, centre_mm)
        return torch.as_tensor(out, dtype=dtype, device=dev)
    det_t = torch.as_tensor(detectors, device=dev, dtype=dtype)
    sp = torch.as_tensor(points.positions, device=dev, dtype=dtype)
    ns, ndet = sp.shape[0], det_t.shape[0]
    c = torch.as_tensor(centre_mm, device=dev, dtype=dtype)
    start = sp[:, None, :].expand(ns, ndet, 3).reshape(-1, 3) - c
    stop = det_t[None, :, :].expand(ns, ndet, 3).reshape(-1, 3) - c
    img = torch.as_tensor(np.asarray(image)[None], device=dev, dtype=dtype)
    return ray_integrals(img, tuple(voxel_size), start, stop, chunk=chunk)[0].reshape(ns, ndet)


def single_scatter(activity: np.ndarray, mu: np.ndarray, voxel_size, points: ScatterPoints,
                   det_xy: np.ndarray, ring_z: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                   ring_pairs: np.ndarray, lower_kev: float, upper_kev: float, resolution: float,
                   reference_kev: float = 511.0, device="cpu", dtype=torch.float64,
                   chunk: int = 8192) -> torch.Tensor:
    """STIR's normalised single scatter estimate for each bin.

    Parameters
    ----------
    activity, mu : (nz, ny, nx) arrays on the same grid; mu in cm^-1. Centred on the scanner.
    voxel_size : (vz, vy, vx) mm of ``activity``/``mu``.
    points : scatter points.
    det_xy : (nd, 2) transaxial detector positions (y, x) mm; ``ring_z`` (nr,) mm from the centre.
    ia, ib : (nv, nt) detector indices per (view, tangential).
    ring_pairs : (na, 2) ring numbers (A, B) per axial position.

    Returns
    -------
    (nv, na, nt) tensor (STIR's file order within a segment).

    See :func:`single_scatter_from_integrals` for images on different grids or cached μ integrals.
    """
    dev = torch.device(device)
    det = detector_grid(det_xy, ring_z)
    det_t = torch.as_tensor(det, device=dev, dtype=dtype)
    sp = torch.as_tensor(points.positions, device=dev, dtype=dtype)
    ns, ndet = sp.shape[0], det_t.shape[0]
    start = sp[:, None, :].expand(ns, ndet, 3).reshape(-1, 3)
    stop = det_t[None, :, :].expand(ns, ndet, 3).reshape(-1, 3)
    img = torch.as_tensor(np.stack([activity, mu]), device=dev, dtype=dtype)
    integ = ray_integrals(img, voxel_size, start, stop, chunk=chunk).reshape(2, ns, ndet)
    return single_scatter_from_integrals(integ[0], integ[1], voxel_size[2], points, det, len(det_xy), ia, ib,
                                         ring_pairs, lower_kev, upper_kev, resolution, reference_kev)


def single_scatter_from_integrals(activity_integrals: torch.Tensor, mu_integrals: torch.Tensor,
                                  activity_voxel_x_mm: float, points: ScatterPoints, detectors: np.ndarray,
                                  num_detectors_per_ring: int, ia: np.ndarray, ib: np.ndarray,
                                  ring_pairs: np.ndarray, lower_kev: float, upper_kev: float, resolution: float,
                                  reference_kev: float = 511.0, method: str = "auto") -> torch.Tensor:
    """The estimate of :func:`single_scatter` from the point-to-detector integrals (:func:`point_detector_integrals`).

    ``activity_integrals`` (mm * activity) and ``mu_integrals`` (mm * cm^-1) are (n_points, n_det) on one device;
    ``detectors`` the (n_det, 3) positions of :func:`detector_grid`. Returns (nv, na, nt). ``method``: ``"numba"``
    (:func:`~sirf_ddip.physics.scatter_kernels.single_scatter_bins_cpu`, one bin per thread), ``"torch"`` (vectorised
    over points x bins, any device) or ``"auto"`` (numba on a CPU device).
    """
    dev, dtype = activity_integrals.device, activity_integrals.dtype
    numba = _use_numba(method, dev, "single_scatter_from_integrals")
    nd = int(num_detectors_per_ring)
    cos_thr = max_cos_angle(lower_kev, 2.0, resolution)
    sig511 = klein_nishina_total(511.0)
    eps511 = detection_efficiency(torch.tensor(511.0, dtype=dtype), lower_kev, upper_kev, resolution, reference_kev)
    nv, nt = ia.shape
    ring_pairs = np.asarray(ring_pairs)
    # detector index (ring * nd + crystal) for every bin: (nv, na, nt)
    dA = torch.as_tensor(ring_pairs[None, :, 0, None] * nd + ia[:, None, :], device=dev)
    dB = torch.as_tensor(ring_pairs[None, :, 1, None] * nd + ib[:, None, :], device=dev)
    dA, dB = dA.reshape(-1), dB.reshape(-1)
    if numba:
        from .scatter_kernels import single_scatter_bins_cpu

        res = single_scatter_bins_cpu(activity_integrals.cpu().numpy(), mu_integrals.cpu().numpy(),
                                      activity_voxel_x_mm, points.positions, points.mu, points.volume_mm3, detectors,
                                      dA.cpu().numpy(), dB.cpu().numpy(), lower_kev, upper_kev, resolution,
                                      reference_kev, cos_thr, sig511, float(eps511), ELECTRON_RADIUS_CM)
        return torch.as_tensor(res, dtype=dtype, device=dev).reshape(nv, len(ring_pairs), nt)
    det_t = torch.as_tensor(detectors, device=dev, dtype=dtype)
    sp = torch.as_tensor(points.positions, device=dev, dtype=dtype)
    ns = sp.shape[0]
    r2 = ((det_t[None, :, :] - sp[:, None, :]) ** 2).sum(-1)                      # (ns, ndet)
    act = torch.clamp(1.0 / r2, max=math.pi / 2) * activity_integrals / activity_voxel_x_mm   # I (voxel units)
    att = torch.exp(-0.1 * mu_integrals)                                          # e
    mu_s = torch.as_tensor(points.mu, device=dev, dtype=dtype)
    out = torch.zeros(dA.shape[0], device=dev, dtype=dtype)
    to_centre = det_t.clone()
    to_centre[:, 0] = 0
    to_centre = -to_centre
    step = max(1, (1 << 22) // max(ns, 1))
    for b0 in range(0, dA.shape[0], step):
        a, b = dA[b0:b0 + step], dB[b0:b0 + step]
        A, B = det_t[a][None], det_t[b][None]         # (1, nb, 3)
        S = sp[:, None, :]                            # (ns, 1, 3)
        cos_t = -_cos(A - S, B - S)                   # (ns, nb)
        e_new = 511.0 / (2.0 - cos_t)
        eff = detection_efficiency(e_new, lower_kev, upper_kev, resolution, reference_kev)
        rel = klein_nishina_total(e_new) / sig511 - 1.0
        eA, eB = att[:, a], att[:, b]
        IA, IB = act[:, a], act[:, b]
        ratio = (IA * eB.pow(rel) / r2[:, b] + IB * eA.pow(rel) / r2[:, a]) * eA * eB * mu_s[:, None] * eff
        cA = _cos(S - A, to_centre[a][None])
        cB = _cos(S - B, to_centre[b][None])
        val = ratio * cA * cB * klein_nishina_differential(cos_t)
        val = torch.where((cos_t >= cos_thr) & (eff > 0), val, torch.zeros_like(val))
        tot = val.sum(0)
        # efficiency of the pair for unscattered photons
        Ab, Bb = A[0], B[0]
        rab2 = ((Ab - Bb) ** 2).sum(-1)
        cbA = _cos(Bb - Ab, to_centre[a])
        cbB = _cos(Ab - Bb, to_centre[b])
        eta = eps511 * cbA * cbB * 2 * math.pi / (0.75 * rab2)
        out[b0:b0 + step] = tot * points.volume_mm3 / sig511 / eta
    return out.reshape(nv, len(ring_pairs), nt)
