"""Under CI=true a missing ../shared/stir-reference fails the test run instead of skipping the STIR checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two pytest start-ups

REPO = Path(__file__).resolve().parents[1]


def _pytest(env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co",
                           str(REPO / "tests" / "test_layers.py")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_ci_without_stir_data_fails(tmp_path):
    res = _pytest({"CI": "true", "SIRF_DDIP_SHARED": str(tmp_path / "nowhere")}, tmp_path)
    assert res.returncode != 0
    assert "CI=true but the STIR reference data are missing" in res.stdout + res.stderr


def test_without_ci_missing_data_only_skips(tmp_path):
    res = _pytest({"CI": "false", "SIRF_DDIP_SHARED": str(tmp_path / "nowhere")}, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ci_without_real_mmr_data_fails(tmp_path):
    (tmp_path / "shared" / "stir-reference").mkdir(parents=True)
    res = _pytest({"CI": "true", "SIRF_DDIP_SHARED": str(tmp_path / "shared")}, tmp_path)
    assert res.returncode != 0
    assert "real-mmr" in res.stdout + res.stderr
