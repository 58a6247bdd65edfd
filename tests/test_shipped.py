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
    assert cfg.t_start == 400 and cfg.beta == pytest.approx(10.0) and cfg.num_steps == 50
    assert (cfg.ddim_x0, cfg.beta_final, cfg.correction_sigma_vox) == ("hqs", 3.0, 2.0)   # lesion-first (0.5)
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
    assert cfg.ddip_config("ddip") == DDIPConfig.shipped(
        {"device": cfg.device})


def test_dataclass_defaults_are_the_shipped_file():
    """One source of truth: DDIPConfig() == sirf_ddip/recon/ddip.yaml, key by key, and the file names every key."""
    import dataclasses

    from sirf_ddip.config import read_yaml

    assert DDIPConfig() == DDIPConfig.shipped()
    raw = read_yaml(SHIPPED_CONFIG)
    names = {f.name for f in dataclasses.fields(DDIPConfig)}
    assert set(raw) == names                      # every key written out, algorithm keys flat, run options in run:
    assert set(raw["run"]) == {f.name for f in dataclasses.fields(DDIPConfig().run)}
    assert DDIPConfig().to_dict() == DDIPConfig.from_dict(raw).to_dict()


def test_partial_config_layers_over_the_shipped_settings(tmp_path):
    from sirf_ddip.errors import ConfigError

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert DDIPConfig.load(empty) == DDIPConfig.shipped()             # not the paper's beta
    part = tmp_path / "part.yaml"
    part.write_text("beta: 3.0\nrun:\n  device: cpu\n")
    cfg = DDIPConfig.load(part, ["num_threads=2"])
    assert cfg.beta == 3.0 and cfg.device == "cpu" and cfg.run.num_threads == 2
    assert cfg.t_start == DDIPConfig.shipped().t_start
    assert cfg.algorithm_dict() == DDIPConfig.shipped({"beta": 3.0}).algorithm_dict()   # run options apart
    with pytest.raises(ConfigError, match="'num_steps' expects an integer"):
        DDIPConfig.load(None, ["num_steps=1.5"])
    with pytest.raises(ConfigError, match="'n_init'"):
        DDIPConfig.load(None, ["n_init=true"])
    assert DDIPConfig.paper().beta == pytest.approx(0.01 / 4)        # the paper's 0.01 in [0, 1] units
    # the authors' code: constant beta, the adapted network's x0, an unsmoothed correction (not the 0.5 shipped set)
    paper = DDIPConfig.paper()
    assert (paper.t_start, paper.beta_final, paper.ddim_x0, paper.correction_sigma_vox) == (200, None, "network", 0.0)


def test_library_does_not_change_torch_threads():
    import numpy as np
    import torch

    from sirf_ddip.recon.ddip import DDIPReconstructor
    from test_ddip_support import DenseDataStep, tiny_bundle

    n = torch.get_num_threads()
    ds = DenseDataStep()
    r = DDIPReconstructor(t_start=5, num_steps=1, n_init=1, num_em=1, device="cpu", num_threads=n + 1)
    r.set_objective_function(ds)
    r.set_prior(tiny_bundle())
    r.set_anatomical_image(ds.mr.numpy())
    r.set_up(np.ones(ds.image_shape))
    r.run(1)
    assert torch.get_num_threads() == n
