"""Named DDIP presets (issue 35): superseded releases and the authors' settings as ``--preset NAME``, and the
warning for a superseded value set by hand."""

from __future__ import annotations

import warnings

import pytest

from sirf_ddip.errors import ConfigError, ConfigWarning
from sirf_ddip.recon.config import PAPER_SETTINGS, PRESETS, SUPERSEDED, DDIPConfig


def test_presets_layer_over_the_shipped_settings():
    shipped = DDIPConfig.shipped()
    old = DDIPConfig.preset("0.4")
    # the 0.2-0.4 settings as recon/ddip.yaml documented them before 0.5 (--set t_start=600 --set ddim_x0=network
    # --set beta_final=null --set correction_sigma_vox=0)
    assert (old.t_start, old.ddim_x0, old.beta_final, old.correction_sigma_vox) == (600, "network", None, 0.0)
    changed = {k for k, v in old.algorithm_dict().items() if shipped.algorithm_dict()[k] != v}
    assert changed == {"t_start", "ddim_x0", "beta_final", "correction_sigma_vox"}
    assert DDIPConfig.preset("0.2").prior_planes == "all" and DDIPConfig.preset("0.2").t_start == 600
    v01 = DDIPConfig.preset("0.1")
    assert (v01.eta_mode, v01.lora_init, v01.adapter_rule, v01.finetune_target, v01.fov_mask) == \
        ("ddim", "peft", "legacy", "fold", False)
    assert DDIPConfig.preset("paper") == DDIPConfig.paper()
    assert {k: DDIPConfig.paper().algorithm_dict()[k] for k in PAPER_SETTINGS} == PAPER_SETTINGS
    assert DDIPConfig.preset("0.4", {"seed": 3}).seed == 3
    assert sorted(PRESETS) == ["0.1", "0.2", "0.4", "paper"]
    with pytest.raises(ConfigError, match="unknown preset '0.3'.*paper, 0.4"):
        DDIPConfig.preset("0.3")


def test_every_superseded_value_is_set_by_its_preset():
    for key, (value, preset) in SUPERSEDED.items():
        assert getattr(DDIPConfig.preset(preset), key) == value
        assert getattr(DDIPConfig.shipped(), key) != value


def test_a_superseded_value_set_by_hand_loads_with_a_warning(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("eta_mode: ddim\nbeta: 3.0\n")
    with pytest.warns(ConfigWarning, match=r"old.yaml: key 'eta_mode' = 'ddim' .*--preset 0.1"):
        cfg = DDIPConfig.load(old)
    assert cfg.eta_mode == "ddim" and cfg.beta == 3.0           # still loads (backwards compatible)
    with pytest.warns(ConfigWarning, match=r"--set: key 'prior_planes' = 'all' .*--preset 0.2"):
        DDIPConfig.load(None, ["prior_planes=all"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DDIPConfig.preset("0.1")                                    # a preset itself does not warn
        DDIPConfig.load(None, ["eta_mode=dds"])                     # nor the current value


def test_cli_preset_then_config_then_set(tmp_path):
    from sirf_ddip.cli import recon as cli_recon

    part = tmp_path / "part.yaml"
    part.write_text("t_start: 500\n")
    cfg, _ = cli_recon.resolve_config(str(part), ["beta=4"], None, "cpu", False, preset="0.4")
    assert (cfg.t_start, cfg.ddim_x0, cfg.beta, cfg.beta_final) == (500, "network", 4.0, None)
    cfg, path = cli_recon.resolve_config(None, [], None, "cpu", False, preset="0.4")
    assert cfg.t_start == 600 and path == cli_recon.DEFAULT_CONFIG   # the shipped file does not undo the preset
    with pytest.raises(ConfigError, match="unknown preset"):
        cli_recon.resolve_config(None, [], None, "cpu", False, preset="9")
    import argparse

    parser = argparse.ArgumentParser()
    cli_recon.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["recon", "--prompts", "p.hs", "--out", "o.hv", "--preset", "paper"])
    assert args.preset == "paper"
