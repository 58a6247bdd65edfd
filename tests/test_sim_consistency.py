"""The simulator and the reconstruction engine use the same forward model, in the same units.

With the built-in projector (not a stand-in matrix):

- the projector's line integrals are in units of the x voxel size (what the simulator's μ scaling assumes),
  checked against exact chords of a uniform cylinder;
- every sinogram's attenuation factor through a water cylinder is ``exp(−0.096 cm⁻¹ · chord)``, including the
  edge direct sinograms whose LOR tube reaches beyond the slab (they saw 3/4 of the μ path before the fix);
- the simulator's noise-free mean equals ``EngineLogLikelihood.forward(truth)`` on the written arrays, and
  noise-free MLEM recovers the truth's regional means.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_ddip.data import ProjData
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.scanner import get_scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.physics.model import EngineLogLikelihood
from sirf_ddip.physics.projector import Projector
from sirf_ddip.sim import simulate as sim

MU_WATER = 0.096  # cm^-1


def _geometry(rings: int, num_tang: int, mrd: int | None = None) -> SinogramGeometry:
    # 12 views (mashing 21), the mMR's 2.086 mm bins and 4.06 mm rings
    return SinogramGeometry(get_scanner("mMR").with_rings(rings), span=1, max_ring_diff=mrd, view_mashing=21,
                            num_tangential=num_tang)


def _disc(grid: ImageGrid, radius_mm: float, ss: int = 8) -> np.ndarray:
    """Area fraction of each voxel inside a centred circle (supersampled), as a ``[y, x]`` plane."""
    _, ny, nx = grid.shape
    _, vy, vx = grid.voxel_size
    _, oy, ox = grid.origin
    ys = oy + (np.arange(ny * ss) + 0.5) / ss * vy - vy / 2
    xs = ox + (np.arange(nx * ss) + 0.5) / ss * vx - vx / 2
    inside = (ys[:, None] ** 2 + xs[None, :] ** 2) <= radius_mm ** 2
    return inside.reshape(ny, ss, nx, ss).mean(axis=(1, 3))


def _numpy_fwd(proj: Projector):
    def fwd(x):
        with torch.no_grad():
            return proj.forward(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return fwd


@pytest.fixture(scope="module")
def cylinder_setup():
    torch.set_num_threads(1)
    g = _geometry(rings=2, num_tang=100)  # segments 0 (2 axial positions, both at the slab edges), +1, -1
    grid = g.default_image_grid(xy=96)  # 3 planes, 200 mm transaxially
    radius = 80.0
    disc = _disc(grid, radius)
    return g, grid, radius, disc, Projector(g, grid, device="cpu")


def test_projector_length_unit_is_x_voxel(cylinder_setup):
    """``Projector.forward`` of a uniform cylinder = 3-D chord / v_x (inner sinograms: tube fully inside)."""
    g, grid, radius, disc, proj = cylinder_setup
    vol = np.repeat(disc[None], grid.shape[0], 0)
    y = _numpy_fwd(proj)(vol)
    s = g.s()
    central = np.abs(s) < 40.0
    chord = 2.0 * np.sqrt(radius ** 2 - s[central] ** 2)
    vx = grid.voxel_size[2]
    for k in (1, -1):  # oblique sinograms of a 2-ring scanner lie inside the 3-plane image
        sl = g.segment_slice(k)
        tan = np.abs(np.asarray(g.tantheta(k, s[central]), dtype=float))
        ratio = y[sl][:, :, central].mean(axis=(0, 1)) * vx / (chord * np.sqrt(1.0 + tan ** 2))
        np.testing.assert_allclose(ratio, 1.0, atol=0.01)
    # the direct sinograms' 4.06 mm tube reaches one 2.03 mm plane beyond the image: 3/4 of the chord inside
    sl0 = g.segment_slice(0)
    np.testing.assert_allclose(y[sl0][:, :, central].mean(axis=(0, 1)) * vx / chord, 0.75, atol=0.01)
    assert sim.attenuation_padding(g, grid) == 1


def test_attenuation_factors_water_cylinder(cylinder_setup):
    """Every sinogram's attenuation = exp(−μ L) through a water cylinder that continues beyond the slab."""
    g, grid, radius, disc, proj = cylinder_setup
    pad = sim.attenuation_padding(g, grid)
    ext = sim.padded_grid(grid, pad)
    assert ext.shape[0] == grid.shape[0] + 2 * pad
    truth = np.repeat(disc[None], grid.shape[0], 0).astype(np.float32) * 5.0
    mu_ext = np.repeat(disc[None], ext.shape[0], 0).astype(np.float32) * MU_WATER
    c_true = 1e6
    d = sim.simulate_data(truth, mu_ext, g, _numpy_fwd(proj), c_true, np.random.default_rng(0), efficiency_sd=0.0,
                          scatter_fraction=0.0, randoms_fraction=0.0, length_unit_mm=grid.voxel_size[2],
                          mu_forward=_numpy_fwd(Projector(g, ext, device="cpu")))
    # efficiency_sd = 0: the efficiencies are the deterministic block/geometric profile, so m / (c ε) = att
    eff = sim.detector_efficiencies(g, np.random.default_rng(0), 0.0)
    att = d.mult.astype(np.float64) / (d.stats["calibration_counts_per_unit_Ax"] * eff)
    s = g.s()
    central = np.abs(s) < 40.0
    chord_cm = 0.2 * np.sqrt(radius ** 2 - s[central] ** 2)
    for k in g.segment_sequence:
        tan = np.abs(np.asarray(g.tantheta(k, s[central]), dtype=float))
        expect = np.exp(-MU_WATER * chord_cm * np.sqrt(1.0 + tan ** 2))
        got = att[g.segment_slice(k)][:, :, central].mean(axis=1)  # per sinogram, over views
        np.testing.assert_allclose(got, np.broadcast_to(expect, got.shape), rtol=0.02,
                                   err_msg=f"segment {k}: attenuation factors")
    assert 0.18 < att[:, :, np.argmin(np.abs(s))].min() < 0.25  # 16 cm of water: exp(-1.536) = 0.215


