"""Tune DDIP settings on *validation* studies (never on the cases you report).

For every case folder (PETRIC layout written by ``sirf-ddip simulate``: prompts/mult_factors/additive_term, truth.hv,
mr.hv, mask_brain.hv) it reconstructs

- OSEM/MLEM iteration sweeps (the best iterate by PSNR in the brain mask: an oracle baseline), and
- DDIP for every combination of the ``--grid`` values on top of ``--config`` (+ ``--set`` overrides),

and writes one JSON line per run (case, settings, PSNR, SSIM, NRMSE, seconds) to ``--out``, so partial results
survive an interruption. The data step (projector matrices, sensitivities) and the prior are built once per case.

Example::

    python benchmarks/ddip_sweep.py /tmp/val/amyloid-negative_11 --grid beta=0.01,1,10 --grid num_finetune=1,2 \
        --set num_steps=20 --out sweep.jsonl --device auto
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

REPO = Path(__file__).resolve().parents[1]


def parse_grid(items: list[str]) -> list[dict]:
    import yaml

    axes = []
    for item in items:
        key, vals = item.split("=", 1)
        axes.append([(key, yaml.safe_load(v)) for v in vals.split(",")])
    return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="case folders (PETRIC layout with truth.hv, mr.hv, mask_brain.hv)")
    ap.add_argument("--config", default=str(REPO / "configs" / "ddip.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every run")
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (cartesian product)")
    ap.add_argument("--runs", default=None, help="JSON list of override dicts, run after the --grid product")
    ap.add_argument("--weights", default=None, help="prior weights (default: shipped)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--osem-subsets", type=int, nargs="*", default=[1, 7])
    ap.add_argument("--osem-max-iter", type=int, default=30)
    ap.add_argument("--out", required=True, help="JSON-lines output")
    args = ap.parse_args(argv)

    from sirf_ddip.config import parse_overrides
    from sirf_ddip.io import read_image
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.prior.weights import load_default, load_prior
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.recon.ddip import DDIPReconstructor
    from sirf_ddip.recon.osem import OSEMReconstructor
    from sirf_ddip.study.metrics import nrmse, psnr, ssim
    from sirf_ddip.utils.device import resolve_device

    dev = resolve_device(args.device)
    bundle = load_prior(args.weights, device=dev) if args.weights else load_default(device=dev)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = parse_overrides(args.overrides)
    grid = parse_grid(args.grid) if (args.grid or not args.runs) else []
    if args.runs:
        grid += list(json.loads(args.runs))

    def emit(rec):
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    for case in map(Path, args.cases):
        truth = read_image(case / "truth.hv")
        mr = read_image(case / "mr.hv")
        brain = read_image(case / "mask_brain.hv").array > 0.5
        t0 = time.perf_counter()
        ds = EngineLogLikelihood.from_files(case / "prompts.hs", case / "mult_factors.hs", case / "additive_term.hs",
                                       image_template=case / "truth.hv", device=dev)
        ds.sensitivity(None)
        setup_s = time.perf_counter() - t0

        def score(arr):
            return {"psnr": psnr(arr, truth.array, brain), "ssim": ssim(arr, truth.array, brain),
                    "nrmse": nrmse(arr, truth.array, brain)}

        for S in args.osem_subsets:
            rec = OSEMReconstructor(ds, num_subsets=S)
            init = truth.with_array(np.ones(truth.grid.shape, np.float32))
            rec.set_num_subiterations(args.osem_max_iter * S)
            rec.set_up(init)
            rec.set_current_estimate(init)
            best = (-1e9, 0)
            curve = []
            for it in range(1, args.osem_max_iter + 1):
                rec.run(S)
                p = psnr(rec.x.detach().cpu().numpy(), truth.array, brain)
                curve.append(round(p, 3))
                best = max(best, (p, it))
            emit({"case": case.name, "method": f"osem_S{S}", "best_psnr": best[0], "best_iter": best[1],
                  "curve": curve, "setup_s": round(setup_s, 2)})

        for g in grid:
            ov = dict(base)
            ov.update(g)
            ov["device"] = str(dev)
            cfg = DDIPConfig.load(args.config, ov)
            if dev.type == "cpu" and cfg.num_threads > 0:
                torch.set_num_threads(cfg.num_threads)
            t0 = time.perf_counter()
            r = DDIPReconstructor(cfg)
            r.set_objective_function(ds)
            r.set_prior(bundle)
            if cfg.use_mr:
                r.set_anatomical_image(mr)
            r.set_up(truth.with_array(np.zeros(truth.grid.shape, np.float32)))
            r.run(r.remaining())
            x = r.get_output().array
            rec = {"case": case.name, "method": "ddip", "settings": g, **score(x),
                   "seconds": round(time.perf_counter() - t0, 2), "pet_scale": float(r.pet_scaler.scale),
                   "mean_ratio": float(x[brain].mean() / truth.array[brain].mean())}
            emit(rec)
            del r
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
