"""Run one batch task on a worker: the same code the single commands run, in ``OUT/<study>/<job>/``.

- ``osem``: ``sirf-ddip osem`` (``--init``: the ``init`` job's image, or a uniform image on the MR's grid
  written as ``init.hv``), output ``image.hv`` + ``image_run_record.json``;
- ``ddip``: ``sirf-ddip recon`` with the job's ``seed``, ``set:`` overrides, ``config``, ``weights``; checkpoints in
  ``image_checkpoint/``; a task re-run after an interruption (a worker's death) continues from the checkpoint
  through ``--resume`` (whose input-identity check still applies);
- ``prepare``: ``sirf-ddip prepare --out-dir`` the job folder;
- ``map_rdp`` (no single command): :class:`~sirf_ddip.recon.map_rdp.MAPRDPReconstructor` on the engine's
  likelihood, image + run record written as the commands write theirs;
- ``report``: the study's metrics against its truth (``metrics.json``) and ``report.html``.

A failure of the study's data (a missing file, a bad header) is the command's own one-line message
(``sirf-ddip osem: error: ...``), returned as the task's result, never raised: the other tasks go on. A failed
task leaves no output but its DDIP checkpoint (to resume from); a finished one writes ``job.json`` last.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .plan import DONE_RECORD, IMAGE_NAME, Task

__all__ = ["run_task", "clear_unfinished", "EVENT_TOPIC", "THREADS_ENV", "CHECKPOINT_DIR", "ATTEMPT_RECORD",
           "LOG_FILE"]

#: torch threads per worker, set by the cluster that started the worker (see :mod:`.cluster`)
THREADS_ENV = "SIRF_DDIP_TORCH_THREADS"
#: a DDIP job's checkpoint folder inside its job folder
CHECKPOINT_DIR = "image_checkpoint"
#: written when a task starts: the fingerprint its checkpoint belongs to
ATTEMPT_RECORD = "attempt.json"
#: the messages of the task's command (stdout and stderr)
LOG_FILE = "job.log"
_KEEP_ON_RESUME = (CHECKPOINT_DIR, ATTEMPT_RECORD, "image_log.jsonl")


def _threads() -> int | None:
    v = os.environ.get(THREADS_ENV, "").strip()
    return int(v) if v.isdigit() and int(v) > 0 else None


def _resumable(task: Task) -> bool:
    """A checkpoint of this very task (same fingerprint) is in its folder."""
    from ..recon.ddip import CHECKPOINT_FILE

    try:
        rec = json.loads((task.folder / ATTEMPT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (task.method == "ddip" and rec.get("fingerprint") == task.fingerprint
            and (task.folder / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file())


def _clear(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove everything in ``folder`` except the names in ``keep``."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def clear_unfinished(task: Task) -> None:
    """Remove what a task whose worker died left in its folder (a temporary of an output being written, say),
    keeping a DDIP task's checkpoint and the attempt record it belongs to, as a failed task does."""
    _clear(task.folder, keep=_KEEP_ON_RESUME if task.method == "ddip" else (ATTEMPT_RECORD,))


def _outputs(folder: Path) -> list[str]:
    """The files a finished task leaves (relative names; not its checkpoints or the batch's own records)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] not in (CHECKPOINT_DIR, ATTEMPT_RECORD, DONE_RECORD, LOG_FILE):
            out.append(str(rel))
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _command(argv: list[str]) -> None:
    """Run ``sirf-ddip ARGV`` in this process, raising the command's own errors (see :func:`sirf_ddip.cli.main`)."""
    from ..cli import build_parser
    from ..errors import ConfigError
    from ..utils.leniency import collect_input_warnings

    try:
        args = build_parser().parse_args([str(a) for a in argv])
    except SystemExit:
        raise ConfigError(f"bad options for sirf-ddip {argv[0]}: {' '.join(map(str, argv[1:]))}") from None
    with collect_input_warnings(f"sirf-ddip {args.command}"):
        rc = args.func(args)
    if rc:
        raise RuntimeError(f"sirf-ddip {argv[0]} exited with status {rc}")


def _petric(task: Task) -> list[str]:
    return ["--prompts", task.data_file("prompts"), "--mult", task.data_file("mult"),
            "--additive", task.data_file("additive")]


