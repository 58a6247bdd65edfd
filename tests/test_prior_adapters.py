"""LoRA adapters: identity at start, trainable, resettable, saveable."""

import pytest
import torch

from sirf_ddip.prior.adapters import (adapter_state_dict, add_lora, base_state_dict, load_adapter_state_dict,
                                      lora_info, lora_parameters, reset_adapters)
from sirf_ddip.prior.network import build_network, reinit_zero_layers

from _prior_helpers import TINY_ARCH


def _net():
    net = build_network(TINY_ARCH)
    reinit_zero_layers(net, 0.05, generator=torch.Generator().manual_seed(0))
    return net


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([50, 300]), torch.randn(2, 3, 16, 16, generator=g)


def test_identity_at_start_and_frozen_base():
    net = _net()
    x, t, mr = _inputs()
    ref = net(x, t, mr).detach()
    add_lora(net, rank=4)
    assert torch.equal(net(x, t, mr), ref)
    info = lora_info(net)
    assert info["rank"] == 4 and info["num_layers"] >= 6
    params = lora_parameters(net)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert n_train == sum(p.numel() for p in params) > 0
    assert n_train < 0.5 * sum(p.numel() for p in net.parameters())
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert any("attn.to_q" in n for n in names) and any("conv1.conv" in n for n in names)
    with pytest.raises(ValueError, match="already"):
        add_lora(net)


def test_training_changes_output_and_reset_restores():
    net = _net()
    x, t, mr = _inputs()
    ref = net(x, t, mr).detach()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    add_lora(net, rank=2, alpha=4)
    opt = torch.optim.Adam(lora_parameters(net), lr=1e-2)
    target = torch.zeros_like(ref)
    losses = []
    for _ in range(5):
        loss = (net(x, t, mr) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert float((net(x, t, mr) - ref).abs().max()) > 1e-3
    saved = adapter_state_dict(net)
    trained_out = net(x, t, mr).detach()
    # base weights untouched (biases are adapter parameters and may move)
    for k, v in base_state_dict(net).items():
        if not k.endswith("bias"):
            assert torch.equal(v, base[k]), k
    reset_adapters(net)
    assert torch.equal(net(x, t, mr), ref)
    load_adapter_state_dict(net, saved)
    assert torch.equal(net(x, t, mr), trained_out)
    bad = dict(saved)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(net, bad)


def test_without_bias_training():
    net = _net()
    add_lora(net, rank=4, train_biases=False)
    assert all("lora_" in n for n, p in net.named_parameters() if p.requires_grad)
