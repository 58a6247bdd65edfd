"""Up-sampling of a scatter simulation to the data and its tail fit, as STIR's ``upsample_and_fit_scatter_estimate``
and ``CreateTailMaskFromACFs``.

What STIR does (UCL/STIR ``src/scatter_buildblock/upsample_and_fit_scatter_estimate.cxx``,
``src/buildblock/interpolate_projdata.cxx``, ``extend_projdata.cxx``, ``scale_sinograms.cxx``,
``src/scatter_buildblock/CreateTailMaskFromACFs.cxx``), reproduced from its rules:

1. :func:`interpolate_direct_sinograms` — the down-sampled direct sinograms are first de-interleaved (twice the
   views: even ``view + tang`` bins copied, odd ones the mean of their 4 neighbours, the outermost tangential
   positions 0), extended by 5 bins in every direction (axial and tangential: the edge value; views: wrapped round
   with the tangential position mirrored, the data covering 180°), and sampled by linear interpolation at the
   data's ``(m, phi, s)``, each a linear map of the indices (``index_in = index_out * step + offset`` from the
   first bin's coordinate and the samplings at the central bin).
2. :func:`~sirf_ddip.physics.ssrb.inverse_ssrb` to every sinogram of the data, then multiplied by the
   normalisation efficiencies (STIR's ``scatter_normalisation.undo``; attenuation is not applied).
3. :func:`scale_factors_per_sinogram` — per sinogram ``sum(mask data) / sum(mask scatter)`` (1 with a warning
   where the masked scatter is below 0.1 % of the sinogram's mean bin, or the sinogram's scatter is 0), clipped to
   ``[min, max]`` and smoothed along the axial positions of each segment by a running mean over
   ``2 half_filter_width + 1`` sinograms (edge values repeated): :func:`smooth_scale_factors`.
4. The up-sampled estimate times its sinogram's factor.

:func:`tail_mask_from_acfs`: per view row, the bins left of the first ACF ``>= threshold`` and right of the last,
each run shortened by ``safety_margin`` bins.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..data import ProjData
from ..errors import ConfigError, GeometryMismatchError, NoTailBinsError
from ..geometry.sinogram import SinogramGeometry
from .ssrb import inverse_ssrb

__all__ = ["STIR_ACF_THRESHOLD", "STIR_SAFETY_MARGIN", "EXTENSION_BINS", "tail_mask_from_acfs",
           "remove_interleaving", "extend_segment", "interpolate_direct_sinograms", "scale_factors_per_sinogram",
           "smooth_scale_factors", "ScatterFit", "upsample_and_fit_scatter"]

#: CreateTailMaskFromACFs defaults (also STIR's ``tail_fitting.par`` for the mMR)
STIR_ACF_THRESHOLD = 1.1
STIR_SAFETY_MARGIN = 4
#: bins by which STIR extends the down-sampled segment before interpolating
EXTENSION_BINS = 5


def tail_mask_from_acfs(acfs: np.ndarray, acf_threshold: float = STIR_ACF_THRESHOLD,
                        safety_margin: int = STIR_SAFETY_MARGIN) -> np.ndarray:
    """STIR's ``CreateTailMaskFromACFs``: 1 in the tails (outside the object), 0 elsewhere.

    Parameters
    ----------
    acfs : (..., n_tangential) attenuation correction factors ``exp(+∫μ)`` (or anything ``>= threshold`` inside the
        object, e.g. STIR's ``1 + projected mask``).
    acf_threshold : bins with ACF ``>= threshold`` are the object; must be > 1.
    safety_margin : bins removed from each tail run next to the object.

    Returns
    -------
    float32 array of ``acfs``' shape. In a row without any ACF above the threshold STIR keeps
    ``n - safety_margin`` bins on the left and none on the right; that is kept.

    Raises
    ------
    ConfigError : ``acf_threshold <= 1`` (STIR: "ACF-threshold should be larger than 1") or a negative margin.
    """
    if not acf_threshold > 1:
        raise ConfigError(f"tail mask: ACF-threshold must be larger than 1, got {acf_threshold}")
    if safety_margin < 0:
        raise ConfigError(f"tail mask: safety-margin must be >= 0, got {safety_margin}")
    a = np.asarray(acfs)
    n = a.shape[-1]
    ge = a >= acf_threshold
    anyg = ge.any(-1)
    first = np.where(anyg, np.argmax(ge, axis=-1), n)
    left = np.maximum(first - int(safety_margin), 0)
    rev = ge[..., ::-1]
    j = np.arange(n)
    allowed = rev & (j < (n - left)[..., None])
    anyr = allowed.any(-1)
    first_r = np.where(anyr, np.argmax(allowed, axis=-1), n - left)
    right = np.maximum(first_r - int(safety_margin), 0)
    mask = (j < left[..., None]) | (j >= (n - right)[..., None])
    return mask.astype(np.float32)


def _elem(sino: np.ndarray, tmin: int, view: int, t: int) -> float:
    """STIR's ``sino_element``: wrap-around in views (the tangential position flips past the last view), 0 outside."""
    nv, nt = sino.shape
    tt = -t if view >= nv else t
    if tt < tmin or tt > tmin + nt - 1:
        return 0.0
    return float(sino[view % nv, tt - tmin])


def remove_interleaving(segment: np.ndarray, tmin: int) -> np.ndarray:
    """STIR's ``make_non_interleaved_segment``: (n_axial, n_views, n_tang) -> (n_axial, 2 n_views, n_tang)."""
    seg = np.asarray(segment, dtype=np.float64)
    na, nv, nt = seg.shape
    out = np.zeros((na, 2 * nv, nt))
    V, T = np.meshgrid(np.arange(2 * nv), np.arange(tmin + 1, tmin + nt - 1), indexing="ij")

    def take(view, t):
        view = np.asarray(view)
        t = np.asarray(t)
        tt = np.where(view >= nv, -t, t)
        ok = (tt >= tmin) & (tt <= tmin + nt - 1)
        vals = seg[:, view % nv, np.clip(tt - tmin, 0, nt - 1)]
        return np.where(ok[None], vals, 0.0)

    even = (V + T) % 2 == 0
    in_view = np.where(V % 2 == 0, V // 2, (V + 1) // 2)
    direct = take(in_view, T)
    avg = (take(V // 2, T) + take(V // 2 + 1, T) + take((V + 1) // 2, T - 1) + take((V + 1) // 2, T + 1)) / 4
    out[:, :, 1:nt - 1] = np.where(even[None], direct, avg)
    return out


def extend_segment(segment: np.ndarray, tmin: int, ext: int = EXTENSION_BINS) -> tuple[np.ndarray, int]:
    """STIR's ``extend_segment`` for a direct segment covering 180°: ``ext`` bins more on every side.

    Returns ``(extended, tmin_extended)``; index ``(a, v, t)`` of the input is ``(a + ext, v + ext, t)`` with the
    tangential offset ``tmin_extended = tmin - ext``. Axial and tangential extensions repeat the edge; views wrap
    round with the tangential position mirrored, then the tangential extension overwrites the new edges (STIR's
    order, kept so that even sizes come out the same).
    """
    seg = np.asarray(segment, dtype=np.float64)
    na, nv, nt = seg.shape
    out = np.zeros((na + 2 * ext, nv + 2 * ext, nt + 2 * ext))
    out[ext:ext + na, ext:ext + nv, ext:ext + nt] = seg
    out[:ext] = out[ext]
    out[ext + na:] = out[ext + na - 1]
    # tangential index t (STIR) -> column t - tmin_e
    tmin_e, tmax_e = tmin - ext, tmin + nt - 1 + ext
    sym = min(abs(tmin_e), tmax_e)
    col = lambda t: t - tmin_e  # noqa: E731
    ts = np.arange(-sym, sym + 1)
    # view index v (STIR) -> row v + ext ; min_dim = -ext, max_dim = nv - 1 + ext
    for e in range(ext):
        lo_row, hi_row = e, nv + ext + e                           # views -ext + e and nv + e
        src_lo, src_hi = nv - ext + e + ext, e + ext               # views nv - ext + e and e
        out[:, lo_row, col(ts)] = out[:, src_lo, col(-ts)]
        out[:, hi_row, col(ts)] = out[:, src_hi, col(-ts)]
        for t in range(tmin_e, -sym):
            out[:, lo_row, col(t)] = out[:, src_lo, col(sym)]
            out[:, hi_row, col(t)] = out[:, src_hi, col(sym)]
        for t in range(tmax_e, sym, -1):
            out[:, lo_row, col(t)] = out[:, src_lo, col(-sym)]
            out[:, hi_row, col(t)] = out[:, src_hi, col(-sym)]
    out[:, :, :ext] = out[:, :, ext:ext + 1]
    out[:, :, ext + nt:] = out[:, :, ext + nt - 1:ext + nt]
    return out, tmin_e


def _linear_weights(x: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear B-spline sampling at positions ``x`` of coefficients indexed ``lo..hi`` (mirrored beyond):
    returns ``(k0, w0, k1, w1)`` as array offsets from ``lo``."""
    k0 = np.ceil(x - 1.0).astype(np.int64)
    k1 = k0 + 1
    w0 = np.clip(1.0 - np.abs(x - k0), 0.0, None)
    w1 = np.clip(1.0 - np.abs(x - k1), 0.0, None)

    def mirror(k):
        k = np.where(k < lo, 2 * lo - k, k)
        return np.where(k > hi, 2 * hi - k, k)
    return mirror(k0) - lo, w0, mirror(k1) - lo, w1


def interpolate_direct_sinograms(direct: np.ndarray, geometry_in: SinogramGeometry, geometry_out: SinogramGeometry,
                                 remove_interleaving_first: bool = True) -> np.ndarray:
    """STIR's ``interpolate_projdata`` (linear B-splines): segment 0 of ``geometry_in`` to segment 0 of
    ``geometry_out`` (same ring radius within 1 mm).

    Parameters
    ----------
    direct : (n_axial_in, n_views_in, n_tang_in) the input's segment-0 sinograms.
    remove_interleaving_first : STIR's ``remove interleaving before upsampling`` (default 1).

    Returns
    -------
    (n_axial_out, n_views_out, n_tang_out) float32 for ``geometry_out``'s segment 0.
    """
    si, so = geometry_in.scanner, geometry_out.scanner
    if abs(si.inner_ring_radius_mm - so.inner_ring_radius_mm) > 1:
        raise GeometryMismatchError("interpolate_projdata needs both projection data on scanners with the same ring "
                                    f"radius ({si.inner_ring_radius_mm} vs {so.inner_ring_radius_mm} mm)")
    seg = np.asarray(direct, dtype=np.float64)
    tmin = geometry_in.min_tangential_pos
    if remove_interleaving_first:
        seg = remove_interleaving(seg, tmin)
    ext, tmin_e = extend_segment(seg, tmin)
    E = EXTENSION_BINS
    m_in, m_out = geometry_in.m(0), geometry_out.m(0)
    samp_m_in = geometry_in.segment(0).axial_sampling_mm
    samp_m_out = geometry_out.segment(0).axial_sampling_mm
    phi_in, phi_out = geometry_in.phi(), geometry_out.phi()
    dphi_in = (phi_in[1] - phi_in[0]) if len(phi_in) > 1 else math.pi
    dphi_in /= 2 if remove_interleaving_first else 1
    dphi_out = (phi_out[1] - phi_out[0]) if len(phi_out) > 1 else math.pi
    t0_in = -geometry_in.min_tangential_pos
    t0_out = -geometry_out.min_tangential_pos
    s_in, s_out = geometry_in.s(), geometry_out.s()
    ds_in, ds_out = geometry_in.sampling_in_s()[t0_in], geometry_out.sampling_in_s()[t0_out]
    ax = np.arange(geometry_out.segment(0).num_axial) * (samp_m_out / samp_m_in) + (m_out[0] - m_in[0]) / samp_m_in
    vw = np.arange(geometry_out.num_views) * (dphi_out / dphi_in) + (phi_out[0] - phi_in[0]) / dphi_in
    tg = geometry_out.tangential_positions() * (ds_out / ds_in) + (s_out[t0_out] - s_in[t0_in]) / ds_in
    na, nv, nt = ext.shape
    a0, aw0, a1, aw1 = _linear_weights(ax, -E, na - 1 - E)
    v0, vw0, v1, vw1 = _linear_weights(vw, -E, nv - 1 - E)
    k0, kw0, k1, kw1 = _linear_weights(tg, tmin_e, tmin_e + nt - 1)
    out = np.zeros((len(ax), len(vw), len(tg)))
    for ai, aw in ((a0, aw0), (a1, aw1)):
        plane = ext[ai]                                            # (n_ax_out, nv, nt)
        for vi, vww in ((v0, vw0), (v1, vw1)):
            rows = plane[:, vi]                                    # (n_ax_out, n_v_out, nt)
            for ki, kw in ((k0, kw0), (k1, kw1)):
                out += aw[:, None, None] * vww[None, :, None] * kw[None, None, :] * rows[:, :, ki]
    return out.astype(np.float32)


def scale_factors_per_sinogram(data: np.ndarray, scatter: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """STIR's ``get_scale_factors_per_sinogram``: ``sum(w data) / sum(w scatter)`` per sinogram (axis 0).

    Where the sinogram's scatter sums to 0, or its masked sum is at most 0.1 % of the sinogram's mean bin, the
    factor is 1 (STIR's default) and a warning names the sinograms.
    """
    d = np.asarray(data, dtype=np.float64)
    s = np.asarray(scatter, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    axes = tuple(range(1, d.ndim))
    num = (d * w).sum(axes)
    den = (s * w).sum(axes)
    tot = s.sum(axes)
    nbins = int(np.prod(d.shape[1:]))
    small = (tot != 0) & (den <= tot / nbins * 0.001)
    f = np.where((tot == 0) | small, 1.0, num / np.where(den != 0, den, 1.0))
    if small.any():
        idx = np.flatnonzero(small)
        warnings.warn(f"scatter tail fit: {len(idx)} sinogram(s) (first {idx[:5].tolist()}) have almost no scatter in "
                      "the tail mask; their scale factor is 1 (as STIR)", stacklevel=2)
    return f


def smooth_scale_factors(factors: np.ndarray, geometry: SinogramGeometry, min_scale_factor: float,
                         max_scale_factor: float, half_filter_width: int = 3) -> np.ndarray:
    """Clip to ``[min, max]`` then a running mean over ``2 h + 1`` axial positions within each segment (edge
    values repeated: STIR's ``ArrayFilter1DUsingConvolution`` with constant boundary conditions)."""
    f = np.clip(np.asarray(factors, dtype=np.float64), min_scale_factor, max_scale_factor)
    h = int(half_filter_width)
    if h <= 0:
        return f
    out = f.copy()
    for k in geometry.segment_sequence:
        sl = geometry.segment_slice(k)
        seg = np.pad(f[sl], h, mode="edge")
        out[sl] = np.convolve(seg, np.full(2 * h + 1, 1.0 / (2 * h + 1)), mode="valid")
    return out


@dataclass
class ScatterFit:
    """Result of :func:`upsample_and_fit_scatter`.

    Attributes
    ----------
    scatter : the scaled scatter on the data's geometry (counts, normalisation applied).
    upsampled : the unscaled up-sampled estimate times the efficiencies (the denominator of the fit).
    scale_factors : the factor applied to each sinogram (after clipping and smoothing).
    raw_scale_factors : the fitted factors before clipping and smoothing (``None`` when fixed).
    mask : the tail mask used.
    """

    scatter: ProjData
    upsampled: np.ndarray
    scale_factors: np.ndarray
    raw_scale_factors: np.ndarray | None
    mask: np.ndarray


def upsample_and_fit_scatter(scatter: ProjData, data_to_fit: ProjData, mask: np.ndarray,
                             efficiencies: np.ndarray | None = None, min_scale_factor: float = 0.05,
                             max_scale_factor: float = 100.0, half_filter_width: int = 3,
                             remove_interleaving_first: bool = True) -> ScatterFit:
    """STIR's ``upsample_and_fit_scatter_estimate`` (linear B-splines).

    Parameters
    ----------
    scatter : the down-sampled (unscaled) single scatter estimate; its segment 0 is used.
    data_to_fit : the data the scatter is fitted to (prompts minus randoms), on the target geometry.
    mask : tail mask (weights) of ``data_to_fit``'s shape (:func:`tail_mask_from_acfs`).
    efficiencies : multiplicative normalisation factors on the target geometry (None: 1). STIR multiplies the
        up-sampled estimate by them before the fit (its ``BinNormalisation::undo``); no attenuation.
    min_scale_factor, max_scale_factor : clip of the factors (STIR's class defaults 0.05 and 100; its mMR parameter
        files use 0.1 and 0.4). Equal values fix every factor (no fit).
    half_filter_width : axial running mean over ``2 h + 1`` sinograms.

    Raises
    ------
    NoTailBinsError : the mask has no bin at all (nothing to fit).
    GeometryMismatchError : shapes that do not match.
    """
    geo = data_to_fit.geometry
    d = np.asarray(data_to_fit.array)
    w = np.asarray(mask)
    if w.shape != d.shape:
        raise GeometryMismatchError(f"tail mask shape {w.shape} does not match the data {d.shape}")
    direct_out = SinogramGeometry(geo.scanner, num_views=geo.num_views, num_tangential=geo.num_tangential,
                                  segments=[geo._segment_table[len(geo._segment_table) // 2]])
    sg = scatter.geometry
    direct_in = np.asarray(scatter.array)[sg.segment_slice(0)]
    interp = interpolate_direct_sinograms(direct_in, sg, direct_out, remove_interleaving_first)
    up = inverse_ssrb(interp, direct_out, geo)
    if efficiencies is not None:
        e = np.asarray(efficiencies, dtype=np.float32)
        if e.shape != d.shape:
            raise GeometryMismatchError(f"efficiencies shape {e.shape} does not match the data {d.shape}")
        up = up * e
    raw = None
    if min_scale_factor == max_scale_factor:
        f = np.full(geo.num_sinograms, float(min_scale_factor))
    else:
        if not (w != 0).any():
            raise NoTailBinsError("scatter tail fit: the tail mask has no bins (the object fills the field of view, "
                                  "or the ACF threshold / safety margin are too strict)")
        raw = scale_factors_per_sinogram(d, up, w)
        f = smooth_scale_factors(raw, geo, min_scale_factor, max_scale_factor, half_filter_width)
    out = (up * f[:, None, None].astype(np.float32)).astype(np.float32)
    return ScatterFit(ProjData(out, geo, {}), up, f, raw, w)
