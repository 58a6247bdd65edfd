"""Our scatter estimate against STIR's ``estimate_scatter`` at full mMR span 11 (docs/SCATTER.md, issue 31).

Phases, each its own process (the machine is shared; every phase stays under ~6 GB), run one after the other:

* ``make``: the full mMR span-11 geometry of ``../shared/real-mmr/templates/template_span11.hs`` (837 sinograms x
  252 views x 344 bins), the efficiencies of the real ECAT8 norm (``ecat8_efficiencies``) and the real μ-map;
  activity ∝ μ (μ / 0.096 cm⁻¹: uniform water-equivalent head, bone hotter), so that the trues are the chord length
  ``-ln(a)/0.096`` times the attenuation ``a`` times the efficiencies; the true scatter is our single scatter
  simulation of that activity (``sss_scatter_shape``) scaled to a 30 % scatter fraction; randoms 20 % of the mean
  trues x efficiencies; noise-free prompts = trues + scatter + randoms, 4e8 trues. Written: prompts, randoms, eff,
  norm (= 1/eff: STIR's ``BinNormalisationFromProjData`` divides by its file), acf (= 1/a), true_scatter, mu.
* ``stir``: STIR's ``estimate_scatter`` with ``examples/Siemens-mMR/scatter_estimation_par_files`` (5 scatter
  iterations, OSEM 21 subsets x 21 sub-iterations, tail-fit clip 0.1..0.4, all as the mMR files) with one change
  written to a copy: ``randomly place scatter points := 0`` (STIR's default jitters the points with
  ``srand(time)``; ours uses voxel centres); ``--clip MIN MAX`` also sets the tail-fit clip (for both, outputs
  tagged). The process is killed if its RSS passes ``--max-rss-gb``.
* ``ours``: :func:`~sirf_ddip.recon.scatter_estimation.estimate_scatter` (the same settings) on the same files.
* ``compare``: relative L2 of ours vs STIR's and of each vs the truth, per iteration; then OSEM (2D, SSRB of the
  data, 21 subsets x 42 sub-iterations, no post-filter, zoom 0.5) with additive = (randoms + scatter) / mult for
  the true scatter, ours and STIR's, and the mean in ROIs of the head (μ-derived: soft tissue, central region).

Each phase prints its wall time, CPU time, peak RSS and the load average::

    for p in make "stir --clip 0.05 100" "ours --clip 0.05 100" "compare --clip 0.05 100"; do nice -n 10 python benchmarks/scatter_vs_stir_full.py $p \\
        --stir-bin STIR/install/bin --stir-pardir STIR/examples/Siemens-mMR/scatter_estimation_par_files \\
        --work /tmp/scatter_full; done
"""

from __future__ import annotations

