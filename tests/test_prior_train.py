"""Pretraining: the loss falls, resume is bit-for-bit, configs are strict, export loads."""

import pytest
import torch

from sirf_ddip.errors import ConfigError, OutputExistsError
from sirf_ddip.prior.data import SlabDataset
from sirf_ddip.prior.train import load_pretrain_config, pretrain
from sirf_ddip.prior.weights import load_prior

from _prior_helpers import TINY_ARCH, blobs

OV = [f"network.channels={TINY_ARCH['channels']}", "network.attention_levels=[false, true]",
      "network.num_head_channels=8", "network.norm_num_groups=4", "train.batch_size=4", "train.log_every=1",
      "train.checkpoint_every=3", "optim.warmup_steps=2", "optim.lr=2e-3", "train.num_threads=1"]


def _dataset():
    vols = [blobs((6, 16, 16), seed=s) for s in range(2)]
    return SlabDataset([v[0] for v in vols], [v[1] for v in vols])


def test_resume_is_bit_for_bit(tmp_path):
    cfg = load_pretrain_config(None, OV + ["train.steps=6"])
    ds = _dataset()
    full = pretrain(cfg, tmp_path / "full", dataset=ds, device="cpu", show_progress=False)
    part = pretrain(cfg, tmp_path / "part", dataset=ds, device="cpu", stop_after=3, show_progress=False)
    assert part["steps"] == 3 and "card" not in part
    res = pretrain(cfg, tmp_path / "part", resume=tmp_path / "part", dataset=ds, device="cpu", show_progress=False)
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, res["model"].state_dict()[k]), k
    for k, v in full["ema"].items():
        assert torch.equal(v, res["ema"][k]), k
    assert (tmp_path / "part" / "prior.safetensors").read_bytes() == (tmp_path / "full" / "prior.safetensors").read_bytes()
    b = load_prior(tmp_path / "full")
    assert b.card["training"]["steps"] == 6 and b.card["training"]["data"]["num_volumes"] == 2
    lines = (tmp_path / "part" / "train_log.csv").read_text().splitlines()
    assert [l.split(",")[0] for l in lines[1:]] == ["1", "2", "3", "4", "5", "6"]
    with pytest.raises(OutputExistsError):
        pretrain(cfg, tmp_path / "full", dataset=ds, device="cpu", show_progress=False)


def test_loss_decreases(tmp_path):
    cfg = load_pretrain_config(None, OV + ["train.steps=40", "train.checkpoint_every=100", "optim.lr=3e-3",
                                           "train.batch_size=8"])
    res = pretrain(cfg, tmp_path / "run", dataset=_dataset(), device="cpu", show_progress=False)
    first = res["mean_loss_first"]
    last = res["mean_loss_last"]
    assert first > 0.5  # an untrained eps-predictor is near the noise variance 1
    assert last < 0.8 * first, (first, last)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_pretrain_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="data.path"):
        load_pretrain_config(None, ["data.source=nifti"])
    p = tmp_path / "c.yaml"
    p.write_text("network: {channels: [12, 16], attention_levels: [false, false], norm_num_groups: 8}\n")
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_pretrain_config(p)
    for name in ("pretrain-default.yaml", "pretrain-gpu.yaml", "pretrain-finetune-lesions.yaml"):
        from pathlib import Path

        cfg = load_pretrain_config(Path(__file__).resolve().parents[1] / "configs" / name)
        assert cfg.network.use_mr and cfg.train.steps > 0


def test_init_from_starts_at_the_given_prior(tmp_path):
    """train.init_from: fine-tuning starts from the prior's weights (lr 0 keeps them exactly; lr > 0 starts at the
    trained prior's loss, not at a random network's), the card names the prior, a mismatch is a named error."""
    ds = _dataset()
    base = pretrain(load_pretrain_config(None, OV + ["train.steps=40", "train.checkpoint_every=100", "optim.lr=3e-3",
                                                     "train.batch_size=8"]),
                    tmp_path / "base", dataset=ds, device="cpu", show_progress=False)
    prior = load_prior(tmp_path / "base")
    cfg0 = load_pretrain_config(None, OV + ["train.steps=2", "optim.lr=0", f"train.init_from={tmp_path / 'base'}",
                                            "train.seed=5"])
    pretrain(cfg0, tmp_path / "frozen", dataset=ds, device="cpu", show_progress=False, stop_after=1)
    frozen = pretrain(cfg0, tmp_path / "frozen", resume=tmp_path / "frozen", dataset=ds, device="cpu",
                      show_progress=False)  # the resumed run still names its starting prior
    for k, v in prior.network.state_dict().items():
        assert torch.equal(v, frozen["model"].state_dict()[k].float()), k
    with pytest.raises(ConfigError, match=r"train\.init_from.*random network"):  # a random start resumed as a fine-tune
        pretrain(cfg0, tmp_path / "base", resume=tmp_path / "base", dataset=ds, device="cpu", show_progress=False)
    card = load_prior(tmp_path / "frozen").card
    assert card["training"]["initialised_from"]["weights_sha256"] == prior.card["weights_sha256"]
    # lr > 0: on the same batches (same seed) a run from the prior has about the trained prior's loss (0.44 vs the
    # base run's last 0.50 measured), a run from a random network twice that (0.99)
    ov = OV + ["train.steps=20", "train.checkpoint_every=100", "optim.lr=3e-4", "train.batch_size=8", "train.seed=1"]
    tuned = pretrain(load_pretrain_config(None, ov + [f"train.init_from={tmp_path / 'base'}"]),
                     tmp_path / "tuned", dataset=ds, device="cpu", show_progress=False)
    fresh = pretrain(load_pretrain_config(None, ov), tmp_path / "fresh", dataset=ds, device="cpu", show_progress=False)
    assert tuned["mean_loss_first"] < 0.7 * fresh["mean_loss_first"], (tuned["mean_loss_first"], fresh["mean_loss_first"])
    assert tuned["mean_loss_first"] < 1.5 * base["mean_loss_last"], (tuned["mean_loss_first"], base["mean_loss_last"])
    with pytest.raises(ConfigError, match=r"train\.init_from.*architecture"):
        pretrain(load_pretrain_config(None, OV[:1] + ["network.attention_levels=[false, false]"] + OV[2:]
                                      + ["train.steps=1", f"train.init_from={tmp_path / 'base'}"]),
                 tmp_path / "other", dataset=ds, device="cpu", show_progress=False)
    assert not (tmp_path / "other").exists()  # checked before anything is written


