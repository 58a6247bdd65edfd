"""The batch manifest: which studies, which jobs per study, and (optionally) which cluster.

A manifest is a YAML file::

    studies:
      - {name: s1, data: path/to/study1}     # a PETRIC-layout folder (prompts.hs, mult_factors.hs, ...)
    jobs:
      osem: {method: osem, iterations: 2, subsets: 7}
      ddip: {method: ddip, seed: 0, set: {num_steps: 3}}
    cluster: {kind: slurm, queue: gpu, cores: 8, memory: 32GB, walltime: "02:00:00", jobs: 4}

Every study runs every job. Paths in the manifest (``data``, a job's ``config`` or ``weights``) are relative to
the manifest's folder; the file keys of a ``prepare`` job (``prompts``, ``norm``, ``mu``, ...) are relative to the
study's ``data`` folder, since they name files of each study's scanner export. Unknown keys, wrong types and
unknown job names are :class:`~sirf_ddip.errors.ConfigError` naming the file and the key (exit 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

__all__ = ["Study", "JobSpec", "Manifest", "load_manifest", "METHODS", "JOB_KEYS", "CLUSTER_KINDS",
           "CLUSTER_KEYS", "set_overrides"]

#: the methods a job can run
METHODS = ("prepare", "osem", "map_rdp", "ddip", "report")

#: each method's keys (besides ``method``) -> the Python types accepted
_PATH = (str,)
_INT = (int,)
_NUM = (int, float)
JOB_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "prepare": {"prompts": _PATH, "listmode": _PATH, "template": _PATH, "start": _NUM, "end": _NUM,
                "norm": _PATH, "mu": _PATH, "mu_units": _PATH, "randoms": _PATH, "scatter": _PATH,
                "no_scatter": (bool,), "scatter_iterations": _INT, "energy_window_from_scanner": (bool,),
                "device": _PATH},
    "osem": {"iterations": _INT, "subsets": _INT, "postfilter_fwhm": _NUM, "init": _PATH, "data": _PATH,
             "device": _PATH},
    "map_rdp": {"beta": _NUM, "iterations": _INT, "gamma": _NUM, "epsilon_rel": _NUM, "neighbourhood": _INT,
                "init": _PATH, "data": _PATH, "device": _PATH},
    "ddip": {"seed": _INT, "set": (dict,), "config": _PATH, "weights": _PATH, "no_mr": (bool,), "data": _PATH,
             "device": _PATH},
    "report": {"data": _PATH},
}
#: keys each method must have
_REQUIRED = {"osem": ("iterations", "subsets"), "map_rdp": ("beta", "iterations")}
#: job keys that name a file relative to the manifest's folder (the others name a job or a study file)
_MANIFEST_PATHS = ("config", "weights")

#: cluster kinds: a local one, or one started through dask-jobqueue
CLUSTER_KINDS = ("local", "slurm", "pbs", "sge", "lsf")
CLUSTER_KEYS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "scheduler": (str,), "workers": (int,), "jobs": (int,), "queue": (str,), "account": (str,),
    "cores": (int,), "processes": (int,), "memory": (str,), "walltime": (str,), "gpus": (int,),
    "job_extra_directives": (list,), "job_script_prologue": (list,), "interface": (str,),
    "local_directory": (str,), "log_directory": (str,), "python": (str,),
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Study:
    """One study: its name (the output sub-folder) and its data folder (absolute)."""

    name: str
    data: Path


@dataclass(frozen=True)
class JobSpec:
    """One job of every study: its name, method and settings (paths to manifest files made absolute).

    ``data`` names a ``prepare`` job whose output folder replaces the study's data (default: the manifest's
    only ``prepare`` job, if it has one); ``init`` (``osem``, ``map_rdp``) names the job whose image starts it.
    """

    name: str
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest."""

    path: Path
    studies: tuple[Study, ...]
    jobs: tuple[JobSpec, ...]
    cluster: Mapping[str, Any] | None = None
    retries: int = 2

    def job(self, name: str) -> JobSpec:
        return next(j for j in self.jobs if j.name == name)


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
             list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_type(src: str, key: str, value: Any, types: tuple[type, ...]) -> Any:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{src}: key '{key}' must be {_type_name(types)}, got {value!r}")
    return value


def _check_name(src: str, key: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{src}: key '{key}' must be a name of letters, digits, '-', '_', '.' "
                          f"(not starting with '.' or '-'), got {name!r}")
    return name


