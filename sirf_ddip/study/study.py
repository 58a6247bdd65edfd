"""The simulation study: simulate → every method → metrics → report, resumable.

Layout of a study folder ``DIR``::

    DIR/run_record.json, run_record_config.yaml   resolved config, seed, versions
    DIR/data/CASE/...                             PETRIC-layout simulated data (sirf_ddip.sim.simulate)
    DIR/data/CASE.done                            marker: simulation of CASE finished
    DIR/cases/CASE/METHOD/recon.hv                the method's image (STIR Interfile)
    DIR/cases/CASE/METHOD/result.json             its metrics, settings and timing; written last = done-marker
    DIR/ablations/CASE/KEY_VALUE/...              DDIP ablation runs (same files)
    DIR/metrics.json                              {"cases": {CASE: {METHOD: {"psnr": …, "time_s": …, …}}}}
    DIR/ablations.json                            {"lora_rank": [{"case", "value", "psnr", …}], "t_start": …, "beta": …}
    DIR/report.html (+ figures/)

A piece whose ``result.json`` exists is not recomputed (resume after an interruption), provided it was made
with the same settings — otherwise the run stops with a :class:`ConfigError` (use ``overwrite=True`` or a new
folder), so a study never mixes results of different configurations silently.

Methods (all through the same :class:`~sirf_ddip.recon.base.IterativeReconstructor` API on the same
:class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`): ``osem``, ``map_rdp``, ``diffusion_no_finetune``, ``ddip_no_mr``,
``ddip`` (see :data:`METHODS`).  The OSEM iteration and MAP-RDP β are chosen by PSNR against the truth: an
*oracle* choice, in the baselines' favour, which the report states.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..config import deep_merge, from_dict, parse_overrides, read_yaml, to_dict
from ..errors import ConfigError, InputFileError
from ..utils.provenance import write_run_record
from .metrics import Regions, all_metrics

if TYPE_CHECKING:  # pragma: no cover
    from ..recon.config import DDIPConfig

__all__ = [
    "CaseSpec", "OSEMSettings", "MAPRDPSettings", "DDIPSettings", "MethodsConfig", "AblationConfig",
    "StudyConfig", "load_study_config", "CaseData", "load_case", "run_study", "simulate_cases",
    "rebuild_report", "format_metrics_table", "failed_pieces", "METHODS",
]

#: the methods of a study, in report order (keys of metrics.json)
METHODS: tuple[str, ...] = ("osem", "map_rdp", "diffusion_no_finetune", "ddip_no_mr", "ddip")


# ============================================================================================ config
@dataclass
class CaseSpec:
    """One simulated case: tracer, dose fraction, seed (and optional simulation overrides)."""

    tracer: str = "fdg"
    dose_fraction: float = 0.1
    seed: int = 0
    name: str | None = None
    simulation: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0 < self.dose_fraction <= 1:
            raise ConfigError(f"study config: case key 'dose_fraction' must be in (0, 1], got {self.dose_fraction}")
        if self.name is None:
            self.name = f"{self.tracer}_dose{self.dose_fraction:g}_seed{self.seed}"
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"study config: case name {self.name!r} must use letters, digits, '-', '_', '.'")


@dataclass
class OSEMSettings:
    """OSEM: an iteration sweep (best iterate by PSNR) and a fixed clinical setting.

    The sweep evaluates every sub-iteration of the first iteration (at low counts the best PSNR often comes
    before one full iteration) and then every full iteration up to ``max(max_iterations, clinical)``.

    ``clinical_iterations × clinical_subsets`` is converted to the same number of sub-iterations' worth of
    *full iterations* at ``num_subsets`` (e.g. 3 × 21 at 7 subsets = 9 iterations), so the clinical image sees
    the same amount of EM progress as on the scanner.  ``postfilter_fwhm_mm`` > 0 applies an isotropic Gaussian
    post-filter to the clinical image (as scanners do).
    """

    enabled: bool = True
    num_subsets: int = 7
    max_iterations: int = 12
    clinical_iterations: int = 3
    clinical_subsets: int = 21
    postfilter_fwhm_mm: float = 4.0

    def clinical_full_iterations(self) -> int:
        return max(1, int(round(self.clinical_iterations * self.clinical_subsets / self.num_subsets)))


@dataclass
class MAPRDPSettings:
    """MAP-RDP: β chosen by PSNR (oracle) over ``betas``; init = ``init_osem_iterations`` OSEM iterations."""

    enabled: bool = True
    betas: list = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    num_iterations: int = 30
    gamma: float = 2.0
    epsilon_rel: float = 1e-3
    neighbourhood: int = 26
    init_osem_iterations: int = 2
    num_subsets: int = 7


@dataclass
class DDIPSettings:
    """One DDIP variant: prior weights (None = shipped default) and DDIP config overrides (``DDIPConfig`` keys)."""

    enabled: bool = True
    prior: str | None = None
    config: dict = field(default_factory=dict)


@dataclass
class MethodsConfig:
    osem: OSEMSettings = field(default_factory=OSEMSettings)
    map_rdp: MAPRDPSettings = field(default_factory=MAPRDPSettings)
    diffusion_no_finetune: DDIPSettings = field(default_factory=DDIPSettings)
    ddip_no_mr: DDIPSettings = field(default_factory=DDIPSettings)
    ddip: DDIPSettings = field(default_factory=DDIPSettings)


@dataclass
class AblationConfig:
    """DDIP ablations: one setting changed at a time on ``cases`` (default: the first case)."""

    cases: list = field(default_factory=list)
    lora_rank: list = field(default_factory=list)
    t_start: list = field(default_factory=list)
    beta: list = field(default_factory=list)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, v) for k in ("lora_rank", "t_start", "beta") for v in getattr(self, k)]


@dataclass
class StudyConfig:
    """A whole study (YAML ⇄ dataclass; unknown keys are errors).

    ``simulation`` holds :class:`sirf_ddip.sim.simulate.SimulationConfig` keys shared by all cases (each case's
    tracer, dose fraction and seed — and its own ``simulation`` mapping — override them).  ``ddip`` holds
    ``DDIPConfig`` keys shared by the three DDIP variants; each variant's ``config`` overrides those, and the
    variants themselves force ``finetune: false`` (``diffusion_no_finetune``) and ``use_mr: false``
    (``ddip_no_mr``).  ``continue_on_error: true`` records a failing method as ``{"error": message}`` in
    metrics.json (and the report), without a done-marker so that a rerun retries it, and goes on with the rest;
    the CLI then exits with status 1.
    """

    cases: list = field(default_factory=list)
    simulation: dict = field(default_factory=dict)
    ddip: dict = field(default_factory=dict)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    device: str = "auto"
    title: str = "sirf_ddip simulation study"
    continue_on_error: bool = False

    def __post_init__(self):
        cases = []
        for i, c in enumerate(self.cases):
            if isinstance(c, CaseSpec):
                cases.append(c)
            elif isinstance(c, Mapping):
                cases.append(from_dict(CaseSpec, c, source="study config", prefix=f"cases[{i}]."))
            else:
                raise ConfigError(f"study config: cases[{i}] must be a mapping (tracer, dose_fraction, seed)")
        names = [c.name for c in cases]
        if len(set(names)) != len(names):
            raise ConfigError(f"study config: duplicate case names {names}")
        self.cases = cases
        for name in self.ablations.cases:
            if name not in names:
                raise ConfigError(f"study config: ablations.cases names unknown case {name!r}; cases: {names}")

    def ddip_config(self, method: str, **extra) -> "DDIPConfig":
        """The :class:`~sirf_ddip.recon.config.DDIPConfig` of a DDIP method: the shipped settings, then the
        study's shared ``ddip`` keys, then the method's ``config``, then the method's forced key and ``extra``."""
        from ..recon.config import DDIPConfig

        s: DDIPSettings = getattr(self.methods, method)
        data = deep_merge(self.ddip, s.config)
        if method == "diffusion_no_finetune":
            data["finetune"] = False
        elif method == "ddip_no_mr":
            data["use_mr"] = False
        data.update(extra)
        if "device" not in data and "device" not in (data.get("run") or {}):
            data["device"] = self.device
        try:
            return DDIPConfig.load(None, data)
        except ConfigError as exc:
            raise ConfigError(f"study config: methods.{method}: {exc}") from None


