"""Brain phantoms from the MNI152 templates: determinism, masks, tracer contrasts, poses, template cache."""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.errors import ConfigError, InputFileError
from sirf_ddip.sim import phantoms as ph

NZ = 24  # a central slab keeps the tests fast; in-plane the grid is the real mMR one


@pytest.fixture(scope="module")
def grid():
    return ph.mmr_brain_grid(nz=NZ)


@pytest.fixture(scope="module")
def fdg(grid):
    return ph.make_subject(grid, "fdg", seed=3, lesions=True)


def test_mmr_brain_grid():
    g = ph.mmr_brain_grid()
    assert g.shape == (ph.MMR_BRAIN_PLANES, 128, 128)
    assert 80 <= g.shape[0] <= 90
    np.testing.assert_allclose(g.voxel_size, (2.03125, 2.08626, 2.08626))
    np.testing.assert_allclose(g.origin, (0.0, -64 * 2.08626, -64 * 2.08626))
    assert g.shape[0] * g.voxel_size[0] > 175.0  # a head with scalp (brain alone ~155 mm)


def test_shapes_units_and_ranges(fdg, grid):
    for img in (fdg.activity, fdg.mr, fdg.mu_map):
        assert img.grid == grid and img.array.shape == grid.shape and img.array.dtype == np.float32
        assert np.isfinite(img.array).all() and img.array.min() >= 0
    assert set(fdg.masks) >= {"brain", "gm", "wm", "csf", "lesion"}
    for m in fdg.masks.values():
        assert m.dtype == bool and m.shape == grid.shape
    # kBq/mL: FDG grey matter of the order of tens of kBq/mL
    gm_mean = fdg.activity.array[fdg.masks["gm"]].mean()
    assert 10.0 < gm_mean < 60.0
    # μ-map: water in the brain, bone in the skull, nothing outside the head
    mu = fdg.mu_map.array
    np.testing.assert_allclose(np.median(mu[fdg.masks["brain"]]), ph.MU_WATER_PER_CM, rtol=1e-5)
    assert np.median(mu[fdg.masks["skull"]]) > 0.13
    assert mu.max() <= ph.MU_BONE_PER_CM + 1e-6
    assert mu[~fdg.masks["head"]].max() < 0.5 * ph.MU_BONE_PER_CM
    assert mu[0, 0, 0] == 0.0


def test_deterministic(grid, fdg):
    again = ph.make_subject(grid, "fdg", seed=3, lesions=True)
    np.testing.assert_array_equal(again.activity.array, fdg.activity.array)
    np.testing.assert_array_equal(again.mr.array, fdg.mr.array)
    for k in fdg.masks:
        np.testing.assert_array_equal(again.masks[k], fdg.masks[k])
    assert again.meta == fdg.meta


@pytest.mark.slow
def test_seeds_and_splits_differ(grid, fdg):
    other = ph.make_subject(grid, "fdg", seed=4, lesions=True)
    rel = np.abs(other.activity.array - fdg.activity.array).mean() / fdg.activity.array.mean()
    assert rel > 0.05
    test = ph.make_subject(grid, "fdg", seed=3, split="test", lesions=True)
    assert test.meta["pose"] != fdg.meta["pose"]
    assert np.abs(test.activity.array - fdg.activity.array).mean() / fdg.activity.array.mean() > 0.05


def test_same_head_other_tracer(grid, fdg):
    amy = ph.make_subject(grid, "amyloid-negative", seed=3, lesions=True)
    for k in ("brain", "gm", "wm", "csf"):
        np.testing.assert_array_equal(amy.masks[k], fdg.masks[k])
    assert amy.meta["pose"] == fdg.meta["pose"]


def test_masks_consistent(fdg):
    m, f = fdg.masks, fdg.fractions
    for k in ("gm", "wm", "csf", "lesion"):
        assert m[k].sum() > 0, k
        assert not (m[k] & ~m["brain"]).any(), f"{k} outside brain"
    assert not (m["gm"] & m["wm"]).any()
    assert not (m["brain"] & m["skull"]).any()
    assert not (m["brain"] & ~m["head"]).any()
    total = f["gm"] + f["wm"] + f["csf"]
    np.testing.assert_allclose(total, f["brain"], atol=1e-5)
    outer = f["brain"] + f["csf_rim"] + f["skull"] + f["scalp"]
    assert outer.max() <= 1.0 + 1e-5 and min(v.min() for v in f.values()) >= 0
    # a plausible brain: this central 49 mm slab holds ~0.9 L (cross-section ~180 cm^2; whole template 1.9 L)
    vox_ml = np.prod(fdg.grid.voxel_size) / 1000.0
    assert 600 < m["brain"].sum() * vox_ml < 1100


@pytest.mark.parametrize("tracer, lo, hi", [("fdg", 2.0, 4.5), ("amyloid-negative", 0.4, 0.95),
                                            ("amyloid-positive", 0.9, 1.2)])
