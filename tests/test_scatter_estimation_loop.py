"""The scatter estimation loop (:func:`estimate_scatter`) recovers a known single scatter: noise-free prompts =
trues + our SSS of the truth (STIR's up-sampling, inverse SSRB, efficiencies) scaled to a 30 % scatter fraction +
randoms, on a 4-ring scanner; and the tail-fit clip of STIR's mMR files is said when it bites."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sirf_ddip.data import Image, ProjData
from sirf_ddip.errors import InputFileWarning
from sirf_ddip.physics.attenuation import attenuation_factors
from sirf_ddip.physics.projector import Projector
from sirf_ddip.recon.scatter_estimation import ScatterEstimationSettings, estimate_scatter
from sirf_ddip.sim.scatter_model import sss_scatter_shape

from test_scatter_estimation_inputs import _tiny_geometry

WINDOW = (430.0, 610.0)


def loop_case():
    """The case: ``(prompts, mu, efficiencies, randoms, true scatter, attenuation factors)``; the prompts hold
    noise-free trues + our SSS scaled to a 30 % scatter fraction + randoms (also ``benchmarks/scatter_vs_stir.py``)."""
    geom = _tiny_geometry()
    grid = geom.default_image_grid(xy=64)
    _, y, x = np.meshgrid(np.arange(grid.shape[0]), grid.coords(1), grid.coords(2), indexing="ij")
    body = (x - 10) ** 2 + (y + 5) ** 2 < 50 ** 2
    act = (body + 3.0 * ((x - 25) ** 2 + (y + 5) ** 2 < 20 ** 2)).astype(np.float32)
    mu = Image(np.where(body, 0.096, 0.0).astype(np.float32), grid)
    eff = np.exp(0.05 * np.random.default_rng(0).standard_normal(geom.shape)).astype(np.float32)
    att = attenuation_factors(mu, geom).array
    trues = eff * att * Projector(geom, grid).forward(torch.as_tensor(act)).numpy()
    shape, _ = sss_scatter_shape(Image(act, grid), mu, geom, WINDOW, eff)
    scatter = shape * (0.3 / 0.7 * float(trues.sum()) / float(shape.sum()))      # S / (S + T) = 30 %
    randoms = np.float32(0.2 * trues.mean()) * eff
    prompts = ProjData((trues + scatter + randoms).astype(np.float32), geom, {"source": "sim.hs"})
    return prompts, mu, eff, randoms, scatter, att


@pytest.fixture(scope="module")
def case():
    return loop_case()[:5]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_loop_recovers_a_known_single_scatter(case):
    prompts, mu, eff, randoms, scatter = case
    # the fitted factor is ~7 here (our simulation's scale is arbitrary): STIR's class range, not the mMR files' 0.4
    st = ScatterEstimationSettings(num_iterations=3, min_scale_factor=0.05, max_scale_factor=100.0)
    est = estimate_scatter(prompts, mu, WINDOW, randoms=randoms, efficiencies=eff, settings=st,
                           return_iterations=True)
    rel = [_rel(e.array, scatter) for e in est.iterations]
    # the first reconstruction holds the scatter as activity: its estimate is the worst; iterating corrects it
    assert rel[0] > 1.5 * rel[-1]                            # achieved 0.070, 0.037, 0.016
    assert rel[-1] < 0.05
    assert float(est.scatter.array.sum()) == pytest.approx(float(scatter.sum()), rel=0.05)   # achieved +1.6 %
    assert est.scatter.geometry.matches(prompts.geometry) and est.scatter.array.min() >= 0
    np.testing.assert_array_equal(est.iterations[-1].array, est.scatter.array)


def test_clipped_tail_fit_is_said(case):
    prompts, mu, eff, randoms, scatter = case
    st = ScatterEstimationSettings(num_iterations=1, osem_num_subsets=7, osem_num_subiterations=2)   # mMR: 0.1..0.4
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        est = estimate_scatter(prompts, mu, WINDOW, randoms=randoms, efficiencies=eff, settings=st)
    msgs = [str(x.message) for x in w if issubclass(x.category, InputFileWarning)]
    assert any("maximum scatter scaling factor" in m and "clipped to 0.4" in m and m.startswith("sim.hs") for m in msgs)
    np.testing.assert_allclose(est.scale_factors[-1], 0.4)
    assert float(est.scatter.array.sum()) < 0.2 * float(scatter.sum())          # the clip's price: achieved 8 %