def test_t_max_bounds_the_noise_levels_trained(tmp_path, monkeypatch):
    """train.t_max: every training t is drawn from U{0, t_max - 1} (without it from the whole schedule); a bound
    outside [0, T] is a ConfigError naming the key."""
    from sirf_ddip.prior import train as train_mod

    seen: list[int] = []
    orig = train_mod.NoiseSchedule.q_sample

    def recording(self, x0, t, noise):
        seen.extend(int(v) for v in t)
        return orig(self, x0, t, noise)

    monkeypatch.setattr(train_mod.NoiseSchedule, "q_sample", recording)
    ds = _dataset()
    ov = OV + ["train.steps=5", "train.batch_size=8", "train.checkpoint_every=100"]
    pretrain(load_pretrain_config(None, ov + ["train.t_max=50"]), tmp_path / "low", dataset=ds, device="cpu",
             show_progress=False)
    assert len(seen) == 40 and max(seen) < 50 and max(seen) >= 25, seen   # P(all 40 draws < 25) = 2^-40
    seen.clear()
    pretrain(load_pretrain_config(None, ov), tmp_path / "all", dataset=ds, device="cpu", show_progress=False)
    assert len(seen) == 40 and max(seen) >= 50, seen                       # P(all < 50 of 1000) = 0.05^40
    with pytest.raises(ConfigError, match=r"train\.t_max"):
        load_pretrain_config(None, OV + ["train.t_max=1001"])


def test_shipped_lesion_finetune_config_fits_the_shipped_prior():
    """configs/pretrain-finetune-lesions.yaml starts from the shipped prior: its network, schedule and scalings
    must be the shipped card's, and the subjects it asks for hold hot and cold lesions."""
    from pathlib import Path

    from sirf_ddip.prior.network import build_network
    from sirf_ddip.prior.train import arch_of, load_initial_weights

    cfg = load_pretrain_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain-finetune-lesions.yaml")
    assert cfg.train.init_from == "default"
    assert set(cfg.data.subject_options["lesion_kinds"]) == {"hot", "cold"} and cfg.data.subject_options["lesions"]
    model = build_network(arch_of(cfg))
    info = load_initial_weights(model, cfg)
    shipped = load_prior("default")
    assert info["weights_sha256"] == shipped.card["weights_sha256"]
    for k, v in shipped.network.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_mr_dropout_finetunes_a_prior_without_null_mr(tmp_path, monkeypatch):
    """train.mr_dropout: a prior without the learned "no MR" input starts an MR-dropout run (every shared weight
    copied, lr 0 keeps them exactly), about the asked fraction of samples get the null MR, and mr_dropout without
    network.mr_null is a ConfigError naming the key."""
    from sirf_ddip.prior.network import ScoreNetwork

    ds = _dataset()
    pretrain(load_pretrain_config(None, OV + ["train.steps=2", "train.checkpoint_every=100"]), tmp_path / "base",
             dataset=ds, device="cpu", show_progress=False)
    dropped: list[float] = []
    orig = ScoreNetwork.forward

    def recording(self, x_t, t, mr=None, drop_mr=None):
        dropped.append(float(torch.as_tensor(drop_mr).float().mean()) if drop_mr is not None else 0.0)
        return orig(self, x_t, t, mr, drop_mr)

    monkeypatch.setattr(ScoreNetwork, "forward", recording)
    cfg = load_pretrain_config(None, OV + ["train.steps=30", "train.batch_size=8", "optim.lr=0",
                                           "train.checkpoint_every=100", "network.mr_null=true",
                                           "train.mr_dropout=0.25", f"train.init_from={tmp_path / 'base'}"])
    out = pretrain(cfg, tmp_path / "drop", dataset=ds, device="cpu", show_progress=False)
    frac = sum(dropped[:30]) / 30
    assert 0.15 < frac < 0.35, frac          # 240 Bernoulli(0.25) draws: sd 0.028
    base = load_prior(tmp_path / "base").network.state_dict()
    sd = out["model"].state_dict()
    assert set(sd) - set(base) == {"mr_null"}
    for k, v in base.items():
        assert torch.equal(v, sd[k].float()), k
    assert load_prior(tmp_path / "drop").network.has_mr_null
    with pytest.raises(ConfigError, match=r"train\.mr_dropout"):
        load_pretrain_config(None, OV + ["train.mr_dropout=0.2"])
