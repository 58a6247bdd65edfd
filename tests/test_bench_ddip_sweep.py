"""``benchmarks/ddip_sweep.py`` on a tiny simulated study: the ``final_em`` results it scores from one DDIP output
equal a DDIP run whose reconstructor does that final EM stage itself (``final_em`` in the config), and
``--score-hqs`` scores the last HQS image. The validation tables of issues 30 and 33 are made with this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SIM = {"scanner": "Siemens mMR", "num_rings": 2, "max_ring_diff": 1, "view_mashing": 21, "num_tangential": 24,
       "image_xy": 12, "write_nifti": False, "tracer": "fdg", "dose_fraction": 0.5, "seed": 3}
DDIP_SET = {"num_steps": 3, "t_start": 30, "n_init": 4, "num_em": 2, "finetune_slabs": 1}


@pytest.fixture(scope="module")
def case_and_weights(tmp_path_factory):
    from test_ddip_support import tiny_bundle

    from sirf_ddip.prior.weights import save_prior
    from sirf_ddip.sim.simulate import simulate_study

    d = tmp_path_factory.mktemp("sweep")
    simulate_study(dict(SIM), d / "case")
    b = tiny_bundle(True)
    w = d / "tiny.safetensors"
    save_prior(w, b.network, b.schedule, b.pet_scaling, b.mr_scaling, dtype="float32",
               training={"data": {"grid": {"shape": [3, 16, 16], "voxel_size": [2.03125, 2.08626, 2.08626]}}})
    return d / "case", w


def test_final_em_scores_equal_the_reconstructors_own_final_em(case_and_weights, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import ddip_sweep

    case, w = case_and_weights
    sets = [a for k, v in DDIP_SET.items() for a in ("--set", f"{k}={v}")]
    common = [str(case), "--weights", str(w), "--device", "cpu", "--osem-subsets", "1", "--osem-max-iter", "3",
              "--fwhm", "4", "--rdp-betas", "0.01", *sets]
    out = tmp_path / "sweep.jsonl"
    assert ddip_sweep.main([*common, "--final-em", "0,2", "--score-hqs", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in recs] == ["baselines", "ddip", "ddip", "ddip"]
    by = {(r["settings"].get("final_em"), r["settings"].get("output")): r for r in recs[1:]}
    assert set(by) == {(0, None), (2, None), (None, "hqs")}

    # The reconstructor's own final EM stage, same seed and settings: the same image, so the same scores.
    from sirf_ddip.io import read_image
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.prior.weights import load_prior
    from sirf_ddip.recon.config import DDIPConfig

    truth = read_image(case / "truth.hv")
    ds = EngineLogLikelihood.from_files(case / "prompts.hs", case / "mult_factors.hs", case / "additive_term.hs",
                                        image_template=case / "truth.hv", device="cpu")
    cfg = DDIPConfig.load(None, {**DDIP_SET, "final_em": 2, "device": "cpu"})
    r = ddip_sweep.set_up_ddip(cfg, ds, load_prior(w, device="cpu"), read_image(case / "mr.hv"), truth)
    r.run(r.remaining())
    own = ddip_sweep.Scorer(case, ds)(r.x.detach().clone())
    for key in ("psnr", "ssim", "loglik"):
        assert by[(2, None)][key] == pytest.approx(own[key], rel=1e-6, abs=1e-6), key
    assert by[(2, None)]["lesion_bias"] == pytest.approx(own["lesion_bias"], abs=1e-3)
    # EM on the data alone raises the data fit of the DDIP output; the HQS image is another image.
    assert by[(2, None)]["loglik"] > by[(0, None)]["loglik"]
    assert np.isfinite(by[(None, "hqs")]["psnr"]) and by[(None, "hqs")]["psnr"] != by[(0, None)]["psnr"]
    sys.modules.pop("ddip_sweep", None)
