"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sirf_ddip.errors import DataValueError
from sirf_ddip.study import metrics as M


def _t():
    return np.array([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)


def test_psnr_whole_mask():
    t = _t()
    x = t + np.array([[[0.0, 0.0], [0.0, 2.0]]])
    # peak 4, MSE = 4/4 = 1 -> 10 log10(16)
    assert M.psnr(x, t, np.ones_like(t, bool)) == pytest.approx(10 * math.log10(16.0), abs=1e-12)


def test_psnr_uses_mask_for_peak_and_mse():
    t = _t()
    x = t + np.array([[[1.0, 0.0], [0.0, 100.0]]])  # error outside the mask must not count
    brain = np.array([[[True, True], [True, False]]])
    # peak = 3 (max of truth in mask), MSE = 1/3 -> 10 log10(27)
    assert M.psnr(x, t, brain) == pytest.approx(10 * math.log10(27.0), abs=1e-12)
    assert M.psnr(t, t, brain) == math.inf


def test_nrmse():
    t = np.array([[[3.0, 4.0, 9.0]]])
    x = np.array([[[4.0, 4.0, 0.0]]])
    brain = np.array([[[True, True, False]]])
    assert M.nrmse(x, t, brain) == pytest.approx(1.0 / 5.0, abs=1e-15)


def test_mean_bias_and_contrast_recovery():
    t = np.array([[[4.0, 4.0, 2.0, 2.0]]])
    x = np.array([[[3.0, 3.0, 2.0, 2.0]]])
    gm = np.array([[[True, True, False, False]]])
    wm = ~gm
    assert M.mean_bias(x, t, gm) == pytest.approx(-25.0, abs=1e-12)
    assert M.mean_bias(x, t, wm) == pytest.approx(0.0, abs=1e-12)
    # (3/2 - 1) / (4/2 - 1) = 0.5
    assert M.contrast_recovery(x, t, gm, wm) == pytest.approx(0.5, abs=1e-12)
    # amyloid-negative-like (WM hotter): t_gm/t_wm = 0.5, x_gm/x_wm = 0.75 -> (-0.25)/(-0.5) = 0.5
    t2 = np.array([[[1.0, 1.0, 2.0, 2.0]]])
    x2 = np.array([[[1.5, 1.5, 2.0, 2.0]]])
    assert M.contrast_recovery(x2, t2, gm, wm) == pytest.approx(0.5, abs=1e-12)
    # no truth contrast -> undefined
    assert math.isnan(M.contrast_recovery(x, np.ones_like(t), gm, wm))


def test_noise_cov_and_uniform_region():
    x = np.zeros((1, 1, 6))
    x[0, 0, :4] = [1.0, 2.0, 3.0, 4.0]
    region = np.zeros_like(x, bool)
    region[0, 0, :4] = True
    # mean 2.5, population std sqrt(1.25)
    assert M.noise_cov(x, region) == pytest.approx(100 * math.sqrt(1.25) / 2.5, abs=1e-12)
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    er = M.uniform_region(cube, 1)
    assert er.sum() == 27 and er[2:5, 2:5, 2:5].all()
    assert M.uniform_region(cube, 3).sum() == 0


def test_ssim_identity_and_hand_value():
    rng = np.random.default_rng(0)
    t = rng.uniform(1, 5, (3, 3, 3))
    brain = np.ones_like(t, bool)
    assert M.ssim(t, t, brain) == pytest.approx(1.0, abs=1e-12)
    x = t + rng.normal(0, 0.5, t.shape)
    centre = np.zeros_like(brain)
    centre[1, 1, 1] = True
    # 3x3x3 array -> window shrinks to 3; at the centre voxel the window is the whole array
    R = t.max() - t.min()
    c1, c2 = (0.01 * R) ** 2, (0.03 * R) ** 2
    n = t.size
    ux, ut = x.mean(), t.mean()
    vx = x.var() * n / (n - 1)
    vt = t.var() * n / (n - 1)
    cxt = ((x - ux) * (t - ut)).mean() * n / (n - 1)
    expected = ((2 * ux * ut + c1) * (2 * cxt + c2)) / ((ux ** 2 + ut ** 2 + c1) * (vx + vt + c2))
    assert M.ssim(x, t, centre, data_range=R) == pytest.approx(expected, rel=1e-9)
    # default data range: from the truth inside the mask (a single voxel has none -> undefined)
    assert math.isnan(M.ssim(x, t, centre))


def test_all_metrics_and_errors():
    t = np.ones((5, 5, 5))
    t[:, :, :2] = 4.0
    gm = np.zeros_like(t, bool)
    gm[:, :, :2] = True
    wm = ~gm
    lesion = np.zeros_like(gm)
    lesion[2, 2, 0] = True
    x = t * 1.1
    r = M.Regions(brain=np.ones_like(gm), gm=gm, wm=wm, lesion=lesion)
    m = M.all_metrics(x, t, r, extra={"time_s": 1.5})
    assert m["gm_bias"] == pytest.approx(10.0) and m["wm_bias"] == pytest.approx(10.0)
    assert m["lesion_bias"] == pytest.approx(10.0)
    assert m["gm_wm_cr"] == pytest.approx(1.0)
    assert m["noise"] == pytest.approx(0.0, abs=1e-9) and m["time_s"] == 1.5
    # no lesion -> None (JSON null), not a number
    m2 = M.all_metrics(x, t, M.Regions(brain=np.ones_like(gm), gm=gm, wm=wm, lesion=None))
    assert m2["lesion_bias"] is None
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataValueError):
        M.psnr(bad, t, np.ones_like(gm))
    with pytest.raises(DataValueError):
        M.Regions(brain=np.zeros_like(gm), gm=gm, wm=wm)
