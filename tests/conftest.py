"""Shared pytest fixtures.

Tests that read the STIR reference data in ``../shared/stir-reference`` skip with a reason when it is absent
(a user's clone); everything else must pass alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIRF_DDIP_SHARED", REPO.parent / "shared"))
STIR_REF = SHARED / "stir-reference"

os.environ.setdefault("SIRF_DDIP_PROGRESS", "0")


def stir_case_dir(case: str) -> Path:
    """Folder of a STIR reference case, or skip the test with a reason."""
    d = STIR_REF / case
    if not (d / "case.json").is_file():
        pytest.skip(f"STIR reference data not found at {d} (set SIRF_DDIP_SHARED to the shared/ folder)")
    return d


@pytest.fixture(params=["mmr_2d", "mmr_3d6"])
def stir_case(request) -> Path:
    """Each STIR reference case folder in turn (skips when absent)."""
    return stir_case_dir(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _torch_threads_and_seed():
    torch.manual_seed(0)
    yield
