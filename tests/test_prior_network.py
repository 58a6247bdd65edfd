"""ScoreNetwork: shapes, clear input errors, test re-initialisation, einops-free attention."""

import pytest
import torch

from sirf_ddip.prior.network import _Rearrange, build_network, crop_padding, pad_to_multiple, reinit_zero_layers, resolve_arch

from _prior_helpers import TINY_ARCH


def test_forward_shapes_and_time_dependence():
    net = build_network(TINY_ARCH)
    assert net.uses_mr and net.slab == 3 and net.in_channels == 6
    assert reinit_zero_layers(net, 0.05) >= 1
    x = torch.randn(2, 3, 16, 16)
    mr = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([10, 10]), mr).detach()
    assert out.shape == (2, 3, 16, 16)
    assert float(out.abs().mean()) > 0
    out2 = net(x, torch.tensor([900, 900]), mr).detach()
    assert float((out - out2).abs().max()) > 1e-4  # timestep embedding matters
    out3 = net(x, torch.tensor([10, 10]), -mr).detach()
    assert float((out - out3).abs().max()) > 1e-4  # MR matters
    assert torch.allclose(net(x, 10, mr), out)  # scalar t broadcasts


def test_clear_errors():
    net = build_network(TINY_ARCH)
    with pytest.raises(ValueError, match="3-plane PET slab"):
        net(torch.randn(1, 6, 16, 16), torch.tensor([1]), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="MR-conditioned"):
        net(torch.randn(1, 3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(1, 3, 15, 16), torch.tensor([1]), torch.randn(1, 3, 15, 16))
    nomr = build_network({**TINY_ARCH, "use_mr": False})
    assert nomr.in_channels == 3
    with pytest.raises(ValueError, match="not MR-conditioned"):
        nomr(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown key"):
        resolve_arch({"chanels": [8]})
    with pytest.raises(ValueError, match="norm_num_groups"):
        resolve_arch({"channels": [12, 16], "attention_levels": [False, False], "norm_num_groups": 8})


def test_zero_init_then_reinit():
    net = build_network(TINY_ARCH)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert float(net(x, 5, x).abs().max()) == 0.0  # MONAI zero-initialises the output conv
    n = reinit_zero_layers(net, 0.02, generator=torch.Generator().manual_seed(0))
    assert n >= 2
    with torch.no_grad():
        assert float(net(x, 5, x).abs().max()) > 0


def test_rearrange_standin_matches_einops_semantics():
    x = torch.arange(2 * 5 * 12, dtype=torch.float32).reshape(2, 5, 12)
    r = _Rearrange("b h (l d) -> b l h d", l=3)(x)
    assert r.shape == (2, 3, 5, 4)
    assert torch.equal(r[1, 2, 4], x[1, 4, 8:12])  # head l takes features l*d .. (l+1)*d
    back = _Rearrange("b l h d -> b h (l d)")(r)
    assert torch.equal(back, x)


def test_pad_crop_roundtrip():
    x = torch.randn(2, 3, 13, 10)
    xp, pad = pad_to_multiple(x, 8)
    assert xp.shape[-2:] == (16, 16)
    assert torch.equal(crop_padding(xp, pad), x)
