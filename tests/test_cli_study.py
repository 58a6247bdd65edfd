"""``sirf-ddip simulate``, ``study`` (with ``--report-only``) and ``demo`` end to end on a tiny scanner slab.

Real pieces throughout (phantom from nilearn's MNI152, the built-in projector, OSEM, MAP-RDP, DDIP with the
shipped prior), on 2 mMR rings, 12 views, 24 tangential bins, a 3 x 12 x 12 image. Independent checks:

- the simulated noise-free mean (``case.json: expected_prompts``) is the physics model applied to the truth,
  ``EngineLogLikelihood.forward(truth)`` on the written files;
- the metrics in ``metrics.json`` are those of the saved images against the saved truth and masks
  (recomputed here with :mod:`sirf_ddip.study.metrics`);
- ``--report-only`` rebuilds the report from saved results without recomputing anything;
- ``simulate`` and ``study`` write the same data for the same case (one simulator behind both commands).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sirf_ddip.cli import main
from sirf_ddip.io import read_image, read_projdata
from sirf_ddip.physics.model import EngineLogLikelihood
from sirf_ddip.study import metrics as M

pytestmark = pytest.mark.slow

SIM = {"scanner": "Siemens mMR", "num_rings": 2, "max_ring_diff": 1, "view_mashing": 21, "num_tangential": 24,
       "image_xy": 12, "write_nifti": False}
STUDY_YAML = """title: tiny study
device: cpu
continue_on_error: false
simulation: {%s}
cases:
  - {tracer: fdg, dose_fraction: 0.5, seed: 1}
methods:
  osem: {num_subsets: 2, max_iterations: 3, clinical_iterations: 1, clinical_subsets: 2, postfilter_fwhm_mm: 4.0}
  map_rdp: {betas: [0.01, 0.1], num_iterations: 3, init_osem_iterations: 1, num_subsets: 1}
  diffusion_no_finetune: {enabled: false}
  ddip_no_mr: {enabled: false}
  ddip: {enabled: false}
