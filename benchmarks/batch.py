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
            "  ddip: {method: ddip, seed: 0, set: {num_steps: 3, checkpoint_every: 1}}\n",
    "quick": "  osem: {method: osem, iterations: 3, subsets: 7}\n"
             "  map: {method: map_rdp, beta: 0.1, iterations: 15, init: osem}\n"
             "  ddip: {method: ddip, seed: 0, set: {num_steps: 6, t_start: 100, num_em: 2, finetune_slabs: 2, "
             "checkpoint_every: 2}}\n",
}


def _manifest(folder: Path, studies: list[Path], jobs: str) -> Path:
    lines = ["studies:"] + [f"  - {{name: {s.name}, data: {s}}}" for s in studies] + ["jobs:", jobs]
    folder.mkdir(parents=True, exist_ok=True)
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


def _one_process(task, work: Path, threads: int | None = None) -> dict:
    """Run one task in a fresh Python process (what a single command costs: start-up, imports, set-up), with
    torch on all cores or, with ``threads``, on that many (as a batch worker: the same environment)."""
    import json
    import pickle
    import subprocess
    import sys

    from sirf_ddip.batch.cluster import worker_env

    p = work / "task.pkl"
    p.write_bytes(pickle.dumps(task))
    code = ("import pickle, json, sys; from sirf_ddip.batch.execute import run_task; "
            f"r = run_task(pickle.load(open({str(p)!r}, 'rb'))); print(json.dumps(r, default=str))")
    env = {**os.environ, **(worker_env(threads) if threads else {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kill_hook(label: str, kills: list):
    """``on_change`` hook: once ``label`` runs, SIGKILL its worker process when its first DDIP checkpoint is
    written (the worker dies mid-job; the batch must resubmit the job, which resumes from the checkpoint)."""
    import signal
    import threading

    from sirf_ddip.batch.execute import CHECKPOINT_DIR
    from sirf_ddip.recon.ddip import CHECKPOINT_FILE

    def hook(r):
        if r.task.label != label or r.status != "running" or kills:
            return
        ck, pid = r.task.folder / CHECKPOINT_DIR / CHECKPOINT_FILE, r.pid

        def kill():
            t0 = time.time()
            while not ck.is_file() and time.time() - t0 < 1800:
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            kills.append(time.time() - t0)
        kills.append(pid)
        threading.Thread(target=kill, daemon=True).start()
    return hook


def _compare(recs, ref: Path) -> tuple[int, float, list[str]]:
    """``(images bit-identical to those under ref, largest |a - b| / max|b|, labels that differ)``."""
    import numpy as np

    from sirf_ddip.io import read_image

    same, worst, differ = 0, 0.0, []
    for r in recs:
        a = read_image(r.task.folder / "image.hv").array
        b = read_image(ref / r.task.study / r.task.job / "image.hv").array
        if a.shape == b.shape and np.array_equal(a, b):
            same += 1
        else:
            differ.append(r.task.label)
            worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)))
    return same, worst, differ