def load_study_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping | None = None) -> StudyConfig:
    """Read a study YAML (plus ``key=value`` overrides); unknown keys are :class:`ConfigError` naming the file."""
    data: dict[str, Any] = {}
    source = "study config"
    if path is not None:
        data = read_yaml(path)
        source = str(path)
    if overrides:
        ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        data = deep_merge(data, ov)
    try:
        cfg = from_dict(StudyConfig, data, source=source)
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
    if not cfg.cases:
        raise ConfigError(f"{source}: key 'cases' must list at least one case")
    return cfg


# ============================================================================================ data
@dataclass
class CaseData:
    """Everything a method needs about one case (built by :func:`load_case`, or directly in tests)."""

    name: str
    data_step: Any
    template: Any            # backend image fixing the grid (sirf_ddip.data.Image for the engine)
    truth: np.ndarray
    regions: Regions
    voxel_size_zyx: tuple
    mr: Any = None           # backend image or None
    units: str = "activity (a.u.)"
    description: str = ""
    info: dict = field(default_factory=dict)


def _read_mask(path: Path) -> np.ndarray:
    from ..io import read_image

    if not path.is_file():
        raise InputFileError(path, "mask file missing from the study case folder")
    return read_image(path).array > 0.5


#: The files :func:`load_case` needs in a study case folder (``mr.hv``, ``mask_lesion.hv``, ``case.json`` optional).
CASE_REQUIRED_FILES = ("prompts.hs", "mult_factors.hs", "additive_term.hs", "truth.hv", "mask_brain.hv",
                       "mask_gm.hv", "mask_wm.hv")


