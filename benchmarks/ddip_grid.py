"""Benchmark: the prior on a clinical grid — one network pass over all slabs of a 127-plane volume.

Usage::

    python benchmarks/ddip_grid.py                        # 127 x 344 x 344 and 127 x 285 x 285, CPU, 1 thread
    python benchmarks/ddip_grid.py --grids 127x344x344 --mode resample --device cuda

For each PET grid (mMR voxels 2.03125 × 2.08626 × 2.08626 mm) it builds a :class:`~sirf_ddip.prior.grid.PriorGrid`
for the shipped default prior (128 × 128 training grid), maps a head-sized phantom and its MR onto the prior grid,
and times (each grid in its own process, so peak memory is that grid's):

- the grid maps ``to_prior`` (PET + MR) and ``from_prior``;
- one network forward over all ``Z − 2`` overlapping 3-plane slabs in batches of ``slab_batch`` (no gradient: the
  full-volume ε of a diffusion step);
- one fine-tuning mini-batch: forward with autograd + backward of ``finetune_slabs`` slabs through LoRA adapters.

It then extrapolates the network part of a full DDIP run with the settings of ``recon/ddip.yaml``: per diffusion
step ``num_finetune + 1`` full-volume passes and ``num_finetune`` mini-batches (see the cost model in that file).
The EM updates (``num_finetune · num_em`` per step, one full forward and back projection each) are the projector's
cost, not the prior's: pass ``--em-seconds`` (one EM update on the full span-11 template) to add them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MMR_VOXEL = (2.03125, 2.08626, 2.08626)


def _rss_gb() -> float:
    """Peak resident set size of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _phantom(grid) -> tuple[np.ndarray, np.ndarray]:
    """A head-sized ellipsoid (semi-axes 70 × 90 mm in-plane, 80 mm axially) with a hotter 'grey matter' shell,
    and an MR-like image of the same support (deterministic)."""
    z = (np.arange(grid.shape[0]) - (grid.shape[0] - 1) / 2.0) * grid.voxel_size[0]
    Z, Y, X = np.meshgrid(z, grid.coords(1), grid.coords(2), indexing="ij", sparse=True)
    r = np.sqrt((X / 70.0) ** 2 + (Y / 90.0) ** 2 + (Z / 80.0) ** 2)
    pet = np.where(r < 1.0, 1.0 + 3.0 * ((r > 0.8) & (r < 0.95)), 0.0).astype(np.float32)
    mr = np.where(r < 1.0, 0.6 + 0.4 * (r > 0.85), 0.0).astype(np.float32)
    return pet, mr


def _cfg(cfg, key: str):
    """A DDIP config value, top level or in the ``run`` section (``slab_batch`` moves there)."""
    if hasattr(cfg, key):
        return getattr(cfg, key)
    return getattr(getattr(cfg, "run"), key)


