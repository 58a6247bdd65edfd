"""``sirf-ddip batch``: manifest contract and errors, planning, cluster sizing, the SLURM job script, and whole
batches on a LocalCluster of 2 workers (a broken study among good ones, a re-run that skips everything, a worker
killed during a DDIP job).

Real pieces throughout: a tiny simulated study (2 mMR rings, 6 views, a 3 x 12 x 12 image), the single commands'
code (``osem``, ``recon``), a tiny prior saved as a weights file. Independent checks: each batch output equals what
the single command writes for the same inputs (run here, in this process, bit for bit); a broken study fails with
the very line the single command prints; a DDIP job whose worker was killed ends equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.batch.cluster import local_layout
from sirf_ddip.batch.manifest import load_manifest
from sirf_ddip.batch.plan import plan_tasks
from sirf_ddip.cli import main
from sirf_ddip.errors import ConfigError
from sirf_ddip.io import read_image

SIM = {"scanner": "Siemens mMR", "num_rings": 2, "max_ring_diff": 1, "view_mashing": 21, "num_tangential": 24,
       "image_xy": 12, "write_nifti": False, "tracer": "fdg", "dose_fraction": 0.5, "seed": 1}
DDIP_SET = {"num_steps": 3, "t_start": 30, "n_init": 4, "num_em": 2, "finetune_slabs": 1, "checkpoint_every": 1}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Three study folders: s1 (simulated), s2 (a copy), bad (its prompts header names no data file)."""
    from sirf_ddip.sim.simulate import simulate_study

    d = tmp_path_factory.mktemp("batch_studies")
    simulate_study(dict(SIM), d / "s1")
    shutil.copytree(d / "s1", d / "s2")
    shutil.copytree(d / "s1", d / "bad")
    hs = d / "bad" / "prompts.hs"
    hs.write_text(hs.read_text().replace("name of data file := prompts.s", "name of data file := gone.s"))
    return d


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny MR-conditioned prior on the study's in-plane grid, as a weights file."""
    from test_ddip_support import tiny_bundle

    from sirf_ddip.prior.weights import save_prior

    b = tiny_bundle(True)
    p = tmp_path_factory.mktemp("batch_weights") / "tiny.safetensors"
    save_prior(p, b.network, b.schedule, b.pet_scaling, b.mr_scaling, dtype="float32",
               training={"data": {"grid": {"shape": [3, 16, 16], "voxel_size": [2.03125, 2.08626, 2.08626]}}})
    return p


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 workers x 1 torch thread (the batch's own local cluster, sized by hand)."""
    pytest.importorskip("distributed")
    from sirf_ddip.batch.cluster import _local

    h = _local(2)
    h.client.wait_for_workers(2, timeout=120)
    yield h
    h.close()


def _manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "manifest.yaml"
    p.write_text(text)
    return p


def _lines():
    out: list[str] = []
    return out, out.append


# ------------------------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("text, key", [
    ("jobs: {o: {method: osem, iterations: 1, subsets: 1}}", "'studies'"),
    ("studies: [{name: a, data: x}]\njobs: {o: {method: osem, iterations: 1}}", "'jobs.o.subsets'"),
    ("studies: [{name: a, data: x}]\njobs: {o: {method: osem, iterations: 1, subsets: 1, iteratons: 2}}",
     "'jobs.o.iteratons'"),
    ("studies: [{name: a, data: x}]\njobs: {o: {method: fbp}}", "'jobs.o.method'"),
    ("studies: [{name: a, data: x}]\njobs: {d: {method: ddip, seed: zero}}", "'jobs.d.seed'"),
    ("studies: [{name: a, data: x}, {name: a, data: y}]\njobs: {r: {method: report}}", "'studies'"),
    ("studies: [{name: a, data: x}]\njobs: {m: {method: map_rdp, beta: 1, iterations: 1, init: nope}}",
     "'jobs.m.init'"),
    ("studies: [{name: a, data: x}]\njobs: {r: {method: report}}\ncluster: {kind: slurm, cpus: 4}", "'cluster.cpus'"),
])
def test_bad_manifest_is_a_named_one_line_error(tmp_path, capsys, text, key):
    p = _manifest(tmp_path, text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as ei:
        load_manifest(p)
    assert str(p) in str(ei.value)
    assert main(["batch", str(p), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sirf-ddip batch: error: ") and key in err[0]


def test_manifest_contract_paths_and_set_overrides(tmp_path):
    p = _manifest(tmp_path / "m", "studies:\n  - {name: s1, data: ../data/s1}\n  - {name: s2, data: /abs/s2}\n"
                                  "jobs:\n  osem: {method: osem, iterations: 2, subsets: 7}\n"
                                  "  ddip: {method: ddip, seed: 0, set: {num_steps: 3, run: {num_threads: 2}}}\n")
    m = load_manifest(p)
    assert [s.data for s in m.studies] == [(tmp_path / "data" / "s1").resolve(), Path("/abs/s2")]
    from sirf_ddip.batch.execute import ddip_argv

    t = next(t for t in plan_tasks(m, tmp_path / "out") if t.job == "ddip")
    argv = [str(a) for a in ddip_argv(t, resume=False)]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["num_steps=3", "run.num_threads=2"] and argv[argv.index("--seed") + 1] == "0"
    assert argv[argv.index("--out") + 1] == str((tmp_path / "out" / "s1" / "ddip" / "image.hv").resolve())


def test_plan_orders_dependencies_and_fingerprints_follow_inputs(tmp_path):
    data = tmp_path / "s1"
    data.mkdir()
    for f in ("prompts.hs", "mult_factors.hs", "additive_term.hs", "mr.hv"):
        (data / f).write_text("x")
    p = _manifest(tmp_path, "studies: [{name: s1, data: s1}]\njobs:\n  rep: {method: report}\n"
                            "  map: {method: map_rdp, beta: 0.1, iterations: 2, init: osem}\n"
                            "  osem: {method: osem, iterations: 1, subsets: 1}\n")
    tasks = plan_tasks(load_manifest(p), tmp_path / "out")
    assert [t.job for t in tasks] == ["osem", "map", "rep"]
    assert tasks[1].deps == ["osem"] and sorted(tasks[2].deps) == ["map", "osem"]
    assert tasks[1].init_image == tasks[0].folder / "image.hv"
    before = [t.fingerprint for t in tasks]
    time.sleep(0.01)
    (data / "prompts.hs").write_text("xy")          # an input changes: its job and everything downstream rerun
    after = [t.fingerprint for t in plan_tasks(load_manifest(p), tmp_path / "out")]
    assert all(a != b for a, b in zip(after, before))
    (data / "truth.hv").write_text("t")              # only the report reads the truth
    again = [t.fingerprint for t in plan_tasks(load_manifest(p), tmp_path / "out")]
    assert again[:2] == after[:2] and again[2] != after[2]
    (tmp_path / "w.safetensors").write_text("w")
    (tmp_path / "w.card.json").write_text("{}")
    p2 = _manifest(tmp_path, p.read_text() + "  ddip: {method: ddip, weights: w.safetensors}\n")
    d1 = next(t for t in plan_tasks(load_manifest(p2), tmp_path / "out") if t.job == "ddip").fingerprint
    time.sleep(0.01)
    (tmp_path / "w.safetensors").write_text("w2")  # another prior: the DDIP job reruns
    d2 = next(t for t in plan_tasks(load_manifest(p2), tmp_path / "out") if t.job == "ddip").fingerprint
    assert d1 != d2


def test_summary_line_counts_states_and_spreads_the_mean_times_left_over_the_workers(tmp_path):
    from sirf_ddip.batch.plan import Task
    from sirf_ddip.batch.runner import JobRecord, summary_line

    def rec(job, method, status, seconds=None, started=None):
        t = Task("s", job, method, {}, tmp_path, tmp_path, tmp_path / job)
        return JobRecord(t, status=status, seconds=seconds, started_at=started)

    now = 1000.0
    recs = [rec("a", "osem", "done", 10.0), rec("b", "osem", "done", 30.0), rec("c", "osem", "running", started=992.0),
            rec("d", "osem", "queued"), rec("e", "osem", "failed", 1.0), rec("f", "osem", "skipped", 5.0)]
    # left: (20 - 8) running + 20 queued = 32 s of work on 2 workers
    assert summary_line(recs, 2, now) == "[batch] done 2, skipped 1, running 1, failed 1, left 1; ETA 0:00:16"
    recs.append(rec("g", "ddip", "pending"))   # no DDIP time yet: it counts the mean of all (20 s), a lower bound
    assert summary_line(recs, 2, now) == "[batch] done 2, skipped 1, running 1, failed 1, left 2; ETA >= 0:00:26"
    assert summary_line(recs[:2], 2, now) == "[batch] done 2, skipped 0, running 0, failed 0, left 0"
    assert summary_line([rec("h", "osem", "queued")], 2, now).endswith("left 1; ETA ?")


# ------------------------------------------------------------------------------------------- clusters
def test_local_layout_never_oversubscribes_cores_and_gives_one_gpu_per_worker():
    two = local_layout(2)
    assert [w.threads for w in two] == [1, 1]
    big = local_layout(16, memory=64 * 2**30)
    assert len(big) * big[0].threads == 16 and big[0].threads == 4
    assert len(local_layout(16, memory=8 * 2**30)) == 2          # memory caps the workers (4 GiB each)
    assert [w.threads for w in local_layout(8, workers=3)] == [2, 2, 2]
    gpu = local_layout(16, gpus=2)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in gpu] == ["0", "1"] and {w.threads for w in gpu} == {8}
    assert all(w.env["SIRF_DDIP_TORCH_THREADS"] == w.env["OMP_NUM_THREADS"] == str(w.threads) for w in big + gpu)
    assert "CUDA_VISIBLE_DEVICES" not in two[0].env


def test_slurm_cluster_job_script_from_the_manifest_block(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from sirf_ddip.batch.cluster import jobqueue_cluster

    p = _manifest(tmp_path, "studies: [{name: a, data: x}]\njobs: {r: {method: report}}\n"
                            "cluster: {kind: slurm, queue: gpu, account: lab, cores: 8, memory: 32GB, "
                            "walltime: '02:00:00', gpus: 1, job_extra_directives: ['--qos=normal']}\n")
    c = jobqueue_cluster("slurm", load_manifest(p).cluster)
    try:
        s = c.job_script()
    finally:
        c.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --cpus-per-task=8", "#SBATCH -t 02:00:00",
                 "#SBATCH --qos=normal", "#SBATCH --gres=gpu:1", "export SIRF_DDIP_TORCH_THREADS=8",
                 "export OMP_NUM_THREADS=8"):
        assert line in s, line
    assert "--resources job=1" in s and "#SBATCH --mem=" in s
    with pytest.raises(ConfigError, match="'memory'"):
        jobqueue_cluster("slurm", {"cores": 4})
    with pytest.raises(ConfigError, match="'processes'"):
        jobqueue_cluster("pbs", {"cores": 4, "processes": 3, "memory": "8GB"})


def test_a_refused_job_submission_is_a_one_line_error_not_a_batch_waiting_forever(tmp_path, capsys, monkeypatch):
    """``--cluster slurm`` where ``sbatch`` refuses the worker job (a stand-in sbatch on PATH that says what real
    sbatch says for a bad partition): exit 2 at once with sbatch's own words, no job left behind."""
    pytest.importorskip("dask_jobqueue")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid partition "
                                 "name specified' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    m = _manifest(tmp_path, "studies: [{name: a, data: a}]\njobs: {osem: {method: osem, iterations: 1, subsets: 1}}\n")
    t0 = time.perf_counter()
    assert main(["batch", str(m), "--out", str(tmp_path / "out"), "--cluster", "slurm", "--queue", "nope",
                 "--cores", "1", "--memory", "1GB"]) == 2
    assert time.perf_counter() - t0 < 120
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("sirf-ddip batch: error: cluster (slurm): submitting its worker jobs failed: sbatch: error: "
                       "Batch job submission failed: Invalid partition name specified")
    assert not (tmp_path / "out" / "batch.json").exists()


def _slurm_up() -> bool:
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return r.returncode == 0 and "UP" in r.stdout


@pytest.mark.slow
def test_a_batch_through_a_real_slurm_cluster_writes_what_the_single_command_writes(studies, tmp_path):
    """Where a SLURM controller answers (``scontrol ping``; see docs/BATCH_SLURM.md for a one-node one): 2 studies
    through ``--cluster slurm`` (dask-jobqueue's SLURMCluster, 2 worker jobs), each OSEM image equal to the single
    command's, the worker jobs gone at the end; a re-run skips both without submitting anything."""
    pytest.importorskip("dask_jobqueue")
    if not _slurm_up():
        pytest.skip("no SLURM controller answers here (sbatch/scontrol absent or scontrol ping not UP)")
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    m = _manifest(tmp_path, f"studies:\n  - {{name: s1, data: {studies / 's1'}}}\n  - {{name: s2, data: {studies / 's2'}}}\n"
                            "jobs:\n  osem: {method: osem, iterations: 1, subsets: 3}\n"
                            f"cluster: {{kind: slurm, cores: 1, memory: 2GB, walltime: '00:15:00', jobs: 2, "
                            f"log_directory: {tmp_path / 'logs'}, job_script_prologue: ['export PYTHONPATH={root}']}}\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "sirf_ddip", "batch", str(m), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "[batch] slurm cluster: 2 job(s) x 1 worker(s)" in r.stderr
    jobs = json.loads((out / "batch.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["done", "done"]
    _osem_single(studies / "s1", out / "s1" / "osem" / "init.hv", tmp_path / "single" / "osem.hv")
    single = read_image(tmp_path / "single" / "osem.hv").array
    for s in ("s1", "s2"):
        assert np.array_equal(read_image(out / s / "osem" / "image.hv").array, single)
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0 and "slurm cluster" not in r2.stderr and r2.stderr.count("skipped (complete") == 2
    mine = subprocess.run(["squeue", "-h", "-n", "dask-worker", "-o", "%i"], capture_output=True, text=True).stdout
    assert not mine.strip()          # the worker jobs were cancelled when the batch closed its cluster


# ------------------------------------------------------------------------------------------- whole batches
def _osem_single(study: Path, init: Path, out: Path) -> None:
    assert main(["osem", "--prompts", str(study / "prompts.hs"), "--mult", str(study / "mult_factors.hs"),
                 "--additive", str(study / "additive_term.hs"), "--init", str(init), "--iterations", "1",
                 "--subsets", "3", "--out", str(out)]) == 0


@pytest.mark.slow
def test_three_studies_one_broken_then_a_rerun_skips_everything(studies, cluster, tmp_path, capsys):
    from sirf_ddip.batch.runner import run_batch

    m = _manifest(tmp_path, f"studies:\n  - {{name: s1, data: {studies / 's1'}}}\n"
                            f"  - {{name: bad, data: {studies / 'bad'}}}\n  - {{name: s2, data: {studies / 's2'}}}\n"
                            "jobs:\n  osem: {method: osem, iterations: 1, subsets: 3}\n"
                            "  map: {method: map_rdp, beta: 0.05, iterations: 2, init: osem}\n")
    out = tmp_path / "out"
    lines, echo = _lines()
    recs = run_batch(load_manifest(m), out, handle=cluster, echo=echo)
    status = {(r.task.study, r.task.job): r.status for r in recs}
    assert status == {("s1", "osem"): "done", ("s1", "map"): "done", ("s2", "osem"): "done",
                      ("s2", "map"): "done", ("bad", "osem"): "failed", ("bad", "map"): "failed"}
    # the broken study's message is the single command's own line
    capsys.readouterr()
    assert main(["osem", "--prompts", str(studies / "bad" / "prompts.hs"), "--mult",
                 str(studies / "bad" / "mult_factors.hs"), "--additive", str(studies / "bad" / "additive_term.hs"),
                 "--init", str(out / "s1" / "osem" / "init.hv"), "--iterations", "1", "--subsets", "3",
                 "--out", str(tmp_path / "single_bad.hv")]) == 2
    expected = capsys.readouterr().err.strip().splitlines()[-1]
    doc = json.loads((out / "batch.json").read_text())
    rows = {(j["study"], j["job"]): j for j in doc["jobs"]}
    assert rows[("bad", "osem")]["message"] == expected and "gone.s" in expected
    assert rows[("bad", "map")]["message"] == "not run: bad/osem failed"
    assert all(set(j) >= {"study", "job", "status", "message", "seconds"} for j in doc["jobs"])
    assert not (out / "bad" / "osem" / "image.hv").exists() and not (out / "bad" / "map").exists()
    assert not list(out.rglob("*.tmp*")) and not list(out.rglob(".*"))   # no temporaries left
    # outputs equal the single command's: same init (ones on the MR's grid), same image, bit for bit
    init = read_image(out / "s1" / "osem" / "init.hv")
    mr = read_image(studies / "s1" / "mr.hv")
    assert init.grid.matches(mr.grid) and np.all(init.array == 1)
    _osem_single(studies / "s1", out / "s1" / "osem" / "init.hv", tmp_path / "single" / "osem.hv")
    single = read_image(tmp_path / "single" / "osem.hv").array
    for s in ("s1", "s2"):
        assert np.array_equal(read_image(out / s / "osem" / "image.hv").array, single)
        rec = json.loads((out / s / "osem" / "image_run_record.json").read_text())
        assert rec["config"]["iterations"] == 1 and rec["config"]["subsets"] == 3
    assert rows[("s1", "osem")]["metrics"]["psnr"] == pytest.approx(rows[("s2", "osem")]["metrics"]["psnr"])
    html = (out / "batch.html").read_text()
    assert "gone.s" in html and "PSNR" in html and ">s2<" in html
    assert any("bad/osem: FAILED: sirf-ddip osem: error:" in ln for ln in lines)
    assert any(ln.startswith("[batch] done 4, skipped 0, running 0, failed 2, left 0") for ln in lines)
    # a re-run (the command, on the running scheduler) does no work: every complete job skipped, files
    # untouched; the broken study fails again: exit status 3
    stamp = {p: p.stat().st_mtime_ns for p in (out / "s1").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["batch", str(m), "--out", str(out), "--scheduler", cluster.client.scheduler.address]) == 3
    err = capsys.readouterr().err
    jobs2 = json.loads((out / "batch.json").read_text())["jobs"]
    assert [j["status"] for j in jobs2 if j["study"] != "bad"] == ["skipped"] * 4
    assert [j["status"] for j in jobs2 if j["study"] == "bad"] == ["failed"] * 2
    assert "s2/map: skipped" in err and "bad/osem: FAILED" in err
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "s1").rglob("*") if p.is_file()}
    # without the broken study every job is complete: exit status 0, and no cluster is started at all
    good = _manifest(tmp_path / "good", m.read_text().replace(f"  - {{name: bad, data: {studies / 'bad'}}}\n", ""))
    assert main(["batch", str(good), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped (complete, same inputs)") == 4 and "LocalCluster" not in err and "FAILED" not in err
    assert [j["status"] for j in json.loads((out / "batch.json").read_text())["jobs"]] == ["skipped"] * 4


def _single_ddip(study, folder, weights) -> np.ndarray:
    """The image of ``sirf-ddip recon`` on ``study`` with the batch's DDIP settings, uninterrupted, in this process."""
    args = ["recon", "--prompts", study / "prompts.hs", "--mult", study / "mult_factors.hs", "--additive",
            study / "additive_term.hs", "--mr", study / "mr.hv", "--out", folder / "image.hv", "--seed", 0,
            "--weights", weights, "--threads", 1]
    for k, v in DDIP_SET.items():
        args += ["--set", f"{k}={v}"]
    assert main([str(a) for a in args]) == 0
    return read_image(folder / "image.hv").array


def _watch_and_kill(out: Path, kills: list):
    """on_change hook: when s1/ddip runs, kill its worker process once its first checkpoint is written."""
    def hook(r):
        if r.task.label != "s1/ddip" or r.status != "running" or kills:
            return
        ck = r.task.folder / "image_checkpoint" / "ddip_checkpoint.pt"
        pid = r.pid

        def kill():
            t0 = time.time()
            while not ck.is_file() and time.time() - t0 < 300:
                time.sleep(0.05)
            (r.task.folder / ".image.hv.half-written").write_bytes(b"x")   # as if killed while writing
            os.kill(pid, signal.SIGKILL)
        kills.append(pid)
        threading.Thread(target=kill, daemon=True).start()
    return hook


@pytest.mark.slow
def test_worker_killed_during_ddip_is_retried_and_resumes_to_the_uninterrupted_image(studies, weights, cluster,
                                                                                     tmp_path):
    from sirf_ddip.batch.runner import run_batch

    sets = ", ".join(f"{k}: {v}" for k, v in DDIP_SET.items())
    m = _manifest(tmp_path, f"studies: [{{name: s1, data: {studies / 's1'}}}]\n"
                            f"jobs:\n  ddip: {{method: ddip, seed: 0, weights: {weights}, set: {{{sets}}}}}\n"
                            "  report: {method: report}\n")
    out = tmp_path / "out"
    kills: list = []
    lines, echo = _lines()
    rec, rep = run_batch(load_manifest(m), out, handle=cluster, echo=echo, on_change=_watch_and_kill(out, kills))
    assert kills and rec.status == "done" and rec.attempts == 2, lines
    assert any("worker lost" in ln and "retrying (1/2)" in ln for ln in lines), lines
    assert any("resumed from its checkpoint" in ln for ln in lines), lines
    # the single command, uninterrupted, in this process
    single = _single_ddip(studies / "s1", tmp_path / "single", weights)
    assert np.array_equal(read_image(out / "s1" / "ddip" / "image.hv").array, single)
    # the report job: the study's metrics (those of the DDIP image against the truth) and report.html
    assert rep.status == "done"
    met = json.loads((out / "s1" / "report" / "metrics.json").read_text())["cases"]["s1"]["ddip"]
    from sirf_ddip.batch.metrics import image_metrics

    assert met["psnr"] == pytest.approx(image_metrics(studies / "s1", tmp_path / "single" / "image.hv")["psnr"],
                                        rel=1e-9)
    assert (out / "s1" / "report" / "report.html").stat().st_size > 1000


@pytest.mark.slow
def test_a_ddip_job_whose_worker_died_too_often_fails_clean_and_a_rerun_resumes_it(studies, weights, cluster, tmp_path):
    """``retries: 0``: the killed DDIP job is failed at once (the reason in batch.json), its folder keeps only the
    checkpoint (what the worker left half-written is removed); re-running the batch resumes it from that
    checkpoint to the uninterrupted image (the test above gives that image: same study, prior and settings)."""
    from sirf_ddip.batch.runner import run_batch

    sets = ", ".join(f"{k}: {v}" for k, v in DDIP_SET.items())
    m = load_manifest(_manifest(tmp_path, f"studies: [{{name: s1, data: {studies / 's1'}}}]\nretries: 0\n"
                                          f"jobs:\n  ddip: {{method: ddip, seed: 0, weights: {weights}, set: {{{sets}}}}}\n"))
    out = tmp_path / "out"
    kills: list = []
    lines, echo = _lines()
    (rec,) = run_batch(m, out, handle=cluster, echo=echo, on_change=_watch_and_kill(out, kills))
    assert kills and rec.status == "failed" and rec.attempts == 1, lines
    row = json.loads((out / "batch.json").read_text())["jobs"][0]
    assert row["status"] == "failed" and row["message"].startswith("sirf-ddip batch: its worker died 1 time(s)")
    left = sorted(p.name for p in (out / "s1" / "ddip").iterdir())
    assert "image_checkpoint" in left and not {"image.hv", ".image.hv.half-written", "job.json"} & set(left), left
    lines2, echo2 = _lines()
    (rec2,) = run_batch(m, out, handle=cluster, echo=echo2)
    assert rec2.status == "done" and any("resumed from its checkpoint" in ln for ln in lines2), lines2
    assert np.array_equal(read_image(out / "s1" / "ddip" / "image.hv").array,
                          _single_ddip(studies / "s1", tmp_path / "single", weights))


@pytest.mark.parametrize("served", [True, False])
def test_the_batch_prints_the_dashboard_address_the_scheduler_serves_and_says_so_when_none(tmp_path, capsys, served):
    """``--scheduler`` on a running (in-process) scheduler with and without a dashboard: the printed address is
    the one that answers HTTP; without one the line says none and why, never an address."""
    pytest.importorskip("distributed")
    if served:
        pytest.importorskip("bokeh")
    import logging
    import urllib.request

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                      silence_logs=logging.ERROR, dashboard_address="127.0.0.1:0" if served else None) as lc:
        m = _manifest(tmp_path, "studies: [{name: gone, data: nowhere}]\n"
                                "jobs: {osem: {method: osem, iterations: 1, subsets: 1}}\n")
        assert main(["batch", str(m), "--out", str(tmp_path / "out"), "--scheduler", lc.scheduler_address]) == 3
        err = capsys.readouterr().err.splitlines()
        (line,) = [ln for ln in err if ln.startswith("[batch] Dask dashboard: ")]
        if served:
            url = line.split(": ", 1)[1]
            assert url == lc.dashboard_link and url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(url, timeout=30) as r:     # bokeh's page, not Dask's "needs bokeh" one
                page = r.read()
                assert r.status == 200 and b"bokeh" in page.lower() and b"Dask needs" not in page
        else:
            assert line == (f"[batch] Dask dashboard: none (the scheduler at {lc.scheduler_address} serves none; "
                            "it needs bokeh>=3.1 where it runs)")
        assert any("gone/osem: FAILED: sirf-ddip osem: error:" in ln for ln in err)


def test_without_bokeh_a_cluster_started_here_says_that_its_dashboard_needs_bokeh(monkeypatch):
    import sys

    from sirf_ddip.batch import cluster as c

    monkeypatch.setitem(sys.modules, "bokeh", None)          # import bokeh -> ImportError
    assert not c._has_bokeh()
    assert c._no_dashboard_here() == "Dask serves one only with bokeh>=3.1: pip install 'sirf_ddip[batch]'"


def test_sirf_ddip_and_the_batch_command_import_without_dask():
    import subprocess
    import sys

    code = ("import sys, sirf_ddip.cli as c; c.build_parser(); import sirf_ddip.batch.runner, "
            "sirf_ddip.batch.execute, sirf_ddip.batch.summary; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', 'dask_jobqueue'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_prepare_job_writes_what_the_prepare_command_writes(tmp_path):
    """A scanner export -> PETRIC layout through the batch's prepare job (in this process), equal to the command."""
    from conftest import SHARED

    from sirf_ddip.batch.execute import run_task
    from sirf_ddip.data import ProjData
    from sirf_ddip.geometry.sinogram import SinogramGeometry
    from sirf_ddip.io import read_projdata, write_projdata

    mmr = SHARED / "real-mmr"
    if not all((mmr / n).is_file() for n in ("norm.n.hdr", "norm.n", "mu_map.hv", "mu_map.v")):
        pytest.skip(f"real mMR material not found in {mmr}")
    geom = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=5, num_tangential=41)
    export = tmp_path / "export"
    export.mkdir()
    rng = np.random.default_rng(3)
    write_projdata(export / "p.hs", ProjData(rng.poisson(5.0, geom.shape).astype(np.float32), geom))
    write_projdata(export / "r.hs", ProjData(np.full(geom.shape, 0.5, np.float32), geom))
    m = _manifest(tmp_path, f"studies: [{{name: e1, data: export}}]\njobs:\n  prep: {{method: prepare, prompts: p.hs, "
                            f"randoms: r.hs, norm: {mmr / 'norm.n.hdr'}, mu: {mmr / 'mu_map.hv'}, no_scatter: true}}\n")
    (task,) = plan_tasks(load_manifest(m), tmp_path / "out")
    res = run_task(task)
    assert res["status"] == "done", res
    assert main(["prepare", "--prompts", str(export / "p.hs"), "--randoms", str(export / "r.hs"), "--norm",
                 str(mmr / "norm.n.hdr"), "--mu", str(mmr / "mu_map.hv"), "--no-scatter", "--out-dir",
                 str(tmp_path / "single")]) == 0
    for f in ("prompts.hs", "mult_factors.hs", "additive_term.hs"):
        assert np.array_equal(read_projdata(task.folder / f).array, read_projdata(tmp_path / "single" / f).array)
    assert {"prompts.hs", "prepare_record.json", "prepare.png"} <= set(res["outputs"])
    later = plan_tasks(load_manifest(_manifest(tmp_path, m.read_text() + "  osem: {method: osem, iterations: 1, "
                                                          "subsets: 1}\n")), tmp_path / "out")
    assert later[1].deps == ["prep"] and later[1].data_dir == task.folder     # downstream jobs read its output
