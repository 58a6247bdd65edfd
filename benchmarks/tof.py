#!/usr/bin/env python
"""Benchmark the TOF projector against the non-TOF one (and STIR's recorded timing where the case has it).

Per geometry it prints the set-up time, the forward and back projection times (median of ``--repeats``) of the
TOF projector and of the non-TOF projector on the same matrix, the time per TOF bin, and the TOF/non-TOF ratio.
On ``d690_tof_2d`` it also prints the agreement with STIR 6.4 (forward, back projection of ones) and our OSEM
wall time next to STIR's OSMAPOSL one recorded in ``case.json`` (same machine class, other load: indicative).

Example::

    python benchmarks/tof.py --shared ../shared --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch/numba CPU threads (default: torch's)")
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
    # a 3-D TOF geometry: Vision 600 (214 ps), 8 rings, span 1, 33 TOF bins (Siemens' TOF mashing 8)
    sc = get_scanner("Siemens Vision 600").with_rings(8)
    g = SinogramGeometry(sc, span=1, max_ring_diff=7, view_mashing=2, num_tangential=201, tof_mash_factor=8)
    rows.append(bench("vision600_8rings_33tof", g, g.default_image_grid(xy=128), args.repeats, args.device))
    for r in rows:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
