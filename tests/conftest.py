"""Shared pytest fixtures.

Tests that read the STIR reference data in ``../shared/stir-reference`` skip with a reason when it is absent
(a user's clone); everything else must pass alone. In CI (``CI=true``) the data are required: the run fails at
start-up instead of skipping every STIR comparison. Every test whose code mentions ``stir_case`` (the fixture or
:func:`stir_case_dir`) is marked ``stir_reference`` automatically, so ``-m "not stir_reference"`` selects the
tests that need nothing but the repository.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIRF_DDIP_SHARED", REPO.parent / "shared"))
STIR_REF = SHARED / "stir-reference"
REAL_MMR = SHARED / "real-mmr"

os.environ.setdefault("SIRF_DDIP_PROGRESS", "0")


def stir_case_dir(case: str) -> Path:
    """Folder of a STIR reference case, or skip the test with a reason."""
    d = STIR_REF / case
    if not (d / "case.json").is_file():
        pytest.skip(f"STIR reference data not found at {d} (set SIRF_DDIP_SHARED to the shared/ folder)")
    return d


def real_mmr(*names: str) -> Path:
    """The ``../shared/real-mmr`` folder if it holds every file in ``names``, else skip the test with a reason."""
    for n in names:
        if not (REAL_MMR / n).is_file():
            pytest.skip(f"real mMR material not found: {REAL_MMR / n} (set SIRF_DDIP_SHARED to the shared/ folder)")
    return REAL_MMR


@pytest.fixture(scope="module")
def material() -> Path:
    """The real mMR norm and μ-map folder (``../shared/real-mmr``), or skip (:func:`real_mmr`)."""
    return real_mmr("norm.n.hdr", "norm.n", "mu_map.hv", "mu_map.v")


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


def pytest_configure(config):
    if os.environ.get("CI", "").lower() == "true":
        for d in (STIR_REF, REAL_MMR):
            if not d.is_dir():
                raise pytest.UsageError(f"CI=true but the STIR reference data are missing at {d}: the STIR "
                                        f"comparisons would all be skipped. Provide ../shared/{d.name} (or set "
                                        "SIRF_DDIP_SHARED).")


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("stir_reference") is not None:
            continue
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if "stir_case" in src or "stir_case" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stir_reference)
