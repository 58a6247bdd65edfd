"""Pretraining throughput (images/s = slabs/s) of a prior architecture on CPU and, if present, CUDA.

Uses the network, batch size and AMP setting of a pretraining config, the real training step (sampling with
augmentation, q_sample, forward, MSE, backward, AdamW, EMA) and synthetic in-memory volumes of the config's grid
(so no phantom generation is timed).

    python benchmarks/pretrain.py [--config configs/pretrain-default.yaml] [--steps 10] [--device cpu cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sirf_ddip.prior.data import Augmentation, SlabDataset  # noqa: E402
from sirf_ddip.prior.network import build_network  # noqa: E402
from sirf_ddip.prior.schedule import NoiseSchedule  # noqa: E402
from sirf_ddip.prior.train import arch_of, ema_update, load_pretrain_config  # noqa: E402


def synthetic_dataset(nz: int, nxy: int, n: int = 2, use_mr: bool = True) -> SlabDataset:
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(np.arange(nz), np.arange(nxy), np.arange(nxy), indexing="ij")
    head = ((z - nz / 2) / (nz / 2.2)) ** 2 + ((y - nxy / 2) / (nxy / 2.6)) ** 2 + ((x - nxy / 2) / (nxy / 2.6)) ** 2 < 1
    pets = [(head * (1 + rng.random(head.shape))).astype(np.float32) for _ in range(n)]
    mrs = [(head * rng.random(head.shape)).astype(np.float32) for _ in range(n)] if use_mr else None
    return SlabDataset(pets, mrs, augmentation=Augmentation())


def bench(cfg, device: str, steps: int, warmup: int = 2, batch: int | None = None) -> dict:
    dev = torch.device(device)
    B = batch or cfg.train.batch_size
    ds = synthetic_dataset(max(cfg.network.slab + 2, 12), cfg.data.grid_xy, use_mr=cfg.network.use_mr)
    net = build_network(arch_of(cfg)).to(dev)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    sch = NoiseSchedule()
    use_amp = cfg.train.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    g = torch.Generator().manual_seed(0)

    def step(i):
        x0, mr = ds.sample(B, g)
        t = torch.randint(1000, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sch.q_sample(x0, t, noise).to(dev)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
            eps = net(xt, t.to(dev), mr.to(dev) if mr is not None else None)
        loss = torch.nn.functional.mse_loss(eps.float(), noise.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, net, 0.999, i)

    for i in range(warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else
                                  f" ({torch.get_num_threads()} threads)"),
            "params_M": sum(p.numel() for p in net.parameters()) / 1e6, "batch": B, "image": cfg.data.grid_xy,
            "s_per_step": dt / steps, "images_per_s": B * steps / dt, "amp": use_amp}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "pretrain-default.yaml"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--device", nargs="*", default=None, help="devices (default: cpu, and cuda if available)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_pretrain_config(args.config, args.overrides)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(f"config {args.config}: network {asdict(cfg.network)}")
    for d in devices:
        r = bench(cfg, d, args.steps, batch=args.batch)
        print(f"{r['device']}: {r['params_M']:.2f} M params, batch {r['batch']} x {r['image']}^2, amp={r['amp']}: "
              f"{r['s_per_step']:.3f} s/step, {r['images_per_s']:.1f} images/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
