"""The HTML report builds from synthetic inputs and contains every section."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from sirf_ddip.errors import OutputExistsError
from sirf_ddip.study.metrics import Regions, all_metrics
from sirf_ddip.study.report import ReportCase, build_report


def _case(name, rng):
    t = np.zeros((5, 16, 16))
    t[:, 3:13, 3:13] = 1.0
    t[:, 6:10, 6:10] = 3.0
    lesion = np.zeros(t.shape, bool)
    lesion[2, 7:9, 7:9] = True
    brain = t > 0
    gm = t > 2
    wm = brain & ~gm
    imgs = {"osem": t + rng.normal(0, 0.3, t.shape), "ddip": t + rng.normal(0, 0.1, t.shape)}
    reg = Regions(brain, gm, wm, lesion)
    cm = {}
    for m, x in imgs.items():
        cm[m] = all_metrics(x, t, reg, extra={"time_s": 1.0})
    cm["osem"]["sweep"] = [dict(all_metrics(t + rng.normal(0, s, t.shape), t, reg), iteration=i)
                           for i, s in enumerate([0.1, 0.2, 0.3])]
    cm["osem"]["clinical"] = dict(all_metrics(imgs["osem"], t, reg), description="3 it x 21 subsets")
    rc = ReportCase(name, t, imgs, (2.0, 2.0, 2.0), "kBq/mL", mr=t * 0.5, brain=brain, lesion=lesion,
                    description="fdg, 10% dose")
    return rc, cm


@pytest.mark.slow
def test_report_builds_with_all_sections(tmp_path):
    rng = np.random.default_rng(0)
    c1, m1 = _case("fdg_d10", rng)
    c2, m2 = _case("amyloid_d10", rng)
    metrics = {"cases": {"fdg_d10": m1, "amyloid_d10": m2}}
    abl = {"lora_rank": [{"value": r, "psnr": 30 + r, "case": "fdg_d10"} for r in (1, 2, 4)],
           "t_start": [{"value": t, "psnr": 31.0, "case": "fdg_d10"} for t in (100, 200)],
           "beta": [{"value": b, "psnr": 29.5, "case": "fdg_d10"} for b in (0.001, 0.01)]}
    out = build_report(tmp_path / "report.html", metrics, [c1, c2], ablations=abl, info={"scanner": "mMR"})
    text = out.read_text()
    for sec in ("id='overview'", "id='metrics'", "id='images'", "id='bias-noise'", "id='profiles'",
                "id='ablations'"):
        assert sec in text
    # 2 slice figures + 2 bias-noise + 2 profiles + 1 ablation, all embedded and valid PNGs
    imgs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(imgs) == 9
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in imgs)
    assert len(list((tmp_path / "figures").glob("*.png"))) == 9
    assert "OSEM clinical (3 it x 21 subsets)" in text
    assert "DDIP (MR-conditioned)" in text and "fdg, 10% dose" in text
    # metrics table shows the numbers it was given
    assert f"{m1['ddip']['psnr']:.2f}" in text
    with pytest.raises(OutputExistsError):
        build_report(tmp_path / "report.html", metrics, [c1, c2])


def test_report_without_ablations_or_images(tmp_path):
    metrics = {"cases": {"c": {"osem": {"psnr": 20.0, "ssim": None, "noise": None}}}}
    out = build_report(tmp_path / "r.html", metrics, [], save_figures=False)
    text = out.read_text()
    assert "id='ablations'" not in text and "n/a" in text and "20.00" in text
    assert not (tmp_path / "figures").exists()