def test_tracer_contrast(grid, tracer, lo, hi):
    ratios = []
    for seed in (0, 1):
        s = ph.make_subject(grid, tracer, seed=seed, lesions=False)
        a = s.activity.array
        ratios.append(a[s.masks["gm"]].mean() / a[s.masks["wm"]].mean())
    assert all(lo < r < hi for r in ratios), ratios
    nominal = ph.TRACERS[tracer]["gm"] / ph.TRACERS[tracer]["wm"]
    # partial volume pulls the ROI ratio from the pure-tissue ratio towards 1, never past it
    if abs(nominal - 1.0) > 0.3:
        assert all((r - 1.0) * (nominal - 1.0) > 0 and abs(r - 1.0) < abs(nominal - 1.0) + 0.1 for r in ratios)


def test_lesions_hot_for_fdg(grid, fdg):
    plain = ph.make_subject(grid, "fdg", seed=3, lesions=False)
    les = fdg.masks["lesion"]
    assert les.sum() >= 5 and not plain.masks["lesion"].any()
    assert fdg.meta["lesions"] and all(d["kind"] == "hot" for d in fdg.meta["lesions"])
    ratio = fdg.activity.array[les].mean() / plain.activity.array[les].mean()
    assert ratio > 1.3
    # away from lesions nothing changed
    np.testing.assert_array_equal(fdg.activity.array[fdg.fractions["lesion"] == 0],
                                  plain.activity.array[fdg.fractions["lesion"] == 0])


@pytest.mark.slow
def test_poses(grid):
    train = [ph.make_subject(grid, "fdg", seed=s, lesions=False).meta["pose"] for s in range(3)]
    assert all(abs(p["pitch"]) <= 10 and abs(p["yaw"]) <= 5 and abs(p["roll"]) <= 5 for p in train)
    assert len({p["pitch"] for p in train}) == 3
    test = ph.make_subject(grid, "fdg", seed=0, split="test", lesions=False)
    assert test.meta["pose_name"] == "tilted" and 14 <= test.meta["pose"]["pitch"] <= 20
    neutral = ph.make_subject(grid, "fdg", seed=0, pose="neutral", deform=False, lesions=False, rim=False)
    p = neutral.meta["pose"]
    assert p["pitch"] == p["yaw"] == p["roll"] == 0 and p["scale_x"] == 1 and neutral.meta["deform_amplitude_mm"] == 0
    assert not neutral.masks["skull"].any()
    # symmetric template, neutral pose: the brain is left-right symmetric about the FOV centre (x index 64)
    b = neutral.fractions["brain"]
    np.testing.assert_allclose(b[:, :, 1:].sum(axis=(0, 1)), b[:, :, 1:].sum(axis=(0, 1))[::-1], rtol=0.02, atol=0.5)


def test_errors(grid):
    with pytest.raises(ConfigError, match="tracer"):
        ph.make_subject(grid, "water", seed=0)
    with pytest.raises(ConfigError, match="split"):
        ph.make_subject(grid, "fdg", seed=0, split="validation")
    with pytest.raises(ConfigError, match="pose"):
        ph.make_subject(grid, "fdg", seed=0, pose="upside-down")
    with pytest.raises(InputFileError, match="template cache"):
        ph.load_templates("/nonexistent/templates.npz")


@pytest.mark.slow
def test_template_cache_round_trip(tmp_path):
    nil = ph.load_templates()
    assert nil["t1"].shape == (197, 233, 189) and nil["affine"][0, 0] == 1.0
    path = ph.save_template_cache(tmp_path / "mni.npz")
    assert path.stat().st_size < 20e6
    cached = ph.load_templates(path)
    for k in ("t1", "gm", "wm", "affine"):
        np.testing.assert_array_equal(cached[k], nil[k])
        assert cached[k].dtype == nil[k].dtype
    from sirf_ddip.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        ph.save_template_cache(path)


def test_lesion_kind_and_count_options_keep_the_rest_of_the_subject(grid):
    base = ph.make_subject(grid, "fdg", seed=3, lesions=True)
    cold = ph.make_subject(grid, "fdg", seed=3, lesions=True, lesion_kinds=("cold",), num_lesions=2)
    assert [l["kind"] for l in cold.meta["lesions"]] == ["cold", "cold"]
    first = base.meta["lesions"][0], cold.meta["lesions"][0]
    assert first[0]["centre_index_zyx"] == first[1]["centre_index_zyx"]
    assert first[0]["radius_mm"] == first[1]["radius_mm"]
    np.testing.assert_array_equal(base.mr.array, cold.mr.array)                   # the MR never shows a lesion
    with pytest.raises(ValueError, match="lesion_kinds"):
        ph.make_subject(grid, "fdg", seed=3, lesion_kinds=("warm",))
