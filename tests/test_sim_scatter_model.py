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


def test_sss_on_a_two_ring_six_view_study_is_finite():
    """The study that overflowed the Poisson draw: STIR puts the scatter-point planes from the μ-map's first to its
    last plane centre, so the attenuation's axially padded μ-map put both planes of a 2-ring scanner outside the
    activity, the single scatter was 0 and the scale 0/0; the study's own μ-map is used now."""
    cfg = sim.SimulationConfig(num_rings=2, max_ring_diff=1, view_mashing=42, num_tangential=24, image_xy=12,
                               dose_fraction=0.5, seed=1, scatter_model="sss", write_nifti=False)
    import tempfile
    from pathlib import Path

    from sirf_ddip.io import read_projdata

    with tempfile.TemporaryDirectory() as d:
        out = sim.simulate_study(cfg, Path(d) / "c")
        case = json.loads((out / "case.json").read_text())
        prompts = read_projdata(out / "prompts.hs").array
        add = read_projdata(out / "additive_term.hs").array
    assert case["views"] == 6 and case["scatter_model"] == "sss"
    assert case["scatter_model_info"]["unscaled_total"] > 0 and case["attenuation_mu_padding_planes"] > 0
    assert np.isfinite(prompts).all() and np.isfinite(add).all()
    sf = case["expected_scatter"] / (case["expected_scatter"] + case["expected_trues"])
    assert sf == pytest.approx(cfg.scatter_fraction, rel=1e-6)


def test_simulate_data_refuses_a_scatter_shape_without_counts(rng):
    g, grid, act, mu = _cylinder_case()
    ax = np.full(g.shape, 2.0)
    for bad in (np.zeros(g.shape), np.full(g.shape, np.nan), -np.ones(g.shape)):
        with pytest.raises(ConfigError, match="scatter_model"):
            sim.simulate_data(act, mu, g, lambda x: ax, 1e6, rng, scatter_fraction=0.3, scatter_shape=bad)


@pytest.mark.slow
def test_sss_scatter_to_trues_of_a_thin_water_slab():
    """The single scatter simulation's absolute scale (STIR's normalised units: activity path lengths in x voxels,
    so ``S vx / (att A x)`` is the scatter-to-trues ratio): for a water cylinder (r = 75 mm) cut to the axial field of
    view of a 2- and a 4-ring scanner (8 and 16 mm), finite, far below STIR's own 0.471 for the 160 mm long cylinder
    on the whole mMR (``../shared/scatter/cylinder_mmr``: 3309.7 / 29320.4 x 4.17252 mm), and, the slab being thin,
    about proportional to its thickness."""
    import torch

    from sirf_ddip.physics.attenuation import attenuation_factors
    from sirf_ddip.physics.projector import Projector

    ratios = {}
    for rings in (2, 4):
        g = sim.build_geometry(sim.SimulationConfig(num_rings=rings, max_ring_diff=rings - 1, view_mashing=42,
                                                    num_tangential=128))
        grid = g.default_image_grid(xy=96)
        _, y, x = np.meshgrid(np.arange(grid.shape[0]), grid.coords(1), grid.coords(2), indexing="ij")
        body = x ** 2 + y ** 2 < 75.0 ** 2
        act, mu = body.astype(np.float32), np.where(body, 0.096, 0.0).astype(np.float32)
        shape, _ = sss_scatter_shape(Image(act, grid), Image(mu, grid), g, (430.0, 610.0))
        trues = attenuation_factors(Image(mu, grid), g).array * Projector(g, grid).forward(torch.as_tensor(act)).numpy()
        ratios[rings] = float(shape.sum() / trues.sum())
    assert 0.004 < ratios[2] < 0.04                 # achieved 0.0132 (2 rings), 0.0306 (4 rings)
    assert ratios[4] < 0.471 / 4
    assert 1.5 < ratios[4] / ratios[2] < 3.0        # achieved 2.32 (thickness x 2)
