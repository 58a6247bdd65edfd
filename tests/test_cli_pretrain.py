"""``sirf-ddip pretrain`` a few steps on a tiny network and tiny phantom data, through the CLI.

Checks: the exported prior loads with the trained architecture and records the steps; the log has one row per
step; resuming to more steps reproduces an uninterrupted run bit for bit; a resume whose config changes the
architecture, or asks for fewer steps than the checkpoint holds, is refused with a named error (exit 2, the
message naming the checkpoint); ``train.amp`` is a no-op on CPU (bit-identical weights); ``train.max_seconds``
stops early, checkpoints and exports what was done.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from sirf_ddip.cli import main
from sirf_ddip.prior.weights import load_prior

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain-default.yaml"
TINY = ["network.channels=[8, 16]", "network.attention_levels=[false, true]", "network.num_head_channels=8",
        "network.norm_num_groups=4", "data.num_subjects=1", "data.grid_planes=4", "data.grid_xy=16",
        "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2", "optim.warmup_steps=1",
        "optim.lr_schedule=constant",
        "train.max_seconds=0", "train.export_dtype=float32"]


def _pretrain(out: Path, *sets: str, resume: Path | None = None) -> int:
    args = ["pretrain", str(CONFIG), "--out", str(out), "--device", "cpu"]
    for kv in (*TINY, *sets):
        args += ["--set", kv]
    if resume is not None:
        args += ["--resume", str(resume)]
    return main(args)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_prior(out).network.state_dict()


def _log_steps(out: Path) -> list[int]:
    with (out / "train_log.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrain")
    assert _pretrain(d / "four", "train.steps=4") == 0
    return d


def test_pretrain_exports_a_loadable_prior_with_its_record(runs):
    out = runs / "four"
    b = load_prior(out)
    assert b.card["training"]["steps"] == 4 and b.card["training"]["batch_size"] == 2
    assert b.card["architecture"]["channels"] == [8, 16] and b.network.uses_mr
    assert _log_steps(out) == [1, 2, 3, 4]
    with (out / "train_log.csv").open() as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    # an untrained ε-predictor's loss is about the noise variance, 1
    assert all(0.3 < v < 3.0 for v in losses), losses


def test_resume_to_more_steps_equals_an_uninterrupted_run(runs):
    """With a constant LR (the cosine schedule depends on train.steps, so extending changes it by design)."""
    assert _pretrain(runs / "six", "train.steps=6") == 0
    assert _pretrain(runs / "four_to_six", "train.steps=6", resume=runs / "four") == 0
    a, b = _weights(runs / "six"), _weights(runs / "four_to_six")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log_steps(runs / "four_to_six")[-2:] == [5, 6]


def test_resume_with_a_changed_config_is_refused(runs, capsys):
    capsys.readouterr()
    rc = _pretrain(runs / "bad_arch", "train.steps=6", "network.channels=[8, 24]", resume=runs / "four")
    assert rc == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "architecture" in err and "differs" in err
    rc = _pretrain(runs / "bad_steps", "train.steps=3", resume=runs / "four")
    assert rc == 2
    err = capsys.readouterr().err
    assert "checkpoint at step 4 is past train.steps 3" in err


def test_amp_is_a_no_op_on_cpu(runs):
    assert _pretrain(runs / "amp_off", "train.steps=4", "train.amp=false") == 0
    a, b = _weights(runs / "four"), _weights(runs / "amp_off")   # "four" ran with the config's amp: true
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_seconds_stops_early_and_exports(runs):
    assert _pretrain(runs / "capped", "train.steps=1000", "train.max_seconds=1e-6") == 0
    b = load_prior(runs / "capped")
    done = b.card["training"]["steps"]
    assert 1 <= done < 1000
    assert _log_steps(runs / "capped")[-1] == done
    assert (runs / "capped" / "checkpoint.pt").is_file()
