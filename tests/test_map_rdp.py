"""MAP-RDP: prior value/gradient vs STIR's definition and finite differences; monotone objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sirf_ddip.errors import ConfigError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.recon.em import em_update
from sirf_ddip.recon.map_rdp import (MAPRDPReconstructor, RelativeDifferencePrior, neighbourhood_offsets,
                                     penalty_sweep)
from toy_physics import dense_problem as make_problem


def stir_rdp_value(x, w3, gamma, eps):
    """Direct transcription of STIR's RelativeDifferencePrior::compute_value loop (beta = 1)."""
    nz, ny, nx = x.shape
    tot = 0.0
    for z in range(nz):
        for y in range(ny):
            for xx in range(nx):
                for dz in (-1, 0, 1):
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            k = (z + dz, y + dy, xx + dx)
                            if not (0 <= k[0] < nz and 0 <= k[1] < ny and 0 <= k[2] < nx):
                                continue
                            a, b = x[z, y, xx], x[k]
                            tot += w3[dz + 1, dy + 1, dx + 1] * 0.5 * (a - b) ** 2 / (a + b + gamma * abs(a - b) + eps)
    return tot


def test_weights_are_stir_inverse_distance():
    offs = neighbourhood_offsets(26, (3.0, 2.0, 2.0))
    assert len(offs) == 13
    w = {o[:3]: o[3] for o in offs}
    assert w[(0, 0, 1)] == pytest.approx(1.0)
    assert w[(0, 1, 1)] == pytest.approx(1 / math.sqrt(2))
    assert w[(1, 0, 0)] == pytest.approx(2.0 / 3.0)
    assert w[(1, 1, 1)] == pytest.approx(2.0 / math.sqrt(9 + 4 + 4))
    assert len(neighbourhood_offsets(6, (1, 1, 1))) == 3 and len(neighbourhood_offsets(8, (1, 1, 1))) == 4
    with pytest.raises(ConfigError):
        neighbourhood_offsets(18, (1, 1, 1))


def test_rdp_value_matches_stir_loop():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 3, (3, 4, 5))
    vs = (2.5, 2.0, 2.0)
    w3 = np.zeros((3, 3, 3))
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dz, dy, dx) != (0, 0, 0):
                    w3[dz + 1, dy + 1, dx + 1] = vs[2] / math.sqrt((dz * vs[0]) ** 2 + (dy * vs[1]) ** 2 + (dx * vs[2]) ** 2)
    prior = RelativeDifferencePrior(vs, gamma=2.0, epsilon=0.01)
    assert prior.value(torch.as_tensor(x)) == pytest.approx(stir_rdp_value(x, w3, 2.0, 0.01), rel=1e-12)


@pytest.mark.parametrize("nb", [26, 6])
def test_rdp_gradient_and_hessian_vs_finite_differences(nb):
    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.uniform(0.1, 2, (3, 4, 4)))
    kappa = torch.as_tensor(rng.uniform(0.5, 1.5, (3, 4, 4)))
    prior = RelativeDifferencePrior((2.0, 2.0, 2.0), gamma=1.5, epsilon=0.05, neighbourhood=nb, kappa=kappa)
    g = prior.gradient(x)
    h = prior.hessian_diagonal(x)
    hstep = 1e-6
    for idx in [(0, 0, 0), (1, 2, 1), (2, 3, 3), (1, 1, 2)]:
        e = torch.zeros_like(x)
        e[idx] = hstep
        fd = (prior.value(x + e) - prior.value(x - e)) / (2 * hstep)
        assert float(g[idx]) == pytest.approx(fd, rel=1e-6, abs=1e-9)
        fd2 = float((prior.gradient(x + e)[idx] - prior.gradient(x - e)[idx]) / (2 * hstep))
        assert float(h[idx]) == pytest.approx(fd2, rel=1e-5)


def test_constant_image_has_zero_prior():
    prior = RelativeDifferencePrior((2.0, 2.0, 2.0))
    x = torch.full((3, 3, 3), 1.7, dtype=torch.float64)
    assert prior.value(x) == 0.0 and float(prior.gradient(x).abs().max()) == 0.0


