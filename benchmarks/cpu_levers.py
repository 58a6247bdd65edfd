"""Training slabs/s of the shipped prior's network on a CPU for the levers of issue 30 (one process, one run).

Each lever runs ``--steps`` timed training steps (forward + backward + AdamW) of batch ``--batch`` 3-plane slabs of
``--size``² after one warm-up step: fp32 (baseline), channels-last, bf16 autocast, both, ``--patch`` (training
on in-plane patches), ``compile`` (``torch.compile`` of the network; its compilation happens in the warm-up step
and is printed apart) and ``small`` (the network of ``configs/pretrain-default.yaml``: channels 16/32/64/128, 1 res
block, attention at the lowest level only; from scratch). Compare levers within one run only (shared machines vary
from run to run); the thread layout is ``--threads 1`` against ``--threads 2``::

    nice -n 15 python benchmarks/cpu_levers.py --threads 2 --steps 2
    nice -n 15 python benchmarks/cpu_levers.py --threads 2 --steps 2 --levers fp32 compile small
"""

from __future__ import annotations

import argparse
import time

import torch


# configs/pretrain-default.yaml's network: the CPU config
SMALL = {"channels": [16, 32, 64, 128], "attention_levels": [False, False, False, True], "num_res_blocks": 1,
         "norm_num_groups": 16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--levers", nargs="+", default=["fp32", "channels_last", "bf16", "bf16+channels_last", "patch"],
                    choices=["fp32", "channels_last", "bf16", "bf16+channels_last", "patch", "compile", "small"])
    args = ap.parse_args(argv)
    from sirf_ddip.prior.weights import load_default

    torch.set_num_threads(args.threads)
    base = load_default(device="cpu").network
    print(f"threads {args.threads}, batch {args.batch}, {args.steps} timed steps per lever")
    for lever in args.levers:
        if lever == "small":   # the default pretraining config's network (no weights of it ship)
            net = type(base)({**base.arch, **SMALL})
        else:
            net = type(base)(base.arch)
            net.load_state_dict(base.state_dict())
        net.train()
        for p in net.parameters():
            p.requires_grad_(True)
        size = args.patch if lever == "patch" else args.size
        fmt = torch.channels_last if "channels_last" in lever else torch.contiguous_format
        net = net.to(memory_format=fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        call = torch.compile(net) if lever == "compile" else net
        x = torch.randn(args.batch, 3, size, size).to(memory_format=fmt)
        mr = torch.randn(args.batch, 3, size, size).to(memory_format=fmt)
        t = torch.randint(1000, (args.batch,))
        secs = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in lever):
                eps = call(x, t, mr)
            loss = torch.nn.functional.mse_loss(eps.float(), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                secs.append(time.perf_counter() - t0)
            elif lever == "compile":
                print(f"{'':20s} compilation + first step {time.perf_counter() - t0:7.1f} s", flush=True)
        s = sum(secs) / len(secs)
        px = (size / args.size) ** 2
        print(f"{lever:20s} {s:7.2f} s/step  {args.batch / s:6.2f} slabs/s  "
              f"({args.batch * px / s:6.2f} full-slab equivalents/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
