"""The network levers of issue 33 in DDIP's *run path*, on a 7-plane validation case (A/B interleaved).

``benchmarks/cpu_levers.py`` times bare training steps of the network; this one times what a DDIP run does: for
every lever it builds a :class:`DDIPReconstructor` with the shipped settings plus the lever's overrides on the
case's data, warms it up (the warm start and ``--warmup`` diffusion steps, not timed), then times ``--steps``
diffusion steps, and prints the network's slabs/s (inference: ``slab_forwards / network_forward``), the
fine-tuning seconds (forward with autograd + backward + AdamW), the network's share of the step and the step's
wall time, with the load average next to every line. The levers run in rounds (``--rounds``), every lever once a
round in the order given, so a changing load on a shared machine hits all of them alike; compare within a run.

Levers (``NAME`` or ``NAME=k:v,k:v`` for your own): ``fp32`` (the shipped settings), ``channels_last``, ``bf16``
(``network_precision: bfloat16``), ``bf16+channels_last``, ``batch1`` / ``batch2`` (``slab_batch``), ``threads2``
(``torch.set_num_threads(2)`` for that lever; the others run with ``--threads``), ``ft_all`` (fine-tuning on every
slab instead of the shipped ``finetune_slabs: 2``: what fine-tuning only the slabs a step uses saves).

Example (the figures of ``benchmarks/validation/speed.md``)::

    nice -n 10 python benchmarks/ddip_levers.py VAL/fdg_219_d0.1_hypo --steps 3 --rounds 2

``--tiny`` runs the same on a 2-ring toy geometry with a tiny random network (a check of the script; its figures
mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LEVERS = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16": {"network_precision": "bfloat16"},
    "bf16+channels_last": {"network_precision": "bfloat16", "channels_last": True},
    "batch1": {"slab_batch": 1},
    "batch2": {"slab_batch": 2},
    "threads2": {"__threads": 2},
    "ft_all": {"finetune_slabs": 0},
}


def parse_lever(spec: str) -> tuple[str, dict]:
    """``NAME`` (of :data:`LEVERS`) or ``NAME=key:value,key:value`` (values parsed as YAML)."""
    if "=" not in spec:
        if spec not in LEVERS:
            raise SystemExit(f"ddip_levers: unknown lever {spec!r}; known: {', '.join(LEVERS)} (or NAME=k:v,...)")
        return spec, dict(LEVERS[spec])
    import yaml

    name, body = spec.split("=", 1)
    return name, {k: yaml.safe_load(v) for k, v in (kv.split(":", 1) for kv in body.split(","))}


def load_case(case: Path | None, device):
    """(likelihood, MR image, template image) of a PETRIC case folder, or of a toy problem (``case`` None)."""
    from sirf_ddip.data import Image
    from sirf_ddip.io import read_image
    from sirf_ddip.physics.model import EngineLogLikelihood

    if case is None:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from ddip import make_problem  # same folder: the benchmark's mMR toy problem

        lik, grid, mr = make_problem(2, 64, device, counts=2e5)
        return lik, Image(np.asarray(mr, np.float32), grid), Image(np.zeros(grid.shape, np.float32), grid)
    truth = read_image(case / "truth.hv")
    lik = EngineLogLikelihood.from_files(case / "prompts.hs", case / "mult_factors.hs", case / "additive_term.hs",
                                         image_template=case / "truth.hv", device=device)
    lik.sensitivity(None)
    return lik, read_image(case / "mr.hv"), truth.with_array(np.zeros(truth.grid.shape, np.float32))


def load_avg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def run_lever(lik, mr, template, bundle, over: dict, steps: int, warmup: int, n_init: int):
    """Time ``steps`` diffusion steps (after the warm start and ``warmup`` steps) with ``over``; returns the
    per-step parts (seconds), the inference slabs/s and the step's wall time."""
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.recon.ddip import DDIPReconstructor

    over = dict(over)
    threads = over.pop("__threads", None)
    n0 = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        cfg = DDIPConfig.shipped({"device": str(lik.device), "n_init": n_init, "loglik_every": 0, **over})
        r = DDIPReconstructor(cfg)
        r.set_objective_function(lik)
        r.set_prior(bundle)
        r.set_anatomical_image(mr)
        r.set_up(template)
        r.initialise()
        for _ in range(warmup):
            r.update_current_estimate()
        r.timings.clear()
        r.counts.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            r.update_current_estimate()
        wall = (time.perf_counter() - t0) / steps
    finally:
        torch.set_num_threads(n0)
    tm, ct = dict(r.timings), dict(r.counts)
    fwd, bwd = tm.get("network_forward", 0.0), tm.get("finetune_backward", 0.0)
    return {"wall": wall, "fwd": fwd / steps, "bwd": bwd / steps, "proj": tm.get("projector", 0.0) / steps,
            "slabs_per_s": ct.get("slab_forwards", 0) / max(fwd, 1e-9),
            "slab_forwards": ct.get("slab_forwards", 0) / steps, "slab_backwards": ct.get("slab_backwards", 0) / steps,
            "share": (fwd + bwd) / steps / max(wall, 1e-9)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?", default=None, help="7-plane validation case folder (sirf-ddip simulate)")
    ap.add_argument("--levers", nargs="+", default=["fp32", "channels_last", "bf16", "bf16+channels_last",
                                                    "batch2", "threads2", "ft_all"])
    ap.add_argument("--steps", type=int, default=3, help="timed diffusion steps per lever and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed diffusion steps before them")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the shipped run.num_threads: 1)")
    ap.add_argument("--n-init", type=int, default=4, help="warm-start iterations (not timed; 20 shipped)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="toy geometry and a tiny random network (script check)")
    args = ap.parse_args(argv)
    if args.case is None and not args.tiny:
        ap.error("give a case folder (or --tiny)")
    levers = [parse_lever(s) for s in args.levers]
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from test_ddip_support import tiny_bundle

        bundle = tiny_bundle()
    else:
        from sirf_ddip.prior.weights import load_default

        bundle = load_default(device=dev)
    lik, mr, template = load_case(None if args.tiny else Path(args.case), dev)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {dev}; case {args.case or 'tiny'}; "
          f"{args.steps} timed steps per lever and round after {args.warmup}; load average at each line", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _ in levers}
    for rnd in range(args.rounds):
        for name, over in levers:
            res = run_lever(lik, mr, template, bundle, over, args.steps, args.warmup, args.n_init)
            results[name].append(res)
            print(f"round {rnd + 1} {name:20s} step {res['wall']:7.2f} s; network: inference {res['slabs_per_s']:6.2f} "
                  f"slabs/s ({res['slab_forwards']:.0f} slabs/step, {res['fwd']:.2f} s), fine-tuning "
                  f"{res['bwd']:.2f} s ({res['slab_backwards']:.0f} slabs/step), share of the step "
                  f"{100 * res['share']:4.1f} %; projector {res['proj']:.2f} s  [load {load_avg()}]", flush=True)
    print("\nmedian over rounds (speed-up of the step and of inference against the first lever):")
    base = results[levers[0][0]]
    b_wall = float(np.median([r["wall"] for r in base]))
    b_sps = float(np.median([r["slabs_per_s"] for r in base]))
    for name, _ in levers:
        w = float(np.median([r["wall"] for r in results[name]]))
        s = float(np.median([r["slabs_per_s"] for r in results[name]]))
        sh = float(np.median([r["share"] for r in results[name]]))
        print(f"  {name:20s} step {w:7.2f} s (x{b_wall / w:4.2f}); inference {s:6.2f} slabs/s (x{s / b_sps:4.2f}); "
              f"network share {100 * sh:4.1f} %")
    print(f"[load {load_avg()}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
