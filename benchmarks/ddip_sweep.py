"""Tune DDIP settings on *validation* studies (never on the cases you report), with lesion fidelity.

For every case folder (PETRIC layout written by ``sirf-ddip simulate``: prompts/mult_factors/additive_term, truth.hv,
mr.hv, mask_brain.hv, mask_lesion.hv) it computes once (cached as ``CASE/baselines.json``):

- OSEM iteration sweeps for ``--osem-subsets`` (each iterate: PSNR, SSIM, the mean bias of every lesion, the Poisson
  log-likelihood; the best iterate by PSNR is the oracle baseline), and the best Gaussian post-filter of every
  iterate (FWHM ``--fwhm`` mm);
- MAP-RDP for ``--rdp-betas`` (oracle β by PSNR);
- the log-likelihood of the truth;

then DDIP for every combination of the ``--grid`` values on top of ``--config`` (+ ``--set`` overrides), and for
every DDIP output the data-consistency stage ``final_em = k`` for each ``--final-em`` k (computed from the same
output, so the trade-off curve costs only EM updates). One JSON line per result goes to ``--out`` (partial results
survive an interruption). Lesions are the connected components of ``mask_lesion.hv``, then those of
``mask_departure.hv`` (hypometabolic regions, departure lesions; :func:`case_regions`).

Example::

    python benchmarks/ddip_sweep.py /work/val/fdg_213_d0.1 --grid beta=3,10 --final-em 0,2,5 --out sweep.jsonl

The validation studies of ``docs/VALIDATION.md``'s table: ``sirf-ddip simulate benchmarks/validation/NAME.yaml --out
VAL/NAME`` for each file there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch



def parse_grid(items: list[str]) -> list[dict]:
    import yaml

    axes = []
    for item in items:
        key, vals = item.split("=", 1)
        axes.append([(key, yaml.safe_load(v)) for v in vals.split(",")])
    return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def lesion_labels(mask: np.ndarray) -> list[np.ndarray]:
    """One boolean mask per connected lesion (26-connectivity), largest first."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    out = [lab == i for i in range(1, n + 1)]
    return sorted(out, key=lambda m: -int(m.sum()))


def case_regions(case: Path, min_voxels: int = 10) -> list[np.ndarray]:
    """The regions a case scores: the lesions of ``mask_lesion.hv`` (largest first), then the departures of
    ``mask_departure.hv`` (``sim/departures.py``: hypometabolic regions and departure lesions, largest first,
    components of at least ``min_voxels``)."""
    from sirf_ddip.io import read_image

    les = case / "mask_lesion.hv"
    out = lesion_labels(read_image(les).array > 0.5) if les.is_file() else []
    dep = case / "mask_departure.hv"
    if dep.is_file():
        out += [m for m in lesion_labels(read_image(dep).array > 0.5) if int(m.sum()) >= min_voxels]
    return out


class Scorer:
    """PSNR/SSIM in the brain, per-lesion/region mean bias (%), Poisson log-likelihood."""

    def __init__(self, case: Path, ds):
        from sirf_ddip.io import read_image

        self.truth = read_image(case / "truth.hv").array.astype(np.float64)
        self.brain = read_image(case / "mask_brain.hv").array > 0.5
        self.lesions = case_regions(case)
        self.ds = ds

    def __call__(self, x: np.ndarray | torch.Tensor, loglik: bool = True) -> dict:
        from sirf_ddip.study.metrics import mean_bias, psnr, ssim

        xt = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, np.float32))
        arr = xt.detach().cpu().numpy().astype(np.float64)
        rec = {"psnr": round(psnr(arr, self.truth, self.brain), 3),
               "ssim": round(ssim(arr, self.truth, self.brain), 4),
               "lesion_bias": [round(mean_bias(arr, self.truth, m), 2) for m in self.lesions]}
        if loglik:
            rec["loglik"] = round(float(self.ds.value(xt.to(self.ds.device, self.ds.dtype))), 2)
        return rec


def gaussian(arr: np.ndarray, fwhm_mm: float, voxel_zyx) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sig = [fwhm_mm / 2.3548 / v for v in voxel_zyx]
    return gaussian_filter(arr, sig, mode="constant")


def set_up_ddip(cfg, ds, bundle, mr, truth):
    """A DDIP reconstructor on ``ds`` with ``bundle``'s prior (and ``mr`` where ``cfg.use_mr``), set up on the
    truth's grid, as the ``recon`` command does (shared with ``ddip_trace.py``)."""
    from sirf_ddip.recon.ddip import DDIPReconstructor

    r = DDIPReconstructor(cfg)
    r.set_objective_function(ds)
    r.set_prior(bundle)
    if cfg.use_mr:
        r.set_anatomical_image(mr)
    r.set_up(truth.with_array(np.zeros(truth.grid.shape, np.float32)))
    return r


