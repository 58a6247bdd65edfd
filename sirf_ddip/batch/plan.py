"""From a manifest to tasks: one per study × job, with dependencies, input identities and the skip test.

A task's folder is ``OUT/<study>/<job>/``. A task depends on

- the ``prepare`` job whose output is its data (``data:``, or the manifest's only ``prepare`` job),
- the job whose image starts it (``init:``),
- for ``report``: every other job of its study.

Its *fingerprint* is a SHA-256 over the method, the settings, the size and modification time of every input
file (header and data file; a missing file is recorded as missing) and the fingerprints of the tasks it depends
on, so that a change upstream reruns everything downstream. A task is *complete* when its folder holds
``job.json`` (written last, atomically) with the same fingerprint and every output it lists exists; a batch
re-run skips complete tasks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .manifest import Manifest, JobSpec, Study

__all__ = ["Task", "plan_tasks", "is_complete", "DONE_RECORD", "IMAGE_NAME", "PETRIC_FILES", "read_done"]

#: the record a finished task writes last in its folder (its presence + fingerprint = done)
DONE_RECORD = "job.json"
#: the image every reconstruction job writes in its folder
IMAGE_NAME = "image.hv"
#: the projection data of a PETRIC-layout study folder (prompts, multiplicative factors, additive term)
PETRIC_FILES = {"prompts": "prompts.hs", "mult": "mult_factors.hs", "additive": "additive_term.hs"}
#: files of a study folder used when present: the MR (grid and prior conditioning) and the truth + masks (metrics)
MR_FILE = "mr.hv"
TRUTH_FILES = ("truth.hv", "mask_brain.hv", "mask_gm.hv", "mask_wm.hv", "mask_lesion.hv")
#: prepare-job keys naming files of the study's data folder
PREPARE_FILE_KEYS = ("prompts", "listmode", "template", "norm", "mu", "randoms", "scatter")


@dataclass
class Task:
    """One job of one study, everything a worker needs to run it (plain data; pickles to any worker)."""

    study: str
    job: str
    method: str
    settings: dict[str, Any]
    study_dir: Path                 # the study's own data folder (MR, truth, scanner export)
    data_dir: Path                  # where its projection data are: the study folder or a prepare job's folder
    folder: Path                    # OUT/<study>/<job>
    deps: list[str] = field(default_factory=list)          # job names of the same study
    init_image: Path | None = None  # the image of its ``init`` job
    images: dict[str, Path] = field(default_factory=dict)  # report: job -> image
    fingerprint: str = ""

    @property
    def label(self) -> str:
        return f"{self.study}/{self.job}"

    @property
    def mr(self) -> Path:
        """The study's MR (in a prepare job's folder, or the study's own)."""
        own = self.data_dir / MR_FILE
        return own if own.is_file() or self.data_dir == self.study_dir else self.study_dir / MR_FILE

    def data_file(self, role: str) -> Path:
        return self.data_dir / PETRIC_FILES[role]


def _default_data_job(jobs: tuple[JobSpec, ...]) -> str | None:
    prep = [j.name for j in jobs if j.method == "prepare"]
    return prep[0] if len(prep) == 1 else None


def _deps(job: JobSpec, jobs: tuple[JobSpec, ...]) -> list[str]:
    if job.method == "prepare":
        return []
    if job.method == "report":
        return [j.name for j in jobs if j.method != "report"]
    out = []
    data = job.get("data") or _default_data_job(jobs)
    if data:
        out.append(data)
    if job.get("init"):
        out.append(job.get("init"))
    return out


def _file_stats(path: Path) -> list[Any]:
    """``[name, size, mtime_ns]`` of a file and (Interfile) of its data file; ``[name, None]`` when missing."""
    out: list[Any] = []
    p = Path(path)
    if not p.is_file():
        return [str(p), None]
    st = p.stat()
    out += [str(p), st.st_size, st.st_mtime_ns]
    if p.name.lower().endswith((".hs", ".hv", ".hdr")):
        data = _interfile_data_file(p)
        if data is not None and data.is_file():
            st = data.stat()
            out += [str(data), st.st_size, st.st_mtime_ns]
    return out


