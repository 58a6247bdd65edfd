"""CLI: ``sirf-ddip batch MANIFEST.yaml --out DIR`` — many studies × several methods on Dask.

Parsing only; the work is :func:`sirf_ddip.batch.runner.run_batch`. Exit status 0 when every job is done or
skipped, 3 when some failed (their one-line messages are in ``DIR/batch.json``), 2 for a bad manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..batch.manifest import CLUSTER_KINDS

#: exit status when some jobs failed (the batch itself ran)
SOME_FAILED = 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="reconstruct many studies with several methods on Dask (laptop, workstation, SLURM)",
        description="Run every job of MANIFEST (prepare, osem, map_rdp, ddip, report) on every study it lists, "
                    "each into DIR/<study>/<job>/ exactly as the single command writes it. A re-run skips "
                    "complete jobs and resumes DDIP jobs from their checkpoints. Default: a local Dask cluster "
                    "sized to this machine. Exit 0 when all jobs are done or skipped, 3 when some failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("manifest", metavar="MANIFEST.yaml", help="studies and jobs (see README, 'Batch')")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed if it exists)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT", help="use a running Dask scheduler")
    where.add_argument("--cluster", default=None, choices=CLUSTER_KINDS,
                       help="start a cluster of this kind (default: the manifest's cluster: block, else local)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local workers (default: sized to the cores, GPUs and memory)")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="batch-system jobs to start (slurm, ...)")
    p.add_argument("--queue", default=None, help="batch-system queue / partition")
    p.add_argument("--account", default=None, help="batch-system account / project")
    p.add_argument("--cores", type=int, default=None, help="cores per batch-system job")
    p.add_argument("--memory", default=None, help="memory per batch-system job, e.g. 32GB")
    p.add_argument("--walltime", default=None, help="wall time per batch-system job, e.g. 04:00:00")
    p.add_argument("--retries", type=int, default=None, metavar="K",
                   help="resubmissions of a job whose worker died (default: the manifest's retries, 2)")
    p.set_defaults(func=_batch)


def cluster_options(manifest_cluster, args) -> dict:
    """The manifest's ``cluster:`` block with the command line's options over it."""
    opts = dict(manifest_cluster or {})
    if args.cluster:
        if args.cluster != opts.get("kind"):
            opts = {k: v for k, v in opts.items() if k not in ("kind",)}
        opts["kind"] = args.cluster
    for k in ("queue", "account", "cores", "memory", "walltime", "jobs", "workers"):
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
    if args.scheduler:
        opts["scheduler"] = args.scheduler
    return opts


def _batch(args) -> int:
    from ..errors import ConfigError
    from ..batch.manifest import load_manifest

    if args.retries is not None and args.retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {args.retries}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    manifest = load_manifest(args.manifest)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from ..errors import OutputPathError

        raise OutputPathError(out, "is a file, not a folder", "--out")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ConfigError("sirf-ddip batch needs Dask: pip install 'sirf_ddip[batch]' (dask[distributed], "
                          "dask-jobqueue)") from None
    from ..batch.cluster import start_cluster
    from ..batch.runner import run_batch

    opts = cluster_options(manifest.cluster, args)
    records = run_batch(manifest, out, retries=args.retries,
                        start=lambda: start_cluster(opts, workers=opts.get("workers"),
                                                    scheduler=opts.get("scheduler")))
    return SOME_FAILED if any(r.status == "failed" for r in records) else 0