def baselines(case: Path, ds, sc: Scorer, args) -> dict:
    """OSEM sweeps (+ post-filter), MAP-RDP, truth log-likelihood; cached in ``case/baselines.json``."""
    from sirf_ddip.io import read_image
    from sirf_ddip.recon.map_rdp import penalty_sweep
    from sirf_ddip.recon.osem import OSEMReconstructor
    from sirf_ddip.study.metrics import psnr

    cache = case / "baselines.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    truth_img = read_image(case / "truth.hv")
    vox = truth_img.grid.voxel_size
    out: dict = {"truth": sc(sc.truth.astype(np.float32)), "osem": {}, "num_lesions": len(sc.lesions),
                 "lesion_voxels": [int(m.sum()) for m in sc.lesions]}
    init = truth_img.with_array(np.ones(truth_img.grid.shape, np.float32))
    for S in args.osem_subsets:
        rec = OSEMReconstructor(ds, num_subsets=S)
        rec.set_num_subiterations(args.osem_max_iter * S)
        rec.set_up(init)
        rec.set_current_estimate(init)
        its = []
        for it in range(1, args.osem_max_iter + 1):
            rec.run(S)
            x = rec.x.detach().clone()
            r = {"iter": it, **sc(x)}
            arr = x.cpu().numpy().astype(np.float64)
            filt = [(psnr(gaussian(arr, f, vox), sc.truth, sc.brain), f) for f in args.fwhm]
            bp, bf = max(filt)
            r["filtered_psnr"], r["filtered_fwhm"] = round(bp, 3), bf
            its.append(r)
        best = max(its, key=lambda r: r["psnr"])
        bestf = max(its, key=lambda r: r["filtered_psnr"])
        # the filtered best's lesion bias and SSIM
        rec2 = OSEMReconstructor(ds, num_subsets=S)
        rec2.set_num_subiterations(bestf["iter"] * S)
        rec2.set_up(init)
        rec2.set_current_estimate(init)
        rec2.run(bestf["iter"] * S)
        farr = gaussian(rec2.x.detach().cpu().numpy().astype(np.float64), bestf["filtered_fwhm"], vox)
        out["osem"][f"S{S}"] = {"iterates": its, "best": best,
                                "best_filtered": {"iter": bestf["iter"], "fwhm": bestf["filtered_fwhm"],
                                                  **sc(farr.astype(np.float32))}}
    # MAP-RDP starts from one OSEM iteration with the most subsets swept (7 by default, as before)
    s_init = max(args.osem_subsets or [1])
    rec_init = OSEMReconstructor(ds, num_subsets=s_init)
    rec_init.set_num_subiterations(s_init)
    rec_init.set_up(init)
    rec_init.set_current_estimate(init)
    rec_init.run(s_init)
    x_init = ds.from_tensor(rec_init.x.detach().clone(), truth_img)
    best, res = penalty_sweep(ds, x_init, args.rdp_betas, 15,
                              lambda x: psnr(x.cpu().numpy(), sc.truth, sc.brain))
    out["map_rdp"] = {"beta": best.beta, **sc(best.image), "all": [{"beta": r.beta, "psnr": round(r.score, 3)}
                                                                     for r in res]}
    tmp = cache.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(cache)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="case folders (PETRIC layout with truth.hv, mr.hv, mask_brain.hv)")
    ap.add_argument("--config", default=None, help="YAML layered over the shipped settings (or the preset)")
    ap.add_argument("--preset", default=None, help="start from DDIPConfig.preset(NAME): paper, 0.4, 0.2, 0.1")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every run")
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (cartesian product)")
    ap.add_argument("--runs", default=None, help="JSON list of override dicts, run after the --grid product")
    ap.add_argument("--final-em", default="0", help="comma list of final_em values scored from each output")
    ap.add_argument("--final-em-beta", default="0",
                    help="comma list of final_em_beta values (network units) for every final_em k > 0")
    ap.add_argument("--score-hqs", action="store_true",
                    help="also score the last HQS image (x0 fused with the data) instead of the network's x0")
    ap.add_argument("--weights", default=None, help="prior weights (default: shipped)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--osem-subsets", type=int, nargs="*", default=[1, 7])
    ap.add_argument("--osem-max-iter", type=int, default=30)
    ap.add_argument("--fwhm", type=float, nargs="*", default=[2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
    ap.add_argument("--rdp-betas", type=float, nargs="*", default=[0.003, 0.01, 0.03, 0.1])
    ap.add_argument("--baselines-only", action="store_true")
    ap.add_argument("--save-dir", default=None,
                    help="also write every DDIP output (final_em 0) as CASE_<n>.npy here, n = the 0-based line "
                         "of its first result in --out")
    ap.add_argument("--out", required=True, help="JSON-lines output")
    args = ap.parse_args(argv)
    from sirf_ddip.study.study import missing_case_files

    for case in map(Path, args.cases):
        missing = missing_case_files(case, extra=("mr.hv",))
        if missing:
            print(f"ddip_sweep: case folder {case}: missing {', '.join(missing)} (make a validation case with "
                  "`sirf-ddip simulate benchmarks/validation/NAME.yaml --out DIR`)", file=sys.stderr)
            return 2
    if args.runs:
        try:
            runs = json.loads(args.runs)
            if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
                raise ValueError("not a list of objects")
        except ValueError as exc:
            print(f"ddip_sweep: --runs must be a JSON list of override objects ({exc})", file=sys.stderr)
            return 2

    from sirf_ddip.config import parse_overrides
    from sirf_ddip.io import read_image
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.prior.weights import load_default, load_prior
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.recon.hqs import beta_activity
    from sirf_ddip.utils.device import resolve_device

    torch.set_num_threads(1)
    dev = resolve_device(args.device)
    bundle = load_prior(args.weights, device=dev) if args.weights else load_default(device=dev)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = parse_overrides(args.overrides)
    grid = parse_grid(args.grid) if (args.grid or not args.runs) else []
    if args.runs:
        grid += list(runs)
    final_em = [int(v) for v in args.final_em.split(",")]
    final_em_beta = [float(v) for v in args.final_em_beta.split(",")]

    def emit(rec):
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    for case in map(Path, args.cases):
        truth = read_image(case / "truth.hv")
        mr = read_image(case / "mr.hv")
        ds = EngineLogLikelihood.from_files(case / "prompts.hs", case / "mult_factors.hs", case / "additive_term.hs",
                                       image_template=case / "truth.hv", device=dev)
        ds.sensitivity(None)
        sc = Scorer(case, ds)
        t0 = time.perf_counter()
        bl = baselines(case, ds, sc, args)
        emit({"case": case.name, "method": "baselines", "seconds": round(time.perf_counter() - t0, 1),
              "truth": bl["truth"], "map_rdp": {k: v for k, v in bl["map_rdp"].items() if k != "all"},
              **{f"osem_{k}": {"best": v["best"], "best_filtered": v["best_filtered"]}
                 for k, v in bl["osem"].items()}})
        if args.baselines_only:
            continue
        for g in grid:
            ov = dict(base)
            ov.update(g)
            ov["device"] = str(dev)
            ov["final_em"] = 0
            cfg = DDIPConfig.load(args.config, ov, preset=args.preset)
            t0 = time.perf_counter()
            r = set_up_ddip(cfg, ds, bundle, mr, truth)
            r.run(r.remaining())
            secs = round(time.perf_counter() - t0, 1)
            x = r.x.detach().clone()
            if args.save_dir:
                sd = Path(args.save_dir)
                sd.mkdir(parents=True, exist_ok=True)
                n = sum(1 for _ in out.open()) if out.is_file() else 0
                np.save(sd / f"{case.name}_{n}.npy", x.cpu().numpy())
            dc = r.data_consistency()
            common = {"seconds": secs, "loglik_warm_start": round(dc["loglik_warm_start"], 2),
                      "pet_scale": float(r.pet_scaler.scale)}
            em_done = r.image_step.em_counter
            for k in final_em:
                for fb in (final_em_beta if k > 0 else [0.0]):
                    y = x
                    if k > 0:   # the reconstructor's own final EM stage, each k from the run's end
                        r.image_step.em_counter = em_done
                        y = r.image_step.final_em(x, beta_activity(fb, r.pet_scaler.gain), k,
                                                  1e-3 * float(r.pet_scaler.scale))
                    extra = {"final_em_beta": fb} if k > 0 and fb > 0 else {}
                    emit({"case": case.name, "method": "ddip", "settings": {**g, "final_em": k, **extra}, **sc(y),
                          **common, "weights": args.weights or "default"})
            if args.score_hqs:
                emit({"case": case.name, "method": "ddip", "settings": {**g, "output": "hqs"},
                      **sc(r.image_step.masked(r._x_img.detach().clone())), **common})
            del r
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
