"""Scatter benchmark: the single scatter simulation of STIR's cylinder against STIR 6.4's wall time, and a whole
scatter estimate at full mMR span 11 as ``sirf-ddip prepare`` runs it.

1. *simulate*: ``../shared/scatter/cylinder_mmr`` (off-centre water cylinder, mMR scatter template, 444 scatter
   points): read the images and the template, set up :class:`~sirf_ddip.physics.scatter_simulation.ScatterSimulator`
   and simulate, as ``sirf-ddip scatter simulate`` does; timed twice (the first run compiles the numba kernel unless
   it is cached on disk), with the torch tracer too (``--torch``: the CUDA path, on this CPU), and compared with
   STIR's output (relative L2) and STIR's times in ``scatter_case.json`` (whole run 12.7 s, ``process_data`` 6.8 s,
   measured on a 2-core shared machine at nice 5).
2. *estimate* (``--estimate``): the full mMR span-11 geometry (837 sinograms x 252 views x 344 bins) with the real
   norm and μ-map of ``../shared/real-mmr``; prompts are Poisson counts of a head-shaped sinogram (the chord length
   through the μ-map, attenuated, times the efficiencies, 4e8 trues, plus randoms of 25 % of the trues ∝ the
   efficiencies); then
   :func:`sirf_ddip.cli.scatter.estimate_for_data` (STIR's mMR settings, 5 iterations: ``prepare``'s scatter step)
   is timed. STIR's ``estimate_scatter`` on the same machine is given with ``--stir-seconds`` when measured (else
   reported as not measured).

Figures are from a shared machine: the load average is printed with each::

    nice -n 10 python benchmarks/scatter.py [--torch] [--estimate] [--iterations 5] [--stir-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("SIRF_DDIP_SHARED", REPO.parent / "shared"))


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simulate(torch_too: bool) -> None:
    from sirf_ddip.io import read_image, read_projdata
    from sirf_ddip.io.energy_window import energy_window_from_header
    from sirf_ddip.io.template import read_template_geometry
    from sirf_ddip.physics.scatter_simulation import ScatterSimulator

    cyl = SHARED / "scatter" / "cylinder_mmr"
    if not (cyl / "scatter.s").is_file():
        print(f"simulate: STIR's cylinder not found under {cyl}")
        return
    stir = json.loads((cyl / "scatter_case.json").read_text())
    ref = read_projdata(cyl / "scatter.hs").array
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cpus {os.cpu_count()}")
    methods = ["numba", "numba"] + (["torch"] if torch_too else [])
    for run, method in enumerate(methods, start=1):
        load0 = _load()
        t0 = time.perf_counter()
        act, mu = read_image(cyl / "activity.hv"), read_image(cyl / "mu.hv")
        geom = read_template_geometry(cyl / "scatter_template.hs")
        window = energy_window_from_header(cyl / "scatter_template.hs")
        sim = ScatterSimulator(mu, geom, window, device="cpu")
        from sirf_ddip.physics import scatter as sc

        orig = (sc.point_detector_integrals, sc.single_scatter_from_integrals)
        if method == "torch":   # the code the CUDA path runs (tracer and sum over points), forced on this CPU
            sc.point_detector_integrals = lambda *a, **k: orig[0](*a, **{**k, "method": "torch"})
            sc.single_scatter_from_integrals = lambda *a, **k: orig[1](*a, **{**k, "method": "torch"})
        try:
            t1 = time.perf_counter()
            out = sim.simulate(act).array
        finally:
            sc.point_detector_integrals, sc.single_scatter_from_integrals = orig
        t2 = time.perf_counter()
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        print(f"simulate run {run} ({method}): whole {t2 - t0:.2f} s (set-up {t1 - t0:.2f} s, simulation "
              f"{t2 - t1:.2f} s), {sim.num_scatter_points} points, rel L2 vs STIR {rel:.2g}; load {load0} -> {_load()}")
    w = stir.get("wall_s", {})
    print(f"STIR 6.4 (scatter_case.json): whole {w.get('total', 12.65):.1f} s (parse and read "
          f"{w.get('parse_and_read', 5.83):.1f} s, process_data {w.get('process_data', 6.81):.1f} s; OpenMP, nice 5, "
          "shared 2-core machine)")


def estimate(iterations: int, stir_seconds: float | None) -> None:
    from sirf_ddip.cli.scatter import estimate_for_data
    from sirf_ddip.data import ProjData
    from sirf_ddip.io.header import InterfileHeader
    from sirf_ddip.io.mumap import read_mu_map
    from sirf_ddip.io.siemens_norm import read_ecat8_norm
    from sirf_ddip.io.sinogram_header import geometry_from_header
    from sirf_ddip.physics.attenuation import attenuation_factors
    from sirf_ddip.physics.normalisation import ecat8_efficiencies

    mmr = SHARED / "real-mmr"
    if not (mmr / "norm.n.hdr").is_file():
        print(f"estimate: real mMR material not found under {mmr}")
        return
    geom = geometry_from_header(InterfileHeader.read(mmr / "templates" / "template_span11.hs"))
    print(f"estimate: {geom.describe()}; load {_load()}")
    t0 = time.perf_counter()
    eff = ecat8_efficiencies(read_ecat8_norm(mmr / "norm.n.hdr"), geom)
    mu = read_mu_map(mmr / "mu_map.hv")
    att = attenuation_factors(mu, geom)
    t1 = time.perf_counter()
    print(f"  inputs (norm, attenuation of the full template): {t1 - t0:.1f} s, peak {_peak_mb():.0f} MB")
    rng = np.random.default_rng(0)
    a = np.asarray(att.array, np.float32)
    # float32 and in place (a full span-11 array is 290 MB; the machine is shared)
    lam = np.log(np.maximum(a, np.float32(1e-12)))
    lam *= np.float32(-1.0 / 0.096)                               # mm of water along each LOR: a head's projection
    lam *= a
    lam *= eff                                                    # attenuated, detected trues (shape)
    lam *= np.float32(4.0e8 / float(lam.sum(dtype=np.float64)))   # ~ a 10-minute brain scan's trues
    k = 0.25 * 4.0e8 / float(eff.sum(dtype=np.float64))          # randoms: 25 % of the trues, ∝ singles products
    randoms = (np.float32(k) * eff).astype(np.float32)
    lam += randoms
    for c in range(0, lam.shape[0], 32):                          # Poisson draw in place, a few sinograms at a time
        lam[c:c + 32] = rng.poisson(lam[c:c + 32])
    prompts = ProjData(lam, geom, {"source": "synthetic prompts"})
    randoms_pd = ProjData(randoms, geom)
    print(f"  synthetic prompts: {float(lam.sum(dtype=np.float64)):.4g} counts, peak {_peak_mb():.0f} MB")
    load0 = _load()
    t2 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_for_data(prompts, mu, (430.0, 610.0), randoms=randoms_pd, efficiencies=eff, attenuation=att,
                                iterations=iterations, mu_path=str(mmr / "mu_map.hv"),
                                log=lambda m: print(f"  {m} ({time.perf_counter() - t2:.0f} s)", flush=True))
    t3 = time.perf_counter()
    print(f"estimate ({iterations} iterations, STIR's mMR settings, prepare's scatter step): {t3 - t2:.1f} s wall, "
          f"peak {_peak_mb():.0f} MB, scatter total {float(est.scatter.array.sum()):.4g} of "
          f"{float(prompts.array.sum()):.4g} prompts; load {load0} -> {_load()}")
    if stir_seconds is not None:
        print(f"STIR estimate_scatter on this machine (given): {stir_seconds:.1f} s -> ours / STIR "
              f"{(t3 - t2) / stir_seconds:.2f}")
    else:
        print("STIR estimate_scatter on this machine: not measured (pass --stir-seconds)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="also time the torch tracer (the CUDA path) on this CPU")
    ap.add_argument("--estimate", action="store_true", help="also run a whole estimate at full mMR span 11")
    ap.add_argument("--skip-simulate", action="store_true")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--stir-seconds", type=float, default=None,
                    help="wall time of STIR's estimate_scatter on the same case and machine, when measured")
    args = ap.parse_args(argv)
    if not args.skip_simulate:
        simulate(args.torch)
    if args.estimate:
        estimate(args.iterations, args.stir_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