def set_overrides(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """A ``set:`` mapping as ``--set KEY=VALUE`` strings (nested mappings become dotted keys)."""
    import json

    out = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += set_overrides(v, key + ".")
        else:
            out.append(f"{key}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}")
    return out


def _parse_job(src: str, name: str, raw: Any, base: Path) -> JobSpec:
    where = f"jobs.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: key '{where}' must be a mapping with a 'method', got {raw!r}")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"{src}: key '{where}.method' must be one of {', '.join(METHODS)}, got {method!r}")
    allowed = JOB_KEYS[method]
    settings: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "method":
            continue
        if k not in allowed:
            raise ConfigError(f"{src}: unknown key '{where}.{k}' for method {method} "
                              f"(known: {', '.join(sorted(allowed))})")
        v = _check_type(src, f"{where}.{k}", v, allowed[k])
        if k in _MANIFEST_PATHS:
            v = str((base / v).resolve()) if not Path(v).is_absolute() else v
        settings[k] = v
    for k in _REQUIRED.get(method, ()):
        if k not in settings:
            raise ConfigError(f"{src}: key '{where}.{k}' is required for method {method}")
    if method == "prepare" and ("prompts" in settings) == ("listmode" in settings):
        raise ConfigError(f"{src}: key '{where}' needs exactly one of 'prompts' and 'listmode'")
    for k in ("norm", "mu"):
        if method == "prepare" and k not in settings:
            raise ConfigError(f"{src}: key '{where}.{k}' is required for method prepare")
    if "set" in settings:
        set_overrides(settings["set"])   # its keys are checked by the DDIP config when the job runs
    return JobSpec(name, method, settings)


def _parse_cluster(src: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: key 'cluster' must be a mapping (kind, queue, cores, memory, walltime, ...)")
    out = {}
    for k, v in raw.items():
        if k not in CLUSTER_KEYS:
            raise ConfigError(f"{src}: unknown key 'cluster.{k}' (known: {', '.join(sorted(CLUSTER_KEYS))})")
        out[k] = _check_type(src, f"cluster.{k}", v, CLUSTER_KEYS[k])
    kind = out.setdefault("kind", "local")
    if kind not in CLUSTER_KINDS:
        raise ConfigError(f"{src}: key 'cluster.kind' must be one of {', '.join(CLUSTER_KINDS)}, got {kind!r}")
    for k in ("workers", "jobs", "cores", "processes", "gpus"):
        if k in out and out[k] < (0 if k == "gpus" else 1):
            raise ConfigError(f"{src}: key 'cluster.{k}' must be >= {0 if k == 'gpus' else 1}, got {out[k]}")
    return out


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest (see the module docstring).

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a key is unknown, missing, of the wrong type, or names an unknown
        job; the message names the file and the key.
    """
    from ..config import read_yaml

    path = Path(path)
    data = read_yaml(path)
    src = str(path)
    base = path.resolve().parent
    for k in data:
        if k not in ("studies", "jobs", "cluster", "retries"):
            raise ConfigError(f"{src}: unknown key '{k}' (known: studies, jobs, cluster, retries)")
    raw_studies = data.get("studies")
    if not isinstance(raw_studies, list) or not raw_studies:
        raise ConfigError(f"{src}: key 'studies' must list at least one study ({{name, data}})")
    studies = []
    for i, s in enumerate(raw_studies):
        where = f"studies[{i}]"
        if not isinstance(s, Mapping):
            raise ConfigError(f"{src}: key '{where}' must be a mapping {{name, data}}, got {s!r}")
        for k in s:
            if k not in ("name", "data"):
                raise ConfigError(f"{src}: unknown key '{where}.{k}' (known: name, data)")
        if "data" not in s:
            raise ConfigError(f"{src}: key '{where}.data' is required (the study's folder)")
        name = _check_name(src, f"{where}.name", s.get("name"))
        d = Path(_check_type(src, f"{where}.data", s["data"], _PATH))
        studies.append(Study(name, d if d.is_absolute() else (base / d).resolve()))
    names = [s.name for s in studies]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{src}: key 'studies' names a study twice: {', '.join(dup)}")
    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, Mapping) or not raw_jobs:
        raise ConfigError(f"{src}: key 'jobs' must map job names to settings ({{method: osem, ...}})")
    jobs = [_parse_job(src, _check_name(src, "jobs", str(n)), v, base) for n, v in raw_jobs.items()]
    _check_references(src, jobs)
    cluster = _parse_cluster(src, data["cluster"]) if data.get("cluster") is not None else None
    retries = data.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{src}: key 'retries' must be an integer >= 0, got {retries!r}")
    return Manifest(path, tuple(studies), tuple(jobs), cluster, retries)


def _check_references(src: str, jobs: list[JobSpec]) -> None:
    """``init`` names an image-making job, ``data`` a ``prepare`` job; no job depends on itself."""
    by = {j.name: j for j in jobs}
    for j in jobs:
        init = j.get("init")
        if init is not None:
            if init not in by or by[init].method not in ("osem", "map_rdp", "ddip") or init == j.name:
                raise ConfigError(f"{src}: key 'jobs.{j.name}.init' must name another osem, map_rdp or ddip job, "
                                  f"got {init!r}")
        data = j.get("data")
        if data is not None and (data not in by or by[data].method != "prepare"):
            raise ConfigError(f"{src}: key 'jobs.{j.name}.data' must name a prepare job, got {data!r}")
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in stack:
            raise ConfigError(f"{src}: key 'jobs.{name}.init' makes a cycle: {' -> '.join(stack + (name,))}")
        if name in seen:
            return
        nxt = by[name].get("init")
        if nxt is not None:
            visit(nxt, stack + (name,))
        seen.add(name)

    for j in jobs:
        visit(j.name, ())
