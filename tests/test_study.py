"""Study runner on a synthetic dense-matrix case: all methods, metrics.json schema, resume, report, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sirf_ddip.data import Image
from sirf_ddip.errors import ConfigError
from sirf_ddip.study.metrics import Regions
from sirf_ddip.study.study import (METHODS, CaseData, format_metrics_table, load_study_config, run_study)

from toy_physics import dense_problem as make_problem

REPO = Path(__file__).resolve().parents[1]

CFG = {
    "cases": [{"tracer": "fdg", "dose_fraction": 0.1, "seed": 1, "name": "fdg_a"},
              {"tracer": "amyloid-negative", "dose_fraction": 0.1, "seed": 2}],
    "methods": {
        "osem": {"num_subsets": 2, "max_iterations": 4, "clinical_iterations": 1, "clinical_subsets": 4,
                 "postfilter_fwhm_mm": 3.0},
        "map_rdp": {"betas": [0.05, 1.0], "num_iterations": 4, "init_osem_iterations": 1, "num_subsets": 2},
    },
    "ablations": {"lora_rank": [1, 2]},
    "device": "cpu",
}


class Counter:
    def __init__(self):
        self.calls = []


def _fakes(counter):
    def sim(c, folder, ow):
        counter.calls.append(("sim", c.name))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "case.json").write_text(json.dumps({"tracer": c.tracer}))

    def load(name, folder):
        seed = 11 if name == "fdg_a" else 12
        shape = (5, 6, 6)
        rng = np.random.default_rng(seed)
        truth = np.ones(shape)
        truth[:, 1:5, 1:3] = 3.0
        truth[2, 3, 4] = 5.0
        ds, t = make_problem(shape=shape, n_bins=300, counts=30.0, seed=seed, truth=truth)
        gm = truth > 2
        lesion = np.zeros(shape, bool)
        lesion[2, 3, 4] = True
        brain = np.ones(shape, bool)
        template = Image(truth.astype(np.float32), ds.grid)
        return CaseData(name, ds, template, truth, Regions(brain, gm, ~gm, lesion), ds.grid.voxel_size,
                        mr=Image(truth.astype(np.float32), ds.grid), units="kBq/mL")

    def fake_ddip(tag):
        def f(case, cfg):
            counter.calls.append((tag, case.name))
            return case.truth * (0.95 if tag == "ddip" else 0.9), {"note": tag}, 0.5
        return f

    def abl(case, cfg, key, value):
        counter.calls.append(("abl", key, value))
        return case.truth * (1 - 0.01 * value), {}, 0.1

    fns = {m: fake_ddip(m) for m in ("diffusion_no_finetune", "ddip_no_mr", "ddip")}
    fns["ablation"] = abl
    return sim, load, fns


@pytest.mark.slow
def test_study_end_to_end_resume_and_report(tmp_path):
    cnt = Counter()
    sim, load, fns = _fakes(cnt)
    cfg = load_study_config(None, overrides=CFG)
    assert cfg.cases[1].name == "amyloid-negative_dose0.1_seed2"
    out = tmp_path / "study"
    metrics = run_study(cfg, out, simulate_fn=sim, load_case_fn=load, method_fns=fns)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk["cases"]) == {"fdg_a", "amyloid-negative_dose0.1_seed2"}
    for cm in on_disk["cases"].values():
        assert tuple(cm) == METHODS
        for m in METHODS:
            for k in ("psnr", "ssim", "nrmse", "lesion_bias", "time_s", "gm_bias", "wm_bias", "gm_wm_cr", "noise"):
                assert k in cm[m]
            assert isinstance(cm[m]["psnr"], float)
        # OSEM: best iterate by PSNR from a 4-iteration sweep, plus clinical (1x4 = 2 it x 2 subsets, filtered)
        osem = cm["osem"]
        assert len(osem["sweep"]) == 2 + 3  # sub-iterations 1, 2 of it. 1, then its. 2, 3, 4
        assert osem["psnr"] == pytest.approx(max(p["psnr"] for p in osem["sweep"]))
        assert osem["clinical"]["iterations"] == 2 and osem["clinical"]["postfilter_fwhm_mm"] == 3.0
        assert osem["clinical"]["psnr"] != pytest.approx(osem["sweep"][1]["psnr"])  # filtered differs
        rdp = cm["map_rdp"]
        assert [p["beta"] for p in rdp["sweep"]] == [0.05, 1.0]
        assert rdp["psnr"] == pytest.approx(max(p["psnr"] for p in rdp["sweep"]))
        assert all(p["monotone"] for p in rdp["sweep"])
        assert cm["ddip"]["lesion_bias"] == pytest.approx(-5.0, abs=1e-3)  # 0.95 × truth
    abl = json.loads((out / "ablations.json").read_text())
    assert [p["value"] for p in abl["lora_rank"]] == [1, 2] and abl["t_start"] == []
    html = (out / "report.html").read_text()
    for sec in ("id='metrics'", "id='images'", "id='bias-noise'", "id='profiles'", "id='ablations'"):
        assert sec in html
    assert (out / "run_record.json").is_file()
    assert (out / "cases" / "fdg_a" / "ddip" / "result.json").is_file()
    assert (out / "cases" / "fdg_a" / "osem" / "recon.hv").is_file()
    assert (out / "cases" / "fdg_a" / "osem" / "recon_clinical.hv").is_file()
    n_first = len(cnt.calls)
    assert n_first == 2 + 2 * 3 + 2  # 2 sims, 3 fake DDIP methods per case, 2 ablation runs
    table = format_metrics_table(on_disk)
    assert "osem (clinical)" in table and "map_rdp" in table

    # resume: nothing recomputed, identical metrics
    cnt.calls.clear()
    metrics2 = run_study(cfg, out, simulate_fn=sim, load_case_fn=load, method_fns=fns)
    assert cnt.calls == []
    assert json.loads(json.dumps(metrics2)) == on_disk

    # an interrupted piece (no result.json) is redone, alone
    (out / "cases" / "fdg_a" / "ddip" / "result.json").unlink()
    run_study(cfg, out, simulate_fn=sim, load_case_fn=load, method_fns=fns, build=False)
    assert cnt.calls == [("ddip", "fdg_a")]

    # changed settings are refused unless overwrite
    cfg2 = load_study_config(None, overrides={**CFG, "methods": {**CFG["methods"], "map_rdp": {
        **CFG["methods"]["map_rdp"], "num_iterations": 5}}})
    with pytest.raises(ConfigError, match="other settings"):
        run_study(cfg2, out, simulate_fn=sim, load_case_fn=load, method_fns=fns, build=False)


def test_disabled_methods_are_absent(tmp_path):
    cnt = Counter()
    sim, load, fns = _fakes(cnt)
    d = {**CFG, "cases": CFG["cases"][:1], "ablations": {},
         "methods": {**CFG["methods"], "map_rdp": {"enabled": False}, "ddip_no_mr": {"enabled": False}}}
    metrics = run_study(load_study_config(None, overrides=d), tmp_path / "s", simulate_fn=sim, load_case_fn=load,
                        method_fns=fns, build=False)
    assert tuple(metrics["cases"]["fdg_a"]) == ("osem", "diffusion_no_finetune", "ddip")


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_study_config(None, overrides={**CFG, "bogus": 1})
    with pytest.raises(ConfigError, match="cases\\[0\\].colour"):
        load_study_config(None, overrides={"cases": [{"tracer": "fdg", "colour": 1}]})
    with pytest.raises(ConfigError, match="dose_fraction"):
        load_study_config(None, overrides={"cases": [{"dose_fraction": 2.0}]})
    with pytest.raises(ConfigError, match="ablations.cases"):
        load_study_config(None, overrides={**CFG, "ablations": {"cases": ["nope"]}})
    with pytest.raises(ConfigError, match="at least one case"):
        load_study_config(None, overrides={"device": "cpu"})


@pytest.mark.parametrize("name", ["study-quick.yaml", "study-paper.yaml"])
def test_shipped_configs_load(name):
    cfg = load_study_config(REPO / "configs" / name)
    tracers = {c.tracer for c in cfg.cases}
    assert {"fdg", "amyloid-negative"} <= tracers
    assert cfg.ddip_config("diffusion_no_finetune").finetune is False
    assert cfg.ddip_config("ddip_no_mr").use_mr is False
    from sirf_ddip.recon.config import DDIPConfig

    for m in ("diffusion_no_finetune", "ddip_no_mr", "ddip"):
        assert isinstance(cfg.ddip_config(m), DDIPConfig)   # the study builds validated config objects
    try:
        from sirf_ddip.sim.simulate import SimulationConfig
    except ModuleNotFoundError:
        pytest.skip("sirf_ddip.sim.simulate not present in this build")
    from sirf_ddip.config import deep_merge, from_dict

    for c in cfg.cases:
        data = deep_merge(cfg.simulation, c.simulation)
        data.update(tracer=c.tracer, dose_fraction=c.dose_fraction, seed=c.seed)
        from_dict(SimulationConfig, data)
    if name == "study-paper.yaml":
        assert cfg.ablations.lora_rank and cfg.ablations.t_start and cfg.ablations.beta
        # "paper settings" means the authors' set, whatever the shipped defaults are (num_steps is capped at T'+1)
        got = cfg.ddip_config("ddip").algorithm_dict()
        want = DDIPConfig.paper({"seed": 0}).algorithm_dict()
        assert {k: v for k, v in got.items() if k != "num_steps"} == {k: v for k, v in want.items() if k != "num_steps"}


def test_cli_registers_commands():
    from sirf_ddip.cli import build_parser

    p = build_parser()
    a = p.parse_args(["study", "cfg.yaml", "--out", "d", "--overwrite", "--set", "device=cpu"])
    assert a.config == "cfg.yaml" and a.out == "d" and a.overwrite and a.set == ["device=cpu"]
    a = p.parse_args(["simulate", "cfg.yaml", "--out", "d"])
    assert a.func is not None


@pytest.mark.slow
def test_study_runs_real_ddip_variants_with_tiny_priors(tmp_path):
    """The DDIP glue (config merge, prior path, MR, output conversion) with the real DDIPReconstructor."""
    from sirf_ddip.prior.weights import save_prior

    from test_ddip_support import tiny_bundle

    paths = {}
    for use_mr in (True, False):
        b = tiny_bundle(use_mr=use_mr)
        paths[use_mr] = save_prior(tmp_path / f"prior_mr{int(use_mr)}.safetensors", b.network, b.schedule,
                                   b.pet_scaling, b.mr_scaling, dtype="float32")
    cnt = Counter()
    sim, load, _ = _fakes(cnt)

    def load8(name, folder):  # the tiny U-Net needs an even in-plane size
        shape = (4, 8, 8)
        truth = np.ones(shape)
        truth[:, 2:6, 2:4] = 3.0
        ds, _ = make_problem(shape=shape, n_bins=300, counts=40.0, seed=3, truth=truth)
        gm = truth > 2
        lesion = np.zeros(shape, bool)
        lesion[1, 3, 3] = True
        img = Image(truth.astype(np.float32), ds.grid)
        return CaseData(name, ds, img, truth, Regions(np.ones(shape, bool), gm, ~gm, lesion), ds.grid.voxel_size,
                        mr=Image((truth * 100).astype(np.float32), ds.grid))

    fast = {"t_start": 20, "num_steps": 3, "n_init": 2, "num_em": 1, "num_finetune": 1, "seed": 1}
    d = {"cases": [{"tracer": "fdg", "name": "c"}], "device": "cpu", "ddip": fast,
         "methods": {"osem": {"enabled": False}, "map_rdp": {"enabled": False},
                     "diffusion_no_finetune": {"prior": str(paths[True])},
                     "ddip_no_mr": {"prior": str(paths[False])},
                     "ddip": {"prior": str(paths[True]), "config": {"lora_rank": 2}}},
         "ablations": {"t_start": [10]}}
    cfg = load_study_config(None, overrides=d)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = run_study(cfg, tmp_path / "s", simulate_fn=sim, load_case_fn=load8, build=False)
    finally:
        torch.set_num_threads(n)
    cm = metrics["cases"]["c"]
    assert tuple(cm) == ("diffusion_no_finetune", "ddip_no_mr", "ddip")
    assert cm["diffusion_no_finetune"]["config"]["finetune"] is False
    assert cm["ddip_no_mr"]["config"]["use_mr"] is False
    assert cm["ddip"]["config"]["lora_rank"] == 2 and cm["ddip"]["config"]["t_start"] == 20
    for m in cm.values():
        assert isinstance(m["psnr"], float) and m["time_s"] > 0
    # different variants give different images
    assert cm["ddip"]["psnr"] != cm["diffusion_no_finetune"]["psnr"]
    abl = json.loads((tmp_path / "s" / "ablations.json").read_text())
    assert abl["t_start"][0]["value"] == 10 and isinstance(abl["t_start"][0]["psnr"], float)


def test_load_case_names_the_missing_file(tmp_path):
    from sirf_ddip.errors import InputFileError
    from sirf_ddip.study.study import CASE_REQUIRED_FILES, load_case, missing_case_files

    for f in CASE_REQUIRED_FILES[:3]:
        (tmp_path / f).write_text("!INTERFILE :=\n")
    assert missing_case_files(tmp_path) == list(CASE_REQUIRED_FILES[3:])
    assert missing_case_files(tmp_path, extra=("mr.hv",))[-1] == "mr.hv"
    with pytest.raises(InputFileError, match="truth.hv.*missing from the study case folder"):
        load_case(tmp_path)
