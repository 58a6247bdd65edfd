"""Our scatter estimation loop against STIR's ``estimate_scatter`` on a small simulated case (docs/SCATTER.md).

The case is ``tests/test_scatter_estimation_loop.py``'s: a 4-ring, 168-detector scanner with mMR energy keys (84
views, 80 bins, span 1, max ring difference 1), an off-centre water cylinder with a hot insert, noise-free prompts
= trues + our SSS of the truth scaled to a 30 % scatter fraction + randoms (20 % of the mean trues x efficiencies),
efficiencies exp(0.05 N(0,1)). STIR runs its ``examples/Siemens-mMR/scatter_estimation_par_files`` (21 subsets, 21
sub-iterations, 3 scatter iterations as ``scatter_and_recon.sh``) with two changes, written to a copy: the tail-fit
clip 0.05..100 (STIR's class default; the mMR files' 0.1..0.4 would clip this case's factor ~5-7) and
``randomly place scatter points := 0`` (STIR's default jitters them with ``srand(time)``; the default is run too).
Ours runs :func:`~sirf_ddip.recon.scatter_estimation.estimate_scatter` with the same settings. Printed: per
iteration the relative L2 of ours to STIR's and of each to the true scatter, and the wall / CPU times::

    nice -n 10 python benchmarks/scatter_vs_stir.py --stir-bin /path/to/stir/bin \\
        --stir-pardir /path/to/STIR/examples/Siemens-mMR/scatter_estimation_par_files --work /tmp/scatter_vs_stir
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
WINDOW = (430.0, 610.0)
PAR_FILES = ("scatter_estimation.par", "run_reconstruction.par", "tail_fitting.par", "postfilter_Gaussian_for_mask.par")


def make_case(d: Path) -> None:
    from sirf_ddip.data import ProjData
    from sirf_ddip.io import write_image, write_projdata
    from test_scatter_estimation_loop import loop_case

    prompts, mu, eff, randoms, scatter, att = loop_case()
    geom = prompts.geometry
    meta = {"energy_window_kev": WINDOW}
    # STIR's norm file holds the normalisation *factors* (BinNormalisationFromProjData::undo divides by them): 1/eff
    for n, a in {"prompts": prompts.array, "eff": eff, "norm": 1.0 / eff, "acf": 1.0 / att,
                 "randoms": randoms, "true_scatter": scatter}.items():
        write_projdata(d / f"{n}.hs", ProjData(np.asarray(a, np.float32), geom, dict(meta)), overwrite=True)
    write_image(d / "mu.hv", mu, overwrite=True)


def stir_pars(src: Path, dst: Path, fixed_points: bool) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in PAR_FILES:
        shutil.copy(src / f, dst / f)
    p = dst / "scatter_estimation.par"
    t = p.read_text()
    t = re.sub(r"maximum scatter scaling factor\s*:=.*", "maximum scatter scaling factor := 100", t)
    t = re.sub(r"minimum scatter scaling factor\s*:=.*", "minimum scatter scaling factor := 0.05", t)
    if fixed_points:
        t = t.replace("  PET Single Scatter Simulation Parameters :=",
                      "  PET Single Scatter Simulation Parameters :=\n  randomly place scatter points := 0", 1)
    p.write_text(t)
    return p


def run_stir(d: Path, bin_dir: Path, par: Path, out: Path) -> tuple[float, float]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", scatter_pardir=str(par.parent),
               sino_input="prompts.hs", atnimg="mu.hv", NORM="norm.hs", acf3d="acf.hs", randoms3d="randoms.hs",
               num_scat_iters="3", scatter_recon_num_subsets="21", scatter_recon_num_subiterations="21",
               mask_projdata_filename=f"{out}/mask2d.hs", mask_image=f"{out}/mask_image.hv",
               scatter_prefix=f"{out}/scatter", total_additive_prefix=f"{out}/total_additive")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out / "stir.log", "w") as log:
        subprocess.run([str(bin_dir / "estimate_scatter"), str(par)], cwd=d, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stir-bin", required=True, type=Path, help="folder with STIR's estimate_scatter")
    ap.add_argument("--stir-pardir", required=True, type=Path,
                    help="STIR's examples/Siemens-mMR/scatter_estimation_par_files")
    ap.add_argument("--work", required=True, type=Path, help="scratch folder")
    args = ap.parse_args(argv)
    from sirf_ddip.io import read_image, read_projdata
    from sirf_ddip.recon.scatter_estimation import ScatterEstimationSettings, estimate_scatter

    d = args.work.resolve()
    d.mkdir(parents=True, exist_ok=True)
    make_case(d)
    times = {}
    for name, fixed in (("stir_fixed", True), ("stir_default", False)):
        par = stir_pars(args.stir_pardir, d / f"par_{name}", fixed)
        times[name] = run_stir(d, args.stir_bin.resolve(), par, d / name)
    p = read_projdata(d / "prompts.hs")
    truth = read_projdata(d / "true_scatter.hs").array
    st = ScatterEstimationSettings(num_iterations=3, min_scale_factor=0.05, max_scale_factor=100.0)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_scatter(p, read_image(d / "mu.hv"), WINDOW, randoms=read_projdata(d / "randoms.hs"),
                               efficiencies=read_projdata(d / "eff.hs").array,
                               attenuation=1.0 / read_projdata(d / "acf.hs").array, settings=st, return_iterations=True)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    times["ours"] = (time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| iteration | ours vs STIR (fixed points) | ours vs truth | STIR (fixed) vs truth | STIR (default, jittered) "
          "vs truth | ours vs STIR (default) |")
    print("|---|---|---|---|---|---|")
    for i, e in enumerate(est.iterations, 1):
        sf = read_projdata(d / "stir_fixed" / f"scatter_{i}.hs").array
        sd = read_projdata(d / "stir_default" / f"scatter_{i}.hs").array
        print(f"| {i} | {rel(e.array, sf):.4f} | {rel(e.array, truth):.4f} | {rel(sf, truth):.4f} | "
              f"{rel(sd, truth):.4f} | {rel(e.array, sd):.4f} |")
    for k, (w, c) in times.items():
        print(f"{k}: {w:.1f} s wall, {c:.1f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