def _two_region_phantom(grid: ImageGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A hot annulus ('GM', 4 voxels thick) around a cold core ('WM'), uniform axially; 2.5 : 1 activity."""
    outer, inner = _disc(grid, 28.0), _disc(grid, 20.0)
    plane = 10.0 * (outer - inner) + 4.0 * inner
    x = np.repeat(plane[None], grid.shape[0], 0).astype(np.float32)
    gm = np.repeat(((outer - inner) > 0.99)[None], grid.shape[0], 0)
    wm = np.repeat((_disc(grid, 14.0) > 0.99)[None], grid.shape[0], 0)
    return x, gm, wm


def test_noise_free_model_consistency_and_mlem():
    """Simulator mean == EngineLogLikelihood.forward(truth); noise-free MLEM recovers GM, WM and their contrast."""
    torch.set_num_threads(1)
    g = _geometry(rings=2, num_tang=40)
    grid = g.default_image_grid(xy=32)
    truth, gm, wm = _two_region_phantom(grid)
    proj = Projector(g, grid, device="cpu")
    mu = (truth > 0).astype(np.float32) * MU_WATER
    d = sim.simulate_data(truth, mu, g, _numpy_fwd(proj), 1e7, np.random.default_rng(1),
                          length_unit_mm=grid.voxel_size[2])
    ds = EngineLogLikelihood(ProjData(d.prompts, g, {}), ProjData(d.mult, g, {}), ProjData(d.additive, g, {}),
                        grid=grid, device="cpu", projector=proj)
    with torch.no_grad():
        fwd = ds.forward(torch.as_tensor(truth)).numpy().astype(np.float64)
    np.testing.assert_allclose(fwd, d.expected, rtol=1e-5, atol=1e-6 * d.expected.max())
    # noise-free MLEM from a uniform image
    ds.set_prompts(ProjData(d.expected.astype(np.float32), g, {}))
    sens = ds.sensitivity(None)
    x = torch.where(sens > 0, torch.ones_like(sens), torch.zeros_like(sens))
    with torch.no_grad():
        for _ in range(150):
            x = torch.where(sens > 0, x * ds.backprojected_ratio(x) / torch.where(sens > 0, sens, 1.0), 0.0)
    xr = x.numpy()
    gm_t, wm_t, gm_r, wm_r = truth[gm].mean(), truth[wm].mean(), xr[gm].mean(), xr[wm].mean()
    cr = (gm_r / wm_r - 1.0) / (gm_t / wm_t - 1.0)
    assert abs(gm_r / gm_t - 1) < 0.03 and abs(wm_r / wm_t - 1) < 0.03, (gm_r, gm_t, wm_r, wm_t)
    assert 0.95 < cr < 1.05, cr


@pytest.mark.slow
def test_simulate_study_attenuation_uses_head_beyond_slab(tmp_path, monkeypatch):
    """Built-in projector: files reproduce the simulator's mean, and edge direct sinograms are not under-attenuated."""
    from sirf_ddip.io import read_image

    cap = {}
    orig = sim.simulate_data

    def spy(*args, **kw):
        cap["d"] = orig(*args, **kw)
        cap["mu"] = args[1]
        return cap["d"]

    monkeypatch.setattr(sim, "simulate_data", spy)
    cfg = sim.SimulationConfig(num_rings=2, max_ring_diff=1, view_mashing=21, num_tangential=110, image_xy=104,
                               dose_fraction=1.0, seed=0, pose="neutral", deform=False, lesions=False,
                               efficiency_sd=0.0, write_nifti=False)
    out = sim.simulate_study(cfg, tmp_path / "case")
    d = cap["d"]
    ds = EngineLogLikelihood.from_files(out / "prompts.hs", out / "mult_factors.hs", out / "additive_term.hs",
                                   image_template=out / "truth.hv", device="cpu")
    truth = read_image(out / "truth.hv").array
    with torch.no_grad():
        fwd = ds.forward(torch.as_tensor(truth)).numpy().astype(np.float64)
    np.testing.assert_allclose(fwd, d.expected, rtol=1e-5, atol=1e-6 * d.expected.max())
    # the μ-map used for attenuation covers the slab plus the planes the edge tubes reach
    g = ds.geometry
    assert cap["mu"].shape[0] == truth.shape[0] + 2 * sim.attenuation_padding(g, ds.grid)
    # attenuation on central LORs: head-like (0.1-0.3), and the edge direct sinograms (0, 1) like the oblique ones
    eff = sim.detector_efficiencies(g, np.random.default_rng(0), 0.0)
    att = d.mult.astype(np.float64) / (d.stats["calibration_counts_per_unit_Ax"] * eff)
    it = int(np.argmin(np.abs(g.s())))
    per_sino = att[:, :, it].mean(axis=1)
    assert np.all((per_sino > 0.1) & (per_sino < 0.3)), per_sino
    direct = per_sino[g.segment_slice(0)]
    oblique = np.concatenate([per_sino[g.segment_slice(1)], per_sino[g.segment_slice(-1)]])
    assert np.abs(direct / oblique.mean() - 1).max() < 0.1, (direct, oblique)
