"""Single-slice rebinning (SSRB) and its inverse, as STIR's ``SSRB`` and ``inverse_SSRB``.

What STIR does (UCL/STIR ``src/buildblock/SSRB.cxx``, ``inverse_SSRB.cxx``), reproduced from its rules:

- :func:`ssrb_geometry` — all segments combined into one: ring differences from the first segment's minimum to
  the last one's maximum, axial sampling ``ring spacing / 2`` (``ring spacing`` if that range is one ring
  difference), as many axial positions as span the input's ``m`` range; views and tangential positions kept.
- :func:`ssrb` — each output sinogram is the sum of the input sinograms (one per segment) at the same axial
  coordinate ``m`` (|Δm| < 1e-4 mm); with ``normalise`` divided by their number (STIR's ``do_norm``).
- :func:`inverse_ssrb` — each sinogram of a 3D geometry is the direct sinogram at its ``m`` or, between two, their
  inverse-distance interpolation (STIR's rule, also used at the ends, where it is not an extrapolation).

Arrays are in memory order ``(n_sinograms, n_views, n_tangential)`` (see ``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

import numpy as np

from ..errors import GeometryError, GeometryMismatchError
from ..geometry.sinogram import SinogramGeometry

__all__ = ["ssrb_geometry", "ssrb", "inverse_ssrb", "inverse_ssrb_weights"]

_M_TOL = 1e-4


def ssrb_geometry(geometry: SinogramGeometry) -> SinogramGeometry:
    """STIR's ``SSRB(proj_data_info, num_segments, 1, false)``: one segment holding every ring difference.

    Raises
    ------
    GeometryError : TOF data (STIR's ScatterEstimation runs on non-TOF data), or an ``m`` range that is not a whole
        number of axial samples (STIR refuses it).
    """
    if geometry.is_tof:
        raise GeometryError("SSRB of TOF data is not supported here (sum the TOF bins first)")
    segs = geometry.segments
    a, b = segs[0].min_ring_diff, segs[-1].max_ring_diff
    samp = geometry.scanner.ring_spacing_mm / (2 if b > a else 1)
    lo = min(s.m_mm[0] for s in segs)
    hi = max(s.m_mm[-1] for s in segs)
    n = (hi - lo) / samp + 1
    if abs(round(n) - n) > 1e-3:
        raise GeometryError(f"SSRB: number of axial positions {n:g} is not an integer")
    g = SinogramGeometry(geometry.scanner, num_views=geometry.num_views, num_tangential=geometry.num_tangential,
                         segments=[(a, b, int(round(n)))], storage=geometry.storage)
    return g


def _m_table(geometry: SinogramGeometry) -> np.ndarray:
    return np.asarray(geometry.sinogram_table()["m_mm"], dtype=np.float64)


def ssrb(array: np.ndarray, geometry: SinogramGeometry, normalise: bool = False,
         out_geometry: SinogramGeometry | None = None) -> np.ndarray:
    """SSRB of ``array`` (memory order on ``geometry``) onto ``out_geometry`` (default :func:`ssrb_geometry`).

    Returns a float32 array ``out_geometry.shape``: the sum (``normalise``: mean) of the input sinograms at each
    output sinogram's ``m``.
    """
    out_geometry = ssrb_geometry(geometry) if out_geometry is None else out_geometry
    arr = np.asarray(array)
    if arr.shape != geometry.shape:
        raise GeometryMismatchError(f"SSRB: array shape {arr.shape} does not match its geometry {geometry.shape}")
    m_in, m_out = _m_table(geometry), _m_table(out_geometry)
    d = np.abs(m_in[:, None] - m_out[None, :])
    j = np.argmin(d, axis=1)
    ok = d[np.arange(len(m_in)), j] < _M_TOL
    out = np.zeros(out_geometry.shape, dtype=np.float64)
    np.add.at(out, j[ok], arr[ok].astype(np.float64))
    if normalise:
        count = np.bincount(j[ok], minlength=out_geometry.num_sinograms).astype(np.float64)
        out /= np.where(count > 0, count, 1.0)[:, None, None]
    return out.astype(np.float32)


def inverse_ssrb_weights(direct: SinogramGeometry, geometry: SinogramGeometry
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """STIR's ``inverse_SSRB`` as ``(i0, w0, i1, w1)``: sinogram ``k`` of ``geometry`` is
    ``w0[k] * direct[i0[k]] + w1[k] * direct[i1[k]]`` (the direct sinograms are ``direct``'s segment 0).

    Rule (per output ``m``): the first direct sinogram ``i`` no farther than its neighbours; itself if within
    1e-4 mm, else with the nearer neighbour ``j``, weights ``d_j / (d_i + d_j)`` on ``i`` and ``d_i / (d_i + d_j)``
    on ``j``.
    """
    m_in = np.asarray(direct.m(0), dtype=np.float64)
    m_out = _m_table(geometry)
    n = len(m_in)
    big = np.finfo(np.float64).max
    i0 = np.zeros(len(m_out), dtype=np.int64)
    i1 = np.zeros(len(m_out), dtype=np.int64)
    w0 = np.ones(len(m_out))
    w1 = np.zeros(len(m_out))
    for k, m in enumerate(m_out):
        d = np.abs(m - m_in)
        prev = np.concatenate([[big], d[:-1]])
        nxt = np.concatenate([d[1:], [big]])
        i = int(np.flatnonzero((d <= prev) & (d <= nxt))[0])
        i0[k] = i1[k] = i
        if d[i] <= _M_TOL:
            continue
        j = i - 1 if prev[i] < nxt[i] else i + 1
        dj = d[j] if 0 <= j < n else big
        s = d[i] + dj
        i1[k], w0[k], w1[k] = j, dj / s, d[i] / s
    return i0, w0, i1, w1


def inverse_ssrb(direct_array: np.ndarray, direct: SinogramGeometry, geometry: SinogramGeometry) -> np.ndarray:
    """STIR's ``inverse_SSRB``: the 3D sinograms of ``geometry`` from the direct (segment-0) sinograms.

    ``direct_array`` holds ``direct``'s segment 0 (its first ``direct.segment(0).num_axial`` sinograms in memory
    order). Returns a float32 array ``geometry.shape``.
    """
    n0 = direct.segment(0).num_axial
    arr = np.asarray(direct_array, dtype=np.float32)[:n0]
    if arr.shape[1:] != (geometry.num_views, geometry.num_tangential):
        raise GeometryMismatchError(f"inverse SSRB: direct sinograms {arr.shape[1:]} do not match "
                                    f"({geometry.num_views}, {geometry.num_tangential})")
    i0, w0, i1, w1 = inverse_ssrb_weights(direct, geometry)
    out = arr[i0] * w0[:, None, None].astype(np.float32) + arr[i1] * w1[:, None, None].astype(np.float32)
    return out.astype(np.float32)
