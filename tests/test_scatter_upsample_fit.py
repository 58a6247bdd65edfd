"""Scatter estimation pieces (issue 31): down-sampled scanner, scatter-point grid, SSRB and its inverse, STIR's
up-sampling, the tail mask from ACFs and the per-sinogram scale fit — each against closed forms or STIR's data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import SHARED
from sirf_ddip.data import ProjData
from sirf_ddip.errors import ConfigError, NoTailBinsError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.physics import scatter_fit as sf
from sirf_ddip.physics.scatter_simulation import (downsample_scanner, scatter_point_grid, simulate_scatter,
                                                  zoom_preserving_values)
from sirf_ddip.physics.ssrb import inverse_ssrb, ssrb, ssrb_geometry

CYL = SHARED / "scatter" / "cylinder_mmr"


@pytest.fixture(scope="module")
def mmr():
    g3 = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60)
    g2 = ssrb_geometry(g3)
    return g3, g2, downsample_scanner(g2)


def test_downsampled_mmr_is_stirs(mmr):
    g3, g2, t = mmr
    # STIR: round(64 * 4.0625 / 20 + 0.5) = 14 rings over the same 260 mm, 64 detectors, 32 views,
    # ceil(344 * 64 / 504) + 1 = 45 bins, default bin size 335 pi / 64 (the 1.64443 cm of STIR's mMR template)
    assert (t.scanner.num_rings, t.scanner.detectors_per_ring, t.num_views, t.num_tangential) == (14, 64, 32, 45)
    assert t.scanner.ring_spacing_mm == pytest.approx(260.0 / 14)
    assert t.scanner.default_bin_size_mm == pytest.approx(16.4443, abs=1e-4)
    assert t.num_segments == 1 and t.num_sinograms == 14          # SSRB (one segment) input: ring difference 0
    assert downsample_scanner(g3).max_ring_diff == 13              # 3D input: all ring differences
    assert (g2.num_sinograms, g2.segments[0].min_ring_diff, g2.segments[0].max_ring_diff) == (127, -60, 60)


def test_scatter_point_grid_follows_stirs_zoom(mmr):
    _, _, t = mmr
    # the mMR mu-map grid (344 x 344 x 127, even xy): xy voxel = the bin size, int(344 * 2.08626 / 16.4443 + 1) = 44
    # made odd; z: 14 planes keeping the first and last plane centres, vz = 2.03125 * 126 / 13
    g = scatter_point_grid(ImageGrid((127, 344, 344), (2.03125, 2.08626, 2.08626)), t)
    assert g.shape == (14, 45, 45)
    assert g.voxel_size == pytest.approx((2.03125 * 126 / 13, 16.4443, 16.4443), abs=1e-4)
    assert g.coords(2)[22] == pytest.approx(0.0)                   # centred transaxially


def test_zoom_places_even_images_as_stir():
    # an even image's centre is half a voxel off the axis (STIR's index range -n/2 .. n/2 - 1): a linear function of
    # x averaged over each output voxel is its value at the output voxel's centre
    gin = ImageGrid((3, 16, 344), (2.0, 2.08626, 2.08626))
    gout = ImageGrid((3, 3, 45), (2.0, 16.4443, 16.4443))
    x = gin.coords(2)
    out = zoom_preserving_values(np.broadcast_to(x, gin.shape), gin, gout)
    inner = np.abs(gout.coords(2)) < 300
    assert np.abs(out[1, 1, inner] - gout.coords(2)[inner]).max() < 0.05   # achieved 0.013 (centred: 1.04 mm off)


@pytest.mark.slow
def test_simulate_scatter_on_a_template_matches_stir():
    if not (CYL / "scatter.s").exists():
        pytest.skip(f"STIR scatter reference not found at {CYL}")
    from sirf_ddip.io import read_image
    from sirf_ddip.io.template import read_template_geometry
    t = read_template_geometry(CYL / "scatter_template.hs")
    out = simulate_scatter(read_image(CYL / "activity.hv"), read_image(CYL / "mu.hv"), t, (430.0, 610.0))
    ref = np.fromfile(CYL / "scatter.s", dtype="<f4").reshape(32, 8, 35).transpose(1, 0, 2)
    assert out.meta["scatter_points"] == 444                        # STIR's log
    assert np.linalg.norm(out.array - ref) / np.linalg.norm(ref) < 5e-6   # achieved 1.2e-6
    assert out.meta["total"] == pytest.approx(3309.72, rel=1e-5)


def test_ssrb_sums_and_inverse_ssrb_interpolates_in_m(mmr):
    _, _, t = mmr
    g3 = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60, num_views=3, num_tangential=4)
    g2 = ssrb_geometry(g3)
    ones = np.ones(g3.shape, np.float32)
    n = ssrb(ones, g3, out_geometry=g2)[:, 0, 0]
    # segments with a sinogram at each m: 11 at the centre plane, 1 at each end (span 11, ring differences +-60)
    assert (n[0], n[63], n[126]) == (1.0, 11.0, 1.0) and n.sum() == g3.num_sinograms
    m3 = g3.sinogram_table()["m_mm"]
    f3 = np.broadcast_to((1 + m3 / 300.0)[:, None, None], g3.shape).astype(np.float32)
    assert np.allclose(ssrb(f3, g3, normalise=True, out_geometry=g2)[:, 0, 0], 1 + g2.m(0) / 300.0, atol=1e-6)
    assert np.abs(inverse_ssrb(ssrb(f3, g3, normalise=True, out_geometry=g2), g2, g3) - f3).max() < 1e-6
    # from the 14 down-sampled rings: linear in m inside their range; at the ends STIR's inverse-distance weights
    mi = t.m(0)
    d = np.broadcast_to((1 + mi / 300.0)[:, None, None], (14, 3, 4)).astype(np.float32)
    g_small = g2
    direct = SinogramGeometry(t.scanner, num_views=3, num_tangential=4, segments=[(0, 0, 14)])
    out = inverse_ssrb(d, direct, g_small)[:, 0, 0]
    m2 = g_small.m(0)
    inside = (m2 >= mi[0]) & (m2 <= mi[-1])
    assert np.abs(out[inside] - (1 + m2[inside] / 300.0)).max() < 1e-6
    d0, d1 = abs(m2[0] - mi[0]), abs(m2[0] - mi[1])
    assert out[0] == pytest.approx((d1 * (1 + mi[0] / 300) + d0 * (1 + mi[1] / 300)) / (d0 + d1), rel=1e-6)


def _sino(geo, fun, lor_angles: bool):
    """``fun(m, phi, s)`` on ``geo``'s segment 0; with ``lor_angles`` odd tangential bins at their LOR's angle (half a
    crystal before the view's), as the detector pairs are."""
    phi = geo.phi()[:, None] - (lor_angles * (geo.tangential_positions() % 2 == 1) * math.pi
                                / geo.scanner.detectors_per_ring)[None, :]
    return fun(geo.m(0)[:, None, None], phi[None], geo.s()[None, None, :]).astype(np.float32)


def test_upsampling_reproduces_a_smooth_sinogram(mmr):
    _, _, t = mmr
    g2 = ssrb_geometry(SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60, view_mashing=4))
    mi, mo = t.m(0), g2.m(0)
    inside = (mo >= mi[0]) & (mo <= mi[-1])
    inner = np.abs(g2.s()) <= t.s()[-2]
    # constant in phi and s: reproduced exactly (the de-interleaving averages equal values)
    flat = _sino(t, lambda m, p, s: (1 + m / 500) + 0 * p + 0 * s, True)
    out = sf.interpolate_direct_sinograms(flat, t, g2)
    assert np.abs(out[inside][:, :, inner] - (1 + mo[inside] / 500)[:, None, None]).max() < 1e-5
    # smooth in all three: linear interpolation of the 45-bin, 32-view, 14-ring sampling
    fun = lambda m, p, s: (1 + m / 500) * (1 + 0.3 * np.cos(2 * p)) * np.exp(-(s / 150.0) ** 2)  # noqa: E731
    out = sf.interpolate_direct_sinograms(_sino(t, fun, True), t, g2)
    ref = _sino(g2, fun, False)
    err = np.abs(out - ref)[inside][:, :, inner].max()
    assert err < 0.035                                             # achieved 0.0114 (max of ref 1.63)
    no_ri = sf.interpolate_direct_sinograms(_sino(t, fun, True), t, g2, remove_interleaving_first=False)
    assert np.abs(no_ri - ref)[inside][:, :, inner].max() > 2 * err  # the interleaved odd bins need de-interleaving


