"""Does a prior keep lesions that the MR does not show? One Tweedie step from the noised truth, lesion by lesion.

For every validation case (``sirf-ddip simulate`` folders with ``truth.hv``, ``mr.hv``, ``mask_brain.hv``,
``mask_lesion.hv``), every prior (``--weights``, ``default`` = the shipped one), every diffusion step ``--t`` and
every noise seed: noise the *truth* to step t, denoise it with one Tweedie step over the overlapping slabs
(:func:`sirf_ddip.prior.check.check_prior`, the same procedure as ``sirf-ddip prior check``) and score x̂0: PSNR in
the brain and the mean bias of each lesion (%, largest first; 26-connected components of the lesion mask).

No data, no projector: this isolates the prior's part of DDIP's lesion bias. An MMSE denoiser regresses an
unexplained lesion towards what the MR explains, more so at larger t; a prior that saw such lesions in training
regresses less. DDIP's own result also depends on the data and on the fine-tuning (``benchmarks/ddip_sweep.py``),
so use this to compare priors cheaply (seconds per case on a CPU), then confirm with DDIP.

Example::

    python benchmarks/prior_lesions.py /work/val/fdg_218_d0.1_cold --weights default runs/prior-lesions \\
        --t 100 300 600 --seeds 0 1 2 --out prior_lesions.jsonl
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="case folders with truth.hv, mr.hv, mask_brain.hv, mask_lesion.hv")
    ap.add_argument("--weights", nargs="+", default=["default"], help="priors (default = the shipped one)")
    ap.add_argument("--t", type=int, nargs="+", default=[100, 300, 600], help="diffusion steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds (averaged)")
    ap.add_argument("--mr-guidance", type=float, nargs="+", default=[1.0],
                    help="classifier-free MR guidance w (priors with a learned no-MR input; default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also append one JSON line per (case, prior, t)")
    args = ap.parse_args(argv)

    from ddip_sweep import Scorer
    from sirf_ddip.io import read_image
    from sirf_ddip.prior.check import check_prior
    from sirf_ddip.prior.weights import load_default, load_prior
    from sirf_ddip.study.metrics import mean_bias, psnr

    torch.set_num_threads(1)
    priors = {w: (load_default(device=args.device) if w == "default" else load_prior(w, device=args.device))
              for w in args.weights}
    print(f"{'case':28s} {'prior':24s} {'t':>4s} {'PSNR':>6s}  lesion bias % (largest first; mean of "
          f"{len(args.seeds)} seeds)")
    for case in map(Path, args.cases):
        sc = Scorer(case, ds=None)  # the case's truth, brain mask and lesions, as ddip_sweep reads them
        truth, brain, lesions = sc.truth.astype(np.float32), sc.brain, list(sc.lesions)  # + departures
        mr = read_image(case / "mr.hv").array.astype(np.float32)
        sizes = [int(m.sum()) for m in lesions]
        for (name, bundle), w in ((nb, w) for nb in priors.items() for w in args.mr_guidance):
            if w != 1.0 and not getattr(bundle.network, "has_mr_null", False):
                print(f"{case.name:28s} {Path(name).name[:24]:24s} w={w:g}: skipped (this prior has no learned "
                      "'no MR' input; mr_guidance != 1 needs a prior trained with MR dropout)")
                continue
            for t in args.t:
                t0 = time.perf_counter()
                rows = []
                for seed in args.seeds:
                    res = check_prior(bundle, truth, mr if bundle.uses_mr else None, t, seed=seed, mask=brain,
                                      device=args.device, mr_guidance=w)
                    x = res.denoised.astype(np.float64)
                    rows.append([psnr(x, truth, brain)] + [mean_bias(x, truth, m) for m in lesions])
                secs = time.perf_counter() - t0
                r = np.mean(rows, axis=0)
                sd = np.std(rows, axis=0)
                print(f"{case.name:28s} {(Path(name).name + ('' if w == 1.0 else f' w={w:g}'))[:24]:24s} {t:4d} {r[0]:6.2f}  "
                      + "  ".join(f"{v:+5.0f}±{s:.0f}" for v, s in zip(r[1:], sd[1:])) + f"  ({secs:.0f} s)")
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({"case": case.name, "prior": name, "mr_guidance": w, "t": t, "seeds": args.seeds,
                                            "psnr": round(float(r[0]), 3), "lesion_voxels": sizes,
                                            "lesion_bias": [round(float(v), 2) for v in r[1:]],
                                            "lesion_bias_sd": [round(float(v), 2) for v in sd[1:]],
                                            "seconds": round(secs, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
