"""The network speed levers of DDIP's run path (issue 33): channels-last memory order and bf16 autocast.

channels-last is a memory layout: the same network on the same slabs gives the same ε up to float rounding, so a
whole DDIP run gives the same image. bf16 autocast runs the network's convolutions and matmuls in bfloat16 (8
mantissa bits, relative rounding 2^-8 = 0.4 %): ε must differ from float32's (else the autocast did nothing) but
stay within a few bf16 roundings, and the image comes back in float32.
"""

from __future__ import annotations

import pytest
import torch

from sirf_ddip.errors import ConfigError
from sirf_ddip.prior.slabs import run_network
from sirf_ddip.recon.config import DDIPConfig
from test_ddip_support import DenseDataStep, make_ddip, one_torch_thread, tiny_bundle

FAST = dict(t_start=30, num_steps=3, n_init=4, num_em=2, device="cpu", seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def _slabs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)


def test_run_network_channels_last_and_bf16_against_float32(bundle):
    xs, ms = _slabs()
    net = bundle.network
    ref = run_network(net, xs, 200, ms)
    cl_net = type(net)(net.arch)
    cl_net.load_state_dict(net.state_dict())
    cl_net = cl_net.eval().to(memory_format=torch.channels_last)
    cl = run_network(cl_net, xs, 200, ms, channels_last=True)
    assert cl.dtype == torch.float32 and cl.is_contiguous()
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    bf = run_network(net, xs, 200, ms, precision="bfloat16")
    assert bf.dtype == torch.float32
    err = float((bf - ref).abs().max() / ref.abs().max())
    assert 1e-4 < err < 0.05, err      # bf16 really ran (not bit-equal) and stays within a few roundings
    with pytest.raises(ConfigError, match="network_precision"):
        run_network(net, xs, 200, ms, precision="float16")


def test_ddip_channels_last_gives_the_same_image(bundle):
    ds = DenseDataStep(shape=(5, 16, 16))
    ref = make_ddip(ds, bundle, FAST)
    ref.process(progress=False)
    cl = make_ddip(ds, bundle, FAST, channels_last=True)
    assert next(p for p in cl.network.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    cl.process(progress=False)
    scale = float(ref.x.abs().max())
    torch.testing.assert_close(cl.x, ref.x, rtol=1e-4, atol=1e-4 * scale)
    assert cl.counts["slab_forwards"] == ref.counts["slab_forwards"] > 0


def test_ddip_bf16_runs_in_bf16_and_returns_a_float_image_near_float32(bundle):
    ds = DenseDataStep(shape=(5, 16, 16))
    ref = make_ddip(ds, bundle, FAST)
    ref.process(progress=False)
    bf = make_ddip(ds, bundle, FAST, network_precision="bfloat16")
    bf.process(progress=False)
    assert bf.x.dtype == ref.x.dtype and bool(torch.isfinite(bf.x).all())
    rel = float((bf.x - ref.x).norm() / ref.x.norm())
    assert 0 < rel < 0.05, rel


def test_network_precision_is_an_algorithm_key_and_channels_last_a_run_option():
    cfg = DDIPConfig.shipped({"network_precision": "bfloat16", "channels_last": True})
    assert cfg.algorithm_dict()["network_precision"] == "bfloat16"      # a checkpoint must match it
    assert "channels_last" not in cfg.algorithm_dict() and cfg.run.channels_last is True
    assert DDIPConfig().network_precision == "float32" and DDIPConfig().channels_last is False
    with pytest.raises(ConfigError, match="network_precision"):
        DDIPConfig.shipped({"network_precision": "half"})
