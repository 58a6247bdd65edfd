"""The closed-form HQS fusion and image step (sirf_ddip.recon.hqs)."""

from __future__ import annotations

import math

import pytest
import torch

from sirf_ddip.recon.hqs import beta_activity, hqs_fusion, hqs_image_step, hqs_objective
from sirf_ddip.recon.em import em_update
from test_ddip_support import DenseDataStep


def _random_problem(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_em = torch.rand(n, generator=g, dtype=torch.float64) * 5
    z = torch.randn(n, generator=g, dtype=torch.float64) * 2 + 1      # some negative centres
    s = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.1
    return x_em, z, s


@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0, 30.0])
def test_fusion_solves_the_subproblem(beta):
    x_em, z, s = _random_problem()
    x = hqs_fusion(x_em, z, s, beta)
    assert bool((x > 0).all())
    # stationarity (2): s x_em / x − s − β (x − z) = 0, relative to the size of the terms
    grad = s * x_em / x - s - beta * (x - z)
    scale = s * x_em / x + s + beta * (x.abs() + z.abs())
    assert float((grad.abs() / scale).max()) < 1e-10
    # and it is the maximiser: any perturbation lowers the (concave) objective
    f0 = hqs_objective(x, x_em, z, s, beta)
    for d in (1e-3, -1e-3, 0.1, -0.1):
        xp = (x * (1 + d)).clamp_min(1e-300)
        assert bool((hqs_objective(xp, x_em, z, s, beta) <= f0 + 1e-12).all())


def test_fusion_limits():
    x_em, z, s = _random_problem()
    assert torch.equal(hqs_fusion(x_em, z, s, 0.0), x_em)
    torch.testing.assert_close(hqs_fusion(x_em, z, s, 1e-9), x_em, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hqs_fusion(x_em, z, s, math.inf), z.clamp_min(0))
    torch.testing.assert_close(hqs_fusion(x_em, z, s, 1e14), z.clamp_min(0), rtol=1e-6, atol=1e-6)
    # zero sensitivity: only the prior sees the voxel
    torch.testing.assert_close(hqs_fusion(x_em, z, torch.zeros_like(s), 0.5), z.clamp_min(0))
    # between the two: a convex-like compromise, strictly between x_em and z where z > 0 and they differ
    x = hqs_fusion(x_em, z, s, 1.0)
    m = z > 0.1
    lo, hi = torch.minimum(x_em, z)[m], torch.maximum(x_em, z)[m]
    assert bool(((x[m] >= lo - 1e-12) & (x[m] <= hi + 1e-12)).all())


def test_fusion_is_stable_for_tiny_beta():
    x_em, z, s = _random_problem()
    x = hqs_fusion(x_em.float(), z.float(), s.float(), 1e-7)
    assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(x.double(), x_em, rtol=1e-5, atol=1e-5)


def test_beta_units_make_fusion_unit_equivariant():
    """β in network units: expressing activity c times larger gives c times the same fused image."""
    x_em, z, s = _random_problem()
    scale, c = 2.5, 1000.0
    g = 2.0 / scale
    x1 = hqs_fusion(x_em, z, s, beta_activity(0.01, g))
    x2 = hqs_fusion(c * x_em, c * z, s / c, beta_activity(0.01, g / c))
    torch.testing.assert_close(x2, c * x1, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="beta"):
        beta_activity(-1.0, g)


def test_image_step_beta_zero_is_osem_and_large_beta_is_prior():
    ds = DenseDataStep(shape=(2, 8, 8), nbins=600)
    ds.set_num_subsets(3)
    x0 = torch.ones(ds.image_shape, dtype=ds.dtype)
    z = ds.x_true.clone() * 0.9 + 0.05
    subsets = [0, 1, 2, 0]
    x_hqs = hqs_image_step(ds, x0, z, 0.0, 4, subsets)
    x_ref = x0
    for s_ in subsets:
        x_ref = em_update(ds, x_ref, s_)
    torch.testing.assert_close(x_hqs, x_ref, rtol=1e-12, atol=1e-12)
    timer = {}
    x_big = hqs_image_step(ds, x0, z, 1e12, 2, None, timer=timer)
    torch.testing.assert_close(x_big, z, rtol=1e-6, atol=1e-8)
    assert timer["projector"] > 0 and timer["em"] > 0
    with pytest.raises(ValueError, match="subsets"):
        hqs_image_step(ds, x0, z, 1.0, 2, [0])


def _subset_problem():
    """A problem whose view subsets (rows round-robin) each see every voxel many times, as PET view subsets do."""
    ds = DenseDataStep(shape=(2, 8, 8), nbins=3000, counts=1e5)
    z = 0.6 * ds.x_true + 0.3                      # a prior image away from the data's ML image
    beta = float(ds.sensitivity(None).mean())      # data and penalty both matter at this β
    return ds, z, beta


def test_subset_image_step_converges_to_the_full_data_map_image():
    """Ordered view subsets in the fused EM updates: the full-data iteration converges to the MAP image of
    L(x) − (β/2)‖x − z‖² (KKT checked in closed form) and the S-subset one to within OSEM's limit cycle of it."""
    ds, z, beta = _subset_problem()
    S, n = 4, 100
    x0 = z.clamp_min(1e-3)
    ref = hqs_image_step(ds, x0, z, beta, n)
    kkt = ds.backprojected_ratio(ref) - ds.sensitivity(None) - beta * (ref - z)   # ∇ of the objective
    assert float(kkt.abs().max() / ds.sensitivity(None).mean()) < 1e-7
    ds.set_num_subsets(S)
    osem = hqs_image_step(ds, x0, z, beta, n, [k % S for k in range(n)])
    rel = float((osem - ref).norm() / ref.norm())
    assert rel < 0.04, rel                         # achieved 0.0135


def test_five_subset_updates_move_as_far_as_five_full_data_updates():
    """DDIP's image step (5 fused updates from x̂0): 5 subset updates land where 5 full-data updates do, at 5/S
    of the projections (OSEM: one subset update ≈ one MLEM update)."""
    ds, z, beta = _subset_problem()
    S, n = 4, 5
    x0 = z.clamp_min(1e-3)
    full = hqs_image_step(ds, x0, z, beta, n)
    ds.set_num_subsets(S)
    sub = hqs_image_step(ds, x0, z, beta, n, [k % S for k in range(n)])
    move = float((full - x0).norm())
    diff = float((sub - full).norm())
    assert move > 0.05 * float(x0.norm())          # the data do move the image
    assert diff < 0.35 * move, diff / move         # achieved 0.113