import argparse
import json
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
SHARED = Path(os.environ.get("SIRF_DDIP_SHARED", REPO.parent / "shared"))
WINDOW = (430.0, 610.0)
ITERS = 5
PAR_FILES = ("scatter_estimation.par", "run_reconstruction.par", "tail_fitting.par", "postfilter_Gaussian_for_mask.par")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make(d: Path) -> None:
    from sirf_ddip.data import Image, ProjData
    from sirf_ddip.io import write_image, write_projdata
    from sirf_ddip.io.header import InterfileHeader
    from sirf_ddip.io.mumap import read_mu_map
    from sirf_ddip.io.siemens_norm import read_ecat8_norm
    from sirf_ddip.io.sinogram_header import geometry_from_header
    from sirf_ddip.physics.attenuation import attenuation_factors
    from sirf_ddip.physics.normalisation import ecat8_efficiencies
    from sirf_ddip.sim.scatter_model import sss_scatter_shape

    mmr = SHARED / "real-mmr"
    geom = geometry_from_header(InterfileHeader.read(mmr / "templates" / "template_span11.hs"))
    print(f"make: {geom.describe()}")
    eff = np.asarray(ecat8_efficiencies(read_ecat8_norm(mmr / "norm.n.hdr"), geom), np.float32)
    mu = read_mu_map(mmr / "mu_map.hv")
    write_image(d / "mu.hv", mu, overwrite=True)
    meta = {"energy_window_kev": WINDOW}

    def w(name, arr):
        write_projdata(d / f"{name}.hs", ProjData(np.asarray(arr, np.float32), geom, dict(meta)), overwrite=True)

    w("eff", eff)
    w("norm", 1.0 / np.maximum(eff, np.float32(1e-20)))
    a = np.asarray(attenuation_factors(mu, geom).array, np.float32)
    w("acf", 1.0 / a)
    trues = np.log(np.maximum(a, np.float32(1e-12)))
    trues *= np.float32(-1.0 / 0.096)
    trues *= a
    del a
    trues *= eff
    trues *= np.float32(4.0e8 / float(trues.sum(dtype=np.float64)))
    act = Image((np.asarray(mu.array, np.float32) / np.float32(0.096)).astype(np.float32), mu.grid)
    shape, info = sss_scatter_shape(act, mu, geom, WINDOW, eff)
    scatter = (shape * (0.3 / 0.7 * 4.0e8 / float(shape.sum()))).astype(np.float32)
    del shape
    w("true_scatter", scatter)
    randoms = (np.float32(0.2 * trues.mean()) * eff).astype(np.float32)
    w("randoms", randoms)
    trues += scatter
    trues += randoms
    w("prompts", trues)
    print(f"make: {info.get('scatter_points')} scatter points; prompts {float(trues.sum(dtype=np.float64)):.4g}")


def stir_pars(src: Path, dst: Path, clip: tuple[float, float] | None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in PAR_FILES:
        shutil.copy(src / f, dst / f)
    p = dst / "scatter_estimation.par"
    t = p.read_text()
    t = t.replace("  PET Single Scatter Simulation Parameters :=",
                  "  PET Single Scatter Simulation Parameters :=\n  randomly place scatter points := 0", 1)
    if clip is not None:
        t = re.sub(r"minimum scatter scaling factor\s*:=.*", f"minimum scatter scaling factor := {clip[0]}", t)
        t = re.sub(r"maximum scatter scaling factor\s*:=.*", f"maximum scatter scaling factor := {clip[1]}", t)
    p.write_text(t)
    return p


def stir(d: Path, bin_dir: Path, pardir: Path, max_rss_gb: float, clip, tag: str) -> None:
    par = stir_pars(pardir, d / f"par_stir{tag}", clip)
    out = d / f"stir{tag}"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", scatter_pardir=str(par.parent),
               sino_input="prompts.hs", atnimg="mu.hv", NORM="norm.hs", acf3d="acf.hs", randoms3d="randoms.hs",
               num_scat_iters=str(ITERS), scatter_recon_num_subsets="21", scatter_recon_num_subiterations="21",
               mask_projdata_filename=f"{out}/mask2d.hs", mask_image=f"{out}/mask_image.hv",
               scatter_prefix=f"{out}/scatter", total_additive_prefix=f"{out}/total_additive")
    load0 = _load()
    t0 = time.perf_counter()
    peak = 0
    with open(out / "stir.log", "w") as log:
        proc = subprocess.Popen([str(bin_dir / "estimate_scatter"), str(par)], cwd=d, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
            if peak > max_rss_gb * 1024 * 1024:
                proc.kill()
                proc.wait()
                print(f"stir: killed at RSS {peak / 1024:.0f} MB > {max_rss_gb} GB")
                break
            time.sleep(1.0)
    wall = time.perf_counter() - t0
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"wall_s": wall, "cpu_s": r.ru_utime + r.ru_stime, "peak_rss_mb": peak / 1024, "rc": proc.returncode,
           "load_before": load0, "load_after": _load()}
    (d / f"stir{tag}_time.json").write_text(json.dumps(res))
    print(f"stir estimate_scatter: {json.dumps(res)}")