def test_sgp_objective_increases_monotonically_and_beta_smooths():
    ds, truth = make_problem()
    init = torch.ones(ds.image_shape, dtype=torch.float64)
    rec = MAPRDPReconstructor(beta=0.5, epsilon=0.01)
    rec.set_objective_function(ds)
    rec.set_num_subiterations(40)
    rec.set_up(init)
    rec.set_current_estimate(init)
    rec.process(progress=False)
    h = np.array(rec.history)
    assert len(h) == 41 and np.all(np.diff(h) >= 0)
    assert h[-1] > h[0] + 1.0
    # compare with direct evaluation of the objective
    x = rec.x
    assert rec.objective(x) == pytest.approx(ds.value(x) - 0.5 * rec.prior.value(x), rel=1e-12)
    assert float(x.min()) >= 0
    # a stronger prior gives a smoother image (smaller RDP value)
    rec2 = MAPRDPReconstructor(beta=20.0, epsilon=0.01)
    rec2.set_objective_function(ds)
    rec2.set_num_subiterations(40)
    rec2.set_up(init)
    rec2.set_current_estimate(init)
    rec2.process(progress=False)
    assert rec2.prior.value(rec2.x) < rec.prior.value(rec.x)


def test_beta_zero_first_step_is_mlem():
    ds, _ = make_problem(seed=3)
    init = torch.ones(ds.image_shape, dtype=torch.float64)
    rec = MAPRDPReconstructor(beta=0.0, epsilon=0.01)
    rec.set_objective_function(ds)
    rec.set_up(init)
    rec.set_current_estimate(init)
    rec.update_current_estimate()
    assert rec.last_step == 1.0
    assert torch.allclose(rec.x, em_update(ds, init), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_sgp_converges_to_stationary_point():
    ds, _ = make_problem(shape=(2, 3, 3), n_bins=80, counts=200.0, seed=4)
    init = torch.ones(ds.image_shape, dtype=torch.float64)
    rec = MAPRDPReconstructor(beta=1.0, epsilon=0.01)
    rec.set_objective_function(ds)
    rec.set_num_subiterations(400)
    rec.set_up(init)
    rec.set_current_estimate(init)
    rec.process(progress=False)
    x = rec.x
    g = rec.objective_gradient(x)
    # KKT: gradient ~0 where x > 0, <= 0 where x == 0
    pos = x > 1e-6
    assert float(g[pos].abs().max()) < 1e-3 * float(rec.data_step.sensitivity().max())
    assert bool((g[~pos] <= 1e-6).all())


@pytest.mark.slow
def test_bsrem_with_subsets_approaches_sgp_solution():
    ds, _ = make_problem(shape=(2, 3, 3), n_bins=80, counts=200.0, seed=5)
    init = torch.ones(ds.image_shape, dtype=torch.float64)
    ref = MAPRDPReconstructor(beta=1.0, epsilon=0.01)
    ref.set_objective_function(ds)
    ref.set_num_subiterations(300)
    ref.set_up(init)
    ref.set_current_estimate(init)
    ref.process(progress=False)
    rec = MAPRDPReconstructor(beta=1.0, epsilon=0.01, algorithm="bsrem", bsrem_relaxation=0.05)
    rec.set_objective_function(ds)
    rec.set_num_subsets(4)
    rec.set_num_subiterations(4 * 150)
    rec.set_up(init)
    rec.set_current_estimate(init)
    rec.process(progress=False)
    rel = float((rec.x - ref.x).norm() / ref.x.norm())
    assert rel < 0.02
    with pytest.raises(ConfigError):
        bad = MAPRDPReconstructor(beta=1.0)
        bad.set_objective_function(ds)
        bad.set_num_subsets(4)
        bad.set_up(init)


def test_penalty_sweep_picks_best_score():
    ds, truth = make_problem(seed=6, counts=20.0)
    t = torch.as_tensor(truth)
    init = torch.ones(ds.image_shape, dtype=torch.float64)
    score = lambda img: -float(((img - t) ** 2).mean())
    best, allr = penalty_sweep(ds, init, [0.0, 1.0, 10.0], 15, score, epsilon=0.01)
    assert [r.beta for r in allr] == [0.0, 1.0, 10.0]
    assert best.score == max(r.score for r in allr)