def _interfile_data_file(header: Path) -> Path | None:
    try:
        for line in header.read_text(encoding="utf-8", errors="replace").splitlines()[:200]:
            key, sep, value = line.partition(":=")
            if sep and key.strip().lstrip("!").strip().lower() == "name of data file" and value.strip():
                v = Path(value.strip())
                return v if v.is_absolute() else header.parent / v
    except OSError:
        return None
    return None


def _input_files(task: Task) -> dict[str, Path]:
    """The files a task reads that no other task of the batch writes (those are covered by its deps)."""
    files: dict[str, Path] = {}
    s = task.settings
    if task.method == "prepare":
        for k in PREPARE_FILE_KEYS:
            if s.get(k):
                files[k] = task.study_dir / s[k]
        return files
    if task.method == "report":
        return {k: task.study_dir / k for k in TRUTH_FILES}
    if task.data_dir == task.study_dir:
        files.update({role: task.data_file(role) for role in PETRIC_FILES})
    files["mr"] = task.study_dir / MR_FILE
    if task.method == "ddip":
        files.update(_prior_and_config(s.get("weights"), s.get("config")))
    return files


def _prior_and_config(weights: str | None, config: str | None) -> dict[str, Path]:
    """A DDIP job's prior (weights file and card; the shipped one by default) and config files (the shipped
    settings always, a given file over them), so that a new prior or new shipped settings rerun it."""
    from ..errors import InputFileError
    from ..prior.weights import resolve_weights
    from ..recon.config import SHIPPED_CONFIG

    out: dict[str, Path] = {"shipped_config": SHIPPED_CONFIG}
    if config:
        out["config"] = Path(config)
    try:
        out["weights"], out["weights_card"] = resolve_weights(weights)
    except InputFileError:   # reported by the job itself, with the command's message
        out["weights"] = Path(str(weights))
    return out


def _fingerprint(task: Task, dep_prints: Mapping[str, str]) -> str:
    ident = {"method": task.method, "settings": task.settings, "data_dir": str(task.data_dir),
             "files": {k: _file_stats(p) for k, p in sorted(_input_files(task).items())},
             "deps": dict(sorted(dep_prints.items()))}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def plan_tasks(manifest: Manifest, out: str | Path) -> list[Task]:
    """Every study × job as a :class:`Task`, in an order where each task comes after the tasks it depends on."""
    out = Path(out).resolve()
    jobs = manifest.jobs
    order: list[JobSpec] = []

    def add(j: JobSpec) -> None:
        if j in order:
            return
        for d in _deps(j, jobs):
            add(manifest.job(d))
        order.append(j)

    for j in jobs:
        add(j)
    tasks: list[Task] = []
    for st in manifest.studies:
        tasks += _study_tasks(st, order, out)
    return tasks


def _study_tasks(study: Study, order: list[JobSpec], out: Path) -> list[Task]:
    by: dict[str, Task] = {}
    for j in order:
        deps = _deps(j, tuple(order))
        data_job = next((d for d in deps if by[d].method == "prepare"), None)
        folder = out / study.name / j.name
        t = Task(study.name, j.name, j.method, dict(j.settings), study.data,
                 by[data_job].folder if data_job else study.data, folder, deps)
        if j.get("init"):
            t.init_image = by[j.get("init")].folder / IMAGE_NAME
        if j.method == "report":
            t.images = {d: by[d].folder / IMAGE_NAME for d in deps if by[d].method != "prepare"}
        t.fingerprint = _fingerprint(t, {d: by[d].fingerprint for d in deps})
        by[j.name] = t
    return list(by.values())


def read_done(task: Task) -> dict[str, Any] | None:
    """The task's ``job.json``, or None when absent or unreadable."""
    p = task.folder / DONE_RECORD
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def is_complete(task: Task) -> bool:
    """True when the task's ``job.json`` has its current fingerprint and every output it lists exists."""
    rec = read_done(task)
    if rec is None or rec.get("fingerprint") != task.fingerprint or rec.get("status") != "done":
        return False
    return all((task.folder / f).is_file() for f in rec.get("outputs", []))
