"""Classifier-free MR guidance and MR dropout (issue 30) on a tiny MR-conditioned network with a learned null MR."""

import pytest
import torch

from sirf_ddip.errors import ConfigError
from sirf_ddip.prior.guidance import check_mr_guidance, guided_eps
from sirf_ddip.prior.network import build_network, reinit_zero_layers
from sirf_ddip.prior.slabs import run_network

TINY = {"channels": [8, 8], "attention_levels": [False, False], "num_res_blocks": 1, "num_head_channels": 8,
        "norm_num_groups": 4, "use_mr": True, "slab": 3}


class CountingNet(torch.nn.Module):
    """Wraps a ScoreNetwork and counts its forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0
        self.spatial_multiple, self.uses_mr, self.has_mr_null = net.spatial_multiple, True, net.has_mr_null

    def forward(self, *a, **k):
        self.calls += 1
        return self.net(*a, **k)


def _net(mr_null=True):
    torch.manual_seed(0)
    net = build_network({**TINY, "mr_null": mr_null})
    reinit_zero_layers(net, generator=torch.Generator().manual_seed(1))
    if mr_null:
        with torch.no_grad():
            net.mr_null.copy_(torch.tensor([0.3, -0.2, 0.5]).reshape(1, 3, 1, 1))
    return net.eval()


def _data(b=2, h=12, w=10):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 3, h, w, generator=g)


def test_guided_eps_closed_form():
    c, u = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(guided_eps(c, u, 0.25), u + 0.25 * (c - u))
    assert torch.equal(guided_eps(c, None, 1.0), c)
    assert torch.equal(guided_eps(None, u, 0.0), u)
    torch.testing.assert_close(guided_eps(c, u, 2.0), 2 * c - u)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="mr_guidance"):
            check_mr_guidance(bad)


@torch.no_grad()
def test_w1_is_one_call_and_bit_identical_w0_is_the_null_mr():
    net = CountingNet(_net())
    xs, ms = _data()
    ref = run_network(net.net, xs, 50, ms)               # today's path (no guidance argument)
    net.calls = 0
    e1 = run_network(net, xs, 50, ms, mr_guidance=1.0)
    assert net.calls == 1 and torch.equal(e1, ref)
    net.calls = 0
    e0 = run_network(net, xs, 50, ms, mr_guidance=0.0)
    assert net.calls == 1
    # w = 0 equals the network fed the learned null MR directly, and does not depend on the MR at all
    null = net.net.mr_null.expand(2, 3, 12, 10)
    direct = run_network(net.net, xs, 50, torch.zeros_like(ms))  # shape template only
    e0_other_mr = run_network(net, xs, 50, ms * 5 + 1, mr_guidance=0.0)
    assert torch.equal(e0, e0_other_mr)
    assert not torch.allclose(e0, ref, atol=1e-4) and not torch.allclose(e0, direct, atol=1e-4)
    want = net.net(xs, torch.full((2,), 50), null)   # 12 x 10 is a multiple of the tiny net's 2: no padding
    torch.testing.assert_close(e0, want, rtol=0, atol=1e-6)
    net.calls = 0
    eh = run_network(net, xs, 50, ms, mr_guidance=0.5)
    assert net.calls == 2
    torch.testing.assert_close(eh, e0 + 0.5 * (ref - e0), rtol=0, atol=1e-6)


def test_drop_mr_per_sample_and_missing_null():
    net = _net()
    xs, ms = _data(b=3, h=16, w=16)
    t = torch.full((3,), 10)
    with torch.no_grad():
        full = net(xs, t, ms)
        none = net(xs, t, ms, drop_mr=True)
        mixed = net(xs, t, ms, drop_mr=torch.tensor([True, False, True]))
    assert torch.equal(mixed[1], full[1]) and torch.allclose(mixed[0], none[0], atol=1e-6)
    assert torch.allclose(mixed[2], none[2], atol=1e-6) and not torch.allclose(mixed[0], full[0], atol=1e-4)
    plain = _net(mr_null=False)
    assert not any("mr_null" in k for k in plain.state_dict())   # shipped priors' parameter set unchanged
    with pytest.raises(ValueError, match="no MR"):
        plain(xs, t, ms, drop_mr=True)
    with pytest.raises(ValueError, match="mr_null"):
        build_network({**TINY, "use_mr": False, "mr_null": True})


def test_diffusion_prior_refuses_guidance_without_null():
    from sirf_ddip.prior.scaling import PETScaler, default_pet_spec
    from sirf_ddip.prior.schedule import NoiseSchedule
    from sirf_ddip.prior.slabs import DiffusionPrior

    sched = NoiseSchedule(1000, 1e-4, 0.02)
    pet = PETScaler.from_dict(default_pet_spec())
    mr = torch.zeros(4, 16, 16)
    with pytest.raises(ConfigError, match="mr_guidance"):
        DiffusionPrior(_net(mr_null=False), sched, pet, mr_net=mr, mr_guidance=0.5)
    DiffusionPrior(_net(mr_null=False), sched, pet, mr_net=mr, mr_guidance=1.0)
    DiffusionPrior(_net(), sched, pet, mr_net=mr, mr_guidance=0.5)