def ours(d: Path, clip, tag: str) -> None:
    from sirf_ddip.data import ProjData
    from sirf_ddip.io import read_image, read_projdata, write_projdata
    from sirf_ddip.recon.scatter_estimation import ScatterEstimationSettings, estimate_scatter

    p = read_projdata(d / "prompts.hs")
    mu = read_image(d / "mu.hv")
    r = read_projdata(d / "randoms.hs")
    eff = read_projdata(d / "eff.hs").array
    att = read_projdata(d / "acf.hs").array
    np.reciprocal(att, out=att)
    (d / f"ours{tag}").mkdir(exist_ok=True)
    st = ScatterEstimationSettings(num_iterations=ITERS)
    if clip is not None:
        st = ScatterEstimationSettings(num_iterations=ITERS, min_scale_factor=clip[0], max_scale_factor=clip[1])
    load0 = _load()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()

    def cb(it, info):
        s = np.asarray(info["scale_factors"])
        print(f"  ours iteration {it}: scale {s.min():.3g}..{s.max():.3g} ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_scatter(p, mu, WINDOW, randoms=r, efficiencies=eff, attenuation=att,
                               settings=st, return_iterations=True,
                               callback=cb)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    res = {"wall_s": wall, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
           "peak_rss_mb": _peak_mb(), "load_before": load0, "load_after": _load()}
    for i, e in enumerate(est.iterations, 1):
        write_projdata(d / f"ours{tag}" / f"scatter_{i}.hs", ProjData(e.array, p.geometry, {}), overwrite=True)
    (d / f"ours{tag}_time.json").write_text(json.dumps(res))
    print(f"ours estimate_scatter: {json.dumps(res)}")


