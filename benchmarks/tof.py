#!/usr/bin/env python
"""Benchmark the TOF projector against the non-TOF one (and STIR's recorded timing where the case has it).

Per geometry it prints the set-up time, the forward and back projection times (median of ``--repeats``) of the
TOF projector and of the non-TOF projector on the same matrix, the time per TOF bin, and the TOF/non-TOF ratio.
On ``d690_tof_2d`` it also prints the agreement with STIR 6.4 (forward, back projection of ones) and our OSEM
wall time next to STIR's OSMAPOSL one recorded in ``case.json`` (same machine class, other load: indicative).

With ``--stir-bin DIR`` (the ``bin`` folder of a STIR install: ``forward_project``, ``back_project``; nothing of
STIR is shipped or needed otherwise) it also runs STIR's TOF ray tracer on the same machine:

- ``stir_d690_timing``: STIR's ``forward_project`` / ``back_project`` (``ProjMatrixByBinUsingRayTracing``, 3
  tangential LORs, as the reference) on ``d690_tof_2d``'s TOF template (``forward.hs``) and its non-TOF one
  (``forward_nontof.hs``), wall time per process (median of ``--repeats``; STIR computes its matrix during the
  projection, so this includes STIR's set-up and its file I/O; ours is given as set-up + projection), per TOF bin,
  next to ours, and STIR's output against the shared file (the same STIR gives the same numbers);
- ``stir_3d_tof``: a 3-D TOF case made on the spot with that STIR (GE Discovery 690, 4 rings, span 1, 7 segments,
  72 views, 101 tangential positions, 11 TOF bins of mash 5, STIR's default z grid of 7 planes, 64 x 64 voxels of
  4.26 mm, and again on 5 planes, where STIR's TOF z and its ray tracer's differ): STIR's forward projection of a
  phantom and of a point, its back projection of ones and of its TOF-resolved forward projection, each against
  ours (relative L2), and the point's TOF peak bin per view and sinogram against STIR's.

Example::

    python benchmarks/tof.py --shared ../shared --repeats 3
    python benchmarks/tof.py --shared ../shared --repeats 3 --stir-bin /opt/stir/bin --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sirf_ddip.geometry import ImageGrid, SinogramGeometry  # noqa: E402
from sirf_ddip.geometry.scanner import get_scanner  # noqa: E402
from sirf_ddip.physics.projector import Projector  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm (compilation, buffers)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(name: str, geometry: SinogramGeometry, grid: ImageGrid, repeats: int, device: str) -> dict:
    P = Projector(geometry, grid, device=device)
    Pn = Projector(geometry.non_tof(), grid, device=device, kernel=P.kernel)
    t0 = time.perf_counter()
    P.set_up()
    setup = time.perf_counter() - t0
    x = torch.rand(grid.shape)
    y = torch.rand(geometry.shape)
    yn = torch.rand(geometry.sinogram_shape)
    out = dict(case=name, kernel=P.kernel, tof_bins=geometry.num_tof_bins, setup_s=setup,
               fwd_tof_s=_median_time(lambda: P.forward(x), repeats),
               bwd_tof_s=_median_time(lambda: P.adjoint(y), repeats),
               fwd_nontof_s=_median_time(lambda: Pn.forward(x), repeats),
               bwd_nontof_s=_median_time(lambda: Pn.adjoint(yn), repeats))
    out["fwd_per_tof_bin_s"] = out["fwd_tof_s"] / geometry.num_tof_bins
    out["bwd_per_tof_bin_s"] = out["bwd_tof_s"] / geometry.num_tof_bins
    out["fwd_ratio_tof_over_nontof"] = out["fwd_tof_s"] / out["fwd_nontof_s"]
    out["bwd_ratio_tof_over_nontof"] = out["bwd_tof_s"] / out["bwd_nontof_s"]
    return out


# ------------------------------------------------------------------------------------------------ STIR (optional)
_RAY_TRACING = """  type := Matrix
    {what} Using Matrix Parameters :=
      Matrix type := Ray Tracing
      Ray tracing matrix parameters :=
        number of rays in tangential direction to trace for each bin := 3
      End Ray tracing matrix parameters :=
    End {what} Using Matrix Parameters :=