def test_tail_mask_of_a_cylinder_is_the_closed_form():
    g = SinogramGeometry("Siemens mMR", span=121, max_ring_diff=60, view_mashing=4)
    phi, s = g.phi(), g.s()
    R, cx, cy, mu = 120.0, 30.0, -20.0, 0.0096                      # mm, mm^-1
    d = s[None, :] - (cx * np.cos(phi) + cy * np.sin(phi))[:, None]
    chord = 2 * np.sqrt(np.clip(R * R - d * d, 0, None))
    acf = np.exp(mu * chord)[None]                                  # one sinogram (1, views, tang)
    for thr, margin in ((1.1, 4), (1.5, 0), (1.01, 10)):
        mask = sf.tail_mask_from_acfs(acf, thr, margin)[0]
        dthr = math.sqrt(R * R - (math.log(thr) / (2 * mu)) ** 2)    # ACF >= thr  <=>  |d| <= dthr
        left = np.maximum((d < -dthr).sum(1) - margin, 0)
        right = np.maximum((d > dthr).sum(1) - margin, 0)
        j = np.arange(g.num_tangential)
        expect = (j[None] < left[:, None]) | (j[None] >= g.num_tangential - right[:, None])
        assert np.array_equal(mask.astype(bool), expect)
    # STIR's rows without object: n - margin bins on the left, none on the right
    assert sf.tail_mask_from_acfs(np.ones((1, 1, 10)), 1.1, 4).tolist() == [[[1] * 6 + [0] * 4]]
    with pytest.raises(ConfigError, match="ACF-threshold"):
        sf.tail_mask_from_acfs(acf, 1.0, 4)