def compare(d: Path, tag: str, osem: bool) -> None:
    import torch

    from sirf_ddip.io import read_image, read_projdata
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.physics.ssrb import ssrb, ssrb_geometry
    from sirf_ddip.data import Image, ProjData
    from sirf_ddip.recon.osem import OSEMReconstructor
    from sirf_ddip.recon.scatter_estimation import mu_covering_reconstruction, stir_zoomed_image_grid
    from sirf_ddip.io.mumap import resample_to_grid

    def rel(a, b):
        return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))

    truth = read_projdata(d / "true_scatter.hs")
    geo3 = truth.geometry
    print(f"load average {_load()}")
    print("| iteration | ours vs STIR | ours vs truth | STIR vs truth |")
    print("|---|---|---|---|")
    for i in range(1, ITERS + 1):
        o = read_projdata(d / f"ours{tag}" / f"scatter_{i}.hs").array
        sf = d / f"stir{tag}" / f"scatter_{i}.hs"
        s = read_projdata(sf).array if sf.is_file() else None
        print(f"| {i} | {rel(o, s) if s is not None else float('nan'):.4f} | {rel(o, truth.array):.4f} | "
              f"{rel(s, truth.array) if s is not None else float('nan'):.4f} |", flush=True)
    for k in ("stir", "ours"):
        f = d / f"{k}{tag}_time.json"
        if f.is_file():
            print(f"{k}: {f.read_text()}")
    if not osem:
        return
    # OSEM ROI means (2D: the SSRB of the data, as the estimation's reconstructions)
    geo2 = ssrb_geometry(geo3)
    y2 = ssrb(read_projdata(d / "prompts.hs").array, geo3, out_geometry=geo2)
    r2 = ssrb(read_projdata(d / "randoms.hs").array, geo3, out_geometry=geo2)
    S2 = np.maximum(ssrb(read_projdata(d / "eff.hs").array, geo3, out_geometry=geo2), np.float32(1e-20))
    acf2 = ssrb(read_projdata(d / "acf.hs").array, geo3, normalise=True, out_geometry=geo2)
    mult2 = (S2 / acf2).astype(np.float32)
    grid = stir_zoomed_image_grid(geo3, 0.5)
    mu = read_image(d / "mu.hv")
    mu_r = mu_covering_reconstruction(mu, geo3, 0.5)
    mu_g = np.asarray(resample_to_grid(mu_r, grid).array)
    z = np.arange(grid.shape[0])[:, None, None]
    soft = (mu_g > 0.08) & (mu_g < 0.11)
    zc = (z > grid.shape[0] * 0.25) & (z < grid.shape[0] * 0.75)
    _, yy, xx = np.meshgrid(np.arange(grid.shape[0]), grid.coords(1), grid.coords(2), indexing="ij")
    rois = {"soft tissue (0.08<mu<0.11)": soft, "central soft tissue": soft & zc & (xx ** 2 + yy ** 2 < 40 ** 2),
            "all mu>0.05": mu_g > 0.05}
    y2_pd = ProjData(y2, geo2, {})
    means = {}
    for name, sc in (("truth", truth.array), ("ours", read_projdata(d / f"ours{tag}" / f"scatter_{ITERS}.hs").array),
                     ("stir", read_projdata(d / f"stir{tag}" / f"scatter_{ITERS}.hs").array)):
        s2 = ssrb(sc, geo3, out_geometry=geo2)
        lik = EngineLogLikelihood(y2_pd, mult=mult2, additive=((r2 + s2) / mult2).astype(np.float32), grid=grid)
        rec = OSEMReconstructor(lik, num_subsets=21, num_subiterations=42)
        x = torch.ones(grid.shape, dtype=torch.float32)
        rec.set_up(x)
        rec.set_current_estimate(x)
        rec.process(progress=False)
        img = rec.get_output_tensor().detach().cpu().numpy()
        means[name] = {k: float(img[m].mean()) for k, m in rois.items()}
        print(f"  OSEM with {name} scatter: {means[name]} (load {_load()})", flush=True)
    print("| ROI | voxels | truth | ours | STIR | ours/STIR - 1 | ours/truth - 1 | STIR/truth - 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for k, m in rois.items():
        t, o, s = means["truth"][k], means["ours"][k], means["stir"][k]
        print(f"| {k} | {int(m.sum())} | {t:.4g} | {o:.4g} | {s:.4g} | {o / s - 1:+.4f} | {o / t - 1:+.4f} | "
              f"{s / t - 1:+.4f} |")
    print(f"compare peak {_peak_mb():.0f} MB, load {_load()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("make", "stir", "ours", "compare"))
    ap.add_argument("--stir-bin", type=Path, help="folder with STIR's estimate_scatter")
    ap.add_argument("--stir-pardir", type=Path, help="STIR's examples/Siemens-mMR/scatter_estimation_par_files")
    ap.add_argument("--work", required=True, type=Path, help="scratch folder")
    ap.add_argument("--clip", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="tail-fit scale clip for both (default: the mMR files' 0.1 0.4); output folders get a tag")
    ap.add_argument("--no-osem", action="store_true", help="compare: skip the OSEM ROI means")
    ap.add_argument("--max-rss-gb", type=float, default=6.0, help="kill STIR above this RSS")
    args = ap.parse_args(argv)
    d = args.work.resolve()
    d.mkdir(parents=True, exist_ok=True)
    clip = tuple(args.clip) if args.clip else None
    tag = f"_clip{clip[0]:g}-{clip[1]:g}" if clip else ""
    t0 = time.perf_counter()
    if args.phase == "make":
        make(d)
    elif args.phase == "stir":
        stir(d, args.stir_bin.resolve(), args.stir_pardir.resolve(), args.max_rss_gb, clip, tag)
    elif args.phase == "ours":
        ours(d, clip, tag)
    else:
        compare(d, tag, not args.no_osem)
    print(f"phase {args.phase}: {time.perf_counter() - t0:.1f} s wall, peak {_peak_mb():.0f} MB, load {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
