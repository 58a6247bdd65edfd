"""Training slabs/s of the shipped prior's network on a CPU for the levers of issue 30 (one process, one run).

Each lever runs ``--steps`` timed training steps (forward + backward + AdamW) of batch ``--batch`` 3-plane slabs of
``--size``² after one warm-up step: fp32 (baseline), channels-last, bf16 autocast, both, and ``--patch`` (training
on in-plane patches). Compare levers within one run only (shared machines vary from run to run)::

    nice -n 15 python benchmarks/cpu_levers.py --threads 2 --steps 2
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--levers", nargs="+", default=["fp32", "channels_last", "bf16", "bf16+channels_last", "patch"])
    args = ap.parse_args(argv)
    from sirf_ddip.prior.weights import load_default

    torch.set_num_threads(args.threads)
    base = load_default(device="cpu").network
    print(f"threads {args.threads}, batch {args.batch}, {args.steps} timed steps per lever")
    for lever in args.levers:
        net = type(base)(base.arch)
        net.load_state_dict(base.state_dict())
        net.train()
        for p in net.parameters():
            p.requires_grad_(True)
        size = args.patch if lever == "patch" else args.size
        fmt = torch.channels_last if "channels_last" in lever else torch.contiguous_format
        net = net.to(memory_format=fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        x = torch.randn(args.batch, 3, size, size).to(memory_format=fmt)
        mr = torch.randn(args.batch, 3, size, size).to(memory_format=fmt)
        t = torch.randint(1000, (args.batch,))
        secs = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in lever):
                eps = net(x, t, mr)
            loss = torch.nn.functional.mse_loss(eps.float(), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                secs.append(time.perf_counter() - t0)
        s = sum(secs) / len(secs)
        px = (size / args.size) ** 2
        print(f"{lever:20s} {s:7.2f} s/step  {args.batch / s:6.2f} slabs/s  "
              f"({args.batch * px / s:6.2f} full-slab equivalents/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