def run_one(shape: tuple[int, int, int], mode: str, device: str, slab_batch: int, finetune_slabs: int,
            t: int, seed: int, network: bool = True) -> dict:
    from sirf_ddip.geometry.image import ImageGrid
    from sirf_ddip.prior.adapters import add_lora
    from sirf_ddip.prior.grid import PriorGrid
    from sirf_ddip.prior.slabs import predict_eps, volume_to_slabs
    from sirf_ddip.prior.weights import load_default

    dev = torch.device(device)
    out: dict = {"grid": list(shape), "mode": mode, "device": str(dev), "threads": torch.get_num_threads()}
    grid = ImageGrid(shape, MMR_VOXEL)
    bundle = load_default(device=dev)
    pg = PriorGrid.from_bundle(grid, bundle, mode=mode, fov_radius_mm=120.0)
    out["prior_grid"] = pg.describe()
    pet_np, mr_np = _phantom(grid)
    pet = torch.from_numpy(pet_np).to(dev)
    mr = torch.from_numpy(mr_np).to(dev)
    out["rss_gb_inputs"] = _rss_gb()

    t0 = time.perf_counter()
    pet_p = pg.to_prior(pet)
    mr_p = pg.to_prior(mr)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out["to_prior_s"] = time.perf_counter() - t0
    pet_scaler = bundle.pet_scaling.fit(pet_p.cpu().numpy())
    mr_scaler = bundle.mr_scaling.fit(mr_p.cpu().numpy())
    u = pet_scaler.to_net(pet_p)
    m = mr_scaler.to_net(mr_p)
    g = torch.Generator().manual_seed(seed)
    xt = bundle.schedule.q_sample(u, t, torch.randn(u.shape, generator=g).to(dev))
    n_slabs = volume_to_slabs(xt, 3).shape[0]
    out["num_slabs"] = int(n_slabs)
    a = float(bundle.schedule.alphas_cumprod[t])
    if not network:  # same prior grid as a grid already measured: only the maps differ
        t0 = time.perf_counter()
        back = pg.from_prior(pet_scaler.from_net(u))
        out["from_prior_s"] = time.perf_counter() - t0
        out["from_prior_shape"] = list(back.shape)
        out["rss_gb_peak"] = _rss_gb()
        return out

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        eps = predict_eps(bundle.network, xt, t, m, batch_size=slab_batch, pad_value=bundle.pet_scaling.lo * a ** 0.5,
                          mr_pad_value=mr_scaler.lo)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_gb_forward"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    out["forward_all_slabs_s"] = time.perf_counter() - t0
    out["forward_per_slab_s"] = out["forward_all_slabs_s"] / n_slabs
    out["rss_gb_after_forward"] = _rss_gb()
    x0 = bundle.schedule.tweedie_x0(xt, eps, t)

    t0 = time.perf_counter()
    back = pg.from_prior(pet_scaler.from_net(x0))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out["from_prior_s"] = time.perf_counter() - t0
    out["from_prior_shape"] = list(back.shape)

    # one fine-tuning step's slabs (finetune_slabs random slabs, 0 = all, in batches of slab_batch): forward with
    # autograd + backward through LoRA adapters
    net = add_lora(bundle.network, rank=4)
    nft = n_slabs if finetune_slabs <= 0 else min(finetune_slabs, n_slabs)
    idx_all = torch.randperm(n_slabs, generator=g)[:nft]
    t0 = time.perf_counter()
    for j in range(0, nft, slab_batch):
        idx = idx_all[j:j + slab_batch]
        xs = volume_to_slabs(xt, 3)[idx]
        ms = volume_to_slabs(m, 3)[idx]
        tb = torch.full((len(idx),), t, dtype=torch.long, device=dev)
        target = volume_to_slabs(u, 3)[idx]
        with torch.enable_grad():
            e = net(xs, tb, ms)
            loss = ((bundle.schedule.tweedie_x0(xs, e, t) - target) ** 2).sum() / (nft * xs[0].numel())
            loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out["finetune_slabs"] = int(nft)
    out["finetune_minibatch_s"] = time.perf_counter() - t0
    out["rss_gb_peak"] = _rss_gb()
    return out


