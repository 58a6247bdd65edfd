"""Where a batch runs: a ``LocalCluster`` sized to this machine, a running Dask scheduler, or a cluster started
through ``dask-jobqueue`` (SLURM, PBS, SGE, LSF).

Sizing a local cluster (:func:`local_layout`): every worker runs one task at a time (a Dask resource ``job=1``)
with ``t`` torch threads, and ``workers × t`` equals the cores, so torch's threads never oversubscribe them.
With GPUs there is one worker per GPU (``CUDA_VISIBLE_DEVICES`` set per worker) and the cores are shared among
them; without, ``t`` is 1 below 4 cores, 2 below 16 and 4 above (several studies side by side scale better than
one study on many threads), and the workers are capped so that each has at least :data:`MEMORY_PER_WORKER`.

The scheduler of a cluster started here marks a task whose worker died as failed at once
(``allowed-failures: 0``); the runner (:mod:`.runner`) resubmits it a bounded number of times, so the same
bound holds on every kind of cluster. Dask is imported here only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from .execute import THREADS_ENV

__all__ = ["WorkerLayout", "local_layout", "machine_resources", "worker_env", "ClusterHandle", "start_cluster",
           "jobqueue_cluster", "submit_error", "JOB_RESOURCE", "MEMORY_PER_WORKER", "BOKEH_REQUIREMENT"]

#: the Dask resource every batch worker of a cluster started here has one of (one task per worker at a time)
JOB_RESOURCE = {"job": 1}
#: the least memory a local CPU worker is given (bytes) when the workers are counted from the cores
MEMORY_PER_WORKER = 4 * 2**30
_JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}


@dataclass(frozen=True)
class WorkerLayout:
    """One local worker: its torch threads and its environment (``CUDA_VISIBLE_DEVICES`` with GPUs)."""

    threads: int
    env: Mapping[str, str] = field(default_factory=dict)


def machine_resources() -> tuple[int, int, int | None]:
    """``(cores usable by this process, CUDA GPUs, memory in bytes or None)``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU workers
        gpus = 0
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    return max(1, cores), gpus, memory