End :=
"""


def _stir_pars(work: Path) -> tuple[Path, Path]:
    """STIR parameter files of the forward and back projector: the ray tracing matrix, 3 tangential LORs
    (as ``d690_tof_2d/osem_2.par``; keys from STIR's ``forward_project.cxx`` / ``back_project.cxx`` usage)."""
    fwd, bwd = work / "fwd_rt3.par", work / "bwd_rt3.par"
    fwd.write_text("Forward Projector parameters :=\n" + _RAY_TRACING.format(what="Forward projector"))
    bwd.write_text("Back Projector parameters :=\n" + _RAY_TRACING.format(what="Back projector"))
    return fwd, bwd


def _run_stir(stir_bin: Path, exe: str, args: list, threads: int | None) -> float:
    """Run one STIR utility; its wall time in s (an error names the command and STIR's last message)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [str(stir_bin / exe)] + [str(a) for a in args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    el = time.perf_counter() - t0
    if r.returncode != 0:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise SystemExit(f"benchmarks/tof.py: {' '.join(cmd)} failed (exit {r.returncode}): {tail}")
    return el


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def stir_d690_timing(stir_bin: Path, d: Path, work: Path, repeats: int, threads: int | None, ours: dict) -> dict:
    """STIR's TOF and non-TOF ray tracer on ``d690_tof_2d`` (process wall times) next to ours (``ours``: the
    :func:`bench` row of the same case)."""
    from sirf_ddip.io import read_image, read_projdata

    fwd_par, bwd_par = _stir_pars(work)
    geo = read_projdata(d / "forward.hs").geometry
    n = geo.num_tof_bins
    t = {}
    for tag, tmpl in (("tof", d / "forward.hs"), ("nontof", d / "forward_nontof.hs")):
        fw_out, bp_out = work / f"stir_fw_{tag}.hs", work / f"stir_bp_{tag}.hv"
        t[f"fwd_{tag}"] = statistics.median(
            _run_stir(stir_bin, "forward_project", [fw_out, d / "phantom.hv", tmpl, fwd_par], threads)
            for _ in range(repeats))
        t[f"bwd_{tag}"] = statistics.median(
            _run_stir(stir_bin, "back_project", [bp_out, tmpl, d / "phantom.hv", bwd_par], threads)
            for _ in range(repeats))
    fw_tof = read_projdata(work / "stir_fw_tof.hs").array
    out = dict(case="stir_d690_timing", stir_threads=threads, tof_bins=n,
               stir_fwd_tof_s=t["fwd_tof"], stir_bwd_tof_s=t["bwd_tof"],
               stir_fwd_nontof_s=t["fwd_nontof"], stir_bwd_nontof_s=t["bwd_nontof"],
               stir_fwd_per_tof_bin_s=t["fwd_tof"] / n, stir_bwd_per_tof_bin_s=t["bwd_tof"] / n,
               stir_fwd_ratio_tof_over_nontof=t["fwd_tof"] / t["fwd_nontof"],
               stir_bwd_ratio_tof_over_nontof=t["bwd_tof"] / t["bwd_nontof"],
               ours_setup_plus_fwd_tof_s=ours["setup_s"] + ours["fwd_tof_s"],
               ours_fwd_tof_s=ours["fwd_tof_s"], ours_bwd_tof_s=ours["bwd_tof_s"],
               ours_fwd_per_tof_bin_s=ours["fwd_per_tof_bin_s"], ours_bwd_per_tof_bin_s=ours["bwd_per_tof_bin_s"],
               stir_fwd_vs_shared_file_rel_l2=_rel(fw_tof, read_projdata(d / "forward.hs").array))
    out["stir_over_ours_fwd_tof"] = t["fwd_tof"] / ours["fwd_tof_s"]
    out["stir_over_ours_bwd_tof"] = t["bwd_tof"] / ours["bwd_tof_s"]
    # STIR's back projection of the TOF template's data (the forward projection of the phantom) against ours
    P = Projector(geo, read_image(d / "phantom.hv").grid)
    out["bwd_of_tof_data_ours_vs_stir_rel_l2"] = _rel(P.adjoint_numpy(read_projdata(d / "forward.hs").array),
                                                      read_image(work / "stir_bp_tof.hv").array)
    return out


def stir_3d_tof(stir_bin: Path, work: Path, threads: int | None, device: str, planes: int | None = None) -> dict:
    """A 3-D TOF case made with STIR on the spot (see the module docstring) against our TOF projector; ``planes``
    replaces STIR's default 7 image planes (same voxel size), where STIR's TOF z and the ray tracer's differ."""
    from sirf_ddip.data import Image, ProjData
    from sirf_ddip.io import read_image, read_projdata, write_image, write_projdata

    fwd_par, bwd_par = _stir_pars(work)
    sc = get_scanner("GE Discovery 690").with_rings(4)
    g = SinogramGeometry(sc, span=1, max_ring_diff=3, view_mashing=4, num_tangential=101, tof_mash_factor=5)
    grid = g.default_image_grid(xy=64, zoom=0.5)
    if planes:
        grid = ImageGrid((planes,) + tuple(grid.shape[1:]), grid.voxel_size)
    work = work / f"3d_{grid.shape[0]}planes"
    work.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = grid.shape
    zz, yy, xx = np.mgrid[:nz, :ny, :nx]
    c = (ny - 1) / 2
    ph = (((yy - c) / 22.0) ** 2 + ((xx - c) / 17.0) ** 2 <= 1) * 1.0
    ph += ((yy - c + 8) ** 2 + (xx - c - 6) ** 2 <= 16) * 3.0
    ph[(zz == 0) | (zz == nz - 1)] *= 0.5
    ph = ph.astype(np.float32)
    pt = np.zeros(grid.shape, np.float32)
    pt[1, 18, 45] = 1.0  # off-centre in x, y and z: oblique segments see a z-dependent TOF offset
    write_projdata(work / "tmpl3d.hs", ProjData(np.zeros(g.shape, np.float32), g), overwrite=True)
    write_projdata(work / "ones3d.hs", ProjData(np.ones(g.shape, np.float32), g), overwrite=True)
    write_image(work / "phantom3d.hv", Image(ph, grid), overwrite=True)
    write_image(work / "point3d.hv", Image(pt, grid), overwrite=True)
    ts = {}
    ts["fwd"] = _run_stir(stir_bin, "forward_project", [work / "stir_fw3d.hs", work / "phantom3d.hv",
                                                        work / "tmpl3d.hs", fwd_par], threads)
    _run_stir(stir_bin, "forward_project", [work / "stir_pt3d.hs", work / "point3d.hv", work / "tmpl3d.hs", fwd_par],
              threads)
    ts["bwd"] = _run_stir(stir_bin, "back_project", [work / "stir_bp3d.hv", work / "ones3d.hs", work / "phantom3d.hv",
                                                     bwd_par], threads)
    _run_stir(stir_bin, "back_project", [work / "stir_bpfw3d.hv", work / "stir_fw3d.hs", work / "phantom3d.hv",
                                         bwd_par], threads)
    s_fw = read_projdata(work / "stir_fw3d.hs")
    assert s_fw.geometry.matches(g), (s_fw.geometry.describe(), g.describe())
    P = Projector(g, grid, device=device)
    t0 = time.perf_counter()
    o_fw = P.forward_numpy(ph)
    t_ours = time.perf_counter() - t0
    s_pt = read_projdata(work / "stir_pt3d.hs").array
    o_pt = P.forward_numpy(pt)
    # the point's TOF peak: per (segment's sinograms, view) where STIR's point projection is clearly non-zero
    s_tofsum, o_tofsum = s_pt.sum(0), o_pt.sum(0)
    mask = s_tofsum.max(axis=-1) > 0.05 * s_tofsum.max()  # (sinogram, view)
    s_peak = s_pt.sum(-1).argmax(0)[mask]
    o_peak = o_pt.sum(-1).argmax(0)[mask]
    out = dict(case=f"stir_3d_tof_{nz}planes", geometry=g.describe(), image=list(grid.shape),
               voxel_mm=[round(v, 4) for v in grid.voxel_size], stir_threads=threads,
               forward_rel_l2=_rel(o_fw, s_fw.array),
               tof_sum_ours_vs_stir_nontof_sum_rel_l2=_rel(o_fw.sum(0), s_fw.array.sum(0)),
               point_forward_rel_l2=_rel(o_pt, s_pt),
               point_tof_peak_same_bin=f"{int((s_peak == o_peak).sum())}/{int(mask.sum())}",
               point_tof_sum_rel_l2=_rel(o_tofsum, s_tofsum),
               ones_bp_rel_l2=_rel(P.adjoint_numpy(np.ones(g.shape, np.float32)),
                                   read_image(work / "stir_bp3d.hv").array),
               tof_data_bp_rel_l2=_rel(P.adjoint_numpy(s_fw.array), read_image(work / "stir_bpfw3d.hv").array),
               stir_fwd_s=ts["fwd"], stir_bwd_s=ts["bwd"], ours_fwd_s_incl_setup=t_ours,
               bytes_stir_outputs=sum(f.stat().st_size for f in work.glob("stir_*3d.*")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch/numba CPU threads (default: torch's)")
    ap.add_argument("--stir-bin", default=None, help="bin folder of a STIR install: also time STIR's TOF ray "
                    "tracer and compare with a 3-D TOF case made by it (see the module docstring)")
    ap.add_argument("--stir-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for STIR (default: --threads, else STIR's own default)")
    ap.add_argument("--work", default=None, help="folder for STIR's files (default: a temporary folder)")
    ap.add_argument("--skip-vision", action="store_true", help="leave out the Vision 600 8-ring geometry")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    d = Path(args.shared) / "stir-reference" / "d690_tof_2d"
    if (d / "case.json").is_file():
        from sirf_ddip.io import read_image, read_projdata
        from sirf_ddip.physics.model import EngineLogLikelihood
        from sirf_ddip.recon.osem import OSEMReconstructor
        fw = read_projdata(d / "forward.hs")
        ph = read_image(d / "phantom.hv")
        r = bench("d690_tof_2d", fw.geometry, ph.grid, args.repeats, args.device)
        P = Projector(fw.geometry, ph.grid, device=args.device)
        yv = P.forward_numpy(ph.array)
        r["forward_rel_l2_vs_stir"] = float(np.linalg.norm(yv - fw.array) / np.linalg.norm(fw.array))
        b = P.adjoint_numpy(np.ones(fw.geometry.shape, np.float32))
        ref = read_image(d / "ones_bp.hv").array
        r["ones_bp_rel_l2_vs_stir"] = float(np.linalg.norm(b - ref) / np.linalg.norm(ref))
        info = json.loads((d / "case.json").read_text())
        ds = EngineLogLikelihood.from_files(d / "prompts.hs", d / "mult_factors.hs", d / "additive_term.hs",
                                            image_template=d / "init.hv", device=args.device)
        t0 = time.perf_counter()
        rec = OSEMReconstructor(ds, num_subsets=info["subsets"], num_iterations=2)
        rec.reconstruct(read_image(d / "init.hv"))
        r["osem_2it8ss_s"] = time.perf_counter() - t0
        r["stir_osem_2it8ss_s_recorded"] = info.get("osem_wall_s", {}).get("2")
        rows.append(r)
    if args.stir_bin:
        stir_bin = Path(args.stir_bin)
        for exe in ("forward_project", "back_project"):
            if not (stir_bin / exe).is_file():
                raise SystemExit(f"benchmarks/tof.py: --stir-bin {stir_bin}: no {exe} there")
        threads = args.stir_threads or args.threads
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            if rows:  # d690_tof_2d
                rows.append(stir_d690_timing(stir_bin, d, work, args.repeats, threads, rows[0]))
            rows.append(stir_3d_tof(stir_bin, work, threads, args.device))
            rows.append(stir_3d_tof(stir_bin, work, threads, args.device, planes=5))
    if not args.skip_vision:
        # a 3-D TOF geometry: Vision 600 (214 ps), 8 rings, span 1, 33 TOF bins (Siemens' TOF mashing 8)
        sc = get_scanner("Siemens Vision 600").with_rings(8)
        g = SinogramGeometry(sc, span=1, max_ring_diff=7, view_mashing=2, num_tangential=201, tof_mash_factor=8)
        rows.append(bench("vision600_8rings_33tof", g, g.default_image_grid(xy=128), args.repeats, args.device))
    for r in rows:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
