"""What ships with the package: default settings, named priors, the demo configuration."""

from __future__ import annotations

import json

import pytest

from sirf_ddip.prior.weights import DEFAULT_DIR, load_prior, read_card, shipped_prior_names
from sirf_ddip.recon.config import SHIPPED_CONFIG, DDIPConfig


def test_shipped_ddip_config_is_the_cli_default_and_valid():
    from sirf_ddip.cli.recon import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == SHIPPED_CONFIG and SHIPPED_CONFIG.is_file()
    cfg = DDIPConfig.shipped()
    # the tuned values documented in the file's header
    assert cfg.t_start == 600 and cfg.beta == pytest.approx(10.0) and cfg.num_steps == 50
    assert DDIPConfig.shipped({"beta": 0.5}).beta == 0.5


def test_named_shipped_priors_load_with_hash_check():
    names = shipped_prior_names()
    assert {"default", "no-mr"} <= set(names)
    card = read_card("no-mr")
    assert card["architecture"]["use_mr"] is False
    assert read_card("default")["architecture"]["use_mr"] is True
    b = load_prior("no-mr", device="cpu")
    assert not b.uses_mr
    for stem in ("default", "no_mr"):
        c = json.loads((DEFAULT_DIR / f"{stem}.card.json").read_text())
        assert c["weights_file"] == f"{stem}.safetensors"
        assert (DEFAULT_DIR / c["weights_file"]).stat().st_size < 25 * 2**20


def test_demo_config_is_a_valid_study():
    from sirf_ddip.cli.study import DEMO_CONFIG
    from sirf_ddip.study.study import load_study_config

    cfg = load_study_config(DEMO_CONFIG)
    assert [c.tracer for c in cfg.cases] == ["amyloid-negative"]
    assert cfg.methods.ddip.enabled and cfg.methods.osem.enabled
    # the demo runs the shipped DDIP settings
    assert cfg.ddip_config("ddip")["t_start"] == DDIPConfig.shipped().t_start
