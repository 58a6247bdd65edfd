"""Benchmark of HQS-DDIP: seconds per diffusion step by part, peak memory, totals, and the reference cost model.

Usage::

    python benchmarks/ddip.py                       # CPU (and CUDA when present), shipped config + paper config
    python benchmarks/ddip.py --steps 2 --devices cpu --xy 128 --setups ref2d,mmr4
    python benchmarks/ddip.py --weights PATH        # a trained prior (default: shipped, else random init)
    python benchmarks/ddip.py --sirf                # on real sirf.STIR objects vs the engine (ddip_sirf.py)

Set-ups (built-in engine, Siemens mMR, span 1, ray-tracing projector):

- ``ref2d``: the authors' 2D reference: one 3-plane slab (mMR with 2 rings → 3 image planes, 1 slab);
- ``mmr4``:  the 3D acceptance geometry: mMR with 4 rings → 7 planes → 5 overlapping slabs.

For each set-up and device it runs ``--steps`` diffusion steps after a short warm start and prints the mean time
per step broken down into network forward, fine-tune backward (+ optimiser), projector (EM numerator: forward +
back projection) and EM (update + fusion), the peak memory, and the extrapolated total for the full run
(``num_steps`` of the config). The reference code's cost per slab for 200 steps is 600 network forwards,
400 backwards, 2,000 forward and 4,400 back projections (it recomputes the sensitivity at every EM update); the
table prints ours next to it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sirf_ddip.recon.config import DDIPConfig  # noqa: E402
from sirf_ddip.recon.ddip import DDIPReconstructor  # noqa: E402

REF_PER_SLAB_200 = {"network_forwards": 600, "network_backwards": 400, "forward_projections": 2000,
                    "back_projections": 4400}
SETUPS = {"ref2d": 2, "mmr4": 4}


def make_problem(rings: int, xy: int, device: torch.device, counts: float = 2e6, seed: int = 0):
    """mMR with ``rings`` rings (span 1), a head-like phantom and its MR, Poisson prompts (+ constant background)."""
    from sirf_ddip.data import ProjData
    from sirf_ddip.geometry.scanner import get_scanner
    from sirf_ddip.geometry.sinogram import SinogramGeometry
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.physics.projector import Projector

    sc = get_scanner("mMR")
    from dataclasses import replace

    sc = replace(sc, num_rings=rings)
    geom = SinogramGeometry(sc, span=1)
    grid = geom.default_image_grid(xy=xy)
    proj = Projector(geom, grid, device=device)
    nz, ny, nx = grid.shape
    yy, xx = np.meshgrid(np.arange(ny) - ny / 2, np.arange(nx) - nx / 2, indexing="ij")
    head = ((yy / (0.32 * ny)) ** 2 + (xx / (0.26 * nx)) ** 2 < 1).astype(np.float32)
    grey = ((yy / (0.28 * ny)) ** 2 + (xx / (0.22 * nx)) ** 2 > 0.7) * head
    x = np.repeat((head + 3 * grey)[None], nz, 0).astype(np.float32)
    mr = np.repeat((head * 100 + 50 * (head - grey))[None], nz, 0).astype(np.float32)
    xt = torch.as_tensor(x, device=device)
    ybar = proj.forward(xt)
    ybar = ybar * (counts / float(ybar.sum()))
    bg = float(ybar.mean()) * 0.3
    g = torch.Generator().manual_seed(seed)
    y = torch.poisson((ybar + bg).cpu(), generator=g).numpy()
    prompts = ProjData(y.astype(np.float32), geom)
    add = ProjData(np.full(y.shape, bg, np.float32), geom)
    ds = EngineLogLikelihood(prompts, None, add, grid=grid, device=device, projector=proj)
    return ds, grid, mr


def load_bundle(weights: str | None, device):
    try:
        from sirf_ddip.prior.weights import load_default, load_prior

        return (load_prior(weights, device=device) if weights else load_default(device=device)), "trained"
    except Exception as exc:  # noqa: BLE001 - benchmark falls back to a random network of the default arch
        from types import SimpleNamespace

        from sirf_ddip.prior.network import build_network, reinit_zero_layers
        from sirf_ddip.prior.scaling import MRScaler, PETScaler
        from sirf_ddip.prior.schedule import NoiseSchedule

        torch.manual_seed(0)
        net = build_network({})
        reinit_zero_layers(net)
        net.eval().to(device)
        note = f"random default-arch network ({type(exc).__name__}: {str(exc)[:80]})"
        return SimpleNamespace(network=net, schedule=NoiseSchedule(), pet_scaling=PETScaler(),
                               mr_scaling=MRScaler(), card={}, path=None), note


def peak_mem_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(setup: str, cfg: DDIPConfig, device, steps: int, xy: int, weights):
    rings = SETUPS[setup]
    ds, grid, mr = make_problem(rings, xy, device)
    bundle, kind = load_bundle(weights, device)
    r = DDIPReconstructor(cfg.replace(n_init=2, device=str(device.type)))
    r.set_objective_function(ds)
    r.set_prior(bundle)
    r.set_anatomical_image(mr)
    r.set_up(np.zeros(grid.shape, np.float32))
    r.initialise()
    ds.sensitivity(None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    r.run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / steps
    rep = r.timing_report()
    n_slabs = r.prior.num_slabs(r.data_step.image_shape[0])
    n = r.iteration
    full = cfg.num_steps
    per_slab_200 = {
        "network_forwards": r.counts["slab_forwards"] / n / n_slabs * 200,
        "network_backwards": r.counts["slab_backwards"] / n / n_slabs * 200,
        "forward_projections": r.counts["em_updates"] / n * 200,
        "back_projections": r.counts["em_updates"] / n * 200,
    }
    return {
        "setup": setup, "device": str(device), "image": list(grid.shape), "slabs": n_slabs, "prior": kind,
        "threads": torch.get_num_threads(), "config": {k: getattr(cfg, k) for k in (
            "num_steps", "num_finetune", "num_em", "finetune_slabs", "num_subsets", "slab_batch")},
        "s_per_step": round(wall, 3),
        "breakdown_s_per_step": {k: round(rep.get(k, 0.0), 3) for k in (
            "network_forward", "finetune_backward", "projector", "em")},
        "peak_memory_MB": round(peak_mem_mb(device), 1),
        "projected_total_min": round(wall * full / 60, 2),
        "cost_per_slab_per_200_steps": {k: round(v, 1) for k, v in per_slab_200.items()},
        "reference_per_slab_per_200_steps": REF_PER_SLAB_200,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="diffusion steps timed per case")
    ap.add_argument("--xy", type=int, default=128, help="transaxial image size (voxels)")
    ap.add_argument("--setups", default="ref2d,mmr4")
    ap.add_argument("--devices", default="auto", help="comma list: cpu, cuda; auto = cpu (+ cuda when present)")
    ap.add_argument("--configs", default="shipped,paper", help="shipped (configs/ddip.yaml), paper (defaults)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--sirf", action="store_true",
                    help="per-step cost on real sirf.STIR objects vs the engine (benchmarks/ddip_sirf.py)")
    a = ap.parse_args(argv)
    if a.sirf:
        from ddip_sirf import main as sirf_main

        return sirf_main(["--steps", str(a.steps)] + (["--threads", str(a.threads)] if a.threads else []))
    if a.threads:
        torch.set_num_threads(a.threads)
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if a.devices == "auto" else a.devices.split(",")
    cfgs = {"shipped": DDIPConfig.shipped(), "paper": DDIPConfig.paper()}
    results = []
    for dev in devs:
        for cname in a.configs.split(","):
            for setup in a.setups.split(","):
                res = bench(setup, cfgs[cname], torch.device(dev), a.steps, a.xy, a.weights)
                res["config_name"] = cname
                results.append(res)
                print(json.dumps(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    print("\nsetup   device config   slabs  s/step  [net fwd | ft bwd | proj | em]   peak MB  total(min)  "
          "fwd/bwd/FP/BP per slab per 200 steps (reference 600/400/2000/4400)")
    for r in results:
        b = r["breakdown_s_per_step"]
        c = r["cost_per_slab_per_200_steps"]
        print(f"{r['setup']:7s} {r['device']:6s} {r['config_name']:8s} {r['slabs']:5d} {r['s_per_step']:7.2f}  "
              f"[{b['network_forward']:.2f} | {b['finetune_backward']:.2f} | {b['projector']:.2f} | {b['em']:.3f}]"
              f"  {r['peak_memory_MB']:8.0f}  {r['projected_total_min']:9.1f}   "
              f"{c['network_forwards']:.0f}/{c['network_backwards']:.0f}/{c['forward_projections']:.0f}/"
              f"{c['back_projections']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
