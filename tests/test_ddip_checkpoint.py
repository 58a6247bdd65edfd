"""DDIP checkpoint files (recon/checkpoint.py): round trip and every refusal, each a named error naming the key."""

from __future__ import annotations

import pytest
import torch

from sirf_ddip.errors import ConfigError, InputFileError
from sirf_ddip.recon import checkpoint as ck

CFG = {"beta": 10.0, "num_steps": 50, "eta_mode": "dds"}
SHAPE = (3, 4, 5)


def _state(it: int = 7) -> dict:
    return {"iteration": it, "image_shape": list(SHAPE), "x": torch.arange(60.0).reshape(SHAPE)}


def test_round_trip(tmp_path):
    ck.write_checkpoint(tmp_path, _state(), CFG)
    st = ck.read_checkpoint(tmp_path, CFG, SHAPE)
    assert st["iteration"] == 7 and torch.equal(st["x"], _state()["x"])
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_corrupt_and_other_format(tmp_path):
    with pytest.raises(InputFileError, match="no DDIP checkpoint here"):
        ck.read_checkpoint(tmp_path, CFG, SHAPE)
    path = ck.write_checkpoint(tmp_path, _state(), CFG)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])                     # truncated: a killed copy, a full disk
    with pytest.raises(InputFileError, match="cannot read checkpoint"):
        ck.read_checkpoint(tmp_path, CFG, SHAPE)
    torch.save({"format": "sirf_ddip-ddip-checkpoint/1", "config": "{}", **_state()}, path)
    with pytest.raises(InputFileError, match=r"unknown checkpoint format 'sirf_ddip-ddip-checkpoint/1'") as e:
        ck.read_checkpoint(tmp_path, CFG, SHAPE)
    assert e.value.key == "format"


def test_other_settings_and_other_shape_are_refused(tmp_path):
    ck.write_checkpoint(tmp_path, _state(), CFG)
    with pytest.raises(ConfigError, match=r"beta \(checkpoint 10.0, now 3.0\)"):
        ck.read_checkpoint(tmp_path, {**CFG, "beta": 3.0}, SHAPE)
    with pytest.raises(InputFileError, match=r"image shape \[3, 4, 5\] != \[3, 4, 6\]"):
        ck.read_checkpoint(tmp_path, CFG, (3, 4, 6))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck.write_checkpoint(tmp_path, _state(7), CFG)

    def disk_full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(OSError):
        ck.write_checkpoint(tmp_path, _state(9), CFG)
    monkeypatch.undo()
    assert ck.read_checkpoint(tmp_path, CFG, SHAPE)["iteration"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CHECKPOINT_FILE, ck.SIDECAR_FILE]  # no partial left


def test_key_added_after_the_checkpoint_counts_as_its_default(tmp_path):
    """A checkpoint written before a key existed resumes when this run uses the key's default (the behaviour of
    the version that wrote it) and is refused, naming the key, when it does not."""
    ck.write_checkpoint(tmp_path, _state(), CFG)                 # no 'ddim_x0' in it
    now = {**CFG, "ddim_x0": "network"}
    assert ck.read_checkpoint(tmp_path, now, SHAPE, defaults={"ddim_x0": "network"})["iteration"] == 7
    with pytest.raises(ConfigError, match=r"ddim_x0 \(checkpoint 'network', now 'hqs'\)"):
        ck.read_checkpoint(tmp_path, {**CFG, "ddim_x0": "hqs"}, SHAPE, defaults={"ddim_x0": "network"})
    with pytest.raises(ConfigError, match="ddim_x0"):
        ck.read_checkpoint(tmp_path, now, SHAPE)                # without defaults: a missing key differs
