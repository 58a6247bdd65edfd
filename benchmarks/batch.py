"""``sirf-ddip batch``: scheduling overhead per job, and a batch against the same jobs run one after another.

1. *Overhead*: ``--overhead-jobs`` short jobs (OSEM with 0 iterations: read the data, write the image) on a
   one-worker LocalCluster; overhead per job = (batch wall time after the cluster is up − Σ the jobs' own
   times) / jobs: planning, submission, result transfer, polling, bookkeeping (goal: < 1 s against jobs of
   minutes).
2. *Batch vs sequential*: ``--studies`` copies of one simulated study (``--size tiny``: 2 mMR rings, 3 × 12 × 12;
   ``quick``: configs/study-quick.yaml's 4-ring slab, 7 × 128 × 128), 3 methods each (OSEM, MAP-RDP from the
   OSEM image, DDIP with the shipped prior); sequential = every job one after another, each in a new process
   as a single command runs (``--baseline inprocess``: all in this process), torch on all cores; batch = ``run_batch`` on the default LocalCluster (sized to the
   machine); then the outputs are compared and a second batch run is timed (it should do no work).

Shared machines vary: the load average is printed before and after; compare figures within one run only::

    nice -n 10 python benchmarks/batch.py --size tiny --studies 6
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

TINY = {"scanner": "Siemens mMR", "num_rings": 2, "max_ring_diff": 1, "view_mashing": 21, "num_tangential": 24,
        "image_xy": 12, "write_nifti": False}
QUICK = {"scanner": "Siemens mMR", "num_rings": 4, "max_ring_diff": 3, "span": 1, "view_mashing": 2,
         "image_xy": 128, "write_nifti": False}
JOBS = {
    "tiny": "  osem: {method: osem, iterations: 2, subsets: 3}\n"
            "  map: {method: map_rdp, beta: 0.05, iterations: 5, init: osem}\n"
            "  ddip: {method: ddip, seed: 0, set: {num_steps: 3}}\n",
    "quick": "  osem: {method: osem, iterations: 3, subsets: 7}\n"
             "  map: {method: map_rdp, beta: 0.1, iterations: 15, init: osem}\n"
             "  ddip: {method: ddip, seed: 0, set: {num_steps: 6, t_start: 100, num_em: 2, finetune_slabs: 2}}\n",
}


def _manifest(folder: Path, studies: list[Path], jobs: str) -> Path:
    lines = ["studies:"] + [f"  - {{name: {s.name}, data: {s}}}" for s in studies] + ["jobs:", jobs]
    p = folder / "manifest.yaml"
    p.write_text("\n".join(lines))
    return p


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def overhead(work: Path, study: Path, n: int) -> None:
    from sirf_ddip.batch.cluster import _local
    from sirf_ddip.batch.manifest import load_manifest
    from sirf_ddip.batch.runner import run_batch

    studies = []
    for i in range(n):
        d = work / "ov_data" / f"o{i}"
        shutil.copytree(study, d)
        studies.append(d)
    m = load_manifest(_manifest(work, studies, "  osem: {method: osem, iterations: 0, subsets: 1}\n"))
    t0 = time.perf_counter()
    h = _local(1)
    h.client.wait_for_workers(1)
    t1 = time.perf_counter()
    recs = run_batch(m, work / "ov_out", handle=h, echo=lambda s: None)
    t2 = time.perf_counter()
    h.close()
    own = sum(r.seconds or 0.0 for r in recs)
    print(f"overhead: {n} jobs on 1 worker: cluster start {t1 - t0:.1f} s, batch {t2 - t1:.2f} s, jobs' own "
          f"{own:.2f} s -> scheduling overhead {(t2 - t1 - own) / n:.3f} s per job "
          f"(all done: {all(r.status == 'done' for r in recs)})")


def _one_process(task, work: Path) -> dict:
    """Run one task in a fresh Python process (what a single command costs: start-up, imports, set-up)."""
    import pickle
    import subprocess
    import sys

    p = work / "task.pkl"
    p.write_bytes(pickle.dumps(task))
    code = ("import pickle, json, sys; from sirf_ddip.batch.execute import run_task; "
            f"r = run_task(pickle.load(open({str(p)!r}, 'rb'))); print(json.dumps(r, default=str))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def batch_vs_sequential(work: Path, study: Path, n: int, size: str, baseline: str = "process") -> None:
    import numpy as np
    import torch

    from sirf_ddip.batch.cluster import machine_resources, start_cluster
    from sirf_ddip.batch.execute import run_task
    from sirf_ddip.batch.manifest import load_manifest
    from sirf_ddip.batch.plan import plan_tasks
    from sirf_ddip.batch.runner import run_batch
    from sirf_ddip.io import read_image

    studies = []
    for i in range(n):
        d = work / "data" / f"s{i + 1}"
        shutil.copytree(study, d)
        studies.append(d)
    m = load_manifest(_manifest(work, studies, JOBS[size]))
    cores, gpus, _ = machine_resources()
    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    seq = {}
    for t in plan_tasks(m, work / "seq"):
        r = _one_process(t, work) if baseline == "process" else run_task(t)
        seq[t.label] = r
        if r["status"] != "done":
            print(f"sequential {t.label}: {r['message']}")
    t_seq = time.perf_counter() - t0
    print(f"sequential ({'one process per job, as single commands' if baseline == 'process' else 'all jobs in one process'}"
          f"): {len(seq)} jobs in {t_seq:.1f} s (torch {cores} threads; per method: "
          + ", ".join(f"{j} {np.mean([r['seconds'] for k, r in seq.items() if k.endswith('/' + j)]):.1f} s"
                      for j in ("osem", "map", "ddip")) + ")")
    t0 = time.perf_counter()
    recs = run_batch(m, work / "batch", start=start_cluster, echo=lambda s: None)
    t_batch = time.perf_counter() - t0
    print(f"batch: {len(recs)} jobs in {t_batch:.1f} s including the cluster's start "
          f"({sum(r.status == 'done' for r in recs)} done) -> batch / sequential = {t_batch / t_seq:.2f}")
    worst = 0.0
    for r in recs:
        a = read_image(r.task.folder / "image.hv").array
        b = read_image(work / "seq" / r.task.study / r.task.job / "image.hv").array
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)))
    print(f"outputs: largest |batch - sequential| / max = {worst:.3g} (torch threads differ: 1 per worker vs "
          f"{cores})")
    t0 = time.perf_counter()
    again = run_batch(m, work / "batch", start=start_cluster, echo=lambda s: None)
    print(f"second batch run: {time.perf_counter() - t0:.2f} s, "
          f"{sum(r.status == 'skipped' for r in again)}/{len(again)} skipped")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "quick"), default="tiny")
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--overhead-jobs", type=int, default=12)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--skip", choices=("overhead", "compare"), default=None)
    ap.add_argument("--baseline", choices=("process", "inprocess"), default="process",
                    help="sequential jobs each in a new process (as single commands) or all in this one")
    args = ap.parse_args(argv)
    os.environ.setdefault("SIRF_DDIP_PROGRESS", "0")
    from sirf_ddip.batch.cluster import machine_resources
    from sirf_ddip.sim.simulate import simulate_study

    cores, gpus, mem = machine_resources()
    print(f"machine: {cores} cores, {gpus} GPUs, {mem / 2**30 if mem else float('nan'):.0f} GiB; load {_load()}")
    work = Path(args.work or tempfile.mkdtemp(prefix="sirf_ddip_batch_bench_")).resolve()
    try:
        study = work / "study"
        if not (study / "prompts.hs").is_file():
            t0 = time.perf_counter()
            simulate_study({**(TINY if args.size == "tiny" else QUICK), "tracer": "fdg", "dose_fraction": 0.1,
                            "seed": 0}, study, overwrite=True)
            print(f"simulated the {args.size} study in {time.perf_counter() - t0:.1f} s")
        if args.skip != "overhead":
            overhead(work, study, args.overhead_jobs)
        if args.skip != "compare":
            batch_vs_sequential(work, study, args.studies, args.size, args.baseline)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
