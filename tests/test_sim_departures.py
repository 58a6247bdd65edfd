"""PET departs from the MR (issue 30): lesions, hypometabolic patterns, uptake variation; the MR is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.sim import phantoms as ph

OFF = {"hypometabolism": 0.0, "num_lesions": (0, 0), "variation_sd": (0.0, 0.0)}


@pytest.fixture(scope="module")
def grid():
    return ph.mmr_brain_grid(nz=40)


@pytest.fixture(scope="module")
def plain(grid):
    return ph.make_subject(grid, "fdg", seed=5, lesions=False)


def test_mr_bit_identical_and_nothing_when_all_off(grid, plain):
    dep = ph.make_subject(grid, "fdg", seed=5, lesions=False, departures=True)
    assert np.array_equal(dep.mr.array, plain.mr.array)
    assert np.array_equal(dep.mu_map.array, plain.mu_map.array)
    assert not np.array_equal(dep.activity.array, plain.activity.array)
    off = ph.make_subject(grid, "fdg", seed=5, lesions=False, departures=OFF)
    np.testing.assert_allclose(off.activity.array, plain.activity.array, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown key"):
        ph.make_subject(grid, "fdg", seed=5, departures={"lesion_size": 3})


@pytest.mark.parametrize("pattern", ["ad", "ftd", "dlb"])
def test_hypometabolism_depth_in_gm(grid, plain, pattern):
    spec = {**OFF, "hypometabolism": 1.0, "patterns": (pattern,), "hypo_depth": (0.4, 0.4), "bilateral": 1.0}
    s = ph.make_subject(grid, "fdg", seed=5, lesions=False, departures=spec)
    assert s.meta["departures"]["hypometabolism"]["pattern"] == pattern
    ratio = s.activity.array / np.maximum(plain.activity.array, 1e-9)
    core = (s.fractions["departure"] > 0.99) & (s.fractions["gm"] > 0.9)
    assert core.sum() > 50, core.sum()
    # a GM voxel of GM fraction f loses 0.4 of its GM part: ratio 1 - 0.4 (GM share), 0.6..0.64 for f > 0.9
    assert 0.58 < float(np.median(ratio[core])) < 0.66, float(np.median(ratio[core]))
    assert np.allclose(ratio[(s.fractions["departure"] == 0) & plain.masks["brain"]], 1.0, atol=1e-5)
    # the WM is not reduced
    wm_core = (s.fractions["departure"] > 0.99) & (s.fractions["wm"] > 0.95)
    if wm_core.any():
        assert float(np.median(ratio[wm_core])) > 0.9


@pytest.mark.parametrize("site", ["cortical_gm", "deep_gm", "wm"])
def test_lesion_site_size_and_contrast(grid, plain, site):
    spec = {**OFF, "num_lesions": (1, 1), "lesion_sites": (site,), "lesion_diameter_mm": (16.0, 16.0),
            "lesion_hot": (2.0, 2.0), "lesion_cold": (0.3, 0.3)}
    s = ph.make_subject(grid, "fdg", seed=5, lesions=False, departures=spec)
    (les,) = s.meta["departures"]["lesions"]
    assert les["site"] == site and les["diameter_mm"] == 16.0
    z, y, x = les["centre_index_zyx"]
    want = 2.0 if les["kind"] == "hot" else 0.3
    assert s.activity.array[z, y, x] / plain.activity.array[z, y, x] == pytest.approx(want, rel=1e-4)
    frac = plain.fractions
    key = {"cortical_gm": "gm", "deep_gm": "gm", "wm": "wm"}[site]
    assert frac[key][z, y, x] >= 0.5
    # its volume: a 16 mm sphere (2.1 mm voxels) has ~ 4/3 pi 8^3 / voxel volume voxels of weight >= 0.5
    vol = float(np.prod(grid.voxel_size))
    n = int((s.fractions["departure"] >= 0.5).sum())
    assert 0.6 * (4 / 3 * np.pi * 8 ** 3 / vol) < n < 1.3 * (4 / 3 * np.pi * 8 ** 3 / vol), n


def test_default_draws_cover_the_ranges(grid):
    kinds, sites, diam, depth = set(), set(), [], []
    for seed in range(6):
        s = ph.make_subject(grid, "fdg", seed=seed, lesions=False, departures={"hypometabolism": 1.0})
        d = s.meta["departures"]
        kinds |= {le["kind"] for le in d["lesions"]}
        sites |= {le["site"] for le in d["lesions"]}
        diam += [le["diameter_mm"] for le in d["lesions"]]
        depth.append(d["hypometabolism"]["depth"])
        assert 0.03 <= d["variation_sd"] <= 0.10
    assert kinds == {"hot", "cold"} and len(sites) >= 2
    assert min(diam) >= 3.0 and max(diam) <= 30.0
    assert min(depth) >= 0.2 and max(depth) <= 0.6