def _device(task: Task) -> list[str]:
    return ["--device", task.settings["device"]] if task.settings.get("device") else []


def _uniform_on_mr_grid(task: Task, path: Path) -> Path:
    """``init.hv``: ones on the grid of the study's MR (the reconstruction grid of every method)."""
    import numpy as np

    from ..data import Image
    from ..errors import InputFileError
    from ..io import read_image, write_image

    mr = task.mr
    if not mr.is_file():
        raise InputFileError(mr, "file missing from the study folder (its grid is the reconstruction grid; "
                                 "or give the job an 'init' job)")
    grid = read_image(mr).grid
    write_image(path, Image(np.ones(grid.shape, np.float32), grid, {}), overwrite=True)
    return path


def _init_image(task: Task) -> Path:
    if task.init_image is not None:
        return task.init_image
    return _uniform_on_mr_grid(task, task.folder / "init.hv")


def _run_osem(task: Task) -> None:
    s = task.settings
    argv = ["osem", *_petric(task), "--init", _init_image(task), "--iterations", s["iterations"],
            "--subsets", s["subsets"], "--out", task.folder / IMAGE_NAME, "--overwrite", *_device(task)]
    if s.get("postfilter_fwhm") is not None:
        argv += ["--postfilter-fwhm", s["postfilter_fwhm"]]
    _command(argv)


def ddip_argv(task: Task, resume: bool) -> list[Any]:
    """The ``sirf-ddip recon`` command line of a DDIP task (``--resume`` from its checkpoint if ``resume``)."""
    from .manifest import set_overrides

    s = task.settings
    ck = task.folder / CHECKPOINT_DIR
    argv: list[Any] = ["recon", *_petric(task), "--out", task.folder / IMAGE_NAME, "--checkpoint-dir", ck,
                       "--overwrite", *_device(task)]
    argv += ["--no-mr"] if s.get("no_mr") else ["--mr", task.mr]
    for k in ("seed", "config", "weights"):
        if s.get(k) is not None:
            argv += [f"--{k}", s[k]]
    for kv in set_overrides(s.get("set") or {}):
        argv += ["--set", kv]
    if _threads():
        argv += ["--threads", _threads()]
    if resume:
        argv += ["--resume", ck]
    return argv


def _run_ddip(task: Task) -> None:
    from ..errors import ResumeMismatchError

    if _resumable(task):
        try:
            _command(ddip_argv(task, resume=True))
            return
        except ResumeMismatchError as exc:   # the data changed under the same names: start again
            print(f"batch: not resuming ({_one_line(exc)}); starting again", flush=True)
            _clear(task.folder, keep=(ATTEMPT_RECORD,))
    _command(ddip_argv(task, resume=False))


def _run_prepare(task: Task) -> None:
    s = task.settings
    argv: list[Any] = ["prepare", "--out-dir", task.folder, "--overwrite", *_device(task)]
    for k in ("prompts", "listmode", "template", "norm", "mu", "randoms", "scatter"):
        if s.get(k):
            argv += [f"--{k}", task.study_dir / s[k]]
    for k, flag in (("start", "--start"), ("end", "--end"), ("mu_units", "--mu-units"),
                    ("scatter_iterations", "--scatter-iterations")):
        if s.get(k) is not None:
            argv += [flag, s[k]]
    for k, flag in (("no_scatter", "--no-scatter"), ("energy_window_from_scanner", "--energy-window-from-scanner")):
        if s.get(k):
            argv.append(flag)
    _command(argv)


