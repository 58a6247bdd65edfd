"""The report's lesion panel (per-lesion bias, zoom, profile) and the fine-tuning ablation table."""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.study.report import ReportCase, build_report, lesion_biases, lesion_components


def _case():
    t = np.full((5, 40, 40), 4.0)
    brain = np.zeros(t.shape, bool)
    brain[:, 5:35, 5:35] = True
    lesion = np.zeros(t.shape, bool)
    lesion[1:4, 10:14, 10:14] = True          # hot, 48 voxels
    lesion[2:4, 25:28, 25:28] = True          # cold, 18 voxels
    t[1:4, 10:14, 10:14] = 10.0
    t[2:4, 25:28, 25:28] = 1.0
    erased = t.copy()
    erased[lesion] = 4.0                      # a prior that erases both lesions
    faithful = t * 1.1                        # +10 % everywhere
    imgs = {"ddip": erased, "diffusion_no_finetune": faithful, "osem": t}
    return ReportCase("amy", t, imgs, (2.0, 2.0, 2.0), "kBq/mL", brain=brain, lesion=lesion)


def test_lesion_biases_per_lesion():
    c = _case()
    comps = lesion_components(c.lesion)
    assert [int(m.sum()) for m in comps] == [48, 18]
    rows = lesion_biases(c, ["ddip", "diffusion_no_finetune", "osem"])
    assert [r["kind"] for r in rows] == ["hot", "cold"]
    assert rows[0]["bias"]["ddip"] == pytest.approx(100 * (4 - 10) / 10)     # hot lesion flattened: -60 %
    assert rows[1]["bias"]["ddip"] == pytest.approx(100 * (4 - 1) / 1)       # cold lesion filled: +300 %
    assert rows[1]["bias"]["diffusion_no_finetune"] == pytest.approx(10.0)
    assert rows[0]["bias"]["osem"] == pytest.approx(0.0, abs=1e-9)
    assert rows[1]["centre_zyx"] == [3, 26, 26] or rows[1]["centre_zyx"] == [2, 26, 26]


def test_report_has_lesion_panel_and_finetune_ablation(tmp_path):
    c = _case()
    m = {"psnr": 20.0, "ssim": 0.8, "lesion_bias": -10.0}
    metrics = {"cases": {"amy": {"ddip": dict(m), "diffusion_no_finetune": {**m, "psnr": 17.5},
                                 "osem": dict(m)}}}
    out = build_report(tmp_path / "report.html", metrics, [c])
    text = out.read_text()
    assert "id='lesions'" in text and "id='finetune'" in text
    assert "+300.0" in text and "-60.0" in text                               # the per-lesion table
    assert "17.50" in text or "17.5" in text
    assert (tmp_path / "figures" / "amy_lesions.png").stat().st_size > 2000