ablations: {}
""" % ", ".join(f"{k}: {v}" for k, v in SIM.items())
CASE = "fdg_dose0.5_seed1"
DEMO_SETS = [f"simulation.{k}={v}" for k, v in SIM.items()] + [
    "methods.osem.max_iterations=2", "methods.osem.num_subsets=2", "methods.osem.clinical_subsets=2",
    "methods.osem.clinical_iterations=1", "methods.map_rdp.num_iterations=2", "methods.map_rdp.num_subsets=1",
    "ddip.num_steps=2", "ddip.t_start=20", "ddip.num_subsets=2", "ddip.n_init=2", "ddip.seed=0"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_study")
    cfg = d / "study.yaml"
    cfg.write_text(STUDY_YAML)
    assert main(["study", str(cfg), "--out", str(d / "study")]) == 0
    return d, cfg


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_demo") / "demo"
    args = ["demo", "--out", str(d), "--device", "cpu"]
    for kv in DEMO_SETS:
        args += ["--set", kv]
    assert main(args) == 0
    return d


def _check_mean_is_model_of_truth(case_dir: Path) -> None:
    info = json.loads((case_dir / "case.json").read_text())
    ds = EngineLogLikelihood.from_files(case_dir / "prompts.hs", case_dir / "mult_factors.hs",
                                        case_dir / "additive_term.hs", image_template=case_dir / "truth.hv",
                                        device="cpu")
    truth = read_image(case_dir / "truth.hv")
    mean = ds.forward(torch.as_tensor(truth.array))
    assert float(mean.double().sum()) == pytest.approx(info["expected_prompts"], rel=1e-5)
    prompts = read_projdata(case_dir / "prompts.hs").array
    assert float(prompts.sum()) == pytest.approx(info["total_prompts"], rel=1e-7)
    # Poisson noise around that mean: the total is within 5 standard deviations
    assert abs(float(prompts.sum()) - info["expected_prompts"]) < 5 * np.sqrt(info["expected_prompts"])


def _same(got, ref: float, what: str) -> None:
    """metrics.json stores NaN as null (JSON has no NaN)."""
    if np.isnan(ref):
        assert got is None, what
    else:
        assert got == pytest.approx(ref, rel=1e-6), what


def _check_metrics_match_saved_images(out: Path, case: str, methods: list[str]) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["cases"][case]) == sorted(methods)
    data = out / "data" / case
    t = read_image(data / "truth.hv").array.astype(np.float64)
    masks = {k: read_image(data / f"mask_{k}.hv").array > 0.5 for k in ("brain", "gm", "wm")}
    for m in methods:
        x = read_image(out / "cases" / case / m / "recon.hv").array.astype(np.float64)
        got = metrics["cases"][case][m]
        _same(got["psnr"], M.psnr(x, t, masks["brain"]), m)
        _same(got["nrmse"], M.nrmse(x, t, masks["brain"]), m)
        _same(got["gm_wm_cr"], M.contrast_recovery(x, t, masks["gm"], masks["wm"]), m)
        assert got["time_s"] == pytest.approx(json.loads((out / "cases" / case / m / "result.json").read_text())
                                              ["metrics"]["time_s"])
    return metrics


def test_study_writes_consistent_data_and_metrics(study):
    d, _ = study
    out = d / "study"
    _check_mean_is_model_of_truth(out / "data" / CASE)
    metrics = _check_metrics_match_saved_images(out, CASE, ["osem", "map_rdp"])
    osem = metrics["cases"][CASE]["osem"]
    # the reported OSEM image is the best PSNR of its sweep (oracle selection)
    assert osem["psnr"] == pytest.approx(max(p["psnr"] for p in osem["sweep"]), rel=1e-12)
    assert (out / "report.html").stat().st_size > 0


def test_report_only_rebuilds_without_recomputing(study):
    d, cfg = study
    out = d / "study"
    before = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()}
    metrics = (out / "metrics.json").read_bytes()
    (out / "report.html").unlink()
    assert main(["study", str(cfg), "--out", str(out), "--report-only"]) == 0
    html = (out / "report.html").read_text()
    assert "tiny study" in html and CASE in html
    assert (out / "metrics.json").read_bytes() == metrics
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()} == before


def test_simulate_cli_writes_the_study_s_data(study):
    d, cfg = study
    sim_out = d / "sim"
    assert main(["simulate", str(cfg), "--out", str(sim_out)]) == 0
    for f in ("prompts.hs", "mult_factors.hs", "additive_term.hs"):
        np.testing.assert_array_equal(read_projdata(sim_out / CASE / f).array,
                                      read_projdata(d / "study" / "data" / CASE / f).array)
    np.testing.assert_array_equal(read_image(sim_out / CASE / "truth.hv").array,
                                  read_image(d / "study" / "data" / CASE / "truth.hv").array)
    # a second run refuses to overwrite (exit 2, nothing changed)
    assert main(["simulate", str(cfg), "--out", str(sim_out)]) == 2


def test_demo_end_to_end(demo):
    cases = json.loads((demo / "metrics.json").read_text())["cases"]
    (case,) = cases                       # the demo's single out-of-distribution case
    assert case.startswith("amyloid-negative_dose0.1_seed101")
    _check_mean_is_model_of_truth(demo / "data" / case)
    metrics = _check_metrics_match_saved_images(demo, case, ["osem", "map_rdp", "ddip"])
    rec = json.loads((demo / "cases" / case / "ddip" / "result.json").read_text())
    assert rec["settings"]["resolved_config"]["num_steps"] == 2 and rec["settings"]["resolved_config"]["t_start"] == 20
    assert "amyloid-negative" in (demo / "report.html").read_text()
    assert metrics["cases"][case]["ddip"]["time_s"] > metrics["cases"][case]["osem"]["time_s"]
