"""Per-step cost of DDIP on real ``sirf.STIR`` objects against the built-in engine on the same data.

Usage::

    python benchmarks/ddip_sirf.py [--case mmr_2d] [--steps 2] [--subsets 1] [--threads 1]
    python benchmarks/ddip.py --sirf ...            # the same

Needs SIRF (``import sirf.STIR``; conda-forge or the SyneRBI Docker image); without it the script prints why and
exits 0. Data: a STIR reference case of ``../shared/stir-reference`` (prompts, mult factors, additive term,
initial image). Both runs use the same settings (the shipped ones, the ``no-mr`` prior, a short warm start) and
print seconds per diffusion step by part (projector = EM numerator, EM = update + fusion, network forward,
fine-tune backward, log-likelihood) and the SIRF/engine ratio.

What is cached on the SIRF side (what SIRF lets us cache): the acquisition model is ``set_up`` once (STIR builds
its ray-tracing matrix there; 3 tangential LORs, as STIR's ``osem_2.par``), the objective is set up once, the
subset sensitivities are read once per subset count (``SirfLogLikelihood`` keeps them), and the image template is
reused for every tensor → image conversion. What cannot be cached: every EM numerator is one
``get_backprojection_of_acquisition_ratio`` (a forward and a back projection through STIR) and every
log-likelihood one ``get_value``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shared_case(name: str) -> Path:
    root = Path(os.environ.get("SIRF_DDIP_SHARED", REPO.parent / "shared")) / "stir-reference" / name
    if not (root / "prompts.hs").is_file():
        raise FileNotFoundError(f"{root}: no STIR reference case (prompts.hs) here; set SIRF_DDIP_SHARED")
    return root


def sirf_data_step(stir, case: Path, subsets: int):
    """The case as a SIRF objective (acquisition model and objective set up once) wrapped as our likelihood."""
    from sirf_ddip.backends.sirf import SirfLogLikelihood, make_acquisition_model

    prompts = stir.AcquisitionData(str(case / "prompts.hs"))
    mult = stir.AcquisitionData(str(case / "mult_factors.hs"))
    add = stir.AcquisitionData(str(case / "additive_term.hs"))
    init = stir.ImageData(str(case / "init.hv"))
    am = make_acquisition_model("ray_tracing", num_tangential_LORs=3, stir=stir)
    am.set_acquisition_sensitivity(stir.AcquisitionSensitivityModel(mult))
    am.set_additive_term(add)
    t0 = time.perf_counter()
    am.set_up(prompts, init)
    obj = stir.make_Poisson_loglikelihood(prompts, acq_model=am)
    ds = SirfLogLikelihood.from_objective(obj, acq_model=am, acq_data=prompts, image_template=init,
                                          num_subsets=subsets)
    ds.sensitivity(None)
    return ds, init, time.perf_counter() - t0


def engine_data_step(case: Path, subsets: int):
    from sirf_ddip.physics.model import EngineLogLikelihood

    t0 = time.perf_counter()
    ds = EngineLogLikelihood.from_files(case / "prompts.hs", case / "mult_factors.hs", case / "additive_term.hs",
                                        image_template=case / "init.hv", device="cpu", num_subsets=subsets)
    ds.sensitivity(None)
    return ds, time.perf_counter() - t0


def time_ddip(ds, template, steps: int, subsets: int) -> dict:
    """Seconds per diffusion step by part for ``steps`` steps after a short warm start (shipped settings)."""
    from sirf_ddip.recon.ddip import DDIPReconstructor

    r = DDIPReconstructor(n_init=subsets, num_subsets=subsets, use_mr=False, device="cpu", checkpoint_every=0)
    r.set_prior("no-mr")
    r.set_objective_function(ds)
    r.set_up(template)
    r.initialise()
    t0 = time.perf_counter()
    r.run(steps)
    wall = (time.perf_counter() - t0) / steps
    rep = r.timing_report()
    return {"s_per_step": round(wall, 3), "warm_start_s": round(rep.get("init_total", 0.0), 3),
            **{k: round(rep.get(k, 0.0), 4) for k in ("projector", "em", "network_forward", "finetune_backward",
                                                       "loglik")},
            "em_updates_per_step": r.counts["em_updates"] / max(1, r.iteration)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="mmr_2d", help="STIR reference case under ../shared/stir-reference")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--subsets", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (STIR's OpenMP threads: OMP_NUM_THREADS)")
    a = ap.parse_args(argv)
    from sirf_ddip.backends.sirf import import_sirf_stir
    from sirf_ddip.io import read_image

    try:
        stir = import_sirf_stir()
    except Exception as exc:  # noqa: BLE001 - absent or broken SIRF: say so and skip
        print(f"ddip_sirf: skipped, SIRF is not available here ({type(exc).__name__}: {exc})")
        return 0
    torch.set_num_threads(a.threads)
    case = shared_case(a.case)
    sds, init, s_setup = sirf_data_step(stir, case, a.subsets)
    eds, e_setup = engine_data_step(case, a.subsets)
    rows = {"sirf": {"set_up_s": round(s_setup, 2), **time_ddip(sds, init, a.steps, a.subsets)},
            "engine": {"set_up_s": round(e_setup, 2), **time_ddip(eds, read_image(case / "init.hv"), a.steps,
                                                                   a.subsets)}}
    print(json.dumps({"case": a.case, "steps": a.steps, "subsets": a.subsets, **rows}, indent=1))
    keys = ("s_per_step", "projector", "em", "network_forward", "finetune_backward", "loglik", "set_up_s")
    print(f"\n{'':8s}" + "".join(f"{k:>18s}" for k in keys))
    for name, r in rows.items():
        print(f"{name:8s}" + "".join(f"{r[k]:18.3f}" for k in keys))
    ratio = rows["sirf"]["s_per_step"] / max(rows["engine"]["s_per_step"], 1e-9)
    print(f"SIRF / engine per diffusion step: {ratio:.2f}x (projector {rows['sirf']['projector']:.3f} s vs "
          f"{rows['engine']['projector']:.3f} s per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
