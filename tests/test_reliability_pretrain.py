"""``pretrain --resume`` continues only the run its checkpoint holds (issue 36).

A resume with another value of a key that defines what the checkpoint trained (the network, the noise schedule,
the training data, the seeds and batch) is refused with one line naming the key and both values, before any data
are built; a changed learning rate goes on with a warning naming both values, kept in the run record and on the
card; a truncated or foreign checkpoint is a named error (exit 2), never a traceback.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from sirf_ddip.cli import main
from sirf_ddip.errors import InputFileWarning, ResumeMismatchError
from sirf_ddip.prior.data import SlabDataset
from sirf_ddip.prior.train import load_pretrain_config, pretrain
from sirf_ddip.prior.weights import load_prior

from _prior_helpers import TINY_ARCH, blobs

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain-default.yaml"
OV = [f"network.channels={TINY_ARCH['channels']}", "network.attention_levels=[false, true]",
      "network.num_head_channels=8", "network.norm_num_groups=4", "train.batch_size=4", "train.log_every=1",
      "train.checkpoint_every=2", "optim.warmup_steps=1", "optim.lr=2e-3", "train.num_threads=1",
      "train.steps=4", "train.export_dtype=float32", "train.max_seconds=0", "data.num_subjects=1",
      "data.grid_planes=4", "data.grid_xy=16"]  # tiny data too: a resume that is not refused builds them


def _dataset():
    vols = [blobs((6, 16, 16), seed=s) for s in range(2)]
    return SlabDataset([v[0] for v in vols], [v[1] for v in vols])


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    """A run of the default config (tiny network) stopped after 2 of 4 steps: its checkpoint."""
    d = tmp_path_factory.mktemp("pretrain") / "part"
    cfg = load_pretrain_config(CONFIG, OV)
    pretrain(cfg, d, dataset=_dataset(), device="cpu", stop_after=2, show_progress=False)
    assert (d / "checkpoint.pt").is_file()
    return d


def _cli(out: Path, resume: Path, *sets: str) -> list[str]:
    args = ["pretrain", str(CONFIG), "--out", str(out), "--device", "cpu", "--resume", str(resume)]
    for kv in (*OV, *sets):
        args += ["--set", kv]
    return args


@pytest.mark.parametrize("key, now, was", [
    ("schedule.num_train_steps", "500", "1000"),
    ("data.seed", "7", "0"),
    ("data.num_subjects", "2", "1"),
    ("train.seed", "5", "0"),
    ("train.batch_size", "2", "4"),
    ("network.slab", "5", "3"),
])
def test_a_resume_that_changes_what_was_trained_is_refused(tmp_path, capsys, part, key, now, was):
    out = tmp_path / "r"
    assert main(_cli(out, part, f"{key}={now}")) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sirf-ddip pretrain: error: ")
    assert f"checkpoint.pt [key '{key}']: the checkpoint was trained with " in err
    if was is not None:
        assert f"trained with {was}, the config says {now}:" in err
    assert not out.exists()  # refused before anything is built or written


def test_a_changed_learning_rate_is_warned_and_recorded_on_the_card(tmp_path, part):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(part, run)
    cfg = load_pretrain_config(CONFIG, OV + ["optim.lr=1e-3"])
    with pytest.warns(InputFileWarning) as rec:
        pretrain(cfg, run, resume=run, dataset=_dataset(), device="cpu", show_progress=False)
    msgs = [str(w.message) for w in rec if isinstance(w.message, InputFileWarning)]
    assert any("[key 'optim.lr']: optim.lr changed on resume: 0.002 in the checkpoint, 0.001 now; steps after 2 "
               "use 0.001" in m for m in msgs), msgs
    change = {"key": "optim.lr", "checkpoint": 0.002, "now": 0.001, "from_step": 2}
    assert load_prior(run).card["training"]["resume_changes"] == [change]
    assert json.loads((run / "run_record.json").read_text())["resume_changes"] == [change]


def test_an_unchanged_resume_warns_nothing(tmp_path, part):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(part, run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputFileWarning)
        pretrain(load_pretrain_config(CONFIG, OV), run, resume=run, dataset=_dataset(), device="cpu",
                 show_progress=False)
    assert load_prior(run).card["training"]["resume_changes"] == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_a_damaged_checkpoint_is_a_named_error(tmp_path, capsys, part, damage):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (part / "checkpoint.pt").read_bytes()
    if damage == "truncated":
        (bad / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        (bad / "checkpoint.pt").write_bytes(b"")
    else:
        import torch

        torch.save({"weights": torch.zeros(2)}, bad / "checkpoint.pt")
    assert main(_cli(tmp_path / "r", bad)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"sirf-ddip pretrain: error: {bad / 'checkpoint.pt'}: " in err
    assert ("not a sirf-ddip pretraining checkpoint (missing step" in err if damage == "foreign"
            else "cannot read the checkpoint (truncated or corrupt?)" in err)
    with pytest.raises(ResumeMismatchError):  # the Python API raises the same named errors
        pretrain(load_pretrain_config(CONFIG, OV + ["data.seed=3"]), tmp_path / "r2", resume=part,
                 dataset=_dataset(), device="cpu", show_progress=False)
