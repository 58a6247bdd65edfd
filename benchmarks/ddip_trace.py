"""Where along a DDIP run does a lesion or region get filled? Every image of every diffusion step, region by region.

For one validation case (a ``sirf-ddip simulate`` folder, as ``benchmarks/ddip_sweep.py`` reads it) this runs DDIP
once (the shipped settings + ``--set``) and scores, after the warm start and at every diffusion step, the PSNR in the
brain and the mean bias (%) of every lesion/region (:func:`ddip_sweep.case_regions`) of:

- ``x0_pre``: the adapted network's Tweedie x̂0 at ``x_t`` *before* this step's fine-tuning (the first x̂0 of
  the step; without fine-tuning the step's only x̂0);
- ``x0_post``: the adapted network's x̂0 *after* the step's fine-tuning (the last x̂0 of the step);
- ``x0_base``: the un-adapted prior's x̂0 at the same ``x_t`` (every ``--base-every`` steps; one extra forward),
  so ``x0_post − x0_base`` is what the LoRA fine-tuning changed;
- ``hqs``: the HQS image (x̂0 fused with the data by ``num_em`` EM updates);
- ``ddim_x0``: the clean image the DDIM/DDS step uses (``ddim_x0 = hqs``: the HQS image with the smoothed
  correction), which is also the step's output.

``--init truth`` starts the run from the truth instead of the MLEM warm start (the PET scaler is then fitted on the
truth): a region that is filled from there too is filled by the method's own fixed point (prior + image step), not
by the warm start. The last line is the output's full record (PSNR, SSIM, biases, log-likelihood, seconds), the same
numbers as a ``ddip_sweep.py`` row of the same settings with ``--init warm`` (the extra forwards draw no random
numbers). Use it to decide which part of the method (warm start, prior, fine-tuning, data step) sets a region's
bias.

Example::

    python benchmarks/ddip_trace.py VAL/amyloid-positive_220_d0.1_cold --set finetune=false --out trace.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def score(sc, x: torch.Tensor) -> dict:
    """PSNR in the brain and the regions' mean bias (%) of an activity image (no log-likelihood: cheap)."""
    from sirf_ddip.study.metrics import mean_bias, psnr

    arr = x.detach().cpu().numpy().astype(np.float64)
    return {"psnr": round(psnr(arr, sc.truth, sc.brain), 2),
            "bias": [round(mean_bias(arr, sc.truth, m), 1) for m in sc.lesions]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", help="case folder (PETRIC layout with truth.hv, mr.hv, mask_brain.hv)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value (DDIP config)")
    ap.add_argument("--weights", default=None, help="prior weights (default: shipped)")
    ap.add_argument("--base-every", type=int, default=5, help="score the un-adapted prior's x̂0 every N steps "
                    "(0 = never)")
    ap.add_argument("--init", choices=("warm", "truth"), default="warm",
                    help="start from the MLEM warm start (DDIP's own) or from the truth: a region the run still "
                         "fills from the truth is filled by the method's fixed point, not by the warm start")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True, help="JSON-lines output (appended)")
    args = ap.parse_args(argv)

    from ddip_sweep import Scorer, set_up_ddip
    from sirf_ddip.config import parse_overrides
    from sirf_ddip.io import read_image
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.prior.adaptation import adapted_copy
    from sirf_ddip.prior.weights import load_default, load_prior
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.study.study import missing_case_files
    from sirf_ddip.utils.device import resolve_device

    case = Path(args.case)
    missing = missing_case_files(case, extra=("mr.hv",))
    if missing:
        print(f"ddip_trace: case folder {case}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    dev = resolve_device(args.device)
    bundle = load_prior(args.weights, device=dev) if args.weights else load_default(device=dev)
    ov = parse_overrides(args.overrides)
    ov.update(device=str(dev), final_em=0)
    cfg = DDIPConfig.load(None, ov)
    truth, mr = read_image(case / "truth.hv"), read_image(case / "mr.hv")
    ds = EngineLogLikelihood.from_files(case / "prompts.hs", case / "mult_factors.hs", case / "additive_term.hs",
                                        image_template=case / "truth.hv", device=dev)
    ds.sensitivity(None)
    sc = Scorer(case, ds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = {"case": case.name, "weights": args.weights or "default", "settings": dict(parse_overrides(args.overrides)),
           "init": args.init}

    def emit(rec: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps({**tag, **rec}) + "\n")
        print(json.dumps(rec), flush=True)

    t0 = time.perf_counter()
    r = set_up_ddip(cfg, ds, bundle, mr, truth)
    if args.init == "truth":
        r.set_current_estimate(truth)
    base_net = adapted_copy(bundle.network, dev, cfg.replace(finetune=False), torch.Generator())

    seen: list[torch.Tensor] = []
    tweedie = r._tweedie

    def traced_tweedie(xt, eps, t):   # every x̂0 the step computes, in order
        x0 = tweedie(xt, eps, t)
        seen.append(x0.detach().clone())
        return x0

    r._tweedie = traced_tweedie
    act = lambda u: r.prior.from_network(u.detach()).to(ds.dtype)   # noqa: E731
    r.initialise()
    emit({"step": -1, "t": int(r.sampler.t(0)), "warm_start": score(sc, r._x_img)})
    for i in range(len(r.sampler)):
        t, xt = int(r.sampler.t(i)), r._xt.clone()
        rec: dict = {"step": i, "t": t}
        if args.base_every and (i % args.base_every == 0 or i == len(r.sampler) - 1):
            adapted, r.prior.network = r.prior.network, base_net
            try:
                with torch.no_grad():
                    rec["x0_base"] = score(sc, act(r.sampler.x0(xt, r.prior.eps(xt, t), t)))
            finally:
                r.prior.network = adapted
        seen.clear()
        r.update_current_estimate()
        if seen:
            rec["x0_pre"] = score(sc, act(seen[0]))
            rec["x0_post"] = score(sc, act(seen[-1]))
        rec["hqs"] = score(sc, r._x_img)
        rec["ddim_x0"] = score(sc, r.x)
        emit(rec)
    x = r.x.detach().clone()
    emit({"step": "final", **sc(x), "seconds": round(time.perf_counter() - t0, 1),
          "loglik_warm_start": round(r.data_consistency()["loglik_warm_start"], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
