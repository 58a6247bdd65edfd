"""Simulated studies with STIR's single scatter simulation as their scatter (``scatter_model: sss``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sirf_ddip.data import Image
from sirf_ddip.errors import ConfigError
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.sim import simulate as sim
from sirf_ddip.sim.scatter_model import sss_scatter_shape


def test_scatter_model_resolution():
    mmr = sim.build_geometry(sim.SimulationConfig(num_rings=2, max_ring_diff=1))
    assert sim.resolve_scatter_model("auto", mmr) == ("sss", (430.0, 610.0))
    assert sim.resolve_scatter_model("smooth", mmr) == ("smooth", (430.0, 610.0))
    tof = SinogramGeometry("GE Discovery 690", span=1, max_ring_diff=0, tof_mash_factor=11)
    assert sim.resolve_scatter_model("auto", tof)[0] == "smooth"
    with pytest.raises(ConfigError, match="scatter_model.*TOF"):
        sim.resolve_scatter_model("sss", tof)
    with pytest.raises(ConfigError, match="scatter_model"):
        sim.SimulationConfig(scatter_model="klein-nishina").validate()


def _cylinder_case():
    g = sim.build_geometry(sim.SimulationConfig(num_rings=2, max_ring_diff=1, view_mashing=3, num_tangential=96))
    grid = g.default_image_grid(xy=80)
    _, y, x = np.meshgrid(np.arange(grid.shape[0]), grid.coords(1), grid.coords(2), indexing="ij")
    body = (x - 15) ** 2 + y ** 2 < 60 ** 2
    act = (body * (1.0 + 2.0 * ((x - 35) ** 2 + y ** 2 < 15 ** 2))).astype(np.float32)
    return g, grid, act, np.where(body, 0.096, 0.0).astype(np.float32)


def test_sss_scatter_shape_is_linear_broad_and_follows_the_object():
    g, grid, act, mu = _cylinder_case()
    shape, info = sss_scatter_shape(Image(act, grid), Image(mu, grid), g, (430.0, 610.0))
    assert shape.shape == g.shape and np.isfinite(shape).all() and shape.min() >= 0 and info["scatter_points"] > 10
    twice, _ = sss_scatter_shape(Image(2 * act, grid), Image(mu, grid), g, (430.0, 610.0))
    np.testing.assert_allclose(twice, 2 * shape, rtol=1e-6)         # linear in the activity, as STIR's
    # scatter reaches the tails: beyond the object (|s| > 75 mm from its centre) it is still a good part of the peak
    s = g.s()
    prof = shape[g.num_sinograms // 2, 0]                             # view 0: s along x
    outside = np.abs(s - 15.0) > 75.0
    assert outside.any() and prof[outside].max() > 0.1 * prof.max()
    # a narrower energy window (higher lower threshold) keeps less scatter (fewer scattered photons detected)
    narrow, _ = sss_scatter_shape(Image(act, grid), Image(mu, grid), g, (480.0, 610.0))
    assert narrow.sum() < 0.85 * shape.sum()                         # achieved 0.77 (relative to ε(511) in each)


def test_simulate_data_scales_the_given_scatter_shape(rng):
    g, grid, act, mu = _cylinder_case()
    shape, _ = sss_scatter_shape(Image(act, grid), Image(mu, grid), g, (430.0, 610.0))
    ax = np.full(g.shape, 2.0)
    d = sim.simulate_data(act, mu, g, lambda x: ax, 1e6, rng, scatter_fraction=0.3, randoms_fraction=0.0,
                          scatter_shape=shape)
    scatter = d.additive.astype(np.float64) * d.mult                  # no randoms: the additive term is scatter / m
    st = d.stats
    assert st["expected_scatter"] / (st["expected_scatter"] + st["expected_trues"]) == pytest.approx(0.3, rel=1e-6)
    # scatter ∝ efficiencies × the SSS shape: the efficiencies are mult / (c att), att from the μ-map's projection
    eff = d.mult / (st["calibration_counts_per_unit_Ax"] * np.exp(-0.1 * ax))   # the stand-in projects μ to 2 too
    ratio = scatter / (eff * shape)
    ok = shape > 1e-3 * shape.max()
    assert np.ptp(ratio[ok]) < 1e-4 * ratio[ok].mean()


@pytest.mark.slow
def test_simulated_study_with_sss(tmp_path):
    cfg = sim.SimulationConfig(num_rings=2, max_ring_diff=1, view_mashing=3, num_tangential=128, image_xy=64,
                               dose_fraction=0.5, seed=1, write_nifti=False, scatter_model="auto")
    out = sim.simulate_study(cfg, tmp_path / "sss")
    case = json.loads((out / "case.json").read_text())
    assert case["scatter_model"] == "sss" and case["scatter_model_info"]["scatter_points"] > 10
    assert case["energy_window_kev"] == [430.0, 610.0]
    from sirf_ddip.io import read_projdata

    assert read_projdata(out / "prompts.hs").meta["energy_window_kev"] == (430.0, 610.0)
    smooth = sim.simulate_study(sim.SimulationConfig(**{**cfg.__dict__, "scatter_model": "smooth"}), tmp_path / "sm")
    a1 = read_projdata(out / "additive_term.hs").array
    a2 = read_projdata(smooth / "additive_term.hs").array
    rel = np.linalg.norm(a1 - a2) / np.linalg.norm(a2)
    assert rel > 0.05                                                   # the option changes the scatter
    c2 = json.loads((smooth / "case.json").read_text())
    assert c2["expected_scatter"] == pytest.approx(case["expected_scatter"], rel=1e-6)   # same scatter fraction
