"""Simulated studies: efficiencies, count calibration, consistency of prompts with the written factors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sirf_ddip.errors import ConfigError, OutputExistsError
from sirf_ddip.geometry.scanner import get_scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.sim import simulate as sim


def tiny_geometry(rings: int = 2, mrd: int = 1, span: int = 1) -> SinogramGeometry:
    return SinogramGeometry(get_scanner("mMR").with_rings(rings), span=span, max_ring_diff=mrd, view_mashing=21,
                            num_tangential=24)


def dense_forward(geometry, image_shape, seed=0, density=0.06, value=3.0):
    """A sparse-ish random non-negative system matrix (a stand-in projector with mm-like line lengths)."""
    rng = np.random.default_rng(seed)
    nb, nv = int(np.prod(geometry.shape)), int(np.prod(image_shape))
    a = (rng.random((nb, nv)) < density) * rng.uniform(0.5, 1.5, (nb, nv)) * value
    a[np.arange(nb), rng.integers(0, nv, nb)] += value  # every bin sees something
    fwd = lambda x: (a @ np.asarray(x, dtype=np.float64).ravel()).reshape(geometry.shape)  # noqa: E731
    return a, fwd


def test_ring_pairs_per_sinogram():
    g = sim.build_geometry(sim.SimulationConfig(num_rings=4, max_ring_diff=3, span=1))
    pairs = sim.ring_pairs_per_sinogram(g)
    assert len(pairs) == g.shape[0] == 16
    table = g.sinogram_table()
    for i, rp in enumerate(pairs):
        assert len(rp) == 1 and rp[0][1] - rp[0][0] == table["segment"][i]
    g3 = SinogramGeometry(get_scanner("mMR").with_rings(6), span=3, max_ring_diff=4)
    p3 = sim.ring_pairs_per_sinogram(g3)
    t3 = g3.sinogram_table()
    assert [len(rp) for rp in p3] == list(t3["num_ring_pairs"])
    assert sum(len(rp) for rp in p3) == sum(6 - abs(d) for d in range(-4, 5))


def test_detector_efficiencies():
    g = SinogramGeometry(get_scanner("mMR").with_rings(2), span=1, max_ring_diff=1, num_tangential=24)
    e0 = sim.detector_efficiencies(g, np.random.default_rng(0), sd=0.0)
    e1 = sim.detector_efficiencies(g, np.random.default_rng(0), sd=0.08)
    e1b = sim.detector_efficiencies(g, np.random.default_rng(0), sd=0.08)
    for e in (e0, e1):
        assert e.shape == g.shape and e.min() > 0.5 and abs(e.mean() - 1) < 1e-9
    np.testing.assert_array_equal(e1, e1b)
    cv0, cv1 = e0.std() / e0.mean(), e1.std() / e1.mean()
    # block profile alone ~9 %; with two crystals of 8 % each (~11 %) in quadrature ~14 %
    assert 0.04 < cv0 < 0.12 and cv0 + 0.02 < cv1 < 0.25
    # crystal-pair structure: a bin's efficiency is a product, so log-efficiencies of bins sharing detector 1
    # (same u + t>>1) correlate; check against the geometric-only part being smooth in the tangential direction
    assert np.abs(np.diff(e0, axis=2)).mean() < np.abs(np.diff(e1, axis=2)).mean()


def test_axial_count_fraction():
    full = get_scanner("mMR")
    prof = np.ones(89)
    fr = [sim.axial_count_fraction(sim.build_geometry(sim.SimulationConfig(num_rings=n, max_ring_diff=n - 1)),
                                   np.ones(2 * n - 1), prof, 60) for n in (1, 2, 4, 8)]
    assert all(0 < f < 1 for f in fr) and fr == sorted(fr)
    # one ring, one plane: one ring pair out of the full scanner's weighted pairs seeing the 89-plane head
    assert fr[0] < 1e-3
    # the whole scanner against itself is 1
    g = SinogramGeometry(full, span=1, max_ring_diff=60)
    n = 2 * full.num_rings - 1
    p = np.random.default_rng(1).random(n)
    assert sim.axial_count_fraction(g, p, p, 60) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("sf, rf", [(0.35, 0.3), (0.0, 0.0)])
def test_simulate_data_consistent(sf, rf):
    g = tiny_geometry()
    shape = (3, 8, 8)
    _, fwd = dense_forward(g, shape)
    rng = np.random.default_rng(5)
    truth = rng.uniform(1, 10, shape)
    mu = np.full(shape, 0.096)
    d = sim.simulate_data(truth, mu, g, fwd, 1e6, np.random.default_rng(7), scatter_fraction=sf, randoms_fraction=rf)
    for arr in (d.prompts, d.mult, d.additive):
        assert arr.shape == g.shape and arr.dtype == np.float32
    assert d.mult.min() > 0 and d.additive.min() >= 0
    # exactly the Poisson mean of the written float32 arrays
    np.testing.assert_allclose(d.expected, d.mult.astype(np.float64) * (fwd(truth.astype(np.float32)) + d.additive),
                               rtol=1e-12)
    st = d.stats
    assert st["expected_trues"] == pytest.approx(1e6, rel=1e-5)
    if sf:
        assert st["expected_scatter"] / (st["expected_trues"] + st["expected_scatter"]) == pytest.approx(sf, rel=1e-6)
        assert st["expected_randoms"] / st["expected_prompts"] == pytest.approx(rf, rel=1e-5)
    else:
        assert d.additive.max() == 0
    # Poisson: total within 5 SD of the mean
    assert abs(d.prompts.sum() - d.expected.sum()) < 5 * np.sqrt(d.expected.sum())
    assert np.array_equal(d.prompts, np.round(d.prompts))


def test_high_count_mlem_recovers_truth():
    g = tiny_geometry()
    shape = (3, 6, 6)
    a, fwd = dense_forward(g, shape, seed=2, density=0.1)
    truth = np.random.default_rng(3).uniform(2, 20, shape)
    d = sim.simulate_data(truth, np.full(shape, 0.05), g, fwd, 1e10, np.random.default_rng(4))
    m = d.mult.astype(np.float64).ravel()
    add = d.additive.astype(np.float64).ravel()
    y = d.prompts.astype(np.float64).ravel()
    sens = a.T @ m
    x = np.ones(a.shape[1])
    err0 = np.linalg.norm(x - truth.ravel()) / np.linalg.norm(truth)
    for _ in range(300):
        x *= (a.T @ (m * y / (m * (a @ x + add)))) / sens
    err = np.linalg.norm(x - truth.ravel()) / np.linalg.norm(truth)
    assert err0 > 0.5 and err < 0.02, (err0, err)


def test_config_validation():
    with pytest.raises(ConfigError, match="dose_fraction"):
        sim.SimulationConfig(dose_fraction=0).validate()
    with pytest.raises(ConfigError, match="tracer"):
        sim.SimulationConfig(tracer="h2o").validate()
    with pytest.raises(ConfigError, match="num_rings"):
        sim.build_geometry(sim.SimulationConfig(num_rings=99))


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    cfg = sim.SimulationConfig(num_rings=2, max_ring_diff=1, view_mashing=21, num_tangential=24, image_xy=12,
                               dose_fraction=0.5, seed=1)
    g = sim.build_geometry(cfg)
    _, fwd = dense_forward(g, (3, 12, 12), seed=9, density=0.03)
    out = tmp_path_factory.mktemp("study") / "case1"
    sim.simulate_study(cfg, out, forward=fwd)
    return cfg, g, fwd, out


def test_simulate_study_files(small_study):
    from sirf_ddip.io import read_image, read_projdata

    cfg, g, fwd, out = small_study
    for name in sim.STUDY_FILES:
        assert (out / name).is_file(), name
    assert (out / "run_record.json").is_file()
    case = json.loads((out / "case.json").read_text())
    prompts = read_projdata(out / "prompts.hs")
    mult = read_projdata(out / "mult_factors.hs")
    add = read_projdata(out / "additive_term.hs")
    truth = read_image(out / "truth.hv")
    assert prompts.array.shape == g.shape and truth.array.shape == (3, 12, 12)
    assert case["total_prompts"] == pytest.approx(float(prompts.array.sum()))
    assert case["dose_fraction"] == 0.5 and case["config"]["seed"] == 1
    assert case["subject"]["tracer"] == "fdg" and case["activity_units"] == "kBq/mL"
    expected = mult.array.astype(np.float64) * (fwd(truth.array) + add.array)
    assert expected.sum() == pytest.approx(case["expected_prompts"], rel=1e-5)
    assert case["target_prompts"] == pytest.approx(case["expected_prompts"], rel=1e-5)
    # the count level follows the reference: 0.5 × 2e8 × (2-ring slab's share of a whole mMR head scan)
    assert case["target_prompts"] == pytest.approx(0.5 * 2e8 * case["axial_count_fraction"], rel=1e-9)
    mask = read_image(out / "mask_brain.hv").array
    assert set(np.unique(mask)) <= {0.0, 1.0} and mask.sum() > 0
    mu = read_image(out / "mu_map.hv").array
    assert mu.max() <= 0.15 + 1e-6 and mu.max() >= 0.096 - 1e-6


def test_simulate_study_refuses_overwrite(small_study):
    cfg, g, fwd, out = small_study
    with pytest.raises(OutputExistsError):
        sim.simulate_study(cfg, out, forward=fwd)


def test_simulate_study_deterministic(small_study, tmp_path):
    from sirf_ddip.io import read_projdata

    cfg, g, fwd, out = small_study
    again = sim.simulate_study(cfg, tmp_path / "again", forward=fwd)
    np.testing.assert_array_equal(read_projdata(again / "prompts.hs").array, read_projdata(out / "prompts.hs").array)


def test_simulate_study_lesion_kinds_and_count(small_study, tmp_path):
    """``lesion_kinds`` / ``num_lesions`` reach the phantom: cold lesions in FDG, the anatomy and MR unchanged."""
    from sirf_ddip.io import read_image

    cfg, g, fwd, out = small_study
    cold_cfg = sim.SimulationConfig(**{**cfg.__dict__, "lesion_kinds": ["cold"], "num_lesions": 2})
    cold = sim.simulate_study(cold_cfg, tmp_path / "cold", forward=fwd)
    case = json.loads((cold / "case.json").read_text())
    kinds = [l["kind"] for l in case["subject"]["lesions"]]
    assert kinds == ["cold", "cold"]
    base = json.loads((out / "case.json").read_text())
    assert base["subject"]["lesions"][0]["centre_index_zyx"] == case["subject"]["lesions"][0]["centre_index_zyx"]
    np.testing.assert_array_equal(read_image(cold / "mr.hv").array, read_image(out / "mr.hv").array)
    for bad in ({"lesion_kinds": ["warm"]}, {"lesion_kinds": "cold"}, {"num_lesions": 0},
                {"lesions": False, "num_lesions": 2}):
        with pytest.raises(ConfigError, match="lesion"):
            sim.SimulationConfig(**{**cfg.__dict__, **bad}).validate()