def extrapolate(res: dict, cfg, em_seconds: float | None) -> dict:
    """Seconds of a full DDIP run with ``cfg``'s settings from the measured pieces."""
    K = int(cfg.num_finetune) if cfg.finetune else 0
    passes = K + 1
    per_step = passes * res["forward_all_slabs_s"] + K * (res["finetune_minibatch_s"] + res["to_prior_s"]
                                                           + res["from_prior_s"]) + res["from_prior_s"]
    est = {"num_steps": int(cfg.num_steps), "num_finetune": K, "finetune_slabs": int(res["finetune_slabs"]),
           "slab_batch": int(_cfg(cfg, "slab_batch")), "network_s_per_step": per_step,
           "network_s_total": per_step * int(cfg.num_steps)}
    if em_seconds is not None:
        em = K * int(cfg.num_em) * em_seconds if cfg.finetune else int(cfg.num_em) * em_seconds
        est["em_s_per_step"] = em
        est["total_s"] = (per_step + em) * int(cfg.num_steps)
    return est


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", default="127x344x344,127x285x285", help="comma-separated ZxHxW PET grids")
    ap.add_argument("--mode", default="pad_crop", choices=["pad_crop", "resample"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--t", type=int, default=600, help="diffusion step of the pass (t_start of the shipped config)")
    ap.add_argument("--em-seconds", type=float, default=None,
                    help="seconds of one EM update (full forward + back projection) on the full template, to add "
                         "the data step to the extrapolation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one grid in this process
    ap.add_argument("--maps-only", action="store_true", help=argparse.SUPPRESS)  # internal: skip the network
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from sirf_ddip.config import load_config
    from sirf_ddip.recon.config import SHIPPED_CONFIG, DDIPConfig

    cfg = load_config(DDIPConfig, SHIPPED_CONFIG)  # the shipped settings (recon/ddip.yaml)
    if args.one:
        shape = tuple(int(v) for v in args.one.split("x"))
        print(json.dumps(run_one(shape, args.mode, args.device, int(_cfg(cfg, "slab_batch")),
                                 int(cfg.finetune_slabs), args.t, args.seed, network=not args.maps_only)))
        return 0
    results = []
    measured: dict[tuple, dict] = {}  # prior grid (planes, in-plane shape, voxel) -> the result that timed it
    for spec in args.grids.split(","):
        from sirf_ddip.geometry.image import ImageGrid
        from sirf_ddip.prior.grid import PriorGrid
        from sirf_ddip.prior.weights import read_card

        shape = tuple(int(v) for v in spec.split("x"))
        pgrid = PriorGrid.from_card(ImageGrid(shape, MMR_VOXEL), read_card("default"), args.mode).prior_grid
        key = (pgrid.shape, pgrid.voxel_size)
        cmd = [sys.executable, __file__, "--one", spec, "--mode", args.mode, "--device", args.device,
               "--threads", str(args.threads), "--t", str(args.t), "--seed", str(args.seed)]
        if key in measured:
            cmd.append("--maps-only")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if key in measured:  # the network sees the very same prior grid (and phantom): reuse its figures
            src = measured[key]
            for k in ("num_slabs", "forward_all_slabs_s", "forward_per_slab_s", "finetune_slabs",
                      "finetune_minibatch_s", "rss_gb_after_forward", "cuda_peak_gb_forward"):
                if k in src:
                    res[k] = src[k]
            res["rss_gb_peak"] = max(res["rss_gb_peak"], src["rss_gb_peak"])
            res["network_figures_from"] = "x".join(str(v) for v in src["grid"])
        else:
            measured[key] = res
        res["extrapolation"] = extrapolate(res, cfg, args.em_seconds)
        results.append(res)
        r, e = res, res["extrapolation"]
        print(f"PET {spec} ({r['mode']}, {r['device']}, {r['threads']} thread(s)): {r['prior_grid']}")
        if "network_figures_from" in r:
            print(f"  same prior grid as {r['network_figures_from']}: network figures reused (only the maps differ)")
        print(f"  {r['num_slabs']} slabs in batches of {e['slab_batch']}: one forward {r['forward_all_slabs_s']:.1f} s "
              f"({r['forward_per_slab_s'] * 1e3:.0f} ms/slab); to_prior (PET+MR) {r['to_prior_s'] * 1e3:.0f} ms, "
              f"from_prior {r['from_prior_s'] * 1e3:.0f} ms; fine-tuning mini-batch ({e['finetune_slabs']} slabs, "
              f"fwd+bwd) {r['finetune_minibatch_s']:.2f} s")
        mem = f"  peak RSS {r['rss_gb_peak']:.2f} GB (inputs {r['rss_gb_inputs']:.2f} GB)"
        if "cuda_peak_gb_forward" in r:
            mem += f", CUDA peak {r['cuda_peak_gb_forward']:.2f} GB"
        print(mem)
        line = (f"  full DDIP ({e['num_steps']} steps, K={e['num_finetune']}, {e['finetune_slabs']} slabs/fine-tune): "
                f"network {e['network_s_per_step']:.1f} s/step, {e['network_s_total'] / 60:.1f} min")
        if "total_s" in e:
            line += f"; + EM {e['em_s_per_step']:.0f} s/step -> total {e['total_s'] / 3600:.2f} h"
        print(line)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
