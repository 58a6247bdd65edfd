#!/usr/bin/env python
"""Full-size projector and OSEM figures on the mMR span-11 template (837 sinograms x 252 views x 344 bins).

Prints, per device: set-up (tracing; and again from the on-disk cache) with its memory, one full forward and one
full back projection, one subset pair (forward + back of one of ``--subsets`` subsets, median over 3 subsets),
the subset sensitivities, and one OSEM iteration (all subsets; STIR OSMAPOSL's update on noise-free data of a
phantom), next to STIR 6.4's ray-tracing matrix measured on the 2-core development machine (3 tangential LORs,
2 threads).  Peak memory is the process's maximum RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).

Examples::

    python benchmarks/full_size.py                       # 127 x 285 x 285, CPU (and CUDA when present)
    python benchmarks/full_size.py --xy 344 --threads 2
    python benchmarks/full_size.py --quick               # 16 rings (31 planes): a smaller run
    python benchmarks/full_size.py --rings 32 --skip-osem
    python benchmarks/full_size.py --cli                 # the whole `sirf-ddip osem --subsets 21` command
    python benchmarks/full_size.py --ddip-steps 1 --skip-osem   # + one DDIP step (shipped settings) at full size
    python benchmarks/full_size.py --device cuda --xy 344 --ddip-steps 50 --ddip-paper-steps 10   # GPU items
    python benchmarks/full_size.py --simulate benchmarks/full_size_study.yaml   # simulate's wall time, peak RSS
    python benchmarks/full_size.py --ddip runs/full_size_study --set num_subsets=14   # a whole DDIP run, split
                                                         # by part, + metrics vs the truth and OSEM 2 x 21's

Run under ``/usr/bin/time -v`` for the whole process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sirf_ddip.geometry import SinogramGeometry  # noqa: E402
from sirf_ddip.io.header import InterfileHeader  # noqa: E402
from sirf_ddip.physics.projector import Projector  # noqa: E402
from sirf_ddip.io.sinogram_header import geometry_from_header

#: STIR 6.4 ProjMatrixByBinUsingRayTracing, 127 x 285 x 285, full span-11 template, 2-core machine (issue 11)
STIR = {"first forward (incl. matrix)": 183.0, "forward": 151.0, "back": 78.0, "subset forward (1/21)": 8.1,
        "subset back (1/21)": 7.4, "OSEM iteration (21 subsets)": 325.0}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


class _Timer:
    """Wall and process CPU time (all threads) of a block; on a contended machine ``cpu / threads`` estimates
    the wall time of an idle one."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        return False

    def fmt(self, threads: int) -> str:
        return f"{self.wall:8.2f} s wall {self.cpu:8.2f} s cpu"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return _rss_gb()


def geometry(template: Path, rings: int | None) -> SinogramGeometry:
    """The template's geometry, or the same scanner cut to ``rings`` rings (span 11, all ring differences)."""
    g = geometry_from_header(InterfileHeader.read(template))
    if rings is None or rings >= g.scanner.num_rings:
        return g
    sc = g.scanner.with_rings(int(rings))
    return SinogramGeometry(sc, span=11, max_ring_diff=int(rings) - 1)


