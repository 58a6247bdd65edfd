#!/usr/bin/env python
"""CUDA against CPU on a study folder: the same OSEM and DDIP runs on both devices, their difference and speed.

For a case in the PETRIC layout (``prompts.hs``, ``mult_factors.hs``, ``additive_term.hs``, ``mr.hv``; e.g. one
written by ``sirf-ddip simulate``) it runs, on the CPU and on CUDA (when present), with the same seed:

- OSEM, ``--osem-iterations`` iterations of ``--osem-subsets`` subsets from a uniform image;
- DDIP with the shipped settings, cut to ``--ddip-steps`` diffusion steps (all other keys as shipped; the
  DDIM noise and the fine-tuning slabs are drawn on the CPU, so both devices see the same random numbers),

and prints each run's wall time, its Poisson log-likelihood, and the relative L2 difference CUDA vs CPU (float32
on both; TF32 off). OSEM differs by summation order only (expected ~1e-6); DDIP passes through a network, LoRA
fine-tuning (AdamW steps) and a stochastic sampler, so small differences grow with the steps (the figure to
record, not a pass/fail threshold). A JSON summary goes to ``--out`` when given.

Example::

    python benchmarks/cuda_check.py /path/to/case --ddip-steps 10 --out cuda_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_device(case: Path, dev: torch.device, osem_iters: int, osem_subsets: int, ddip_steps: int,
               weights: str | None) -> dict:
    """OSEM and a short DDIP run on ``dev``: outputs (numpy), log-likelihoods, seconds."""
    from sirf_ddip.io import read_image
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.prior.weights import load_default, load_prior
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.recon.ddip import DDIPReconstructor
    from sirf_ddip.recon.osem import OSEMReconstructor

    mr = read_image(case / "mr.hv")
    t0 = time.perf_counter()
    ds = EngineLogLikelihood.from_files(case / "prompts.hs", case / "mult_factors.hs", case / "additive_term.hs",
                                        image_template=case / "mr.hv", device=dev)
    ds.sensitivity(None)
    _sync(dev)
    out: dict = {"device": str(dev), "setup_s": round(time.perf_counter() - t0, 2)}
    init = mr.with_array(np.ones(mr.grid.shape, np.float32))

    t0 = time.perf_counter()
    osem = OSEMReconstructor(ds, num_subsets=osem_subsets, num_iterations=osem_iters)
    osem.set_up(init)
    osem.set_current_estimate(init)
    osem.process()
    x_osem = osem.get_output_tensor().detach()
    _sync(dev)
    out["osem_s"] = round(time.perf_counter() - t0, 2)
    out["osem_loglik"] = float(ds.value(x_osem))
    out["osem"] = x_osem.cpu().numpy()

    bundle = load_prior(weights, device=dev) if weights else load_default(device=dev)
    cfg = DDIPConfig.shipped({"num_steps": ddip_steps, "device": str(dev), "final_em": 0})
    t0 = time.perf_counter()
    rec = DDIPReconstructor(cfg)
    rec.set_objective_function(ds)
    rec.set_prior(bundle)
    rec.set_anatomical_image(mr)
    rec.set_up(init)
    rec.run(rec.remaining())
    x = rec.x.detach()
    _sync(dev)
    out["ddip_s"] = round(time.perf_counter() - t0, 2)
    out["ddip_loglik"] = float(ds.value(x))
    out["ddip_timing_s_per_step"] = {k: round(v, 4) for k, v in rec.timing_report().items()}
    out["ddip"] = x.cpu().numpy()
    return out


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", help="study folder (PETRIC layout with mr.hv)")
    ap.add_argument("--osem-iterations", type=int, default=5)
    ap.add_argument("--osem-subsets", type=int, default=7)
    ap.add_argument("--ddip-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--weights", default=None, help="prior weights (default: shipped)")
    ap.add_argument("--out", default=None, help="JSON summary file")
    args = ap.parse_args(argv)
    case = Path(args.case)
    if not (case / "prompts.hs").is_file():
        ap.error(f"{case}: no prompts.hs (a study folder in the PETRIC layout is needed)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # CUDA first: under a time limit its figures are the ones that must survive; the summary is rewritten after
    # each device. The second device reuses the projector matrix the first one traced (set-up is not compared).
    devs = ([torch.device("cuda")] if torch.cuda.is_available() else []) + [torch.device("cpu")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
    res: dict = {}
    summary: dict = {"case": case.name, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "cpu_threads": torch.get_num_threads(),
                     "osem": f"{args.osem_iterations} it x {args.osem_subsets} sub", "ddip_steps": args.ddip_steps}
    for dev in devs:
        r = run_device(case, dev, args.osem_iterations, args.osem_subsets, args.ddip_steps, args.weights)
        res[dev.type] = r
        print(f"{dev.type:5s} set-up {r['setup_s']:7.2f} s  OSEM {args.osem_iterations}x{args.osem_subsets} "
              f"{r['osem_s']:7.2f} s (loglik {r['osem_loglik']:.6g})  DDIP {args.ddip_steps} steps {r['ddip_s']:7.2f} s "
              f"(loglik {r['ddip_loglik']:.6g}); DDIP s/step by part {r['ddip_timing_s_per_step']}", flush=True)
        summary[dev.type] = {k: v for k, v in r.items() if k not in ("osem", "ddip")}
        if "cuda" in res and "cpu" in res:
            c, g = res["cpu"], res["cuda"]
            summary["osem_rel_l2_cuda_vs_cpu"] = rel_l2(g["osem"], c["osem"])
            summary["ddip_rel_l2_cuda_vs_cpu"] = rel_l2(g["ddip"], c["ddip"])
            summary["speedup"] = {k: round(c[k] / max(g[k], 1e-9), 1) for k in ("osem_s", "ddip_s")}
            print(f"CUDA vs CPU: OSEM rel L2 {summary['osem_rel_l2_cuda_vs_cpu']:.2e}, DDIP rel L2 "
                  f"{summary['ddip_rel_l2_cuda_vs_cpu']:.2e}; speed-up {summary['speedup']}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1))
    if "cuda" not in res:
        print("no CUDA device: CPU figures only", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
