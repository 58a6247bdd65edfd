#!/usr/bin/env python
"""Benchmark the built-in projector on the STIR reference geometries.

Prints, per case and device: matrix build (set-up) time, forward / back projection time per call (median of
``--repeats``), peak memory (process RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and the agreement
with STIR's own forward projection (``forward.hs``) and back projection of ones (``ones_bp.hv``).

Example::

    python benchmarks/projector.py --case all --device auto --shared ../shared
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sirf_ddip.geometry import ImageGrid, SinogramGeometry  # noqa: E402
from sirf_ddip.io.header import InterfileHeader  # noqa: E402
from sirf_ddip.io.sinogram_header import geometry_from_header  # noqa: E402
from sirf_ddip.physics.projector import Projector  # noqa: E402
from sirf_ddip.utils.device import resolve_device  # noqa: E402

CASES = ("mmr_2d", "mmr_3d6")


def read_image(path: Path):
    h = InterfileHeader.read(path)
    shape = [h.get_int(f"matrix size [{k}]", required=True) for k in (3, 2, 1)]
    vox = [h.get_float(f"scaling factor (mm/pixel) [{k}]", required=True) for k in (3, 2, 1)]
    org = [h.get_float(f"first pixel offset (mm) [{k}]", 0.0) for k in (3, 2, 1)]
    return np.fromfile(h.data_file(), "<f4").reshape(shape), ImageGrid(shape, vox, org)


def read_sino(path: Path, geom: SinogramGeometry) -> np.ndarray:
    h = InterfileHeader.read(path)
    raw = np.fromfile(h.data_file(), "<f4")
    out = np.empty(geom.shape, np.float32)
    pos = 0
    for sg in geom.segments:
        n = sg.num_axial * geom.num_views * geom.num_tangential
        blk = raw[pos:pos + n]
        if geom.storage == "view":
            blk = blk.reshape(geom.num_views, sg.num_axial, geom.num_tangential).transpose(1, 0, 2)
        else:
            blk = blk.reshape(sg.num_axial, geom.num_views, geom.num_tangential)
        out[geom.segment_slice(sg.number)] = blk
        pos += n
    return out


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def run_case(case: str, shared: Path, dev: torch.device, repeats: int, threads: int | None,
             kernel: str = "auto") -> dict:
    d = shared / "stir-reference" / case
    geom = geometry_from_header(InterfileHeader.read(d / "forward.hs"))
    x, grid = read_image(d / "phantom.hv")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    P = Projector(geom, grid, device=dev, cache=False, cpu_threads=threads, kernel=kernel, disk_cache=False)
    t0 = time.perf_counter()
    P.set_up()
    setup = time.perf_counter() - t0
    xt = torch.as_tensor(x, device=dev)
    y = P.forward(xt)
    _sync(dev)
    tf, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = P.forward(xt)
        _sync(dev)
        tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = P.adjoint(y)
        _sync(dev)
        tb.append(time.perf_counter() - t0)
    ref = read_sino(d / "forward.hs", geom)
    yn = y.cpu().numpy()
    bp_ref, _ = read_image(d / "ones_bp.hv")
    bp = P.adjoint(torch.ones(geom.shape, device=dev)).cpu().numpy()
    return dict(case=case, device=str(dev), nnz=P.nnz(), setup_s=setup, fwd_s=statistics.median(tf),
                back_s=statistics.median(tb), peak_mb=_peak_mb(dev),
                fwd_rel_l2=float(np.linalg.norm(yn - ref) / np.linalg.norm(ref)),
                bp_rel_l2=float(np.linalg.norm(bp - bp_ref) / np.linalg.norm(bp_ref)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="all", choices=CASES + ("all",))
    ap.add_argument("--device", default="all",
                    help="'cpu', 'cuda', 'auto' (CUDA if available) or 'all' (CPU and, if present, CUDA)")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared/ folder (default ../shared)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads during projections (0: torch's count)")
    ap.add_argument("--kernel", default="auto", help="projector kernel: auto (numba on CPU), numba, torch")
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    if not (shared / "stir-reference").is_dir():
        ap.error(f"{shared / 'stir-reference'} not found (use --shared)")
    if args.device == "all":
        devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devs = [resolve_device(args.device)]
    cases = CASES if args.case == "all" else (args.case,)
    threads = None if args.threads == 0 else args.threads
    print(f"torch {torch.__version__}, CPU threads available {torch.get_num_threads()}, "
          f"CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    hdr = (f"{'case':8s} {'device':6s} {'nnz':>10s} {'setup s':>8s} {'fwd s':>8s} {'back s':>8s} {'peak MB':>8s} "
           f"{'fwd relL2':>10s} {'bp relL2':>9s}")
    print(hdr)
    for dev in devs:
        for case in cases:
            r = run_case(case, shared, dev, args.repeats, threads, args.kernel)
            print(f"{r['case']:8s} {dev.type:6s} {r['nnz']:10d} {r['setup_s']:8.2f} {r['fwd_s']:8.3f} "
                  f"{r['back_s']:8.3f} {r['peak_mb']:8.0f} {r['fwd_rel_l2']:10.2e} {r['bp_rel_l2']:9.2e}",
                  flush=True)
    print("STIR 6.5 ProjMatrixByBinUsingRayTracing (3 tangential LORs) on this 2-core machine, mmr_3d6: "
          "1.29 s forward, 0.67 s back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
