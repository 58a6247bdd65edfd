"""NoiseSchedule: closed forms, inversions and DDIM steps."""

import math

import numpy as np
import pytest
import torch

from sirf_ddip.prior.schedule import NoiseSchedule


def test_alphas_cumprod_closed_form():
    s = NoiseSchedule(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12)
    for t in (0, 1, 10, 200, 999):
        assert float(s.alphas_cumprod[t]) == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-12)
    # the value the check at t=200 relies on
    assert 0.6 < float(s.alphas_cumprod[200]) < 0.7


def test_tweedie_inverts_q_sample_and_eps_from_x0():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, 999])
    xt = s.q_sample(x0, t, noise)
    torch.testing.assert_close(s.tweedie_x0(xt, noise, t), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.eps_from_x0(xt, x0, t), noise, rtol=0, atol=1e-9)
    # scalar t broadcasts; per-item t uses each item's alpha
    a = s.alphas_cumprod[500]
    torch.testing.assert_close(s.q_sample(x0, 500, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_ddim_eta0_deterministic_and_reaches_x0():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt = s.q_sample(x0, 300, eps)
    a = s.ddim_step(xt, eps, 300, 200, eta=0.0)
    b = s.ddim_step(xt, eps, 300, 200, eta=0.0, noise=torch.randn(x0.shape))  # noise ignored at eta=0
    assert torch.equal(a, b)
    # with the true eps, DDIM eta=0 lands exactly on q_sample(x0, t_prev, eps)
    torch.testing.assert_close(a, s.q_sample(x0, 200, eps), atol=1e-5, rtol=0)
    # t_prev = -1 returns the clean estimate
    torch.testing.assert_close(s.ddim_step(xt, eps, 300, -1, eta=0.0), x0, atol=1e-5, rtol=0)


def test_ddim_x0_override_is_used():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(1, 3, 4, 4, generator=g)
    eps = torch.randn(xt.shape, generator=g)
    x0 = torch.zeros_like(xt)
    out = s.ddim_step(xt, eps, 400, -1, eta=0.0, x0=x0)
    torch.testing.assert_close(out, x0)


def test_ddim_eta1_variance_is_ddpm_posterior_variance():
    s = NoiseSchedule()
    t, tp = 500, 499
    a_t, a_p = s.alphas_cumprod[t], s.alphas_cumprod[tp]
    posterior = (1 - a_p) / (1 - a_t) * s.betas[t]
    sig = s.ddim_sigma(t, tp, 1.0, torch.zeros(1, dtype=torch.float64))
    assert float(sig ** 2) == pytest.approx(float(posterior), rel=1e-10)
    # empirical variance of the step over the injected noise
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(1, 1, 1, 1, dtype=torch.float64).expand(20000, 1, 1, 1)
    eps = torch.full_like(xt, 0.3)
    out = s.ddim_step(xt, eps, 300, 100, eta=1.0, generator=g)
    expect = float(s.ddim_sigma(300, 100, 1.0, xt) ** 2)
    assert float(out.var()) == pytest.approx(expect, rel=0.05)
    assert float(out.var()) > 0.05  # not vacuous: a large stride has a large sigma


def test_timesteps():
    s = NoiseSchedule()
    seq = s.timesteps(200, 5)
    assert seq == [200, 150, 100, 50, 0]
    assert s.timesteps(3, 10) == [3, 2, 1, 0]
    assert s.timesteps(999, 1) == [999]
    seq = s.timesteps(999, 50)
    assert len(seq) == 50 and seq[0] == 999 and seq[-1] == 0 and all(a > b for a, b in zip(seq, seq[1:]))
    assert NoiseSchedule.previous(seq, len(seq) - 1) == -1
    with pytest.raises(ValueError):
        s.timesteps(1000, 5)
    with pytest.raises(ValueError):
        s.q_sample(torch.zeros(1), 1000, torch.zeros(1))


def test_roundtrip_dict():
    s = NoiseSchedule(500, 2e-4, 0.03)
    s2 = NoiseSchedule.from_dict(s.to_dict())
    assert torch.equal(s.alphas_cumprod, s2.alphas_cumprod)