def batch_vs_sequential(work: Path, study: Path, n: int, size: str, baseline: str = "process",
                        kill: bool = False) -> None:
    import numpy as np
    import torch

    from sirf_ddip.batch.cluster import local_layout, machine_resources, start_cluster
    from sirf_ddip.batch.execute import run_task
    from sirf_ddip.batch.manifest import load_manifest
    from sirf_ddip.batch.plan import plan_tasks
    from sirf_ddip.batch.runner import run_batch

    studies = []
    for i in range(n):
        d = work / "data" / f"s{i + 1}"
        shutil.copytree(study, d)
        studies.append(d)
    m = load_manifest(_manifest(work, studies, JOBS[size]))
    cores, gpus, _ = machine_resources()
    torch.set_num_threads(cores)
    print(f"load before the sequential run: {_load()}", flush=True)
    t0 = time.perf_counter()
    seq = {}
    for t in plan_tasks(m, work / "seq"):
        r = _one_process(t, work) if baseline == "process" else run_task(t)
        seq[t.label] = r
        print(f"  sequential {t.label}: {r['status']} in {r['seconds']:.1f} s (load {_load()})", flush=True)
        if r["status"] != "done":
            print(f"sequential {t.label}: {r['message']}")
    t_seq = time.perf_counter() - t0
    print(f"sequential ({'one process per job, as single commands' if baseline == 'process' else 'all jobs in one process'}"
          f"): {len(seq)} jobs in {t_seq:.1f} s (torch {cores} threads; per method: "
          + ", ".join(f"{j} {np.mean([r['seconds'] for k, r in seq.items() if k.endswith('/' + j)]):.1f} s"
                      for j in ("osem", "map", "ddip")) + f"); load after: {_load()}", flush=True)
    t0 = time.perf_counter()
    handle = start_cluster()
    print(f"batch cluster: {handle.description}", flush=True)
    recs = run_batch(m, work / "batch", handle=handle, echo=lambda s: None)
    t_batch = time.perf_counter() - t0
    own = sum(r.seconds or 0.0 for r in recs)
    print(f"batch: {len(recs)} jobs in {t_batch:.1f} s including the cluster's start "
          f"({sum(r.status == 'done' for r in recs)} done; the jobs' own times sum to {own:.1f} s) -> "
          f"batch / sequential = {t_batch / t_seq:.2f}; load after: {_load()}", flush=True)
    same, worst, differ = _compare(recs, work / "seq")
    print(f"outputs: {same}/{len(recs)} images bit-identical to the sequential ones (torch {cores} threads)"
          + (f"; the others ({', '.join(differ)}) differ by at most {worst:.3g} of the image's maximum "
             f"(float32 sums in another order: the batch workers run 1 torch thread each)" if differ else ""),
          flush=True)
    if differ:
        # the same single commands with the workers' thread count: the batch must reproduce them bit for bit
        wt = local_layout(cores, gpus, None, machine_resources()[2])[0].threads
        t1 = {t.job: t for t in plan_tasks(m, work / "seq1") if t.study == studies[0].name}
        for t in t1.values():
            _one_process(t, work, threads=wt)
        same1 = sum(np.array_equal(_read(r.task.folder), _read(t1[r.task.job].folder)) for r in recs)
        print(f"outputs vs the single commands run with {wt} torch thread(s) as a worker has (study "
              f"{studies[0].name}'s {len(t1)} jobs; the studies are copies, so every batch image of a job is "
              f"compared with that job's): {same1}/{len(recs)} bit-identical", flush=True)
    t0 = time.perf_counter()
    again = run_batch(m, work / "batch", handle=handle, echo=lambda s: None)
    print(f"second batch run: {time.perf_counter() - t0:.2f} s, "
          f"{sum(r.status == 'skipped' for r in again)}/{len(again)} skipped", flush=True)
    if kill:
        km = load_manifest(_manifest(work / "kill_manifest", studies[:2], JOBS[size]))
        kills: list = []
        t0 = time.perf_counter()
        lines: list[str] = []
        krecs = run_batch(km, work / "batch_kill", handle=handle, echo=lines.append,
                          on_change=_kill_hook(f"{studies[0].name}/ddip", kills))
        kr = next(r for r in krecs if r.task.label == f"{studies[0].name}/ddip")
        same_k, worst_k, differ_k = _compare(krecs, work / "batch")
        print(f"worker killed during {kr.task.label} ({'%.0f s after it started' % kills[1] if len(kills) > 1 else 'no kill'}): "
              f"batch of {len(krecs)} jobs {'completed' if all(r.status == 'done' for r in krecs) else 'FAILED'} "
              f"in {time.perf_counter() - t0:.1f} s, {kr.task.label} took {kr.attempts} attempt(s)"
              f"{', resumed from its checkpoint' if any('resumed from its checkpoint' in ln for ln in lines) else ''}; "
              f"{same_k}/{len(krecs)} images bit-identical to the uninterrupted batch's"
              + (f" (others differ by {worst_k:.3g}: {', '.join(differ_k)})" if differ_k else ""), flush=True)
    handle.close()


def _read(folder: Path):
    from sirf_ddip.io import read_image

    return read_image(folder / "image.hv").array


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "quick"), default="tiny")
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--overhead-jobs", type=int, default=12)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--skip", choices=("overhead", "compare"), default=None)
    ap.add_argument("--baseline", choices=("process", "inprocess"), default="process",
                    help="sequential jobs each in a new process (as single commands) or all in this one")
    ap.add_argument("--kill", action="store_true",
                    help="also run 2 of the studies again with the worker of a DDIP job SIGKILLed at its first "
                         "checkpoint: the batch must complete with every image equal to the uninterrupted one")
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
            batch_vs_sequential(work, study, args.studies, args.size, args.baseline, args.kill)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