def _run_map_rdp(task: Task) -> None:
    """MAP-RDP (SGP, monotone) from the ``init`` job's image or a uniform one; image + run record."""
    from ..io import read_image, write_image
    from ..physics.model import EngineLogLikelihood
    from ..recon.map_rdp import MAPRDPReconstructor
    from ..utils.checks import require_finite
    from ..utils.device import resolve_device
    from ..utils.provenance import write_run_record

    s = task.settings
    device = resolve_device(s.get("device"))
    t0 = time.perf_counter()
    init_path = _init_image(task)
    init = read_image(init_path)
    require_finite(init.array, init_path, "initial image")
    ds = EngineLogLikelihood.from_files(task.data_file("prompts"), task.data_file("mult"),
                                        task.data_file("additive"), image_template=init_path, device=device)
    params = {"beta": float(s["beta"]), "gamma": float(s.get("gamma", 2.0)),
              "epsilon_rel": float(s.get("epsilon_rel", 1e-3)), "neighbourhood": int(s.get("neighbourhood", 26))}
    rec = MAPRDPReconstructor(**params)
    rec.set_objective_function(ds)
    rec.set_num_subiterations(int(s["iterations"]))
    rec.set_up(init)
    rec.set_current_estimate(init)
    rec.process()
    out = task.folder / IMAGE_NAME
    write_image(out, rec.get_output(), overwrite=True)
    write_run_record(task.folder, config={"command": "map_rdp", **params, "iterations": int(s["iterations"]),
                                          "algorithm": "sgp", "init": str(init_path)},
                     seed=None, name="image_run_record",
                     extra={"inputs": {r: str(task.data_file(r)) for r in ("prompts", "mult", "additive")},
                            "output": str(out), "device": str(device), "objective": rec.objective_value,
                            "seconds": round(time.perf_counter() - t0, 2)})


def _run_report(task: Task) -> None:
    from .metrics import write_study_report

    write_study_report(task)


_RUNNERS: dict[str, Callable[[Task], None]] = {
    "prepare": _run_prepare, "osem": _run_osem, "map_rdp": _run_map_rdp, "ddip": _run_ddip, "report": _run_report,
}
_COMMAND_NAMES = {"prepare": "prepare", "osem": "osem", "map_rdp": "batch map_rdp", "ddip": "recon",
                  "report": "batch report"}


#: the Dask event topic on which a task says that it started (and where: worker address, process id)
EVENT_TOPIC = "sirf_ddip.batch"


def _announce(task: Task) -> None:
    """Tell the client (through the scheduler's event log) that this task runs here, when on a Dask worker."""
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        w = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker (run in this process)
        return
    w.log_event(EVENT_TOPIC, {"key": getattr(thread_state, "key", None), "label": task.label,
                              "worker": w.address, "pid": os.getpid()})


def run_task(task: Task) -> dict[str, Any]:
    """Run ``task`` here (a Dask worker, or this process) and return ``{"status", "message", "seconds", ...}``.

    ``status`` is ``"done"`` or ``"failed"`` (with the command's one-line message). Never raises for the task's
    own errors; a worker's death is seen by the caller (the task is then resubmitted and resumes).
    """
    from ..errors import SirfDdipError
    from ..utils.atomic import ensure_folder, write_text

    t0 = time.perf_counter()
    _announce(task)
    threads = _threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
    resuming = _resumable(task)
    _clear(task.folder, keep=_KEEP_ON_RESUME if resuming else ())
    ensure_folder(task.folder)
    write_text(task.folder / ATTEMPT_RECORD, json.dumps({"fingerprint": task.fingerprint}))
    log = io.StringIO()
    result: dict[str, Any] = {"study": task.study, "job": task.job, "method": task.method}
    name = f"sirf-ddip {_COMMAND_NAMES[task.method]}"
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            _RUNNERS[task.method](task)
            metrics = None
            if task.method in ("osem", "map_rdp", "ddip"):
                from .metrics import image_metrics

                metrics = image_metrics(task.study_dir, task.folder / IMAGE_NAME)
    except SirfDdipError as exc:
        result.update(status="failed", message=f"{name}: error: {_one_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - a bug or the environment: reported as the CLI reports it
        result.update(status="failed", message=f"{name}: unexpected error: {type(exc).__name__}: {_one_line(exc)}")
    else:
        result.update(status="done", message="", metrics=metrics, resumed=resuming)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if result["status"] == "failed":
        clear_unfinished(task)
        write_text(task.folder / LOG_FILE, log.getvalue())
        return result
    result["outputs"] = _outputs(task.folder)
    write_text(task.folder / LOG_FILE, log.getvalue())
    write_text(task.folder / DONE_RECORD, json.dumps({**result, "fingerprint": task.fingerprint}, indent=2,
                                                     default=str))
    return result
