"""``recon --resume`` end to end: a checkpoint continues only with the inputs it was made from.

Uses the tiny dense physics and tiny priors of :mod:`test_cli_recon` (its fixtures), the real CLI otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.io import read_image
from test_cli_recon import FAST, _patch, _runw, files, weights  # noqa: F401  (fixtures)


def _interrupted_run(monkeypatch, w, args) -> int:
    from sirf_ddip.recon.ddip import DDIPReconstructor

    orig = DDIPReconstructor._update
    calls = {"n": 0}

    def interrupted(self, x):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return orig(self, x)

    monkeypatch.setattr(DDIPReconstructor, "_update", interrupted)
    try:
        return _runw(w, args)
    finally:
        monkeypatch.setattr(DDIPReconstructor, "_update", orig)


@pytest.mark.slow
def test_resume_with_changed_prompts_is_refused_and_names_them(files, monkeypatch, capsys):
    d, mr, prompts, w = files
    part = d / "part.hv"
    args = ["--prompts", prompts, "--mr", mr, "--out", part, *FAST]
    assert _interrupted_run(monkeypatch, w, args) == 130
    ck = d / "part_checkpoint"
    assert (ck / "ddip_checkpoint.pt").is_file() and (ck / "inputs.json").is_file()
    original = prompts.read_bytes()
    prompts.write_bytes(original + b"; other prompts\n")
    capsys.readouterr()
    assert _runw(w, [*args, "--resume", ck]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with other inputs than the checkpoint's: prompts changed" in err, err
    assert not part.exists()
    # another MR is refused too, naming it
    mr_bytes = mr.with_suffix(".v").read_bytes()
    a = np.frombuffer(mr_bytes, "<f4").copy()
    a[0] += 1
    prompts.write_bytes(original)
    mr.with_suffix(".v").write_bytes(a.tobytes())
    assert _runw(w, [*args, "--resume", ck]) == 2
    assert "mr changed" in capsys.readouterr().err
    mr.with_suffix(".v").write_bytes(mr_bytes)
    # the same inputs resume
    assert _runw(w, [*args, "--resume", ck]) == 0
    assert np.isfinite(read_image(part).array).all()


@pytest.mark.slow
def test_fresh_run_refuses_a_stale_checkpoint_folder_unless_overwrite(files, monkeypatch, capsys):
    d, mr, prompts, w = files
    out = d / "x.hv"
    args = ["--prompts", prompts, "--mr", mr, "--out", out, *FAST]
    assert _interrupted_run(monkeypatch, w, args) == 130
    capsys.readouterr()
    assert _runw(w, args) == 2  # the interrupted run's log is an output of its own
    assert "x_log.jsonl: output exists" in capsys.readouterr().err
    (d / "x_log.jsonl").unlink()
    assert _runw(w, args) == 2  # a fresh run would silently replace the earlier run's checkpoint
    assert "x_checkpoint/ddip_checkpoint.pt: output exists" in capsys.readouterr().err
    assert _runw(w, [*args, "--overwrite"]) == 0
    assert len((d / "x_log.jsonl").read_text().splitlines()) == 4  # this run's steps only
