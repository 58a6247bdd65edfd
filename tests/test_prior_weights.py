"""Weights: safetensors + card, hash check, round trip, the shipped default."""

import json

import pytest
import torch

from sirf_ddip.errors import InputFileError, OutputExistsError
from sirf_ddip.prior.network import build_network, reinit_zero_layers
from sirf_ddip.prior.scaling import MRScaler, PETScaler
from sirf_ddip.prior.schedule import NoiseSchedule
from sirf_ddip.prior.weights import default_weights_path, load_default, load_prior, read_card, save_prior

from _prior_helpers import TINY_ARCH


def _save(tmp_path, dtype="float32"):
    net = build_network(TINY_ARCH)
    reinit_zero_layers(net, 0.05)
    card = save_prior(tmp_path / "p.safetensors", net, NoiseSchedule(), PETScaler({"percentile": 98.0}), MRScaler(),
                      training={"steps": 3, "data": "blobs"}, dtype=dtype)
    return net, card


def test_roundtrip_fp32_exact_and_card(tmp_path):
    net, card_path = _save(tmp_path)
    card = json.loads(card_path.read_text())
    for key in ("architecture", "schedule", "pet_scaling", "mr_scaling", "training", "weights_sha256", "created",
                "versions", "num_parameters"):
        assert key in card
    assert card["pet_scaling"]["percentile"] == 98.0 and card["training"]["steps"] == 3
    b = load_prior(tmp_path / "p.safetensors")
    assert b.network.arch == net.arch and b.uses_mr
    assert b.pet_scaling.spec["percentile"] == 98.0 and b.mr_scaling is not None
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(b.network(x, 3, x), net(x, 3, x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in b.network.parameters())
    # a folder with one prior also loads; the card alone is readable
    assert load_prior(tmp_path).card["weights_sha256"] == card["weights_sha256"]
    assert read_card(tmp_path / "p.card.json")["format"] == "sirf_ddip-prior/1"


def test_fp16_storage_close(tmp_path):
    net, _ = _save(tmp_path, "float16")
    b = load_prior(tmp_path / "p.safetensors")
    x = torch.randn(1, 3, 16, 16)
    ref = net(x, 3, x).detach()
    assert float((b.network(x, 3, x) - ref).abs().max()) < 2e-3 * float(ref.abs().max()) + 1e-4
    assert next(b.network.parameters()).dtype == torch.float32


def test_corrupt_and_missing(tmp_path):
    _save(tmp_path)
    w = tmp_path / "p.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="SHA-256"):
        load_prior(w)
    with pytest.raises(InputFileError, match="not found"):
        load_prior(tmp_path / "nope.safetensors")
    with pytest.raises(OutputExistsError):
        _save(tmp_path)


def test_load_default():
    if not default_weights_path().is_file():
        pytest.fail(f"default prior weights missing: {default_weights_path()}")
    b = load_default(device="cpu")
    assert b.uses_mr and b.network.slab == 3
    assert default_weights_path().stat().st_size <= 25 * 2 ** 20
    assert b.card["training"]["steps"] > 0