@pytest.fixture(scope="module")
def small_fit():
    g = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60, view_mashing=4)
    g = SinogramGeometry(g.scanner.with_rings(8), span=3, max_ring_diff=4, view_mashing=4)
    t = downsample_scanner(ssrb_geometry(g), 2)
    rng = np.random.default_rng(3)
    sss = ProjData((1 + rng.random(t.shape)).astype(np.float32), t)
    eff = (0.5 + rng.random(g.shape)).astype(np.float32)
    mask = np.zeros(g.shape, np.float32)
    mask[:, :, :40] = mask[:, :, -40:] = 1
    up = sf.upsample_and_fit_scatter(sss, ProjData(np.zeros(g.shape, np.float32), g), mask, eff, 1.0, 1.0).upsampled
    return g, sss, eff, mask, up


def test_scale_fit_recovers_a_known_scale(small_fit):
    g, sss, eff, mask, up = small_fit
    data = 0.3 * up + 50.0 * (1 - mask)                             # outside the tails: anything (the object)
    fit = sf.upsample_and_fit_scatter(sss, ProjData(data.astype(np.float32), g), mask, eff, 0.1, 0.4)
    assert np.allclose(fit.raw_scale_factors, 0.3, rtol=1e-5) and np.allclose(fit.scale_factors, 0.3, rtol=1e-5)
    assert np.allclose(fit.scatter.array, 0.3 * up, rtol=1e-5)
    # a scale above the maximum is clipped to it
    hi = sf.upsample_and_fit_scatter(sss, ProjData((0.6 * up).astype(np.float32), g), mask, eff, 0.1, 0.4)
    assert np.allclose(hi.scale_factors, 0.4)


def test_scale_factors_are_smoothed_within_each_segment(small_fit):
    g, *_ = small_fit
    k = np.concatenate([np.arange(g.segment(s).num_axial) for s in g.segment_sequence]).astype(float)
    ramp = 0.1 + 0.01 * k
    out = sf.smooth_scale_factors(ramp, g, 0.0, 10.0, 3)
    for s in g.segment_sequence:
        sl, n = g.segment_slice(s), g.segment(s).num_axial
        r = ramp[sl]
        expect = [np.mean(r[np.clip(np.arange(i - 3, i + 4), 0, n - 1)]) for i in range(n)]  # edge values repeated
        assert np.allclose(out[sl], expect)


def test_no_tail_bins_is_a_named_error_and_empty_sinograms_get_stirs_default(small_fit):
    g, sss, eff, mask, up = small_fit
    data = ProjData((0.3 * up).astype(np.float32), g)
    with pytest.raises(NoTailBinsError, match="tail mask has no bins"):
        sf.upsample_and_fit_scatter(sss, data, np.zeros(g.shape), eff, 0.1, 0.4)
    m = mask.copy()
    m[5] = 0
    with pytest.warns(UserWarning, match="almost no scatter in the tail mask"):
        fit = sf.upsample_and_fit_scatter(sss, data, m, eff, 0.1, 0.4, half_filter_width=0)
    assert fit.raw_scale_factors[5] == 1.0 and fit.scale_factors[5] == 0.4   # STIR: 1, then clipped
