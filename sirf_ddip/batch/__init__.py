"""``sirf-ddip batch``: many studies × several methods on Dask, from a laptop to a SLURM cluster.

Modules (one idea each): :mod:`.manifest` (the YAML contract), :mod:`.plan` (study × job tasks, dependencies,
input identities, skip), :mod:`.execute` (one task on a worker: the single commands' code), :mod:`.cluster`
(LocalCluster sized to the machine, a running scheduler, dask-jobqueue), :mod:`.runner` (submission, retries
after a worker's death, progress), :mod:`.summary` (``batch.json``, ``batch.html``).

Dask is imported only by :mod:`.cluster` and :mod:`.runner`, so ``import sirf_ddip`` never needs it (it is the
``batch`` extra).
"""