def worker_env(threads: int, gpu: int | None = None) -> dict[str, str]:
    """The environment of a batch worker with ``threads`` torch threads (and one GPU)."""
    env = {THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "NUMBA_NUM_THREADS": str(threads), "SIRF_DDIP_PROGRESS": "0"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def local_layout(cores: int, gpus: int = 0, workers: int | None = None,
                 memory: int | None = None) -> list[WorkerLayout]:
    """The workers of a local cluster on a machine with ``cores``, ``gpus`` and ``memory`` (see the module doc).

    ``workers`` fixes their number (with GPUs at most one per GPU); the cores are then shared among them.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if gpus > 0:
        n = min(workers or gpus, gpus)
        t = max(1, cores // n)
        return [WorkerLayout(t, worker_env(t, gpu=i)) for i in range(n)]
    if workers is not None:
        n = workers
        t = max(1, cores // n)
    else:
        t = 1 if cores < 4 else 2 if cores < 16 else 4
        n = max(1, cores // t)
        if memory:
            n = max(1, min(n, memory // MEMORY_PER_WORKER))
    return [WorkerLayout(t, worker_env(t)) for _ in range(n)]


@dataclass
class ClusterHandle:
    """A connected Dask client, the cluster started for it (None for a running scheduler), and how to say it."""

    client: Any
    cluster: Any = None
    description: str = ""
    resources: Mapping[str, int] | None = None     # what each task asks for (None on a foreign scheduler)
    dashboard: str | None = None                   # the scheduler's dashboard address, when it serves one
    expected_workers: int = 1
    no_dashboard: str = "the scheduler serves none"  # why there is no dashboard (said instead of an address)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


#: what Dask's dashboard needs (``distributed.versions.BOKEH_REQUIREMENT``)
BOKEH_REQUIREMENT = "bokeh>=3.1"


def _has_bokeh() -> bool:
    """Whether this environment can serve Dask's dashboard (bokeh importable, in the version Dask accepts)."""
    try:
        import bokeh
        from packaging.version import Version
    except ImportError:
        return False
    try:
        return Version(bokeh.__version__) >= Version("3.1")
    except Exception:  # noqa: BLE001 - an odd version string: let Dask decide
        return True


def _dashboard(client) -> str | None:
    """The address of the scheduler's dashboard, or None when it serves none.

    The scheduler's ``dashboard`` service is its HTTP server, which runs without bokeh too (health, metrics, a
    page asking for bokeh), so the scheduler itself is asked whether the bokeh application is mounted on it
    (``distributed.dashboard.scheduler.connect`` adds it to ``Scheduler.http_application.applications``).
    """
    def serves(dask_scheduler=None) -> bool:   # runs on the scheduler (pickled by value: no sirf_ddip there)
        return bool(getattr(getattr(dask_scheduler, "http_application", None), "applications", None))

    try:
        if not client.run_on_scheduler(serves):
            return None
        link = client.dashboard_link   # from the scheduler's services (a Cluster's says "" without one)
    except Exception:  # noqa: BLE001 - no dashboard service, or the scheduler is gone
        return None
    return str(link) if link else None


def _no_dashboard_here() -> str:
    return ("the scheduler serves none" if _has_bokeh() else
            f"Dask serves one only with {BOKEH_REQUIREMENT}: pip install 'sirf_ddip[batch]'")


def _local(workers: int | None) -> ClusterHandle:
    import dask
    from distributed import Client, LocalCluster, Nanny

    cores, gpus, memory = machine_resources()
    layout = local_layout(cores, gpus, workers, memory)
    mem = "auto" if not memory else int(memory // len(layout))
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, resources=dict(JOB_RESOURCE),
                               memory_limit=mem, dashboard_address=":8787" if _has_bokeh() else None,
                               silence_logs=logging.ERROR)
        base = cluster.new_spec["options"]
        for i, w in enumerate(layout):
            cluster.worker_spec[f"batch-{i}"] = {"cls": Nanny, "options": {**base, "env": dict(w.env)}}
        cluster.sync(cluster._correct_state)
    client = Client(cluster)
    what = (f"LocalCluster: {len(layout)} worker(s) x {layout[0].threads} torch thread(s)"
            + (f", one GPU each (of {gpus})" if gpus else f" on {cores} core(s)"))
    return ClusterHandle(client, cluster, what, dict(JOB_RESOURCE), _dashboard(client), len(layout),
                         _no_dashboard_here())


def jobqueue_cluster(kind: str, options: Mapping[str, Any]):
    """A dask-jobqueue cluster of ``kind`` (slurm, pbs, sge, lsf) from the manifest's ``cluster:`` keys, with no
    job submitted yet (``cluster.job_script()`` shows what would be). Each job runs ``processes`` workers with
    ``cores // processes`` torch threads each, one task at a time."""
    import dask
    import dask_jobqueue

    if kind not in _JOBQUEUE:
        raise ConfigError(f"cluster kind must be one of local, {', '.join(_JOBQUEUE)}; got {kind!r}")
    for k in ("cores", "memory"):
        if options.get(k) is None:
            raise ConfigError(f"cluster: key '{k}' is required for a {kind} cluster (or --{k} on the command line)")
    cores, processes = int(options["cores"]), int(options.get("processes") or 1)
    if processes < 1 or cores % processes:
        raise ConfigError(f"cluster: key 'processes' ({processes}) must divide 'cores' ({cores})")
    gpus = int(options.get("gpus") or 0)
    if gpus > 1 or (gpus and processes > 1):
        raise ConfigError("cluster: key 'gpus' must be 0 or 1 with one process per job (one GPU per worker); "
                          "ask for more jobs instead")
    threads = cores // processes
    prologue = [f"export {k}={v}" for k, v in worker_env(threads).items()]
    prologue += list(options.get("job_script_prologue") or [])
    directives = list(options.get("job_extra_directives") or [])
    if gpus and kind == "slurm":
        directives.append("--gres=gpu:1")
    kwargs: dict[str, Any] = {"cores": cores, "processes": processes, "memory": options["memory"],
                              "job_script_prologue": prologue, "job_extra_directives": directives,
                              "worker_extra_args": ["--resources", "job=1"], "silence_logs": "error"}
    for k in ("queue", "walltime", "interface", "local_directory", "log_directory", "python"):
        if options.get(k) is not None:
            kwargs[k] = options[k]
    if options.get("account") is not None:
        kwargs["account" if kind in ("slurm", "pbs") else "project"] = options["account"]
    cls = getattr(dask_jobqueue, _JOBQUEUE[kind])
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cluster ({kind}): {' '.join(str(exc).split())}") from None


def _close_after_failed_submit(cluster) -> None:
    """Close a jobqueue cluster some of whose jobs were never submitted (Dask's close asserts they were)."""
    cluster.worker_spec.clear()
    for name in [n for n, w in cluster.workers.items() if getattr(w, "job_id", None) is None]:
        del cluster.workers[name]
    try:
        cluster.close()
    except Exception:  # noqa: BLE001 - nothing to tear down that was started
        pass


def submit_error(exc: BaseException) -> str:
    """One line from a refused job submission (dask-jobqueue's message holds the command and its stderr)."""
    text = str(exc)
    if "stderr:" in text:
        lines = [ln.strip() for ln in text.split("stderr:", 1)[1].splitlines() if ln.strip()]
        cmd = text.split("Command:", 1)[1].split("stdout:", 1)[0].split() if "Command:" in text else []
        if lines:
            said = "; ".join(lines[-2:])
            return said if not cmd or said.startswith(cmd[0]) else f"{cmd[0]}: {said}"
    return " ".join(text.split()) or type(exc).__name__


def start_cluster(options: Mapping[str, Any] | None = None, *, workers: int | None = None,
                  scheduler: str | None = None) -> ClusterHandle:
    """Connect to ``scheduler``, or start the cluster ``options`` describe (the manifest's ``cluster:`` block,
    command-line options already merged in; default: local)."""
    from distributed import Client

    opts = dict(options or {})
    scheduler = scheduler or opts.get("scheduler")
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"--scheduler {scheduler}: cannot connect ({' '.join(str(exc).split())})") from None
        n = len(client.scheduler_info().get("workers", {}))
        return ClusterHandle(client, None, f"scheduler {scheduler} ({n} worker(s) now)", None,
                             _dashboard(client), max(n, 1),
                             f"the scheduler at {scheduler} serves none; it needs {BOKEH_REQUIREMENT} where it runs")
    kind = opts.get("kind", "local")
    if kind == "local":
        return _local(workers or opts.get("workers"))
    cluster = jobqueue_cluster(kind, opts)
    jobs = int(opts.get("jobs") or workers or 1)
    try:   # submit the worker jobs now (``scale`` would, in the background): a refused submission is an error
        while len(cluster.worker_spec) < jobs:   # here, not a batch waiting forever. One spec = one job.
            cluster.worker_spec.update(cluster.new_worker_spec())
        cluster.sync(cluster._correct_state)
    except Exception as exc:  # noqa: BLE001 - the submit command failed (no controller, bad queue, ...)
        _close_after_failed_submit(cluster)
        raise ConfigError(f"cluster ({kind}): submitting its worker jobs failed: {submit_error(exc)}") from None
    client = Client(cluster)
    per = int(opts.get("processes") or 1)
    return ClusterHandle(client, cluster, f"{kind} cluster: {jobs} job(s) x {per} worker(s), "
                                          f"{opts['cores']} core(s), {opts['memory']} each", dict(JOB_RESOURCE),
                         _dashboard(client), jobs * per, _no_dashboard_here())