def phantom(grid) -> np.ndarray:
    """Uniform cylinder (radius 40 % of the FOV) with two hot rods and a cold rod."""
    z, y, x = [grid.coords(a) for a in range(3)]
    R = 0.4 * min(abs(y[0]), abs(x[0]))
    rr = y[:, None] ** 2 + x[None, :] ** 2
    img = (rr < R ** 2).astype(np.float32)
    img += 3.0 * ((y[:, None] - 0.4 * R) ** 2 + x[None, :] ** 2 < (0.2 * R) ** 2)
    img -= 0.9 * ((y[:, None] + 0.4 * R) ** 2 + (x[None, :] - 0.2 * R) ** 2 < (0.15 * R) ** 2)
    vol = np.repeat(img[None], len(z), 0)
    vol[: len(z) // 8] = 0
    vol[len(z) - len(z) // 8:] = 0
    return vol


def run_ddip_steps(P: Projector, y: torch.Tensor, geom: SinogramGeometry, grid, dev: torch.device,
                   steps: int, settings: str = "shipped", slab_batch: int | None = None,
                   mlem_iteration_s: float | None = None) -> None:
    """``steps`` diffusion steps of DDIP on the full-size data ``y`` (noise-free, scaled to 2e7 counts: a 10 %-dose
    brain), a head phantom's MR, the shipped prior, and the projector ``P`` already set up. ``settings``:
    "shipped" (``recon/ddip.yaml``) or "paper" (:meth:`DDIPConfig.paper`: 200 steps, K = 2, all slabs). The warm
    start is cut to one MLEM iteration (``n_init = 1``): it is not what is timed here (20 iterations cost
    20 x (forward + back) above). Prints the per-step parts of :meth:`DDIPReconstructor.timing_report` and the
    whole run's estimate (``num_steps`` such steps + the 20-iteration warm start)."""
    from ddip_grid import _phantom as head_phantom  # same folder; a head-sized MR

    from sirf_ddip.data import Image, ProjData
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.recon.ddip import DDIPReconstructor

    _, mr = head_phantom(grid)
    counts = y * (2e7 / max(float(y.sum()), 1.0))
    lik = EngineLogLikelihood(ProjData(counts.cpu().numpy(), geom), grid=grid, device=dev, projector=P)
    base = DDIPConfig.paper() if settings == "paper" else DDIPConfig.shipped()
    n_init_real = base.n_init
    run_opts = {"device": str(dev)} | ({"slab_batch": int(slab_batch)} if slab_batch else {})
    rec = DDIPReconstructor(base.replace(n_init=1, **run_opts))
    rec.set_objective_function(lik)
    rec.set_anatomical_image(Image(mr, grid))
    with _Timer() as t:
        rec.set_up(Image(np.ones(grid.shape, np.float32), grid))
        rec.initialise()
        _sync(dev)
    t_setup = t
    print(f"{'DDIP set-up + 1-it warm start':28s}{t.wall:8.2f} s wall {t.cpu:8.2f} s cpu  [{settings} settings] "
          f"({rec.config.num_steps} steps of {int(rec.prior.slab_indices(grid.shape[0]).numel())} of "
          f"{rec.prior.num_slabs(grid.shape[0])} slabs: {rec.prior_planes_summary()}; prior grid: "
          f"{rec.prior_grid.describe() if rec.prior_grid is not None else 'the PET grid'})", flush=True)
    with _Timer() as t:
        for _ in range(steps):
            rec.update_current_estimate()
        _sync(dev)
    rep = rec.timing_report()
    parts = ", ".join(f"{k} {v:.1f}" for k, v in rep.items() if k not in ("init_total",) and v > 0)
    print(f"{'DDIP step (' + settings + ')':28s}{t.wall / steps:8.2f} s wall {t.cpu / steps:8.2f} s cpu  per step "
          f"(mean of {steps}); parts (s/step): {parts}", flush=True)
    # the real warm start: n_init MLEM iterations of one full forward + back projection each (timed above)
    it_s = t_setup.wall if mlem_iteration_s is None else mlem_iteration_s
    whole = t.wall / steps * rec.config.num_steps + t_setup.wall + (n_init_real - 1) * it_s
    print(f"{'DDIP whole run (' + settings + ')':28s}{whole:8.1f} s wall  = {rec.config.num_steps} steps x "
          f"{t.wall / steps:.2f} s{' (measured: all of them)' if steps >= rec.config.num_steps else ' (extrapolated)'}"
          f" + set-up with a 1-iteration warm start {t_setup.wall:.2f} s + {n_init_real - 1} more MLEM iterations x "
          f"{it_s:.2f} s (full forward + back)", flush=True)


def run(dev: torch.device, geom: SinogramGeometry, xy: int, threads: int, subsets: int, osem: bool,
        kernel: str, ddip_steps: int = 0, paper_steps: int = 0, slab_batch: int | None = None) -> None:
    grid = geom.default_image_grid(xy)
    print(f"\n== {dev.type}: {geom.shape[0]} x {geom.shape[1]} x {geom.shape[2]} bins "
          f"({np.prod(geom.shape) / 1e6:.1f} M), image {grid.shape}, kernel {kernel}, {threads} thread(s)",
          flush=True)
    print("   (wall: elapsed; cpu: this process's CPU time, all threads; on a shared machine cpu / threads is the "
          "idle-machine estimate)")
    line = (lambda name, t, extra="": print(f"{name:28s}{t.wall:8.2f} s wall {t.cpu:8.2f} s cpu  {extra}",
                                            flush=True))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _rss_gb()
    with tempfile.TemporaryDirectory(prefix="sirf_ddip_bench_cache_") as cache:
        opts = dict(device=dev, cache=False, cpu_threads=threads, kernel=kernel, disk_cache=True,
                    setup_threads=threads)
        old = os.environ.get("SIRF_DDIP_CACHE")
        os.environ["SIRF_DDIP_CACHE"] = cache
        try:
            P = Projector(geom, grid, **opts)
            with _Timer() as t:
                P.set_up()
            line("set-up (trace)", t, f"matrix {P.nnz() / 1e6:.0f} M elements, {P._matrix().nbytes / 2 ** 30:.2f} GB;"
                                      f" peak RSS {_rss_gb():.2f} GB (+{_rss_gb() - rss0:.2f})")
            del P
            P = Projector(geom, grid, **opts)
            with _Timer() as t:
                P.set_up()
            line("set-up (from disk cache)", t)
        finally:
            if old is None:
                os.environ.pop("SIRF_DDIP_CACHE", None)
            else:
                os.environ["SIRF_DDIP_CACHE"] = old
    x = torch.as_tensor(phantom(grid), device=dev)
    with torch.no_grad():
        P.forward(x, 0, subsets)  # first call: compiled kernels loaded
        with _Timer() as t:
            y = P.forward(x)
            _sync(dev)
        tf_full = t
        line("forward", t, f"(STIR {STIR['forward']:.0f} s)")
        with _Timer() as t:
            P.adjoint(y)
            _sync(dev)
        tb_full = t
        line("back", t, f"(STIR {STIR['back']:.0f} s)")
        tf, tb = [], []
        for s in (0, subsets // 2, subsets - 1):
            with _Timer() as t:
                ys = P.forward(x, s, subsets)
                _sync(dev)
            tf.append(t)
            with _Timer() as t:
                P.adjoint(ys, s, subsets)
                _sync(dev)
            tb.append(t)
        sf = sorted(tf, key=lambda t: t.cpu)[1]
        sb = sorted(tb, key=lambda t: t.cpu)[1]
        line(f"subset forward (1/{subsets})", sf, f"= 1/{tf_full.cpu / max(sf.cpu, 1e-9):.1f} of full "
                                                 f"(cpu; STIR {STIR['subset forward (1/21)']} s)")
        line(f"subset back (1/{subsets})", sb, f"= 1/{tb_full.cpu / max(sb.cpu, 1e-9):.1f} of full "
                                              f"(cpu; STIR {STIR['subset back (1/21)']} s)")
        if osem:
            with _Timer() as t:
                ones = torch.ones((geom.num_sinograms, len(geom.subset_views(subsets, 0, grid=grid)),
                                   geom.num_tangential), device=dev)
                sens = [P.adjoint(ones, s, subsets) for s in range(subsets)]
                _sync(dev)
            line("subset sensitivities", t, f"({subsets} back projections)")
            est = torch.ones_like(x)
            with _Timer() as t:
                for s in range(subsets):
                    views = geom.subset_views(subsets, s, grid=grid)
                    q = y[:, views] / P.forward(est, s, subsets).clamp_min(1e-12)
                    est = torch.where(sens[s] > 0, est * P.adjoint(q, s, subsets) / sens[s].clamp_min(1e-12), 0)
                _sync(dev)
            line(f"OSEM iteration ({subsets} subs.)", t, f"(STIR {STIR['OSEM iteration (21 subsets)']:.0f} s)")
    if ddip_steps > 0:
        run_ddip_steps(P, y, geom, grid, dev, ddip_steps, slab_batch=slab_batch,
                       mlem_iteration_s=tf_full.wall + tb_full.wall)
    if paper_steps > 0:
        run_ddip_steps(P, y, geom, grid, dev, paper_steps, settings="paper", slab_batch=slab_batch,
                       mlem_iteration_s=tf_full.wall + tb_full.wall)
    print(f"{'peak memory':28s}{_peak_gb(dev):8.2f} GB ({'RSS' if dev.type == 'cpu' else 'CUDA allocated'})",
          flush=True)


def _region_metrics(x: np.ndarray, study: Path) -> dict:
    """Brain PSNR / SSIM and the mean bias (%) of every lesion / departure region (``ddip_sweep.case_regions``)
    of ``x`` against the study's truth."""
    from ddip_sweep import case_regions  # same folder

    from sirf_ddip.io import read_image
    from sirf_ddip.study.metrics import mean_bias, psnr, ssim

    truth = read_image(study / "truth.hv").array.astype(np.float64)
    brain = read_image(study / "mask_brain.hv").array > 0.5
    arr = np.asarray(x, np.float64)
    return {"psnr": psnr(arr, truth, brain), "ssim": ssim(arr, truth, brain),
            "bias": [mean_bias(arr, truth, m) for m in case_regions(study)],
            "activity": float(arr.sum() / max(float(truth.sum()), 1e-30) - 1.0)}


def _fmt_metrics(m: dict) -> str:
    bias = " / ".join(f"{b:+.1f}" for b in m["bias"]) or "none"
    return (f"brain PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, region biases (%) {bias}, total activity "
            f"{100 * m['activity']:+.1f} %")


def run_ddip_study(study: Path, threads: int, device: str, overrides: list[str], osem_iterations: int,
                   osem_subsets: int, out: Path | None) -> None:
    """A whole DDIP reconstruction of a simulated study (``sirf-ddip simulate``; e.g. ``full_size_study.yaml``)
    with the shipped settings + ``overrides``, timed by part, and its image metrics against the truth.

    After every diffusion step it prints the run so far split into warm start, set-up (data, projector,
    prior, sensitivities), projector (the image steps' forward + back projections), EM arithmetic, network
    (inference, and the forwards of fine-tuning), fine-tuning (backward + AdamW), diagnostics (the
    log-likelihood) and the rest, so a run stopped early still gives its split; at the end the output's metrics
    (brain PSNR, SSIM, region biases) and, with ``osem_iterations > 0``, OSEM's on the same data.
    """
    from sirf_ddip.io import read_image, write_image
    from sirf_ddip.physics.model import EngineLogLikelihood
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.recon.ddip import DDIPReconstructor
    from sirf_ddip.utils.device import resolve_device

    dev = resolve_device(device)
    cfg = DDIPConfig.shipped([*overrides, f"device={dev}"])
    t_start = time.perf_counter()
    print(f"\n== DDIP on {study} ({dev}, {threads} thread(s)); settings: shipped + {overrides or 'nothing'}; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    lik = EngineLogLikelihood.from_files(study / "prompts.hs", study / "mult_factors.hs",
                                         study / "additive_term.hs", image_template=study / "truth.hv",
                                         device=dev, num_subsets=cfg.num_subsets)
    truth_img = read_image(study / "truth.hv")
    rec = DDIPReconstructor(cfg)
    rec.set_objective_function(lik)
    rec.set_anatomical_image(read_image(study / "mr.hv"))
    rec.set_up(truth_img.with_array(np.zeros(truth_img.grid.shape, np.float32)))
    rec.initialise()
    _sync(dev)
    t_init = rec.timings.get("init", 0.0)
    setup = time.perf_counter() - t_start - t_init - rec.timings.get("loglik", 0.0)
    n = rec.config.num_steps
    print(f"{'set-up':28s}{setup:8.1f} s (data, projector, prior, sensitivities); warm start {t_init:.1f} s "
          f"({rec.counts.get('init_em', 0)} EM sub-iterations, {cfg.num_subsets} subset(s)); "
          f"{rec.prior_planes_summary()}; peak RSS {_rss_gb():.2f} GB", flush=True)

    def split(final: bool) -> str:
        tm, k = rec.timings, max(rec.iteration, 1)
        wall = time.perf_counter() - t_start
        parts = {"warm start": tm.get("init", 0.0), "set-up": setup, "projector": tm.get("projector", 0.0),
                 "EM": tm.get("em", 0.0), "network": tm.get("network_forward", 0.0),
                 "fine-tuning": tm.get("finetune_backward", 0.0), "diagnostics": tm.get("loglik", 0.0)}
        parts["other"] = wall - sum(parts.values())
        body = ", ".join(f"{name} {v:.0f} s" for name, v in parts.items())
        est = "" if final else (f"; whole run at this pace {parts['warm start'] + setup + (wall - parts['warm start'] - setup) / k * n:.0f} s")
        return f"{wall:.0f} s wall after {rec.iteration}/{n} steps: {body}{est}"

    while rec.iteration < n:
        rec.update_current_estimate()
        _sync(dev)
        print(f"step {rec.iteration:3d}: {split(False)}  [load {os.getloadavg()[0]:.1f}, RSS {_rss_gb():.2f} GB]",
              flush=True)
    x = rec.x.detach().cpu().numpy()
    print(f"{'DDIP whole run':28s}{split(True)}; peak RSS {_rss_gb():.2f} GB", flush=True)
    print(f"{'DDIP image':28s}{_fmt_metrics(_region_metrics(x, study))}", flush=True)
    if out is not None:
        write_image(out, truth_img.with_array(x.astype(np.float32)), overwrite=True)
    del rec
    if osem_iterations > 0:
        from sirf_ddip.recon.osem import OSEMReconstructor

        with _Timer() as t:
            lik.set_num_subsets(osem_subsets)
            osem = OSEMReconstructor(lik, num_subsets=osem_subsets)
            osem.set_num_subiterations(osem_iterations * osem_subsets)
            init = truth_img.with_array(np.ones(truth_img.grid.shape, np.float32))
            osem.set_up(init)
            osem.set_current_estimate(init)
            osem.run(osem_iterations * osem_subsets)
        print(f"{'OSEM ' + str(osem_iterations) + ' x ' + str(osem_subsets):28s}{t.wall:8.1f} s wall; "
              f"{_fmt_metrics(_region_metrics(osem.x.detach().cpu().numpy(), study))}", flush=True)


def run_simulate(config: Path, overrides: list[str], keep: Path | None) -> None:
    """Time ``sirf-ddip simulate CONFIG`` (e.g. ``full_size_study.yaml``) in a subprocess and print its peak RSS
    (the figure the memory target is about; not a timed test)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="sirf_ddip_bench_sim_") as tmp:
        out = keep if keep is not None else Path(tmp) / "study"
        cmd = [sys.executable, "-m", "sirf_ddip", "simulate", str(config), "--out", str(out), "--overwrite",
               *[a for kv in overrides for a in ("--set", kv)]]
        print("\n== " + " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "SIRF_DDIP_PROGRESS": "0"}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"{'sirf-ddip simulate (whole)':28s}{time.perf_counter() - t0:8.1f} s wall "
              f"{usage.ru_utime + usage.ru_stime:8.1f} s cpu  exit {r.returncode}; peak RSS "
              f"{usage.ru_maxrss / 2 ** 20:.2f} GB  [load {' '.join(f'{v:.1f}' for v in os.getloadavg())}]",
              flush=True)


def run_cli_osem(geom: SinogramGeometry, xy: int, subsets: int, threads: int, folder: Path | None) -> None:
    """Write a study (Poisson prompts of the phantom, a uniform initial image) and time the whole
    ``sirf-ddip osem --iterations 1 --subsets S`` command (set-up, subset sensitivities, one iteration) in a
    subprocess, with its peak RSS."""
    import subprocess

    from sirf_ddip.data import Image, ProjData
    from sirf_ddip.io import write_image, write_projdata

    grid = geom.default_image_grid(xy)
    with tempfile.TemporaryDirectory(prefix="sirf_ddip_bench_study_") as tmp:
        d = Path(folder) if folder is not None else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        P = Projector(geom, grid, device="cpu", cpu_threads=threads, cache=False, disk_cache=False)
        y = P.forward(torch.as_tensor(phantom(grid))).numpy()
        rng = np.random.default_rng(0)
        prompts = rng.poisson(np.clip(y, 0, None) * (2e8 / max(float(y.sum()), 1.0))).astype(np.float32)
        del y, P
        write_projdata(d / "prompts.hs", ProjData(prompts, geom), overwrite=True)
        del prompts
        write_image(d / "init.hv", Image(np.ones(grid.shape, np.float32), grid), overwrite=True)
        cmd = [sys.executable, "-m", "sirf_ddip", "osem", "--prompts", str(d / "prompts.hs"), "--init",
               str(d / "init.hv"), "--iterations", "1", "--subsets", str(subsets), "--out", str(d / "osem.hv"),
               "--overwrite"]
        print("\n== " + " ".join(cmd[1:]), flush=True)
        # a fresh matrix cache: the command traces its projector as on a first run
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads),
               "SIRF_DDIP_CACHE": str(Path(tmp) / "matrix-cache")}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"{'sirf-ddip osem (whole)':28s}{time.perf_counter() - t0:8.1f} s wall "
              f"{usage.ru_utime + usage.ru_stime:8.1f} s cpu  exit {r.returncode}; peak RSS "
              f"{usage.ru_maxrss / 2 ** 20:.2f} GB (STIR estimate 480 s)", flush=True)
        rec = d / "osem_run_record.json"
        if rec.is_file():
            import json
            timing = json.loads(rec.read_text()).get("timing_s", {})
            print("run record timing (s):", {k: round(v, 1) for k, v in timing.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", default=str(REPO.parent / "shared" / "real-mmr" / "templates" /
                                              "template_span11.hs"), help="span-11 template (.hs)")
    ap.add_argument("--xy", type=int, default=285, help="in-plane image size (default 285: STIR's default)")
    ap.add_argument("--rings", type=int, default=None, help="cut the scanner to this many rings (smaller run)")
    ap.add_argument("--quick", action="store_true", help="a smaller run: 16 rings (31 planes), 7 subsets")
    ap.add_argument("--subsets", type=int, default=None, help="OSEM subsets (default 21; 7 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--device", default="all", help="cpu, cuda, or all (CPU and, if present, CUDA)")
    ap.add_argument("--kernel", default="auto", help="projector kernel: auto, numba (CPU), torch")
    ap.add_argument("--skip-osem", action="store_true", help="no sensitivities / OSEM iteration")
    ap.add_argument("--cli", action="store_true",
                    help="only time the whole 'sirf-ddip osem --iterations 1' command on a written study")
    ap.add_argument("--study-dir", default=None, help="with --cli: keep the study there (default: a temp dir)")
    ap.add_argument("--ddip-steps", type=int, default=0,
                    help="also time this many DDIP diffusion steps (shipped settings, shipped prior; 0 = none)")
    ap.add_argument("--ddip-paper-steps", type=int, default=0,
                    help="also time this many DDIP steps with the paper's settings (200 steps, K = 2, all slabs)")
    ap.add_argument("--slab-batch", type=int, default=None,
                    help="slabs per network call in the DDIP steps (a run option: memory and speed only; "
                         "default: the config's)")
    ap.add_argument("--ddip", default=None, metavar="STUDY",
                    help="a whole DDIP run on this simulated study folder (sirf-ddip simulate, e.g. "
                         "benchmarks/full_size_study.yaml), split by part, with image metrics vs the truth")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="with --ddip: key=value over the shipped DDIP settings; with --simulate: over the "
                         "simulation config (repeatable)")
    ap.add_argument("--osem-iterations", type=int, default=2,
                    help="with --ddip: OSEM iterations of the baseline on the same data (0 = none; default 2)")
    ap.add_argument("--ddip-out", default=None, help="with --ddip: write the DDIP image here (.hv)")
    ap.add_argument("--simulate", default=None, metavar="CONFIG",
                    help="only time `sirf-ddip simulate CONFIG` (+ --set overrides) and print its peak RSS")
    ap.add_argument("--simulate-out", default=None, help="with --simulate: keep the study there")
    args = ap.parse_args(argv)
    if args.simulate:
        run_simulate(Path(args.simulate), args.overrides, Path(args.simulate_out) if args.simulate_out else None)
        return 0
    if args.ddip:
        torch.set_num_threads(args.threads)
        dev = "cpu" if args.device == "all" else args.device
        run_ddip_study(Path(args.ddip), args.threads, dev, args.overrides, args.osem_iterations,
                       args.subsets or 21, Path(args.ddip_out) if args.ddip_out else None)
        print(f"{'peak memory':28s}{_peak_gb(torch.device(dev)):8.2f} GB", flush=True)
        return 0
    template = Path(args.template)
    if not template.is_file():
        ap.error(f"template {template} not found (use --template)")
    rings = 16 if args.quick and args.rings is None else args.rings
    subsets = args.subsets or (7 if args.quick else 21)
    geom = geometry(template, rings)
    torch.set_num_threads(args.threads)
    if args.device == "all":
        devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devs = [torch.device(args.device)]
    print(f"torch {torch.__version__}; CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}; "
          f"STIR 6.4 figures: 127 x 285 x 285 on the 2-core development machine, 2 threads")
    if args.cli:
        run_cli_osem(geom, args.xy, subsets, args.threads, args.study_dir)
        return 0
    for dev in devs:
        run(dev, geom, args.xy, args.threads, subsets, not args.skip_osem, args.kernel, args.ddip_steps,
            args.ddip_paper_steps, args.slab_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