def missing_case_files(case_dir: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """The names among :data:`CASE_REQUIRED_FILES` (and ``extra``) that are not files in ``case_dir``."""
    d = Path(case_dir)
    return [f for f in (*CASE_REQUIRED_FILES, *extra) if not (d / f).is_file()]


def load_case(case_dir: str | Path, name: str | None = None, device: str | None = None) -> CaseData:
    """Read a PETRIC-layout case folder (as written by ``simulate_study``) into :class:`CaseData`."""
    from ..io import read_image
    from ..physics.model import EngineLogLikelihood

    d = Path(case_dir)
    missing = missing_case_files(d)
    if missing:
        raise InputFileError(d / missing[0], "file missing from the study case folder")
    info = json.loads((d / "case.json").read_text()) if (d / "case.json").is_file() else {}
    truth = read_image(d / "truth.hv")
    ds = EngineLogLikelihood.from_files(d / "prompts.hs", d / "mult_factors.hs", d / "additive_term.hs",
                                   image_template=d / "truth.hv", device=device)
    lesion = _read_mask(d / "mask_lesion.hv") if (d / "mask_lesion.hv").is_file() else None
    regions = Regions(_read_mask(d / "mask_brain.hv"), _read_mask(d / "mask_gm.hv"), _read_mask(d / "mask_wm.hv"),
                      lesion if lesion is not None and lesion.any() else None)
    mr = read_image(d / "mr.hv") if (d / "mr.hv").is_file() else None
    units = str(info.get("units", info.get("activity_units", "activity (a.u.)")))
    desc_keys = [k for k in ("tracer", "dose_fraction", "seed", "scanner", "counts", "total_counts") if k in info]
    desc = ", ".join(f"{k}={info[k]}" for k in desc_keys)
    return CaseData(name or d.name, ds, truth, np.asarray(truth.array, np.float64), regions,
                    tuple(truth.grid.voxel_size), mr, units, desc, info)


# ============================================================================================ helpers
def _tensor_np(x) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if hasattr(x, "array"):
        return np.asarray(x.array, np.float64)
    if hasattr(x, "as_array"):
        return np.asarray(x.as_array(), np.float64)
    return np.asarray(x, np.float64)


def gaussian_postfilter(x: np.ndarray, fwhm_mm: float, voxel_size_zyx: Sequence[float]) -> np.ndarray:
    """Isotropic Gaussian post-filter of FWHM ``fwhm_mm`` — STIR's separable, normalised kernel, zero boundary
    (:func:`sirf_ddip.recon.osem.gaussian_filter_mm`, as OSEM's own post-filter)."""
    import torch

    from ..recon.osem import gaussian_filter_mm

    if fwhm_mm <= 0:
        return np.asarray(x, np.float64)
    t = torch.as_tensor(np.asarray(x, np.float64))
    return gaussian_filter_mm(t, float(fwhm_mm), voxel_size_zyx).numpy()


def _uniform_init(case: CaseData):
    import torch

    ds = case.data_step
    s = ds.sensitivity(None)
    return torch.where(s > 0, torch.ones_like(s), torch.zeros_like(s))


def _osem_iterates(case: CaseData, num_subsets: int, subiterations: int, eval_at: set[int],
                   callback: Callable[[int, np.ndarray, float], None]) -> None:
    """Run OSEM (:class:`~sirf_ddip.recon.osem.OSEMReconstructor`) from a uniform image for ``subiterations``
    sub-iterations; at each sub-iteration in ``eval_at`` call ``callback(subiteration, image, cumulative_s)``
    (the time excludes the callbacks)."""
    from ..recon.osem import OSEMReconstructor

    ds = case.data_step
    rec = OSEMReconstructor()
    rec.set_objective_function(ds)
    rec.set_num_subsets(num_subsets)
    rec.set_num_subiterations(subiterations)
    t0 = time.perf_counter()
    rec.set_up(case.template)
    rec.set_current_estimate(ds.from_tensor(_uniform_init(case), case.template))
    spent = 0.0
    done = 0
    for k in sorted(e for e in eval_at if 0 < e <= subiterations):
        rec.run(k - done)
        done = k
        spent += time.perf_counter() - t0
        callback(k, _tensor_np(rec.x), spent)
        t0 = time.perf_counter()


# ============================================================================================ methods
MethodResult = tuple  # (image np.ndarray, metrics-extra dict, time_s)


def run_osem(case: CaseData, cfg: StudyConfig) -> tuple[np.ndarray, dict, float]:
    s: OSEMSettings = cfg.methods.osem
    n_clin = s.clinical_full_iterations()
    n_it = max(s.max_iterations, n_clin)
    sweep: list[dict] = []
    best = {"psnr": -math.inf}
    clinical: dict = {}

    def score(sub, img, el):
        it = sub / s.num_subsets
        m = all_metrics(img, case.truth, case.regions)
        sweep.append({"iterations": it, "subiterations": sub, "time_s": el, **m})
        p = m["psnr"] if m["psnr"] is not None else -math.inf
        if p > best["psnr"]:
            best.update(psnr=p, it=it, img=img, el=el)
        if sub == n_clin * s.num_subsets:
            t0 = time.perf_counter()
            filt = gaussian_postfilter(img, s.postfilter_fwhm_mm, case.voxel_size_zyx)
            el_f = el + time.perf_counter() - t0
            clinical.update(all_metrics(filt, case.truth, case.regions, extra={"time_s": el_f}))
            clinical.update(iterations=n_clin, subsets=s.num_subsets, postfilter_fwhm_mm=s.postfilter_fwhm_mm,
                            description=(f"{s.clinical_iterations} it × {s.clinical_subsets} subsets ≙ {n_clin} it × "
                                         f"{s.num_subsets} subsets, Gaussian {s.postfilter_fwhm_mm:g} mm FWHM"))
            clinical["_img"] = filt

    S = s.num_subsets
    eval_at = set(range(1, S + 1)) | {k * S for k in range(1, n_it + 1)}
    _osem_iterates(case, S, n_it * S, eval_at, score)
    if "img" not in best:
        raise ConfigError("osem: no iterate had a finite PSNR")
    extra = {"iterations": best["it"], "subsets": s.num_subsets,
             "selection": "best PSNR over the sweep (every sub-iteration of the first iteration, then every "
                          "iteration; oracle)",
             "sweep": sweep, "clinical": {k: v for k, v in clinical.items() if k != "_img"}}
    extra["_images"] = {"clinical": clinical.get("_img")}
    return best["img"], extra, best["el"]


def run_map_rdp(case: CaseData, cfg: StudyConfig) -> tuple[np.ndarray, dict, float]:
    from ..recon.map_rdp import penalty_sweep

    s: MAPRDPSettings = cfg.methods.map_rdp
    if not s.betas:
        raise ConfigError("study config: methods.map_rdp.betas is empty")
    t0 = time.perf_counter()
    got: dict[str, np.ndarray] = {}
    n_init = s.init_osem_iterations * s.num_subsets
    _osem_iterates(case, s.num_subsets, n_init, {n_init}, lambda k, img, el: got.__setitem__("img", img))
    init_img = got["img"]
    t_init = time.perf_counter() - t0
    ds = case.data_step
    from .metrics import psnr

    init = ds.from_tensor(ds.to_tensor(init_img), case.template)
    best, results = penalty_sweep(ds, init, [float(b) for b in s.betas], s.num_iterations,
                                  lambda x: psnr(_tensor_np(x), case.truth, case.regions.brain),
                                  gamma=s.gamma, epsilon_rel=s.epsilon_rel, neighbourhood=s.neighbourhood,
                                  voxel_size_zyx=case.voxel_size_zyx)
    sweep = []
    for r in results:
        m = all_metrics(_tensor_np(r.image), case.truth, case.regions)
        sweep.append({"beta": r.beta, "time_s": r.time_s + t_init, "objective": r.objective,
                      "monotone": bool(np.all(np.diff(r.history) >= 0)), **m})
    img, el = _tensor_np(best.image), best.time_s + t_init
    extra = {"beta": best.beta, "gamma": s.gamma, "epsilon": best.epsilon, "neighbourhood": s.neighbourhood,
             "iterations": s.num_iterations, "algorithm": "SGP (preconditioned, Armijo) — monotone",
             "selection": "best PSNR over the beta sweep (oracle)", "sweep": sweep,
             "sweep_time_s": time.perf_counter() - t0,
             "beta_at_edge_of_sweep": best.beta in (min(s.betas), max(s.betas)) and len(s.betas) > 1}
    return img, extra, el


def run_ddip_variant(method: str, case: CaseData, cfg: StudyConfig, **config_extra) -> tuple[np.ndarray, dict, float]:
    from ..recon.ddip import DDIPReconstructor

    s: DDIPSettings = getattr(cfg.methods, method)
    dcfg = cfg.ddip_config(method, **config_extra)
    t0 = time.perf_counter()
    rec = DDIPReconstructor(config=dcfg)
    rec.set_prior(s.prior)
    if rec.config.use_mr:
        if case.mr is None:
            raise InputFileError(case.name, f"{method}: use_mr is true but the case has no MR image (mr.hv)")
        rec.set_anatomical_image(case.mr)
    rec.set_objective_function(case.data_step)
    rec.set_up(case.template)
    rec.process()
    out = rec.get_output()          # (reconstruct(image) would write into the shared template)
    el = time.perf_counter() - t0
    img = _tensor_np(case.data_step.to_tensor(out))
    extra = {"config": rec.config.to_dict(), "prior": s.prior or "default",
             "timing_per_step_s": rec.timing_report()}
    return img, extra, el


def run_ablation(case: CaseData, cfg: StudyConfig, key: str, value: Any) -> tuple[np.ndarray, dict, float]:
    """DDIP (the ``ddip`` method's settings) with one DDIP config key changed."""
    return run_ddip_variant("ddip", case, cfg, **{key: value})


def _method_fns() -> dict[str, Callable]:
    return {
        "osem": run_osem,
        "map_rdp": run_map_rdp,
        "diffusion_no_finetune": lambda case, cfg: run_ddip_variant("diffusion_no_finetune", case, cfg),
        "ddip_no_mr": lambda case, cfg: run_ddip_variant("ddip_no_mr", case, cfg),
        "ddip": lambda case, cfg: run_ddip_variant("ddip", case, cfg),
    }


def _method_settings(cfg: StudyConfig, method: str) -> dict:
    d = to_dict(getattr(cfg.methods, method))
    if method in ("diffusion_no_finetune", "ddip_no_mr", "ddip"):
        # only the algorithm keys: where it runs does not change what it computes (resume on another device)
        d["resolved_config"] = cfg.ddip_config(method).algorithm_dict()
    return json.loads(json.dumps(d, default=str))


# ============================================================================================ pieces & resume
def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _sanitize(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _sanitize(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _sanitize(obj.item())
    return obj


def _save_image(path: Path, arr: np.ndarray, case: CaseData) -> None:
    from ..data import Image
    from ..io import write_image

    grid = getattr(case.template, "grid", None)
    if grid is None:
        np.save(path.with_suffix(".npy"), arr.astype(np.float32))
        return
    write_image(path, Image(arr.astype(np.float32), grid, {}), overwrite=True)


def _load_image(folder: Path, name: str) -> np.ndarray | None:
    from ..io import read_image

    if (folder / f"{name}.hv").is_file():
        return np.asarray(read_image(folder / f"{name}.hv").array, np.float64)
    if (folder / f"{name}.npy").is_file():
        return np.load(folder / f"{name}.npy").astype(np.float64)
    return None


def _run_piece(folder: Path, settings: dict, case: CaseData, fn: Callable[[], tuple], overwrite: bool,
               label: str) -> dict:
    """Run one method on one case unless ``folder/result.json`` exists (then check settings and reuse)."""
    done = folder / "result.json"
    if done.is_file() and not overwrite:
        rec = json.loads(done.read_text())
        if rec.get("settings") != settings:
            raise ConfigError(f"{done}: made with other settings than the current config for {label}; rerun with "
                              "--overwrite or use a new output folder")
        print(f"[study] {label}: done already (resuming)", file=sys.stderr)
        return rec["metrics"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f"[study] {label}: running", file=sys.stderr)
    img, extra, el = fn()
    images = extra.pop("_images", {}) or {}
    _save_image(folder / "recon.hv", img, case)
    for k, v in images.items():
        if v is not None:
            _save_image(folder / f"recon_{k}.hv", v, case)
    m = all_metrics(img, case.truth, case.regions, extra={"time_s": el})
    m.update(_sanitize(extra))
    m = _sanitize(m)
    _write_json_atomic(done, {"settings": settings, "metrics": m})
    print(f"[study] {label}: PSNR {m.get('psnr')} dB, {el:.1f} s", file=sys.stderr)
    return m


# ============================================================================================ simulate
def simulate_cases(cfg: StudyConfig, out_dir: str | Path, overwrite: bool = False,
                   simulate_fn: Callable | None = None) -> dict[str, Path]:
    """Simulate every case into ``out_dir/data/CASE`` (skipping finished ones); returns case → folder."""
    out_dir = Path(out_dir)
    if simulate_fn is None:
        from ..sim.simulate import SimulationConfig, simulate_study

        def simulate_fn(c: CaseSpec, folder: Path, ow: bool):
            data = deep_merge(cfg.simulation, c.simulation)
            data.update(tracer=c.tracer, dose_fraction=c.dose_fraction, seed=c.seed)
            sc = from_dict(SimulationConfig, data, source=f"study config (simulation for case {c.name})")
            return simulate_study(sc, folder, overwrite=ow)
    folders = {}
    for c in cfg.cases:
        folder = out_dir / "data" / c.name
        marker = out_dir / "data" / f"{c.name}.done"
        spec = json.loads(json.dumps({"case": to_dict(c), "simulation": cfg.simulation}, default=str))
        if marker.is_file() and not overwrite:
            if json.loads(marker.read_text()) != spec:
                raise ConfigError(f"{marker}: case {c.name} was simulated with other settings; rerun with "
                                  "--overwrite or use a new output folder")
            print(f"[study] simulate {c.name}: done already", file=sys.stderr)
        else:
            print(f"[study] simulate {c.name}", file=sys.stderr)
            t0 = time.perf_counter()
            simulate_fn(c, folder, overwrite or folder.exists())
            _write_json_atomic(marker, spec)
            print(f"[study] simulate {c.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        folders[c.name] = folder
    return folders


# ============================================================================================ the study
def run_study(cfg: StudyConfig, out_dir: str | Path, overwrite: bool = False, *,
              simulate_fn: Callable | None = None, load_case_fn: Callable[[str, Path], CaseData] | None = None,
              method_fns: Mapping[str, Callable] | None = None, build: bool = True) -> dict:
    """Simulate → methods → metrics → report.  Returns the ``metrics.json`` dictionary.

    ``simulate_fn``, ``load_case_fn`` and ``method_fns`` (method name → ``fn(case, cfg)``; key ``"ablation"`` →
    ``fn(case, cfg, key, value)``) replace the built-in pieces (used by tests).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    write_run_record(out_dir, config=cfg, seed=None, extra={"what": "sirf_ddip study"})
    folders = simulate_cases(cfg, out_dir, overwrite=overwrite, simulate_fn=simulate_fn)
    if load_case_fn is None:
        load_case_fn = lambda name, folder: load_case(folder, name=name, device=cfg.device)  # noqa: E731
    fns = dict(_method_fns())
    if method_fns:
        fns.update(method_fns)
    enabled = [m for m in METHODS if getattr(cfg.methods, m).enabled]
    metrics: dict[str, Any] = {"cases": {}}
    ablations: dict[str, list] = {"lora_rank": [], "t_start": [], "beta": []}
    abl_cases = cfg.ablations.cases or [cfg.cases[0].name]
    for c in cfg.cases:
        case = load_case_fn(c.name, folders[c.name])
        cm: dict[str, Any] = {}
        for m in enabled:
            try:
                cm[m] = _run_piece(out_dir / "cases" / c.name / m, _method_settings(cfg, m), case,
                                   lambda m=m: fns[m](case, cfg), overwrite, f"{c.name}/{m}")
            except Exception as exc:  # noqa: BLE001 - recorded, re-raised unless continue_on_error
                if not cfg.continue_on_error or isinstance(exc, KeyboardInterrupt):
                    raise
                msg = f"{type(exc).__name__}: {exc}"
                print(f"[study] {c.name}/{m}: FAILED: {msg}", file=sys.stderr)
                cm[m] = {"error": msg}
        metrics["cases"][c.name] = cm
        if c.name in abl_cases and cfg.ablations.items():
            abl_fn = fns.get("ablation", run_ablation)
            for key, value in cfg.ablations.items():
                settings = {"base": _method_settings(cfg, "ddip"), key: value}
                try:
                    am = _run_piece(out_dir / "ablations" / c.name / f"{key}_{value}", settings, case,
                                    lambda key=key, value=value: abl_fn(case, cfg, key, value), overwrite,
                                    f"{c.name}/ablation {key}={value}")
                except Exception as exc:  # noqa: BLE001
                    if not cfg.continue_on_error:
                        raise
                    am = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"[study] {c.name}/ablation {key}={value}: FAILED: {am['error']}", file=sys.stderr)
                ablations[key].append({"case": c.name, "value": value,
                                       **{k: am.get(k) for k in ("psnr", "ssim", "nrmse", "time_s", "error")
                                          if k in am}})
        _write_json_atomic(out_dir / "metrics.json", _sanitize(metrics))
    _write_json_atomic(out_dir / "metrics.json", _sanitize(metrics))
    if any(ablations.values()):
        _write_json_atomic(out_dir / "ablations.json", _sanitize(ablations))
    if build:
        rebuild_report(out_dir, cfg, load_case_fn=load_case_fn, folders=folders,
                       wall_time_s=time.perf_counter() - t_start)
    return metrics


def _read_json(path: Path, what: str) -> Any:
    from ..errors import InputFileError

    if not path.is_file():
        raise InputFileError(path, f"no {what} file{' (a folder)' if path.is_dir() else ''}: run the study first "
                             "(without --report-only)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputFileError(path, f"the {what} file is not UTF-8 text (corrupt?)") from None
    except json.JSONDecodeError as exc:
        raise InputFileError(path, f"the {what} file is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                             f"{exc.msg}); rerun the study to rewrite it") from None


def read_metrics(path: str | Path, cases: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``metrics.json`` of a study, checked: a JSON object whose ``cases`` holds results (a method → result
    object per case), for at least one of ``cases`` when given.

    Raises
    ------
    InputFileError
        The file is missing, not JSON, or holds no results (``{}``, no ``cases``, none of the study's cases).
    """
    from ..errors import InputFileError

    path = Path(path)
    metrics = _read_json(path, "metrics")
    got = metrics.get("cases") if isinstance(metrics, dict) else None
    if not isinstance(got, dict) or not got:
        raise InputFileError(path, "holds no results (no case under 'cases'): nothing to report; rerun the study",
                             key="cases")
    for cname, cm in got.items():
        if not isinstance(cm, dict) or not all(isinstance(r, dict) for r in cm.values()):
            raise InputFileError(path, f"case {cname!r} is not a method -> result mapping", key=f"cases.{cname}")
    if cases is not None and not any(c in got for c in cases):
        raise InputFileError(path, f"holds results for {', '.join(map(repr, got))}, none of the study's cases "
                             f"({', '.join(map(repr, cases))}): another study's folder or config?", key="cases")
    return metrics


def rebuild_report(out_dir: str | Path, cfg: StudyConfig, load_case_fn: Callable | None = None,
                   folders: Mapping[str, Path] | None = None, wall_time_s: float | None = None) -> Path:
    """(Re)build ``out_dir/report.html`` from ``metrics.json``, ``ablations.json`` and the saved images."""
    from ..utils.provenance import versions
    from .report import ReportCase, build_report

    out_dir = Path(out_dir)
    metrics = read_metrics(out_dir / "metrics.json", [c.name for c in cfg.cases])
    abl_path = out_dir / "ablations.json"
    ablations = _read_json(abl_path, "ablations") if abl_path.is_file() else None
    folders = folders or {c.name: out_dir / "data" / c.name for c in cfg.cases}
    if load_case_fn is None:
        load_case_fn = lambda name, folder: load_case(folder, name=name, device="cpu")  # noqa: E731
    rcases = []
    for c in cfg.cases:
        if c.name not in metrics.get("cases", {}):
            continue
        case = load_case_fn(c.name, folders[c.name])
        imgs = {}
        for m in metrics["cases"][c.name]:
            a = _load_image(out_dir / "cases" / c.name / m, "recon")
            if a is not None:
                imgs[m] = a
        mr = None
        if case.mr is not None:
            mr = _tensor_np(case.mr)
        rcases.append(ReportCase(c.name, case.truth, imgs, case.voxel_size_zyx, case.units, mr=mr,
                                 brain=case.regions.brain, lesion=case.regions.lesion,
                                 description=case.description or f"{c.tracer}, dose fraction {c.dose_fraction:g}, "
                                                                 f"seed {c.seed}"))
    v = versions()
    info = {"cases": ", ".join(c.name for c in cfg.cases),
            "methods": ", ".join(m for m in METHODS if getattr(cfg.methods, m).enabled),
            "machine": f"{v.get('platform', '')}; torch {v.get('torch', '')}; device {cfg.device}"
                       + (f" ({v['gpu']})" if "gpu" in v else f"; {os.cpu_count()} CPU cores"),
            "sirf_ddip": v.get("sirf_ddip", "")}
    if wall_time_s is not None:
        info["study wall time (this run, s)"] = f"{wall_time_s:.1f}"
    return build_report(out_dir / "report.html", metrics, rcases, ablations=ablations, title=cfg.title,
                        info=info, overwrite=True)


def failed_pieces(metrics: Mapping[str, Any]) -> list[str]:
    """``CASE/METHOD`` of every method recorded as failed in ``metrics``."""
    return [f"{c}/{m}" for c, cm in metrics.get("cases", {}).items() for m, r in cm.items()
            if isinstance(r, Mapping) and "error" in r]


def format_metrics_table(metrics: Mapping[str, Any], keys: Sequence[str] = ("psnr", "ssim", "nrmse", "gm_bias",
                                                                           "gm_wm_cr", "lesion_bias", "noise",
                                                                           "time_s")) -> str:
    """Plain-text table of ``metrics.json`` (one block per case), for the terminal."""
    lines = []
    for cname, cm in metrics.get("cases", {}).items():
        lines.append(f"== {cname}")
        lines.append(f"{'method':<24}" + "".join(f"{k:>12}" for k in keys))
        rows = []
        for m, r in cm.items():
            rows.append((m, r))
            if isinstance(r.get("clinical"), Mapping):
                rows.append((f"{m} (clinical)", r["clinical"]))
        for m, r in rows:
            if "error" in r:
                lines.append(f"{m:<24}  FAILED: {str(r['error'])[:200]}")
                continue
            cells = []
            for k in keys:
                v = r.get(k)
                cells.append(f"{v:>12.4f}" if isinstance(v, (int, float)) and k in ("ssim", "nrmse", "gm_wm_cr")
                             else f"{v:>12.2f}" if isinstance(v, (int, float)) else f"{'n/a':>12}")
            lines.append(f"{m:<24}" + "".join(cells))
    return "\n".join(lines)
